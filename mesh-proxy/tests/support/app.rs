//! A real HTTP backend on loopback, serving HTTP/1.1 and HTTP/2 on one port.
//!
//! - `/echo`: streams the request body back as it arrives.
//! - `/delay?ms=N`: answers after N ms.
//! - `/bytes?n=N`: N bytes of `x`, streamed in 64 KiB chunks.
//! - `/fail-every?n=N`: answers 503 to every N-th request the app receives (its `received`
//!   count), else as usual: a deterministic partly broken endpoint.
//! - anything else: `hello from NAME`.
//!
//! Every response says what the app saw: `x-app` (its name), `x-seen-host`,
//! `x-seen-path`, `x-seen-version`, `x-seen-end-user`, `x-seen-xff`, `x-seen-xfp`, `x-seen-request-id`, `x-seen-connection`, `x-seen-xfcc`,
//! `x-seen-peer-metadata`, `x-seen-orig-proto` (`-` when the header was absent).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use mesh_core::body::{self, BoxBody};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// A running app; dropping or [`kill`](App::kill)ing it closes the listener and every
/// connection, as a crashed process would.
pub struct App {
    pub addr: SocketAddr,
    /// Requests received so far.
    pub received: Arc<AtomicUsize>,
    /// Connections open right now.
    pub open: Arc<AtomicUsize>,
    /// `(host, path and query)` of every request received, in order.
    pub seen: Arc<Mutex<Vec<(String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    pub async fn start(name: &'static str) -> App {
        App::start_with_status(name, 200).await
    }

    /// An app that answers every request with `status` (a broken backend, say).
    pub async fn start_with_status(name: &'static str, status: u16) -> App {
        App::start_at(name, status, "127.0.0.1:0".parse().unwrap()).await
    }

    /// An app listening on `addr` (another loopback address, or a given port).
    pub async fn start_at(name: &'static str, status: u16, addr: SocketAddr) -> App {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let counter = received.clone();
        let log = seen.clone();
        let open = Arc::new(AtomicUsize::new(0));
        let open_count = open.clone();
        let task = tokio::spawn(async move {
            // Connections live in the JoinSet so that aborting this task closes them all.
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let counter = counter.clone();
                let log = log.clone();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let host = req
                        .uri()
                        .authority()
                        .map(|a| a.to_string())
                        .or_else(|| {
                            req.headers()
                                .get("host")
                                .and_then(|h| h.to_str().ok())
                                .map(str::to_owned)
                        })
                        .unwrap_or_default();
                    let path = req
                        .uri()
                        .path_and_query()
                        .map(|p| p.to_string())
                        .unwrap_or_default();
                    log.lock().unwrap().push((host, path));
                    let nth = counter.fetch_add(1, Ordering::SeqCst) + 1;
                    handle(name, status, nth, req)
                });
                let open_count = open_count.clone();
                open_count.fetch_add(1, Ordering::SeqCst);
                conns.spawn(async move {
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    open_count.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        App {
            addr,
            received,
            open,
            seen,
            task,
        }
    }

    pub fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    name: &'static str,
    status: u16,
    nth: usize,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, std::convert::Infallible> {
    let every = |q: &str| q.strip_prefix("n=").and_then(|v| v.parse::<usize>().ok());
    let status = match req.uri().query().and_then(every) {
        Some(n) if req.uri().path() == "/fail-every" && n > 0 && nth.is_multiple_of(n) => 503,
        _ => status,
    };
    let seen = |h: &str| {
        req.headers()
            .get(h)
            .cloned()
            .unwrap_or(HeaderValue::from_static("-"))
    };
    let host = req
        .uri()
        .authority()
        .map(|a| HeaderValue::from_str(a.as_str()).unwrap())
        .unwrap_or_else(|| seen("host"));
    let info = [
        ("x-app", HeaderValue::from_static(name)),
        ("x-seen-host", host),
        (
            "x-seen-path",
            HeaderValue::from_str(req.uri().path_and_query().map_or("/", |p| p.as_str())).unwrap(),
        ),
        ("x-seen-end-user", seen("end-user")),
        (
            "x-seen-version",
            HeaderValue::from_str(&format!("{:?}", req.version())).unwrap(),
        ),
        ("x-seen-xff", seen("x-forwarded-for")),
        ("x-seen-xfp", seen("x-forwarded-proto")),
        ("x-seen-request-id", seen("x-request-id")),
        ("x-seen-connection", seen("connection")),
        ("x-seen-xfcc", seen("x-forwarded-client-cert")),
        ("x-seen-peer-metadata", seen("x-mesh-peer-metadata")),
        ("x-seen-orig-proto", seen("x-mesh-orig-proto")),
    ];
    let mut resp = match req.uri().path() {
        "/echo" => Response::new(body::boxed(req.into_body())),
        "/delay" => {
            let ms: u64 = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("ms="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::new(body::full(format!("{name} waited {ms} ms")))
        }
        "/bytes" => {
            static CHUNK: [u8; 64 * 1024] = [b'x'; 64 * 1024];
            let n: usize = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("n="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let chunks = (0..n.div_ceil(CHUNK.len())).map(move |i| {
                let len = (n - i * CHUNK.len()).min(CHUNK.len());
                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                    bytes::Bytes::from_static(&CHUNK[..len]),
                ))
            });
            Response::new(body::boxed(http_body_util::StreamBody::new(
                futures::stream::iter(chunks),
            )))
        }
        _ => Response::new(body::full(format!("hello from {name}"))),
    };
    for (k, v) in info {
        resp.headers_mut().insert(k, v);
    }
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
    Ok(resp)
}
