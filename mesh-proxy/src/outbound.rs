//! The outbound stack: the local app calls another service through this proxy.
//!
//! ```text
//! LocalReply → ProxyHeaders → ResolveService → RoundRobin → Upstream
//! ```
//!
//! [`ResolveService`] finds the service the client asked for, by the request's authority
//! (absolute-form URI or HTTP/2 `:authority`, else `Host`; no port means 80), in the
//! current config snapshot, and attaches it as a [`Destination`]. An unknown host answers
//! 404 `NR`. The routing issue puts `VirtualService` routing here; balancing policies replace
//! [`RoundRobin`](crate::balance::RoundRobin).

use std::future::Ready;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures::future::Either;
use http::Request;
use mesh_core::ProxyError;
use mesh_core::body::BoxError;
use mesh_core::config::{MeshConfig, ServicePort};
use mesh_core::host::split_authority;

/// The service a request is for, chosen by [`ResolveService`].
#[derive(Clone, Debug)]
pub struct Destination {
    pub service: Arc<ServicePort>,
}

/// Resolves the request's authority to a service; see the module docs.
#[derive(Clone, Debug)]
pub struct ResolveServiceLayer {
    config: Arc<ArcSwap<MeshConfig>>,
}

impl ResolveServiceLayer {
    /// Reads the config through `config`, so a swapped snapshot applies to the next request.
    pub fn new(config: Arc<ArcSwap<MeshConfig>>) -> Self {
        ResolveServiceLayer { config }
    }
}

impl<S> tower::Layer<S> for ResolveServiceLayer {
    type Service = ResolveService<S>;
    fn layer(&self, inner: S) -> ResolveService<S> {
        ResolveService {
            config: self.config.clone(),
            inner,
        }
    }
}

/// The service made by [`ResolveServiceLayer`].
#[derive(Clone, Debug)]
pub struct ResolveService<S> {
    config: Arc<ArcSwap<MeshConfig>>,
    inner: S,
}

impl<S, B> tower::Service<Request<B>> for ResolveService<S>
where
    S: tower::Service<Request<B>, Error = BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Either<Ready<Result<S::Response, BoxError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        match self.resolve(&req) {
            Ok(service) => {
                req.extensions_mut().insert(Destination { service });
                Either::Right(self.inner.call(req))
            }
            Err(e) => Either::Left(std::future::ready(Err(e.into()))),
        }
    }
}

impl<S> ResolveService<S> {
    fn resolve<B>(&self, req: &Request<B>) -> Result<Arc<ServicePort>, ProxyError> {
        let authority = match req.uri().authority() {
            Some(a) => a.as_str(),
            None => req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or(""),
        };
        let (host, port) =
            split_authority(authority).ok_or_else(|| ProxyError::no_route(authority))?;
        // Clients send lower-case hosts almost always; only the rare other case allocates.
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        let config = self.config.load();
        config
            .services()
            .lookup(host, port)
            .cloned()
            .ok_or_else(|| ProxyError::no_route(authority))
    }
}
