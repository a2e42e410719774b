//! Request bodies that can be sent again.
//!
//! A retry must send the same body, but a proxy's request body is a stream: once the first
//! attempt has read a chunk, it is gone. [`Replay::new`] wraps the client's body; the
//! [`ReplayBody`] it returns streams to the first attempt as it arrives (no waiting for the
//! whole body) and keeps a copy of each chunk, up to a limit (64 KiB by default, Linkerd's
//! `max_request_bytes`). [`Replay::next_body`] then gives each retry a body that replays the
//! copy and continues with whatever the client has not sent yet.
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::BodyExt;
//! use mesh_resilience::replay::Replay;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let (replay, first) = Replay::new(mesh_core::body::full("hello"), Replay::DEFAULT_LIMIT);
//! assert_eq!(first.collect().await.unwrap().to_bytes(), Bytes::from("hello"));
//! let second = replay.next_body().expect("5 bytes fit the limit");
//! assert_eq!(second.collect().await.unwrap().to_bytes(), Bytes::from("hello"));
//! # }
//! ```
//!
//! # Choices
//!
//! - Chunks are kept as `Bytes` clones (reference counts, no copy) in a list shared by the
//!   bodies of one request; trailers are kept too, so gRPC requests replay whole.
//! - Past the limit the copy is dropped and the body is no longer replayable, with one
//!   exception: a body no attempt has read from yet (a connect failure happens before the
//!   body is sent) can always be handed to the next attempt. A body whose size hint already
//!   says it exceeds the limit is never copied at all.
//! - Only the newest body may read further from the client's stream. When an attempt
//!   finishes before reading the whole body (the upstream answered early) and its body is
//!   dropped, the unread rest goes back to the shared state and the next attempt continues from
//!   it. If the attempt's body is still held somewhere (an HTTP client still sending it), the
//!   request is not replayable: [`Replay::next_body`] returns `None`, and the retry layer
//!   returns the failure in hand. An older body polled after a newer one was made fails with
//!   an error rather than steal the stream.
//! - A body the client reported an error on is not replayable.
//! - The state sits behind a `std::sync::Mutex`, locked for a few instructions per frame and
//!   never across an `.await` (the body's methods are synchronous polls).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use mesh_core::body::{BoxBody, BoxError};

/// The retry layer's handle on a request body; see the module docs.
#[derive(Debug)]
pub struct Replay {
    shared: Arc<Mutex<State>>,
    hint: SizeHint,
}

/// One attempt's view of a replayable request body.
#[derive(Debug)]
pub struct ReplayBody {
    shared: Arc<Mutex<State>>,
    /// Which body this is; only the newest may read the client's stream.
    generation: u64,
    /// The next kept chunk to replay.
    pos: usize,
    /// The client's stream, while this body is the one reading it.
    rest: Option<BoxBody>,
    trailers_sent: bool,
    /// The client's size hint, less what this body has yielded.
    hint: SizeHint,
}

struct State {
    /// The chunks read from the client so far (emptied when they exceed `limit`).
    chunks: Vec<Bytes>,
    /// Bytes in `chunks`.
    len: usize,
    limit: usize,
    trailers: Option<HeaderMap>,
    /// The client's unread stream, when no body holds it.
    rest: Option<BoxBody>,
    /// The client's stream has ended.
    ended: bool,
    /// A frame has been read from the client's stream.
    consumed: bool,
    /// More than `limit` bytes: the copy was dropped.
    overflowed: bool,
    /// The client's stream failed.
    failed: bool,
    generation: u64,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("chunks", &self.chunks.len())
            .field("len", &self.len)
            .field("ended", &self.ended)
            .field("overflowed", &self.overflowed)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl State {
    fn replayable(&self) -> bool {
        let copy_kept = !self.overflowed || !self.consumed;
        !self.failed && copy_kept && (self.ended || self.rest.is_some())
    }
}

/// What the kept copy has for a body.
enum Kept {
    /// A frame, or the end of the body.
    Frame(Option<Frame<Bytes>>),
    /// The copy is exhausted and this body now holds the client's stream.
    ReadStream,
    Error(BoxError),
}

fn lock(shared: &Mutex<State>) -> MutexGuard<'_, State> {
    // Nothing panics while holding the lock; were it poisoned, the state is still consistent.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Replay {
    /// Linkerd's limit on a retried request's body: 64 KiB.
    pub const DEFAULT_LIMIT: usize = 64 * 1024;

