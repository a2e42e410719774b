//! The upstream client: sends a request to one chosen endpoint over a pooled connection.
//!
//! Why not `hyper_util`'s legacy `Client`: it keys its pool on the request URI's authority,
//! so it could not both honour the balancer's choice of endpoint and keep the caller's
//! `Host`/`:authority` intact. Here each endpoint owns its connections (`EndpointPool`),
//! which is also where connection limits, TLS origination and outlier state attach later.
//!
//! - HTTP/1.1: a list of connections per endpoint; a request takes one that is ready (its
//!   previous exchange finished) or dials a new one. A connection that turns out to be closed
//!   before the request was written is replaced and the request sent again, once: nothing
//!   reached the server, so this is safe for any method.
//! - HTTP/2: one multiplexed connection per endpoint, dialled once however many requests
//!   arrive while it connects.
//!
//! - Upgrades (WebSocket and others) and `CONNECT`: a fresh connection of their own, never
//!   pooled, joined to the client's once the endpoint accepts; see [`crate::upgrade`].
//!
//! The request's target is an [`UpstreamTarget`] in its extensions, set by the balancer.
//!
//! Connection-pool limits (`trafficPolicy.connectionPool`) are read from the route's
//! target and counted in `mesh_resilience::pool_limits`' per-cluster counters: pools are kept
//! per cluster (`reviews:9080/v2`) and endpoint, as Envoy's are, so the cluster's connection
//! count is exact. When the cluster may open no more connections, a request waits in the
//! pending queue (`http1MaxPendingRequests`, overflow `503 UO`) for one to come free, at
//! most the fail-fast bound, then fails `503 UO`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use http::uri::{Authority, Scheme, Uri};
use http::{HeaderValue, Request, Response, Version};
use hyper::client::conn::{http1, http2};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_core::Identity;
use mesh_core::ProxyError;
use mesh_core::ResponseFlags;
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::config::networking::ClientTlsMode;
use mesh_core::stream_info::StreamInfo;
pub use mesh_core::target::UpstreamTarget;
use mesh_core::target::{EndpointTls, ORIG_PROTO_HEADER, RouteTarget};
use mesh_resilience::pool_limits::{
    CircuitBreakers, DEFAULT_FAIL_FAST, Permit, PoolAdmission, PoolLimits,
};
use mesh_telemetry::metrics::PEER_METADATA_HEADER;
use mesh_tls::connector::{MtlsConnector, OriginationTls};
use tokio::net::TcpStream;

use crate::upgrade::{Tunnel, TunnelName, splice};

/// Istio's MeshConfig `connectTimeout` default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an HTTP/1.1 connection may sit unused in the pool before it is closed, unless
/// the cluster's `http.idleTimeout` says otherwise.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The cluster (or, without one, the service), the endpoint, and whether it is spoken to over
/// HTTP/2.
type PoolKey = (Arc<str>, SocketAddr, bool, SecurityKind);

/// A cloneable service that forwards each request to its [`UpstreamTarget`].
#[derive(Clone, Debug)]
pub struct Upstream {
    pools: Arc<Mutex<HashMap<PoolKey, Arc<EndpointPool>>>>,
    connect_timeout: Duration,
    fail_fast: Duration,
    /// This workload's mesh mTLS client, when the Bootstrap gives it an identity.
    mesh_tls: Option<MtlsConnector>,
    /// Per-cluster counters for `connectionPool` limits; `None`: limits are not enforced.
    breakers: Option<Arc<CircuitBreakers>>,
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream::new(DEFAULT_CONNECT_TIMEOUT)
    }
}

impl Upstream {
    pub fn new(connect_timeout: Duration) -> Self {
        Upstream {
            pools: Arc::default(),
            connect_timeout,
            fail_fast: DEFAULT_FAIL_FAST,
            mesh_tls: None,
            breakers: None,
        }
    }

    /// Enforces the routes' `connectionPool` connection limits (`maxConnections`,
    /// `http1MaxPendingRequests`, `maxRequestsPerConnection`) in the counters of `breakers`,
    /// the ones the request-limit and retry layers share.
    pub fn with_circuit_breakers(mut self, breakers: Arc<CircuitBreakers>) -> Self {
        self.breakers = Some(breakers);
        self
    }

    /// Originates mesh mTLS with `connector` where the DestinationRule (`ISTIO_MUTUAL`) or
    /// the endpoint (`security.istio.io/tlsMode: istio`) asks for it.
    pub fn with_mesh_tls(mut self, connector: MtlsConnector) -> Self {
        self.mesh_tls = Some(connector);
        self
    }

