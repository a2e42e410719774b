//! In-process end-to-end runs of `RequestTimeout → Retry` over `service_fn` endpoints, on
//! paused tokio time so that request rates and long outages run in milliseconds.
#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::flags::RESPONSE_FLAGS_HEADER;
use mesh_core::{ProxyError, ResponseFlags};
use mesh_resilience::doc_support::route_target;
use mesh_resilience::{RequestTimeoutLayer, RetryBudget, RetryLayer};
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

type Svc = BoxCloneService<Request<BoxBody>, Response<BoxBody>, BoxError>;

/// The client side of the stack over `endpoint`, with the default budget.
fn stack<F, Fut>(endpoint: F) -> (Svc, Arc<AtomicUsize>)
where
    F: Fn(Request<BoxBody>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Response<BoxBody>, BoxError>> + Send + 'static,
{
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let endpoint = service_fn(move |req| {
        counter.fetch_add(1, Ordering::SeqCst);
        endpoint(req)
    });
    let svc = ServiceBuilder::new()
        .layer(RequestTimeoutLayer)
        .layer(RetryLayer::new(Arc::new(RetryBudget::default())))
        .service(endpoint);
    (BoxCloneService::new(svc), calls)
}

fn status(code: u16) -> Response<BoxBody> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::from_u16(code).unwrap();
    resp
}

/// A request routed with Istio's defaults (2 retries on 503 and connect failures, no timeout).
fn request() -> Request<BoxBody> {
    let mut req = Request::new(body::empty());
    req.extensions_mut().insert(route_target("reviews:9080"));
    req
}

/// Sends `n` requests at `per_sec` on average, each in its own task; returns the final
/// statuses (errors rendered as their local reply's status) and the time from the first
/// request to the last answer. Arrivals are irregular (gaps alternate between 0.7 and 1.3
/// times the mean), as real traffic is.
async fn load(svc: &Svc, n: usize, per_sec: u64) -> (Vec<StatusCode>, Duration) {
    let start = Instant::now();
    let mean = Duration::from_nanos(1_000_000_000 / per_sec);
    let mut tasks = Vec::with_capacity(n);
    let mut at = start;
    for i in 0..n {
        tokio::time::sleep_until(at).await;
        at += if i % 2 == 0 {
            mean * 7 / 10
        } else {
            mean * 13 / 10
        };
        // Called here, so that the task holds only the boxed response future.
        let mut svc = svc.clone();
        let response = svc.ready().await.unwrap().call(request());
        tasks.push(tokio::spawn(async move {
            match response.await {
                Ok(resp) => resp.status(),
                Err(e) => ProxyError::find(&e).map_or(StatusCode::BAD_GATEWAY, |e| e.status()),
            }
        }));
    }
    let mut statuses = Vec::with_capacity(n);
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    (statuses, start.elapsed())
}

#[tokio::test(start_paused = true)]
async fn ten_percent_503s_are_hidden_by_default_retries() {
    let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(5)));
    let (svc, calls) = stack(move |_req| {
        let fail = rng.lock().unwrap().f64() < 0.10;
        async move { Ok(status(if fail { 503 } else { 200 })) }
    });
    let (statuses, _) = load(&svc, 2_000, 200).await;
    let ok = statuses.iter().filter(|s| s.is_success()).count();
    assert!(ok * 1000 >= 2_000 * 995, "{ok} of 2000 succeeded");
    // The retries stayed near the failure rate: about 10 % + 1 % more calls.
    let calls = calls.load(Ordering::SeqCst);
    assert!(calls < 2_000 * 115 / 100, "{calls} calls");
}

/// The budget's minimum is a reserve for each 10 s window (Linkerd's: a fresh budget has 100
/// retries at once, each given back 10 s after it was spent), so "10/s" holds over whole
/// windows: the run spans three of them, 3 000 requests at 100/s.
#[tokio::test(start_paused = true)]
async fn a_dead_endpoint_gets_at_most_the_budget_in_retries() {
    let (svc, calls) = stack(|_req| async { Ok(status(503)) });
    let (n, per_sec) = (3_000, 100);
    let (statuses, elapsed) = load(&svc, n, per_sec).await;
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::SERVICE_UNAVAILABLE)
    );
    let calls = calls.load(Ordering::SeqCst);
    // The client's 30 s of traffic: 1.2 × 3 000 + 10/s × 30 s.
    let seconds = (n as u64 / per_sec) as usize;
    let bound = n * 12 / 10 + 10 * seconds;
    assert!(
        calls <= bound,
        "{calls} calls for {n} requests over {elapsed:?}: bound {bound}"
    );
    // Without a budget it would be 3 × n: the budget, not the policy, did the limiting, and
    // it allowed what it promised (the reserve comes back at ≥ 10 s and ≥ 20 s, not before).
    assert!(
        calls + 5 >= bound,
        "{calls} calls: the budget was not used up"
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_endpoint_behind_a_route_timeout_is_a_504_ut_at_the_timeout() {
    let (svc, calls) = stack(|_req| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok(status(200))
    });
    let mut req = request();
    let target = req
        .extensions_mut()
        .get_mut::<mesh_core::target::RouteTarget>()
        .unwrap();
    target.timeout = Some(Duration::from_secs(1));
    let start = Instant::now();
    let err = svc.oneshot(req).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let err = ProxyError::find(&err).unwrap();
    assert_eq!(err.flags(), ResponseFlags::UPSTREAM_REQUEST_TIMEOUT);
    assert_eq!(err.status(), StatusCode::GATEWAY_TIMEOUT);
    // What the edge's LocalReply answers.
    let reply = err.flags().local_reply(err.status(), err);
    assert_eq!(reply.status(), 504);
    assert_eq!(reply.headers()[RESPONSE_FLAGS_HEADER], "UT");
}
