//! Config round trips as properties: generated VirtualServices, DestinationRules,
//! ServiceEntries and AuthorizationPolicies are written as YAML, loaded with
//! `load_sources`, and dumped with `MeshConfig::to_json` (what `/config_dump` serves).
//!
//! - The dump shows every generated value, modulo the loader's documented normalisation:
//!   a missing `metadata.namespace` is `default`; hosts are qualified (`reviews` in
//!   namespace `ns` is `reviews.ns.svc.cluster.local`, other names lower-cased, a trailing
//!   dot dropped); a port `protocol` prints as Istio's canonical name (case-insensitive on
//!   input, unknown names are `TCP`); a missing ServiceEntry `resolution` is `NONE` and a
//!   missing AuthorizationPolicy `action` is `ALLOW`; each resource carries its `origin`
//!   (source name, 1-based document), and unset fields (nulls, empty lists and maps) are
//!   left out.
//! - Loading the dump again (each resource as a JSON document, which is YAML) gives the
//!   same dump, registry included.
//! - No text, however broken, panics the loader, and what it accepts dumps and reloads.

#![allow(clippy::unwrap_used)]

use mesh_core::config::{self, MeshConfig, Source, StringMatch};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

// ---------------------------------------------------------------------------------------
// YAML rendering: block style, scalars plain, single- or double-quoted.

/// How strings that may be written plain are written.
#[derive(Clone, Copy, Debug)]
enum Style {
    Plain,
    Single,
    Double,
}

/// YAML words that a plain scalar would turn into something other than a string.
const KEYWORDS: &[&str] = &[
    "true", "false", "yes", "no", "on", "off", "null", "y", "n", "nan", "inf",
];

fn plain_ok(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
        && !KEYWORDS.contains(&s.to_ascii_lowercase().as_str())
}

fn scalar(s: &str, style: Style) -> String {
    let printable_ascii = s.bytes().all(|b| (0x20..0x7f).contains(&b));
    match style {
        Style::Plain if plain_ok(s) => s.to_string(),
        Style::Single if printable_ascii => format!("'{}'", s.replace('\'', "''")),
        // JSON's escapes are all valid in a YAML double-quoted scalar.
        _ => serde_json::to_string(s).unwrap(),
    }
}

fn leaf(v: &Value, style: Style) -> Option<String> {
    Some(match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => scalar(s, style),
        Value::Array(a) if a.is_empty() => "[]".to_string(),
        Value::Object(o) if o.is_empty() => "{}".to_string(),
        _ => return None,
    })
}

/// Writes a non-empty mapping or sequence at `indent`.
fn block(v: &Value, indent: usize, style: Style, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                out.push_str(&format!("{pad}{}:", scalar(k, style)));
                match leaf(v, style) {
                    Some(text) => out.push_str(&format!(" {text}\n")),
                    None => {
                        out.push('\n');
                        block(v, indent + 2, style, out);
                    }
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                match leaf(item, style) {
                    Some(text) => out.push_str(&format!("{pad}- {text}\n")),
                    None => {
                        // The item's first line goes after the dash.
                        let mut nested = String::new();
                        block(item, indent + 2, style, &mut nested);
                        out.push_str(&format!("{pad}- {}", &nested[indent + 2..]));
                    }
                }
            }
        }
        _ => unreachable!("leaves are written by their parent"),
    }
}

fn to_yaml(doc: &Value, style: Style) -> String {
    let mut out = String::new();
    block(doc, 0, style, &mut out);
    out
}

// ---------------------------------------------------------------------------------------
// The loader's documented normalisation, applied to what was generated.

fn qualify(host: &str, namespace: &str) -> String {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.contains('.') || host.starts_with('*') {
        host
    } else {
        format!("{host}.{namespace}.svc.cluster.local")
    }
}

fn canonical_protocol(name: &str) -> &'static str {
    match name.to_ascii_uppercase().as_str() {
        "HTTP" => "HTTP",
        "HTTPS" => "HTTPS",
        "HTTP2" => "HTTP2",
        "GRPC" => "GRPC",
        "GRPC-WEB" => "GRPC-Web",
        "TLS" => "TLS",
        "MONGO" => "MONGO",
        "REDIS" => "REDIS",
        "MYSQL" => "MYSQL",
        "UDP" => "UDP",
        _ => "TCP",
    }
}

/// Drops nulls and empty lists and maps from objects, recursively.
fn prune(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for v in map.values_mut() {
                prune(v);
            }
            map.retain(|_, v| match v {
                Value::Null => false,
                Value::Array(a) => !a.is_empty(),
                Value::Object(o) => !o.is_empty(),
                _ => true,
            });
        }
        Value::Array(items) => items.iter_mut().for_each(prune),
        _ => {}
    }
}

fn each_mut(v: &mut Value, f: impl Fn(&mut Value)) {
    if let Value::Array(items) = v {
        items.iter_mut().for_each(f);
    }
}

