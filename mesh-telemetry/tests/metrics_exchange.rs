//! The peer metadata exchange: trusted only from verified peers, always stripped, bounded.
#![cfg(feature = "metrics")]
#![allow(clippy::unwrap_used)]

mod metrics_support;

use std::convert::Infallible;
use std::sync::Arc;

use http::{HeaderValue, Request, Response};
use mesh_core::body::BoxError;
use mesh_core::stream_info::StreamInfo;
use mesh_telemetry::metrics::{Metrics, MetricsLayer, PEER_METADATA_HEADER, PeerMetadata};
use metrics_support::*;
use tower::{Layer, ServiceExt, service_fn};

/// The inbound side of reviews, over an app that asserts it never sees the header (and
/// tries to spoof one on its response).
async fn call_inbound(
    metrics: &Arc<Metrics>,
    header: Option<HeaderValue>,
    verified: bool,
) -> Response<mesh_telemetry::metrics::ResponseBody<FullBody>> {
    let app = service_fn(|req: Request<CountedFull>| async move {
        assert!(!req.headers().contains_key(PEER_METADATA_HEADER));
        let mut resp = Response::new(full("ok"));
        resp.headers_mut()
            .insert(PEER_METADATA_HEADER, HeaderValue::from_static("n=spoofed"));
        Ok::<_, Infallible>(resp)
    });
    let resolver = Arc::new(|_: &str| None);
    let svc = MetricsLayer::inbound(metrics.clone(), Arc::new(reviews()), resolver).layer(app);
    let mut req = Request::new(full(""));
    if let Some(h) = header {
        req.headers_mut().insert(PEER_METADATA_HEADER, h);
    }
    if verified {
        req.extensions_mut().insert(id("bookinfo-productpage"));
    }
    svc.oneshot(req).await.unwrap()
}

fn productpage_header() -> HeaderValue {
    PeerMetadata::of(&productpage()).encode().unwrap()
}

