//! The admin server (Istio's port 15000, loopback by default).
//!
//! - `GET /ready`: 200 once the config is loaded and every listener is bound; 503 before that
//!   and while draining (so an orchestrator stops sending traffic first).
//! - `GET /live`: 200 while the process runs.
//! - `GET /config_dump`: the effective configuration as JSON.
//! - `GET /clusters`: every balanced service (and subset) with its endpoints, named
//!   `address:port`, and their live figures (weight, in-flight, EWMA latency, health).
//! - `GET /metrics` (also `/stats/prometheus`): Istio's standard metrics from both stacks
//!   (`istio_requests_total`, ...; see `mesh_telemetry::metrics`), `process_*`, and the
//!   proxy's own: `mesh_identity_cert_expiration_timestamp_seconds` (the workload
//!   certificate's expiry), `mesh_outlier_ejections_total` and
//!   `mesh_outlier_ejected_endpoints{cluster}`. Prometheus text 0.0.4, or OpenMetrics when
//!   the scraper's `Accept` asks for it.
//!
//! - `POST /drain`: `/ready` turns 503 at once, then the proxy drains as on SIGTERM (stops
//!   accepting, lets in-flight requests finish within `terminationDrainDuration`) and the
//!   binary exits 0. A proxy embedded as a library drains when its owner awaits
//!   `RunningProxy::drain_requested`.
//! - `POST /logging?level=LEVEL`: every logger's level, by Envoy's names (`trace`, `debug`,
//!   `info`, `warning`, `error`, `critical`, `off`) or a `RUST_LOG` directive.
//! - The proxy's reloads show as `mesh_config_reloads_total{result="success"|"rejected"}` and
//!   `mesh_config_last_reload_successful`.
//! - Its connections as `mesh_downstream_connections_total{listener}` (accepted) and
//!   `mesh_downstream_connections_active{listener}` (open now).
//!
//! Reads are GET (or HEAD) and mutations POST; the wrong method answers 405, as Envoy refuses
//! mutations by GET.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use mesh_core::body::{self, BoxBody};
use tower::util::BoxCloneSyncService;

use mesh_routing::balance::Health;
use mesh_telemetry::metrics::Format;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::proxy::Shared;
use crate::server::HttpService;

/// The admin service over the proxy's shared state.
pub fn service(shared: Arc<Shared>) -> HttpService {
    BoxCloneSyncService::new(tower::service_fn(move |req: Request<BoxBody>| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(&shared, &req)) }
    }))
}

fn handle(shared: &Shared, req: &Request<BoxBody>) -> Response<BoxBody> {
    let path = req.uri().path();
    let read = matches!(
        path,
        "/ready" | "/live" | "/config_dump" | "/clusters" | "/metrics" | "/stats/prometheus"
    );
    let mutation = matches!(path, "/drain" | "/logging");
    if !read && !mutation {
        return text(
            StatusCode::NOT_FOUND,
            "unknown admin path; try /ready, /live, /config_dump, /clusters, /metrics, POST /drain, POST /logging?level=\n",
        );
    }
    if mutation {
        if req.method() != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
        }
        return mutate(shared, req);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match path {
        "/ready" if shared.is_ready() => text(StatusCode::OK, "LIVE\n"),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "NOT READY\n"),
        "/live" => text(StatusCode::OK, "LIVE\n"),
        "/clusters" => json(&shared.clusters()),
        "/metrics" | "/stats/prometheus" => metrics(shared, req),
        _ => json(&shared.config().to_json()),
    }
}

/// `POST /drain` and `POST /logging?level=`.
fn mutate(shared: &Shared, req: &Request<BoxBody>) -> Response<BoxBody> {
    if req.uri().path() == "/drain" {
        shared.request_drain();
        return text(StatusCode::OK, "draining\n");
    }
    let level = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|pair| pair.strip_prefix("level="))
            .map(str::to_owned)
    });
    let Some(level) = level else {
        return text(
            StatusCode::BAD_REQUEST,
            "missing ?level= (trace, debug, info, warning, error, critical, off)\n",
        );
    };
    match crate::logging::set_level(&level) {
        Ok(()) => text(StatusCode::OK, &format!("log level: {level}\n")),
        Err(e @ crate::logging::LogLevelError::Invalid { .. }) => {
            text(StatusCode::BAD_REQUEST, &format!("{e}\n"))
        }
        Err(e) => text(StatusCode::NOT_IMPLEMENTED, &format!("{e}\n")),
    }
}

/// `/metrics`: the telemetry registry (Istio's metrics, process metrics and the proxy's
/// own, below), as Prometheus text or OpenMetrics by the scraper's `Accept`.
fn metrics(shared: &Shared, req: &Request<BoxBody>) -> Response<BoxBody> {
    let format = Format::from_accept(req.headers().get(header::ACCEPT));
    let mut r = Response::new(body::full(shared.telemetry().metrics.encode(format)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(format.content_type()),
    );
    r
}

/// Registers the proxy's own metrics, read from its state at scrape time.
pub fn register_proxy_metrics(shared: &Arc<Shared>) {
    shared
        .telemetry()
        .metrics
        .register_collector(Box::new(ProxyCollector {
            // Weak: the registry lives inside `Shared`.
            shared: Arc::downgrade(shared),
        }));
}

/// The workload certificate's expiry, and outlier detection as Envoy counts it: ejections
/// made so far, and the endpoints of each balanced set ejected now (from the same snapshot
/// as `/clusters`).
#[derive(Debug)]
struct ProxyCollector {
    shared: std::sync::Weak<Shared>,
}

impl Collector for ProxyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(shared) = self.shared.upgrade() else {
            return Ok(());
        };
        if let Some(credentials) = shared.credentials() {
            let expiry = credentials
                .not_after()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            let gauge = Gauge::<i64>::default();
            gauge.set(expiry);
            put(
                &mut encoder,
                "mesh_identity_cert_expiration_timestamp_seconds",
                "When this workload's certificate expires, in seconds since the Unix epoch",
                &gauge,
            )?;
        }
        put(
            &mut encoder,
            "mesh_outlier_ejections",
            "Endpoints ejected by outlier detection since the proxy started",
            &ConstCounter::new(shared.health().ejections_total()),
        )?;
        let ejected = Family::<Vec<(&'static str, String)>, Gauge>::default();
        for cluster in shared.clusters() {
            let now = cluster
                .endpoints
                .iter()
                .filter(|e| e.health == Health::Ejected)
                .count();
            ejected
                .get_or_create(&vec![("cluster", cluster.name.clone())])
                .set(i64::try_from(now).unwrap_or(i64::MAX));
        }
        put(
            &mut encoder,
            "mesh_outlier_ejected_endpoints",
            "Endpoints of each balanced set (host:port/subset) ejected by outlier detection now",
            &ejected,
        )
    }
}

fn put(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn json(value: &impl serde::Serialize) -> Response<BoxBody> {
    match serde_json::to_vec_pretty(value) {
        Ok(json) => {
            let mut r = Response::new(body::full(json));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot render JSON: {e}\n"),
        ),
    }
}

fn text(status: StatusCode, msg: &str) -> Response<BoxBody> {
    let mut r = Response::new(body::full(msg.to_owned()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
