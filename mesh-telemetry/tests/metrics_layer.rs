//! The metrics layers over in-process services: what each request records, and when.
#![cfg(feature = "metrics")]
#![allow(clippy::unwrap_used)]

mod metrics_support;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use mesh_core::body::BoxError;
use mesh_core::flags::RESPONSE_FLAGS_HEADER;
use mesh_core::stream_info::StreamInfo;
use mesh_core::{ProxyError, ResponseFlags};
use mesh_telemetry::metrics::{
    Metrics, MetricsLayer, PEER_METADATA_HEADER, PeerMetadata, ServiceResolver,
};
use metrics_support::*;
use tower::{Layer, ServiceExt, service_fn};

fn outbound(metrics: &Arc<Metrics>) -> MetricsLayer {
    MetricsLayer::outbound(metrics.clone(), Arc::new(productpage()))
}

fn resolver() -> ServiceResolver {
    let fqdn: Arc<str> = Arc::from("reviews.default.svc.cluster.local");
    Arc::new(move |authority: &str| {
        (authority.split(':').next() == Some("reviews")).then(|| fqdn.clone())
    })
}

fn inbound(metrics: &Arc<Metrics>) -> MetricsLayer {
    MetricsLayer::inbound(metrics.clone(), Arc::new(reviews()), resolver())
}

/// Reviews' sidecar answering through the rest of productpage's outbound stack: routing
/// and the mTLS connector record into `StreamInfo`, the upstream sidecar's metadata comes
/// back on the response.
fn reviews_upstream(
    status: StatusCode,
) -> impl tower::Service<Request<CountedFull>, Response = Response<FullBody>, Error = BoxError> + Clone
{
    let theirs = PeerMetadata::of(&reviews()).encode().unwrap();
    service_fn(move |req: Request<_>| {
        let theirs = theirs.clone();
        async move {
            let ours = req.headers().get(PEER_METADATA_HEADER).unwrap();
            assert_eq!(
                ours.to_str().unwrap(),
                "n=productpage-v1;ns=default;app=productpage;v=v1;c=Kubernetes"
            );
            let info = req.extensions().get::<StreamInfo>().unwrap();
            info.set_route(&route("reviews", 9080));
            info.set_upstream("10.0.0.7:9080".parse().unwrap());
            info.set_upstream_peer(id("bookinfo-reviews"));
            let body = drain(req.into_body()).await;
            let mut resp = Response::new(full(format!("{} bytes", body.len())));
            *resp.status_mut() = status;
            resp.headers_mut().insert(PEER_METADATA_HEADER, theirs);
            Ok::<_, BoxError>(resp)
        }
    })
}

#[tokio::test]
async fn outbound_records_source_reports_with_istio_labels() {
    let metrics = Arc::new(Metrics::new());
    let svc = outbound(&metrics).layer(reviews_upstream(StatusCode::OK));
    for _ in 0..3 {
        let resp = svc
            .clone()
            .oneshot(Request::new(full("hello")))
            .await
            .unwrap();
        assert!(
            !resp.headers().contains_key(PEER_METADATA_HEADER),
            "the app never sees the upstream's metadata"
        );
        assert_eq!(drain(resp.into_body()).await, "5 bytes");
    }
    assert_eq!(
        lines(&metrics, "istio_requests_total"),
        vec![concat!(
            r#"istio_requests_total{reporter="source",source_workload="productpage-v1","#,
            r#"source_canonical_service="productpage",source_canonical_revision="v1","#,
            r#"source_workload_namespace="default","#,
            r#"source_principal="spiffe://cluster.local/ns/default/sa/bookinfo-productpage","#,
            r#"source_app="productpage",source_version="v1",source_cluster="Kubernetes","#,
            r#"destination_workload="reviews-v2",destination_workload_namespace="default","#,
            r#"destination_principal="spiffe://cluster.local/ns/default/sa/bookinfo-reviews","#,
            r#"destination_app="reviews",destination_version="v2","#,
            r#"destination_service="reviews.default.svc.cluster.local","#,
            r#"destination_canonical_service="reviews",destination_canonical_revision="v2","#,
            r#"destination_service_name="reviews",destination_service_namespace="default","#,
            r#"destination_cluster="Kubernetes",request_protocol="http",response_code="200","#,
            r#"grpc_response_status="",response_flags="-",connection_security_policy="unknown"} 3"#
        )]
    );
    // Every family has the same one series; gRPC message counters have none.
    for family in [
        "istio_request_duration_milliseconds_count",
        "istio_request_bytes_count",
        "istio_response_bytes_count",
    ] {
        assert_eq!(lines(&metrics, family).len(), 1, "{family}");
        assert_eq!(
            value(&metrics, family, &[("reporter", "source")]),
            Some(3.0)
        );
    }
    assert!(lines(&metrics, "istio_request_messages_total").is_empty());
}

