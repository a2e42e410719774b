//! Rule semantics, precedence, selection and TCP handling, on policies written as YAML.

use std::net::IpAddr;

use mesh_core::config::{self, MeshConfig, Source};
use mesh_core::{Identity, Labels};

use super::*;

fn load(yaml: &str) -> MeshConfig {
    match config::load_sources(&[Source::new("authz.yaml", yaml)]) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

/// One policy document in namespace `foo`.
fn ap(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: foo}}\nspec:\n{spec}\n"
    )
}

fn policies(yaml: &str) -> AuthorizationPolicies {
    AuthorizationPolicies::compile(load(yaml).authorization_policies())
}

fn id(principal: &str) -> Identity {
    Identity::from_principal(principal).expect("principal")
}

/// A request builder with defaults: GET / from 10.0.0.1 to 10.0.0.2:8080, no peer.
#[derive(Clone)]
struct Req {
    peer: Option<Identity>,
    source: IpAddr,
    dest: IpAddr,
    port: u16,
    http: bool,
    method: &'static str,
    path: &'static str,
    host: &'static str,
    headers: http::HeaderMap,
}

impl Req {
    fn new() -> Req {
        Req {
            peer: None,
            source: "10.0.0.1".parse().expect("ip"),
            dest: "10.0.0.2".parse().expect("ip"),
            port: 8080,
            http: true,
            method: "GET",
            path: "/",
            host: "web.foo:8080",
            headers: http::HeaderMap::new(),
        }
    }
    fn peer(mut self, p: &str) -> Req {
        self.peer = Some(id(p));
        self
    }
    fn tcp(mut self) -> Req {
        self.http = false;
        self
    }
    fn method(mut self, m: &'static str) -> Req {
        self.method = m;
        self
    }
    fn path(mut self, p: &'static str) -> Req {
        self.path = p;
        self
    }
    fn host(mut self, h: &'static str) -> Req {
        self.host = h;
        self
    }
    fn port(mut self, p: u16) -> Req {
        self.port = p;
        self
    }
    fn source(mut self, ip: &str) -> Req {
        self.source = ip.parse().expect("ip");
        self
    }
    fn header(mut self, name: &'static str, value: &'static str) -> Req {
        self.headers
            .append(name, http::HeaderValue::from_static(value));
        self
    }
    fn decide(&self, p: &AuthorizationPolicies) -> Decision {
        p.evaluate(&AuthzRequest {
            peer: self.peer.as_ref(),
            source_ip: self.source,
            destination_ip: self.dest,
            destination_port: self.port,
            http: self.http.then_some(HttpAttributes {
                method: self.method,
                path: self.path,
                host: self.host,
                headers: &self.headers,
            }),
        })
    }
    fn allowed(&self, p: &AuthorizationPolicies) -> bool {
        self.decide(p).allowed
    }
}

const A: &str = "cluster.local/ns/foo/sa/a";
const B: &str = "cluster.local/ns/bar/sa/b";

#[test]
fn no_policies_allow_everything() {
    let p = policies("");
    assert!(p.is_empty());
    assert_eq!(p.len(), 0);
    let d = Req::new().decide(&p);
    assert_eq!(
        d,
        Decision {
            allowed: true,
            policy: None,
            audited: false
        }
    );
    assert!(Req::new().tcp().allowed(&p));
}

#[test]
fn allow_nothing_denies_everything_and_empty_deny_denies_nothing() {
    let p = policies(&ap("allow-nothing", "  {}"));
    assert_eq!(p.len(), 1);
    assert!(!Req::new().allowed(&p));
    assert!(!Req::new().peer(A).tcp().allowed(&p));
    assert_eq!(Req::new().decide(&p).policy, None);

    let p = policies(&ap("deny-nothing", "  action: DENY"));
    assert!(Req::new().allowed(&p));
    assert!(Req::new().tcp().allowed(&p));
}

#[test]
fn an_empty_rule_matches_everything() {
    let p = policies(&ap("allow-all", "  rules: [{}]"));
    assert!(Req::new().allowed(&p));
    assert!(Req::new().tcp().allowed(&p));
    assert_eq!(
        Req::new().decide(&p).policy.as_deref(),
        Some("foo/allow-all")
    );

    let p = policies(&ap("deny-all", "  action: DENY\n  rules: [{}]"));
    let d = Req::new().peer(A).decide(&p);
    assert!(!d.allowed);
    assert_eq!(d.policy.as_deref(), Some("foo/deny-all"));
}

