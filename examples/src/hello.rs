//! A tiny HTTP app for the demos: answers every request with a greeting, and `/headers` with
//! the request headers it received (so the sidecar's work is visible).

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use mesh_core::body::{self, BoxBody};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Binds `addr` and serves the app until the returned task is aborted.
pub async fn serve(addr: SocketAddr, name: &'static str) -> std::io::Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let svc = hyper::service::service_fn(move |req| handle(name, req));
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }))
}

async fn handle(
    name: &'static str,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, Infallible> {
    let text = if req.uri().path() == "/headers" {
        let mut out = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
        for (k, v) in req.headers() {
            let _ = writeln!(out, "{k}: {}", v.to_str().unwrap_or("<binary>"));
        }
        out
    } else {
        format!("hello from {name}\n")
    };
    Ok(Response::new(body::full(text)))
}
