//! The combined layer against the three layers stacked (access log → metrics → trace, each
//! body boxed in between, as the proxy stacked them): for the same requests, the same
//! metrics, the same access log lines, the same headers on both sides and the same trace
//! propagation, whatever way each exchange ends.
#![cfg(all(feature = "metrics", feature = "trace", feature = "access-log"))]
#![allow(clippy::unwrap_used)]

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::config::bootstrap::{AccessLogEncoding, TracingSettings};
use mesh_core::config::{Protocol, ServicePort};
use mesh_core::conn::ClientInfo;
use mesh_core::flags::RESPONSE_FLAGS_HEADER;
use mesh_core::stream_info::StreamInfo;
use mesh_core::target::RouteTarget;
use mesh_core::{HostName, Identity, ProxyError, ResponseFlags};
use mesh_telemetry::access_log::{AccessLog, AccessLogLayer};
use mesh_telemetry::combined::TelemetryLayer;
use mesh_telemetry::metrics::{
    Format, Metrics, MetricsLayer, PEER_METADATA_HEADER, PeerMetadata, ServiceResolver,
    WorkloadInfo,
};
use mesh_telemetry::trace::{TraceLayer, Tracing};
use tokio::io::AsyncWrite;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

type Svc = BoxCloneSyncService<Request<BoxBody>, Response<BoxBody>, BoxError>;

/// An in-memory log destination.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl SharedBuf {
    fn lines(&self) -> Vec<String> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(str::to_string)
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

fn clock() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_767_000_000)
}

fn peer_header() -> HeaderValue {
    PeerMetadata::of(
        &WorkloadInfo::new("ratings-v1", "default")
            .with_app("ratings")
            .with_version("v1"),
    )
    .encode()
    .unwrap()
}

fn peer_identity() -> Identity {
    Identity::parse("spiffe://cluster.local/ns/default/sa/ratings").unwrap()
}

/// What the app behind the layers saw, per request: its headers and body bytes.
type Seen = Arc<Mutex<Vec<(HeaderMap, usize)>>>;

/// The rest of the stack: what it does depends on the request's path.
fn rest(seen: Seen) -> Svc {
    let route = RouteTarget::new(Arc::new(ServicePort::new(
        HostName::qualify("ratings", "default"),
        9080,
        Protocol::Http,
    )));
    BoxCloneSyncService::new(service_fn(move |req: Request<BoxBody>| {
        let route = route.clone();
        let seen = seen.clone();
        async move {
            if let Some(info) = req.extensions().get::<StreamInfo>() {
                info.set_route(&route);
                info.set_upstream("10.0.0.7:9080".parse().unwrap());
                info.set_upstream_peer(peer_identity());
            }
            let path = req.uri().path().to_string();
            let (parts, body) = req.into_parts();
            let mut headers = parts.headers.clone();
            // The span id is new on each hop (random): compare the rest.
            if let Some(tp) = headers.get("traceparent") {
                let tp = tp.to_str().unwrap();
                let masked = format!("{}-{}", &tp[..35], &tp[53..]);
                headers.insert("traceparent", masked.parse().unwrap());
            }
            if let Some(span) = headers.remove("x-b3-spanid") {
                assert_eq!(span.len(), 16);
            }
            let n = body.collect().await?.to_bytes().len();
            seen.lock().unwrap().push((headers, n));
            let mut resp = match path.as_str() {
                "/error" => {
                    return Err(ProxyError::new(
                        ResponseFlags::NO_HEALTHY_UPSTREAM,
                        "no healthy upstream",
                    )
                    .with_status(StatusCode::SERVICE_UNAVAILABLE)
                    .into());
                }
                "/other-error" => return Err(BoxError::from("boom")),
                "/flags" => {
                    let mut r = Response::new(body::full("upstream failed"));
                    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    r.headers_mut()
                        .insert(RESPONSE_FLAGS_HEADER, HeaderValue::from_static("UF,URX"));
                    r.extensions_mut().insert(ResponseFlags::DELAY_INJECTED);
                    r
                }
                "/empty" => {
                    let mut r = Response::new(body::empty());
                    *r.status_mut() = StatusCode::NO_CONTENT;
                    r
                }
                "/grpc" => {
                    let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
                        Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 2, 8, 1]))),
                        Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))),
                        Ok(Frame::trailers({
                            let mut t = HeaderMap::new();
                            t.insert("grpc-status", HeaderValue::from_static("14"));
                            t
                        })),
                    ];
                    let mut r =
                        Response::new(body::boxed(StreamBody::new(futures::stream::iter(frames))));
                    r.headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                    r
                }
                "/body-error" => {
                    let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
                        Ok(Frame::data(Bytes::from_static(b"part"))),
                        Err(ProxyError::new(ResponseFlags::UPSTREAM_REMOTE_RESET, "reset").into()),
                    ];
                    Response::new(body::boxed(StreamBody::new(futures::stream::iter(frames))))
                }
                _ => Response::new(body::full("{\"stars\":5}")),
            };
            resp.headers_mut()
                .insert(PEER_METADATA_HEADER, peer_header());
            Ok::<_, BoxError>(resp)
        }
    }))
}

