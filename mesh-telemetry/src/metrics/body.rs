//! The body wrappers: they count bytes and gRPC messages, read `grpc-status` from the
//! trailers, and tell the recorder when the response is over.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::record::Recorder;

/// Counts the gRPC messages in a stream of body chunks: each message is a 5-byte prefix (a
/// compression flag and a big-endian length) and that many bytes, and may be split across
/// chunks anywhere. A message is counted when its prefix is complete.
#[derive(Clone, Debug, Default)]
pub(crate) struct GrpcFramer {
    prefix: [u8; 5],
    have: usize,
    remaining: u64,
}

impl GrpcFramer {
    /// Reads a chunk; returns how many messages started in it.
    pub(crate) fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut started = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = usize::try_from(self.remaining).map_or(data.len(), |r| r.min(data.len()));
                self.remaining -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (self.prefix.len() - self.have).min(data.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == self.prefix.len() {
                let [_, a, b, c, d] = self.prefix;
                self.remaining = u64::from(u32::from_be_bytes([a, b, c, d]));
                self.have = 0;
                started += 1;
            }
        }
        started
    }
}

/// What the request body has carried so far; the recorder reads it when the response ends.
#[derive(Debug, Default)]
pub(crate) struct RequestTally {
    pub(crate) bytes: AtomicU64,
    pub(crate) messages: AtomicU64,
}

pin_project! {
    /// The request body the inner service sees: the caller's, counted.
    pub struct RequestBody<B> {
        #[pin]
        inner: B,
        tally: Arc<RequestTally>,
        framer: Option<GrpcFramer>,
    }
}

impl<B> RequestBody<B> {
    pub(crate) fn new(inner: B, tally: Arc<RequestTally>, grpc: bool) -> Self {
        RequestBody {
            inner,
            tally,
            framer: grpc.then(GrpcFramer::default),
        }
    }

    /// The wrapped body.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B> std::fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody")
            .field("bytes", &self.tally.bytes.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<B: Body<Data = Bytes>> Body for RequestBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(data) = frame.as_ref().and_then(|f| f.as_ref().ok()?.data_ref()) {
            this.tally
                .bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            if let Some(framer) = this.framer {
                let started = framer.feed(data);
                if started > 0 {
                    this.tally.messages.fetch_add(started, Ordering::Relaxed);
                }
            }
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

pin_project! {
    /// The response body the caller sees: the inner service's, counted; the request is
    /// recorded when it ends, or when it is dropped unfinished.
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
        recorder: Option<Recorder>,
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn new(inner: B, recorder: Option<Recorder>) -> Self {
        ResponseBody { inner, recorder }
    }
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("recorded", &self.recorder.is_none())
            .finish_non_exhaustive()
    }
}

impl<B: Body<Data = Bytes>> Body for ResponseBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        let done = match &frame {
            Some(Ok(frame)) => {
                if let Some(recorder) = this.recorder.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        recorder.on_response_data(data);
                    } else if let Some(trailers) = frame.trailers_ref() {
                        recorder.on_trailers(trailers);
                    }
                }
                this.inner.is_end_stream()
            }
            // A failed body is over too: recorded as it stands.
            Some(Err(_)) | None => true,
        };
        if done && let Some(recorder) = this.recorder.take() {
            recorder.mark_ended();
            // Dropping the recorder records the request.
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end && let Some(recorder) = &self.recorder {
            // The server stops polling a body that says it is over and drops it: the
            // recorder must not take that for a caller who went away.
            recorder.mark_ended();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&(len as u32).to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len));
        m
    }

    #[test]
    fn counts_messages_split_anywhere() {
        let stream: Vec<u8> = [message(3), message(0), message(300), message(1)].concat();
        for chunk in 1..=stream.len() {
            let mut framer = GrpcFramer::default();
            let total: u64 = stream.chunks(chunk).map(|c| framer.feed(c)).sum();
            assert_eq!(total, 4, "chunk size {chunk}");
        }
        // A huge declared length just swallows what follows.
        let mut framer = GrpcFramer::default();
        assert_eq!(framer.feed(&[0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]), 1);
        assert_eq!(framer.feed(&[0; 64]), 0);
    }
}
