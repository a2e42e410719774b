//! Semantic checks on one parsed resource, after its types have checked themselves (port
//! ranges, durations, regexes and percentages fail during parsing, with a line number).
//!
//! These are Istio's validation rules that span several fields: one action per HTTP route,
//! weights summing to 100, `STATIC` endpoints with IP addresses, and so on. Each finding is a
//! field path plus a message; the loader turns the path into a line.

use std::collections::HashSet;
use std::net::IpAddr;

use super::bootstrap::{BootstrapSpec, MAX_RATE_LIMIT, MIN_REQUEST_HEADERS_BYTES};
use super::networking::{
    ClientTlsMode, ClientTlsSettings, ConnectionPoolSettings, CorsPolicy, Destination,
    DestinationRuleSpec, GatewaySpec, HeaderOperations, Headers, HttpMatchRequest, HttpRedirect,
    HttpRewrite, HttpRoute, LoadBalancerSettings, OutlierDetection, Resolution, ServerTlsMode,
    ServiceEntrySpec, SidecarSpec, TrafficPolicy, VirtualServiceSpec, WorkloadEntrySpec,
};
use super::security::{AuthorizationAction, AuthorizationPolicySpec, PeerAuthenticationSpec};
use super::types::Duration;
use crate::target::RetryOn;

/// Findings for one resource: (field path, message).
#[derive(Debug, Default)]
pub(crate) struct Issues(pub Vec<(String, String)>);

impl Issues {
    pub fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push((path.into(), message.into()));
    }

    fn positive(&mut self, path: impl Into<String>, d: Option<Duration>) {
        if d.is_some_and(Duration::is_zero) {
            self.add(path, "duration must be greater than 0");
        }
    }

    fn at_most_100(&mut self, path: impl Into<String>, value: Option<u32>) {
        if let Some(v) = value.filter(|v| *v > 100) {
            self.add(path, format!("percentage {v} is not in 0..=100"));
        }
    }

    /// Fields of a protobuf `oneof`: at most one may be set (exactly one when `required`).
    fn one_of(&mut self, path: &str, fields: &[(&str, bool)], required: bool) {
        let set: Vec<&str> = fields.iter().filter(|f| f.1).map(|f| f.0).collect();
        let names = || fields.iter().map(|f| f.0).collect::<Vec<_>>().join(", ");
        if set.len() > 1 {
            self.add(
                path,
                format!("{} are mutually exclusive", set.join(" and ")),
            );
        } else if set.is_empty() && required {
            self.add(path, format!("one of {} is required", names()));
        }
    }
}

pub(crate) fn virtual_service(vs: &VirtualServiceSpec, out: &mut Issues) {
    non_empty_items(out, "spec.hosts", &vs.hosts);
    for (i, route) in vs.http.iter().enumerate() {
        http_route(&format!("spec.http[{i}]"), route, out);
    }
    for (i, tcp) in vs.tcp.iter().enumerate() {
        let p = format!("spec.tcp[{i}]");
        for (j, m) in tcp.r#match.iter().enumerate() {
            let mp = format!("{p}.match[{j}]");
            ips(
                out,
                &format!("{mp}.destinationSubnets"),
                &m.destination_subnets,
            );
            if let Some(subnet) = m.source_subnet.as_deref()
                && !is_ip_or_cidr(subnet)
            {
                out.add(
                    format!("{mp}.sourceSubnet"),
                    format!("`{subnet}` is not an IP address or CIDR"),
                );
            }
        }
        l4_routes(
            &p,
            tcp.route.iter().map(|r| (&r.destination, r.weight)),
            out,
        );
    }
    for (i, tls) in vs.tls.iter().enumerate() {
        let p = format!("spec.tls[{i}]");
        if tls.r#match.is_empty() {
            out.add(
                format!("{p}.match"),
                "a TLS route needs at least one match with sniHosts",
            );
        }
        for (j, m) in tls.r#match.iter().enumerate() {
            if m.sni_hosts.is_empty() {
                out.add(format!("{p}.match[{j}].sniHosts"), "sniHosts is required");
            }
            // Istio's rule: a route can only take connections the VirtualService is for.
            for (k, sni) in m.sni_hosts.iter().enumerate() {
                if !vs.hosts.iter().any(|h| host_covers(h, sni)) {
                    out.add(
                        format!("{p}.match[{j}].sniHosts[{k}]"),
                        format!(
                            "`{sni}` is not one of the VirtualService's hosts ({}) nor covered by a wildcard among them",
                            vs.hosts.join(", ")
                        ),
                    );
                }
            }
            ips(
                out,
                &format!("{p}.match[{j}].destinationSubnets"),
                &m.destination_subnets,
            );
        }
        l4_routes(
            &p,
            tls.route.iter().map(|r| (&r.destination, r.weight)),
            out,
        );
    }
}

