//! Bad configurations are rejected with errors that name the file, document, field path and
//! line, and every error of every file is reported at once.

use std::path::PathBuf;

use mesh_core::config::{self, ConfigError, ConfigErrors, Source};

fn errors(sources: &[(&str, &str)]) -> ConfigErrors {
    let sources: Vec<Source> = sources.iter().map(|(n, t)| Source::new(*n, *t)).collect();
    match config::load_sources(&sources) {
        Ok(_) => panic!("expected errors"),
        Err(errors) => errors,
    }
}

/// The only error of a one-document YAML text.
fn single(text: &str) -> ConfigError {
    let errors = errors(&[("test.yaml", text)]);
    assert_eq!(errors.len(), 1, "expected one error, got:\n{errors}");
    errors.0.into_iter().next().expect("one error")
}

const VS_HEAD: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
";

#[test]
fn misspelled_field_names_file_document_path_and_line() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/misspelled.yaml");
    let errors = match config::load_files(&[&path]) {
        Ok(_) => panic!("a misspelled field must be rejected"),
        Err(errors) => errors,
    };
    eprintln!("{errors}");
    let [error] = errors.errors() else {
        panic!("one error:\n{errors}")
    };
    assert_eq!(error.file, path.display().to_string());
    assert_eq!(error.document, Some(2));
    assert_eq!(error.resource.as_deref(), Some("VirtualService reviews"));
    assert_eq!(
        error.path.as_deref(),
        Some("spec.http[0].route[0].destination.hots")
    );
    assert_eq!((error.line, error.column), (Some(18), Some(9)));
    assert!(
        error.message.contains("unknown field `hots`"),
        "{}",
        error.message
    );
    assert!(
        error.message.contains("host"),
        "lists the expected fields: {}",
        error.message
    );
    let line = error.to_string();
    assert!(
        line.ends_with(&format!(
            "misspelled.yaml: document 2 (VirtualService reviews): \
             spec.http[0].route[0].destination.hots: {} at line 18 column 9",
            error.message
        )),
        "{line}"
    );
}

#[test]
fn unknown_kind_and_api_version() {
    let e =
        single("apiVersion: networking.istio.io/v1\nkind: VirtualServis\nmetadata: {name: x}\n");
    assert_eq!(e.path.as_deref(), Some("kind"));
    assert_eq!(e.line, Some(2));
    assert!(
        e.message.contains("unknown kind `VirtualServis`"),
        "{}",
        e.message
    );

    let e = single("apiVersion: networking.istio.io/v2\nkind: Gateway\nmetadata: {name: x}\n");
    assert_eq!((e.path.as_deref(), e.line), (Some("apiVersion"), Some(1)));
    assert!(
        e.message.contains("networking.istio.io/v1beta1"),
        "{}",
        e.message
    );

    let e = single("apiVersion: security.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\n");
    assert_eq!(e.path.as_deref(), Some("apiVersion"));

    let e = single("kind: Gateway\nmetadata: {name: x}\n");
    assert!(e.message.contains("apiVersion"), "{}", e.message);
}

#[test]
fn bad_duration_has_path_and_line() {
    let e = single(&format!(
        "{VS_HEAD}  - route: [{{destination: {{host: reviews}}}}]\n    timeout: 5x\n"
    ));
    assert_eq!(e.path.as_deref(), Some("spec.http[0].timeout"));
    assert_eq!(e.line, Some(9));
    assert!(e.message.contains("invalid duration `5x`"), "{}", e.message);
}

#[test]
fn bad_regex_is_rejected_at_load() {
    let e = single(&format!(
        "{VS_HEAD}  - match:\n    - uri: {{regex: \"/api/(v1\"}}\n    route: [{{destination: {{host: reviews}}}}]\n"
    ));
    assert_eq!(e.path.as_deref(), Some("spec.http[0].match[0].uri"));
    assert_eq!(e.line, Some(9));
    assert!(
        e.message.contains("invalid regex `/api/(v1`"),
        "{}",
        e.message
    );
}

