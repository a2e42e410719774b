//! Retries with Istio's semantics: per-try timeouts, `retryOn` conditions, jittered backoff,
//! a retry budget, replayable request bodies, and a preference for untried endpoints.
//!
//! The route's compiled policy ([`RouteTarget::retry`], Istio's default when the route sets
//! none) says how many times and on what; a shared [`RetryBudget`] says whether the service
//! can afford it right now.
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use mesh_core::body::{self, BoxBody, BoxError};
//! use mesh_resilience::budget::RetryBudget;
//! use mesh_resilience::retry::RetryLayer;
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! // An endpoint that answers 503 once, then 200.
//! let calls = Arc::new(AtomicUsize::new(0));
//! let seen = calls.clone();
//! let endpoint = service_fn(move |_req: http::Request<BoxBody>| {
//!     let n = seen.fetch_add(1, Ordering::SeqCst);
//!     async move {
//!         let status = if n == 0 { 503 } else { 200 };
//!         let mut resp = http::Response::new(body::empty());
//!         *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
//!         Ok::<_, BoxError>(resp)
//!     }
//! });
//! let svc = RetryLayer::new(Arc::new(RetryBudget::default())).layer(endpoint);
//!
//! let mut req = http::Request::new(body::full("payload"));
//! // Routing inserted the route's target: Istio's default policy retries 503 twice.
//! req.extensions_mut().insert(mesh_resilience::doc_support::route_target("reviews:9080"));
//! let resp = svc.oneshot(req).await.unwrap();
//! assert_eq!(resp.status(), 200);
//! assert_eq!(calls.load(Ordering::SeqCst), 2);
//! # }
//! ```
//!
//! # What is retried
//!
//! At most `1 + attempts` attempts. After each, the outcome is classified by the policy's
//! `retryOn` (Envoy's conditions):
//!
//! | token | retried outcome |
//! |---|---|
//! | `5xx` | any 5xx status; any connect failure, reset or per-try timeout |
//! | `gateway-error` | 502, 503, 504; any connect failure, reset or per-try timeout |
//! | `reset` | connect failure (`UF`), reset (`UC`, `UR`, `LR`, `UPE`), per-try timeout (`UT`) |
//! | `connect-failure`, `reset-before-request` | `UF` |
//! | `refused-stream` | an HTTP/2 `REFUSED_STREAM` reset |
//! | `retriable-4xx` | 409 |
//! | `retriable-status-codes`, bare codes | the policy's `status_codes` |
//! | `envoy-ratelimited` | a response carrying `x-envoy-ratelimited` |
//! | `cancelled`, `deadline-exceeded`, `resource-exhausted`, `internal`, `unavailable` | gRPC status 1, 4, 8, 13, 14, from the headers of a trailers-only response or from the trailers |
//!
//! Errors are classified by the [`ProxyError`] flags the stack below set; an error without a
//! `ProxyError` (a layer's bug) is never retried, nor are `UH`, `UO` or `NR`.
//! `retriable-headers` and `http3-post-connect-failure` are accepted by the config but have
//! nothing to act on here (no header list in the policy; no HTTP/3).
//!
//! # How
//!
//! - **Per-try timeout**: each attempt, until its response headers, is bounded by
//!   `perTryTimeout`; on expiry the attempt fails with `UT` (504), retried like a reset. The
//!   route timeout (the [`timeout`](crate::timeout) layer, outside this one) bounds all
//!   attempts together.
//! - **Backoff**: before retry `n`, a random wait in `[0, min(10·base, base·2^(n-1)))`, base
//!   = the policy's `backoff` (Envoy's 25 ms); see [`Backoff`].
//! - **Budget**: every request that could be retried deposits into the [`RetryBudget`];
//!   every retry withdraws. A refused withdrawal returns the failure in hand with `UO` added
//!   (Envoy flags a retry overflow `UO` and returns the upstream's response). Retries are
//!   checked against the attempt limit first, so a request that used all its attempts shows
//!   `URX`, not `UO`.
//! - **Exhausted**: when the last attempt's outcome is still retriable, it is returned with
//!   `URX` added: appended to a response's `x-mesh-response-flags`; for an error, a
//!   `ProxyError` with the original flags plus `URX`, the original status, and a message
//!   that says how many attempts were made. A final outcome that is not retriable is returned
//!   as it is.
//! - **Bodies**: a request body is streamed to the first attempt and copied as it goes, up to
//!   64 KiB ([`Replay`]); a longer body is not retried (unless no attempt read any of it, as
//!   after a connect failure). A body the client already ended (`GET`) is not wrapped at all.
//!   When a failed attempt's body cannot be replayed, its outcome is returned as it is.
//! - **gRPC trailers**: a gRPC response without `grpc-status` in its headers is read ahead
//!   for its trailers, up to 64 KiB and without waiting on a stream's later messages (see
//!   `peek`), when a gRPC condition is set and a retry is still possible. A larger or
//!   streaming response is passed through unretried. On the last attempt nothing is read
//!   ahead, so a trailer status there gets no `URX`: it would delay the response only to
//!   label it.
//! - **Endpoints**: every attempt carries one shared [`PreviousAttempts`]; the balancer should
//!   avoid the endpoints in it (see [`previous`](crate::previous)).
//! - **Not retried at all**: requests without a [`RouteTarget`], routes with `attempts: 0`
//!   or an empty `retryOn`, `CONNECT` (a tunnel), and HTTP/1.1 upgrades (`Connection:
//!   upgrade` with `Upgrade`, WebSocket say): the client's connection can be handed over to
//!   one attempt only. These go straight through with no allocation: the future is the inner
//!   one, wrapped in an enum.
//!
//! Every attempt is a fresh request made from the original's method, URI, version, headers and
//! extensions (cloned once per attempt) and the replayed body. The first attempt is sent from
//! `call`, on the service `poll_ready` readied, and polled in place by the pin-projected
//! [`ResponseFuture`] with its per-try timer; a request that succeeds the first time costs no
//! further allocation. Only when an outcome needs more (a retry, or reading a gRPC response
//! ahead) does the future move into one boxed `async` loop, whose later attempts wait for
//! readiness on a clone of the service.
//!
//! [`RouteTarget`]: mesh_core::target::RouteTarget
//! [`RouteTarget::retry`]: mesh_core::target::RouteTarget
//! [`Replay`]: crate::replay::Replay

