//! Outbound opaque TCP: one client connection proxied to one endpoint of a service port, as
//! Envoy's `tcp_proxy` filter does for an Istio sidecar's TCP ports.
//!
//! [`proxy_to_service`] (or [`proxy_with_local`]) is the entry point of every listener that
//! has already decided a connection is opaque TCP for a known service port: the Sidecar
//! egress listeners of `crate::sidecar_listeners` (Istio's `captureMode: NONE`), and
//! transparently captured connections whose first bytes are not HTTP.
//! [`proxy_gateway_connection`] serves the gateway's `TCP` servers, which have no service:
//! the routes alone say where a connection goes.
//!
//! Per connection, in order:
//!
//! 1. **Route**: on a `TLS` or `HTTPS` service port the client's ClientHello is read first
//!    for its SNI (and replayed to the endpoint). The proxy's route table (the HTTP path's,
//!    swapped on reload, so a reload applies to the next connection) then picks the target:
//!    the first of the service's VirtualService `tls` routes (by `sniHosts`) then `tcp`
//!    routes that applies (match `port`, `sourceLabels`, `sourceNamespace`, `gateways`, and
//!    the dialled address in `destinationSubnets`, the client's in `sourceSubnet`), its
//!    destinations drawn by weight, with the destination's DestinationRule traffic policy and
//!    subset; else the service itself with its DestinationRule policy (exported to this
//!    proxy, `workloadSelector`, exact host over wildcard, port-level settings).
//!    VirtualService `http` routes do not apply to TCP, as in Istio. A destination that is
//!    not a known service, port or subset closes the connection (`NC`).
//! 2. **Endpoint**: the proxy's one balancer (`mesh_routing::balance`) picks an endpoint of
//!    the live endpoint set by the DestinationRule's `loadBalancer` policy (default: P2C over
//!    peak EWMA), skipping endpoints outlier detection ejected. The connection counts as in
//!    flight on its endpoint for its whole life, and the connect time is its latency sample.
//!    Outlier detection sits under the balancer as on the HTTP path, so consecutive connect
//!    failures eject an endpoint (Envoy's local-origin errors).
//! 3. **Limits**: `connectionPool.tcp.maxConnections` is counted in the cluster's circuit
//!    breaker, shared with the HTTP pools of the same cluster; past it the client is closed
//!    (Envoy's `UO` for TCP).
//! 4. **Connect**: TCP within `connectionPool.tcp.connectTimeout` (else Istio's 10 s), then
//!    TLS exactly as the HTTP path decides (`crate::upstream`'s `security_kind` and
//!    `SecurityPlan`): `ISTIO_MUTUAL` or an endpoint labelled `security.istio.io/tlsMode:
//!    istio` → mesh mTLS, the server's SPIFFE ID checked against the DestinationRule's or
//!    ServiceEntry's `subjectAltNames`, else the endpoint's `serviceAccount`; `SIMPLE` /
//!    `MUTUAL` → TLS origination. The ALPN offered is `http/1.1` (Istio offers
//!    `istio-peer-exchange`; the peer sidecar here does not look at it).
//!    A failure closes the client connection and is logged once, naming the service and the
//!    endpoint (the TCP form of `503 UF`).
//! 5. **Copy**: bytes both ways with half-close (`crate::tcp`'s copy), until both sides have
//!    closed or nothing moved for `connectionPool.tcp.idleTimeout` (Istio's default: 1 h).
//! 6. **Metrics**: `istio_tcp_connections_opened_total`, `..._closed_total`,
//!    `istio_tcp_received_bytes_total` and `istio_tcp_sent_bytes_total` with
//!    `reporter="source"`, the service as `destination_service` and the server's verified
//!    identity as `destination_principal`; bytes are counted as they move, so a long-lived
//!    connection shows its traffic before it closes. `connection_security_policy` is
//!    `unknown` on the source side, as Istio reports it. A connection that could not be
//!    proxied is counted opened and closed with its response flag (`UF`, `UH`, `UO`).
//!
//! ```no_run
//! # async fn demo(ctx: &mesh_proxy::tcp_out::OutboundTcp, config: &mesh_core::config::MeshConfig)
//! # -> Result<(), Box<dyn std::error::Error>> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3306").await?;
//! let (client, remote) = listener.accept().await?;
//! if let Some(mysql) = config.services().lookup("mysql", 3306) {
//!     // Logged (with the service and endpoint) when it fails; the client is closed either way.
//!     let _ = mesh_proxy::tcp_out::proxy_to_service(client, remote, mysql.clone(), ctx).await;
//! }
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response};
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::config::{MeshConfig, ServicePort};
use mesh_core::conn::{ClientInfo, OriginalDestination};
use mesh_core::target::{RouteTarget, UpstreamTarget};
use mesh_core::{Identity, ProxyError, ResponseFlags};
use mesh_resilience::outlier::OutlierDetectionLayer;
use mesh_resilience::pool_limits::{CircuitBreakers, Permit, PoolLimits};
use mesh_routing::RouteTable;
use mesh_routing::balance::BalanceLayer;
use mesh_telemetry::metrics::{
    Reporter, SecurityPolicy, TcpConnection, TcpConnectionMetrics, TcpMetrics,
};
use mesh_tls::connector::MtlsConnector;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};

