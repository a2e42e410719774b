//! End to end over real loopback sockets: client → outbound sidecar → inbound sidecar → app.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use mesh_core::body::{self, BoxError};
use mesh_proxy::RunningProxy;
use support::app::App;
use support::{bootstrap, client_proxy, get, grpc, http1_client, service_entry, start_proxy, text};

/// An app behind a server sidecar, and a client sidecar that knows it as `echo:80` (HTTP)
/// and `echo-grpc:9090` (GRPC).
struct Mesh {
    app: App,
    _server: RunningProxy,
    client: RunningProxy,
    grpc_task: tokio::task::JoinHandle<()>,
}

impl Mesh {
    async fn start() -> Mesh {
        let app = App::start("echo").await;
        let server = start_proxy(&bootstrap("echo", Some(app.addr))).await;
        let server_inbound = server.inbound_addr().unwrap();

        // The gRPC app sits behind its own server sidecar.
        let (grpc_addr, grpc_task) = grpc::start().await;
        let grpc_server = start_proxy(&bootstrap("echo-grpc", Some(grpc_addr))).await;
        let grpc_inbound = grpc_server.inbound_addr().unwrap();
        // Kept alive by leaking into the task: the test process ends with the test.
        let grpc_task = tokio::spawn(async move {
            let _keep = grpc_server;
            let _ = grpc_task.await;
        });

        let client = start_proxy(&format!(
            "{}{}{}",
            bootstrap("client", None),
            service_entry("echo", 80, "HTTP", &[server_inbound]),
            service_entry("echo-grpc", 9090, "GRPC", &[grpc_inbound]),
        ))
        .await;
        Mesh {
            app,
            _server: server,
            client,
            grpc_task,
        }
    }

    fn outbound(&self) -> std::net::SocketAddr {
        self.client.outbound_addr().unwrap()
    }
}

#[tokio::test]
async fn http1_get_reaches_the_app_through_both_sidecars() {
    let mesh = Mesh::start().await;
    let client = http1_client();
    let mut req = get(mesh.outbound(), "echo", "/hello");
    req.headers_mut()
        .insert("connection", "keep-alive, x-hop".parse().unwrap());
    req.headers_mut().insert("x-hop", "1".parse().unwrap());
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers().clone();
    assert_eq!(h["x-app"], "echo");
    assert_eq!(
        h["x-seen-host"], "echo",
        "the caller's Host reaches the app"
    );
    assert_eq!(h["x-seen-version"], "HTTP/1.1");
    assert_eq!(h["x-seen-xfp"], "http");
    // Each sidecar appends its client's address.
    assert_eq!(h["x-seen-xff"], "127.0.0.1, 127.0.0.1");
    assert_ne!(h["x-seen-request-id"], "-", "a request id is generated");
    assert_eq!(
        h["x-seen-connection"], "-",
        "hop-by-hop headers are not forwarded"
    );
    assert!(h.get("x-mesh-response-flags").is_none());
    assert_eq!(text(resp).await, "hello from echo");
    assert_eq!(
        mesh.app.received.load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    // A request id the client set survives both hops.
    let mut req = get(mesh.outbound(), "echo.default.svc.cluster.local", "/");
    req.headers_mut()
        .insert("x-request-id", "my-id".parse().unwrap());
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.headers()["x-seen-request-id"], "my-id");

    // Absolute-form, as an HTTP proxy client sends it.
    let req = Request::get("http://echo/abs").body(body::empty()).unwrap();
    let resp = send_absolute_form(mesh.outbound(), req).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("hello from echo"), "{resp}");
}