fn http_route(p: &str, r: &HttpRoute, out: &mut Issues) {
    out.one_of(
        p,
        &[
            ("route", !r.route.is_empty()),
            ("redirect", r.redirect.is_some()),
            ("directResponse", r.direct_response.is_some()),
            ("delegate", r.delegate.is_some()),
        ],
        true,
    );
    for (j, m) in r.r#match.iter().enumerate() {
        http_match(&format!("{p}.match[{j}]"), m, out);
    }
    weights(&format!("{p}.route"), r.route.iter().map(|d| d.weight), out);
    for (j, d) in r.route.iter().enumerate() {
        destination(&format!("{p}.route[{j}].destination"), &d.destination, out);
    }
    if let Some(redirect) = &r.redirect {
        http_redirect(&format!("{p}.redirect"), redirect, out);
    }
    local_answer_only(p, r, out);
    if let Some(direct) = &r.direct_response
        && !(200..=599).contains(&direct.status)
    {
        out.add(
            format!("{p}.directResponse.status"),
            format!("status {} is not in 200..=599", direct.status),
        );
    }
    if let Some(rewrite) = &r.rewrite {
        http_rewrite(&format!("{p}.rewrite"), rewrite, out);
    }
    if let Some(retries) = &r.retries {
        out.positive(
            format!("{p}.retries.perTryTimeout"),
            retries.per_try_timeout,
        );
        if let Some(Err(e)) = retries.retry_on.as_deref().map(RetryOn::parse) {
            out.add(format!("{p}.retries.retryOn"), e.to_string());
        }
    }
    header_operations(&format!("{p}.headers"), r.headers.as_ref(), out);
    for (j, d) in r.route.iter().enumerate() {
        header_operations(&format!("{p}.route[{j}].headers"), d.headers.as_ref(), out);
    }
    if let Some(cors) = &r.cors_policy {
        cors_policy(&format!("{p}.corsPolicy"), cors, out);
    }
    if let Some(fault) = &r.fault {
        let fp = format!("{p}.fault");
        if fault.delay.is_none() && fault.abort.is_none() {
            out.add(&fp, "a fault needs a delay or an abort");
        }
        if let Some(delay) = &fault.delay {
            let dp = format!("{fp}.delay");
            out.one_of(
                &dp,
                &[
                    ("fixedDelay", delay.fixed_delay.is_some()),
                    ("exponentialDelay", delay.exponential_delay.is_some()),
                ],
                true,
            );
            if delay.exponential_delay.is_some() {
                out.add(
                    format!("{dp}.exponentialDelay"),
                    "exponentialDelay is not supported (Istio does not implement it either); use fixedDelay",
                );
            }
            out.one_of(
                &dp,
                &[
                    ("percentage", delay.percentage.is_some()),
                    ("percent", delay.percent.is_some()),
                ],
                false,
            );
            out.positive(format!("{dp}.fixedDelay"), delay.fixed_delay);
            out.at_most_100(format!("{dp}.percent"), delay.percent);
        }
        if let Some(abort) = &fault.abort {
            let ap = format!("{fp}.abort");
            out.one_of(
                &ap,
                &[
                    ("httpStatus", abort.http_status.is_some()),
                    ("grpcStatus", abort.grpc_status.is_some()),
                    ("http2Error", abort.http2_error.is_some()),
                ],
                true,
            );
            if let Some(status) = abort.http_status.filter(|s| !(200..=599).contains(s)) {
                out.add(
                    format!("{ap}.httpStatus"),
                    format!("status {status} is not in 200..=599"),
                );
            }
            if let Some(name) = abort
                .grpc_status
                .as_deref()
                .filter(|name| !GRPC_STATUS_NAMES.contains(name))
            {
                out.add(
                    format!("{ap}.grpcStatus"),
                    format!(
                        "unknown gRPC status `{name}` (expected one of {})",
                        GRPC_STATUS_NAMES.join(", ")
                    ),
                );
            }
            if abort.http2_error.is_some() {
                out.add(
                    format!("{ap}.http2Error"),
                    "http2Error is not supported (Istio does not implement it either); use httpStatus or grpcStatus",
                );
            }
        }
    }
    out.at_most_100(format!("{p}.mirrorPercent"), r.mirror_percent);
    out.one_of(
        p,
        &[
            ("mirrorPercentage", r.mirror_percentage.is_some()),
            ("mirrorPercent", r.mirror_percent.is_some()),
        ],
        false,
    );
    if r.mirror.is_none() {
        for (field, set) in [
            ("mirrorPercentage", r.mirror_percentage.is_some()),
            ("mirrorPercent", r.mirror_percent.is_some()),
        ] {
            if set {
                out.add(
                    format!("{p}.{field}"),
                    format!("{field} applies to `mirror`, which is not set (each of `mirrors` has its own `percentage`)"),
                );
            }
        }
    }
    if let Some(mirror) = &r.mirror {
        destination(&format!("{p}.mirror"), mirror, out);
    }
    for (j, m) in r.mirrors.iter().enumerate() {
        destination(
            &format!("{p}.mirrors[{j}].destination"),
            &m.destination,
            out,
        );
    }
}

fn http_match(p: &str, m: &HttpMatchRequest, out: &mut Issues) {
    for (field, headers) in [
        ("headers", &m.headers),
        ("withoutHeaders", &m.without_headers),
    ] {
        for name in headers.keys() {
            if name.is_empty() || *name != name.to_ascii_lowercase() {
                out.add(
                    format!("{p}.{field}.{name}"),
                    format!("header name `{name}` must be lower-case"),
                );
            } else if name.starts_with("@request.auth.claims") {
                out.add(
                    format!("{p}.{field}.{name}"),
                    "matching JWT claims needs RequestAuthentication, which is not supported",
                );
            } else if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                out.add(
                    format!("{p}.{field}.{name}"),
                    format!("`{name}` is not a valid HTTP header name"),
                );
            }
        }
    }
    if m.query_params.keys().any(String::is_empty) {
        out.add(
            format!("{p}.queryParams"),
            "a query parameter name must not be empty",
        );
    }
}