use crate::client_hello::Rewind;
use crate::upstream::{self, DEFAULT_CONNECT_TIMEOUT, SecurityKind, SecurityPlan};

/// Istio's default `connectionPool.tcp.idleTimeout` for TCP proxying.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Why an outbound TCP connection was not proxied. The client connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum TcpOutError {
    /// No endpoint (`UH`), the endpoint refused or timed out, or TLS failed (`UF`), or the
    /// cluster is at `maxConnections` (`UO`): the message names the service and endpoint.
    #[error("{0}")]
    Upstream(ProxyError),
    /// The connection stack failed without saying why (a bug, not a peer's doing).
    #[error("TCP proxy to {service}: {message}")]
    Internal { service: Arc<str>, message: String },
}

impl TcpOutError {
    /// The Envoy response flag the connection is reported with.
    pub fn flags(&self) -> ResponseFlags {
        match self {
            TcpOutError::Upstream(e) => e.flags(),
            TcpOutError::Internal { .. } => ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
        }
    }
}

/// What every outbound TCP connection of one proxy shares: the current config and route
/// table, the balancer and health registry of the HTTP path, its circuit breakers, the
/// workload's mTLS client and its TCP metrics. Make one per proxy and share it by `Arc`.
pub struct OutboundTcp {
    config: Arc<ArcSwap<MeshConfig>>,
    /// The proxy's route table (the HTTP path's): its TLS and TCP routes.
    routes: Arc<ArcSwap<RouteTable>>,
    /// Balancing, outlier detection and the dial, for the target the route table chose.
    balanced: Stack,
    metrics: TcpMetrics,
}

impl std::fmt::Debug for OutboundTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundTcp").finish_non_exhaustive()
    }
}

impl OutboundTcp {
    /// `config`: the proxy's current snapshot (swapped on reload); `routes`: the route table
    /// built from it for this proxy (swapped with it); `balancer`: the proxy's one balancer
    /// (its health registry is where outlier detection writes); `breakers`: the proxy's
    /// circuit breakers; `mesh_tls`: the workload's mTLS client, when it has an identity;
    /// `metrics`: the proxy's TCP metrics (`Telemetry::tcp`).
    pub fn new(
        config: Arc<ArcSwap<MeshConfig>>,
        routes: Arc<ArcSwap<RouteTable>>,
        balancer: &BalanceLayer,
        breakers: Arc<CircuitBreakers>,
        mesh_tls: Option<MtlsConnector>,
        metrics: TcpMetrics,
    ) -> OutboundTcp {
        let dial = Dial { mesh_tls, breakers };
        let balanced = BoxCloneSyncService::new(balancer.layer(
            OutlierDetectionLayer::new(balancer.health()).layer(tower::service_fn(
                move |req: Request<BoxBody>| dial.clone().call(req),
            )),
        ));
        OutboundTcp {
            config,
            routes,
            balanced,
            metrics,
        }
    }