/// Writes an absolute-form request by hand (hyper's client sends origin-form).
async fn send_absolute_form(proxy: std::net::SocketAddr, req: Request<body::BoxBody>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let line = format!(
        "GET {} HTTP/1.1\r\nhost: ignored-when-absolute\r\nconnection: close\r\n\r\n",
        req.uri()
    );
    s.write_all(line.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn a_10_mib_post_streams_both_ways() {
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 160; // 10 MiB
    let mesh = Mesh::start().await;
    let chunk = |i: usize| Bytes::from(vec![(i % 251) as u8; CHUNK]);

    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(2);
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let req = Request::post(format!("http://{}/echo", mesh.outbound()))
        .header("host", "echo")
        .body(body::boxed(StreamBody::new(stream)))
        .unwrap();
    let client = http1_client();
    let pending = tokio::spawn(async move { client.request(req).await });

    // Only the first chunk is sent: if any hop buffered the whole body, nothing would come
    // back and this would time out.
    tx.send(Ok(Frame::data(chunk(0)))).await.unwrap();
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut received = Vec::with_capacity(CHUNK * CHUNKS);
    while received.len() < CHUNK {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the first chunk came back before the rest was sent")
            .unwrap()
            .unwrap();
        received.extend_from_slice(&frame.into_data().unwrap());
    }

    let sender = tokio::spawn(async move {
        for i in 1..CHUNKS {
            tx.send(Ok(Frame::data(chunk(i)))).await.unwrap();
        }
    });
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received.extend_from_slice(&data);
        }
    }
    sender.await.unwrap();
    assert_eq!(received.len(), CHUNK * CHUNKS);
    for (i, c) in received.chunks(CHUNK).enumerate() {
        assert!(
            c.iter().all(|b| *b == (i % 251) as u8),
            "chunk {i} corrupted"
        );
    }
}

#[tokio::test]
async fn http2_end_to_end_keeps_the_authority() {
    let mesh = Mesh::start().await;
    // An HTTP/2 client names the service in `:authority`, and connects to the sidecar.
    let stream = tokio::net::TcpStream::connect(mesh.outbound())
        .await
        .unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for path in ["/h2", "/again"] {
        let req = Request::get(format!("http://echo{path}"))
            .body(body::empty())
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.headers()["x-seen-version"], "HTTP/2.0");
        assert_eq!(
            resp.headers()["x-seen-host"],
            "echo",
            "the caller's :authority reaches the app"
        );
        assert_eq!(text(resp).await, "hello from echo");
    }
}

#[tokio::test]
async fn grpc_unary_and_server_streaming_keep_their_trailers() {
    let mesh = Mesh::start().await;
    let authority = "echo-grpc:9090";

    let reply = grpc::call_unary(grpc::client(mesh.outbound(), authority).await, "hi")
        .await
        .unwrap();
    assert_eq!(reply.into_inner().message, "hi");

    let status = grpc::call_unary(grpc::client(mesh.outbound(), authority).await, "fail")
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), "asked to fail");

    // A stream that succeeds: every message, then grpc-status 0 in the trailers.
    let (items, trailers) = grpc::call_stream(
        grpc::client(mesh.outbound(), authority).await,
        5,
        tonic::Code::Ok,
    )
    .await;
    assert_eq!(items, ["item 0", "item 1", "item 2", "item 3", "item 4"]);
    let trailers = trailers.unwrap().expect("trailers arrived");
    assert_eq!(trailers["grpc-status"], "0");

    // A stream that fails after its messages: the status travels only in the trailers.
    let (items, end) = grpc::call_stream(
        grpc::client(mesh.outbound(), authority).await,
        3,
        tonic::Code::ResourceExhausted,
    )
    .await;
    assert_eq!(items.len(), 3);
    let status = end.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(status.message(), "stream ended with an error");
    mesh.grpc_task.abort();
}

