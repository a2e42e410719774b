//! Round robin, as Envoy does it.
//!
//! With equal weights and nobody slow-starting: an atomic counter (starting at a random
//! offset, so that proxies do not all hit the first endpoint together). Otherwise
//! earliest-deadline-first (Envoy's EDF scheduler): each endpoint is due every
//! `1 / weight` units of virtual time; a pick takes the endpoint due first and schedules it
//! again `1 / weight` later, with the weight (times its warmup factor) read at that moment.
//! Weights 3:1 give three `a` and one `b` in every period, exactly. A pick is `O(log n)` under a mutex
//! held for the heap operation only.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::p2c::{Warming, effective_weight};
use super::picker::Node;

/// Round-robin state of one endpoint set.
#[derive(Debug)]
pub(crate) struct RoundRobin {
    next: AtomicUsize,
    edf: Mutex<Option<Edf>>,
}

impl Default for RoundRobin {
    fn default() -> Self {
        RoundRobin {
            next: AtomicUsize::new(fastrand::usize(..)),
            edf: Mutex::new(None),
        }
    }
}

impl RoundRobin {
    /// Picks among a non-empty set.
    pub(crate) fn pick(&self, nodes: &[Node], uniform: bool, warming: &Warming) -> usize {
        if uniform && warming.is_none() {
            return self.next.fetch_add(1, Ordering::Relaxed) % nodes.len();
        }
        let weight = |i: usize| effective_weight(&nodes[i], warming).max(f64::MIN_POSITIVE);
        let mut edf = self.edf.lock().unwrap_or_else(|p| p.into_inner());
        edf.get_or_insert_with(|| Edf::new(nodes.len(), weight))
            .pick(weight)
    }
}

/// Earliest-deadline-first over `1 / weight` periods.
#[derive(Debug)]
struct Edf {
    heap: BinaryHeap<Entry>,
    /// Insertion order, so equal deadlines go first come, first served.
    seq: u64,
}

#[derive(Debug)]
struct Entry {
    deadline: f64,
    seq: u64,
    index: usize,
}

impl Edf {
    fn new(len: usize, weight: impl Fn(usize) -> f64) -> Edf {
        let mut edf = Edf {
            heap: BinaryHeap::with_capacity(len),
            seq: 0,
        };
        for index in 0..len {
            edf.push(1.0 / weight(index), index);
        }
        edf
    }

    fn push(&mut self, deadline: f64, index: usize) {
        self.seq += 1;
        self.heap.push(Entry {
            deadline,
            seq: self.seq,
            index,
        });
    }

    fn pick(&mut self, weight: impl Fn(usize) -> f64) -> usize {
        let Some(entry) = self.heap.pop() else {
            return 0;
        };
        self.push(entry.deadline + 1.0 / weight(entry.index), entry.index);
        entry.index
    }
}

// A min-heap on (deadline, seq): reversed.
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        other
            .deadline
            .total_cmp(&self.deadline)
            .then(other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}

impl Eq for Entry {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edf_interleaves_by_weight() {
        let weights = [3.0, 1.0];
        let mut edf = Edf::new(2, |i| weights[i]);
        let picks: Vec<usize> = (0..400).map(|_| edf.pick(|i| weights[i])).collect();
        // Ties go to the endpoint scheduled first.
        assert_eq!(picks[..4], [0, 0, 1, 0]);
        for period in picks.chunks(4) {
            assert_eq!(period.iter().filter(|&&i| i == 1).count(), 1, "{picks:?}");
        }
    }
}