mod backoff;
mod classify;
mod peek;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::request::Parts;
use http::{Method, Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::target::{RetryOn, RetryPolicy, RouteTarget};
use mesh_core::{ProxyError, ResponseFlags};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

pub use self::backoff::Backoff;
use self::classify::Verdict;
use crate::budget::{RetryBudget, RetryBudgets};
use crate::pool_limits::{CircuitBreakers, Permit, PoolLimits};
pub use crate::previous::PreviousAttempts;
use crate::replay::Replay;

/// How much of a gRPC response is read ahead for its trailers.
pub const RESPONSE_PEEK_LIMIT: usize = 64 * 1024;

/// Retries requests by their route's policy; see the module docs.
#[derive(Clone, Debug)]
pub struct RetryLayer {
    budget: BudgetScope,
    body_limit: usize,
    breakers: Option<Arc<CircuitBreakers>>,
}

/// Which budget a request's retries draw on.
#[derive(Clone, Debug)]
enum BudgetScope {
    /// One for every request of the layer.
    Shared(Arc<RetryBudget>),
    /// Its cluster's.
    PerCluster(Arc<RetryBudgets>),
}

impl BudgetScope {
    fn for_target(&self, target: &RouteTarget) -> Arc<RetryBudget> {
        match self {
            BudgetScope::Shared(budget) => budget.clone(),
            BudgetScope::PerCluster(budgets) => budgets.for_target(target),
        }
    }
}

impl RetryLayer {
    /// Retries drawing on `budget` (share one `Arc` across the layers that should share it);
    /// request bodies up to 64 KiB are replayable.
    pub fn new(budget: Arc<RetryBudget>) -> Self {
        Self::with_scope(BudgetScope::Shared(budget))
    }

    /// Retries drawing on their cluster's budget in `budgets`, configured by each cluster's
    /// DestinationRule `retryBudget` (what a sidecar wants; see [`RetryBudgets`]).
    pub fn per_cluster(budgets: Arc<RetryBudgets>) -> Self {
        Self::with_scope(BudgetScope::PerCluster(budgets))
    }

    fn with_scope(budget: BudgetScope) -> Self {
        RetryLayer {
            budget,
            body_limit: Replay::DEFAULT_LIMIT,
            breakers: None,
        }
    }

    /// Also bounds the retries in flight per cluster by the DestinationRule's
    /// `connectionPool.http.maxRetries` (Envoy's `max_retries` circuit breaker), counted in
    /// `breakers`; a retry past it is not made, and the failure is returned with `UO`.
    pub fn with_circuit_breakers(mut self, breakers: Arc<CircuitBreakers>) -> Self {
        self.breakers = Some(breakers);
        self
    }

    /// Changes how much of a request body is kept for replay.
    pub fn body_limit(mut self, limit: usize) -> Self {
        self.body_limit = limit;
        self
    }
}

impl<S> tower::Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            budget: self.budget.clone(),
            body_limit: self.body_limit,
            breakers: self.breakers.clone(),
        }
    }
}

