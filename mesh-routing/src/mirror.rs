//! `mirror` / `mirrors`: fire-and-forget copies of a forwarded request.
//!
//! As Envoy's request mirroring: each mirror fires on its own percentage (`mirrorPercentage`,
//! the legacy `mirrorPercent`, or a `mirrors[]` entry's `percentage`; unset is 100%, 0 never).
//! The copy is the request as it is forwarded (after rewrites and header operations), with
//! `-shadow` appended to its host (`reviews:9080` → `reviews-shadow:9080`) and its own
//! [`RouteTarget`] for the mirror destination (no retries, the route's timeout). It is sent
//! on a spawned task through a clone of the inner service; its response and any failure are
//! dropped, so the caller never sees the shadow. A mirror destination that resolves to no
//! service is left out when the table is built (Envoy drops such shadows too).
//!
//! Bodies: a request whose body is already complete (no body, `Content-Length: 0`) gives the
//! shadow an empty body. Any other body is teed frame by frame: the primary reads its body
//! as usual, and each frame is also offered to every shadow through a bounded channel
//! ([`SHADOW_BUFFER_FRAMES`]) with `try_send`. A shadow that falls behind, or a primary body
//! that fails or is dropped before its end, abandons the shadow: its body ends with an error
//! so the upstream never takes a truncated copy for a complete one. The primary is never
//! slowed, buffered or failed by a shadow. Without a tokio runtime mirroring is skipped.
//!
//! A shadow that hangs is bounded by the route's timeout, or [`DEFAULT_MIRROR_TIMEOUT`] when
//! the route sets none, so shadows cannot pile up.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http::header::{HOST, HeaderValue};
use http::uri::{Authority, Uri};
use http_body::{Body, Frame, SizeHint};
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::target::RouteTarget;
use tokio::sync::mpsc;
use tower::ServiceExt;

use crate::authority::{request_authority, shadow_authority};
use crate::fraction::Fraction;
use crate::layer::{BoxFuture, InnerService};

/// How many frames a shadow may lag behind the primary before it is abandoned.
pub const SHADOW_BUFFER_FRAMES: usize = 64;

/// How long a shadow may take when its route sets no timeout (Envoy's own default route
/// timeout; Istio turns route timeouts off, which would let hung shadows accumulate).
pub const DEFAULT_MIRROR_TIMEOUT: Duration = Duration::from_secs(15);

/// One mirror of a route.
#[derive(Clone, Debug)]
pub(crate) struct Mirror {
    pub target: RouteTarget,
    pub fraction: Fraction,
}

/// Sends a copy of `req` to each mirror that fires; tees `req`'s body when it has one.
pub(crate) fn fire<S>(mirrors: &[Mirror], req: &mut Request<BoxBody>, inner: &S, timeout: Duration)
where
    S: InnerService,
{
    if mirrors.is_empty() {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::debug!("no tokio runtime: request mirroring skipped");
        return;
    };
    let firing: Vec<&Mirror> = mirrors.iter().filter(|m| m.fraction.sample()).collect();
    if firing.is_empty() {
        return;
    }
    let shadow_host = shadow_authority(request_authority(req));
    let header = HeaderValue::from_str(&shadow_host).ok();
    let uri_authority = Authority::try_from(shadow_host.as_str()).ok();
    let empty = req.body().is_end_stream();
    let size = req.body().size_hint();
    let mut taps = Vec::new();
    for mirror in firing {
        let body = if empty {
            body::empty()
        } else {
            let (tap, shadow_body) = tap(size);
            taps.push(tap);
            body::boxed(shadow_body)
        };
        let mut shadow = Request::new(body);
        *shadow.method_mut() = req.method().clone();
        *shadow.uri_mut() = shadow_uri(req.uri(), uri_authority.as_ref());
        *shadow.version_mut() = req.version();
        *shadow.headers_mut() = req.headers().clone();
        if let Some(host) = &header {
            shadow.headers_mut().insert(HOST, host.clone());
        }
        *shadow.extensions_mut() = req.extensions().clone();
        shadow.extensions_mut().insert(mirror.target.clone());
        // Boxed here, outside the task's async block, so the task's type does not name the
        // inner service's future (which trips rustc's `Send` inference on higher-ranked
        // lifetimes).
        let call: BoxFuture = Box::pin(inner.clone().oneshot(shadow));
        let name = mirror.target.name.clone();
        runtime.spawn(async move {
            match tokio::time::timeout(timeout, call).await {
                Ok(Ok(response)) => {
                    tracing::trace!(mirror = %name, status = %response.status(), "shadow answered")
                }
                Ok(Err(e)) => tracing::debug!(mirror = %name, "shadow failed: {e}"),
                Err(_) => tracing::debug!(mirror = %name, "shadow timed out"),
            }
        });
    }
    if !taps.is_empty() {
        let primary = std::mem::replace(req.body_mut(), body::empty());
        *req.body_mut() = body::boxed(TeeBody {
            inner: primary,
            taps,
        });
    }
}

