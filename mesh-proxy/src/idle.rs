//! Connection idle timeouts: a stream wrapper that notes that bytes moved, and a future that
//! resolves once none have for a given time.
//!
//! hyper's server has a header-read timeout but no idle timeout for keep-alive connections,
//! and Istio closes a connection idle for an hour (its `idleTimeout` default). Tracking at the
//! byte level covers HTTP/1 keep-alive gaps and silent HTTP/2 connections alike; a request
//! whose body or response stalls for the whole timeout is cut too, as Envoy's stream idle
//! timeout (shorter, 5 min) would.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pin_project_lite::pin_project! {
    /// `IO`, noting in its [`Activity`] every read or write that moves bytes.
    pub struct Tracked<IO> {
        #[pin]
        io: IO,
        activity: Activity,
    }
}

/// Whether a [`Tracked`] stream moved bytes since [`Activity::idle_for`] last looked.
///
/// A flag rather than a timestamp: reading the clock on every read and write of every
/// connection costs more than the idle check needs. The check looks every eighth of the
/// timeout instead, so a connection closes after between `timeout` and `timeout` plus an
/// eighth of it without a byte moving.
#[derive(Clone, Debug)]
pub struct Activity {
    moved: Arc<AtomicBool>,
}

/// How many times per timeout [`Activity::idle_for`] looks at the flag.
const CHECKS_PER_TIMEOUT: u32 = 8;

impl<IO> Tracked<IO> {
    pub fn new(io: IO) -> (Tracked<IO>, Activity) {
        let activity = Activity {
            moved: Arc::new(AtomicBool::new(false)),
        };
        (
            Tracked {
                io,
                activity: activity.clone(),
            },
            activity,
        )
    }
}

impl Activity {
    fn touch(&self) {
        self.moved.store(true, Ordering::Relaxed);
    }

    /// Resolves once no byte has moved for `timeout` (up to an eighth of it more).
    pub async fn idle_for(&self, timeout: Duration) {
        let check = (timeout / CHECKS_PER_TIMEOUT).max(Duration::from_millis(1));
        let mut quiet = Duration::ZERO;
        while quiet < timeout {
            tokio::time::sleep(check).await;
            if self.moved.swap(false, Ordering::Relaxed) {
                quiet = Duration::ZERO;
            } else {
                quiet += check;
            }
        }
    }
}

impl<IO: AsyncRead> AsyncRead for Tracked<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let result = this.io.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        result
    }
}

impl<IO: AsyncWrite> AsyncWrite for Tracked<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let result = this.io.poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let result = this.io.poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_idle_within_an_eighth_past_the_timeout() {
        let (a, _b) = tokio::io::duplex(64);
        let (_tracked, activity) = Tracked::new(a);
        let waiter = tokio::spawn(async move { activity.idle_for(Duration::from_secs(8)).await });
        tokio::time::sleep(Duration::from_millis(7_900)).await;
        assert!(!waiter.is_finished(), "idle before the timeout");
        tokio::time::sleep(Duration::from_millis(1_150)).await;
        assert!(waiter.is_finished(), "not idle an eighth past the timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_resolves_only_after_a_quiet_timeout() {
        let (a, mut b) = tokio::io::duplex(64);
        let (mut tracked, activity) = Tracked::new(a);
        let idle = activity.clone();
        let waiter = tokio::spawn(async move { idle.idle_for(Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_secs(8)).await;
        b.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        tracked.read_exact(&mut one).await.unwrap();
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert!(
            !waiter.is_finished(),
            "a byte at 8 s moved the deadline to 18 s"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(waiter.is_finished());
    }
}
