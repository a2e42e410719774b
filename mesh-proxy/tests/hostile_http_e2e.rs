//! Hostile input against the outbound and inbound listeners, over raw sockets: request
//! smuggling shapes (`Content-Length` with `Transfer-Encoding`, two different
//! `Content-Length`s), invalid header bytes, random bytes, TLS garbage on a STRICT mTLS port,
//! connections reset mid-request, and an HTTP/2 rapid-reset flood. Each gets its refusal, nothing smuggled or malformed
//! reaches the app, and the proxy keeps serving.
//!
//! `Content-Length` with `Transfer-Encoding` is not refused: hyper frames the request by
//! `Transfer-Encoding` (RFC 9112 §6.3), drops the `Content-Length` and closes the connection
//! after the response, so the request smuggled behind the body is never read, and what goes
//! upstream is framed one way only. The test holds that property.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::app::App;
use support::pki::{Pki, STRICT, sidecar};
use support::{bootstrap, service_entry};

/// Sends `bytes` on a fresh connection and returns the status line of the answer, or ""
/// when the proxy closed without one; fails if the proxy keeps the connection open.
async fn answer(proxy: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the proxy held the connection open");
    String::from_utf8_lossy(&buf)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// Sends `bytes` and waits for the proxy to close the connection, at most `secs` seconds
/// (failing if it does not); returns what it answered.
async fn closed_within(proxy: SocketAddr, bytes: &[u8], secs: u64) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(secs), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the proxy held the connection past {secs} s");
    String::from_utf8_lossy(&buf).into_owned()
}

const OK: &[u8] = b"GET / HTTP/1.1\r\nHost: reviews:9080\r\nConnection: close\r\n\r\n";

/// A client sidecar that knows `reviews:9080`, served by `app`.
async fn reviews_proxy(app: &App) -> mesh_proxy::RunningProxy {
    support::start_proxy(&format!(
        "{}{}",
        bootstrap("client", None),
        service_entry("reviews", 9080, "HTTP", &[app.addr])
    ))
    .await
}

#[tokio::test]
async fn smuggling_shapes_and_garbage_are_refused_before_the_app() {
    let app = App::start("reviews").await;
    let proxy = reviews_proxy(&app).await;
    let out = proxy.outbound_addr().unwrap();

    // Smuggling by CL.TE: one request reaches the app, the one behind it never does.
    let mut s = TcpStream::connect(out).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: reviews:9080\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: reviews:9080\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("the proxy closes the connection after the first response")
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert_eq!(
        text.matches("HTTP/1.1 ").count(),
        1,
        "one response only:\n{text}"
    );
    let seen: Vec<String> = app
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, p)| p.clone())
        .collect();
    assert_eq!(seen, ["/"], "the smuggled request never reached the app");

    let cases: [(&str, &[u8]); 4] = [
        (
            "two different Content-Lengths",
            b"POST / HTTP/1.1\r\nHost: reviews:9080\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nbody",
        ),
        (
            "a control byte in a header value",
            b"GET / HTTP/1.1\r\nHost: reviews:9080\r\nX-Bad: a\x01b\r\n\r\n",
        ),
        (
            "a space before the colon",
            b"GET / HTTP/1.1\r\nHost: reviews:9080\r\nX-Bad : v\r\n\r\n",
        ),
        (
            "a bare LF request line with garbage",
            b"\x00\xff\x13garbage that is not HTTP\n\n",
        ),
    ];
    for (what, bytes) in cases {
        let status = answer(out, bytes).await;
        assert!(
            status.is_empty() || status.starts_with("HTTP/1.1 400"),
            "{what}: got {status:?}"
        );
    }
    assert_eq!(
        app.received.load(Ordering::SeqCst),
        1,
        "nothing malformed reached the app"
    );

    // Connections that go away abruptly: reset mid-head, and half-open (write side shut
    // before the head ends).
    for _ in 0..20 {
        let s = TcpStream::connect(out).await.unwrap();
        let s = s.into_std().unwrap();
        // SO_LINGER 0: closing sends RST instead of FIN.
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        let mut s = TcpStream::from_std(s).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: revi").await.unwrap();
        drop(s);
    }
    let mut half = TcpStream::connect(out).await.unwrap();
    half.write_all(b"GET / HTTP/1.1\r\nHost: reviews:9080\r\n")
        .await
        .unwrap();
    half.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), half.read_to_end(&mut rest)).await;

    assert_eq!(answer(out, OK).await, "HTTP/1.1 200 OK", "still serving");
    assert_eq!(app.received.load(Ordering::SeqCst), 2);
    proxy.shutdown().await;
}

