//! The etcd side of discovery: stored resources layered over the files, and this
//! workload's registration (see the parent module's docs).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::config::bootstrap::EtcdSettings;
use mesh_core::config::{
    Bootstrap, ConfigErrors, KeyedSource, Kind, MeshConfig, ResourceId, Source, load_layered,
};
use mesh_discovery::etcd::{EtcdAuth, EtcdOptions, EtcdTls, ResourceKey, StoreSnapshot};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::DiscoveryError;

/// The etcd options a Bootstrap's `discovery.etcd` describes.
pub fn etcd_options(settings: &EtcdSettings) -> Result<EtcdOptions, DiscoveryError> {
    let mut options = EtcdOptions::new(settings.endpoints.clone(), settings.prefix.clone());
    options.tls = settings.tls.as_ref().map(|tls| EtcdTls {
        ca: tls.ca.clone(),
        cert: tls.cert.clone(),
        key: tls.key.clone(),
        domain: tls.server_name.clone(),
    });
    if let (Some(username), Some(path)) = (&settings.username, &settings.password_file) {
        let password = std::fs::read_to_string(path)
            .map_err(|source| DiscoveryError::PasswordFile {
                path: path.clone(),
                source,
            })?
            .trim_end_matches(['\r', '\n'])
            .to_string();
        options.auth = Some(EtcdAuth {
            username: username.clone(),
            password,
        });
    }
    Ok(options)
}

/// The etcd resources in force, and the outcome of combining a change with the files.
#[derive(Debug, Default)]
pub(crate) struct StoreLayer {
    /// Key → YAML of every stored resource currently applied.
    accepted: BTreeMap<ResourceKey, String>,
    /// What the store held at the last change (applied or not), so a reload of the files
    /// retries resources that were left out.
    wanted: BTreeMap<ResourceKey, String>,
    prefix: String,
}

/// A composed configuration and what was left out of it.
#[derive(Debug)]
pub(crate) struct Composed {
    pub config: MeshConfig,
    /// Stored resources left out, with why.
    pub rejected: Vec<(String, String)>,
    /// Stored resources shadowed by a file's.
    pub shadowed: Vec<String>,
}

impl StoreLayer {
    pub(crate) fn new(prefix: &str) -> StoreLayer {
        StoreLayer {
            prefix: prefix.trim_end_matches('/').to_string(),
            ..StoreLayer::default()
        }
    }

    /// The source name of a stored resource: its full etcd key, so errors and
    /// `/config_dump` origins point at it.
    fn source_name(&self, key: &ResourceKey) -> String {
        format!("etcd:{}", key.etcd_key(&self.prefix))
    }

