//! Request matching: Istio's `HTTPMatchRequest` compiled into conditions, with Envoy's
//! semantics.
//!
//! A route's match blocks are OR-ed, the fields of one block AND-ed. What is static for this
//! proxy (`port`, `sourceLabels`, `sourceNamespace`, `gateways`) never reaches this module:
//! the table drops blocks that cannot match when it is built. What is left is compiled once:
//! header names are `HeaderName`s, regexes compiled (full-string matches, as Envoy's
//! `safe_regex`) together with the literal prefixes every match must start with, so most
//! non-matching values are rejected by a `starts_with` before any regex runs; and the
//! conditions of a block are sorted so cheap tests run first. Matching allocates nothing,
//! except for a header sent several times, whose values Envoy matches comma-joined.
//!
//! Envoy's rules copied here:
//! - `uri.exact` and `uri.regex` see the path without the query string; `uri.prefix` sees
//!   the whole `:path`, query included. `ignoreUriCase` applies to exact and prefix only.
//! - `headers` with `{}` test presence; `withoutHeaders` inverts the match and treats a
//!   missing header as the empty string (so `withoutHeaders: {x: {exact: a}}` matches a
//!   request without `x`), except `{}`, which means "is absent".
//! - `queryParams` look at the first parameter of that name, undecoded; `{}` tests presence.
//! - `authority` is matched against the request's authority as sent (port included);
//!   `scheme` against the URI scheme, else `https` on a TLS connection, else `http`.

use std::borrow::Cow;

use http::{HeaderMap, HeaderName, Request};
use mesh_core::config::StringMatch;
use mesh_core::config::networking::HttpMatchRequest;
use mesh_core::config::types::Regex;
use mesh_core::conn::ClientInfo;
use regex_syntax::hir::literal::{ExtractKind, Extractor};

/// What matching reads from a request, borrowed once.
#[derive(Debug)]
pub(crate) struct RequestView<'a> {
    pub method: &'a str,
    /// The path without the query string.
    pub path: &'a str,
    /// The path with the query string (`:path`).
    pub path_and_query: &'a str,
    pub query: Option<&'a str>,
    pub scheme: &'a str,
    /// The authority the request names (URI authority, else `Host`), as sent.
    pub authority: &'a str,
    pub headers: &'a HeaderMap,
}

impl<'a> RequestView<'a> {
    pub(crate) fn new<B>(req: &'a Request<B>, authority: &'a str) -> Self {
        let uri = req.uri();
        let path = uri.path();
        let scheme = match uri.scheme_str() {
            Some(scheme) => scheme,
            None if req.extensions().get::<ClientInfo>().is_some_and(|c| c.tls) => "https",
            None => "http",
        };
        RequestView {
            method: req.method().as_str(),
            path,
            path_and_query: uri.path_and_query().map_or(path, |pq| pq.as_str()),
            query: uri.query(),
            scheme,
            authority,
            headers: req.headers(),
        }
    }

    /// The header's value for matching: absent is `None`; several values are comma-joined
    /// (Envoy's rule), the only case that allocates.
    fn header(&self, name: &HeaderName) -> Option<Cow<'a, str>> {
        let mut values = self.headers.get_all(name).iter();
        let first = values.next()?;
        let Some(second) = values.next() else {
            return Some(String::from_utf8_lossy(first.as_bytes()));
        };
        let mut joined = String::from_utf8_lossy(first.as_bytes()).into_owned();
        for value in std::iter::once(second).chain(values) {
            joined.push(',');
            joined.push_str(&String::from_utf8_lossy(value.as_bytes()));
        }
        Some(Cow::Owned(joined))
    }

    /// The first query parameter called `name`, undecoded (`a` in `?a` is `""`).
    fn query_param(&self, name: &str) -> Option<&'a str> {
        self.query?.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == name).then_some(value)
        })
    }
}

/// A full-match regex with the literal prefixes any match starts with (when the pattern
/// has a usable set), checked first.
#[derive(Clone, Debug)]
pub(crate) struct Pattern {
    regex: Regex,
    /// Empty: no prefilter.
    prefixes: Box<[Box<str>]>,
}