#[test]
fn deny_wins_over_allow_and_allow_requires_a_match() {
    let yaml = [
        ap(
            "allow-get",
            "  rules: [{to: [{operation: {methods: [GET, HEAD]}}]}]",
        ),
        ap(
            "deny-admin",
            "  action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]",
        ),
    ]
    .concat();
    let p = policies(&yaml);
    assert!(Req::new().allowed(&p));
    assert!(Req::new().method("HEAD").allowed(&p));
    let d = Req::new().path("/admin/users").decide(&p);
    assert_eq!(
        (d.allowed, d.policy.as_deref()),
        (false, Some("foo/deny-admin"))
    );
    let d = Req::new().method("POST").decide(&p);
    assert_eq!((d.allowed, d.policy), (false, None));
    // Methods are case-sensitive, as Envoy's `:method` exact match.
    assert!(!Req::new().method("get").allowed(&p));
}

#[test]
fn audit_marks_but_never_decides() {
    let yaml = [
        ap(
            "audit-admin",
            "  action: AUDIT\n  rules: [{to: [{operation: {paths: [/admin]}}]}]",
        ),
        ap(
            "allow-b",
            &format!("  rules: [{{from: [{{source: {{principals: [\"{B}\"]}}}}]}}]"),
        ),
    ]
    .concat();
    let p = policies(&yaml);
    let d = Req::new().path("/admin").decide(&p);
    assert_eq!((d.allowed, d.audited), (false, true));
    let d = Req::new().peer(B).path("/admin").decide(&p);
    assert_eq!((d.allowed, d.audited), (true, true));
    let d = Req::new().peer(B).path("/").decide(&p);
    assert_eq!((d.allowed, d.audited), (true, false));
    // AUDIT alone: everything allowed.
    let p = policies(&ap("audit-all", "  action: AUDIT\n  rules: [{}]"));
    assert_eq!(
        Req::new().decide(&p),
        Decision {
            allowed: true,
            policy: None,
            audited: true
        }
    );
}

#[test]
fn principal_forms_and_missing_identity() {
    let allow = |principals: &str| {
        policies(&ap(
            "p",
            &format!("  rules: [{{from: [{{source: {{principals: {principals}}}}}]}}]"),
        ))
    };
    let p = allow("[\"cluster.local/ns/foo/sa/a\"]");
    assert!(Req::new().peer(A).allowed(&p));
    assert!(!Req::new().peer(B).allowed(&p));
    assert!(
        !Req::new().allowed(&p),
        "no identity fails a positive match"
    );

    let p = allow("[\"*\"]");
    assert!(Req::new().peer(B).allowed(&p));
    assert!(!Req::new().allowed(&p), "`*` means any authenticated peer");

    let p = allow("[\"cluster.local/ns/bar/*\"]");
    assert!(Req::new().peer(B).allowed(&p));
    assert!(!Req::new().peer(A).allowed(&p));

    let p = allow("[\"*/sa/a\"]");
    assert!(Req::new().peer(A).allowed(&p));
    assert!(!Req::new().peer(B).allowed(&p));
}

#[test]
fn not_principals_hold_without_identity() {
    let p = policies(&ap(
        "deny-not-a",
        &format!("  action: DENY\n  rules: [{{from: [{{source: {{notPrincipals: [\"{A}\"]}}}}]}}]"),
    ));
    assert!(Req::new().peer(A).allowed(&p));
    assert!(!Req::new().peer(B).allowed(&p));
    assert!(!Req::new().allowed(&p), "plain text is not A: denied");

    let p = policies(&ap(
        "allow-not-a",
        &format!("  rules: [{{from: [{{source: {{notPrincipals: [\"{A}\"]}}}}]}}]"),
    ));
    assert!(Req::new().allowed(&p));
    assert!(!Req::new().peer(A).allowed(&p));
}

