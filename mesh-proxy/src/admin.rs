//! The admin server (Istio's port 15000, loopback by default).
//!
//! - `GET /ready`: 200 once the config is loaded and every listener is bound; 503 before that
//!   and while draining (so an orchestrator stops sending traffic first).
//! - `GET /live`: 200 while the process runs.
//! - `GET /config_dump`: the effective configuration as JSON.
//! - `GET /clusters`: every balanced service (and subset) with its endpoints, named
//!   `address:port`, and their live figures (weight, in-flight, EWMA latency, health).
//! - `GET /metrics` (also `/stats/prometheus`): OpenMetrics text. Today
//!   `mesh_identity_cert_expiration_timestamp_seconds` (the workload certificate's expiry),
//!   `mesh_outlier_ejections_total` and `mesh_outlier_ejected_endpoints{cluster}`; Istio's
//!   request metrics arrive with the telemetry layers.
//!
//! Reads are GET (or HEAD); anything else answers 405, as Envoy refuses mutations by GET.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use mesh_core::body::{self, BoxBody};
use tower::util::BoxCloneSyncService;

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
    let known = matches!(
        path,
        "/ready" | "/live" | "/config_dump" | "/clusters" | "/metrics" | "/stats/prometheus"
    );
    if !known {
        return text(
            StatusCode::NOT_FOUND,
            "unknown admin path; try /ready, /live, /config_dump, /clusters, /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match path {
        "/ready" if shared.is_ready() => text(StatusCode::OK, "LIVE\n"),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "NOT READY\n"),
        "/live" => text(StatusCode::OK, "LIVE\n"),
        "/clusters" => json(&shared.clusters()),
        "/metrics" | "/stats/prometheus" => metrics(shared),
        _ => json(&shared.config().to_json()),
    }
}

/// The proxy's metrics, read at scrape time.
fn metrics(shared: &Shared) -> Response<BoxBody> {
    use prometheus_client::metrics::gauge::Gauge;
    let mut registry = prometheus_client::registry::Registry::default();
    if let Some(credentials) = shared.credentials() {
        let expiry = credentials
            .not_after()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let gauge = Gauge::<i64>::default();
        gauge.set(expiry);
        registry.register(
            "mesh_identity_cert_expiration_timestamp_seconds",
            "When this workload's certificate expires, in seconds since the Unix epoch",
            gauge,
        );
    }
    register_outlier_metrics(shared, &mut registry);
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot render metrics: {e}\n"),
        );
    }
    let mut r = Response::new(body::full(out));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    r
}

/// Outlier detection as Envoy counts it: ejections made so far, and the endpoints of each
/// balanced set ejected now (read from the same snapshot as `/clusters`).
fn register_outlier_metrics(shared: &Shared, registry: &mut prometheus_client::registry::Registry) {
    use mesh_routing::balance::Health;
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;

    registry.register(
        "mesh_outlier_ejections",
        "Endpoints ejected by outlier detection since the proxy started",
        ConstCounter::new(shared.health().ejections_total()),
    );
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
    registry.register(
        "mesh_outlier_ejected_endpoints",
        "Endpoints of each balanced set (host:port/subset) ejected by outlier detection now",
        ejected,
    );
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
