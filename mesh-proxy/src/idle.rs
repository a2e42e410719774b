//! Connection idle timeouts: a stream wrapper that notes when bytes last moved, and a future
//! that resolves once none have for a given time.
//!
//! hyper's server has a header-read timeout but no idle timeout for keep-alive connections,
//! and Istio closes a connection idle for an hour (its `idleTimeout` default). Tracking at the
//! byte level covers HTTP/1 keep-alive gaps and silent HTTP/2 connections alike; a request
//! whose body or response stalls for the whole timeout is cut too, as Envoy's stream idle
//! timeout (shorter, 5 min) would.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

pin_project_lite::pin_project! {
    /// `IO`, noting in its [`Activity`] every read or write that moves bytes.
    pub struct Tracked<IO> {
        #[pin]
        io: IO,
        activity: Activity,
    }
}

/// When a [`Tracked`] stream last moved bytes.
#[derive(Clone, Debug)]
pub struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last read or write.
    last_ms: Arc<AtomicU64>,
}

impl<IO> Tracked<IO> {
    pub fn new(io: IO) -> (Tracked<IO>, Activity) {
        let activity = Activity {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
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
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Resolves once no byte has moved for `timeout`.
    pub async fn idle_for(&self, timeout: Duration) {
        loop {
            let deadline = self.last() + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
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