#[tokio::test]
async fn local_failures_answer_with_flags_and_the_proxy_keeps_serving() {
    let echo = App::start("echo").await;
    let other = App::start("other").await;
    let client = start_proxy(&format!(
        "{}{}{}{}",
        bootstrap("client", None),
        service_entry("echo", 80, "HTTP", &[echo.addr]),
        service_entry("other", 80, "HTTP", &[other.addr]),
        service_entry("empty", 80, "HTTP", &[]),
    ))
    .await;
    let outbound = client.outbound_addr().unwrap();
    let http = http1_client();

    let resp = http.request(get(outbound, "echo", "/")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    text(resp).await;

    let resp = http.request(get(outbound, "nope", "/")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resp.headers()["x-mesh-response-flags"], "NR");
    assert!(text(resp).await.contains("\"nope\""));

    let resp = http.request(get(outbound, "empty", "/")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["x-mesh-response-flags"], "UH");
    assert!(
        text(resp)
            .await
            .contains("empty.default.svc.cluster.local:80")
    );

    // The backend dies: its pooled connection and its port go away.
    echo.kill();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..3 {
        let resp = http.request(get(outbound, "echo", "/")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        // Istio's default retry policy retries connect failures twice; when every attempt
        // fails, Envoy reports the connect failure and the exhausted retries.
        assert_eq!(resp.headers()["x-mesh-response-flags"], "UF,URX");
        let msg = text(resp).await;
        assert!(msg.contains("echo.default.svc.cluster.local:80"), "{msg}");
        assert!(msg.contains(&echo.addr.to_string()), "{msg}");
    }

    // Other hosts are unaffected.
    let resp = http.request(get(outbound, "other", "/")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(text(resp).await, "hello from other");
}

#[tokio::test]
async fn round_robin_spreads_over_endpoints_and_follows_endpoint_changes() {
    let a = App::start("a").await;
    let b = App::start("b").await;
    let c = App::start("c").await;
    let yaml = |eps: &[std::net::SocketAddr]| {
        format!(
            "{}{}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: svc }}
spec:
  host: svc
  trafficPolicy: {{ loadBalancer: {{ simple: ROUND_ROBIN }} }}
",
            bootstrap("client", None),
            service_entry("svc", 80, "HTTP", eps)
        )
    };
    let proxy = start_proxy(&yaml(&[a.addr, b.addr])).await;
    let outbound = proxy.outbound_addr().unwrap();
    let http = http1_client();
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..10 {
        let resp = http.request(get(outbound, "svc", "/")).await.unwrap();
        *seen.entry(text(resp).await).or_insert(0) += 1;
    }
    assert_eq!(seen.get("hello from a"), Some(&5));
    assert_eq!(seen.get("hello from b"), Some(&5));

    // /clusters shows the service's endpoints with their figures.
    let resp = http
        .request(get(proxy.admin_addr(), "admin", "/clusters"))
        .await
        .unwrap();
    let clusters: serde_json::Value = serde_json::from_str(&text(resp).await).unwrap();
    let svc = clusters
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["service"] == "svc.default.svc.cluster.local:80")
        .unwrap_or_else(|| panic!("svc in /clusters: {clusters}"));
    assert_eq!(svc["policy"], "ROUND_ROBIN");
    let mut addresses: Vec<_> = svc["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e["in_flight"], 0);
            assert_eq!(e["health"], "healthy");
            assert!(e["ewma_ms"].is_number());
            e["address"].as_str().unwrap().to_owned()
        })
        .collect();
    addresses.sort();
    let mut want = vec![a.addr.to_string(), b.addr.to_string()];
    want.sort();
    assert_eq!(addresses, want);

    // New endpoints from discovery take over; the balancer applies a published set from its
    // own task (as Envoy applies EDS), so the switch is awaited, not assumed.
    assert!(a.open.load(Ordering::SeqCst) >= 1 && b.open.load(Ordering::SeqCst) >= 1);
    proxy
        .apply_config(support::load(&yaml(&[c.addr])))
        .expect("the new config applies");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let resp = http.request(get(outbound, "svc", "/")).await.unwrap();
        if text(resp).await == "hello from c" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "c never took over");
        tokio::task::yield_now().await;
    }
    for _ in 0..5 {
        let resp = http.request(get(outbound, "svc", "/")).await.unwrap();
        assert_eq!(text(resp).await, "hello from c");
    }

    // The removed endpoints' pooled connections drain: closed within a maintenance interval.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while a.open.load(Ordering::SeqCst) + b.open.load(Ordering::SeqCst) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "connections to removed endpoints stayed open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        c.open.load(Ordering::SeqCst),
        1,
        "the live endpoint keeps its pooled connection"
    );
}