#[tokio::test]
async fn inbound_records_destination_reports_with_istio_labels() {
    let metrics = Arc::new(Metrics::new());
    let app = service_fn(|req: Request<_>| async move {
        assert!(
            !req.headers().contains_key(PEER_METADATA_HEADER),
            "the app never sees the caller's metadata"
        );
        drain(req.into_body()).await;
        Ok::<_, Infallible>(Response::new(full("reviews")))
    });
    let svc = inbound(&metrics).layer(app);
    for _ in 0..2 {
        let mut req = Request::builder()
            .uri("/reviews/0")
            .header("host", "reviews:9080")
            .header(
                PEER_METADATA_HEADER,
                PeerMetadata::of(&productpage()).encode().unwrap(),
            )
            .body(full(""))
            .unwrap();
        req.extensions_mut().insert(id("bookinfo-productpage"));
        let resp = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(
            resp.headers()[PEER_METADATA_HEADER],
            "n=reviews-v2;ns=default;app=reviews;v=v2;c=Kubernetes",
            "a verified mesh caller learns who answered"
        );
        drain(resp.into_body()).await;
    }
    assert_eq!(
        lines(&metrics, "istio_requests_total"),
        vec![concat!(
            r#"istio_requests_total{reporter="destination",source_workload="productpage-v1","#,
            r#"source_canonical_service="productpage",source_canonical_revision="v1","#,
            r#"source_workload_namespace="default","#,
            r#"source_principal="spiffe://cluster.local/ns/default/sa/bookinfo-productpage","#,
            r#"source_app="productpage",source_version="v1",source_cluster="Kubernetes","#,
            r#"destination_workload="reviews-v2",destination_workload_namespace="default","#,
            r#"destination_principal="spiffe://cluster.local/ns/default/sa/bookinfo-reviews","#,
            r#"destination_app="reviews",destination_version="v2","#,
            r#"destination_service="reviews.default.svc.cluster.local","#,
            r#"destination_canonical_service="reviews",destination_canonical_revision="v2","#,
            r#"destination_service_name="reviews",destination_service_namespace="default","#,
            r#"destination_cluster="Kubernetes",request_protocol="http",response_code="200","#,
            r#"grpc_response_status="",response_flags="-",connection_security_policy="mutual_tls"} 2"#
        )]
    );
}

#[tokio::test]
async fn an_authority_outside_the_registry_is_unknown() {
    let metrics = Arc::new(Metrics::new());
    let app = service_fn(|_req: Request<_>| async { Ok::<_, Infallible>(Response::new(full(""))) });
    let svc = inbound(&metrics).layer(app);
    for host in [
        "evil.example.com",
        "reviews.default.svc.cluster.local.attacker:1",
    ] {
        let req = Request::builder()
            .uri(format!("http://{host}/secret/path?q=1"))
            .body(full(""))
            .unwrap();
        drain(svc.clone().oneshot(req).await.unwrap().into_body()).await;
    }
    let text = lines(&metrics, "istio_requests_total").join("\n");
    assert!(!text.contains("evil") && !text.contains("secret") && !text.contains("attacker"));
    assert_eq!(
        value(
            &metrics,
            "istio_requests_total",
            &[
                ("destination_service", "unknown"),
                ("connection_security_policy", "none")
            ]
        ),
        Some(2.0)
    );
}

