//! Route destinations: resolved to [`RouteTarget`]s once, when the table is built, and
//! picked by weight per request.
//!
//! Resolution follows Istio's sidecar translation (`GetDestinationCluster`): the port is the
//! destination's, else the service's only port, else the port the request came in on (the
//! virtual host's port). A host that is not a known service, a port the service does not
//! have, or a subset no DestinationRule defines is Envoy's "cluster not found": the
//! destination stays in the route and answers 503 `NC` with a message naming it, so a
//! weighted split keeps its proportions.
//!
//! The DestinationRule for a host is chosen as a sidecar's scope does: among rules exported
//! to this proxy's namespace whose `workloadSelector` (if any) selects this proxy, those for
//! the exact host, else the most specific wildcard; preferring the proxy's namespace, then
//! the service's, then the others, first loaded first. Rules for the same host in that
//! namespace are merged: the first one's traffic policy, the subsets of all.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::config::networking::{
    Destination, DestinationRule, Subset as SubsetSpec, TrafficPolicy,
};
use mesh_core::config::{MeshConfig, ServicePort, ServiceRegistry};
use mesh_core::target::{RetryPolicy, RouteTarget, Subset};

use crate::headers::HeaderRules;
use mesh_core::config::exported_to;
use mesh_core::host::wildcard_matches;

use crate::scope::HostPattern;
use crate::table::SourceContext;

/// Where a destination sends requests: a target, or why there is none.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    Found(RouteTarget),
    /// 503 NC with this message.
    Missing(Arc<str>),
}

/// One `route[]` entry of an HTTP route.
#[derive(Clone, Debug)]
pub(crate) struct WeightedDestination {
    pub target: Target,
    /// Cumulative weight up to and including this destination.
    upto: u32,
    pub headers: HeaderRules,
}

/// The destinations of a route, with their weights.
#[derive(Clone, Debug, Default)]
pub(crate) struct Destinations {
    items: Box<[WeightedDestination]>,
    total: u32,
}

impl Destinations {
    /// `(target, weight, headers)`; as Istio, a single destination takes everything whatever
    /// its weight, and with several, weight-0 ones are left out.
    pub(crate) fn new(entries: Vec<(Target, u32, HeaderRules)>) -> Destinations {
        let single = entries.len() == 1;
        let mut total = 0u32;
        let items = entries
            .into_iter()
            .filter(|(_, weight, _)| single || *weight > 0)
            .map(|(target, weight, headers)| {
                total = total.saturating_add(if single { 1 } else { weight });
                WeightedDestination {
                    target,
                    upto: total,
                    headers,
                }
            })
            .collect();
        Destinations { items, total }
    }

    /// Draws a destination by weight (`fastrand`, no lock); its index and itself.
    pub(crate) fn pick(&self) -> Option<(usize, &WeightedDestination)> {
        if self.items.len() <= 1 {
            return self.items.first().map(|d| (0, d));
        }
        let draw = fastrand::u32(..self.total.max(1));
        self.items.iter().enumerate().find(|(_, d)| draw < d.upto)
    }

    pub(crate) fn get(&self, index: usize) -> Option<&WeightedDestination> {
        self.items.get(index)
    }
}

/// The DestinationRule view of one host: its traffic policy and subsets.
#[derive(Debug, Default)]
struct HostRules<'a> {
    policy: Option<&'a TrafficPolicy>,
    subsets: Vec<&'a SubsetSpec>,
}

/// Resolves destinations into targets while a table is built, sharing what it can.
pub(crate) struct Resolver<'a> {
    registry: &'a ServiceRegistry,
    /// The proxy's namespace.
    namespace: String,
    rules: Vec<&'a DestinationRule>,
    /// (host, port, subset) → the shared parts of its targets.
    cache: HashMap<TargetKey, Result<Shared, Arc<str>>>,
    default_retry: Arc<RetryPolicy>,
    no_retry: Arc<RetryPolicy>,
    /// The Sidecar egress scope (`SourceContext::egress_hosts`): a destination outside it has
    /// no cluster on this proxy, as Istio pushes none.
    egress_hosts: Option<Vec<HostPattern>>,
}

type TargetKey = (String, u16, Option<String>);

#[derive(Clone)]
struct Shared {
    service: Arc<ServicePort>,
    subset: Option<Arc<Subset>>,
    policy: Option<Arc<TrafficPolicy>>,
    name: Arc<str>,
}

impl<'a> Resolver<'a> {
    pub(crate) fn new(config: &'a MeshConfig, source: &SourceContext) -> Resolver<'a> {
        let namespace = config.services().namespace();
        let rules = config
            .destination_rules()
            .iter()
            .filter(|dr| exported_to(&dr.spec.export_to, dr.namespace(), &source.namespace))
            .filter(|dr| {
                dr.spec
                    .workload_selector
                    .as_ref()
                    .is_none_or(|s| source.labels.matches(&s.match_labels))
            })
            .collect();
        Resolver {
            registry: config.services(),
            namespace: if source.namespace.is_empty() {
                namespace.to_string()
            } else {
                source.namespace.clone()
            },
            rules,
            cache: HashMap::new(),
            default_retry: Arc::new(RetryPolicy::istio_default()),
            no_retry: Arc::new(RetryPolicy::none()),
            egress_hosts: source.egress_hosts.clone(),
        }
    }

    pub(crate) fn registry(&self) -> &'a ServiceRegistry {
        self.registry
    }

