//! The configuration model: Istio's resources (plus this proxy's `Bootstrap`) loaded from
//! multi-document YAML, validated, and compiled into one immutable [`MeshConfig`] snapshot.
//!
//! ```no_run
//! use mesh_core::config::{self, MeshConfig};
//! use std::sync::Arc;
//!
//! let config: Arc<MeshConfig> = match config::load_files(&["mesh.yaml"]) {
//!     Ok(config) => Arc::new(config),
//!     Err(errors) => {
//!         eprintln!("{errors}"); // one line per error: file, document, field path, line
//!         std::process::exit(1);
//!     }
//! };
//! let admin = config.bootstrap().map(|b| b.admin_listen());
//! if let Some(port) = config.services().lookup("reviews", 9080) {
//!     println!("{} has {} endpoints", port.host, port.endpoints.len());
//! }
//! # let _ = admin;
//! ```
//!
//! Why it is shaped this way:
//! - Users write Istio's YAML, so the types mirror Istio's schema field for field (camelCase,
//!   upper-case enums) and reject unknown fields: a typo is an error with a file, document,
//!   field path and line, not a silently ignored setting.
//! - Everything checkable once is checked at load: regexes are compiled, durations parsed,
//!   hosts qualified (`reviews` in namespace `default` is `reviews.default.svc.cluster.local`
//!   everywhere a host is owned or routed to), and the [`ServiceRegistry`] indexes every name a
//!   client may use, so the request path only does lookups.
//! - A configuration is all or nothing: [`load_sources`] returns every error it finds, and
//!   any error rejects the whole set, so a reload never half-applies.
//! - YAML parsing lives behind the private `yaml` module, so the YAML library can be swapped.

pub mod bootstrap;
mod error;
mod load;
pub mod networking;
pub mod registry;
pub mod security;
pub mod types;
mod validate;
mod yaml;

use serde::Serialize;
use serde_json::Value;

pub use bootstrap::Bootstrap;
pub use error::{ConfigError, ConfigErrors};
pub use load::{
    KeyedSource, Kind, Layered, ResourceId, Source, load_files, load_layered, load_sources,
    split_resources,
};
pub use networking::{
    DestinationRule, Gateway, Resolution, ServiceEntry, Sidecar, VirtualService, WorkloadEntry,
};
pub use registry::{DnsEndpoint, ServicePort, ServiceRegistry, exported_to};
pub use security::{AuthorizationPolicy, PeerAuthentication};
pub use types::{Duration, Metadata, Origin, Percent, PortNumber, Protocol, Resource, StringMatch};

/// The validated resources of a configuration, by kind, in load order.
#[derive(Clone, Debug, Default)]
pub(crate) struct Resources {
    /// At most one (validated).
    bootstraps: Vec<Bootstrap>,
    virtual_services: Vec<VirtualService>,
    destination_rules: Vec<DestinationRule>,
    service_entries: Vec<ServiceEntry>,
    workload_entries: Vec<WorkloadEntry>,
    gateways: Vec<Gateway>,
    sidecars: Vec<Sidecar>,
    peer_authentications: Vec<PeerAuthentication>,
    authorization_policies: Vec<AuthorizationPolicy>,
}

impl Resources {
    /// Every resource's (kind, namespace, name) and where it came from.
    fn ids(&self) -> Vec<((Kind, String, String), Origin)> {
        fn of<S>(
            kind: Kind,
            resources: &[Resource<S>],
        ) -> impl Iterator<Item = ((Kind, String, String), Origin)> + '_ {
            resources.iter().map(move |r| {
                (
                    (kind, r.metadata.namespace.clone(), r.metadata.name.clone()),
                    r.origin.clone(),
                )
            })
        }
        of(Kind::Bootstrap, &self.bootstraps)
            .chain(of(Kind::VirtualService, &self.virtual_services))
            .chain(of(Kind::DestinationRule, &self.destination_rules))
            .chain(of(Kind::ServiceEntry, &self.service_entries))
            .chain(of(Kind::WorkloadEntry, &self.workload_entries))
            .chain(of(Kind::Gateway, &self.gateways))
            .chain(of(Kind::Sidecar, &self.sidecars))
            .chain(of(Kind::PeerAuthentication, &self.peer_authentications))
            .chain(of(Kind::AuthorizationPolicy, &self.authorization_policies))
            .collect()
    }
}

/// One immutable, validated configuration snapshot. Build it with [`load_files`] or
/// [`load_sources`]; share it as `Arc<MeshConfig>` and swap the `Arc` on reload.
///
/// Every resource keeps its [`Origin`] (file and document) and has its hosts qualified in its
/// namespace.
#[derive(Clone, Debug, Default)]
pub struct MeshConfig {
    resources: Resources,
    services: ServiceRegistry,
}

