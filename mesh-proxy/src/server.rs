//! Accepting connections and serving HTTP/1.1 and HTTP/2 on them.
//!
//! One socket serves both versions: hyper-util's `auto` builder reads the HTTP/2 preface and
//! falls back to HTTP/1.1. Each connection is watched for graceful shutdown: on drain the
//! accept loop stops, idle HTTP/1.1 connections close, HTTP/2 connections get a GOAWAY, and
//! requests in flight run to completion or until the drain deadline.
//!
//! The inbound listener secures connections first ([`Transport::Inbound`]): the
//! `PeerAuthentication` mode of the workload's port decides, per connection, whether the
//! client must speak mTLS (`STRICT`: a plaintext client is disconnected), may (`PERMISSIVE`:
//! a TLS ClientHello is told from plaintext by peeking at the first bytes), or must not
//! (`DISABLE`). The TLS handshake runs in the connection's own task, so a slow client never
//! holds up the accept loop; the verified peer identity goes into every request's extensions
//! as a [`mesh_core::Identity`].
//!
//! Every HTTP listener applies the Bootstrap's `limits` ([`http_builder`], `serve_http`):
//! request heads over the byte or count budget are refused `431` by hyper's parser (Envoy's
//! 60 KiB and 100 headers by default); a head not complete within the read timeout (15 s)
//! ends the connection (slowloris); HTTP/2 clients get a bounded number of concurrent
//! streams and hyper's rapid-reset and error-reset bounds, set here on purpose; and a
//! connection that moves no byte for the idle timeout (Istio's 1 h) is closed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use mesh_core::Identity;
use mesh_core::config::bootstrap::HttpLimits;
use mesh_tls::acceptor::MtlsAcceptor;
use mesh_tls::peer_auth::{Mode, PeerAuthenticationPolicy};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use mesh_core::body::{self, BoxBody};
use mesh_core::conn::{ClientInfo, OriginalDestination};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

/// A whole stack, type-erased: what a listener serves.
pub type HttpService = BoxCloneSyncService<Request<BoxBody>, Response<BoxBody>, Infallible>;

/// How long a PERMISSIVE listener waits for a client's first bytes to tell TLS from
/// plaintext; a client that says nothing by then is served as plaintext.
const DETECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How accepted connections are secured before HTTP is served on them.
#[derive(Clone, Debug, Default)]
pub enum Transport {
    /// Plaintext HTTP (outbound, admin).
    #[default]
    Plain,
    /// The inbound listener: mTLS as the workload's `PeerAuthentication` says.
    Inbound(Arc<InboundTls>),
    /// [`Transport::Inbound`] with protocol detection after the TLS step (`inbound.protocol:
    /// auto`): HTTP is served as HTTP; anything else, or a client silent past the bound, is
    /// opaque TCP to the app through `tcp`.
    InboundDetect(Arc<InboundTls>, Arc<crate::tcp::InboundTcp>),
    /// The outbound listener under transparent capture: a connection the kernel redirected
    /// (it has an original destination) is told HTTP from opaque TCP by its first bytes;
    /// HTTP requests carry the `OriginalDestination`; opaque TCP goes to `crate::capture`.
    /// Connections made to the listener itself are plain HTTP, as with [`Transport::Plain`].
    Captured(Arc<crate::capture::CapturedTcp>),
}

/// The inbound listener's TLS settings.
#[derive(Debug)]
pub struct InboundTls {
    /// This workload's mTLS server side; `None` without a Bootstrap identity, when only
    /// plaintext can be served.
    pub acceptor: Option<MtlsAcceptor>,
    /// The workload's PeerAuthentication, swapped on config reload.
    pub peer_auth: Arc<ArcSwap<PeerAuthenticationPolicy>>,
    /// The workload port `portLevelMtls` names: the app's port, as in Istio.
    pub port: u16,
}

/// Serves `service` on `listener` until `shutdown` turns true, then drains for at most
/// `drain_timeout`.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    service: HttpService,
    shutdown: watch::Receiver<bool>,
    drain_timeout: Duration,
) {
    serve_with(
        name,
        listener,
        service,
        Transport::Plain,
        ListenerOptions::default(),
        shutdown,
        drain_timeout,
    )
    .await
}

/// HTTP/2 streams a client may reset before they are answered, and streams the server may
/// reset for protocol errors, before the connection is closed (the "rapid reset" and
/// "error reset" floods, CVE-2023-44487 and its kin). hyper's defaults, pinned here so an
/// upgrade cannot loosen them unnoticed.
const HTTP2_MAX_PENDING_ACCEPT_RESETS: usize = 20;
const HTTP2_MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// Response bytes an HTTP/2 stream may hold for a client that does not open its flow-control
/// window, before the proxy stops reading the upstream's body (backpressure, not buffering):
/// hyper's default, pinned for the same reason.
const HTTP2_MAX_SEND_BUF: usize = 400 * 1024;