    /// How long a request may wait for a connection of a pool at its limit (default 3 s).
    pub fn with_fail_fast(mut self, fail_fast: Duration) -> Self {
        self.fail_fast = fail_fast;
        self
    }

    /// Drains the pools of endpoints for which `keep` says no: their idle connections close
    /// now, busy ones when their exchange ends (the request in flight holds its pool). This
    /// is how a removed endpoint's connections go away, as Envoy drains a removed host's
    /// pools.
    pub fn retain(&self, keep: impl Fn(SocketAddr) -> bool) {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.retain(|(_, addr, _, _), _| keep(*addr));
    }

    /// Closes HTTP/1.1 connections that the server closed or that sat idle past the idle
    /// timeout, in every pool (checkout prunes too, but only for endpoints still in use).
    pub fn prune_idle(&self) {
        let pools: Vec<_> = {
            let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
            pools.values().cloned().collect()
        };
        for pool in pools {
            pool.prune_h1();
        }
    }

    /// The endpoints this client holds pools for.
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let mut addrs: Vec<_> = pools.keys().map(|(_, addr, _, _)| *addr).collect();
        addrs.sort();
        addrs.dedup();
        addrs
    }

    fn pool(
        &self,
        target: &UpstreamTarget,
        admission: Option<&PoolAdmission>,
        security: SecurityKind,
    ) -> Arc<EndpointPool> {
        let cluster = admission.map_or(&target.service, |a| a.name());
        let key = (cluster.clone(), target.addr, target.http2, security);
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools
            .entry(key)
            .or_insert_with(|| {
                Arc::new(EndpointPool {
                    addr: target.addr,
                    h1: Mutex::default(),
                    h2: Mutex::new(H2State::Idle),
                    peer: Arc::default(),
                    idle_timeout_ms: std::sync::atomic::AtomicU64::new(
                        IDLE_TIMEOUT.as_millis() as u64
                    ),
                })
            })
            .clone()
    }

    async fn send(self, mut req: Request<BoxBody>) -> Result<Response<BoxBody>, BoxError> {
        let Some(target) = req.extensions().get::<UpstreamTarget>().cloned() else {
            return Err(ProxyError::new(
                ResponseFlags::NO_CLUSTER_FOUND,
                "internal error: request reached the upstream client without a target",
            )
            .into());
        };
        let route = req.extensions().get::<RouteTarget>().cloned();
        let admission = match (&self.breakers, &route) {
            (Some(breakers), Some(route)) => {
                let limits = req
                    .extensions()
                    .get::<PoolLimits>()
                    .copied()
                    .unwrap_or_else(|| PoolLimits::for_target(route));
                (limits.limits_connections()
                    || limits.connect_timeout.is_some()
                    || limits.idle_timeout.is_some())
                .then(|| PoolAdmission::new(breakers.clone(), route.name.clone(), limits))
            }
            _ => None,
        };
        let kind = security_kind(route.as_ref(), &target);
        if kind != SecurityKind::Mesh {
            // The workload metadata the metrics layer sends is for a peer sidecar, which only
            // an mTLS connection proves is there: a plain-text or external server never
            // learns this workload's name, namespace and version.
            req.headers_mut().remove(PEER_METADATA_HEADER);
        }
        // The original version travels with an upgraded request, for the peer sidecar to
        // restore; on any other request the header is not ours to pass on.
        if target.h2_upgrade && req.version() < Version::HTTP_2 {
            let version = if req.version() == Version::HTTP_10 {
                "HTTP/1.0"
            } else {
                "HTTP/1.1"
            };
            req.headers_mut()
                .insert(ORIG_PROTO_HEADER, HeaderValue::from_static(version));
        } else {
            req.headers_mut().remove(ORIG_PROTO_HEADER);
        }
        let pool = self.pool(&target, admission.as_ref(), kind);
        let limits = Checkout {
            admission,
            connect_timeout: self.connect_timeout,
            fail_fast: self.fail_fast,
            security: SecurityPlan {
                kind,
                route,
                endpoint: target.endpoint_tls.clone(),
                mesh: self.mesh_tls.clone(),
            },
        };
        if let Some(a) = &limits.admission {
            let idle = a.limits.idle_timeout.unwrap_or(IDLE_TIMEOUT);
            pool.idle_timeout_ms.store(
                idle.as_millis() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        let info = req.extensions().get::<StreamInfo>().cloned();
        if let Some(info) = &info {
            info.set_upstream(target.addr);
        }
        let result = match Tunnel::of(&mut req) {
            Tunnel::Upgrade(downstream) => {
                pool.send_upgrade(&target, &limits, req, downstream).await
            }
            Tunnel::Connect(downstream) => pool.connect(&target, &limits, downstream).await,
            Tunnel::None if req.method() == http::Method::CONNECT => Err(ProxyError::new(
                ResponseFlags::EMPTY,
                format_args!(
                    "CONNECT to {} cannot be tunnelled: this connection cannot be handed over \
                     (CONNECT is served over HTTP/1.1)",
                    target.service
                ),
            )
            .with_status(http::StatusCode::NOT_IMPLEMENTED)),
            Tunnel::None if target.http2 => pool
                .send_h2(&target, &limits, req)
                .await
                .map(|r| r.map(body::boxed)),
            Tunnel::None => pool
                .send_h1(&target, &limits, req)
                .await
                .map(|r| r.map(body::boxed)),
        };
        if let Some(info) = &info
            && kind == SecurityKind::Mesh
            && let Some(peer) = pool.peer.lock().unwrap_or_else(|p| p.into_inner()).clone()
        {
            info.set_upstream_peer(peer);
        }
        Ok(result?)
    }
}

impl tower::Service<Request<BoxBody>> for Upstream {
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<BoxBody>) -> Self::Future {
        Box::pin(self.clone().send(req))
    }
}