/// The three layers stacked, as `mesh_proxy::telemetry` stacked them before the combined
/// layer.
fn stacked(metrics: MetricsLayer, trace: TraceLayer, log: AccessLogLayer, inner: Svc) -> Svc {
    let traced = BoxCloneSyncService::new(
        ServiceBuilder::new()
            .map_response(|r: Response<_>| r.map(body::boxed))
            .layer(trace)
            .service(inner),
    );
    let measured = BoxCloneSyncService::new(
        ServiceBuilder::new()
            .map_response(|r: Response<_>| r.map(body::boxed))
            .layer(metrics)
            .map_request(|r: Request<_>| r.map(body::boxed))
            .service(traced),
    );
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .map_response(|r: Response<_>| r.map(body::boxed))
            .layer(log)
            .map_request(|r: Request<_>| r.map(body::boxed))
            .service(measured),
    )
}

fn combined(metrics: MetricsLayer, trace: TraceLayer, log: AccessLogLayer, inner: Svc) -> Svc {
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .map_response(|r: Response<_>| r.map(body::boxed))
            .layer(TelemetryLayer::new(metrics, Some(trace), Some(log)))
            .service(inner),
    )
}

/// How the caller treats the response.
#[derive(Clone, Copy)]
enum Read {
    All,
    DropBody,
    DropFuture,
}

struct Case {
    method: Method,
    path: &'static str,
    body: &'static [u8],
    grpc: bool,
    traceparent: &'static str,
    inbound_peer: bool,
    read: Read,
}

fn cases() -> Vec<Case> {
    let case = |path, read| Case {
        method: Method::GET,
        path,
        body: b"",
        grpc: false,
        traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        inbound_peer: true,
        read,
    };
    vec![
        case("/ratings/0", Read::All),
        Case {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ..case("/ratings/1", Read::All)
        },
        Case {
            method: Method::POST,
            body: b"{\"stars\":4}",
            ..case("/ratings/2", Read::All)
        },
        Case {
            inbound_peer: false,
            ..case("/ratings/3", Read::All)
        },
        Case {
            method: Method::POST,
            body: &[0, 0, 0, 0, 1, 7, 0, 0, 0, 0, 0],
            grpc: true,
            ..case("/grpc", Read::All)
        },
        case("/error", Read::All),
        case("/other-error", Read::All),
        case("/flags", Read::All),
        case("/empty", Read::All),
        Case {
            method: Method::HEAD,
            ..case("/empty", Read::DropBody)
        },
        case("/body-error", Read::All),
        case("/ratings/4", Read::DropBody),
        case("/ratings/5", Read::DropFuture),
    ]
}

fn request(case: &Case, inbound: bool) -> Request<BoxBody> {
    let body = if case.body.is_empty() {
        body::empty()
    } else {
        body::full(case.body)
    };
    let mut req = Request::new(body);
    *req.method_mut() = case.method.clone();
    *req.uri_mut() = case.path.parse().unwrap();
    let h = req.headers_mut();
    h.insert(HOST, HeaderValue::from_static("ratings:9080"));
    h.insert("user-agent", HeaderValue::from_static("test/1.0"));
    h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.3"));
    h.insert(
        "x-request-id",
        HeaderValue::from_static("a8b1c6e0-4c3b-4c1f-9a5e-0d3f2b6c7e11"),
    );
    h.insert("traceparent", HeaderValue::from_static(case.traceparent));
    // Also a B3 header: both propagation forms go out.
    h.insert("x-b3-sampled", HeaderValue::from_static("0"));
    if case.grpc {
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    }
    req.extensions_mut().insert(ClientInfo {
        remote: "10.0.0.3:40112".parse().unwrap(),
        local: "127.0.0.1:15006".parse().unwrap(),
        tls: inbound,
    });
    if inbound && case.inbound_peer {
        req.headers_mut()
            .insert(PEER_METADATA_HEADER, peer_header());
        req.extensions_mut().insert(peer_identity());
    }
    req
}

/// What the caller saw of each response.
type Outcome = (
    Result<(StatusCode, HeaderMap, Vec<u8>), String>,
    Option<HeaderMap>,
);

struct Run {
    metrics: String,
    json: Vec<String>,
    text: Vec<String>,
    seen: Vec<(HeaderMap, usize)>,
    outcomes: Vec<Outcome>,
}

