//! Faults under load, through a real sidecar on loopback: an endpoint killed and restarted
//! while requests flow, and an endpoint that accepts connections and never answers. The
//! property throughout: every request the app sends gets an answer (no hang, no connection
//! error), and what fails says why. (Reload storms under load: `hot_reload_e2e.rs`; etcd
//! killed and restarted: `etcd_e2e.rs`.)
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use support::app::App;
use support::{bootstrap, client_proxy, get, http1_client, service_entry, start_proxy};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

/// Requests from `workers` concurrent callers, until `stop`: answers by `status flags`, and
/// the requests that got no answer at all.
async fn load(
    outbound: SocketAddr,
    host: &'static str,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> (BTreeMap<String, usize>, usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let stop = stop.clone();
        tasks.spawn(async move {
            let http = http1_client();
            let (mut answers, mut lost) = (BTreeMap::<String, usize>::new(), 0usize);
            while !stop.load(Ordering::SeqCst) {
                let call = http.request(get(outbound, host, "/"));
                match tokio::time::timeout(Duration::from_secs(10), call).await {
                    Ok(Ok(resp)) => {
                        let flags = resp
                            .headers()
                            .get("x-mesh-response-flags")
                            .map_or("-".to_owned(), |v| v.to_str().unwrap().to_owned());
                        let key = format!("{} {flags}", resp.status().as_u16());
                        let _ = support::text(resp).await;
                        *answers.entry(key).or_default() += 1;
                    }
                    Ok(Err(_)) | Err(_) => lost += 1,
                }
            }
            (answers, lost)
        });
    }
    let (mut answers, mut lost) = (BTreeMap::new(), 0);
    while let Some(done) = tasks.join_next().await {
        let (a, l) = done.unwrap();
        for (k, n) in a {
            *answers.entry(k).or_default() += n;
        }
        lost += l;
    }
    (answers, lost)
}

/// Two endpoints under steady load from 8 callers; one is killed (listener and every
/// connection closed at once, as a crash), then restarted on the same port. Istio's
/// default retries (connect failures, to another endpoint) hide the dead one; requests in
/// flight on its connections at the instant it died may fail, but each gets an answer.
#[tokio::test]
async fn an_endpoint_killed_and_restarted_under_load_loses_no_request() {
    const WORKERS: usize = 8;
    let steady = App::start("steady").await;
    let flaky = App::start("flaky").await;
    let flaky_addr = flaky.addr;
    let proxy = client_proxy("svc", &[steady.addr, flaky_addr]).await;
    let outbound = proxy.outbound_addr().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(load(outbound, "svc", WORKERS, stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        flaky.received.load(Ordering::SeqCst) > 0,
        "both endpoints served"
    );
    flaky.kill();
    drop(flaky);
    let steady_before = steady.received.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        steady.received.load(Ordering::SeqCst) > steady_before,
        "traffic went on to the live endpoint while the other was down"
    );
    let back = App::start_at("flaky", 200, flaky_addr).await;
    let mut waited = Duration::ZERO;
    while back.received.load(Ordering::SeqCst) == 0 && waited < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let (answers, lost) = load.await.unwrap();

    assert_eq!(lost, 0, "requests without an answer; answers: {answers:?}");
    assert!(
        back.received.load(Ordering::SeqCst) > 0,
        "the restarted endpoint gets traffic again: {answers:?}"
    );
    let ok = answers.get("200 -").copied().unwrap_or(0);
    let failed: usize = answers.values().sum::<usize>() - ok;
    assert!(ok > 100, "load ran: {answers:?}");
    // At most the requests in flight on the dead endpoint's connections when it died: one
    // per caller. Each failure is a 503 that says the upstream connection broke.
    assert!(failed <= WORKERS, "{failed} failures: {answers:?}");
    for key in answers.keys().filter(|k| k.as_str() != "200 -") {
        assert!(
            key.starts_with("503 U"),
            "a failure says the upstream broke: {answers:?}"
        );
    }
}

/// A listener that accepts and never answers; counts connections accepted and the ones
/// the other side has since closed.
struct BlackHole {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl BlackHole {
    async fn start() -> BlackHole {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, c) = (accepted.clone(), closed.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                // Reads (and drops) whatever comes, answers nothing, notes the EOF.
                conns.spawn(async move {
                    let mut buf = [0u8; 4096];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        BlackHole {
            addr,
            accepted,
            closed,
            task,
        }
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// 32 requests at once to an endpoint that never answers, behind a 300 ms route timeout:
/// each gets `504 UT`, and every upstream connection the proxy opened is closed afterwards
/// (none left waiting on the dead peer), while the proxy keeps serving other traffic.
#[tokio::test]
async fn an_endpoint_that_never_answers_times_out_and_holds_no_connection() {
    let hole = BlackHole::start().await;
    let fine = App::start("fine").await;
    let proxy = start_proxy(&format!(
        "{}{}{}{}",
        bootstrap("client", None),
        service_entry("hole", 80, "HTTP", &[hole.addr]),
        service_entry("fine", 80, "HTTP", &[fine.addr]),
        support::virtual_service(
            "hole",
            "  - timeout: 300ms
    route: [{ destination: { host: hole } }]
"
        )
    ))
    .await;
    let outbound = proxy.outbound_addr().unwrap();

    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..32 {
        calls.spawn(async move {
            let resp = tokio::time::timeout(
                Duration::from_secs(10),
                http1_client().request(get(outbound, "hole", "/")),
            )
            .await
            .expect("answered, not hung")
            .expect("answered, not reset");
            let flags = resp
                .headers()
                .get("x-mesh-response-flags")
                .map(|v| v.to_str().unwrap().to_owned());
            (resp.status().as_u16(), flags)
        });
    }
    while let Some(done) = calls.join_next().await {
        assert_eq!(done.unwrap(), (504, Some("UT".to_owned())));
    }
    let accepted = hole.accepted.load(Ordering::SeqCst);
    assert!(accepted > 0, "the proxy reached the black hole");

    // Every connection to the black hole is closed by the proxy once its request timed out.
    let mut waited = Duration::ZERO;
    while hole.closed.load(Ordering::SeqCst) < accepted && waited < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    }
    assert_eq!(
        hole.closed.load(Ordering::SeqCst),
        accepted,
        "upstream connections left open to a peer that never answered"
    );

    // The proxy is unharmed: other services answer.
    let resp = http1_client()
        .request(get(outbound, "fine", "/"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    proxy.shutdown().await;
}
