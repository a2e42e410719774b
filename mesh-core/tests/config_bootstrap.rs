//! The proxy's own `Bootstrap`: DESIGN.md's example parses, and omitted settings take
//! Istio's defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_core::config::bootstrap::{AccessLogEncoding, InboundProtocol, RateLimitSettings};
use mesh_core::config::networking::OutboundTrafficMode;
use mesh_core::config::{self, Source};

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

#[test]
fn design_example_parses() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bootstrap.yaml");
    let config = config::load_files(&[path]).unwrap_or_else(|e| panic!("{e}"));
    let b = config.bootstrap().expect("a bootstrap");
    assert_eq!((b.name(), b.namespace()), ("productpage", "default"));
    let spec = &b.spec;
    assert_eq!(spec.workload.name, "productpage-v1");
    assert_eq!(spec.workload.labels.get("app"), Some("productpage"));
    assert_eq!(spec.workload.labels.get("version"), Some("v1"));
    assert_eq!(spec.workload.service_account, None);
    let identity = spec.identity.as_ref().expect("identity");
    assert_eq!(identity.cert, Path::new("certs/productpage.pem"));
    assert_eq!(identity.key, Path::new("certs/productpage-key.pem"));
    assert_eq!(identity.trust_bundle, Path::new("certs/root.pem"));
    let inbound = spec.inbound.as_ref().expect("inbound");
    assert_eq!(inbound.app, addr("127.0.0.1:9080"));
    assert_eq!(inbound.protocol, InboundProtocol::Auto);
    assert_eq!(b.inbound_listen(), Some(addr("0.0.0.0:15006")));
    assert_eq!(b.outbound_listen(), addr("127.0.0.1:15001"));
    assert_eq!(b.admin_listen(), addr("127.0.0.1:15000"));
    assert_eq!(spec.concurrency, Some(2));
    assert_eq!(
        spec.outbound_traffic_policy.mode,
        OutboundTrafficMode::AllowAny
    );
    let log = spec.access_log.as_ref().expect("access log");
    assert_eq!(
        (log.path.as_str(), log.encoding),
        ("stdout", AccessLogEncoding::Json)
    );
    let tracing = spec.tracing.as_ref().expect("tracing");
    assert_eq!(tracing.sampling, 1.0);
    assert_eq!(tracing.otlp.as_deref(), Some("http://127.0.0.1:4317"));
    let etcd = b.etcd().expect("etcd");
    assert_eq!(etcd.endpoints, ["http://127.0.0.1:2379"]);
    assert_eq!(etcd.prefix, "/mesh");
    let register = spec.register.as_ref().expect("register");
    assert_eq!(register.ttl.get(), Duration::from_secs(10));
    assert_eq!(register.address, None);
    assert_eq!(b.termination_drain_duration(), Duration::from_secs(5));
    // The example's ServiceEntry is in the registry.
    let reviews = config.services().lookup("reviews", 9080).expect("reviews");
    assert_eq!(reviews.endpoints.len(), 2);
}

