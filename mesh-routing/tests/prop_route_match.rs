//! Route matching as a property: for a generated VirtualService and generated requests,
//! the route (and match block) `RouteTable::select` picks is the one a simple reference
//! matcher written here picks, with Istio's semantics and Envoy's matching rules:
//!
//! - routes are tried in order and the first that matches wins; a route's `match` entries
//!   are ORed (the first that matches is the one reported), the conditions of one entry
//!   ANDed, and a route without `match` matches everything;
//! - `uri.exact` and `uri.regex` see the path without the query, `uri.prefix` the whole
//!   `:path`; `ignoreUriCase` folds ASCII case for exact and prefix, not for regex;
//!   regexes match the whole value;
//! - `headers`: a header sent several times is matched comma-joined; `{}` tests presence;
//!   `withoutHeaders` inverts, reading a missing header as `""` (`{}`: absent);
//! - `queryParams` test the first parameter of that name (`?a` has the value `""`);
//! - `port` and `sourceLabels` are decided when the table is built: an entry for another
//!   port or another workload is dropped, a route left without entries is dropped, and a
//!   host left without routes on a port gets Istio's default route (`default`) there;
//! - no matching route is a 404 `NR`.
//!
//! Regexes are built from a few literal-based pieces so that the reference can match them
//! without a regex engine.

#![allow(clippy::unwrap_used)]

use http::Request;
use mesh_core::config::{Source, load_sources};
use mesh_core::{Labels, ResponseFlags};
use mesh_routing::{RouteTable, SourceContext};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------
// Regexes the reference can match.

#[derive(Clone, Debug)]
enum Piece {
    Lit(&'static str),
    /// `[0-9]+`
    Digits,
    /// `.*`
    AnyText,
    /// `(a|b|...)`
    Alt(&'static [&'static str]),
    /// `c?`
    Opt(char),
    /// `(?i:lit)`
    NoCase(&'static str),
}

fn escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn regex_source(pieces: &[Piece]) -> String {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Lit(l) => escape(l),
            Piece::Digits => "[0-9]+".to_string(),
            Piece::AnyText => ".*".to_string(),
            Piece::Alt(alts) => format!(
                "({})",
                alts.iter().map(|a| escape(a)).collect::<Vec<_>>().join("|")
            ),
            Piece::Opt(c) => format!("{}?", escape(&c.to_string())),
            Piece::NoCase(l) => format!("(?i:{})", escape(l)),
        })
        .collect()
}

/// Whether `pieces` match all of `s`, by backtracking.
fn regex_matches(pieces: &[Piece], s: &str) -> bool {
    let Some((first, rest)) = pieces.split_first() else {
        return s.is_empty();
    };
    match first {
        Piece::Lit(l) => s.strip_prefix(l).is_some_and(|t| regex_matches(rest, t)),
        Piece::Digits => {
            let n = s.bytes().take_while(u8::is_ascii_digit).count();
            (1..=n).any(|k| regex_matches(rest, &s[k..]))
        }
        Piece::AnyText => s
            .char_indices()
            .map(|(i, _)| i)
            .chain([s.len()])
            .any(|i| !s[..i].contains('\n') && regex_matches(rest, &s[i..])),
        Piece::Alt(alts) => alts
            .iter()
            .any(|a| s.strip_prefix(a).is_some_and(|t| regex_matches(rest, t))),
        Piece::Opt(c) => {
            s.strip_prefix(*c).is_some_and(|t| regex_matches(rest, t)) || regex_matches(rest, s)
        }
        Piece::NoCase(l) => s
            .get(..l.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(l) && regex_matches(rest, &s[l.len()..])),
    }
}

