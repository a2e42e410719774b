//! Local rate limiting on the inbound side: a token bucket per workload, optionally one per
//! caller identity, answering `429` with response flag `RL` over the limit.
//!
//! Configured by the Bootstrap's `rateLimit` ([`RateLimitSettings`]), modelled on Linkerd's
//! `HTTPLocalRateLimitPolicy`; Envoy's `local_ratelimit` filter is the same bucket. The bucket
//! is [`governor`]'s GCRA: `requestsPerSecond` sustained, up to `burst` at once.
//!
//! ```
//! use std::time::Duration;
//! use mesh_core::config::bootstrap::RateLimitSettings;
//! use mesh_core::{ProxyError, ResponseFlags, body::BoxError};
//! use mesh_resilience::rate_limit::RateLimitLayer;
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let app = service_fn(|_req: http::Request<()>| async {
//!     Ok::<_, BoxError>(http::Response::new(()))
//! });
//! let settings = RateLimitSettings { requests_per_second: 2, burst: 2, per_principal: false };
//! let svc = RateLimitLayer::new(&settings).layer(app);
//!
//! // The burst goes through, the next request is refused...
//! for _ in 0..2 {
//!     svc.clone().oneshot(http::Request::new(())).await.unwrap();
//! }
//! let err = svc.clone().oneshot(http::Request::new(())).await.unwrap_err();
//! let err = ProxyError::find(&err).unwrap();
//! assert_eq!(err.flags(), ResponseFlags::RATE_LIMITED);
//! assert_eq!(err.status(), 429);
//! assert_eq!(
//!     err.to_string(),
//!     "rate limited: more than 2 requests per second (burst 2) to this workload"
//! );
//!
//! // ...until half a second has put one token back.
//! tokio::time::advance(Duration::from_millis(500)).await;
//! svc.clone().oneshot(http::Request::new(())).await.unwrap();
//! # }
//! ```
//!
//! # Choices
//!
//! - **One bucket per layer.** Every service the layer makes shares its buckets, so build the
//!   layer once per listener: a layer per connection would give each connection its own
//!   limit. Rebuilding the layer (a new Bootstrap) starts from full buckets.
//! - **Per principal.** With `perPrincipal`, a request carrying a verified caller identity
//!   draws from that identity's own bucket, of the same size. The identity is read as a
//!   [`mesh_core::Identity`] from the request's extensions: whichever layer verifies the peer
//!   (mTLS, on the inbound side) inserts it there, and nothing else may, since a
//!   client-supplied header must never pick a bucket. Callers without one (plain text, or
//!   before mTLS exists) share the workload's bucket, so they cannot exceed the limit between
//!   them. There is no cap over all principals together: Linkerd's separate `total` limit
//!   would need a second number, which this Bootstrap field does not have.
//! - **Without `perPrincipal`** identities are ignored: one bucket for the workload.
//! - **Bounded memory.** Per-principal buckets live in a map that is swept at most every
//!   [`CLEANUP_INTERVAL`] (by whichever request finds the sweep due; no background task):
//!   a bucket that has refilled completely is dropped, since a fresh one is the same. So the
//!   map holds the principals seen in the last `CLEANUP_INTERVAL` plus those whose bucket
//!   is still refilling (at most `burst / requestsPerSecond` seconds). Principals are
//!   identities the mesh's CA issued, so a caller cannot mint new keys at will.
//! - **The clock** is [`tokio::time::Instant`]: the real monotonic clock in production, and
//!   deterministic under paused tokio time in tests (`start_paused`, `advance`), which is
//!   how this module's tests drive 10 s of load in no time.
//! - **Where the check happens.** In `call`, since the bucket depends on the request. A
//!   refused request never reaches the inner service; a readiness the inner service
//!   reserved for it is released as for any request dropped before being called.
//! - A refused request fails with a boxed [`ProxyError`] (`RL`, 429) for `LocalReply` to
//!   answer; no `Retry-After` header (Linkerd and Envoy's local limit send none either).

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http::Request;
use mesh_core::body::BoxError;
use mesh_core::config::bootstrap::RateLimitSettings;
use mesh_core::{Identity, ProxyError, ResponseFlags};
use pin_project_lite::pin_project;

/// How often, at most, per-principal buckets that have refilled are dropped.
pub const CLEANUP_INTERVAL: Duration = Duration::from_secs(10);

/// Limits the request rate of every service it makes, together; see the module docs.
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    limits: Arc<Limits>,
}

impl RateLimitLayer {
    /// Buckets for `settings`, full. Validation keeps `requestsPerSecond` and `burst` in
    /// `1..=MAX_RATE_LIMIT`; a zero that got past it counts as 1.
    pub fn new(settings: &RateLimitSettings) -> Self {
        RateLimitLayer {
            limits: Arc::new(Limits::new(settings)),
        }
    }
}

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            limits: self.limits.clone(),
        }
    }
}

/// The service made by [`RateLimitLayer`].
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    limits: Arc<Limits>,
}

impl<S, B> tower::Service<Request<B>> for RateLimit<S>
where
    S: tower::Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        match self.limits.check(req.extensions().get::<Identity>()) {
            Ok(()) => ResponseFuture::Admitted {
                inner: self.inner.call(req),
            },
            Err(error) => ResponseFuture::Limited { error: Some(error) },
        }
    }
}