/// gRPC status names Istio accepts in `fault.abort.grpcStatus`.
const GRPC_STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A redirect or direct response answers locally: nothing is forwarded, so a rewrite or a
/// mirror on the same route could never apply (Istio rejects rewrite with redirect too).
fn local_answer_only(p: &str, r: &HttpRoute, out: &mut Issues) {
    let local = match (&r.redirect, &r.direct_response) {
        (Some(_), _) => "redirect",
        (None, Some(_)) => "directResponse",
        (None, None) => return,
    };
    for (field, set) in [
        ("rewrite", r.rewrite.is_some()),
        ("mirror", r.mirror.is_some()),
        ("mirrors", !r.mirrors.is_empty()),
    ] {
        if set {
            out.add(
                format!("{p}.{field}"),
                format!(
                    "{field} cannot be used with {local}: the route answers without forwarding"
                ),
            );
        }
    }
}

fn http_redirect(p: &str, r: &HttpRedirect, out: &mut Issues) {
    if let Some(code) = r.redirect_code
        && !matches!(code, 301 | 302 | 303 | 307 | 308)
    {
        out.add(
            format!("{p}.redirectCode"),
            format!("redirect code {code} is not supported (use 301, 302, 303, 307 or 308)"),
        );
    }
    out.one_of(
        p,
        &[
            ("port", r.port.is_some()),
            ("derivePort", r.derive_port.is_some()),
        ],
        false,
    );
    if let Some(uri) = &r.uri {
        uri_path(&format!("{p}.uri"), uri, out);
    }
    if let Some(authority) = &r.authority {
        uri_authority(&format!("{p}.authority"), authority, out);
    }
    if let Some(scheme) = r.scheme.as_deref()
        && (scheme.is_empty()
            || !scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    {
        out.add(
            format!("{p}.scheme"),
            format!("`{scheme}` is not a URI scheme"),
        );
    }
}

fn http_rewrite(p: &str, rewrite: &HttpRewrite, out: &mut Issues) {
    out.one_of(
        p,
        &[
            ("uri", rewrite.uri.is_some()),
            ("uriRegexRewrite", rewrite.uri_regex_rewrite.is_some()),
        ],
        false,
    );
    if let Some(uri) = rewrite.uri.as_deref().filter(|u| !u.is_empty()) {
        uri_path(&format!("{p}.uri"), uri, out);
    }
    if let Some(regex) = &rewrite.uri_regex_rewrite
        && http::uri::PathAndQuery::try_from(format!("/{}", regex.rewrite)).is_err()
    {
        out.add(
            format!("{p}.uriRegexRewrite.rewrite"),
            format!("`{}` has characters a URI path cannot hold", regex.rewrite),
        );
    }
    if let Some(authority) = &rewrite.authority {
        uri_authority(&format!("{p}.authority"), authority, out);
    }
}

fn uri_path(p: &str, path: &str, out: &mut Issues) {
    if http::uri::PathAndQuery::try_from(path).is_err() {
        out.add(p, format!("`{path}` is not a valid URI path"));
    }
}

fn uri_authority(p: &str, authority: &str, out: &mut Issues) {
    if http::uri::Authority::try_from(authority).is_err()
        || http::HeaderValue::from_str(authority).is_err()
    {
        out.add(
            p,
            format!("`{authority}` is not a valid authority (host[:port])"),
        );
    }
}

/// Header names and values must be valid HTTP, so routes apply them without parsing.
fn header_operations(p: &str, headers: Option<&Headers>, out: &mut Issues) {
    let Some(headers) = headers else {
        return;
    };
    for (direction, ops) in [
        ("request", &headers.request),
        ("response", &headers.response),
    ] {
        let Some(HeaderOperations { set, add, remove }) = ops else {
            continue;
        };
        for (op, map) in [("set", set), ("add", add)] {
            for (name, value) in map {
                let path = format!("{p}.{direction}.{op}.{name}");
                let authority = name.eq_ignore_ascii_case("host") || name == ":authority";
                if authority && direction == "request" {
                    uri_authority(&path, value, out);
                    continue;
                }
                if name.starts_with(':') || authority {
                    out.add(
                        path,
                        format!("`{name}` cannot be set with a header operation"),
                    );
                } else if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    out.add(path, format!("`{name}` is not a valid HTTP header name"));
                } else if http::HeaderValue::from_str(value).is_err() {
                    out.add(path, format!("`{value}` is not a valid HTTP header value"));
                }
            }
        }
        for (i, name) in remove.iter().enumerate() {
            if !name.starts_with(':') && http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                out.add(
                    format!("{p}.{direction}.remove[{i}]"),
                    format!("`{name}` is not a valid HTTP header name"),
                );
            }
        }
    }
}