#[test]
fn weights_must_sum_to_100() {
    let e = single(&format!(
        "{VS_HEAD}  - route:\n    - destination: {{host: reviews, subset: v1}}\n      weight: 90\n    - destination: {{host: reviews, subset: v2}}\n      weight: 20\n"
    ));
    assert_eq!(e.path.as_deref(), Some("spec.http[0].route"));
    assert_eq!(e.line, Some(8), "points at the `route:` key");
    assert!(e.message.contains("sum to 110"), "{}", e.message);

    let e = single(&format!(
        "{VS_HEAD}  - route:\n    - destination: {{host: reviews}}\n      weight: 101\n"
    ));
    assert_eq!(e.path.as_deref(), Some("spec.http[0].route[0].weight"));
    assert_eq!(e.line, Some(10));
}

#[test]
fn custom_authorization_is_rejected() {
    let e = single(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: foo}
spec:
  action: CUSTOM
  provider: {name: my-ext-authz}
  rules: [{}]
",
    );
    assert_eq!(
        e.message,
        "CUSTOM authorization (ext-authz) is not supported"
    );
    assert_eq!((e.path.as_deref(), e.line), (Some("spec.action"), Some(5)));
    assert_eq!(e.resource.as_deref(), Some("AuthorizationPolicy ext"));
}

#[test]
fn duplicate_names_are_rejected() {
    let vs = format!("{VS_HEAD}  - route: [{{destination: {{host: reviews}}}}]\n");
    let errors = errors(&[("a.yaml", &vs), ("b.yaml", &vs)]);
    let [e] = errors.errors() else {
        panic!("one error:\n{errors}")
    };
    assert_eq!((e.file.as_str(), e.document), ("b.yaml", Some(1)));
    assert_eq!(e.path.as_deref(), Some("metadata.name"));
    assert_eq!(e.line, Some(4));
    assert!(
        e.message.contains(
            "duplicate VirtualService default/reviews: already defined in a.yaml document 1"
        ),
        "{}",
        e.message
    );
    // The same name in another namespace, or of another kind, is fine.
    let other_ns = vs.replace("name: reviews", "name: reviews\n  namespace: prod");
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\nspec: {host: reviews}\n";
    let sources = [
        Source::new("a", vs.as_str()),
        Source::new("b", other_ns),
        Source::new("c", dr),
    ];
    config::load_sources(&sources).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn at_most_one_bootstrap() {
    let bootstrap = "apiVersion: mesh-proxy/v1\nkind: Bootstrap\nmetadata: {name: NAME}\nspec:\n  workload: {name: w}\n";
    let errors = errors(&[
        ("one.yaml", &bootstrap.replace("NAME", "a")),
        ("two.yaml", &bootstrap.replace("NAME", "b")),
    ]);
    let [e] = errors.errors() else {
        panic!("one error:\n{errors}")
    };
    assert_eq!(e.file, "two.yaml");
    assert!(
        e.message
            .contains("a second Bootstrap (the first is in one.yaml document 1)"),
        "{}",
        e.message
    );
}

#[test]
fn all_errors_of_all_files_are_reported() {
    let bad_vs =
        format!("{VS_HEAD}  - route: [{{destination: {{host: reviews}}}}]\n    timeout: nope\n");
    let text = format!(
        "{bad_vs}---\n# an empty document counts\n---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  servers:\n  - port: {{number: 70000, name: http, protocol: HTTP}}\n    hosts: ['*']\n"
    );
    let errors = errors(&[
        ("first.yaml", &text),
        (
            "second.yaml",
            "apiVersion: networking.istio.io/v1\nkind: Nope\n",
        ),
        ("third.yaml", "a: [unclosed\n"),
    ]);
    let summary: Vec<_> = errors
        .iter()
        .map(|e| (e.file.as_str(), e.document, e.path.as_deref(), e.line))
        .collect();
    assert_eq!(
        summary[..3],
        [
            ("first.yaml", Some(1), Some("spec.http[0].timeout"), Some(9)),
            (
                "first.yaml",
                Some(3),
                Some("spec.servers[0].port.number"),
                Some(18)
            ),
            ("second.yaml", Some(1), Some("kind"), Some(2)),
        ],
        "{errors}"
    );
    let syntax = &errors.errors()[3];
    assert_eq!(
        (syntax.file.as_str(), syntax.document),
        ("third.yaml", Some(1))
    );
    assert!(
        syntax.line.is_some(),
        "syntax errors have a position: {syntax}"
    );
    assert_eq!(errors.len(), 4, "{errors}");
    assert_eq!(errors.to_string().lines().count(), 4, "one line per error");
    assert!(
        errors.errors()[1]
            .message
            .contains("70000 is not in 1..=65535"),
        "{errors}"
    );
}

#[test]
fn unreadable_files_are_reported_with_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("bad.yaml");
    std::fs::write(&good, "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec: {servers: []}\n")
        .expect("write");
    let missing = dir.path().join("missing.yaml");
    let errors = match config::load_files(&[&missing, &good]) {
        Ok(_) => panic!("expected errors"),
        Err(e) => e,
    };
    assert_eq!(errors.len(), 2, "{errors}");
    assert_eq!(errors.errors()[0].file, missing.display().to_string());
    assert!(errors.errors()[0].message.starts_with("cannot read"));
    assert_eq!(errors.errors()[1].path.as_deref(), Some("spec.servers"));
}

