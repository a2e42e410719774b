//! The live endpoint set of one (service port, subset): what discovery publishes, filtered by
//! the subset's labels, as an immutable snapshot the request path loads without locking.
//!
//! Rebuilds happen in a background task per set, never on the request path: the task waits on
//! the discovery watch and, on each change, builds a new snapshot (reusing the per-endpoint
//! state of every address it keeps, so in-flight counts and latency estimates carry over, and
//! prebuilding the consistent-hash table the old snapshot had, on the blocking pool) and
//! swaps it in. Requests
//! already sent keep their endpoint and their claim on its state; a removed endpoint simply
//! stops being picked while its requests drain. The task ends when the set is dropped.
//!
//! The first snapshot is built when the first request for the set arrives (it has to be: the
//! set is created then), and so is a hash table for a policy the set has not used before.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use mesh_core::Endpoint;
use mesh_core::discovery::{EndpointSet, EndpointWatch, ServiceKey};
use mesh_core::target::{EndpointTls, Subset};
use tokio::sync::oneshot;

use super::picker::{Node, Picker};
use super::policy::Policy;
use super::state::Registry;
use super::status::{ClusterStatus, EndpointStatus, Health};

/// One endpoint set at one moment.
#[derive(Debug)]
pub(crate) struct Snapshot {
    /// The endpoints, parallel to the picker's nodes.
    pub(crate) endpoints: Vec<Endpoint>,
    /// Each endpoint's TLS facts, computed once here rather than on every pick.
    pub(crate) tls: Vec<Option<Arc<EndpointTls>>>,
    pub(crate) picker: Picker,
}

/// The balancer of one (service port, subset).
#[derive(Debug)]
pub(crate) struct SubsetBalancer {
    pub(crate) key: ServiceKey,
    pub(crate) subset: Option<Arc<Subset>>,
    /// The route target's name (`host:port`, with the subset), for errors and `/clusters`.
    pub(crate) name: Arc<str>,
    snapshot: ArcSwap<Snapshot>,
    /// The policy of the latest request, for `/clusters`.
    policy: AtomicU8,
    registry: Arc<Registry>,
    /// Dropping it stops the rebuild task.
    _stop: Option<oneshot::Sender<()>>,
}

impl SubsetBalancer {
    /// A balancer over `watch`'s current set, rebuilt in the background on every change.
    ///
    /// Without a tokio runtime there is nobody to run the rebuilds: the set stays as it was
    /// (tower services here always run on one).
    pub(crate) fn start(
        key: ServiceKey,
        subset: Option<Arc<Subset>>,
        name: Arc<str>,
        mut watch: EndpointWatch,
        registry: Arc<Registry>,
        policy: Policy,
    ) -> Arc<SubsetBalancer> {
        let set = watch.borrow_and_update().clone();
        let first = build(
            &set,
            subset.as_deref(),
            &name,
            &registry,
            true,
            Some(policy),
        );
        let runtime = tokio::runtime::Handle::try_current();
        let (stop, stopped) = oneshot::channel();
        let balancer = Arc::new(SubsetBalancer {
            key,
            subset,
            name,
            snapshot: ArcSwap::from_pointee(first),
            policy: AtomicU8::new(policy_code(policy)),
            registry,
            _stop: runtime.is_ok().then_some(stop),
        });
        match runtime {
            Ok(handle) => {
                handle.spawn(follow(Arc::downgrade(&balancer), watch, stopped));
            }
            Err(_) => tracing::warn!(
                service = %balancer.name,
                "balancer created outside a tokio runtime: endpoint changes will not apply"
            ),
        }
        balancer
    }

    pub(crate) fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    /// Whether this balancer serves `subset` (the same one, or one with the same labels).
    pub(crate) fn serves(&self, port: u16, subset: Option<&Arc<Subset>>) -> bool {
        self.key.port == port
            && match (&self.subset, subset) {
                (None, None) => true,
                (Some(mine), Some(theirs)) => {
                    Arc::ptr_eq(mine, theirs)
                        || (mine.name == theirs.name && mine.labels == theirs.labels)
                }
                _ => false,
            }
    }

