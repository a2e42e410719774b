//! Shared helpers for the unit tests.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::StreamBody;
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::target::{RetryOn, RetryPolicy, RouteTarget};

pub use crate::doc_support::route_target;

pub type Outcome = Result<Response<BoxBody>, BoxError>;

/// The gRPC `retryOn` tokens with the `grpc-status` each names.
pub const GRPC_TOKENS: [(&str, &str); 5] = [
    ("cancelled", "1"),
    ("deadline-exceeded", "4"),
    ("resource-exhausted", "8"),
    ("internal", "13"),
    ("unavailable", "14"),
];

pub fn with_target<B>(mut req: Request<B>, target: RouteTarget) -> Request<B> {
    req.extensions_mut().insert(target);
    req
}

/// A request for `reviews:9080` under `policy`, with `body`.
pub fn request(policy: RetryPolicy, body: BoxBody) -> Request<BoxBody> {
    let mut target = route_target("reviews:9080");
    target.retry = Arc::new(policy);
    with_target(Request::new(body), target)
}

/// A policy retrying `attempts` times on `retry_on`, without backoff unless set.
pub fn policy(retry_on: &str, attempts: u32) -> RetryPolicy {
    RetryPolicy {
        attempts,
        retry_on: RetryOn::parse(retry_on).unwrap(),
        ..RetryPolicy::istio_default()
    }
}

/// A body yielding `frames`, with no size hint.
pub fn frames_body(frames: Vec<Frame<Bytes>>) -> BoxBody {
    let frames = frames.into_iter().map(Ok::<_, BoxError>);
    body::boxed(StreamBody::new(futures::stream::iter(frames)))
}

pub fn status(code: u16) -> Response<BoxBody> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::from_u16(code).unwrap();
    resp
}

/// An endpoint answering its `n`th call (from 0) with `answer(n, request)`, and its call count.
pub fn endpoint<F, Fut>(
    answer: F,
) -> (
    impl tower::Service<
        Request<BoxBody>,
        Response = Response<BoxBody>,
        Error = BoxError,
        Future = impl Future<Output = Outcome> + Send + 'static,
    > + Clone
    + Send
    + 'static,
    Arc<AtomicUsize>,
)
where
    F: Fn(usize, Request<BoxBody>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let svc = tower::service_fn(move |req| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        answer(n, req)
    });
    (svc, calls)
}
