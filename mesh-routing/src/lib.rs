//! Istio traffic rules as tower layers.
//!
//! Nothing is implemented here yet: the foundation proxy picks a service by `Host` and
//! round-robins over its endpoints. This crate is where these belong:
//!
//! - a `RouteTable` compiled from `VirtualService`, `DestinationRule` and `ServiceEntry`
//!   (matches, weighted splits, subsets, rewrites, redirects, header operations, fault
//!   injection, mirroring, CORS), read by a `RouteLayer` through a lock-free swap;
//! - the load balancers (round robin, random, least request, peak EWMA, ring hash, Maglev)
//!   over the endpoint sets published by `mesh_core::discovery`.
#![forbid(unsafe_code)]
