//! AuthorizationPolicy evaluation as a property: for generated policies and requests, the
//! decision of the proxy's entry points (`AuthorizationPolicies::for_workload` then
//! `evaluate`, `check_connection`, and `AuthzLayer`) is the one a reference evaluator
//! written here from Istio's documented semantics makes:
//!
//! - selection: a policy applies to the workload when it is in the workload's namespace or
//!   the root namespace (`istio-system`) and has no selector or one its labels match;
//! - decision: any matching DENY denies; otherwise, if any ALLOW policy applies, the request
//!   is allowed iff one matches; otherwise it is allowed. A matching AUDIT marks the request
//!   and changes nothing else. The deciding policy reported is the first matching one in
//!   config order, so the principal index the library evaluates through must give what a
//!   linear scan gives;
//! - a policy matches when one of its rules does (no rules: never); a rule when one of its
//!   `from` (if any), one of its `to` (if any) and all of its `when` match; each source or
//!   operation when all of its fields hold; a field when any of its values matches (`not*`:
//!   when none does);
//! - strings: `*` (any), `abc*` (prefix), `*abc` (suffix), else exact; paths also take
//!   URI templates (`{*}` one non-empty segment, `{**}` the rest, last only);
//! - no peer identity: positive `principals`, `namespaces`, `serviceAccounts`,
//!   `source.principal` and `source.namespace` never hold, their negations always do;
//! - TCP (no HTTP attributes): an ALLOW rule naming an HTTP-only field (`methods`, `paths`,
//!   their `not*`, `request.headers[...]`) never matches; in DENY and AUDIT rules those
//!   fields are ignored.

#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::config::{Source, load_sources};
use mesh_core::conn::ClientInfo;
use mesh_core::{Identity, Labels};
use mesh_tls::authz::{AuthorizationPolicies, AuthzLayer, AuthzRequest, Decision, HttpAttributes};
use mesh_tls::peer_auth::DEFAULT_ROOT_NAMESPACE;
use proptest::prelude::*;
use proptest::sample::select;
use tower::{Layer, ServiceExt, service_fn};

/// The workload under test.
const NAMESPACE: &str = "default";
fn workload_labels() -> Labels {
    [("app", "reviews"), ("version", "v1")]
        .into_iter()
        .collect()
}

// ---------------------------------------------------------------------------------------
// Requests.

const PEERS: [Option<&str>; 7] = [
    None,
    Some("cluster.local/ns/default/sa/productpage"),
    Some("cluster.local/ns/default/sa/reviews"),
    Some("cluster.local/ns/foo/sa/sleep"),
    Some("example.org/ns/foo/sa/sleep"),
    Some("cluster.local/ns/bar/sa/sleep"),
    // Valid SPIFFE, not Istio-shaped: no namespace or service account.
    Some("cluster.local/workloads/batch"),
];
const METHODS: [&str; 4] = ["GET", "POST", "PUT", "DELETE"];
const PATHS: [&str; 8] = [
    "/",
    "/api",
    "/api/v1",
    "/api/v1/items",
    "/healthz",
    "/img/a.png",
    "/files/a/b",
    "/files/",
];
const PORTS: [u16; 3] = [9080, 8080, 15000];
const SOURCE_IPS: [&str; 3] = ["10.1.0.5", "192.168.7.7", "172.16.0.1"];
const TOKENS: [&[&str]; 4] = [&[], &["abc"], &["admin"], &["abc", "admin"]];

#[derive(Clone, Debug)]
struct Req {
    peer: Option<&'static str>,
    method: &'static str,
    path: &'static str,
    port: u16,
    source_ip: &'static str,
    /// Values of `x-token`, in order.
    token: &'static [&'static str],
}

fn request() -> impl Strategy<Value = Req> {
    (
        select(PEERS.to_vec()),
        select(METHODS.to_vec()),
        select(PATHS.to_vec()),
        select(PORTS.to_vec()),
        select(SOURCE_IPS.to_vec()),
        select(TOKENS.to_vec()),
    )
        .prop_map(|(peer, method, path, port, source_ip, token)| Req {
            peer,
            method,
            path,
            port,
            source_ip,
            token,
        })
}

// ---------------------------------------------------------------------------------------
// Policies, as the reference sees them and as YAML.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Allow,
    Deny,
    Audit,
}

