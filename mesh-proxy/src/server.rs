//! Accepting connections and serving HTTP/1.1 and HTTP/2 on them.
//!
//! One socket serves both versions: hyper-util's `auto` builder reads the HTTP/2 preface and
//! falls back to HTTP/1.1. Each connection is watched for graceful shutdown: on drain the
//! accept loop stops, idle HTTP/1.1 connections close, HTTP/2 connections get a GOAWAY, and
//! requests in flight run to completion or until the drain deadline.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use mesh_core::body::{self, BoxBody};
use mesh_core::conn::ClientInfo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

/// A whole stack, type-erased: what a listener serves.
pub type HttpService = BoxCloneSyncService<Request<BoxBody>, Response<BoxBody>, Infallible>;

/// Serves `service` on `listener` until `shutdown` turns true, then drains for at most
/// `drain_timeout`.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    service: HttpService,
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
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();

    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    let _ = stream.set_nodelay(true);
                    let svc = connection_service(service.clone(), remote, local);
                    let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(listener = name, %remote, error = %e, "connection ended with an error");
                        }
                    });
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

/// The hyper service of one connection: boxes the body and tags the request with the
/// connection it came on.
fn connection_service(
    service: HttpService,
    remote: SocketAddr,
    local: SocketAddr,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<BoxBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<BoxBody>, Infallible>> + Send,
> + Clone {
    let info = ClientInfo {
        remote,
        local,
        tls: false,
    };
    hyper::service::service_fn(move |req: Request<Incoming>| {
        let mut req = req.map(body::boxed);
        req.extensions_mut().insert(info.clone());
        service.clone().oneshot(req)
    })
}