type H2Connect = Shared<BoxFuture<'static, Result<http2::SendRequest<BoxBody>, Arc<str>>>>;

enum H2State {
    Idle,
    Connecting(H2Connect),
    Ready(http2::SendRequest<BoxBody>),
}

/// The connections of one endpoint.
struct EndpointPool {
    addr: SocketAddr,
    /// HTTP/1.1 connections, busy or idle.
    h1: Mutex<Vec<H1Conn>>,
    h2: Mutex<H2State>,
    /// The cluster's `http.idleTimeout` as last seen, in milliseconds.
    idle_timeout_ms: std::sync::atomic::AtomicU64,
    /// The identity the endpoint proved in its last mTLS handshake (every connection of a
    /// mesh pool is verified against the same expectation), for telemetry.
    peer: PeerSlot,
}

type PeerSlot = Arc<Mutex<Option<Identity>>>;

/// A pooled HTTP/1.1 connection: when it was last handed out and how many requests it has
/// carried (for `maxRequestsPerConnection`).
struct H1Conn {
    sender: http1::SendRequest<BoxBody>,
    used: Instant,
    requests: u32,
}

/// What one request brings to the pool: its cluster's limits, if any, and the proxy's
/// defaults.
struct Checkout {
    admission: Option<PoolAdmission>,
    connect_timeout: Duration,
    fail_fast: Duration,
    security: SecurityPlan,
}

impl Checkout {
    fn connect_timeout(&self) -> Duration {
        self.admission
            .as_ref()
            .and_then(|a| a.limits.connect_timeout)
            .unwrap_or(self.connect_timeout)
    }

    /// A connection slot of the cluster: `Ok(None)` without limits, `Err` when full.
    fn connection_permit(&self) -> Result<Option<Permit>, ()> {
        match &self.admission {
            None => Ok(None),
            Some(a) => a.cluster().try_connection(&a.limits).map(Some).ok_or(()),
        }
    }

    /// Joins the cluster's pending queue, or fails `503 UO` when it is full.
    fn pending_permit(&self, a: &PoolAdmission) -> Result<Permit, ProxyError> {
        a.cluster().try_pending(&a.limits).ok_or_else(|| {
            a.cluster()
                .overflow("pending requests", a.limits.max_pending_requests)
        })
    }

    fn fail_fast_error(&self, target: &UpstreamTarget, addr: SocketAddr) -> ProxyError {
        ProxyError::new(
            ResponseFlags::UPSTREAM_OVERFLOW,
            format_args!(
                "upstream overflow: no connection to {} endpoint {addr} came free within {:?} \
                 (connectionPool limits; fail fast)",
                target.service, self.fail_fast
            ),
        )
    }

    fn notify_released(&self) {
        if let Some(a) = &self.admission {
            a.cluster().notify_released();
        }
    }
}

impl std::fmt::Debug for EndpointPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointPool")
            .field("addr", &self.addr)
            .finish()
    }
}

/// How a request got its HTTP/1.1 connection.
enum H1Checkout {
    /// An idle pooled connection.
    Idle(H1Conn),
    /// A busy one, taken out of the pool to wait for its exchange to end.
    Busy(H1Conn),
    /// None: the caller may dial.
    None,
}

