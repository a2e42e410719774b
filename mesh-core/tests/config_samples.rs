//! Istio's published samples load under every accepted `networking.istio.io` version, and a
//! resource of every kind using most of Istio's reference fields loads with the values written.

use std::path::PathBuf;
use std::time::Duration;

use mesh_core::config::networking::{
    ClientTlsMode, HttpBody, OutboundTrafficMode, RedirectPortSelection, ServerTlsMode, SimpleLb,
};
use mesh_core::config::security::{AuthorizationAction, MtlsMode};
use mesh_core::config::{self, MeshConfig, PortNumber, Protocol, Source, StringMatch};

const VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Loads fixtures with their `networking.istio.io/v1` replaced by `version`.
fn load_as(version: &str, names: &[&str]) -> MeshConfig {
    let sources: Vec<Source> = names
        .iter()
        .map(|name| {
            let text = fixture(name);
            assert!(
                text.contains("networking.istio.io/v1\n"),
                "{name} is not written in v1"
            );
            let text = text.replace(
                "networking.istio.io/v1\n",
                &format!("networking.istio.io/{version}\n"),
            );
            Source::new(*name, text)
        })
        .collect();
    config::load_sources(&sources).unwrap_or_else(|e| panic!("{version}:\n{e}"))
}

fn port(n: u16) -> PortNumber {
    PortNumber::new(n).expect("non-zero")
}

#[test]
fn bookinfo_destination_rules() {
    for version in VERSIONS {
        let config = load_as(version, &["bookinfo/destination-rule-all.yaml"]);
        let rules = config.destination_rules();
        let names: Vec<&str> = rules.iter().map(|r| r.name()).collect();
        assert_eq!(
            names,
            ["productpage", "reviews", "ratings", "details"],
            "{version}"
        );
        let subsets = |name: &str| -> Vec<(String, String)> {
            let rule = rules.iter().find(|r| r.name() == name).expect(name);
            assert_eq!(rule.api_version, format!("networking.istio.io/{version}"));
            assert_eq!(rule.namespace(), "default");
            assert_eq!(rule.spec.host, format!("{name}.default.svc.cluster.local"));
            rule.spec
                .subsets
                .iter()
                .map(|s| {
                    (
                        s.name.clone(),
                        s.labels.get("version").unwrap_or("-").to_string(),
                    )
                })
                .collect()
        };
        let same = |names: &[&str]| -> Vec<(String, String)> {
            names
                .iter()
                .map(|n| (n.to_string(), n.to_string()))
                .collect()
        };
        assert_eq!(subsets("productpage"), same(&["v1"]));
        assert_eq!(subsets("reviews"), same(&["v1", "v2", "v3"]));
        assert_eq!(
            subsets("ratings"),
            same(&["v1", "v2", "v2-mysql", "v2-mysql-vm"])
        );
        assert_eq!(subsets("details"), same(&["v1", "v2"]));
        // The file ends with `---`: an empty fifth document, skipped.
        let details = rules
            .iter()
            .find(|r| r.name() == "details")
            .expect("details");
        assert_eq!(details.origin.file, "bookinfo/destination-rule-all.yaml");
        assert_eq!(details.origin.document, 4);
    }
}

#[test]
fn bookinfo_reviews_90_10() {
    for version in VERSIONS {
        let config = load_as(version, &["bookinfo/virtual-service-reviews-90-10.yaml"]);
        let [vs] = config.virtual_services() else {
            panic!("one VirtualService")
        };
        assert_eq!(vs.name(), "reviews");
        assert_eq!(vs.spec.hosts, ["reviews.default.svc.cluster.local"]);
        let [route] = &vs.spec.http[..] else {
            panic!("one HTTP route")
        };
        let split: Vec<(&str, Option<&str>, Option<u32>)> = route
            .route
            .iter()
            .map(|d| {
                (
                    d.destination.host.as_str(),
                    d.destination.subset.as_deref(),
                    d.weight,
                )
            })
            .collect();
        assert_eq!(
            split,
            [
                ("reviews.default.svc.cluster.local", Some("v1"), Some(90)),
                ("reviews.default.svc.cluster.local", Some("v2"), Some(10)),
            ]
        );
    }
}