pin_project! {
    /// The future of [`RateLimit`]: the inner service's, or the refusal.
    #[project = Projection]
    #[derive(Debug)]
    pub enum ResponseFuture<F> {
        Admitted { #[pin] inner: F },
        Limited { error: Option<ProxyError> },
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projection::Admitted { inner } => inner.poll(cx).map_err(Into::into),
            Projection::Limited { error } => Poll::Ready(Err(match error.take() {
                Some(e) => e.into(),
                None => "rate limit future polled after completion".into(),
            })),
        }
    }
}

/// [`tokio::time::Instant`] as a governor clock, measured from the limiter's creation.
#[derive(Clone, Debug)]
struct TokioClock {
    start: tokio::time::Instant,
}

impl Clock for TokioClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        self.start.elapsed()
    }
}

type NoOp = NoOpMiddleware<Duration>;
type WorkloadLimiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOp>;
type PrincipalLimiter = RateLimiter<Identity, DefaultKeyedStateStore<Identity>, TokioClock, NoOp>;

/// The buckets one layer shares between its services.
#[derive(Debug)]
struct Limits {
    settings: RateLimitSettings,
    workload: WorkloadLimiter,
    principals: Option<PrincipalLimiter>,
    clock: TokioClock,
    /// Clock time (nanoseconds) from which the next sweep of `principals` is due.
    next_cleanup: AtomicU64,
}

impl Limits {
    fn new(settings: &RateLimitSettings) -> Self {
        let at_least_1 = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_second(at_least_1(settings.requests_per_second))
            .allow_burst(at_least_1(settings.burst));
        let clock = TokioClock {
            start: tokio::time::Instant::now(),
        };
        Limits {
            settings: *settings,
            workload: RateLimiter::direct_with_clock(quota, clock.clone()),
            principals: settings
                .per_principal
                .then(|| RateLimiter::hashmap_with_clock(quota, clock.clone())),
            clock,
            next_cleanup: AtomicU64::new(nanos(CLEANUP_INTERVAL)),
        }
    }

    /// Takes a token from the caller's bucket, or says why there is none.
    fn check(&self, caller: Option<&Identity>) -> Result<(), ProxyError> {
        let (admitted, from) = match (&self.principals, caller) {
            (Some(principals), Some(identity)) => {
                let admitted = principals.check_key(identity).is_ok();
                self.sweep_if_due(principals);
                (admitted, Some(identity))
            }
            _ => (self.workload.check().is_ok(), None),
        };
        if admitted {
            return Ok(());
        }
        let RateLimitSettings {
            requests_per_second: rps,
            burst,
            ..
        } = self.settings;
        let whom = match from {
            Some(identity) => format!("from {identity}"),
            None if self.principals.is_some() => "from callers without an identity".to_string(),
            None => "to this workload".to_string(),
        };
        Err(ProxyError::new(
            ResponseFlags::RATE_LIMITED,
            format_args!(
                "rate limited: more than {rps} requests per second (burst {burst}) {whom}"
            ),
        ))
    }

    /// Drops the refilled per-principal buckets if the last sweep is `CLEANUP_INTERVAL` old;
    /// one caller sweeps, the others go on.
    fn sweep_if_due(&self, principals: &PrincipalLimiter) {
        let now = nanos(self.clock.now());
        let due = self.next_cleanup.load(Ordering::Relaxed);
        if now >= due
            && self
                .next_cleanup
                .compare_exchange(
                    due,
                    now.saturating_add(nanos(CLEANUP_INTERVAL)),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            principals.retain_recent();
            principals.shrink_to_fit();
        }
    }

    #[cfg(test)]
    fn principal_buckets(&self) -> usize {
        self.principals.as_ref().map_or(0, PrincipalLimiter::len)
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(rps: u32, burst: u32, per_principal: bool) -> RateLimitSettings {
        RateLimitSettings {
            requests_per_second: rps,
            burst,
            per_principal,
        }
    }

    fn principal(i: usize) -> Identity {
        Identity::parse(&format!("spiffe://cluster.local/ns/default/sa/caller-{i}"))
            .expect("a SPIFFE ID")
    }

    #[tokio::test(start_paused = true)]
    async fn refilled_principal_buckets_are_swept() {
        let limits = Limits::new(&settings(10, 10, true));
        for i in 0..1000 {
            assert!(limits.check(Some(&principal(i))).is_ok());
        }
        assert_eq!(limits.principal_buckets(), 1000);
        // Not yet due: the sweep waits for CLEANUP_INTERVAL.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(limits.check(Some(&principal(0))).is_ok());
        assert_eq!(limits.principal_buckets(), 1000);
        // Due: every bucket but the one just used has refilled (10 tokens in 1 s) and goes.
        tokio::time::advance(CLEANUP_INTERVAL).await;
        assert!(limits.check(Some(&principal(1))).is_ok());
        assert_eq!(limits.principal_buckets(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_counts_as_one() {
        let limits = Limits::new(&settings(0, 0, false));
        assert!(limits.check(None).is_ok());
        assert!(limits.check(None).is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(limits.check(None).is_ok());
    }
}
