//! The service registry: every (host, port) the mesh knows from `ServiceEntry`s, with its
//! endpoints, indexed for the request path.
//!
//! The proxy resolves each outbound request's `Host` to a [`ServicePort`] here. A client may
//! name a service several ways (`reviews`, `reviews.default`, `reviews.default.svc.cluster.local`,
//! see [`HostName::aliases`]); every alias is precomputed into one hash map at load time, and
//! the map is probed with a borrowed `(&str, u16)` key, so a lookup is one hash probe and no
//! allocation.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::Serialize;

use super::networking::{
    Port, Resolution, ServiceEntry, ServiceLocation, WorkloadEntry, WorkloadEntrySpec,
};
use crate::endpoint::Endpoint;
use crate::host::{HostName, wildcard_matches};
use crate::labels::Labels;

use super::types::Protocol;

/// One port of one service host, with the endpoints serving it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub host: HostName,
    pub number: u16,
    /// The port's name in its ServiceEntry (`http`, `grpc-api`).
    pub name: String,
    pub protocol: Protocol,
    pub resolution: Resolution,
    pub location: ServiceLocation,
    /// Resolved endpoints: for `STATIC`, each endpoint's IP with its port for this port name
    /// (`endpoint.ports[name]`, else `targetPort`, else `number`). Empty for DNS resolution
    /// until a resolver fills in `dns_endpoints`.
    pub endpoints: Vec<Endpoint>,
    /// For `DNS`/`DNS_ROUND_ROBIN`: the names to resolve, with port and metadata.
    pub dns_endpoints: Vec<DnsEndpoint>,
    /// Identities a server of this service may present (the ServiceEntry's `subjectAltNames`).
    pub subject_alt_names: Vec<String>,
    /// The ServiceEntry this came from.
    pub service_entry: String,
    pub namespace: String,
}

impl ServicePort {
    /// A STATIC, mesh-internal service port with no endpoints yet, named after its host: what
    /// an embedder (or a test) needs to address a service without loading a ServiceEntry.
    pub fn new(host: HostName, number: u16, protocol: Protocol) -> ServicePort {
        let namespace = host
            .namespace()
            .unwrap_or(crate::host::DEFAULT_NAMESPACE)
            .to_string();
        ServicePort {
            name: protocol.as_str().to_ascii_lowercase(),
            service_entry: host
                .as_str()
                .split('.')
                .next()
                .unwrap_or_default()
                .to_string(),
            host,
            number,
            protocol,
            resolution: Resolution::Static,
            location: ServiceLocation::MeshInternal,
            endpoints: Vec::new(),
            dns_endpoints: Vec::new(),
            subject_alt_names: Vec::new(),
            namespace,
        }
    }
}

/// An endpoint still to be resolved through DNS.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsEndpoint {
    pub host: String,
    pub port: u16,
    pub labels: Labels,
    pub weight: u32,
    pub service_account: Option<String>,
}

/// Every [`ServicePort`], looked up by what clients call it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ServiceRegistry {
    /// The namespace short names resolve in (the proxy's).
    #[serde(skip)]
    namespace: String,
    ports: Vec<Arc<ServicePort>>,
    #[serde(skip)]
    by_alias: HashMap<AliasKey, Arc<ServicePort>>,
    /// `*.example.com` hosts, tried only when no exact name matches.
    #[serde(skip)]
    wildcards: Vec<Arc<ServicePort>>,
}

impl ServiceRegistry {
    /// The service port a client reaches as `host:port`. `host` is the `Host` header's host
    /// part (see `host::split_authority`), lower-case; any alias of the service's name works.
    pub fn lookup(&self, host: &str, port: u16) -> Option<&Arc<ServicePort>> {
        if let Some(found) = self.by_alias.get(&(host, port) as &dyn AliasView) {
            return Some(found);
        }
        self.wildcards
            .iter()
            .find(|sp| sp.number == port && wildcard_matches(sp.host.as_str(), host))
    }

