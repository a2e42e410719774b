//! Connection-pool limits: Istio's `trafficPolicy.connectionPool`, which Envoy enforces as
//! per-cluster circuit breakers. Past a limit the request fails at once with `503 UO`:
//! nothing queues beyond a limit, and nothing waits for a connection longer than the
//! fail-fast bound.
//!
//! ```
//! use std::sync::Arc;
//! use mesh_core::body::{self, BoxBody, BoxError};
//! use mesh_core::{ProxyError, ResponseFlags};
//! use mesh_resilience::pool_limits::{CircuitBreakers, PoolLimits, PoolLimitsLayer};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // An endpoint that holds every response open until told to finish.
//! let (finish, finished) = tokio::sync::watch::channel(false);
//! let endpoint = service_fn(move |_req: http::Request<BoxBody>| {
//!     let mut finished = finished.clone();
//!     async move {
//!         let _ = finished.wait_for(|done| *done).await;
//!         Ok::<_, BoxError>(http::Response::new(body::full("ok")))
//!     }
//! });
//! let breakers = Arc::new(CircuitBreakers::default());
//! let svc = PoolLimitsLayer::new(breakers.clone()).layer(endpoint);
//!
//! // `http2MaxRequests: 1` on the route's DestinationRule: one request at a time.
//! let limits = PoolLimits { max_requests: 1, ..PoolLimits::UNLIMITED };
//! let request = || {
//!     let mut req = http::Request::new(body::empty());
//!     req.extensions_mut().insert(mesh_resilience::doc_support::route_target("reviews:9080"));
//!     req.extensions_mut().insert(limits);
//!     req
//! };
//! let first = tokio::spawn(svc.clone().oneshot(request()));
//! while breakers.cluster("reviews:9080").requests() == 0 {
//!     tokio::task::yield_now().await;
//! }
//! let err = svc.clone().oneshot(request()).await.unwrap_err();
//! let err = ProxyError::find(&err).unwrap();
//! assert_eq!(err.flags(), ResponseFlags::UPSTREAM_OVERFLOW);
//! assert_eq!(err.status(), 503);
//!
//! finish.send(true).unwrap();
//! assert_eq!(first.await.unwrap().unwrap().status(), 200);
//! # }
//! ```
//!
//! # What is limited, and where
//!
//! | Istio field | Envoy threshold | enforced by |
//! |---|---|---|
//! | `http.http2MaxRequests` | `max_requests`: requests in flight to the cluster (any HTTP version) | [`PoolLimitsLayer`], per attempt, until the response body ends |
//! | `tcp.maxConnections` | `max_connections`: upstream connections of the cluster | the connection pool, through [`PoolAdmission`] and [`Cluster::try_connection`] |
//! | `http.http1MaxPendingRequests` | `max_pending_requests`: requests waiting for a connection | the connection pool, through [`Cluster::try_pending`] |
//! | `http.maxRequestsPerConnection` | `max_requests_per_connection` | the connection pool |
//! | `http.maxRetries` | `max_retries`: retries in flight | [`Cluster::try_retry`], for a retry layer |
//! | `tcp.connectTimeout`, `http.idleTimeout` | the cluster's connect and idle timeouts | the connection pool |
//!
//! # Choices
//!
//! - **Per cluster, as Envoy.** A cluster is what the route's `RouteTarget.name` names:
//!   service, port and subset (`reviews:9080/v2`), so subsets have limits of their own, as
//!   Envoy's `outbound|9080|v2|reviews...` clusters do. Counters are atomics in a
//!   [`Cluster`] shared by every request of that name; the map from names to clusters is
//!   only locked to find the entry.
//! - **Istio's defaults are unlimited** (2^32−1 for every count), not Envoy's 1024:
//!   [`PoolLimits::UNLIMITED`]. A limit of 0 in the YAML means "unset" in Istio's API and is
//!   treated so.
//! - **Limits are read where they apply.** The layer and the connection pool each read them
//!   from the route's traffic policy ([`PoolLimits::for_target`], a handful of field reads);
//!   a limit that is not set costs no counter lookup at all, and the pool looks its
//!   cluster's counters up ([`PoolAdmission`]) only when it must open a connection or queue.
//! - **Overflow is not an endpoint failure.** `UO` is a local decision: outlier detection
//!   does not count it and retries do not retry it (Envoy does neither).
//! - **Fail fast.** A request admitted as pending waits for a connection at most
//!   [`DEFAULT_FAIL_FAST`] (Linkerd's 3 s fail-fast bound), then fails `503 UO`, so a stuck
//!   pool never hangs a caller.

