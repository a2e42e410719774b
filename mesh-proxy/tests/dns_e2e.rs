//! ServiceEntries with `resolution: DNS`: their names resolved by the proxy, re-resolved on
//! TTL, and the last good answer kept while DNS fails.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use mesh_discovery::testing::{DnsServer, Mode};
use support::app::App;
use support::{bootstrap, get, http1_client, start_proxy};

/// A DNS ServiceEntry `ratings.example.test:80` whose endpoint is the name `address`.
fn dns_entry(address: &str, port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: ratings }}
spec:
  hosts: [ratings.example.test]
  location: MESH_EXTERNAL
  ports: [{{ number: 80, name: http, protocol: HTTP }}]
  resolution: DNS
  endpoints: [{{ address: {address}, ports: {{ http: {port} }} }}]
"
    )
}

/// Which app answered (its `x-app`), or the status.
async fn who(outbound: SocketAddr) -> String {
    match http1_client()
        .request(get(outbound, "ratings.example.test", "/"))
        .await
    {
        Ok(resp) if resp.status() == 200 => resp
            .headers()
            .get("x-app")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_string(),
        Ok(resp) => resp.status().as_str().to_string(),
        Err(e) => format!("error: {e}"),
    }
}

async fn until(outbound: SocketAddr, want: &str, within: Duration) {
    let started = Instant::now();
    loop {
        let got = who(outbound).await;
        if got == want {
            return;
        }
        assert!(
            started.elapsed() < within,
            "wanted {want} within {within:?}, last answer {got}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_service_routes_follows_the_ttl_and_keeps_the_last_answer_while_dns_fails() {
    // Two instances on one port, at two loopback addresses: DNS decides which one is used.
    let first = App::start("first").await;
    let port = first.addr.port();
    let second = App::start_at("second", 200, SocketAddr::from(([127, 0, 0, 2], port))).await;
    let dns = DnsServer::start(1, &[("ratings.example.test", &[Ipv4Addr::LOCALHOST])])
        .await
        .unwrap();
    let proxy = start_proxy(&format!(
        "{}  discovery:\n    dns: {{ nameservers: [\"{}\"], minTtl: 1s, maxTtl: 10s }}\n---\n{}",
        bootstrap("client", None),
        dns.addr,
        dns_entry("ratings.example.test", port)
    ))
    .await;
    let outbound = proxy.outbound_addr().unwrap();
    until(outbound, "first", Duration::from_secs(5)).await;

    // DNS fails (SERVFAIL, then silence) for several TTLs: the last good address serves.
    dns.set_mode(Mode::ServFail);
    let failing_since = Instant::now();
    while failing_since.elapsed() < Duration::from_secs(3) {
        assert_eq!(who(outbound).await, "first");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        dns.seen(Mode::ServFail) >= 1,
        "the proxy asked again while DNS failed"
    );
    dns.set_mode(Mode::Silent);
    let silent_since = Instant::now();
    while silent_since.elapsed() < Duration::from_secs(2) {
        assert_eq!(who(outbound).await, "first");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // DNS answers again, with a new address: traffic follows it.
    dns.set("ratings.example.test", &[Ipv4Addr::new(127, 0, 0, 2)]);
    dns.set_mode(Mode::Answer);
    until(outbound, "second", Duration::from_secs(15)).await;
    for _ in 0..10 {
        assert_eq!(who(outbound).await, "second");
    }
    assert!(second.received.load(std::sync::atomic::Ordering::SeqCst) >= 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localhost_resolves_through_the_system_resolver() {
    // The app answers on both loopback families, as `localhost` may name either.
    let v4 = App::start("local").await;
    let port = v4.addr.port();
    let _v6 = match std::net::TcpListener::bind(("::1", 0)) {
        Ok(probe) => {
            drop(probe);
            Some(
                App::start_at(
                    "local",
                    200,
                    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
                )
                .await,
            )
        }
        Err(_) => None, // no IPv6 loopback here: `localhost` is 127.0.0.1 only
    };
    let proxy = start_proxy(&format!(
        "{}---\n{}",
        bootstrap("client", None),
        dns_entry("localhost", port)
    ))
    .await;
    let outbound = proxy.outbound_addr().unwrap();
    until(outbound, "local", Duration::from_secs(5)).await;
    for _ in 0..10 {
        assert_eq!(who(outbound).await, "local");
    }
    // The resolved addresses are the service's endpoints, named address:port.
    let clusters = http1_client()
        .request(
            http::Request::get(format!("http://{}/clusters", proxy.admin_addr()))
                .body(mesh_core::body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let body = support::text(clusters).await;
    assert!(body.contains(&format!("127.0.0.1:{port}")), "{body}");
}