impl Pattern {
    /// At most this many prefixes are worth testing one by one.
    const MAX_PREFIXES: usize = 8;

    pub(crate) fn new(regex: &Regex) -> Pattern {
        Pattern {
            regex: regex.clone(),
            prefixes: literal_prefixes(regex.as_str()).unwrap_or_default(),
        }
    }

    pub(crate) fn is_match(&self, value: &str) -> bool {
        (self.prefixes.is_empty() || self.prefixes.iter().any(|p| value.starts_with(&**p)))
            && self.regex.is_match(value)
    }

    fn guarded(&self) -> bool {
        !self.prefixes.is_empty()
    }

    /// What every match starts with: the common start of the prefixes.
    fn common_prefix(&self) -> Option<&[u8]> {
        let (first, rest) = self.prefixes.split_first()?;
        Some(rest.iter().fold(first.as_bytes(), |common, p| {
            common_start(common, p.as_bytes())
        }))
    }
}

fn common_start<'a>(a: &'a [u8], b: &[u8]) -> &'a [u8] {
    let n = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    &a[..n]
}

/// The literals every match of `pattern` (anchored at the start, as a full match is) begins
/// with; `None` when they are unknown, empty or too many to help.
fn literal_prefixes(pattern: &str) -> Option<Box<[Box<str>]>> {
    let hir = regex_syntax::Parser::new().parse(pattern).ok()?;
    let seq = Extractor::new().kind(ExtractKind::Prefix).extract(&hir);
    let literals = seq.literals()?;
    let text = |bytes: &[u8]| -> Option<Box<str>> {
        let text = std::str::from_utf8(bytes).ok()?;
        (!text.is_empty()).then(|| text.into())
    };
    if literals.is_empty() {
        None
    } else if literals.len() <= Pattern::MAX_PREFIXES {
        literals.iter().map(|l| text(l.as_bytes())).collect()
    } else {
        // Many alternatives (`v[0-9]` is ten): their common start still rejects most values.
        Some(Box::new([text(seq.longest_common_prefix()?)?]))
    }
}

/// A compiled `StringMatch` (exact, prefix, full-match regex, or `{}`: anything).
#[derive(Clone, Debug)]
pub(crate) enum Text {
    Exact(Box<str>),
    Prefix(Box<str>),
    Regex(Pattern),
    Any,
}

impl Text {
    pub(crate) fn compile(m: &StringMatch) -> Text {
        match m {
            StringMatch::Exact(v) => Text::Exact(v.as_str().into()),
            StringMatch::Prefix(v) => Text::Prefix(v.as_str().into()),
            StringMatch::Regex(r) => Text::Regex(Pattern::new(r)),
            StringMatch::Any => Text::Any,
        }
    }

    pub(crate) fn matches(&self, value: &str) -> bool {
        match self {
            Text::Exact(v) => value == &**v,
            Text::Prefix(p) => value.starts_with(&**p),
            Text::Regex(r) => r.is_match(value),
            Text::Any => true,
        }
    }

    /// 0 for a plain comparison, 1 for a prefix-guarded regex, 4 for a bare regex.
    fn cost(&self) -> u8 {
        match self {
            Text::Regex(r) if r.guarded() => 1,
            Text::Regex(_) => 4,
            _ => 0,
        }
    }
}

/// A compiled `uri` match.
#[derive(Clone, Debug)]
pub(crate) enum UriMatch {
    Exact { value: Box<str>, ignore_case: bool },
    Prefix { value: Box<str>, ignore_case: bool },
    Regex(Pattern),
}

impl UriMatch {
    fn compile(m: &StringMatch, ignore_case: bool) -> Option<UriMatch> {
        Some(match m {
            StringMatch::Exact(v) => UriMatch::Exact {
                value: v.as_str().into(),
                ignore_case,
            },
            StringMatch::Prefix(v) => UriMatch::Prefix {
                value: v.as_str().into(),
                ignore_case,
            },
            StringMatch::Regex(r) => UriMatch::Regex(Pattern::new(r)),
            // `uri: {}`: Istio keeps its catch-all `prefix: /`.
            StringMatch::Any => return None,
        })
    }