    pub(crate) fn note_policy(&self, policy: Policy) {
        let code = policy_code(policy);
        if self.policy.load(Ordering::Relaxed) != code {
            self.policy.store(code, Ordering::Relaxed);
        }
    }

    fn rebuild(&self, set: &EndpointSet) {
        let old = self.snapshot.load();
        let table = old.picker.table_policy();
        let next = build(
            set,
            self.subset.as_deref(),
            &self.name,
            &self.registry,
            false,
            table,
        );
        self.snapshot.store(Arc::new(next));
        self.registry.prune();
    }

    pub(crate) fn status(&self) -> ClusterStatus {
        let snapshot = self.snapshot.load();
        let now = tokio::time::Instant::now();
        let endpoints = snapshot
            .endpoints
            .iter()
            .zip(snapshot.picker.nodes())
            .map(|(endpoint, node)| EndpointStatus {
                address: endpoint.address,
                weight: node.weight(),
                in_flight: node.state.in_flight(),
                ewma_ms: node.state.ewma.get(now) / 1e6,
                health: if node.state.is_ejected(now) {
                    Health::Ejected
                } else {
                    Health::Healthy
                },
                labels: endpoint.labels.clone(),
            })
            .collect();
        ClusterStatus {
            name: self.name.to_string(),
            service: self.key.to_string(),
            subset: self.subset.as_ref().map(|s| s.name.clone()),
            policy: policy_name(self.policy.load(Ordering::Relaxed)),
            endpoints,
        }
    }
}

/// Builds a snapshot of `set` for `subset`, and records its members (under `name`) as the
/// base of outlier detection's `maxEjectionPercent`. `initial`: endpoints found now are warm
/// (no slow start). `table`: a hash policy whose table to build now.
fn build(
    set: &EndpointSet,
    subset: Option<&Subset>,
    name: &Arc<str>,
    registry: &Registry,
    initial: bool,
    table: Option<Policy>,
) -> Snapshot {
    let endpoints: Vec<Endpoint> = set
        .endpoints()
        .iter()
        .filter(|e| subset.is_none_or(|s| e.labels.matches(&s.labels)))
        .cloned()
        .collect();
    let nodes = endpoints
        .iter()
        .map(|e| {
            let state = registry.get_or_create(e.address, initial);
            Node::new(e.address.to_string(), e.weight, state)
        })
        .collect();
    registry
        .health
        .set_cluster(name.clone(), endpoints.iter().map(|e| e.address));
    let picker = Picker::new(nodes);
    if let Some(policy) = table {
        picker.prepare(policy);
    }
    let tls = endpoints.iter().map(EndpointTls::of).collect();
    Snapshot {
        endpoints,
        tls,
        picker,
    }
}

/// The rebuild task: one snapshot per change, until the balancer goes away.
async fn follow(
    balancer: Weak<SubsetBalancer>,
    mut watch: EndpointWatch,
    mut stopped: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            changed = watch.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = &mut stopped => return,
        }
        let Some(balancer) = balancer.upgrade() else {
            return;
        };
        let set = watch.borrow_and_update().clone();
        if balancer.snapshot.load().picker.table_policy().is_some() {
            // A hash table (Maglev for 1,000 endpoints: milliseconds) is built on the blocking
            // pool rather than on a worker serving requests.
            let _ = tokio::task::spawn_blocking(move || balancer.rebuild(&set)).await;
        } else {
            balancer.rebuild(&set);
        }
    }
}

const POLICIES: [Policy; 6] = [
    Policy::PeakEwma,
    Policy::LeastRequest,
    Policy::RoundRobin,
    Policy::Random,
    Policy::RingHash {
        minimum_ring_size: 0,
    },
    Policy::Maglev { table_size: 0 },
];

fn policy_code(policy: Policy) -> u8 {
    POLICIES
        .iter()
        .position(|p| std::mem::discriminant(p) == std::mem::discriminant(&policy))
        .unwrap_or(0) as u8
}

fn policy_name(code: u8) -> &'static str {
    POLICIES
        .get(usize::from(code))
        .copied()
        .unwrap_or_default()
        .as_str()
}
