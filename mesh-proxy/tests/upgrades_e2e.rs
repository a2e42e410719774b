//! HTTP/1.1 upgrades and CONNECT through real sidecars on loopback: a WebSocket echo (a real
//! client handshake, text frames, a close) and a raw custom protocol with half-close, each
//! through one plaintext sidecar and through two sidecars speaking mTLS; CONNECT to a known
//! TCP service and to an unknown host; an upgrade to a dead endpoint and to a backend that
//! declines it; `h2c` not forwarded; the route timeout ending at the `101`.
//!
//! The sidecars' listeners must serve HTTP/1.1 with upgrades on
//! (`serve_connection_with_upgrades` in `server.rs`); without it every tunnel here fails.
//!
//! The clients speak raw bytes on a `TcpStream`, so every byte the proxies forward is seen;
//! the backends are hyper servers with upgrades enabled (and a raw TCP echo for CONNECT).
#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_core::body::{self, BoxBody};
use mesh_proxy::RunningProxy;
use support::pki::{Pki, STRICT, sidecar};
use support::{bootstrap, client_proxy, get, http1_client, service_entry, start_proxy, text};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Every network step of a test is bounded by this; a hang fails instead of stalling.
const STEP: Duration = Duration::from_secs(10);

async fn step<F: std::future::Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(STEP, f).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: no progress within {STEP:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// WebSocket framing and handshake, by hand (RFC 6455): just what the tests need.

/// SHA-1 (FIPS 180-4), for `Sec-WebSocket-Accept` only.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for chunk in msg.chunks(64) {
        let mut w = [0u32; 80];
        for (i, word) in chunk.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
fn websocket_accept(key: &str) -> String {
    base64(&sha1(
        format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
    ))
}

#[test]
fn the_handshake_digest_is_rfc_6455s() {
    // RFC 6455 §1.3's example.
    assert_eq!(
        websocket_accept("dGhlIHNhbXBsZSBub25jZQ=="),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
    assert_eq!(base64(b"ab"), "YWI=");
}

const TEXT: u8 = 0x1;
const CLOSE: u8 = 0x8;

/// Writes one final frame; a client masks its frames, a server does not.
async fn write_frame(io: &mut (impl AsyncWrite + Unpin), opcode: u8, payload: &[u8], mask: bool) {
    let mut frame = vec![0x80 | opcode];
    let mask_bit = if mask { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => frame.push(mask_bit | n as u8),
        n if n <= 0xFFFF => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if mask {
        let key: [u8; 4] = uuid::Uuid::new_v4().as_bytes()[..4].try_into().unwrap();
        frame.extend_from_slice(&key);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        frame.extend_from_slice(payload);
    }
    io.write_all(&frame).await.unwrap();
    io.flush().await.unwrap();
}

/// Reads one frame (unmasking it if masked): its opcode and payload; `None` at EOF.
async fn read_frame(io: &mut (impl AsyncRead + Unpin)) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    io.read_exact(&mut head).await.ok()?;
    let opcode = head[0] & 0x0F;
    let masked = head[1] & 0x80 != 0;
    let len = match head[1] & 0x7F {
        126 => u64::from(io.read_u16().await.ok()?),
        127 => io.read_u64().await.ok()?,
        n => u64::from(n),
    };
    let mut key = [0u8; 4];
    if masked {
        io.read_exact(&mut key).await.ok()?;
    }
    let mut payload = vec![0u8; usize::try_from(len).unwrap()];
    io.read_exact(&mut payload).await.ok()?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    Some((opcode, payload))
}

/// Reads an HTTP/1.1 response head byte by byte (nothing past it is consumed): the status
/// and the headers, names lower-cased.
async fn read_head(io: &mut (impl AsyncRead + Unpin)) -> (u16, Vec<(String, String)>) {
    let mut raw = Vec::new();
    while !raw.ends_with(b"\r\n\r\n") {
        let b = io.read_u8().await.unwrap_or_else(|e| {
            panic!(
                "connection ended inside the response head ({e}): {:?}",
                String::from_utf8_lossy(&raw)
            )
        });
        raw.push(b);
    }
    let text = String::from_utf8(raw).unwrap();
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Reads everything until the peer's end of stream.
async fn read_to_end(io: &mut (impl AsyncRead + Unpin)) -> String {
    let mut out = Vec::new();
    io.read_to_end(&mut out).await.unwrap();
    String::from_utf8(out).unwrap()
}

// ---------------------------------------------------------------------------------------
// Backends.

/// A hyper HTTP/1.1 server with upgrades on:
/// - `Upgrade: websocket` (any path): the RFC 6455 handshake, then text frames are echoed
///   (`echo: ` prepended) and a close frame is answered with a close frame;
/// - any other `Upgrade` (`custom-proto`): `101`, then every chunk read is echoed upper-cased; after the
///   client's end of stream, a last line `bye after N bytes` and the server's own end;
/// - `/no-upgrade` (any upgrade asked for): `200 no upgrade here`;
/// - anything else: `200 plain`.
///
/// Every response says `x-conn-requests`: how many requests its connection has carried.
struct UpgradeApp {
    addr: SocketAddr,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl UpgradeApp {
    async fn start() -> UpgradeApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let served = Arc::new(AtomicUsize::new(0));
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let n = served.fetch_add(1, Ordering::SeqCst) + 1;
                    async move { Ok::<_, std::convert::Infallible>(answer(req, n)) }
                });
                conns.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        UpgradeApp {
            addr,
            accepted,
            _task: task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn answer(mut req: Request<Incoming>, nth: usize) -> Response<BoxBody> {
    let protocol = req
        .headers()
        .get("upgrade")
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase);
    let plain = |text: &'static str| {
        Response::builder()
            .header("x-conn-requests", nth)
            .body(body::full(text))
            .unwrap()
    };
    if req.uri().path() == "/no-upgrade" {
        return plain("no upgrade here");
    }
    let switching = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "Upgrade")
        .header("x-conn-requests", nth);
    match protocol.as_deref() {
        Some("websocket") => {
            let key = req.headers()["sec-websocket-key"].to_str().unwrap();
            let resp = switching
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", websocket_accept(key))
                .body(body::empty())
                .unwrap();
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let mut io = TokioIo::new(on.await.unwrap());
                while let Some((opcode, payload)) = read_frame(&mut io).await {
                    if opcode == CLOSE {
                        write_frame(&mut io, CLOSE, &payload, false).await;
                        break;
                    }
                    let mut echoed = b"echo: ".to_vec();
                    echoed.extend_from_slice(&payload);
                    write_frame(&mut io, opcode, &echoed, false).await;
                }
                let _ = io.shutdown().await;
            });
            resp
        }
        Some(other) => {
            let resp = switching
                .header("upgrade", other)
                .body(body::empty())
                .unwrap();
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let mut io = TokioIo::new(on.await.unwrap());
                let mut total = 0;
                let mut buf = [0u8; 1024];
                loop {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            total += n;
                            io.write_all(&buf[..n].to_ascii_uppercase()).await.unwrap();
                        }
                    }
                }
                // The client has shut its write side; this side still talks.
                io.write_all(format!("bye after {total} bytes\n").as_bytes())
                    .await
                    .unwrap();
                io.shutdown().await.unwrap();
            });
            resp
        }
        None => plain("plain"),
    }
}

