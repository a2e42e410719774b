//! Host names kept resolved for `ServiceEntry` `resolution: DNS` endpoints.
//!
//! ```no_run
//! use std::collections::BTreeSet;
//!
//! use mesh_discovery::dns::{DnsProvider, DnsSettings};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let names = BTreeSet::from(["api.example.com".to_owned()]);
//! let (names_tx, names_rx) = tokio::sync::watch::channel(names);
//! let provider = DnsProvider::spawn(DnsSettings::default(), names_rx)?;
//!
//! let mut answers = provider.resolved();
//! answers.changed().await?;
//! for (name, addrs) in answers.borrow_and_update().iter() {
//!     println!("{name} -> {addrs:?}");
//! }
//!
//! // A config reload: `api.example.com` is forgotten, `db.example.com` resolved at once.
//! names_tx.send_replace(BTreeSet::from(["db.example.com".to_owned()]));
//! # Ok(())
//! # }
//! ```
//!
//! The behaviour follows Envoy's `STRICT_DNS` clusters with Istio's `respect_dns_ttl`:
//!
//! - Every name is looked up for A and AAAA records; the addresses are sorted and deduplicated
//!   so that two equal answers compare equal and [`DnsProvider::resolved`] changes only when a
//!   name's address *set* changes, not when a server rotates its record order.
//! - IP literals (`10.0.0.1`, `::1`) stand for themselves: no query, never re-resolved.
//! - A name is re-resolved when its answer expires, the TTL clamped to
//!   [`DnsSettings::min_ttl`]..=[`DnsSettings::max_ttl`]: the floor keeps a zero-TTL record from
//!   turning into a query loop, the ceiling bounds how stale an endpoint can be (Istio's
//!   `dnsRefreshRate`).
//! - A failed lookup (timeout, SERVFAIL, NXDOMAIN, an answer without addresses) keeps the last
//!   good addresses: dropping every endpoint of a service because its DNS server hiccuped would
//!   turn a DNS outage into a traffic outage. A name never resolved has no entry. Retries back off
//!   from `min_ttl`, doubling up to `max_ttl`, so a dead server is not hammered.
//! - Each lookup runs in a task of its own, so a slow or silent server for one name does not
//!   delay any other; one coordinating task owns the answers, so no lock is ever held across an
//!   `.await`.
//! - hickory's response cache is disabled (size 0): we ask for a name only when its previous
//!   answer has expired, so a cache would never serve us a useful hit, while a cached answer whose
//!   TTL outlived our clamp would hide a change at the server.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig,
};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinError, JoinHandle, JoinSet};
use tracing::{debug, warn};

/// Where and how names are resolved.
#[derive(Clone, Debug)]
pub struct DnsSettings {
    /// Name servers (UDP+TCP on these socket addresses); empty: the system's (/etc/resolv.conf).
    pub nameservers: Vec<SocketAddr>,
    /// Floor applied to answer TTLs before re-resolving; also the first retry delay after a
    /// failure. Must be non-zero.
    pub min_ttl: Duration,
    /// Ceiling applied to answer TTLs before re-resolving (Istio's `dnsRefreshRate`); also the
    /// longest retry delay and the longest wait for one query attempt.
    pub max_ttl: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(60),
        }
    }
}

/// The last good addresses of every name asked for.
pub type Resolved = Arc<BTreeMap<String, Vec<IpAddr>>>;