fn qualify_at(v: &mut Value, ns: &str) {
    if let Value::String(s) = v {
        *s = qualify(s, ns);
    }
}

/// What the dump should show for the generated document `doc`.
fn expected(doc: &Value, file: &str, document: usize) -> Value {
    let mut v = doc.clone();
    let ns = v["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_string();
    v["metadata"]["namespace"] = json!(ns);
    let spec = &mut v["spec"];
    match doc["kind"].as_str().unwrap() {
        "VirtualService" => {
            each_mut(&mut spec["hosts"], |h| qualify_at(h, &ns));
            each_mut(&mut spec["http"], |route| {
                each_mut(&mut route["route"], |d| {
                    qualify_at(&mut d["destination"]["host"], &ns)
                })
            });
        }
        "DestinationRule" => qualify_at(&mut spec["host"], &ns),
        "ServiceEntry" => {
            each_mut(&mut spec["hosts"], |h| qualify_at(h, &ns));
            if spec.get("resolution").is_none() {
                spec["resolution"] = json!("NONE");
            }
            each_mut(&mut spec["ports"], |p| {
                if let Some(name) = p["protocol"].as_str() {
                    p["protocol"] = json!(canonical_protocol(name));
                }
            });
        }
        "AuthorizationPolicy" => {
            if spec.get("action").is_none() {
                spec["action"] = json!("ALLOW");
            }
        }
        kind => unreachable!("{kind}"),
    }
    v["origin"] = json!({ "file": file, "document": document });
    prune(&mut v);
    v
}

// ---------------------------------------------------------------------------------------
// Generators. Each builds the YAML document as a JSON value; optional fields are left out
// when not drawn, so "unset" is never written as an empty value.

fn set(map: &mut Value, key: &str, value: Option<Value>) {
    if let Some(value) = value {
        map[key] = value;
    }
}

/// A string with YAML's troublesome characters (`:`, `#`, quotes, `- `, unicode, ...),
/// without control or line-separator characters (which a header value could not hold).
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9-]{0,8}",
        "[^\\p{C}\\p{Zl}\\p{Zp}]{0,16}",
        proptest::sample::select(vec![
            "true", "no", "null", "~", "123", "0x1F", "1e3", "- a", "a: b", "#x", "x #y", "'q'",
            "\"dq\"", "*a", "&a", "!tag", "@at", "`b`", "%p", "{}", "[]", "", " ", "é日本",
        ])
        .prop_map(str::to_string),
    ]
}

fn dns_label() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,7}[a-z0-9]"
}

fn namespace() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(proptest::sample::select(vec![
        "default",
        "prod",
        "istio-system",
    ]))
    .prop_map(|ns| ns.map(str::to_string))
}

fn labels(max: usize) -> impl Strategy<Value = Value> {
    proptest::collection::btree_map("[a-z][a-z0-9./-]{0,10}", text(), 1..=max)
        .prop_map(|m| json!(m))
}

fn metadata(name: String) -> impl Strategy<Value = Value> {
    (namespace(), proptest::option::of(labels(3))).prop_map(move |(ns, labels)| {
        let mut m = json!({ "name": name });
        set(&mut m, "namespace", ns.map(Value::from));
        set(&mut m, "labels", labels);
        m
    })
}

/// A host as written: a short name, a DNS name or a wildcard, sometimes in upper case or
/// with a trailing dot. `base` keeps it distinct from the other generated hosts.
fn host_spelling(base: String) -> impl Strategy<Value = String> {
    (0u8..3, any::<bool>(), any::<bool>()).prop_map(move |(form, upper, dot)| {
        let host = match form {
            0 => base.clone(),
            1 => format!("{base}.example.com"),
            _ => format!("*.{base}.example.org"),
        };
        let host = if upper {
            host.to_ascii_uppercase()
        } else {
            host
        };
        if dot && !host.starts_with('*') {
            format!("{host}.")
        } else {
            host
        }
    })
}

/// `count` hosts with distinct base names.
fn hosts(bases: Vec<String>) -> impl Strategy<Value = Vec<String>> {
    bases.into_iter().map(host_spelling).collect::<Vec<_>>()
}

/// A canonical Go duration (as the dump prints it); `zero` allows `0s`.
fn duration(zero: bool) -> impl Strategy<Value = String> {
    let positive = prop_oneof![
        (1u64..1000).prop_map(|ms| format!("{ms}ms")),
        (1u64..60).prop_map(|s| format!("{s}s")),
        (1u64..60, 1u64..1000).prop_map(|(s, ms)| {
            let frac = format!("{ms:03}");
            format!("{s}.{}s", frac.trim_end_matches('0'))
        }),
        (1u64..60).prop_map(|m| format!("{m}m")),
        (1u64..5, 1u64..60).prop_map(|(h, m)| format!("{h}h{m}m")),
    ];
    prop_oneof![
        9 => positive,
        u32::from(zero) => Just("0s".to_string()),
    ]
}