    /// Combines `files` with `wanted` (the store's resources now): resources that fail are
    /// left out (a changed one falls back to its accepted version), and the rest apply. Err
    /// only when the files fail whatever is left out. On success the layer remembers what
    /// it applied.
    pub(crate) fn compose(
        &mut self,
        files: &MeshConfig,
        wanted: BTreeMap<ResourceKey, String>,
    ) -> Result<Composed, ConfigErrors> {
        let mut rejected = Vec::new();
        // Keys that do not name a kind we know (or name it in the wrong group) never load.
        let mut candidate: BTreeMap<ResourceKey, (ResourceId, String)> = BTreeMap::new();
        for (key, yaml) in &wanted {
            match resource_id(key) {
                Ok(id) => {
                    candidate.insert(key.clone(), (id, yaml.clone()));
                }
                Err(why) => rejected.push((self.source_name(key), why)),
            }
        }
        // Each round leaves out the stored resources the errors name; a resource falls back
        // to its accepted text first, then out. Bounded: each round removes or reverts one
        // at least.
        let mut reverted: BTreeSet<ResourceKey> = BTreeSet::new();
        loop {
            let overlay: Vec<KeyedSource> = candidate
                .iter()
                .map(|(key, (id, yaml))| KeyedSource {
                    id: id.clone(),
                    source: Source::new(self.source_name(key), yaml.clone()),
                })
                .collect();
            match load_layered(files, &overlay) {
                Ok(layered) => {
                    self.accepted = candidate
                        .into_iter()
                        .map(|(key, (_, yaml))| (key, yaml))
                        .collect();
                    self.wanted = wanted;
                    let shadowed = layered
                        .shadowed
                        .into_iter()
                        .map(|(id, source)| format!("{id} (from {source})"))
                        .collect();
                    return Ok(Composed {
                        config: layered.config,
                        rejected,
                        shadowed,
                    });
                }
                Err(errors) => {
                    let named: Vec<ResourceKey> = candidate
                        .keys()
                        .filter(|key| {
                            let name = self.source_name(key);
                            errors.iter().any(|e| e.file == name)
                        })
                        .cloned()
                        .collect();
                    if named.is_empty() {
                        // The files fail (or fail with the store's resources in ways the
                        // errors pin on the files): nothing to leave out.
                        return Err(errors);
                    }
                    for key in named {
                        let name = self.source_name(&key);
                        let why: Vec<String> = errors
                            .iter()
                            .filter(|e| e.file == name)
                            .map(ToString::to_string)
                            .collect();
                        rejected.push((name, why.join("; ")));
                        let fallback = self.accepted.get(&key).filter(|accepted| {
                            candidate.get(&key).map(|(_, yaml)| yaml) != Some(*accepted)
                        });
                        match fallback {
                            Some(accepted) if reverted.insert(key.clone()) => {
                                if let Some(entry) = candidate.get_mut(&key) {
                                    entry.1 = accepted.clone();
                                }
                            }
                            _ => {
                                candidate.remove(&key);
                            }
                        }
                    }
                }
            }
        }
    }

    /// What the store held at the last change, for recomposing after the files change.
    pub(crate) fn wanted(&self) -> BTreeMap<ResourceKey, String> {
        self.wanted.clone()
    }
}

/// The mesh-core identity a stored key claims.
fn resource_id(key: &ResourceKey) -> Result<ResourceId, String> {
    let kind = Kind::ALL
        .into_iter()
        .find(|k| k.as_str() == key.kind)
        .ok_or_else(|| format!("unknown kind `{}` in the key", key.kind))?;
    if kind.group() != key.group {
        return Err(format!(
            "{} belongs to group `{}`, not `{}`",
            key.kind,
            kind.group(),
            key.group
        ));
    }
    Ok(ResourceId {
        kind,
        namespace: key.namespace.clone(),
        name: key.name.clone(),
    })
}

/// The store key of a resource: `<group>/<kind>/<namespace>/<name>`.
pub fn resource_key(id: &ResourceId) -> ResourceKey {
    ResourceKey {
        group: id.kind.group().to_string(),
        kind: id.kind.as_str().to_string(),
        namespace: id.namespace.clone(),
        name: id.name.clone(),
    }
}

