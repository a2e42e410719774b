//! `mesh-proxy/v1` `Bootstrap`: this proxy's own settings (one per proxy).
//!
//! Defaults are applied while parsing, so every field the proxy reads holds the effective
//! value and `/config_dump` shows it: `outbound.listen` is `127.0.0.1:15001` when the YAML
//! says nothing, `terminationDrainDuration` is 5s, and so on (Istio's conventions). Only
//! sections with no sensible default stay `Option`s: `inbound` (needs the app's address),
//! `identity` (no mTLS without it), `rateLimit` (no limit without it), `accessLog`, `tracing`,
//! `discovery`, `register`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use super::networking::OutboundTrafficMode;
use super::types::{Duration, Resource, check_percent};
use crate::labels::Labels;

pub type Bootstrap = Resource<BootstrapSpec>;

/// Istio's inbound capture port.
pub const DEFAULT_INBOUND_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 15006);
/// Istio's outbound capture port, on loopback: the app calls it as an HTTP proxy.
pub const DEFAULT_OUTBOUND_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15001);
/// Istio's (pod-local) admin port.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
/// Istio's `ProxyConfig.terminationDrainDuration`.
pub const DEFAULT_TERMINATION_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);
/// Istio's default tracing sampling, in percent.
pub const DEFAULT_TRACE_SAMPLING: f64 = 1.0;
/// Key prefix under which resources live in etcd.
pub const DEFAULT_ETCD_PREFIX: &str = "/mesh";
/// The largest `rateLimit.requestsPerSecond` and `rateLimit.burst` accepted: one request per
/// microsecond, far past what one sidecar serves, so a larger value is a typo.
pub const MAX_RATE_LIMIT: u32 = 1_000_000;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BootstrapSpec {
    pub workload: WorkloadSettings,
    pub identity: Option<IdentityFiles>,
    pub inbound: Option<InboundSettings>,
    /// Local rate limit on inbound requests; absent: none.
    pub rate_limit: Option<RateLimitSettings>,
    #[serde(default)]
    pub outbound: OutboundSettings,
    #[serde(default)]
    pub admin: AdminSettings,
    /// Worker threads (Istio's `ProxyConfig.concurrency`); absent or 0: one per core.
    pub concurrency: Option<u32>,
    #[serde(default)]
    pub outbound_traffic_policy: MeshOutboundTrafficPolicy,
    pub access_log: Option<AccessLogSettings>,
    pub tracing: Option<TracingSettings>,
    pub discovery: Option<DiscoverySettings>,
    /// Publish this workload as a `WorkloadEntry` in etcd (needs `discovery.etcd`).
    pub register: Option<RegisterSettings>,
    #[serde(default = "default_drain")]
    pub termination_drain_duration: Duration,
    /// What one client may ask of the proxy's HTTP listeners.
    #[serde(default)]
    pub limits: HttpLimits,
}

/// Envoy's defaults for request headers; Istio's idle timeout; HTTP/2 streams and resets
/// bounded on purpose (hyper's own defaults are tuned for servers, not for a proxy in front
/// of every service of a company).
pub const DEFAULT_MAX_REQUEST_HEADERS_BYTES: u32 = 60 * 1024;
pub const DEFAULT_MAX_REQUEST_HEADERS: u32 = 100;
pub const DEFAULT_REQUEST_HEADERS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
pub const DEFAULT_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);
pub const DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// The smallest header budget hyper's HTTP/1 parser accepts (its minimum read buffer).
pub const MIN_REQUEST_HEADERS_BYTES: u32 = 8 * 1024;

