//! Benchmarks for the mesh.
//!
//! Nothing is measured here yet. This crate is where the criterion micro-benchmarks (route
//! match, balancer pick, authorization, metrics record, whole stacks in-process) and the
//! end-to-end load harness (direct connection, one and two sidecar hops, HAProxy) belong.
//! Every figure quoted anywhere in the project is recorded in `benches/RESULTS.md` with the
//! command that produced it.
#![forbid(unsafe_code)]
