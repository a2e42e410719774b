//! Two sidecars' metrics layers talking over a real loopback HTTP/1.1 connection (hyper):
//! productpage's outbound side as the client, reviews' inbound side as the server. The test
//! stands in for mTLS: it sets the server's `Identity` extension and the client's
//! `upstream_peer`, as the real listener and connector do after a verified handshake.
#![cfg(feature = "metrics")]
#![allow(clippy::unwrap_used)]

mod metrics_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use mesh_core::body::BoxError;
use mesh_core::stream_info::StreamInfo;
use mesh_telemetry::metrics::{Metrics, MetricsLayer, PEER_METADATA_HEADER, RequestBody};
use metrics_support::*;
use tokio::net::{TcpListener, TcpStream};
use tower::{Layer, ServiceExt, service_fn};

/// A header only this test uses, from the client stand-in to the server stand-in: "this
/// connection would have been mTLS".
const SIMULATED_MTLS: &str = "x-test-simulated-mtls";

/// Reviews: its inbound sidecar layer in front of the app, served by hyper.
async fn serve_reviews(metrics: Arc<Metrics>) -> SocketAddr {
    let app = service_fn(|req: Request<RequestBody<Incoming>>| async move {
        assert!(
            !req.headers().contains_key(PEER_METADATA_HEADER),
            "app saw peer metadata"
        );
        let body = drain(req.into_body()).await;
        Ok::<_, std::convert::Infallible>(Response::new(full(format!(
            "reviews for {} bytes",
            body.len()
        ))))
    });
    let fqdn: Arc<str> = Arc::from("reviews.default.svc.cluster.local");
    let resolver =
        Arc::new(move |authority: &str| (authority == "reviews:9080").then(|| fqdn.clone()));
    let inbound = MetricsLayer::inbound(metrics, Arc::new(reviews()), resolver).layer(app);
    // The listener's part: a verified client's identity goes into the extensions.
    let listener_stand_in = service_fn(move |mut req: Request<Incoming>| {
        if req.headers_mut().remove(SIMULATED_MTLS).is_some() {
            req.extensions_mut().insert(id("bookinfo-productpage"));
        }
        inbound.clone().oneshot(req)
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = TowerToHyperService::new(listener_stand_in.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// Productpage's outbound side; below it, a stand-in for routing and the mTLS connector,
/// then a real HTTP/1.1 connection to `server`.
async fn call_reviews(metrics: &Arc<Metrics>, server: SocketAddr, mtls: bool) -> Response<Bytes> {
    let upstream = service_fn(move |mut req: Request<RequestBody<FullBody>>| async move {
        let info = req.extensions().get::<StreamInfo>().unwrap().clone();
        info.set_route(&route("reviews", 9080));
        info.set_upstream(server);
        if mtls {
            info.set_upstream_peer(id("bookinfo-reviews"));
            req.headers_mut()
                .insert(SIMULATED_MTLS, "1".parse().unwrap());
        }
        let stream = TcpStream::connect(server).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok::<_, BoxError>(sender.send_request(req).await?)
    });
    let outbound = MetricsLayer::outbound(metrics.clone(), Arc::new(productpage())).layer(upstream);
    let req = Request::builder()
        .uri("/reviews/0")
        .header("host", "reviews:9080")
        .body(full("hello"))
        .unwrap();
    let resp = outbound.oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, drain(body).await)
}

/// The one `istio_requests_total` line, once it is there (the server records when hyper has
/// taken the last frame of its body, which may be a moment after the client has it).
async fn requests_line(metrics: &Metrics) -> String {
    for _ in 0..500 {
        if let [line] = lines(metrics, "istio_requests_total").as_slice() {
            return line.clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no series: {:#?}", lines(metrics, "istio_requests_total"));
}

#[tokio::test]
async fn both_reporters_fill_each_others_workload_labels() {
    let (client_metrics, server_metrics) = (Arc::new(Metrics::new()), Arc::new(Metrics::new()));
    let server = serve_reviews(server_metrics.clone()).await;

    let resp = call_reviews(&client_metrics, server, true).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.body(), "reviews for 5 bytes");
    assert!(
        !resp.headers().contains_key(PEER_METADATA_HEADER),
        "app saw peer metadata"
    );

    let both = [
        ("source_workload", "productpage-v1"),
        ("source_canonical_service", "productpage"),
        ("source_canonical_revision", "v1"),
        ("source_workload_namespace", "default"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
        ),
        ("source_app", "productpage"),
        ("source_version", "v1"),
        ("source_cluster", "Kubernetes"),
        ("destination_workload", "reviews-v2"),
        ("destination_workload_namespace", "default"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/default/sa/bookinfo-reviews",
        ),
        ("destination_app", "reviews"),
        ("destination_version", "v2"),
        ("destination_service", "reviews.default.svc.cluster.local"),
        ("destination_canonical_service", "reviews"),
        ("destination_canonical_revision", "v2"),
        ("destination_service_name", "reviews"),
        ("destination_service_namespace", "default"),
        ("destination_cluster", "Kubernetes"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("grpc_response_status", ""),
        ("response_flags", "-"),
    ];
    let source = [
        &[("reporter", "source")][..],
        &both,
        &[("connection_security_policy", "unknown")],
    ]
    .concat();
    let destination = [
        &[("reporter", "destination")][..],
        &both,
        &[("connection_security_policy", "mutual_tls")],
    ]
    .concat();
    assert_eq!(
        requests_line(&client_metrics).await,
        format!("istio_requests_total{{{}}} 1", labels(&source))
    );
    assert_eq!(
        requests_line(&server_metrics).await,
        format!("istio_requests_total{{{}}} 1", labels(&destination))
    );
    // Both sides saw the same bodies.
    for m in [&client_metrics, &server_metrics] {
        assert_eq!(value(m, "istio_request_bytes_sum", &[]), Some(5.0));
        assert_eq!(value(m, "istio_response_bytes_sum", &[]), Some(19.0));
    }
}

#[tokio::test]
async fn without_mtls_neither_side_learns_the_other() {
    let (client_metrics, server_metrics) = (Arc::new(Metrics::new()), Arc::new(Metrics::new()));
    let server = serve_reviews(server_metrics.clone()).await;

    let resp = call_reviews(&client_metrics, server, false).await;
    assert_eq!(resp.status(), 200);

    let source = requests_line(&client_metrics).await;
    assert!(
        source.contains(r#"source_workload="productpage-v1","#),
        "{source}"
    );
    assert!(
        source.contains(r#"destination_workload="unknown","#),
        "{source}"
    );
    assert!(
        source.contains(r#"destination_principal="unknown","#),
        "{source}"
    );
    let destination = requests_line(&server_metrics).await;
    assert!(
        destination.contains(r#"source_workload="unknown","#),
        "{destination}"
    );
    assert!(
        destination.contains(r#"destination_workload="reviews-v2","#),
        "{destination}"
    );
    assert!(
        destination.contains(r#"connection_security_policy="none"}"#),
        "{destination}"
    );
}