/// Why a [`DnsProvider`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// `min_ttl` is zero or above `max_ttl`.
    #[error(
        "DNS settings: min_ttl ({min_ttl:?}) must be non-zero and at most max_ttl ({max_ttl:?})"
    )]
    InvalidTtl {
        /// The configured floor.
        min_ttl: Duration,
        /// The configured ceiling.
        max_ttl: Duration,
    },
    /// [`DnsProvider::spawn`] was called outside a Tokio runtime.
    #[error("the DNS provider must be started from within a Tokio runtime")]
    NoRuntime,
    /// No name servers were configured and the system's resolver configuration could not be read.
    #[error("cannot read the system resolver configuration ({SYSTEM_CONFIG}): {0}")]
    SystemConfig(#[source] NetError),
    /// The resolver could not be built from the configuration.
    #[error("cannot build the DNS resolver: {0}")]
    Build(#[source] NetError),
}

/// Where hickory reads the system configuration from, named in errors.
#[cfg(windows)]
const SYSTEM_CONFIG: &str = "the Windows registry";
#[cfg(not(windows))]
const SYSTEM_CONFIG: &str = "/etc/resolv.conf";

/// Keeps a changing set of host names resolved in a background task; dropping it stops the task
/// (and closes the [`resolved`](DnsProvider::resolved) watches).
#[derive(Debug)]
pub struct DnsProvider {
    answers: Arc<watch::Sender<Resolved>>,
    task: JoinHandle<()>,
}

impl DnsProvider {
    /// Starts resolving. `names` is the set of host names to keep resolved (it changes on config
    /// reload; a name dropped from it is forgotten, a new one resolved at once). If the sender of
    /// `names` is dropped, the last set stays resolved.
    ///
    /// Must be called from within a Tokio runtime.
    pub fn spawn(
        settings: DnsSettings,
        names: watch::Receiver<BTreeSet<String>>,
    ) -> Result<DnsProvider, DnsError> {
        if settings.min_ttl.is_zero() || settings.min_ttl > settings.max_ttl {
            return Err(DnsError::InvalidTtl {
                min_ttl: settings.min_ttl,
                max_ttl: settings.max_ttl,
            });
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| DnsError::NoRuntime)?;
        let resolver = build_resolver(&settings)?;
        let (tx, _) = watch::channel(Resolved::default());
        let answers = Arc::new(tx);
        let worker = Worker {
            resolver,
            min_ttl: settings.min_ttl,
            max_ttl: settings.max_ttl,
            names: BTreeSet::new(),
            answers: BTreeMap::new(),
            scheduled: HashMap::new(),
            lookups: JoinSet::new(),
            publish: Arc::clone(&answers),
        };
        let task = runtime.spawn(worker.run(names));
        Ok(DnsProvider { answers, task })
    }

    /// A watch of the answers: changes (only) when some name's address set changes.
    pub fn resolved(&self) -> watch::Receiver<Resolved> {
        self.answers.subscribe()
    }
}

impl Drop for DnsProvider {
    fn drop(&mut self) {
        // Dropping the worker drops its JoinSet, which aborts every lookup in flight.
        self.task.abort();
    }
}

fn build_resolver(settings: &DnsSettings) -> Result<TokioResolver, DnsError> {
    let mut builder = if settings.nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(DnsError::SystemConfig)?
    } else {
        let servers = settings
            .nameservers
            .iter()
            .map(|addr| {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                // TCP for truncated answers, as with the system's servers.
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
    };
    let options = builder.options_mut();
    // See the module doc: we query only on expiry, so a cache could only hide changes.
    options.cache_size = 0;
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    // A query attempt outliving the refresh period would hold back the next refresh (and, when
    // the server is silent, the retries); with the default 60 s ceiling this keeps hickory's
    // (or resolv.conf's) timeout.
    options.timeout = options.timeout.min(settings.max_ttl);
    builder.build().map_err(DnsError::Build)
}

/// Why one lookup produced no addresses.
#[derive(Debug, thiserror::Error)]
enum LookupError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("the answer holds no A or AAAA record")]
    Empty,
    #[error("the lookup task panicked")]
    Panicked,
}

/// What a lookup task returns: its name (so the worker can tell which finished) and outcome.
type Outcome = (String, Result<Answer, LookupError>);

/// A good answer: its addresses (sorted, deduplicated, non-empty) and how long it is valid.
#[derive(Debug)]
struct Answer {
    addrs: Vec<IpAddr>,
    ttl: Duration,
}

/// The next lookup of a name that is not an IP literal.
#[derive(Debug)]
struct Scheduled {
    /// The task sleeping until the lookup is due, then running it. A finished task whose id is
    /// not this one's is stale (its name was dropped, maybe re-added) and is ignored.
    task: AbortHandle,
    /// How long to wait before retrying if this lookup fails.
    backoff: Duration,
}

/// The background task: owns the answers, schedules one lookup task per name.
struct Worker {
    resolver: TokioResolver,
    min_ttl: Duration,
    max_ttl: Duration,
    /// The names asked for, IP literals included.
    names: BTreeSet<String>,
    /// The last good addresses; published as [`Resolved`].
    answers: BTreeMap<String, Vec<IpAddr>>,
    /// Names resolved by query (not IP literals) and their pending lookups.
    scheduled: HashMap<String, Scheduled>,
    lookups: JoinSet<Outcome>,
    publish: Arc<watch::Sender<Resolved>>,
}