#[test]
fn minimal_bootstrap_takes_defaults() {
    let text = "apiVersion: mesh-proxy/v1
kind: Bootstrap
metadata: { name: ratings }
spec:
  workload: { name: ratings-v1, serviceAccount: ratings }
  inbound: { app: 127.0.0.1:9080 }
  tracing: {}
  discovery: { etcd: { endpoints: [http://etcd:2379] } }
";
    let config =
        config::load_sources(&[Source::new("b.yaml", text)]).unwrap_or_else(|e| panic!("{e}"));
    let b = config.bootstrap().expect("a bootstrap");
    assert_eq!(b.namespace(), "default");
    assert_eq!(config.proxy_namespace(), "default");
    assert_eq!(b.spec.workload.service_account.as_deref(), Some("ratings"));
    assert!(b.spec.workload.labels.is_empty());
    assert_eq!(b.inbound_listen(), Some(addr("0.0.0.0:15006")));
    assert_eq!(
        b.spec.inbound.as_ref().map(|i| i.protocol),
        Some(InboundProtocol::Auto)
    );
    assert_eq!(b.outbound_listen(), addr("127.0.0.1:15001"));
    assert_eq!(b.admin_listen(), addr("127.0.0.1:15000"));
    assert_eq!(b.termination_drain_duration(), Duration::from_secs(5));
    assert_eq!(
        b.spec.outbound_traffic_policy.mode,
        OutboundTrafficMode::AllowAny
    );
    assert_eq!(
        b.spec.tracing.as_ref().map(|t| t.sampling),
        Some(1.0),
        "Istio's 1%"
    );
    assert_eq!(b.etcd().map(|e| e.prefix.as_str()), Some("/mesh"));
    assert!(b.spec.identity.is_none() && b.spec.access_log.is_none() && b.spec.register.is_none());
    assert_eq!(b.spec.concurrency, None);
}

#[test]
fn no_bootstrap_means_default_namespace() {
    let config = config::load_sources(&[]).expect("an empty configuration is valid");
    assert!(config.bootstrap().is_none());
    assert_eq!(config.proxy_namespace(), "default");
    assert!(config.services().is_empty());
}

#[test]
fn bootstrap_rules() {
    let head = "apiVersion: mesh-proxy/v1\nkind: Bootstrap\nmetadata: {name: p}\nspec:\n  workload: {name: w}\n";
    let cases = [
        (
            "  register: {ttl: 10s}\n",
            "spec.register",
            "needs discovery.etcd",
        ),
        (
            "  tracing: {sampling: 150}\n",
            "spec.tracing.sampling",
            "150 is not in 0..=100",
        ),
        (
            "  inbound: {listen: 0.0.0.0:15006}\n",
            "spec.inbound",
            "missing field `app`",
        ),
        (
            "  admin: {listen: localhost}\n",
            "spec.admin.listen",
            "socket address",
        ),
        (
            "  outboundTrafficPolicy: {mode: ALLOW_ALL}\n",
            "spec.outboundTrafficPolicy.mode",
            "ALLOW_ALL",
        ),
        (
            "  terminationDrainDuration: 5 seconds\n",
            "spec.terminationDrainDuration",
            "invalid duration",
        ),
        (
            "  inbound: {app: 127.0.0.1:80, protocol: grpc}\n",
            "spec.inbound.protocol",
            "grpc",
        ),
        (
            "  rateLimit: {requestsPerSecond: 0}\n",
            "spec.rateLimit.requestsPerSecond",
            "requestsPerSecond 0 is not in 1..=1000000",
        ),
        (
            "  rateLimit: {requestsPerSecond: 100, burst: 0}\n",
            "spec.rateLimit.burst",
            "burst 0 is not in 1..=1000000",
        ),
        (
            "  rateLimit: {requestsPerSecond: 5000000}\n",
            "spec.rateLimit.requestsPerSecond",
            "requestsPerSecond 5000000 is not in 1..=1000000",
        ),
        (
            "  rateLimit: {requestsPerSecond: 100, burst: 2000000}\n",
            "spec.rateLimit.burst",
            "burst 2000000 is not in 1..=1000000",
        ),
        (
            "  rateLimit: {requestsPerSecond: -1}\n",
            "spec.rateLimit.requestsPerSecond",
            "invalid u32",
        ),
        (
            "  rateLimit: {rps: 100}\n",
            "spec.rateLimit.rps",
            "unknown field `rps`",
        ),
    ];
    for (extra, path, message) in cases {
        let text = format!("{head}{extra}");
        let errors = match config::load_sources(&[Source::new("b.yaml", text)]) {
            Ok(_) => panic!("{extra} should be rejected"),
            Err(e) => e,
        };
        let [e] = errors.errors() else {
            panic!("{errors}")
        };
        assert_eq!(e.path.as_deref(), Some(path), "{e}");
        assert!(e.message.contains(message), "expected `{message}` in: {e}");
        assert_eq!(e.line, Some(6), "{e}");
    }
}

#[test]
fn rate_limit_defaults_and_settings() {
    let head = "apiVersion: mesh-proxy/v1\nkind: Bootstrap\nmetadata: {name: p}\nspec:\n  workload: {name: w}\n";
    let parse = |extra: &str| {
        let text = format!("{head}{extra}");
        let config =
            config::load_sources(&[Source::new("b.yaml", text)]).unwrap_or_else(|e| panic!("{e}"));
        config.bootstrap().expect("a bootstrap").spec.rate_limit
    };
    assert_eq!(parse(""), None, "no rateLimit, no limit");
    // `burst` defaults to one second's worth; `perPrincipal` to one bucket for the workload.
    assert_eq!(
        parse("  rateLimit: {requestsPerSecond: 100}\n"),
        Some(RateLimitSettings {
            requests_per_second: 100,
            burst: 100,
            per_principal: false,
        })
    );
    assert_eq!(
        parse("  rateLimit: {requestsPerSecond: 100, burst: 10, perPrincipal: true}\n"),
        Some(RateLimitSettings {
            requests_per_second: 100,
            burst: 10,
            per_principal: true,
        })
    );
}