#[test]
fn namespaces_and_service_accounts() {
    let p = policies(&ap(
        "ns",
        "  rules: [{from: [{source: {namespaces: [bar], notNamespaces: [\"ba*\"]}}, {source: {namespaces: [\"fo*\"]}}]}]",
    ));
    // First source: bar but not ba* → never; second: fo*.
    assert!(!Req::new().peer(B).allowed(&p));
    assert!(Req::new().peer(A).allowed(&p));
    assert!(!Req::new().allowed(&p));
    // A non-Istio identity has no namespace.
    let spire = Identity::parse("spiffe://cluster.local/foo/web").expect("id");
    let mut r = Req::new();
    r.peer = Some(spire);
    assert!(!r.allowed(&p));

    let p = policies(&ap(
        "sa",
        "  rules: [{from: [{source: {serviceAccounts: [foo/a]}}]}]",
    ));
    assert!(Req::new().peer(A).allowed(&p));
    assert!(Req::new().peer("other.domain/ns/foo/sa/a").allowed(&p));
    assert!(!Req::new().peer("cluster.local/ns/foo/sa/ab").allowed(&p));
    assert!(!Req::new().peer(B).allowed(&p));
    assert!(!Req::new().allowed(&p));
    let p = policies(&ap(
        "not-sa",
        "  rules: [{from: [{source: {notServiceAccounts: [foo/a]}}]}]",
    ));
    assert!(!Req::new().peer(A).allowed(&p));
    assert!(Req::new().peer(B).allowed(&p));
    assert!(Req::new().allowed(&p));
}

#[test]
fn ip_blocks_and_remote_ip_blocks() {
    let p = policies(&ap(
        "ip",
        "  rules: [{from: [{source: {ipBlocks: [10.0.0.0/16, 192.168.0.9], notIpBlocks: [10.0.5.0/24]}}]}]",
    ));
    assert!(Req::new().allowed(&p));
    assert!(Req::new().source("192.168.0.9").allowed(&p));
    assert!(!Req::new().source("10.0.5.1").allowed(&p));
    assert!(!Req::new().source("10.1.0.1").allowed(&p));
    assert!(Req::new().source("::ffff:10.0.1.1").allowed(&p));

    // remoteIpBlocks: the connection peer, not a client-supplied X-Forwarded-For.
    let p = policies(&ap(
        "remote",
        "  rules: [{from: [{source: {remoteIpBlocks: [10.0.0.1]}}]}]",
    ));
    assert!(Req::new().allowed(&p));
    assert!(
        !Req::new()
            .source("10.9.9.9")
            .header("x-forwarded-for", "10.0.0.1")
            .allowed(&p)
    );
}

#[test]
fn operation_fields() {
    let p = policies(&ap(
        "op",
        "  rules: [{to: [{operation: {hosts: [\"*.foo.svc.cluster.local\", web.foo], ports: [\"8080\"], notPaths: [\"/private*\"]}}]}]",
    ));
    assert!(Req::new().allowed(&p), "web.foo:8080 matches web.foo");
    assert!(!Req::new().host("foo.svc.cluster.local").allowed(&p));
    assert!(Req::new().host("WEB.svc.FOO.svc.cluster.local").allowed(&p));
    assert!(Req::new().host("Web.Foo.svc.cluster.local").allowed(&p));
    assert!(!Req::new().host("web.bar").allowed(&p));
    assert!(!Req::new().port(9090).allowed(&p));
    assert!(!Req::new().path("/private/x").allowed(&p));

    let p = policies(&ap(
        "not",
        "  rules: [{to: [{operation: {notHosts: [web.foo], notPorts: [\"9090\"], notMethods: [DELETE]}}]}]",
    ));
    assert!(!Req::new().allowed(&p));
    assert!(Req::new().host("other").allowed(&p));
    assert!(!Req::new().host("other").port(9090).allowed(&p));
    assert!(!Req::new().host("other").method("DELETE").allowed(&p));

    // `to` entries are ORed, fields within one ANDed.
    let p = policies(&ap(
        "or",
        "  rules: [{to: [{operation: {methods: [GET], paths: [/a]}}, {operation: {methods: [POST], paths: [/b]}}]}]",
    ));
    assert!(Req::new().path("/a").allowed(&p));
    assert!(Req::new().method("POST").path("/b").allowed(&p));
    assert!(!Req::new().method("POST").path("/a").allowed(&p));
}

