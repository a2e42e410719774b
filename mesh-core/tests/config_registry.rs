//! The service registry built from ServiceEntries (and the WorkloadEntries they select), as
//! the proxy's request path looks services up by `Host`.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::config::{self, MeshConfig, Protocol, Resolution, Source};

fn load(texts: &[&str]) -> MeshConfig {
    let sources: Vec<Source> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| Source::new(format!("{i}.yaml"), *t))
        .collect();
    config::load_sources(&sources).unwrap_or_else(|e| panic!("{e}"))
}

const REVIEWS: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: reviews }
spec:
  hosts: [reviews]
  ports: [{ number: 9080, name: http, protocol: HTTP }]
  resolution: STATIC
  endpoints:
  - { address: 127.0.0.1, ports: { http: 19081 }, labels: { version: v1 } }
  - { address: 127.0.0.1, ports: { http: 19082 }, labels: { version: v2 }, weight: 3, serviceAccount: reviews }
";

const RATINGS_IN_PROD: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: ratings, namespace: prod }
spec:
  hosts: [ratings]
  ports: [{ number: 9080, name: http-api, targetPort: 9999 }]
  resolution: STATIC
  endpoints: [{ address: 10.0.0.9 }]
";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

#[test]
fn static_service_by_every_alias() {
    let config = load(&[REVIEWS]);
    let services = config.services();
    let full = services
        .lookup("reviews.default.svc.cluster.local", 9080)
        .expect("FQDN");
    for alias in ["reviews", "reviews.default", "reviews.default.svc"] {
        let found = services
            .lookup(alias, 9080)
            .unwrap_or_else(|| panic!("{alias}"));
        assert!(Arc::ptr_eq(found, full), "{alias} is the same service port");
    }
    assert!(services.lookup("reviews", 9081).is_none(), "another port");
    assert!(services.lookup("reviews.prod", 9080).is_none());
    assert!(
        services.lookup("Reviews", 9080).is_none(),
        "callers pass lower-case hosts"
    );

    assert_eq!(full.host.as_str(), "reviews.default.svc.cluster.local");
    assert_eq!((full.number, full.name.as_str()), (9080, "http"));
    assert_eq!(full.protocol, Protocol::Http);
    assert!(full.protocol.is_http() && !full.protocol.is_http2());
    assert_eq!(full.resolution, Resolution::Static);
    let endpoints: Vec<_> = full
        .endpoints
        .iter()
        .map(|e| {
            (
                e.address,
                e.labels.get("version"),
                e.weight,
                e.service_account.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        endpoints,
        [
            (addr("127.0.0.1:19081"), Some("v1"), 1, None),
            (addr("127.0.0.1:19082"), Some("v2"), 3, Some("reviews")),
        ]
    );
    assert_eq!(services.len(), 1);
    assert_eq!(services.iter().count(), 1);
}

#[test]
fn other_namespaces_are_not_reachable_by_short_name() {
    let config = load(&[REVIEWS, RATINGS_IN_PROD]);
    let services = config.services();
    assert!(
        services.lookup("ratings", 9080).is_none(),
        "short name resolves in `default`"
    );
    let ratings = services.lookup("ratings.prod", 9080).expect("ratings.prod");
    assert!(
        services
            .lookup("ratings.prod.svc.cluster.local", 9080)
            .is_some()
    );
    // No `ports` map on the endpoint: targetPort; no protocol: from the port name.
    assert_eq!(ratings.endpoints[0].address, addr("10.0.0.9:9999"));
    assert_eq!(ratings.protocol, Protocol::Http);

    // A proxy in `prod` sees it by short name, and `reviews` no longer.
    let bootstrap = "apiVersion: mesh-proxy/v1\nkind: Bootstrap\nmetadata: {name: p, namespace: prod}\nspec: {workload: {name: p}}\n";
    let config = load(&[REVIEWS, RATINGS_IN_PROD, bootstrap]);
    assert_eq!(config.proxy_namespace(), "prod");
    assert!(config.services().lookup("ratings", 9080).is_some());
    assert!(config.services().lookup("reviews", 9080).is_none());
    assert!(config.services().lookup("reviews.default", 9080).is_some());
}

#[test]
fn workload_selector_picks_up_workload_entries() {
    let se = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: legacy }
spec:
  hosts: [legacy.example.internal]
  ports: [{ number: 8080, name: http, protocol: HTTP }, { number: 9090, name: grpc-admin }]
  location: MESH_INTERNAL
  resolution: STATIC
  workloadSelector: { labels: { app: legacy } }
";
    let we = |name: &str, ns: &str, address: &str, app: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  address: {address}\n  ports: {{http: 18080}}\n  labels: {{app: {app}, version: v1}}\n  serviceAccount: legacy-sa\n  weight: 2\n"
        )
    };
    let vm1 = we("vm-1", "default", "10.0.0.5", "legacy");
    let other_app = we("vm-2", "default", "10.0.0.6", "other");
    let other_ns = we("vm-3", "elsewhere", "10.0.0.7", "legacy");
    let config = load(&[&vm1, se, &other_app, &other_ns]);
    let http = config
        .services()
        .lookup("legacy.example.internal", 8080)
        .expect("http port");
    let [endpoint] = &http.endpoints[..] else {
        panic!("one endpoint: {:?}", http.endpoints)
    };
    assert_eq!(endpoint.address, addr("10.0.0.5:18080"));
    assert_eq!(
        (endpoint.weight, endpoint.service_account.as_deref()),
        (2, Some("legacy-sa"))
    );
    assert_eq!(endpoint.labels.get("version"), Some("v1"));
    // No port of that name on the workload: the service port number.
    let grpc = config
        .services()
        .lookup("legacy.example.internal", 9090)
        .expect("grpc port");
    assert_eq!(grpc.endpoints[0].address, addr("10.0.0.5:9090"));
    assert!(grpc.protocol.is_http2());
    let numbers: Vec<u16> = config
        .services()
        .ports_of("legacy.example.internal")
        .map(|p| p.number)
        .collect();
    assert_eq!(numbers, [8080, 9090]);
}