fn cors_policy(p: &str, cors: &CorsPolicy, out: &mut Issues) {
    for (field, items) in [
        ("allowMethods", &cors.allow_methods),
        ("allowHeaders", &cors.allow_headers),
        ("exposeHeaders", &cors.expose_headers),
    ] {
        for (i, item) in items.iter().enumerate() {
            if item.is_empty() || item.contains(',') || http::HeaderValue::from_str(item).is_err() {
                out.add(
                    format!("{p}.{field}[{i}]"),
                    format!("`{item}` is not a valid entry (one name, no commas)"),
                );
            }
        }
    }
}

/// TCP and TLS routes: at least one destination, weights as for HTTP.
fn l4_routes<'a>(
    p: &str,
    routes: impl ExactSizeIterator<Item = (&'a Destination, Option<u32>)> + Clone,
    out: &mut Issues,
) {
    if routes.len() == 0 {
        out.add(format!("{p}.route"), "at least one destination is required");
    }
    weights(&format!("{p}.route"), routes.clone().map(|r| r.1), out);
    for (j, (d, _)) in routes.enumerate() {
        destination(&format!("{p}.route[{j}].destination"), d, out);
    }
}

/// Istio's rule: each weight in 0..=100 and, with more than one destination, a sum of 100
/// (an absent weight counts as 0).
fn weights(p: &str, weights: impl ExactSizeIterator<Item = Option<u32>>, out: &mut Issues) {
    let count = weights.len();
    let mut sum = 0u64;
    for (j, weight) in weights.enumerate() {
        let weight = weight.unwrap_or(0);
        if weight > 100 {
            out.add(
                format!("{p}[{j}].weight"),
                format!("weight {weight} is not in 0..=100"),
            );
        }
        sum += u64::from(weight);
    }
    if count > 1 && sum != 100 {
        out.add(
            p,
            format!(
                "route weights sum to {sum}; with more than one destination they must sum to 100"
            ),
        );
    }
}

fn destination(p: &str, d: &Destination, out: &mut Issues) {
    if d.host.is_empty() {
        out.add(format!("{p}.host"), "host is required");
    }
}

pub(crate) fn destination_rule(dr: &DestinationRuleSpec, out: &mut Issues) {
    if dr.host.is_empty() {
        out.add("spec.host", "host is required");
    }
    if let Some(tp) = &dr.traffic_policy {
        traffic_policy("spec.trafficPolicy", tp, out);
    }
    let mut names = HashSet::new();
    for (i, subset) in dr.subsets.iter().enumerate() {
        let p = format!("spec.subsets[{i}]");
        if subset.name.is_empty() {
            out.add(format!("{p}.name"), "subset name is required");
        } else if !names.insert(subset.name.as_str()) {
            out.add(
                format!("{p}.name"),
                format!("duplicate subset `{}`", subset.name),
            );
        }
        if let Some(tp) = &subset.traffic_policy {
            traffic_policy(&format!("{p}.trafficPolicy"), tp, out);
        }
    }
}

fn traffic_policy(p: &str, tp: &TrafficPolicy, out: &mut Issues) {
    policy_parts(
        p,
        tp.load_balancer.as_ref(),
        tp.connection_pool.as_ref(),
        tp.outlier_detection.as_ref(),
        tp.tls.as_ref(),
        out,
    );
    for (i, port) in tp.port_level_settings.iter().enumerate() {
        let pp = format!("{p}.portLevelSettings[{i}]");
        if port.port.is_none() {
            out.add(format!("{pp}.port"), "port is required");
        }
        policy_parts(
            &pp,
            port.load_balancer.as_ref(),
            port.connection_pool.as_ref(),
            port.outlier_detection.as_ref(),
            port.tls.as_ref(),
            out,
        );
    }
    if let Some(protocol) = tp.tunnel.as_ref().and_then(|t| t.protocol.as_deref())
        && !matches!(protocol, "CONNECT" | "POST")
    {
        out.add(
            format!("{p}.tunnel.protocol"),
            format!("tunnel protocol `{protocol}` is not CONNECT or POST"),
        );
    }
}

fn policy_parts(
    p: &str,
    lb: Option<&LoadBalancerSettings>,
    pool: Option<&ConnectionPoolSettings>,
    outlier: Option<&OutlierDetection>,
    tls: Option<&ClientTlsSettings>,
    out: &mut Issues,
) {
    if let Some(lb) = lb {
        let lp = format!("{p}.loadBalancer");
        out.one_of(
            &lp,
            &[
                ("simple", lb.simple.is_some()),
                ("consistentHash", lb.consistent_hash.is_some()),
            ],
            false,
        );
        if let Some(ch) = &lb.consistent_hash {
            let cp = format!("{lp}.consistentHash");
            out.one_of(
                &cp,
                &[
                    ("httpHeaderName", ch.http_header_name.is_some()),
                    ("httpCookie", ch.http_cookie.is_some()),
                    ("useSourceIp", ch.use_source_ip == Some(true)),
                    (
                        "httpQueryParameterName",
                        ch.http_query_parameter_name.is_some(),
                    ),
                ],
                true,
            );
            out.one_of(
                &cp,
                &[
                    ("ringHash", ch.ring_hash.is_some()),
                    ("maglev", ch.maglev.is_some()),
                ],
                false,
            );
        }
    }
    if let Some(tcp) = pool.and_then(|p| p.tcp.as_ref()) {
        let tp = format!("{p}.connectionPool.tcp");
        out.positive(format!("{tp}.connectTimeout"), tcp.connect_timeout);
        if let Some(ka) = &tcp.tcp_keepalive {
            out.positive(format!("{tp}.tcpKeepalive.time"), ka.time);
            out.positive(format!("{tp}.tcpKeepalive.interval"), ka.interval);
        }
    }
    if let Some(od) = outlier {
        let op = format!("{p}.outlierDetection");
        out.positive(format!("{op}.interval"), od.interval);
        out.positive(format!("{op}.baseEjectionTime"), od.base_ejection_time);
        out.at_most_100(format!("{op}.maxEjectionPercent"), od.max_ejection_percent);
        out.at_most_100(format!("{op}.minHealthPercent"), od.min_health_percent);
    }
    if let Some(tls) = tls
        && tls.mode == ClientTlsMode::Mutual
        && tls.credential_name.is_none()
        && (tls.client_certificate.is_none() || tls.private_key.is_none())
    {
        out.add(
            format!("{p}.tls"),
            "MUTUAL needs credentialName, or clientCertificate and privateKey",
        );
    }
}