#[test]
fn bookinfo_ratings_test_delay() {
    for version in VERSIONS {
        let config = load_as(
            version,
            &["bookinfo/virtual-service-ratings-test-delay.yaml"],
        );
        let [vs] = config.virtual_services() else {
            panic!("one VirtualService")
        };
        let [jason, rest] = &vs.spec.http[..] else {
            panic!("two HTTP routes")
        };
        let [m] = &jason.r#match[..] else {
            panic!("one match")
        };
        assert!(matches!(m.headers.get("end-user"), Some(StringMatch::Exact(v)) if v == "jason"));
        let delay = jason
            .fault
            .as_ref()
            .and_then(|f| f.delay.as_ref())
            .expect("a delay");
        assert_eq!(
            delay.fixed_delay.map(|d| d.get()),
            Some(Duration::from_secs(7))
        );
        assert_eq!(delay.percentage.map(|p| p.value), Some(100.0));
        assert_eq!(delay.effective_percentage().value, 100.0);
        for route in [jason, rest] {
            let dest = &route.route[0].destination;
            assert_eq!(dest.host, "ratings.default.svc.cluster.local");
            assert_eq!(dest.subset.as_deref(), Some("v1"));
        }
        assert!(rest.r#match.is_empty() && rest.fault.is_none());
    }
}

#[test]
fn legacy_integer_fault_percent() {
    // Older Istio samples wrote `percent: 100` instead of `percentage: { value: 100 }`.
    let text = fixture("bookinfo/virtual-service-ratings-test-delay.yaml")
        .replace("percentage:\n          value: 100.0", "percent: 100");
    let config = config::load_sources(&[Source::new("old.yaml", text)]).expect("loads");
    let delay = config.virtual_services()[0].spec.http[0]
        .fault
        .as_ref()
        .and_then(|f| f.delay.clone());
    let delay = delay.expect("a delay");
    assert_eq!(
        (delay.percent, delay.percentage.is_none()),
        (Some(100), true)
    );
    assert_eq!(delay.effective_percentage().value, 100.0);
}