/// The service made by [`RetryLayer`].
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    budget: BudgetScope,
    body_limit: usize,
    breakers: Option<Arc<CircuitBreakers>>,
}

impl<S> tower::Service<Request<BoxBody>> for Retry<S>
where
    S: tower::Service<Request<BoxBody>, Response = Response<BoxBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = ResponseFuture<S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<BoxBody>) -> Self::Future {
        let (policy, name, retry_limit, budget) = match req.extensions().get::<RouteTarget>() {
            Some(t) if retries_enabled(&t.retry) && !is_tunnel(&req) => {
                let limit = self.breakers.as_ref().and_then(|b| {
                    let limits = PoolLimits::for_target(t);
                    (limits.max_retries != usize::MAX).then(|| (b.clone(), limits))
                });
                (
                    t.retry.clone(),
                    t.name.clone(),
                    limit,
                    self.budget.for_target(t),
                )
            }
            _ => {
                return ResponseFuture {
                    kind: Kind::Once {
                        future: self.inner.call(req),
                    },
                };
            }
        };
        budget.deposit();

        let (mut parts, body) = req.into_parts();
        parts.extensions.insert(PreviousAttempts::default());
        let (replay, first_body) = if body.is_end_stream() {
            (None, body)
        } else {
            let (replay, first) = Replay::new(body, self.body_limit);
            (Some(replay), first.boxed_unsync())
        };
        // The readied service takes the first attempt; the clone waits for the next.
        let clone = self.inner.clone();
        let mut service = std::mem::replace(&mut self.inner, clone);
        let future = service.call(Request::from_parts(parts.clone(), first_body));
        let attempts = Attempts {
            service,
            parts,
            replay,
            policy,
            name,
            budget,
            retry_limit,
        };
        ResponseFuture {
            kind: Kind::First {
                future,
                per_try: attempts.per_try_timeout().map(tokio::time::sleep),
                attempts: Some(attempts),
            },
        }
    }
}

/// `CONNECT`, or an upgrade (`Connection: upgrade` and an `Upgrade` header): never replayed.
fn is_tunnel<B>(req: &Request<B>) -> bool {
    let headers = req.headers();
    req.method() == Method::CONNECT
        || (headers.contains_key(http::header::UPGRADE)
            && headers.get_all(http::header::CONNECTION).iter().any(|v| {
                v.to_str().is_ok_and(|v| {
                    v.split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
                })
            }))
}

fn retries_enabled(policy: &RetryPolicy) -> bool {
    policy.attempts > 0 && !policy.retry_on.is_empty()
}

type Outcome = Result<Response<BoxBody>, BoxError>;