// FxHash: looked up on every request, keyed by config (cluster names) and endpoint addresses.
use rustc_hash::FxHashMap as HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use mesh_core::body::{BoxBody, BoxError};
use mesh_core::config::networking::ConnectionPoolSettings;
use mesh_core::target::RouteTarget;
use mesh_core::{ProxyError, ResponseFlags};
use tokio::sync::Notify;

/// How long a request may wait for a connection of a full pool before it fails `503 UO`.
pub const DEFAULT_FAIL_FAST: Duration = Duration::from_secs(3);

/// The compiled `connectionPool` of one cluster. Counts are `usize::MAX` when unset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLimits {
    /// `tcp.maxConnections`.
    pub max_connections: usize,
    /// `http.http1MaxPendingRequests`.
    pub max_pending_requests: usize,
    /// `http.http2MaxRequests`.
    pub max_requests: usize,
    /// `http.maxRetries`.
    pub max_retries: usize,
    /// `http.maxRequestsPerConnection`; `None`: unlimited (1 turns keep-alive off).
    pub max_requests_per_connection: Option<u32>,
    /// `tcp.connectTimeout`; `None`: the proxy's default (Istio's 10 s).
    pub connect_timeout: Option<Duration>,
    /// `http.idleTimeout`; `None`: the proxy's default.
    pub idle_timeout: Option<Duration>,
}

impl Default for PoolLimits {
    fn default() -> Self {
        PoolLimits::UNLIMITED
    }
}

impl PoolLimits {
    /// Istio's defaults: nothing limited.
    pub const UNLIMITED: PoolLimits = PoolLimits {
        max_connections: usize::MAX,
        max_pending_requests: usize::MAX,
        max_requests: usize::MAX,
        max_retries: usize::MAX,
        max_requests_per_connection: None,
        connect_timeout: None,
        idle_timeout: None,
    };

    /// Compiles a DestinationRule's `connectionPool`. Zero counts mean unset, as in Istio.
    pub fn from_settings(settings: &ConnectionPoolSettings) -> PoolLimits {
        fn count(v: Option<u32>) -> usize {
            match v {
                Some(n) if n > 0 => n as usize,
                _ => usize::MAX,
            }
        }
        let tcp = settings.tcp.as_ref();
        let http = settings.http.as_ref();
        PoolLimits {
            max_connections: count(tcp.and_then(|t| t.max_connections)),
            max_pending_requests: count(http.and_then(|h| h.http1_max_pending_requests)),
            max_requests: count(http.and_then(|h| h.http2_max_requests)),
            max_retries: count(http.and_then(|h| h.max_retries)),
            max_requests_per_connection: http
                .and_then(|h| h.max_requests_per_connection)
                .filter(|n| *n > 0),
            connect_timeout: tcp
                .and_then(|t| t.connect_timeout)
                .map(|d| d.get())
                .filter(|d| !d.is_zero()),
            idle_timeout: http
                .and_then(|h| h.idle_timeout)
                .map(|d| d.get())
                .filter(|d| !d.is_zero()),
        }
    }

    /// Whether a connection pool has anything to enforce: a connection or pending-request
    /// count, or a per-connection request limit.
    pub fn limits_connections(&self) -> bool {
        self.max_connections != usize::MAX
            || self.max_pending_requests != usize::MAX
            || self.max_requests_per_connection.is_some()
    }

    /// The limits of the route's cluster: its traffic policy's `connectionPool`, if any.
    pub fn for_target(target: &RouteTarget) -> PoolLimits {
        target
            .traffic_policy
            .as_ref()
            .and_then(|p| p.connection_pool.as_ref())
            .map(PoolLimits::from_settings)
            .unwrap_or(PoolLimits::UNLIMITED)
    }
}