/// A raw TCP echo server: echoes until the client's end of stream, then ends its own.
async fn tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// An address nothing listens on.
async fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

// ---------------------------------------------------------------------------------------
// Topologies.

/// The app behind one plaintext sidecar, as service `ws:80`.
async fn one_sidecar(app: &UpgradeApp) -> (RunningProxy, &'static str) {
    (client_proxy("ws", &[app.addr]).await, "ws")
}

/// The app behind its own sidecar (STRICT mTLS) as `reviews:9080`, called through the
/// client's sidecar: client → outbound sidecar → mTLS → inbound sidecar → app.
async fn two_sidecars(pki: &Pki, app: &UpgradeApp) -> (RunningProxy, RunningProxy, &'static str) {
    let server = start_proxy(&format!(
        "{}{STRICT}",
        sidecar("reviews", Some(app.addr), &pki.issue("reviews"))
    ))
    .await;
    let client = start_proxy(&format!(
        "{}{}",
        sidecar("productpage", None, &pki.issue("productpage")),
        support::reviews_entry(server.inbound_addr().unwrap(), Some("reviews"))
    ))
    .await;
    (client, server, "reviews:9080")
}

// ---------------------------------------------------------------------------------------
// Exchanges.

/// A WebSocket session through the outbound listener at `via` to `host`: handshake (the
/// accept digest checked), three text frames echoed, a close answered, then the end.
/// Returns the `101`'s headers.
async fn websocket_session(via: SocketAddr, host: &str) -> Vec<(String, String)> {
    let mut io = step("connect", TcpStream::connect(via)).await.unwrap();
    let key = base64(uuid::Uuid::new_v4().as_bytes());
    let handshake = format!(
        "GET /chat HTTP/1.1\r\nhost: {host}\r\nconnection: keep-alive, Upgrade\r\n\
         upgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: {key}\r\n\r\n"
    );
    io.write_all(handshake.as_bytes()).await.unwrap();
    let (status, headers) = step("the 101", read_head(&mut io)).await;
    assert_eq!(status, 101, "{headers:?}");
    assert_eq!(
        header(&headers, "upgrade")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("websocket")
    );
    assert!(
        header(&headers, "connection").is_some_and(|c| c.eq_ignore_ascii_case("upgrade")),
        "{headers:?}"
    );
    assert_eq!(
        header(&headers, "sec-websocket-accept"),
        Some(websocket_accept(&key).as_str()),
        "the accept digest must be the app's, for this key"
    );

    for msg in ["hello", "through the mesh", &"x".repeat(300)] {
        write_frame(&mut io, TEXT, msg.as_bytes(), true).await;
        let (opcode, payload) = step("an echoed frame", read_frame(&mut io))
            .await
            .expect("a frame, not the end");
        assert_eq!(opcode, TEXT);
        assert_eq!(String::from_utf8(payload).unwrap(), format!("echo: {msg}"));
    }
    write_frame(&mut io, CLOSE, &1000u16.to_be_bytes(), true).await;
    let (opcode, payload) = step("the close reply", read_frame(&mut io))
        .await
        .expect("a close frame");
    assert_eq!((opcode, payload), (CLOSE, 1000u16.to_be_bytes().to_vec()));
    // The app ended its side; the tunnel passes the end on.
    assert_eq!(
        step("the end of the tunnel", read_to_end(&mut io)).await,
        ""
    );
    headers
}