pin_project! {
    /// Future of [`Retry`]. The first attempt is polled in place; only a request that needs
    /// another look (a retry, or a gRPC response's trailers) moves on to a boxed retry loop.
    pub struct ResponseFuture<S, F> {
        #[pin]
        kind: Kind<S, F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S, F> {
        /// Not retriable: the inner future as it is.
        Once { #[pin] future: F },
        /// The first attempt, bounded by the per-try timeout.
        First {
            #[pin]
            future: F,
            #[pin]
            per_try: Option<Sleep>,
            // `None` once the attempt has finished.
            attempts: Option<Attempts<S>>,
        },
        Retrying { future: BoxFuture<'static, Outcome> },
    }
}

impl<S, F> std::fmt::Debug for ResponseFuture<S, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            Kind::Once { .. } => "Once",
            Kind::First { .. } => "First",
            Kind::Retrying { .. } => "Retrying",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

impl<S, F> Future for ResponseFuture<S, F>
where
    S: tower::Service<Request<BoxBody>, Response = Response<BoxBody>, Error = BoxError, Future = F>
        + Send
        + 'static,
    F: Future<Output = Outcome> + Send + 'static,
{
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let mut kind = self.project().kind;
        loop {
            let retrying = match kind.as_mut().project() {
                KindProj::Once { future } => return future.poll(cx),
                KindProj::Retrying { future } => return future.as_mut().poll(cx),
                KindProj::First {
                    future,
                    mut per_try,
                    attempts,
                } => {
                    let outcome = match future.poll(cx) {
                        Poll::Ready(outcome) => outcome,
                        Poll::Pending => match per_try.as_mut().as_pin_mut() {
                            Some(sleep) => {
                                std::task::ready!(sleep.poll(cx));
                                Err(attempts.as_ref().map_or_else(
                                    || "upstream per-try timeout".into(),
                                    |a| a.per_try_timed_out(1),
                                ))
                            }
                            None => return Poll::Pending,
                        },
                    };
                    let Some(attempts) = attempts.take() else {
                        return Poll::Ready(Err("retry future polled after completion".into()));
                    };
                    let verdict = attempts.verdict(&outcome, 1);
                    if verdict == Verdict::Done {
                        return Poll::Ready(outcome);
                    }
                    let deadline = per_try.as_pin_mut().map(|sleep| sleep.deadline());
                    Box::pin(attempts.resume(outcome, verdict, deadline))
                }
            };
            kind.set(Kind::Retrying { future: retrying });
        }
    }
}

/// One request's retry state.
struct Attempts<S> {
    service: S,
    /// The original request without its body: every attempt is a clone.
    parts: Parts,
    /// `None`: the body was empty, and every attempt gets an empty one.
    replay: Option<Replay>,
    policy: Arc<RetryPolicy>,
    name: Arc<str>,
    budget: Arc<RetryBudget>,
    /// The circuit breakers and the route's limits, when its DestinationRule sets
    /// `maxRetries`; the cluster's counter is looked up only if a retry comes.
    retry_limit: Option<(Arc<CircuitBreakers>, PoolLimits)>,
}

impl<S> Attempts<S> {
    fn per_try_timeout(&self) -> Option<Duration> {
        self.policy.per_try_timeout.filter(|d| !d.is_zero())
    }

    fn per_try_timed_out(&self, attempt: u32) -> BoxError {
        let timeout = self.per_try_timeout().unwrap_or_default();
        ProxyError::new(
            ResponseFlags::UPSTREAM_REQUEST_TIMEOUT,
            format_args!(
                "upstream per-try timeout: {} after {timeout:?} (attempt {attempt})",
                self.name
            ),
        )
        .into()
    }

    /// The decision on attempt `attempt`'s outcome. A gRPC response is read ahead for its
    /// trailers only while a retry could follow.
    fn verdict(&self, outcome: &Outcome, attempt: u32) -> Verdict {
        let on = &self.policy.retry_on;
        match outcome {
            Ok(response) => classify::response(on, response, attempt <= self.policy.attempts),
            Err(e) if classify::error(on, e) => Verdict::Retry,
            Err(_) => Verdict::Done,
        }
    }

    /// Carries on from the first attempt's outcome, which was not `Done`; `deadline` is that
    /// attempt's per-try deadline.
    // Generic over the future type rather than naming `S::Future`: held across `.await`, a
    // projection through `Service<Request<BoxBody>>` trips the compiler's `Send` inference.
    async fn resume<F>(
        mut self,
        mut outcome: Outcome,
        mut verdict: Verdict,
        mut deadline: Option<Instant>,
    ) -> Outcome
    where
        S: tower::Service<
                Request<BoxBody>,
                Response = Response<BoxBody>,
                Error = BoxError,
                Future = F,
            >,
        F: Future<Output = Outcome>,
    {
        let max = self.policy.attempts.saturating_add(1);
        let backoff = Backoff::new(self.policy.backoff);
        let mut attempt = 1;
        // The slot of the retry in flight, if the cluster counts them.
        let mut _retry_slot: Option<Permit> = None;
        loop {
            let retriable = match verdict {
                Verdict::Done => false,
                Verdict::Retry => true,
                Verdict::PeekTrailers => {
                    let peeked;
                    (peeked, outcome) =
                        Box::pin(peek_outcome(outcome, &self.policy.retry_on, deadline)).await;
                    peeked
                }
            };
            if !retriable {
                return outcome;
            }
            if !self.replay.as_ref().is_none_or(Replay::is_replayable) {
                tracing::debug!(service = %self.name, attempt, "not retried: request body cannot be replayed");
                return outcome;
            }
            if attempt >= max {
                return flagged(
                    outcome,
                    ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED,
                    format_args!("retry limit exceeded after {attempt} attempts"),
                );
            }
            if let Some((breakers, limits)) = &self.retry_limit {
                _retry_slot = None;
                match breakers.cluster(&self.name).try_retry(limits) {
                    Some(slot) => _retry_slot = Some(slot),
                    None => {
                        tracing::debug!(service = %self.name, attempt, "not retried: maxRetries in flight");
                        return flagged(
                            outcome,
                            ResponseFlags::UPSTREAM_OVERFLOW,
                            format_args!(
                                "retry overflow: {} retries already in flight (maxRetries)",
                                limits.max_retries
                            ),
                        );
                    }
                }
            }
            if !self.budget.withdraw() {
                tracing::debug!(service = %self.name, attempt, "not retried: retry budget exhausted");
                return flagged(
                    outcome,
                    ResponseFlags::UPSTREAM_OVERFLOW,
                    format_args!("retry budget exhausted: attempt {attempt} not retried"),
                );
            }
            let body = match &self.replay {
                None => body::empty(),
                Some(replay) => match replay.next_body() {
                    Some(body) => body.boxed_unsync(),
                    None => return outcome,
                },
            };
            // Release the failed response (and its connection) before waiting.
            drop(outcome);
            let delay = backoff.delay(attempt);
            tracing::debug!(service = %self.name, attempt, ?delay, "retrying");
            if !delay.is_zero() {
                // Boxed, like the read-ahead: only the retries that wait pay for its space.
                Box::pin(tokio::time::sleep(delay)).await;
            }
            self.service.ready().await?;
            let future = self
                .service
                .call(Request::from_parts(self.parts.clone(), body));
            attempt += 1;
            deadline = self.per_try_timeout().map(|d| Instant::now() + d);
            outcome = match deadline {
                Some(at) => match tokio::time::timeout_at(at, future).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(self.per_try_timed_out(attempt)),
                },
                None => future.await,
            };
            verdict = self.verdict(&outcome, attempt);
        }
    }
}

/// Reads a gRPC response ahead for its trailers (see `peek`); whether their status is
/// retried, and the response to hand on.
async fn peek_outcome(
    outcome: Outcome,
    on: &RetryOn,
    deadline: Option<Instant>,
) -> (bool, Outcome) {
    match outcome {
        Ok(response) => {
            let (response, trailers) =
                peek::trailers(response, RESPONSE_PEEK_LIMIT, deadline).await;
            let retriable = trailers.is_some_and(|t| classify::grpc(on, &t) == Some(true));
            (retriable, Ok(response))
        }
        Err(e) => (false, Err(e)),
    }
}

/// The outcome with `flag` added: to a response's `x-mesh-response-flags`, or to an error's
/// [`ProxyError`], keeping its status and noting `why` in its message.
fn flagged(outcome: Outcome, flag: ResponseFlags, why: std::fmt::Arguments<'_>) -> Outcome {
    match outcome {
        Ok(mut response) => {
            flag.append_to(response.headers_mut());
            Ok(response)
        }
        Err(e) => match ProxyError::find(&e) {
            Some(p) => Err(
                ProxyError::new(p.flags() | flag, format_args!("{p} ({why})"))
                    .with_status(p.status())
                    .into(),
            ),
            None => Err(e),
        },
    }
}

#[cfg(test)]
mod tests;
