//! What authorization costs a request: `AuthorizationPolicies::evaluate` over 50 policies.
//!
//! The policy set: 20 DENY policies (each a principal prefix and a path prefix, one with a
//! `request.headers` condition) and 30 ALLOW policies (principal, methods, path forms,
//! every third with a header condition). The request matches no DENY and only the last
//! ALLOW policy, so evaluation walks all 50.
//!
//! - `evaluate_50/allowed_by_last`: that HTTP request.
//! - `evaluate_50/denied_no_match`: the same from a principal no ALLOW names (denied after
//!   the full scan).
//! - `evaluate_50/tcp`: a TCP connection (HTTP-only ALLOW rules skipped, DENY rules
//!   without their HTTP fields).
//! - `compile_50`: selecting and compiling the 50 policies (at config load, off the request
//!   path).
//! - `layer_call_50`: one request through `AuthzLayer` to a `service_fn` that answers at
//!   once, including building the request with its `ClientInfo` and `Identity` extensions,
//!   on a current-thread runtime.
//!
//! `cargo bench -p benches --bench authz -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::config::{self, MeshConfig, Source};
use mesh_core::conn::ClientInfo;
use mesh_core::{Identity, Labels};
use mesh_tls::authz::{AuthorizationPolicies, AuthzLayer, AuthzRequest, HttpAttributes};
use tower::{Layer, ServiceExt, service_fn};

fn policies_yaml() -> String {
    let mut y = String::new();
    for i in 0..20 {
        let when = if i == 7 {
            "\n    when: [{key: \"request.headers[x-debug]\", values: [\"on\"]}]"
        } else {
            ""
        };
        y.push_str(&format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-{i}, namespace: shop}}\nspec:\n  action: DENY\n  rules:\n  - from: [{{source: {{principals: [\"cluster.local/ns/blocked-{i}/*\"]}}}}]\n    to: [{{operation: {{paths: [\"/internal-{i}/*\"]}}}}]{when}\n"
        ));
    }
    for i in 0..30 {
        let when = if i % 3 == 0 {
            "\n    when: [{key: \"request.headers[x-tenant]\", values: [\"acme\", \"globex\"]}]"
        } else {
            ""
        };
        y.push_str(&format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: allow-{i}, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  rules:\n  - from: [{{source: {{principals: [\"cluster.local/ns/caller-{i}/sa/client\", \"*/sa/caller-{i}\"]}}}}]\n    to: [{{operation: {{methods: [GET, HEAD], paths: [\"/api/v{i}/*\", \"*.json\", \"/exact-{i}\"]}}}}]{when}\n"
        ));
    }
    y
}

fn config() -> MeshConfig {
    match config::load_sources(&[Source::new("authz.yaml", policies_yaml())]) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

fn labels() -> Labels {
    [("app", "web")].into_iter().collect()
}

fn evaluate(c: &mut Criterion) {
    let config = config();
    let policies = AuthorizationPolicies::for_workload(&config, "shop", &labels(), "istio-system");
    assert_eq!(policies.len(), 50);
    let last = Identity::from_principal("cluster.local/ns/caller-29/sa/client").expect("id");
    let stranger = Identity::from_principal("cluster.local/ns/other/sa/client").expect("id");
    let mut headers = http::HeaderMap::new();
    headers.insert("x-tenant", "globex".parse().expect("value"));
    headers.insert("user-agent", "bench/1.0".parse().expect("value"));
    headers.insert("accept", "application/json".parse().expect("value"));
    let src: IpAddr = "10.1.0.5".parse().expect("ip");
    let dst: IpAddr = "10.1.0.9".parse().expect("ip");
    let request = |peer| AuthzRequest {
        peer: Some(peer),
        source_ip: src,
        destination_ip: dst,
        destination_port: 8080,
        http: Some(HttpAttributes {
            method: "GET",
            path: "/api/v29/orders/17",
            host: "web.shop.svc.cluster.local:8080",
            headers: &headers,
        }),
    };
    let allowed = request(&last);
    let denied = request(&stranger);
    let d = policies.evaluate(&allowed);
    assert!(d.allowed);
    assert_eq!(d.policy.as_deref(), Some("shop/allow-29"));
    assert!(!policies.evaluate(&denied).allowed);

    let mut group = c.benchmark_group("authz/evaluate_50");
    group.bench_function("allowed_by_last", |b| {
        b.iter(|| black_box(policies.evaluate(black_box(&allowed))))
    });
    group.bench_function("denied_no_match", |b| {
        b.iter(|| black_box(policies.evaluate(black_box(&denied))))
    });
    group.bench_function("tcp", |b| {
        b.iter(|| black_box(policies.check_connection(Some(&last), src, dst, 8080)))
    });
    group.finish();

    c.bench_function("authz/compile_50", |b| {
        b.iter(|| {
            black_box(AuthorizationPolicies::for_workload(
                &config,
                "shop",
                &labels(),
                "istio-system",
            ))
        })
    });
}

fn layer(c: &mut Criterion) {
    let config = config();
    let policies = Arc::new(ArcSwap::from_pointee(AuthorizationPolicies::for_workload(
        &config,
        "shop",
        &labels(),
        "istio-system",
    )));
    let app = service_fn(|_req: Request<BoxBody>| async {
        Ok::<_, BoxError>(Response::new(body::empty()))
    });
    let svc = AuthzLayer::new(policies).layer(app);
    let identity = Identity::from_principal("cluster.local/ns/caller-29/sa/client").expect("id");
    let client = ClientInfo {
        remote: "10.1.0.5:41000".parse().expect("addr"),
        local: "10.1.0.9:8080".parse().expect("addr"),
        tls: true,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    c.bench_function("authz/layer_call_50", |b| {
        b.iter(|| {
            let mut req = Request::builder()
                .uri("/api/v29/orders/17")
                .header("host", "web.shop:8080")
                .header("x-tenant", "acme")
                .body(body::empty())
                .expect("request");
            req.extensions_mut().insert(client.clone());
            req.extensions_mut().insert(identity.clone());
            let response = rt.block_on(svc.clone().oneshot(req)).expect("response");
            assert_eq!(response.status(), 200);
            black_box(response)
        })
    });
}

criterion_group!(benches, evaluate, layer);
criterion_main!(benches);