pub(crate) fn service_entry(se: &ServiceEntrySpec, out: &mut Issues) {
    if se.hosts.is_empty() {
        out.add("spec.hosts", "at least one host is required");
    }
    non_empty_items(out, "spec.hosts", &se.hosts);
    for (i, address) in se.addresses.iter().enumerate() {
        if !is_ip_or_cidr(address) {
            out.add(
                format!("spec.addresses[{i}]"),
                format!("`{address}` is not an IP address or CIDR"),
            );
        }
    }
    if se.ports.is_empty() {
        out.add("spec.ports", "at least one port is required");
    }
    let mut names = HashSet::new();
    let mut numbers = HashSet::new();
    for (i, port) in se.ports.iter().enumerate() {
        match port.name.as_deref() {
            None | Some("") => out.add(format!("spec.ports[{i}].name"), "port name is required"),
            Some(name) if !names.insert(name) => {
                out.add(
                    format!("spec.ports[{i}].name"),
                    format!("duplicate port name `{name}`"),
                );
            }
            Some(_) => {}
        }
        if !numbers.insert(port.number) {
            out.add(
                format!("spec.ports[{i}].number"),
                format!("duplicate port number {}", port.number),
            );
        }
    }
    if se.workload_selector.is_some() && !se.endpoints.is_empty() {
        out.add(
            "spec",
            "workloadSelector and endpoints are mutually exclusive",
        );
    }
    match se.resolution {
        Resolution::Static if se.endpoints.is_empty() && se.workload_selector.is_none() => {
            out.add(
                "spec.endpoints",
                "resolution STATIC needs endpoints or a workloadSelector",
            );
        }
        Resolution::None if !se.endpoints.is_empty() => {
            out.add(
                "spec.endpoints",
                "resolution NONE takes no endpoints (use STATIC or DNS)",
            );
        }
        Resolution::Dns | Resolution::DnsRoundRobin if se.endpoints.is_empty() => {
            for (i, host) in se
                .hosts
                .iter()
                .enumerate()
                .filter(|(_, h)| h.starts_with('*'))
            {
                out.add(
                    format!("spec.hosts[{i}]"),
                    format!("DNS resolution of wildcard host `{host}` needs endpoints"),
                );
            }
        }
        _ => {}
    }
    for (j, endpoint) in se.endpoints.iter().enumerate() {
        let p = format!("spec.endpoints[{j}]");
        endpoint_address(
            &format!("{p}.address"),
            &endpoint.address,
            se.resolution,
            out,
        );
        for name in endpoint.ports.keys() {
            if !names.contains(name.as_str()) {
                let known: Vec<&str> = names.iter().copied().collect();
                out.add(
                    format!("{p}.ports.{name}"),
                    format!(
                        "`{name}` is not a port name of this ServiceEntry (its ports: {})",
                        known.join(", ")
                    ),
                );
            }
        }
    }
}

/// Checks an endpoint address for a resolution: `STATIC` (and `NONE`) need IP addresses.
pub(crate) fn endpoint_address(p: &str, address: &str, resolution: Resolution, out: &mut Issues) {
    if address.is_empty() {
        out.add(p, "address is required");
    } else if address.starts_with("unix://") {
        out.add(p, "unix domain socket endpoints are not supported");
    } else if !resolution.is_dns() && address.parse::<IpAddr>().is_err() {
        out.add(
            p,
            format!(
                "`{address}` is not an IP address, as resolution {} needs",
                resolution_name(resolution)
            ),
        );
    }
}

fn resolution_name(r: Resolution) -> &'static str {
    match r {
        Resolution::None => "NONE",
        Resolution::Static => "STATIC",
        Resolution::Dns => "DNS",
        Resolution::DnsRoundRobin => "DNS_ROUND_ROBIN",
    }
}

pub(crate) fn workload_entry(we: &WorkloadEntrySpec, out: &mut Issues) {
    if we.address.is_empty() {
        out.add("spec.address", "address is required");
    } else if we.address.starts_with("unix://") {
        out.add(
            "spec.address",
            "unix domain socket endpoints are not supported",
        );
    }
}