/// The YAML of each stored resource of a snapshot.
pub(crate) fn snapshot_texts(snapshot: &StoreSnapshot) -> BTreeMap<ResourceKey, String> {
    snapshot
        .resources
        .iter()
        .map(|(key, stored)| (key.clone(), stored.yaml.clone()))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Self-registration

/// Istio's label telling clients that a workload accepts mesh mTLS.
const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

/// What this workload publishes about itself.
#[derive(Clone, Debug)]
pub(crate) struct SelfEntry {
    pub key: ResourceKey,
    pub address: IpAddr,
    pub inbound_port: u16,
    /// The service account of this workload's SPIFFE identity, when it has one.
    pub service_account: Option<String>,
}

impl SelfEntry {
    /// The entry of a proxy whose inbound listener is `inbound`. The address is the
    /// listener's IP, or, when it listens on every address, `register.address`, else the
    /// first non-loopback address of the host.
    pub(crate) fn new(
        bootstrap: &Bootstrap,
        inbound: SocketAddr,
        identity: Option<&mesh_core::Identity>,
    ) -> Result<SelfEntry, String> {
        let configured = bootstrap.spec.register.as_ref().and_then(|r| r.address);
        let address = if !inbound.ip().is_unspecified() {
            inbound.ip()
        } else if let Some(address) = configured {
            address
        } else {
            first_non_loopback().ok_or(
                "the inbound listener is on every address and the host has no non-loopback address: set register.address",
            )?
        };
        let dashed: String = address
            .to_string()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let name = format!(
            "{}-{}-{}",
            bootstrap.spec.workload.name,
            dashed.trim_matches('-'),
            inbound.port()
        );
        Ok(SelfEntry {
            key: ResourceKey {
                group: Kind::WorkloadEntry.group().to_string(),
                kind: Kind::WorkloadEntry.as_str().to_string(),
                namespace: bootstrap.namespace().to_string(),
                name,
            },
            address,
            inbound_port: inbound.port(),
            service_account: identity.and_then(|i| i.service_account().map(str::to_string)),
        })
    }

    /// The WorkloadEntry YAML for `config`: every port name of the ServiceEntries whose
    /// `workloadSelector` selects this workload maps to the inbound listener's port (peers
    /// reach the app through this proxy; with capture the redirect lands there as well).
    pub(crate) fn yaml(&self, config: &MeshConfig) -> Option<String> {
        let bootstrap = config.bootstrap()?;
        let mut labels = bootstrap.spec.workload.labels.clone();
        if bootstrap.spec.identity.is_some() {
            labels.insert(TLS_MODE_LABEL, "istio");
        }
        let mut ports: BTreeMap<String, u16> = BTreeMap::new();
        for se in config.service_entries() {
            let Some(selector) = &se.spec.workload_selector else {
                continue;
            };
            if se.namespace() != self.key.namespace
                || !bootstrap.spec.workload.labels.matches(&selector.labels)
            {
                continue;
            }
            for port in &se.spec.ports {
                if let Some(name) = &port.name {
                    ports.insert(name.clone(), self.inbound_port);
                }
            }
        }
        let spec = serde_json::json!({
            "address": self.address.to_string(),
            "labels": labels.iter().collect::<BTreeMap<_, _>>(),
            "ports": ports,
            "serviceAccount": self.service_account,
        });
        let mut spec = spec;
        if let Some(obj) = spec.as_object_mut() {
            obj.retain(|_, v| !v.is_null());
        }
        let doc = serde_json::json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "WorkloadEntry",
            "metadata": {
                "name": self.key.name,
                "namespace": self.key.namespace,
                "annotations": { "mesh-proxy/registered-by": "self" },
            },
            "spec": spec,
        });
        // JSON is YAML: one line per entry, no YAML writer needed.
        serde_json::to_string_pretty(&doc).ok()
    }
}

/// The first non-loopback IP of the host (IPv4 first).
fn first_non_loopback() -> Option<IpAddr> {
    let addrs: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .ok()?
        .filter_map(|ifa| {
            let addr = ifa.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
        .collect();
    addrs
        .iter()
        .find(|ip| ip.is_ipv4())
        .or(addrs.first())
        .copied()
}

// ---------------------------------------------------------------------------------------
// The running tasks

/// `mesh_etcd_sync_age_seconds`: seconds since the etcd watch was last known in sync.
pub(crate) fn register_sync_age(metrics: &mesh_telemetry::metrics::Metrics) -> Gauge {
    let gauge = Gauge::default();
    metrics.register(
        "mesh_etcd_sync_age_seconds",
        "Seconds since the etcd watch was last known in sync (-1 before the first sync)",
        gauge.clone(),
    );
    gauge.set(-1);
    gauge
}

/// Keeps the sync-age gauge current (it is read by scrapes, so it ticks every second).
pub(crate) fn track_sync_age(
    last_sync: watch::Receiver<Option<tokio::time::Instant>>,
    gauge: Gauge,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let age = (*last_sync.borrow()).map_or(-1, |at| at.elapsed().as_secs() as i64);
            gauge.set(age);
        }
    })
}

