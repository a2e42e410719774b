//! Istio's Bookinfo application as a mesh on loopback, without Kubernetes or Docker:
//! `cargo run --release -p examples --bin bookinfo`.
//!
//! - [`apps`]: productpage, details, reviews (v1, v2, v3) and ratings as small hyper servers;
//! - [`topology`]: the workloads, their identities and the port layout (`--port-base`);
//! - [`mesh`]: the CA, one certificate per workload, and the config files every proxy loads
//!   (Istio's Bookinfo YAML from `examples/bookinfo/config/`, plus generated ServiceEntries
//!   and Bootstraps);
//! - [`scenario`]: the routing scenarios of Istio's tasks, switched live;
//! - [`children`] and [`launcher`]: the processes (each app and each `mesh-proxy`, the
//!   ingress gateway among them, is a child process of the launcher) and the launcher itself.

pub mod apps;
pub mod children;
pub mod launcher;
pub mod mesh;
pub mod scenario;
pub mod topology;