pub(crate) fn gateway(gw: &GatewaySpec, out: &mut Issues) {
    if gw.servers.is_empty() {
        out.add("spec.servers", "at least one server is required");
    }
    for (i, server) in gw.servers.iter().enumerate() {
        let p = format!("spec.servers[{i}]");
        if server.hosts.is_empty() {
            out.add(format!("{p}.hosts"), "at least one host is required");
        }
        non_empty_items(out, &format!("{p}.hosts"), &server.hosts);
        if let Some(tls) = &server.tls
            && matches!(
                tls.mode,
                Some(ServerTlsMode::Simple | ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual)
            )
            && tls.credential_name.is_none()
            && tls.credential_names.is_empty()
            && (tls.server_certificate.is_none() || tls.private_key.is_none())
        {
            out.add(
                format!("{p}.tls"),
                "TLS termination needs credentialName, or serverCertificate and privateKey",
            );
        }
    }
}

pub(crate) fn sidecar(sc: &SidecarSpec, out: &mut Issues) {
    for (i, egress) in sc.egress.iter().enumerate() {
        if egress.hosts.is_empty() {
            out.add(
                format!("spec.egress[{i}].hosts"),
                "at least one host is required",
            );
        }
        for (j, host) in egress.hosts.iter().enumerate() {
            if !host.contains('/') {
                out.add(
                    format!("spec.egress[{i}].hosts[{j}]"),
                    format!("`{host}` must be written `namespace/dnsName` (e.g. `*/{host}` or `./{host}`)"),
                );
            }
        }
    }
}

pub(crate) fn peer_authentication(pa: &PeerAuthenticationSpec, out: &mut Issues) {
    // Istio: a policy without matchLabels is namespace- or mesh-wide, and those cannot set
    // port-level mTLS (an empty `selector: {}` counts as none).
    let selects = pa
        .selector
        .as_ref()
        .is_some_and(|s| !s.match_labels.is_empty());
    if !pa.port_level_mtls.is_empty() && !selects {
        out.add(
            "spec.portLevelMtls",
            "portLevelMtls needs a selector with matchLabels: a namespace- or mesh-wide \
             PeerAuthentication cannot set port-level mTLS",
        );
    }
}