    /// The proxy's current config snapshot.
    pub fn config(&self) -> Arc<MeshConfig> {
        self.config.load_full()
    }

    /// The route table in force.
    pub fn routes(&self) -> Arc<RouteTable> {
        self.routes.load_full()
    }

    /// The target of a connection from `client` to `service` (`sni`: its ClientHello's).
    fn route(
        &self,
        service: &Arc<ServicePort>,
        client: &ClientInfo,
        sni: Option<&str>,
    ) -> Result<RouteTarget, ProxyError> {
        match self.routes.load().select_tcp(service, client, sni) {
            Some(routed) => routed,
            // The snapshot the service came from knows a port the table's does not (a
            // reload in between): the service as given, without traffic policy.
            None => Ok(RouteTarget::new(service.clone())),
        }
    }

    /// Picks an endpoint of `target` and connects to it: the connection, its endpoint and
    /// what it proved.
    /// `original`: a captured connection's original destination, where a `resolution: NONE`
    /// target's connections go.
    async fn connect(
        &self,
        target: RouteTarget,
        client: ClientInfo,
        original: Option<OriginalDestination>,
    ) -> Result<Connected, TcpOutError> {
        let destination = target.service.host.to_arc();
        let name = target.name.clone();
        let slot = DialSlot::default();
        let mut req = Request::new(body::empty());
        req.extensions_mut().insert(target);
        req.extensions_mut().insert(client);
        req.extensions_mut().insert(slot.clone());
        if let Some(original) = original {
            req.extensions_mut().insert(original);
        }
        let response = call(&self.balanced, req)
            .await
            .map_err(|e| match ProxyError::find(&e) {
                Some(p) => TcpOutError::Upstream(ProxyError::new(p.flags(), p)),
                None => TcpOutError::Internal {
                    service: name.clone(),
                    message: e.to_string(),
                },
            })?;
        let dialed = slot.take().ok_or_else(|| TcpOutError::Internal {
            service: name.clone(),
            message: "the balancer answered without a connection".to_string(),
        })?;
        Ok(Connected {
            dialed,
            destination,
            in_flight: response,
        })
    }
}

type Stack = BoxCloneSyncService<Request<BoxBody>, Response<BoxBody>, BoxError>;

/// Calls `stack` with `req`, as a boxed `'static` future (which keeps the `Send` proof of
/// callers' futures simple).
fn call(
    stack: &Stack,
    req: Request<BoxBody>,
) -> BoxFuture<'static, Result<Response<BoxBody>, BoxError>> {
    Box::pin(stack.clone().oneshot(req))
}

/// A connection made for a client, with what keeps its endpoint's in-flight count.
struct Connected {
    dialed: Dialed,
    /// The service the route sent the connection to, for its metrics.
    destination: Arc<str>,
    /// The balancer's response: its body is open until this is dropped, which is when the
    /// balancer counts the connection as done.
    in_flight: Response<BoxBody>,
}

/// Proxies `client` (accepted from `remote`) to an endpoint of `service` as opaque TCP, until
/// both sides have closed or the connection idles past the cluster's `tcp.idleTimeout`.
///
/// Never waits for the client to speak first: the endpoint is dialled at once, so protocols
/// whose server speaks first (SMTP, MySQL) work. When no endpoint can be reached the client
/// connection is closed; the error is logged here (naming the service and endpoint) and
/// returned for the caller's information.
pub async fn proxy_to_service<C>(
    client: C,
    remote: SocketAddr,
    service: Arc<ServicePort>,
    ctx: &OutboundTcp,
) -> Result<(), TcpOutError>
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
{
    proxy_with_local(client, remote, None, service, ctx).await
}

