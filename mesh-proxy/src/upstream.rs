//! The upstream client: sends a request to one chosen endpoint over a pooled connection.
//!
//! Why not `hyper_util`'s legacy `Client`: it keys its pool on the request URI's authority,
//! so it could not both honour the balancer's choice of endpoint and keep the caller's
//! `Host`/`:authority` intact. Here each endpoint owns its connections ([`EndpointPool`]),
//! which is also where connection limits, TLS origination and outlier state attach later.
//!
//! - HTTP/1.1: a list of connections per endpoint; a request takes one that is ready (its
//!   previous exchange finished) or dials a new one. A connection that turns out to be closed
//!   before the request was written is replaced and the request sent again, once: nothing
//!   reached the server, so this is safe for any method.
//! - HTTP/2: one multiplexed connection per endpoint, dialled once however many requests
//!   arrive while it connects.
//!
//! The request's target is an [`UpstreamTarget`] in its extensions, set by the balancer.

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
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_core::ProxyError;
use mesh_core::ResponseFlags;
use mesh_core::body::{self, BoxBody, BoxError};
pub use mesh_core::target::UpstreamTarget;
use tokio::net::TcpStream;

/// Istio's MeshConfig `connectTimeout` default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an HTTP/1.1 connection may sit unused in the pool before it is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// An endpoint and whether it is spoken to over HTTP/2.
type PoolKey = (SocketAddr, bool);

/// A cloneable service that forwards each request to its [`UpstreamTarget`].
#[derive(Clone, Debug)]
pub struct Upstream {
    pools: Arc<Mutex<HashMap<PoolKey, Arc<EndpointPool>>>>,
    connect_timeout: Duration,
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
        }
    }

    /// Drains the pools of endpoints for which `keep` says no: their idle connections close
    /// now, busy ones when their exchange ends (the request in flight holds its pool). This
    /// is how a removed endpoint's connections go away, as Envoy drains a removed host's
    /// pools.
    pub fn retain(&self, keep: impl Fn(SocketAddr) -> bool) {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.retain(|(addr, _), _| keep(*addr));
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
        pools.keys().map(|(addr, _)| *addr).collect()
    }

    fn pool(&self, target: &UpstreamTarget) -> Arc<EndpointPool> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools
            .entry((target.addr, target.http2))
            .or_insert_with(|| {
                Arc::new(EndpointPool {
                    addr: target.addr,
                    connect_timeout: self.connect_timeout,
                    h1: Mutex::default(),
                    h2: Mutex::new(H2State::Idle),
                })
            })
            .clone()
    }

    async fn send(self, req: Request<BoxBody>) -> Result<Response<BoxBody>, BoxError> {
        let Some(target) = req.extensions().get::<UpstreamTarget>().cloned() else {
            return Err(ProxyError::new(
                ResponseFlags::NO_CLUSTER_FOUND,
                "internal error: request reached the upstream client without a target",
            )
            .into());
        };
        let pool = self.pool(&target);
        let result = if target.http2 {
            pool.send_h2(&target, req).await
        } else {
            pool.send_h1(&target, req).await
        };
        Ok(result?.map(body::boxed))
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
    connect_timeout: Duration,
    /// HTTP/1.1 connections, busy or idle, with when each was last handed out.
    h1: Mutex<Vec<(http1::SendRequest<BoxBody>, Instant)>>,
    h2: Mutex<H2State>,
}

impl std::fmt::Debug for EndpointPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointPool")
            .field("addr", &self.addr)
            .finish()
    }
}

impl EndpointPool {
    /// Drops closed and long-idle HTTP/1.1 connections.
    fn prune_h1(&self) {
        let mut conns = self.h1.lock().unwrap_or_else(|p| p.into_inner());
        prune(&mut conns);
    }

    /// A ready HTTP/1.1 connection from the pool, pruning closed and long-idle ones.
    fn checkout_h1(&self) -> Option<http1::SendRequest<BoxBody>> {
        let mut conns = self.h1.lock().unwrap_or_else(|p| p.into_inner());
        prune(&mut conns);
        let i = conns.iter().position(|(c, _)| c.is_ready())?;
        Some(conns.swap_remove(i).0)
    }

    fn checkin_h1(&self, conn: http1::SendRequest<BoxBody>) {
        let mut conns = self.h1.lock().unwrap_or_else(|p| p.into_inner());
        conns.push((conn, Instant::now()));
    }

    async fn connect_h1(
        &self,
        target: &UpstreamTarget,
    ) -> Result<http1::SendRequest<BoxBody>, ProxyError> {
        let connect_failed =
            |e: &dyn std::fmt::Display| ProxyError::connect_failed(&target.service, self.addr, e);
        let io = dial(self.addr, self.connect_timeout)
            .await
            .map_err(|e| connect_failed(&e))?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| connect_failed(&e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(sender)
    }

    async fn send_h1(
        &self,
        target: &UpstreamTarget,
        req: Request<BoxBody>,
    ) -> Result<Response<hyper::body::Incoming>, ProxyError> {
        let mut req = to_http1(req);
        // A pooled connection may have been closed by the server since its last use; the
        // request comes back unsent, and goes out once more on a fresh connection.
        let mut fresh_tried = false;
        loop {
            let (mut conn, fresh) = match self.checkout_h1() {
                Some(conn) => (conn, false),
                None => (self.connect_h1(target).await?, true),
            };
            fresh_tried |= fresh;
            // A fresh connection may still be finishing its handshake.
            if conn.ready().await.is_err() {
                if fresh {
                    return Err(ProxyError::connect_failed(
                        &target.service,
                        self.addr,
                        "connection closed during handshake",
                    ));
                }
                continue;
            }
            match conn.try_send_request(req).await {
                Ok(response) => {
                    self.checkin_h1(conn);
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

    async fn h2_sender(
        &self,
        target: &UpstreamTarget,
    ) -> Result<http2::SendRequest<BoxBody>, ProxyError> {
        let connecting = {
            let mut state = self.h2.lock().unwrap_or_else(|p| p.into_inner());
            match &*state {
                H2State::Ready(s) if !s.is_closed() => return Ok(s.clone()),
                H2State::Connecting(fut) => fut.clone(),
                _ => {
                    let addr = self.addr;
                    let timeout = self.connect_timeout;
                    let fut: H2Connect = async move {
                        let io = dial(addr, timeout)
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
                        });
                        Ok(sender)
                    }
                    .boxed()
                    .shared();
                    *state = H2State::Connecting(fut.clone());
                    fut
                }
            }
        };
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
        req: Request<BoxBody>,
    ) -> Result<Response<hyper::body::Incoming>, ProxyError> {
        let req = to_http2(req);
        let mut sender = self.h2_sender(target).await?;
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

/// Keeps the HTTP/1.1 connections that are open and not idle past [`IDLE_TIMEOUT`].
fn prune(conns: &mut Vec<(http1::SendRequest<BoxBody>, Instant)>) {
    let now = Instant::now();
    conns.retain(|(c, used)| {
        let idle_too_long = c.is_ready() && now.duration_since(*used) > IDLE_TIMEOUT;
        !c.is_closed() && !idle_too_long
    });
}

/// Opens a TCP connection to an endpoint, bounded by the connect timeout.
async fn dial(addr: SocketAddr, timeout: Duration) -> std::io::Result<TokioIo<TcpStream>> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect timed out after {timeout:?}"),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(TokioIo::new(stream))
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
        req.extensions_mut().insert(UpstreamTarget {
            addr,
            http2: false,
            service: "svc:80".into(),
        });
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