#[test]
fn semantic_rules() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se}\nspec:\n  hosts: [db]\n  ports: [{number: 5432, name: pg}]\n  resolution: STATIC\n  endpoints: [{address: db.example.com}]\n",
            "spec.endpoints[0].address",
            "is not an IP address",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se}\nspec:\n  hosts: [db]\n  ports: [{number: 5432, name: pg}]\n  resolution: STATIC\n  endpoints: [{address: 10.0.0.1, ports: {postgres: 5433}}]\n",
            "spec.endpoints[0].ports.postgres",
            "`postgres` is not a port name of this ServiceEntry (its ports: pg)",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se}\nspec:\n  hosts: [db]\n  ports: [{number: 5432, name: pg}]\n  resolution: STATIC\n",
            "spec.endpoints",
            "needs endpoints or a workloadSelector",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se}\nspec:\n  hosts: []\n  ports: [{number: 5432, name: pg}]\n",
            "spec.hosts",
            "at least one host",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\nspec:\n  http: [{route: [{destination: {host: a}}]}]\n",
            "spec.hosts",
            "at least one host is required",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\nspec:\n  hosts: [a]\n  http: [{match: [{uri: {prefix: /}}]}]\n",
            "spec.http[0]",
            "one of route, redirect, directResponse, delegate is required",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\nspec:\n  hosts: [a]\n  http:\n  - route: [{destination: {host: a}}]\n    fault: {delay: {fixedDelay: 1s, percentage: {value: 120}}}\n",
            "spec.http[0].fault.delay.percentage",
            "percentage 120 is not in 0..=100",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\nspec:\n  hosts: [a]\n  http:\n  - route: [{destination: {host: a}}]\n    match: [{headers: {X-User: {exact: j}}}]\n",
            "spec.http[0].match[0].headers.X-User",
            "must be lower-case",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: dr}\nspec:\n  host: a\n  subsets: [{name: v1}, {name: v1}]\n",
            "spec.subsets[1].name",
            "duplicate subset `v1`",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: dr}\nspec:\n  host: a\n  trafficPolicy: {outlierDetection: {interval: 0s}}\n",
            "spec.trafficPolicy.outlierDetection.interval",
            "greater than 0",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: pa}\nspec:\n  mtls: {mode: STRICTER}\n",
            "spec.mtls.mode",
            "unknown variant `STRICTER`",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ap}\nspec:\n  rules: [{from: [{source: {ipBlocks: [10.0.0.0/40]}}]}]\n",
            "spec.rules[0].from[0].source.ipBlocks[0]",
            "not an IP address or CIDR",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: \"\"}\nspec: {servers: [{port: {number: 80}, hosts: [a]}]}\n",
            "metadata.name",
            "name is required",
        ),
    ];
    for (text, path, message) in cases {
        let e = single(text);
        assert_eq!(e.path.as_deref(), Some(*path), "{e}");
        assert!(e.message.contains(message), "expected `{message}` in: {e}");
        assert!(e.line.is_some(), "no line: {e}");
    }
}