/// [`proxy_to_service`] with `local`, the address the client dialled: a captured
/// connection's original destination, or the listener's address. VirtualService `tcp` and
/// `tls` routes match it against their `destinationSubnets` (without it, the client's own
/// address stands in).
///
/// On a `TLS` or `HTTPS` service port the client's ClientHello is read first (up to
/// [`CLIENT_HELLO_TIMEOUT`]), for the `tls` routes' `sniHosts`, and replayed to the endpoint;
/// a client that sends something else is proxied as it is, matching no `tls` route.
pub async fn proxy_with_local<C>(
    client: C,
    remote: SocketAddr,
    local: Option<SocketAddr>,
    service: Arc<ServicePort>,
    ctx: &OutboundTcp,
) -> Result<(), TcpOutError>
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
{
    proxy_service(client, remote, local, None, None, service, ctx).await
}

/// [`proxy_to_service`] for a transparently captured connection to `original` (its
/// `SO_ORIGINAL_DST`): what `tcp` routes match as the dialled address, and where a
/// `resolution: NONE` service's connections go.
pub async fn proxy_captured<C>(
    client: C,
    remote: SocketAddr,
    original: SocketAddr,
    service: Arc<ServicePort>,
    ctx: &OutboundTcp,
) -> Result<(), TcpOutError>
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (local, original) = (Some(original), Some(original));
    proxy_service(client, remote, local, original, None, service, ctx).await
}

/// [`proxy_captured`] for a connection whose ClientHello was already read (`hello`): the
/// capture path reads it to find the service by SNI.
pub(crate) async fn proxy_captured_hello<C>(
    client: C,
    hello: ClientHelloRead,
    remote: SocketAddr,
    original: SocketAddr,
    service: Arc<ServicePort>,
    ctx: &OutboundTcp,
) -> Result<(), TcpOutError>
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (local, original) = (Some(original), Some(original));
    proxy_service(client, remote, local, original, Some(hello), service, ctx).await
}

/// Proxies `client` to `service`: on a TLS port after reading its ClientHello (unless the
/// caller did, `hello`), for the `tls` routes.
async fn proxy_service<C>(
    mut client: C,
    remote: SocketAddr,
    local: Option<SocketAddr>,
    original: Option<SocketAddr>,
    hello: Option<ClientHelloRead>,
    service: Arc<ServicePort>,
    ctx: &OutboundTcp,
) -> Result<(), TcpOutError>
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
{
    let info = ClientInfo {
        remote,
        local: local.unwrap_or(remote),
        tls: false,
    };
    let original = original.map(OriginalDestination);
    let dialled = Some(service.host.to_arc());
    let hello = match hello {
        Some(hello) => hello,
        None if service.protocol.is_tls() => read_sni(&mut client, remote).await,
        None => {
            let routed = ctx.route(&service, &info, None);
            return proxy_connection(client, info, original, routed, dialled, ctx).await;
        }
    };
    let routed = ctx.route(&service, &info, hello.sni.as_deref());
    let client = Rewind::new(hello.bytes, client);
    proxy_connection(client, info, original, routed, dialled, ctx).await
}

/// What was read of a client's first flight on a TLS port.
pub(crate) struct ClientHelloRead {
    /// Every byte read, to replay.
    pub(crate) bytes: Vec<u8>,
    /// The ClientHello's server name; `None` without one, or when the bytes are not a
    /// ClientHello or it did not come within [`CLIENT_HELLO_TIMEOUT`].
    pub(crate) sni: Option<String>,
}

