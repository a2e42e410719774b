//! The access-log layer over plain services, with in-memory writers and real files.
#![cfg(feature = "access-log")]
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response, StatusCode, Version};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::config::bootstrap::{AccessLogEncoding, AccessLogSettings};
use mesh_core::config::{Protocol, ServicePort};
use mesh_core::conn::ClientInfo;
use mesh_core::flags::RESPONSE_FLAGS_HEADER;
use mesh_core::stream_info::StreamInfo;
use mesh_core::target::{RouteTarget, Subset};
use mesh_core::{HostName, Identity, Labels, ProxyError, ResponseFlags};
use mesh_telemetry::access_log::{
    AccessLog, AccessLogError, AccessLogLayer, AccessLogService, RequestBody,
};
use serde_json::Value;
use tokio::io::AsyncWrite;
use tower::{Layer, ServiceExt, service_fn};

/// An in-memory destination the test can read while the writer task holds a clone.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl SharedBuf {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
    fn lines(&self) -> Vec<String> {
        self.text().lines().map(str::to_string).collect()
    }
    fn json(&self) -> Vec<Value> {
        self.lines()
            .iter()
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

/// 2026-01-02T03:04:05.678Z
fn fixed_clock() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_767_323_045_678)
}

fn log_to(buf: &SharedBuf, encoding: AccessLogEncoding) -> AccessLog {
    AccessLog::builder(encoding)
        .clock(fixed_clock)
        .writer(buf.clone())
        .unwrap()
}