/// Every cluster's counters, by cluster name. One per proxy (or per embedding client).
#[derive(Debug, Default)]
pub struct CircuitBreakers {
    clusters: Mutex<HashMap<Arc<str>, Arc<Cluster>>>,
}

impl CircuitBreakers {
    /// The counters of cluster `name`, created on first use.
    pub fn cluster(&self, name: &str) -> Arc<Cluster> {
        let mut clusters = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clusters.get(name) {
            return c.clone();
        }
        let name: Arc<str> = name.into();
        let cluster = Arc::new(Cluster::new(name.clone()));
        clusters.insert(name, cluster.clone());
        cluster
    }

    /// Drops the counters of clusters nothing holds and nothing counts: bounded memory when
    /// routes come and go.
    pub fn prune(&self) {
        let mut clusters = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        clusters.retain(|_, c| Arc::strong_count(c) > 1 || !c.is_idle());
    }
}

/// One cluster's circuit-breaker counters.
#[derive(Debug)]
pub struct Cluster {
    name: Arc<str>,
    requests: AtomicUsize,
    pending: AtomicUsize,
    connections: AtomicUsize,
    retries: AtomicUsize,
    /// Woken when a connection of the cluster closes or finishes an exchange, so a pending
    /// request looks again.
    released: Notify,
}

/// What a connection pool needs to admit one request: its cluster's limits, and the
/// cluster's counters, looked up only when the pool has to open a connection or queue the
/// request (a request served by an idle pooled connection never touches them).
#[derive(Debug)]
pub struct PoolAdmission {
    breakers: Arc<CircuitBreakers>,
    name: Arc<str>,
    pub limits: PoolLimits,
    cluster: std::sync::OnceLock<Arc<Cluster>>,
}

impl PoolAdmission {
    /// The admission of a request to cluster `name` under `limits`.
    pub fn new(breakers: Arc<CircuitBreakers>, name: Arc<str>, limits: PoolLimits) -> Self {
        PoolAdmission {
            breakers,
            name,
            limits,
            cluster: std::sync::OnceLock::new(),
        }
    }

    /// The cluster's name (`reviews:9080/v2`).
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The cluster's counters.
    pub fn cluster(&self) -> &Arc<Cluster> {
        self.cluster
            .get_or_init(|| self.breakers.cluster(&self.name))
    }
}

