//! Istio's authorization tasks (HTTP traffic, TCP traffic, deny policies, ...) replayed on
//! the policies they apply, written as Istio YAML and selected for the workload they target,
//! plus the same decisions through `AuthzLayer`.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use http_body_util::BodyExt;
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::config::{self, MeshConfig, Source};
use mesh_core::conn::ClientInfo;
use mesh_core::{Identity, Labels};
use mesh_tls::authz::{
    AuthorizationPolicies, AuthzLayer, AuthzRequest, DENIED_BODY, Decision, HttpAttributes,
};
use mesh_tls::peer_auth::DEFAULT_ROOT_NAMESPACE;
use tower::{Layer, ServiceExt, service_fn};

const PRODUCTPAGE: &str = "cluster.local/ns/default/sa/bookinfo-productpage";
const REVIEWS: &str = "cluster.local/ns/default/sa/bookinfo-reviews";
const SLEEP_FOO: &str = "cluster.local/ns/foo/sa/sleep";
const SLEEP_BAR: &str = "cluster.local/ns/bar/sa/sleep";

fn load(yaml: &str) -> MeshConfig {
    match config::load_sources(&[Source::new("task.yaml", yaml)]) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

fn labels(app: &str) -> Labels {
    [("app", app)].into_iter().collect()
}

fn for_app(config: &MeshConfig, ns: &str, app: &str) -> AuthorizationPolicies {
    AuthorizationPolicies::for_workload(config, ns, &labels(app), DEFAULT_ROOT_NAMESPACE)
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// An HTTP decision for `peer` calling `method path` on port 9080.
fn http(p: &AuthorizationPolicies, peer: Option<&str>, method: &str, path: &str) -> Decision {
    http_with(p, peer, method, path, &http::HeaderMap::new())
}

fn http_with(
    p: &AuthorizationPolicies,
    peer: Option<&str>,
    method: &str,
    path: &str,
    headers: &http::HeaderMap,
) -> Decision {
    let peer = peer.map(|s| Identity::from_principal(s).expect("principal"));
    p.evaluate(&AuthzRequest {
        peer: peer.as_ref(),
        source_ip: ip("10.1.0.5"),
        destination_ip: ip("10.1.0.9"),
        destination_port: 9080,
        http: Some(HttpAttributes {
            method,
            path,
            host: "productpage:9080",
            headers,
        }),
    })
}

const ALLOW_NOTHING: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: default}
spec: {}
";

const PRODUCTPAGE_VIEWER: &str = "
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: productpage-viewer, namespace: default}
spec:
  selector:
    matchLabels: {app: productpage}
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: [GET]
";

const DETAILS_VIEWER: &str = "
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: details-viewer, namespace: default}
spec:
  selector:
    matchLabels: {app: details}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/default/sa/bookinfo-productpage]
    to:
    - operation:
        methods: [GET]
";

const REVIEWS_VIEWER: &str = "
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer, namespace: default}
spec:
  selector:
    matchLabels: {app: reviews}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/default/sa/bookinfo-productpage]
    to:
    - operation:
        methods: [GET]
";

