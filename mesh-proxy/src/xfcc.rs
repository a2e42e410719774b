//! `x-forwarded-client-cert` toward the local app: who called, as the mTLS handshake proved.
//!
//! Istio's sidecars run Envoy with `forward_client_cert_details: SANITIZE_SET` on inbound:
//! whatever XFCC a client sent is dropped (a client could otherwise claim any identity), and
//! when the connection was mutual TLS the proxy sets its own,
//! `By=<this workload's SPIFFE ID>;URI=<the peer's SPIFFE ID>`. A plaintext request reaches
//! the app with no XFCC at all.
//!
//! ```
//! use mesh_core::Identity;
//! use mesh_core::body::{self, BoxBody, BoxError};
//! use mesh_proxy::xfcc::ForwardClientCertLayer;
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let app = service_fn(|req: http::Request<BoxBody>| async move {
//!     let xfcc = req.headers().get("x-forwarded-client-cert").cloned();
//!     Ok::<_, BoxError>(http::Response::new(xfcc))
//! });
//! let own = Identity::parse("spiffe://cluster.local/ns/default/sa/reviews").unwrap();
//! let svc = ForwardClientCertLayer::new(Some(own)).layer(app);
//!
//! // A forged header from a plaintext client is dropped.
//! let mut req = http::Request::new(body::empty());
//! req.headers_mut().insert("x-forwarded-client-cert", "URI=spiffe://evil".parse().unwrap());
//! assert_eq!(svc.clone().oneshot(req).await.unwrap().into_body(), None);
//!
//! // After an mTLS handshake, the verified peer is named.
//! let mut req = http::Request::new(body::empty());
//! req.extensions_mut()
//!     .insert(Identity::parse("spiffe://cluster.local/ns/default/sa/productpage").unwrap());
//! let xfcc = svc.oneshot(req).await.unwrap().into_body().unwrap();
//! assert_eq!(
//!     xfcc,
//!     "By=spiffe://cluster.local/ns/default/sa/reviews;\
//!      URI=spiffe://cluster.local/ns/default/sa/productpage"
//! );
//! # }
//! ```

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderName, HeaderValue, Request};
use mesh_core::Identity;

/// The header's name.
pub const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Sanitizes and sets `x-forwarded-client-cert`; see the module docs.
#[derive(Clone, Debug)]
pub struct ForwardClientCertLayer {
    /// `By=<own ID>;` formatted once; `None` when this proxy has no identity (then no
    /// request can carry a verified peer either).
    by: Option<Arc<str>>,
}

impl ForwardClientCertLayer {
    /// `own`: this workload's identity, named in `By=`.
    pub fn new(own: Option<Identity>) -> Self {
        ForwardClientCertLayer {
            by: own.map(|id| format!("By={id};URI=").into()),
        }
    }
}

impl<S> tower::Layer<S> for ForwardClientCertLayer {
    type Service = ForwardClientCert<S>;
    fn layer(&self, inner: S) -> ForwardClientCert<S> {
        ForwardClientCert {
            by: self.by.clone(),
            inner,
        }
    }
}

/// The service made by [`ForwardClientCertLayer`].
#[derive(Clone, Debug)]
pub struct ForwardClientCert<S> {
    by: Option<Arc<str>>,
    inner: S,
}

impl<S, B> tower::Service<Request<B>> for ForwardClientCert<S>
where
    S: tower::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        req.headers_mut().remove(XFCC);
        let peer = req.extensions().get::<Identity>();
        if let (Some(by), Some(peer)) = (&self.by, peer) {
            // SPIFFE IDs are validated URIs: always a valid header value.
            if let Ok(value) = HeaderValue::from_str(&format!("{by}{peer}")) {
                req.headers_mut().insert(XFCC, value);
            }
        }
        self.inner.call(req)
    }
}