#[test]
fn from_to_and_when_are_anded() {
    let p = policies(&ap(
        "all",
        &format!(
            "  rules:\n  - from: [{{source: {{principals: [\"{A}\"]}}}}]\n    to: [{{operation: {{paths: [/x]}}}}]\n    when: [{{key: \"request.headers[x-env]\", values: [prod]}}, {{key: source.ip, values: [10.0.0.0/8]}}]"
        ),
    ));
    let ok = Req::new().peer(A).path("/x").header("x-env", "prod");
    assert!(ok.allowed(&p));
    assert!(!ok.clone().peer(B).allowed(&p));
    assert!(!ok.clone().path("/y").allowed(&p));
    assert!(!ok.clone().source("11.0.0.1").allowed(&p));
    assert!(!Req::new().peer(A).path("/x").allowed(&p));
}

#[test]
fn conditions() {
    let when = |cond: &str| policies(&ap("w", &format!("  rules: [{{when: [{cond}]}}]")));

    let p = when("{key: \"request.headers[X-Token]\", values: [\"abc*\"], notValues: [abcd]}");
    assert!(Req::new().header("x-token", "abc1").allowed(&p));
    assert!(!Req::new().header("x-token", "abcd").allowed(&p));
    assert!(!Req::new().header("x-token", "xabc").allowed(&p));
    assert!(!Req::new().allowed(&p), "absent header fails values");
    // Several values are matched joined, as Envoy does.
    assert!(
        Req::new()
            .header("x-token", "abc1")
            .header("x-token", "z")
            .allowed(&p)
    );

    let p = when("{key: \"request.headers[x-token]\", notValues: [bad]}");
    assert!(Req::new().allowed(&p), "absent header: notValues holds");
    assert!(!Req::new().header("x-token", "bad").allowed(&p));

    let p = when("{key: \"request.headers[x-token]\", values: [\"*\"]}");
    assert!(
        Req::new().header("x-token", "").allowed(&p),
        "`*` is presence"
    );
    assert!(!Req::new().allowed(&p));

    let p = when(&format!("{{key: source.principal, values: [\"{A}\"]}}"));
    assert!(Req::new().peer(A).allowed(&p));
    assert!(!Req::new().peer(B).allowed(&p));
    assert!(!Req::new().allowed(&p));

    let p = when("{key: source.namespace, notValues: [bar]}");
    assert!(Req::new().peer(A).allowed(&p));
    assert!(!Req::new().peer(B).allowed(&p));
    assert!(Req::new().allowed(&p));

    let p = when("{key: destination.ip, values: [10.0.0.2/32]}");
    assert!(Req::new().allowed(&p));
    let mut r = Req::new();
    r.dest = "10.0.0.3".parse().expect("ip");
    assert!(!r.allowed(&p));

    let p = when("{key: destination.port, values: [\"8080\", \"8081\"]}");
    assert!(Req::new().port(8081).allowed(&p));
    assert!(!Req::new().port(8082).allowed(&p));

    let p = when("{key: remote.ip, notValues: [10.0.0.1]}");
    assert!(!Req::new().allowed(&p));
    assert!(Req::new().source("10.0.0.9").allowed(&p));
}

#[test]
fn tcp_allow_rules_with_http_fields_never_match() {
    let p = policies(&ap(
        "allow",
        &format!(
            "  rules:\n  - from: [{{source: {{principals: [\"{A}\"]}}}}]\n    to: [{{operation: {{methods: [GET]}}}}, {{operation: {{ports: [\"9000\"]}}}}]\n  - to: [{{operation: {{ports: [\"9001\"]}}}}]"
        ),
    ));
    // The first rule uses `methods` (even if only in one `to` entry): never for TCP.
    assert!(!Req::new().peer(A).port(9000).tcp().allowed(&p));
    assert!(
        Req::new().peer(A).port(9000).allowed(&p),
        "HTTP still matches"
    );
    // The second rule is TCP-clean.
    assert!(Req::new().port(9001).tcp().allowed(&p));
    assert!(!Req::new().port(9002).tcp().allowed(&p));
}

#[test]
fn tcp_deny_rules_ignore_http_fields() {
    let p = policies(&ap(
        "deny-get",
        "  action: DENY\n  rules: [{to: [{operation: {methods: [GET]}}]}]",
    ));
    assert!(
        !Req::new().tcp().allowed(&p),
        "methods ignored: the rule matches all TCP"
    );
    assert!(!Req::new().allowed(&p));
    assert!(Req::new().method("POST").allowed(&p));

    // The rest of the rule still decides.
    let p = policies(&ap(
        "deny",
        &format!(
            "  action: DENY\n  rules: [{{from: [{{source: {{principals: [\"{B}\"]}}}}], to: [{{operation: {{notPaths: [/public], ports: [\"9000\"]}}}}], when: [{{key: \"request.headers[x]\", values: [y]}}]}}]"
        ),
    ));
    assert!(!Req::new().peer(B).port(9000).tcp().allowed(&p));
    assert!(Req::new().peer(B).port(9001).tcp().allowed(&p));
    assert!(Req::new().peer(A).port(9000).tcp().allowed(&p));
    // Over HTTP, the header condition counts.
    assert!(Req::new().peer(B).port(9000).allowed(&p));
    assert!(!Req::new().peer(B).port(9000).header("x", "y").allowed(&p));
}