/// The primary's URI with the shadow authority, when the URI carries one.
fn shadow_uri(uri: &Uri, shadow: Option<&Authority>) -> Uri {
    match (uri.authority(), shadow) {
        (Some(_), Some(shadow)) => {
            let mut parts = uri.clone().into_parts();
            parts.authority = Some(shadow.clone());
            Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
        }
        _ => uri.clone(),
    }
}

/// The sending end of one shadow's copy of the body.
#[derive(Debug)]
struct Tap {
    tx: mpsc::Sender<Frame<Bytes>>,
    complete: Arc<AtomicBool>,
}

fn tap(size: SizeHint) -> (Tap, ShadowBody) {
    let (tx, rx) = mpsc::channel(SHADOW_BUFFER_FRAMES);
    let complete = Arc::new(AtomicBool::new(false));
    (
        Tap {
            tx,
            complete: complete.clone(),
        },
        ShadowBody { rx, complete, size },
    )
}

/// The primary's body, copying each frame to the taps that keep up.
struct TeeBody {
    inner: BoxBody,
    taps: Vec<Tap>,
}

impl TeeBody {
    /// The primary body is done: every tap that kept up gets a clean end.
    fn finish(&mut self) {
        for tap in self.taps.drain(..) {
            tap.complete.store(true, Ordering::Release);
        }
    }
}

impl Body for TeeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                // A tap whose channel is full (or whose shadow is gone) is dropped without
                // being marked complete: that shadow's body ends with an error.
                this.taps
                    .retain(|tap| copy(frame).is_some_and(|c| tap.tx.try_send(c).is_ok()));
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Some(Err(_)) => this.taps.clear(),
            None => this.finish(),
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

fn copy(frame: &Frame<Bytes>) -> Option<Frame<Bytes>> {
    if let Some(data) = frame.data_ref() {
        Some(Frame::data(data.clone()))
    } else {
        frame.trailers_ref().map(|t| Frame::trailers(t.clone()))
    }
}

/// A shadow's body: the frames the primary read, then a clean end only if the primary body
/// completed while this shadow kept up.
struct ShadowBody {
    rx: mpsc::Receiver<Frame<Bytes>>,
    complete: Arc<AtomicBool>,
    size: SizeHint,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "mirror abandoned: the shadow fell behind the primary request, or the primary body did not complete"
)]
struct Abandoned;

impl Body for ShadowBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match std::task::ready!(self.rx.poll_recv(cx)) {
            Some(frame) => Poll::Ready(Some(Ok(frame))),
            None if self.complete.load(Ordering::Acquire) => Poll::Ready(None),
            None => Poll::Ready(Some(Err(Abandoned.into()))),
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    #[tokio::test]
    async fn a_teed_body_reaches_both_sides() {
        let (tap, shadow) = tap(SizeHint::with_exact(6));
        let primary = TeeBody {
            inner: body::full("abcdef"),
            taps: vec![tap],
        };
        assert_eq!(
            primary.collect().await.expect("primary").to_bytes(),
            "abcdef"
        );
        assert_eq!(
            shadow.collect().await.expect("shadow complete").to_bytes(),
            "abcdef"
        );
    }

    #[tokio::test]
    async fn a_lagging_shadow_is_abandoned_not_waited_for() {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = (0..SHADOW_BUFFER_FRAMES + 10)
            .map(|i| Ok(Frame::data(Bytes::from(i.to_string()))))
            .collect();
        let (tap, shadow) = tap(SizeHint::default());
        let primary = TeeBody {
            inner: body::boxed(StreamBody::new(futures::stream::iter(frames))),
            taps: vec![tap],
        };
        let all = primary
            .collect()
            .await
            .expect("the primary is whole")
            .to_bytes();
        assert!(all.len() > SHADOW_BUFFER_FRAMES);
        assert!(
            shadow.collect().await.is_err(),
            "the shadow's copy is cut off with an error"
        );
    }

    #[tokio::test]
    async fn a_dropped_primary_fails_the_shadow() {
        let (tap, shadow) = tap(SizeHint::default());
        drop(TeeBody {
            inner: body::full("never read"),
            taps: vec![tap],
        });
        assert!(shadow.collect().await.is_err());
    }
}