impl EndpointPool {
    fn idle_timeout(&self) -> Duration {
        Duration::from_millis(
            self.idle_timeout_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Drops closed and long-idle HTTP/1.1 connections.
    fn prune_h1(&self) {
        let mut conns = self.h1.lock().unwrap_or_else(|p| p.into_inner());
        prune(&mut conns, self.idle_timeout());
    }

    /// A ready HTTP/1.1 connection from the pool (pruning closed and long-idle ones), else,
    /// when `take_busy`, a busy one to wait on.
    fn checkout_h1(&self, take_busy: bool) -> H1Checkout {
        let mut conns = self.h1.lock().unwrap_or_else(|p| p.into_inner());
        prune(&mut conns, self.idle_timeout());
        if let Some(i) = conns.iter().position(|c| c.sender.is_ready()) {
            return H1Checkout::Idle(conns.swap_remove(i));
        }
        if take_busy && !conns.is_empty() {
            return H1Checkout::Busy(conns.swap_remove(0));
        }
        H1Checkout::None
    }

    fn checkin_h1(&self, mut conn: H1Conn) {
        conn.used = Instant::now();
        let mut conns = self.h1.lock().unwrap_or_else(|p| p.into_inner());
        conns.push(conn);
    }

    async fn connect_h1(
        &self,
        target: &UpstreamTarget,
        checkout: &Checkout,
        permit: Option<Permit>,
    ) -> Result<H1Conn, ProxyError> {
        let connect_failed =
            |e: &dyn std::fmt::Display| ProxyError::connect_failed(&target.service, self.addr, e);
        let io = dial(
            self.addr,
            checkout.connect_timeout(),
            &checkout.security.resolve(),
            false,
            &self.peer,
        )
        .await
        .map_err(|e| connect_failed(&e))?;
        let (sender, conn) = http1::Builder::new()
            // Flattened writes, as the server side (see `server::http_builder`).
            .writev(false)
            .handshake(io)
            .await
            .map_err(|e| connect_failed(&e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
            }
            // The cluster's connection slot is given back (and pending requests woken) only
            // when the connection is really gone.
            drop(permit);
        });
        Ok(H1Conn {
            sender,
            used: Instant::now(),
            requests: 0,
        })
    }

    /// A connection for one request: an idle one; else a new one, if the cluster may open
    /// one; else, as a pending request, the next to come free (bounded by fail fast).
    async fn acquire_h1(
        &self,
        target: &UpstreamTarget,
        checkout: &Checkout,
    ) -> Result<(H1Conn, bool), ProxyError> {
        // The common case first: an idle pooled connection, with no counter to look at.
        if let H1Checkout::Idle(c) = self.checkout_h1(false) {
            return Ok((c, false));
        }
        let deadline = tokio::time::Instant::now() + checkout.fail_fast;
        let mut pending: Option<Permit> = None;
        loop {
            let Some(admission) = &checkout.admission else {
                return match self.checkout_h1(false) {
                    H1Checkout::Idle(c) | H1Checkout::Busy(c) => Ok((c, false)),
                    H1Checkout::None => Ok((self.connect_h1(target, checkout, None).await?, true)),
                };
            };
            // Registered before looking, so a release in between is not missed.
            let released = admission.cluster().released();
            tokio::pin!(released);
            released.as_mut().enable();
            match self.checkout_h1(pending.is_some()) {
                H1Checkout::Idle(c) => return Ok((c, false)),
                H1Checkout::Busy(mut c) => {
                    // Wait for its exchange to end; a connection that closes instead frees
                    // its slot, and the loop dials.
                    let ready = tokio::time::timeout_at(deadline, c.sender.ready()).await;
                    match ready {
                        Ok(Ok(())) => return Ok((c, false)),
                        Ok(Err(_)) => continue,
                        Err(_) => {
                            self.checkin_h1(c);
                            return Err(checkout.fail_fast_error(target, self.addr));
                        }
                    }
                }
                H1Checkout::None => {}
            }
            if let Ok(permit) = checkout.connection_permit() {
                return Ok((self.connect_h1(target, checkout, permit).await?, true));
            }
            if pending.is_none() {
                pending = Some(checkout.pending_permit(admission)?);
                continue;
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return Err(checkout.fail_fast_error(target, self.addr));
            }
        }
    }

    async fn send_h1(
        &self,
        target: &UpstreamTarget,
        checkout: &Checkout,
        req: Request<BoxBody>,
    ) -> Result<Response<hyper::body::Incoming>, ProxyError> {
        let mut req = to_http1(req);
        let max_per_conn = checkout
            .admission
            .as_ref()
            .and_then(|a| a.limits.max_requests_per_connection);
        // A pooled connection may have been closed by the server since its last use; the
        // request comes back unsent, and goes out once more on a fresh connection.
        let mut fresh_tried = false;
        loop {
            let (mut conn, fresh) = self.acquire_h1(target, checkout).await?;
            fresh_tried |= fresh;
            // A fresh connection may still be finishing its handshake.
            if conn.sender.ready().await.is_err() {
                if fresh {
                    return Err(ProxyError::connect_failed(
                        &target.service,
                        self.addr,
                        "connection closed during handshake",
                    ));
                }
                continue;
            }
            conn.requests = conn.requests.saturating_add(1);
            match conn.sender.try_send_request(req).await {
                Ok(response) => {
                    // At `maxRequestsPerConnection` the connection is not pooled again: it
                    // closes when this exchange ends.
                    if max_per_conn.is_none_or(|max| conn.requests < max) {
                        self.checkin_h1(conn);
                        checkout.notify_released();
                    }
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh_tried => {
                        req = unsent;
                        continue;
                    }
                    _ => return Err(upstream_failed(target, self.addr, e.error())),
                },
            }
        }
    }

    /// A fresh connection of its own for a tunnel, with the cluster's connection slot it
    /// holds (a cluster at `maxConnections` answers `503 UO`: a tunnel does not queue).
    async fn dial_dedicated(
        &self,
        target: &UpstreamTarget,
        checkout: &Checkout,
    ) -> Result<(Box<dyn Io>, Option<Permit>), ProxyError> {
        let permit = match (checkout.connection_permit(), &checkout.admission) {
            (Ok(permit), _) => permit,
            (Err(()), Some(a)) => {
                return Err(a
                    .cluster()
                    .overflow("connections", a.limits.max_connections));
            }
            (Err(()), None) => None,
        };
        let io = dial(
            self.addr,
            checkout.connect_timeout(),
            &checkout.security.resolve(),
            false,
            &self.peer,
        )
        .await
        .map_err(|e| ProxyError::connect_failed(&target.service, self.addr, e))?;
        Ok((io.into_inner(), permit))
    }

    /// Sends an upgrade request on a fresh HTTP/1.1 connection; on `101`, joins the
    /// endpoint's connection to the client's (`downstream`) in a task of its own.
    async fn send_upgrade(
        &self,
        target: &UpstreamTarget,
        checkout: &Checkout,
        req: Request<BoxBody>,
        downstream: OnUpgrade,
    ) -> Result<Response<BoxBody>, ProxyError> {
        let (io, permit) = self.dial_dedicated(target, checkout).await?;
        let (mut sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| ProxyError::connect_failed(&target.service, self.addr, e))?;
        // The slot goes when both the connection (an answer other than 101) and the tunnel
        // (a 101) are done with it.
        let permit = permit.map(Arc::new);
        let held = permit.clone();
        tokio::spawn(async move {
            // Resolves once the connection is handed over to the tunnel, or closes.
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream upgrade connection ended");
            }
            drop(held);
        });
        let mut response = sender
            .send_request(to_http1(req))
            .await
            .map_err(|e| upstream_failed(target, self.addr, &e))?;
        // Never pooled: without its sender the connection closes after this exchange.
        drop(sender);
        if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            let upstream = hyper::upgrade::on(&mut response);
            let name = TunnelName {
                service: target.service.clone(),
                endpoint: self.addr,
                kind: "upgrade",
            };
            tokio::spawn(splice(
                downstream,
                async move { upstream.await.map(TokioIo::new) },
                name,
                permit,
            ));
        }
        Ok(response.map(body::boxed))
    }

    /// Opens a connection to the endpoint for a `CONNECT`, and joins it to the client's
    /// (`downstream`) once the `200` has been written.
    async fn connect(
        &self,
        target: &UpstreamTarget,
        checkout: &Checkout,
        downstream: OnUpgrade,
    ) -> Result<Response<BoxBody>, ProxyError> {
        let (io, permit) = self.dial_dedicated(target, checkout).await?;
        let name = TunnelName {
            service: target.service.clone(),
            endpoint: self.addr,
            kind: "CONNECT",
        };
        tokio::spawn(splice(
            downstream,
            std::future::ready(Ok::<_, std::convert::Infallible>(io)),
            name,
            permit,
        ));
        Ok(Response::new(body::empty()))
    }

    async fn h2_sender(
        &self,
        target: &UpstreamTarget,
        checkout: &Checkout,
    ) -> Result<http2::SendRequest<BoxBody>, ProxyError> {
        let deadline = tokio::time::Instant::now() + checkout.fail_fast;
        let mut pending: Option<Permit> = None;
        let connecting = loop {
            let released = checkout.admission.as_ref().map(|a| a.cluster().released());
            let mut released = std::pin::pin!(released);
            if let Some(r) = released.as_mut().as_pin_mut() {
                r.enable();
            }
            // The lock is held only in this block, never across an await.
            {
                let mut state = self.h2.lock().unwrap_or_else(|p| p.into_inner());
                match &*state {
                    H2State::Ready(s) if !s.is_closed() => return Ok(s.clone()),
                    H2State::Connecting(fut) => break fut.clone(),
                    _ => {}
                }
                if let Ok(permit) = checkout.connection_permit() {
                    let fut = h2_connect(
                        self.addr,
                        checkout.connect_timeout(),
                        checkout.security.resolve(),
                        permit,
                        self.peer.clone(),
                    );
                    *state = H2State::Connecting(fut.clone());
                    break fut;
                }
            }
            // The cluster is at maxConnections: wait, as a pending request, for one to close.
            if let (None, Some(a)) = (&pending, &checkout.admission) {
                pending = Some(checkout.pending_permit(a)?);
            }
            let waited = match released.as_mut().as_pin_mut() {
                Some(r) => tokio::time::timeout_at(deadline, r).await.is_ok(),
                None => false,
            };
            if !waited {
                return Err(checkout.fail_fast_error(target, self.addr));
            }
        };
        drop(pending);
        let result = connecting.await;
        let mut state = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(sender) => {
                if matches!(&*state, H2State::Connecting(_)) {
                    *state = H2State::Ready(sender.clone());
                }
                Ok(sender)
            }
            Err(e) => {
                if matches!(&*state, H2State::Connecting(_)) {
                    *state = H2State::Idle;
                }
                Err(ProxyError::connect_failed(&target.service, self.addr, e))
            }
        }
    }

    async fn send_h2(
        &self,
        target: &UpstreamTarget,
        checkout: &Checkout,
        req: Request<BoxBody>,
    ) -> Result<Response<hyper::body::Incoming>, ProxyError> {
        let req = to_http2(req);
        let mut sender = self.h2_sender(target, checkout).await?;
        sender
            .ready()
            .await
            .map_err(|e| upstream_failed(target, self.addr, &e))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| upstream_failed(target, self.addr, &e))
    }
}

