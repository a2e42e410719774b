//! Power of two choices: draw two distinct endpoints, send to the cheaper.
//!
//! Candidates are drawn in proportion to weight (the second among the others), and the first
//! one stands unless the second is cheaper, so when loads are equal (say, sequential requests
//! with nothing in flight) traffic splits exactly by weight. Under load the cost divides the
//! in-flight count by the weight, as Envoy's weighted least request does, so in-flight
//! requests settle in proportion to weight too:
//!
//! - `LEAST_REQUEST`: `1 + in_flight / weight` (Envoy's `active_requests + 1` with
//!   `active_request_bias` 1, normalised by weight).
//! - default: `peak_ewma × (1 + in_flight / weight)` (Linkerd's `rtt × (pending + 1)` with
//!   the same normalisation). Latency estimates within 5 % of each other count as equal:
//!   below that they differ by measurement noise and by how recently each endpoint was
//!   sampled (the estimate decays between samples), not by speed, and weights should decide.
//!
//! During slow start a candidate that is warming up is kept with probability equal to its
//! warmup factor and redrawn otherwise (a few times at most), which draws in proportion to
//! `weight × factor`; the factor also scales the weight in the cost.

use tokio::time::Instant;

use super::ewma::PeakEwma;
use super::picker::Node;
use super::random::Sampler;
use super::warmup::Warmup;

/// Latency estimates closer than this (relative) count as equal.
pub(crate) const EWMA_TOLERANCE: f64 = 0.05;

/// How often a warming candidate is redrawn before it is accepted anyway.
const MAX_REDRAWS: usize = 4;

/// A slow-start window in force, with the time it is evaluated at.
pub(crate) type Warming = Option<(Warmup, Instant)>;

/// The weight `node` counts with now.
pub(crate) fn effective_weight(node: &Node, warming: &Warming) -> f64 {
    let weight = f64::from(node.weight());
    match warming {
        Some((warmup, now)) => weight * node.state.warmup_factor(warmup, *now),
        None => weight,
    }
}

/// One candidate (other than `first`, if given), weight- and warmup-proportionally.
pub(crate) fn draw(
    nodes: &[Node],
    sampler: &Sampler,
    first: Option<usize>,
    warming: &Warming,
) -> usize {
    let sample = || match first {
        Some(first) => sampler.sample_other(first),
        None => sampler.sample(),
    };
    let mut i = sample();
    if let Some((warmup, now)) = warming {
        for _ in 0..MAX_REDRAWS {
            let factor = nodes[i].state.warmup_factor(warmup, *now);
            if factor >= 1.0 || fastrand::f64() < factor {
                break;
            }
            i = sample();
        }
    }
    i
}

/// A candidate and the weight it counts with now.
pub(crate) type Candidate<'a> = (&'a Node, f64);

/// Picks among at least two nodes: the first draw unless `prefer_second` says otherwise.
pub(crate) fn pick(
    nodes: &[Node],
    sampler: &Sampler,
    warming: &Warming,
    prefer_second: impl Fn(Candidate<'_>, Candidate<'_>) -> bool,
) -> usize {
    let a = draw(nodes, sampler, None, warming);
    let b = draw(nodes, sampler, Some(a), warming);
    let candidate = |i: usize| (&nodes[i], effective_weight(&nodes[i], warming));
    if prefer_second(candidate(a), candidate(b)) {
        b
    } else {
        a
    }
}

/// `1 + in_flight / weight`.
fn load((node, weight): Candidate<'_>) -> f64 {
    1.0 + f64::from(node.state.in_flight()) / weight
}

/// `LEAST_REQUEST`: the second if it has fewer requests in flight (per unit of weight).
pub(crate) fn least_request_prefers(a: Candidate<'_>, b: Candidate<'_>) -> bool {
    load(b) < load(a)
}

/// The default: the second if `ewma × load` is lower by more than the tolerance.
///
/// Both estimates decay at the same rate from their own timestamps, so their ratio is the
/// same whenever it is read: the comparison scales by the decay between the two stamps and
/// never reads the clock.
pub(crate) fn peak_ewma_prefers(a: Candidate<'_>, b: Candidate<'_>) -> bool {
    let (rtt_a, stamp_a) = a.0.state.ewma.raw();
    let (rtt_b, stamp_b) = b.0.state.ewma.raw();
    rtt_b * load(b)
        < (1.0 - EWMA_TOLERANCE) * rtt_a * load(a) * PeakEwma::decays_since(stamp_a, stamp_b)
}
