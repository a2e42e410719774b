//! Istio traffic rules and load balancing as tower layers.
//!
//! Routing between two in-process services by header, with no proxy: a VirtualService sends
//! `x-canary: yes` to `shop-canary`, everything else to `shop`; the inner service dispatches
//! on the [`RouteTarget`](mesh_core::target::RouteTarget) the [`RouteLayer`] chose.
//!
//! ```
//! use std::sync::Arc;
//!
//! use arc_swap::ArcSwap;
//! use http::{Request, Response};
//! use mesh_core::body::{self, BoxBody, BoxError};
//! use mesh_core::config::{Source, load_sources};
//! use mesh_core::target::RouteTarget;
//! use mesh_routing::{RouteLayer, RouteTable, SourceContext};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), BoxError> {
//! let config = load_sources(&[Source::new("shop.yaml", r#"
//! apiVersion: networking.istio.io/v1
//! kind: ServiceEntry
//! metadata: { name: shop }
//! spec:
//!   hosts: [shop, shop-canary]
//!   ports: [{ number: 80, name: http }]
//! ---
//! apiVersion: networking.istio.io/v1
//! kind: VirtualService
//! metadata: { name: shop }
//! spec:
//!   hosts: [shop]
//!   http:
//!   - match: [{ headers: { x-canary: { exact: "yes" } } }]
//!     route: [{ destination: { host: shop-canary } }]
//!   - route: [{ destination: { host: shop } }]
//! "#)])?;
//! let table = RouteTable::build(&config, &SourceContext::from_config(&config));
//! let table = Arc::new(ArcSwap::from_pointee(table));
//!
//! // Two "services" behind one tower service: it answers with the host routing chose.
//! let services = service_fn(|req: Request<BoxBody>| async move {
//!     let target = req.extensions().get::<RouteTarget>().expect("routed");
//!     let answer = match target.service.host.as_str() {
//!         "shop-canary.default.svc.cluster.local" => "canary",
//!         _ => "stable",
//!     };
//!     Ok::<_, BoxError>(Response::new(body::full(answer)))
//! });
//! let routed = RouteLayer::new(table.clone()).layer(services);
//!
//! let ask = |canary: bool| {
//!     let mut req = Request::get("/cart").header("host", "shop");
//!     if canary {
//!         req = req.header("x-canary", "yes");
//!     }
//!     req.body(body::empty()).expect("request")
//! };
//! use http_body_util::BodyExt;
//! let answer = routed.clone().oneshot(ask(true)).await?.into_body().collect().await?;
//! assert_eq!(answer.to_bytes(), "canary");
//! let answer = routed.clone().oneshot(ask(false)).await?.into_body().collect().await?;
//! assert_eq!(answer.to_bytes(), "stable");
//! # Ok(()) }
//! ```
//!
//! - [`RouteTable`]: built from a [`MeshConfig`](mesh_core::config::MeshConfig) and a
//!   [`SourceContext`] (who this proxy is): per host and port, the ordered HTTP routes with
//!   Istio's match semantics (uri, headers, query parameters, authority, scheme, method,
//!   `withoutHeaders`, `ignoreUriCase`; `port` and source conditions resolved at build),
//!   weighted destinations resolved to `RouteTarget`s with subsets and merged traffic
//!   policies, and each route's actions; and per service port the VirtualService `tcp`
//!   routes for opaque TCP connections ([`RouteTable::select_tcp`]).
//! - [`RouteLayer`]: applies the current table (through an `ArcSwap`) to each request:
//!   CORS, fault injection, redirects, direct responses, rewrites, header operations,
//!   mirroring; hands the chosen `RouteTarget` (with timeout and retry policy) down as a
//!   request extension.
//! - [`balance`]: load balancers (round robin, random, least request, peak EWMA, ring hash,
//!   Maglev) over the endpoint sets published by `mesh_core::discovery`.
#![forbid(unsafe_code)]

pub mod balance;

mod authority;
mod cors;
mod delegate;
mod destination;
mod direct;
mod fault;
mod fraction;
mod headers;
mod layer;
mod matcher;
mod merge;
mod mirror;
mod policy;
mod redirect;
mod rewrite;
mod route;
mod scope;
mod table;
mod tcp;

pub use authority::request_authority;
pub use layer::{ResponseFuture, Route, RouteLayer};
pub use mirror::{DEFAULT_MIRROR_TIMEOUT, SHADOW_BUFFER_FRAMES};
pub use scope::HostPattern;
pub use table::{RouteTable, Selection, SourceContext};