    /// Wraps `body`, keeping up to `limit` bytes of it for replay. Returns the handle and the
    /// body for the first attempt.
    pub fn new(body: BoxBody, limit: usize) -> (Replay, ReplayBody) {
        let hint = body.size_hint();
        let too_big = hint.lower() > limit as u64;
        let state = State {
            chunks: Vec::new(),
            len: 0,
            limit,
            trailers: None,
            rest: Some(body),
            ended: false,
            consumed: false,
            overflowed: too_big,
            failed: false,
            generation: 0,
        };
        let replay = Replay {
            shared: Arc::new(Mutex::new(state)),
            hint,
        };
        let first = replay.body(0);
        (replay, first)
    }

    /// Whether [`next_body`](Self::next_body) would give a body now.
    pub fn is_replayable(&self) -> bool {
        lock(&self.shared).replayable()
    }

    /// A body for another attempt, yielding the same bytes from the start; `None` when the
    /// body cannot be replayed (see the module docs). Older bodies stop reading the client's
    /// stream.
    pub fn next_body(&self) -> Option<ReplayBody> {
        let generation = {
            let mut state = lock(&self.shared);
            if !state.replayable() {
                return None;
            }
            state.generation += 1;
            state.generation
        };
        Some(self.body(generation))
    }

    fn body(&self, generation: u64) -> ReplayBody {
        ReplayBody {
            shared: self.shared.clone(),
            generation,
            pos: 0,
            rest: None,
            trailers_sent: false,
            hint: self.hint,
        }
    }
}

impl ReplayBody {
    fn yielded(&mut self, n: usize) {
        let n = n as u64;
        let upper = self.hint.upper().map(|u| u.saturating_sub(n));
        let mut hint = SizeHint::new();
        hint.set_lower(self.hint.lower().saturating_sub(n));
        if let Some(upper) = upper {
            hint.set_upper(upper);
        }
        self.hint = hint;
    }

    /// The next frame from the kept copy, or else takes the client's stream to read on.
    fn next_kept(&mut self) -> Kept {
        let mut state = lock(&self.shared);
        if let Some(chunk) = state.chunks.get(self.pos).cloned() {
            self.pos += 1;
            drop(state);
            self.yielded(chunk.len());
            return Kept::Frame(Some(Frame::data(chunk)));
        }
        if state.ended {
            if std::mem::replace(&mut self.trailers_sent, true) {
                return Kept::Frame(None);
            }
            return Kept::Frame(state.trailers.clone().map(Frame::trailers));
        }
        let refusal = if state.failed {
            "request body failed in an earlier attempt"
        } else if self.generation != state.generation {
            "request body superseded by a retry"
        } else if state.overflowed && state.consumed {
            "request body can no longer be replayed"
        } else if let Some(rest) = state.rest.take() {
            self.rest = Some(rest);
            return Kept::ReadStream;
        } else {
            "request body is held by another attempt"
        };
        Kept::Error(refusal.into())
    }

    /// Records what the client's stream yielded.
    fn record(
        &mut self,
        frame: Option<Result<Frame<Bytes>, BoxError>>,
    ) -> Option<Result<Frame<Bytes>, BoxError>> {
        let mut state = lock(&self.shared);
        match &frame {
            None => {
                state.ended = true;
                self.rest = None;
                self.trailers_sent = true;
            }
            Some(Ok(frame)) => {
                state.consumed = true;
                if let Some(chunk) = frame.data_ref() {
                    if !state.overflowed {
                        if state.len + chunk.len() > state.limit {
                            state.overflowed = true;
                            state.chunks = Vec::new();
                            state.len = 0;
                        } else {
                            state.len += chunk.len();
                            state.chunks.push(chunk.clone());
                        }
                    }
                    self.pos = state.chunks.len();
                    let n = chunk.len();
                    drop(state);
                    self.yielded(n);
                } else if let Some(trailers) = frame.trailers_ref() {
                    state.trailers = Some(trailers.clone());
                    state.ended = true;
                    self.trailers_sent = true;
                    self.rest = None;
                }
            }
            Some(Err(_)) => {
                state.failed = true;
                self.rest = None;
            }
        }
        frame
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.rest.is_none() {
            match this.next_kept() {
                Kept::Frame(frame) => return Poll::Ready(frame.map(Ok)),
                Kept::Error(e) => return Poll::Ready(Some(Err(e))),
                Kept::ReadStream => {}
            }
        }
        let Some(rest) = this.rest.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(std::pin::Pin::new(rest).poll_frame(cx));
        Poll::Ready(this.record(frame))
    }

