//! The embedded client (`examples::embed`) against real greeter instances on loopback, every
//! connection a real mTLS handshake.

use std::sync::atomic::Ordering;

use examples::embed::{self, Outcome, SERVICE, Scenario, ScenarioOptions};

/// The canary split lands near the VirtualService's 80/20 over enough requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_canary_split_follows_the_virtual_service_weights() {
    let scenario = Scenario::start(&ScenarioOptions::default())
        .await
        .expect("scenario starts");
    let report = scenario.run(600, 8).await;
    println!("{report}");
    assert_eq!(report.succeeded, 600, "{report}");
    // Binomial(600, 0.2): sd ≈ 1.6 %, so ±8 % is five standard deviations.
    let v2 = report.share("v2");
    assert!((0.12..=0.28).contains(&v2), "v2 share {v2}: {report}");
    assert_eq!(
        report.by_version.get("v1").copied().unwrap_or(0)
            + report.by_version.get("v2").copied().unwrap_or(0),
        600
    );
    // Every request went over mTLS to a genuine instance: both instances were dialled, and
    // each served what the client counted as attempts to it.
    for server in &scenario.servers {
        assert!(server.stats.handshakes.load(Ordering::Relaxed) >= 1);
        assert_eq!(
            report.attempts.get(&server.spec.workload).copied(),
            Some(server.stats.requests.load(Ordering::Relaxed)),
            "{report}"
        );
    }
    assert_eq!(
        report.retries, 0,
        "nothing failed, nothing retried: {report}"
    );
}