/// A `StringMatch` that is never `{}` (see `presence_matches_survive_the_dump`).
fn string_match() -> impl Strategy<Value = Value> {
    prop_oneof![
        text().prop_map(|v| json!({ "exact": v })),
        text().prop_map(|v| json!({ "prefix": v })),
        proptest::sample::select(vec!["v[0-9]+", "(a|b)c", "[a-z]*-x", "x\\.y", ".*"])
            .prop_map(|r| json!({ "regex": r })),
    ]
}

fn uri_match() -> impl Strategy<Value = Value> {
    prop_oneof![
        "/[a-zA-Z0-9/._~-]{0,16}".prop_map(|v| json!({ "exact": v })),
        "/[a-zA-Z0-9/._~-]{0,16}".prop_map(|v| json!({ "prefix": v })),
        proptest::sample::select(vec!["/api/v[0-9]+", "/(a|b)/.*", "/x\\.y", "/[^/]+/items"])
            .prop_map(|r| json!({ "regex": r })),
    ]
}

fn http_match() -> impl Strategy<Value = Value> {
    (
        proptest::option::of(text()),
        proptest::option::of(uri_match()),
        proptest::option::of(any::<bool>()),
        proptest::option::of(proptest::sample::select(vec!["GET", "POST", "PUT"])),
        proptest::collection::btree_map("[a-z][a-z0-9-]{0,10}", string_match(), 0..3),
        proptest::collection::btree_map("[a-z][a-z0-9_]{0,6}", string_match(), 0..3),
        proptest::option::of(1u16..),
    )
        .prop_map(|(name, uri, ignore_case, method, headers, query, port)| {
            let mut m = json!({});
            set(&mut m, "name", name.map(Value::from));
            set(&mut m, "uri", uri);
            set(&mut m, "ignoreUriCase", ignore_case.map(Value::from));
            set(&mut m, "method", method.map(|v| json!({ "exact": v })));
            set(
                &mut m,
                "headers",
                (!headers.is_empty()).then(|| json!(headers)),
            );
            set(
                &mut m,
                "queryParams",
                (!query.is_empty()).then(|| json!(query)),
            );
            set(&mut m, "port", port.map(Value::from));
            m
        })
}

/// `n` weights summing to 100 (or, for one destination, absent or any percentage).
fn weights(n: usize) -> BoxedStrategy<Vec<Option<u32>>> {
    if n == 1 {
        return proptest::option::of(0u32..=100)
            .prop_map(|w| vec![w])
            .boxed();
    }
    proptest::collection::vec(0u32..=100, n - 1)
        .prop_map(|mut cuts| {
            cuts.sort_unstable();
            let mut out = Vec::new();
            let mut last = 0;
            for cut in cuts.into_iter().chain([100]) {
                out.push(Some(cut - last));
                last = cut;
            }
            out
        })
        .boxed()
}

fn destination() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            dns_label(),
            dns_label().prop_map(|l| format!("{l}.example.com"))
        ],
        proptest::option::of("[a-z0-9]{1,5}"),
        proptest::option::of(1u16..),
    )
        .prop_map(|(host, subset, port)| {
            let mut d = json!({ "host": host });
            set(&mut d, "subset", subset.map(Value::from));
            set(&mut d, "port", port.map(|n| json!({ "number": n })));
            d
        })
}

fn http_route() -> impl Strategy<Value = Value> {
    let destinations =
        (1usize..4).prop_flat_map(|n| (proptest::collection::vec(destination(), n), weights(n)));
    (
        proptest::option::of(text()),
        proptest::collection::vec(http_match(), 0..3),
        destinations,
        proptest::option::of(duration(true)),
        proptest::option::of((
            proptest::option::of(0u32..5),
            proptest::option::of(duration(false)),
            proptest::option::of(proptest::sample::select(vec![
                "5xx",
                "connect-failure,refused-stream",
                "gateway-error,503",
            ])),
        )),
    )
        .prop_map(|(name, matches, (dests, weights), timeout, retries)| {
            let mut r = json!({});
            set(&mut r, "name", name.map(Value::from));
            set(
                &mut r,
                "match",
                (!matches.is_empty()).then(|| json!(matches)),
            );
            let route: Vec<Value> = dests
                .into_iter()
                .zip(weights)
                .map(|(d, w)| {
                    let mut rd = json!({ "destination": d });
                    set(&mut rd, "weight", w.map(Value::from));
                    rd
                })
                .collect();
            r["route"] = json!(route);
            set(&mut r, "timeout", timeout.map(Value::from));
            if let Some((attempts, per_try, retry_on)) = retries {
                let mut p = json!({});
                set(&mut p, "attempts", attempts.map(Value::from));
                set(&mut p, "perTryTimeout", per_try.map(Value::from));
                set(&mut p, "retryOn", retry_on.map(Value::from));
                // `retries: {}` would be pruned from the dump, as an unset field is.
                if p.as_object().is_some_and(|o| !o.is_empty()) {
                    r["retries"] = p;
                }
            }
            r
        })
}

