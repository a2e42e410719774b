//! The resilience issue's end-to-end figures through a real sidecar on loopback: default
//! retries hiding a partly failing endpoint, the retry budget bounding what a dead one
//! receives, and a route timeout cutting a slow one. (The same rules run on paused time in
//! `mesh-resilience/tests/e2e.rs`; here they run through listeners, pools and real apps.)
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::app::App;
use support::{bootstrap, client_proxy, get, http1_client, service_entry, start_proxy, tally};

fn status_and_flags(status: http::StatusCode, headers: &http::HeaderMap) -> String {
    let flags = headers
        .get("x-mesh-response-flags")
        .map_or("-", |v| v.to_str().unwrap());
    format!("{} {flags}", status.as_u16())
}

/// An endpoint answering 503 to every tenth request: Istio's default retry policy (2
/// retries on `retriable-status-codes` 503, among others) hides it from the caller.
#[tokio::test]
async fn default_retries_hide_an_endpoint_failing_one_request_in_ten() {
    let app = App::start("flaky").await;
    let proxy = client_proxy("flaky", &[app.addr]).await;
    let outbound = proxy.outbound_addr().unwrap();
    let total = 2000;
    let counts = tally(
        &http1_client(),
        total,
        8,
        move || get(outbound, "flaky", "/fail-every?n=10"),
        status_and_flags,
    )
    .await;
    let ok = counts.get("200 -").copied().unwrap_or(0);
    assert!(
        ok * 1000 >= total * 995,
        "{ok} of {total} succeeded: {counts:?}"
    );
    // The endpoint did fail one request in ten: about 200 retries reached it.
    let received = app.received.load(Ordering::SeqCst);
    assert!(
        (total + total / 10 - 20..=total + total / 9 + 20).contains(&received),
        "the endpoint received {received} requests for {total}"
    );
}

/// An endpoint that always answers 503: default retries would triple its load; the retry
/// budget (20 % of requests, plus 10 a second over its 10 s window) holds it to
/// `1.2 × requests + 10/s`, and each caller gets the endpoint's 503.
#[tokio::test]
async fn the_retry_budget_bounds_what_a_dead_endpoint_receives() {
    let app = App::start_with_status("down", 503).await;
    let proxy = client_proxy("down", &[app.addr]).await;
    let outbound = proxy.outbound_addr().unwrap();
    let total = 1000;
    let started = Instant::now();
    let counts = tally(
        &http1_client(),
        total,
        8,
        move || get(outbound, "down", "/"),
        |status, _| status.as_u16().to_string(),
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(counts.get("503").copied(), Some(total), "{counts:?}");
    let received = app.received.load(Ordering::SeqCst);
    // The 10/s minimum is a reserve of one window's worth (10 s × 10/s), spent at once by a
    // fresh budget, then refilled at 10/s.
    let minimum = 10 * elapsed.as_secs().max(10) as usize;
    let bound = total * 12 / 10 + minimum;
    assert!(
        received <= bound,
        "the dead endpoint received {received} requests for {total} in {elapsed:?} (bound {bound})"
    );
    assert!(
        received >= total + total / 5,
        "retries ran while the budget allowed: {received} for {total}"
    );
}

/// A 5 s endpoint behind a 1 s route timeout: `504` with flag `UT`, at the timeout.
#[tokio::test]
async fn a_route_timeout_cuts_a_slow_endpoint_with_504_ut() {
    let app = App::start("slow").await;
    let proxy = start_proxy(&format!(
        "{}{}{}",
        bootstrap("client", None),
        service_entry("slow", 80, "HTTP", &[app.addr]),
        support::virtual_service(
            "slow",
            "  - timeout: 1s
    route: [{ destination: { host: slow } }]
"
        )
    ))
    .await;
    let outbound = proxy.outbound_addr().unwrap();
    let started = Instant::now();
    let resp = http1_client()
        .request(get(outbound, "slow", "/delay?ms=5000"))
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(status_and_flags(resp.status(), resp.headers()), "504 UT");
    assert!(
        (Duration::from_secs(1)..=Duration::from_millis(1200)).contains(&elapsed),
        "answered after {elapsed:?}"
    );
}
