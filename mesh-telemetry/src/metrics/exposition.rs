//! The two text formats a scraper may ask for: Prometheus text 0.0.4 and OpenMetrics 1.0.
//!
//! prometheus-client writes OpenMetrics only. Prometheus text differs in a few places
//! that matter to a parser, so the Prometheus rendering is derived from the OpenMetrics one
//! line by line (at scrape time, off the request path):
//!
//! - a counter's `# HELP`/`# TYPE` name the sample (`istio_requests_total`), where
//!   OpenMetrics names the family (`istio_requests`); samples are unchanged;
//! - `info` becomes a `gauge` named `<family>_info`, `stateset` a `gauge`,
//!   `gaugehistogram` a `histogram`, `unknown` is `untyped`;
//! - `# UNIT` lines, exemplars and the closing `# EOF` do not exist;
//! - whole bucket bounds print without a fraction (`le="1000"`, not `le="1000.0"`), as
//!   Envoy and client_golang print them: Prometheus 2 compares `le` as a string, so a fleet
//!   mixing these sidecars with Envoy's would otherwise split each bucket in two.

use std::fmt::Write;

use http::HeaderValue;

/// A metrics exposition format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4 (what Envoy's `/stats/prometheus` serves).
    #[default]
    Prometheus,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

/// The `Content-Type` of Prometheus text.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The `Content-Type` of OpenMetrics text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl Format {
    /// The format a scraper's `Accept` header prefers: OpenMetrics when it weighs
    /// `application/openmetrics-text` above `text/plain` (as Prometheus does), else
    /// Prometheus text (also with no header, or one that names neither).
    ///
    /// ```
    /// use mesh_telemetry::metrics::Format;
    /// let prometheus = "application/openmetrics-text;version=1.0.0,\
    ///     application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    /// assert_eq!(Format::from_accept(Some(&prometheus.parse().unwrap())), Format::OpenMetrics);
    /// assert_eq!(Format::from_accept(Some(&"text/plain".parse().unwrap())), Format::Prometheus);
    /// assert_eq!(Format::from_accept(None), Format::Prometheus);
    /// ```
    pub fn from_accept(accept: Option<&HeaderValue>) -> Format {
        let Some(accept) = accept.and_then(|v| v.to_str().ok()) else {
            return Format::Prometheus;
        };
        let (mut openmetrics, mut text) = (0.0f32, 0.0f32);
        for item in accept.split(',') {
            let mut params = item.split(';');
            let media = params.next().unwrap_or_default().trim();
            let q = params
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .filter(|q| q.is_finite())
                .unwrap_or(1.0);
            if media.eq_ignore_ascii_case("application/openmetrics-text") {
                openmetrics = openmetrics.max(q);
            } else if media.eq_ignore_ascii_case("text/plain") {
                text = text.max(q);
            }
        }
        if openmetrics > 0.0 && openmetrics > text {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    /// The `Content-Type` of a response in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => PROMETHEUS_CONTENT_TYPE,
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }
}

/// Rewrites prometheus-client's OpenMetrics text as Prometheus text 0.0.4.
pub(crate) fn openmetrics_to_prometheus(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    // prometheus-client writes HELP before TYPE; the HELP's name depends on the type.
    let mut help: Option<(&str, &str)> = None;
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            flush_help(&mut out, help.take());
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (suffix, kind) = match kind {
                "counter" if !family.ends_with("_total") => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "stateset" => ("", "gauge"),
                "gaugehistogram" => ("", "histogram"),
                "unknown" => ("", "untyped"),
                other => ("", other),
            };
            match help.take() {
                Some((name, text)) if name == family => {
                    let _ = writeln!(out, "# HELP {family}{suffix} {text}");
                }
                other => flush_help(&mut out, other),
            }
            let _ = writeln!(out, "# TYPE {family}{suffix} {kind}");
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        } else {
            flush_help(&mut out, help.take());
            push_sample(&mut out, strip_exemplar(line));
            out.push('\n');
        }
    }
    flush_help(&mut out, help);
    out
}