/// A string the pieces match, chosen by `seed`.
fn regex_sample(pieces: &[Piece], seed: usize) -> String {
    let mut out = String::new();
    for (i, p) in pieces.iter().enumerate() {
        let pick = seed.rotate_left(i as u32 * 3);
        match p {
            Piece::Lit(l) => out.push_str(l),
            Piece::Digits => out.push_str(["1", "42", "007"][pick % 3]),
            Piece::AnyText => out.push_str(["", "x", "/a/b", "v2"][pick % 4]),
            Piece::Alt(alts) => out.push_str(alts[pick % alts.len()]),
            Piece::Opt(c) => {
                if pick.is_multiple_of(2) {
                    out.push(*c);
                }
            }
            Piece::NoCase(l) => {
                if pick.is_multiple_of(2) {
                    out.push_str(&l.to_ascii_uppercase());
                } else {
                    out.push_str(l);
                }
            }
        }
    }
    out
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        proptest::sample::select(vec![
            "/",
            "/api",
            "/v",
            "/items",
            "api",
            ".",
            "/a.b",
            "v",
            "x",
            "GE",
            "P",
            "/api/a-path-segment-past-24-bytes/"
        ])
        .prop_map(Piece::Lit),
        Just(Piece::Digits),
        Just(Piece::AnyText),
        proptest::sample::select(vec![
            &["api", "items"][..],
            &["a", "b"][..],
            &["/v1", "/v2"][..],
            &["GET", "HEAD"][..],
            &["", "x"][..],
        ])
        .prop_map(Piece::Alt),
        proptest::sample::select(vec!['/', 'x', '.']).prop_map(Piece::Opt),
        proptest::sample::select(vec!["api", "/API", "get"]).prop_map(Piece::NoCase),
    ]
}

fn pieces() -> impl Strategy<Value = Vec<Piece>> {
    proptest::collection::vec(piece(), 1..4)
}

// ---------------------------------------------------------------------------------------
// The generated VirtualService.

#[derive(Clone, Debug)]
enum Text {
    Exact(String),
    Prefix(String),
    Regex(Vec<Piece>),
    /// `{}`
    Any,
}

impl Text {
    fn matches(&self, value: &str) -> bool {
        match self {
            Text::Exact(v) => value == v,
            Text::Prefix(p) => value.starts_with(p.as_str()),
            Text::Regex(r) => regex_matches(r, value),
            Text::Any => true,
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Text::Exact(v) => json!({ "exact": v }),
            Text::Prefix(v) => json!({ "prefix": v }),
            Text::Regex(r) => json!({ "regex": regex_source(r) }),
            Text::Any => json!({}),
        }
    }

    /// A value this matches (for requests that hit), or a plain word.
    fn sample(&self, seed: usize) -> String {
        match self {
            Text::Exact(v) => v.clone(),
            Text::Prefix(p) => format!("{p}{}", ["", "1", "-x"][seed % 3]),
            Text::Regex(r) => regex_sample(r, seed),
            Text::Any => "a".to_string(),
        }
    }
}

