//! The reference sidecar: listeners, HTTP/1.1 and HTTP/2 proxying, the admin server.
//!
//! The binary (`mesh-proxy run --config FILE`) is a thin shell over [`RunningProxy`], which
//! tests and embedders start in-process:
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let config = mesh_core::config::load_files(&["mesh.yaml"])?;
//! let proxy = mesh_proxy::RunningProxy::start(std::sync::Arc::new(config)).await?;
//! println!("outbound on {:?}", proxy.outbound_addr());
//! proxy.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! The stacks are tower layers, outermost first; `docs/ARCHITECTURE.md` draws them.
#![forbid(unsafe_code)]

pub mod admin;
pub mod capture;
pub mod cli;
mod client_hello;
pub mod conn_metrics;
pub mod detect;
pub mod discovery;
pub mod gateway;
pub mod headers;
pub mod idle;
pub mod inbound;
pub mod local_reply;
pub mod logging;
pub mod outbound;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod sidecar_listeners;
pub mod tcp;
pub mod tcp_out;
pub mod telemetry;
pub mod upgrade;
pub mod upstream;
pub mod xfcc;

pub use proxy::{RunningProxy, StartError};
