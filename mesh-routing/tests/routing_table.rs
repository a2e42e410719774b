//! Building the route table: which routes exist for this proxy, where destinations resolve,
//! and what a request matches.

#![allow(clippy::unwrap_used)]

mod routing_support;

use std::time::Duration;

use mesh_core::ResponseFlags;
use mesh_core::config::networking::SimpleLb;
use mesh_core::target::{RetryOn, RetryPolicy};
use mesh_routing::{RouteTable, SourceContext};
use routing_support::*;

const VS: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\n";

/// A VirtualService `name` for `hosts` (YAML list items) with the HTTP routes `http`.
fn vs(name: &str, hosts: &str, http: &str) -> String {
    format!("{VS}metadata: {{ name: {name} }}\nspec:\n  hosts: [{hosts}]\n  http:\n{http}")
}

#[tokio::test]
async fn a_service_without_virtual_service_routes_to_itself() {
    let h = Harness::new("");
    for host in [
        "reviews:9080",
        "reviews.default:9080",
        "reviews.default.svc:9080",
        "reviews.default.svc.cluster.local:9080",
        "REVIEWS:9080",
    ] {
        h.ok(get(host, "/anything")).await;
        let seen = h.last();
        assert_eq!(
            &*seen.target.name, "reviews.default.svc.cluster.local:9080",
            "{host}"
        );
    }
    let t = h.last().target;
    assert!(t.subset.is_none());
    assert_eq!(t.timeout, None, "Istio's default: no route timeout");
    assert_eq!(*t.retry, RetryPolicy::istio_default());
    let policy = t.traffic_policy.expect("the DestinationRule's host policy");
    assert_eq!(
        policy.load_balancer.as_ref().and_then(|lb| lb.simple),
        Some(SimpleLb::RoundRobin)
    );
}

#[tokio::test]
async fn unknown_hosts_and_unmatched_routes_are_404_nr() {
    let h = Harness::new(&vs(
        "reviews",
        "reviews",
        "  - match: [{ uri: { prefix: /api } }]\n    route: [{ destination: { host: reviews } }]\n",
    ));
    let (flags, status, message) = h.fails(get("nope:80", "/")).await;
    assert_eq!((flags, status), (ResponseFlags::NO_ROUTE_FOUND, 404));
    assert!(message.contains("nope:80"), "{message}");
    let (flags, status, _) = h.fails(get("reviews:9081", "/")).await;
    assert_eq!(
        (flags, status),
        (ResponseFlags::NO_ROUTE_FOUND, 404),
        "no such port"
    );
    let (flags, status, message) = h.fails(get("reviews:9080", "/web")).await;
    assert_eq!((flags, status), (ResponseFlags::NO_ROUTE_FOUND, 404));
    assert!(
        message.contains("reviews.default.svc.cluster.local:9080") && message.contains("/web"),
        "{message}"
    );
    h.ok(get("reviews:9080", "/api/x")).await;
}

#[tokio::test]
async fn first_match_wins_blocks_or_fields_and() {
    let h = Harness::new(&vs(
        "reviews",
        "reviews",
        "  - name: jason-or-beta
    match:
    - name: jason
      headers: { end-user: { exact: jason } }
      uri: { prefix: /reviews }
    - name: beta
      queryParams: { beta: {} }
    route: [{ destination: { host: reviews, subset: v2 } }]
  - name: also-jason
    match: [{ headers: { end-user: { exact: jason } } }]
    route: [{ destination: { host: reviews, subset: v3 } }]
  - name: rest
    route: [{ destination: { host: reviews, subset: v1 } }]
",
    ));
    let table = h.table.load();
    let pick = |req| {
        table
            .select(&req)
            .map(|s| {
                (
                    s.route_name().map(str::to_owned),
                    s.match_name().map(str::to_owned),
                )
            })
            .unwrap()
    };
    assert_eq!(
        pick(with_header(
            get("reviews:9080", "/reviews/1"),
            "end-user",
            "jason"
        )),
        (Some("jason-or-beta".into()), Some("jason".into()))
    );
    assert_eq!(
        pick(with_header(
            get("reviews:9080", "/other"),
            "end-user",
            "jason"
        )),
        (Some("also-jason".into()), None),
        "both fields of a block must hold"
    );
    assert_eq!(
        pick(get("reviews:9080", "/x?beta")),
        (Some("jason-or-beta".into()), Some("beta".into()))
    );
    assert_eq!(pick(get("reviews:9080", "/x")), (Some("rest".into()), None));
    h.ok(get("reviews:9080", "/x?beta")).await;
    assert_eq!(h.last().target.subset.unwrap().name, "v2");
}

