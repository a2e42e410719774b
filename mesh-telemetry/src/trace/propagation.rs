//! Reading and writing trace context headers: W3C `traceparent`/`tracestate` and B3 (multi
//! header `x-b3-*` and single `b3`).
//!
//! Hand-written rather than the OpenTelemetry propagators, because this runs on every request,
//! sampled or not, and the budget for the unsampled path is a fraction of a microsecond:
//!
//! - Parsing works on the header bytes in place; nothing is allocated. The `TextMapPropagator`
//!   route allocates a `Context`, a `Vec` per split header and (B3) two lower-cased copies of
//!   every id.
//! - Writing formats into stack buffers; the only allocations are the new header values
//!   themselves (one for `traceparent`, and one per B3 id header when B3 is forwarded).
//! - B3 semantics follow the B3 specification where `opentelemetry-propagator-b3` differs: a
//!   context without a sampling state is *deferred* (this proxy's sampling percentage decides,
//!   rather than "not sampled"), debug (`d`, `x-b3-flags: 1`) means sampled, a sampling-only
//!   header (`b3: 0`, `x-b3-sampled: 1`) is a decision without a parent, and 64-bit trace ids
//!   go back out as 64-bit ids.
//!
//! Interoperability with the reference propagators is checked by the tests below.
//!
//! Precedence: a valid `traceparent` wins; otherwise a valid `b3`; otherwise the `x-b3-*`
//! headers. Whatever is malformed is ignored as if absent (a new root starts), never an error.

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use opentelemetry::trace::{SpanId, TraceId};

pub(crate) const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub(crate) const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub(crate) const B3: HeaderName = HeaderName::from_static("b3");
pub(crate) const X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub(crate) const X_B3_SPANID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub(crate) const X_B3_PARENTSPANID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub(crate) const X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");

/// Length of a version-00 `traceparent`: `00-{32 hex}-{16 hex}-{2 hex}`.
const TRACEPARENT_LEN: usize = 55;

/// The caller's span, as propagated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Parent {
    pub(crate) trace_id: TraceId,
    pub(crate) span_id: SpanId,
}

/// What a request's headers say about its trace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Extracted {
    /// The caller's span, when a valid context was propagated.
    pub(crate) parent: Option<Parent>,
    /// The caller's sampling decision; `None` when it made none (no headers, or a deferred B3
    /// context), so this proxy's percentage decides.
    pub(crate) sampled: Option<bool>,
    /// The parent came from a valid `traceparent`, so the `tracestate` beside it belongs to
    /// the trace being continued and is forwarded untouched.
    pub(crate) w3c: bool,
    /// The request carried the single `b3` header: the forwarded request gets one back.
    pub(crate) b3_single: bool,
    /// The request carried `x-b3-*` headers: the forwarded request gets them back.
    pub(crate) b3_multi: bool,
    /// B3 debug: forwarded as `d` in `b3`; `x-b3-flags` is left as it came.
    pub(crate) debug: bool,
    /// The B3 trace id was 64 bits (16 hex digits): B3 headers keep that width.
    pub(crate) b3_short_trace_id: bool,
    /// The request carried a `tracestate`.
    pub(crate) tracestate: bool,
}

/// What the forwarded request carries: this proxy's span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Outgoing {
    pub(crate) trace_id: TraceId,
    pub(crate) span_id: SpanId,
    /// The span's parent (B3's `x-b3-parentspanid`), when it has one.
    pub(crate) parent_span_id: Option<SpanId>,
    pub(crate) sampled: bool,
}

/// The trace headers of a request, found in one pass over its headers.
#[derive(Default)]
struct Found<'a> {
    traceparent: Option<&'a [u8]>,
    /// More than one `traceparent`: ambiguous, so invalid (W3C).
    traceparents: usize,
    b3: Option<&'a [u8]>,
    trace_id: Option<&'a [u8]>,
    span_id: Option<&'a [u8]>,
    sampled: Option<&'a [u8]>,
    flags: Option<&'a [u8]>,
}