    fn matches(&self, v: &RequestView<'_>) -> bool {
        match self {
            UriMatch::Exact { value, ignore_case } => {
                if *ignore_case {
                    v.path.eq_ignore_ascii_case(value)
                } else {
                    v.path == &**value
                }
            }
            UriMatch::Prefix { value, ignore_case } => {
                if *ignore_case {
                    v.path_and_query
                        .as_bytes()
                        .get(..value.len())
                        .is_some_and(|head| head.eq_ignore_ascii_case(value.as_bytes()))
                } else {
                    v.path_and_query.starts_with(&**value)
                }
            }
            UriMatch::Regex(r) => r.is_match(v.path),
        }
    }

    /// What `:path` must start with for this to match (case-sensitive matches only).
    fn required_prefix(&self) -> Option<&[u8]> {
        match self {
            UriMatch::Exact {
                value,
                ignore_case: false,
            }
            | UriMatch::Prefix {
                value,
                ignore_case: false,
            } => Some(value.as_bytes()),
            UriMatch::Regex(pattern) => pattern.common_prefix(),
            _ => None,
        }
    }

    /// What Envoy's `prefix_rewrite` replaces when this matcher selected the route.
    fn rewrite_base(&self) -> RewriteBase {
        match self {
            UriMatch::Prefix { value, .. } => RewriteBase::Prefix(value.len()),
            UriMatch::Exact { .. } | UriMatch::Regex(_) => RewriteBase::WholePath,
        }
    }
}

/// The part of the request path a `rewrite.uri` replaces, fixed by the match block that
/// selected the route (Envoy's `prefix_rewrite`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RewriteBase {
    /// The first `n` bytes of `:path` (a prefix match; a block without a uri match is
    /// Istio's `prefix: /`, so `n` is 1).
    Prefix(usize),
    /// The whole path, the query string kept (an exact or regex match).
    WholePath,
}

/// One compiled condition of a match block.
#[derive(Clone, Debug)]
enum Condition {
    Uri(UriMatch),
    Method(Text),
    Scheme(Text),
    Authority(Text),
    /// `Text::Any` tests presence.
    Header(HeaderName, Text),
    /// Inverted, a missing header read as `""`; `Any` means "absent".
    WithoutHeader(HeaderName, Text),
    /// `Any` tests presence.
    Query(Box<str>, Text),
    /// A header name that is not one (validation rejects those, so this is defensive).
    Never,
}

impl Condition {
    fn matches(&self, v: &RequestView<'_>) -> bool {
        match self {
            Condition::Uri(m) => m.matches(v),
            Condition::Method(m) => m.matches(v.method),
            Condition::Scheme(m) => m.matches(v.scheme),
            Condition::Authority(m) => m.matches(v.authority),
            Condition::Header(name, m) => v.header(name).is_some_and(|value| m.matches(&value)),
            Condition::WithoutHeader(name, Text::Any) => !v.headers.contains_key(name),
            Condition::WithoutHeader(name, m) => !m.matches(&v.header(name).unwrap_or_default()),
            Condition::Query(name, m) => v.query_param(name).is_some_and(|value| m.matches(value)),
            Condition::Never => false,
        }
    }

    /// Rough cost, to test cheap conditions first (the block is an AND, order is free):
    /// what is at hand before what needs a header lookup or a query scan, comparisons
    /// before regexes.
    fn cost(&self) -> u8 {
        match self {
            Condition::Never => 0,
            Condition::Uri(UriMatch::Regex(r)) => Text::Regex(r.clone()).cost() + 1,
            Condition::Uri(_) => 1,
            Condition::Method(m) | Condition::Scheme(m) | Condition::Authority(m) => 1 + m.cost(),
            Condition::Header(_, m) | Condition::WithoutHeader(_, m) => 3 + m.cost(),
            Condition::Query(_, m) => 4 + m.cost(),
        }
    }
}

/// One `HTTPMatchRequest`: every condition must hold.
#[derive(Clone, Debug)]
pub(crate) struct MatchBlock {
    /// The block's `name`, for logs.
    pub name: Option<Box<str>>,
    conditions: Box<[Condition]>,
    pub rewrite_base: RewriteBase,
    /// What `:path` must start with for the block to match, if anything.
    required: Option<Box<[u8]>>,
}