#[test]
fn a_document_must_be_a_resource_mapping() {
    for text in ["- a\n- b\n", "just text\n"] {
        let e = single(text);
        assert!(e.message.contains("mapping"), "{e}");
        assert_eq!((e.document, e.line), (Some(1), Some(1)), "{e}");
    }
}

#[test]
fn routing_rules_are_checked() {
    // Each: one HTTP route (under `VS_HEAD`), the field path of the error, part of its message.
    let cases: &[(&str, &str, &str)] = &[
        (
            "  - route: [{destination: {host: reviews}}]\n    retries: {attempts: 3, retryOn: '5xx,sometimes'}\n",
            "spec.http[0].retries.retryOn",
            "unknown retryOn condition \"sometimes\"",
        ),
        (
            "  - route: [{destination: {host: reviews}}]\n    redirect: {uri: /x}\n",
            "spec.http[0]",
            "route and redirect are mutually exclusive",
        ),
        (
            "  - directResponse: {status: 200}\n    route: [{destination: {host: reviews}}]\n",
            "spec.http[0]",
            "route and directResponse are mutually exclusive",
        ),
        (
            "  - redirect: {uri: /x}\n    rewrite: {uri: /y}\n",
            "spec.http[0].rewrite",
            "rewrite cannot be used with redirect",
        ),
        (
            "  - directResponse: {status: 200}\n    mirror: {host: shadow}\n",
            "spec.http[0].mirror",
            "mirror cannot be used with directResponse",
        ),
        (
            "  - route: [{destination: {host: reviews}}]\n    mirrorPercentage: {value: 50}\n",
            "spec.http[0].mirrorPercentage",
            "mirrorPercentage applies to `mirror`, which is not set",
        ),
        (
            "  - route: [{destination: {host: reviews}}]\n    mirror: {host: shadow}\n    mirrorPercent: 150\n",
            "spec.http[0].mirrorPercent",
            "percentage 150 is not in 0..=100",
        ),
        (
            "  - route: [{destination: {host: reviews}}]\n    mirrors: [{destination: {host: shadow}, percentage: {value: 101}}]\n",
            "spec.http[0].mirrors[0].percentage",
            "percentage 101 is not in 0..=100",
        ),
        (
            "  - route: [{destination: {host: reviews}}]\n    fault: {abort: {grpcStatus: BROKEN}}\n",
            "spec.http[0].fault.abort.grpcStatus",
            "unknown gRPC status `BROKEN`",
        ),
        (
            "  - route: [{destination: {host: reviews}}]\n    fault: {delay: {exponentialDelay: 1s}}\n",
            "spec.http[0].fault.delay.exponentialDelay",
            "exponentialDelay is not supported",
        ),
        (
            "  - route: [{destination: {host: reviews}}]\n    redirect: {uri: /x, redirectCode: 300}\n",
            "spec.http[0]",
            "mutually exclusive",
        ),
        (
            "  - redirect: {uri: /x, redirectCode: 305}\n",
            "spec.http[0].redirect.redirectCode",
            "redirect code 305 is not supported",
        ),
        (
            "  - redirect: {uri: /x, port: 8080, derivePort: FROM_REQUEST_PORT}\n",
            "spec.http[0].redirect",
            "port and derivePort are mutually exclusive",
        ),
        (
            "  - route: [{destination: {host: reviews}}]\n    rewrite: {uri: '/a b'}\n",
            "spec.http[0].rewrite.uri",
            "is not a valid URI path",
        ),
        (
            "  - route: [{destination: {host: reviews}}]\n    rewrite: {authority: 'bad host'}\n",
            "spec.http[0].rewrite.authority",
            "is not a valid authority",
        ),
        (
            "  - route: [{destination: {host: reviews}}]\n    headers: {request: {set: {'bad header': x}}}\n",
            "spec.http[0].headers.request.set.bad header",
            "is not a valid HTTP header name",
        ),
        (
            "  - route:\n    - destination: {host: reviews}\n      headers: {response: {add: {x-a: \"line\\nbreak\"}}}\n",
            "spec.http[0].route[0].headers.response.add.x-a",
            "is not a valid HTTP header value",
        ),
        (
            "  - route: [{destination: {host: reviews}}]\n    headers: {request: {set: {':path': /x}}}\n",
            "spec.http[0].headers.request.set.:path",
            "cannot be set with a header operation",
        ),
        (
            "  - route: [{destination: {host: reviews}}]\n    corsPolicy: {allowMethods: ['GET, POST']}\n",
            "spec.http[0].corsPolicy.allowMethods[0]",
            "no commas",
        ),
        (
            "  - route: [{destination: {host: reviews}}]\n    match: [{headers: {'@request.auth.claims.group': {exact: a}}}]\n",
            "spec.http[0].match[0].headers.@request.auth.claims.group",
            "needs RequestAuthentication",
        ),
    ];
    for (route, path, message) in cases {
        let text = format!("{VS_HEAD}{route}");
        let errors = errors(&[("test.yaml", &text)]);
        let found = errors
            .iter()
            .find(|e| e.path.as_deref() == Some(*path) && e.message.contains(message));
        let Some(e) = found else {
            panic!("expected `{message}` at {path}, got:\n{errors}")
        };
        assert_eq!(e.file, "test.yaml");
        assert_eq!(e.document, Some(1));
        assert!(e.line.is_some(), "no line: {e}");
    }
}