impl<'a> Found<'a> {
    /// One walk over the headers rather than a lookup per name: a request has a handful of
    /// headers, and each `HeaderMap` lookup of a custom name hashes it, so for the usual
    /// request the walk is the cheaper (and its cost does not depend on how many names we
    /// look for).
    fn scan(headers: &'a HeaderMap) -> (Found<'a>, bool) {
        let mut found = Found::default();
        let mut tracestate = false;
        for (name, value) in headers {
            let value = value.as_bytes();
            match name.as_str() {
                "traceparent" => {
                    found.traceparent = Some(value);
                    found.traceparents += 1;
                }
                "tracestate" => tracestate = true,
                "b3" => found.b3 = Some(value),
                "x-b3-traceid" => found.trace_id = Some(value),
                "x-b3-spanid" => found.span_id = Some(value),
                "x-b3-sampled" => found.sampled = Some(value),
                "x-b3-flags" => found.flags = Some(value),
                _ => {}
            }
        }
        (found, tracestate)
    }
}

/// Reads the trace context of a request. Never fails: malformed headers are ignored.
pub(crate) fn extract(headers: &HeaderMap) -> Extracted {
    let (found, tracestate) = Found::scan(headers);
    let mut out = Extracted {
        b3_single: found.b3.is_some(),
        b3_multi: found.trace_id.is_some() || found.sampled.is_some(),
        tracestate,
        ..Extracted::default()
    };
    let debug_flag = found.flags.is_some_and(|v| trim(v) == b"1");

    let traceparent = found.traceparent.filter(|_| found.traceparents == 1);
    if let Some((parent, sampled)) = traceparent.and_then(parse_traceparent) {
        out.parent = Some(parent);
        out.sampled = Some(sampled);
        out.w3c = true;
        // B3 beside a valid traceparent (a proxy upstream forwards both) is overwritten;
        // only its debug flag and trace id width carry over, so B3 apps see what they sent.
        if let Some(b3) = found.b3.and_then(parse_b3_single) {
            out.debug = b3.debug;
            out.b3_short_trace_id = b3.short_trace_id;
        } else if out.b3_multi {
            out.debug = debug_flag;
            out.b3_short_trace_id = found.trace_id.is_some_and(|v| trim(v).len() == 16);
        }
        return out;
    }

    if let Some(b3) = found.b3.and_then(parse_b3_single) {
        out.parent = b3.parent;
        out.sampled = b3.sampled;
        out.debug = b3.debug;
        out.b3_short_trace_id = b3.short_trace_id;
        return out;
    }

    if out.b3_multi {
        let trace = found.trace_id.and_then(|v| parse_b3_trace_id(trim(v)));
        let span = found.span_id.and_then(|v| parse_b3_span_id(trim(v)));
        if let (Some((trace_id, short)), Some(span_id)) = (trace, span) {
            out.parent = Some(Parent { trace_id, span_id });
            out.b3_short_trace_id = short;
        }
        out.debug = debug_flag;
        out.sampled = if debug_flag {
            Some(true)
        } else {
            // A malformed sampling state is ignored: the decision is deferred to us.
            found.sampled.and_then(|v| match trim(v) {
                b"1" | b"true" => Some(true),
                b"0" | b"false" => Some(false),
                _ => None,
            })
        };
    }
    out
}