/// Reads `client`'s ClientHello (up to [`CLIENT_HELLO_TIMEOUT`]) for its SNI. A client that
/// sends something else, or nothing, is proxied as it is, matching no `tls` route.
pub(crate) async fn read_sni<C>(client: &mut C, remote: SocketAddr) -> ClientHelloRead
where
    C: AsyncRead + Unpin,
{
    let mut bytes = Vec::with_capacity(2048);
    let read = crate::client_hello::read_client_hello(client, &mut bytes);
    let sni = match tokio::time::timeout(CLIENT_HELLO_TIMEOUT, read).await {
        Ok(Ok(sni)) => sni,
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "TLS port without a ClientHello: proxied without SNI");
            None
        }
        Err(_) => {
            tracing::debug!(%remote, "no ClientHello within {CLIENT_HELLO_TIMEOUT:?}: proxied without SNI");
            None
        }
    };
    ClientHelloRead { bytes, sni }
}

/// Proxies `client`, accepted from `remote` on a gateway listener bound at `local` (a
/// `Gateway` server with protocol `TCP`, or a `PASSTHROUGH` one whose ClientHello named
/// `sni`), as the `tls` and `tcp` routes of the VirtualServices bound to the gateways on
/// `local`'s port direct. A connection no route takes is closed (`NR`), logged and counted
/// like any TCP connection that could not be proxied.
pub async fn proxy_gateway_connection<C>(
    client: C,
    remote: SocketAddr,
    local: SocketAddr,
    sni: Option<&str>,
    ctx: &OutboundTcp,
) -> Result<(), TcpOutError>
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
{
    let info = ClientInfo {
        remote,
        local,
        tls: false,
    };
    let routed = ctx
        .routes
        .load()
        .select_gateway_tcp(local.port(), &info, sni)
        .unwrap_or_else(|| {
            Err(ProxyError::new(
                ResponseFlags::NO_ROUTE_FOUND,
                format_args!(
                    "no route: no VirtualService bound to the gateway has a tls or tcp route for port {}",
                    local.port()
                ),
            ))
        });
    proxy_connection(client, info, None, routed, None, ctx).await
}

/// How long a client on a TLS port has to send its ClientHello before it is proxied without
/// one (the gateway's bound for the same read).
pub const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Proxies `client` to an endpoint of the target routing chose (`routed`); `dialled`: the
/// service the client addressed, for the metrics of a connection that could not be routed.
async fn proxy_connection<C>(
    client: C,
    info: ClientInfo,
    original: Option<OriginalDestination>,
    routed: Result<RouteTarget, ProxyError>,
    dialled: Option<Arc<str>>,
    ctx: &OutboundTcp,
) -> Result<(), TcpOutError>
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
{
    let remote = info.remote;
    let connected = match routed {
        Ok(target) => ctx.connect(target, info, original).await,
        Err(unrouted) => Err(TcpOutError::Upstream(unrouted)),
    };
    let connected = match connected {
        Ok(connected) => connected,
        Err(e) => {
            tracing::warn!(%remote, error = %e, "outbound TCP connection closed: the service could not be reached");
            let mut metrics = ctx.metrics.connection(TcpConnection {
                destination_service: dialled,
                response_flags: e.flags(),
                ..TcpConnection::new(Reporter::Source)
            });
            metrics.opened();
            metrics.closed();
            return Err(e);
        }
    };
    let Connected {
        dialed,
        destination,
        in_flight,
    } = connected;
    let mut metrics = ctx.metrics.connection(TcpConnection {
        peer: dialed.peer,
        destination_service: Some(destination.clone()),
        // Istio's source-side reports leave the policy unknown.
        security: SecurityPolicy::Unknown,
        ..TcpConnection::new(Reporter::Source)
    });
    metrics.opened();
    let activity = Arc::new(Activity::new(metrics));
    let metered = Metered {
        io: client,
        activity: activity.clone(),
    };
    tracing::debug!(%remote, service = %destination, endpoint = %dialed.addr, "outbound TCP connection");
    tokio::select! {
        _ = crate::tcp::copy(metered, dialed.io, remote) => {}
        _ = activity.idle(dialed.idle_timeout) => {
            tracing::debug!(%remote, endpoint = %dialed.addr, idle_timeout = ?dialed.idle_timeout, "TCP connection idle past its timeout: closed");
        }
    }
    drop(dialed.permit);
    drop(in_flight);
    // The last reference: closing counts `istio_tcp_connections_closed_total`.
    drop(activity);
    Ok(())
}

