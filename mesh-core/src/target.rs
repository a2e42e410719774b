//! What the routing and balancing layers decide for a request, handed down the stack as
//! request extensions.
//!
//! ```text
//! RouteLayer   → RouteTarget     (service port, subset, traffic policy, timeout, retries)
//! balancer     → UpstreamTarget  (one endpoint address, protocol)
//! Upstream     ← UpstreamTarget
//! ```
//!
//! The types live here, in the vocabulary crate, so that routing (`mesh-routing`), resilience
//! (`mesh-resilience`) and the proxy agree on them without depending on each other. Everything
//! in them is compiled at config load: the request path reads fields, it never parses.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::config::ServicePort;
use crate::config::networking::{H2UpgradePolicy, TrafficPolicy};
use crate::labels::Labels;

/// The destination routing chose for a request.
#[derive(Clone, Debug)]
pub struct RouteTarget {
    /// The service port the request goes to (which may differ from the one the client
    /// named: a route can send `reviews` traffic anywhere).
    pub service: Arc<ServicePort>,
    /// The DestinationRule subset, if the route named one; `None` means every endpoint.
    pub subset: Option<Arc<Subset>>,
    /// The effective DestinationRule traffic policy for this host, port and subset (subset
    /// settings override the host's, port-level settings override both), if any rule applies.
    pub traffic_policy: Option<Arc<TrafficPolicy>>,
    /// The route's request timeout, covering every retry. `None`: no timeout (Istio's default).
    pub timeout: Option<Duration>,
    /// The route's retry policy (Istio's default when the route sets none).
    pub retry: Arc<RetryPolicy>,
    /// `host:port` (and `/subset`), formatted once for logs and error messages.
    pub name: Arc<str>,
}

impl RouteTarget {
    /// The whole of `service` (no subset, no traffic policy, no timeout) with Istio's default
    /// retry policy: what routing yields for a host no VirtualService routes.
    pub fn new(service: Arc<ServicePort>) -> RouteTarget {
        RouteTarget {
            name: format!("{}:{}", service.host, service.number).into(),
            service,
            subset: None,
            traffic_policy: None,
            timeout: None,
            retry: Arc::new(RetryPolicy::istio_default()),
        }
    }

    /// Whether the DestinationRule's `connectionPool.http.h2UpgradePolicy` is `UPGRADE`: HTTP/1.1
    /// requests to this target travel as HTTP/2 streams over one multiplexed connection per
    /// endpoint. Istio's default (`DEFAULT`, `DO_NOT_UPGRADE`, no rule) is not to upgrade.
    pub fn upgrades_to_http2(&self) -> bool {
        self.traffic_policy
            .as_ref()
            .and_then(|p| p.connection_pool.as_ref())
            .and_then(|c| c.http.as_ref())
            .and_then(|h| h.h2_upgrade_policy)
            == Some(H2UpgradePolicy::Upgrade)
    }
}

/// Set by the sending sidecar on a request it upgraded from HTTP/1.x to HTTP/2
/// ([`RouteTarget::upgrades_to_http2`]): the version the app spoke (`HTTP/1.1`), so the
/// receiving sidecar hands the request to its app in that version, and removes the header.
/// Linkerd's `l5d-orig-proto` plays the same part. Only the proxy sets it: the upstream client
/// removes one arriving from an app.
pub const ORIG_PROTO_HEADER: http::HeaderName = http::HeaderName::from_static("x-mesh-orig-proto");

/// A DestinationRule subset: a named slice of a service's endpoints, selected by labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Subset {
    pub name: String,
    pub labels: Labels,
}

/// The endpoint a request is sent to: set by the balancer (outbound) or the inbound
/// forwarder, read by the upstream client.
#[derive(Clone, Debug)]
pub struct UpstreamTarget {
    pub addr: SocketAddr,
    /// Speak HTTP/2 (prior knowledge) to this endpoint rather than HTTP/1.1.
    pub http2: bool,
    /// `http2` only because the route's `h2UpgradePolicy` upgrades HTTP/1.x: the upstream
    /// client marks the request with [`ORIG_PROTO_HEADER`].
    pub h2_upgrade: bool,
    /// Who is being called, for error messages (`reviews.default.svc.cluster.local:9080`,
    /// or `inbound app 127.0.0.1:9080`).
    pub service: Arc<str>,
    /// What discovery says of the endpoint's identity, for the upstream client's mTLS
    /// decision; `None` when it says nothing (and for the inbound app).
    pub endpoint_tls: Option<Arc<EndpointTls>>,
}