#[test]
fn check_connection_is_evaluate_without_http() {
    let p = policies(&ap(
        "tcp",
        "  rules: [{to: [{operation: {ports: [\"9000\"]}}]}]",
    ));
    let a = id(A);
    let src: IpAddr = "10.0.0.1".parse().expect("ip");
    let dst: IpAddr = "10.0.0.2".parse().expect("ip");
    assert!(p.check_connection(Some(&a), src, dst, 9000).allowed);
    assert!(!p.check_connection(None, src, dst, 9001).allowed);
}

#[test]
fn selection_follows_istio() {
    let doc = |name: &str, ns: &str, spec: &str| {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n"
        )
    };
    let yaml = [
        doc("mesh-deny", "istio-system", "  action: DENY\n  rules: [{to: [{operation: {paths: [/mesh]}}]}]"),
        doc("mesh-web", "istio-system", "  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules: [{to: [{operation: {paths: [/web]}}]}]"),
        doc("ns-wide", "foo", "  action: DENY\n  rules: [{to: [{operation: {paths: [/ns]}}]}]"),
        doc("ns-web", "foo", "  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules: [{to: [{operation: {paths: [/ns-web]}}]}]"),
        doc("ns-db", "foo", "  selector: {matchLabels: {app: db}}\n  action: DENY\n  rules: [{to: [{operation: {paths: [/ns-db]}}]}]"),
        doc("other-ns", "bar", "  action: DENY\n  rules: [{}]"),
        doc(
            "gateway",
            "foo",
            "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]\n  action: DENY\n  rules: [{}]",
        ),
    ]
    .concat();
    let config = load(&yaml);
    let web: Labels = [("app", "web"), ("version", "v1")].into_iter().collect();
    let p = AuthorizationPolicies::for_workload(&config, "foo", &web, "istio-system");
    assert_eq!(p.len(), 4, "{p:?}");
    for path in ["/mesh", "/web", "/ns", "/ns-web"] {
        assert!(!Req::new().path(path).allowed(&p), "{path}");
    }
    assert!(Req::new().path("/ns-db").allowed(&p));
    assert!(
        Req::new().path("/other").allowed(&p),
        "bar's and the gateway's deny-all do not apply"
    );

    // In another namespace: only the mesh-wide ones.
    let p = AuthorizationPolicies::for_workload(&config, "baz", &web, "istio-system");
    assert_eq!(p.len(), 2);
    // With another root namespace, istio-system is an ordinary namespace.
    let p = AuthorizationPolicies::for_workload(&config, "foo", &web, "mesh-root");
    assert_eq!(p.len(), 2);
}

#[test]
fn path_templates_in_policies() {
    let p = policies(&ap(
        "tpl",
        "  rules: [{to: [{operation: {paths: [\"/books/{*}/reviews\", \"/static/{**}\"]}}]}]",
    ));
    assert!(Req::new().path("/books/1/reviews").allowed(&p));
    assert!(!Req::new().path("/books/1/2/reviews").allowed(&p));
    assert!(Req::new().path("/static/css/a.css").allowed(&p));
    assert!(!Req::new().path("/books").allowed(&p));
}

// The principal index (`index.rs`): it only narrows which policies are checked, so every
// decision below must be the one a scan of all policies in config order gives.

/// Decides with the index, and asserts the scan without it agrees on every action.
fn decide_checked(p: &AuthorizationPolicies, r: &Req) -> Decision {
    let req = AuthzRequest {
        peer: r.peer.as_ref(),
        source_ip: r.source,
        destination_ip: r.dest,
        destination_port: r.port,
        http: r.http.then_some(HttpAttributes {
            method: r.method,
            path: r.path,
            host: r.host,
            headers: &r.headers,
        }),
    };
    let peer = Peer::new(req.peer);
    for (set, allow) in [(&p.deny, false), (&p.allow, true), (&p.audit, false)] {
        let indexed = set.first_match(&req, &peer, allow).map(|c| c.name.clone());
        let scanned = set
            .scan_first_match(&req, &peer, allow)
            .map(|c| c.name.clone());
        assert_eq!(indexed, scanned, "peer {:?}", r.peer);
    }
    p.evaluate(&req)
}