/// What the dial below the balancer leaves for the connection.
struct Dialed {
    io: Box<dyn upstream::Io>,
    addr: SocketAddr,
    /// The server's verified SPIFFE ID, over mesh mTLS.
    peer: Option<Identity>,
    idle_timeout: Duration,
    /// The cluster's connection slot (`maxConnections`), held while the connection lives.
    permit: Option<Permit>,
}

/// Where the dial puts the connection it made; a request extension (the balancer's stack
/// speaks requests and responses, a connection is neither).
#[derive(Clone, Default)]
struct DialSlot(Arc<Mutex<Option<Dialed>>>);

impl DialSlot {
    fn put(&self, dialed: Dialed) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(dialed);
    }

    fn take(&self) -> Option<Dialed> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// The innermost service: takes a connection slot of the cluster and dials the endpoint
/// the balancer chose, securing it as the HTTP path would.
#[derive(Clone)]
struct Dial {
    mesh_tls: Option<MtlsConnector>,
    breakers: Arc<CircuitBreakers>,
}

impl Dial {
    async fn call(self, req: Request<BoxBody>) -> Result<Response<BoxBody>, BoxError> {
        let ext = req.extensions();
        let (Some(target), Some(route), Some(slot)) = (
            ext.get::<UpstreamTarget>().cloned(),
            ext.get::<RouteTarget>().cloned(),
            ext.get::<DialSlot>().cloned(),
        ) else {
            return Err(ProxyError::new(
                ResponseFlags::NO_CLUSTER_FOUND,
                "internal error: a TCP connection reached the dial without a target",
            )
            .into());
        };
        let limits = PoolLimits::for_target(&route);
        let permit = if limits.max_connections == usize::MAX {
            None
        } else {
            let cluster = self.breakers.cluster(&route.name);
            match cluster.try_connection(&limits) {
                Some(permit) => Some(permit),
                None => {
                    return Err(cluster
                        .overflow("connections", limits.max_connections)
                        .into());
                }
            }
        };
        let kind = upstream::security_kind(Some(&route), &target);
        let security = SecurityPlan {
            kind,
            route: Some(route.clone()),
            endpoint: target.endpoint_tls.clone(),
            mesh: self.mesh_tls.clone(),
        }
        .resolve();
        let connect_timeout = limits.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let peer = Arc::new(Mutex::new(None));
        let io = upstream::dial(target.addr, connect_timeout, &security, false, &peer)
            .await
            .map_err(|e| ProxyError::connect_failed(&target.service, target.addr, e))?;
        let peer = match kind {
            SecurityKind::Mesh => peer.lock().unwrap_or_else(PoisonError::into_inner).take(),
            _ => None,
        };
        slot.put(Dialed {
            io: io.into_inner(),
            addr: target.addr,
            peer,
            idle_timeout: idle_timeout(&route),
            permit,
        });
        // A body that stays open until the connection's end, so the balancer counts the
        // connection in flight on its endpoint for as long as it lives.
        Ok(Response::new(body::boxed(http_body_util::StreamBody::new(
            futures::stream::pending::<Result<http_body::Frame<Bytes>, BoxError>>(),
        ))))
    }
}

