//! Helpers for this crate's examples and tests: not part of the API.

use std::sync::Arc;

use mesh_core::HostName;
use mesh_core::config::networking::{Resolution, ServiceLocation};
use mesh_core::config::{Protocol, ServicePort};
use mesh_core::target::{RetryPolicy, RouteTarget};

/// The `RouteTarget` routing would insert for `name` (`host:port`): no subset, no traffic
/// policy, no timeout, Istio's default retry policy.
pub fn route_target(name: &str) -> RouteTarget {
    let (host, port) = name.split_once(':').unwrap_or((name, "80"));
    let service = ServicePort {
        host: HostName::qualify(host, "default"),
        number: port.parse().unwrap_or(80),
        name: "http".to_string(),
        protocol: Protocol::Http,
        resolution: Resolution::Static,
        location: ServiceLocation::MeshInternal,
        endpoints: Vec::new(),
        dns_endpoints: Vec::new(),
        subject_alt_names: Vec::new(),
        service_entry: host.to_string(),
        namespace: "default".to_string(),
    };
    RouteTarget {
        service: Arc::new(service),
        subset: None,
        traffic_policy: None,
        timeout: None,
        retry: Arc::new(RetryPolicy::istio_default()),
        name: name.into(),
    }
}