    fn is_end_stream(&self) -> bool {
        if let Some(rest) = &self.rest {
            return rest.is_end_stream();
        }
        let state = lock(&self.shared);
        state.ended
            && self.pos >= state.chunks.len()
            && (self.trailers_sent || state.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

impl Drop for ReplayBody {
    fn drop(&mut self) {
        // Hand the unread rest of the client's stream to the next attempt.
        if let Some(rest) = self.rest.take() {
            lock(&self.shared).rest = Some(rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn chunks(parts: &[&'static str], trailers: Option<HeaderMap>) -> BoxBody {
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        if let Some(t) = trailers {
            frames.push(Ok(Frame::trailers(t)));
        }
        mesh_core::body::boxed(StreamBody::new(futures::stream::iter(frames)))
    }

    async fn read(body: ReplayBody) -> (Bytes, Option<HeaderMap>) {
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (collected.to_bytes(), trailers)
    }

    #[tokio::test]
    async fn replays_chunks_and_trailers() {
        let mut t = HeaderMap::new();
        t.insert("grpc-timeout", "1S".parse().unwrap());
        let (replay, first) = Replay::new(chunks(&["ab", "cd"], Some(t.clone())), 16);
        assert_eq!(read(first).await, (Bytes::from("abcd"), Some(t.clone())));
        for _ in 0..3 {
            let again = replay.next_body().unwrap();
            assert!(!again.is_end_stream());
            assert_eq!(read(again).await, (Bytes::from("abcd"), Some(t.clone())));
        }
    }

    #[tokio::test]
    async fn keeps_the_size_hint_of_a_known_length() {
        let (replay, first) = Replay::new(mesh_core::body::full("hello"), 16);
        assert_eq!(first.size_hint().exact(), Some(5));
        drop(first);
        let again = replay.next_body().unwrap();
        assert_eq!(again.size_hint().exact(), Some(5));
        assert_eq!(read(again).await.0, Bytes::from("hello"));
    }

    #[tokio::test]
    async fn a_partly_read_body_continues_in_the_next_attempt() {
        let (replay, mut first) = Replay::new(chunks(&["ab", "cd", "ef"], None), 16);
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        // Still held by the first attempt: not replayable yet.
        assert!(!replay.is_replayable());
        drop(first);
        let second = replay.next_body().unwrap();
        assert_eq!(read(second).await.0, Bytes::from("abcdef"));
        let third = replay.next_body().unwrap();
        assert_eq!(read(third).await.0, Bytes::from("abcdef"));
    }

    #[tokio::test]
    async fn beyond_the_limit_is_not_replayable() {
        let (replay, first) = Replay::new(chunks(&["0123456789", "0123456789"], None), 15);
        assert_eq!(read(first).await.0.len(), 20);
        assert!(!replay.is_replayable());
        assert!(replay.next_body().is_none());
    }

    #[tokio::test]
    async fn an_unread_body_is_replayable_whatever_its_size() {
        let big = mesh_core::body::full(vec![b'x'; 100_000]);
        let (replay, first) = Replay::new(big, Replay::DEFAULT_LIMIT);
        // A connect failure: the attempt never read the body.
        drop(first);
        let second = replay.next_body().unwrap();
        assert_eq!(read(second).await.0.len(), 100_000);
        // Now it has been read past the limit, and nothing was kept.
        assert!(replay.next_body().is_none());
    }

    #[tokio::test]
    async fn an_older_body_cannot_steal_the_stream() {
        let (replay, first) = Replay::new(chunks(&["ab", "cd"], None), 16);
        // The first attempt never polled but is kept alive somewhere.
        let second = replay.next_body().unwrap();
        assert!(first.collect().await.is_err());
        assert_eq!(read(second).await.0, Bytes::from("abcd"));
    }

    #[tokio::test]
    async fn a_failed_body_is_not_replayable() {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from("ab"))),
            Err("client reset".into()),
        ];
        let body = mesh_core::body::boxed(StreamBody::new(futures::stream::iter(frames)));
        let (replay, first) = Replay::new(body, 16);
        assert!(first.collect().await.is_err());
        assert!(replay.next_body().is_none());
    }
}