fn flush_help(out: &mut String, help: Option<(&str, &str)>) {
    if let Some((name, text)) = help {
        let _ = writeln!(out, "# HELP {name} {text}");
    }
}

/// Writes a sample line, with a whole `le` bound (`1000.0`) written as an integer.
fn push_sample(out: &mut String, line: &str) {
    let bound = ["{le=\"", ",le=\""]
        .iter()
        .find_map(|p| line.find(p).map(|i| i + p.len()));
    if let Some(start) = bound
        && let Some(len) = line[start..].find('"')
    {
        let value = &line[start..start + len];
        if let Some(whole) = value.strip_suffix(".0")
            && !whole.is_empty()
            && whole.bytes().all(|b| b.is_ascii_digit())
        {
            out.push_str(&line[..start]);
            out.push_str(whole);
            out.push_str(&line[start + len..]);
            return;
        }
    }
    out.push_str(line);
}

/// A sample line without its exemplar (` # {...} value`), which only OpenMetrics has. The
/// ` # ` is looked for outside quoted label values.
fn strip_exemplar(line: &str) -> &str {
    let bytes = line.as_bytes();
    let (mut quoted, mut escaped) = (false, false);
    for (i, &b) in bytes.iter().enumerate() {
        if quoted {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => quoted = false,
                _ => {}
            }
        } else if b == b'"' {
            quoted = true;
        } else if b == b' ' && bytes[i..].starts_with(b" # ") {
            return &line[..i];
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation_weighs_q_values() {
        let pick = |s: &str| Format::from_accept(Some(&HeaderValue::from_str(s).unwrap()));
        assert_eq!(pick("application/openmetrics-text"), Format::OpenMetrics);
        assert_eq!(
            pick("text/plain;q=0.9, application/openmetrics-text;version=1.0.0;q=0.8"),
            Format::Prometheus
        );
        assert_eq!(
            pick("application/openmetrics-text;q=0, text/plain;q=0.1"),
            Format::Prometheus
        );
        assert_eq!(pick("*/*"), Format::Prometheus);
        assert_eq!(
            pick("application/openmetrics-text;q=banana"),
            Format::OpenMetrics
        );
    }

    #[test]
    fn converts_every_kind() {
        let om = "\
# HELP istio_requests Total requests.
# TYPE istio_requests counter
istio_requests_total{reporter=\"source\"} 3
# HELP build Build info.
# TYPE build info
build_info{version=\"1\"} 1
# HELP temp_celsius A gauge.
# TYPE temp_celsius gauge
# UNIT temp_celsius celsius
temp_celsius 21.5
# HELP odd Something.
# TYPE odd unknown
odd 1
# HELP c2 Exemplars.
# TYPE c2 counter
c2_total{path=\"/a # {b}\"} 1 # {trace_id=\"x\"} 1.0
# HELP d Durations.
# TYPE d histogram
d_sum{a=\"1.0\"} 2.5
d_bucket{le=\"0.5\",a=\"1.0\"} 1
d_bucket{a=\"x\",le=\"1000.0\"} 2
d_bucket{le=\"+Inf\"} 2
# EOF
";
        let want = "\
# HELP istio_requests_total Total requests.
# TYPE istio_requests_total counter
istio_requests_total{reporter=\"source\"} 3
# HELP build_info Build info.
# TYPE build_info gauge
build_info{version=\"1\"} 1
# HELP temp_celsius A gauge.
# TYPE temp_celsius gauge
temp_celsius 21.5
# HELP odd Something.
# TYPE odd untyped
odd 1
# HELP c2_total Exemplars.
# TYPE c2_total counter
c2_total{path=\"/a # {b}\"} 1
# HELP d Durations.
# TYPE d histogram
d_sum{a=\"1.0\"} 2.5
d_bucket{le=\"0.5\",a=\"1.0\"} 1
d_bucket{a=\"x\",le=\"1000\"} 2
d_bucket{le=\"+Inf\"} 2
";
        assert_eq!(openmetrics_to_prometheus(om), want);
    }
}