    /// The proxy's namespace (the config's, when the source context names none).
    pub(crate) fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The retry policy for a route's `retries`, shared when it is Istio's default or none.
    pub(crate) fn retry(&self, policy: RetryPolicy) -> Arc<RetryPolicy> {
        if policy == *self.default_retry {
            self.default_retry.clone()
        } else if policy == *self.no_retry {
            self.no_retry.clone()
        } else {
            Arc::new(policy)
        }
    }

    pub(crate) fn no_retry(&self) -> Arc<RetryPolicy> {
        self.no_retry.clone()
    }

    /// Resolves a route destination for a request that came in on `request_port`.
    pub(crate) fn resolve(
        &mut self,
        dest: &Destination,
        request_port: u16,
        timeout: Option<Duration>,
        retry: &Arc<RetryPolicy>,
    ) -> Target {
        let registry = self.registry;
        let port = match dest.port {
            Some(port) => port.number.get(),
            None => {
                let mut ports = registry.ports_of(&dest.host);
                match (ports.next(), ports.next()) {
                    (None, _) => {
                        return Target::Missing(
                            format!(
                                "no cluster: route destination {} is not a known service",
                                dest.host
                            )
                            .into(),
                        );
                    }
                    (Some(only), None) => only.number,
                    (Some(_), Some(_)) => request_port,
                }
            }
        };
        let Some(service) = registry.lookup(&dest.host, port) else {
            let known = registry.ports_of(&dest.host).next().is_some();
            let message = if known {
                format!("no cluster: service {} has no port {port}", dest.host)
            } else {
                format!(
                    "no cluster: route destination {} is not a known service",
                    dest.host
                )
            };
            return Target::Missing(message.into());
        };
        if let Some(hosts) = &self.egress_hosts
            && !hosts.iter().any(|h| h.matches(service))
        {
            return Target::Missing(
                format!(
                    "no cluster: {}:{port} is outside this proxy's Sidecar egress hosts",
                    service.host
                )
                .into(),
            );
        }
        self.target(service, &dest.host, dest.subset.as_deref(), timeout, retry)
    }

    /// The target for `service` (reached as `host`) and `subset`.
    pub(crate) fn target(
        &mut self,
        service: &Arc<ServicePort>,
        host: &str,
        subset: Option<&str>,
        timeout: Option<Duration>,
        retry: &Arc<RetryPolicy>,
    ) -> Target {
        let key = (host.to_string(), service.number, subset.map(str::to_string));
        let shared = match self.cache.get(&key) {
            Some(shared) => shared.clone(),
            None => {
                let shared = self.shared(service, host, subset);
                self.cache.insert(key, shared.clone());
                shared
            }
        };
        match shared {
            Ok(s) => Target::Found(RouteTarget {
                service: s.service,
                subset: s.subset,
                traffic_policy: s.policy,
                timeout,
                retry: retry.clone(),
                name: s.name,
            }),
            Err(message) => Target::Missing(message),
        }
    }

    fn shared(
        &self,
        service: &Arc<ServicePort>,
        host: &str,
        subset: Option<&str>,
    ) -> Result<Shared, Arc<str>> {
        let rules = self.host_rules(host, service);
        let (subset, subset_policy) = match subset {
            None => (None, None),
            Some(name) => {
                let Some(spec) = rules.subsets.iter().find(|s| s.name == name) else {
                    return Err(format!(
                        "no cluster: subset {name} of {host}:{} is not defined by any DestinationRule",
                        service.number
                    )
                    .into());
                };
                let subset = Subset {
                    name: spec.name.clone(),
                    labels: spec.labels.clone(),
                };
                (Some(Arc::new(subset)), spec.traffic_policy.as_ref())
            }
        };
        let policy = crate::policy::effective_policy(rules.policy, subset_policy, service.number);
        let name = match &subset {
            Some(s) => format!("{host}:{}/{}", service.number, s.name),
            None => format!("{host}:{}", service.number),
        };
        Ok(Shared {
            service: service.clone(),
            subset,
            policy: policy.map(Arc::new),
            name: name.into(),
        })
    }

    fn host_rules(&self, host: &str, service: &ServicePort) -> HostRules<'a> {
        // The most specific host pattern any visible rule has for this host.
        let specificity = |dr: &DestinationRule| -> Option<usize> {
            if dr.spec.host == host {
                Some(usize::MAX)
            } else if dr.spec.host.starts_with('*') && wildcard_matches(&dr.spec.host, host) {
                Some(dr.spec.host.len())
            } else {
                None
            }
        };
        let Some(best) = self.rules.iter().filter_map(|dr| specificity(dr)).max() else {
            return HostRules::default();
        };
        let candidates: Vec<&&DestinationRule> = self
            .rules
            .iter()
            .filter(|dr| specificity(dr) == Some(best))
            .collect();
        let service_ns = service.host.namespace().unwrap_or(&service.namespace);
        let rank = |dr: &DestinationRule| match dr.namespace() {
            ns if ns == self.namespace.as_str() => 0,
            ns if ns == service_ns => 1,
            _ => 2,
        };
        let Some(first) = candidates.iter().min_by_key(|dr| rank(dr)) else {
            return HostRules::default();
        };
        let mut out = HostRules {
            policy: first.spec.traffic_policy.as_ref(),
            subsets: Vec::new(),
        };
        for dr in candidates
            .iter()
            .filter(|dr| dr.namespace() == first.namespace() && dr.spec.host == first.spec.host)
        {
            for subset in &dr.spec.subsets {
                if out.subsets.iter().all(|s| s.name != subset.name) {
                    out.subsets.push(subset);
                }
            }
        }
        out
    }
}