fn chunks(parts: &[&'static str]) -> BoxBody {
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = parts
        .iter()
        .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
        .collect();
    body::boxed(StreamBody::new(futures::stream::iter(frames)))
}

const TRACE_ID: [u8; 16] = [
    0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36,
];

fn reviews_v1() -> RouteTarget {
    let service = ServicePort::new(
        HostName::qualify("reviews", "default"),
        9080,
        Protocol::Http,
    );
    RouteTarget {
        subset: Some(Arc::new(Subset {
            name: "v1".into(),
            labels: Labels::default(),
        })),
        ..RouteTarget::new(Arc::new(service))
    }
}

/// What the inner layers of an outbound stack would record: route, endpoint, its identity,
/// the trace id. Then reads the whole request body, takes 7 ms, and answers 503 `FI` with a
/// body streamed in three chunks (20 bytes).
async fn upstream(req: Request<RequestBody<BoxBody>>) -> Result<Response<BoxBody>, BoxError> {
    let info = req.extensions().get::<StreamInfo>().cloned().unwrap();
    info.set_route(&reviews_v1());
    info.set_upstream("10.0.0.7:9080".parse().unwrap());
    info.set_upstream_peer(
        Identity::parse("spiffe://cluster.local/ns/default/sa/reviews").unwrap(),
    );
    info.set_trace_id(TRACE_ID);
    req.into_body().collect().await?;
    tokio::time::sleep(Duration::from_millis(7)).await;
    Ok(Response::builder()
        .status(503)
        .header(RESPONSE_FLAGS_HEADER, "FI")
        .body(chunks(&["hello ", "streamed ", "world"]))
        .unwrap())
}

fn client_info() -> ClientInfo {
    ClientInfo {
        remote: "10.1.0.4:40112".parse().unwrap(),
        local: "127.0.0.1:15001".parse().unwrap(),
        tls: false,
    }
}

fn full_request() -> Request<BoxBody> {
    let mut req = Request::post("/reviews/1?x=1")
        .header("host", "reviews:9080")
        .header("x-forwarded-for", "10.1.0.4")
        .header("user-agent", "curl/8.5.0")
        .header("x-request-id", "0f6c2a3e-1")
        .body(chunks(&["abc", "defg"]))
        .unwrap();
    req.extensions_mut().insert(client_info());
    req
}

/// Sends `req` and reads the whole response body.
async fn exchange<S>(svc: S, req: Request<BoxBody>) -> Result<Bytes, S::Error>
where
    S: tower::Service<
            Request<BoxBody>,
            Response = Response<mesh_telemetry::access_log::ResponseBody<BoxBody>>,
        >,
{
    let response = svc.oneshot(req).await?;
    Ok(response.into_body().collect().await.unwrap().to_bytes())
}

#[tokio::test(start_paused = true)]
async fn json_line_has_every_field() {
    let buf = SharedBuf::default();
    let log = log_to(&buf, AccessLogEncoding::Json);
    let svc = AccessLogLayer::new(log.clone()).layer(service_fn(upstream));
    let body = exchange(svc, full_request()).await.unwrap();
    assert_eq!(body, "hello streamed world");
    log.flush().await.unwrap();

    let lines = buf.json();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    let expected = serde_json::json!({
        "start_time": "2026-01-02T03:04:05.678Z",
        "method": "POST",
        "path": "/reviews/1?x=1",
        "protocol": "HTTP/1.1",
        "response_code": 503,
        "response_flags": "FI",
        "bytes_received": 7,
        "bytes_sent": 20,
        "duration": 7,
        "x_forwarded_for": "10.1.0.4",
        "user_agent": "curl/8.5.0",
        "request_id": "0f6c2a3e-1",
        "authority": "reviews:9080",
        "upstream_host": "10.0.0.7:9080",
        "upstream_cluster": "outbound|9080|v1|reviews.default.svc.cluster.local",
        "downstream_local_address": "127.0.0.1:15001",
        "downstream_remote_address": "10.1.0.4:40112",
        "route_name": null,
        "peer_principal": "spiffe://cluster.local/ns/default/sa/reviews",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    });
    assert_eq!(line, &expected);
    assert_eq!(log.dropped(), 0);
}

#[tokio::test(start_paused = true)]
async fn text_line_is_istios_format_exactly() {
    let buf = SharedBuf::default();
    let log = log_to(&buf, AccessLogEncoding::Text);
    let svc = AccessLogLayer::new(log.clone()).layer(service_fn(upstream));
    let mut req = full_request();
    // HTTP/2: the authority comes from the URI (`:authority`), not from a Host header.
    *req.uri_mut() = "http://reviews:9080/reviews/1?x=1".parse().unwrap();
    *req.version_mut() = Version::HTTP_2;
    req.headers_mut().remove("host");
    exchange(svc, req).await.unwrap();

    // A bare request through a layer with nothing recorded: every unset column is `-`.
    let bare = service_fn(|_req: Request<RequestBody<BoxBody>>| async {
        Ok::<_, BoxError>(Response::new(body::empty()))
    });
    let svc = AccessLogLayer::new(log.clone()).layer(bare);
    exchange(svc, Request::new(body::empty())).await.unwrap();
    log.flush().await.unwrap();

    assert_eq!(
        buf.text(),
        concat!(
            "[2026-01-02T03:04:05.678Z] \"POST /reviews/1?x=1 HTTP/2\" 503 FI - - \"-\" 7 20 7 - ",
            "\"10.1.0.4\" \"curl/8.5.0\" \"0f6c2a3e-1\" \"reviews:9080\" \"10.0.0.7:9080\" ",
            "outbound|9080|v1|reviews.default.svc.cluster.local - 127.0.0.1:15001 10.1.0.4:40112 ",
            "- - spiffe://cluster.local/ns/default/sa/reviews 4bf92f3577b34da6a3ce929d0e0e4736\n",
            "[2026-01-02T03:04:05.678Z] \"GET / HTTP/1.1\" 200 - - - \"-\" 0 0 0 - ",
            "\"-\" \"-\" \"-\" \"-\" \"-\" - - - - - - - -\n",
        )
    );
}

#[tokio::test(start_paused = true)]
async fn inbound_logs_the_downstream_peer_and_inbound_cluster() {
    let buf = SharedBuf::default();
    let log = log_to(&buf, AccessLogEncoding::Json);
    let app = service_fn(|req: Request<RequestBody<BoxBody>>| async move {
        // The forwarder records the app as the upstream, without an identity.
        let info = req.extensions().get::<StreamInfo>().cloned().unwrap();
        info.set_upstream("127.0.0.1:9080".parse().unwrap());
        Ok::<_, BoxError>(Response::new(body::full("ok")))
    });
    let svc = AccessLogLayer::inbound(log.clone(), 9080).layer(app);
    let mut req = Request::get("/ratings").body(body::empty()).unwrap();
    req.extensions_mut().insert(client_info());
    req.extensions_mut()
        .insert(Identity::parse("spiffe://cluster.local/ns/default/sa/productpage").unwrap());
    exchange(svc, req).await.unwrap();
    log.flush().await.unwrap();

    let line = &buf.json()[0];
    assert_eq!(line["upstream_cluster"], "inbound|9080||");
    assert_eq!(line["upstream_host"], "127.0.0.1:9080");
    assert_eq!(
        line["peer_principal"],
        "spiffe://cluster.local/ns/default/sa/productpage"
    );
    assert_eq!(line["bytes_sent"], 2);
    assert_eq!(line["trace_id"], Value::Null);

    // The same request outbound: the downstream identity is not the peer, no route no cluster.
    let buf = SharedBuf::default();
    let log = log_to(&buf, AccessLogEncoding::Json);
    let app = service_fn(|_req: Request<RequestBody<BoxBody>>| async {
        Ok::<_, BoxError>(Response::new(body::empty()))
    });
    let svc = AccessLogLayer::new(log.clone())
        .with_cluster("PassthroughCluster")
        .layer(app);
    let mut req = Request::get("/").body(body::empty()).unwrap();
    req.extensions_mut()
        .insert(Identity::parse("spiffe://cluster.local/ns/default/sa/productpage").unwrap());
    exchange(svc, req).await.unwrap();
    log.flush().await.unwrap();
    let line = &buf.json()[0];
    assert_eq!(line["peer_principal"], Value::Null);
    assert_eq!(line["upstream_cluster"], "PassthroughCluster");
}

#[tokio::test(start_paused = true)]
async fn exactly_one_line_per_request() {
    let buf = SharedBuf::default();
    let log = log_to(&buf, AccessLogEncoding::Json);
    let svc = AccessLogLayer::new(log.clone()).layer(service_fn(upstream));
    let requests = (0..100).map(|i| {
        let svc = svc.clone();
        let mut req = full_request();
        req.headers_mut()
            .insert("x-request-id", HeaderValue::from(i as u64));
        async move { exchange(svc, req).await.unwrap() }
    });
    futures::future::join_all(requests).await;
    log.flush().await.unwrap();

    let mut ids: Vec<u64> = buf
        .json()
        .iter()
        .map(|l| l["request_id"].as_str().unwrap().parse().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..100).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn a_body_dropped_early_logs_once_with_dc() {
    let buf = SharedBuf::default();
    let log = log_to(&buf, AccessLogEncoding::Json);
    let svc = AccessLogLayer::new(log.clone()).layer(service_fn(upstream));

    // Read one chunk, then go away.
    let response = svc.clone().oneshot(full_request()).await.unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "hello ");
    tokio::time::sleep(Duration::from_millis(3)).await;
    drop(body);

    // Never read at all.
    let response = svc.clone().oneshot(full_request()).await.unwrap();
    drop(response);

    // A HEAD response's body is never read: that is no disconnection.
    let head = service_fn(|_req: Request<RequestBody<BoxBody>>| async {
        Ok::<_, BoxError>(Response::new(chunks(&["not sent"])))
    });
    let svc = AccessLogLayer::new(log.clone()).layer(head);
    let req = Request::head("/").body(body::empty()).unwrap();
    drop(svc.clone().oneshot(req).await.unwrap());
    // Nor is a CONNECT's 200: a tunnel follows, not a body.
    let req = Request::connect("echo:7000").body(body::empty()).unwrap();
    drop(svc.oneshot(req).await.unwrap());
    log.flush().await.unwrap();

    let lines = buf.json();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(lines[3]["method"], "CONNECT");
    assert_eq!(lines[3]["response_flags"], "-");
    assert_eq!(lines[0]["response_flags"], "FI,DC");
    assert_eq!(lines[0]["response_code"], 503);
    assert_eq!(lines[0]["bytes_sent"], 6);
    assert_eq!(lines[0]["duration"], 10);
    assert_eq!(lines[1]["response_flags"], "FI,DC");
    assert_eq!(lines[1]["bytes_sent"], 0);
    assert_eq!(lines[2]["method"], "HEAD");
    assert_eq!(lines[2]["response_flags"], "-");
}

#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_before_the_response_logs_0_dc() {
    let buf = SharedBuf::default();
    let log = log_to(&buf, AccessLogEncoding::Text);
    let slow = service_fn(|_req: Request<RequestBody<BoxBody>>| async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok::<_, BoxError>(Response::new(body::empty()))
    });
    let svc = AccessLogLayer::new(log.clone()).layer(slow);
    let gave_up = tokio::time::timeout(Duration::from_secs(2), svc.oneshot(full_request())).await;
    assert!(gave_up.is_err());
    log.flush().await.unwrap();
    let lines = buf.lines();
    assert_eq!(lines.len(), 1);
    assert!(
        lines[0].starts_with(
            "[2026-01-02T03:04:05.678Z] \"POST /reviews/1?x=1 HTTP/1.1\" 0 DC - - \"-\" 0 0 2000 - "
        ),
        "{}",
        lines[0]
    );
}