#[test]
fn source_labels_namespace_and_gateways_are_resolved_at_build() {
    let rules = vs(
        "reviews",
        "reviews",
        "  - name: from-other-app
    match: [{ sourceLabels: { app: other } }]
    route: [{ destination: { host: reviews, subset: v3 } }]
  - name: from-other-namespace
    match: [{ sourceNamespace: prod }]
    route: [{ destination: { host: reviews, subset: v3 } }]
  - name: gateway-only
    match: [{ gateways: [istio-system/public] }]
    route: [{ destination: { host: reviews, subset: v3 } }]
  - name: from-productpage
    match: [{ sourceLabels: { app: productpage }, sourceNamespace: default }]
    route: [{ destination: { host: reviews, subset: v2 } }]
  - name: rest
    route: [{ destination: { host: reviews, subset: v1 } }]
",
    );
    let name = |t: &RouteTable| {
        t.select(&get("reviews.default:9080", "/"))
            .unwrap()
            .route_name()
            .map(str::to_owned)
    };
    assert_eq!(name(&table(&rules)), Some("from-productpage".into()));
    let other = SourceContext::sidecar("prod", [("app", "other")].into_iter().collect());
    let t = RouteTable::build(&config(&rules), &other);
    assert_eq!(name(&t), Some("from-other-app".into()));
    assert!(
        t.select(&get("reviews:9080", "/")).is_err(),
        "the bare name is an alias only in default"
    );
    let gateway = SourceContext {
        gateways: vec!["istio-system/public".into()],
        ..SourceContext::sidecar("istio-system", Default::default())
    };
    let t = RouteTable::build(&config(&rules), &gateway);
    assert!(
        t.select(&get("reviews:9080", "/")).is_err(),
        "the VirtualService is bound to the mesh only"
    );
    let bound = rules.replace(
        "hosts: [reviews]",
        "hosts: [reviews]\n  gateways: [mesh, istio-system/public]",
    );
    let t = RouteTable::build(&config(&bound), &gateway);
    assert_eq!(name(&t), Some("gateway-only".into()));
}

#[test]
fn port_matches_are_per_virtual_host() {
    let t = table(&vs(
        "ratings",
        "ratings",
        "  - name: admin
    match: [{ port: 8080 }]
    route: [{ destination: { host: ratings } }]
  - name: api
    route: [{ destination: { host: ratings } }]
",
    ));
    let route = |host| {
        t.select(&get(host, "/"))
            .unwrap()
            .route_name()
            .map(str::to_owned)
    };
    assert_eq!(route("ratings:8080"), Some("admin".into()));
    assert_eq!(route("ratings:9080"), Some("api".into()));
}

#[tokio::test]
async fn destination_ports_given_only_or_the_requests() {
    let h = Harness::new(&vs(
        "front",
        "details",
        "  - match: [{ uri: { prefix: /given } }]
    route: [{ destination: { host: ratings, port: { number: 8080 } } }]
  - match: [{ uri: { prefix: /only } }]
    route: [{ destination: { host: reviews } }]
  - route: [{ destination: { host: ratings } }]
",
    ));
    h.ok(get("details:9080", "/given")).await;
    assert_eq!(
        &*h.last().target.name,
        "ratings.default.svc.cluster.local:8080"
    );
    h.ok(get("details:9080", "/only")).await;
    assert_eq!(
        &*h.last().target.name,
        "reviews.default.svc.cluster.local:9080"
    );
    h.ok(get("details:9080", "/multi")).await;
    assert_eq!(
        &*h.last().target.name,
        "ratings.default.svc.cluster.local:9080",
        "the request's port"
    );
}

