//! Request timeouts and retries for the mesh, as tower layers, with Istio's semantics and
//! defaults.
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::time::Duration;
//! use mesh_core::body::{self, BoxBody, BoxError};
//! use mesh_core::{ProxyError, ResponseFlags};
//! use mesh_resilience::{RequestTimeoutLayer, RetryBudget, RetryLayer};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! // An endpoint whose connections are refused twice, then answers.
//! let calls = Arc::new(AtomicUsize::new(0));
//! let seen = calls.clone();
//! let endpoint = service_fn(move |_req: http::Request<BoxBody>| {
//!     let n = seen.fetch_add(1, Ordering::SeqCst);
//!     async move {
//!         if n < 2 {
//!             let e = ProxyError::connect_failed("reviews:9080", "10.0.0.7:9080", "refused");
//!             return Err::<http::Response<BoxBody>, BoxError>(e.into());
//!         }
//!         Ok(http::Response::new(body::full("ok")))
//!     }
//! });
//!
//! let svc = ServiceBuilder::new()
//!     .layer(RequestTimeoutLayer) // the route timeout, over every attempt
//!     .layer(RetryLayer::new(Arc::new(RetryBudget::default())))
//!     .service(endpoint);
//!
//! let mut req = http::Request::new(body::empty());
//! # let target = mesh_resilience::doc_support::route_target("reviews:9080");
//! // Routing inserts the route's target: Istio's default retry policy, a 2 s timeout.
//! req.extensions_mut().insert(mesh_core::target::RouteTarget {
//!     timeout: Some(Duration::from_secs(2)),
//!     ..target
//! });
//! let resp = svc.clone().oneshot(req).await.unwrap();
//! assert_eq!(resp.status(), 200);
//! assert_eq!(calls.load(Ordering::SeqCst), 3); // 1 + the default 2 retries
//!
//! // With every attempt refused, the failure carries URX beside UF.
//! calls.store(0, Ordering::SeqCst);
//! let seen = calls.clone();
//! let down = service_fn(move |_req: http::Request<BoxBody>| {
//!     seen.fetch_add(1, Ordering::SeqCst);
//!     async {
//!         let e = ProxyError::connect_failed("reviews:9080", "10.0.0.7:9080", "refused");
//!         Err::<http::Response<BoxBody>, BoxError>(e.into())
//!     }
//! });
//! let svc = ServiceBuilder::new()
//!     .layer(RequestTimeoutLayer)
//!     .layer(RetryLayer::new(Arc::new(RetryBudget::default())))
//!     .service(down);
//! let mut req = http::Request::new(body::empty());
//! req.extensions_mut().insert(mesh_resilience::doc_support::route_target("reviews:9080"));
//! let err = svc.oneshot(req).await.unwrap_err();
//! let err = ProxyError::find(&err).unwrap();
//! assert_eq!(err.flags().to_string(), "UF,URX");
//! assert_eq!(err.status(), 503);
//! assert_eq!(calls.load(Ordering::SeqCst), 3);
//! # }
//! ```
//!
//! # Layers and their order
//!
//! In the outbound stack they sit between routing, which inserts the request's
//! [`RouteTarget`](mesh_core::target::RouteTarget) into its extensions, and balancing:
//!
//! ```text
//! RouteLayer → RequestTimeout → Retry → balancer → RecordEndpoint → Upstream
//! ```
//!
//! - [`RequestTimeout`](timeout::RequestTimeout) reads `RouteTarget.timeout`: one deadline
//!   over the whole request, every retry and backoff included; `504 UT` on expiry. It must be
//!   outside `Retry`, or it would bound each attempt instead.
//! - [`Retry`](retry::Retry) reads `RouteTarget.retry`: per-try timeouts, `retryOn`
//!   classification, backoff, the shared [`RetryBudget`], body replay, `URX` when exhausted.
//!   It must be above the balancer so that each attempt is balanced anew, and it puts a
//!   [`PreviousAttempts`] into every attempt for the balancer to
//!   avoid endpoints already tried.
//! - [`RecordEndpoint`](previous::RecordEndpoint), right below the balancer, records the
//!   balancer's `UpstreamTarget` into that list (unneeded if the balancer records it itself).
//! - Below them the upstream fails with a boxed [`ProxyError`](mesh_core::ProxyError) (`UF`,
//!   `UC`, `UR`, `UPE`), which is what `Retry` classifies; the outermost `LocalReply` turns the
//!   final error into a response.
//!
//! # Defaults (Istio's, from the route)
//!
//! | setting | default |
//! |---|---|
//! | route `timeout` | none |
//! | `retries.attempts` | 2 (0 disables) |
//! | `retries.retryOn` | `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes` with 503 |
//! | `retries.perTryTimeout` | none (the route timeout) |
//! | backoff | 25 ms base, 250 ms cap, full jitter |
//! | retry budget | 20 % of requests + 10/s over 10 s ([`RetryBudget::default`]) |
//! | replayable request body | 64 KiB |
//!
//! # Modules
//!
//! - [`timeout`]: the route timeout.
//! - [`retry`]: the retry layer, its classification and backoff.
//! - [`budget`]: the retry budget.
//! - [`replay`]: request bodies that can be sent again.
//! - [`previous`]: the endpoints a request already tried.
//! - [`outlier`]: outlier detection, ejecting endpoints into `mesh_core::health`.
//! - [`rate_limit`]: the inbound local rate limit (Bootstrap `rateLimit`).
//! - [`pool_limits`]: connection-pool limits (`connectionPool`, Envoy's circuit breakers).
#![forbid(unsafe_code)]

pub mod budget;
pub mod outlier;
pub mod pool_limits;
pub mod previous;
pub mod rate_limit;
pub mod replay;
pub mod retry;
pub mod timeout;

pub use budget::RetryBudget;
pub use previous::{PreviousAttempts, RecordEndpointLayer};
pub use retry::RetryLayer;
pub use timeout::RequestTimeoutLayer;

#[doc(hidden)]
pub mod doc_support;

#[cfg(test)]
mod test_support;