fn allow_from(name: &str, principals: &str, rest: &str) -> String {
    ap(
        name,
        &format!("  rules: [{{from: [{{source: {{principals: {principals}}}}}]{rest}}}]"),
    )
}

#[test]
fn index_keeps_config_order_across_gated_and_ungated_policies() {
    let yaml = [
        // Ungated (no principal), but only for /open.
        ap("open", "  rules: [{to: [{operation: {paths: [/open]}}]}]"),
        allow_from(
            "suffix-a",
            "[\"*/sa/a\"]",
            ", to: [{operation: {paths: [/a]}}]",
        ),
        allow_from("exact-a", &format!("[\"{A}\"]"), ""),
        allow_from("prefix-foo", "[\"cluster.local/ns/foo/*\"]", ""),
        allow_from("any", "[\"*\"]", ""),
        // Ungated, matches everything: reported only when nothing earlier matches.
        ap("last", "  rules: [{}]"),
    ]
    .concat();
    let p = policies(&yaml);
    assert_eq!(p.allow.ungated_len(), 2);
    let by = |r: Req| decide_checked(&p, &r).policy;
    assert_eq!(
        by(Req::new().peer(A).path("/open")).as_deref(),
        Some("foo/open")
    );
    assert_eq!(
        by(Req::new().peer(A).path("/a")).as_deref(),
        Some("foo/suffix-a")
    );
    assert_eq!(by(Req::new().peer(A)).as_deref(), Some("foo/exact-a"));
    assert_eq!(
        by(Req::new().peer("cluster.local/ns/foo/sa/c")).as_deref(),
        Some("foo/prefix-foo")
    );
    assert_eq!(by(Req::new().peer(B)).as_deref(), Some("foo/any"));
    assert_eq!(
        by(Req::new()).as_deref(),
        Some("foo/last"),
        "no peer: ungated only"
    );
    assert_eq!(by(Req::new().path("/open")).as_deref(), Some("foo/open"));
}

#[test]
fn index_not_principals_and_mixed_rules_stay_ungated() {
    let yaml = [
        ap(
            "not-a",
            &format!("  rules: [{{from: [{{source: {{notPrincipals: [\"{A}\"]}}}}]}}]"),
        ),
        // principals in one `from` entry only: the other entry matches any peer.
        ap(
            "one-source",
            &format!(
                "  rules: [{{from: [{{source: {{principals: [\"{A}\"]}}}}, {{source: {{ipBlocks: [10.0.0.9]}}}}]}}]"
            ),
        ),
        // A gated rule and an ungated one.
        ap(
            "two-rules",
            &format!(
                "  rules: [{{from: [{{source: {{principals: [\"{A}\"]}}}}]}}, {{to: [{{operation: {{paths: [/two]}}}}]}}]"
            ),
        ),
        // principals and notPrincipals together: gated by the positive list.
        ap(
            "both",
            "  rules: [{from: [{source: {principals: [\"cluster.local/*\"], notPrincipals: [\"*/sa/a\"]}}]}]",
        ),
    ]
    .concat();
    let p = policies(&yaml);
    assert_eq!(p.allow.ungated_len(), 3);
    let by = |r: Req| decide_checked(&p, &r).policy;
    assert_eq!(by(Req::new()).as_deref(), Some("foo/not-a"));
    assert_eq!(by(Req::new().peer(B)).as_deref(), Some("foo/not-a"));
    assert_eq!(
        by(Req::new().peer(A).source("10.0.0.9")).as_deref(),
        Some("foo/one-source")
    );
    assert_eq!(
        by(Req::new().peer(A).path("/two")).as_deref(),
        Some("foo/one-source")
    );
    // No peer: `notPrincipals` holds, and `not-a` comes first.
    assert_eq!(by(Req::new().path("/two")).as_deref(), Some("foo/not-a"));
    assert_eq!(
        by(Req::new().source("10.0.0.9")).as_deref(),
        Some("foo/not-a")
    );
    let p = policies(&yaml.replace("name: not-a,", "name: not-a-off,").replace(
        &format!("notPrincipals: [\"{A}\"]"),
        "notPrincipals: [\"*\"], principals: [\"none/*\"]",
    ));
    assert_eq!(p.allow.ungated_len(), 2);
    assert_eq!(
        by_name(&p, Req::new().peer("cluster.local/ns/x/sa/a")),
        None,
        "excluded by `both`'s notPrincipals"
    );
    assert_eq!(
        by_name(&p, Req::new().path("/two")).as_deref(),
        Some("foo/two-rules")
    );
    assert_eq!(
        by_name(&p, Req::new().source("10.0.0.9")).as_deref(),
        Some("foo/one-source")
    );
    assert_eq!(
        by_name(&p, Req::new().peer("cluster.local/ns/x/sa/b")).as_deref(),
        Some("foo/both")
    );
}

