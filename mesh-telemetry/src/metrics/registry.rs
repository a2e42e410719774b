//! [`Metrics`]: the registry of Istio's standard metrics, and the scrape rendering.

use std::sync::{Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

use super::exposition::{Format, openmetrics_to_prometheus};
use super::labels::{HttpLabels, TcpLabels};
use super::process::ProcessCollector;

/// Istio's (Envoy's default) duration buckets, in milliseconds.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's size buckets, in bytes: powers of ten from 1 B to 10 MB.
pub const SIZE_BUCKETS_BYTES: [f64; 8] = [
    1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0,
];

type HttpCounter = Family<HttpLabels, Counter>;
type HttpHistogram = Family<HttpLabels, Histogram, fn() -> Histogram>;
type TcpCounter = Family<TcpLabels, Counter>;

/// The proxy's metrics: Istio's standard HTTP and TCP families, the process metrics, and
/// whatever else the proxy registers. One per proxy, shared by `Arc`.
///
/// The request path never touches the registry: layers resolve a series once and keep its
/// handles (counters and histograms share their atomics with the registry's copies). The
/// registry sits behind a mutex that only registration (at start-up) and scrapes take.
///
/// ```
/// use mesh_telemetry::metrics::{Format, Metrics};
/// use prometheus_client::metrics::counter::Counter;
///
/// let metrics = Metrics::new();
/// let reloads: Counter = Counter::default();
/// metrics.register("mesh_config_reloads", "Configuration reloads", reloads.clone());
/// reloads.inc();
/// let text = metrics.encode(Format::Prometheus);
/// assert!(text.contains("# TYPE mesh_config_reloads_total counter\nmesh_config_reloads_total 1\n"));
/// // A family is rendered once it has a series (as Envoy shows a stat once it is used).
/// assert!(!text.contains("istio_requests_total"));
/// assert!(metrics.encode(Format::OpenMetrics).ends_with("# EOF\n"));
/// ```
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    pub(crate) requests: HttpCounter,
    pub(crate) duration: HttpHistogram,
    pub(crate) request_bytes: HttpHistogram,
    pub(crate) response_bytes: HttpHistogram,
    pub(crate) request_messages: HttpCounter,
    pub(crate) response_messages: HttpCounter,
    pub(crate) tcp_sent: TcpCounter,
    pub(crate) tcp_received: TcpCounter,
    pub(crate) tcp_opened: TcpCounter,
    pub(crate) tcp_closed: TcpCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

fn size_histogram() -> Histogram {
    Histogram::new(SIZE_BUCKETS_BYTES)
}

impl Metrics {
    /// Istio's metrics and the process metrics.
    pub fn new() -> Metrics {
        let metrics = Metrics::without_process_metrics();
        metrics.register_collector(Box::new(ProcessCollector));
        metrics
    }

    /// Istio's metrics only (for an embedder that reports process metrics itself).
    pub fn without_process_metrics() -> Metrics {
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::new_with_constructor(size_histogram),
            response_bytes: Family::new_with_constructor(size_histogram),
            request_messages: Family::default(),
            response_messages: Family::default(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
        };
        // Istio's descriptions (istio.io/latest/docs/reference/config/metrics/); the
        // counters' `_total` is added by the encoder.
        m.register(
            "istio_requests",
            "Total number of requests handled by the proxy",
            m.requests.clone(),
        );
        m.register(
            "istio_request_duration_milliseconds",
            "Duration of requests, from the first request byte to the last response byte, in milliseconds",
            m.duration.clone(),
        );
        m.register(
            "istio_request_bytes",
            "HTTP request body sizes in bytes",
            m.request_bytes.clone(),
        );
        m.register(
            "istio_response_bytes",
            "HTTP response body sizes in bytes",
            m.response_bytes.clone(),
        );
        m.register(
            "istio_request_messages",
            "Number of request messages sent from the client in a gRPC stream",
            m.request_messages.clone(),
        );
        m.register(
            "istio_response_messages",
            "Number of response messages sent from the server in a gRPC stream",
            m.response_messages.clone(),
        );
        m.register(
            "istio_tcp_sent_bytes",
            "Bytes sent during the response of a TCP connection",
            m.tcp_sent.clone(),
        );
        m.register(
            "istio_tcp_received_bytes",
            "Bytes received during the request of a TCP connection",
            m.tcp_received.clone(),
        );
        m.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            m.tcp_opened.clone(),
        );
        m.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            m.tcp_closed.clone(),
        );
        m
    }

    /// Registers a metric of the proxy's own (at start-up: this takes the scrape lock).
    /// Name it as prometheus-client wants: without the `_total` a counter gets when encoded.
    pub fn register(&self, name: impl Into<String>, help: impl Into<String>, metric: impl Metric) {
        self.lock().register(name, help, metric);
    }

    /// Registers a [`Collector`], asked for its metrics on every scrape.
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.lock().register_collector(collector);
    }

    /// Renders every metric in `format` (see [`Format::from_accept`] to pick one from a
    /// scraper's `Accept`, and [`Format::content_type`] for the response).
    pub fn encode(&self, format: Format) -> String {
        let mut out = String::with_capacity(16 * 1024);
        if let Err(e) = text::encode_registry(&mut out, &self.lock()) {
            // Writing to a String cannot fail; a collector can. Serve what was written.
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        match format {
            Format::OpenMetrics => {
                out.push_str("# EOF\n");
                out
            }
            Format::Prometheus => openmetrics_to_prometheus(&out),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // Registration and encoding leave the registry consistent even if a collector
        // panicked mid-scrape, so a poisoned lock is still usable.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
