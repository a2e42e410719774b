//! Discovery beyond the proxy's files: resources from etcd layered over them, DNS answers
//! for `resolution: DNS` services, and this workload's own `WorkloadEntry` published in
//! etcd while it is ready.
//!
//! How the layers combine (see `mesh_core::config::load_layered`):
//! - The proxy's **files are the base** and win a conflict: a stored resource with the kind,
//!   namespace and name of a file's is left out (logged once per change). A Bootstrap is
//!   never taken from etcd.
//! - Every stored resource is validated exactly as files are, together with everything else.
//!   One that fails is **left out alone** — logged with its key and errors, counted as a
//!   rejected reload — and the rest applies; a changed resource that fails keeps its last
//!   good version in force, like a file does. Only when the files themselves fail is the
//!   whole change rejected.
//! - etcd snapshots are full pictures at one revision (`mesh_discovery::etcd`), so applying
//!   one twice changes nothing, and a resync after a compaction or a reconnect cannot miss a
//!   deletion.
//! - Losing etcd changes nothing here: the last applied layer stays in force, `/ready` stays
//!   200, and `mesh_etcd_sync_age_seconds` grows until the watch is back.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
#[cfg(feature = "etcd")]
use std::time::Duration;

use mesh_core::Endpoint;
use mesh_core::config::MeshConfig;
use tokio::task::JoinHandle;

#[cfg(feature = "etcd")]
pub(crate) mod store;

#[cfg(feature = "etcd")]
pub use store::{etcd_options, resource_key};

/// Why discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot register this workload: {0}")]
    Register(String),
    #[error(
        "the Bootstrap names discovery.etcd, but this build has no etcd support (cargo feature `etcd` of mesh-proxy)"
    )]
    EtcdNotBuilt,
    #[error("cannot read the etcd password file {path}: {source}")]
    PasswordFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

// ---------------------------------------------------------------------------------------
// DNS

/// The DNS names `config` needs resolved.
pub(crate) fn dns_names(config: &MeshConfig) -> BTreeSet<String> {
    config
        .services()
        .iter()
        .flat_map(|port| port.dns_endpoints.iter().map(|d| d.host.clone()))
        .collect()
}

/// A DNS service port's endpoints: each name's last good addresses, with the port, labels,
/// weight and service account of its entry.
pub(crate) fn dns_endpoints(
    port: &mesh_core::config::ServicePort,
    resolved: &BTreeMap<String, Vec<IpAddr>>,
) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for entry in &port.dns_endpoints {
        let Some(addresses) = resolved.get(&entry.host) else {
            continue;
        };
        for ip in addresses {
            out.push(Endpoint {
                address: SocketAddr::new(*ip, entry.port),
                labels: entry.labels.clone(),
                weight: entry.weight,
                service_account: entry.service_account.clone(),
            });
        }
    }
    out
}

/// How long a starting proxy waits for etcd's first snapshot before it reports ready on
/// its files alone (the watch keeps trying and applies the store when it arrives).
#[cfg(feature = "etcd")]
const FIRST_SYNC_WAIT: Duration = Duration::from_secs(2);

/// The discovery tasks of a running proxy.
#[derive(Debug, Default)]
pub(crate) struct DiscoveryTasks {
    dns: Option<mesh_discovery::dns::DnsProvider>,
    #[cfg(feature = "etcd")]
    watch: Option<mesh_discovery::etcd::ResourceWatch>,
    #[cfg(feature = "etcd")]
    registration: Option<mesh_discovery::etcd::Registration>,
    tasks: Vec<JoinHandle<()>>,
}