#[test]
fn valid_routing_rules_load() {
    let text = format!(
        "{VS_HEAD}  - match: [{{uri: {{prefix: /v1}}}}]
    rewrite: {{uri: /, authority: 'backend:8080'}}
    retries: {{attempts: 2, retryOn: 'gateway-error,connect-failure,503'}}
    headers: {{request: {{set: {{host: other, x-a: '1'}}, remove: [':path', x-b]}}}}
    fault: {{abort: {{grpcStatus: UNAVAILABLE}}}}
    mirror: {{host: shadow}}
    mirrorPercentage: {{value: 10}}
    route: [{{destination: {{host: reviews}}}}]
  - redirect: {{uri: /x, scheme: https, port: 8443, redirectCode: 308}}
"
    );
    config::load_sources(&[Source::new("ok.yaml", text)]).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn two_virtual_services_for_one_mesh_host_conflict() {
    let vs = |name: &str, host: &str, gateways: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: {name} }}
spec:
  hosts: [{host}]{gateways}
  http:
  - route: [{{ destination: {{ host: {host} }} }}]
"
        )
    };
    // The same host written two ways, both for the mesh.
    let first = vs("reviews-a", "reviews", "");
    let second = vs("reviews-b", "reviews.default.svc.cluster.local", "");
    let errs = errors(&[("a.yaml", &first), ("b.yaml", &second)]);
    let [error] = errs.errors() else {
        panic!("expected one error, got:\n{errs}");
    };
    assert_eq!(error.file, "b.yaml");
    assert_eq!(error.path.as_deref(), Some("spec.hosts[0]"));
    assert_eq!(error.line, Some(5));
    assert!(
        error.message.contains("VirtualService default/reviews-a"),
        "{error}"
    );
    assert!(error.message.contains("a.yaml"), "{error}");

    // Gateway-bound VirtualServices for the same host merge, as Istio merges them.
    let gw = vs("reviews-gw", "reviews", "\n  gateways: [bookinfo-gateway]");
    assert!(
        config::load_sources(&[
            Source::new("a.yaml", first.as_str()),
            Source::new("g.yaml", gw.as_str())
        ])
        .is_ok()
    );
}

/// An AuthorizationPolicy document in namespace `foo` with `spec` (indented YAML).
fn authz(spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ap, namespace: foo}}\nspec:\n{spec}\n"
    )
}

