use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use mesh_core::HostName;
use mesh_core::body::BoxError;
use mesh_core::config::bootstrap::TracingSettings;
use mesh_core::config::{Protocol, ServicePort};
use mesh_core::target::{RouteTarget, Subset};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use tower::{Layer, ServiceExt, service_fn};

use super::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SPAN: &str = "00f067aa0ba902b7";

/// An exporter that keeps what it is given.
#[derive(Clone, Debug, Default)]
struct Collected(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collected {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

async fn exported(tracing: &Tracing, collected: &Collected) -> Vec<SpanData> {
    tracing.flush().await.unwrap();
    std::mem::take(&mut *collected.0.lock().unwrap())
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn attr_str(span: &SpanData, key: &str) -> Option<String> {
    attr(span, key).map(|v| v.as_str().into_owned())
}

/// What the app received: the headers, and its `StreamInfo`.
type Received = (HeaderMap, Option<StreamInfo>);

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Received>>>);

impl Seen {
    fn last(&self) -> Received {
        self.0.lock().unwrap().last().cloned().unwrap()
    }
}

/// An app answering `status` (and `flags` in `x-mesh-response-flags`), after recording into
/// the `StreamInfo` what inner layers would.
fn app(
    seen: Seen,
    status: StatusCode,
    flags: Option<&'static str>,
    route: Option<RouteTarget>,
) -> impl tower::Service<
    Request<String>,
    Response = Response<String>,
    Error = BoxError,
    Future = impl Future<Output = Result<Response<String>, BoxError>> + Send,
> + Clone {
    service_fn(move |req: Request<String>| {
        let info = req.extensions().get::<StreamInfo>().cloned();
        if let (Some(info), Some(route)) = (&info, &route) {
            info.set_route(route);
            info.set_upstream("10.0.0.7:9080".parse().unwrap());
            info.set_upstream_peer(
                Identity::parse("spiffe://cluster.local/ns/default/sa/reviews").unwrap(),
            );
        }
        seen.0.lock().unwrap().push((req.headers().clone(), info));
        async move {
            let mut response = Response::new("ok".to_string());
            *response.status_mut() = status;
            if let Some(flags) = flags {
                response
                    .headers_mut()
                    .insert(RESPONSE_FLAGS_HEADER, flags.parse().unwrap());
            }
            Ok::<_, BoxError>(response)
        }
    })
}

fn request(headers: &[(&str, &str)]) -> Request<String> {
    let mut builder = Request::builder().uri("/productpage?user=1");
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(String::new()).unwrap()
}

/// `(trace id, span id, sampled)` of a `traceparent`.
fn traceparent(headers: &HeaderMap) -> (TraceId, SpanId, bool) {
    let v = headers["traceparent"].to_str().unwrap();
    let parts: Vec<_> = v.split('-').collect();
    assert_eq!((parts.len(), parts[0]), (4, "00"), "{v}");
    (
        TraceId::from_hex(parts[1]).unwrap(),
        SpanId::from_hex(parts[2]).unwrap(),
        parts[3] == "01",
    )
}

fn route(subset: Option<&str>) -> RouteTarget {
    let service = ServicePort::new(
        HostName::qualify("reviews", "default"),
        9080,
        Protocol::Http,
    );
    RouteTarget {
        subset: subset.map(|name| {
            Arc::new(Subset {
                name: name.to_string(),
                labels: Default::default(),
            })
        }),
        ..RouteTarget::new(Arc::new(service))
    }
}

#[tokio::test]
async fn unsampled_requests_still_propagate_and_record_the_trace_id() {
    let settings = TracingSettings {
        sampling: 0.0,
        otlp: None,
    };
    let tracing = Tracing::new(&settings, "reviews.default").unwrap();
    let seen = Seen::default();
    let svc = TraceLayer::server(&tracing).layer(app(seen.clone(), StatusCode::OK, None, None));

    let response = svc.clone().oneshot(request(&[])).await.unwrap();
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "ok"
    );
    let (headers, info) = seen.last();
    let (trace_id, span_id, sampled) = traceparent(&headers);
    assert!(!sampled, "0 %: a new root, not sampled");
    assert_ne!(trace_id, TraceId::INVALID);
    assert_ne!(span_id, SpanId::INVALID);
    assert_eq!(info.unwrap().trace_id(), Some(trace_id.to_bytes()));

    // A caller's unsampled context: same trace, new span, still not sampled.
    let tp = format!("00-{TRACE}-{SPAN}-00");
    svc.oneshot(request(&[("traceparent", &tp)])).await.unwrap();
    let (headers, info) = seen.last();
    let (trace_id, span_id, sampled) = traceparent(&headers);
    assert_eq!(trace_id, TraceId::from_hex(TRACE).unwrap());
    assert_ne!(span_id, SpanId::from_hex(SPAN).unwrap());
    assert!(!sampled);
    assert_eq!(info.unwrap().trace_id(), Some(trace_id.to_bytes()));
}

#[tokio::test]
async fn the_callers_decision_stands_over_the_percentage() {
    let collected = Collected::default();
    let never = Tracing::with_exporter(0.0, collected.clone());
    let seen = Seen::default();
    let svc = TraceLayer::server(&never).layer(app(seen.clone(), StatusCode::OK, None, None));
    let tp = format!("00-{TRACE}-{SPAN}-01");
    svc.oneshot(request(&[("traceparent", &tp)])).await.unwrap();
    let spans = exported(&never, &collected).await;
    assert_eq!(spans.len(), 1, "a sampled parent is honoured over 0 %");
    let span = &spans[0];
    let (trace_id, span_id, sampled) = traceparent(&seen.last().0);
    assert!(sampled);
    assert_eq!(
        span.span_context.trace_id(),
        TraceId::from_hex(TRACE).unwrap()
    );
    assert_eq!(
        span.span_context.span_id(),
        span_id,
        "the app's parent is our span"
    );
    assert_eq!(trace_id, span.span_context.trace_id());
    assert_eq!(span.parent_span_id, SpanId::from_hex(SPAN).unwrap());
    assert!(span.parent_span_is_remote);
    assert_eq!(span.span_kind, SpanKind::Server);

    let always = Tracing::with_exporter(100.0, collected.clone());
    let svc = TraceLayer::client(&always).layer(app(seen.clone(), StatusCode::OK, None, None));
    let tp = format!("00-{TRACE}-{SPAN}-00");
    svc.clone()
        .oneshot(request(&[("traceparent", &tp)]))
        .await
        .unwrap();
    assert!(!traceparent(&seen.last().0).2);
    assert!(
        exported(&always, &collected).await.is_empty(),
        "an unsampled parent is honoured over 100 %"
    );
    // No parent at 100 %: a sampled root.
    svc.oneshot(request(&[])).await.unwrap();
    let spans = exported(&always, &collected).await;
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].parent_span_id, SpanId::INVALID);
    assert_eq!(spans[0].span_kind, SpanKind::Client);
    let (trace_id, span_id, sampled) = traceparent(&seen.last().0);
    assert!(sampled);
    assert_eq!((trace_id, span_id), {
        let sc = &spans[0].span_context;
        (sc.trace_id(), sc.span_id())
    });
}

