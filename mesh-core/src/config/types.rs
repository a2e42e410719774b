//! Value types shared by every kind: Kubernetes metadata and the resource envelope, Go-style
//! durations, Istio's `Percent`, port numbers, `StringMatch` and protocols.
//!
//! Each type checks its own input while it is deserialized (a bad duration, a port out of
//! range, a regex that does not compile), so the error carries the YAML line and field path;
//! checks that need several fields live in `validate`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use crate::host::DEFAULT_NAMESPACE;
use crate::labels::Labels;

/// Where a resource came from: the source (file) name and its 1-based document index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Origin {
    pub file: String,
    pub document: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} document {}", self.file, self.document)
    }
}

/// A Kubernetes-style resource: `apiVersion`, `kind`, `metadata` and a kind-specific `spec`.
///
/// `spec` may be omitted (Istio's "allow nothing" `AuthorizationPolicy` is written as an
/// empty spec). A `status` block, as `kubectl get -o yaml` prints it, is accepted and dropped.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(
    rename_all = "camelCase",
    from = "RawResource<S>",
    bound(deserialize = "S: Deserialize<'de> + Default")
)]
pub struct Resource<S> {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: S,
    /// Set by the loader; not part of the YAML.
    #[serde(skip)]
    pub origin: Origin,
}

impl<S> Resource<S> {
    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    pub fn namespace(&self) -> &str {
        &self.metadata.namespace
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawResource<S> {
    api_version: String,
    kind: String,
    metadata: Metadata,
    #[serde(default)]
    spec: S,
    #[serde(default, rename = "status")]
    _status: IgnoredAny,
}

impl<S> From<RawResource<S>> for Resource<S> {
    fn from(raw: RawResource<S>) -> Self {
        Resource {
            api_version: raw.api_version,
            kind: raw.kind,
            metadata: raw.metadata,
            spec: raw.spec,
            origin: Origin::default(),
        }
    }
}

/// Kubernetes object metadata.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", from = "RawMetadata")]
pub struct Metadata {
    pub name: String,
    /// `default` when not written.
    pub namespace: String,
    pub labels: Labels,
    pub annotations: BTreeMap<String, String>,
}

impl Metadata {
    /// Metadata with a name and namespace and nothing else.
    pub fn new(name: impl Into<String>, namespace: impl Into<String>) -> Self {
        Metadata {
            name: name.into(),
            namespace: namespace.into(),
            labels: Labels::default(),
            annotations: BTreeMap::new(),
        }
    }
}

/// Bookkeeping fields a cluster adds (`uid`, `resourceVersion`, ...) are accepted, so that
/// exported objects load unchanged, and dropped.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawMetadata {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default)]
    labels: Labels,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default, rename = "creationTimestamp")]
    _creation_timestamp: IgnoredAny,
    #[serde(default, rename = "deletionTimestamp")]
    _deletion_timestamp: IgnoredAny,
    #[serde(default, rename = "deletionGracePeriodSeconds")]
    _deletion_grace_period_seconds: IgnoredAny,
    #[serde(default, rename = "finalizers")]
    _finalizers: IgnoredAny,
    #[serde(default, rename = "generateName")]
    _generate_name: IgnoredAny,
    #[serde(default, rename = "generation")]
    _generation: IgnoredAny,
    #[serde(default, rename = "managedFields")]
    _managed_fields: IgnoredAny,
    #[serde(default, rename = "ownerReferences")]
    _owner_references: IgnoredAny,
    #[serde(default, rename = "resourceVersion")]
    _resource_version: IgnoredAny,
    #[serde(default, rename = "selfLink")]
    _self_link: IgnoredAny,
    #[serde(default, rename = "uid")]
    _uid: IgnoredAny,
}

impl From<RawMetadata> for Metadata {
    fn from(raw: RawMetadata) -> Self {
        Metadata {
            name: raw.name,
            namespace: raw.namespace,
            labels: raw.labels,
            annotations: raw.annotations,
        }
    }
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}

/// A Go-style duration (`500ms`, `1.5s`, `7s`, `3m`, `1h30m`, `100us`), as Istio's YAML
/// writes them. Serializes back to the same notation.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Duration(pub std::time::Duration);

/// Why a duration string was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration `{input}`: {reason} (expected e.g. `500ms`, `1.5s`, `1h30m`)")]
pub struct DurationError {
    input: String,
    reason: &'static str,
}

impl Duration {
    pub const ZERO: Duration = Duration(std::time::Duration::ZERO);

    pub fn from_millis(ms: u64) -> Self {
        Duration(std::time::Duration::from_millis(ms))
    }

    pub fn from_secs(s: u64) -> Self {
        Duration(std::time::Duration::from_secs(s))
    }

