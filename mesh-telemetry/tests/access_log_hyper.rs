//! The access-log layer inside a real hyper server on loopback: HTTP/1.1 and HTTP/2, bodies
//! streamed over the wire, HEAD, and a client that disconnects mid-body.
#![cfg(feature = "access-log")]
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::config::bootstrap::AccessLogEncoding;
use mesh_core::conn::ClientInfo;
use mesh_telemetry::access_log::{AccessLog, AccessLogLayer, RequestBody};
use serde_json::Value;
use tokio::io::AsyncWrite;
use tokio::net::{TcpListener, TcpStream};
use tower::{Layer, ServiceExt, service_fn};

#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl SharedBuf {
    fn json(&self) -> Vec<Value> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl AsyncWrite for SharedBuf {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        self.0.lock().unwrap().extend_from_slice(b);
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The app: echoes the request body's length; `/slow` streams one chunk then never ends.
async fn app(req: Request<RequestBody<Incoming>>) -> Result<Response<BoxBody>, BoxError> {
    if req.uri().path() == "/slow" {
        let first = futures::stream::iter([Ok::<_, Infallible>(Frame::data(Bytes::from_static(
            b"first chunk",
        )))]);
        let never = futures::stream::pending();
        return Ok(Response::new(body::boxed(StreamBody::new(
            futures::StreamExt::chain(first, never),
        ))));
    }
    let received = req.into_body().collect().await?.to_bytes().len();
    Ok(Response::new(body::full(format!("got {received} bytes"))))
}

/// Serves the logged app on loopback (HTTP/1.1 or HTTP/2 by preface), tagging each request
/// with its connection as a sidecar listener does.
async fn serve(log: AccessLog) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = listener.local_addr().unwrap();
    let svc = AccessLogLayer::new(log).layer(service_fn(app));
    tokio::spawn(async move {
        loop {
            let (stream, remote) = listener.accept().await.unwrap();
            let svc = svc.clone();
            let per_conn = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(ClientInfo {
                    remote,
                    local,
                    tls: false,
                });
                svc.clone().oneshot(req)
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), per_conn)
                    .await;
            });
        }
    });
    local
}

fn chunked_body() -> BoxBody {
    let chunks = ["12345", "678", "90"].map(|c| Ok::<_, Infallible>(Frame::data(Bytes::from(c))));
    body::boxed(StreamBody::new(futures::stream::iter(chunks)))
}

/// Flushes until `n` lines are there (real time; the server finishes a line after the
/// client has its response), up to 3 s.
async fn lines(log: &AccessLog, buf: &SharedBuf, n: usize) -> Vec<Value> {
    for _ in 0..150 {
        log.flush().await.unwrap();
        let lines = buf.json();
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    buf.json()
}

#[tokio::test]
async fn http1_and_http2_over_loopback() {
    let buf = SharedBuf::default();
    let log = AccessLog::from_writer(buf.clone(), AccessLogEncoding::Json).unwrap();
    let addr = serve(log.clone()).await;

    // HTTP/1.1, chunked request body, then HEAD on the same connection.
    let stream = TcpStream::connect(addr).await.unwrap();
    let client_addr = stream.local_addr().unwrap();
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::post("/upload?id=1")
        .header("host", "reviews:9080")
        .header("user-agent", "loopback-test")
        .body(chunked_body())
        .unwrap();
    let response = h1.send_request(req).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "got 10 bytes");
    let req = Request::head("/upload")
        .header("host", "reviews:9080")
        .body(body::empty())
        .unwrap();
    let response = h1.send_request(req).await.unwrap();
    response.into_body().collect().await.unwrap();

    // HTTP/2 with prior knowledge.
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::post("http://ratings:9080/rate")
        .body(chunked_body())
        .unwrap();
    let response = h2.send_request(req).await.unwrap();
    response.into_body().collect().await.unwrap();

    let lines = lines(&log, &buf, 3).await;
    assert_eq!(lines.len(), 3, "{lines:?}");
    let post = &lines[0];
    assert_eq!(post["method"], "POST");
    assert_eq!(post["path"], "/upload?id=1");
    assert_eq!(post["protocol"], "HTTP/1.1");
    assert_eq!(post["authority"], "reviews:9080");
    assert_eq!(post["bytes_received"], 10);
    assert_eq!(post["bytes_sent"], 12);
    assert_eq!(post["response_flags"], "-");
    assert_eq!(post["downstream_remote_address"], client_addr.to_string());
    assert_eq!(post["downstream_local_address"], addr.to_string());
    // hyper never reads a HEAD response's body: complete, not a disconnection.
    let head = &lines[1];
    assert_eq!(head["method"], "HEAD");
    assert_eq!(head["response_flags"], "-");
    assert_eq!(head["bytes_sent"], 0);
    let h2 = &lines[2];
    assert_eq!(h2["protocol"], "HTTP/2");
    assert_eq!(h2["authority"], "ratings:9080");
    assert_eq!(h2["path"], "/rate");
    assert_eq!(h2["bytes_received"], 10);
}

#[tokio::test]
async fn a_client_gone_mid_body_is_logged_once_with_dc() {
    let buf = SharedBuf::default();
    let log = AccessLog::from_writer(buf.clone(), AccessLogEncoding::Json).unwrap();
    let addr = serve(log.clone()).await;

    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let req = Request::get("/slow")
        .header("host", "reviews:9080")
        .body(body::empty())
        .unwrap();
    let response = h1.send_request(req).await.unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "first chunk");
    // Hang up mid-body.
    drop((body, h1));
    conn.abort();

    let lines = lines(&log, &buf, 1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["response_code"], 200);
    assert_eq!(lines[0]["response_flags"], "DC");
    assert_eq!(lines[0]["bytes_sent"], 11);
    // Nothing more comes later.
    tokio::time::sleep(Duration::from_millis(100)).await;
    log.flush().await.unwrap();
    assert_eq!(buf.json().len(), 1);
}

#[test]
fn the_layer_s_types_are_send() {
    fn send<T: Send>() {}
    type Svc = mesh_telemetry::access_log::AccessLogService<
        tower::util::BoxService<Request<RequestBody<BoxBody>>, Response<BoxBody>, BoxError>,
    >;
    send::<Svc>();
    send::<
        mesh_telemetry::access_log::ResponseFuture<
            Pin<Box<dyn std::future::Future<Output = Result<Response<BoxBody>, BoxError>> + Send>>,
        >,
    >();
    send::<mesh_telemetry::access_log::ResponseBody<BoxBody>>();
    send::<RequestBody<BoxBody>>();
    send::<AccessLog>();
}
