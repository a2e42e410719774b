//! One access-log line: what the layer captures per request ([`Entry`]) and how the writer
//! task renders it, as Istio's text line or as JSON.
//!
//! Rendering writes bytes straight into the writer's buffer: no `serde_json::Value` tree, no
//! `format!` per field, no allocation unless a header value is not UTF-8 (then it is
//! converted lossily, once). Every string passes through an escaper, so no header byte can
//! end a line or a quoted field early.

use std::borrow::Cow;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::HeaderValue;
use http::uri::{Authority, PathAndQuery};
use http::{Method, StatusCode, Version};
use mesh_core::config::bootstrap::AccessLogEncoding;
use mesh_core::stream_info::StreamInfo;
use mesh_core::{Identity, ResponseFlags};

/// What the layer was built for: where the logged cluster and peer identity come from.
#[derive(Debug)]
pub(crate) struct LayerConfig {
    pub(crate) inbound: bool,
    /// The cluster logged when routing decided none (`inbound|9080||` on inbound).
    pub(crate) cluster: Option<Arc<str>>,
}

/// Everything one line needs. Captured by reference-counted clones on the request path
/// (header values and URI parts share the connection's buffers), rendered on the writer task.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) start: SystemTime,
    pub(crate) started: tokio::time::Instant,
    pub(crate) method: Method,
    pub(crate) path: Option<PathAndQuery>,
    pub(crate) original_path: Option<HeaderValue>,
    pub(crate) version: Version,
    pub(crate) authority: Option<Authority>,
    /// `Host`, read only when the URI has no authority (HTTP/1.1 origin form).
    pub(crate) host: Option<HeaderValue>,
    pub(crate) forwarded_for: Option<HeaderValue>,
    pub(crate) user_agent: Option<HeaderValue>,
    pub(crate) request_id: Option<HeaderValue>,
    /// Downstream (remote, local) addresses, from the listener's `ClientInfo`.
    pub(crate) downstream: Option<(SocketAddr, SocketAddr)>,
    /// Inbound: the verified identity of the downstream peer.
    pub(crate) downstream_peer: Option<Identity>,
    pub(crate) info: StreamInfo,
    pub(crate) layer: Arc<LayerConfig>,
    /// Request body bytes, shared with the request body wrapper; `None` when the request
    /// came without a body (no counter allocated).
    pub(crate) received_counter: Option<Arc<AtomicU64>>,
    // Filled when the exchange ends.
    pub(crate) received: u64,
    /// 0 until a response exists (Envoy logs 0 when none was sent).
    pub(crate) status: u16,
    pub(crate) flags_header: Option<HeaderValue>,
    /// Flags beyond those in the header: from the response's extensions, from a
    /// `ProxyError`, or DC/UR decided by the layer.
    pub(crate) flags: ResponseFlags,
    pub(crate) sent: u64,
    pub(crate) duration: Duration,
}

impl Entry {
    /// Whether the exchange has no response body to wait for, so dropping the body unread
    /// is no sign of a client gone away (HEAD, 1xx, 204, 304, and a CONNECT's 2xx: what
    /// follows is a tunnel, not a body).
    pub(crate) fn bodiless(&self) -> bool {
        (self.status != 0 && self.method == Method::HEAD)
            || (self.method == Method::CONNECT && (200..300).contains(&self.status))
            || self.status == StatusCode::NO_CONTENT.as_u16()
            || self.status == StatusCode::NOT_MODIFIED.as_u16()
            || (100..200).contains(&self.status)
    }

    /// Stamps the end of the exchange.
    pub(crate) fn close(&mut self) {
        self.duration = self.started.elapsed();
        if let Some(counter) = self.received_counter.take() {
            self.received = counter.load(Ordering::Relaxed);
        }
    }
}

/// Appends `entry` as one line (with its `\n`) to `out`.
pub(crate) fn encode(
    entry: &Entry,
    encoding: AccessLogEncoding,
    clock: &mut TimeCache,
    out: &mut Vec<u8>,
) {
    match encoding {
        AccessLogEncoding::Text => text(entry, clock, out),
        AccessLogEncoding::Json => json(entry, clock, out),
    }
}

/// A string escaper: writes `s` so that it cannot break the surrounding syntax.
type Escape = fn(&mut Vec<u8>, &str);