impl UpstreamTarget {
    /// A target with nothing known of the endpoint's identity.
    pub fn new(addr: SocketAddr, http2: bool, service: Arc<str>) -> UpstreamTarget {
        UpstreamTarget {
            addr,
            http2,
            h2_upgrade: false,
            service,
            endpoint_tls: None,
        }
    }
}

/// Istio's endpoint label saying that the endpoint's sidecar accepts mesh mTLS.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

/// What an endpoint's discovery record says about mTLS to it: computed once per endpoint
/// set, handed to the upstream client with each pick (an `Arc` clone).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointTls {
    /// The endpoint carries `security.istio.io/tlsMode: istio`: Istio's auto mTLS sends it
    /// mesh mTLS unless a DestinationRule says otherwise.
    pub istio_mtls: bool,
    /// The endpoint's service account, from which the SPIFFE ID its server must present
    /// follows (`spiffe://<trust domain>/ns/<namespace>/sa/<account>`).
    pub service_account: Option<Arc<str>>,
}

impl EndpointTls {
    /// The TLS facts of `endpoint`, or `None` when it has neither label nor account.
    pub fn of(endpoint: &crate::Endpoint) -> Option<Arc<EndpointTls>> {
        let istio_mtls = endpoint.labels.get(TLS_MODE_LABEL) == Some("istio");
        let service_account = endpoint.service_account.as_deref().map(Arc::from);
        (istio_mtls || service_account.is_some()).then(|| {
            Arc::new(EndpointTls {
                istio_mtls,
                service_account,
            })
        })
    }
}

/// The endpoints a request's attempts have gone to, in order; shared by all its attempts.
///
/// The retry layer puts one into every attempt of a retriable request; the balancer avoids
/// the addresses in it while others remain (Envoy's `previous_hosts` predicate, which Istio
/// enables by default); the layer below the balancer records where each attempt went.
#[derive(Clone, Debug, Default)]
pub struct PreviousAttempts {
    addrs: Arc<Mutex<Vec<SocketAddr>>>,
}

impl PreviousAttempts {
    /// Notes that an attempt went to `addr` (once per address).
    pub fn record(&self, addr: SocketAddr) {
        let mut addrs = self.addrs.lock().unwrap_or_else(PoisonError::into_inner);
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }

    /// Whether an earlier attempt went to `addr`.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.addrs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&addr)
    }

    /// The addresses tried so far, in order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.addrs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A compiled retry policy (Istio's `HTTPRetry`).
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt; 0 disables retrying.
    pub attempts: u32,
    /// Bound on each attempt; `None`: only the route timeout applies.
    pub per_try_timeout: Option<Duration>,
    pub retry_on: RetryOn,
    /// Base interval of the exponential backoff (Envoy's default 25 ms; cap 10× base).
    pub backoff: Duration,
}

impl RetryPolicy {
    /// Envoy's base retry interval.
    pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

    /// What Istio applies to a route that sets no `retries`: 2 attempts on
    /// `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes` (503).
    pub fn istio_default() -> Self {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            retry_on: RetryOn::istio_default(),
            backoff: Self::DEFAULT_BACKOFF,
        }
    }

    /// No retries at all.
    pub fn none() -> Self {
        RetryPolicy {
            attempts: 0,
            ..Self::istio_default()
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::istio_default()
    }
}

/// The conditions a request is retried on (Envoy's `retry_on`, as Istio writes it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    conditions: u32,
    /// Statuses retried under `retriable-status-codes` and bare codes in the list.
    pub status_codes: Vec<u16>,
}

