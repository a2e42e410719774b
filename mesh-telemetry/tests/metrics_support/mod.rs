//! Shared by the `metrics*` integration tests: workloads, routes, and reading the
//! rendered exposition.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use mesh_core::config::{Protocol, ServicePort};
use mesh_core::target::RouteTarget;
use mesh_core::{HostName, Identity};
use mesh_telemetry::metrics::{Format, HTTP_LABEL_NAMES, Metrics, WorkloadInfo};

pub fn productpage() -> WorkloadInfo {
    WorkloadInfo::new("productpage-v1", "default")
        .with_app("productpage")
        .with_version("v1")
        .with_principal(id("bookinfo-productpage"))
        .with_cluster("Kubernetes")
}

pub fn reviews() -> WorkloadInfo {
    WorkloadInfo::new("reviews-v2", "default")
        .with_app("reviews")
        .with_version("v2")
        .with_principal(id("bookinfo-reviews"))
        .with_cluster("Kubernetes")
}

pub fn id(sa: &str) -> Identity {
    Identity::parse(&format!("spiffe://cluster.local/ns/default/sa/{sa}")).unwrap()
}

pub fn route(host: &str, port: u16) -> RouteTarget {
    RouteTarget::new(Arc::new(ServicePort::new(
        HostName::qualify(host, "default"),
        port,
        Protocol::Http,
    )))
}

pub fn full(s: impl Into<Bytes>) -> Full<Bytes> {
    Full::new(s.into())
}

/// Reads a whole body, so the layer records.
pub async fn drain<B>(body: B) -> Bytes
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    body.collect().await.unwrap().to_bytes()
}

/// A series' label string in Istio's order: the given values, `unknown` for the rest.
pub fn labels(values: &[(&str, &str)]) -> String {
    for (name, _) in values {
        assert!(HTTP_LABEL_NAMES.contains(name), "no label {name}");
    }
    HTTP_LABEL_NAMES
        .iter()
        .map(|name| {
            let value = values
                .iter()
                .find(|(n, _)| n == name)
                .map_or("unknown", |(_, v)| v);
            format!("{name}=\"{value}\"")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The Prometheus text lines of `metric` (sample name, e.g. `istio_requests_total`).
pub fn lines(metrics: &Metrics, metric: &str) -> Vec<String> {
    let prefix = format!("{metric}{{");
    metrics
        .encode(Format::Prometheus)
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// The value of the one sample of `metric` whose labels contain every `name="value"`.
pub fn value(metrics: &Metrics, metric: &str, want: &[(&str, &str)]) -> Option<f64> {
    let hits: Vec<f64> = lines(metrics, metric)
        .iter()
        .filter(|l| {
            want.iter()
                .all(|(n, v)| l.contains(&format!("{n}=\"{v}\"")))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(hits.len() <= 1, "{metric} {want:?} matches {hits:?}");
    hits.first().copied()
}

/// The body most tests send and answer with.
pub type FullBody = Full<Bytes>;
/// What an inner service behind a metrics layer receives.
pub type CountedFull = mesh_telemetry::metrics::RequestBody<FullBody>;
