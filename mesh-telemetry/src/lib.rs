//! Telemetry for the mesh.
//!
//! Nothing is implemented here yet. This crate is where these belong, as tower layers:
//! Prometheus metrics with Istio's standard names and labels (`istio_requests_total`, ...),
//! OpenTelemetry traces with W3C and B3 propagation and OTLP export, and access logs in
//! Istio's text format or JSON.
#![forbid(unsafe_code)]
