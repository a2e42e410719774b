use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::HeaderMap;
use http_body::Frame;
use http_body_util::BodyExt;
use mesh_core::flags::RESPONSE_FLAGS_HEADER;
use mesh_core::target::{RetryOn, UpstreamTarget};
use tower::{Layer, Service, ServiceExt};

use super::*;
use crate::test_support::{GRPC_TOKENS, endpoint, frames_body, policy, request, status};

fn layer() -> RetryLayer {
    RetryLayer::new(Arc::new(RetryBudget::default()))
}

fn flags_of(resp: &Response<BoxBody>) -> Option<&str> {
    resp.headers()
        .get(RESPONSE_FLAGS_HEADER)
        .and_then(|v| v.to_str().ok())
}

fn proxy_error(err: &BoxError) -> &ProxyError {
    ProxyError::find(err).expect("a ProxyError")
}

/// Asserts `err` is a `ProxyError` with exactly `flags`, `status`, and a message that starts
/// with `message`.
fn assert_proxy_error(err: &BoxError, flags: ResponseFlags, status: u16, message: &str) {
    let err = proxy_error(err);
    assert_eq!(err.flags(), flags);
    assert_eq!(err.status(), status);
    let text = err.to_string();
    assert!(text.starts_with(message), "{text}");
}

fn connect_failed() -> BoxError {
    ProxyError::connect_failed("reviews:9080", "10.0.0.1:9080", "connection refused").into()
}

fn remote_reset() -> BoxError {
    ProxyError::new(
        ResponseFlags::UPSTREAM_REMOTE_RESET,
        "upstream error: reviews:9080 endpoint 10.0.0.1:9080: connection reset",
    )
    .into()
}

fn grpc(status: Option<&str>, body: BoxBody) -> Response<BoxBody> {
    let mut b = Response::builder().header("content-type", "application/grpc");
    if let Some(s) = status {
        b = b.header("grpc-status", s);
    }
    b.body(body).unwrap()
}

fn grpc_trailers(code: &str) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", code.parse().unwrap());
    t
}

/// An endpoint that answers 200 after 10 s.
async fn slow(_: usize, _: Request<BoxBody>) -> Outcome {
    tokio::time::sleep(Duration::from_secs(10)).await;
    Ok(status(200))
}

/// Sends one request for `policy` through the retry layer over an endpoint answering each
/// call with `answer`; returns the outcome and the number of calls.
async fn run<F, Fut>(policy: RetryPolicy, body: BoxBody, answer: F) -> (Outcome, usize)
where
    F: Fn(usize, Request<BoxBody>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let (svc, calls) = endpoint(answer);
    let outcome = layer().layer(svc).oneshot(request(policy, body)).await;
    (outcome, calls.load(Ordering::SeqCst))
}

