//! The pick code every balancer shares: an immutable list of nodes (identity, weight,
//! per-endpoint state) with what each policy precomputes over it.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tokio::time::Instant;

use super::maglev::Maglev;
use super::p2c::{self, Warming};
use super::policy::{Lb, Policy};
use super::random::{Sampler, effective};
use super::ring_hash::RingHash;
use super::round_robin::RoundRobin;
use super::state::EndpointState;
use super::warmup::Warmup;

/// One endpoint as a balancer sees it.
#[derive(Debug)]
pub(crate) struct Node {
    /// What consistent hashing hashes (`ip:port`, as Envoy).
    id: Box<str>,
    weight: u32,
    pub(crate) state: Arc<EndpointState>,
}

impl Node {
    pub(crate) fn new(id: impl Into<Box<str>>, weight: u32, state: Arc<EndpointState>) -> Node {
        Node {
            id: id.into(),
            weight: effective(weight),
            state,
        }
    }

    /// The weight, at least 1.
    pub(crate) fn weight(&self) -> u32 {
        self.weight
    }
}

/// A consistent-hash table built for one policy.
#[derive(Debug)]
enum HashTable {
    Ring(RingHash),
    Maglev(Maglev),
}

impl HashTable {
    fn build(policy: Policy, nodes: &[Node]) -> Option<HashTable> {
        let ids = nodes.iter().map(|n| (&*n.id, n.weight));
        match policy {
            Policy::RingHash { minimum_ring_size } => {
                Some(HashTable::Ring(RingHash::new(ids, minimum_ring_size)))
            }
            Policy::Maglev { table_size } => Some(HashTable::Maglev(Maglev::new(ids, table_size))),
            _ => None,
        }
    }

    fn policy(&self) -> Policy {
        match self {
            HashTable::Ring(r) => Policy::RingHash {
                minimum_ring_size: r.minimum_ring_size(),
            },
            HashTable::Maglev(m) => Policy::Maglev {
                table_size: m.len() as u64,
            },
        }
    }

    fn lookup(&self, hash: u64) -> Option<usize> {
        match self {
            HashTable::Ring(r) => r.lookup(hash),
            HashTable::Maglev(m) => m.lookup(hash),
        }
    }
}

/// A fixed set of nodes and the per-policy structures over it.
#[derive(Debug)]
pub(crate) struct Picker {
    nodes: Box<[Node]>,
    sampler: Sampler,
    /// The latest time a slow-starting node joined, if any did.
    newest: Option<Instant>,
    round_robin: RoundRobin,
    /// Built for the hash policy in use: on the first hashed pick, then by whoever builds the
    /// next picker (off the request path).
    table: ArcSwapOption<HashTable>,
}

impl Picker {
    pub(crate) fn new(nodes: Vec<Node>) -> Picker {
        let sampler = Sampler::new(nodes.iter().map(|n| n.weight));
        let newest = nodes.iter().filter_map(|n| n.state.added_at()).max();
        Picker {
            nodes: nodes.into(),
            sampler,
            newest,
            round_robin: RoundRobin::default(),
            table: ArcSwapOption::empty(),
        }
    }

    pub(crate) fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Builds the table `policy` needs now, if it needs one it lacks.
    pub(crate) fn prepare(&self, policy: Policy) {
        let current = self.table.load();
        if current.as_ref().is_some_and(|t| t.policy() == policy) {
            return;
        }
        if let Some(table) = HashTable::build(policy, &self.nodes) {
            self.table.store(Some(Arc::new(table)));
        }
    }

    /// The hash policy whose table is built, if any.
    pub(crate) fn table_policy(&self) -> Option<Policy> {
        self.table.load().as_ref().map(|t| t.policy())
    }

    /// The index of the node for the next request; `None` when there are none. `hash` is the
    /// request's key for hash policies (random when absent, as Envoy).
    pub(crate) fn pick(&self, lb: &Lb, hash: Option<u64>) -> Option<usize> {
        match self.nodes.len() {
            0 => return None,
            1 => return Some(0),
            _ => {}
        }
        let warming = lb.warmup.and_then(|w| self.warming(w));
        let nodes = &*self.nodes;
        Some(match lb.policy {
            Policy::PeakEwma => p2c::pick(nodes, &self.sampler, &warming, p2c::peak_ewma_prefers),
            Policy::LeastRequest => {
                p2c::pick(nodes, &self.sampler, &warming, p2c::least_request_prefers)
            }
            Policy::RoundRobin => self
                .round_robin
                .pick(nodes, self.sampler.is_uniform(), &warming),
            Policy::Random => self.sampler.sample(),
            Policy::RingHash { .. } | Policy::Maglev { .. } => {
                let hash = hash.unwrap_or_else(|| fastrand::u64(..));
                return self.lookup(lb.policy, hash);
            }
        })
    }

