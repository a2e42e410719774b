//! The inbound stack: peers call this workload, and the proxy hands requests to the local app.
//!
//! ```text
//! (mTLS per PeerAuthentication, in the listener) →
//! LocalReply → ProxyHeaders → Authz (AuthorizationPolicy; 403) → RateLimit (Bootstrap
//!   `rateLimit`) → ForwardClientCert (XFCC) → ForwardToApp → Upstream (127.0.0.1:APP_PORT)
//! ```
//!
//! Telemetry adds its layers after `LocalReply`.
//!
//! A request a peer sidecar upgraded to HTTP/2 (`h2UpgradePolicy: UPGRADE`) carries
//! `x-mesh-orig-proto`; [`ForwardToApp`] removes it and speaks that version (HTTP/1.1) to
//! the app instead of following the HTTP/2 it arrived in.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Version};
use mesh_core::config::bootstrap::RateLimitSettings;
use mesh_resilience::rate_limit::RateLimitLayer;
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use arc_swap::ArcSwap;
use mesh_core::Identity;
use mesh_core::target::ORIG_PROTO_HEADER;
use mesh_tls::authz::{AuthorizationPolicies, AuthzLayer};

use crate::headers::ProxyHeadersLayer;
use crate::local_reply::LocalReplyLayer;
use crate::server::HttpService;
use crate::telemetry::Telemetry;
use crate::upstream::{Upstream, UpstreamTarget};
use crate::xfcc::ForwardClientCertLayer;

/// Builds the inbound stack: every request the workload's AuthorizationPolicies allow goes
/// to the local app at `app`, within the Bootstrap's `rateLimit` when it sets one (429 `RL`
/// past it), with `x-forwarded-client-cert` naming the verified caller (`own`: this
/// workload's identity).
pub fn stack(
    app: SocketAddr,
    protocol: AppProtocol,
    rate_limit: Option<&RateLimitSettings>,
    authz: &Arc<ArcSwap<AuthorizationPolicies>>,
    own: Option<Identity>,
    telemetry: &Telemetry,
    upstream: Upstream,
) -> HttpService {
    let app_side = BoxCloneSyncService::new(
        ServiceBuilder::new()
            // Policies name the workload's port (the app's), not the proxy's listener.
            .layer(AuthzLayer::new(authz.clone()).with_destination_port(app.port()))
            // Built once per listener: every connection's service shares the same buckets.
            .option_layer(rate_limit.map(RateLimitLayer::new))
            .layer(ForwardClientCertLayer::new(own))
            .layer(ForwardToAppLayer::new(app, protocol))
            .service(upstream),
    );
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(LocalReplyLayer)
            .layer(ProxyHeadersLayer)
            .service(telemetry.inbound(app_side)),
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
        // A peer sidecar that upgraded an HTTP/1.x request to HTTP/2 says so: the app gets
        // the version its caller spoke.
        let upgraded = req.headers_mut().remove(ORIG_PROTO_HEADER).is_some();
        let http2 = match self.layer.protocol {
            AppProtocol::Auto => req.version() == Version::HTTP_2 && !upgraded,
            AppProtocol::Http1 => false,
            AppProtocol::Http2 => true,
        };
        req.extensions_mut().insert(UpstreamTarget::new(
            self.layer.app,
            http2,
            self.layer.name.clone(),
        ));
        self.inner.call(req)
    }
}