#[test]
fn authorization_policy_jwt_fields_are_rejected_by_name() {
    let e = single(&authz(
        "  rules:\n  - from:\n    - source:\n        requestPrincipals: [\"issuer/*\"]",
    ));
    assert_eq!(
        e.path.as_deref(),
        Some("spec.rules[0].from[0].source.requestPrincipals")
    );
    assert!(
        e.message
            .contains("requestPrincipals needs RequestAuthentication (JWT)"),
        "{e}"
    );
    assert_eq!(e.line, Some(8));

    let e = single(&authz(
        "  rules:\n  - from: [{source: {principals: [a]}}]\n    when:\n    - key: request.auth.claims[iss]\n      values: [x]",
    ));
    assert_eq!(e.path.as_deref(), Some("spec.rules[0].when[0].key"));
    assert!(
        e.message
            .contains("`request.auth.claims[iss]` needs RequestAuthentication"),
        "{e}"
    );

    let e = single(&authz(
        "  rules:\n  - from:\n    - source:\n        notRequestPrincipals: [x]",
    ));
    assert_eq!(
        e.path.as_deref(),
        Some("spec.rules[0].from[0].source.notRequestPrincipals")
    );
}

#[test]
fn authorization_policy_condition_keys_and_values_are_checked() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "  rules: [{when: [{key: source.user, values: [a]}]}]",
            "spec.rules[0].when[0].key",
            "unsupported attribute `source.user`",
        ),
        (
            "  rules: [{when: [{key: connection.sni, values: [a]}]}]",
            "spec.rules[0].when[0].key",
            "unsupported attribute `connection.sni`",
        ),
        (
            "  rules: [{when: [{key: \"request.headers[]\", values: [a]}]}]",
            "spec.rules[0].when[0].key",
            "must be `request.headers[<name>]`",
        ),
        (
            "  rules: [{when: [{key: \"request.headers[x-token\", values: [a]}]}]",
            "spec.rules[0].when[0].key",
            "must be `request.headers[<name>]`",
        ),
        (
            "  rules: [{when: [{key: \"request.headers[bad name]\", values: [a]}]}]",
            "spec.rules[0].when[0].key",
            "not a valid header name",
        ),
        (
            "  rules: [{when: [{key: \"request.headers[:authority]\", values: [a]}]}]",
            "spec.rules[0].when[0].key",
            "pseudo-headers are not supported",
        ),
        (
            "  rules: [{when: [{key: source.ip, values: [10.0.0.0/33]}]}]",
            "spec.rules[0].when[0].values[0]",
            "not an IP address or CIDR",
        ),
        (
            "  rules: [{when: [{key: destination.ip, notValues: [10.0.0.1, nope]}]}]",
            "spec.rules[0].when[0].notValues[1]",
            "not an IP address or CIDR",
        ),
        (
            "  rules: [{when: [{key: destination.port, values: [\"http\"]}]}]",
            "spec.rules[0].when[0].values[0]",
            "not a port number",
        ),
        (
            "  rules: [{when: [{key: source.namespace, values: [\"\"]}]}]",
            "spec.rules[0].when[0].values[0]",
            "empty value is not allowed",
        ),
    ];
    for (spec, path, message) in cases {
        let e = single(&authz(spec));
        assert_eq!(e.path.as_deref(), Some(*path), "{spec}: {e}");
        assert!(
            e.message.contains(message),
            "{spec}: expected `{message}` in: {e}"
        );
    }
}