/// Dials an HTTP/2 connection, once, for every request that arrives while it connects. The
/// cluster's connection slot goes with the connection.
fn h2_connect(
    addr: SocketAddr,
    timeout: Duration,
    security: Security,
    permit: Option<Permit>,
    peer: PeerSlot,
) -> H2Connect {
    async move {
        let io = dial(addr, timeout, &security, true, &peer)
            .await
            .map_err(|e| Arc::<str>::from(e.to_string()))?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(|e| Arc::<str>::from(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
            }
            drop(permit);
        });
        Ok(sender)
    }
    .boxed()
    .shared()
}

/// Keeps the HTTP/1.1 connections that are open and not idle past `idle_timeout`.
fn prune(conns: &mut Vec<H1Conn>, idle_timeout: Duration) {
    let now = Instant::now();
    conns.retain(|c| {
        let idle_too_long = c.sender.is_ready() && now.duration_since(c.used) > idle_timeout;
        !c.sender.is_closed() && !idle_too_long
    });
}

/// A connection to an endpoint, plain or TLS.
pub(crate) trait Io:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static
{
}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Opens a connection to an endpoint, TCP bounded by the connect timeout, then TLS as
/// `security` says (the handshake has its own bound).
pub(crate) async fn dial(
    addr: SocketAddr,
    timeout: Duration,
    security: &Security,
    http2: bool,
    peer: &PeerSlot,
) -> Result<TokioIo<Box<dyn Io>>, DialError> {
    if let Security::Unavailable(reason) = security {
        return Err(DialError::Tls(reason.to_string()));
    }
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            DialError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect timed out after {timeout:?}"),
            ))
        })?
        .map_err(DialError::Io)?;
    stream.set_nodelay(true).map_err(DialError::Io)?;
    let io: Box<dyn Io> = match security {
        Security::Plain | Security::Unavailable(_) => Box::new(stream),
        Security::Mesh {
            connector,
            expected,
        } => match connector.connect(stream, expected, http2).await {
            Ok(connected) => {
                *peer.lock().unwrap_or_else(|p| p.into_inner()) = Some(connected.peer);
                Box::new(connected.stream)
            }
            Err(e) => {
                if matches!(e, mesh_tls::TlsError::IdentityMismatch { .. }) {
                    tracing::warn!(endpoint = %addr, error = %e, "refusing the endpoint's identity");
                }
                return Err(DialError::Tls(e.to_string()));
            }
        },
        Security::Origination { tls, sni } => match tls.connect(stream, sni, http2).await {
            Ok(stream) => Box::new(stream),
            Err(e) => return Err(DialError::Tls(e.to_string())),
        },
    };
    Ok(TokioIo::new(io))
}