/// Istio's default text format (Envoy's default plus Istio's fields), then ours:
///
/// ```text
/// [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE%
/// %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS%
/// "%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION%
/// %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%"
/// "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW%
/// %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS%
/// %REQUESTED_SERVER_NAME% %ROUTE_NAME% PEER_PRINCIPAL TRACE_ID
/// ```
fn text(e: &Entry, clock: &mut TimeCache, out: &mut Vec<u8>) {
    let q: Escape = escape_quoted;
    let bare: Escape = escape_bare;
    out.push(b'[');
    clock.write(out, e.start);
    out.extend_from_slice(b"] \"");
    q(out, e.method.as_str());
    out.push(b' ');
    if !path(e, out, q) {
        out.push(b'-');
    }
    out.push(b' ');
    out.extend_from_slice(protocol(e.version).as_bytes());
    out.extend_from_slice(b"\" ");
    write_u64(out, e.status.into());
    out.push(b' ');
    flags(e, out, bare);
    // Details we do not track yet print as unset, so the columns stay Istio's.
    out.extend_from_slice(b" - - \"-\" ");
    write_u64(out, e.received);
    out.push(b' ');
    write_u64(out, e.sent);
    out.push(b' ');
    write_u64(out, millis(e.duration));
    out.extend_from_slice(b" - ");
    for value in [&e.forwarded_for, &e.user_agent, &e.request_id] {
        quoted_header(out, value.as_ref());
        out.push(b' ');
    }
    out.push(b'"');
    if !authority(e, out, q) {
        out.push(b'-');
    }
    out.extend_from_slice(b"\" \"");
    match e.info.upstream() {
        Some(addr) => write_addr(out, addr),
        None => out.push(b'-'),
    }
    out.extend_from_slice(b"\" ");
    if !cluster(e, out, bare) {
        out.push(b'-');
    }
    out.extend_from_slice(b" - ");
    match e.downstream {
        Some((remote, local)) => {
            write_addr(out, local);
            out.push(b' ');
            write_addr(out, remote);
        }
        None => out.extend_from_slice(b"- -"),
    }
    // Requested server name, route name: not known to this layer.
    out.extend_from_slice(b" - - ");
    match peer(e) {
        Some(id) => bare(out, id.as_str()),
        None => out.push(b'-'),
    }
    out.push(b' ');
    match e.info.trace_id() {
        Some(id) => write_hex(out, &id),
        None => out.push(b'-'),
    }
    out.push(b'\n');
}

/// Istio's JSON keys (`null` when unset), plus `peer_principal` and `trace_id`; numbers are
/// JSON numbers, as Envoy's typed JSON writes them.
fn json(e: &Entry, clock: &mut TimeCache, out: &mut Vec<u8>) {
    let j: Escape = escape_json;
    out.extend_from_slice(b"{\"start_time\":\"");
    clock.write(out, e.start);
    out.extend_from_slice(b"\",\"method\":\"");
    j(out, e.method.as_str());
    out.extend_from_slice(b"\",\"path\":");
    json_opt(out, |out| path(e, out, j));
    out.extend_from_slice(b",\"protocol\":\"");
    out.extend_from_slice(protocol(e.version).as_bytes());
    out.extend_from_slice(b"\",\"response_code\":");
    write_u64(out, e.status.into());
    out.extend_from_slice(b",\"response_flags\":\"");
    flags(e, out, j);
    out.extend_from_slice(b"\",\"bytes_received\":");
    write_u64(out, e.received);
    out.extend_from_slice(b",\"bytes_sent\":");
    write_u64(out, e.sent);
    out.extend_from_slice(b",\"duration\":");
    write_u64(out, millis(e.duration));
    for (key, value) in [
        (&b",\"x_forwarded_for\":"[..], &e.forwarded_for),
        (b",\"user_agent\":", &e.user_agent),
        (b",\"request_id\":", &e.request_id),
    ] {
        out.extend_from_slice(key);
        json_opt(out, |out| match value {
            Some(v) => {
                j(out, &lossy(v));
                true
            }
            None => false,
        });
    }
    out.extend_from_slice(b",\"authority\":");
    json_opt(out, |out| authority(e, out, j));
    out.extend_from_slice(b",\"upstream_host\":");
    json_opt_addr(out, e.info.upstream());
    out.extend_from_slice(b",\"upstream_cluster\":");
    json_opt(out, |out| cluster(e, out, j));
    out.extend_from_slice(b",\"downstream_local_address\":");
    json_opt_addr(out, e.downstream.map(|(_, local)| local));
    out.extend_from_slice(b",\"downstream_remote_address\":");
    json_opt_addr(out, e.downstream.map(|(remote, _)| remote));
    out.extend_from_slice(b",\"route_name\":null,\"peer_principal\":");
    json_opt(out, |out| match peer(e) {
        Some(id) => {
            j(out, id.as_str());
            true
        }
        None => false,
    });
    out.extend_from_slice(b",\"trace_id\":");
    match e.info.trace_id() {
        Some(id) => {
            out.push(b'"');
            write_hex(out, &id);
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b"}\n");
}

/// Writes a JSON string with `write`, or `null` when `write` reports it had nothing.
fn json_opt(out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>) -> bool) {
    let mark = out.len();
    out.push(b'"');
    if write(out) {
        out.push(b'"');
    } else {
        out.truncate(mark);
        out.extend_from_slice(b"null");
    }
}