#[derive(Clone, Debug)]
enum Field {
    Principals(Vec<&'static str>),
    Namespaces(Vec<&'static str>),
    ServiceAccounts(Vec<&'static str>),
    IpBlocks(Vec<&'static str>),
    Methods(Vec<&'static str>),
    Paths(Vec<&'static str>),
    Ports(Vec<u16>),
    /// `request.headers[x-token]`
    Token(Vec<&'static str>),
}

impl Field {
    fn http_only(&self) -> bool {
        matches!(self, Field::Methods(_) | Field::Paths(_) | Field::Token(_))
    }
}

/// A field and whether it is the `not*` form.
type Test = (Field, bool);

#[derive(Clone, Debug, Default)]
struct Rule {
    from: Vec<Vec<Test>>,
    to: Vec<Vec<Test>>,
    when: Vec<Test>,
}

#[derive(Clone, Debug)]
struct Policy {
    name: String,
    namespace: &'static str,
    selector: Option<Vec<(&'static str, &'static str)>>,
    /// `None`: not written (ALLOW).
    action: Option<Action>,
    /// `None`: `rules` not written.
    rules: Option<Vec<Rule>>,
}

impl Policy {
    fn action(&self) -> Action {
        self.action.unwrap_or(Action::Allow)
    }

    fn applies(&self) -> bool {
        let labels = workload_labels();
        (self.namespace == NAMESPACE || self.namespace == DEFAULT_ROOT_NAMESPACE)
            && self
                .selector
                .as_ref()
                .is_none_or(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }
}

const PRINCIPAL_PATTERNS: [&str; 14] = [
    "cluster.local/ns/default/sa/productpage",
    "cluster.local/ns/foo/sa/sleep",
    "example.org/ns/foo/sa/sleep",
    "cluster.local/workloads/batch",
    "cluster.local/ns/foo/*",
    "cluster.local/*",
    "cluster.local/ns/default/sa/prod*",
    "example.org/*",
    "*/sa/sleep",
    "*sleep",
    "*/ns/default/sa/reviews",
    "*",
    // A `*` inside is a literal character.
    "cluster.local/*/sa/sleep",
    "*batch",
];
const NAMESPACE_PATTERNS: [&str; 7] = ["default", "foo", "bar", "fo*", "*ar", "*", "other"];
const SERVICE_ACCOUNTS: [&str; 4] = ["foo/sleep", "default/reviews", "bar/sleep", "x/y"];
const IP_BLOCKS: [&str; 4] = ["10.0.0.0/8", "10.1.0.5", "192.168.0.0/16", "172.16.0.0/30"];
const METHOD_PATTERNS: [&str; 6] = ["GET", "POST", "P*", "*T", "*", "DELETE"];
const PATH_PATTERNS: [&str; 13] = [
    "/",
    "/api",
    "/api/v1",
    "/api/*",
    "/api*",
    "*.png",
    "*/items",
    "*",
    "/healthz",
    "/api/{*}/items",
    "/files/{**}",
    "/{*}",
    "/{*}/{**}",
];
const TOKEN_PATTERNS: [&str; 5] = ["abc", "admin", "abc,admin", "ad*", "*"];

fn list<T: Clone + std::fmt::Debug + 'static>(pool: &'static [T]) -> impl Strategy<Value = Vec<T>> {
    proptest::collection::vec(select(pool), 1..3)
}

fn source_test() -> impl Strategy<Value = Test> {
    (
        prop_oneof![
            3 => list(&PRINCIPAL_PATTERNS).prop_map(Field::Principals),
            2 => list(&NAMESPACE_PATTERNS).prop_map(Field::Namespaces),
            1 => list(&SERVICE_ACCOUNTS).prop_map(Field::ServiceAccounts),
            1 => list(&IP_BLOCKS).prop_map(Field::IpBlocks),
        ],
        proptest::bool::weighted(0.3),
    )
}

fn operation_test() -> impl Strategy<Value = Test> {
    (
        prop_oneof![
            list(&METHOD_PATTERNS).prop_map(Field::Methods),
            list(&PATH_PATTERNS).prop_map(Field::Paths),
            list(&PORTS).prop_map(Field::Ports),
        ],
        proptest::bool::weighted(0.3),
    )
}

fn when_test() -> impl Strategy<Value = Test> {
    (
        prop_oneof![
            list(&PRINCIPAL_PATTERNS).prop_map(Field::Principals),
            list(&NAMESPACE_PATTERNS).prop_map(Field::Namespaces),
            list(&PORTS).prop_map(Field::Ports),
            list(&TOKEN_PATTERNS).prop_map(Field::Token),
            list(&IP_BLOCKS).prop_map(Field::IpBlocks),
        ],
        proptest::bool::weighted(0.3),
    )
}

/// 1..=3 tests with distinct YAML keys (a source or operation writes each field once).
fn group(test: impl Strategy<Value = Test>) -> impl Strategy<Value = Vec<Test>> {
    proptest::collection::vec(test, 1..4).prop_map(|tests| {
        let mut seen = Vec::new();
        tests
            .into_iter()
            .filter(|t| {
                let key = (std::mem::discriminant(&t.0), t.1);
                let fresh = !seen.contains(&key);
                seen.push(key);
                fresh
            })
            .collect()
    })
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        proptest::collection::vec(group(source_test()), 0..3),
        proptest::collection::vec(group(operation_test()), 0..3),
        proptest::collection::vec(when_test(), 0..3),
    )
        .prop_map(|(from, to, when)| Rule { from, to, when })
}

fn policies() -> impl Strategy<Value = Vec<Policy>> {
    let selector = prop_oneof![
        3 => Just(None),
        1 => Just(Some(vec![("app", "reviews")])),
        1 => Just(Some(vec![("app", "ratings")])),
        1 => Just(Some(vec![("app", "reviews"), ("version", "v1")])),
        1 => Just(Some(vec![("version", "v2")])),
    ];
    let action = prop_oneof![
        1 => Just(None),
        3 => Just(Some(Action::Allow)),
        3 => Just(Some(Action::Deny)),
        1 => Just(Some(Action::Audit)),
    ];
    let rules = prop_oneof![
        1 => Just(None),
        1 => Just(Some(Vec::new())),
        8 => proptest::collection::vec(rule(), 1..4).prop_map(Some),
    ];
    proptest::collection::vec(
        (
            prop_oneof![4 => Just(NAMESPACE), 2 => Just("istio-system"), 1 => Just("other")],
            selector,
            action,
            rules,
        ),
        0..9,
    )
    .prop_map(|ps| {
        ps.into_iter()
            .enumerate()
            .map(|(i, (namespace, selector, action, rules))| Policy {
                name: format!("p{i}"),
                namespace,
                selector,
                action,
                rules,
            })
            .collect()
    })
}

/// A flow-style YAML list of double-quoted strings (the pools hold no `"` or `\\`).
fn quoted(values: impl IntoIterator<Item = String>) -> String {
    let items: Vec<String> = values.into_iter().map(|v| format!("\"{v}\"")).collect();
    format!("[{}]", items.join(", "))
}

/// The key a field is written under in a source or operation, or in a `when` condition,
/// and its values.
fn field_yaml(field: &Field, when: bool) -> (&'static str, String) {
    let strs = |v: &[&str]| quoted(v.iter().map(|s| s.to_string()));
    match field {
        Field::Principals(v) => (
            if when {
                "source.principal"
            } else {
                "principals"
            },
            strs(v),
        ),
        Field::Namespaces(v) => (
            if when {
                "source.namespace"
            } else {
                "namespaces"
            },
            strs(v),
        ),
        Field::ServiceAccounts(v) => ("serviceAccounts", strs(v)),
        Field::IpBlocks(v) => (if when { "source.ip" } else { "ipBlocks" }, strs(v)),
        Field::Methods(v) => ("methods", strs(v)),
        Field::Paths(v) => ("paths", strs(v)),
        Field::Ports(v) => (
            if when { "destination.port" } else { "ports" },
            quoted(v.iter().map(u16::to_string)),
        ),
        Field::Token(v) => ("request.headers[x-token]", strs(v)),
    }
}

/// A source or operation: `{principals: [...], notMethods: [...]}`.
fn fields_yaml(tests: &[Test]) -> String {
    let entries: Vec<String> = tests
        .iter()
        .map(|(field, negate)| {
            let (key, values) = field_yaml(field, false);
            if *negate {
                format!(
                    "not{}{}: {values}",
                    key[..1].to_ascii_uppercase(),
                    &key[1..]
                )
            } else {
                format!("{key}: {values}")
            }
        })
        .collect();
    format!("{{{}}}", entries.join(", "))
}

fn rule_yaml(rule: &Rule) -> String {
    let mut parts = Vec::new();
    if !rule.from.is_empty() {
        let from: Vec<String> = rule
            .from
            .iter()
            .map(|s| format!("{{source: {}}}", fields_yaml(s)))
            .collect();
        parts.push(format!("from: [{}]", from.join(", ")));
    }
    if !rule.to.is_empty() {
        let to: Vec<String> = rule
            .to
            .iter()
            .map(|o| format!("{{operation: {}}}", fields_yaml(o)))
            .collect();
        parts.push(format!("to: [{}]", to.join(", ")));
    }
    if !rule.when.is_empty() {
        let when: Vec<String> = rule
            .when
            .iter()
            .map(|(field, negate)| {
                let (key, values) = field_yaml(field, true);
                let list = if *negate { "notValues" } else { "values" };
                format!("{{key: \"{key}\", {list}: {values}}}")
            })
            .collect();
        parts.push(format!("when: [{}]", when.join(", ")));
    }
    format!("{{{}}}", parts.join(", "))
}

fn yaml(policies: &[Policy]) -> String {
    let docs: Vec<String> = policies
        .iter()
        .map(|p| {
            let mut spec = Vec::new();
            if let Some(selector) = &p.selector {
                let labels: Vec<String> =
                    selector.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                spec.push(format!(
                    "  selector: {{matchLabels: {{{}}}}}",
                    labels.join(", ")
                ));
            }
            if let Some(action) = p.action {
                let action = match action {
                    Action::Allow => "ALLOW",
                    Action::Deny => "DENY",
                    Action::Audit => "AUDIT",
                };
                spec.push(format!("  action: {action}"));
            }
            if let Some(rules) = &p.rules {
                spec.push("  rules:".to_string());
                if rules.is_empty() {
                    spec.last_mut().unwrap().push_str(" []");
                }
                spec.extend(rules.iter().map(|r| format!("  - {}", rule_yaml(r))));
            }
            let spec = if spec.is_empty() {
                "spec: {}".to_string()
            } else {
                format!("spec:\n{}", spec.join("\n"))
            };
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                 metadata: {{name: {}, namespace: {}}}\n{spec}\n",
                p.name, p.namespace
            )
        })
        .collect();
    docs.join("---\n")
}

// ---------------------------------------------------------------------------------------
// The reference evaluator.

fn string_matches(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else {
        value == pattern
    }
}

fn path_matches(pattern: &str, path: &str) -> bool {
    if !pattern.contains("{*}") && !pattern.contains("{**}") {
        return string_matches(pattern, path);
    }
    let (Some(pattern), Some(path)) = (pattern.strip_prefix('/'), path.strip_prefix('/')) else {
        return false;
    };
    let want: Vec<&str> = pattern.split('/').collect();
    let have: Vec<&str> = path.split('/').collect();
    let rest = want.last() == Some(&"{**}");
    let fixed = if rest {
        &want[..want.len() - 1]
    } else {
        &want[..]
    };
    let length_ok = if rest {
        have.len() > fixed.len()
    } else {
        have.len() == fixed.len()
    };
    length_ok
        && fixed.iter().zip(&have).all(|(w, h)| match *w {
            "{*}" => !h.is_empty(),
            literal => literal == *h,
        })
}

fn in_block(block: &str, ip: IpAddr) -> bool {
    let (net, len) = block.split_once('/').unwrap_or((block, "32"));
    let (IpAddr::V4(net), IpAddr::V4(ip)) = (net.parse::<IpAddr>().unwrap(), ip) else {
        return false;
    };
    let len: u32 = len.parse().unwrap();
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(net) & mask == u32::from(ip) & mask
}

/// `(namespace, service account)` of an Istio-shaped principal.
fn istio_parts(principal: &str) -> Option<(&str, &str)> {
    let parts: Vec<&str> = principal.split('/').collect();
    match parts[..] {
        [_, "ns", ns, "sa", sa] => Some((ns, sa)),
        _ => None,
    }
}

/// Whether a field holds (before `not`), `None` when it is ignored (HTTP-only on TCP).
fn field_hits(field: &Field, req: &Req, http: bool) -> Option<bool> {
    if !http && field.http_only() {
        return None;
    }
    let peer = req.peer;
    Some(match field {
        Field::Principals(v) => peer.is_some_and(|p| v.iter().any(|pat| string_matches(pat, p))),
        Field::Namespaces(v) => peer
            .and_then(istio_parts)
            .is_some_and(|(ns, _)| v.iter().any(|pat| string_matches(pat, ns))),
        Field::ServiceAccounts(v) => peer
            .and_then(istio_parts)
            .is_some_and(|(ns, sa)| v.contains(&format!("{ns}/{sa}").as_str())),
        Field::IpBlocks(v) => v
            .iter()
            .any(|b| in_block(b, req.source_ip.parse().unwrap())),
        Field::Methods(v) => v.iter().any(|pat| string_matches(pat, req.method)),
        Field::Paths(v) => v.iter().any(|pat| path_matches(pat, req.path)),
        Field::Ports(v) => v.contains(&req.port),
        Field::Token(v) => {
            !req.token.is_empty() && {
                let joined = req.token.join(",");
                v.iter().any(|pat| string_matches(pat, &joined))
            }
        }
    })
}

fn tests_hold(tests: &[Test], req: &Req, http: bool) -> bool {
    tests
        .iter()
        .all(|(field, negate)| match field_hits(field, req, http) {
            None => true,
            Some(hit) => hit != *negate,
        })
}

fn rule_matches(rule: &Rule, action: Action, req: &Req, http: bool) -> bool {
    let tests = || rule.from.iter().chain(&rule.to).flatten().chain(&rule.when);
    if !http && action == Action::Allow && tests().any(|(f, _)| f.http_only()) {
        return false;
    }
    (rule.from.is_empty() || rule.from.iter().any(|s| tests_hold(s, req, http)))
        && (rule.to.is_empty() || rule.to.iter().any(|o| tests_hold(o, req, http)))
        && tests_hold(&rule.when, req, http)
}

fn policy_matches(p: &Policy, req: &Req, http: bool) -> bool {
    p.rules
        .iter()
        .flatten()
        .any(|r| rule_matches(r, p.action(), req, http))
}

fn reference(policies: &[Policy], req: &Req, http: bool) -> Decision {
    let applicable: Vec<&Policy> = policies.iter().filter(|p| p.applies()).collect();
    let first = |action: Action| {
        applicable
            .iter()
            .find(|p| p.action() == action && policy_matches(p, req, http))
            .map(|p| Arc::<str>::from(format!("{}/{}", p.namespace, p.name)))
    };
    let audited = first(Action::Audit).is_some();
    if let Some(policy) = first(Action::Deny) {
        return Decision {
            allowed: false,
            policy: Some(policy),
            audited,
        };
    }
    if !applicable.iter().any(|p| p.action() == Action::Allow) {
        return Decision {
            allowed: true,
            policy: None,
            audited,
        };
    }
    let policy = first(Action::Allow);
    Decision {
        allowed: policy.is_some(),
        policy,
        audited,
    }
}

// ---------------------------------------------------------------------------------------
// The library's entry points.

fn compile(policies: &[Policy]) -> AuthorizationPolicies {
    let text = yaml(policies);
    let config = load_sources(&[Source::new("authz.yaml", text.clone())])
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    AuthorizationPolicies::for_workload(
        &config,
        NAMESPACE,
        &workload_labels(),
        DEFAULT_ROOT_NAMESPACE,
    )
}

const DESTINATION_IP: &str = "10.1.0.9";

fn evaluate(p: &AuthorizationPolicies, req: &Req, http: bool) -> Decision {
    let peer = req.peer.map(|s| Identity::from_principal(s).unwrap());
    let mut headers = http::HeaderMap::new();
    for v in req.token {
        headers.append("x-token", v.parse().unwrap());
    }
    let source_ip = req.source_ip.parse().unwrap();
    let destination_ip = DESTINATION_IP.parse().unwrap();
    if !http {
        return p.check_connection(peer.as_ref(), source_ip, destination_ip, req.port);
    }
    p.evaluate(&AuthzRequest {
        peer: peer.as_ref(),
        source_ip,
        destination_ip,
        destination_port: req.port,
        http: Some(HttpAttributes {
            method: req.method,
            path: req.path,
            host: "reviews:9080",
            headers: &headers,
        }),
    })
}

/// The request through `AuthzLayer`, as the inbound listener runs it: the status, and the
/// decision a 403 carries.
fn through_layer(p: Arc<ArcSwap<AuthorizationPolicies>>, req: &Req) -> (u16, Option<Decision>) {
    let app = service_fn(|_req: http::Request<BoxBody>| async {
        Ok::<_, BoxError>(http::Response::new(body::empty()))
    });
    let svc = AuthzLayer::new(p)
        .with_destination_port(req.port)
        .layer(app);
    let mut r = http::Request::builder()
        .method(req.method)
        .uri(req.path)
        .header("host", "reviews:9080");
    for v in req.token {
        r = r.header("x-token", *v);
    }
    let mut r = r.body(body::empty()).unwrap();
    r.extensions_mut().insert(ClientInfo {
        remote: (req.source_ip.parse::<IpAddr>().unwrap(), 40000).into(),
        local: (DESTINATION_IP.parse::<IpAddr>().unwrap(), 15006).into(),
        tls: req.peer.is_some(),
    });
    if let Some(peer) = req.peer {
        r.extensions_mut()
            .insert(Identity::from_principal(peer).unwrap());
    }
    let response = futures::executor::block_on(svc.oneshot(r)).unwrap();
    (
        response.status().as_u16(),
        response.extensions().get::<Decision>().cloned(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// HTTP requests: `evaluate` decides as the reference, reporting the same policy.
    #[test]
    fn http_decisions_follow_istio(
        policies in policies(),
        requests in proptest::collection::vec(request(), 32),
    ) {
        let compiled = compile(&policies);
        prop_assert_eq!(compiled.len(), policies.iter().filter(|p| p.applies()).count());
        for req in &requests {
            let want = reference(&policies, req, true);
            let got = evaluate(&compiled, req, true);
            prop_assert_eq!(&got, &want, "{:?}\n{}", req, yaml(&policies));
        }
    }

    /// TCP connections: `check_connection` decides as the reference, with Istio's TCP
    /// rules for HTTP-only fields.
    #[test]
    fn tcp_decisions_follow_istio(
        policies in policies(),
        requests in proptest::collection::vec(request(), 32),
    ) {
        let compiled = compile(&policies);
        for req in &requests {
            let want = reference(&policies, req, false);
            let got = evaluate(&compiled, req, false);
            prop_assert_eq!(&got, &want, "{:?}\n{}", req, yaml(&policies));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Through `AuthzLayer`: a denied request is a 403 carrying the reference's decision;
    /// an allowed one reaches the app.
    #[test]
    fn the_layer_enforces_the_decision(
        policies in policies(),
        requests in proptest::collection::vec(request(), 8),
    ) {
        let compiled = Arc::new(ArcSwap::from_pointee(compile(&policies)));
        for req in &requests {
            let want = reference(&policies, req, true);
            let (status, decision) = through_layer(compiled.clone(), req);
            if want.allowed {
                prop_assert_eq!(status, 200, "{:?}\n{}", req, yaml(&policies));
            } else {
                prop_assert_eq!(status, 403, "{:?}\n{}", req, yaml(&policies));
                prop_assert_eq!(decision.as_ref(), Some(&want));
            }
        }
    }
}

/// The reference's string, path and CIDR forms on hand cases.
#[test]
fn reference_forms() {
    assert!(string_matches("*/sa/sleep", "td/ns/foo/sa/sleep"));
    assert!(string_matches("cluster.local/*", "cluster.local/x"));
    assert!(!string_matches(
        "cluster.local/*/sa/sleep",
        "cluster.local/ns/sa/sleep"
    ));
    assert!(path_matches("/files/{**}", "/files/"));
    assert!(path_matches("/files/{**}", "/files/a/b"));
    assert!(!path_matches("/files/{**}", "/files"));
    assert!(path_matches("/api/{*}/items", "/api/v1/items"));
    assert!(!path_matches("/{*}", "/"));
    assert!(!path_matches("/{*}/{**}", "/api"));
    assert!(path_matches("/{*}/{**}", "/api/"));
    assert!(in_block("10.0.0.0/8", "10.1.0.5".parse().unwrap()));
    assert!(!in_block("172.16.0.0/30", "172.16.0.5".parse().unwrap()));
    assert_eq!(istio_parts("td/ns/a/sa/b"), Some(("a", "b")));
    assert_eq!(istio_parts("td/workloads/batch"), None);
}
