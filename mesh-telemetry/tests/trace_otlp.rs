//! End to end: a client-side trace stack calls a server-side one over a real loopback HTTP
//! connection, and both export to an OTLP/gRPC collector running in the test.
#![cfg(feature = "trace")]
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use mesh_core::body::BoxError;
use mesh_core::config::bootstrap::TracingSettings;
use mesh_core::conn::ClientInfo;
use mesh_telemetry::trace::{ExportOptions, TraceLayer, Tracing};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::{Layer, ServiceExt, service_fn};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SPAN: &str = "00f067aa0ba902b7";

/// An OTLP trace collector: keeps every span with its resource's `service.name`; while
/// `open` is false, exports wait (a stalled collector).
#[derive(Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    count: watch::Sender<usize>,
    open: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut open = self.open.clone();
        let _ = open.wait_for(|open| *open).await;
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    any_value::Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
        self.count.send_replace(spans.len());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Starts one on 127.0.0.1:0; `open` says whether exports are answered at once.
    async fn start(open: bool) -> (String, Collector, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (gate, open) = watch::channel(open);
        let collector = Collector {
            spans: Arc::default(),
            count: watch::channel(0).0,
            open,
        };
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (format!("http://{addr}"), collector, gate)
    }

    /// Waits (10 s at most) until `n` spans have arrived, and returns them.
    async fn wait_for(&self, n: usize) -> Vec<(String, Span)> {
        let mut count = self.count.subscribe();
        tokio::time::timeout(Duration::from_secs(10), count.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} spans did not arrive: {:?}", self.received()))
            .unwrap();
        self.spans.lock().unwrap().clone()
    }

    fn received(&self) -> usize {
        self.spans.lock().unwrap().len()
    }
}

fn options() -> ExportOptions {
    ExportOptions {
        // Short, so a span that ends just after a flush still arrives promptly.
        scheduled_delay: Duration::from_millis(50),
        ..ExportOptions::default()
    }
}

/// 0 %: only the caller's sampled flag gets these traces recorded, on both hops.
fn tracing(url: &str, service: &str, opts: ExportOptions) -> Tracing {
    let settings = TracingSettings {
        sampling: 0.0,
        otlp: Some(url.to_string()),
    };
    Tracing::with_options(&settings, service, opts).unwrap()
}

/// The headers the app behind the server stack received.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<HeaderMap>>>);

impl Seen {
    fn last(&self) -> HeaderMap {
        self.0.lock().unwrap().last().cloned().unwrap()
    }
}

/// An HTTP/1.1 server on 127.0.0.1:0: the listener's `ClientInfo`, then
/// `TraceLayer::server`, then an app that records what it received.
async fn server_stack(tracing: &Tracing) -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let app = service_fn({
        let seen = seen.clone();
        move |req: Request<Incoming>| {
            seen.0.lock().unwrap().push(req.headers().clone());
            async { Ok::<_, BoxError>(Response::new("reviewed".to_string())) }
        }
    });
    let stack = TraceLayer::server(tracing).layer(app);
    tokio::spawn(async move {
        loop {
            let (stream, remote) = listener.accept().await.unwrap();
            let stack = stack.clone();
            let with_client_info = service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(ClientInfo {
                    remote,
                    local: addr,
                    tls: false,
                });
                stack.clone().oneshot(req)
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                TokioIo::new(stream),
                TowerToHyperService::new(with_client_info),
            ));
        }
    });
    (addr, seen)
}

/// `TraceLayer::client` over a pooled hyper client.
fn client_stack(
    tracing: &Tracing,
) -> impl tower::Service<
    Request<String>,
    Response = Response<mesh_telemetry::trace::TraceBody<Incoming>>,
    Error = hyper_util::client::legacy::Error,
    Future: Send,
> + Clone {
    let client = Client::builder(TokioExecutor::new()).build_http::<String>();
    TraceLayer::client(tracing).layer(client)
}