#[tokio::test(start_paused = true)]
async fn inner_errors_log_once() {
    let buf = SharedBuf::default();
    let log = log_to(&buf, AccessLogEncoding::Json);
    let failing = service_fn(|req: Request<RequestBody<BoxBody>>| async move {
        let error: BoxError = if req.uri().path() == "/typed" {
            ProxyError::connect_failed("reviews:9080", "10.0.0.7:9080", "connection refused").into()
        } else {
            io::Error::other("a bug somewhere").into()
        };
        Err::<Response<BoxBody>, _>(error)
    });
    let svc = AccessLogLayer::new(log.clone()).layer(failing);
    for path in ["/typed", "/untyped"] {
        let req = Request::get(path).body(body::empty()).unwrap();
        let error = svc.clone().oneshot(req).await.unwrap_err();
        assert!(
            !error.to_string().is_empty(),
            "the error passes through unchanged"
        );
    }
    // A ProxyError as the service's own error type is recognised too.
    let direct = service_fn(|_req: Request<RequestBody<BoxBody>>| async {
        Err::<Response<BoxBody>, _>(ProxyError::new(
            ResponseFlags::UPSTREAM_OVERFLOW,
            "overflow",
        ))
    });
    let svc = AccessLogLayer::new(log.clone()).layer(direct);
    svc.oneshot(Request::new(body::empty())).await.unwrap_err();
    log.flush().await.unwrap();

    let lines = buf.json();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(
        (&lines[0]["response_code"], &lines[0]["response_flags"]),
        (&503.into(), &"UF".into())
    );
    assert_eq!(
        (&lines[1]["response_code"], &lines[1]["response_flags"]),
        (&0.into(), &"-".into())
    );
    assert_eq!(
        (&lines[2]["response_code"], &lines[2]["response_flags"]),
        (&503.into(), &"UO".into())
    );
}