impl Worker {
    async fn run(mut self, mut names: watch::Receiver<BTreeSet<String>>) {
        // Cloned out so that the watch's read lock is released before anything else runs.
        let initial = names.borrow_and_update().clone();
        self.set_names(initial);
        let mut names_open = true;
        loop {
            tokio::select! {
                changed = names.changed(), if names_open => match changed {
                    Ok(()) => {
                        let wanted = names.borrow_and_update().clone();
                        self.set_names(wanted);
                    }
                    Err(_) => {
                        debug!("DNS name set sender dropped; keeping the last set resolved");
                        names_open = false;
                    }
                },
                Some(joined) = self.lookups.join_next_with_id() => self.on_lookup_done(joined),
                // Neither new names nor lookups can come: the answers are final.
                else => return,
            }
        }
    }

    fn set_names(&mut self, wanted: BTreeSet<String>) {
        let mut changed = false;
        for gone in self.names.difference(&wanted) {
            if let Some(scheduled) = self.scheduled.remove(gone) {
                scheduled.task.abort();
            }
            changed |= self.answers.remove(gone).is_some();
        }
        let added: Vec<String> = wanted.difference(&self.names).cloned().collect();
        for new in added {
            if let Ok(ip) = new.parse::<IpAddr>() {
                self.answers.insert(new, vec![ip]);
                changed = true;
            } else {
                self.schedule(new, Duration::ZERO, self.min_ttl);
            }
        }
        self.names = wanted;
        if changed {
            self.publish();
        }
    }

    fn schedule(&mut self, name: String, delay: Duration, backoff: Duration) {
        let resolver = self.resolver.clone();
        let task = self
            .lookups
            .spawn(lookup_after(resolver, name.clone(), delay));
        self.scheduled.insert(name, Scheduled { task, backoff });
    }

    fn on_lookup_done(&mut self, joined: Result<(tokio::task::Id, Outcome), JoinError>) {
        let (id, name, outcome) = match joined {
            Ok((id, (name, outcome))) => (id, name, outcome),
            // Aborted because its name was dropped: nothing to do.
            Err(err) if err.is_cancelled() => return,
            Err(err) => {
                let id = err.id();
                let Some(name) = self
                    .scheduled
                    .iter()
                    .find(|(_, scheduled)| scheduled.task.id() == id)
                    .map(|(name, _)| name.clone())
                else {
                    return;
                };
                (id, name, Err(LookupError::Panicked))
            }
        };
        let Some(scheduled) = self.scheduled.get(&name) else {
            return;
        };
        if scheduled.task.id() != id {
            return;
        }
        match outcome {
            Ok(answer) => {
                let next = answer.ttl.clamp(self.min_ttl, self.max_ttl);
                debug!(%name, addrs = ?answer.addrs, refresh_in = ?next, "DNS name resolved");
                if self.answers.get(&name) != Some(&answer.addrs) {
                    self.answers.insert(name.clone(), answer.addrs);
                    self.publish();
                }
                self.schedule(name, next, self.min_ttl);
            }
            Err(error) => {
                let retry_in = scheduled.backoff;
                let kept = self.answers.get(&name).map(Vec::len).unwrap_or(0);
                warn!(
                    %name,
                    %error,
                    ?retry_in,
                    kept_addresses = kept,
                    "DNS lookup failed; keeping the last good addresses"
                );
                let next_backoff = retry_in.saturating_mul(2).min(self.max_ttl);
                self.schedule(name, retry_in, next_backoff);
            }
        }
    }

    fn publish(&self) {
        // send_replace, not send: the answers must stay current for the next subscriber even
        // while nobody is watching.
        self.publish.send_replace(Arc::new(self.answers.clone()));
    }
}

/// Waits `delay`, then resolves `name`.
async fn lookup_after(resolver: TokioResolver, name: String, delay: Duration) -> Outcome {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let outcome = lookup(&resolver, &name).await;
    (name, outcome)
}

async fn lookup(resolver: &TokioResolver, name: &str) -> Result<Answer, LookupError> {
    let answer = resolver.lookup_ip(name).await?;
    let mut addrs: Vec<IpAddr> = answer.iter().collect();
    addrs.sort_unstable();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(LookupError::Empty);
    }
    // hickory derives `valid_until` from the smallest TTL of the answer's A/AAAA and CNAME
    // records (without a cache nothing else shortens it); /etc/hosts entries are valid for a day,
    // which the ceiling brings down to `max_ttl`.
    let ttl = answer
        .valid_until()
        .saturating_duration_since(Instant::now());
    Ok(Answer { addrs, ttl })
}