/// The registration's value: this workload's entry while the proxy is ready, else none.
#[derive(Debug)]
pub(crate) struct RegistrationValue {
    entry: SelfEntry,
    tx: watch::Sender<Option<String>>,
    /// The latest config's YAML for the entry, kept while not ready.
    latest: Mutex<Option<String>>,
}

impl RegistrationValue {
    pub(crate) fn new(
        entry: SelfEntry,
    ) -> (Arc<RegistrationValue>, watch::Receiver<Option<String>>) {
        let (tx, rx) = watch::channel(None);
        (
            Arc::new(RegistrationValue {
                entry,
                tx,
                latest: Mutex::new(None),
            }),
            rx,
        )
    }

    pub(crate) fn key(&self) -> &ResourceKey {
        &self.entry.key
    }

    /// Recomputes the entry for a new config; published only while `ready`.
    pub(crate) fn update(&self, config: &MeshConfig, ready: bool) {
        let yaml = self.entry.yaml(config);
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = yaml.clone();
        if ready {
            self.tx.send_if_modified(|current| {
                let changed = *current != yaml;
                *current = yaml;
                changed
            });
        }
    }

    /// Publishes (ready) or withdraws (not ready) the entry.
    pub(crate) fn set_ready(&self, ready: bool) {
        let value = if ready {
            self.latest
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        } else {
            None
        };
        self.tx.send_if_modified(|current| {
            let changed = *current != value;
            *current = value;
            changed
        });
    }
}