fn api_version(group: &'static str, versions: Vec<&'static str>) -> impl Strategy<Value = String> {
    proptest::sample::select(versions).prop_map(move |v| format!("{group}/{v}"))
}

fn virtual_service(name: String, bases: Vec<String>) -> impl Strategy<Value = Value> {
    (
        api_version("networking.istio.io", vec!["v1", "v1beta1", "v1alpha3"]),
        metadata(name),
        hosts(bases),
        proptest::collection::vec(http_route(), 0..4),
    )
        .prop_map(|(api, meta, hosts, http)| {
            let mut spec = json!({ "hosts": hosts });
            set(&mut spec, "http", (!http.is_empty()).then(|| json!(http)));
            json!({ "apiVersion": api, "kind": "VirtualService", "metadata": meta, "spec": spec })
        })
}

fn destination_rule(name: String) -> impl Strategy<Value = Value> {
    let subsets = proptest::collection::btree_map(
        "[a-z][a-z0-9-]{0,6}",
        proptest::option::of(labels(3)),
        0..4,
    );
    let policy = (
        proptest::option::of(proptest::sample::select(vec![
            "ROUND_ROBIN",
            "RANDOM",
            "LEAST_REQUEST",
            "PASSTHROUGH",
        ])),
        proptest::option::of(duration(false)),
        proptest::option::of(0u32..20),
    );
    (
        api_version("networking.istio.io", vec!["v1", "v1beta1", "v1alpha3"]),
        metadata(name),
        prop_oneof![
            dns_label(),
            dns_label().prop_map(|l| format!("{l}.Example.COM"))
        ],
        subsets,
        proptest::option::of(policy),
    )
        .prop_map(|(api, meta, host, subsets, policy)| {
            let mut spec = json!({ "host": host });
            let subsets: Vec<Value> = subsets
                .into_iter()
                .map(|(name, labels)| {
                    let mut s = json!({ "name": name });
                    set(&mut s, "labels", labels);
                    s
                })
                .collect();
            set(
                &mut spec,
                "subsets",
                (!subsets.is_empty()).then(|| json!(subsets)),
            );
            if let Some((simple, connect, errors)) = policy {
                let mut tp = json!({});
                set(
                    &mut tp,
                    "loadBalancer",
                    simple.map(|s| json!({ "simple": s })),
                );
                set(
                    &mut tp,
                    "connectionPool",
                    connect.map(|c| json!({ "tcp": { "connectTimeout": c } })),
                );
                set(
                    &mut tp,
                    "outlierDetection",
                    errors.map(|e| json!({ "consecutive5xxErrors": e })),
                );
                if tp.as_object().is_some_and(|o| !o.is_empty()) {
                    spec["trafficPolicy"] = tp;
                }
            }
            json!({ "apiVersion": api, "kind": "DestinationRule", "metadata": meta, "spec": spec })
        })
}

fn service_entry(name: String, bases: Vec<String>) -> impl Strategy<Value = Value> {
    let ports = proptest::collection::btree_map(
        "[a-z][a-z0-9]{0,5}",
        (
            proptest::option::of(proptest::sample::select(vec![
                "HTTP", "http", "Http2", "grpc", "GRPC-Web", "grpc-web", "TCP", "tls", "HTTPS",
                "mongo", "thrift",
            ])),
            proptest::option::of(1u16..),
        ),
        1..4,
    )
    .prop_flat_map(|ports| {
        // Distinct port numbers, one per name.
        let n = ports.len();
        (Just(ports), proptest::collection::btree_set(1u16.., n..=n))
    });
    (
        api_version("networking.istio.io", vec!["v1", "v1beta1", "v1alpha3"]),
        metadata(name),
        // No wildcards here: DNS resolution of a wildcard host needs endpoints.
        bases
            .into_iter()
            .map(|b| prop_oneof![Just(b.clone()), Just(format!("{b}.example.net"))])
            .collect::<Vec<_>>(),
        ports,
        0u8..4,
        proptest::option::of(proptest::sample::select(vec![
            "MESH_EXTERNAL",
            "MESH_INTERNAL",
        ])),
        proptest::collection::vec(
            (
                any::<[u8; 4]>(),
                dns_label(),
                any::<prop::sample::Index>(),
                proptest::option::of(1u16..),
                proptest::option::of(labels(2)),
                proptest::option::of(0u32..100),
            ),
            1..4,
        ),
    )
        .prop_map(
            |(api, meta, hosts, (ports, numbers), resolution, location, endpoints)| {
                let names: Vec<&String> = ports.keys().collect();
                let ports_json: Vec<Value> = ports
                    .iter()
                    .zip(&numbers)
                    .map(|((name, (protocol, target)), number)| {
                        let mut p = json!({ "number": number, "name": name });
                        set(&mut p, "protocol", protocol.map(Value::from));
                        set(&mut p, "targetPort", target.map(Value::from));
                        p
                    })
                    .collect();
                let mut spec = json!({ "hosts": hosts, "ports": ports_json });
                set(&mut spec, "location", location.map(Value::from));
                let (resolution, with_endpoints, dns) = match resolution {
                    0 => (None, false, false),
                    1 => (Some("NONE"), false, false),
                    2 => (Some("STATIC"), true, false),
                    _ => (Some("DNS"), true, true),
                };
                set(&mut spec, "resolution", resolution.map(Value::from));
                if with_endpoints {
                    let endpoints: Vec<Value> = endpoints
                        .into_iter()
                        .map(|(ip, dns_name, port_name, port, labels, weight)| {
                            let address = if dns {
                                format!("{dns_name}.example.net")
                            } else {
                                std::net::Ipv4Addr::from(ip).to_string()
                            };
                            let mut e = json!({ "address": address });
                            if let Some(port) = port {
                                let name = names[port_name.index(names.len())];
                                e["ports"] = json!({ name.as_str(): port });
                            }
                            set(&mut e, "labels", labels);
                            set(&mut e, "weight", weight.map(Value::from));
                            e
                        })
                        .collect();
                    spec["endpoints"] = json!(endpoints);
                }
                json!({ "apiVersion": api, "kind": "ServiceEntry", "metadata": meta, "spec": spec })
            },
        )
}