pub(crate) fn authorization_policy(ap: &AuthorizationPolicySpec, out: &mut Issues) {
    /// The `when` keys this proxy evaluates (Istio's, less JWT and SNI).
    const KEYS: &str = "request.headers[<name>], source.ip, remote.ip, source.namespace, \
                        source.principal, destination.ip, destination.port";
    const JWT: &str = "needs RequestAuthentication (JWT), which is not supported";

    fn no_empty(out: &mut Issues, path: &str, field: &str, values: &[String]) {
        for (k, v) in values.iter().enumerate() {
            if v.is_empty() {
                out.add(format!("{path}.{field}[{k}]"), "empty value is not allowed");
            }
        }
    }
    fn ports(out: &mut Issues, path: &str, values: &[String]) {
        for (k, port) in values.iter().enumerate() {
            if port.parse::<u16>().ok().filter(|p| *p > 0).is_none() {
                out.add(
                    format!("{path}[{k}]"),
                    format!("`{port}` is not a port number in 1..=65535"),
                );
            }
        }
    }
    /// Envoy URI templates (`{*}`, `{**}`) as Istio accepts them: whole segments only,
    /// `{**}` at most once and last, no other `*`, `{` or `}`.
    fn path_template(out: &mut Issues, path: &str, value: &str) {
        if !value.contains('{') && !value.contains('}') {
            return;
        }
        let mut fail = |why: &str| {
            out.add(
                path.to_string(),
                format!("`{value}` is not a valid path template: {why}"),
            );
        };
        let Some(rest) = value.strip_prefix('/') else {
            return fail("it must start with `/`");
        };
        let segments: Vec<&str> = rest.split('/').collect();
        for (i, seg) in segments.iter().enumerate() {
            match *seg {
                "{*}" => {}
                "{**}" if i + 1 == segments.len() => {}
                "{**}" => return fail("`{**}` must be the last segment"),
                s if s.contains(['{', '}', '*']) => {
                    return fail("`{*}` and `{**}` must be whole path segments");
                }
                _ => {}
            }
        }
    }

    if ap.action == AuthorizationAction::Custom {
        out.add(
            "spec.action",
            "CUSTOM authorization (ext-authz) is not supported",
        );
    } else if ap.provider.is_some() {
        out.add("spec.provider", "provider is only valid with action CUSTOM");
    }
    out.one_of(
        "spec",
        &[
            ("selector", ap.selector.is_some()),
            ("targetRef", ap.target_ref.is_some()),
            ("targetRefs", !ap.target_refs.is_empty()),
        ],
        false,
    );
    for (i, rule) in ap.rules.iter().enumerate() {
        let p = format!("spec.rules[{i}]");
        for (j, from) in rule.from.iter().enumerate() {
            let s = &from.source;
            let sp = format!("{p}.from[{j}].source");
            let lists = [
                ("principals", &s.principals),
                ("notPrincipals", &s.not_principals),
                ("namespaces", &s.namespaces),
                ("notNamespaces", &s.not_namespaces),
                ("serviceAccounts", &s.service_accounts),
                ("notServiceAccounts", &s.not_service_accounts),
                ("ipBlocks", &s.ip_blocks),
                ("notIpBlocks", &s.not_ip_blocks),
                ("remoteIpBlocks", &s.remote_ip_blocks),
                ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
                ("requestPrincipals", &s.request_principals),
                ("notRequestPrincipals", &s.not_request_principals),
            ];
            if lists.iter().all(|(_, l)| l.is_empty()) {
                out.add(sp.clone(), "`from.source` must not be empty");
            }
            for (field, values) in lists {
                no_empty(out, &sp, field, values);
            }
            for (field, values) in [
                ("requestPrincipals", &s.request_principals),
                ("notRequestPrincipals", &s.not_request_principals),
            ] {
                if !values.is_empty() {
                    out.add(format!("{sp}.{field}"), format!("{field} {JWT}"));
                }
            }
            for (field, blocks) in [
                ("ipBlocks", &s.ip_blocks),
                ("notIpBlocks", &s.not_ip_blocks),
                ("remoteIpBlocks", &s.remote_ip_blocks),
                ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
            ] {
                ips(out, &format!("{sp}.{field}"), blocks);
            }
            for (field, accounts) in [
                ("serviceAccounts", &s.service_accounts),
                ("notServiceAccounts", &s.not_service_accounts),
            ] {
                for (k, sa) in accounts.iter().enumerate() {
                    let ok = sa.split_once('/').is_some_and(|(ns, name)| {
                        !ns.is_empty() && !name.is_empty() && !name.contains('/')
                    });
                    if !ok && !sa.is_empty() {
                        out.add(
                            format!("{sp}.{field}[{k}]"),
                            format!("`{sa}` is not `<namespace>/<serviceaccount>`"),
                        );
                    }
                }
            }
        }
        for (j, to) in rule.to.iter().enumerate() {
            let op = &to.operation;
            let opp = format!("{p}.to[{j}].operation");
            let lists = [
                ("hosts", &op.hosts),
                ("notHosts", &op.not_hosts),
                ("ports", &op.ports),
                ("notPorts", &op.not_ports),
                ("methods", &op.methods),
                ("notMethods", &op.not_methods),
                ("paths", &op.paths),
                ("notPaths", &op.not_paths),
            ];
            if lists.iter().all(|(_, l)| l.is_empty()) {
                out.add(opp.clone(), "`to.operation` must not be empty");
            }
            for (field, values) in lists {
                no_empty(out, &opp, field, values);
            }
            ports(out, &format!("{opp}.ports"), &op.ports);
            ports(out, &format!("{opp}.notPorts"), &op.not_ports);
            for (field, paths) in [("paths", &op.paths), ("notPaths", &op.not_paths)] {
                for (k, path) in paths.iter().enumerate() {
                    path_template(out, &format!("{opp}.{field}[{k}]"), path);
                }
            }
        }
        for (j, when) in rule.when.iter().enumerate() {
            let wp = format!("{p}.when[{j}]");
            let key = when.key.as_str();
            if key.is_empty() {
                out.add(format!("{wp}.key"), "key is required");
                continue;
            }
            if when.values.is_empty() && when.not_values.is_empty() {
                out.add(wp.clone(), "a condition needs values or notValues");
            }
            let values = [("values", &when.values), ("notValues", &when.not_values)];
            for (field, list) in values {
                no_empty(out, &wp, field, list);
            }
            match key {
                "source.ip" | "remote.ip" | "destination.ip" => {
                    for (field, list) in values {
                        ips(out, &format!("{wp}.{field}"), list);
                    }
                }
                "destination.port" => {
                    for (field, list) in values {
                        ports(out, &format!("{wp}.{field}"), list);
                    }
                }
                "source.namespace" | "source.principal" => {}
                k if k.starts_with("request.auth.") => {
                    out.add(format!("{wp}.key"), format!("`{k}` {JWT}"));
                }
                k if k.starts_with("request.headers") => {
                    match k
                        .strip_prefix("request.headers[")
                        .and_then(|n| n.strip_suffix(']'))
                    {
                        None | Some("") => out.add(
                            format!("{wp}.key"),
                            format!("`{k}` must be `request.headers[<name>]`"),
                        ),
                        Some(n) if n.starts_with(':') => out.add(
                            format!("{wp}.key"),
                            format!("`{k}`: pseudo-headers are not supported"),
                        ),
                        Some(n) if http::HeaderName::from_bytes(n.as_bytes()).is_err() => out.add(
                            format!("{wp}.key"),
                            format!("`{k}`: `{n}` is not a valid header name"),
                        ),
                        Some(_) => {}
                    }
                }
                k => out.add(
                    format!("{wp}.key"),
                    format!("unsupported attribute `{k}`; supported: {KEYS}"),
                ),
            }
        }
    }
}