impl MatchBlock {
    /// A route without `match`: everything (Istio's `prefix: /`).
    pub(crate) fn catch_all() -> MatchBlock {
        MatchBlock {
            name: None,
            conditions: Box::new([]),
            rewrite_base: RewriteBase::Prefix(1),
            required: None,
        }
    }

    /// Compiles the request-dependent part of a match; `port`, source and gateway fields
    /// are the table's business.
    pub(crate) fn compile(m: &HttpMatchRequest) -> MatchBlock {
        let mut conditions = Vec::new();
        let uri = m
            .uri
            .as_ref()
            .and_then(|u| UriMatch::compile(u, m.ignore_uri_case == Some(true)));
        let rewrite_base = uri
            .as_ref()
            .map_or(RewriteBase::Prefix(1), UriMatch::rewrite_base);
        let required = uri
            .as_ref()
            .and_then(UriMatch::required_prefix)
            .filter(|p| !p.is_empty())
            .map(Into::into);
        conditions.extend(uri.map(Condition::Uri));
        conditions.extend(
            m.method
                .as_ref()
                .map(|t| Condition::Method(Text::compile(t))),
        );
        conditions.extend(
            m.scheme
                .as_ref()
                .map(|t| Condition::Scheme(Text::compile(t))),
        );
        conditions.extend(
            m.authority
                .as_ref()
                .map(|t| Condition::Authority(Text::compile(t))),
        );
        let header = |name: &String, matcher: &StringMatch, without: bool| {
            match HeaderName::from_bytes(name.as_bytes()) {
                Ok(name) if without => Condition::WithoutHeader(name, Text::compile(matcher)),
                Ok(name) => Condition::Header(name, Text::compile(matcher)),
                // An invalid name is never present: the header test fails, its inverse holds.
                Err(_) if without => Condition::WithoutHeader(
                    HeaderName::from_static("x-mesh-invalid-header-name"),
                    Text::Any,
                ),
                Err(_) => Condition::Never,
            }
        };
        conditions.extend(m.headers.iter().map(|(n, v)| header(n, v, false)));
        conditions.extend(m.without_headers.iter().map(|(n, v)| header(n, v, true)));
        conditions.extend(
            m.query_params
                .iter()
                .map(|(name, v)| Condition::Query(name.as_str().into(), Text::compile(v))),
        );
        conditions.sort_by_key(Condition::cost);
        MatchBlock {
            name: m.name.as_deref().map(Into::into),
            conditions: conditions.into_boxed_slice(),
            rewrite_base,
            required,
        }
    }

    pub(crate) fn matches(&self, v: &RequestView<'_>) -> bool {
        self.conditions.iter().all(|c| c.matches(v))
    }
}

/// A route's necessary `:path` prefix (the common start of its blocks' requirements), kept
/// inline as masked words: a virtual host scans these side by side and only follows the
/// pointer to a route whose prefix admits the request, so a non-matching route costs three
/// word compares.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QuickPrefix {
    words: [u64; QUICK_WORDS],
    mask: [u64; QUICK_WORDS],
}

const QUICK_WORDS: usize = 3;
/// Longer requirements are cut: any start of a necessary prefix is necessary too.
const QUICK_BYTES: usize = QUICK_WORDS * 8;

/// The first bytes of a request's `:path`, zero-padded, to test [`QuickPrefix`]es against.
/// (A path never holds a zero byte, so padding cannot pass for a prefix's bytes.)
#[derive(Clone, Copy, Debug)]
pub(crate) struct QuickKey([u64; QUICK_WORDS]);

impl QuickKey {
    pub(crate) fn new(path_and_query: &str) -> QuickKey {
        QuickKey(words(path_and_query.as_bytes()))
    }
}

fn words(bytes: &[u8]) -> [u64; QUICK_WORDS] {
    let mut buf = [0u8; QUICK_BYTES];
    let n = bytes.len().min(QUICK_BYTES);
    buf[..n].copy_from_slice(&bytes[..n]);
    std::array::from_fn(|i| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&buf[i * 8..i * 8 + 8]);
        u64::from_le_bytes(word)
    })
}

