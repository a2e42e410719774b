//! Which endpoints earlier attempts of a request went to, so a retry can go elsewhere.
//!
//! Istio configures Envoy's `previous_hosts` retry predicate by default: a retry prefers an
//! endpoint the request has not tried (the balancer re-picks up to
//! `host_selection_retry_max_attempts`, 5, times). The endpoint is chosen below the retry
//! layer, by the balancer, so the three parties share one [`PreviousAttempts`] that travels in
//! each attempt's request extensions:
//!
//! ```text
//! Retry           inserts PreviousAttempts (one shared list per request) into every attempt
//! balancer        reads it: picks among endpoints not in it while any remain healthy;
//!                 sets UpstreamTarget as always
//! RecordEndpoint  records UpstreamTarget.addr into it (or the balancer calls `record`)
//! Upstream
//! ```
//!
//! ```
//! use std::net::SocketAddr;
//! use mesh_core::target::UpstreamTarget;
//! use mesh_resilience::previous::{PreviousAttempts, RecordEndpointLayer};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let upstream = service_fn(|_req: http::Request<()>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(()))
//! });
//! let svc = RecordEndpointLayer.layer(upstream);
//!
//! let tried = PreviousAttempts::default();
//! let addr: SocketAddr = "10.0.0.7:9080".parse().unwrap();
//! let mut req = http::Request::new(());
//! req.extensions_mut().insert(tried.clone());
//! // What the balancer sets.
//! req.extensions_mut().insert(UpstreamTarget::new(addr, false, "reviews:9080".into()));
//! svc.oneshot(req).await.unwrap();
//! assert!(tried.contains(addr));
//! # }
//! ```
//!
//! # Choices
//!
//! - A shared list rather than a value copied into the next attempt: the balancer writes
//!   `UpstreamTarget` into a request the retry layer has handed away, so the fact has to come
//!   back through something both hold.
//! - Balancers with consistent hashing (ring hash, Maglev) should ignore the list: Istio
//!   leaves the predicate out for them, so retries stick to the hashed endpoint.
//! - The retry layer inserts it only when the request can be retried, so requests on routes
//!   without retries pay nothing.

use std::task::{Context, Poll};

use http::Request;
use mesh_core::target::UpstreamTarget;

pub use mesh_core::target::PreviousAttempts;

/// Records each request's [`UpstreamTarget`] into its [`PreviousAttempts`]; place it right
/// below the balancer. Requests without either pass untouched.
#[derive(Clone, Copy, Debug, Default)]
pub struct RecordEndpointLayer;

impl<S> tower::Layer<S> for RecordEndpointLayer {
    type Service = RecordEndpoint<S>;
    fn layer(&self, inner: S) -> RecordEndpoint<S> {
        RecordEndpoint { inner }
    }
}

/// The service made by [`RecordEndpointLayer`].
#[derive(Clone, Debug)]
pub struct RecordEndpoint<S> {
    inner: S,
}

impl<S, B> tower::Service<Request<B>> for RecordEndpoint<S>
where
    S: tower::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> S::Future {
        let ext = req.extensions();
        if let (Some(tried), Some(target)) =
            (ext.get::<PreviousAttempts>(), ext.get::<UpstreamTarget>())
        {
            tried.record(target.addr);
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[test]
    fn records_each_address_once_in_order() {
        let tried = PreviousAttempts::default();
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        assert!(!tried.contains(a));
        tried.record(a);
        tried.clone().record(b);
        tried.record(a);
        assert_eq!(tried.addrs(), [a, b]);
        assert!(tried.contains(b));
    }
}