/// Why a new upstream connection failed: TCP, or TLS (a failed handshake, an unexpected
/// identity, or mTLS required without an identity to present).
#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    #[error("{0}")]
    Io(std::io::Error),
    #[error("{0}")]
    Tls(String),
}

/// What secures the connections of a pool; part of the pool's key, so a plaintext and an
/// mTLS connection to one endpoint are never confused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum SecurityKind {
    Plain,
    Mesh,
    Origination,
}

/// How a request's connection would be secured, resolved into a [`Security`] only when a
/// connection is dialled (rare: connections are pooled).
pub(crate) struct SecurityPlan {
    pub(crate) kind: SecurityKind,
    pub(crate) route: Option<RouteTarget>,
    pub(crate) endpoint: Option<Arc<EndpointTls>>,
    pub(crate) mesh: Option<MtlsConnector>,
}

/// How one new connection is secured.
#[derive(Clone)]
pub(crate) enum Security {
    Plain,
    Mesh {
        connector: MtlsConnector,
        /// Any of these may answer; empty: any identity the trust bundle vouches for.
        expected: Vec<Identity>,
    },
    Origination {
        tls: Arc<OriginationTls>,
        sni: String,
    },
    /// TLS is required but cannot be set up; the dial fails with this reason.
    Unavailable(Arc<str>),
}