#[tokio::test]
async fn tls_garbage_on_a_strict_mtls_port_is_closed_and_the_port_keeps_serving() {
    let pki = Pki::new();
    let app = App::start("reviews").await;
    let certs = pki.issue("reviews");
    let server = support::start_proxy(&format!(
        "{}{STRICT}",
        sidecar("reviews", Some(app.addr), &certs)
    ))
    .await;
    let inbound = server.inbound_addr().unwrap();

    // A whole TLS record of junk, and plain random bytes: closed at once, no HTTP answer.
    let mut junk_record = b"\x16\x03\x01\x00\x40".to_vec();
    junk_record.extend_from_slice(&[0x5a; 0x40]);
    for bytes in [
        junk_record.as_slice(),
        b"\x8a\x11\x00\x42 random \xff\xfe bytes",
    ] {
        assert_eq!(
            closed_within(inbound, bytes, 5).await,
            "",
            "closed without an answer"
        );
    }
    // A ClientHello cut short, then silence: held only until the handshake timeout (10 s).
    assert_eq!(
        closed_within(inbound, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 15).await,
        ""
    );
    assert_eq!(app.received.load(Ordering::SeqCst), 0);

    // A real mesh client still gets through.
    let client_certs = pki.issue("productpage");
    let client = support::start_proxy(&format!(
        "{}{}",
        sidecar("productpage", None, &client_certs),
        support::reviews_entry(inbound, Some("reviews"))
    ))
    .await;
    let resp = support::http1_client()
        .request(support::get(
            client.outbound_addr().unwrap(),
            "reviews:9080",
            "/",
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    support::text(resp).await;
    client.shutdown().await;
    server.shutdown().await;
}

/// One HTTP/2 frame: 9-byte header (length, type, flags, stream) and payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The frames a client sends until the connection closes (at most 10 s): `(type, stream,
/// payload)`. A connection the proxy holds open past that fails the test.
async fn h2_frames_until_close(s: &mut TcpStream) -> Vec<(u8, u32, Vec<u8>)> {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the proxy held the connection open");
    let mut frames = Vec::new();
    let mut at = 0;
    while at + 9 <= buf.len() {
        let len = (usize::from(buf[at]) << 16)
            | (usize::from(buf[at + 1]) << 8)
            | usize::from(buf[at + 2]);
        let stream =
            u32::from_be_bytes([buf[at + 5], buf[at + 6], buf[at + 7], buf[at + 8]]) & 0x7fff_ffff;
        let end = (at + 9 + len).min(buf.len());
        frames.push((buf[at + 3], stream, buf[at + 9..end].to_vec()));
        at = end;
    }
    frames
}

/// HTTP/2 "rapid reset" (CVE-2023-44487): 1,000 streams opened and cancelled at once on one
/// prior-knowledge h2c connection. hyper's pending-accept-reset limit, configured on purpose
/// (`HTTP2_MAX_PENDING_ACCEPT_RESETS` in `server.rs`), answers with a GOAWAY
/// `ENHANCE_YOUR_CALM` and closes; few of the streams reach the app; the proxy keeps serving.
#[tokio::test]
async fn http2_rapid_reset_is_cut_with_enhance_your_calm() {
    let app = App::start("reviews").await;
    let proxy = reviews_proxy(&app).await;
    let out = proxy.outbound_addr().unwrap();

    // HPACK, static table only: :method GET, :scheme http, :path /, :authority literal.
    let authority = b"reviews:9080";
    let mut block = vec![0x82, 0x86, 0x84, 0x01, authority.len() as u8];
    block.extend_from_slice(authority);
    let mut flood = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    flood.extend(h2_frame(0x4, 0, 0, &[])); // SETTINGS
    for i in 0..1000u32 {
        let stream = 2 * i + 1;
        flood.extend(h2_frame(0x1, 0x5, stream, &block)); // HEADERS, END_STREAM | END_HEADERS
        flood.extend(h2_frame(0x3, 0, stream, &8u32.to_be_bytes())); // RST_STREAM CANCEL
    }
    let mut s = TcpStream::connect(out).await.unwrap();
    let _ = s.write_all(&flood).await;
    let frames = h2_frames_until_close(&mut s).await;
    let goaway = frames
        .iter()
        .find(|(kind, _, _)| *kind == 0x7)
        .expect("the proxy sent a GOAWAY");
    let code = u32::from_be_bytes([goaway.2[4], goaway.2[5], goaway.2[6], goaway.2[7]]);
    assert_eq!(code, 0xb, "GOAWAY ENHANCE_YOUR_CALM");
    let reached = app.received.load(Ordering::SeqCst);
    assert!(
        reached < 100,
        "{reached} of 1,000 cancelled streams reached the app"
    );

    // Unharmed: a well-behaved client is served.
    assert_eq!(answer(out, OK).await, "HTTP/1.1 200 OK");
}

/// The test process's resident memory, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// HTTP/2 flow-control abuse: a client asks for 20 responses of 8 MiB on one h2c connection
/// with a stream window of 0 and never opens it. The proxy holds at most its per-stream send
/// buffer (`HTTP2_MAX_SEND_BUF`) and stops reading the upstream's body, so memory stays far
/// below the 160 MiB asked for (a quarter is the bound asserted); other clients are served
/// meanwhile; when the client goes, the upstream connections of its streams are closed.
#[tokio::test]
async fn http2_a_window_that_never_opens_costs_a_bounded_buffer() {
    const STREAMS: u32 = 20;
    const SIZE: usize = 8 << 20;
    let app = App::start("reviews").await;
    let proxy = reviews_proxy(&app).await;
    let out = proxy.outbound_addr().unwrap();
    assert_eq!(answer(out, OK).await, "HTTP/1.1 200 OK");
    let before = rss_kib();

    // SETTINGS_INITIAL_WINDOW_SIZE (0x4) = 0: no stream may send this client a DATA byte.
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(h2_frame(0x4, 0, 0, &[0, 4, 0, 0, 0, 0]));
    let authority = b"reviews:9080";
    let path = format!("/bytes?n={SIZE}");
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    block.extend([0x01, authority.len() as u8]);
    block.extend_from_slice(authority);
    for i in 0..STREAMS {
        bytes.extend(h2_frame(0x1, 0x5, 2 * i + 1, &block));
    }
    let mut abuser = TcpStream::connect(out).await.unwrap();
    abuser.write_all(&bytes).await.unwrap();

    // Every stream reaches the app, whose responses then stall behind the proxy.
    let mut waited = Duration::ZERO;
    while app.received.load(Ordering::SeqCst) < 1 + STREAMS as usize {
        assert!(
            waited < Duration::from_secs(10),
            "the streams never reached the app"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += Duration::from_millis(20);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    let asked_mib = u64::from(STREAMS) * (SIZE as u64 >> 20);
    assert!(
        grown_mib < asked_mib / 4,
        "memory grew {grown_mib} MiB for {asked_mib} MiB of responses no one reads"
    );

    // Others are served meanwhile.
    assert_eq!(answer(out, OK).await, "HTTP/1.1 200 OK");

    // The client goes: its streams' upstream connections close. The two requests served
    // around the abuse may each have left a pooled keep-alive connection.
    drop(abuser);
    let mut waited = Duration::ZERO;
    while app.open.load(Ordering::SeqCst) > 2 {
        assert!(
            waited < Duration::from_secs(10),
            "{} upstream connections left open",
            app.open.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += Duration::from_millis(20);
    }
}
