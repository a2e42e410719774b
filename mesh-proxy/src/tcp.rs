//! The inbound listener for a workload that speaks opaque TCP (`inbound.protocol: tcp`).
//!
//! Each connection goes through the same PeerAuthentication step as HTTP (STRICT refuses
//! plaintext, PERMISSIVE tells mTLS from plaintext by the ClientHello), then through the
//! workload's AuthorizationPolicies as a TCP connection (Istio's rules for TCP: ALLOW rules
//! that need HTTP attributes never match, DENY rules are checked without them): a denied
//! connection is closed before anything reaches the app, as Envoy's network RBAC filter
//! closes it. An allowed one is joined to a fresh connection to the app, bytes copied both
//! ways with half-close kept (one side's FIN is passed on while the other keeps sending).
//!
//! On drain the listener stops accepting and open connections get the drain deadline to
//! finish, then are cut.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use mesh_core::Identity;
use mesh_telemetry::metrics::{Reporter, SecurityPolicy, TcpConnection, TcpMetrics};
use mesh_tls::authz::AuthorizationPolicies;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::server::{InboundTls, Secured, secure};
use crate::upstream::DEFAULT_CONNECT_TIMEOUT;

/// What an opaque-TCP inbound listener forwards to, and under which policies.
#[derive(Debug)]
pub struct InboundTcp {
    pub app: SocketAddr,
    pub tls: Arc<InboundTls>,
    pub authz: Arc<ArcSwap<AuthorizationPolicies>>,
    /// `istio_tcp_*` with `reporter="destination"`.
    pub metrics: TcpMetrics,
}

/// Serves `listener` until `shutdown` turns true, then lets connections finish for at most
/// `drain_timeout`.
pub async fn serve(
    listener: TcpListener,
    inbound: Arc<InboundTcp>,
    options: crate::server::ListenerOptions,
    shutdown: watch::Receiver<bool>,
    drain_timeout: Duration,
) {
    serve_connections(
        "inbound",
        listener,
        options,
        move |stream, remote| {
            let local = stream.local_addr().unwrap_or(remote);
            connection(stream, remote, local, inbound.clone())
        },
        shutdown,
        drain_timeout,
    )
    .await
}

/// The accept loop of an opaque-TCP listener: each connection runs `handle` in a task the
/// loop owns, until `shutdown` turns true; then open connections get `drain_timeout` to end
/// before they are cut.
pub(crate) async fn serve_connections<F, Fut>(
    name: &'static str,
    listener: TcpListener,
    options: crate::server::ListenerOptions,
    handle: F,
    mut shutdown: watch::Receiver<bool>,
    drain_timeout: Duration,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    let _ = stream.set_nodelay(true);
                    let counted = options.opened(name);
                    let conn = handle(stream, remote);
                    conns.spawn(async move {
                        conn.await;
                        drop(counted);
                    });
                }
                Err(e) => {
                    // Usually EMFILE: back off briefly rather than spin.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            // Reap finished connections so the set stays as large as what is open.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = async { shutdown.wait_for(|stop| *stop).await.is_ok() } => break,
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(drain_timeout, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            listener = name,
            open = conns.len(),
            "drain deadline passed: closing TCP connections"
        );
        conns.abort_all();
    }
}

async fn connection(
    stream: TcpStream,
    remote: SocketAddr,
    local: SocketAddr,
    inbound: Arc<InboundTcp>,
) {
    match secure(stream, remote, &inbound.tls).await {
        Some(Secured::Plain(client)) => forward(client, None, remote, local, &inbound).await,
        Some(Secured::Tls(client, peer)) => {
            forward(*client, Some(peer), remote, local, &inbound).await
        }
        None => {}
    }
}

/// Opaque TCP from a secured client (`peer` when it proved an identity over mTLS) to the
/// app: authorization as a TCP connection, then a byte copy with half-close, counted.
pub(crate) async fn forward<C>(
    client: C,
    peer: Option<Identity>,
    remote: SocketAddr,
    local: SocketAddr,
    inbound: &InboundTcp,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    if !allowed(inbound, peer.as_ref(), remote, local) {
        return;
    }
    let mut conn = TcpConnection::new(Reporter::Destination);
    conn.security = if peer.is_some() {
        SecurityPolicy::MutualTls
    } else {
        SecurityPolicy::None
    };
    conn.peer = peer;
    let mut metrics = inbound.metrics.connection(conn);
    metrics.opened();
    let app = match tokio::time::timeout(DEFAULT_CONNECT_TIMEOUT, TcpStream::connect(inbound.app))
        .await
    {
        Ok(Ok(app)) => app,
        Ok(Err(e)) => {
            tracing::info!(%remote, app = %inbound.app, error = %e, "cannot connect to the app");
            return;
        }
        Err(_) => {
            tracing::info!(%remote, app = %inbound.app, "connecting to the app timed out");
            return;
        }
    };
    let _ = app.set_nodelay(true);
    let copied = copy(client, app, remote).await;
    if let Some((received, sent)) = copied {
        metrics.add_received(received);
        metrics.add_sent(sent);
    }
    metrics.closed();
}

/// The TCP authorization decision; the policies name the workload's (app's) port.
fn allowed(
    inbound: &InboundTcp,
    peer: Option<&Identity>,
    remote: SocketAddr,
    local: SocketAddr,
) -> bool {
    let policies = inbound.authz.load();
    if policies.is_empty() {
        return true;
    }
    let decision = policies.check_connection(peer, remote.ip(), local.ip(), inbound.app.port());
    if !decision.allowed {
        tracing::debug!(
            %remote,
            peer = peer.map(Identity::as_str).unwrap_or("none"),
            policy = decision.policy.as_deref().unwrap_or("none"),
            "RBAC: connection denied"
        );
    }
    decision.allowed
}

/// Copies both ways until both sides have closed; a FIN from one side is passed on as a
/// write shutdown to the other (half-close).
/// Copies both ways until both sides closed; the bytes client → app and app → client, when
/// the copy ended cleanly (tokio's copy does not report counts on error).
pub(crate) async fn copy<C, A>(mut client: C, mut app: A, remote: SocketAddr) -> Option<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin,
    A: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional(&mut client, &mut app).await {
        Ok((up, down)) => {
            tracing::trace!(%remote, up, down, "TCP connection closed");
            Some((up, down))
        }
        Err(e) => {
            tracing::debug!(%remote, error = %e, "TCP connection ended with an error");
            None
        }
    }
}