#[tokio::test(start_paused = true)]
async fn body_errors_and_extension_flags() {
    let buf = SharedBuf::default();
    let log = log_to(&buf, AccessLogEncoding::Json);
    let app = service_fn(|req: Request<RequestBody<BoxBody>>| async move {
        let path = req.uri().path().to_string();
        let error: BoxError = match path.as_str() {
            "/typed" => ProxyError::new(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT, "timeout").into(),
            _ => io::Error::other("reset").into(),
        };
        let frames = vec![Ok(Frame::data(Bytes::from_static(b"part"))), Err(error)];
        let mut response =
            Response::new(body::boxed(StreamBody::new(futures::stream::iter(frames))));
        // A peer's flags in the header, and the route's DI in the extensions.
        response
            .headers_mut()
            .insert(RESPONSE_FLAGS_HEADER, HeaderValue::from_static("UF,DI"));
        response
            .extensions_mut()
            .insert(ResponseFlags::DELAY_INJECTED | ResponseFlags::FAULT_INJECTED);
        Ok::<_, BoxError>(response)
    });
    let svc = AccessLogLayer::new(log.clone()).layer(app);
    for path in ["/untyped", "/typed"] {
        let req = Request::get(path).body(body::empty()).unwrap();
        let response = svc.clone().oneshot(req).await.unwrap();
        assert!(response.into_body().collect().await.is_err());
    }
    log.flush().await.unwrap();
    let lines = buf.json();
    assert_eq!(lines.len(), 2, "{lines:?}");
    // The header's flags as they came, then ours it does not name.
    assert_eq!(lines[0]["response_flags"], "UF,DI,UR,FI");
    assert_eq!(lines[1]["response_flags"], "UF,DI,UT,FI");
    assert_eq!(lines[1]["bytes_sent"], 4);
}

