//! VirtualService `tcp` routes as the route table compiles them: which route a connection
//! takes (port, source, subnets), where its destinations resolve, and the weighted split.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;

use mesh_core::ResponseFlags;
use mesh_core::config::networking::SimpleLb;
use mesh_core::config::{MeshConfig, Source, load_sources};
use mesh_core::conn::ClientInfo;
use mesh_core::target::RouteTarget;
use mesh_routing::{RouteTable, SourceContext};

/// A TCP service with two versions and a DestinationRule naming them, another TCP service,
/// and the proxy's own Bootstrap (workload `app: client` in `default`).
const BASE: &str = "
apiVersion: mesh-proxy/v1
kind: Bootstrap
metadata: { name: client, namespace: default }
spec:
  workload: { name: client, labels: { app: client } }
  outbound: { listen: \"127.0.0.1:0\" }
  admin: { listen: \"127.0.0.1:0\" }
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: tcp-echo }
spec:
  hosts: [tcp-echo]
  ports: [{ number: 9000, name: tcp, protocol: TCP }, { number: 9001, name: tcp-other, protocol: TCP }]
  resolution: STATIC
  endpoints:
  - { address: 10.0.0.1, labels: { version: v1 } }
  - { address: 10.0.0.2, labels: { version: v2 } }
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: mysql }
spec:
  hosts: [mysql]
  ports: [{ number: 3306, name: tcp, protocol: TCP }]
  resolution: STATIC
  endpoints: [{ address: 10.0.1.1 }]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: tcp-echo }
spec:
  host: tcp-echo
  trafficPolicy: { loadBalancer: { simple: ROUND_ROBIN } }
  subsets:
  - { name: v1, labels: { version: v1 } }
  - { name: v2, labels: { version: v2 } }
";

fn config(extra: &str) -> MeshConfig {
    load_sources(&[Source::new("tcp.yaml", format!("{BASE}---\n{extra}"))]).unwrap()
}

fn table(config: &MeshConfig) -> RouteTable {
    RouteTable::build(config, &SourceContext::from_config(config))
}

/// A VirtualService for `tcp-echo` with the `tcp` routes `routes` (YAML list items).
fn vs(routes: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{ name: tcp-echo }}\nspec:\n  hosts: [tcp-echo]\n  tcp:\n{routes}"
    )
}

/// A connection from `remote` to `local` (the address the client dialled).
fn client(remote: &str, local: &str) -> ClientInfo {
    ClientInfo {
        remote: remote.parse::<SocketAddr>().unwrap(),
        local: local.parse::<SocketAddr>().unwrap(),
        tls: false,
    }
}

/// The target a connection from `from` to `to` gets on `host:port`.
fn route(config: &MeshConfig, host: &str, port: u16, from: &str, to: &str) -> RouteTarget {
    let service = config.services().lookup(host, port).unwrap();
    table(config)
        .select_tcp(service, &client(from, to), None)
        .expect("the table knows the service port")
        .unwrap()
}

fn subset(target: &RouteTarget) -> Option<&str> {
    target.subset.as_ref().map(|s| s.name.as_str())
}

const APP: &str = "10.1.0.5:40000";
const VIP: &str = "240.240.0.1:9000";

#[test]
fn without_tcp_routes_a_connection_goes_to_the_service_with_its_policy() {
    // An HTTP route of the same VirtualService does not apply to TCP, as in Istio.
    let config = config(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: { name: tcp-echo }\nspec:\n  hosts: [tcp-echo]\n  http:\n  - route: [{ destination: { host: mysql } }]\n",
    );
    let target = route(&config, "tcp-echo", 9000, APP, VIP);
    assert_eq!(&*target.name, "tcp-echo.default.svc.cluster.local:9000");
    assert_eq!(subset(&target), None);
    let policy = target.traffic_policy.expect("the DestinationRule's policy");
    assert_eq!(
        policy.load_balancer.as_ref().and_then(|lb| lb.simple),
        Some(SimpleLb::RoundRobin)
    );
}

