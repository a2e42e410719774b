//! The vocabulary of the mesh, shared by every other crate.
//!
//! - [`identity`]: SPIFFE workload identities and Istio's principal form.
//! - [`labels`], [`endpoint`], [`host`]: who serves a service, and how hosts are named.
//! - [`flags`]: Envoy's response flags, the reason behind every locally generated response.
//! - [`body`]: the body type every layer speaks.
//! - [`error`]: [`ProxyError`], a failure the proxy answers for itself; [`conn`]: what a
//!   listener knows about the client connection.
//! - [`config`]: Istio's resources, loaded from YAML, validated and compiled into one
//!   immutable snapshot ([`config::MeshConfig`]).
//! - [`discovery`]: endpoint sets of a service as values that change over time.
//! - [`health`]: outlier-detection state per endpoint, written by resilience, read by the
//!   balancer.
//! - [`target`]: what routing and balancing decide for a request ([`target::RouteTarget`],
//!   [`target::UpstreamTarget`]) and the compiled retry policy routes hand to resilience.
//! - [`stream_info`]: what inner layers learn about a request (route, endpoint, its identity)
//!   for the telemetry layers above them.
#![forbid(unsafe_code)]

pub mod body;
pub mod config;
pub mod conn;
pub mod discovery;
pub mod endpoint;
pub mod error;
pub mod flags;
pub mod health;
pub mod host;
pub mod identity;
pub mod labels;
pub mod net;
pub mod stream_info;
pub mod target;

pub use endpoint::Endpoint;
pub use error::ProxyError;
pub use flags::ResponseFlags;
pub use host::HostName;
pub use identity::Identity;
pub use labels::Labels;