fn json_opt_addr(out: &mut Vec<u8>, addr: Option<SocketAddr>) {
    match addr {
        Some(addr) => {
            out.push(b'"');
            write_addr(out, addr);
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
}

/// `%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%`: the header when present, else the request's path
/// and query.
fn path(e: &Entry, out: &mut Vec<u8>, esc: Escape) -> bool {
    if let Some(original) = &e.original_path {
        esc(out, &lossy(original));
        return true;
    }
    match &e.path {
        Some(p) => {
            esc(out, p.as_str());
            true
        }
        None => false,
    }
}

/// `%REQ(:AUTHORITY)%`: the URI's authority (HTTP/2, absolute form), else `Host`.
fn authority(e: &Entry, out: &mut Vec<u8>, esc: Escape) -> bool {
    if let Some(a) = &e.authority {
        esc(out, a.as_str());
        return true;
    }
    match &e.host {
        Some(h) => {
            esc(out, &lossy(h));
            true
        }
        None => false,
    }
}

/// The peer header's flags as received (a peer proxy's come first), then ours that it does
/// not already name; `-` when there are none.
fn flags(e: &Entry, out: &mut Vec<u8>, esc: Escape) {
    let header = e.flags_header.as_ref().filter(|h| !h.is_empty());
    let Some(header) = header else {
        if e.flags.is_empty() {
            out.push(b'-');
        }
        for (i, code) in e.flags.codes().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(code.as_bytes());
        }
        return;
    };
    let header = lossy(header);
    esc(out, &header);
    let mut named = ResponseFlags::EMPTY;
    for code in header.split(',') {
        if let Some(flag) = ResponseFlags::from_code(code.trim()) {
            named |= flag;
        }
    }
    for code in e.flags.codes() {
        if ResponseFlags::from_code(code).is_some_and(|f| !named.contains(f)) {
            out.push(b',');
            out.extend_from_slice(code.as_bytes());
        }
    }
}

/// Istio's cluster name: `outbound|9080|v1|reviews.default.svc.cluster.local` from the
/// route's decision, else the layer's own (`inbound|9080||`).
fn cluster(e: &Entry, out: &mut Vec<u8>, esc: Escape) -> bool {
    if let Some(route) = e.info.route().filter(|_| !e.layer.inbound) {
        out.extend_from_slice(b"outbound|");
        write_u64(out, route.service.number.into());
        out.push(b'|');
        if let Some(subset) = &route.subset {
            esc(out, &subset.name);
        }
        out.push(b'|');
        esc(out, route.service.host.as_str());
        return true;
    }
    match &e.layer.cluster {
        Some(name) => {
            esc(out, name);
            true
        }
        None => false,
    }
}

/// The other mesh workload: the verified downstream peer on inbound, the verified upstream
/// endpoint on outbound.
fn peer(e: &Entry) -> Option<Identity> {
    if e.layer.inbound {
        e.downstream_peer.clone()
    } else {
        e.info.upstream_peer()
    }
}

/// Envoy's `%PROTOCOL%`.
fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "-",
    }
}

fn quoted_header(out: &mut Vec<u8>, value: Option<&HeaderValue>) {
    out.push(b'"');
    match value {
        Some(v) => escape_quoted(out, &lossy(v)),
        None => out.push(b'-'),
    }
    out.push(b'"');
}