macro_rules! retry_conditions {
    ($($name:ident = $bit:literal, $token:literal;)*) => {
        impl RetryOn {
            $(#[doc = concat!("`", $token, "`")] pub const $name: u32 = 1 << $bit;)*
        }
        const RETRY_TOKENS: &[(&str, u32)] = &[$(($token, RetryOn::$name),)*];
    };
}

retry_conditions! {
    FIVE_XX = 0, "5xx";
    GATEWAY_ERROR = 1, "gateway-error";
    RESET = 2, "reset";
    CONNECT_FAILURE = 3, "connect-failure";
    RETRIABLE_4XX = 4, "retriable-4xx";
    REFUSED_STREAM = 5, "refused-stream";
    RETRIABLE_STATUS_CODES = 6, "retriable-status-codes";
    RETRIABLE_HEADERS = 7, "retriable-headers";
    ENVOY_RATELIMITED = 8, "envoy-ratelimited";
    HTTP3_POST_CONNECT_FAILURE = 9, "http3-post-connect-failure";
    RESET_BEFORE_REQUEST = 10, "reset-before-request";
    GRPC_CANCELLED = 11, "cancelled";
    GRPC_DEADLINE_EXCEEDED = 12, "deadline-exceeded";
    GRPC_INTERNAL = 13, "internal";
    GRPC_RESOURCE_EXHAUSTED = 14, "resource-exhausted";
    GRPC_UNAVAILABLE = 15, "unavailable";
}

/// A `retryOn` token nobody knows.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown retryOn condition {token:?} (expected Envoy conditions such as 5xx, gateway-error, reset, connect-failure, retriable-4xx, refused-stream, retriable-status-codes, cancelled, deadline-exceeded, internal, resource-exhausted, unavailable, or an HTTP status code)"
)]
pub struct RetryOnError {
    pub token: String,
}

impl RetryOn {
    /// Istio's default: `connect-failure,refused-stream,unavailable,cancelled,
    /// retriable-status-codes` with 503 as the retriable status.
    pub fn istio_default() -> Self {
        RetryOn {
            conditions: Self::CONNECT_FAILURE
                | Self::REFUSED_STREAM
                | Self::GRPC_UNAVAILABLE
                | Self::GRPC_CANCELLED
                | Self::RETRIABLE_STATUS_CODES,
            status_codes: vec![503],
        }
    }

    /// Parses Istio's comma-separated `retryOn`. Bare HTTP status codes (`503`) are Istio's
    /// shorthand: they become retriable status codes.
    pub fn parse(text: &str) -> Result<Self, RetryOnError> {
        let mut out = RetryOn::default();
        for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if let Some((_, bit)) = RETRY_TOKENS.iter().find(|(name, _)| *name == token) {
                out.conditions |= bit;
            } else if let Ok(code @ 100..=599) = token.parse::<u16>() {
                out.conditions |= Self::RETRIABLE_STATUS_CODES;
                if !out.status_codes.contains(&code) {
                    out.status_codes.push(code);
                }
            } else {
                return Err(RetryOnError {
                    token: token.to_string(),
                });
            }
        }
        Ok(out)
    }

    /// Whether `condition` (one of the associated constants) is set.
    pub fn contains(&self, condition: u32) -> bool {
        self.conditions & condition == condition
    }

    /// Whether any condition is set.
    pub fn is_empty(&self) -> bool {
        self.conditions == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_envoy_tokens_and_bare_codes() {
        let on = RetryOn::parse("5xx, connect-failure,unavailable,429").unwrap();
        assert!(on.contains(RetryOn::FIVE_XX));
        assert!(on.contains(RetryOn::CONNECT_FAILURE));
        assert!(on.contains(RetryOn::GRPC_UNAVAILABLE));
        assert!(on.contains(RetryOn::RETRIABLE_STATUS_CODES));
        assert!(!on.contains(RetryOn::RESET));
        assert_eq!(on.status_codes, [429]);
        let err = RetryOn::parse("5xx,sometimes").unwrap_err();
        assert_eq!(err.token, "sometimes");
        assert!(RetryOn::parse("700").is_err());
    }

    #[test]
    fn istio_default_policy() {
        let p = RetryPolicy::istio_default();
        assert_eq!(p.attempts, 2);
        assert!(p.retry_on.contains(RetryOn::CONNECT_FAILURE));
        assert!(p.retry_on.contains(RetryOn::REFUSED_STREAM));
        assert!(p.retry_on.contains(RetryOn::GRPC_CANCELLED));
        assert!(!p.retry_on.contains(RetryOn::FIVE_XX));
        assert_eq!(p.retry_on.status_codes, [503]);
        assert_eq!(RetryPolicy::none().attempts, 0);
    }
}