/// How a listener serves: the Bootstrap's `limits`, and the proxy's connection counters
/// (none for a stack served outside a proxy).
#[derive(Clone, Debug, Default)]
pub struct ListenerOptions {
    pub limits: HttpLimits,
    pub connections: Option<crate::conn_metrics::ConnectionMetrics>,
}

impl ListenerOptions {
    /// Counts a connection accepted on `listener`, when this listener counts.
    pub(crate) fn opened(
        &self,
        listener: &'static str,
    ) -> Option<crate::conn_metrics::OpenConnection> {
        self.connections.as_ref().map(|m| m.opened(listener))
    }
}

/// hyper-util's server builder for one listener, with `limits` applied.
pub fn http_builder(limits: &HttpLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // One flattened buffer per write rather than a writev of head and body: measured
        // -2.4 % CPU per request on one hop (benches/RESULTS.md, "HTTP/1.1 writes").
        .writev(false)
        // hyper refuses a head larger than its read buffer with 431; bodies stream in chunks
        // and are not bounded by it.
        .max_buf_size(limits.max_request_headers_bytes as usize)
        .max_headers(limits.max_request_headers as usize)
        .header_read_timeout(limits.request_headers_timeout.get());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_request_headers_bytes)
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_pending_accept_reset_streams(HTTP2_MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(HTTP2_MAX_LOCAL_ERROR_RESETS)
        .max_send_buf_size(HTTP2_MAX_SEND_BUF);
    builder
}

/// [`serve`], securing each connection as `transport` says.
pub async fn serve_with(
    name: &'static str,
    listener: TcpListener,
    service: HttpService,
    transport: Transport,
    options: ListenerOptions,
    mut shutdown: watch::Receiver<bool>,
    drain_timeout: Duration,
) {
    let local = match listener.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            tracing::error!(listener = name, error = %e, "listener has no local address");
            return;
        }
    };
    let builder = Arc::new(http_builder(&options.limits));
    let idle_timeout = options.limits.idle_timeout.get();
    let graceful = GracefulShutdown::new();

    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    let _ = stream.set_nodelay(true);
                    let conn = Connection {
                        name,
                        remote,
                        local,
                        service: service.clone(),
                        builder: builder.clone(),
                        watcher: graceful.watcher(),
                        idle_timeout,
                        _counted: options.opened(name),
                    };
                    match &transport {
                        Transport::Plain => {
                            tokio::spawn(conn.serve(stream, None));
                        }
                        Transport::Captured(tcp) => {
                            tokio::spawn(conn.captured(stream, tcp.clone()));
                        }
                        Transport::Inbound(tls) => {
                            tokio::spawn(conn.secure(stream, tls.clone()));
                        }
                        Transport::InboundDetect(tls, tcp) => {
                            tokio::spawn(conn.secure_detect(stream, tls.clone(), tcp.clone()));
                        }
                    }
                }
                Err(e) => {
                    // Usually EMFILE: back off briefly rather than spin.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            // `wait_for`'s guard is not `Send`: turn it into a plain value at once.
            _ = async { shutdown.wait_for(|stop| *stop).await.is_ok() } => break,
        }
    }
    drop(listener);
    tracing::debug!(listener = name, "stopped accepting; draining connections");
    if tokio::time::timeout(drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            ?drain_timeout,
            "drain deadline passed with requests still in flight"
        );
    }
}

/// An inbound connection after PeerAuthentication: plaintext, or mTLS with the verified
/// peer.
pub(crate) enum Secured {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, Identity),
}

/// Applies the PeerAuthentication mode of the workload port to a new connection: `None`
/// when the connection is refused (plaintext under STRICT, a failed handshake).
pub(crate) async fn secure(
    stream: TcpStream,
    remote: SocketAddr,
    tls: &InboundTls,
) -> Option<Secured> {
    let mode = tls.peer_auth.load().mode(tls.port);
    if mode == Mode::Disable {
        return Some(Secured::Plain(stream));
    }
    let is_tls = match mesh_tls::detect::is_tls(&stream, DETECT_TIMEOUT).await {
        Ok(is_tls) => is_tls,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "connection failed before its first bytes");
            return None;
        }
    };
    if !is_tls {
        if mode == Mode::Strict {
            tracing::debug!(%remote, policy = %tls.peer_auth.load(), "plaintext connection refused: mTLS is STRICT");
            return None;
        }
        return Some(Secured::Plain(stream));
    }
    let Some(acceptor) = &tls.acceptor else {
        tracing::warn!(%remote, "TLS connection refused: this proxy's Bootstrap has no identity");
        return None;
    };
    match acceptor.accept(stream).await {
        Ok(accepted) => {
            tracing::trace!(%remote, peer = %accepted.peer, "mTLS connection accepted");
            Some(Secured::Tls(Box::new(accepted.stream), accepted.peer))
        }
        Err(e) => {
            tracing::info!(%remote, error = %e, "mTLS connection refused");
            None
        }
    }
}

/// One accepted connection, before HTTP is served on it.
struct Connection {
    name: &'static str,
    remote: SocketAddr,
    local: SocketAddr,
    service: HttpService,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
    idle_timeout: Duration,
    /// Counted as active for as long as the connection is served.
    _counted: Option<crate::conn_metrics::OpenConnection>,
}