#[tokio::test]
async fn admin_reports_readiness_liveness_and_config() {
    let app = App::start("echo").await;
    let proxy = client_proxy("echo", &[app.addr]).await;
    let admin = proxy.admin_addr();
    let http = http1_client();
    let resp = http.request(get(admin, "admin", "/live")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = http
        .request(get(admin, "admin", "/config_dump"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let dump: serde_json::Value = serde_json::from_str(&text(resp).await).unwrap();
    let dump = dump.to_string();
    assert!(dump.contains("echo.default.svc.cluster.local"), "{dump}");
    assert!(dump.contains("Bootstrap"), "{dump}");
    let resp = http
        .request(
            Request::post(format!("http://{admin}/ready"))
                .body(body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);

    // Draining: /ready stops answering 200 before the listeners close.
    let outbound = proxy.outbound_addr().unwrap();
    proxy.shutdown().await;
    assert!(
        tokio::net::TcpStream::connect(outbound).await.is_err(),
        "outbound closed after drain"
    );
}

#[tokio::test]
async fn draining_turns_ready_to_503_while_in_flight_requests_finish() {
    let app = App::start("slow").await;
    let proxy = client_proxy("slow", &[app.addr]).await;
    let (outbound, admin) = (proxy.outbound_addr().unwrap(), proxy.admin_addr());
    let http = http1_client();
    let in_flight = {
        let http = http.clone();
        tokio::spawn(async move { http.request(get(outbound, "slow", "/delay?ms=1500")).await })
    };
    while app.received.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let drain = tokio::spawn(proxy.shutdown());

    // Admin stays up through the drain and says "not ready" while the request is in flight.
    let mut saw_503 = false;
    while !in_flight.is_finished() {
        if let Ok(resp) = http.request(get(admin, "admin", "/ready")).await
            && resp.status() == StatusCode::SERVICE_UNAVAILABLE
        {
            saw_503 = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(saw_503, "/ready answered 503 during the drain");
    let resp = in_flight.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(text(resp).await, "slow waited 1500 ms");
    drain.await.unwrap();
}

#[tokio::test]
async fn default_retries_hide_a_dead_endpoint_by_trying_another() {
    let alive = App::start("alive").await;
    let dead = App::start("dead").await;
    let dead_addr = dead.addr;
    dead.kill();
    drop(dead);
    let proxy = client_proxy("svc", &[alive.addr, dead_addr]).await;
    let outbound = proxy.outbound_addr().unwrap();
    let http = http1_client();
    // Istio's default policy retries connect failures twice, each time preferring an
    // endpoint not tried yet, so no request fails although half the endpoints are dead.
    for _ in 0..100 {
        let resp = http.request(get(outbound, "svc", "/")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(text(resp).await, "hello from alive");
    }
}

#[tokio::test]
async fn the_inbound_rate_limit_answers_429_rl_past_the_burst() {
    let app = App::start("limited").await;
    let server = start_proxy(&format!(
        "{}  rateLimit: {{ requestsPerSecond: 5, burst: 5 }}\n",
        bootstrap("limited", Some(app.addr))
    ))
    .await;
    let inbound = server.inbound_addr().unwrap();
    let http = http1_client();
    let (mut passed, mut limited) = (0, 0);
    for _ in 0..20 {
        let resp = http.request(get(inbound, "limited", "/")).await.unwrap();
        match resp.status() {
            StatusCode::OK => passed += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(resp.headers()["x-mesh-response-flags"], "RL");
                assert!(text(resp).await.contains("rate limited"));
                limited += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    // The burst of 5, plus whatever refilled (5/s) while the 20 requests ran.
    assert!(
        (5..=10).contains(&passed),
        "{passed} passed, {limited} limited"
    );
    assert_eq!(passed + limited, 20);
    assert_eq!(
        app.received.load(Ordering::SeqCst),
        passed,
        "refused requests never reach the app"
    );
}

#[tokio::test]
async fn outlier_detection_ejects_an_endpoint_that_keeps_failing() {
    let a = App::start("a").await;
    let b = App::start("b").await;
    let broken = App::start_with_status("broken", 500).await;
    let proxy = start_proxy(&format!(
        "{}{}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: svc }}
spec:
  host: svc
  trafficPolicy:
    loadBalancer: {{ simple: ROUND_ROBIN }}
    outlierDetection:
      consecutive5xxErrors: 3
      interval: 1s
      baseEjectionTime: 30s
      maxEjectionPercent: 100
",
        bootstrap("client", None),
        service_entry("svc", 80, "HTTP", &[a.addr, b.addr, broken.addr])
    ))
    .await;
    let outbound = proxy.outbound_addr().unwrap();
    let http = http1_client();
    let mut errors = 0;
    for _ in 0..60 {
        let resp = http.request(get(outbound, "svc", "/")).await.unwrap();
        if resp.status() == StatusCode::INTERNAL_SERVER_ERROR {
            errors += 1;
        }
        text(resp).await;
    }
    // 500 is not retried by Istio's default policy, so the caller sees exactly the three
    // failures that trip the detector, and nothing from the endpoint after that.
    assert_eq!(errors, 3);
    assert_eq!(broken.received.load(Ordering::SeqCst), 3);

    let resp = http
        .request(get(proxy.admin_addr(), "admin", "/clusters"))
        .await
        .unwrap();
    let clusters: serde_json::Value = serde_json::from_str(&text(resp).await).unwrap();
    let health = |addr: std::net::SocketAddr| {
        clusters
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c["endpoints"].as_array().unwrap())
            .find(|e| e["address"] == addr.to_string())
            .map(|e| e["health"].as_str().unwrap().to_owned())
    };
    assert_eq!(
        health(broken.addr).as_deref(),
        Some("ejected"),
        "{clusters}"
    );
    assert_eq!(health(a.addr).as_deref(), Some("healthy"), "{clusters}");

    // ... and in the metrics.
    let resp = http
        .request(get(proxy.admin_addr(), "admin", "/metrics"))
        .await
        .unwrap();
    let metrics = text(resp).await;
    assert!(
        metrics.contains("mesh_outlier_ejections_total 1\n"),
        "{metrics}"
    );
    let ejected: Vec<_> = metrics
        .lines()
        .filter(|l| l.starts_with("mesh_outlier_ejected_endpoints{"))
        .collect();
    assert_eq!(ejected.len(), 1, "one balanced set: {metrics}");
    assert!(ejected[0].ends_with("} 1"), "{metrics}");
}

/// An Istio Sidecar's catch-all egress entry (no port) scopes what the proxy sees: a
/// service outside its `hosts` is unknown (`404 NR`, no app reached); a config change that
/// widens the scope applies to the next request.
#[tokio::test]
async fn a_sidecar_egress_scope_hides_the_services_outside_it() {
    let reviews = App::start("reviews").await;
    let ratings = App::start("ratings").await;
    let yaml = |hosts: &str| {
        format!(
            "{}{}{}---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: scope, namespace: default }}
spec:
  egress:
  - hosts: [{hosts}]
",
            bootstrap("client", None),
            service_entry("reviews", 9080, "HTTP", &[reviews.addr]),
            service_entry("ratings", 9080, "HTTP", &[ratings.addr]),
        )
    };
    let proxy = start_proxy(&yaml("\"./reviews\"")).await;
    let outbound = proxy.outbound_addr().unwrap();
    let client = http1_client();
    let resp = client
        .request(get(outbound, "reviews:9080", "/"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    text(resp).await;
    let resp = client
        .request(get(outbound, "ratings:9080", "/"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resp.headers()["x-mesh-response-flags"], "NR");
    text(resp).await;
    assert_eq!(ratings.received.load(Ordering::SeqCst), 0);

    proxy
        .apply_config(support::load(&yaml("\"./reviews\", \"default/ratings\"")))
        .unwrap();
    let resp = client
        .request(get(outbound, "ratings:9080", "/"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    text(resp).await;
    assert_eq!(ratings.received.load(Ordering::SeqCst), 1);
    proxy.shutdown().await;
}