    pub fn get(self) -> std::time::Duration {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl From<Duration> for std::time::Duration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

impl FromStr for Duration {
    type Err = DurationError;

    /// Go's `time.ParseDuration`, less negative values (no config field takes one).
    fn from_str(input: &str) -> Result<Self, DurationError> {
        let fail = |reason| DurationError {
            input: input.to_string(),
            reason,
        };
        let mut rest = input.strip_prefix('+').unwrap_or(input);
        if rest.starts_with('-') {
            return Err(fail("negative durations are not allowed"));
        }
        if rest == "0" {
            return Ok(Duration::ZERO);
        }
        if rest.is_empty() {
            return Err(fail("empty"));
        }
        let mut total: u128 = 0;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit() && c != '.')
                .unwrap_or(rest.len());
            let (number, after) = rest.split_at(digits);
            let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
            if whole.is_empty() && frac.is_empty() || frac.contains('.') {
                return Err(fail("expected a number"));
            }
            let unit_len = after
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(after.len());
            let (unit, next) = after.split_at(unit_len);
            let nanos_per_unit: u128 = match unit {
                "ns" => 1,
                "us" | "µs" | "μs" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                "" => return Err(fail("missing unit")),
                _ => return Err(fail("unknown unit (use ns, us, ms, s, m or h)")),
            };
            let whole: u128 = if whole.is_empty() {
                0
            } else {
                whole.parse().map_err(|_| fail("number out of range"))?
            };
            // Fraction digits beyond nanosecond precision cannot matter; drop them so the
            // arithmetic stays exact and in range.
            let frac = &frac[..frac.len().min(18)];
            let frac_value: u128 = if frac.is_empty() {
                0
            } else {
                frac.parse().map_err(|_| fail("number out of range"))?
            };
            let scale = 10u128.pow(frac.len() as u32);
            total = whole
                .checked_mul(nanos_per_unit)
                .and_then(|w| w.checked_add(frac_value * nanos_per_unit / scale))
                .and_then(|v| total.checked_add(v))
                .ok_or_else(|| fail("out of range"))?;
            rest = next;
        }
        let secs = u64::try_from(total / 1_000_000_000).map_err(|_| fail("out of range"))?;
        // The remainder is below 1e9, so it fits.
        let nanos = (total % 1_000_000_000) as u32;
        Ok(Duration(std::time::Duration::new(secs, nanos)))
    }
}

impl fmt::Display for Duration {
    /// Compact Go-like notation that parses back to the same value: `0s`, `100us`, `500ms`,
    /// `1.5s`, `1h30m`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.is_zero() {
            return f.write_str("0s");
        }
        if d.as_secs() == 0 {
            let n = d.subsec_nanos();
            return match n {
                _ if n.is_multiple_of(1_000_000) => write!(f, "{}ms", n / 1_000_000),
                _ if n.is_multiple_of(1_000) => write!(f, "{}us", n / 1_000),
                _ => write!(f, "{n}ns"),
            };
        }
        let (h, m, s) = (d.as_secs() / 3600, d.as_secs() / 60 % 60, d.as_secs() % 60);
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        let nanos = d.subsec_nanos();
        if nanos > 0 {
            let frac = format!("{nanos:09}");
            write!(f, "{s}.{}s", frac.trim_end_matches('0'))
        } else if s > 0 {
            write!(f, "{s}s")
        } else {
            Ok(())
        }
    }
}

impl TryFrom<String> for Duration {
    type Error = DurationError;
    fn try_from(s: String) -> Result<Self, DurationError> {
        s.parse()
    }
}

impl From<Duration> for String {
    fn from(d: Duration) -> String {
        d.to_string()
    }
}

/// Istio's `Percent` message: `{ value: 12.5 }`, a percentage in `0..=100`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawPercent")]
pub struct Percent {
    pub value: f64,
}

impl Percent {
    pub const HUNDRED: Percent = Percent { value: 100.0 };

    /// The percentage as a fraction in `0.0..=1.0`.
    pub fn fraction(self) -> f64 {
        self.value / 100.0
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPercent {
    #[serde(default)]
    value: f64,
}

impl TryFrom<RawPercent> for Percent {
    type Error = String;
    fn try_from(raw: RawPercent) -> Result<Self, String> {
        check_percent(raw.value).map(|value| Percent { value })
    }
}

/// A percentage must be a finite number in `0..=100`.
pub(crate) fn check_percent(value: f64) -> Result<f64, String> {
    if (0.0..=100.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("percentage {value} is not in 0..=100"))
    }
}

/// A TCP/UDP port number, `1..=65535`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "u16")]
pub struct PortNumber(u16);

impl PortNumber {
    /// `None` for port 0.
    pub fn new(port: u16) -> Option<Self> {
        (port != 0).then_some(PortNumber(port))
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

impl TryFrom<i64> for PortNumber {
    type Error = String;
    fn try_from(n: i64) -> Result<Self, String> {
        u16::try_from(n)
            .ok()
            .and_then(PortNumber::new)
            .ok_or_else(|| format!("port number {n} is not in 1..=65535"))
    }
}

impl From<PortNumber> for u16 {
    fn from(p: PortNumber) -> u16 {
        p.0
    }
}

impl fmt::Display for PortNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A compiled regular expression that remembers how it was written (for `/config_dump`).
/// Istio's regexes are RE2; the `regex` crate implements the same syntax.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Regex {
    source: String,
    compiled: regex::Regex,
}

impl Regex {
    /// A regex that matches anywhere in the input (as `uriRegexRewrite.match`).
    pub fn new(pattern: &str) -> Result<Self, regex::Error> {
        Ok(Regex {
            source: pattern.to_string(),
            compiled: regex::Regex::new(pattern)?,
        })
    }