/// Writes this proxy's span into the forwarded request: `traceparent` always (W3C is the
/// mesh's own format), B3 in each form the request came with.
pub(crate) fn inject(headers: &mut HeaderMap, extracted: &Extracted, out: &Outgoing) {
    let mut tp = [0u8; TRACEPARENT_LEN];
    tp[..3].copy_from_slice(b"00-");
    hex(&out.trace_id.to_bytes(), &mut tp[3..35]);
    tp[35] = b'-';
    hex(&out.span_id.to_bytes(), &mut tp[36..52]);
    tp[52..54].copy_from_slice(b"-0");
    tp[54] = if out.sampled { b'1' } else { b'0' };
    set(headers, TRACEPARENT, &tp);
    if extracted.tracestate && !extracted.w3c {
        // A tracestate without a valid traceparent belongs to no trace we continue (W3C:
        // a restarted trace does not inherit it).
        headers.remove(TRACESTATE);
    }

    if !(extracted.b3_single || extracted.b3_multi) {
        return;
    }
    let mut trace_buf = [0u8; 32];
    hex(&out.trace_id.to_bytes(), &mut trace_buf);
    // A 64-bit B3 trace id went through W3C zero-padded; B3 apps get their width back.
    let trace_hex: &[u8] = if extracted.b3_short_trace_id && trace_buf[..16] == [b'0'; 16] {
        &trace_buf[16..]
    } else {
        &trace_buf
    };
    let mut span_hex = [0u8; 16];
    hex(&out.span_id.to_bytes(), &mut span_hex);
    let mut parent_hex = [0u8; 16];
    if let Some(parent) = out.parent_span_id {
        hex(&parent.to_bytes(), &mut parent_hex);
    }

    if extracted.b3_multi {
        set(headers, X_B3_TRACEID, trace_hex);
        set(headers, X_B3_SPANID, &span_hex);
        if out.parent_span_id.is_some() {
            set(headers, X_B3_PARENTSPANID, &parent_hex);
        } else {
            headers.remove(X_B3_PARENTSPANID);
        }
        // B3: debug implies sampled and is carried by `x-b3-flags`, left as it came.
        if !extracted.debug {
            let sampled = if out.sampled { "1" } else { "0" };
            headers.insert(X_B3_SAMPLED, HeaderValue::from_static(sampled));
        }
    }
    if extracted.b3_single {
        // {trace}-{span}-{state}[-{parent}]: at most 32 + 1 + 16 + 2 + 17 bytes.
        let mut buf = [0u8; 68];
        let mut n = 0;
        for part in [trace_hex, b"-", &span_hex, b"-"] {
            buf[n..n + part.len()].copy_from_slice(part);
            n += part.len();
        }
        buf[n] = match (extracted.debug, out.sampled) {
            (true, _) => b'd',
            (false, true) => b'1',
            (false, false) => b'0',
        };
        n += 1;
        if out.parent_span_id.is_some() {
            buf[n] = b'-';
            buf[n + 1..n + 17].copy_from_slice(&parent_hex);
            n += 17;
        }
        set(headers, B3, &buf[..n]);
    }
}

fn set(headers: &mut HeaderMap, name: HeaderName, value: &[u8]) {
    // Only hex digits and '-' are written, which are always valid header bytes.
    if let Ok(value) = HeaderValue::from_bytes(value) {
        headers.insert(name, value);
    }
}

/// W3C Trace Context: `{version}-{trace-id}-{parent-id}-{flags}`, lower-case hex. A version
/// above `00` may append fields after a `-`; `ff` is invalid; all-zero ids are invalid.
fn parse_traceparent(value: &[u8]) -> Option<(Parent, bool)> {
    let v = trim(value);
    if v.len() < TRACEPARENT_LEN {
        return None;
    }
    let version = parse_hex_u64(&v[..2], false)?;
    if version == 0xff
        || (version == 0 && v.len() != TRACEPARENT_LEN)
        || (v.len() > TRACEPARENT_LEN && v[TRACEPARENT_LEN] != b'-')
        || v[2] != b'-'
        || v[35] != b'-'
        || v[52] != b'-'
    {
        return None;
    }
    let trace_id = parse_hex_u128(&v[3..35], false)?;
    let span_id = parse_hex_u64(&v[36..52], false)?;
    let flags = parse_hex_u64(&v[53..55], false)?;
    if trace_id == 0 || span_id == 0 {
        return None;
    }
    let parent = Parent {
        trace_id: TraceId::from(trace_id),
        span_id: SpanId::from(span_id),
    };
    Some((parent, flags & 1 == 1))
}

/// A parsed single `b3` header.
#[derive(Debug, Default, PartialEq, Eq)]
struct B3Single {
    parent: Option<Parent>,
    sampled: Option<bool>,
    debug: bool,
    short_trace_id: bool,
}

