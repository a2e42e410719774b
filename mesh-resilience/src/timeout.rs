//! The route's request timeout: one deadline over the whole request, retries included.
//!
//! Istio's `VirtualService` `http[].timeout` (Envoy's route timeout). Routing compiles it into
//! [`RouteTarget::timeout`]; this layer reads it from the request's extensions and fails the
//! request with `504` and response flag `UT` when it expires. Istio's default is no timeout,
//! so a request without a [`RouteTarget`], or whose route sets none, is not bounded here.
//!
//! ```
//! use std::time::Duration;
//! use mesh_core::{ProxyError, ResponseFlags, body::BoxError};
//! use mesh_resilience::timeout::RequestTimeoutLayer;
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let slow = service_fn(|_req: http::Request<()>| async {
//!     tokio::time::sleep(Duration::from_secs(5)).await;
//!     Ok::<_, BoxError>(http::Response::new(()))
//! });
//! let svc = RequestTimeoutLayer.layer(slow);
//! let mut req = http::Request::new(());
//! # let target = mesh_resilience::doc_support::route_target("reviews:9080");
//! // Routing inserted `target` with its `timeout` set to 1 s.
//! req.extensions_mut().insert(mesh_core::target::RouteTarget {
//!     timeout: Some(Duration::from_secs(1)),
//!     ..target
//! });
//! let err = svc.oneshot(req).await.unwrap_err();
//! let err = ProxyError::find(&err).unwrap();
//! assert_eq!(err.flags(), ResponseFlags::UPSTREAM_REQUEST_TIMEOUT);
//! assert_eq!(err.status(), 504);
//! assert_eq!(err.to_string(), "upstream request timeout: reviews:9080 after 1s");
//! # }
//! ```
//!
//! # Choices
//!
//! - It sits outside [`Retry`](crate::retry::Retry), so the one deadline covers every
//!   attempt and every backoff (Envoy's and the Gateway API's rule). Each attempt's own bound,
//!   `perTryTimeout`, is the retry layer's business.
//! - A zero timeout means none, as `timeout: 0s` does in Istio and Envoy.
//! - The deadline starts when the request enters this layer, not when it left the client; the
//!   time spent in the layers above (routing) is negligible next to any real timeout.
//! - The timer is a [`tokio::time::Sleep`] stored in the future, so no allocation; requests
//!   without a timeout carry none.
//! - Dropping the inner future on expiry cancels the attempt in flight; the upstream sees a
//!   reset stream (HTTP/2) or a closed connection (HTTP/1.1), as Envoy's timeout does.
//!
//! [`RouteTarget`]: mesh_core::target::RouteTarget
//! [`RouteTarget::timeout`]: mesh_core::target::RouteTarget

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use mesh_core::body::BoxError;
use mesh_core::target::RouteTarget;
use mesh_core::{ProxyError, ResponseFlags};
use pin_project_lite::pin_project;
use tokio::time::Sleep;

/// Bounds each request by its route's timeout; see the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestTimeoutLayer;

impl<S> tower::Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;
    fn layer(&self, inner: S) -> RequestTimeout<S> {
        RequestTimeout { inner }
    }
}

/// The service made by [`RequestTimeoutLayer`].
#[derive(Clone, Debug)]
pub struct RequestTimeout<S> {
    inner: S,
}

impl<S> RequestTimeout<S> {
    pub fn new(inner: S) -> Self {
        RequestTimeout { inner }
    }
}

impl<S, B, RB> tower::Service<Request<B>> for RequestTimeout<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let deadline = req.extensions().get::<RouteTarget>().and_then(|t| {
            let timeout = t.timeout.filter(|d| !d.is_zero())?;
            Some(Deadline {
                timeout,
                name: t.name.clone(),
            })
        });
        ResponseFuture {
            sleep: deadline.as_ref().map(|d| tokio::time::sleep(d.timeout)),
            deadline,
            inner: self.inner.call(req),
        }
    }
}