#[derive(Clone, Debug)]
struct Block {
    uri: Option<Text>,
    ignore_uri_case: bool,
    method: Option<Text>,
    headers: Vec<(&'static str, Text)>,
    without_headers: Vec<(&'static str, Text)>,
    query: Vec<(&'static str, Text)>,
    port: Option<u16>,
    /// `sourceLabels: {app: ...}`
    source_app: Option<&'static str>,
}

#[derive(Clone, Debug)]
struct Route {
    /// Empty: no `match` (matches everything).
    blocks: Vec<Block>,
}

const HEADER_NAMES: [&str; 3] = ["x-a", "x-b", "end-user"];
const QUERY_NAMES: [&str; 4] = ["q", "v", "debug", "id"];
/// `a,b` and `1,42` are also what two values `a` and `b` (`1` and `42`) match as, joined.
const VALUES: [&str; 11] = [
    "", "a", "ab", "b", "1", "42", "v1", "x.y", "A", "a,b", "1,42",
];
const METHODS: [&str; 6] = ["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH"];
/// One longer than the table's inline prefix check (24 bytes), to cross it.
const SEGMENTS: [&str; 11] = [
    "api",
    "v1",
    "v2",
    "API",
    "a.b",
    "42",
    "x",
    "items",
    "a",
    "b",
    "a-path-segment-past-24-bytes",
];
const PORTS: [u16; 2] = [9080, 9081];
/// The proxy's own `app` label.
const APP: &str = "productpage";

fn path() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(proptest::sample::select(SEGMENTS.to_vec()), 0..4),
        any::<bool>(),
    )
        .prop_map(|(segments, slash)| {
            let mut p = format!("/{}", segments.join("/"));
            if slash && !segments.is_empty() {
                p.push('/');
            }
            p
        })
}

fn uri_text() -> impl Strategy<Value = Text> {
    prop_oneof![
        path().prop_map(Text::Exact),
        (path(), any::<Index>()).prop_map(|(p, cut)| {
            // A prefix of a path: `/`, `/ap`, `/api/v`, ...
            let end = 1 + cut.index(p.len());
            Text::Prefix(p[..end].to_string())
        }),
        pieces().prop_map(Text::Regex),
    ]
}

fn value_text(values: &'static [&'static str]) -> impl Strategy<Value = Text> {
    prop_oneof![
        3 => proptest::sample::select(values.to_vec()).prop_map(|v| Text::Exact(v.to_string())),
        2 => proptest::sample::select(values.to_vec()).prop_map(|v| {
            Text::Prefix(v.chars().take(1).collect())
        }),
        2 => pieces().prop_map(Text::Regex),
        2 => Just(Text::Any),
    ]
}

fn named<T: std::fmt::Debug + Clone>(
    names: &'static [&'static str],
    text: impl Strategy<Value = T>,
) -> impl Strategy<Value = Vec<(&'static str, T)>> {
    proptest::collection::btree_map(proptest::sample::select(names.to_vec()), text, 0..3)
        .prop_map(|m| m.into_iter().collect())
}

fn block() -> impl Strategy<Value = Block> {
    use proptest::option::weighted;
    (
        weighted(0.7, uri_text()),
        weighted(0.35, Just(true)),
        weighted(0.3, value_text(&METHODS)),
        named(&HEADER_NAMES, value_text(&VALUES)),
        weighted(0.25, named(&HEADER_NAMES, value_text(&VALUES))),
        named(&QUERY_NAMES, value_text(&VALUES)),
        weighted(0.3, proptest::sample::select(PORTS.to_vec())),
        weighted(0.2, proptest::sample::select(vec![APP, "other"])),
    )
        .prop_map(
            |(uri, ignore_uri_case, method, headers, without_headers, query, port, source_app)| {
                Block {
                    uri,
                    ignore_uri_case: ignore_uri_case.unwrap_or(false),
                    method,
                    headers,
                    without_headers: without_headers.unwrap_or_default(),
                    query,
                    port,
                    source_app,
                }
            },
        )
}

fn routes() -> impl Strategy<Value = Vec<Route>> {
    proptest::collection::vec(
        prop_oneof![
            1 => Just(Vec::new()),
            6 => proptest::collection::vec(block(), 1..4),
        ]
        .prop_map(|blocks| Route { blocks }),
        1..7,
    )
}