#[tokio::test]
async fn inbound_trusts_the_header_only_with_a_verified_identity() {
    // Verified: labels filled, our header sent back (the app's spoof replaced).
    let metrics = Arc::new(Metrics::new());
    let resp = call_inbound(&metrics, Some(productpage_header()), true).await;
    assert_eq!(
        resp.headers()[PEER_METADATA_HEADER],
        "n=reviews-v2;ns=default;app=reviews;v=v2;c=Kubernetes"
    );
    drain(resp.into_body()).await;
    let want = [
        ("source_workload", "productpage-v1"),
        ("source_app", "productpage"),
        ("source_version", "v1"),
        ("source_cluster", "Kubernetes"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
        ),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(value(&metrics, "istio_requests_total", &want), Some(1.0));

    // Plain text: stripped before the app, ignored, nothing sent back.
    let metrics = Arc::new(Metrics::new());
    let resp = call_inbound(&metrics, Some(productpage_header()), false).await;
    assert!(!resp.headers().contains_key(PEER_METADATA_HEADER));
    drain(resp.into_body()).await;
    let want = [
        ("source_workload", "unknown"),
        ("source_canonical_service", "unknown"),
        ("source_canonical_revision", "unknown"),
        ("source_workload_namespace", "unknown"),
        ("source_principal", "unknown"),
        ("source_app", "unknown"),
        ("source_cluster", "unknown"),
        ("destination_workload", "reviews-v2"),
        ("connection_security_policy", "none"),
    ];
    assert_eq!(value(&metrics, "istio_requests_total", &want), Some(1.0));

    // Verified but silent (a client without a sidecar of ours): principal only, and it
    // does not learn our metadata.
    let metrics = Arc::new(Metrics::new());
    let resp = call_inbound(&metrics, None, true).await;
    assert!(!resp.headers().contains_key(PEER_METADATA_HEADER));
    drain(resp.into_body()).await;
    let want = [
        ("source_workload", "unknown"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
        ),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(value(&metrics, "istio_requests_total", &want), Some(1.0));
}

#[tokio::test]
async fn hostile_headers_are_rejected_and_labelled_unknown() {
    let too_long = format!("n={}", "a".repeat(2000));
    let long_name = format!("n={}", "a".repeat(254));
    let hostile: Vec<HeaderValue> = vec![
        HeaderValue::from_str(&too_long).unwrap(),
        HeaderValue::from_str(&long_name).unwrap(),
        HeaderValue::from_static("n=evil\"} 1 istio_requests_total{x=\"y"),
        HeaderValue::from_static("n=a b;ns=default"),
        HeaderValue::from_static("n=a;n=b"),
        HeaderValue::from_static(";;;;==;="),
        HeaderValue::from_static("garbage"),
        HeaderValue::from_static(""),
        HeaderValue::from_bytes(b"n=\xc3\xa9t\xc3\xa9").unwrap(),
        HeaderValue::from_bytes(b"n=a;app=\x80\tx").unwrap(),
    ];
    let metrics = Arc::new(Metrics::new());
    for header in hostile {
        let resp = call_inbound(&metrics, Some(header), true).await;
        drain(resp.into_body()).await;
    }
    let text = lines(&metrics, "istio_requests_total");
    assert_eq!(text.len(), 1, "{text:#?}");
    assert_eq!(
        value(
            &metrics,
            "istio_requests_total",
            &[("source_workload", "unknown"), ("source_app", "unknown")]
        ),
        Some(10.0)
    );
}

/// Productpage's outbound side over a stand-in for the rest of its stack that answers with
/// `theirs` as the upstream sidecar's header, over a verified connection or not.
async fn call_outbound(metrics: &Arc<Metrics>, theirs: HeaderValue, verified: bool) {
    let upstream = service_fn(move |req: Request<CountedFull>| {
        let theirs = theirs.clone();
        async move {
            assert!(req.headers().contains_key(PEER_METADATA_HEADER));
            let info = req.extensions().get::<StreamInfo>().unwrap();
            info.set_route(&route("reviews", 9080));
            info.set_upstream("10.0.0.7:9080".parse().unwrap());
            if verified {
                info.set_upstream_peer(id("bookinfo-reviews"));
            }
            let mut resp = Response::new(full("ok"));
            resp.headers_mut().insert(PEER_METADATA_HEADER, theirs);
            Ok::<_, BoxError>(resp)
        }
    });
    let svc = MetricsLayer::outbound(metrics.clone(), Arc::new(productpage())).layer(upstream);
    // The app tries to impersonate another workload: replaced by ours.
    let mut req = Request::new(full(""));
    req.headers_mut()
        .insert(PEER_METADATA_HEADER, HeaderValue::from_static("n=impostor"));
    let resp = svc.oneshot(req).await.unwrap();
    assert!(
        !resp.headers().contains_key(PEER_METADATA_HEADER),
        "the app never sees the upstream's metadata"
    );
    drain(resp.into_body()).await;
}

#[tokio::test]
async fn outbound_trusts_the_header_only_from_a_verified_upstream() {
    let reviews = PeerMetadata::of(&reviews()).encode().unwrap();

    let metrics = Arc::new(Metrics::new());
    call_outbound(&metrics, reviews.clone(), true).await;
    let want = [
        ("destination_workload", "reviews-v2"),
        ("destination_app", "reviews"),
        ("destination_canonical_revision", "v2"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/default/sa/bookinfo-reviews",
        ),
    ];
    assert_eq!(value(&metrics, "istio_requests_total", &want), Some(1.0));

    let metrics = Arc::new(Metrics::new());
    call_outbound(&metrics, reviews, false).await;
    let want = [
        ("destination_workload", "unknown"),
        ("destination_app", "unknown"),
        ("destination_principal", "unknown"),
        ("destination_service", "reviews.default.svc.cluster.local"),
    ];
    assert_eq!(value(&metrics, "istio_requests_total", &want), Some(1.0));

    let metrics = Arc::new(Metrics::new());
    call_outbound(&metrics, HeaderValue::from_static("n=x;ns=\"bad\""), true).await;
    let want = [
        ("destination_workload", "unknown"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/default/sa/bookinfo-reviews",
        ),
    ];
    assert_eq!(value(&metrics, "istio_requests_total", &want), Some(1.0));
}