/// A v1 instance that fails every third request is hidden by the route's retries: every
/// request succeeds, and the retries are exactly the failures the server served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_hide_a_flaky_instance() {
    let scenario = Scenario::start(&ScenarioOptions {
        v2_weight: 0,
        v1_fail_every: Some(3),
        ..ScenarioOptions::default()
    })
    .await
    .expect("scenario starts");
    // One at a time, so the server's every-third failure never hits two attempts of one
    // request in a row (with attempts: 3 it would take four).
    let report = scenario.run(60, 1).await;
    println!("{report}");
    assert_eq!(report.succeeded, 60, "{report}");
    assert_eq!(report.failed(), 0, "{report}");
    let v1 = &scenario.servers[0];
    assert_eq!(v1.spec.version, "v1");
    let failed = v1.stats.failed.load(Ordering::Relaxed);
    assert!(failed >= 20, "the instance did fail: {failed}");
    assert_eq!(report.retries, failed, "one retry per failure: {report}");
    assert_eq!(
        v1.stats.requests.load(Ordering::Relaxed),
        60 + failed,
        "every retry reached the server"
    );
    // The metrics count requests, not attempts: 60 successes, no 503 series.
    let line = report
        .metrics
        .lines()
        .find(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains(r#"destination_version="v1""#)
                && l.contains(r#"response_code="200""#)
        })
        .unwrap_or_else(|| panic!("no 200 series for v1:\n{}", report.metrics));
    assert!(line.ends_with(" 60"), "{line}");
    assert!(
        !report.metrics.contains(r#"response_code="503""#),
        "{}",
        report.metrics
    );
}

/// A v2 "instance" presenting another service account's certificate (same CA, valid chain)
/// is refused by the client's SPIFFE check: requests routed to v2 fail 503 UF (after the
/// retries, URX) and never reach it, while v1 keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_client_refuses_a_server_with_the_wrong_spiffe_id() {
    let scenario = Scenario::start(&ScenarioOptions {
        v2_weight: 50,
        v2_service_account: Some("impostor".to_string()),
        ..ScenarioOptions::default()
    })
    .await
    .expect("scenario starts");
    let report = scenario.run(40, 4).await;
    println!("{report}");
    let (refused, message) = report
        .failures
        .get("503 UF,URX")
        .cloned()
        .unwrap_or_else(|| panic!("no identity failures: {report}"));
    assert!(refused > 0);
    assert_eq!(refused + report.succeeded, 40, "{report}");
    assert!(
        message.contains("server identity mismatch")
            && message.contains("spiffe://cluster.local/ns/default/sa/greeter")
            && message.contains("spiffe://cluster.local/ns/default/sa/impostor"),
        "{message}"
    );
    assert_eq!(report.by_version.get("v2"), None, "{report}");
    assert!(report.by_version.get("v1").copied().unwrap_or(0) > 0);
    let impostor = &scenario.servers[1];
    assert_eq!(impostor.spec.service_account, "impostor");
    assert_eq!(
        impostor.stats.requests.load(Ordering::Relaxed),
        0,
        "no request reached the impostor"
    );
    // Each refused request was tried 1 + 3 times.
    assert_eq!(
        report.attempts.get("greeter-v2").copied(),
        Some(refused as u64 * 4)
    );
    assert!(
        report
            .metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains(r#"response_code="503""#)
                && l.contains(r#"response_flags="UF,URX""#)),
        "{}",
        report.metrics
    );
}

/// The client's metrics name both sides as Istio does: the client's workload and principal,
/// the service, the answering instance's workload, version and verified principal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_carry_istio_labels() {
    let scenario = Scenario::start(&ScenarioOptions {
        v2_weight: 50,
        ..ScenarioOptions::default()
    })
    .await
    .expect("scenario starts");
    let report = scenario.run(40, 4).await;
    assert_eq!(report.succeeded, 40, "{report}");
    let mut total = 0;
    for version in ["v1", "v2"] {
        let line = report
            .metrics
            .lines()
            .find(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains(&format!(r#"destination_version="{version}""#))
            })
            .unwrap_or_else(|| panic!("no series for {version}:\n{}", report.metrics));
        for label in [
            r#"reporter="source""#,
            r#"source_workload="embed-client""#,
            r#"source_principal="spiffe://cluster.local/ns/default/sa/embed-client""#,
            &format!(r#"destination_workload="greeter-{version}""#),
            r#"destination_principal="spiffe://cluster.local/ns/default/sa/greeter""#,
            r#"destination_service="greeter.default.svc.cluster.local""#,
            r#"destination_service_name="greeter""#,
            r#"request_protocol="http""#,
            r#"response_code="200""#,
            r#"response_flags="-""#,
        ] {
            assert!(line.contains(label), "{label} missing in {line}");
        }
        let count: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count in {line}"));
        assert_eq!(
            Some(count as usize),
            report.by_version.get(version).copied()
        );
        total += count;
    }
    assert_eq!(total, 40);
    assert!(
        report
            .metrics
            .contains("istio_request_duration_milliseconds_bucket{")
    );

    // The servers report the same requests as the destination, with the caller verified.
    let server_text = scenario.servers[0]
        .metrics
        .encode(mesh_telemetry::metrics::Format::Prometheus);
    assert!(
        server_text
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains(r#"reporter="destination""#)
                && l.contains(r#"source_workload="embed-client""#)
                && l.contains(r#"connection_security_policy="mutual_tls""#)),
        "{server_text}"
    );
}

/// An unknown host is the route layer's 404 NR, before any connection is made.
#[tokio::test]
async fn an_unknown_host_is_no_route() {
    let scenario = Scenario::start(&ScenarioOptions::default())
        .await
        .expect("scenario starts");
    let err = scenario
        .client
        .get("nowhere", "/")
        .await
        .expect_err("no route");
    let err = mesh_core::ProxyError::find(&err).expect("a ProxyError");
    assert_eq!(err.status(), 404);
    assert_eq!(err.flags().to_string(), "NR");
    assert!(scenario.client.attempts().is_empty());
    // And the known one works through the same client.
    let outcome = embed::call(&scenario.client, "/").await;
    assert!(
        matches!(&outcome, Outcome::Answered { status: 200, .. }),
        "{outcome:?} from {SERVICE}"
    );
}