fn config_text(routes: &[Route]) -> String {
    let http: Vec<Value> = routes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut route = json!({
                "name": format!("r{i}"),
                "route": [{ "destination": { "host": "svc" } }],
            });
            if !r.blocks.is_empty() {
                let blocks: Vec<Value> = r
                    .blocks
                    .iter()
                    .enumerate()
                    .map(|(j, b)| {
                        let mut m = json!({ "name": format!("b{j}") });
                        if let Some(uri) = &b.uri {
                            m["uri"] = uri.to_json();
                        }
                        if b.ignore_uri_case {
                            m["ignoreUriCase"] = json!(true);
                        }
                        if let Some(method) = &b.method {
                            m["method"] = method.to_json();
                        }
                        for (field, list) in [
                            ("headers", &b.headers),
                            ("withoutHeaders", &b.without_headers),
                            ("queryParams", &b.query),
                        ] {
                            if !list.is_empty() {
                                let map: serde_json::Map<String, Value> = list
                                    .iter()
                                    .map(|(k, t)| (k.to_string(), t.to_json()))
                                    .collect();
                                m[field] = Value::Object(map);
                            }
                        }
                        if let Some(port) = b.port {
                            m["port"] = json!(port);
                        }
                        if let Some(app) = b.source_app {
                            m["sourceLabels"] = json!({ "app": app });
                        }
                        m
                    })
                    .collect();
                route["match"] = json!(blocks);
            }
            route
        })
        .collect();
    let se = json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": { "name": "svc" },
        "spec": {
            "hosts": ["svc"],
            "ports": [{ "number": 9080, "name": "http" }, { "number": 9081, "name": "http-alt" }],
            "resolution": "STATIC",
            "endpoints": [{ "address": "10.0.0.1" }],
        },
    });
    let vs = json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": { "name": "svc" },
        "spec": { "hosts": ["svc"], "http": http },
    });
    // JSON is YAML.
    format!("{se}\n---\n{vs}\n")
}

// ---------------------------------------------------------------------------------------
// Requests, and the reference matcher.

#[derive(Clone, Debug)]
struct Req {
    method: &'static str,
    path: String,
    /// Without the `?`.
    query: Option<String>,
    headers: Vec<(&'static str, String)>,
    port: u16,
    host: &'static str,
}

impl Req {
    fn path_and_query(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }

    fn header(&self, name: &str) -> Option<String> {
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect();
        (!values.is_empty()).then(|| values.join(","))
    }

    fn query_param(&self, name: &str) -> Option<&str> {
        self.query.as_deref()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then_some(v)
        })
    }

    fn to_http(&self) -> Request<()> {
        let mut b = Request::builder()
            .method(self.method)
            .uri(self.path_and_query())
            .header("host", format!("{}:{}", self.host, self.port));
        for (name, value) in &self.headers {
            b = b.header(*name, value.as_str());
        }
        b.body(()).unwrap()
    }
}

/// Whether the table keeps `block` for this proxy on `port` (decided at build).
fn kept(block: &Block, port: u16) -> bool {
    block.port.is_none_or(|p| p == port) && block.source_app.is_none_or(|app| app == APP)
}

fn uri_matches(block: &Block, req: &Req) -> bool {
    let Some(uri) = &block.uri else {
        return true;
    };
    let fold = block.ignore_uri_case;
    match uri {
        Text::Exact(v) if fold => req.path.eq_ignore_ascii_case(v),
        Text::Exact(v) => req.path == *v,
        Text::Prefix(p) if fold => req
            .path_and_query()
            .get(..p.len())
            .is_some_and(|h| h.eq_ignore_ascii_case(p)),
        Text::Prefix(p) => req.path_and_query().starts_with(p.as_str()),
        Text::Regex(r) => regex_matches(r, &req.path),
        Text::Any => true,
    }
}

fn block_matches(block: &Block, req: &Req) -> bool {
    kept(block, req.port)
        && uri_matches(block, req)
        && block.method.as_ref().is_none_or(|m| m.matches(req.method))
        && block
            .headers
            .iter()
            .all(|(name, t)| req.header(name).is_some_and(|v| t.matches(&v)))
        && block.without_headers.iter().all(|(name, t)| match t {
            Text::Any => req.header(name).is_none(),
            t => !t.matches(&req.header(name).unwrap_or_default()),
        })
        && block
            .query
            .iter()
            .all(|(name, t)| req.query_param(name).is_some_and(|v| t.matches(v)))
}