#[tokio::test]
async fn unknown_hosts_ports_and_subsets_are_503_nc() {
    let h = Harness::new(&vs(
        "reviews",
        "reviews",
        "  - match: [{ uri: { prefix: /ghost } }]
    route: [{ destination: { host: ghost } }]
  - match: [{ uri: { prefix: /port } }]
    route: [{ destination: { host: reviews, port: { number: 1234 } } }]
  - route: [{ destination: { host: reviews, subset: v9 } }]
",
    ));
    let (flags, status, message) = h.fails(get("reviews:9080", "/ghost")).await;
    assert_eq!((flags, status), (ResponseFlags::NO_CLUSTER_FOUND, 503));
    assert!(
        message.contains("ghost.default.svc.cluster.local"),
        "{message}"
    );
    let (_, _, message) = h.fails(get("reviews:9080", "/port")).await;
    assert!(message.contains("has no port 1234"), "{message}");
    let (flags, _, message) = h.fails(get("reviews:9080", "/")).await;
    assert_eq!(flags, ResponseFlags::NO_CLUSTER_FOUND);
    assert!(
        message.contains("subset v9") && message.contains("reviews.default.svc.cluster.local:9080"),
        "{message}"
    );
    assert!(h.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn subsets_carry_labels_and_merged_traffic_policy() {
    let h = Harness::new(&vs(
        "reviews",
        "reviews",
        "  - match: [{ headers: { v: { exact: '2' } } }]
    route: [{ destination: { host: reviews, subset: v2 } }]
  - route: [{ destination: { host: reviews, subset: v1 } }]
",
    ));
    h.ok(with_header(get("reviews:9080", "/"), "v", "2")).await;
    let t = h.last().target;
    assert_eq!(&*t.name, "reviews.default.svc.cluster.local:9080/v2");
    let subset = t.subset.unwrap();
    assert_eq!(subset.labels.get("version"), Some("v2"));
    let policy = t.traffic_policy.unwrap();
    assert_eq!(
        policy.load_balancer.as_ref().and_then(|lb| lb.simple),
        Some(SimpleLb::LeastRequest),
        "subset overrides"
    );
    assert!(
        policy.connection_pool.is_some(),
        "the host's connection pool is kept"
    );
    h.ok(get("reviews:9080", "/")).await;
    let policy = h.last().target.traffic_policy.unwrap();
    assert_eq!(
        policy.load_balancer.as_ref().and_then(|lb| lb.simple),
        Some(SimpleLb::RoundRobin)
    );
}

#[tokio::test]
async fn timeouts_and_retries_are_handed_down() {
    let h = Harness::new(&vs(
        "reviews",
        "reviews",
        "  - match: [{ uri: { prefix: /slow } }]
    timeout: 0s
    retries: { attempts: 0 }
    route: [{ destination: { host: reviews } }]
  - match: [{ uri: { prefix: /custom } }]
    timeout: 1.5s
    retries: { attempts: 4, perTryTimeout: 500ms, retryOn: 'gateway-error,429' }
    route: [{ destination: { host: reviews } }]
  - route: [{ destination: { host: reviews } }]
    timeout: 3s
",
    ));
    h.ok(get("reviews:9080", "/slow")).await;
    let t = h.last().target;
    assert_eq!(t.timeout, None, "0s disables the timeout");
    assert_eq!(t.retry.attempts, 0);
    h.ok(get("reviews:9080", "/custom")).await;
    let t = h.last().target;
    assert_eq!(t.timeout, Some(Duration::from_millis(1500)));
    assert_eq!(t.retry.attempts, 4);
    assert_eq!(t.retry.per_try_timeout, Some(Duration::from_millis(500)));
    assert!(t.retry.retry_on.contains(RetryOn::GATEWAY_ERROR));
    assert_eq!(t.retry.retry_on.status_codes, [429]);
    h.ok(get("reviews:9080", "/")).await;
    let t = h.last().target;
    assert_eq!(t.timeout, Some(Duration::from_secs(3)));
    assert_eq!(*t.retry, RetryPolicy::istio_default());
}

#[tokio::test]
async fn weighted_splits_hold_their_proportions() {
    fastrand::seed(1);
    let h = Harness::new(&vs(
        "reviews",
        "reviews",
        "  - route:
    - { destination: { host: reviews, subset: v1 }, weight: 70 }
    - { destination: { host: reviews, subset: v2 }, weight: 20 }
    - { destination: { host: reviews, subset: v3 }, weight: 10 }
",
    ));
    let n = 20_000;
    for _ in 0..n {
        h.ok(get("reviews:9080", "/")).await;
    }
    let seen = h.seen.lock().unwrap();
    let share = |v: &str| {
        seen.iter()
            .filter(|s| s.target.subset.as_ref().is_some_and(|s| s.name == v))
            .count() as f64
            * 100.0
            / n as f64
    };
    assert!((68.5..=71.5).contains(&share("v1")), "v1 {}", share("v1"));
    assert!((18.5..=21.5).contains(&share("v2")), "v2 {}", share("v2"));
    assert!((9.0..=11.0).contains(&share("v3")), "v3 {}", share("v3"));
}

#[tokio::test]
async fn a_zero_weight_destination_gets_nothing() {
    let h = Harness::new(&vs(
        "reviews",
        "reviews",
        "  - route:
    - { destination: { host: reviews, subset: v1 }, weight: 100 }
    - { destination: { host: reviews, subset: v2 }, weight: 0 }
",
    ));
    for _ in 0..500 {
        h.ok(get("reviews:9080", "/")).await;
    }
    assert!(
        h.seen
            .lock()
            .unwrap()
            .iter()
            .all(|s| s.target.subset.as_ref().unwrap().name == "v1")
    );
}

#[test]
fn virtual_service_hosts_outside_the_registry_route_on_port_80_only() {
    let t = table(&vs(
        "external",
        "api.example.com",
        "  - route: [{ destination: { host: details } }]
",
    ));
    assert!(t.select(&get("api.example.com", "/")).is_ok());
    assert!(t.select(&get("api.example.com:80", "/")).is_ok());
    assert!(t.select(&get("api.example.com:8080", "/")).is_err());
}

// Two VirtualServices binding one host to the mesh are rejected at load (mesh-core's
// `two_virtual_services_for_one_mesh_host_conflict`), so the table never sees them.

#[test]
fn wildcard_virtual_services_cover_matching_services() {
    let t = table(&format!(
        "{VS}metadata: {{ name: all }}
spec:
  hosts: ['*.default.svc.cluster.local']
  http: [{{ name: wild, route: [{{ destination: {{ host: details }} }}] }}]
---
{VS}metadata: {{ name: reviews }}
spec:
  hosts: [reviews]
  http: [{{ name: exact, route: [{{ destination: {{ host: reviews }} }}] }}]
"
    ));
    let route = |host| {
        t.select(&get(host, "/"))
            .unwrap()
            .route_name()
            .map(str::to_owned)
    };
    assert_eq!(route("ratings:9080"), Some("wild".into()));
    assert_eq!(
        route("reviews:9080"),
        Some("exact".into()),
        "an exact host beats a wildcard"
    );
}

#[tokio::test]
async fn delegates_are_merged_into_the_root() {
    let h = Harness::new(&format!(
        "{VS}metadata: {{ name: root }}
spec:
  hosts: [reviews]
  http:
  - match: [{{ uri: {{ prefix: /reviews }} }}]
    delegate: {{ name: reviews-delegate }}
  - route: [{{ destination: {{ host: reviews, subset: v1 }} }}]
---
{VS}metadata: {{ name: reviews-delegate }}
spec:
  http:
  - match: [{{ uri: {{ prefix: /reviews/v3 }} }}]
    route: [{{ destination: {{ host: reviews, subset: v3 }} }}]
  - route: [{{ destination: {{ host: reviews, subset: v2 }} }}]
"
    ));
    let subset = |h: &Harness| h.last().target.subset.unwrap().name.clone();
    h.ok(get("reviews:9080", "/reviews/v3/x")).await;
    assert_eq!(subset(&h), "v3");
    h.ok(get("reviews:9080", "/reviews/1")).await;
    assert_eq!(subset(&h), "v2");
    h.ok(get("reviews:9080", "/other")).await;
    assert_eq!(subset(&h), "v1");
}

#[tokio::test]
async fn a_sidecar_egress_scope_leaves_other_hosts_unrouted() {
    let rules = vs(
        "external",
        "api.example.com",
        "  - route: [{ destination: { host: details } }]\n",
    );
    let scoped = |hosts: &[&str]| {
        let mut source = productpage();
        source.egress_hosts = Some(
            hosts
                .iter()
                .map(|h| mesh_routing::HostPattern::parse(h, "default", "default"))
                .collect(),
        );
        RouteTable::build(&config(&rules), &source)
    };
    let t = scoped(&["./reviews"]);
    assert!(t.select(&get("reviews:9080", "/")).is_ok());
    for host in ["ratings:9080", "details:9080", "api.example.com"] {
        let err = t.select(&get(host, "/")).unwrap_err();
        assert_eq!(err.flags(), ResponseFlags::NO_ROUTE_FOUND, "{host}");
    }
    // A VirtualService host outside the registry is seen by its own namespace and name; its
    // route to a service outside the scope has no cluster (`NC` when forwarded).
    let t = scoped(&["./reviews", "*/*.example.com"]);
    assert!(t.select(&get("api.example.com", "/")).is_ok());
    let h = Harness::with(
        t,
        std::sync::Arc::new(|_: &mesh_core::target::RouteTarget| Answer::Ok),
    );
    let (flags, status, message) = h.fails(get("api.example.com", "/")).await;
    assert_eq!((flags, status), (ResponseFlags::NO_CLUSTER_FOUND, 503));
    assert!(message.contains("Sidecar egress hosts"), "{message}");
    // No scope: everything exported to the proxy.
    let t = RouteTable::build(&config(&rules), &productpage());
    assert!(t.select(&get("ratings:9080", "/")).is_ok());
}