    fn lookup(&self, policy: Policy, hash: u64) -> Option<usize> {
        if let Some(table) = &*self.table.load()
            && table.policy() == policy
        {
            return table.lookup(hash);
        }
        self.prepare(policy);
        self.table.load().as_ref()?.lookup(hash)
    }

    /// The slow-start window in force now, if a node is still in it.
    fn warming(&self, warmup: Warmup) -> Warming {
        let newest = self.newest?;
        let now = Instant::now();
        (now.saturating_duration_since(newest) < warmup.duration()).then_some((warmup, now))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn nodes(epoch: Instant, weights: &[u32], warm: bool) -> Vec<Node> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let state = Arc::new(EndpointState::new(epoch, warm, Default::default()));
                Node::new(format!("10.0.0.{i}:80"), w, state)
            })
            .collect()
    }

    fn shares(picker: &Picker, lb: &Lb, picks: usize) -> Vec<usize> {
        let mut counts = vec![0; picker.nodes().len()];
        for _ in 0..picks {
            counts[picker.pick(lb, None).unwrap()] += 1;
        }
        counts
    }

    #[tokio::test(start_paused = true)]
    async fn warmup_ramps_a_new_endpoint_up() {
        fastrand::seed(3);
        let epoch = Instant::now();
        let mut all = nodes(epoch, &[1, 1], true);
        tokio::time::advance(Duration::from_secs(1)).await;
        all.extend(nodes(epoch, &[1], false));
        let picker = Picker::new(all);
        let warmup = Warmup::new(Duration::from_secs(100));
        for policy in [Policy::RoundRobin, Policy::LeastRequest] {
            let lb = Lb::new(policy, Some(warmup));
            // Just added: 10 % of a full weight, so 0.1 / 2.1 of the picks.
            let counts = shares(&picker, &lb, 21_000);
            assert!(counts[2].abs_diff(1_000) < 150, "{policy:?} {counts:?}");
        }
        tokio::time::advance(Duration::from_secs(50)).await;
        let lb = Lb::new(Policy::RoundRobin, Some(warmup));
        // Half way: 0.5 / 2.5 (the EDF keeps its schedule, so allow a little lag).
        let counts = shares(&picker, &lb, 25_000);
        assert!(counts[2].abs_diff(5_000) < 300, "{counts:?}");
        tokio::time::advance(Duration::from_secs(50)).await;
        // Warm: even.
        let counts = shares(&picker, &lb, 3_000);
        assert!(counts[2].abs_diff(1_000) < 30, "{counts:?}");
        // Random and hashing ignore slow start (Envoy supports it for RR and LR only).
        assert_eq!(Lb::new(Policy::Random, Some(warmup)).warmup, None);
    }

    #[tokio::test(start_paused = true)]
    async fn least_request_and_ewma_split_by_weight_when_idle() {
        fastrand::seed(5);
        let picker = Picker::new(nodes(Instant::now(), &[3, 1], true));
        for policy in [Policy::LeastRequest, Policy::PeakEwma, Policy::Random] {
            let counts = shares(&picker, &Lb::new(policy, None), 40_000);
            let ratio = counts[0] as f64 / counts[1] as f64;
            assert!((ratio - 3.0).abs() < 0.15, "{policy:?} {counts:?}");
        }
        let counts = shares(&picker, &Lb::new(Policy::RoundRobin, None), 4_000);
        assert_eq!(counts, [3_000, 1_000]);
    }

    #[test]
    fn tables_are_built_once_per_policy() {
        let picker = Picker::new(nodes(Instant::now(), &[1, 1, 1], true));
        assert_eq!(picker.table_policy(), None);
        let maglev = Lb::new(Policy::Maglev { table_size: 65537 }, None);
        let first = picker.pick(&maglev, Some(42));
        assert_eq!(picker.table_policy(), Some(maglev.policy));
        assert_eq!(picker.pick(&maglev, Some(42)), first);
        let ring = Lb::new(
            Policy::RingHash {
                minimum_ring_size: 1024,
            },
            None,
        );
        picker.pick(&ring, Some(42));
        assert_eq!(picker.table_policy(), Some(ring.policy));
    }
}