/// A `custom-proto` upgrade: a round trip, then the client shuts its write side and still
/// reads the app's last words to the end.
async fn custom_protocol_session(via: SocketAddr, host: &str) {
    let mut io = step("connect", TcpStream::connect(via)).await.unwrap();
    let request = format!(
        "GET /raw HTTP/1.1\r\nhost: {host}\r\nconnection: Upgrade\r\nupgrade: custom-proto\r\n\r\n"
    );
    io.write_all(request.as_bytes()).await.unwrap();
    let (status, headers) = step("the 101", read_head(&mut io)).await;
    assert_eq!(status, 101, "{headers:?}");
    assert_eq!(header(&headers, "upgrade"), Some("custom-proto"));

    io.write_all(b"ping 1\n").await.unwrap();
    let mut pong = [0u8; 7];
    step("the echo", io.read_exact(&mut pong)).await.unwrap();
    assert_eq!(&pong, b"PING 1\n");

    io.write_all(b"last words\n").await.unwrap();
    // Half-close: no more from the client, but the app still has something to say.
    io.shutdown().await.unwrap();
    let rest = step("the app's last bytes", read_to_end(&mut io)).await;
    assert_eq!(rest, "LAST WORDS\nbye after 18 bytes\n");
}

/// Sends a raw request and reads the response head and its `content-length` body.
async fn raw_exchange(via: SocketAddr, request: &str) -> (u16, Vec<(String, String)>, String) {
    let mut io = step("connect", TcpStream::connect(via)).await.unwrap();
    io.write_all(request.as_bytes()).await.unwrap();
    let (status, headers) = step("the response head", read_head(&mut io)).await;
    let len: usize = header(&headers, "content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    step("the body", io.read_exact(&mut body)).await.unwrap();
    (status, headers, String::from_utf8(body).unwrap())
}

// ---------------------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn websocket_echo_through_one_plaintext_sidecar_on_a_dedicated_connection() {
    let app = UpgradeApp::start().await;
    let (proxy, host) = one_sidecar(&app).await;
    let via = proxy.outbound_addr().unwrap();

    // Ordinary requests share a pooled connection: poll (bounded) until one is reused.
    let client = http1_client();
    let mut pooled = false;
    for _ in 0..50 {
        let resp = client.request(get(via, host, "/")).await.unwrap();
        let n = resp.headers()["x-conn-requests"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(text(resp).await, "plain");
        if n != "1" {
            pooled = true;
            break;
        }
    }
    assert!(
        pooled,
        "ordinary requests never shared an upstream connection"
    );

    // The upgrade gets a connection of its own: the first request it carries.
    let before = app.accepted();
    let headers = websocket_session(via, host).await;
    assert_eq!(
        header(&headers, "x-conn-requests"),
        Some("1"),
        "{headers:?}"
    );
    assert_eq!(app.accepted(), before + 1);

    // A second session works as well, and ordinary requests still go through.
    websocket_session(via, host).await;
    let resp = client.request(get(via, host, "/")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn websocket_echo_through_two_sidecars_over_mtls() {
    let pki = Pki::new();
    let app = UpgradeApp::start().await;
    let (client, _server, host) = two_sidecars(&pki, &app).await;
    let headers = websocket_session(client.outbound_addr().unwrap(), host).await;
    assert_eq!(header(&headers, "x-conn-requests"), Some("1"));
}

#[tokio::test]
async fn a_custom_upgrade_half_closes_through_one_sidecar() {
    let app = UpgradeApp::start().await;
    let (proxy, host) = one_sidecar(&app).await;
    custom_protocol_session(proxy.outbound_addr().unwrap(), host).await;
}

#[tokio::test]
async fn a_custom_upgrade_half_closes_through_two_sidecars_over_mtls() {
    let pki = Pki::new();
    let app = UpgradeApp::start().await;
    let (client, _server, host) = two_sidecars(&pki, &app).await;
    custom_protocol_session(client.outbound_addr().unwrap(), host).await;
}

#[tokio::test]
async fn connect_tunnels_to_a_known_tcp_service_and_refuses_an_unknown_host() {
    let echo = tcp_echo().await;
    let proxy = start_proxy(&format!(
        "{}{}",
        bootstrap("client", None),
        service_entry("echo", 7000, "TCP", &[echo])
    ))
    .await;
    let via = proxy.outbound_addr().unwrap();

    let mut io = step("connect", TcpStream::connect(via)).await.unwrap();
    io.write_all(b"CONNECT echo:7000 HTTP/1.1\r\nhost: echo:7000\r\n\r\n")
        .await
        .unwrap();
    let (status, headers) = step("the CONNECT answer", read_head(&mut io)).await;
    assert_eq!(status, 200, "{headers:?}");
    io.write_all(b"hello through the tunnel").await.unwrap();
    let mut back = [0u8; 24];
    step("the echo", io.read_exact(&mut back)).await.unwrap();
    assert_eq!(&back, b"hello through the tunnel");
    io.write_all(b" and bye").await.unwrap();
    io.shutdown().await.unwrap();
    assert_eq!(step("the end", read_to_end(&mut io)).await, " and bye");

    let (status, headers, body) = raw_exchange(
        via,
        "CONNECT nowhere.example:7000 HTTP/1.1\r\nhost: nowhere.example:7000\r\n\r\n",
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(header(&headers, "x-mesh-response-flags"), Some("NR"));
}

#[tokio::test]
async fn an_upgrade_to_a_dead_endpoint_is_503_uf_without_retries() {
    let dead = dead_addr().await;
    let proxy = client_proxy("ws", &[dead]).await;
    let (status, headers, body) = raw_exchange(
        proxy.outbound_addr().unwrap(),
        "GET /chat HTTP/1.1\r\nhost: ws\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert_eq!(status, 503, "{body}");
    // UF alone: an upgrade is never retried (Istio's default policy would add URX).
    assert_eq!(header(&headers, "x-mesh-response-flags"), Some("UF"));
    assert!(body.contains(&dead.to_string()), "{body}");
}

#[tokio::test]
async fn a_declined_upgrade_is_an_ordinary_response() {
    let app = UpgradeApp::start().await;
    let (proxy, host) = one_sidecar(&app).await;
    let via = proxy.outbound_addr().unwrap();
    let (status, headers, body) = raw_exchange(
        via,
        &format!(
            "GET /no-upgrade HTTP/1.1\r\nhost: {host}\r\nconnection: Upgrade\r\n\
             upgrade: websocket\r\nsec-websocket-version: 13\r\n\
             sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 200, "{headers:?}");
    assert_eq!(body, "no upgrade here");
    assert_eq!(header(&headers, "upgrade"), None);
}

#[tokio::test]
async fn an_h2c_upgrade_is_not_forwarded() {
    let app = UpgradeApp::start().await;
    let (proxy, host) = one_sidecar(&app).await;
    // The app would switch to anything it is asked to; h2c never reaches it as an upgrade.
    let (status, headers, body) = raw_exchange(
        proxy.outbound_addr().unwrap(),
        &format!(
            "GET / HTTP/1.1\r\nhost: {host}\r\nconnection: Upgrade, HTTP2-Settings\r\n\
             upgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 200, "{headers:?}");
    assert_eq!(body, "plain");
}

#[tokio::test]
async fn the_route_timeout_ends_at_the_101() {
    let app = UpgradeApp::start().await;
    let routes = "  - timeout: 100ms\n    route:\n    - destination: { host: ws }\n";
    let proxy = start_proxy(&format!(
        "{}{}{}",
        bootstrap("client", None),
        service_entry("ws", 80, "HTTP", &[app.addr]),
        support::virtual_service("ws", routes)
    ))
    .await;
    let mut io = step(
        "connect",
        TcpStream::connect(proxy.outbound_addr().unwrap()),
    )
    .await
    .unwrap();
    io.write_all(
        b"GET /raw HTTP/1.1\r\nhost: ws\r\nconnection: Upgrade\r\nupgrade: custom-proto\r\n\r\n",
    )
    .await
    .unwrap();
    let (status, headers) = step("the 101", read_head(&mut io)).await;
    assert_eq!(status, 101, "{headers:?}");
    // Quiet for several times the route's timeout: an upgraded stream has none (Istio).
    tokio::time::sleep(Duration::from_millis(500)).await;
    io.write_all(b"still here\n").await.unwrap();
    io.shutdown().await.unwrap();
    let rest = step("the app's answer", read_to_end(&mut io)).await;
    assert_eq!(rest, "STILL HERE\nbye after 11 bytes\n");
}