/// A header value as text; bytes that are not UTF-8 become U+FFFD (allocates only then).
pub(crate) fn lossy(value: &HeaderValue) -> Cow<'_, str> {
    // `from_utf8` first: its validation is much faster than the lossy decoder's.
    match std::str::from_utf8(value.as_bytes()) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(value.as_bytes()),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Inside a text field's quotes: `"` and `\` are backslash-escaped and control characters
/// written as `\n`, `\r`, `\t` or `\xHH`, so neither a quote nor a line can end early.
fn escape_quoted(out: &mut Vec<u8>, s: &str) {
    if !s
        .bytes()
        .any(|b| b < 0x20 || b == 0x7f || b == b'"' || b == b'\\')
    {
        out.extend_from_slice(s.as_bytes());
        return;
    }
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            _ => escape_control(out, b),
        }
    }
}

/// An unquoted text field (flags a peer sent, identities): as [`escape_quoted`], and a space
/// or quote is written `\x20`/`\x22`, so the field cannot split into two columns.
fn escape_bare(out: &mut Vec<u8>, s: &str) {
    for &b in s.as_bytes() {
        match b {
            b' ' | b'"' => write_hex_escape(out, b),
            b'\\' => out.extend_from_slice(b"\\\\"),
            _ => escape_control(out, b),
        }
    }
}

fn escape_control(out: &mut Vec<u8>, b: u8) {
    match b {
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        b'\t' => out.extend_from_slice(b"\\t"),
        0..=0x1f | 0x7f => write_hex_escape(out, b),
        _ => out.push(b),
    }
}

fn write_hex_escape(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.extend_from_slice(&[
        b'\\',
        b'x',
        HEX[usize::from(b >> 4)],
        HEX[usize::from(b & 0xf)],
    ]);
}

/// A JSON string's contents (RFC 8259): `"`, `\` and control characters escaped.
fn escape_json(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    // Nearly every value needs no escape: one quick scan, one copy.
    if !bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\') {
        out.extend_from_slice(bytes);
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => &[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ],
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escape);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// `ip:port` (`[ip]:port` for IPv6); no character in it needs escaping. IPv4, the common
/// case, is written by hand: `Display` costs several times more.
fn write_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => {
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                write_u64(out, octet.into());
            }
            out.push(b':');
            write_u64(out, v4.port().into());
        }
        // Writing to a Vec cannot fail.
        SocketAddr::V6(_) => {
            let _ = write!(out, "{addr}");
        }
    }
}

fn write_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 0xf)]);
    }
}

/// "00" to "99", for writing two digits per division.
const DIGIT_PAIRS: &[u8; 200] = b"\
    0001020304050607080910111213141516171819\
    2021222324252627282930313233343536373839\
    4041424344454647484950515253545556575859\
    6061626364656667686970717273747576777879\
    8081828384858687888990919293949596979899";