/// `b3: {trace}-{span}[-{state}[-{parent}]]` or a bare state `b3: {0|1|d}`.
fn parse_b3_single(value: &[u8]) -> Option<B3Single> {
    let v = trim(value);
    if v.len() == 1 {
        let (sampled, debug) = parse_b3_state(v)?;
        return Some(B3Single {
            sampled: Some(sampled),
            debug,
            ..B3Single::default()
        });
    }
    let mut parts = v.split(|&b| b == b'-');
    let (trace_id, short_trace_id) = parse_b3_trace_id(parts.next()?)?;
    let span_id = parse_b3_span_id(parts.next()?)?;
    let state = parts.next().map(parse_b3_state);
    if let Some(parent) = parts.next() {
        parse_b3_span_id(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    let (sampled, debug) = match state {
        Some(state) => {
            let (sampled, debug) = state?;
            (Some(sampled), debug)
        }
        None => (None, false),
    };
    Some(B3Single {
        parent: Some(Parent { trace_id, span_id }),
        sampled,
        debug,
        short_trace_id,
    })
}

/// The B3 sampling state: (sampled, debug).
fn parse_b3_state(state: &[u8]) -> Option<(bool, bool)> {
    match state {
        b"1" => Some((true, false)),
        b"0" => Some((false, false)),
        b"d" => Some((true, true)),
        _ => None,
    }
}

/// A B3 trace id: 32 or 16 hex digits (the latter zero-padded to 128 bits), not all zero.
fn parse_b3_trace_id(hex: &[u8]) -> Option<(TraceId, bool)> {
    if hex.len() != 32 && hex.len() != 16 {
        return None;
    }
    let id = parse_hex_u128(hex, true)?;
    (id != 0).then(|| (TraceId::from(id), hex.len() == 16))
}

/// A B3 span id: 16 hex digits, not all zero.
fn parse_b3_span_id(hex: &[u8]) -> Option<SpanId> {
    if hex.len() != 16 {
        return None;
    }
    let id = parse_hex_u64(hex, true)?;
    (id != 0).then(|| SpanId::from(id))
}

/// Hex of the caller's width: W3C demands lower case; B3 asks for it too, but Envoy accepts upper case
/// and so do we (`upper_ok`), so B3 apps that shout keep their traces.
fn parse_hex_u128(hex: &[u8], upper_ok: bool) -> Option<u128> {
    if hex.is_empty() || hex.len() > 32 {
        return None;
    }
    let mut n: u128 = 0;
    for &b in hex {
        n = (n << 4) | u128::from(hex_digit(b, upper_ok)?);
    }
    Some(n)
}

fn parse_hex_u64(hex: &[u8], upper_ok: bool) -> Option<u64> {
    if hex.is_empty() || hex.len() > 16 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in hex {
        n = (n << 4) | u64::from(hex_digit(b, upper_ok)?);
    }
    Some(n)
}

fn hex_digit(b: u8, upper_ok: bool) -> Option<u8> {
    // Table lookups: ids are decoded on every request, a digit at a time.
    let table = if upper_ok { &HEX_ANY_CASE } else { &HEX_LOWER };
    let digit = table[usize::from(b)];
    (digit != INVALID).then_some(digit)
}

const INVALID: u8 = 0xff;
const HEX_LOWER: [u8; 256] = hex_table(false);
const HEX_ANY_CASE: [u8; 256] = hex_table(true);

const fn hex_table(upper: bool) -> [u8; 256] {
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        if upper {
            table[b'A' as usize + i] = 10 + i as u8;
        }
        i += 1;
    }
    table
}

fn hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
}