impl Connection {
    /// Applies the PeerAuthentication mode of the workload port, then serves HTTP on what
    /// remains of the connection (or closes it).
    async fn secure(self, stream: TcpStream, tls: Arc<InboundTls>) {
        match secure(stream, self.remote, &tls).await {
            Some(Secured::Plain(stream)) => self.serve(stream, None).await,
            Some(Secured::Tls(stream, peer)) => self.serve(stream, Some(peer)).await,
            None => {}
        }
    }

    /// [`Transport::InboundDetect`]: secure, then HTTP or opaque TCP by the first bytes.
    async fn secure_detect(
        self,
        stream: TcpStream,
        tls: Arc<InboundTls>,
        tcp: Arc<crate::tcp::InboundTcp>,
    ) {
        use crate::detect::{DETECT_TIMEOUT, Protocol, detect, detect_by_reading};
        let (remote, local) = (self.remote, self.local);
        match secure(stream, remote, &tls).await {
            Some(Secured::Plain(stream)) => match detect(&stream, DETECT_TIMEOUT).await {
                Ok(Protocol::Http) => self.serve(stream, None).await,
                Ok(_) => crate::tcp::forward(stream, None, remote, local, &tcp).await,
                Err(e) => {
                    tracing::debug!(%remote, error = %e, "connection failed before its first bytes")
                }
            },
            Some(Secured::Tls(stream, peer)) => {
                match detect_by_reading(*stream, DETECT_TIMEOUT).await {
                    Ok((Protocol::Http, io)) => self.serve(io, Some(peer)).await,
                    Ok((_, io)) => crate::tcp::forward(io, Some(peer), remote, local, &tcp).await,
                    Err(e) => {
                        tracing::debug!(%remote, error = %e, "mTLS connection failed before its first bytes")
                    }
                }
            }
            None => {}
        }
    }

    /// A connection on the outbound listener under capture: see [`Transport::Captured`].
    async fn captured(self, stream: TcpStream, tcp: Arc<crate::capture::CapturedTcp>) {
        let Some(original) = crate::capture::original_destination(&stream) else {
            return self.serve(stream, None).await;
        };
        match crate::detect::detect(&stream, crate::detect::DETECT_TIMEOUT).await {
            Ok(crate::detect::Protocol::Http) => {
                self.serve_http(stream, None, Some(original)).await
            }
            Ok(protocol) => {
                let tls = protocol == crate::detect::Protocol::Tls;
                crate::capture::opaque(stream, self.remote, original, tls, &tcp).await
            }
            Err(e) => {
                tracing::debug!(remote = %self.remote, error = %e, "captured connection failed before its first bytes");
            }
        }
    }

    /// Serves HTTP/1.1 or HTTP/2 on `io` until it closes or the drain ends it.
    async fn serve<IO>(self, io: IO, peer: Option<Identity>)
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.serve_http(io, peer, None).await
    }

    async fn serve_http<IO>(self, io: IO, peer: Option<Identity>, original: Option<SocketAddr>)
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let svc = connection_service(self.service, self.remote, self.local, peer, original);
        serve_http(
            &self.builder,
            io,
            svc,
            self.watcher,
            self.idle_timeout,
            self.name,
            self.remote,
        )
        .await;
    }
}

/// Serves HTTP on one accepted connection (upgrades included) under the drain `watcher`,
/// closing it once no byte has moved either way for `idle_timeout`.
pub(crate) async fn serve_http<IO, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: IO,
    svc: S,
    watcher: hyper_util::server::graceful::Watcher,
    idle_timeout: Duration,
    listener: &str,
    remote: SocketAddr,
) where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<BoxBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let (io, activity) = crate::idle::Tracked::new(io);
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .into_owned();
    tokio::select! {
        result = watcher.watch(conn) => {
            if let Err(e) = result {
                tracing::debug!(listener, %remote, error = %e, "connection ended with an error");
            }
        }
        () = activity.idle_for(idle_timeout) => {
            tracing::debug!(listener, %remote, ?idle_timeout, "idle connection closed");
        }
    }
}

/// The hyper service of one connection: boxes the body and tags the request with the
/// connection it came on and, after an mTLS handshake, the peer's verified identity.
fn connection_service(
    service: HttpService,
    remote: SocketAddr,
    local: SocketAddr,
    peer: Option<Identity>,
    original: Option<SocketAddr>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<BoxBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<BoxBody>, Infallible>> + Send,
> + Clone {
    let info = ClientInfo {
        remote,
        local,
        tls: peer.is_some(),
    };
    hyper::service::service_fn(move |req: Request<Incoming>| {
        let mut req = req.map(body::boxed);
        req.extensions_mut().insert(info.clone());
        if let Some(original) = original {
            req.extensions_mut().insert(OriginalDestination(original));
        }
        // Only a verified handshake puts an identity here; nothing a client sends can.
        if let Some(peer) = &peer {
            req.extensions_mut().insert(peer.clone());
        }
        service.clone().oneshot(req)
    })
}
