//! Telemetry end to end through two real sidecars over mTLS (certificates from `mesh-proxy
//! ca`): `productpage-v1`'s sidecar calls `reviews-v2`'s, which hands requests to the app.
//! Istio's metrics from both reporters on `/metrics` with exact counts and labels, the JSON
//! access log line of each request on both sides, and spans from both sidecars in one trace
//! at an OTLP/gRPC collector running in the test.
#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use mesh_proxy::RunningProxy;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use serde_json::Value;
use support::app::App;
use support::pki::Pki;
use support::{get, http1_client, start_proxy, text};

const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/productpage";
const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/reviews";
const REVIEWS_FQDN: &str = "reviews.default.svc.cluster.local";

/// A sidecar's Bootstrap: workload `name` with labels `app` and `version`, the identity
/// `mesh-proxy ca` issued into `certs`, an inbound listener when it fronts `inbound`, and
/// `extra` lines of `spec` (telemetry settings).
fn bootstrap(
    name: &str,
    (app, version): (&str, &str),
    certs: &Path,
    inbound: Option<SocketAddr>,
    extra: &str,
) -> String {
    let inbound = inbound.map_or(String::new(), |app| {
        format!("  inbound: {{ listen: \"127.0.0.1:0\", app: \"{app}\" }}\n")
    });
    format!(
        "apiVersion: mesh-proxy/v1
kind: Bootstrap
metadata: {{ name: {name}, namespace: default }}
spec:
  workload: {{ name: {name}, labels: {{ app: {app}, version: {version} }} }}
  identity: {{ cert: \"{}\", key: \"{}\", trustBundle: \"{}\" }}
{inbound}  outbound: {{ listen: \"127.0.0.1:0\" }}
  admin: {{ listen: \"127.0.0.1:0\" }}
  terminationDrainDuration: 5s
{extra}",
        certs.join("cert.pem").display(),
        certs.join("key.pem").display(),
        certs.join("root.pem").display(),
    )
}

/// `ratings:9080` at an address nobody listens on: a dead endpoint.
async fn dead_ratings_entry() -> String {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: ratings, namespace: default }}
spec:
  hosts: [ratings]
  ports: [{{ number: 9080, name: http, protocol: HTTP }}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints: [{{ address: \"{}\", ports: {{ http: {} }} }}]
",
        addr.ip(),
        addr.port()
    )
}

/// The client side's routes for `reviews`: `x-fault: abort` is aborted 503 by a fault,
/// `x-retries: default` gets Istio's default retries (503 retried twice), everything else
/// none, so each request the app answers is one attempt.
const REVIEWS_ROUTES: &str = "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: reviews, namespace: default }
spec:
  hosts: [reviews]
  http:
  - match: [{ headers: { x-fault: { exact: abort } } }]
    fault: { abort: { httpStatus: 503, percentage: { value: 100 } } }
    route: [{ destination: { host: reviews } }]
  - match: [{ headers: { x-retries: { exact: default } } }]
    route: [{ destination: { host: reviews } }]
  - route: [{ destination: { host: reviews } }]
    retries: { attempts: 0 }
";

/// productpage-v1 → its sidecar → (mTLS) → reviews-v2's sidecar → the reviews app.
struct Mesh {
    app: App,
    client: RunningProxy,
    server: RunningProxy,
    /// The certificates the sidecars read (removed on drop).
    _pki: Pki,
}

impl Mesh {
    /// `telemetry`: the `spec` lines both sidecars get, with `{side}` replaced by `client`
    /// or `server`; `client_extra`: more config for the client sidecar.
    async fn start(telemetry: &str, client_extra: &str) -> Mesh {
        let pki = Pki::new();
        let app = App::start("reviews").await;
        let server = start_proxy(&format!(
            "{}{}",
            bootstrap(
                "reviews-v2",
                ("reviews", "v2"),
                &pki.issue("reviews"),
                Some(app.addr),
                &telemetry.replace("{side}", "server"),
            ),
            // The server knows its own service, so it can name `destination_service`.
            support::reviews_entry(app.addr, None),
        ))
        .await;
        let client = start_proxy(&format!(
            "{}{}{client_extra}",
            bootstrap(
                "productpage-v1",
                ("productpage", "v1"),
                &pki.issue("productpage"),
                None,
                &telemetry.replace("{side}", "client"),
            ),
            support::reviews_entry(server.inbound_addr().unwrap(), Some("reviews")),
        ))
        .await;
        Mesh {
            app,
            client,
            server,
            _pki: pki,
        }
    }

    /// A request from the productpage app to `reviews:9080` through its sidecar.
    fn request(&self, path: &str) -> http::Request<mesh_core::body::BoxBody> {
        get(self.client.outbound_addr().unwrap(), "reviews:9080", path)
    }
}

fn with_header(
    mut req: http::Request<mesh_core::body::BoxBody>,
    name: &'static str,
    value: &str,
) -> http::Request<mesh_core::body::BoxBody> {
    req.headers_mut().insert(name, value.parse().unwrap());
    req
}

fn header(resp: &http::Response<hyper::body::Incoming>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

/// Sends `req` and returns the status, the response flags header and the body.
async fn send(req: http::Request<mesh_core::body::BoxBody>) -> (u16, Option<String>, String) {
    let resp = http1_client().request(req).await.unwrap();
    assert!(
        resp.headers().get("x-mesh-peer-metadata").is_none(),
        "the calling app saw its peer's metadata: {:?}",
        resp.headers()
    );
    let status = resp.status().as_u16();
    let flags = header(&resp, "x-mesh-response-flags");
    (status, flags, text(resp).await)
}

// ---------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------

type Labels = BTreeMap<String, String>;

/// Every series of `name` in Prometheus text: its labels and its value.
fn series(text: &str, name: &str) -> Vec<(Labels, f64)> {
    let prefix = format!("{name}{{");
    text.lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .map(|rest| {
            let mut labels = Labels::new();
            let mut chars = rest.chars();
            loop {
                let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                assert_eq!(chars.next(), Some('"'), "{rest}");
                let mut value = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => match chars.next().unwrap() {
                            'n' => value.push('\n'),
                            other => value.push(other),
                        },
                        c => value.push(c),
                    }
                }
                labels.insert(key, value);
                match chars.next() {
                    Some(',') => continue,
                    Some('}') => break,
                    other => panic!("unexpected {other:?} in {rest}"),
                }
            }
            let value = chars.as_str().trim().parse().unwrap();
            (labels, value)
        })
        .collect()
}

async fn scrape(proxy: &RunningProxy) -> String {
    let resp = http1_client()
        .request(get(proxy.admin_addr(), "admin", "/metrics"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    text(resp).await
}

/// `istio_requests_total` of one reporter, as `(labels, count)`, sorted.
async fn requests(proxy: &RunningProxy, reporter: &str) -> Vec<(Labels, u64)> {
    let mut out: Vec<_> = series(&scrape(proxy).await, "istio_requests_total")
        .into_iter()
        .filter(|(labels, _)| labels["reporter"] == reporter)
        .map(|(labels, v)| (labels, v as u64))
        .collect();
    out.sort();
    out
}

/// Waits until `reporter`'s `istio_requests_total` series on `proxy` are exactly `want` —
/// a request is recorded when its response body ends in the sidecar, which may be a moment
/// after the client has read it — then checks that nothing more arrives.
async fn expect_requests(proxy: &RunningProxy, reporter: &str, want: Vec<(Labels, u64)>) {
    let mut want = want;
    want.sort();
    let mut got = Vec::new();
    for _ in 0..100 {
        got = requests(proxy, reporter).await;
        if got == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if got == want {
        // Settled: nothing late changes it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        got = requests(proxy, reporter).await;
    }
    assert!(
        got == want,
        "reporter={reporter}: series differ\n{}",
        diff(&got, &want)
    );
}

fn diff(got: &[(Labels, u64)], want: &[(Labels, u64)]) -> String {
    let show = |(labels, v): &(Labels, u64)| {
        let l: Vec<_> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        format!("{{{}}} {v}", l.join(","))
    };
    let got: BTreeSet<_> = got.iter().map(show).collect();
    let want: BTreeSet<_> = want.iter().map(show).collect();
    let mut out = String::new();
    for g in got.difference(&want) {
        out.push_str(&format!("  unexpected: {g}\n"));
    }
    for w in want.difference(&got) {
        out.push_str(&format!("  missing:    {w}\n"));
    }
    out
}

/// One side of a series: a workload's labels as Istio names them.
#[derive(Clone, Copy)]
struct Side<'a> {
    workload: &'a str,
    app: &'a str,
    version: &'a str,
    principal: &'a str,
}

const UNKNOWN_SIDE: Side<'static> = Side {
    workload: "unknown",
    app: "unknown",
    version: "unknown",
    principal: "unknown",
};

const PRODUCTPAGE_SIDE: Side<'static> = Side {
    workload: "productpage-v1",
    app: "productpage",
    version: "v1",
    principal: PRODUCTPAGE,
};

const REVIEWS_SIDE: Side<'static> = Side {
    workload: "reviews-v2",
    app: "reviews",
    version: "v2",
    principal: REVIEWS,
};

/// All 25 labels of an HTTP series.
struct Series<'a> {
    reporter: &'a str,
    source: Side<'a>,
    destination: Side<'a>,
    service: &'a str,
    code: u16,
    flags: &'a str,
    security: &'a str,
}

impl Series<'_> {
    fn labels(&self) -> Labels {
        let side = |prefix: &str, s: &Side| {
            let namespace = if s.workload == "unknown" {
                "unknown"
            } else {
                "default"
            };
            vec![
                (format!("{prefix}_workload"), s.workload.to_owned()),
                (format!("{prefix}_workload_namespace"), namespace.to_owned()),
                (format!("{prefix}_principal"), s.principal.to_owned()),
                (format!("{prefix}_app"), s.app.to_owned()),
                (format!("{prefix}_version"), s.version.to_owned()),
                (format!("{prefix}_canonical_service"), s.app.to_owned()),
                (format!("{prefix}_canonical_revision"), s.version.to_owned()),
                (format!("{prefix}_cluster"), "unknown".to_owned()),
            ]
        };
        let (name, namespace) = match self.service.split_once(".default.svc.") {
            Some((name, _)) => (name, "default"),
            None => ("unknown", "unknown"),
        };
        let mut labels: Labels = side("source", &self.source)
            .into_iter()
            .chain(side("destination", &self.destination))
            .collect();
        for (k, v) in [
            ("reporter", self.reporter),
            ("destination_service", self.service),
            ("destination_service_name", name),
            ("destination_service_namespace", namespace),
            ("request_protocol", "http"),
            ("response_code", &self.code.to_string()),
            ("grpc_response_status", ""),
            ("response_flags", self.flags),
            ("connection_security_policy", self.security),
        ] {
            labels.insert(k.to_owned(), v.to_owned());
        }
        assert_eq!(labels.len(), 25);
        labels
    }

    fn count(&self, n: u64) -> (Labels, u64) {
        (self.labels(), n)
    }
}

/// `destination_service` of a request a VirtualService fault aborts on the client side: the
/// route's service, as Envoy resolves the route and its cluster before the fault filter runs
/// (`ConnectionManagerImpl::ActiveStream::refreshCachedRoute`).
const FAULT_ABORT_SERVICE: &str = REVIEWS_FQDN;

/// productpage → reviews over mTLS as the source (client side) reports it.
fn source(code: u16, flags: &'static str) -> Series<'static> {
    Series {
        reporter: "source",
        source: PRODUCTPAGE_SIDE,
        destination: REVIEWS_SIDE,
        service: REVIEWS_FQDN,
        code,
        flags,
        security: "unknown",
    }
}

/// productpage → reviews over mTLS as the destination (server side) reports it.
fn destination(code: u16, flags: &'static str) -> Series<'static> {
    Series {
        reporter: "destination",
        security: "mutual_tls",
        ..source(code, flags)
    }
}

/// Known traffic through two mTLS sidecars gives exact counts and Istio's labels on both
/// reporters: the app's 200s and 503s, Istio's default retries (the source counts the
/// client's one request, the destination each attempt), a fault abort (`FI`, never reaching
/// the server), a dead endpoint (`UF,URX`), and a plaintext caller of the PERMISSIVE inbound
/// (`connection_security_policy="none"`, its forged metadata ignored). No app ever sees the
/// metadata exchange header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_from_both_reporters_count_known_traffic_exactly() {
    let mesh = Mesh::start(
        "",
        &format!("{REVIEWS_ROUTES}{}", dead_ratings_entry().await),
    )
    .await;

    // 10 requests, no retries: the app fails the 3rd, 6th and 9th it receives.
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let resp = http1_client()
            .request(mesh.request("/fail-every?n=3"))
            .await
            .unwrap();
        // The reviews app never sees the sidecars' metadata exchange.
        assert_eq!(header(&resp, "x-seen-peer-metadata").as_deref(), Some("-"));
        assert_eq!(
            header(&resp, "x-seen-xfcc").unwrap(),
            format!("By={REVIEWS};URI={PRODUCTPAGE}")
        );
        assert!(resp.headers().get("x-mesh-peer-metadata").is_none());
        statuses.push(resp.status().as_u16());
        text(resp).await;
    }
    assert_eq!(statuses, [200, 200, 503, 200, 200, 503, 200, 200, 503, 200]);
    assert_eq!(
        mesh.app.received.load(std::sync::atomic::Ordering::SeqCst),
        10
    );
    expect_requests(
        &mesh.client,
        "source",
        vec![source(200, "-").count(7), source(503, "-").count(3)],
    )
    .await;
    expect_requests(
        &mesh.server,
        "destination",
        vec![
            destination(200, "-").count(7),
            destination(503, "-").count(3),
        ],
    )
    .await;
    // Each sidecar reports only its own side.
    assert!(requests(&mesh.client, "destination").await.is_empty());
    assert!(requests(&mesh.server, "source").await.is_empty());

    // Istio's default retries on an app that always fails: one request for the source
    // (exhausted retries: URX), three attempts for the destination.
    let (status, flags, _) = send(with_header(
        mesh.request("/fail-every?n=1"),
        "x-retries",
        "default",
    ))
    .await;
    assert_eq!((status, flags.as_deref()), (503, Some("URX")));
    assert_eq!(
        mesh.app.received.load(std::sync::atomic::Ordering::SeqCst),
        13
    );

    // A fault abort on the client side: the server never sees it.
    let (status, flags, body) = send(with_header(mesh.request("/"), "x-fault", "abort")).await;
    assert_eq!((status, flags.as_deref()), (503, Some("FI")), "{body}");
    assert_eq!(
        mesh.app.received.load(std::sync::atomic::Ordering::SeqCst),
        13
    );

    // A dead endpoint: the connection fails, twice retried (Istio's default).
    let (status, flags, body) = send(get(
        mesh.client.outbound_addr().unwrap(),
        "ratings:9080",
        "/",
    ))
    .await;
    assert_eq!((status, flags.as_deref()), (503, Some("UF,URX")), "{body}");

    let fault = Series {
        // Aborted before any upstream: nothing is known of the destination workload.
        destination: UNKNOWN_SIDE,
        service: FAULT_ABORT_SERVICE,
        ..source(503, "FI")
    };
    let dead = Series {
        destination: UNKNOWN_SIDE,
        service: "ratings.default.svc.cluster.local",
        ..source(503, "UF,URX")
    };
    expect_requests(
        &mesh.client,
        "source",
        vec![
            source(200, "-").count(7),
            source(503, "-").count(3),
            source(503, "URX").count(1),
            fault.count(1),
            dead.count(1),
        ],
    )
    .await;

    // A plaintext caller straight to the PERMISSIVE inbound, forging productpage's
    // metadata: not a verified peer, so neither its header nor any identity counts.
    let forged = "n=productpage-v1;ns=default;app=productpage;v=v1";
    let resp = http1_client()
        .request(with_header(
            get(mesh.server.inbound_addr().unwrap(), "reviews:9080", "/"),
            "x-mesh-peer-metadata",
            forged,
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-seen-peer-metadata").as_deref(), Some("-"));
    assert_eq!(header(&resp, "x-seen-xfcc").as_deref(), Some("-"));
    // Nor does it learn the server's metadata.
    assert!(resp.headers().get("x-mesh-peer-metadata").is_none());
    text(resp).await;

    let plaintext = Series {
        reporter: "destination",
        source: UNKNOWN_SIDE,
        destination: REVIEWS_SIDE,
        service: REVIEWS_FQDN,
        code: 200,
        flags: "-",
        security: "none",
    };
    expect_requests(
        &mesh.server,
        "destination",
        vec![
            destination(200, "-").count(7),
            // The app's three 503s, then the three attempts of the retried request.
            destination(503, "-").count(6),
            plaintext.count(1),
        ],
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// Access log
// ---------------------------------------------------------------------------------------

/// The complete JSON lines of an access log file (none while it does not exist); a line
/// still being written is left for the next read.
fn log_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Polls `path` until it holds `n` lines, while its proxy runs (5 s at most; the log
/// promises a second).
async fn wait_for_lines(path: &Path, n: usize) -> Vec<Value> {
    for _ in 0..100 {
        let lines = log_lines(path);
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{} has not got {n} lines: {:#?}",
        path.display(),
        log_lines(path)
    );
}

/// The line of request `id`.
fn line<'a>(lines: &'a [Value], id: &str) -> &'a Value {
    let of: Vec<_> = lines.iter().filter(|l| l["request_id"] == id).collect();
    assert_eq!(of.len(), 1, "one line for {id}: {lines:#?}");
    of[0]
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SPAN: &str = "00f067aa0ba902b7";

/// Each sidecar writes one JSON line per request with Istio's fields, and the lines of one
/// request share its `x-request-id` and trace id across both sidecars; a fault abort's line
/// says `FI` (and the server logs nothing for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_has_one_line_per_request_on_each_side() {
    let dir = tempfile::tempdir().unwrap();
    let log = |side: &str| dir.path().join(format!("{side}.log"));
    let telemetry = format!(
        "  accessLog: {{ path: \"{}\", encoding: JSON }}\n  tracing: {{ sampling: 100 }}\n",
        dir.path().join("{side}.log").display()
    );
    let mesh = Mesh::start(&telemetry, REVIEWS_ROUTES).await;
    let inbound = mesh.server.inbound_addr().unwrap();

    // A POST with a body the app echoes, a GET, and a fault-injected abort.
    let post = http::Request::post(format!(
        "http://{}/echo",
        mesh.client.outbound_addr().unwrap()
    ))
    .header("host", "reviews:9080")
    .header("x-request-id", "req-post")
    .header("traceparent", format!("00-{TRACE}-{SPAN}-01"))
    .body(mesh_core::body::full("ping-pong"))
    .unwrap();
    let (status, _, body) = send(post).await;
    assert_eq!((status, body.as_str()), (200, "ping-pong"));
    let (status, _, body) = send(with_header(
        mesh.request("/reviews/1"),
        "x-request-id",
        "req-get",
    ))
    .await;
    assert_eq!((status, body.as_str()), (200, "hello from reviews"));
    let abort_trace = "0af7651916cd43dd8448eb211c80319c";
    let abort = with_header(
        with_header(mesh.request("/reviews/2"), "x-fault", "abort"),
        "x-request-id",
        "req-abort",
    );
    let (status, flags, abort_body) = send(with_header(
        abort,
        "traceparent",
        &format!("00-{abort_trace}-{SPAN}-01"),
    ))
    .await;
    assert_eq!((status, flags.as_deref()), (503, Some("FI")));

    let client = wait_for_lines(&log("client"), 3).await;
    let server = wait_for_lines(&log("server"), 2).await;

    let c = line(&client, "req-post");
    let s = line(&server, "req-post");
    for l in [c, s] {
        assert_eq!(l["method"], "POST");
        assert_eq!(l["path"], "/echo");
        assert_eq!(l["protocol"], "HTTP/1.1");
        assert_eq!(l["response_code"], 200);
        assert_eq!(l["response_flags"], "-");
        assert_eq!(l["bytes_received"], 9);
        assert_eq!(l["bytes_sent"], 9);
        assert!(l["duration"].is_u64(), "{l}");
        assert_eq!(l["authority"], "reviews:9080");
        assert_eq!(l["trace_id"], TRACE, "the caller's trace");
    }
    assert_eq!(c["upstream_host"], inbound.to_string());
    assert_eq!(
        c["upstream_cluster"],
        format!("outbound|9080||{REVIEWS_FQDN}")
    );
    assert_eq!(c["peer_principal"], REVIEWS);
    assert_eq!(s["upstream_host"], mesh.app.addr.to_string());
    assert_eq!(
        s["upstream_cluster"],
        format!("inbound|{}||", mesh.app.addr.port())
    );
    assert_eq!(s["peer_principal"], PRODUCTPAGE);
    assert_eq!(s["downstream_local_address"], inbound.to_string());

    let c = line(&client, "req-get");
    let s = line(&server, "req-get");
    for l in [c, s] {
        assert_eq!(l["method"], "GET");
        assert_eq!(l["path"], "/reviews/1");
        assert_eq!(l["response_code"], 200);
        assert_eq!(l["response_flags"], "-");
        assert_eq!(l["bytes_received"], 0);
        assert_eq!(l["bytes_sent"], "hello from reviews".len());
        // No trace context came in: the client sidecar started one, the server joined it.
        assert_eq!(l["trace_id"].as_str().unwrap().len(), 32, "{l}");
    }
    assert_eq!(c["trace_id"], s["trace_id"]);
    assert_ne!(c["trace_id"], TRACE);
    assert_eq!(c["peer_principal"], REVIEWS);
    assert_eq!(s["peer_principal"], PRODUCTPAGE);

    // The abort: answered by the client sidecar, logged there only.
    let c = line(&client, "req-abort");
    assert_eq!(c["method"], "GET");
    assert_eq!(c["path"], "/reviews/2");
    assert_eq!(c["response_code"], 503);
    assert_eq!(c["response_flags"], "FI");
    assert_eq!(c["bytes_sent"], abort_body.len());
    assert_eq!(c["upstream_host"], Value::Null, "no upstream was called");
    // The route's cluster, as Envoy logs it for an aborted request.
    assert_eq!(
        c["upstream_cluster"],
        Value::from(format!("outbound|9080||{FAULT_ABORT_SERVICE}"))
    );
    assert_eq!(c["peer_principal"], Value::Null);
    assert_eq!(c["trace_id"], abort_trace);
    assert!(server.iter().all(|l| l["request_id"] != "req-abort"));

    // Exactly one line per request: still so once both have drained (which flushes).
    let (client, server) = (mesh.client, mesh.server);
    client.shutdown().await;
    server.shutdown().await;
    assert_eq!(
        log_lines(&log("client")).len(),
        3,
        "{:#?}",
        log_lines(&log("client"))
    );
    assert_eq!(
        log_lines(&log("server")).len(),
        2,
        "{:#?}",
        log_lines(&log("server"))
    );
}

// ---------------------------------------------------------------------------------------
// Traces
// ---------------------------------------------------------------------------------------

/// An OTLP trace collector: keeps every span with its resource's `service.name`.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
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
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Starts one on 127.0.0.1:0; returns its URL.
    async fn start() -> (String, Collector) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let collector = Collector::default();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (format!("http://{addr}"), collector)
    }

    /// The spans of trace `trace` (hex).
    fn trace(&self, trace: &str) -> Vec<(String, Span)> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| hex(&s.trace_id) == trace)
            .cloned()
            .collect()
    }
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

fn string(s: &str) -> Option<any_value::Value> {
    Some(any_value::Value::StringValue(s.to_owned()))
}

/// The trace `trace` has exactly a CLIENT span from productpage's sidecar, child of
/// `caller`, and a SERVER span from reviews', child of the client span.
fn check_hop(collector: &Collector, trace: &str, caller: &str, path: &str) {
    let spans = collector.trace(trace);
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let find = |kind: SpanKind| {
        spans
            .iter()
            .find(|(_, s)| s.kind == kind as i32)
            .unwrap_or_else(|| panic!("no {kind:?} span: {spans:#?}"))
    };
    let (client_service, client) = find(SpanKind::Client);
    let (server_service, server) = find(SpanKind::Server);
    assert_eq!(client_service, "productpage.default");
    assert_eq!(server_service, "reviews.default");
    assert_eq!(
        hex(&client.parent_span_id),
        caller,
        "the client span's parent is the calling app's span"
    );
    assert_eq!(
        hex(&server.parent_span_id),
        hex(&client.span_id),
        "the server span's parent is the client span"
    );
    assert_eq!(client.name, format!("{REVIEWS_FQDN}:9080/*"));
    for span in [client, server] {
        assert_eq!(attr(span, "url.path"), string(path));
        assert_eq!(
            attr(span, "http.response.status_code"),
            Some(any_value::Value::IntValue(200))
        );
    }
    assert_eq!(
        attr(client, "upstream_cluster"),
        string(&format!("outbound|9080||{REVIEWS_FQDN}"))
    );
    assert_eq!(attr(client, "destination_principal"), string(REVIEWS));
    assert_eq!(attr(server, "source_principal"), string(PRODUCTPAGE));
}

/// A W3C and a B3 request through both sidecars each give one trace with a span from each
/// sidecar, linked caller → client span → server span, at the collector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_from_both_sidecars_reach_an_otlp_collector_in_one_trace() {
    let (url, collector) = Collector::start().await;
    let mesh = Mesh::start(
        &format!("  tracing: {{ sampling: 100, otlp: \"{url}\" }}\n"),
        "",
    )
    .await;

    let w3c = with_header(
        mesh.request("/reviews/1"),
        "traceparent",
        &format!("00-{TRACE}-{SPAN}-01"),
    );
    let (status, _, _) = send(w3c).await;
    assert_eq!(status, 200);

    // Multi-header B3, as a Zipkin-instrumented app sends it.
    let b3_trace = "a3ce929d0e0e47364bf92f3577b34da6";
    let b3_span = "e457b5a2e4d86bd1";
    let mut b3 = mesh.request("/reviews/2");
    for (k, v) in [
        ("x-b3-traceid", b3_trace),
        ("x-b3-spanid", b3_span),
        ("x-b3-sampled", "1"),
    ] {
        b3.headers_mut().insert(k, v.parse().unwrap());
    }
    let (status, _, _) = send(b3).await;
    assert_eq!(status, 200);

    // Single-header B3.
    let single_trace = "5b8aa5a2d2c872e8321cf37308d69df2";
    let single_span = "051581bf3cb55c13";
    let (status, _, _) = send(with_header(
        mesh.request("/reviews/3"),
        "b3",
        &format!("{single_trace}-{single_span}-1"),
    ))
    .await;
    assert_eq!(status, 200);

    // Draining exports what is queued (the batch would otherwise wait up to 5 s).
    let (client, server) = (mesh.client, mesh.server);
    client.shutdown().await;
    server.shutdown().await;

    check_hop(&collector, TRACE, SPAN, "/reviews/1");
    check_hop(&collector, b3_trace, b3_span, "/reviews/2");
    check_hop(&collector, single_trace, single_span, "/reviews/3");
}

/// With the collector's address pointing at a closed port, sampled requests still complete
/// (exporting is off the request path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_unaffected_by_an_absent_collector() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let mesh = Mesh::start(
        &format!("  tracing: {{ sampling: 100, otlp: \"{url}\" }}\n"),
        "",
    )
    .await;

    let all = async {
        for i in 1..=50 {
            let trace = format!("{i:032x}");
            let (status, _, body) = send(with_header(
                mesh.request("/"),
                "traceparent",
                &format!("00-{trace}-{SPAN}-01"),
            ))
            .await;
            assert_eq!((status, body.as_str()), (200, "hello from reviews"));
        }
    };
    tokio::time::timeout(Duration::from_secs(20), all)
        .await
        .expect("50 sampled requests complete with the collector down");
    assert_eq!(
        mesh.app.received.load(std::sync::atomic::Ordering::SeqCst),
        50
    );
}

/// The workload metadata header is for a peer sidecar only: a server reached in plain text
/// (here an app with no sidecar in front) never learns the caller's workload.
#[tokio::test]
async fn a_server_without_a_sidecar_never_sees_the_peer_metadata() {
    let app = App::start("external").await;
    let proxy = support::client_proxy("external", &[app.addr]).await;
    let resp = http1_client()
        .request(get(proxy.outbound_addr().unwrap(), "external", "/"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()
            .get("x-seen-peer-metadata")
            .map(|v| v.to_str().unwrap()),
        Some("-")
    );
}