/// A non-empty list of non-empty values.
fn values(item: BoxedStrategy<String>) -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec(item, 1..3)
}

fn principal() -> BoxedStrategy<String> {
    prop_oneof![
        Just("*".to_string()),
        ("[a-z.]{1,8}", dns_label(), dns_label())
            .prop_map(|(td, ns, sa)| format!("{td}/ns/{ns}/sa/{sa}")),
        dns_label().prop_map(|ns| format!("cluster.local/ns/{ns}/*")),
        dns_label().prop_map(|sa| format!("*/sa/{sa}")),
    ]
    .boxed()
}

fn source() -> impl Strategy<Value = Value> {
    (
        proptest::option::of(values(principal())),
        proptest::option::of(values(principal())),
        proptest::option::of(values(dns_label().boxed())),
        proptest::option::of(values(dns_label().boxed())),
        proptest::option::of(values(
            (any::<[u8; 4]>(), 8u8..=32)
                .prop_map(|(ip, len)| format!("{}/{len}", std::net::Ipv4Addr::from(ip)))
                .boxed(),
        )),
    )
        .prop_map(
            |(principals, not_principals, namespaces, not_namespaces, ips)| {
                let mut s = json!({});
                set(&mut s, "principals", principals.map(|v| json!(v)));
                set(&mut s, "notPrincipals", not_principals.map(|v| json!(v)));
                set(&mut s, "namespaces", namespaces.map(|v| json!(v)));
                set(&mut s, "notNamespaces", not_namespaces.map(|v| json!(v)));
                set(&mut s, "ipBlocks", ips.map(|v| json!(v)));
                if s.as_object().is_some_and(Map::is_empty) {
                    s["principals"] = json!(["*"]);
                }
                json!({ "source": s })
            },
        )
}

fn operation() -> impl Strategy<Value = Value> {
    let method = || {
        proptest::sample::select(vec!["GET", "POST", "DELETE", "*"])
            .prop_map(str::to_string)
            .boxed()
    };
    let path = || {
        prop_oneof![
            "/[a-z0-9/]{0,10}",
            "/[a-z0-9/]{0,10}\\*",
            "\\*[a-z0-9./]{0,6}",
            Just("*".to_string()),
            Just("/api/{*}/items".to_string()),
            Just("/files/{**}".to_string()),
        ]
        .boxed()
    };
    let port = || (1u16..).prop_map(|p| p.to_string()).boxed();
    (
        proptest::option::of(values(method())),
        proptest::option::of(values(method())),
        proptest::option::of(values(path())),
        proptest::option::of(values(path())),
        proptest::option::of(values(port())),
        proptest::option::of(values(port())),
        proptest::option::of(values(
            prop_oneof![
                dns_label(),
                dns_label().prop_map(|h| format!("*.{h}.com")),
                dns_label().prop_map(|h| format!("{h}.com:8080")),
            ]
            .boxed(),
        )),
    )
        .prop_map(
            |(methods, not_methods, paths, not_paths, ports, not_ports, hosts)| {
                let mut o = json!({});
                set(&mut o, "methods", methods.map(|v| json!(v)));
                set(&mut o, "notMethods", not_methods.map(|v| json!(v)));
                set(&mut o, "paths", paths.map(|v| json!(v)));
                set(&mut o, "notPaths", not_paths.map(|v| json!(v)));
                set(&mut o, "ports", ports.map(|v| json!(v)));
                set(&mut o, "notPorts", not_ports.map(|v| json!(v)));
                set(&mut o, "hosts", hosts.map(|v| json!(v)));
                if o.as_object().is_some_and(Map::is_empty) {
                    o["methods"] = json!(["GET"]);
                }
                json!({ "operation": o })
            },
        )
}

