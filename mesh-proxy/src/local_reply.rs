//! The outermost layer of each stack: failures become local replies.
//!
//! Inner layers fail with a [`ProxyError`] that carries the response flag and the reason;
//! here it becomes the response Envoy would send (status, `x-mesh-response-flags`, the reason
//! as a one-line body). A peer proxy's flags on a successful response are kept as they are.
//! An error that is not a `ProxyError` is a bug in a layer or a protocol failure nobody
//! classified: it answers 502 `UPE` rather than dropping the connection.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use mesh_core::ProxyError;
use mesh_core::ResponseFlags;
use mesh_core::body::{BoxBody, BoxError};
use pin_project_lite::pin_project;

/// Turns service errors into local replies; see the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalReplyLayer;

impl<S> tower::Layer<S> for LocalReplyLayer {
    type Service = LocalReply<S>;
    fn layer(&self, inner: S) -> LocalReply<S> {
        LocalReply { inner }
    }
}

/// The service made by [`LocalReplyLayer`].
#[derive(Clone, Debug)]
pub struct LocalReply<S> {
    inner: S,
}

impl<S, B> tower::Service<Request<B>> for LocalReply<S>
where
    S: tower::Service<Request<B>, Response = Response<BoxBody>, Error = BoxError>,
{
    type Response = Response<BoxBody>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // A layer that is not ready with an error still gets its request: the error is
        // answered from `call`'s future instead.
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// Future of [`LocalReply`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<BoxBody>, BoxError>>,
{
    type Output = Result<Response<BoxBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = std::task::ready!(self.project().inner.poll(cx));
        Poll::Ready(Ok(result.unwrap_or_else(|e| reply_for(&e))))
    }
}

/// The local reply for an error.
pub fn reply_for(error: &BoxError) -> Response<BoxBody> {
    match ProxyError::find(error) {
        Some(e) => {
            tracing::debug!(flags = %e.flags(), "{e}");
            e.flags().local_reply(e.status(), e)
        }
        None => {
            tracing::warn!(error = %error, "unclassified proxy error");
            ResponseFlags::UPSTREAM_PROTOCOL_ERROR.local_reply(
                StatusCode::BAD_GATEWAY,
                format_args!("upstream error: {error}"),
            )
        }
    }
}