#[tokio::test]
async fn a_503_with_flags_uf_and_a_local_failure_are_recorded() {
    let metrics = Arc::new(Metrics::new());
    // A peer's local reply, passed through with its flags...
    let local_reply = service_fn(|req: Request<_>| async move {
        let info = req.extensions().get::<StreamInfo>().unwrap();
        info.set_route(&route("reviews", 9080));
        let resp = ResponseFlags::UPSTREAM_CONNECTION_FAILURE.reply("upstream connect error");
        Ok::<_, BoxError>(resp.map(|_| full("upstream connect error")))
    });
    let resp = outbound(&metrics)
        .layer(local_reply)
        .oneshot(Request::new(full("")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()[RESPONSE_FLAGS_HEADER], "UF");
    drain(resp.into_body()).await;
    // ...and a failure of the inner stack, before `LocalReply` answers it.
    let failing = service_fn(|req: Request<CountedFull>| async move {
        let info = req.extensions().get::<StreamInfo>().unwrap();
        info.set_route(&route("reviews", 9080));
        Err::<Response<FullBody>, _>(BoxError::from(ProxyError::connect_failed(
            "reviews:9080",
            "10.0.0.7:9080",
            "connection refused",
        )))
    });
    let err = outbound(&metrics)
        .layer(failing)
        .oneshot(Request::new(full("")))
        .await
        .unwrap_err();
    assert!(ProxyError::find(&err).is_some());
    assert_eq!(
        lines(&metrics, "istio_requests_total"),
        vec![format!(
            "istio_requests_total{{{}}} 2",
            labels(&[
                ("reporter", "source"),
                ("source_workload", "productpage-v1"),
                ("source_canonical_service", "productpage"),
                ("source_canonical_revision", "v1"),
                ("source_workload_namespace", "default"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
                ),
                ("source_app", "productpage"),
                ("source_version", "v1"),
                ("source_cluster", "Kubernetes"),
                ("destination_service", "reviews.default.svc.cluster.local"),
                ("destination_service_name", "reviews"),
                ("destination_service_namespace", "default"),
                ("request_protocol", "http"),
                ("response_code", "503"),
                ("grpc_response_status", ""),
                ("response_flags", "UF"),
            ])
        )]
    );
}

/// A gRPC message: flag, big-endian length, payload.
fn grpc_message(payload: &[u8]) -> Bytes {
    let mut m = vec![0u8];
    m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    m.extend_from_slice(payload);
    m.into()
}

#[tokio::test]
async fn grpc_status_comes_from_trailers_and_messages_are_counted() {
    let metrics = Arc::new(Metrics::new());
    let server = service_fn(|req: Request<_>| async move {
        assert_eq!(drain(req.into_body()).await.len(), 2 * 5 + 3 + 4);
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "14".parse().unwrap());
        // Three messages, the second split across two data frames.
        let mut second = grpc_message(b"second message").to_vec();
        let tail = second.split_off(7);
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
            Ok(Frame::data(grpc_message(b"first"))),
            Ok(Frame::data(Bytes::from(second))),
            Ok(Frame::data(Bytes::from(tail))),
            Ok(Frame::data(grpc_message(b""))),
            Ok(Frame::trailers(trailers)),
        ];
        let mut resp = Response::new(StreamBody::new(futures::stream::iter(frames)));
        resp.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        Ok::<_, Infallible>(resp)
    });
    let svc = inbound(&metrics).layer(server);
    let body: Bytes = [grpc_message(b"abc"), grpc_message(b"defg")]
        .concat()
        .into();
    let req = Request::builder()
        .uri("http://reviews:9080/reviews.Reviews/Get")
        .header("content-type", "application/grpc+proto")
        .body(full(body))
        .unwrap();
    let resp = svc.oneshot(req).await.unwrap();
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "14");
    let grpc = [
        ("request_protocol", "grpc"),
        ("response_code", "200"),
        ("grpc_response_status", "14"),
    ];
    assert_eq!(value(&metrics, "istio_requests_total", &grpc), Some(1.0));
    assert_eq!(
        value(&metrics, "istio_request_messages_total", &grpc),
        Some(2.0)
    );
    assert_eq!(
        value(&metrics, "istio_response_messages_total", &grpc),
        Some(3.0)
    );
}