/// What a timed-out request reports.
#[derive(Debug)]
struct Deadline {
    timeout: Duration,
    name: Arc<str>,
}

pin_project! {
    /// Future of [`RequestTimeout`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<Sleep>,
        deadline: Option<Deadline>,
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<RB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result.map_err(Into::into));
        }
        if let Some(sleep) = this.sleep.as_pin_mut() {
            std::task::ready!(sleep.poll(cx));
            return Poll::Ready(Err(timed_out(this.deadline.as_ref()).into()));
        }
        Poll::Pending
    }
}

fn timed_out(deadline: Option<&Deadline>) -> ProxyError {
    let flag = ResponseFlags::UPSTREAM_REQUEST_TIMEOUT;
    match deadline {
        Some(d) => ProxyError::new(
            flag,
            format_args!("upstream request timeout: {} after {:?}", d.name, d.timeout),
        ),
        // A sleep exists only with a deadline; kept total rather than panicking.
        None => ProxyError::new(flag, "upstream request timeout"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{route_target, with_target};
    use std::time::Duration;
    use tokio::time::Instant;
    use tower::{Layer, ServiceExt, service_fn};

    fn sleeper(
        delay: Duration,
    ) -> impl tower::Service<
        Request<()>,
        Response = Response<()>,
        Error = BoxError,
        Future = impl Future<Output = Result<Response<()>, BoxError>>,
    > + Clone {
        service_fn(move |_req: Request<()>| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, BoxError>(Response::new(()))
        })
    }

    #[tokio::test(start_paused = true)]
    async fn expires_with_ut_and_504() {
        let mut target = route_target("reviews.default.svc.cluster.local:9080");
        target.timeout = Some(Duration::from_millis(1500));
        let svc = RequestTimeoutLayer.layer(sleeper(Duration::from_secs(5)));
        let start = Instant::now();
        let err = svc
            .oneshot(with_target(Request::new(()), target))
            .await
            .unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_millis(1500));
        let err = ProxyError::find(&err).unwrap();
        assert_eq!(err.flags(), ResponseFlags::UPSTREAM_REQUEST_TIMEOUT);
        assert_eq!(err.status(), 504);
        assert_eq!(
            err.to_string(),
            "upstream request timeout: reviews.default.svc.cluster.local:9080 after 1.5s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_answer_wins() {
        let mut target = route_target("reviews:9080");
        target.timeout = Some(Duration::from_secs(1));
        let svc = RequestTimeoutLayer.layer(sleeper(Duration::from_millis(999)));
        let resp = svc.oneshot(with_target(Request::new(()), target)).await;
        assert!(resp.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn no_target_no_timeout_or_zero_means_unbounded() {
        let hour = Duration::from_secs(3600);
        let svc = RequestTimeoutLayer.layer(sleeper(hour));
        assert!(svc.clone().oneshot(Request::new(())).await.is_ok());

        let target = route_target("reviews:9080");
        assert_eq!(target.timeout, None);
        let start = Instant::now();
        let req = with_target(Request::new(()), target.clone());
        assert!(svc.clone().oneshot(req).await.is_ok());
        assert_eq!(start.elapsed(), hour);

        let zero = RouteTarget {
            timeout: Some(Duration::ZERO),
            ..target
        };
        assert!(
            svc.oneshot(with_target(Request::new(()), zero))
                .await
                .is_ok()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn inner_errors_pass_through() {
        let mut target = route_target("reviews:9080");
        target.timeout = Some(Duration::from_secs(1));
        let failing = service_fn(|_req: Request<()>| async {
            Err::<Response<()>, _>(ProxyError::new(
                ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
                "refused",
            ))
        });
        let err = RequestTimeoutLayer
            .layer(failing)
            .oneshot(with_target(Request::new(()), target))
            .await
            .unwrap_err();
        assert_eq!(
            ProxyError::find(&err).unwrap().flags(),
            ResponseFlags::UPSTREAM_CONNECTION_FAILURE
        );
    }
}
