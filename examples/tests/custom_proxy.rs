//! The custom edge proxy (`examples::custom_proxy`) in front of real greeter instances on
//! loopback: plaintext clients in, mesh mTLS out.

use std::sync::atomic::Ordering;

use examples::custom_proxy::{CANARY_HEADER, EdgeOptions, EdgeProxy, edge_yaml, send};
use examples::embed::{GreeterServer, Pki, ServerSpec, load_yaml, start_server};
use mesh_core::config::bootstrap::RateLimitSettings;

struct Mesh {
    _pki: Pki,
    servers: Vec<GreeterServer>,
    edge: EdgeProxy,
}

async fn mesh(v1: ServerSpec, options: EdgeOptions) -> Mesh {
    let pki = Pki::generate().expect("CA");
    let v1 = start_server(&pki, v1).await.expect("v1 starts");
    let v2 = start_server(&pki, ServerSpec::new("greeter-v2", "v2"))
        .await
        .expect("v2 starts");
    let yaml = edge_yaml(&[(v1.addr, "v1"), (v2.addr, "v2")]);
    let config = load_yaml("edge.yaml", &yaml).expect("valid Istio YAML");
    let credentials = pki.credentials("edge-gateway").expect("edge identity");
    let edge = EdgeProxy::start(&config, credentials, &options)
        .await
        .expect("edge starts");
    Mesh {
        _pki: pki,
        servers: vec![v1, v2],
        edge,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allowed_requests_are_routed_denied_get_403_and_unknown_hosts_404() {
    let mesh = mesh(ServerSpec::new("greeter-v1", "v1"), EdgeOptions::default()).await;
    let edge = mesh.edge.addr();

    // Allowed: routed by the VirtualService, over mTLS to the instance of the subset.
    let stable = send(edge, "GET", "greeter", "/hello", &[])
        .await
        .expect("answer");
    assert_eq!(stable.status, 200, "{stable:?}");
    assert_eq!(stable.version, "v1");
    assert_eq!(stable.body, "hello from greeter-v1\n");
    let canary = send(edge, "GET", "greeter", "/hello", &[(CANARY_HEADER, "yes")])
        .await
        .expect("answer");
    assert_eq!(canary.status, 200, "{canary:?}");
    assert_eq!(canary.version, "v2");

    // Denied by the DENY policy (path), and by the ALLOW policy (no rule allows DELETE):
    // answered at the edge, never sent to the mesh.
    let before: u64 = mesh
        .servers
        .iter()
        .map(|s| s.stats.requests.load(Ordering::Relaxed))
        .sum();
    for (method, path) in [
        ("GET", "/admin/users"),
        ("GET", "/admin"),
        ("DELETE", "/hello"),
    ] {
        let denied = send(edge, method, "greeter", path, &[])
            .await
            .expect("answer");
        assert_eq!(denied.status, 403, "{method} {path}: {denied:?}");
        assert_eq!(denied.body, "RBAC: access denied");
        assert_eq!(denied.version, "");
    }
    let after: u64 = mesh
        .servers
        .iter()
        .map(|s| s.stats.requests.load(Ordering::Relaxed))
        .sum();
    assert_eq!(before, after, "denied requests reached no greeter");

    // An unknown host: no route, 404 NR.
    let unknown = send(edge, "GET", "nowhere.example", "/", &[])
        .await
        .expect("answer");
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert_eq!(unknown.flags, "NR");

    // The edge's metrics saw all of it, the mTLS peer of the routed ones verified.
    let text = mesh.edge.metrics_text();
    let series = |code: &str| {
        text.lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains(&format!(r#"response_code="{code}""#))
            })
            .collect::<Vec<_>>()
    };
    let ok = series("200");
    assert_eq!(ok.len(), 2, "one series per answering version: {text}");
    for line in &ok {
        assert!(line.contains(r#"source_workload="edge-gateway""#), "{line}");
        assert!(
            line.contains(r#"destination_service="greeter.default.svc.cluster.local""#),
            "{line}"
        );
        assert!(
            line.contains(
                r#"destination_principal="spiffe://cluster.local/ns/default/sa/greeter""#
            ),
            "{line}"
        );
        assert!(line.ends_with(" 1"), "{line}");
    }
    let denied = series("403");
    assert_eq!(denied.len(), 1, "{text}");
    assert!(denied[0].ends_with(" 3"), "{}", denied[0]);
    let no_route = series("404");
    assert_eq!(no_route.len(), 1, "{text}");
    assert!(
        no_route[0].contains(r#"response_flags="NR""#),
        "{}",
        no_route[0]
    );

    mesh.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rate_limit_answers_429_past_the_burst() {
    let mesh = mesh(
        ServerSpec::new("greeter-v1", "v1"),
        EdgeOptions {
            rate_limit: Some(RateLimitSettings {
                requests_per_second: 1,
                burst: 3,
                per_principal: false,
            }),
            ..EdgeOptions::default()
        },
    )
    .await;
    let edge = mesh.edge.addr();
    let mut statuses = Vec::new();
    let mut limited = None;
    for _ in 0..20 {
        let answer = send(edge, "GET", "greeter", "/hello", &[])
            .await
            .expect("answer");
        statuses.push(answer.status);
        if answer.status == 429 && limited.is_none() {
            limited = Some(answer);
        }
    }
    // The burst goes through at once; twenty requests cannot all fit in 1/s + 3 unless
    // they took over 17 s.
    assert_eq!(&statuses[..3], &[200, 200, 200], "{statuses:?}");
    let limited = limited.unwrap_or_else(|| panic!("never limited: {statuses:?}"));
    assert_eq!(limited.flags, "RL");
    assert!(limited.body.contains("rate limited"), "{}", limited.body);
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    let served = mesh.servers[0].stats.requests.load(Ordering::Relaxed) as usize;
    assert_eq!(
        served,
        statuses.iter().filter(|s| **s == 200).count(),
        "only admitted requests reached the greeter"
    );
    // A denied request spends no token: authorization runs first, so it is a 403, not a 429.
    let denied = send(edge, "GET", "greeter", "/admin", &[])
        .await
        .expect("answer");
    assert_eq!(denied.status, 403);
    mesh.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_at_the_edge_hide_a_flaky_instance() {
    let flaky = ServerSpec {
        fail_every: Some(2),
        ..ServerSpec::new("greeter-v1", "v1")
    };
    let mesh = mesh(flaky, EdgeOptions::default()).await;
    for _ in 0..20 {
        let answer = send(mesh.edge.addr(), "GET", "greeter", "/hello", &[])
            .await
            .expect("answer");
        assert_eq!(answer.status, 200, "{answer:?}");
    }
    let v1 = &mesh.servers[0];
    // Attempt 1 succeeded; each later request's first attempt failed, its retry did not.
    let failed = v1.stats.failed.load(Ordering::Relaxed);
    assert_eq!(failed, 19, "every other attempt failed");
    assert_eq!(v1.stats.requests.load(Ordering::Relaxed), 20 + failed);
    mesh.edge.shutdown().await;
}