fn write_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    while n >= 100 {
        let pair = usize::try_from(n % 100).unwrap_or_default() * 2;
        n /= 100;
        i -= 2;
        digits[i..i + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    }
    if n >= 10 {
        let pair = usize::try_from(n).unwrap_or_default() * 2;
        i -= 2;
        digits[i..i + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    } else {
        i -= 1;
        digits[i] = b'0' + n as u8;
    }
    out.extend_from_slice(&digits[i..]);
}

/// `n` (< 100) in two digits.
fn write_2(out: &mut Vec<u8>, n: u64) {
    let pair = usize::try_from(n % 100).unwrap_or_default() * 2;
    out.extend_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
}

/// Envoy's `%START_TIME%`: RFC 3339 in UTC with milliseconds, `2026-01-02T03:04:05.678Z`.
/// The date and time up to the second are rendered once per second and reused: lines
/// written together nearly always share them.
#[derive(Debug, Default)]
pub(crate) struct TimeCache {
    secs: Option<u64>,
    /// `2026-01-02T03:04:05` for `secs`.
    text: Vec<u8>,
}

impl TimeCache {
    pub(crate) fn write(&mut self, out: &mut Vec<u8>, t: SystemTime) {
        // A clock set before 1970 logs the epoch rather than failing the line.
        let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        if self.secs != Some(secs) {
            self.text.clear();
            write_date_time(&mut self.text, secs);
            self.secs = Some(secs);
        }
        out.extend_from_slice(&self.text);
        let millis = since.subsec_millis(); // < 1000
        out.extend_from_slice(&[
            b'.',
            b'0' + (millis / 100) as u8,
            b'0' + (millis / 10 % 10) as u8,
            b'0' + (millis % 10) as u8,
            b'Z',
        ]);
    }
}

/// `YYYY-MM-DDTHH:MM:SS` for seconds since the epoch (days to civil date: Howard Hinnant's
/// algorithm). Hand-rolled: no time crate for this.
fn write_date_time(out: &mut Vec<u8>, secs: u64) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let year = year.max(0) as u64;
    if year < 10_000 {
        write_2(out, year / 100);
        write_2(out, year % 100);
    } else {
        write_u64(out, year);
    }
    out.push(b'-');
    write_2(out, month as u64);
    out.push(b'-');
    write_2(out, day as u64);
    out.push(b'T');
    write_2(out, rem / 3600);
    out.push(b':');
    write_2(out, rem / 60 % 60);
    out.push(b':');
    write_2(out, rem % 60);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(secs: u64, millis: u64) -> String {
        let mut out = Vec::new();
        TimeCache::default().write(
            &mut out,
            UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis),
        );
        String::from_utf8(out).unwrap()
    }

    fn write_time_once(out: &mut Vec<u8>, t: SystemTime) {
        TimeCache::default().write(out, t);
    }

    #[test]
    fn start_time_is_rfc3339_utc_with_millis() {
        assert_eq!(time(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(time(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(time(1_700_000_000, 123), "2023-11-14T22:13:20.123Z");
        assert_eq!(time(4_102_444_799, 999), "2099-12-31T23:59:59.999Z");
        let mut out = Vec::new();
        write_time_once(&mut out, UNIX_EPOCH - Duration::from_secs(5));
        assert_eq!(out, b"1970-01-01T00:00:00.000Z");
        // The cache renders a new second, and reuses the same one.
        let mut cache = TimeCache::default();
        let mut out = Vec::new();
        for t in [
            1_700_000_000_123u64,
            1_700_000_000_999,
            1_700_000_001_000,
            1_700_000_001_001,
        ] {
            cache.write(&mut out, UNIX_EPOCH + Duration::from_millis(t));
            out.push(b' ');
        }
        assert_eq!(
            out,
            b"2023-11-14T22:13:20.123Z 2023-11-14T22:13:20.999Z 2023-11-14T22:13:21.000Z 2023-11-14T22:13:21.001Z "
        );
    }

    #[test]
    fn every_civil_day_matches_a_day_count() {
        // Walk 200 years day by day and check the date only ever advances by one day.
        let (mut y, mut m, mut d) = (1970u64, 1u64, 1u64);
        for day in 0..73_000u64 {
            assert_eq!(time(day * 86_400, 0)[..10], format!("{y:04}-{m:02}-{d:02}"));
            let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            let len = [
                31,
                if leap { 29 } else { 28 },
                31,
                30,
                31,
                30,
                31,
                31,
                30,
                31,
                30,
                31,
            ];
            d += 1;
            if d > len[(m - 1) as usize] {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }

    #[test]
    fn numbers_and_hex() {
        let mut out = Vec::new();
        for n in [
            0,
            7,
            9,
            10,
            42,
            99,
            100,
            101,
            255,
            999,
            1000,
            65_535,
            u64::MAX,
        ] {
            out.clear();
            write_u64(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        out.clear();
        write_hex(&mut out, &[0x00, 0xab, 0x4f]);
        assert_eq!(out, b"00ab4f");
    }

    #[test]
    fn addresses_print_as_display_does() {
        for addr in [
            "10.0.0.7:9080",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "[::1]:80",
            "[fe80::1%2]:443",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut out = Vec::new();
            write_addr(&mut out, addr);
            assert_eq!(out, addr.to_string().as_bytes());
        }
    }

    #[test]
    fn json_escaping_round_trips_through_serde_json() {
        let nasty = "a\"b\\c\nd\re\tf\u{1}\u{1f}\u{7f} é \u{2028} 🦀";
        let mut out = vec![b'"'];
        escape_json(&mut out, nasty);
        out.push(b'"');
        let back: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, nasty);
    }

    #[test]
    fn text_escaping_keeps_one_line_and_balanced_quotes() {
        let mut out = Vec::new();
        escape_quoted(&mut out, "say \"hi\"\\\n\r\t\u{0}x");
        assert_eq!(out, br#"say \"hi\"\\\n\r\t\x00x"#);
        out.clear();
        escape_bare(&mut out, "UF, \"x\"");
        assert_eq!(out, br#"UF,\x20\x22x\x22"#);
    }
}