impl QuickPrefix {
    pub(crate) fn for_blocks(blocks: &[MatchBlock]) -> QuickPrefix {
        let mut common: Option<&[u8]> = None;
        for block in blocks {
            let Some(required) = block.required.as_deref() else {
                return QuickPrefix::new(b"");
            };
            common = Some(common.map_or(required, |c| common_start(c, required)));
        }
        QuickPrefix::new(common.unwrap_or_default())
    }

    fn new(prefix: &[u8]) -> QuickPrefix {
        let prefix = &prefix[..prefix.len().min(QUICK_BYTES)];
        QuickPrefix {
            words: words(prefix),
            mask: words(&[0xff; QUICK_BYTES][..prefix.len()]),
        }
    }

    #[inline]
    pub(crate) fn admits(&self, key: &QuickKey) -> bool {
        (0..QUICK_WORDS).all(|i| key.0[i] & self.mask[i] == self.words[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles one `HTTPMatchRequest` written as JSON (the same serde model as the YAML).
    fn block(json: &str) -> MatchBlock {
        let m: HttpMatchRequest = serde_json::from_str(json).expect("a valid HTTPMatchRequest");
        MatchBlock::compile(&m)
    }

    fn request(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().uri(uri);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).expect("request")
    }

    fn hits(b: &MatchBlock, req: &Request<()>) -> bool {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| req.headers().get("host").and_then(|h| h.to_str().ok()))
            .unwrap_or("");
        b.matches(&RequestView::new(req, authority))
    }

    #[test]
    fn uri_exact_prefix_regex() {
        let exact = block(r#"{"uri": {"exact": "/api"}}"#);
        assert!(hits(&exact, &request("/api", &[])));
        assert!(
            hits(&exact, &request("/api?x=1", &[])),
            "query is not part of the path"
        );
        assert!(!hits(&exact, &request("/api/", &[])));
        assert!(!hits(&exact, &request("/API", &[])));

        let prefix = block(r#"{"uri": {"prefix": "/v1"}}"#);
        assert!(hits(&prefix, &request("/v1", &[])));
        assert!(hits(&prefix, &request("/v1/api", &[])));
        assert!(
            hits(&prefix, &request("/v1api", &[])),
            "Envoy prefixes are not segment-aware"
        );
        assert!(!hits(&prefix, &request("/v2", &[])));
        assert_eq!(prefix.rewrite_base, RewriteBase::Prefix(3));

        let regex = block(r#"{"uri": {"regex": "/api/v[0-9]+"}}"#);
        assert!(hits(&regex, &request("/api/v2", &[])));
        assert!(
            hits(&regex, &request("/api/v2?debug", &[])),
            "regex sees the path only"
        );
        assert!(
            !hits(&regex, &request("/api/v2/users", &[])),
            "full-string match"
        );
        assert!(!hits(&regex, &request("/x/api/v2", &[])));
        assert_eq!(regex.rewrite_base, RewriteBase::WholePath);
    }

    #[test]
    fn ignore_uri_case_covers_exact_and_prefix_not_regex() {
        let exact = block(r#"{"uri": {"exact": "/Api"}, "ignoreUriCase": true}"#);
        assert!(hits(&exact, &request("/aPI", &[])));
        let prefix = block(r#"{"uri": {"prefix": "/V1/"}, "ignoreUriCase": true}"#);
        assert!(hits(&prefix, &request("/v1/users", &[])));
        assert!(
            !hits(&prefix, &request("/v", &[])),
            "shorter than the prefix"
        );
        let regex = block(r#"{"uri": {"regex": "/api"}, "ignoreUriCase": true}"#);
        assert!(
            !hits(&regex, &request("/API", &[])),
            "Envoy ignores case_sensitive for regex"
        );
    }

    #[test]
    fn headers_exact_prefix_regex_and_presence() {
        let b = block(r#"{"headers": {"end-user": {"exact": "jason"}}}"#);
        assert!(hits(&b, &request("/", &[("end-user", "jason")])));
        assert!(!hits(&b, &request("/", &[("end-user", "Jason")])));
        assert!(!hits(&b, &request("/", &[])));
        let b = block(r#"{"headers": {"x-v": {"prefix": "v2"}}}"#);
        assert!(hits(&b, &request("/", &[("x-v", "v2-beta")])));
        assert!(!hits(&b, &request("/", &[("x-v", "v1")])));
        let b = block(r#"{"headers": {"x-v": {"regex": "v[12]"}}}"#);
        assert!(hits(&b, &request("/", &[("x-v", "v1")])));
        assert!(
            !hits(&b, &request("/", &[("x-v", "v12")])),
            "full-string match"
        );
        let b = block(r#"{"headers": {"x-present": {}}}"#);
        assert!(hits(&b, &request("/", &[("x-present", "")])));
        assert!(!hits(&b, &request("/", &[])));
        // Several values are matched comma-joined, as Envoy does.
        let b = block(r#"{"headers": {"x-v": {"exact": "a,b"}}}"#);
        assert!(hits(&b, &request("/", &[("x-v", "a"), ("x-v", "b")])));
    }

    #[test]
    fn without_headers_inverts_with_missing_as_empty() {
        let b = block(r#"{"withoutHeaders": {"x-debug": {}}}"#);
        assert!(hits(&b, &request("/", &[])));
        assert!(!hits(&b, &request("/", &[("x-debug", "1")])));
        let b = block(r#"{"withoutHeaders": {"end-user": {"exact": "jason"}}}"#);
        assert!(
            hits(&b, &request("/", &[])),
            "missing reads as empty, which is not jason"
        );
        assert!(hits(&b, &request("/", &[("end-user", "alice")])));
        assert!(!hits(&b, &request("/", &[("end-user", "jason")])));
        let b = block(r#"{"withoutHeaders": {"x-v": {"prefix": ""}}}"#);
        assert!(
            !hits(&b, &request("/", &[])),
            "an empty prefix matches the empty string"
        );
    }

    #[test]
    fn query_params_exact_prefix_regex_and_presence() {
        let b = block(r#"{"queryParams": {"page": {"exact": "2"}}}"#);
        assert!(hits(&b, &request("/list?page=2", &[])));
        assert!(hits(&b, &request("/list?sort=a&page=2", &[])));
        assert!(!hits(&b, &request("/list?page=3", &[])));
        assert!(
            !hits(&b, &request("/list?page=3&page=2", &[])),
            "the first value counts"
        );
        assert!(!hits(&b, &request("/list", &[])));
        let b = block(r#"{"queryParams": {"q": {"prefix": "ab"}}}"#);
        assert!(hits(&b, &request("/?q=abc", &[])));
        let b = block(r#"{"queryParams": {"id": {"regex": "[0-9]+"}}}"#);
        assert!(hits(&b, &request("/?id=42", &[])));
        assert!(!hits(&b, &request("/?id=42x", &[])));
        let b = block(r#"{"queryParams": {"debug": {}}}"#);
        assert!(hits(&b, &request("/?debug", &[])));
        assert!(!hits(&b, &request("/?debugger=1", &[])));
    }

    #[test]
    fn authority_scheme_and_method() {
        let b = block(r#"{"authority": {"exact": "reviews:9080"}}"#);
        assert!(hits(&b, &request("/", &[("host", "reviews:9080")])));
        assert!(!hits(&b, &request("/", &[("host", "reviews")])));
        let b = block(r#"{"authority": {"prefix": "reviews"}}"#);
        assert!(hits(&b, &request("http://reviews.default:80/", &[])));
        let b = block(r#"{"authority": {"regex": "rev[a-z]+(:[0-9]+)?"}}"#);
        assert!(hits(&b, &request("/", &[("host", "reviews:9080")])));

        let b = block(r#"{"scheme": {"exact": "http"}}"#);
        assert!(hits(&b, &request("/", &[])));
        assert!(!hits(&b, &request("https://a/", &[])));
        let b = block(r#"{"scheme": {"prefix": "htt"}}"#);
        assert!(hits(&b, &request("https://a/", &[])));
        let b = block(r#"{"scheme": {"regex": "https?"}}"#);
        assert!(hits(&b, &request("/", &[])));

        let get = |m: &str| {
            Request::builder()
                .method(m)
                .uri("/")
                .body(())
                .expect("request")
        };
        let b = block(r#"{"method": {"exact": "GET"}}"#);
        assert!(hits(&b, &get("GET")));
        assert!(!hits(&b, &get("POST")));
        let b = block(r#"{"method": {"prefix": "P"}}"#);
        assert!(hits(&b, &get("PUT")) && hits(&b, &get("POST")) && !hits(&b, &get("GET")));
        let b = block(r#"{"method": {"regex": "GET|HEAD"}}"#);
        assert!(hits(&b, &get("HEAD")) && !hits(&b, &get("DELETE")));
    }

    #[test]
    fn regexes_are_guarded_by_their_literal_prefixes() {
        let prefixes = |p: &str| {
            literal_prefixes(p).map(|v| v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(prefixes("/api/v[0-9]+/items"), Some(vec!["/api/v".into()]));
        assert_eq!(
            prefixes("/(a|b)/x"),
            Some(vec!["/a/x".into(), "/b/x".into()])
        );
        assert_eq!(prefixes(".*/items"), None, "no literal start");
        assert_eq!(
            prefixes("/(?i)abcdefghijkl"),
            Some(vec!["/".into()]),
            "case variants share `/`"
        );
        let r = |p: &str| Pattern::new(&Regex::full_match(p).expect("regex"));
        assert!(r("/(?i)abcdefghijkl").is_match("/ABCdefghijkl"));
        assert!(r("/api/v[0-9]+").is_match("/api/v2"));
        assert!(!r("/(?i)abcdefghijkl").is_match("/x"));
        assert!(!r("/api/v[0-9]+").is_match("/web/v2"));
        assert!(r("(/a|/b)c").is_match("/bc"));
        assert!(
            r("a?b").is_match("b"),
            "an optional start yields prefixes `ab` and `b`"
        );
        assert!(r("a?b").is_match("ab"));
    }

    #[test]
    fn quick_prefixes_are_necessary_conditions() {
        let admits = |q: &QuickPrefix, path: &str| q.admits(&QuickKey::new(path));
        let blocks = [
            block(r#"{"uri": {"prefix": "/wpcatalog"}}"#),
            block(r#"{"uri": {"regex": "/wp[a-z]+/v[0-9]"}}"#),
        ];
        let q = QuickPrefix::for_blocks(&blocks);
        assert!(admits(&q, "/wpcatalog/x") && admits(&q, "/wpx/v1"));
        assert!(!admits(&q, "/consumer") && !admits(&q, "/w"));
        let path = "/a/very/long/path/beyond/the/inline/capacity";
        let q = QuickPrefix::for_blocks(&[block(&format!(r#"{{"uri": {{"exact": "{path}"}}}}"#))]);
        assert!(admits(&q, path));
        assert!(
            admits(&q, "/a/very/long/path/beyond/X"),
            "only the inline start is tested"
        );
        assert!(!admits(&q, "/a/very/long/path/beyon"));
        let open = [
            block(r#"{"uri": {"prefix": "/a"}}"#),
            block(r#"{"headers": {"x": {}}}"#),
        ];
        assert!(
            admits(&QuickPrefix::for_blocks(&open), "/anything-else"),
            "a block without uri"
        );
        let ci = [block(r#"{"uri": {"prefix": "/A"}, "ignoreUriCase": true}"#)];
        assert!(admits(&QuickPrefix::for_blocks(&ci), "/a"));
        assert!(admits(
            &QuickPrefix::for_blocks(&[MatchBlock::catch_all()]),
            "*"
        ));
    }

    #[test]
    fn fields_of_a_block_are_and_ed() {
        let b = block(
            r#"{"uri": {"prefix": "/api"}, "headers": {"end-user": {"exact": "jason"}},
                "method": {"exact": "GET"}, "queryParams": {"v": {"exact": "2"}}}"#,
        );
        assert!(hits(&b, &request("/api/x?v=2", &[("end-user", "jason")])));
        assert!(!hits(&b, &request("/api/x?v=1", &[("end-user", "jason")])));
        assert!(!hits(&b, &request("/api/x?v=2", &[])));
        assert!(!hits(&b, &request("/web?v=2", &[("end-user", "jason")])));
        assert!(hits(&MatchBlock::catch_all(), &request("*", &[])));
    }
}