    /// All ports of the service `host` (any alias), for resolving a route destination that
    /// names no port. A scan: call it when compiling routes, not per request.
    pub fn ports_of<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a Arc<ServicePort>> {
        self.ports.iter().filter(move |sp| {
            self.lookup(host, sp.number)
                .is_some_and(|found| Arc::ptr_eq(found, sp))
        })
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Arc<ServicePort>> {
        self.ports.iter()
    }

    pub fn len(&self) -> usize {
        self.ports.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }

    /// The namespace whose short names resolve here.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Builds the registry as seen from a proxy in `namespace`. ServiceEntries not exported
    /// to that namespace are left out. When two ServiceEntries define the same host and port,
    /// the first loaded wins (logged), and a full name always wins over another's alias.
    pub(crate) fn build(
        service_entries: &[ServiceEntry],
        workload_entries: &[WorkloadEntry],
        namespace: &str,
    ) -> Self {
        let mut registry = ServiceRegistry {
            namespace: namespace.to_string(),
            ..ServiceRegistry::default()
        };
        for se in service_entries {
            if !exported_to(&se.spec.export_to, se.namespace(), namespace) {
                continue;
            }
            let selected: Vec<&WorkloadEntrySpec> = match &se.spec.workload_selector {
                Some(selector) => workload_entries
                    .iter()
                    .filter(|we| {
                        we.namespace() == se.namespace() && we.spec.labels.matches(&selector.labels)
                    })
                    .map(|we| &we.spec)
                    .collect(),
                None => Vec::new(),
            };
            for host in &se.spec.hosts {
                let host = HostName::qualify(host, se.namespace());
                for port in &se.spec.ports {
                    let sp = Arc::new(service_port(se, &host, port, &selected));
                    if host.is_wildcard() {
                        registry.wildcards.push(sp.clone());
                    } else {
                        match registry
                            .by_alias
                            .entry(AliasKey::new(host.as_str(), sp.number))
                        {
                            Entry::Occupied(first) => tracing::warn!(
                                host = %host,
                                port = sp.number,
                                first = %first.get().service_entry,
                                ignored = %se.metadata.name,
                                "two ServiceEntries define the same host and port; keeping the first"
                            ),
                            Entry::Vacant(slot) => {
                                slot.insert(sp.clone());
                            }
                        }
                    }
                    registry.ports.push(sp);
                }
            }
        }
        // Aliases after all full names, so an alias never shadows a service's real name.
        for sp in &registry.ports {
            if sp.host.is_wildcard() {
                continue;
            }
            for alias in sp.host.aliases(namespace) {
                registry
                    .by_alias
                    .entry(AliasKey::new(&alias, sp.number))
                    .or_insert_with(|| sp.clone());
            }
        }
        registry
    }
}

fn service_port(
    se: &ServiceEntry,
    host: &HostName,
    port: &Port,
    selected: &[&WorkloadEntrySpec],
) -> ServicePort {
    let spec = &se.spec;
    let name = port.name.clone().unwrap_or_default();
    let mut endpoints = Vec::new();
    let mut dns_endpoints = Vec::new();
    for ep in spec.endpoints.iter().chain(selected.iter().copied()) {
        let ep_port = ep
            .ports
            .get(&name)
            .or(port.target_port.as_ref())
            .unwrap_or(&port.number)
            .get();
        let weight = ep.weight.filter(|w| *w > 0).unwrap_or(1);
        if spec.resolution.is_dns() {
            dns_endpoints.push(DnsEndpoint {
                host: ep.address.clone(),
                port: ep_port,
                labels: ep.labels.clone(),
                weight,
                service_account: ep.service_account.clone(),
            });
        } else if let Ok(ip) = ep.address.parse::<IpAddr>() {
            // Validation has rejected non-IP addresses for STATIC; NONE has no endpoints.
            endpoints.push(Endpoint {
                address: SocketAddr::new(ip, ep_port),
                labels: ep.labels.clone(),
                weight,
                service_account: ep.service_account.clone(),
            });
        }
    }
    // DNS without endpoints resolves the service's own name (Istio's behaviour).
    if spec.resolution.is_dns() && spec.endpoints.is_empty() && spec.workload_selector.is_none() {
        dns_endpoints.push(DnsEndpoint {
            host: host.as_str().to_string(),
            port: port.target_port.unwrap_or(port.number).get(),
            labels: Labels::default(),
            weight: 1,
            service_account: None,
        });
    }
    ServicePort {
        host: host.clone(),
        number: port.number.get(),
        name,
        protocol: port.effective_protocol(),
        resolution: spec.resolution,
        location: spec.location.unwrap_or_default(),
        endpoints,
        dns_endpoints,
        subject_alt_names: spec.subject_alt_names.clone(),
        service_entry: se.metadata.name.clone(),
        namespace: se.metadata.namespace.clone(),
    }
}

/// Istio's `exportTo`: empty or `*` is everywhere, `.` the resource's own namespace, `~`
/// nowhere, anything else a namespace name.
pub fn exported_to(export_to: &[String], own: &str, namespace: &str) -> bool {
    export_to.is_empty()
        || export_to
            .iter()
            .any(|e| e == "*" || e == namespace || (e == "." && own == namespace))
}

/// An owned `(host, port)` key. It hashes and compares exactly like the borrowed
/// `(&str, u16)` view, which is what lets `lookup` probe without building a `String`.
#[derive(Clone, Debug)]
struct AliasKey {
    host: Box<str>,
    port: u16,
}

impl AliasKey {
    fn new(host: &str, port: u16) -> Self {
        AliasKey {
            host: host.into(),
            port,
        }
    }
}

trait AliasView {
    fn view(&self) -> (&str, u16);
}

impl AliasView for AliasKey {
    fn view(&self) -> (&str, u16) {
        (&self.host, self.port)
    }
}

impl AliasView for (&str, u16) {
    fn view(&self) -> (&str, u16) {
        *self
    }
}

impl<'a> Borrow<dyn AliasView + 'a> for AliasKey {
    fn borrow(&self) -> &(dyn AliasView + 'a) {
        self
    }
}

impl Hash for dyn AliasView + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.view().hash(state);
    }
}

impl PartialEq for dyn AliasView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.view() == other.view()
    }
}

impl Eq for dyn AliasView + '_ {}

impl Hash for AliasKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.view().hash(state);
    }
}

impl PartialEq for AliasKey {
    fn eq(&self, other: &Self) -> bool {
        self.view() == other.view()
    }
}

impl Eq for AliasKey {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_to_rules() {
        let e = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(exported_to(&[], "a", "b"));
        assert!(exported_to(&e(&["*"]), "a", "b"));
        assert!(exported_to(&e(&["."]), "a", "a"));
        assert!(!exported_to(&e(&["."]), "a", "b"));
        assert!(exported_to(&e(&["b"]), "a", "b"));
        assert!(!exported_to(&e(&["~"]), "a", "a"));
    }

    #[test]
    fn borrowed_and_owned_keys_agree() {
        let mut map = HashMap::new();
        map.insert(AliasKey::new("reviews", 9080), 1);
        assert_eq!(map.get(&("reviews", 9080u16) as &dyn AliasView), Some(&1));
        assert_eq!(map.get(&("reviews", 9081u16) as &dyn AliasView), None);
    }
}
