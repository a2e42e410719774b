//! The scrape: Prometheus text and OpenMetrics renderings, process metrics, TCP metrics,
//! and the proxy's own metrics registered beside Istio's.
#![cfg(feature = "metrics")]
#![allow(clippy::unwrap_used)]

mod metrics_support;

use std::sync::Arc;

use http::Request;
use mesh_core::ResponseFlags;
use mesh_telemetry::metrics::{
    Format, Metrics, MetricsLayer, OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE, Reporter,
    SecurityPolicy, TcpConnection, TcpMetrics,
};
use metrics_support::*;
use prometheus_client::metrics::gauge::Gauge;
use tower::{Layer, ServiceExt, service_fn};

/// An HTTP request, a gRPC request and a TCP connection, so every family has a series
/// (families without one are not rendered).
async fn some_traffic(metrics: &Arc<Metrics>) {
    let app = service_fn(|_req: Request<CountedFull>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(full("ok")))
    });
    let svc = MetricsLayer::inbound(
        metrics.clone(),
        Arc::new(reviews()),
        Arc::new(|_: &str| None),
    )
    .layer(app);
    for content_type in ["text/plain", "application/grpc"] {
        let req = Request::builder()
            .header("content-type", content_type)
            .body(full("hi"))
            .unwrap();
        drain(svc.clone().oneshot(req).await.unwrap().into_body()).await;
    }
    TcpMetrics::new(metrics.clone(), &reviews())
        .connection(TcpConnection::new(Reporter::Destination))
        .opened();
}

/// Every `# TYPE` line: (name, type).
fn types(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (n, t) = l.split_once(' ').unwrap();
            (n.to_string(), t.to_string())
        })
        .collect()
}

#[tokio::test]
async fn prometheus_text_and_openmetrics_name_families_as_each_expects() {
    let metrics = Arc::new(Metrics::new());
    some_traffic(&metrics).await;
    let prom = metrics.encode(Format::Prometheus);
    let om = metrics.encode(Format::OpenMetrics);

    let prom_types = types(&prom);
    for (name, kind) in [
        ("istio_requests_total", "counter"),
        ("istio_request_duration_milliseconds", "histogram"),
        ("istio_request_bytes", "histogram"),
        ("istio_response_bytes", "histogram"),
        ("istio_request_messages_total", "counter"),
        ("istio_response_messages_total", "counter"),
        ("istio_tcp_sent_bytes_total", "counter"),
        ("istio_tcp_received_bytes_total", "counter"),
        ("istio_tcp_connections_opened_total", "counter"),
        ("istio_tcp_connections_closed_total", "counter"),
        ("process_cpu_seconds_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
    ] {
        assert!(
            prom_types.contains(&(name.to_string(), kind.to_string())),
            "Prometheus text lacks # TYPE {name} {kind}:\n{prom}"
        );
    }
    assert!(
        prom.contains(
            "# HELP istio_requests_total Total number of requests handled by the proxy.\n"
        )
    );
    assert!(!prom.contains("# EOF"));

    // OpenMetrics names the counter family without `_total`, and ends with EOF.
    let om_types = types(&om);
    assert!(om_types.contains(&("istio_requests".into(), "counter".into())));
    assert!(om_types.contains(&("process_cpu_seconds".into(), "counter".into())));
    assert!(om.ends_with("# EOF\n"));
    assert_eq!(om.matches("# EOF").count(), 1);

    // The samples are the same in both, but for how whole bucket bounds print: as Envoy
    // and client_golang in Prometheus text, as OpenMetrics' canonical floats in OpenMetrics.
    let samples = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| l.starts_with("istio_"))
            .map(|l| l.replace(".0\"", "\""))
            .collect()
    };
    assert_eq!(samples(&prom), samples(&om));
    assert!(prom.contains("istio_request_duration_milliseconds_bucket{le=\"0.5\","));
    assert!(prom.contains("istio_request_duration_milliseconds_bucket{le=\"3600000\","));
    assert!(om.contains("istio_request_duration_milliseconds_bucket{le=\"3600000.0\","));
    assert!(
        samples(&prom)
            .iter()
            .any(|l| l.starts_with("istio_requests_total{reporter=\"destination\""))
    );

    assert_eq!(Format::Prometheus.content_type(), PROMETHEUS_CONTENT_TYPE);
    assert_eq!(Format::OpenMetrics.content_type(), OPENMETRICS_CONTENT_TYPE);
}