#[test]
fn authorization_policy_sources_operations_and_paths_are_checked() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "  rules: [{from: [{source: {}}]}]",
            "spec.rules[0].from[0].source",
            "`from.source` must not be empty",
        ),
        (
            "  rules: [{to: [{operation: {}}]}]",
            "spec.rules[0].to[0].operation",
            "`to.operation` must not be empty",
        ),
        (
            "  rules: [{from: [{source: {principals: [a, \"\"]}}]}]",
            "spec.rules[0].from[0].source.principals[1]",
            "empty value is not allowed",
        ),
        (
            "  rules: [{to: [{operation: {methods: [\"\"]}}]}]",
            "spec.rules[0].to[0].operation.methods[0]",
            "empty value is not allowed",
        ),
        (
            "  rules: [{from: [{source: {serviceAccounts: [web]}}]}]",
            "spec.rules[0].from[0].source.serviceAccounts[0]",
            "is not `<namespace>/<serviceaccount>`",
        ),
        (
            "  rules: [{to: [{operation: {notPorts: [\"70000\"]}}]}]",
            "spec.rules[0].to[0].operation.notPorts[0]",
            "not a port number",
        ),
        (
            "  rules: [{to: [{operation: {paths: [\"/a/{**}/b\"]}}]}]",
            "spec.rules[0].to[0].operation.paths[0]",
            "`{**}` must be the last segment",
        ),
        (
            "  rules: [{to: [{operation: {notPaths: [\"/a/x{*}\"]}}]}]",
            "spec.rules[0].to[0].operation.notPaths[0]",
            "must be whole path segments",
        ),
        (
            "  rules: [{to: [{operation: {paths: [\"/a/{id}\"]}}]}]",
            "spec.rules[0].to[0].operation.paths[0]",
            "must be whole path segments",
        ),
        (
            "  rules: [{to: [{operation: {paths: [\"a/{*}\"]}}]}]",
            "spec.rules[0].to[0].operation.paths[0]",
            "must start with `/`",
        ),
        (
            "  rules: [{from: [{source: {notRemoteIpBlocks: [\"1.2.3.4/x\"]}}]}]",
            "spec.rules[0].from[0].source.notRemoteIpBlocks[0]",
            "not an IP address or CIDR",
        ),
    ];
    for (spec, path, message) in cases {
        let e = single(&authz(spec));
        assert_eq!(e.path.as_deref(), Some(*path), "{spec}: {e}");
        assert!(
            e.message.contains(message),
            "{spec}: expected `{message}` in: {e}"
        );
        assert!(e.line.is_some(), "no line: {e}");
    }

    // What Istio accepts loads.
    let ok = authz(
        "  rules:\n  - from: [{source: {principals: [\"*\"], serviceAccounts: [foo/web], notIpBlocks: [10.0.0.1]}}]\n    to: [{operation: {paths: [\"/a/{*}/b\", \"/static/{**}\", \"/api/*\", \"*.png\"], ports: [\"8080\"]}}]\n    when:\n    - {key: \"request.headers[X-Token]\", values: [\"*\"]}\n    - {key: remote.ip, notValues: [\"::1\"]}\n    - {key: destination.port, values: [\"9000\"]}\n    - {key: source.principal, values: [\"cluster.local/*\"]}",
    );
    if let Err(e) = config::load_sources(&[Source::new("ok.yaml", ok.as_str())]) {
        panic!("{e}");
    }
}

#[test]
fn peer_authentication_port_level_needs_match_labels() {
    for selector in ["", "  selector: {matchLabels: {}}\n"] {
        let e = single(&format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: pa, namespace: foo}}\nspec:\n{selector}  portLevelMtls: {{\"8080\": {{mode: DISABLE}}}}\n"
        ));
        assert_eq!(e.path.as_deref(), Some("spec.portLevelMtls"), "{e}");
        assert!(
            e.message.contains("needs a selector with matchLabels"),
            "{e}"
        );
    }
}

#[test]
fn tls_route_sni_hosts_must_be_among_the_virtual_service_hosts() {
    let vs = |sni: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: edge }}
spec:
  hosts: [\"*.example.com\", db.internal]
  tls:
  - match: [{{ sniHosts: [{sni}] }}]
    route: [{{ destination: {{ host: db.internal }} }}]
"
        )
    };
    let e = single(&vs("api.other.org"));
    assert_eq!(e.path.as_deref(), Some("spec.tls[0].match[0].sniHosts[0]"));
    assert!(
        e.message.contains("api.other.org") && e.message.contains("*.example.com"),
        "{}",
        e.message
    );
    // Exact, covered by a wildcard, or a narrower wildcard: accepted.
    for ok in ["db.internal", "API.example.com", "\"*.eu.example.com\""] {
        let sources = [Source::new("ok.yaml", vs(ok))];
        assert!(config::load_sources(&sources).is_ok(), "{ok}");
    }
}