#[tokio::test]
async fn b3_callers_get_b3_back_and_deferred_b3_uses_the_percentage() {
    let collected = Collected::default();
    let always = Tracing::with_exporter(100.0, collected.clone());
    let seen = Seen::default();
    let svc = TraceLayer::server(&always).layer(app(seen.clone(), StatusCode::OK, None, None));
    // No x-b3-sampled: deferred, and 100 % samples it.
    svc.oneshot(request(&[("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN)]))
        .await
        .unwrap();
    let spans = exported(&always, &collected).await;
    assert_eq!(spans.len(), 1);
    let (headers, _) = seen.last();
    let ours = spans[0].span_context.span_id().to_string();
    assert_eq!(headers["x-b3-traceid"], TRACE);
    assert_eq!(headers["x-b3-spanid"], ours.as_str());
    assert_eq!(headers["x-b3-parentspanid"], SPAN);
    assert_eq!(headers["x-b3-sampled"], "1");
    assert_eq!(
        headers["traceparent"],
        format!("00-{TRACE}-{ours}-01").as_str()
    );
    assert_eq!(spans[0].parent_span_id, SpanId::from_hex(SPAN).unwrap());
}

#[tokio::test]
async fn malformed_context_starts_a_new_root() {
    let collected = Collected::default();
    let always = Tracing::with_exporter(100.0, collected.clone());
    let seen = Seen::default();
    let svc = TraceLayer::server(&always).layer(app(seen.clone(), StatusCode::OK, None, None));
    svc.oneshot(request(&[
        ("traceparent", "00-not-a-trace-01"),
        ("tracestate", "vendor=x"),
        ("b3", "garbage"),
    ]))
    .await
    .unwrap();
    let spans = exported(&always, &collected).await;
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].parent_span_id, SpanId::INVALID, "a root");
    let (headers, _) = seen.last();
    assert_eq!(traceparent(&headers).0, spans[0].span_context.trace_id());
    assert!(
        headers.get("tracestate").is_none(),
        "the orphan tracestate goes"
    );
    assert!(headers["b3"].to_str().unwrap().ends_with("-1"));
}

#[tokio::test]
async fn server_spans_carry_the_request_and_response_facts() {
    let collected = Collected::default();
    let tracing = Tracing::with_exporter(100.0, collected.clone());
    let seen = Seen::default();
    let inner = app(
        seen.clone(),
        StatusCode::SERVICE_UNAVAILABLE,
        Some("UF,URX"),
        None,
    );
    let svc = TraceLayer::server(&tracing).layer(inner);
    let mut req = request(&[
        ("host", "reviews.default.svc.cluster.local:9080"),
        ("x-request-id", "6e1a7c3e-1"),
    ]);
    req.extensions_mut().insert(ClientInfo {
        remote: "10.1.2.3:40000".parse().unwrap(),
        local: "10.1.2.4:15006".parse().unwrap(),
        tls: true,
    });
    req.extensions_mut()
        .insert(Identity::parse("spiffe://cluster.local/ns/default/sa/productpage").unwrap());
    let response = svc.oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    drop(response);

    let spans = exported(&tracing, &collected).await;
    let span = &spans[0];
    assert_eq!(
        span.name, "reviews.default/*",
        "bounded: the service, not the path"
    );
    for (key, want) in [
        ("http.request.method", "GET"),
        ("url.path", "/productpage"),
        ("server.address", "reviews.default.svc.cluster.local"),
        ("guid:x-request-id", "6e1a7c3e-1"),
        ("network.peer.address", "10.1.2.3"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/default/sa/productpage",
        ),
        ("response_flags", "UF,URX"),
        ("error.type", "503"),
    ] {
        assert_eq!(attr_str(span, key).as_deref(), Some(want), "{key}");
    }
    assert_eq!(attr(span, "server.port"), Some(&Value::I64(9080)));
    assert_eq!(attr(span, "network.peer.port"), Some(&Value::I64(40000)));
    assert_eq!(
        attr(span, "http.response.status_code"),
        Some(&Value::I64(503))
    );
    assert!(matches!(span.status, Status::Error { .. }));
}

#[tokio::test]
async fn client_spans_carry_the_route_and_the_upstream() {
    let collected = Collected::default();
    let tracing = Tracing::with_exporter(100.0, collected.clone());
    let seen = Seen::default();
    let inner = app(seen.clone(), StatusCode::OK, None, Some(route(Some("v2"))));
    let svc = TraceLayer::client(&tracing).layer(inner);
    svc.oneshot(request(&[("host", "reviews:9080")]))
        .await
        .unwrap();
    let spans = exported(&tracing, &collected).await;
    let span = &spans[0];
    assert_eq!(span.name, "reviews.default.svc.cluster.local:9080/*");
    assert_eq!(span.span_kind, SpanKind::Client);
    for (key, want) in [
        (
            "upstream_cluster",
            "outbound|9080|v2|reviews.default.svc.cluster.local",
        ),
        ("network.peer.address", "10.0.0.7"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/default/sa/reviews",
        ),
        ("response_flags", "-"),
    ] {
        assert_eq!(attr_str(span, key).as_deref(), Some(want), "{key}");
    }
    assert_eq!(span.status, Status::Unset);
    assert_eq!(attr(span, "error.type"), None);
}

#[tokio::test]
async fn the_span_ends_with_the_response_body_or_its_drop() {
    let collected = Collected::default();
    let tracing = Tracing::with_exporter(100.0, collected.clone());
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, BoxError>>(4);
    let rx = Arc::new(Mutex::new(Some(rx)));
    let streaming = service_fn(move |_req: Request<String>| {
        let rx = rx.lock().unwrap().take().unwrap();
        async move {
            let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            Ok::<_, BoxError>(Response::new(body))
        }
    });
    let svc = TraceLayer::server(&tracing).layer(streaming);
    let mut body = svc.oneshot(request(&[])).await.unwrap().into_body();

    tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"a"))))
        .await
        .unwrap();
    assert!(body.frame().await.is_some());
    assert!(
        exported(&tracing, &collected).await.is_empty(),
        "the body is still streaming"
    );
    drop(tx);
    assert!(body.frame().await.is_none());
    let spans = exported(&tracing, &collected).await;
    assert_eq!(spans.len(), 1, "ended at the body's end");
    assert!(spans[0].end_time >= spans[0].start_time);

    // A body dropped half-way (the client left) ends the span too.
    let svc = TraceLayer::server(&tracing).layer(service_fn(|_req: Request<String>| async {
        let (_tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, BoxError>>(1);
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        Ok::<_, BoxError>(Response::new(body))
    }));
    let body = svc.oneshot(request(&[])).await.unwrap().into_body();
    assert!(exported(&tracing, &collected).await.is_empty());
    drop(body);
    assert_eq!(exported(&tracing, &collected).await.len(), 1);
}