fn hostile_request() -> Request<BoxBody> {
    let nasty = |b: &[u8]| HeaderValue::from_bytes(b).unwrap();
    let mut req = Request::get("/a/b?q=%22x%22").body(body::empty()).unwrap();
    let h = req.headers_mut();
    h.insert("host", nasty(b"evil\" host"));
    h.insert("user-agent", nasty(b"say \"hi\" \\ \t tab \xff\xfe end"));
    h.insert("x-forwarded-for", nasty(b"\"], \"x\": \""));
    h.insert("x-request-id", nasty(b"\\\"\\"));
    h.insert("x-envoy-original-path", nasty(b"/orig \"path\" \xc3\x28"));
    req
}

#[tokio::test(start_paused = true)]
async fn hostile_header_values_never_break_a_line() {
    // Header values can never carry CR, LF, NUL or DEL: `http` refuses them.
    for b in [&b"a\nb"[..], b"a\rb", b"a\0b", b"a\x7fb"] {
        assert!(HeaderValue::from_bytes(b).is_err());
    }
    let app = service_fn(|_req: Request<RequestBody<BoxBody>>| async {
        let mut response = Response::new(body::empty());
        response.headers_mut().insert(
            RESPONSE_FLAGS_HEADER,
            HeaderValue::from_bytes(b"FI \"quoted\" \\ \xff").unwrap(),
        );
        Ok::<_, BoxError>(response)
    });

    let buf = SharedBuf::default();
    let log = log_to(&buf, AccessLogEncoding::Json);
    let svc = AccessLogLayer::new(log.clone()).layer(app);
    for _ in 0..3 {
        exchange(svc.clone(), hostile_request()).await.unwrap();
    }
    log.flush().await.unwrap();
    let lines = buf.json();
    assert_eq!(lines.len(), 3);
    let line = &lines[0];
    assert_eq!(
        line["user_agent"],
        "say \"hi\" \\ \t tab \u{fffd}\u{fffd} end"
    );
    assert_eq!(line["x_forwarded_for"], "\"], \"x\": \"");
    assert_eq!(line["request_id"], "\\\"\\");
    assert_eq!(line["authority"], "evil\" host");
    assert_eq!(line["path"], "/orig \"path\" \u{fffd}(");
    assert_eq!(line["response_flags"], "FI \"quoted\" \\ \u{fffd}");

    let buf = SharedBuf::default();
    let log = log_to(&buf, AccessLogEncoding::Text);
    let svc = AccessLogLayer::new(log.clone()).layer(app);
    for _ in 0..3 {
        exchange(svc.clone(), hostile_request()).await.unwrap();
    }
    log.flush().await.unwrap();
    let lines = buf.lines();
    assert_eq!(lines.len(), 3);
    let columns = split_text(&lines[0]);
    assert_eq!(columns.len(), 24, "{columns:?}");
    assert_eq!(columns[1], "GET /orig \"path\" \u{fffd}( HTTP/1.1");
    assert_eq!(columns[3], "FI\\x20\\x22quoted\\x22\\x20\\\\\\x20\u{fffd}");
    assert_eq!(columns[11], "\"], \"x\": \"");
    assert_eq!(columns[12], "say \"hi\" \\ \\t tab \u{fffd}\u{fffd} end");
    assert_eq!(columns[13], "\\\"\\");
    assert_eq!(columns[14], "evil\" host");
}