fn condition() -> impl Strategy<Value = Value> {
    prop_oneof![
        (
            dns_label(),
            values("[a-zA-Z0-9 ,.*_-]{1,10}".boxed()),
            any::<bool>()
        )
            .prop_map(|(header, values, negate)| {
                let mut c = json!({ "key": format!("request.headers[x-{header}]") });
                c[if negate { "notValues" } else { "values" }] = json!(values);
                c
            }),
        values(dns_label().boxed()).prop_map(|v| json!({ "key": "source.namespace", "values": v })),
        values(principal()).prop_map(|v| json!({ "key": "source.principal", "notValues": v })),
        values((1u16..).prop_map(|p| p.to_string()).boxed())
            .prop_map(|v| json!({ "key": "destination.port", "values": v })),
    ]
}

fn rule() -> impl Strategy<Value = Value> {
    (
        proptest::collection::vec(source(), 0..3),
        proptest::collection::vec(operation(), 0..3),
        proptest::collection::vec(condition(), 0..3),
    )
        .prop_map(|(from, to, when)| {
            let mut r = json!({});
            set(&mut r, "from", (!from.is_empty()).then(|| json!(from)));
            set(&mut r, "to", (!to.is_empty()).then(|| json!(to)));
            set(&mut r, "when", (!when.is_empty()).then(|| json!(when)));
            r
        })
}

fn authorization_policy(name: String) -> impl Strategy<Value = Value> {
    (
        api_version("security.istio.io", vec!["v1", "v1beta1"]),
        metadata(name),
        proptest::option::of(labels(2)),
        proptest::option::of(proptest::sample::select(vec!["ALLOW", "DENY", "AUDIT"])),
        proptest::option::of(proptest::collection::vec(rule(), 0..4)),
    )
        .prop_map(|(api, meta, selector, action, rules)| {
            let mut spec = json!({});
            set(&mut spec, "selector", selector.map(|l| json!({ "matchLabels": l })));
            set(&mut spec, "action", action.map(Value::from));
            set(&mut spec, "rules", rules.map(|r| json!(r)));
            json!({ "apiVersion": api, "kind": "AuthorizationPolicy", "metadata": meta, "spec": spec })
        })
}

/// A configuration: documents of the four kinds in a random order, split over one to
/// three sources, each written in one scalar style.
#[derive(Clone, Debug)]
struct Generated {
    /// Per source: its documents, in order.
    sources: Vec<Vec<Value>>,
    style: Style,
    /// Whether a comment line precedes each document's `---`.
    comments: bool,
}

fn generated() -> impl Strategy<Value = Generated> {
    // Host base names, distinct, so VirtualServices never bind a host twice.
    (
        proptest::collection::btree_set("[a-z][a-z0-9]{0,6}", 4..12),
        0usize..3,
        0usize..3,
        0usize..3,
        0usize..3,
    )
        .prop_flat_map(|(bases, n_vs, n_dr, n_se, n_ap)| {
            let bases: Vec<String> = bases.into_iter().collect();
            let per = bases.len() / 4;
            let vs_bases = |i: usize| {
                let start = (i * per).min(bases.len());
                bases[start..(start + per.max(1)).min(bases.len())].to_vec()
            };
            let mut docs: Vec<BoxedStrategy<Value>> = Vec::new();
            for i in 0..n_vs {
                docs.push(virtual_service(format!("vs-{i}"), vs_bases(i)).boxed());
            }
            for i in 0..n_dr {
                docs.push(destination_rule(format!("dr-{i}")).boxed());
            }
            for i in 0..n_se {
                docs.push(service_entry(format!("se-{i}"), vs_bases(3)).boxed());
            }
            for i in 0..n_ap {
                docs.push(authorization_policy(format!("ap-{i}")).boxed());
            }
            (docs, proptest::collection::vec(0usize..3, 2))
        })
        .prop_flat_map(|(docs, cuts)| {
            (
                Just(docs).prop_shuffle(),
                Just(cuts),
                prop_oneof![Just(Style::Plain), Just(Style::Single), Just(Style::Double)],
                any::<bool>(),
            )
        })
        .prop_map(|(docs, mut cuts, style, comments)| {
            cuts.iter_mut().for_each(|c| *c = (*c).min(docs.len()));
            cuts.sort_unstable();
            let sources = vec![
                docs[..cuts[0]].to_vec(),
                docs[cuts[0]..cuts[1]].to_vec(),
                docs[cuts[1]..].to_vec(),
            ];
            Generated {
                sources,
                style,
                comments,
            }
        })
}