#[tokio::test]
async fn inner_errors_mark_the_span_and_pass_through() {
    let collected = Collected::default();
    let tracing = Tracing::with_exporter(100.0, collected.clone());
    let failing = service_fn(|_req: Request<String>| async {
        Err::<Response<String>, BoxError>("upstream connect error".into())
    });
    let err = TraceLayer::client(&tracing)
        .layer(failing)
        .oneshot(request(&[]))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "upstream connect error");
    let spans = exported(&tracing, &collected).await;
    assert_eq!(
        spans[0].status,
        Status::error("upstream connect error"),
        "{:?}",
        spans[0].status
    );
}

#[tokio::test]
async fn after_shutdown_requests_are_still_propagated() {
    let collected = Collected::default();
    let tracing = Tracing::with_exporter(100.0, collected.clone());
    tracing.shutdown().await.unwrap();
    let seen = Seen::default();
    let svc = TraceLayer::server(&tracing).layer(app(seen.clone(), StatusCode::OK, None, None));
    let tp = format!("00-{TRACE}-{SPAN}-01");
    svc.oneshot(request(&[("traceparent", &tp)])).await.unwrap();
    let (trace_id, span_id, sampled) = traceparent(&seen.last().0);
    assert_eq!(trace_id, TraceId::from_hex(TRACE).unwrap());
    assert_ne!(span_id, SpanId::INVALID);
    assert!(sampled);
    assert!(collected.0.lock().unwrap().is_empty());
}
