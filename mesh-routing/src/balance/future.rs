//! The response future both balancers return, and the body that keeps a request counted in
//! flight until it ends.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::HeaderValue;
use http_body::{Body, Frame, SizeHint};
use mesh_core::body::{BoxBody, BoxError};
use pin_project_lite::pin_project;

use super::state::InFlight;

/// What to do with a response and its request's claim on the endpoint.
type Finish<R> = fn(R, InFlight, Option<HeaderValue>) -> R;

pin_project! {
    /// The future returned by [`Balance`](super::Balance) and [`Balancer`](super::Balancer):
    /// the inner call, which records a latency sample when the response (headers) arrives
    /// and keeps the request counted in flight until its body ends (the layer) or until the
    /// response arrives (the standalone balancer), or until either fails or is dropped.
    pub struct ResponseFuture<F, R> {
        #[pin]
        inner: Option<F>,
        error: Option<BoxError>,
        claim: Option<InFlight>,
        set_cookie: Option<HeaderValue>,
        finish: Finish<R>,
    }
}

impl<F, R> std::fmt::Debug for ResponseFuture<F, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("claim", &self.claim)
            .finish_non_exhaustive()
    }
}

impl<F, R> ResponseFuture<F, R> {
    pub(crate) fn called(inner: F, claim: InFlight, finish: Finish<R>) -> Self {
        ResponseFuture {
            inner: Some(inner),
            error: None,
            claim: Some(claim),
            set_cookie: None,
            finish,
        }
    }

    pub(crate) fn failed(error: impl Into<BoxError>) -> Self {
        ResponseFuture {
            inner: None,
            error: Some(error.into()),
            claim: None,
            set_cookie: None,
            finish: |r, _, _| r,
        }
    }

    pub(crate) fn with_set_cookie(mut self, cookie: Option<HeaderValue>) -> Self {
        self.set_cookie = cookie;
        self
    }
}

impl<F, R, E> Future for ResponseFuture<F, R>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
{
    type Output = Result<R, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.as_mut().project();
        if let Some(error) = this.error.take() {
            return Poll::Ready(Err(error));
        }
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(Err(
                "balancer response future polled after completion".into()
            ));
        };
        let result = ready!(inner.poll(cx));
        let mut this = self.project();
        this.inner.set(None);
        let claim = this.claim.take();
        Poll::Ready(match (result, claim) {
            (Ok(response), Some(claim)) => {
                claim.responded();
                Ok((this.finish)(response, claim, this.set_cookie.take()))
            }
            (Ok(response), None) => Ok(response),
            (Err(error), _) => Err(error.into()),
        })
    }
}

/// The layer's finish: the claim rides on the body; a generated cookie is set.
pub(crate) fn track_body(
    response: http::Response<BoxBody>,
    claim: InFlight,
    set_cookie: Option<HeaderValue>,
) -> http::Response<BoxBody> {
    let (mut parts, body) = response.into_parts();
    if let Some(cookie) = set_cookie {
        parts.headers.append(http::header::SET_COOKIE, cookie);
    }
    let claim = (!body.is_end_stream()).then_some(claim);
    let body = TrackedBody { inner: body, claim };
    http::Response::from_parts(parts, BoxBody::new(body))
}

/// The standalone balancer's finish: the request is done when its response arrives.
pub(crate) fn release<R>(response: R, claim: InFlight, _: Option<HeaderValue>) -> R {
    drop(claim);
    response
}

pin_project! {
    /// A response body that releases its request's claim when it ends, fails or is dropped.
    struct TrackedBody {
        #[pin]
        inner: BoxBody,
        claim: Option<InFlight>,
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) || this.inner.is_end_stream() {
            this.claim.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
