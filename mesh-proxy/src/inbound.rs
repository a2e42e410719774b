//! The inbound stack: peers call this workload, and the proxy hands requests to the local app.
//!
//! ```text
//! LocalReply → ProxyHeaders → RateLimit (Bootstrap `rateLimit`) → ForwardToApp
//!   → Upstream (127.0.0.1:APP_PORT)
//! ```
//!
//! mesh-tls adds TLS termination below the HTTP server and authorization above
//! `ForwardToApp`; telemetry adds its layers after `LocalReply`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Version};
use mesh_core::config::bootstrap::RateLimitSettings;
use mesh_resilience::rate_limit::RateLimitLayer;
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use crate::headers::ProxyHeadersLayer;
use crate::local_reply::LocalReplyLayer;
use crate::server::HttpService;
use crate::upstream::{Upstream, UpstreamTarget};

/// Builds the inbound stack: every request goes to the local app at `app`, within the
/// Bootstrap's `rateLimit` when it sets one (429 `RL` past it).
pub fn stack(
    app: SocketAddr,
    protocol: AppProtocol,
    rate_limit: Option<&RateLimitSettings>,
    upstream: Upstream,
) -> HttpService {
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(LocalReplyLayer)
            .layer(ProxyHeadersLayer)
            // Built once per listener: every connection's service shares the same buckets.
            .option_layer(rate_limit.map(RateLimitLayer::new))
            .layer(ForwardToAppLayer::new(app, protocol))
            .service(upstream),
    )
}

/// Which HTTP version the proxy speaks to the local app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AppProtocol {
    /// The version the client used (Envoy's `useClientProtocol`).
    #[default]
    Auto,
    /// Always HTTP/1.1.
    Http1,
    /// Always HTTP/2 with prior knowledge (gRPC apps).
    Http2,
}

/// Sends every request to the local app.
#[derive(Clone, Debug)]
pub struct ForwardToAppLayer {
    app: SocketAddr,
    protocol: AppProtocol,
    name: Arc<str>,
}

impl ForwardToAppLayer {
    pub fn new(app: SocketAddr, protocol: AppProtocol) -> Self {
        ForwardToAppLayer {
            app,
            protocol,
            name: format!("inbound app {app}").into(),
        }
    }
}

impl<S> tower::Layer<S> for ForwardToAppLayer {
    type Service = ForwardToApp<S>;
    fn layer(&self, inner: S) -> ForwardToApp<S> {
        ForwardToApp {
            layer: self.clone(),
            inner,
        }
    }
}

/// The service made by [`ForwardToAppLayer`].
#[derive(Clone, Debug)]
pub struct ForwardToApp<S> {
    layer: ForwardToAppLayer,
    inner: S,
}

impl<S, B> tower::Service<Request<B>> for ForwardToApp<S>
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
        let http2 = match self.layer.protocol {
            AppProtocol::Auto => req.version() == Version::HTTP_2,
            AppProtocol::Http1 => false,
            AppProtocol::Http2 => true,
        };
        req.extensions_mut().insert(UpstreamTarget {
            addr: self.layer.app,
            http2,
            service: self.layer.name.clone(),
        });
        self.inner.call(req)
    }
}
