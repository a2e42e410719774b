use std::fmt::Write;

use xxhash_rust::xxh64::xxh64;

use super::policy::MAX_RING_SIZE;
use super::random::effective;

/// Ring hash (Ketama), built as Envoy builds it.
///
/// Each endpoint gets points on a 64-bit ring in proportion to its weight: with normalised
/// weights `wᵢ` (summing to 1) the ring has `scale = ceil(min(wᵢ) · minimum_ring_size) /
/// min(wᵢ)` points (at most 8 Mi), so the lightest endpoint still gets
/// `ceil(min(wᵢ) · minimum_ring_size)` of them, and endpoint `i` gets its share of `scale`
/// (points are handed out against a running target, so the total is exact). Point `j` of an
/// endpoint hashes `"<address>_<j>"` with xxHash64 (seed 0). A request hash goes to the first
/// point at or after it, wrapping around.
///
/// Since the ring size follows the lightest endpoint's share, the number of points per
/// endpoint changes with the set (four equal endpoints get 256 points each, five get 205), so
/// a change moves more than the keys it must: adding a fifth endpoint to four moves about
/// 30 % of the keys, a third of them between the old endpoints. Envoy's ring behaves the
/// same; [`Maglev`](super::Maglev) moves far fewer.
///
/// ```
/// use mesh_routing::balance::RingHash;
///
/// let ring = RingHash::new([("10.0.0.1:80", 1), ("10.0.0.2:80", 1)], 1024);
/// assert_eq!(ring.len(), 1024);
/// let node = ring.lookup(0xdead_beef).unwrap();
/// assert_eq!(ring.lookup(0xdead_beef), Some(node));
/// ```
#[derive(Clone)]
pub struct RingHash {
    minimum_ring_size: u64,
    /// Point hashes, sorted.
    hashes: Box<[u64]>,
    /// The node index of each point.
    nodes: Box<[u32]>,
}

impl std::fmt::Debug for RingHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingHash")
            .field("points", &self.hashes.len())
            .finish()
    }
}

impl RingHash {
    /// A ring over `(address, weight)` nodes (weight 0 counts as 1); `lookup` answers indexes
    /// into this sequence.
    pub fn new<'a>(
        nodes: impl IntoIterator<Item = (&'a str, u32)>,
        minimum_ring_size: u64,
    ) -> RingHash {
        let nodes: Vec<(&str, u64)> = nodes
            .into_iter()
            .map(|(id, w)| (id, u64::from(effective(w))))
            .collect();
        let total: u64 = nodes.iter().map(|(_, w)| w).sum();
        let Some(min_weight) = nodes.iter().map(|(_, w)| *w).min() else {
            return RingHash {
                minimum_ring_size,
                hashes: Box::new([]),
                nodes: Box::new([]),
            };
        };
        let min_normalized = min_weight as f64 / total as f64;
        let scale = ((min_normalized * minimum_ring_size.max(1) as f64).ceil() / min_normalized)
            .min(MAX_RING_SIZE as f64);

        let mut points: Vec<(u64, u32)> = Vec::with_capacity(scale.ceil() as usize);
        let mut key = String::new();
        let mut target = 0.0;
        let mut current = 0.0;
        for (index, (id, weight)) in nodes.iter().enumerate() {
            target += scale * (*weight as f64 / total as f64);
            let mut j = 0u64;
            while current < target {
                key.clear();
                // Writing to a String cannot fail.
                let _ = write!(key, "{id}_{j}");
                points.push((xxh64(key.as_bytes(), 0), index as u32));
                j += 1;
                current += 1.0;
            }
        }
        points.sort_unstable();
        let (hashes, nodes) = points.into_iter().unzip::<_, _, Vec<_>, Vec<_>>();
        RingHash {
            minimum_ring_size,
            hashes: hashes.into(),
            nodes: nodes.into(),
        }
    }

    /// The node owning `hash`; `None` for an empty ring.
    pub fn lookup(&self, hash: u64) -> Option<usize> {
        let i = self.hashes.partition_point(|&h| h < hash);
        let i = if i == self.hashes.len() { 0 } else { i };
        self.nodes.get(i).map(|&n| n as usize)
    }

    /// The minimum ring size it was built for.
    pub fn minimum_ring_size(&self) -> u64 {
        self.minimum_ring_size
    }

    /// The number of points.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_follow_weights() {
        let ring = RingHash::new([("a:1", 3), ("b:1", 1)], 1024);
        // The lighter one gets the minimum ring size's share: 256 of 1024.
        assert_eq!(ring.len(), 1024);
        let a = ring.nodes.iter().filter(|&&n| n == 0).count();
        assert_eq!(a, 768);
        let ring = RingHash::new([("a:1", 1); 1000].iter().copied(), 1024);
        assert_eq!(ring.len(), 2000);
        assert!(RingHash::new([], 1024).lookup(1).is_none());
    }

    #[test]
    fn lookup_takes_the_next_point_and_wraps() {
        let ring = RingHash::new([("a:1", 1), ("b:1", 1)], 4);
        let first = ring.hashes[0];
        let last = ring.hashes[ring.len() - 1];
        assert_eq!(ring.lookup(first), Some(ring.nodes[0] as usize));
        assert_eq!(ring.lookup(last + 1), Some(ring.nodes[0] as usize));
        assert_eq!(
            ring.lookup(first + 1),
            Some(ring.nodes[1] as usize),
            "the point after the first"
        );
    }
}