/// Istio's choice, per request, from the route's DestinationRule `tls` and the endpoint's
/// labels: `ISTIO_MUTUAL` → mesh mTLS; `SIMPLE`/`MUTUAL` → TLS origination; `DISABLE`
/// written out → plaintext; no `tls` at all → auto mTLS, mesh mTLS exactly to endpoints
/// labelled `security.istio.io/tlsMode: istio`.
pub(crate) fn security_kind(route: Option<&RouteTarget>, target: &UpstreamTarget) -> SecurityKind {
    let tls = route
        .and_then(|r| r.traffic_policy.as_deref())
        .and_then(|p| p.tls.as_ref());
    match tls.map(|t| t.mode) {
        Some(ClientTlsMode::IstioMutual) => SecurityKind::Mesh,
        Some(ClientTlsMode::Simple | ClientTlsMode::Mutual) => SecurityKind::Origination,
        Some(ClientTlsMode::Disable) => SecurityKind::Plain,
        None if target.endpoint_tls.as_ref().is_some_and(|e| e.istio_mtls) => SecurityKind::Mesh,
        None => SecurityKind::Plain,
    }
}

impl SecurityPlan {
    pub(crate) fn resolve(&self) -> Security {
        match self.kind {
            SecurityKind::Plain => Security::Plain,
            SecurityKind::Mesh => self.mesh(),
            SecurityKind::Origination => self.origination(),
        }
    }

    fn mesh(&self) -> Security {
        let Some(connector) = &self.mesh else {
            let auto = self
                .route
                .as_ref()
                .and_then(|r| r.traffic_policy.as_deref())
                .and_then(|p| p.tls.as_ref())
                .is_none();
            if auto {
                // Auto mTLS needs something to present; without an identity Istio's sidecar
                // would have none either, and talks plaintext.
                return Security::Plain;
            }
            return Security::Unavailable(
                "the DestinationRule asks for ISTIO_MUTUAL but this proxy's Bootstrap has no \
                 identity"
                    .into(),
            );
        };
        Security::Mesh {
            connector: connector.clone(),
            expected: self.expected_identities(connector),
        }
    }