/// Splits a TEXT line into columns: spaces separate them except inside quotes; a quoted
/// column is returned unquoted with `\"` and `\\` undone (other escapes kept as written).
fn split_text(line: &str) -> Vec<String> {
    let mut columns = Vec::new();
    let mut current = String::new();
    let mut chars = line.chars();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => match chars.next().unwrap() {
                c @ ('"' | '\\') => current.push(c),
                c => {
                    current.push('\\');
                    current.push(c);
                }
            },
            '"' => quoted = !quoted,
            ' ' if !quoted => columns.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    assert!(!quoted, "unbalanced quotes in {line}");
    columns.push(current);
    columns
}

#[tokio::test]
async fn a_full_channel_drops_lines_and_counts_them() {
    // One slot; the writer task cannot run while this test never yields, so the first line
    // waits in the channel and the next two find it full.
    let buf = SharedBuf::default();
    let log = AccessLog::builder(AccessLogEncoding::Text)
        .capacity(1)
        .writer(buf.clone())
        .unwrap();
    let app = service_fn(|_req: Request<RequestBody<BoxBody>>| async {
        Ok::<_, BoxError>(Response::new(body::empty()))
    });
    let svc: AccessLogService<_> = AccessLogLayer::new(log.clone()).layer(app);
    for _ in 0..3 {
        exchange(svc.clone(), Request::new(body::empty()))
            .await
            .unwrap();
    }
    assert_eq!(log.dropped(), 2);
    log.flush().await.unwrap();
    assert_eq!(buf.lines().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn lines_are_buffered_then_written_within_the_interval() {
    let buf = SharedBuf::default();
    let log = log_to(&buf, AccessLogEncoding::Text);
    let app = service_fn(|_req: Request<RequestBody<BoxBody>>| async {
        Ok::<_, BoxError>(Response::new(body::empty()))
    });
    let svc = AccessLogLayer::new(log.clone()).layer(app);
    exchange(svc, Request::new(body::empty())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(buf.lines().len(), 0, "buffered, not yet written");
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(buf.lines().len(), 1, "written within the flush interval");
}

/// A destination that always fails.
struct Broken;

impl AsyncWrite for Broken {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::Error::other("disk on fire")))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test(start_paused = true)]
async fn failed_writes_count_as_dropped_and_flush_reports_them() {
    let log = AccessLog::from_writer(Broken, AccessLogEncoding::Json).unwrap();
    let app = service_fn(|_req: Request<RequestBody<BoxBody>>| async {
        Ok::<_, BoxError>(Response::new(body::empty()))
    });
    let svc = AccessLogLayer::new(log.clone()).layer(app);
    exchange(svc.clone(), Request::new(body::empty()))
        .await
        .unwrap();
    exchange(svc, Request::new(body::empty())).await.unwrap();
    let error = log.flush().await.unwrap_err();
    assert!(matches!(error, AccessLogError::Write { .. }));
    assert_eq!(
        error.to_string(),
        "writing the access log to writer failed: disk on fire"
    );
    assert_eq!(log.dropped(), 2);
}

#[test]
fn outside_a_runtime_the_log_says_so() {
    let error = AccessLog::from_writer(SharedBuf::default(), AccessLogEncoding::Text).unwrap_err();
    assert!(matches!(error, AccessLogError::NoRuntime));
}

/// A fresh directory under the system's temp dir, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "mesh-access-log-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `path` (real time) until it holds `lines` lines, up to 3 s; returns its contents.
async fn wait_for_lines(path: &std::path::Path, lines: usize) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= lines || tokio::time::Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn settings(path: &std::path::Path, encoding: AccessLogEncoding) -> AccessLogSettings {
    AccessLogSettings {
        path: path.to_str().unwrap().to_string(),
        encoding,
    }
}

#[tokio::test]
async fn a_file_gets_its_line_within_a_second_without_a_flush() {
    let dir = TempDir::new("interval");
    let path = dir.0.join("access.log");
    std::fs::write(&path, "earlier line\n").unwrap();
    let log = AccessLog::open(&settings(&path, AccessLogEncoding::Json)).unwrap();
    let svc = AccessLogLayer::new(log.clone()).layer(service_fn(upstream));
    let started = std::time::Instant::now();
    exchange(svc, full_request()).await.unwrap();

    let text = wait_for_lines(&path, 2).await;
    let waited = started.elapsed();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text:?} after {waited:?}");
    assert_eq!(lines[0], "earlier line", "the file is appended to");
    let line: Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(line["response_flags"], "FI");
    assert_eq!(line["upstream_host"], "10.0.0.7:9080");
    // Generous: the writer flushes 500 ms after buffering a line.
    assert!(waited < Duration::from_secs(3), "took {waited:?}");
}