#[test]
fn weights_split_connections_between_subsets() {
    let config = config(&vs("  - route:
    - { destination: { host: tcp-echo, subset: v1 }, weight: 80 }
    - { destination: { host: tcp-echo, subset: v2 }, weight: 20 }
"));
    let table = table(&config);
    let service = config.services().lookup("tcp-echo", 9000).unwrap();
    let mut seen: HashMap<String, u32> = HashMap::new();
    for _ in 0..10_000 {
        let target = table
            .select_tcp(service, &client(APP, VIP), None)
            .unwrap()
            .unwrap();
        // Each destination keeps the DestinationRule policy and names its subset.
        assert!(target.traffic_policy.is_some());
        *seen
            .entry(subset(&target).unwrap().to_string())
            .or_default() += 1;
    }
    let v1 = seen.get("v1").copied().unwrap_or(0);
    let v2 = seen.get("v2").copied().unwrap_or(0);
    assert_eq!(v1 + v2, 10_000);
    // 80 % ± 2 points: 5 standard deviations of a binomial draw of 10,000.
    assert!((7_800..=8_200).contains(&v1), "v1 {v1}, v2 {v2}");
}

#[test]
fn a_match_on_another_port_leaves_this_port_to_the_next_route() {
    let config = config(&vs("  - match: [{ port: 9001 }]
    route: [{ destination: { host: tcp-echo, subset: v2 } }]
  - route: [{ destination: { host: tcp-echo, subset: v1 } }]
"));
    assert_eq!(
        subset(&route(&config, "tcp-echo", 9000, APP, VIP)),
        Some("v1")
    );
    let other = route(&config, "tcp-echo", 9001, APP, "240.240.0.1:9001");
    assert_eq!(subset(&other), Some("v2"));
    // The destination names no port: the port the connection came in on.
    assert_eq!(other.service.number, 9001);
}

#[test]
fn source_labels_and_namespace_must_select_this_proxy() {
    let config = config(&vs("  - match: [{ sourceLabels: { app: someone-else } }]
    route: [{ destination: { host: mysql } }]
  - match: [{ sourceNamespace: other }]
    route: [{ destination: { host: mysql } }]
  - match: [{ sourceLabels: { app: client }, sourceNamespace: default }]
    route: [{ destination: { host: tcp-echo, subset: v2 } }]
"));
    assert_eq!(
        subset(&route(&config, "tcp-echo", 9000, APP, VIP)),
        Some("v2")
    );
}

#[test]
fn destination_and_source_subnets_are_checked_per_connection() {
    let config = config(&vs("  - match:
    - { destinationSubnets: [240.240.0.0/16] }
    - { destinationSubnets: [\"2001:db8::/32\"] }
    route: [{ destination: { host: tcp-echo, subset: v2 } }]
  - match: [{ sourceSubnet: 10.9.0.0/16 }]
    route: [{ destination: { host: mysql, port: { number: 3306 } } }]
"));
    // Dialled a VIP in the subnet: the first route.
    assert_eq!(
        subset(&route(&config, "tcp-echo", 9000, APP, VIP)),
        Some("v2")
    );
    // Through a dual-stack listener an IPv4 address arrives mapped; it still matches.
    assert_eq!(
        subset(&route(
            &config,
            "tcp-echo",
            9000,
            APP,
            "[::ffff:240.240.3.4]:9000"
        )),
        Some("v2")
    );
    assert_eq!(
        subset(&route(&config, "tcp-echo", 9000, APP, "[2001:db8::7]:9000")),
        Some("v2")
    );
    // Another destination address, from a client in 10.9/16: the second route.
    let other = route(&config, "tcp-echo", 9000, "10.9.1.1:4000", "10.0.0.1:9000");
    assert_eq!(&*other.name, "mysql.default.svc.cluster.local:3306");
    // Neither: the service itself.
    let neither = route(&config, "tcp-echo", 9000, APP, "10.0.0.1:9000");
    assert_eq!(&*neither.name, "tcp-echo.default.svc.cluster.local:9000");
    assert_eq!(subset(&neither), None);
}

#[test]
fn a_destination_with_an_undefined_subset_is_no_cluster() {
    let config = config(&vs(
        "  - route: [{ destination: { host: tcp-echo, subset: v9 } }]\n",
    ));
    let service = config.services().lookup("tcp-echo", 9000).unwrap();
    let err = table(&config)
        .select_tcp(service, &client(APP, VIP), None)
        .unwrap()
        .unwrap_err();
    assert_eq!(err.flags(), ResponseFlags::NO_CLUSTER_FOUND);
    let message = err.to_string();
    assert!(message.contains("subset v9"), "{message}");
}

#[test]
fn a_service_the_table_does_not_know_is_none() {
    // A port from another snapshot: the caller falls back to the service as it has it.
    let with_port = config("");
    let service = with_port.services().lookup("mysql", 3306).unwrap().clone();
    let without = load_sources(&[Source::new("empty.yaml", "")]).unwrap();
    assert!(
        table(&without)
            .select_tcp(&service, &client(APP, VIP), None)
            .is_none()
    );
}

#[test]
fn malformed_subnets_are_refused_at_load_naming_the_field() {
    let err = load_sources(&[Source::new(
        "tcp.yaml",
        format!(
            "{BASE}---\n{}",
            vs(
                "  - match: [{ destinationSubnets: [10.0.0.0/33], sourceSubnet: nope }]
    route: [{ destination: { host: tcp-echo } }]
"
            )
        ),
    )])
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("spec.tcp[0].match[0].destinationSubnets[0]") && err.contains("10.0.0.0/33"),
        "{err}"
    );
    assert!(
        err.contains("spec.tcp[0].match[0].sourceSubnet") && err.contains("`nope`"),
        "{err}"
    );
}

#[test]
fn tls_routes_match_the_sni_first_and_tcp_routes_follow() {
    let config = config(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: tcp-echo }
spec:
  hosts: [tcp-echo, \"*.echo.example\"]
  tls:
  - match: [{ port: 9001, sniHosts: [v2.echo.example] }]
    route: [{ destination: { host: mysql } }]
  - match: [{ sniHosts: [v2.echo.example] }]
    route: [{ destination: { host: tcp-echo, subset: v2 } }]
  - match: [{ sniHosts: [\"*.echo.example\"], destinationSubnets: [10.0.0.0/8] }]
    route: [{ destination: { host: mysql } }]
  tcp:
  - route: [{ destination: { host: tcp-echo, subset: v1 } }]
",
    );
    let table = table(&config);
    let service = config.services().lookup("tcp-echo", 9000).unwrap();
    let pick = |sni: Option<&str>, to: &str| {
        table
            .select_tcp(service, &client(APP, to), sni)
            .unwrap()
            .unwrap()
    };
    // The exact name: the second route (the first is for port 9001 only).
    assert_eq!(subset(&pick(Some("v2.echo.example"), VIP)), Some("v2"));
    // A wildcard name, to an address in its subnet: the third.
    assert_eq!(
        &*pick(Some("db.echo.example"), "10.2.3.4:9000").name,
        "mysql.default.svc.cluster.local:3306"
    );
    // A wildcard name elsewhere, another name, or no TLS at all: the tcp route.
    assert_eq!(subset(&pick(Some("db.echo.example"), VIP)), Some("v1"));
    assert_eq!(subset(&pick(Some("other.example"), VIP)), Some("v1"));
    assert_eq!(subset(&pick(None, VIP)), Some("v1"));
}

#[test]
fn a_gateway_port_takes_the_tcp_routes_bound_to_its_gateways_and_nothing_else() {
    let config = config(
        "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: { name: edge }
spec:
  selector: { app: client }
  servers: [{ port: { number: 31400, name: tcp, protocol: TCP }, hosts: [\"*\"] }]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: edge }
spec:
  hosts: [\"*\"]
  gateways: [edge]
  tcp:
  - match: [{ port: 31401 }]
    route: [{ destination: { host: mysql } }]
  - match: [{ port: 31400, sourceSubnet: 10.9.0.0/16 }]
    route: [{ destination: { host: tcp-echo, port: { number: 9000 }, subset: v2 } }]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: mesh-only }
spec:
  hosts: [tcp-echo]
  tcp:
  - route: [{ destination: { host: tcp-echo, subset: v1 } }]
",
    );
    let mut source = SourceContext::from_config(&config);
    source.gateways = vec!["default/edge".to_string()];
    let table = RouteTable::build(&config, &source);
    let at = |remote: &str| client(remote, "10.1.1.1:31400");
    let target = table
        .select_gateway_tcp(31400, &at("10.9.3.3:5000"), None)
        .unwrap()
        .unwrap();
    assert_eq!(&*target.name, "tcp-echo.default.svc.cluster.local:9000/v2");
    // A client outside the source subnet: no route, and no service to fall back on.
    let err = table
        .select_gateway_tcp(31400, &at("10.8.0.1:5000"), None)
        .unwrap()
        .unwrap_err();
    assert_eq!(err.flags(), ResponseFlags::NO_ROUTE_FOUND);
    assert!(err.to_string().contains("gateway port 31400"), "{err}");
    // No route names another port of the proxy.
    assert!(table.select_gateway_tcp(8080, &at(APP), None).is_none());
    // The `mesh` VirtualService does not apply on a gateway.
    let service = config.services().lookup("tcp-echo", 9000).unwrap();
    let own = table
        .select_tcp(service, &client(APP, VIP), None)
        .unwrap()
        .unwrap();
    assert_eq!(subset(&own), None);
}