#[tokio::test]
async fn grpc_status_in_a_trailers_only_response_head() {
    let metrics = Arc::new(Metrics::new());
    let server = service_fn(|_req: Request<_>| async move {
        let resp = Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "7")
            .body(full(""))
            .unwrap();
        Ok::<_, Infallible>(resp)
    });
    let req = Request::builder()
        .header("content-type", "application/grpc")
        .body(full(""))
        .unwrap();
    let resp = inbound(&metrics).layer(server).oneshot(req).await.unwrap();
    drain(resp.into_body()).await;
    assert_eq!(
        value(
            &metrics,
            "istio_requests_total",
            &[("grpc_response_status", "7")]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn byte_histograms_sum_the_bodies() {
    let metrics = Arc::new(Metrics::new());
    let svc = outbound(&metrics).layer(reviews_upstream(StatusCode::OK));
    for size in [1234usize, 766] {
        let resp = svc
            .clone()
            .oneshot(Request::new(full(vec![b'x'; size])))
            .await
            .unwrap();
        drain(resp.into_body()).await; // "1234 bytes" / "766 bytes": 10 + 9
    }
    let src = [("reporter", "source")];
    assert_eq!(
        value(&metrics, "istio_request_bytes_sum", &src),
        Some(2000.0)
    );
    assert_eq!(
        value(&metrics, "istio_request_bytes_count", &src),
        Some(2.0)
    );
    assert_eq!(
        value(&metrics, "istio_response_bytes_sum", &src),
        Some(19.0)
    );
    let bucket =
        |metric: &str, le: &str| value(&metrics, metric, &[("reporter", "source"), ("le", le)]);
    assert_eq!(bucket("istio_request_bytes_bucket", "1000"), Some(1.0));
    assert_eq!(bucket("istio_request_bytes_bucket", "10000"), Some(2.0));
    assert_eq!(bucket("istio_response_bytes_bucket", "1"), Some(0.0));
    assert_eq!(bucket("istio_response_bytes_bucket", "10"), Some(2.0));
    assert_eq!(bucket("istio_response_bytes_bucket", "+Inf"), Some(2.0));
}

/// Counts how many times the `Recorder` recorded, through the metrics.
fn recorded(metrics: &Metrics) -> f64 {
    lines(metrics, "istio_requests_total")
        .iter()
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[tokio::test]
async fn a_dropped_body_is_still_recorded_once() {
    let metrics = Arc::new(Metrics::new());
    let server = service_fn(|_req: Request<_>| async {
        // An endless stream: the caller goes away before the end.
        let chunks = futures::stream::repeat_with(|| {
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"chunk")))
        });
        Ok::<_, Infallible>(Response::new(StreamBody::new(chunks)))
    });
    let svc = inbound(&metrics).layer(server);
    let resp = svc.clone().oneshot(Request::new(full(""))).await.unwrap();
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    body.frame().await.unwrap().unwrap();
    assert_eq!(recorded(&metrics), 0.0, "nothing before the body is over");
    drop(body);
    assert_eq!(recorded(&metrics), 1.0);
    assert_eq!(
        value(
            &metrics,
            "istio_requests_total",
            &[("response_code", "200"), ("response_flags", "DC")]
        ),
        Some(1.0),
        "the caller went away: Envoy's DC"
    );
    assert_eq!(
        value(
            &metrics,
            "istio_response_bytes_sum",
            &[("response_flags", "DC")]
        ),
        Some(10.0)
    );

    // A response future dropped before any response: code 0, DC.
    let never = service_fn(|_req: Request<_>| {
        futures::future::pending::<Result<Response<FullBody>, Infallible>>()
    });
    let fut = inbound(&metrics)
        .layer(never)
        .oneshot(Request::new(full("")));
    assert!(futures::FutureExt::now_or_never(fut).is_none());
    assert_eq!(recorded(&metrics), 2.0);
    assert_eq!(
        value(
            &metrics,
            "istio_requests_total",
            &[("response_code", "0"), ("response_flags", "DC")]
        ),
        Some(1.0)
    );

    // An empty body that says so up front is complete, even if never polled.
    let empty = service_fn(|_req: Request<_>| async {
        Ok::<_, Infallible>(Response::new(http_body_util::Empty::<Bytes>::new()))
    });
    let resp = inbound(&metrics)
        .layer(empty)
        .oneshot(Request::new(full("")))
        .await
        .unwrap();
    drop(resp);
    assert_eq!(recorded(&metrics), 3.0);
    assert_eq!(
        value(
            &metrics,
            "istio_requests_total",
            &[("response_code", "200"), ("response_flags", "-")]
        ),
        Some(1.0)
    );
}

#[tokio::test(start_paused = true)]
async fn duration_runs_from_the_call_to_the_last_byte() {
    let metrics = Arc::new(Metrics::new());
    let slow = service_fn(|_req: Request<_>| async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The body's last chunk comes 50 ms after the head.
        let chunks = futures::stream::once(async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"late")))
        });
        Ok::<_, Infallible>(Response::new(StreamBody::new(chunks)))
    });
    let svc = inbound(&metrics).layer(slow);
    let resp = svc.oneshot(Request::new(full(""))).await.unwrap();
    drain(resp.into_body()).await;
    let d = "istio_request_duration_milliseconds";
    assert_eq!(value(&metrics, &format!("{d}_sum"), &[]), Some(250.0));
    assert_eq!(
        value(&metrics, &format!("{d}_bucket"), &[("le", "100")]),
        Some(0.0)
    );
    assert_eq!(
        value(&metrics, &format!("{d}_bucket"), &[("le", "250")]),
        Some(1.0)
    );
}
