//! Reading a gRPC response's trailers before deciding whether to retry it.
//!
//! A gRPC failure after response headers travels in the trailers, after the body. To retry on
//! it the layer reads the body ahead, keeping the frames to hand them on unchanged:
//!
//! - the first frame is awaited (bounded by the attempt's per-try deadline, if any: past it
//!   the response is handed on as it is, since headers arrived in time);
//! - later frames are taken only while they are already there (`now_or_never`), so a
//!   streaming response is never held waiting for its next message;
//! - reading stops past `limit` bytes.
//!
//! Whatever was not read stays in the body the client gets. A unary response (one message
//! then trailers, written together) is thus classified; a larger or streaming one is passed
//! through unretried. Linkerd reads gRPC trailers the same way.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::FutureExt;
use http::{HeaderMap, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use mesh_core::body::{BoxBody, BoxError};
use tokio::time::Instant;

/// Reads ahead in `response`'s body for trailers; returns the response, with a body yielding
/// the same frames, and the trailers if they were reached.
pub(crate) async fn trailers(
    response: Response<BoxBody>,
    limit: usize,
    deadline: Option<Instant>,
) -> (Response<BoxBody>, Option<HeaderMap>) {
    let (parts, mut body) = response.into_parts();
    let mut peeked = Peeked::default();
    let mut trailers = None;
    let mut next = match deadline {
        Some(at) => tokio::time::timeout_at(at, body.frame()).await.ok(),
        None => Some(body.frame().await),
    };
    let ended = loop {
        match next {
            // Not there yet: hand on the rest as it comes.
            None => break false,
            Some(None) => break true,
            Some(Some(Err(e))) => {
                peeked.error = Some(e);
                break true;
            }
            Some(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref() {
                    trailers = Some(t.clone());
                }
                if let Some(data) = frame.data_ref() {
                    peeked.buffered += data.len() as u64;
                }
                peeked.frames.push_back(frame);
                if trailers.is_some() {
                    break true;
                }
                if peeked.buffered > limit as u64 {
                    break false;
                }
            }
        }
        next = body.frame().now_or_never();
    };
    if !ended {
        peeked.rest = Some(body);
    }
    (Response::from_parts(parts, peeked.boxed_unsync()), trailers)
}

/// The frames read ahead, then the rest of the body.
#[derive(Default)]
struct Peeked {
    frames: VecDeque<Frame<Bytes>>,
    /// Data bytes in `frames`.
    buffered: u64,
    error: Option<BoxError>,
    rest: Option<BoxBody>,
}

impl Body for Peeked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(frame) = this.frames.pop_front() {
            if let Some(data) = frame.data_ref() {
                this.buffered -= data.len() as u64;
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(e) = this.error.take() {
            return Poll::Ready(Some(Err(e)));
        }
        match this.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
            && self.error.is_none()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |r| r.size_hint());
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(self.buffered));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(self.buffered));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::frames_body;
    use http_body_util::BodyExt;
    use std::time::Duration;

    fn grpc_trailers(code: &str) -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", code.parse().unwrap());
        t
    }

    #[tokio::test(start_paused = true)]
    async fn reads_trailers_after_a_message_and_hands_everything_on() {
        let body = frames_body(vec![
            Frame::data(Bytes::from("msg")),
            Frame::trailers(grpc_trailers("14")),
        ]);
        let (resp, trailers) = trailers(Response::new(body), 1024, None).await;
        assert_eq!(trailers.unwrap()["grpc-status"], "14");
        assert_eq!(resp.body().size_hint().exact(), Some(3));
        let collected = resp.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "14");
        assert_eq!(collected.to_bytes(), "msg");
    }

    #[tokio::test(start_paused = true)]
    async fn stops_past_the_limit() {
        let body = frames_body(vec![
            Frame::data(Bytes::from(vec![b'a'; 600])),
            Frame::data(Bytes::from(vec![b'b'; 600])),
            Frame::data(Bytes::from(vec![b'c'; 600])),
            Frame::trailers(grpc_trailers("14")),
        ]);
        let (resp, trailers) = trailers(Response::new(body), 1000, None).await;
        assert!(trailers.is_none());
        let collected = resp.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "14");
        assert_eq!(collected.to_bytes().len(), 1800);
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_wait_for_a_stream_s_next_message() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, BoxError>>();
        tx.unbounded_send(Ok(Frame::data(Bytes::from("first"))))
            .unwrap();
        let body = mesh_core::body::boxed(http_body_util::StreamBody::new(rx));
        let (resp, trailers) = trailers(Response::new(body), 1024, None).await;
        assert!(trailers.is_none());
        let mut body = resp.into_body();
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "first"
        );
        tx.unbounded_send(Ok(Frame::trailers(grpc_trailers("0"))))
            .unwrap();
        drop(tx);
        let last = body.frame().await.unwrap().unwrap();
        assert_eq!(last.trailers_ref().unwrap()["grpc-status"], "0");
        assert!(body.frame().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_frame_waits_only_until_the_deadline() {
        let (_tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, BoxError>>();
        let body = mesh_core::body::boxed(http_body_util::StreamBody::new(rx));
        let deadline = Instant::now() + Duration::from_millis(100);
        let (resp, trailers) = trailers(Response::new(body), 1024, Some(deadline)).await;
        assert!(trailers.is_none());
        assert_eq!(Instant::now(), deadline);
        assert!(!resp.body().is_end_stream());
    }
}