#[tokio::test]
async fn flush_and_the_last_handle_write_everything_to_the_file() {
    let dir = TempDir::new("drain");
    let path = dir.0.join("access.log");
    let log = AccessLog::open(&settings(&path, AccessLogEncoding::Text)).unwrap();
    let app = service_fn(|_req: Request<RequestBody<BoxBody>>| async {
        Ok::<_, BoxError>(Response::new(body::full("ok")))
    });
    let svc = AccessLogLayer::new(log.clone()).layer(app);
    exchange(svc.clone(), Request::new(body::empty()))
        .await
        .unwrap();
    log.flush().await.unwrap();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap().lines().count(),
        1,
        "flushed at once"
    );

    // A line still buffered when every handle goes is written as the writer stops.
    exchange(svc.clone(), Request::new(body::empty()))
        .await
        .unwrap();
    drop((svc, log));
    let text = wait_for_lines(&path, 2).await;
    assert_eq!(text.lines().count(), 2, "{text:?}");
}

#[tokio::test]
async fn an_unopenable_file_names_its_path() {
    let dir = TempDir::new("error");
    let path = dir.0.join("no-such-dir").join("access.log");
    let error = AccessLog::open(&settings(&path, AccessLogEncoding::Text)).unwrap_err();
    assert!(matches!(error, AccessLogError::Open { .. }));
    let message = error.to_string();
    assert!(
        message.starts_with(&format!("cannot open access log file {}: ", path.display())),
        "{message}"
    );
    // The standard streams open by name.
    for name in ["stdout", "stderr"] {
        let settings = AccessLogSettings {
            path: name.into(),
            encoding: AccessLogEncoding::Text,
        };
        let log = AccessLog::open(&settings).unwrap();
        assert!(format!("{log:?}").contains(name));
    }
}

#[tokio::test]
async fn a_204_dropped_unread_is_a_complete_exchange() {
    // A 204 whose body is dropped unread is a complete exchange.
    let buf = SharedBuf::default();
    let log = log_to(&buf, AccessLogEncoding::Json);
    let app = service_fn(|_req: Request<RequestBody<BoxBody>>| async {
        let mut response = Response::new(chunks(&["ignored"]));
        *response.status_mut() = StatusCode::NO_CONTENT;
        Ok::<_, BoxError>(response)
    });
    let svc = AccessLogLayer::new(log.clone()).layer(app);
    drop(svc.oneshot(Request::new(body::empty())).await.unwrap());
    log.flush().await.unwrap();
    let line = &buf.json()[0];
    assert_eq!(line["response_code"], 204);
    assert_eq!(line["response_flags"], "-");
}