    /// The identities the server may present: the DestinationRule's `subjectAltNames`, else
    /// the ServiceEntry's, else the one that follows from the endpoint's service account;
    /// none of them: any the trust bundle vouches for (Istio's behaviour).
    fn expected_identities(&self, connector: &MtlsConnector) -> Vec<Identity> {
        let route = self.route.as_ref();
        let from_rule = route
            .and_then(|r| r.traffic_policy.as_deref())
            .and_then(|p| p.tls.as_ref())
            .map(|t| t.subject_alt_names.as_slice())
            .unwrap_or_default();
        let from_service = route
            .map(|r| r.service.subject_alt_names.as_slice())
            .unwrap_or_default();
        let names = if from_rule.is_empty() {
            from_service
        } else {
            from_rule
        };
        if !names.is_empty() {
            return names
                .iter()
                .filter_map(|n| match Identity::parse(n) {
                    Ok(id) => Some(id),
                    Err(e) => {
                        tracing::warn!(name = %n, error = %e, "subjectAltNames entry is not a SPIFFE ID; ignored");
                        None
                    }
                })
                .collect();
        }
        let account = self
            .endpoint
            .as_ref()
            .and_then(|e| e.service_account.as_deref());
        match (account, route) {
            (Some(sa), Some(route)) => {
                let own = connector.credentials().identity();
                Identity::for_service_account(own.trust_domain(), &route.service.namespace, sa)
                    .map(|id| vec![id])
                    .unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }

    fn origination(&self) -> Security {
        let Some(route) = &self.route else {
            return Security::Plain;
        };
        let Some(settings) = route.traffic_policy.as_deref().and_then(|p| p.tls.as_ref()) else {
            return Security::Plain;
        };
        // Built when a connection is dialled (its files are read then), not per request.
        match OriginationTls::from_settings(settings) {
            Ok(tls) => Security::Origination {
                tls: Arc::new(tls),
                sni: route.service.host.as_str().to_owned(),
            },
            Err(e) => Security::Unavailable(e.to_string().into()),
        }
    }
}

/// Envoy's classification of a failure on an established upstream connection.
fn upstream_failed(target: &UpstreamTarget, addr: SocketAddr, e: &hyper::Error) -> ProxyError {
    let flags = if e.is_parse() || e.is_parse_status() {
        ResponseFlags::UPSTREAM_PROTOCOL_ERROR
    } else if e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
        ResponseFlags::UPSTREAM_CONNECTION_TERMINATION
    } else {
        ResponseFlags::UPSTREAM_REMOTE_RESET
    };
    ProxyError::new(
        flags,
        format_args!(
            "upstream error: {} endpoint {addr}: {}",
            target.service,
            error_chain(e)
        ),
    )
}

/// `hyper::Error`'s Display names only the outer kind; its cause says what happened.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// HTTP/1.1 wants origin-form (`/path?q`) and a `Host` header; a request that came in over
/// HTTP/2 carries its authority in the URI instead.
fn to_http1(mut req: Request<BoxBody>) -> Request<BoxBody> {
    let authority = req.uri().authority().cloned();
    if let Some(authority) = authority
        && !req.headers().contains_key(http::header::HOST)
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        req.headers_mut().insert(http::header::HOST, v);
    }
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        let pq = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(pq);
    }
    *req.version_mut() = Version::HTTP_11;
    req
}

/// HTTP/2 wants the authority in `:authority` (the URI) and no `Host` header, so the caller's
/// authority, not the endpoint address, reaches the server.
fn to_http2(mut req: Request<BoxBody>) -> Request<BoxBody> {
    let host = req.headers_mut().remove(http::header::HOST);
    if req.uri().authority().is_none() || req.uri().scheme().is_none() {
        let authority = req
            .uri()
            .authority()
            .cloned()
            .or_else(|| host.and_then(|h| Authority::try_from(h.as_bytes()).ok()));
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(authority.unwrap_or_else(|| Authority::from_static("localhost")));
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    *req.version_mut() = Version::HTTP_2;
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn retain_closes_the_idle_connections_of_removed_endpoints() {
        use tower::ServiceExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (closed_tx, closed) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(Response::new(body::full("ok")))
            });
            // Returns when the client closes the keep-alive connection.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            let _ = closed_tx.send(());
        });

        let upstream = Upstream::default();
        let mut req = Request::get("/")
            .header("host", "svc")
            .body(body::empty())
            .unwrap();
        req.extensions_mut()
            .insert(UpstreamTarget::new(addr, false, "svc:80".into()));
        let resp = upstream.clone().oneshot(req).await.unwrap();
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
        assert_eq!(upstream.endpoints(), [addr]);

        // Still in discovery: the pooled keep-alive connection stays open.
        upstream.retain(|a| a == addr);
        upstream.prune_idle();
        assert_eq!(upstream.endpoints(), [addr]);

        // Removed: the pool goes and its idle connection closes.
        upstream.retain(|_| false);
        assert!(upstream.endpoints().is_empty());
        tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .expect("the removed endpoint's connection closed")
            .unwrap();
    }

    #[test]
    fn http1_gets_origin_form_and_host() {
        let req = Request::builder()
            .uri("http://reviews:9080/api?x=1")
            .version(Version::HTTP_2)
            .body(body::empty())
            .unwrap();
        let req = to_http1(req);
        assert_eq!(req.uri(), "/api?x=1");
        assert_eq!(req.headers()["host"], "reviews:9080");
        assert_eq!(req.version(), Version::HTTP_11);
    }

    #[test]
    fn http2_gets_authority_from_host() {
        let req = Request::builder()
            .uri("/api")
            .header("host", "reviews:9080")
            .body(body::empty())
            .unwrap();
        let req = to_http2(req);
        assert_eq!(req.uri(), "http://reviews:9080/api");
        assert!(req.headers().get("host").is_none());
    }
}