fn by_name(p: &AuthorizationPolicies, r: Req) -> Option<Arc<str>> {
    decide_checked(p, &r).policy
}

#[test]
fn index_wildcards_prefixes_and_suffixes_of_many_lengths() {
    let yaml = [
        allow_from("star", "[\"*\"]", ", to: [{operation: {paths: [/star]}}]"),
        allow_from(
            "short-prefix",
            "[\"c*\"]",
            ", to: [{operation: {paths: [/c]}}]",
        ),
        allow_from(
            "long-prefix",
            "[\"cluster.local/ns/foo/sa/a-very-long-name*\"]",
            "",
        ),
        allow_from("short-suffix", "[\"*b\"]", ""),
        allow_from("long-suffix", "[\"*x.cluster.local/ns/foo/sa/a\"]", ""),
        // A `*` in the middle is literal: exact.
        allow_from("middle", "[\"cluster.local/ns/*/sa/a\"]", ""),
        allow_from("same-twice", &format!("[\"{A}\", \"{A}\", \"*/sa/a\"]"), ""),
    ]
    .concat();
    let p = policies(&yaml);
    assert_eq!(p.allow.ungated_len(), 0);
    let by = |r: Req| by_name(&p, r);
    assert_eq!(
        by(Req::new().peer(A).path("/star")).as_deref(),
        Some("foo/star")
    );
    assert_eq!(
        by(Req::new().peer("x/y").path("/star")).as_deref(),
        Some("foo/star")
    );
    assert_eq!(by(Req::new().path("/star")), None, "`*` needs a peer");
    assert_eq!(
        by(Req::new().peer(A).path("/c")).as_deref(),
        Some("foo/short-prefix")
    );
    assert_eq!(
        by(Req::new().peer("cluster.local/ns/foo/sa/a-very-long-name-2")).as_deref(),
        Some("foo/long-prefix")
    );
    assert_eq!(by(Req::new().peer(B)).as_deref(), Some("foo/short-suffix"));
    assert_eq!(
        by(Req::new().peer("y.cluster.local/ns/foo/sa/a")).as_deref(),
        Some("foo/same-twice"),
        "long-suffix needs its first byte too"
    );
    assert_eq!(
        by(Req::new().peer("x.cluster.local/ns/foo/sa/a")).as_deref(),
        Some("foo/long-suffix")
    );
    assert_eq!(
        by(Req::new().peer("xx.cluster.local/ns/foo/sa/a")).as_deref(),
        Some("foo/long-suffix")
    );
    assert_eq!(by(Req::new().peer(A)).as_deref(), Some("foo/same-twice"));
    assert_eq!(by(Req::new().peer("cluster.local/ns/foo/sa/c")), None);
    // Shorter than every prefix and suffix.
    assert_eq!(by(Req::new().peer("d")), None);
    assert_eq!(by(Req::new().peer("c")), None, "c* needs /c");
    assert_eq!(
        by(Req::new().peer("c").path("/c")).as_deref(),
        Some("foo/short-prefix")
    );
}