async fn run(
    inbound: bool,
    build: fn(MetricsLayer, TraceLayer, AccessLogLayer, Svc) -> Svc,
) -> Run {
    let metrics = Arc::new(Metrics::without_process_metrics());
    let me = Arc::new(
        WorkloadInfo::new("reviews-v1", "default")
            .with_app("reviews")
            .with_version("v1"),
    );
    let tracing = Tracing::new(
        &TracingSettings {
            sampling: 100.0,
            otlp: None,
        },
        "reviews.default",
    )
    .unwrap();
    let (json_buf, text_buf) = (SharedBuf::default(), SharedBuf::default());
    let json = AccessLog::builder(AccessLogEncoding::Json)
        .clock(clock)
        .writer(json_buf.clone())
        .unwrap();
    let text = AccessLog::builder(AccessLogEncoding::Text)
        .clock(clock)
        .writer(text_buf.clone())
        .unwrap();
    let seen: Seen = Arc::default();
    let resolver: ServiceResolver = Arc::new(|authority: &str| {
        (authority == "ratings:9080").then(|| Arc::from("ratings.default.svc.cluster.local"))
    });
    let layers = |log: &AccessLog| {
        if inbound {
            (
                MetricsLayer::inbound(metrics.clone(), me.clone(), resolver.clone()),
                TraceLayer::server(&tracing),
                AccessLogLayer::inbound(log.clone(), 9080),
            )
        } else {
            (
                MetricsLayer::outbound(metrics.clone(), me.clone()),
                TraceLayer::client(&tracing),
                AccessLogLayer::new(log.clone()),
            )
        }
    };
    // One stack logs JSON, another (sharing the metrics layer's series) TEXT: each request
    // goes through both, so both encodings are compared.
    let (m, t, l) = layers(&json);
    let json_svc = build(m, t, l, rest(seen.clone()));
    let (m, t, l) = layers(&text);
    let text_svc = build(m, t, l, rest(seen.clone()));

    let mut outcomes = Vec::new();
    for case in cases() {
        for svc in [&json_svc, &text_svc] {
            let mut svc = svc.clone();
            let call = svc.ready().await.unwrap().call(request(&case, inbound));
            let outcome = match case.read {
                Read::DropFuture => {
                    // The layers saw the request; the caller leaves before any response.
                    drop(call);
                    (Err("dropped".to_string()), None)
                }
                Read::DropBody => match call.await {
                    Ok(resp) => {
                        let (parts, body) = resp.into_parts();
                        drop(body);
                        (Ok((parts.status, parts.headers, Vec::new())), None)
                    }
                    Err(e) => (Err(e.to_string()), None),
                },
                Read::All => match call.await {
                    Ok(resp) => {
                        let (parts, body) = resp.into_parts();
                        match body.collect().await {
                            Ok(collected) => {
                                let trailers = collected.trailers().cloned();
                                let bytes = collected.to_bytes().to_vec();
                                (Ok((parts.status, parts.headers, bytes)), trailers)
                            }
                            Err(e) => (Err(format!("body: {e}")), None),
                        }
                    }
                    Err(e) => (Err(e.to_string()), None),
                },
            };
            outcomes.push(outcome);
        }
    }
    json.flush().await.unwrap();
    text.flush().await.unwrap();
    let seen = seen.lock().unwrap().clone();
    Run {
        metrics: metrics.encode(Format::Prometheus),
        json: json_buf.lines(),
        text: text_buf.lines(),
        seen,
        outcomes,
    }
}

async fn compare(inbound: bool) {
    let a = run(inbound, stacked).await;
    let b = run(inbound, combined).await;
    assert_eq!(a.outcomes, b.outcomes, "what the caller saw");
    assert_eq!(a.seen, b.seen, "what the app saw");
    assert_eq!(a.json, b.json, "JSON access log");
    assert_eq!(a.text, b.text, "TEXT access log");
    // A family's series print in its map's order: compare them as sets of lines.
    let lines = |text: &str| {
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        lines.sort();
        lines
    };
    let (ma, mb) = (lines(&a.metrics), lines(&b.metrics));
    let only_a: Vec<_> = ma.iter().filter(|l| !mb.contains(l)).collect();
    let only_b: Vec<_> = mb.iter().filter(|l| !ma.contains(l)).collect();
    assert_eq!(only_a, only_b, "metrics");
    assert_eq!(ma, mb, "metrics");
    // The comparison is not vacuous: every case logged a line and was counted.
    let n = cases().len();
    assert_eq!(a.json.len(), n);
    assert_eq!(a.text.len(), n);
    assert!(a.metrics.contains("istio_requests_total{"));
    assert!(a.metrics.contains("response_flags=\"DC\""), "{}", a.metrics);
    assert!(a.json.iter().any(|l| l.contains("\"bytes_received\":11")));
}

#[tokio::test(start_paused = true)]
async fn combined_outbound_records_what_the_stacked_layers_record() {
    compare(false).await;
}

#[tokio::test(start_paused = true)]
async fn combined_inbound_records_what_the_stacked_layers_record() {
    compare(true).await;
}