impl MeshConfig {
    /// This proxy's settings, if the configuration has a `Bootstrap`.
    pub fn bootstrap(&self) -> Option<&Bootstrap> {
        self.resources.bootstraps.first()
    }

    /// The namespace this proxy lives in (the Bootstrap's), where short names resolve.
    pub fn proxy_namespace(&self) -> &str {
        self.services.namespace()
    }

    pub fn virtual_services(&self) -> &[VirtualService] {
        &self.resources.virtual_services
    }

    pub fn destination_rules(&self) -> &[DestinationRule] {
        &self.resources.destination_rules
    }

    pub fn service_entries(&self) -> &[ServiceEntry] {
        &self.resources.service_entries
    }

    pub fn workload_entries(&self) -> &[WorkloadEntry] {
        &self.resources.workload_entries
    }

    pub fn gateways(&self) -> &[Gateway] {
        &self.resources.gateways
    }

    pub fn sidecars(&self) -> &[Sidecar] {
        &self.resources.sidecars
    }

    pub fn peer_authentications(&self) -> &[PeerAuthentication] {
        &self.resources.peer_authentications
    }

    pub fn authorization_policies(&self) -> &[AuthorizationPolicy] {
        &self.resources.authorization_policies
    }

    /// How many resources the snapshot holds, of every kind.
    pub fn resource_count(&self) -> usize {
        let r = &self.resources;
        usize::from(self.bootstrap().is_some())
            + r.virtual_services.len()
            + r.destination_rules.len()
            + r.service_entries.len()
            + r.workload_entries.len()
            + r.gateways.len()
            + r.sidecars.len()
            + r.peer_authentications.len()
            + r.authorization_policies.len()
    }

    /// The services of the mesh as this proxy sees them.
    pub fn services(&self) -> &ServiceRegistry {
        &self.services
    }

    /// The effective configuration for the admin `/config_dump`: resources grouped by kind
    /// (each with its `origin`), then the compiled service registry under `"services"`.
    /// Unset fields (nulls, empty lists and maps) are left out.
    pub fn to_json(&self) -> Value {
        #[derive(Serialize)]
        struct Dumped<'a, S> {
            origin: &'a Origin,
            #[serde(flatten)]
            resource: &'a Resource<S>,
        }
        fn dump<S: Serialize>(resources: &[Resource<S>]) -> Value {
            let entries: Vec<Dumped<'_, S>> = resources
                .iter()
                .map(|resource| Dumped {
                    origin: &resource.origin,
                    resource,
                })
                .collect();
            serde_json::to_value(entries).unwrap_or_else(|e| Value::String(e.to_string()))
        }
        let r = &self.resources;
        let mut out = serde_json::Map::new();
        let groups = [
            (Kind::Bootstrap, dump(&r.bootstraps)),
            (Kind::VirtualService, dump(&r.virtual_services)),
            (Kind::DestinationRule, dump(&r.destination_rules)),
            (Kind::ServiceEntry, dump(&r.service_entries)),
            (Kind::WorkloadEntry, dump(&r.workload_entries)),
            (Kind::Gateway, dump(&r.gateways)),
            (Kind::Sidecar, dump(&r.sidecars)),
            (Kind::PeerAuthentication, dump(&r.peer_authentications)),
            (Kind::AuthorizationPolicy, dump(&r.authorization_policies)),
        ];
        let services = serde_json::to_value(self.services.iter().collect::<Vec<_>>())
            .unwrap_or_else(|e| Value::String(e.to_string()));
        let groups = groups.map(|(kind, v)| (kind.as_str(), v));
        for (key, mut value) in groups.into_iter().chain([("services", services)]) {
            prune(&mut value);
            out.insert(key.to_string(), value);
        }
        Value::Object(out)
    }
}

/// Drops nulls and empty containers from objects, recursively, so the dump shows what is set.
/// One empty object is a setting, not an unset field: a `StringMatch` of `{}` (presence; under
/// `withoutHeaders`, absence) as a value of the `headers`, `withoutHeaders` and `queryParams`
/// maps of a match, which serializes as `{}` from the start and is kept.
fn prune(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                let presence_map =
                    matches!(key.as_str(), "headers" | "withoutHeaders" | "queryParams");
                match v {
                    Value::Object(inner) if presence_map => {
                        let presence: Vec<String> = inner
                            .iter()
                            .filter(|(_, m)| m.as_object().is_some_and(|m| m.is_empty()))
                            .map(|(k, _)| k.clone())
                            .collect();
                        prune(v);
                        if let Value::Object(inner) = v {
                            for k in presence {
                                inner.insert(k, Value::Object(serde_json::Map::new()));
                            }
                        }
                    }
                    _ => prune(v),
                }
            }
            map.retain(|_, v| !is_empty(v));
        }
        Value::Array(items) => items.iter_mut().for_each(prune),
        _ => {}
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}
