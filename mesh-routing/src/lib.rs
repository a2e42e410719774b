//! Istio traffic rules and load balancing as tower layers.
//!
//! - [`balance`]: load balancers (round robin, random, least request, peak EWMA, ring hash,
//!   Maglev) over the endpoint sets published by `mesh_core::discovery`.
//! - The route table (VirtualService matches, splits, rewrites, redirects, header operations,
//!   faults, mirroring, CORS) and the `RouteLayer` that applies it.
#![forbid(unsafe_code)]

pub mod balance;