impl DiscoveryTasks {
    /// Starts DNS resolution, the etcd watch (waiting briefly for its first snapshot) and
    /// this workload's registration, for a proxy whose inbound listener is `inbound`.
    pub(crate) async fn start(
        shared: &Arc<crate::proxy::Shared>,
        inbound: Option<SocketAddr>,
        identity: Option<&mesh_core::Identity>,
    ) -> Result<DiscoveryTasks, DiscoveryError> {
        let config = shared.config();
        let Some(bootstrap) = config.bootstrap() else {
            return Ok(DiscoveryTasks::default());
        };
        let mut out = DiscoveryTasks::default();

        let dns = bootstrap.dns();
        let settings = mesh_discovery::dns::DnsSettings {
            nameservers: dns.nameservers.clone(),
            min_ttl: dns.min_ttl.get(),
            max_ttl: dns.max_ttl.get(),
        };
        match mesh_discovery::dns::DnsProvider::spawn(settings, shared.dns_names()) {
            Ok(provider) => {
                let mut resolved = provider.resolved();
                let target = shared.clone();
                out.tasks.push(tokio::spawn(async move {
                    loop {
                        let answers = resolved.borrow_and_update().clone();
                        target.apply_dns(answers);
                        if resolved.changed().await.is_err() {
                            return;
                        }
                    }
                }));
                out.dns = Some(provider);
            }
            // Without a resolver, DNS services have no endpoints (their requests fail as
            // `UH`), and everything else works.
            Err(e) => tracing::error!("DNS resolution is unavailable: {e}"),
        }

        if bootstrap.etcd().is_some() {
            out.start_etcd(shared, bootstrap, inbound, identity).await?;
        }
        Ok(out)
    }

    #[cfg(not(feature = "etcd"))]
    async fn start_etcd(
        &mut self,
        _: &Arc<crate::proxy::Shared>,
        _: &mesh_core::config::Bootstrap,
        _: Option<SocketAddr>,
        _: Option<&mesh_core::Identity>,
    ) -> Result<(), DiscoveryError> {
        Err(DiscoveryError::EtcdNotBuilt)
    }

    #[cfg(feature = "etcd")]
    async fn start_etcd(
        &mut self,
        shared: &Arc<crate::proxy::Shared>,
        bootstrap: &mesh_core::config::Bootstrap,
        inbound: Option<SocketAddr>,
        identity: Option<&mesh_core::Identity>,
    ) -> Result<(), DiscoveryError> {
        let Some(etcd) = bootstrap.etcd() else {
            return Ok(());
        };
        let options = store::etcd_options(etcd)?;
        let watch = mesh_discovery::etcd::ResourceWatch::spawn(options.clone());
        let mut snapshots = watch.snapshots();
        let synced = tokio::time::timeout(FIRST_SYNC_WAIT, snapshots.wait_for(Option::is_some))
            .await
            .is_ok_and(|r| r.is_ok());
        if !synced {
            tracing::warn!(endpoints = ?etcd.endpoints, "etcd has not answered yet: serving the files alone until it does");
        }
        let target = shared.clone();
        self.tasks.push(tokio::spawn(async move {
            loop {
                let snapshot = snapshots.borrow_and_update().clone();
                if let Some(snapshot) = snapshot {
                    target.apply_store(&snapshot);
                }
                if snapshots.changed().await.is_err() {
                    return;
                }
            }
        }));
        self.tasks.push(store::track_sync_age(
            watch.last_sync(),
            store::register_sync_age(&shared.telemetry().metrics),
        ));
        self.watch = Some(watch);

        match (&bootstrap.spec.register, inbound) {
            (Some(register), Some(inbound)) => {
                let entry = store::SelfEntry::new(bootstrap, inbound, identity)
                    .map_err(DiscoveryError::Register)?;
                let (value, rx) = store::RegistrationValue::new(entry);
                value.update(&shared.config(), false);
                let key = value.key().clone();
                shared.set_registration(value);
                self.registration = Some(mesh_discovery::etcd::Registration::spawn(
                    options,
                    key,
                    register.ttl.get(),
                    rx,
                ));
            }
            (Some(_), None) => {
                tracing::warn!("register needs an inbound listener to publish; not registering")
            }
            _ => {}
        }
        Ok(())
    }

    /// Withdraws the registration (its key disappears at once) and stops every task.
    pub(crate) async fn stop(self) {
        #[cfg(feature = "etcd")]
        if let Some(registration) = self.registration {
            registration.withdraw().await;
        }
        for task in self.tasks {
            task.abort();
        }
    }
}