/// The reference's choice: `Some((route name, block name))`, `None` for no route.
fn reference(routes: &[Route], req: &Req) -> Option<(String, Option<String>)> {
    let survives = |r: &Route| r.blocks.is_empty() || r.blocks.iter().any(|b| kept(b, req.port));
    if !routes.iter().any(survives) {
        return Some(("default".to_string(), None));
    }
    routes.iter().enumerate().find_map(|(i, r)| {
        if r.blocks.is_empty() {
            return Some((format!("r{i}"), None));
        }
        let j = r.blocks.iter().position(|b| block_matches(b, req))?;
        Some((format!("r{i}"), Some(format!("b{j}"))))
    })
}

/// Numbers from which a request is built against a given VirtualService, so that many
/// requests hit its matchers (a request made only of random words rarely would).
#[derive(Clone, Debug)]
struct Seed {
    method: (u8, Index),
    path: (u8, Index, usize),
    suffix: Option<Index>,
    upper: bool,
    query: Vec<(Index, u8, Index)>,
    /// Name, value source, value, and whether a value with commas is split into lines.
    headers: Vec<(Index, u8, Index, bool)>,
    port: Index,
    host: Index,
}

fn seed() -> impl Strategy<Value = Seed> {
    let kv = || proptest::collection::vec((any::<Index>(), 0u8..3, any::<Index>()), 0..4);
    (
        (0u8..2, any::<Index>()),
        (0u8..3, any::<Index>(), any::<usize>()),
        proptest::option::of(any::<Index>()),
        proptest::bool::weighted(0.3),
        proptest::option::weighted(0.7, kv()),
        proptest::collection::vec(
            (any::<Index>(), 0u8..3, any::<Index>(), any::<bool>()),
            0..4,
        ),
        any::<Index>(),
        any::<Index>(),
    )
        .prop_map(
            |(method, path, suffix, upper, query, headers, port, host)| Seed {
                method,
                path,
                suffix,
                upper,
                query: query.unwrap_or_default(),
                headers,
                port,
                host,
            },
        )
}

/// Every `Text` of the VirtualService, to draw request values from.
fn texts<'a>(routes: &'a [Route], pick: impl Fn(&'a Block) -> Vec<&'a Text>) -> Vec<&'a Text> {
    routes
        .iter()
        .flat_map(|r| &r.blocks)
        .flat_map(pick)
        .collect()
}

fn build_request(routes: &[Route], s: &Seed) -> Req {
    let uris = texts(routes, |b| b.uri.iter().collect());
    let methods = texts(routes, |b| b.method.iter().collect());
    let values = texts(routes, |b| {
        b.headers
            .iter()
            .chain(&b.without_headers)
            .chain(&b.query)
            .map(|(_, t)| t)
            .collect()
    });
    let from = |pool: &[&Text], i: &Index, seed: usize| -> Option<String> {
        (!pool.is_empty()).then(|| pool[i.index(pool.len())].sample(seed))
    };
    let method = match s.method.0 {
        0 => {
            from(&methods, &s.method.1, 0).and_then(|m| METHODS.iter().find(|x| **x == m).copied())
        }
        _ => None,
    }
    .unwrap_or(METHODS[s.method.1.index(METHODS.len())]);
    let mut path = match s.path.0 {
        0 => None,
        _ => from(&uris, &s.path.1, s.path.2).filter(|p| p.starts_with('/')),
    }
    .unwrap_or_else(|| {
        let n = s.path.2 % 4;
        let segs: Vec<&str> = (0..n)
            .map(|k| {
                SEGMENTS[(s.path.2 / 4 + k * 7 + s.path.1.index(SEGMENTS.len())) % SEGMENTS.len()]
            })
            .collect();
        format!("/{}", segs.join("/"))
    });
    if let Some(extra) = &s.suffix {
        path.push('/');
        path.push_str(SEGMENTS[extra.index(SEGMENTS.len())]);
    }
    if s.upper {
        path = path.to_ascii_uppercase();
    }
    // What a request line or header holds: URI path characters, no `?`, `&`, `=`, `%`.
    let clean = |v: String| -> String {
        v.chars()
            .filter(|c| c.is_ascii_alphanumeric() || "/._~-".contains(*c))
            .collect()
    };
    let value = |kind: u8, i: &Index| -> String {
        match kind {
            0 => VALUES[i.index(VALUES.len())].to_string(),
            _ => from(&values, i, i.index(1000))
                .map(clean)
                .unwrap_or_default(),
        }
    };
    let query = (!s.query.is_empty()).then(|| {
        s.query
            .iter()
            .map(|(name, kind, v)| {
                let name = QUERY_NAMES[name.index(QUERY_NAMES.len())];
                if *kind == 2 && v.index(2) == 0 {
                    name.to_string()
                } else {
                    format!("{name}={}", value(*kind, v))
                }
            })
            .collect::<Vec<_>>()
            .join("&")
    });
    // A value with a comma is sent as two header lines half of the time.
    let headers = s
        .headers
        .iter()
        .flat_map(|(name, kind, v, split)| {
            let name = HEADER_NAMES[name.index(HEADER_NAMES.len())];
            let value = value(*kind, v);
            if *split {
                value
                    .split(',')
                    .map(|part| (name, part.to_string()))
                    .collect()
            } else {
                vec![(name, value)]
            }
        })
        .collect();
    Req {
        method,
        path: clean(path),
        query,
        headers,
        port: PORTS[s.port.index(PORTS.len())],
        host: ["svc", "svc.default", "svc.default.svc.cluster.local", "SVC"][s.host.index(4)],
    }
}

