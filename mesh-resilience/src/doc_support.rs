//! Helpers for this crate's examples and tests: not part of the API.

use std::sync::Arc;

use mesh_core::HostName;
use mesh_core::config::{Protocol, ServicePort};
use mesh_core::target::RouteTarget;

/// The `RouteTarget` routing would insert for `name` (`host:port`): no subset, no traffic
/// policy, no timeout, Istio's default retry policy; named `name` as written.
pub fn route_target(name: &str) -> RouteTarget {
    let (host, port) = name.split_once(':').unwrap_or((name, "80"));
    let service = ServicePort::new(
        HostName::qualify(host, "default"),
        port.parse().unwrap_or(80),
        Protocol::Http,
    );
    RouteTarget {
        name: name.into(),
        ..RouteTarget::new(Arc::new(service))
    }
}
