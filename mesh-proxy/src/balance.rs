//! Round robin over a service's live endpoint set.
//!
//! The foundation's balancer; the load-balancing issue replaces it with the DestinationRule
//! policies. Each service port gets one [`RoundRobin`] state, created on its first request,
//! holding a discovery watch: picking reads the current set (an `Arc` clone) and advances an
//! atomic counter. Endpoint changes published by discovery apply to the next pick; requests
//! in flight keep the endpoint they were given.

use std::collections::HashMap;
use std::future::Ready;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use futures::future::Either;
use http::{Request, Version};
use mesh_core::ProxyError;
use mesh_core::body::BoxError;
use mesh_core::discovery::{Discover, EndpointWatch, ServiceKey};

use crate::outbound::Destination;
use crate::upstream::UpstreamTarget;

/// Round-robins requests over the endpoints of their [`Destination`].
#[derive(Clone)]
pub struct RoundRobinLayer {
    discovery: Arc<dyn Discover>,
    states: Arc<RwLock<HashMap<ServiceKey, Arc<ServiceState>>>>,
}

impl std::fmt::Debug for RoundRobinLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoundRobinLayer").finish_non_exhaustive()
    }
}

impl RoundRobinLayer {
    pub fn new(discovery: Arc<dyn Discover>) -> Self {
        RoundRobinLayer {
            discovery,
            states: Arc::default(),
        }
    }
}

impl<S> tower::Layer<S> for RoundRobinLayer {
    type Service = RoundRobin<S>;
    fn layer(&self, inner: S) -> RoundRobin<S> {
        RoundRobin {
            layer: self.clone(),
            inner,
        }
    }
}

struct ServiceState {
    endpoints: EndpointWatch,
    next: AtomicUsize,
    /// `host:port`, for error messages and upstream targets, formatted once.
    name: Arc<str>,
}

/// The service made by [`RoundRobinLayer`].
#[derive(Clone, Debug)]
pub struct RoundRobin<S> {
    layer: RoundRobinLayer,
    inner: S,
}

impl<S, B> tower::Service<Request<B>> for RoundRobin<S>
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
        match self.pick(&req) {
            Ok(target) => {
                req.extensions_mut().insert(target);
                Either::Right(self.inner.call(req))
            }
            Err(e) => Either::Left(std::future::ready(Err(e.into()))),
        }
    }
}

impl<S> RoundRobin<S> {
    fn state(&self, dest: &Destination) -> Arc<ServiceState> {
        let key = ServiceKey::new(dest.service.host.clone(), dest.service.number);
        if let Some(state) = self
            .layer
            .states
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return state.clone();
        }
        let mut states = self.layer.states.write().unwrap_or_else(|p| p.into_inner());
        states
            .entry(key)
            .or_insert_with_key(|key| {
                Arc::new(ServiceState {
                    endpoints: self.layer.discovery.watch(key),
                    next: AtomicUsize::new(0),
                    name: key.to_string().into(),
                })
            })
            .clone()
    }

    fn pick<B>(&self, req: &Request<B>) -> Result<UpstreamTarget, ProxyError> {
        let Some(dest) = req.extensions().get::<Destination>() else {
            return Err(ProxyError::no_route("(unresolved)"));
        };
        let state = self.state(dest);
        let set = state.endpoints.borrow().clone();
        if set.is_empty() {
            return Err(ProxyError::no_healthy_upstream(&state.name));
        }
        let i = state.next.fetch_add(1, Ordering::Relaxed) % set.len();
        let endpoint = &set.endpoints()[i];
        Ok(UpstreamTarget {
            addr: endpoint.address,
            // An HTTP/2 or gRPC port, or a client that already speaks HTTP/2, gets HTTP/2.
            http2: dest.service.protocol.is_http2() || req.version() == Version::HTTP_2,
            service: state.name.clone(),
        })
    }
}