#[test]
fn index_deny_still_wins_and_audit_still_marks() {
    let yaml = [
        allow_from("allow-a", &format!("[\"{A}\"]"), ""),
        allow_from("allow-any", "[\"*\"]", ""),
        ap(
            "deny-ns-foo",
            "  action: DENY\n  rules: [{from: [{source: {principals: [\"cluster.local/ns/foo/*\"]}}], to: [{operation: {paths: [\"/admin*\"]}}]}]",
        ),
        ap(
            "deny-by-condition",
            &format!(
                "  action: DENY\n  rules: [{{when: [{{key: source.principal, values: [\"{B}\"]}}]}}]"
            ),
        ),
        ap(
            "audit-a",
            &format!("  action: AUDIT\n  rules: [{{from: [{{source: {{principals: [\"{A}\"]}}}}]}}]"),
        ),
    ]
    .concat();
    let p = policies(&yaml);
    assert_eq!(p.deny.ungated_len(), 0);
    let d = decide_checked(&p, &Req::new().peer(A).path("/admin/x"));
    assert_eq!(
        (d.allowed, d.policy.as_deref(), d.audited),
        (false, Some("foo/deny-ns-foo"), true)
    );
    let d = decide_checked(&p, &Req::new().peer(A));
    assert_eq!(
        (d.allowed, d.policy.as_deref(), d.audited),
        (true, Some("foo/allow-a"), true)
    );
    let d = decide_checked(&p, &Req::new().peer(B));
    assert_eq!(
        (d.allowed, d.policy.as_deref(), d.audited),
        (false, Some("foo/deny-by-condition"), false)
    );
    let d = decide_checked(&p, &Req::new().peer("cluster.local/ns/bar/sa/c").tcp());
    assert_eq!(
        (d.allowed, d.policy.as_deref()),
        (true, Some("foo/allow-any"))
    );
    let d = decide_checked(&p, &Req::new());
    assert_eq!((d.allowed, d.policy, d.audited), (false, None, false));
}

/// Every combination of a set of policies and a set of peers and requests decides as the
/// scan of all policies does (`decide_checked` asserts it for every action).
#[test]
fn index_agrees_with_a_full_scan() {
    let patterns = [
        "*",
        A,
        B,
        "cluster.local/*",
        "cluster.local/ns/foo/*",
        "cluster.local/ns/foo/sa/*",
        "*/sa/a",
        "*/sa/b",
        "*a",
        "other.domain/ns/foo/sa/a",
    ];
    let mut yaml = String::new();
    for (i, pattern) in patterns.iter().enumerate() {
        for (j, action) in ["ALLOW", "DENY", "AUDIT"].iter().enumerate() {
            let path = ["/x", "/y", "/admin"][(i + j) % 3];
            yaml.push_str(&ap(
                &format!("{action}-{i}-from").to_lowercase(),
                &format!(
                    "  action: {action}\n  rules: [{{from: [{{source: {{principals: [\"{pattern}\"]}}}}], to: [{{operation: {{paths: [{path}]}}}}]}}]"
                ),
            ));
            yaml.push_str(&ap(
                &format!("{action}-{i}-when").to_lowercase(),
                &format!(
                    "  action: {action}\n  rules: [{{when: [{{key: source.principal, values: [\"{pattern}\"]}}, {{key: destination.port, values: [\"{}\"]}}]}}]",
                    9000 + i
                ),
            ));
            yaml.push_str(&ap(
                &format!("{action}-{i}-not").to_lowercase(),
                &format!(
                    "  action: {action}\n  rules: [{{from: [{{source: {{notPrincipals: [\"{pattern}\"]}}}}], to: [{{operation: {{ports: [\"{}\"]}}}}]}}]",
                    9100 + i
                ),
            ));
        }
    }
    let p = policies(&yaml);
    assert_eq!(p.len(), patterns.len() * 9);
    let peers = [
        None,
        Some(A),
        Some(B),
        Some("other.domain/ns/foo/sa/a"),
        Some("cluster.local/ns/baz/sa/qa"),
        Some("x"),
    ];
    let mut decisions = std::collections::HashSet::new();
    for peer in peers {
        for path in ["/x", "/y", "/admin", "/z"] {
            for port in [8080, 9000, 9003, 9100, 9106] {
                for tcp in [false, true] {
                    let mut r = Req::new().path(path).port(port);
                    if let Some(peer) = peer {
                        r = r.peer(peer);
                    }
                    if tcp {
                        r = r.tcp();
                    }
                    let d = decide_checked(&p, &r);
                    decisions.insert((d.allowed, d.policy, d.audited));
                }
            }
        }
    }
    // The cases reach many different deciding policies, allowed and denied.
    assert!(decisions.len() >= 10, "{}", decisions.len());
}