/// [`run`] with an endpoint answering `first` on its first call and 200 after.
async fn first_then_ok(policy: RetryPolicy, first: fn() -> Outcome) -> (Outcome, usize) {
    run(policy, body::empty(), move |n, _| async move {
        if n == 0 { first() } else { Ok(status(200)) }
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn each_status_token_is_retried_and_others_are_not() {
    for (retry_on, retried, not_retried) in [
        ("5xx", 500, 404),
        ("5xx", 599, 429),
        ("gateway-error", 502, 500),
        ("gateway-error", 504, 501),
        ("retriable-4xx", 409, 404),
        ("retriable-status-codes,429", 429, 503),
        ("418", 418, 500),
    ] {
        let p = policy(retry_on, 2);
        let (outcome, calls) = run(p.clone(), body::empty(), move |n, _| async move {
            Ok(status(if n == 0 { retried } else { 200 }))
        })
        .await;
        assert_eq!(outcome.unwrap().status(), 200, "{retry_on} {retried}");
        assert_eq!(calls, 2, "{retry_on} {retried}");

        let (outcome, calls) = run(p, body::empty(), move |_, _| async move {
            Ok(status(not_retried))
        })
        .await;
        let resp = outcome.unwrap();
        assert_eq!(resp.status(), not_retried, "{retry_on} {not_retried}");
        assert_eq!(flags_of(&resp), None, "not retriable: no URX");
        assert_eq!(calls, 1, "{retry_on} {not_retried}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_default_policy_retries_503_twice() {
    let (outcome, calls) = run(RetryPolicy::istio_default(), body::empty(), |_, _| async {
        Ok(status(503))
    })
    .await;
    let resp = outcome.unwrap();
    assert_eq!((resp.status().as_u16(), calls), (503, 3));
    assert_eq!(flags_of(&resp), Some("URX"));
    // 500 is not in Istio's default.
    let (outcome, calls) = run(RetryPolicy::istio_default(), body::empty(), |_, _| async {
        Ok(status(500))
    })
    .await;
    assert_eq!((outcome.unwrap().status().as_u16(), calls), (500, 1));
}

#[tokio::test(start_paused = true)]
async fn grpc_status_in_the_headers_of_a_trailers_only_response() {
    for (token, code) in GRPC_TOKENS {
        let (outcome, calls) = run(policy(token, 2), body::empty(), move |n, _| async move {
            let code = if n == 0 { code } else { "0" };
            Ok(grpc(Some(code), body::empty()))
        })
        .await;
        assert_eq!(outcome.unwrap().headers()["grpc-status"], "0", "{token}");
        assert_eq!(calls, 2, "{token}");
    }
    // A status no token names: not retried.
    let (outcome, calls) = run(policy("unavailable", 2), body::empty(), |_, _| async {
        Ok(grpc(Some("3"), body::empty()))
    })
    .await;
    assert_eq!(
        (outcome.unwrap().headers()["grpc-status"].clone(), calls),
        ("3".parse().unwrap(), 1)
    );
}

#[tokio::test(start_paused = true)]
async fn grpc_status_in_trailers() {
    let (outcome, calls) = run(policy("unavailable", 2), body::empty(), |n, _| async move {
        let code = if n == 0 { "14" } else { "0" };
        let body = frames_body(vec![
            Frame::data(Bytes::from(format!("reply {n}"))),
            Frame::trailers(grpc_trailers(code)),
        ]);
        Ok(grpc(None, body))
    })
    .await;
    assert_eq!(calls, 2);
    // The response read ahead reaches the client whole.
    let collected = outcome.unwrap().into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
    assert_eq!(collected.to_bytes(), "reply 1");

    // Exhausted on trailer statuses: the last one is not read ahead, so no URX.
    let (outcome, calls) = run(policy("internal", 1), body::empty(), |_, _| async {
        let body = frames_body(vec![
            Frame::data(Bytes::from("x")),
            Frame::trailers(grpc_trailers("13")),
        ]);
        Ok(grpc(None, body))
    })
    .await;
    let resp = outcome.unwrap();
    assert_eq!((flags_of(&resp), calls), (None, 2));
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "13");
}

#[tokio::test(start_paused = true)]
async fn a_large_grpc_response_passes_through_unretried() {
    let (outcome, calls) = run(policy("unavailable", 2), body::empty(), |_, _| async {
        let body = frames_body(vec![
            Frame::data(Bytes::from(vec![b'a'; 40 * 1024])),
            Frame::data(Bytes::from(vec![b'b'; 40 * 1024])),
            Frame::trailers(grpc_trailers("14")),
        ]);
        Ok(grpc(None, body))
    })
    .await;
    assert_eq!(calls, 1);
    let collected = outcome.unwrap().into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "14");
    assert_eq!(collected.to_bytes().len(), 80 * 1024);
}

#[tokio::test(start_paused = true)]
async fn connect_failure_versus_reset() {
    // Istio's default retries connect failures...
    let (outcome, calls) =
        first_then_ok(RetryPolicy::istio_default(), || Err(connect_failed())).await;
    assert_eq!((outcome.unwrap().status().as_u16(), calls), (200, 2));
    // ...but not resets.
    let (outcome, calls) =
        first_then_ok(RetryPolicy::istio_default(), || Err(remote_reset())).await;
    let err = outcome.unwrap_err();
    assert_eq!(
        proxy_error(&err).flags(),
        ResponseFlags::UPSTREAM_REMOTE_RESET
    );
    assert_eq!(calls, 1);
    // `reset` retries both.
    for first in [(|| Err(connect_failed())) as fn() -> Outcome, || {
        Err(remote_reset())
    }] {
        let (outcome, calls) = first_then_ok(policy("reset", 2), first).await;
        assert_eq!((outcome.unwrap().status().as_u16(), calls), (200, 2));
    }
    // `connect-failure` alone does not retry a reset.
    let (outcome, calls) =
        first_then_ok(policy("connect-failure", 2), || Err(remote_reset())).await;
    assert!(outcome.is_err());
    assert_eq!(calls, 1);
}

#[tokio::test(start_paused = true)]
async fn refused_stream_from_the_h2_reason() {
    fn refused() -> Outcome {
        Err(ProxyError::new(
            ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
            "upstream error: reviews:9080 endpoint 10.0.0.1:9080: operation was canceled: stream error received: refused stream before processing any application logic",
        )
        .into())
    }
    let (outcome, calls) = first_then_ok(policy("refused-stream", 2), refused).await;
    assert_eq!((outcome.unwrap().status().as_u16(), calls), (200, 2));
}

#[tokio::test(start_paused = true)]
async fn exhausted_errors_carry_urx_beside_their_flag() {
    let (outcome, calls) = run(RetryPolicy::istio_default(), body::empty(), |_, _| async {
        Err(connect_failed())
    })
    .await;
    assert_eq!(calls, 3);
    let err = outcome.unwrap_err();
    assert_proxy_error(
        &err,
        ResponseFlags::UPSTREAM_CONNECTION_FAILURE | ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED,
        503,
        "upstream connect error: reviews:9080 endpoint 10.0.0.1:9080: connection refused (retry limit exceeded after 3 attempts)",
    );
}

#[tokio::test(start_paused = true)]
async fn exhausted_responses_append_urx_after_a_peers_flags() {
    let (outcome, calls) = run(RetryPolicy::istio_default(), body::empty(), |_, _| async {
        let mut resp = status(503);
        ResponseFlags::UPSTREAM_CONNECTION_FAILURE.append_to(resp.headers_mut());
        Ok(resp)
    })
    .await;
    let resp = outcome.unwrap();
    assert_eq!((resp.status().as_u16(), calls), (503, 3));
    assert_eq!(flags_of(&resp), Some("UF,URX"));
}

#[tokio::test(start_paused = true)]
async fn per_try_timeout_bounds_each_attempt_and_is_retried() {
    let mut p = policy("reset", 2);
    p.per_try_timeout = Some(Duration::from_millis(100));
    let start = Instant::now();
    let (outcome, calls) = run(p.clone(), body::empty(), |n, req| async move {
        if n == 0 {
            return slow(n, req).await;
        }
        Ok(status(200))
    })
    .await;
    assert_eq!((outcome.unwrap().status().as_u16(), calls), (200, 2));
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(100) && elapsed <= Duration::from_millis(125),
        "{elapsed:?}: one per-try timeout and one backoff below 25 ms (tokio rounds timers up to a whole ms)"
    );

    // Every attempt times out: UT (504) with URX.
    let start = Instant::now();
    let (outcome, calls) = run(p, body::empty(), slow).await;
    assert_eq!(calls, 3);
    let elapsed = start.elapsed();
    // Three per-try timeouts and two backoffs below 25 and 50 ms, rounded up to whole ms.
    assert!(elapsed >= Duration::from_millis(300) && elapsed <= Duration::from_millis(375));
    let err = outcome.unwrap_err();
    assert_proxy_error(
        &err,
        ResponseFlags::UPSTREAM_REQUEST_TIMEOUT | ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED,
        504,
        "upstream per-try timeout: reviews:9080 after 100ms (attempt 3) (retry limit exceeded after 3 attempts)",
    );
}

#[tokio::test(start_paused = true)]
async fn per_try_timeout_is_not_retried_under_the_default_policy() {
    let mut p = RetryPolicy::istio_default();
    p.per_try_timeout = Some(Duration::from_millis(100));
    let (outcome, calls) = run(p, body::empty(), slow).await;
    assert_eq!(calls, 1);
    let err = outcome.unwrap_err();
    assert_eq!(
        proxy_error(&err).flags(),
        ResponseFlags::UPSTREAM_REQUEST_TIMEOUT
    );
}

#[tokio::test(start_paused = true)]
async fn the_route_timeout_covers_every_attempt() {
    use crate::timeout::RequestTimeoutLayer;
    let mut p = policy("reset", 5);
    p.per_try_timeout = Some(Duration::from_millis(400));
    let mut req = request(p, body::empty());
    if let Some(t) = req.extensions_mut().get_mut::<RouteTarget>() {
        t.timeout = Some(Duration::from_secs(1));
    }
    let (svc, calls) = endpoint(slow);
    let svc = RequestTimeoutLayer.layer(layer().layer(svc));
    let start = Instant::now();
    let err = svc.oneshot(req).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "400 ms + 400 ms + part of a third"
    );
    assert_proxy_error(
        &err,
        ResponseFlags::UPSTREAM_REQUEST_TIMEOUT,
        504,
        "upstream request timeout: reviews:9080 after 1s",
    );
}

/// A streamed body of `len` bytes in 1 KiB chunks, with no size hint.
fn streamed(len: usize) -> BoxBody {
    let chunks = (0..len)
        .step_by(1024)
        .map(|i| Frame::data(Bytes::from(vec![(i / 1024 % 251) as u8; 1024.min(len - i)])))
        .collect();
    frames_body(chunks)
}

#[tokio::test(start_paused = true)]
async fn bodies_within_64k_are_replayed() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let (outcome, calls) = run(policy("503", 2), streamed(64 * 1024), move |n, req| {
        let log = log.clone();
        async move {
            let bytes = req.into_body().collect().await?.to_bytes();
            log.lock().unwrap().push(bytes);
            Ok(status(if n == 0 { 503 } else { 200 }))
        }
    })
    .await;
    assert_eq!((outcome.unwrap().status().as_u16(), calls), (200, 2));
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].len(), 64 * 1024);
    assert_eq!(seen[0], seen[1]);
}

