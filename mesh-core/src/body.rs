//! The body type every layer speaks.
//!
//! Requests and responses cross many layers (routing, retries, telemetry) and two HTTP
//! stacks (hyper's server and client), so one boxed body type keeps signatures small. It is
//! `Send` but not `Sync` (`UnsyncBoxBody`): hyper's `Incoming` is not `Sync`, and nothing
//! shares a body between threads.

use bytes::Bytes;
use http_body::Body;
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

/// A boxed error, as at tower service boundaries.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streaming body of `Bytes` chunks (and trailers).
pub type BoxBody = UnsyncBoxBody<Bytes, BoxError>;

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> BoxBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// An empty body.
pub fn empty() -> BoxBody {
    boxed(Empty::<Bytes>::new())
}

/// A body of one chunk.
pub fn full(data: impl Into<Bytes>) -> BoxBody {
    boxed(Full::new(data.into()))
}
