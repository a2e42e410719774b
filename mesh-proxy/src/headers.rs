//! Proxy header hygiene, as every HTTP proxy owes its neighbours.
//!
//! On the request: hop-by-hop headers (RFC 9110 §7.6.1: `Connection` and every header it
//! names, `Keep-Alive`, `Proxy-Connection`, `Proxy-Authorization`, `TE` other than
//! `trailers`, `Trailer`, `Transfer-Encoding`, `Upgrade`) are removed; the client's address
//! is appended to `x-forwarded-for`; `x-forwarded-proto` is set when absent; `x-request-id` is
//! generated when absent (Envoy's habit, so logs and traces across hops share an id). On the
//! response the hop-by-hop headers are removed too.
//!
//! `TE: trailers` survives because gRPC requires it end to end.
//!
//! Upgrades are the exception Envoy makes: an HTTP/1.1 request asking to switch protocols
//! (`Connection: upgrade` and an `Upgrade` other than `h2c`; see [`crate::upgrade`]) keeps
//! `Upgrade` and `Connection: upgrade` (the other headers `Connection` names still go), and so
//! does a `101 Switching Protocols` response, so the upgrade reaches the endpoint and its
//! acceptance reaches the client. `Upgrade: h2c` is stripped like any hop-by-hop header.
//!
//! ```
//! use mesh_proxy::headers::ProxyHeadersLayer;
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let svc = ProxyHeadersLayer.layer(service_fn(|req: http::Request<()>| async move {
//!     assert!(req.headers().contains_key("x-request-id"));
//!     assert!(!req.headers().contains_key("keep-alive"));
//!     Ok::<_, std::convert::Infallible>(http::Response::new(()))
//! }));
//! let req = http::Request::builder().header("keep-alive", "timeout=5").body(()).unwrap();
//! svc.oneshot(req).await.unwrap();
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response};
use mesh_core::conn::ClientInfo;
use pin_project_lite::pin_project;

/// The `x-request-id` header.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The `x-forwarded-for` header.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// The `x-forwarded-proto` header.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Applies proxy header hygiene; see the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProxyHeadersLayer;

impl<S> tower::Layer<S> for ProxyHeadersLayer {
    type Service = ProxyHeaders<S>;
    fn layer(&self, inner: S) -> ProxyHeaders<S> {
        ProxyHeaders { inner }
    }
}

/// The service made by [`ProxyHeadersLayer`].
#[derive(Clone, Debug)]
pub struct ProxyHeaders<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<Request<B>> for ProxyHeaders<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let client = req.extensions().get::<ClientInfo>().cloned();
        let upgrade = crate::upgrade::is_upgrade_request(&req)
            .then(|| req.headers().get(header::UPGRADE).cloned())
            .flatten();
        let headers = req.headers_mut();
        remove_hop_by_hop(headers, true);
        if let Some(protocol) = upgrade {
            headers.insert(header::UPGRADE, protocol);
            headers.insert(header::CONNECTION, crate::upgrade::CONNECTION_UPGRADE);
        }
        if let Some(client) = &client {
            append_forwarded_for(headers, client.remote.ip());
        }
        if !headers.contains_key(X_FORWARDED_PROTO) {
            let proto = if client.is_some_and(|c| c.tls) {
                "https"
            } else {
                "http"
            };
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        }
        if !headers.contains_key(X_REQUEST_ID) {
            headers.insert(X_REQUEST_ID, new_request_id());
        }
        ResponseFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// Strips hop-by-hop headers from the response.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = Result<Response<RB>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut response = std::task::ready!(self.project().inner.poll(cx))?;
        let upgrade = (response.status() == http::StatusCode::SWITCHING_PROTOCOLS)
            .then(|| response.headers().get(header::UPGRADE).cloned())
            .flatten();
        let headers = response.headers_mut();
        remove_hop_by_hop(headers, false);
        if let Some(protocol) = upgrade {
            headers.insert(header::UPGRADE, protocol);
            headers.insert(header::CONNECTION, crate::upgrade::CONNECTION_UPGRADE);
        }
        Poll::Ready(Ok(response))
    }
}