/// Logs what a composition left out or shadowed.
pub(crate) fn log_composition(composed: &Composed) {
    for (key, why) in &composed.rejected {
        tracing::error!(
            key,
            "stored resource rejected and left out (a changed one keeps its last good version): {why}"
        );
    }
    for shadowed in &composed.shadowed {
        tracing::warn!("{shadowed} is also defined in this proxy's files, which win");
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::load_sources;

    const BOOTSTRAP: &str = "apiVersion: mesh-proxy/v1
kind: Bootstrap
metadata: { name: reviews }
spec:
  workload: { name: reviews-v1, labels: { app: reviews, version: v1 } }
";

    fn files() -> MeshConfig {
        load_sources(&[Source::new("b.yaml", BOOTSTRAP)]).unwrap_or_else(|e| panic!("{e}"))
    }

    fn key(kind: &str, name: &str) -> ResourceKey {
        let group = if kind.ends_with("Policy") || kind == "PeerAuthentication" {
            "security.istio.io"
        } else {
            "networking.istio.io"
        };
        ResourceKey {
            group: group.into(),
            kind: kind.into(),
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn se(name: &str, port: u16) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{ name: {name} }}\nspec:\n  hosts: [{name}]\n  ports: [{{ number: 9080, name: http }}]\n  resolution: STATIC\n  endpoints: [{{ address: 127.0.0.1, ports: {{ http: {port} }} }}]\n"
        )
    }

    fn endpoint_port(config: &MeshConfig, host: &str) -> Option<u16> {
        let port = config.services().lookup(host, 9080)?;
        port.endpoints.first().map(|e| e.address.port())
    }

    #[test]
    fn an_invalid_stored_resource_is_left_out_alone_and_keeps_its_last_good_version() {
        let mut layer = StoreLayer::new("/mesh/");
        let files = files();
        let first: BTreeMap<_, _> = [
            (key("ServiceEntry", "ratings"), se("ratings", 1001)),
            (key("ServiceEntry", "details"), se("details", 2001)),
        ]
        .into();
        let composed = layer
            .compose(&files, first)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(composed.rejected.is_empty());
        assert_eq!(endpoint_port(&composed.config, "ratings"), Some(1001));

        // ratings turns invalid, details changes validly, a new invalid one arrives.
        let second: BTreeMap<_, _> = [
            (
                key("ServiceEntry", "ratings"),
                se("ratings", 1001).replace("hosts: [ratings]", "hosts: []"),
            ),
            (key("ServiceEntry", "details"), se("details", 2002)),
            (key("ServiceEntry", "broken"), "kind: [".to_string()),
            (key("Nonsense", "x"), se("x", 1)),
        ]
        .into();
        let composed = layer
            .compose(&files, second)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            endpoint_port(&composed.config, "ratings"),
            Some(1001),
            "last good ratings stays"
        );
        assert_eq!(
            endpoint_port(&composed.config, "details"),
            Some(2002),
            "valid change applies"
        );
        let rejected: Vec<&str> = composed.rejected.iter().map(|(k, _)| k.as_str()).collect();
        assert!(
            rejected.contains(&"etcd:/mesh/networking.istio.io/ServiceEntry/default/ratings"),
            "{rejected:?}"
        );
        assert!(
            rejected.contains(&"etcd:/mesh/networking.istio.io/ServiceEntry/default/broken"),
            "{rejected:?}"
        );
        assert!(
            rejected.contains(&"etcd:/mesh/networking.istio.io/Nonsense/default/x"),
            "{rejected:?}"
        );
        assert!(composed.rejected.iter().all(|(_, why)| !why.is_empty()));
    }

    #[test]
    fn files_win_and_a_store_bootstrap_is_refused() {
        let mut layer = StoreLayer::new("/mesh");
        let files = files();
        let wanted: BTreeMap<_, _> = [(
            ResourceKey {
                group: "mesh-proxy".into(),
                kind: "Bootstrap".into(),
                namespace: "default".into(),
                name: "reviews".into(),
            },
            BOOTSTRAP.to_string(),
        )]
        .into();
        let composed = layer
            .compose(&files, wanted)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(composed.rejected.len(), 1);
        assert!(
            composed.rejected[0]
                .1
                .contains("belongs in that proxy's files")
        );
    }

    #[test]
    fn the_registered_entry_maps_selecting_services_to_the_inbound_port() {
        let text = format!(
            "{BOOTSTRAP}---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{ name: reviews }}\nspec:\n  hosts: [reviews]\n  ports: [{{ number: 9080, name: http }}, {{ number: 9090, name: grpc-api }}]\n  resolution: STATIC\n  workloadSelector: {{ labels: {{ app: reviews }} }}\n---\n{}",
            se("ratings", 1)
        );
        let config = load_sources(&[Source::new("c.yaml", text)]).unwrap_or_else(|e| panic!("{e}"));
        let bootstrap = config.bootstrap().unwrap_or_else(|| panic!("bootstrap"));
        let entry = SelfEntry::new(
            bootstrap,
            "127.0.0.7:15006".parse().unwrap_or_else(|e| panic!("{e}")),
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(entry.key.name, "reviews-v1-127-0-0-7-15006");
        let yaml = entry.yaml(&config).unwrap_or_else(|| panic!("yaml"));
        // The entry is a valid WorkloadEntry that the ServiceEntry turns into endpoints.
        let with_entry = load_layered(
            &config,
            &[KeyedSource {
                id: resource_id(&entry.key).unwrap_or_else(|e| panic!("{e}")),
                source: Source::new("etcd:self", yaml.clone()),
            }],
        )
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let port = with_entry
            .config
            .services()
            .lookup("reviews", 9090)
            .unwrap_or_else(|| panic!("reviews:9090"));
        assert_eq!(port.endpoints.len(), 1);
        assert_eq!(
            port.endpoints[0].address,
            "127.0.0.7:15006".parse().unwrap_or_else(|e| panic!("{e}"))
        );
        assert_eq!(port.endpoints[0].labels.get("version"), Some("v1"));
        assert!(!yaml.contains("ratings"));
    }
}