fn proxy() -> SourceContext {
    SourceContext::sidecar("default", [("app", APP)].into_iter().collect::<Labels>())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The table picks the route (and block) the reference picks, or none when it does.
    #[test]
    fn table_picks_the_first_matching_route(
        routes in routes(),
        seeds in proptest::collection::vec(seed(), 48),
    ) {
        let text = config_text(&routes);
        let config = load_sources(&[Source::new("vs.yaml", text.clone())])
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        let table = RouteTable::build(&config, &proxy());
        prop_assert!(table.warnings().is_empty(), "{:?}", table.warnings());
        for s in &seeds {
            let req = build_request(&routes, s);
            let want = reference(&routes, &req);
            let got = table.select(&req.to_http());
            match (&want, got) {
                (Some((route, block)), Ok(sel)) => {
                    prop_assert_eq!(sel.route_name(), Some(route.as_str()), "{:?}", req);
                    prop_assert_eq!(sel.match_name(), block.as_deref(), "{:?}", req);
                }
                (None, Err(e)) => {
                    prop_assert_eq!(e.flags(), ResponseFlags::NO_ROUTE_FOUND, "{:?}", req);
                }
                (want, got) => prop_assert!(
                    false,
                    "request {:?}: reference {:?}, table {:?}",
                    req,
                    want,
                    got.map(|s| (s.route_name().map(str::to_owned), s.match_name().map(str::to_owned)))
                ),
            }
        }
    }
}

/// The reference regex matcher agrees with its own samples and with a few hand cases, so
/// a disagreement above is the table's.
#[test]
fn reference_regexes_are_sound() {
    use Piece::*;
    let r = [Lit("/api"), Digits, AnyText];
    assert_eq!(regex_source(&r), "/api[0-9]+.*");
    assert!(regex_matches(&r, "/api42/x"));
    assert!(!regex_matches(&r, "/api/x"));
    let r = [Opt('/'), Alt(&["api", "items"]), NoCase("/API")];
    assert_eq!(regex_source(&r), "/?(api|items)(?i:/API)");
    assert!(regex_matches(&r, "items/api") && regex_matches(&r, "/api/Api"));
    assert!(!regex_matches(&r, "//api/api"));
    assert_eq!(regex_source(&[Lit("a.b")]), "a\\.b");
    assert!(!regex_matches(&[Lit("a.b")], "axb"));
    for seed in 0..64 {
        assert!(regex_matches(&r, &regex_sample(&r, seed)));
    }
}