/// The HTTP traffic task, step by step: allow-nothing denies every workload, then each
/// viewer policy opens exactly what it names.
#[test]
fn http_traffic_task() {
    let config = load(ALLOW_NOTHING);
    for app in ["productpage", "details", "reviews", "ratings"] {
        let p = for_app(&config, "default", app);
        let d = http(&p, Some(PRODUCTPAGE), "GET", "/");
        assert!(!d.allowed, "{app}: allow-nothing denies all");
        assert_eq!(d.policy, None, "denied because no ALLOW policy matched");
    }
    // allow-nothing does not reach other namespaces.
    assert!(http(&for_app(&config, "foo", "httpbin"), None, "GET", "/").allowed);

    let config = load(&[ALLOW_NOTHING, PRODUCTPAGE_VIEWER].concat());
    let productpage = for_app(&config, "default", "productpage");
    assert_eq!(productpage.len(), 2);
    let d = http(&productpage, None, "GET", "/productpage");
    assert!(d.allowed, "GET from anyone, even plain text");
    assert_eq!(d.policy.as_deref(), Some("default/productpage-viewer"));
    assert!(!http(&productpage, None, "POST", "/productpage").allowed);
    // The viewer's selector does not pick details: still allow-nothing there.
    let details = for_app(&config, "default", "details");
    assert!(!http(&details, Some(PRODUCTPAGE), "GET", "/details/0").allowed);

    let config = load(
        &[
            ALLOW_NOTHING,
            PRODUCTPAGE_VIEWER,
            DETAILS_VIEWER,
            REVIEWS_VIEWER,
        ]
        .concat(),
    );
    for app in ["details", "reviews"] {
        let p = for_app(&config, "default", app);
        assert!(http(&p, Some(PRODUCTPAGE), "GET", "/x").allowed, "{app}");
        assert!(
            !http(&p, Some(REVIEWS), "GET", "/x").allowed,
            "{app}: other caller"
        );
        assert!(
            !http(&p, None, "GET", "/x").allowed,
            "{app}: no mTLS, no principal"
        );
        assert!(
            !http(&p, Some(PRODUCTPAGE), "DELETE", "/x").allowed,
            "{app}: method"
        );
    }
    // Ratings has no viewer yet.
    let ratings = for_app(&config, "default", "ratings");
    assert!(!http(&ratings, Some(REVIEWS), "GET", "/ratings/0").allowed);
}