#[test]
fn static_selection_of_a_hostname_workload_is_an_error() {
    let se = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: legacy}\nspec:\n  hosts: [legacy]\n  ports: [{number: 80, name: http}]\n  resolution: STATIC\n  workloadSelector: {labels: {app: legacy}}\n";
    let we = "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm}\nspec:\n  address: vm.example.com\n  labels: {app: legacy}\n";
    let errors =
        match config::load_sources(&[Source::new("se.yaml", se), Source::new("we.yaml", we)]) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        };
    let [e] = errors.errors() else {
        panic!("{errors}")
    };
    assert_eq!(
        (e.file.as_str(), e.path.as_deref(), e.line),
        ("we.yaml", Some("spec.address"), Some(5))
    );
}

#[test]
fn dns_services_keep_names_to_resolve() {
    let se = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: external }
spec:
  hosts: [api.example.com]
  ports: [{ number: 443, name: https, protocol: TLS }]
  resolution: DNS
  endpoints:
  - { address: eu.api.example.com, labels: { region: eu } }
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: httpbin }
spec:
  hosts: [httpbin.org]
  ports: [{ number: 80, name: http, protocol: HTTP }]
  resolution: DNS
";
    let config = load(&[se]);
    let api = config
        .services()
        .lookup("api.example.com", 443)
        .expect("api");
    assert!(api.endpoints.is_empty());
    assert_eq!(api.dns_endpoints.len(), 1);
    assert_eq!(api.dns_endpoints[0].host, "eu.api.example.com");
    assert_eq!(api.dns_endpoints[0].port, 443);
    assert_eq!(api.dns_endpoints[0].labels.get("region"), Some("eu"));
    assert!(api.protocol.is_tls());
    let httpbin = config
        .services()
        .lookup("httpbin.org", 80)
        .expect("httpbin");
    assert_eq!(
        httpbin.dns_endpoints[0].host, "httpbin.org",
        "no endpoints: the host itself"
    );
}

#[test]
fn export_to_and_wildcards() {
    let private = RATINGS_IN_PROD.replace(
        "resolution: STATIC",
        "exportTo: [\".\"]\n  resolution: STATIC",
    );
    let wildcard = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: wild}\nspec:\n  hosts: ['*.example.com']\n  ports: [{number: 443, name: tls, protocol: TLS}]\n";
    let config = load(&[&private, wildcard]);
    assert!(
        config.services().lookup("ratings.prod", 9080).is_none(),
        "exported to prod only"
    );
    let wild = config
        .services()
        .lookup("api.example.com", 443)
        .expect("wildcard");
    assert_eq!(wild.host.as_str(), "*.example.com");
    assert!(config.services().lookup("example.com", 443).is_none());
}