    /// A regex that must match the whole input, as Envoy's `safe_regex` matchers do.
    pub fn full_match(pattern: &str) -> Result<Self, regex::Error> {
        Ok(Regex {
            source: pattern.to_string(),
            compiled: regex::Regex::new(&format!("^(?:{pattern})$"))?,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn is_match(&self, input: &str) -> bool {
        self.compiled.is_match(input)
    }

    /// The compiled regex (for replacement in rewrites).
    pub fn regex(&self) -> &regex::Regex {
        &self.compiled
    }
}

impl TryFrom<String> for Regex {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Regex::new(&s).map_err(|e| regex_error(&s, &e))
    }
}

impl From<Regex> for String {
    fn from(r: Regex) -> String {
        r.source
    }
}

fn regex_error(pattern: &str, e: &regex::Error) -> String {
    // regex's own message spans several lines with a caret diagram; keep the last line,
    // which says what is wrong.
    let text = e.to_string();
    let why = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    format!(
        "invalid regex `{pattern}`: {}",
        why.trim().trim_start_matches("error: ")
    )
}

/// Istio's `StringMatch`: one of `exact`, `prefix` or `regex` (full match, RE2 syntax). An
/// empty match `{}` is [`StringMatch::Any`]: for a header or query parameter it means "is
/// present".
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(try_from = "RawStringMatch", into = "RawStringMatch")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    Any,
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Regex(r) => r.is_match(value),
            StringMatch::Any => true,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStringMatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    exact: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
}

impl TryFrom<RawStringMatch> for StringMatch {
    type Error = String;
    fn try_from(raw: RawStringMatch) -> Result<Self, String> {
        match (raw.exact, raw.prefix, raw.regex) {
            (Some(e), None, None) => Ok(StringMatch::Exact(e)),
            (None, Some(p), None) => Ok(StringMatch::Prefix(p)),
            (None, None, Some(r)) => Regex::full_match(&r)
                .map(StringMatch::Regex)
                .map_err(|e| regex_error(&r, &e)),
            (None, None, None) => Ok(StringMatch::Any),
            _ => Err("a StringMatch takes only one of `exact`, `prefix`, `regex`".to_string()),
        }
    }
}

impl From<StringMatch> for RawStringMatch {
    fn from(m: StringMatch) -> Self {
        let mut raw = RawStringMatch {
            exact: None,
            prefix: None,
            regex: None,
        };
        match m {
            StringMatch::Exact(e) => raw.exact = Some(e),
            StringMatch::Prefix(p) => raw.prefix = Some(p),
            StringMatch::Regex(r) => raw.regex = Some(r.source),
            StringMatch::Any => {}
        }
        raw
    }
}

/// The protocol of a service or gateway port, as Istio names them (case-insensitive on input).
/// A name Istio does not know is treated as opaque TCP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "&'static str")]
pub enum Protocol {
    Http,
    Https,
    Http2,
    Grpc,
    GrpcWeb,
    #[default]
    Tcp,
    Tls,
    Mongo,
    Redis,
    Mysql,
    Udp,
}

impl Protocol {
    /// Parses a protocol name; unknown names are TCP.
    pub fn parse(name: &str) -> Protocol {
        match name.to_ascii_uppercase().as_str() {
            "HTTP" => Protocol::Http,
            "HTTPS" => Protocol::Https,
            "HTTP2" => Protocol::Http2,
            "GRPC" => Protocol::Grpc,
            "GRPC-WEB" => Protocol::GrpcWeb,
            "TLS" => Protocol::Tls,
            "MONGO" => Protocol::Mongo,
            "REDIS" => Protocol::Redis,
            "MYSQL" => Protocol::Mysql,
            "UDP" => Protocol::Udp,
            _ => Protocol::Tcp,
        }
    }