/// The deny task: a DENY overrides an ALLOW that would let the request through.
#[test]
fn deny_overrides_allow() {
    let yaml = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all-get, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: ALLOW
  rules:
  - to: [{operation: {methods: [GET]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-method-get, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - to:
    - operation:
        methods: [GET]
    when:
    - key: request.headers[x-token]
      notValues: [admin]
";
    let p = for_app(&load(yaml), "foo", "httpbin");
    let mut admin = http::HeaderMap::new();
    admin.insert("x-token", "admin".parse().expect("value"));
    let mut guest = http::HeaderMap::new();
    guest.insert("x-token", "guest".parse().expect("value"));

    let d = http_with(&p, Some(SLEEP_FOO), "GET", "/get", &guest);
    assert_eq!(
        (d.allowed, d.policy.as_deref()),
        (false, Some("foo/deny-method-get"))
    );
    assert!(
        !http(&p, Some(SLEEP_FOO), "GET", "/get").allowed,
        "no header: notValues holds"
    );
    let d = http_with(&p, Some(SLEEP_FOO), "GET", "/get", &admin);
    assert_eq!(
        (d.allowed, d.policy.as_deref()),
        (true, Some("foo/allow-all-get"))
    );
    assert!(!http_with(&p, Some(SLEEP_FOO), "POST", "/post", &admin).allowed);
}

/// Namespace-based rules (`namespaces: [foo]`), as in the task that restricts httpbin to
/// callers from its own namespace, and a mesh-wide DENY from the root namespace.
#[test]
fn namespace_rules_and_mesh_wide_deny() {
    let yaml = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-from-foo, namespace: foo}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        namespaces: [foo]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-legacy, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from:
    - source:
        namespaces: [legacy]
";
    let config = load(yaml);
    let p = for_app(&config, "foo", "httpbin");
    assert_eq!(p.len(), 2);
    assert!(http(&p, Some(SLEEP_FOO), "GET", "/ip").allowed);
    assert!(!http(&p, Some(SLEEP_BAR), "GET", "/ip").allowed);
    assert!(
        !http(&p, None, "GET", "/ip").allowed,
        "plain text has no namespace"
    );
    let d = http(&p, Some("cluster.local/ns/legacy/sa/x"), "GET", "/ip");
    assert_eq!(d.policy.as_deref(), Some("istio-system/deny-legacy"));
    // In bar, only the mesh-wide DENY applies.
    let bar = for_app(&config, "bar", "httpbin");
    assert!(http(&bar, Some(SLEEP_BAR), "GET", "/ip").allowed);
    assert!(!http(&bar, Some("cluster.local/ns/legacy/sa/x"), "GET", "/ip").allowed);
}

/// `/api/*` GET only from one principal; other methods, paths or principals are denied.
#[test]
fn path_prefix_method_and_principal() {
    let yaml = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-reader, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/foo/sa/sleep]}}]
    to: [{operation: {methods: [GET], paths: [\"/api/*\"]}}]
";
    let p = for_app(&load(yaml), "foo", "httpbin");
    assert!(http(&p, Some(SLEEP_FOO), "GET", "/api/v1/items").allowed);
    assert!(!http(&p, Some(SLEEP_FOO), "POST", "/api/v1/items").allowed);
    assert!(!http(&p, Some(SLEEP_FOO), "GET", "/admin").allowed);
    assert!(
        !http(&p, Some(SLEEP_FOO), "GET", "/api").allowed,
        "prefix is `/api/`"
    );
    assert!(!http(&p, Some(SLEEP_BAR), "GET", "/api/v1/items").allowed);
    // The selector: other workloads of foo have no policy at all.
    assert!(http(&for_app(&load(yaml), "foo", "other"), None, "POST", "/").allowed);
}

/// `when: request.headers[x-token]`.
#[test]
fn header_condition() {
    let yaml = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: token, namespace: foo}
spec:
  rules:
  - when:
    - key: request.headers[x-token]
      values: [\"secret-*\"]
";
    let p = for_app(&load(yaml), "foo", "httpbin");
    let mut h = http::HeaderMap::new();
    h.insert("x-token", "secret-42".parse().expect("value"));
    assert!(http_with(&p, None, "GET", "/", &h).allowed);
    h.insert("x-token", "public".parse().expect("value"));
    assert!(!http_with(&p, None, "GET", "/", &h).allowed);
    assert!(!http(&p, None, "GET", "/").allowed);
}

/// The TCP traffic task (tcp-echo): allow ports 9000 and 9001 only, then by principal, and
/// the DENY with an HTTP-only field that closes every TCP connection.
#[test]
fn tcp_traffic_task() {
    let ports = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: tcp-policy, namespace: foo}
spec:
  selector: {matchLabels: {app: tcp-echo}}
  action: ALLOW
  rules:
  - to:
    - operation:
        ports: [\"9000\", \"9001\"]
";
    let p = for_app(&load(ports), "foo", "tcp-echo");
    let (src, dst) = (ip("10.1.0.5"), ip("10.1.0.9"));
    let sleep = Identity::from_principal(SLEEP_FOO).expect("principal");
    for port in [9000, 9001] {
        let d = p.check_connection(Some(&sleep), src, dst, port);
        assert!(d.allowed, "{port}");
        assert_eq!(d.policy.as_deref(), Some("foo/tcp-policy"));
    }
    assert!(!p.check_connection(Some(&sleep), src, dst, 9002).allowed);

    // The task's next step: an ALLOW with an HTTP-only field (methods) stops matching TCP.
    let with_methods = ports.replace(
        "ports: [\"9000\", \"9001\"]",
        "methods: [GET]\n        ports: [\"9000\"]",
    );
    let p = for_app(&load(&with_methods), "foo", "tcp-echo");
    assert!(!p.check_connection(Some(&sleep), src, dst, 9000).allowed);

    // And a DENY with the same field denies all TCP to the port (methods ignored).
    let deny = with_methods.replace("action: ALLOW", "action: DENY");
    let p = for_app(&load(&deny), "foo", "tcp-echo");
    let d = p.check_connection(Some(&sleep), src, dst, 9000);
    assert_eq!(
        (d.allowed, d.policy.as_deref()),
        (false, Some("foo/tcp-policy"))
    );
    assert!(p.check_connection(Some(&sleep), src, dst, 9001).allowed);

    // By principal.
    let by_principal = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: tcp-from-sleep, namespace: foo}
spec:
  selector: {matchLabels: {app: tcp-echo}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/foo/sa/sleep]}}]
    to: [{operation: {ports: [\"9000\"]}}]
";
    let p = for_app(&load(by_principal), "foo", "tcp-echo");
    assert!(p.check_connection(Some(&sleep), src, dst, 9000).allowed);
    let bar = Identity::from_principal(SLEEP_BAR).expect("principal");
    assert!(!p.check_connection(Some(&bar), src, dst, 9000).allowed);
    assert!(!p.check_connection(None, src, dst, 9000).allowed);
}

/// `AuthzLayer` over a `service_fn`: allowed requests reach the app, denied ones get
/// Envoy's 403 without it being called, and a swapped policy set applies to the next request.
#[tokio::test]
async fn layer_answers_403_without_calling_the_app() {
    let config = load(&[ALLOW_NOTHING, PRODUCTPAGE_VIEWER].concat());
    let policies = Arc::new(ArcSwap::from_pointee(for_app(
        &config,
        "default",
        "productpage",
    )));
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let app = service_fn(move |_req: http::Request<BoxBody>| {
        seen.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, BoxError>(http::Response::new(body::full("page"))) }
    });
    let svc = AuthzLayer::new(policies.clone()).layer(app);

    let request = |method: &str| {
        let mut req = http::Request::builder()
            .method(method)
            .uri("/productpage")
            .header("host", "productpage:9080")
            .body(body::empty())
            .expect("request");
        req.extensions_mut().insert(ClientInfo {
            remote: "10.1.0.5:41000".parse().expect("addr"),
            local: "10.1.0.9:9080".parse().expect("addr"),
            tls: false,
        });
        req
    };

    let ok = svc.clone().oneshot(request("GET")).await.expect("response");
    assert_eq!(ok.status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let denied = svc
        .clone()
        .oneshot(request("POST"))
        .await
        .expect("response");
    assert_eq!(denied.status(), 403);
    assert_eq!(
        denied.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"text/plain"[..])
    );
    assert!(denied.headers().get("x-mesh-response-flags").is_none());
    let decision = denied
        .extensions()
        .get::<Decision>()
        .cloned()
        .expect("decision");
    assert!(!decision.allowed);
    let body = denied.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body, DENIED_BODY);
    assert_eq!(body, "RBAC: access denied");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the app was not called");

    // No ClientInfo: denied (addresses unknown), the app is not called.
    let mut bare = request("GET");
    bare.extensions_mut().remove::<ClientInfo>();
    assert_eq!(
        svc.clone().oneshot(bare).await.expect("response").status(),
        403
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Reload without policies: everything goes through, even without ClientInfo.
    policies.store(Arc::new(AuthorizationPolicies::default()));
    let ok = svc
        .clone()
        .oneshot(request("POST"))
        .await
        .expect("response");
    assert_eq!(ok.status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// The layer reads the verified peer from the `Identity` extension, never from headers.
#[tokio::test]
async fn layer_uses_the_identity_extension() {
    let config = load(&[ALLOW_NOTHING, DETAILS_VIEWER].concat());
    let policies = Arc::new(ArcSwap::from_pointee(for_app(
        &config, "default", "details",
    )));
    let app = service_fn(|_req: http::Request<BoxBody>| async {
        Ok::<_, BoxError>(http::Response::new(body::empty()))
    });
    let svc = AuthzLayer::new(policies).layer(app);
    let request = |peer: Option<&str>| {
        let mut req = http::Request::builder()
            .uri("http://details:9080/details/0")
            .header(
                "x-forwarded-client-cert",
                format!("URI=spiffe://{PRODUCTPAGE}"),
            )
            .body(body::empty())
            .expect("request");
        req.extensions_mut().insert(ClientInfo {
            remote: "10.1.0.5:41000".parse().expect("addr"),
            local: "10.1.0.9:9080".parse().expect("addr"),
            tls: peer.is_some(),
        });
        if let Some(p) = peer {
            req.extensions_mut()
                .insert(Identity::from_principal(p).expect("principal"));
        }
        req
    };
    let status = |r: http::Response<BoxBody>| r.status().as_u16();
    assert_eq!(
        status(
            svc.clone()
                .oneshot(request(Some(PRODUCTPAGE)))
                .await
                .expect("r")
        ),
        200
    );
    assert_eq!(
        status(
            svc.clone()
                .oneshot(request(Some(REVIEWS)))
                .await
                .expect("r")
        ),
        403
    );
    assert_eq!(
        status(svc.clone().oneshot(request(None)).await.expect("r")),
        403
    );
}