fn trim(v: &[u8]) -> &[u8] {
    v.trim_ascii()
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
    use opentelemetry::trace::{SpanContext, TraceContextExt, TraceFlags, TraceState};
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn parent(trace: &str, span: &str) -> Option<Parent> {
        Some(Parent {
            trace_id: TraceId::from_hex(trace).unwrap(),
            span_id: SpanId::from_hex(span).unwrap(),
        })
    }

    fn outgoing(sampled: bool, parent_span: Option<&str>) -> Outgoing {
        Outgoing {
            trace_id: TraceId::from_hex(TRACE).unwrap(),
            span_id: SpanId::from_hex("1111111111111111").unwrap(),
            parent_span_id: parent_span.map(|s| SpanId::from_hex(s).unwrap()),
            sampled,
        }
    }

    fn get<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
        h.get(name).map(|v| v.to_str().unwrap())
    }

    #[test]
    fn w3c_traceparent_is_extracted() {
        let tp = format!("00-{TRACE}-{SPAN}-01");
        let got = extract(&headers(&[("traceparent", &tp), ("tracestate", "a=b")]));
        assert_eq!(got.parent, parent(TRACE, SPAN));
        assert_eq!(got.sampled, Some(true));
        assert!(got.w3c && !got.b3_multi && !got.b3_single);

        let tp = format!("00-{TRACE}-{SPAN}-00");
        assert_eq!(
            extract(&headers(&[("traceparent", &tp)])).sampled,
            Some(false)
        );
        // Only bit 0 means sampled; a future version may append fields.
        let tp = format!("00-{TRACE}-{SPAN}-02");
        assert_eq!(
            extract(&headers(&[("traceparent", &tp)])).sampled,
            Some(false)
        );
        let tp = format!("cc-{TRACE}-{SPAN}-01-what-the-future-holds");
        let got = extract(&headers(&[("traceparent", &tp)]));
        assert_eq!((got.parent, got.sampled), (parent(TRACE, SPAN), Some(true)));
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        let zero_trace = format!("00-{}-{SPAN}-01", "0".repeat(32));
        let zero_span = format!("00-{TRACE}-{}-01", "0".repeat(16));
        let upper = format!("00-{}-{SPAN}-01", TRACE.to_uppercase());
        let v00_extra = format!("00-{TRACE}-{SPAN}-01-extra");
        let ff = format!("ff-{TRACE}-{SPAN}-01");
        let short = format!("00-{}-{SPAN}-01", &TRACE[2..]);
        let no_dash = format!("00-{TRACE}{SPAN}-01-");
        let glued = format!("01-{TRACE}-{SPAN}-01x");
        let bad_flags = format!("00-{TRACE}-{SPAN}-0g");
        let unicode = format!("00-{TRACE}-{}é-01", &SPAN[..14]);
        for bad in [
            "",
            "garbage",
            &zero_trace,
            &zero_span,
            &upper,
            &v00_extra,
            &ff,
            &short,
            &no_dash,
            &glued,
            &bad_flags,
            &unicode,
        ] {
            let mut h = HeaderMap::new();
            h.insert(
                "traceparent",
                HeaderValue::from_bytes(bad.as_bytes()).unwrap(),
            );
            let got = extract(&h);
            assert_eq!(got, Extracted::default(), "{bad:?}");
        }
        // Two traceparents: ambiguous, so invalid.
        let tp = format!("00-{TRACE}-{SPAN}-01");
        let got = extract(&headers(&[("traceparent", &tp), ("traceparent", &tp)]));
        assert_eq!(got.parent, None);
    }

    #[test]
    fn b3_multi_headers_are_extracted() {
        let got = extract(&headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-parentspanid", "0000000000000001"),
            ("x-b3-sampled", "1"),
        ]));
        assert_eq!(got.parent, parent(TRACE, SPAN));
        assert_eq!(got.sampled, Some(true));
        assert!(got.b3_multi && !got.w3c && !got.b3_single);

        for (state, sampled) in [
            ("0", Some(false)),
            ("false", Some(false)),
            ("true", Some(true)),
        ] {
            let got = extract(&headers(&[
                ("x-b3-traceid", TRACE),
                ("x-b3-spanid", SPAN),
                ("x-b3-sampled", state),
            ]));
            assert_eq!(got.sampled, sampled, "{state}");
        }
        // No sampling state: deferred to us, with the parent kept.
        let got = extract(&headers(&[("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN)]));
        assert_eq!((got.parent, got.sampled), (parent(TRACE, SPAN), None));
        // Debug implies sampled, even over x-b3-sampled: 0.
        let got = extract(&headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "0"),
            ("x-b3-flags", "1"),
        ]));
        assert_eq!((got.sampled, got.debug), (Some(true), true));
        // 64-bit trace id, upper case accepted as Envoy does.
        let got = extract(&headers(&[
            ("x-b3-traceid", "A3CE929D0E0E4736"),
            ("x-b3-spanid", SPAN),
        ]));
        assert_eq!(got.parent, parent("0000000000000000a3ce929d0e0e4736", SPAN));
        assert!(got.b3_short_trace_id);
        // A sampling decision without ids.
        let got = extract(&headers(&[("x-b3-sampled", "0")]));
        assert_eq!(
            (got.parent, got.sampled, got.b3_multi),
            (None, Some(false), true)
        );
    }

    #[test]
    fn b3_single_header_is_extracted() {
        let cases = [
            (format!("{TRACE}-{SPAN}"), None, false),
            (format!("{TRACE}-{SPAN}-1"), Some(true), false),
            (format!("{TRACE}-{SPAN}-0"), Some(false), false),
            (format!("{TRACE}-{SPAN}-d"), Some(true), true),
            (
                format!("{TRACE}-{SPAN}-1-0000000000000001"),
                Some(true),
                false,
            ),
        ];
        for (value, sampled, debug) in cases {
            let got = extract(&headers(&[("b3", &value)]));
            assert_eq!(got.parent, parent(TRACE, SPAN), "{value}");
            assert_eq!((got.sampled, got.debug), (sampled, debug), "{value}");
            assert!(got.b3_single && !got.b3_multi);
        }
        for (value, sampled) in [("0", false), ("1", true), ("d", true)] {
            let got = extract(&headers(&[("b3", value)]));
            assert_eq!((got.parent, got.sampled), (None, Some(sampled)), "{value}");
        }
        let short = extract(&headers(&[("b3", &format!("{}-{SPAN}-1", &TRACE[16..]))]));
        assert!(short.b3_short_trace_id);
        assert_eq!(
            short.parent,
            parent(&format!("{:0>32}", &TRACE[16..]), SPAN)
        );
    }

    #[test]
    fn malformed_b3_is_ignored_and_single_falls_back_to_multi() {
        for bad in [
            "x",
            "2",
            TRACE,
            &format!("{TRACE}-{SPAN}-2"),
            &format!("{TRACE}-{SPAN}-1-xyz"),
            &format!("{TRACE}-{SPAN}-1-{SPAN}-more"),
            &format!("{}-{SPAN}-1", &TRACE[1..]),
            &format!("{TRACE}-{}-1", &SPAN[1..]),
            &format!("{}-{SPAN}-1", "0".repeat(32)),
            &format!("{TRACE}-{SPAN}1"),
        ] {
            let got = extract(&headers(&[("b3", bad)]));
            assert_eq!((got.parent, got.sampled), (None, None), "{bad:?}");
        }
        let got = extract(&headers(&[
            ("b3", "nonsense"),
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "1"),
        ]));
        assert_eq!((got.parent, got.sampled), (parent(TRACE, SPAN), Some(true)));
        // Bad ids: no parent; a bad sampling state: deferred.
        let got = extract(&headers(&[
            ("x-b3-traceid", "zz"),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "yes"),
        ]));
        assert_eq!((got.parent, got.sampled), (None, None));
    }

    #[test]
    fn traceparent_wins_over_b3() {
        let tp = format!("00-{TRACE}-{SPAN}-00");
        let got = extract(&headers(&[
            ("traceparent", &tp),
            ("x-b3-traceid", "1234567812345678"),
            ("x-b3-spanid", "1234567812345678"),
            ("x-b3-sampled", "1"),
        ]));
        assert_eq!(
            (got.parent, got.sampled),
            (parent(TRACE, SPAN), Some(false))
        );
        assert!(got.w3c && got.b3_multi);
    }

    #[test]
    fn the_next_hop_keeps_b3_width_and_debug() {
        // What a proxy upstream forwards for a 64-bit B3 debug trace: both formats.
        let short = &TRACE[16..];
        let tp = format!("00-{short:0>32}-{SPAN}-01");
        let mut h = headers(&[("traceparent", &tp), ("b3", &format!("{short}-{SPAN}-d"))]);
        let got = extract(&h);
        assert!(got.w3c && got.debug && got.b3_short_trace_id);
        let mut out = outgoing(true, Some(SPAN));
        out.trace_id = got.parent.unwrap().trace_id;
        inject(&mut h, &got, &out);
        assert_eq!(
            get(&h, "b3"),
            Some(format!("{short}-1111111111111111-d-{SPAN}").as_str())
        );
    }

    #[test]
    fn injects_w3c_and_drops_an_orphan_tracestate() {
        let mut h = headers(&[("tracestate", "vendor=1")]);
        let got = extract(&h);
        assert!(got.tracestate && !got.w3c);
        inject(&mut h, &got, &outgoing(true, None));
        assert_eq!(
            get(&h, "traceparent"),
            Some(format!("00-{TRACE}-1111111111111111-01").as_str())
        );
        assert_eq!(get(&h, "tracestate"), None);
        assert_eq!(
            get(&h, "x-b3-traceid"),
            None,
            "no B3 unless it came with B3"
        );
        assert_eq!(get(&h, "b3"), None);

        let tp = format!("00-{TRACE}-{SPAN}-00");
        let mut h = headers(&[("traceparent", &tp), ("tracestate", "vendor=1")]);
        let got = extract(&h);
        inject(&mut h, &got, &outgoing(false, Some(SPAN)));
        assert_eq!(
            get(&h, "traceparent"),
            Some(format!("00-{TRACE}-1111111111111111-00").as_str())
        );
        assert_eq!(get(&h, "tracestate"), Some("vendor=1"));
    }

    #[test]
    fn injects_b3_in_the_forms_it_came_in() {
        let mut h = headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "1"),
        ]);
        let got = extract(&h);
        inject(&mut h, &got, &outgoing(true, Some(SPAN)));
        assert_eq!(get(&h, "x-b3-traceid"), Some(TRACE));
        assert_eq!(get(&h, "x-b3-spanid"), Some("1111111111111111"));
        assert_eq!(get(&h, "x-b3-parentspanid"), Some(SPAN));
        assert_eq!(get(&h, "x-b3-sampled"), Some("1"));
        assert!(get(&h, "traceparent").is_some());
        assert_eq!(get(&h, "b3"), None);

        let mut h = headers(&[("b3", &format!("{}-{SPAN}-d", &TRACE[16..]))]);
        let got = extract(&h);
        let mut out = outgoing(true, Some(SPAN));
        out.trace_id = got.parent.unwrap().trace_id;
        inject(&mut h, &got, &out);
        assert_eq!(
            get(&h, "b3"),
            Some(format!("{}-1111111111111111-d-{SPAN}", &TRACE[16..]).as_str()),
            "64-bit ids stay 64-bit in B3, debug stays debug"
        );
        assert_eq!(
            get(&h, "traceparent"),
            Some(format!("00-{:0>32}-1111111111111111-01", &TRACE[16..]).as_str())
        );
        assert_eq!(get(&h, "x-b3-traceid"), None);

        // A root (a sampling-only B3 header): no parent id goes out.
        let mut h = headers(&[
            ("b3", "0"),
            ("x-b3-sampled", "0"),
            ("x-b3-parentspanid", SPAN),
        ]);
        let got = extract(&h);
        inject(&mut h, &got, &outgoing(false, None));
        assert_eq!(
            get(&h, "b3"),
            Some(format!("{TRACE}-1111111111111111-0").as_str())
        );
        assert_eq!(get(&h, "x-b3-sampled"), Some("0"));
        assert_eq!(get(&h, "x-b3-parentspanid"), None);
    }

    // The reference propagators as oracles: what we write, they read, and the reverse.

    struct Map<'a>(&'a HeaderMap);
    impl Extractor for Map<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(|k| k.as_str()).collect()
        }
    }
    struct MapMut<'a>(&'a mut HeaderMap);
    impl Injector for MapMut<'_> {
        fn set(&mut self, key: &str, value: String) {
            if !value.is_empty() {
                let name = HeaderName::from_bytes(key.as_bytes()).unwrap();
                self.0.insert(name, HeaderValue::from_str(&value).unwrap());
            }
        }
    }

    fn reference_context(sampled: bool) -> opentelemetry::Context {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let sc = SpanContext::new(
            TraceId::from_hex(TRACE).unwrap(),
            SpanId::from_hex(SPAN).unwrap(),
            flags,
            true,
            TraceState::default(),
        );
        opentelemetry::Context::new().with_remote_span_context(sc)
    }

    #[test]
    fn agrees_with_the_reference_propagators() {
        use opentelemetry_propagator_b3::{B3Encoding, Propagator as B3Propagator};
        let encodings = [B3Encoding::MultipleHeader, B3Encoding::SingleHeader];
        for sampled in [true, false] {
            let cx = reference_context(sampled);
            let mut h = HeaderMap::new();
            TraceContextPropagator::new().inject_context(&cx, &mut MapMut(&mut h));
            let got = extract(&h);
            assert_eq!(
                (got.parent, got.sampled),
                (parent(TRACE, SPAN), Some(sampled))
            );
            for encoding in encodings.clone() {
                let mut h = HeaderMap::new();
                B3Propagator::with_encoding(encoding).inject_context(&cx, &mut MapMut(&mut h));
                let got = extract(&h);
                assert_eq!(
                    (got.parent, got.sampled),
                    (parent(TRACE, SPAN), Some(sampled))
                );
            }

            // And what we write, they read.
            let mut h = headers(&[("b3", "1"), ("x-b3-sampled", "1")]);
            let out = Outgoing {
                trace_id: TraceId::from_hex(TRACE).unwrap(),
                span_id: SpanId::from_hex(SPAN).unwrap(),
                parent_span_id: Some(SpanId::from_hex("0000000000000007").unwrap()),
                sampled,
            };
            let got = extract(&h);
            inject(&mut h, &got, &out);
            let want = cx.span().span_context().clone();
            let w3c = TraceContextPropagator::new().extract(&Map(&h));
            assert_eq!(w3c.span().span_context(), &want);
            for encoding in encodings.clone() {
                let b3 = B3Propagator::with_encoding(encoding).extract(&Map(&h));
                assert_eq!(b3.span().span_context(), &want);
            }
        }
    }
}