#[tokio::test(start_paused = true)]
async fn bodies_beyond_64k_are_not_retried() {
    let (outcome, calls) = run(
        policy("503", 2),
        streamed(64 * 1024 + 1),
        |_, req| async move {
            req.into_body().collect().await?;
            Ok(status(503))
        },
    )
    .await;
    let resp = outcome.unwrap();
    assert_eq!((resp.status().as_u16(), calls), (503, 1));
    assert_eq!(
        flags_of(&resp),
        None,
        "not retried, so not exhausted either"
    );
}

#[tokio::test(start_paused = true)]
async fn an_unsent_large_body_is_retried_after_a_connect_failure() {
    let (outcome, calls) = run(
        RetryPolicy::istio_default(),
        streamed(200 * 1024),
        |n, req| async move {
            if n == 0 {
                return Err(connect_failed());
            }
            let len = req.into_body().collect().await?.to_bytes().len();
            Ok(status(if len == 200 * 1024 { 200 } else { 400 }))
        },
    )
    .await;
    assert_eq!((outcome.unwrap().status().as_u16(), calls), (200, 2));
}

#[tokio::test(start_paused = true)]
async fn a_refused_retry_returns_the_original_failure() {
    let broke = || Arc::new(RetryBudget::new(Duration::from_secs(1), 0, 0.0).unwrap());
    let (svc, calls) = endpoint(|_, _| async {
        let mut resp = status(503);
        resp.headers_mut()
            .insert("x-app", "original".parse().unwrap());
        Ok(resp)
    });
    let resp = RetryLayer::new(broke())
        .layer(svc)
        .oneshot(request(RetryPolicy::istio_default(), body::empty()))
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-app"], "original");
    assert_eq!(flags_of(&resp), Some("UO"), "Envoy's retry overflow");

    let (svc, calls) = endpoint(|_, _| async { Err(connect_failed()) });
    let err = RetryLayer::new(broke())
        .layer(svc)
        .oneshot(request(RetryPolicy::istio_default(), body::empty()))
        .await
        .unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_proxy_error(
        &err,
        ResponseFlags::UPSTREAM_CONNECTION_FAILURE | ResponseFlags::UPSTREAM_OVERFLOW,
        503,
        "upstream connect error: reviews:9080 endpoint 10.0.0.1:9080: connection refused (retry budget exhausted: attempt 1 not retried)",
    );
}

