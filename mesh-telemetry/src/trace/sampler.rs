//! Parent-based sampling with a percentage for new traces.
//!
//! Istio's rule (and OpenTelemetry's `ParentBased(TraceIdRatioBased)`): a caller's decision
//! stands, so a trace is recorded whole or not at all; only where no decision came in (a new
//! trace, or a B3 context that defers) does this proxy's `sampling` percentage decide.
//!
//! The percentage is applied to the trace id, with OpenTelemetry's `TraceIdRatioBased` formula
//! (the low 63 bits of the id against `ratio × 2⁶³`), so every proxy that defers on the same
//! trace with the same percentage reaches the same decision, and no random draw is needed:
//! a new trace id is random already.

use opentelemetry::trace::TraceId;

/// The sampling decision for requests; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sampler {
    /// Sample when the trace id's low 63 bits are below this (2^63 at 100 %: always).
    bound: u64,
}

impl Sampler {
    /// A sampler for `percent` (0 to 100), `None` when out of range or not a number.
    pub(crate) fn from_percent(percent: f64) -> Option<Sampler> {
        if !(0.0..=100.0).contains(&percent) {
            return None;
        }
        Some(Sampler {
            // Exact at both ends: 0, and 2^63 (a power of two, so an exact f64).
            bound: (percent / 100.0 * (1u64 << 63) as f64) as u64,
        })
    }

    /// The decision for a request: the caller's when it made one, else the percentage's.
    pub(crate) fn decide(&self, parent_sampled: Option<bool>, trace_id: TraceId) -> bool {
        parent_sampled.unwrap_or_else(|| self.sample(trace_id))
    }

    /// The percentage's decision for a trace nobody decided on yet.
    pub(crate) fn sample(&self, trace_id: TraceId) -> bool {
        let bytes = trace_id.to_bytes();
        let mut low = [0u8; 8];
        low.copy_from_slice(&bytes[8..]);
        (u64::from_be_bytes(low) >> 1) < self.bound
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::KeyValue;
    use opentelemetry::trace::SpanKind;
    use opentelemetry_sdk::trace::{
        IdGenerator, RandomIdGenerator, SamplingDecision, ShouldSample,
    };

    fn ids(n: usize) -> impl Iterator<Item = TraceId> {
        let generator = RandomIdGenerator::default();
        (0..n).map(move |_| generator.new_trace_id())
    }

    #[test]
    fn percent_bounds() {
        let never = Sampler::from_percent(0.0).unwrap();
        let always = Sampler::from_percent(100.0).unwrap();
        for id in ids(10_000).chain([TraceId::from(u128::MAX), TraceId::from(1)]) {
            assert!(!never.sample(id));
            assert!(always.sample(id));
        }
        for bad in [-0.1, 100.1, f64::NAN, f64::INFINITY] {
            assert_eq!(Sampler::from_percent(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_parents_decision_stands() {
        let never = Sampler::from_percent(0.0).unwrap();
        let always = Sampler::from_percent(100.0).unwrap();
        for id in ids(100) {
            assert!(never.decide(Some(true), id), "sampled parent over 0 %");
            assert!(
                !always.decide(Some(false), id),
                "unsampled parent over 100 %"
            );
            assert!(!never.decide(None, id));
            assert!(always.decide(None, id));
        }
    }

    #[test]
    fn one_percent_samples_about_one_percent() {
        // Istio's default. 100 000 random ids: the count is Binomial(1e5, 0.01), mean 1000,
        // sd ≈ 31.5, so 800..1200 fails with probability below 1e-9.
        let sampler = Sampler::from_percent(1.0).unwrap();
        let n = ids(100_000).filter(|id| sampler.sample(*id)).count();
        assert!((800..1200).contains(&n), "{n}");
    }

    #[test]
    fn agrees_with_opentelemetry_trace_id_ratio() {
        let attrs: [KeyValue; 0] = [];
        for percent in [0.0, 0.5, 1.0, 37.0, 99.9, 100.0] {
            let ours = Sampler::from_percent(percent).unwrap();
            let theirs = opentelemetry_sdk::trace::Sampler::TraceIdRatioBased(percent / 100.0);
            for id in ids(2_000) {
                let decision = theirs
                    .should_sample(None, id, "x", &SpanKind::Server, &attrs, &[])
                    .decision;
                let sampled = matches!(decision, SamplingDecision::RecordAndSample);
                assert_eq!(ours.sample(id), sampled, "{percent}% {id}");
            }
        }
    }
}
