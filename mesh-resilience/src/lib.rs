//! Resilience layers for the mesh.
//!
//! Nothing is implemented here yet. This crate is where these belong, each as a standalone
//! tower layer configured from `VirtualService` and `DestinationRule` with Istio's defaults:
//! request and per-try timeouts, retries with a budget, backoff and replayable bodies,
//! connection-pool limits, outlier detection and local rate limiting.
#![forbid(unsafe_code)]