pub(crate) fn bootstrap(b: &BootstrapSpec, out: &mut Issues) {
    if b.workload.name.is_empty() {
        out.add("spec.workload.name", "workload name is required");
    }
    let etcd = b.discovery.as_ref().and_then(|d| d.etcd.as_ref());
    if let Some(etcd) = etcd
        && etcd.endpoints.is_empty()
    {
        out.add(
            "spec.discovery.etcd.endpoints",
            "at least one etcd endpoint is required",
        );
    }
    if let Some(etcd) = etcd {
        for (i, endpoint) in etcd.endpoints.iter().enumerate() {
            let scheme_ok = endpoint.starts_with("http://") || endpoint.starts_with("https://");
            if !scheme_ok {
                out.add(
                    format!("spec.discovery.etcd.endpoints[{i}]"),
                    format!("`{endpoint}` is not an http:// or https:// URL"),
                );
            } else if endpoint.starts_with("https://") && etcd.tls.is_none() {
                out.add(
                    format!("spec.discovery.etcd.endpoints[{i}]"),
                    format!("`{endpoint}` is https:// but discovery.etcd.tls names no CA"),
                );
            }
        }
        if !etcd.prefix.starts_with('/') {
            out.add(
                "spec.discovery.etcd.prefix",
                format!("prefix `{}` must start with `/`", etcd.prefix),
            );
        }
        if etcd.username.is_some() != etcd.password_file.is_some() {
            out.add(
                "spec.discovery.etcd",
                "username and passwordFile go together",
            );
        }
        if let Some(tls) = &etcd.tls
            && tls.cert.is_some() != tls.key.is_some()
        {
            out.add(
                "spec.discovery.etcd.tls",
                "cert and key go together (a client certificate needs its key)",
            );
        }
    }
    if let Some(dns) = b.discovery.as_ref().and_then(|d| d.dns.as_ref()) {
        out.positive("spec.discovery.dns.minTtl", Some(dns.min_ttl));
        if dns.max_ttl.get() < dns.min_ttl.get() {
            out.add(
                "spec.discovery.dns.maxTtl",
                format!("maxTtl {} is below minTtl {}", dns.max_ttl, dns.min_ttl),
            );
        }
    }
    if let Some(register) = &b.register {
        if etcd.is_none() {
            out.add(
                "spec.register",
                "register needs discovery.etcd to publish to",
            );
        }
        out.positive("spec.register.ttl", Some(register.ttl));
    }
    if let Some(limit) = &b.rate_limit {
        let mut in_range = |field: &str, value: u32| {
            if !(1..=MAX_RATE_LIMIT).contains(&value) {
                out.add(
                    format!("spec.rateLimit.{field}"),
                    format!("{field} {value} is not in 1..={MAX_RATE_LIMIT}"),
                );
            }
        };
        in_range("requestsPerSecond", limit.requests_per_second);
        // `burst` defaults to `requestsPerSecond`: the same bad value is reported once.
        if limit.burst != limit.requests_per_second {
            in_range("burst", limit.burst);
        }
    }
    let limits = &b.limits;
    if limits.max_request_headers_bytes < MIN_REQUEST_HEADERS_BYTES {
        out.add(
            "spec.limits.maxRequestHeadersBytes",
            format!(
                "{} is below the smallest supported header budget, {MIN_REQUEST_HEADERS_BYTES} bytes",
                limits.max_request_headers_bytes
            ),
        );
    }
    if limits.max_request_headers == 0 {
        out.add("spec.limits.maxRequestHeaders", "must be at least 1");
    }
    if limits.http2_max_concurrent_streams == 0 {
        out.add(
            "spec.limits.http2MaxConcurrentStreams",
            "must be at least 1",
        );
    }
    out.positive(
        "spec.limits.requestHeadersTimeout",
        Some(limits.request_headers_timeout),
    );
    out.positive("spec.limits.idleTimeout", Some(limits.idle_timeout));
}

fn non_empty_items(out: &mut Issues, p: &str, items: &[String]) {
    for (i, item) in items.iter().enumerate() {
        if item.is_empty() {
            out.add(format!("{p}[{i}]"), "must not be empty");
        }
    }
}

/// Whether host pattern `host` (exact, `*.suffix` or `*`) takes every name `name` (itself
/// exact or a wildcard) stands for: Istio's `SubsetOf`, case aside.
fn host_covers(host: &str, name: &str) -> bool {
    let (host, name) = (host.to_ascii_lowercase(), name.to_ascii_lowercase());
    host == name || crate::host::wildcard_matches(&host, &name)
}

/// Each of `values` an IP address or CIDR.
fn ips(out: &mut Issues, path: &str, values: &[String]) {
    for (k, v) in values.iter().enumerate() {
        if !is_ip_or_cidr(v) {
            out.add(
                format!("{path}[{k}]"),
                format!("`{v}` is not an IP address or CIDR"),
            );
        }
    }
}

fn is_ip_or_cidr(text: &str) -> bool {
    crate::net::parse_ip_net(text).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        assert!(is_ip_or_cidr("10.0.0.0/8"));
        assert!(is_ip_or_cidr("192.168.1.1"));
        assert!(is_ip_or_cidr("2001:db8::/32"));
        assert!(!is_ip_or_cidr("10.0.0.0/33"));
        assert!(!is_ip_or_cidr("example.com"));
    }

    #[test]
    fn weights_follow_istio() {
        let check = |ws: &[Option<u32>]| {
            let mut out = Issues::default();
            weights("r", ws.iter().copied(), &mut out);
            out.0
        };
        assert!(
            check(&[None]).is_empty(),
            "a single destination needs no weight"
        );
        assert!(check(&[Some(90), Some(10)]).is_empty());
        assert_eq!(check(&[Some(90), Some(20)]).len(), 1);
        assert_eq!(
            check(&[Some(90), None]).len(),
            1,
            "absent weight counts as 0"
        );
        assert_eq!(check(&[Some(101)])[0].0, "r[0].weight");
    }
}