fn source_name(i: usize) -> String {
    format!("gen-{i}.yaml")
}

fn render(g: &Generated) -> Vec<Source> {
    g.sources
        .iter()
        .enumerate()
        .map(|(i, docs)| {
            let mut text = String::new();
            for (j, doc) in docs.iter().enumerate() {
                if g.comments {
                    text.push_str(&format!("# document {}\n", j + 1));
                }
                text.push_str("---\n");
                text.push_str(&to_yaml(doc, g.style));
            }
            Source::new(source_name(i), text)
        })
        .collect()
}

const KINDS: [&str; 4] = [
    "VirtualService",
    "DestinationRule",
    "ServiceEntry",
    "AuthorizationPolicy",
];

fn load(sources: &[Source]) -> MeshConfig {
    match config::load_sources(sources) {
        Ok(config) => config,
        Err(e) => {
            let texts: Vec<&str> = sources.iter().map(|s| s.text.as_str()).collect();
            panic!("rejected:\n{e}\n{}", texts.join("\n=====\n"))
        }
    }
}

/// The dump loaded back: every resource of every kind (less its `origin`) as one JSON
/// document, each in the source and position it came from.
fn dump_as_sources(dump: &Value) -> Vec<Source> {
    let mut docs: Vec<(String, u64, Value)> = Vec::new();
    for kind in config::Kind::ALL {
        for entry in dump[kind.as_str()].as_array().into_iter().flatten() {
            let mut entry = entry.clone();
            let origin = entry.as_object_mut().unwrap().remove("origin").unwrap();
            let file = origin["file"].as_str().unwrap().to_string();
            docs.push((file, origin["document"].as_u64().unwrap(), entry));
        }
    }
    docs.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let mut sources: Vec<Source> = Vec::new();
    for (file, index, doc) in docs {
        if sources.last().is_none_or(|s| s.name != file) {
            sources.push(Source::new(file.clone(), String::new()));
        }
        let source = sources.last_mut().unwrap();
        let have = source.text.matches("---\n").count() as u64;
        // Keep the document's position: pad with empty documents.
        for _ in have + 1..index {
            source.text.push_str("---\n");
        }
        source.text.push_str("---\n");
        source.text.push_str(&serde_json::to_string(&doc).unwrap());
        source.text.push('\n');
    }
    sources
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Every generated value is in the dump, normalised as documented, and nothing else is.
    #[test]
    fn loaded_resources_dump_as_written(g in generated()) {
        let config = load(&render(&g));
        let dump = config.to_json();
        for kind in KINDS {
            let want: Vec<Value> = g
                .sources
                .iter()
                .enumerate()
                .flat_map(|(i, docs)| {
                    docs.iter()
                        .enumerate()
                        .filter(|(_, d)| d["kind"] == kind)
                        .map(move |(j, d)| expected(d, &source_name(i), j + 1))
                })
                .collect();
            let got = dump[kind].as_array().cloned().unwrap_or_default();
            prop_assert_eq!(got.len(), want.len(), "{} count", kind);
            for (got, want) in got.iter().zip(&want) {
                prop_assert_eq!(got, want, "{}", kind);
            }
        }
        prop_assert_eq!(
            config.resource_count(),
            g.sources.iter().map(Vec::len).sum::<usize>()
        );
    }

    /// Loading the dump gives the same dump (resources, origins and service registry).
    #[test]
    fn dump_reloads_to_the_same_dump(g in generated()) {
        let dump = load(&render(&g)).to_json();
        let again = load(&dump_as_sources(&dump)).to_json();
        prop_assert_eq!(again, dump);
    }
}

// ---------------------------------------------------------------------------------------
// Robustness: no input panics the loader.

