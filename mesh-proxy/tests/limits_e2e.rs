//! The Bootstrap's `limits` on a real outbound listener, over raw sockets: oversized and
//! too many request headers are refused 431 before anything reaches the app, a client that
//! never finishes its request head is disconnected, and an idle keep-alive connection is
//! closed. The proxy keeps serving throughout.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::app::App;
use support::{bootstrap, service_entry};

fn config(app: SocketAddr) -> String {
    format!(
        "{}  limits:
    maxRequestHeadersBytes: 16384
    maxRequestHeaders: 20
    requestHeadersTimeout: 1s
    idleTimeout: 2s
{}",
        bootstrap("client", None),
        service_entry("reviews", 9080, "HTTP", &[app])
    )
}

/// Sends `head` on a fresh connection and returns the status line of the answer (or "" when
/// the proxy closed without one).
async fn status_line(proxy: SocketAddr, head: &str) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

fn request(extra_headers: &str) -> String {
    format!("GET / HTTP/1.1\r\nHost: reviews:9080\r\n{extra_headers}Connection: close\r\n\r\n")
}

#[tokio::test]
async fn header_limits_answer_431_and_nothing_reaches_the_app() {
    let app = App::start("reviews").await;
    let proxy = support::start_proxy(&config(app.addr)).await;
    let out = proxy.outbound_addr().unwrap();

    assert_eq!(status_line(out, &request("")).await, "HTTP/1.1 200 OK");
    let big = format!("x-big: {}\r\n", "a".repeat(20 * 1024));
    assert_eq!(
        status_line(out, &request(&big)).await,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    let many: String = (0..30).map(|i| format!("x-h{i}: v\r\n")).collect();
    assert_eq!(
        status_line(out, &request(&many)).await,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    // Within both limits: fine.
    let some: String = (0..10).map(|i| format!("x-h{i}: v\r\n")).collect();
    assert_eq!(status_line(out, &request(&some)).await, "HTTP/1.1 200 OK");
    assert_eq!(
        app.received.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "only the two good requests reached the app"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_slow_request_head_is_cut_and_an_idle_connection_closed() {
    let app = App::start("reviews").await;
    let proxy = support::start_proxy(&config(app.addr)).await;
    let out = proxy.outbound_addr().unwrap();

    // Slowloris: part of a head, then nothing. The proxy hangs up after the read timeout.
    let mut slow = TcpStream::connect(out).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: revi")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the proxy never closed the slow connection");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed before the timeout"
    );

    // Idle keep-alive: one request, then silence; the proxy closes the connection.
    let mut idle = TcpStream::connect(out).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: reviews:9080\r\n\r\n")
        .await
        .unwrap();
    let mut got = [0u8; 12];
    idle.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"HTTP/1.1 200");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), idle.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the idle connection was never closed");

    // And the proxy still serves.
    assert_eq!(status_line(out, &request("")).await, "HTTP/1.1 200 OK");
    proxy.shutdown().await;
}

#[test]
fn limits_below_what_hyper_supports_are_refused_at_load() {
    let yaml = "apiVersion: mesh-proxy/v1
kind: Bootstrap
metadata: { name: t }
spec:
  workload: { name: t }
  limits: { maxRequestHeadersBytes: 100, maxRequestHeaders: 0 }
";
    let err = mesh_core::config::load_sources(&[mesh_core::config::Source::new("t.yaml", yaml)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("spec.limits.maxRequestHeadersBytes"), "{err}");
    assert!(err.contains("spec.limits.maxRequestHeaders"), "{err}");
}

/// The proxy's own connection counters: accepted per listener, and open now.
#[tokio::test]
async fn connections_are_counted_per_listener() {
    let app = App::start("reviews").await;
    let proxy = support::start_proxy(&config(app.addr)).await;
    let out = proxy.outbound_addr().unwrap();
    let admin = proxy.admin_addr();
    let metric = |text: &str, line: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(line))
            .and_then(|v| v.trim().parse().ok())
    };
    let metrics = || async {
        let resp = support::http1_client()
            .request(support::get(admin, "admin", "/metrics"))
            .await
            .unwrap();
        support::text(resp).await
    };

    // One connection held open, three that close after their request.
    let mut held = TcpStream::connect(out).await.unwrap();
    held.write_all(b"GET / HTTP/1.1\r\nHost: reviews:9080\r\n\r\n")
        .await
        .unwrap();
    let mut got = [0u8; 12];
    held.read_exact(&mut got).await.unwrap();
    for _ in 0..3 {
        assert_eq!(status_line(out, &request("")).await, "HTTP/1.1 200 OK");
    }
    let total = "mesh_downstream_connections_total{listener=\"outbound\"} ";
    let active = "mesh_downstream_connections_active{listener=\"outbound\"} ";
    let started = Instant::now();
    loop {
        let text = metrics().await;
        if metric(&text, total) == Some(4) && metric(&text, active) == Some(1) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "expected 4 accepted and 1 open:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(held);
    let started = Instant::now();
    loop {
        let text = metrics().await;
        if metric(&text, active) == Some(0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the closed connection is still counted open:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.shutdown().await;
}