/// The cluster's `connectionPool.tcp.idleTimeout`, else Istio's 1 h. Zero is unset.
fn idle_timeout(route: &RouteTarget) -> Duration {
    route
        .traffic_policy
        .as_deref()
        .and_then(|p| p.connection_pool.as_ref())
        .and_then(|c| c.tcp.as_ref())
        .and_then(|t| t.idle_timeout)
        .map(|d| d.get())
        .filter(|d| !d.is_zero())
        .unwrap_or(DEFAULT_IDLE_TIMEOUT)
}

/// The client side of one connection: when bytes last moved, and its metrics, counted as
/// bytes move.
struct Activity {
    start: tokio::time::Instant,
    /// Milliseconds after `start` when bytes last moved either way.
    last_ms: AtomicU64,
    metrics: TcpConnectionMetrics,
}

impl Activity {
    fn new(metrics: TcpConnectionMetrics) -> Activity {
        Activity {
            start: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
            metrics,
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Resolves once no bytes have moved for `timeout`.
    async fn idle(&self, timeout: Duration) {
        loop {
            let last = self.last();
            tokio::time::sleep_until(last + timeout).await;
            if self.last() <= last {
                return;
            }
        }
    }
}

/// The client connection, noting activity and counting bytes: read from the client is
/// `received`, written to it is `sent` (Istio's directions, seen from the downstream).
struct Metered<IO> {
    io: IO,
    activity: Arc<Activity>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Metered<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        if read > 0 {
            self.activity.metrics.add_received(read as u64);
            self.activity.touch();
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Metered<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled
            && *n > 0
        {
            self.activity.metrics.add_sent(*n as u64);
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_telemetry::metrics::{Format, Metrics, WorkloadInfo};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn activity() -> (Arc<Metrics>, Arc<Activity>) {
        let metrics = Arc::new(Metrics::new());
        let tcp = TcpMetrics::new(metrics.clone(), &WorkloadInfo::new("c", "default"));
        let mut conn = tcp.connection(TcpConnection::new(Reporter::Source));
        conn.opened();
        (metrics, Arc::new(Activity::new(conn)))
    }

    #[tokio::test]
    async fn idle_waits_for_a_quiet_timeout_after_the_last_activity() {
        let (_, activity) = activity();
        // Nothing moved yet: idle once the timeout has passed.
        tokio::time::timeout(
            Duration::from_secs(5),
            activity.idle(Duration::from_millis(20)),
        )
        .await
        .expect("idle after a quiet timeout");
        // Activity moves the deadline: bytes "moved" 10 minutes from now keep a 1 s idle
        // timer pending (no wall-clock race: the deadline is far away).
        activity.last_ms.store(600_000, Ordering::Relaxed);
        let idle = activity.idle(Duration::from_secs(1));
        tokio::pin!(idle);
        assert!(futures::poll!(idle.as_mut()).is_pending());
        activity.touch();
        assert!(activity.last() <= tokio::time::Instant::now());
    }

    #[tokio::test]
    async fn metered_counts_both_directions() {
        let (metrics, activity) = activity();
        let (client, mut peer) = tokio::io::duplex(64);
        let mut metered = Metered {
            io: client,
            activity: activity.clone(),
        };
        peer.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        metered.read_exact(&mut buf).await.unwrap();
        metered.write_all(b"world!").await.unwrap();
        let text = metrics.encode(Format::Prometheus);
        let value = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name) && l.contains("reporter=\"source\""))
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(
            value("istio_tcp_received_bytes_total").as_deref(),
            Some("5")
        );
        assert_eq!(value("istio_tcp_sent_bytes_total").as_deref(), Some("6"));
    }

    #[test]
    fn idle_timeout_defaults_to_an_hour() {
        let service = Arc::new(ServicePort::new(
            mesh_core::HostName::qualify("db", "default"),
            3306,
            mesh_core::config::Protocol::Tcp,
        ));
        assert_eq!(
            idle_timeout(&RouteTarget::new(service)),
            DEFAULT_IDLE_TIMEOUT
        );
    }
}
