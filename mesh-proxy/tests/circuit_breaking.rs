//! Connection-pool limits (Envoy's circuit breakers) through a real sidecar, after Istio's
//! circuit-breaking task.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::app::App;
use support::{bootstrap, get, http1_client, service_entry, start_proxy, text};

fn destination_rule(connection_pool: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: httpbin }}
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
{connection_pool}
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
"
    )
}

/// Istio's task: `maxConnections: 1`, `http1MaxPendingRequests: 1`,
/// `maxRequestsPerConnection: 1`, and concurrent callers. One request holds the connection,
/// one waits, every other one is refused at once with `503 UO`; none hangs, the endpoint is
/// never opened a second connection, and overflow does not eject it.
#[tokio::test]
async fn istio_circuit_breaking_task() {
    let app = App::start("httpbin").await;
    let proxy = start_proxy(&format!(
        "{}{}{}",
        bootstrap("fortio", None),
        service_entry("httpbin", 8000, "HTTP", &[app.addr]),
        destination_rule(
            "      tcp: { maxConnections: 1 }
      http: { http1MaxPendingRequests: 1, maxRequestsPerConnection: 1 }"
        )
    ))
    .await;
    let outbound = proxy.outbound_addr().unwrap();

    // Watch the backend's open connections while the burst runs.
    let peak = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (open, peak) = (app.open.clone(), peak.clone());
        tokio::spawn(async move {
            loop {
                peak.fetch_max(open.load(Ordering::SeqCst), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };

    let http = http1_client();
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let http = http.clone();
        callers.spawn(async move {
            let resp = http
                .request(get(outbound, "httpbin:8000", "/delay?ms=300"))
                .await
                .unwrap();
            let status = resp.status();
            let flags = resp
                .headers()
                .get("x-mesh-response-flags")
                .map(|v| v.to_str().unwrap().to_owned());
            let body = text(resp).await;
            (status, flags, body)
        });
    }
    let (mut ok, mut overflow) = (0, 0);
    let all = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(done) = callers.join_next().await {
            let (status, flags, body) = done.unwrap();
            match status.as_u16() {
                200 => ok += 1,
                503 => {
                    assert_eq!(flags.as_deref(), Some("UO"), "{body}");
                    assert!(body.contains("httpbin"), "{body}");
                    overflow += 1;
                }
                other => panic!("unexpected {other}: {body}"),
            }
        }
    })
    .await;
    watcher.abort();
    assert!(all.is_ok(), "a request hung");
    assert_eq!(ok + overflow, 20);
    assert!(overflow >= 10, "{overflow} overflowed, {ok} succeeded");
    assert!(
        ok >= 2,
        "the connection's request and the pending one succeed: {ok}"
    );
    // The backend notices a closed connection a moment after the proxy has closed it (and
    // may have dialled the next one), so it can briefly count two; without the limit it
    // would count up to twenty.
    assert!(
        peak.load(Ordering::SeqCst) <= 2,
        "maxConnections: 1, peak {}",
        peak.load(Ordering::SeqCst)
    );

    // Nothing is left holding the limits, and overflow ejected nothing.
    let resp = http
        .request(get(outbound, "httpbin:8000", "/"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// A request admitted as pending waits for a connection no longer than the fail-fast bound
/// (3 s), then gets `503 UO`, while the request that holds the connection carries on.
#[tokio::test]
async fn a_pending_request_fails_fast() {
    let app = App::start("httpbin").await;
    let proxy = start_proxy(&format!(
        "{}{}{}",
        bootstrap("fortio", None),
        service_entry("httpbin", 8000, "HTTP", &[app.addr]),
        destination_rule(
            "      tcp: { maxConnections: 1 }
      http: { http1MaxPendingRequests: 10 }"
        )
    ))
    .await;
    let outbound = proxy.outbound_addr().unwrap();
    let http = http1_client();

    let slow = {
        let http = http.clone();
        tokio::spawn(async move {
            let resp = http
                .request(get(outbound, "httpbin:8000", "/delay?ms=8000"))
                .await
                .unwrap();
            resp.status()
        })
    };
    while app.received.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(7),
        http.request(get(outbound, "httpbin:8000", "/")),
    )
    .await
    .expect("the pending request failed fast")
    .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-mesh-response-flags"], "UO");
    let body = text(resp).await;
    assert!(body.contains("fail fast"), "{body}");
    assert!(
        !slow.is_finished(),
        "the first request still holds the connection"
    );
    assert_eq!(slow.await.unwrap(), 200);
}

/// `http2MaxRequests` bounds requests in flight to the cluster whatever the protocol.
#[tokio::test]
async fn max_requests_bounds_requests_in_flight() {
    let app = App::start("httpbin").await;
    let proxy = start_proxy(&format!(
        "{}{}{}",
        bootstrap("fortio", None),
        service_entry("httpbin", 8000, "HTTP", &[app.addr]),
        destination_rule("      http: { http2MaxRequests: 2 }")
    ))
    .await;
    let outbound = proxy.outbound_addr().unwrap();
    let http = http1_client();
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let http = http.clone();
        callers.spawn(async move {
            let resp = http
                .request(get(outbound, "httpbin:8000", "/delay?ms=500"))
                .await
                .unwrap();
            resp.status().as_u16()
        });
    }
    let mut statuses = Vec::new();
    while let Some(s) = callers.join_next().await {
        statuses.push(s.unwrap());
    }
    statuses.sort();
    assert_eq!(statuses, [200, 200, 503, 503, 503, 503]);
    assert_eq!(app.received.load(Ordering::SeqCst), 2);
}