/// Fragments of YAML and of these resources, to be strung together at random.
fn yamlish() -> impl Strategy<Value = String> {
    let token = proptest::sample::select(vec![
        "apiVersion: networking.istio.io/v1\n",
        "apiVersion: security.istio.io/v1\n",
        "apiVersion: mesh-proxy/v1\n",
        "kind: VirtualService\n",
        "kind: ServiceEntry\n",
        "kind: DestinationRule\n",
        "kind: AuthorizationPolicy\n",
        "kind: Bootstrap\n",
        "kind: Gateway\n",
        "metadata: {name: a}\n",
        "metadata:\n  name: b\n  namespace: x\n",
        "spec:\n",
        "  hosts: [a, '*.b', \"c\"]\n",
        "  http:\n  - route: [{destination: {host: a}}]\n",
        "  - match: [{uri: {prefix: /}}, {headers: {x: {}}}]\n",
        "    route:\n    - destination: {host: r}\n      weight: 50\n",
        "  ports: [{number: 80, name: http}]\n",
        "  resolution: STATIC\n",
        "  endpoints: [{address: 10.0.0.1}]\n",
        "  rules: [{}]\n",
        "  rules:\n  - from: [{source: {principals: ['*']}}]\n",
        "  action: DENY\n",
        "---\n",
        "...\n",
        "%YAML 1.2\n",
        "# comment\n",
        "\n",
        "  ",
        "- ",
        ": ",
        "{",
        "}",
        "[",
        "]",
        ",",
        "'",
        "\"",
        "\\",
        "&a ",
        "*a",
        "<<: *a\n",
        "!!str ",
        "!!binary ",
        "? ",
        "|\n",
        ">-\n",
        "\t",
        "~",
        "null",
        "-1",
        "99999999999999999999999",
        "1e400",
        ".nan",
        "0x7f",
        "é",
        "\u{feff}",
        "\r\n",
        "\u{0}",
    ]);
    proptest::collection::vec(token, 0..40).prop_map(|t| t.concat())
}

/// A valid generated stream, then damaged: characters deleted, inserted or lines swapped.
fn damaged() -> impl Strategy<Value = String> {
    (
        generated(),
        proptest::collection::vec(
            (
                0u8..3,
                any::<prop::sample::Index>(),
                any::<prop::sample::Index>(),
                any::<char>(),
            ),
            1..6,
        ),
    )
        .prop_map(|(g, edits)| {
            let mut text: Vec<char> = render(&g)
                .into_iter()
                .map(|s| s.text)
                .collect::<String>()
                .chars()
                .collect();
            for (op, at, other, c) in edits {
                if text.is_empty() {
                    text.push(c);
                    continue;
                }
                let i = at.index(text.len());
                match op {
                    0 => {
                        text.remove(i);
                    }
                    1 => text.insert(i, c),
                    _ => {
                        let j = other.index(text.len());
                        text.swap(i, j);
                    }
                }
            }
            text.into_iter().collect()
        })
}

/// Whatever `load_sources` accepts dumps, and its dump reloads to itself.
fn check_no_panic(sources: &[Source]) -> Result<(), TestCaseError> {
    match config::load_sources(sources) {
        Ok(config) => {
            let dump = config.to_json();
            match config::load_sources(&dump_as_sources(&dump)) {
                Ok(again) => prop_assert_eq!(again.to_json(), dump),
                Err(e) => prop_assert!(false, "the dump of an accepted config is rejected: {}", e),
            }
        }
        Err(errors) => {
            prop_assert!(!errors.0.is_empty());
            let _ = errors.to_string();
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        check_no_panic(&[Source::new("bytes.yaml", text)])?;
    }

    #[test]
    fn yamlish_text_never_panics(a in yamlish(), b in yamlish()) {
        check_no_panic(&[Source::new("a.yaml", a), Source::new("b.yaml", b)])?;
    }

    #[test]
    fn damaged_configs_never_panic(text in damaged()) {
        check_no_panic(&[Source::new("damaged.yaml", text)])?;
    }
}

// ---------------------------------------------------------------------------------------
// `{}` string matches (header / query parameter presence).

const PRESENCE: &str = "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: presence}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers: {x-canary: {}}
      queryParams: {debug: {}}
      withoutHeaders: {x-skip: {}}
    route: [{destination: {host: reviews}}]
";

/// A `{}` match (presence; absence under `withoutHeaders`) loads as `StringMatch::Any`.
#[test]
fn presence_matches_load_as_any() {
    let config = load(&[Source::new("presence.yaml", PRESENCE)]);
    let m = &config.virtual_services()[0].spec.http[0].r#match[0];
    assert!(matches!(m.headers["x-canary"], StringMatch::Any));
    assert!(matches!(m.query_params["debug"], StringMatch::Any));
    assert!(matches!(m.without_headers["x-skip"], StringMatch::Any));
}

/// A `{}` match is a setting, not an unset field: the dump must keep it, or the dump (and
/// a config rebuilt from it) routes differently (`headers: {x-canary: {}}` dropped means
/// the route matches requests without the header).
#[test]
fn presence_matches_survive_the_dump() {
    let config = load(&[Source::new("presence.yaml", PRESENCE)]);
    let dump = config.to_json();
    let m = &dump["VirtualService"][0]["spec"]["http"][0]["match"][0];
    assert_eq!(m["headers"], json!({ "x-canary": {} }), "{m}");
    assert_eq!(m["queryParams"], json!({ "debug": {} }), "{m}");
    assert_eq!(m["withoutHeaders"], json!({ "x-skip": {} }), "{m}");
    let again = load(&dump_as_sources(&dump));
    let m = &again.virtual_services()[0].spec.http[0].r#match[0];
    assert!(
        m.headers.contains_key("x-canary"),
        "reloaded dump lost the presence match"
    );
}