/// Removes the headers that describe one connection rather than the message.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, request: bool) {
    // Headers named by `Connection` are hop-by-hop too. Collected first: the map cannot be
    // changed while the `Connection` values are borrowed. Rare, so the allocation is fine.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| *name != header::TE)
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    if request {
        headers.remove(header::PROXY_AUTHORIZATION);
        let keep_te = headers.get_all(header::TE).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        });
        headers.remove(header::TE);
        if keep_te {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    } else {
        headers.remove(header::PROXY_AUTHENTICATE);
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, ip: std::net::IpAddr) {
    let value = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => format!("{prior}, {ip}"),
        _ => ip.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

fn new_request_id() -> HeaderValue {
    let mut buf = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    // A UUID's text is always a valid header value.
    HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, ServiceExt, service_fn};

    #[tokio::test]
    async fn cleans_request_and_response() {
        let svc = ProxyHeadersLayer.layer(service_fn(|req: Request<()>| async move {
            let h = req.headers();
            assert!(h.get("connection").is_none());
            assert!(h.get("x-secret-hop").is_none(), "named by Connection");
            assert!(h.get("keep-alive").is_none());
            assert!(h.get("upgrade").is_none());
            assert_eq!(h["te"], "trailers");
            assert_eq!(h["x-forwarded-for"], "10.0.0.9, 127.0.0.1");
            assert_eq!(h["x-forwarded-proto"], "http");
            assert_eq!(h["x-request-id"], "abc");
            assert_eq!(h["x-kept"], "yes");
            let resp = Response::builder()
                .header("connection", "close")
                .header("keep-alive", "timeout=5")
                .header("x-app", "1")
                .body(())
                .unwrap();
            Ok::<_, std::convert::Infallible>(resp)
        }));
        let mut req = Request::builder()
            .header("connection", "keep-alive, x-secret-hop")
            .header("x-secret-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("upgrade", "h2c")
            .header("te", "trailers, deflate")
            .header("x-forwarded-for", "10.0.0.9")
            .header("x-request-id", "abc")
            .header("x-kept", "yes")
            .body(())
            .unwrap();
        req.extensions_mut().insert(ClientInfo {
            remote: "127.0.0.1:5000".parse().unwrap(),
            local: "127.0.0.1:15001".parse().unwrap(),
            tls: false,
        });
        let resp = svc.oneshot(req).await.unwrap();
        assert!(resp.headers().get("connection").is_none());
        assert!(resp.headers().get("keep-alive").is_none());
        assert_eq!(resp.headers()["x-app"], "1");
    }

    #[tokio::test]
    async fn keeps_the_upgrade_headers_of_an_upgrade_and_its_101() {
        let svc = ProxyHeadersLayer.layer(service_fn(|req: Request<()>| async move {
            let h = req.headers();
            assert_eq!(h["upgrade"], "websocket");
            assert_eq!(h["connection"], "upgrade");
            assert!(h.get("keep-alive").is_none());
            assert!(h.get("x-secret-hop").is_none(), "named by Connection");
            assert_eq!(h["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
            let resp = Response::builder()
                .status(101)
                .header("connection", "Upgrade, keep-alive")
                .header("keep-alive", "timeout=5")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
                .body(())
                .unwrap();
            Ok::<_, std::convert::Infallible>(resp)
        }));
        let req = Request::builder()
            .header("connection", "keep-alive, Upgrade, x-secret-hop")
            .header("x-secret-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("upgrade", "websocket")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(())
            .unwrap();
        let resp = svc.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 101);
        assert_eq!(resp.headers()["upgrade"], "websocket");
        assert_eq!(resp.headers()["connection"], "upgrade");
        assert!(resp.headers().get("keep-alive").is_none());
        assert_eq!(
            resp.headers()["sec-websocket-accept"],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[tokio::test]
    async fn strips_upgrade_from_an_h2c_request_and_an_ordinary_response() {
        let svc = ProxyHeadersLayer.layer(service_fn(|req: Request<()>| async move {
            assert!(req.headers().get("upgrade").is_none());
            assert!(req.headers().get("connection").is_none());
            assert!(req.headers().get("http2-settings").is_none());
            let resp = Response::builder()
                .header("upgrade", "websocket")
                .header("connection", "upgrade")
                .body(())
                .unwrap();
            Ok::<_, std::convert::Infallible>(resp)
        }));
        let req = Request::builder()
            .header("connection", "Upgrade, HTTP2-Settings")
            .header("upgrade", "h2c")
            .header("http2-settings", "AAMAAABkAAQAAP__")
            .body(())
            .unwrap();
        let resp = svc.oneshot(req).await.unwrap();
        assert!(resp.headers().get("upgrade").is_none());
        assert!(resp.headers().get("connection").is_none());
    }

    #[tokio::test]
    async fn generates_a_request_id_when_absent() {
        let svc = ProxyHeadersLayer.layer(service_fn(|req: Request<()>| async move {
            let id = req.headers()["x-request-id"].to_str().unwrap().to_owned();
            assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 4);
            assert!(req.headers().get("te").is_none());
            Ok::<_, std::convert::Infallible>(Response::new(()))
        }));
        svc.oneshot(Request::new(())).await.unwrap();
    }
}