#[test]
fn httpbin_gateway() {
    for version in VERSIONS {
        let config = load_as(version, &["httpbin-gateway.yaml"]);
        let [gw] = config.gateways() else {
            panic!("one Gateway")
        };
        assert_eq!(gw.name(), "httpbin-gateway");
        assert_eq!(gw.spec.selector.get("istio"), Some("ingressgateway"));
        let [server] = &gw.spec.servers[..] else {
            panic!("one server")
        };
        assert_eq!(server.port.number, port(80));
        assert_eq!(server.port.protocol, Some(Protocol::Http));
        assert_eq!(server.port.name.as_deref(), Some("http"));
        assert_eq!(server.hosts, ["httpbin.example.com"]);
        let [vs] = config.virtual_services() else {
            panic!("one VirtualService")
        };
        assert_eq!(
            vs.spec.hosts,
            ["httpbin.example.com"],
            "FQDNs are kept as written"
        );
        assert_eq!(vs.spec.gateways, ["httpbin-gateway"]);
        let route = &vs.spec.http[0];
        let prefixes: Vec<&str> = route
            .r#match
            .iter()
            .filter_map(|m| match &m.uri {
                Some(StringMatch::Prefix(p)) => Some(p.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(prefixes, ["/status", "/delay"]);
        let dest = &route.route[0].destination;
        assert_eq!(dest.host, "httpbin.default.svc.cluster.local");
        assert_eq!(dest.port.map(|p| p.number), Some(port(8000)));
    }
}

#[test]
fn every_kind_with_most_reference_fields() {
    let config = config::load_sources(&[Source::new("sink.yaml", fixture("kitchen-sink.yaml"))])
        .unwrap_or_else(|e| panic!("{e}"));

    let vs = &config.virtual_services()[0];
    assert_eq!((vs.name(), vs.namespace()), ("everything", "shop"));
    assert_eq!(vs.metadata.labels.get("team"), Some("web"));
    assert_eq!(
        vs.spec.hosts,
        ["frontend.shop.svc.cluster.local", "api.example.com"]
    );
    let http = &vs.spec.http;
    let m = &http[0].r#match[0];
    let uri = m.uri.as_ref().expect("uri");
    assert!(
        uri.matches("/api/v2/users") && !uri.matches("/web/api/v2/x"),
        "full-match regex"
    );
    assert!(matches!(m.headers.get("x-present"), Some(StringMatch::Any)));
    assert!(matches!(
        m.without_headers.get("x-debug"),
        Some(StringMatch::Any)
    ));
    assert_eq!(m.port, Some(port(8080)));
    assert_eq!(m.ignore_uri_case, Some(true));
    assert_eq!(
        http[0].route[1].destination.host,
        "frontend.other.svc.cluster.local"
    );
    let request_ops = http[0].route[0]
        .headers
        .as_ref()
        .and_then(|h| h.request.as_ref())
        .expect("ops");
    assert_eq!(request_ops.remove, ["x-c"]);
    let rewrite = http[0]
        .rewrite
        .as_ref()
        .and_then(|r| r.uri_regex_rewrite.as_ref())
        .expect("rewrite");
    assert_eq!(
        rewrite.apply("/api/v1/x"),
        "/v1/x",
        "RE2-style `\\1` groups"
    );
    assert_eq!(
        http[0].timeout.map(|d| d.get()),
        Some(Duration::from_millis(1500))
    );
    let retries = http[0].retries.as_ref().expect("retries");
    assert_eq!(retries.attempts, Some(3));
    assert_eq!(
        retries.per_try_timeout.map(|d| d.get()),
        Some(Duration::from_millis(500))
    );
    let fault = http[0].fault.as_ref().expect("fault");
    assert_eq!(
        fault
            .delay
            .as_ref()
            .and_then(|d| d.fixed_delay)
            .map(|d| d.get()),
        Some(Duration::from_micros(100))
    );
    assert_eq!(
        fault.abort.as_ref().map(|a| a.effective_percentage().value),
        Some(0.5)
    );
    assert_eq!(
        http[0].mirror.as_ref().map(|m| m.host.as_str()),
        Some("shadow.shop.svc.cluster.local")
    );
    assert_eq!(http[0].mirror_percentage.map(|p| p.value), Some(12.5));
    assert_eq!(
        http[0].mirrors[0].destination.host,
        "shadow2.shop.svc.cluster.local"
    );
    let cors = http[0].cors_policy.as_ref().expect("cors");
    assert!(cors.allow_origins[1].matches("https://a.example.org"));
    assert_eq!(
        cors.max_age.map(|d| d.get()),
        Some(Duration::from_secs(86_400))
    );
    assert_eq!(http[1].mirror_percent, Some(10));
    let redirect = http[2].redirect.as_ref().expect("redirect");
    assert_eq!(redirect.redirect_code, Some(308));
    assert_eq!(
        redirect.derive_port,
        Some(RedirectPortSelection::FromRequestPort)
    );
    let body = |i: usize| {
        http[i]
            .direct_response
            .as_ref()
            .and_then(|d| d.body.clone())
    };
    assert_eq!(body(4), Some(HttpBody::String("ok".into())));
    assert_eq!(
        body(5).map(|b| b.as_bytes().to_vec()),
        Some(b"hello".to_vec())
    );
    assert_eq!(
        http[7].delegate.as_ref().map(|d| d.name.as_str()),
        Some("reviews-delegate")
    );
    assert_eq!(
        vs.spec.tcp[0].r#match[0].destination_subnets,
        ["10.0.0.0/8"]
    );
    assert_eq!(vs.spec.tls[0].r#match[0].sni_hosts, ["api.example.com"]);
    // The delegate target has no hosts, which is allowed because it is delegated to.
    assert!(config.virtual_services()[1].spec.hosts.is_empty());

    let dr = &config.destination_rules()[0];
    let tp = dr.spec.traffic_policy.as_ref().expect("traffic policy");
    let lb = tp.load_balancer.as_ref().expect("lb");
    let cookie = lb
        .consistent_hash
        .as_ref()
        .and_then(|c| c.http_cookie.as_ref())
        .expect("cookie");
    assert_eq!(
        (cookie.name.as_str(), cookie.ttl.map(|t| t.is_zero())),
        ("session", Some(true))
    );
    assert_eq!(
        lb.locality_lb_setting
            .as_ref()
            .map(|l| l.distribute[0].to["us-west/zone2/*"]),
        Some(20)
    );
    let pool = tp.connection_pool.as_ref().expect("pool");
    assert_eq!(
        pool.tcp
            .as_ref()
            .and_then(|t| t.connect_timeout)
            .map(|d| d.get()),
        Some(Duration::from_millis(30))
    );
    assert_eq!(
        pool.http.as_ref().and_then(|h| h.http2_max_requests),
        Some(1000)
    );
    let od = tp.outlier_detection.as_ref().expect("outlier detection");
    assert_eq!(
        (od.consecutive_5xx_errors, od.max_ejection_percent),
        (Some(5), Some(50))
    );
    assert_eq!(
        od.base_ejection_time.map(|d| d.get()),
        Some(Duration::from_secs(900))
    );
    assert_eq!(tp.tls.as_ref().map(|t| t.mode), Some(ClientTlsMode::Mutual));
    assert_eq!(
        tp.port_level_settings[0]
            .load_balancer
            .as_ref()
            .and_then(|l| l.simple),
        Some(SimpleLb::LeastRequest)
    );
    assert_eq!(dr.spec.subsets[1].name, "v2");

    let se = &config.service_entries()[0];
    assert_eq!(se.spec.ports[0].target_port, Some(port(8443)));
    assert_eq!(se.spec.endpoints[0].weight, Some(3));
    let we = &config.workload_entries()[0];
    assert_eq!(
        (we.spec.address.as_str(), we.spec.ports["http"]),
        ("10.1.2.3", port(8080))
    );

    let gw = &config.gateways()[0];
    let tls = gw.spec.servers[0].tls.as_ref().expect("tls");
    assert_eq!(tls.mode, Some(ServerTlsMode::Mutual));
    assert_eq!(tls.credential_names.len(), 2);
    assert_eq!(
        gw.spec.servers[1]
            .tls
            .as_ref()
            .and_then(|t| t.https_redirect),
        Some(true)
    );

    let sidecar = &config.sidecars()[0];
    assert_eq!(sidecar.spec.egress[0].bind.as_deref(), Some("127.0.0.1"));
    assert_eq!(
        sidecar
            .spec
            .outbound_traffic_policy
            .as_ref()
            .map(|p| p.mode),
        Some(OutboundTrafficMode::RegistryOnly)
    );

    let pa = &config.peer_authentications()[0];
    assert_eq!(
        pa.spec.mtls.as_ref().map(|m| m.mode),
        Some(MtlsMode::Strict)
    );
    assert_eq!(
        pa.spec.port_level_mtls.get(&port(8080)).map(|m| m.mode),
        Some(MtlsMode::Disable)
    );

    let policies = config.authorization_policies();
    assert_eq!(policies.len(), 3);
    assert_eq!(policies[0].spec.action, AuthorizationAction::Deny);
    assert_eq!(policies[0].spec.rules[0].when[0].not_values, ["revoked"]);
    assert_eq!(
        policies[1].spec.action,
        AuthorizationAction::Allow,
        "empty spec: allow nothing"
    );
    assert!(policies[1].spec.rules.is_empty());
    assert_eq!(policies[2].spec.target_refs[0].name, "waypoint");
}

#[test]
fn config_dump_groups_by_kind_with_origins() {
    let config = config::load_sources(&[
        Source::new("sink.yaml", fixture("kitchen-sink.yaml")),
        Source::new("bootstrap.yaml", fixture("bootstrap.yaml")),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let dump = config.to_json();
    let vs = &dump["VirtualService"][0];
    assert_eq!(vs["origin"]["file"], "sink.yaml");
    assert_eq!(vs["origin"]["document"], 1);
    assert_eq!(vs["metadata"]["name"], "everything");
    assert_eq!(
        vs["spec"]["http"][0]["timeout"], "1.5s",
        "durations print in Go notation"
    );
    assert_eq!(
        vs["spec"]["http"][0]["match"][0]["uri"]["regex"],
        "/api/v[0-9]+/.*"
    );
    assert_eq!(
        vs["spec"]["http"][5]["directResponse"]["body"]["bytes"],
        "aGVsbG8="
    );
    assert!(
        vs["spec"]["http"][0].get("delegate").is_none(),
        "unset fields are left out"
    );
    assert!(
        vs["metadata"].get("uid").is_none(),
        "cluster bookkeeping is dropped"
    );
    assert_eq!(
        dump["PeerAuthentication"][0]["spec"]["portLevelMtls"]["8080"]["mode"],
        "DISABLE"
    );
    assert_eq!(
        dump["Bootstrap"][0]["spec"]["outbound"]["listen"],
        "127.0.0.1:15001"
    );
    assert_eq!(
        dump["Bootstrap"][0]["spec"]["terminationDrainDuration"],
        "5s"
    );
    let services = dump["services"].as_array().expect("services");
    let reviews = services
        .iter()
        .find(|s| s["host"] == "reviews.default.svc.cluster.local")
        .expect("reviews in the registry");
    assert_eq!(reviews["endpoints"][1]["address"], "127.0.0.1:19082");
    assert_eq!(reviews["protocol"], "HTTP");
}