#[tokio::test]
async fn process_metrics_are_plausible() {
    let metrics = Metrics::new();
    let text = metrics.encode(Format::Prometheus);
    let sample = |name: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    if cfg!(target_os = "linux") {
        let rss = sample("process_resident_memory_bytes");
        assert!(rss > 1e6 && rss < 1e11, "rss {rss}");
        assert!(sample("process_virtual_memory_bytes") >= rss);
        assert!(sample("process_open_fds") >= 3.0);
        assert!(sample("process_max_fds") >= sample("process_open_fds"));
        let cpu = sample("process_cpu_seconds_total");
        assert!((0.0..1e6).contains(&cpu), "cpu {cpu}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = sample("process_start_time_seconds");
        assert!(
            start > now - 86_400.0 && start <= now + 1.0,
            "start {start}, now {now}"
        );
    }
    // Without the collector, none.
    let bare = Metrics::without_process_metrics().encode(Format::Prometheus);
    assert!(!bare.contains("process_"));
}

#[tokio::test]
async fn the_proxy_registers_its_own_metrics() {
    let metrics = Metrics::new();
    let ready: Gauge = Gauge::default();
    metrics.register("mesh_ready", "Whether the proxy is ready", ready.clone());
    ready.set(1);
    let text = metrics.encode(Format::Prometheus);
    assert!(text.contains(
        "# HELP mesh_ready Whether the proxy is ready.\n# TYPE mesh_ready gauge\nmesh_ready 1\n"
    ));
}

#[tokio::test]
async fn tcp_connections_are_counted_with_istio_labels() {
    let metrics = Arc::new(Metrics::new());
    let tcp = TcpMetrics::new(metrics.clone(), &productpage());
    {
        let mut conn = tcp.connection(TcpConnection {
            peer: Some(id("bookinfo-ratings")),
            destination_service: Some("mysql.db.svc.cluster.local".into()),
            ..TcpConnection::new(Reporter::Source)
        });
        conn.opened();
        conn.opened(); // once
        conn.add_sent(100);
        conn.add_received(2500);
        conn.add_sent(20);
    } // dropped: closed
    let mut failed = tcp.connection(TcpConnection {
        destination_service: Some("mysql.db.svc.cluster.local".into()),
        response_flags: ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
        ..TcpConnection::new(Reporter::Source)
    });
    failed.opened();
    failed.closed();
    failed.closed(); // once
    drop(failed);
    // Never opened: never counted closed either.
    drop(tcp.connection(TcpConnection::new(Reporter::Source)));

    let labels = concat!(
        r#"reporter="source",source_workload="productpage-v1","#,
        r#"source_canonical_service="productpage",source_canonical_revision="v1","#,
        r#"source_workload_namespace="default","#,
        r#"source_principal="spiffe://cluster.local/ns/default/sa/bookinfo-productpage","#,
        r#"source_app="productpage",source_version="v1",source_cluster="Kubernetes","#,
        r#"destination_workload="unknown",destination_workload_namespace="unknown","#,
        r#"destination_principal="spiffe://cluster.local/ns/default/sa/bookinfo-ratings","#,
        r#"destination_app="unknown",destination_version="unknown","#,
        r#"destination_service="mysql.db.svc.cluster.local","#,
        r#"destination_canonical_service="unknown",destination_canonical_revision="unknown","#,
        r#"destination_service_name="mysql",destination_service_namespace="db","#,
        r#"destination_cluster="unknown",request_protocol="tcp",response_flags="-","#,
        r#"connection_security_policy="unknown""#
    );
    // Each connection's series exist from its creation (at zero until counted).
    let sent = lines(&metrics, "istio_tcp_sent_bytes_total");
    assert_eq!(sent.len(), 3, "{sent:#?}");
    assert!(sent.contains(&format!("istio_tcp_sent_bytes_total{{{labels}}} 120")));
    assert!(
        lines(&metrics, "istio_tcp_received_bytes_total")
            .contains(&format!("istio_tcp_received_bytes_total{{{labels}}} 2500"))
    );
    let opened = lines(&metrics, "istio_tcp_connections_opened_total");
    assert!(opened.contains(&format!("istio_tcp_connections_opened_total{{{labels}}} 1")));
    assert!(
        opened
            .iter()
            .any(|l| l.contains(r#"response_flags="UF""#) && l.ends_with(" 1"))
    );
    let closed = lines(&metrics, "istio_tcp_connections_closed_total");
    assert!(closed.contains(&format!("istio_tcp_connections_closed_total{{{labels}}} 1")));
    assert!(
        closed
            .iter()
            .any(|l| l.contains(r#"response_flags="UF""#) && l.ends_with(" 1"))
    );
    assert!(
        closed
            .iter()
            .any(|l| l.contains(r#"destination_service="unknown""#) && l.ends_with(" 0")),
        "{closed:#?}"
    );

    // The destination side, over mTLS.
    let server = TcpMetrics::new(metrics.clone(), &reviews());
    let mut conn = server.connection(TcpConnection {
        peer: Some(id("bookinfo-productpage")),
        security: SecurityPolicy::MutualTls,
        ..TcpConnection::new(Reporter::Destination)
    });
    conn.opened();
    let opened = lines(&metrics, "istio_tcp_connections_opened_total");
    let line = opened
        .iter()
        .find(|l| l.contains(r#"reporter="destination""#))
        .unwrap();
    for part in [
        r#"source_workload="unknown","#,
        r#"source_principal="spiffe://cluster.local/ns/default/sa/bookinfo-productpage","#,
        r#"destination_workload="reviews-v2","#,
        r#"connection_security_policy="mutual_tls"} 1"#,
    ] {
        assert!(line.contains(part), "{part} not in {line}");
    }
}