    /// Istio's port-name convention: `http`, `http-web`, `grpc-api`, ... name the protocol by
    /// the prefix before the first `-`.
    pub fn from_port_name(name: &str) -> Protocol {
        Protocol::parse(name.split('-').next().unwrap_or(name))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "HTTP",
            Protocol::Https => "HTTPS",
            Protocol::Http2 => "HTTP2",
            Protocol::Grpc => "GRPC",
            Protocol::GrpcWeb => "GRPC-Web",
            Protocol::Tcp => "TCP",
            Protocol::Tls => "TLS",
            Protocol::Mongo => "MONGO",
            Protocol::Redis => "REDIS",
            Protocol::Mysql => "MYSQL",
            Protocol::Udp => "UDP",
        }
    }

    /// Plain-text HTTP of any version (HTTP routes apply).
    pub fn is_http(self) -> bool {
        matches!(
            self,
            Protocol::Http | Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb
        )
    }

    /// Must be spoken as HTTP/2 upstream.
    pub fn is_http2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }

    /// TLS that the proxy passes through (TLS routes by SNI apply).
    pub fn is_tls(self) -> bool {
        matches!(self, Protocol::Https | Protocol::Tls)
    }
}

impl From<String> for Protocol {
    fn from(s: String) -> Self {
        Protocol::parse(&s)
    }
}

impl From<Protocol> for &'static str {
    fn from(p: Protocol) -> Self {
        p.as_str()
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Networking kinds select workloads with `workloadSelector: { labels: {...} }`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub labels: Labels,
}

/// Security kinds (and `DestinationRule`) select with `{ matchLabels: {...} }`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: Labels,
}

/// Decodes standard base64 (padding optional), as protobuf's JSON form writes `bytes`.
pub(crate) fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'\n' | b'\r' | b' ' => continue,
            _ => return Err(format!("invalid base64 character `{}`", c as char)),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// Encodes standard base64 with padding.
pub(crate) fn encode_base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> std::time::Duration {
        s.parse::<Duration>().expect(s).0
    }

    #[test]
    fn go_durations_parse() {
        use std::time::Duration as D;
        assert_eq!(d("500ms"), D::from_millis(500));
        assert_eq!(d("1.5s"), D::from_millis(1500));
        assert_eq!(d("7s"), D::from_secs(7));
        assert_eq!(d("3m"), D::from_secs(180));
        assert_eq!(d("1h30m"), D::from_secs(5400));
        assert_eq!(d("100us"), D::from_micros(100));
        assert_eq!(d("10µs"), D::from_micros(10));
        assert_eq!(d("0"), D::ZERO);
        assert_eq!(d(".5s"), D::from_millis(500));
        assert_eq!(d("1h0m0.25s"), D::from_millis(3_600_250));
        for bad in [
            "",
            "7",
            "7x",
            "-1s",
            "s",
            "1..2s",
            "1.2.3s",
            "99999999999999999999h",
        ] {
            assert!(
                bad.parse::<Duration>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn durations_print_back_in_go_notation() {
        for s in [
            "0s", "100us", "500ms", "1.5s", "7s", "3m", "1h30m", "1m1.5s", "2h0.001s",
        ] {
            assert_eq!(d(s), d(&Duration(d(s)).to_string()), "{s}");
        }
        assert_eq!(Duration(d("1h30m")).to_string(), "1h30m");
        assert_eq!(Duration(d("1.5s")).to_string(), "1.5s");
        assert_eq!(Duration(d("250ns")).to_string(), "250ns");
    }

    #[test]
    fn protocols_are_case_insensitive_with_tcp_fallback() {
        assert_eq!(Protocol::parse("http"), Protocol::Http);
        assert_eq!(Protocol::parse("gRPC-Web"), Protocol::GrpcWeb);
        assert_eq!(Protocol::parse("thrift"), Protocol::Tcp);
        assert_eq!(Protocol::from_port_name("http2-api"), Protocol::Http2);
        assert!(Protocol::Grpc.is_http() && Protocol::Grpc.is_http2());
        assert!(!Protocol::Https.is_http());
    }

    #[test]
    fn string_match_full_match_semantics() {
        let m = StringMatch::try_from(RawStringMatch {
            exact: None,
            prefix: None,
            regex: Some("/api/v[0-9]+".into()),
        })
        .expect("valid regex");
        assert!(m.matches("/api/v2"));
        assert!(
            !m.matches("/api/v2/users"),
            "Envoy regexes match the whole value"
        );
    }

    #[test]
    fn base64_round_trips() {
        for input in [&b""[..], b"f", b"fo", b"foo", b"foob", b"hello, world\n"] {
            assert_eq!(decode_base64(&encode_base64(input)).expect("valid"), input);
        }
        assert_eq!(decode_base64("aGk").expect("unpadded"), b"hi");
        assert!(decode_base64("a*b").is_err());
    }
}