async fn send(
    client: &(
         impl tower::Service<
        Request<String>,
        Response = Response<mesh_telemetry::trace::TraceBody<Incoming>>,
        Error = hyper_util::client::legacy::Error,
    > + Clone
     ),
    app: SocketAddr,
    headers: &[(&str, &str)],
) {
    let mut req = Request::get(format!("http://{app}/reviews/1?user=jason"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let response = client
        .clone()
        .oneshot(req.body(String::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Reading the body to its end ends the client span.
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "reviewed");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr(span: &Span, key: &str) -> Option<any_value::Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone()?.value)
}

/// The client and server spans of one trace, checked for their links; returns their ids.
fn check_hop(spans: &[(String, Span)], trace: &str, caller_span: &str) -> (String, String) {
    let of_trace: Vec<_> = spans
        .iter()
        .filter(|(_, s)| hex(&s.trace_id) == trace)
        .collect();
    assert_eq!(of_trace.len(), 2, "{spans:#?}");
    let (client_service, client) = of_trace
        .iter()
        .find(|(_, s)| s.kind == SpanKind::Client as i32)
        .copied()
        .unwrap();
    let (server_service, server) = of_trace
        .iter()
        .find(|(_, s)| s.kind == SpanKind::Server as i32)
        .copied()
        .unwrap();
    assert_eq!(client_service, "productpage.default");
    assert_eq!(server_service, "reviews.default");
    assert_eq!(
        hex(&client.parent_span_id),
        caller_span,
        "the client span's parent is the caller's span"
    );
    assert_eq!(
        hex(&server.parent_span_id),
        hex(&client.span_id),
        "the server span's parent is the client span"
    );
    assert_eq!(server.name, "reviews.default/*");
    assert!(client.name.starts_with("127.0.0.1:"), "{}", client.name);
    for span in [client, server] {
        assert_eq!(
            attr(span, "url.path"),
            Some(any_value::Value::StringValue("/reviews/1".into()))
        );
        assert_eq!(
            attr(span, "http.response.status_code"),
            Some(any_value::Value::IntValue(200))
        );
    }
    assert_eq!(
        attr(server, "network.peer.address"),
        Some(any_value::Value::StringValue("127.0.0.1".into()))
    );
    (hex(&client.span_id), hex(&server.span_id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn w3c_trace_across_a_client_and_a_server_hop() {
    let (url, collector, _gate) = Collector::start(true).await;
    let outbound = tracing(&url, "productpage.default", options());
    let inbound = tracing(&url, "reviews.default", options());
    let (app, seen) = server_stack(&inbound).await;
    let client = client_stack(&outbound);

    let traceparent = format!("00-{TRACE}-{SPAN}-01");
    send(
        &client,
        app,
        &[
            ("traceparent", &traceparent),
            ("tracestate", "congo=t61rcWkgMzE"),
        ],
    )
    .await;
    outbound.flush().await.unwrap();
    inbound.flush().await.unwrap();

    let spans = collector.wait_for(2).await;
    let (_client_span, server_span) = check_hop(&spans, TRACE, SPAN);
    let headers = seen.last();
    assert_eq!(
        headers["traceparent"],
        format!("00-{TRACE}-{server_span}-01").as_str(),
        "the app's parent is the server span"
    );
    assert_eq!(headers["tracestate"], "congo=t61rcWkgMzE");
    assert!(headers.get("x-b3-traceid").is_none() && headers.get("b3").is_none());
    let server = spans
        .iter()
        .find(|(_, s)| hex(&s.span_id) == server_span)
        .unwrap();
    assert_eq!(server.1.trace_state, "congo=t61rcWkgMzE");

    outbound.shutdown().await.unwrap();
    inbound.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b3_traces_across_a_client_and_a_server_hop() {
    let (url, collector, _gate) = Collector::start(true).await;
    let outbound = tracing(&url, "productpage.default", options());
    let inbound = tracing(&url, "reviews.default", options());
    let (app, seen) = server_stack(&inbound).await;
    let client = client_stack(&outbound);

    // Multi-header B3, as a Zipkin-instrumented app sends it.
    send(
        &client,
        app,
        &[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    outbound.flush().await.unwrap();
    inbound.flush().await.unwrap();
    let spans = collector.wait_for(2).await;
    let (client_span, server_span) = check_hop(&spans, TRACE, SPAN);
    let headers = seen.last();
    assert_eq!(headers["x-b3-traceid"], TRACE);
    assert_eq!(headers["x-b3-spanid"], server_span.as_str());
    assert_eq!(headers["x-b3-parentspanid"], client_span.as_str());
    assert_eq!(headers["x-b3-sampled"], "1");
    assert_eq!(
        headers["traceparent"],
        format!("00-{TRACE}-{server_span}-01").as_str()
    );

    // Single-header B3, a 64-bit trace id: it stays 64-bit for the app.
    let short_trace = &TRACE[16..];
    let single = format!("{short_trace}-{SPAN}-1");
    send(&client, app, &[("b3", &single)]).await;
    outbound.flush().await.unwrap();
    inbound.flush().await.unwrap();
    let spans = collector.wait_for(4).await;
    let padded = format!("{short_trace:0>32}");
    let (client_span, server_span) = check_hop(&spans, &padded, SPAN);
    let headers = seen.last();
    assert_eq!(
        headers["b3"],
        format!("{short_trace}-{server_span}-1-{client_span}").as_str()
    );
    assert!(headers.get("x-b3-traceid").is_none());

    outbound.shutdown().await.unwrap();
    inbound.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_do_not_wait_for_an_absent_collector() {
    // A port nobody listens on: every export is refused.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let outbound = tracing(&url, "productpage.default", options());
    let inbound = tracing(&url, "reviews.default", options());
    let (app, seen) = server_stack(&inbound).await;
    let client = client_stack(&outbound);

    let traceparent = format!("00-{TRACE}-{SPAN}-01");
    let all = async {
        for _ in 0..100 {
            send(&client, app, &[("traceparent", &traceparent)]).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), all)
        .await
        .expect("100 sampled requests within 5 s with the collector down");
    assert_eq!(seen.0.lock().unwrap().len(), 100);
    // Draining with the collector down fails to export but returns.
    let drain = async {
        let _ = outbound.shutdown().await;
        let _ = inbound.shutdown().await;
    };
    tokio::time::timeout(Duration::from_secs(30), drain)
        .await
        .expect("shutdown is bounded by the export timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_collector_costs_spans_not_requests() {
    let (url, collector, gate) = Collector::start(false).await;
    let small_queue = ExportOptions {
        max_queue_size: 8,
        max_export_batch_size: 4,
        scheduled_delay: Duration::from_millis(10),
        export_timeout: Duration::from_secs(30),
    };
    let inbound = tracing(&url, "reviews.default", small_queue);
    let app = service_fn(|_req: Request<String>| async {
        Ok::<_, BoxError>(Response::new("ok".to_string()))
    });
    let stack = TraceLayer::server(&inbound).layer(app);

    let traceparent = format!("00-{TRACE}-{SPAN}-01");
    let all = async {
        for _ in 0..200 {
            let req = Request::get("/")
                .header("traceparent", &traceparent)
                .body(String::new())
                .unwrap();
            let response = stack.clone().oneshot(req).await.unwrap();
            response.into_body().collect().await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(5), all)
        .await
        .expect("200 sampled requests within 5 s while the collector stalls");
    assert_eq!(
        collector.received(),
        0,
        "the collector has answered nothing yet"
    );

    gate.send_replace(true);
    inbound.flush().await.unwrap();
    let received = collector.wait_for(1).await.len();
    // At most the batch that was in flight plus a full queue: the rest were dropped.
    assert!(
        received <= 4 + 8,
        "the bounded queue dropped spans rather than hold them: {received} of 200 arrived"
    );
    inbound.shutdown().await.unwrap();
}
