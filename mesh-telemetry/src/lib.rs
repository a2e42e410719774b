//! Telemetry for the mesh, as tower layers: Prometheus metrics with Istio's standard names
//! and labels, OpenTelemetry traces with W3C and B3 propagation and OTLP export, and access
//! logs in Istio's text format or JSON.
//!
//! The layers sit outermost in a sidecar's stacks (access log → metrics → trace span → the
//! rest). What inner layers decide — the route, the endpoint that answered, its identity —
//! reaches them through [`mesh_core::stream_info::StreamInfo`]. Each layer works alone;
//! [`combined::TelemetryLayer`] runs the three as one (one future, one response body
//! wrapper) for a stack that has them all.
#![forbid(unsafe_code)]

#[cfg(feature = "access-log")]
pub mod access_log;
#[cfg(all(feature = "metrics", feature = "trace", feature = "access-log"))]
pub mod combined;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(feature = "trace")]
pub mod trace;