#[tokio::test(start_paused = true)]
async fn the_budget_counts_requests_and_retries() {
    // 0/s minimum, one retry per two requests.
    let budget = Arc::new(RetryBudget::new(Duration::from_secs(10), 0, 0.5).unwrap());
    let (svc, calls) = endpoint(|_, _| async { Ok(status(503)) });
    let svc = RetryLayer::new(budget).layer(svc);
    for _ in 0..10 {
        let req = request(policy("503", 1), body::empty());
        svc.clone().oneshot(req).await.unwrap();
    }
    // 10 requests deposited 5 retries' worth.
    assert_eq!(calls.load(Ordering::SeqCst), 15);
}

#[tokio::test(start_paused = true)]
async fn backoff_waits_are_jittered_below_their_ceilings() {
    let mut p = policy("503", 6);
    p.backoff = Duration::from_millis(25);
    let ceilings = Backoff::new(p.backoff);
    let mut max_gap = [Duration::ZERO; 6];
    for _ in 0..100 {
        let times = Arc::new(Mutex::new(Vec::new()));
        let log = times.clone();
        let (outcome, calls) = run(p.clone(), body::empty(), move |_, _| {
            log.lock().unwrap().push(Instant::now());
            async { Ok(status(503)) }
        })
        .await;
        assert_eq!(outcome.unwrap().status(), 503);
        assert_eq!(calls, 7);
        let times = times.lock().unwrap();
        for (i, pair) in times.windows(2).enumerate() {
            let gap = pair[1] - pair[0];
            // The draw is below the ceiling; tokio's timer rounds it up to a whole ms.
            assert!(
                gap <= ceilings.ceiling(i as u32 + 1),
                "retry {}: {gap:?}",
                i + 1
            );
            max_gap[i] = max_gap[i].max(gap);
        }
    }
    // Over 100 requests each retry's wait came near its ceiling: 25, 50, 100, 200, 250, 250 ms.
    for (i, gap) in max_gap.iter().enumerate() {
        assert!(
            *gap > ceilings.ceiling(i as u32 + 1) * 9 / 10,
            "retry {}: {gap:?}",
            i + 1
        );
    }
}