impl Cluster {
    fn new(name: Arc<str>) -> Cluster {
        Cluster {
            name,
            requests: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            retries: AtomicUsize::new(0),
            released: Notify::new(),
        }
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }
    /// Requests in flight.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Acquire)
    }
    /// Requests waiting for a connection.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }
    /// Open upstream connections.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }
    /// Retries in flight.
    pub fn retries(&self) -> usize {
        self.retries.load(Ordering::Acquire)
    }

    fn is_idle(&self) -> bool {
        self.requests() == 0
            && self.pending() == 0
            && self.connections() == 0
            && self.retries() == 0
    }

    /// A request slot, or `None` when `max_requests` are in flight.
    pub fn try_request(self: &Arc<Self>, limits: &PoolLimits) -> Option<Permit> {
        self.try_take(Counter::Requests, limits.max_requests)
    }

    /// A connection slot, or `None` when the cluster has `max_connections` open.
    pub fn try_connection(self: &Arc<Self>, limits: &PoolLimits) -> Option<Permit> {
        self.try_take(Counter::Connections, limits.max_connections)
    }

    /// A place in the pending queue, or `None` when `max_pending_requests` already wait.
    pub fn try_pending(self: &Arc<Self>, limits: &PoolLimits) -> Option<Permit> {
        self.try_take(Counter::Pending, limits.max_pending_requests)
    }

    /// A retry slot, or `None` when `max_retries` are in flight.
    pub fn try_retry(self: &Arc<Self>, limits: &PoolLimits) -> Option<Permit> {
        self.try_take(Counter::Retries, limits.max_retries)
    }

    /// Resolves once a connection of the cluster is released (closed, or done with an
    /// exchange). Create it before looking for a connection, so a release in between is not
    /// missed.
    pub fn released(&self) -> tokio::sync::futures::Notified<'_> {
        self.released.notified()
    }

    /// Tells pending requests to look again: a connection closed or became idle.
    pub fn notify_released(&self) {
        self.released.notify_waiters();
    }

    fn counter(&self, which: Counter) -> &AtomicUsize {
        match which {
            Counter::Requests => &self.requests,
            Counter::Pending => &self.pending,
            Counter::Connections => &self.connections,
            Counter::Retries => &self.retries,
        }
    }

    fn try_take(self: &Arc<Self>, which: Counter, max: usize) -> Option<Permit> {
        let counter = self.counter(which);
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Permit {
            cluster: self.clone(),
            which,
        })
    }

    /// The `503 UO` of an overflowing `limit`.
    pub fn overflow(&self, limit: &str, max: usize) -> ProxyError {
        ProxyError::new(
            ResponseFlags::UPSTREAM_OVERFLOW,
            format_args!(
                "upstream overflow: {} has {max} {limit} (its DestinationRule connectionPool limit)",
                self.name
            ),
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counter {
    Requests,
    Pending,
    Connections,
    Retries,
}

/// One slot of a [`Cluster`] counter, given back when dropped. A connection permit also wakes
/// the cluster's pending requests when it goes.
#[derive(Debug)]
pub struct Permit {
    cluster: Arc<Cluster>,
    which: Counter,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.cluster
            .counter(self.which)
            .fetch_sub(1, Ordering::AcqRel);
        if self.which == Counter::Connections {
            self.cluster.notify_released();
        }
    }
}

/// Enforces `http2MaxRequests` per cluster and hands the cluster's limits to the connection
/// pool below (see the [module docs](self)).
#[derive(Clone, Debug)]
pub struct PoolLimitsLayer {
    breakers: Arc<CircuitBreakers>,
}

impl PoolLimitsLayer {
    pub fn new(breakers: Arc<CircuitBreakers>) -> Self {
        PoolLimitsLayer { breakers }
    }
}

impl<S> tower::Layer<S> for PoolLimitsLayer {
    type Service = PoolLimitsService<S>;
    fn layer(&self, inner: S) -> PoolLimitsService<S> {
        PoolLimitsService {
            breakers: self.breakers.clone(),
            inner,
        }
    }
}

/// The service made by [`PoolLimitsLayer`].
#[derive(Clone, Debug)]
pub struct PoolLimitsService<S> {
    breakers: Arc<CircuitBreakers>,
    inner: S,
}

impl<S> tower::Service<Request<BoxBody>> for PoolLimitsService<S>
where
    S: tower::Service<Request<BoxBody>, Response = Response<BoxBody>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<BoxBody>) -> Self::Future {
        // Without a route target (the inbound side, an embedder's bare client) there is no
        // cluster to count against.
        let Some(target) = req.extensions().get::<RouteTarget>() else {
            return ResponseFuture::Pass {
                inner: self.inner.call(req),
            };
        };
        // An embedder (or a test) may set the limits itself; else the route's policy says.
        let limits = req
            .extensions()
            .get::<PoolLimits>()
            .copied()
            .unwrap_or_else(|| PoolLimits::for_target(target));
        if limits.max_requests == usize::MAX {
            // Nothing to count: no lookup, no wrapped body.
            return ResponseFuture::Pass {
                inner: self.inner.call(req),
            };
        }
        let cluster = self.breakers.cluster(&target.name);
        let Some(permit) = cluster.try_request(&limits) else {
            let e = cluster.overflow("requests in flight", limits.max_requests);
            tracing::debug!(error = %e, "request refused");
            return ResponseFuture::Overflow { error: Some(e) };
        };
        ResponseFuture::Admitted {
            inner: self.inner.call(req),
            permit: Some(permit),
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`PoolLimitsService`].
    #[project = Proj]
    pub enum ResponseFuture<F> {
        Pass { #[pin] inner: F },
        Admitted { #[pin] inner: F, permit: Option<Permit> },
        Overflow { error: Option<ProxyError> },
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<BoxBody>, BoxError>>,
{
    type Output = Result<Response<BoxBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Pass { inner } => inner.poll(cx),
            Proj::Admitted { inner, permit } => {
                let resp = std::task::ready!(inner.poll(cx))?;
                // The request stays in flight until its response body has been read.
                let permit = permit.take();
                Poll::Ready(Ok(
                    resp.map(|b| mesh_core::body::boxed(HoldPermit { inner: b, permit }))
                ))
            }
            Proj::Overflow { error } => Poll::Ready(Err(error
                .take()
                .map(BoxError::from)
                .unwrap_or_else(|| "response future polled after completion".into()))),
        }
    }
}

pin_project_lite::pin_project! {
    /// A body that keeps a [`Permit`] until it ends or is dropped.
    struct HoldPermit {
        #[pin]
        inner: BoxBody,
        permit: Option<Permit>,
    }
}

impl Body for HoldPermit {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        if frame.is_none() {
            this.permit.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::networking::{HttpSettings, TcpSettings};

    #[test]
    fn settings_compile_with_zero_as_unset() {
        let settings = ConnectionPoolSettings {
            tcp: Some(TcpSettings {
                max_connections: Some(1),
                connect_timeout: Some(mesh_core::config::types::Duration::from_millis(250)),
                ..Default::default()
            }),
            http: Some(HttpSettings {
                http1_max_pending_requests: Some(1),
                http2_max_requests: Some(0),
                max_requests_per_connection: Some(1),
                ..Default::default()
            }),
        };
        let limits = PoolLimits::from_settings(&settings);
        assert_eq!(limits.max_connections, 1);
        assert_eq!(limits.max_pending_requests, 1);
        assert_eq!(limits.max_requests, usize::MAX);
        assert_eq!(limits.max_retries, usize::MAX);
        assert_eq!(limits.max_requests_per_connection, Some(1));
        assert_eq!(limits.connect_timeout, Some(Duration::from_millis(250)));
        assert_eq!(
            PoolLimits::from_settings(&Default::default()),
            PoolLimits::UNLIMITED
        );
    }

    #[test]
    fn permits_count_and_give_back() {
        let breakers = CircuitBreakers::default();
        let cluster = breakers.cluster("reviews:9080");
        let limits = PoolLimits {
            max_connections: 2,
            ..PoolLimits::UNLIMITED
        };
        let a = cluster.try_connection(&limits).unwrap();
        let b = cluster.try_connection(&limits).unwrap();
        assert!(cluster.try_connection(&limits).is_none());
        assert_eq!(cluster.connections(), 2);
        drop(a);
        assert_eq!(cluster.connections(), 1);
        assert!(cluster.try_connection(&limits).is_some());
        drop(b);
        // The same name is the same cluster; another name is not.
        assert!(Arc::ptr_eq(&cluster, &breakers.cluster("reviews:9080")));
        assert!(!Arc::ptr_eq(&cluster, &breakers.cluster("reviews:9080/v2")));
    }

    #[tokio::test]
    async fn a_closed_connection_wakes_pending_requests() {
        let breakers = CircuitBreakers::default();
        let cluster = breakers.cluster("c");
        let limits = PoolLimits::UNLIMITED;
        let conn = cluster.try_connection(&limits).unwrap();
        let released = cluster.released();
        drop(conn);
        tokio::time::timeout(Duration::from_secs(1), released)
            .await
            .expect("woken by the released connection");
    }

    #[test]
    fn idle_clusters_are_pruned() {
        let breakers = CircuitBreakers::default();
        let held = breakers.cluster("held");
        let _busy = breakers.cluster("busy").try_request(&PoolLimits::UNLIMITED);
        breakers.cluster("idle");
        breakers.prune();
        let names: Vec<_> = {
            let c = breakers.clusters.lock().unwrap();
            let mut v: Vec<_> = c.keys().map(|k| k.to_string()).collect();
            v.sort();
            v
        };
        assert_eq!(names, ["busy", "held"]);
        drop(held);
    }
}