/// Bootstrap `limits`: per-connection bounds of the HTTP listeners (outbound, inbound,
/// gateway, Sidecar listeners). Past the header limits a request is refused `431`; a client
/// that has not sent its whole request head within `requestHeadersTimeout` is disconnected
/// (slowloris); a connection with no request for `idleTimeout` is closed.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpLimits {
    /// All request headers together, in bytes (Envoy's `max_request_headers_kb`: 60 KiB).
    pub max_request_headers_bytes: u32,
    /// Request headers in number (Envoy's `max_headers_count`: 100).
    pub max_request_headers: u32,
    pub request_headers_timeout: Duration,
    /// Istio's default idle timeout: 1 h.
    pub idle_timeout: Duration,
    /// Streams one HTTP/2 client may have open at once.
    pub http2_max_concurrent_streams: u32,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_request_headers_bytes: DEFAULT_MAX_REQUEST_HEADERS_BYTES,
            max_request_headers: DEFAULT_MAX_REQUEST_HEADERS,
            request_headers_timeout: Duration(DEFAULT_REQUEST_HEADERS_TIMEOUT),
            idle_timeout: Duration(DEFAULT_IDLE_TIMEOUT),
            http2_max_concurrent_streams: DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS,
        }
    }
}

/// `Resource<S>` lets `spec` be omitted; a Bootstrap without one is then reported as a
/// missing `workload.name`.
impl Default for BootstrapSpec {
    fn default() -> Self {
        BootstrapSpec {
            workload: WorkloadSettings {
                name: String::new(),
                labels: Labels::default(),
                service_account: None,
            },
            identity: None,
            inbound: None,
            rate_limit: None,
            outbound: OutboundSettings::default(),
            admin: AdminSettings::default(),
            concurrency: None,
            outbound_traffic_policy: MeshOutboundTrafficPolicy::default(),
            access_log: None,
            tracing: None,
            discovery: None,
            register: None,
            termination_drain_duration: default_drain(),
            limits: HttpLimits::default(),
        }
    }
}

/// Who this proxy fronts: the workload's name, labels (its subsets select on them) and
/// service account (its SPIFFE identity).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSettings {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
    pub service_account: Option<String>,
}

/// PEM files: this workload's certificate chain and key, and the roots it trusts. Relative
/// paths are taken from the proxy's working directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub trust_bundle: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InboundSettings {
    #[serde(default = "default_inbound_listen")]
    pub listen: SocketAddr,
    /// Where the local application listens.
    pub app: SocketAddr,
    #[serde(default)]
    pub protocol: InboundProtocol,
}

/// How inbound connections are treated: sniffed (`auto`) or fixed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InboundProtocol {
    #[default]
    Auto,
    Http,
    Http2,
    Tcp,
}

/// The local rate limit on inbound requests, modelled on Linkerd's `HTTPLocalRateLimitPolicy`
/// (a GCRA token bucket; Envoy's `local_ratelimit` is the same bucket): `requestsPerSecond`
/// sustained, up to `burst` at once (default: `requestsPerSecond`, one second's worth). With
/// `perPrincipal`, each authenticated caller identity has a bucket of its own and the callers
/// without one share the workload's. Requests over the limit are answered `429` with flag `RL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "RateLimitFields", rename_all = "camelCase")]
pub struct RateLimitSettings {
    pub requests_per_second: u32,
    pub burst: u32,
    pub per_principal: bool,
}

/// `rateLimit` as written, before `burst` takes its default from `requestsPerSecond`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RateLimitFields {
    requests_per_second: u32,
    burst: Option<u32>,
    #[serde(default)]
    per_principal: bool,
}