#[tokio::test(start_paused = true)]
async fn requests_that_cannot_be_retried_pass_straight_through() {
    let tried_marker =
        |req: &Request<BoxBody>| req.extensions().get::<PreviousAttempts>().is_some();
    let answer = move |_, req: Request<BoxBody>| {
        let marked = tried_marker(&req);
        async move {
            assert!(!marked, "no PreviousAttempts when nothing can be retried");
            Ok(status(503))
        }
    };
    // attempts: 0, an empty retryOn.
    for p in [RetryPolicy::none(), policy("", 2)] {
        let (outcome, calls) = run(p, body::empty(), answer).await;
        assert_eq!((flags_of(&outcome.unwrap()), calls), (None, 1));
    }
    // No route target.
    let (svc, calls) = endpoint(answer);
    let resp = layer()
        .layer(svc)
        .oneshot(Request::new(body::empty()))
        .await
        .unwrap();
    assert_eq!(
        (resp.status().as_u16(), calls.load(Ordering::SeqCst)),
        (503, 1)
    );
    // CONNECT opens a tunnel.
    let (svc, calls) = endpoint(answer);
    let mut req = request(RetryPolicy::istio_default(), body::empty());
    *req.method_mut() = Method::CONNECT;
    let resp = layer().layer(svc).oneshot(req).await.unwrap();
    assert_eq!(
        (resp.status().as_u16(), calls.load(Ordering::SeqCst)),
        (503, 1)
    );
    // An upgrade (WebSocket) hands the client's connection to one attempt.
    let (svc, calls) = endpoint(answer);
    let mut req = request(RetryPolicy::istio_default(), body::empty());
    req.headers_mut()
        .insert("connection", "Upgrade".parse().unwrap());
    req.headers_mut()
        .insert("upgrade", "websocket".parse().unwrap());
    let resp = layer().layer(svc).oneshot(req).await.unwrap();
    assert_eq!(
        (resp.status().as_u16(), calls.load(Ordering::SeqCst)),
        (503, 1)
    );
    assert!(matches!(
        layer()
            .layer(endpoint(answer).0)
            .call(Request::new(body::empty()))
            .kind,
        Kind::Once { .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn every_attempt_carries_the_original_request() {
    let (svc, calls) = endpoint(|n, req: Request<BoxBody>| async move {
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.uri(), "http://reviews:9080/ratings?x=1");
        assert_eq!(req.headers()["x-request-id"], "abc");
        assert!(req.extensions().get::<RouteTarget>().is_some());
        assert_eq!(req.body().size_hint().exact(), Some(2));
        assert_eq!(req.into_body().collect().await?.to_bytes(), "{}");
        Ok(status(if n < 2 { 503 } else { 200 }))
    });
    let mut req = request(RetryPolicy::istio_default(), body::full("{}"));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = "http://reviews:9080/ratings?x=1".parse().unwrap();
    req.headers_mut()
        .insert("x-request-id", "abc".parse().unwrap());
    let resp = layer().layer(svc).oneshot(req).await.unwrap();
    assert_eq!(
        (resp.status().as_u16(), calls.load(Ordering::SeqCst)),
        (200, 3)
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_prefers_an_endpoint_not_tried_before() {
    use crate::previous::RecordEndpointLayer;
    let a: SocketAddr = "10.0.0.1:9080".parse().unwrap();
    let b: SocketAddr = "10.0.0.2:9080".parse().unwrap();
    let hits = Arc::new(Mutex::new(Vec::new()));
    let log = hits.clone();
    // Upstream: endpoint a is broken.
    let upstream = tower::service_fn(move |req: Request<BoxBody>| {
        let addr = req.extensions().get::<UpstreamTarget>().map(|t| t.addr);
        log.lock().unwrap().push(addr);
        async move { Ok::<_, BoxError>(status(if addr == Some(a) { 503 } else { 200 })) }
    });
    // A balancer that starts with a and honours PreviousAttempts.
    let balancer = |inner| {
        tower::util::MapRequestLayer::new(move |mut req: Request<BoxBody>| {
            let tried = req
                .extensions()
                .get::<PreviousAttempts>()
                .cloned()
                .unwrap_or_default();
            let addr = [a, b]
                .into_iter()
                .find(|e| !tried.contains(*e))
                .unwrap_or(a);
            req.extensions_mut()
                .insert(UpstreamTarget::new(addr, false, "reviews:9080".into()));
            req
        })
        .layer(inner)
    };
    let svc = layer().layer(balancer(RecordEndpointLayer.layer(upstream)));
    let resp = svc
        .oneshot(request(RetryPolicy::istio_default(), body::empty()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(*hits.lock().unwrap(), [Some(a), Some(b)]);
}

#[test]
fn retry_on_helpers_see_the_default() {
    assert!(retries_enabled(&RetryPolicy::istio_default()));
    assert!(!retries_enabled(&RetryPolicy::none()));
    assert!(classify::wants_grpc(&RetryOn::istio_default()));
}

/// A request to `cluster` (`host:port`) with one retry on 503 and, when given, the
/// DestinationRule `retryBudget` its traffic policy would carry.
fn cluster_request(cluster: &str, percent: Option<f64>, min: Option<u32>) -> Request<BoxBody> {
    let mut target = crate::doc_support::route_target(cluster);
    target.retry = Arc::new(policy("503", 1));
    if percent.is_some() || min.is_some() {
        let budget = mesh_core::config::networking::RetryBudget {
            percent: percent.map(|value| mesh_core::config::Percent { value }),
            min_retry_concurrency: min,
        };
        target.traffic_policy = Some(Arc::new(mesh_core::config::networking::TrafficPolicy {
            retry_budget: Some(budget),
            ..Default::default()
        }));
    }
    crate::test_support::with_target(Request::new(body::empty()), target)
}

#[tokio::test(start_paused = true)]
async fn per_cluster_budgets_keep_a_healthy_service_from_paying_for_a_failing_one() {
    let budgets = Arc::new(RetryBudgets::default());
    let (svc, calls) = endpoint(|_, req: Request<BoxBody>| {
        let failing = req
            .extensions()
            .get::<RouteTarget>()
            .is_some_and(|t| t.name.starts_with("ratings"));
        async move { Ok(status(if failing { 503 } else { 200 })) }
    });
    let svc = RetryLayer::per_cluster(budgets).layer(svc);
    // 1,000 healthy requests to reviews: with one shared budget they would buy 200 retries.
    for _ in 0..1000 {
        let resp = svc
            .clone()
            .oneshot(cluster_request("reviews:9080", None, Some(0)))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(calls.swap(0, Ordering::SeqCst), 1000);
    // ratings fails every request; its own budget: 10 % of its 20 requests, no minimum.
    for _ in 0..20 {
        svc.clone()
            .oneshot(cluster_request("ratings:9080", Some(10.0), Some(0)))
            .await
            .unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 20 + 2);
}

#[test]
fn a_cluster_budget_follows_its_destination_rule() {
    let budgets = RetryBudgets::default();
    let target = |req: Request<BoxBody>| req.extensions().get::<RouteTarget>().unwrap().clone();
    let defaults = budgets.for_target(&target(cluster_request("reviews:9080", None, None)));
    assert_eq!(defaults.min_per_sec(), 10);
    assert!((defaults.retry_ratio() - 0.2).abs() < 1e-6);
    let same = budgets.for_target(&target(cluster_request("reviews:9080", None, None)));
    assert!(Arc::ptr_eq(&defaults, &same), "one budget per cluster");
    let changed = budgets.for_target(&target(cluster_request(
        "reviews:9080",
        Some(50.0),
        Some(3),
    )));
    assert_eq!((changed.min_per_sec(), changed.retry_ratio()), (3, 0.5));
    let other = budgets.for_target(&target(cluster_request("ratings:9080", None, None)));
    assert!(!Arc::ptr_eq(&other, &changed));
}
