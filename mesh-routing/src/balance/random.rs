//! Weighted random sampling: `RANDOM`'s pick, and the candidate draws of power of two
//! choices.
//!
//! Equal weights (the common case) draw an index uniformly. Otherwise the weights' prefix
//! sums are computed once per endpoint set and a draw is one random number and a binary
//! search (about ten steps for 1,000 endpoints). A second, distinct candidate is drawn from
//! the other endpoints by skipping the first one's span of the prefix sums, so it too is
//! exactly weight-proportional.

/// Draws endpoint indexes with probability proportional to their weights.
#[derive(Clone, Debug)]
pub(crate) enum Sampler {
    Uniform { len: usize },
    Weighted { cumulative: Box<[u64]> },
}

impl Sampler {
    /// A sampler over weights (0 counts as 1, as every endpoint must be reachable).
    pub(crate) fn new(weights: impl ExactSizeIterator<Item = u32> + Clone) -> Sampler {
        let len = weights.len();
        let mut iter = weights.clone().map(effective);
        let uniform = match iter.next() {
            Some(first) => iter.all(|w| w == first),
            None => true,
        };
        if uniform {
            return Sampler::Uniform { len };
        }
        let mut total = 0u64;
        let cumulative = weights
            .map(|w| {
                total += u64::from(effective(w));
                total
            })
            .collect();
        Sampler::Weighted { cumulative }
    }

    pub(crate) fn is_uniform(&self) -> bool {
        matches!(self, Sampler::Uniform { .. })
    }

    fn len(&self) -> usize {
        match self {
            Sampler::Uniform { len } => *len,
            Sampler::Weighted { cumulative } => cumulative.len(),
        }
    }

    /// One index, weight-proportionally. The set must not be empty.
    pub(crate) fn sample(&self) -> usize {
        match self {
            Sampler::Uniform { len } => fastrand::usize(..*len),
            Sampler::Weighted { cumulative } => {
                let total = cumulative.last().copied().unwrap_or(1);
                find(cumulative, fastrand::u64(..total))
            }
        }
    }

    /// An index other than `first`, weight-proportionally among the others. The set must
    /// have at least two endpoints.
    pub(crate) fn sample_other(&self, first: usize) -> usize {
        match self {
            Sampler::Uniform { len } => {
                let i = fastrand::usize(..len.saturating_sub(1).max(1));
                if i >= first { i + 1 } else { i }
            }
            Sampler::Weighted { cumulative } => {
                let end = cumulative[first];
                let start = if first == 0 { 0 } else { cumulative[first - 1] };
                let total = cumulative.last().copied().unwrap_or(1);
                let mut x = fastrand::u64(..(total - (end - start)).max(1));
                if x >= start {
                    x += end - start;
                }
                find(cumulative, x).min(self.len() - 1)
            }
        }
    }
}

/// The weight an endpoint counts with.
pub(crate) fn effective(weight: u32) -> u32 {
    weight.max(1)
}

/// The index whose span of the prefix sums contains `x`.
fn find(cumulative: &[u64], x: u64) -> usize {
    cumulative.partition_point(|&c| c <= x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(sampler: &Sampler, n: usize, draws: usize, other: Option<usize>) -> Vec<f64> {
        let mut counts = vec![0usize; n];
        for _ in 0..draws {
            let i = match other {
                Some(first) => sampler.sample_other(first),
                None => sampler.sample(),
            };
            counts[i] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    #[test]
    fn weighted_draws_follow_weights() {
        fastrand::seed(7);
        let sampler = Sampler::new([3u32, 1, 0, 4].into_iter());
        assert!(!sampler.is_uniform());
        let s = shares(&sampler, 4, 90_000, None);
        for (share, want) in s.iter().zip([3.0 / 9.0, 1.0 / 9.0, 1.0 / 9.0, 4.0 / 9.0]) {
            assert!((share - want).abs() < 0.01, "{s:?}");
        }
        // Excluding index 3 leaves 3:1:1 among the rest.
        let s = shares(&sampler, 4, 50_000, Some(3));
        assert_eq!(s[3], 0.0);
        for (share, want) in s.iter().zip([0.6, 0.2, 0.2]) {
            assert!((share - want).abs() < 0.01, "{s:?}");
        }
    }

    #[test]
    fn uniform_draws_exclude_the_first() {
        fastrand::seed(7);
        let sampler = Sampler::new([2u32, 2, 2].into_iter());
        assert!(sampler.is_uniform());
        let s = shares(&sampler, 3, 30_000, Some(0));
        assert_eq!(s[0], 0.0);
        assert!((s[1] - 0.5).abs() < 0.02, "{s:?}");
    }
}