impl From<RateLimitFields> for RateLimitSettings {
    fn from(f: RateLimitFields) -> Self {
        RateLimitSettings {
            requests_per_second: f.requests_per_second,
            burst: f.burst.unwrap_or(f.requests_per_second),
            per_principal: f.per_principal,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutboundSettings {
    #[serde(default = "default_outbound_listen")]
    pub listen: SocketAddr,
}

impl Default for OutboundSettings {
    fn default() -> Self {
        OutboundSettings {
            listen: DEFAULT_OUTBOUND_LISTEN,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdminSettings {
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            listen: DEFAULT_ADMIN_LISTEN,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshOutboundTrafficPolicy {
    pub mode: OutboundTrafficMode,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AccessLogSettings {
    /// `stdout`, `stderr` or a file path.
    pub path: String,
    #[serde(default)]
    pub encoding: AccessLogEncoding,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AccessLogEncoding {
    /// Istio's default text line.
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TracingSettings {
    /// Percent of requests sampled when no upstream decision exists (Istio's default 1.0).
    #[serde(default = "default_sampling", deserialize_with = "percent_number")]
    pub sampling: f64,
    /// OTLP/gRPC collector URL; without it spans are propagated but not exported.
    pub otlp: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct DiscoverySettings {
    pub etcd: Option<EtcdSettings>,
    /// How `resolution: DNS` ServiceEntry hosts are resolved; absent: the system's resolver
    /// (`/etc/resolv.conf`, `/etc/hosts`) with the default TTL bounds.
    pub dns: Option<DnsSettings>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    /// Resources live at `<prefix>/<group>/<kind>/<namespace>/<name>`.
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    /// Client TLS (for `https://` endpoints): the CA that signed etcd's certificate and,
    /// for etcd's `--client-cert-auth`, this proxy's client certificate and key.
    pub tls: Option<EtcdTlsFiles>,
    /// etcd user for `auth enable`d clusters; the password is read from `passwordFile`
    /// (never written in the Bootstrap, so `/config_dump` cannot show it).
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EtcdTlsFiles {
    /// PEM trust anchors for etcd's server certificate.
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name etcd's certificate is checked against; default: the endpoint's host.
    pub server_name: Option<String>,
}

/// Istio's `respect_dns_ttl`: each answer is re-resolved when its TTL runs out, the TTL
/// clamped to `[minTtl, maxTtl]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DnsSettings {
    /// Name servers (`ip:port`); empty: the system's.
    #[serde(default)]
    pub nameservers: Vec<SocketAddr>,
    #[serde(default = "default_dns_min_ttl")]
    pub min_ttl: Duration,
    /// Also how often a name is re-resolved at the latest (Istio's `dnsRefreshRate`, 60s).
    #[serde(default = "default_dns_max_ttl")]
    pub max_ttl: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            nameservers: Vec::new(),
            min_ttl: default_dns_min_ttl(),
            max_ttl: default_dns_max_ttl(),
        }
    }
}

fn default_dns_min_ttl() -> Duration {
    Duration(std::time::Duration::from_secs(1))
}

fn default_dns_max_ttl() -> Duration {
    Duration(std::time::Duration::from_secs(60))
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RegisterSettings {
    /// Lease time-to-live: how long a dead proxy's entry outlives it.
    pub ttl: Duration,
    /// The address to publish when the inbound listener is on `0.0.0.0`.
    pub address: Option<IpAddr>,
}

impl Bootstrap {
    /// Where the sidecar accepts peers, if it fronts an application.
    pub fn inbound_listen(&self) -> Option<SocketAddr> {
        self.spec.inbound.as_ref().map(|i| i.listen)
    }

    pub fn outbound_listen(&self) -> SocketAddr {
        self.spec.outbound.listen
    }

    pub fn admin_listen(&self) -> SocketAddr {
        self.spec.admin.listen
    }

    pub fn termination_drain_duration(&self) -> std::time::Duration {
        self.spec.termination_drain_duration.get()
    }

    /// The etcd settings, when the proxy watches etcd.
    pub fn etcd(&self) -> Option<&EtcdSettings> {
        self.spec.discovery.as_ref()?.etcd.as_ref()
    }

    /// How DNS ServiceEntries are resolved (defaults when the Bootstrap says nothing).
    pub fn dns(&self) -> DnsSettings {
        self.spec
            .discovery
            .as_ref()
            .and_then(|d| d.dns.clone())
            .unwrap_or_default()
    }
}

fn default_inbound_listen() -> SocketAddr {
    DEFAULT_INBOUND_LISTEN
}

fn default_outbound_listen() -> SocketAddr {
    DEFAULT_OUTBOUND_LISTEN
}

fn default_admin_listen() -> SocketAddr {
    DEFAULT_ADMIN_LISTEN
}

fn default_drain() -> Duration {
    Duration(DEFAULT_TERMINATION_DRAIN)
}

fn default_sampling() -> f64 {
    DEFAULT_TRACE_SAMPLING
}

fn default_etcd_prefix() -> String {
    DEFAULT_ETCD_PREFIX.to_string()
}

fn percent_number<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    check_percent(f64::deserialize(d)?).map_err(serde::de::Error::custom)
}
