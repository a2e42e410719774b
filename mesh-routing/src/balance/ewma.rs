//! Peak-EWMA latency, after Finagle, tower's `PeakEwma` and Linkerd.
//!
//! - A sample slower than the estimate replaces it (the *peak*): a slow endpoint is avoided
//!   as soon as one slow response comes back.
//! - A faster sample is blended in as a time-based EWMA: with weight `1 - e^(-Δ/τ)`, `Δ` the
//!   time since the endpoint's previous sample, `τ` 10 s (Linkerd). The estimate thus
//!   follows an endpoint's latency over about `τ` whatever its request rate (tower weighs a
//!   sample by the time since the estimate was last *read*, which lets a busy endpoint's
//!   estimate converge faster than a quiet one's and skews picks towards it for a while).
//! - Read for a pick, the estimate decays towards zero with the time since the last sample
//!   (tower's decay on read, which Linkerd relies on): an endpoint nobody has tried for a
//!   while looks cheap again and gets probed.
//! - A new endpoint starts at a default RTT (Linkerd: 30 ms), its clock starting when it was
//!   added.
//!
//! The request path only reads: the decayed value is computed from the stored estimate and its
//! timestamp without writing. Writers (one per response) serialise on a small mutex that is
//! never held across an `.await`; readers load two atomics and may see one writer's estimate
//! with the previous timestamp, which only shifts the decay by a few microseconds.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Linkerd's initial RTT estimate for a new endpoint.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Linkerd's decay time constant.
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);

/// One endpoint's peak-EWMA latency estimate; see the module docs.
#[derive(Debug)]
pub(crate) struct PeakEwma {
    /// Timestamps are nanoseconds since this instant, shared by the endpoints of one
    /// balancer so that two estimates compare without reading the clock (see
    /// [`PeakEwma::decays_since`]).
    epoch: Instant,
    /// The estimate in nanoseconds, as `f64` bits.
    rtt_ns: AtomicU64,
    /// When `rtt_ns` was last written, in nanoseconds since `epoch`.
    stamp_ns: AtomicU64,
    /// Serialises writers (read-modify-write of both fields).
    write: Mutex<()>,
}

const DECAY_NS: f64 = DEFAULT_DECAY.as_nanos() as f64;

impl PeakEwma {
    /// A new endpoint's estimate: the default RTT, decaying from `now`.
    pub(crate) fn new(epoch: Instant, now: Instant) -> PeakEwma {
        let ewma = PeakEwma {
            epoch,
            rtt_ns: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            stamp_ns: AtomicU64::new(0),
            write: Mutex::new(()),
        };
        ewma.stamp_ns
            .store(ewma.since_epoch(now), Ordering::Relaxed);
        ewma
    }

    /// The stored estimate (ns) and when it was stored (ns since the epoch).
    pub(crate) fn raw(&self) -> (f64, u64) {
        (
            f64::from_bits(self.rtt_ns.load(Ordering::Relaxed)),
            self.stamp_ns.load(Ordering::Relaxed),
        )
    }

    /// `e^((a - b)/τ)`: how much more an estimate stored at `b` has decayed, at any later
    /// time, than one stored at `a` (both decay at the same rate from their own stamps, so
    /// the ratio of two decayed estimates does not depend on the time they are read at).
    pub(crate) fn decays_since(a: u64, b: u64) -> f64 {
        ((a as f64 - b as f64) / DECAY_NS)
            .clamp(-700.0, 700.0)
            .exp()
    }

    fn since_epoch(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The stored estimate and `e^(-Δ/τ)` for the time since it was stored.
    fn load(&self, now: Instant) -> (f64, f64) {
        let (rtt, stamp) = self.raw();
        let elapsed = self.since_epoch(now).saturating_sub(stamp) as f64;
        (rtt, (-elapsed / DECAY_NS).exp())
    }

    /// The estimate at `now`, decayed since its last sample, in nanoseconds.
    pub(crate) fn get(&self, now: Instant) -> f64 {
        let (rtt, decay) = self.load(now);
        rtt * decay
    }

    /// Records a response that took `rtt`, received at `now`.
    pub(crate) fn observe(&self, rtt: Duration, now: Instant) {
        let sample = rtt.as_nanos() as f64;
        let _write = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let (current, keep) = self.load(now);
        let next = if sample > current {
            sample
        } else {
            current * keep + sample * (1.0 - keep)
        };
        self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
        self.stamp_ns
            .store(self.since_epoch(now), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ns: f64) -> f64 {
        ns / 1e6
    }

    #[tokio::test(start_paused = true)]
    async fn starts_at_the_default_and_decays_with_a_10s_time_constant() {
        let ewma = PeakEwma::new(Instant::now(), Instant::now());
        assert!((ms(ewma.get(Instant::now())) - 30.0).abs() < 1e-9);
        tokio::time::advance(Duration::from_secs(10)).await;
        let decayed = ms(ewma.get(Instant::now()));
        assert!(
            (decayed - 30.0 / std::f64::consts::E).abs() < 1e-6,
            "{decayed}"
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(ms(ewma.get(Instant::now())) < 0.1);
    }

    #[tokio::test(start_paused = true)]
    async fn peaks_jump_and_fast_samples_blend_in_by_time() {
        let ewma = PeakEwma::new(Instant::now(), Instant::now());
        ewma.observe(Duration::from_millis(100), Instant::now());
        assert!((ms(ewma.get(Instant::now())) - 100.0).abs() < 1e-9);

        // A 10 ms answer 10 ms later barely moves a 100 ms estimate (weight 1 - e^-0.001).
        tokio::time::advance(Duration::from_millis(10)).await;
        ewma.observe(Duration::from_millis(10), Instant::now());
        let after = ms(ewma.get(Instant::now()));
        assert!(
            (after - (100.0 - 90.0 * (1.0 - (-0.001f64).exp()))).abs() < 1e-9,
            "{after}"
        );

        // Read five seconds later, the estimate has decayed by e^-0.5.
        tokio::time::advance(Duration::from_secs(5)).await;
        let decayed = ms(ewma.get(Instant::now()));
        assert!(
            (decayed - after * (-0.5f64).exp()).abs() < 1e-6,
            "{decayed}"
        );

        // A 10 ms sample after those five seconds weighs 1 - e^-0.5: one sample after a
        // quiet spell counts as much as many samples over the same time.
        ewma.observe(Duration::from_millis(10), Instant::now());
        let keep = (-0.5f64).exp();
        let blended = ms(ewma.get(Instant::now()));
        assert!(
            (blended - (after * keep + 10.0 * (1.0 - keep))).abs() < 1e-6,
            "{blended}"
        );

        // A slower sample than the estimate is the new peak.
        ewma.observe(Duration::from_millis(150), Instant::now());
        assert!((ms(ewma.get(Instant::now())) - 150.0).abs() < 1e-9);
    }

    #[tokio::test(start_paused = true)]
    async fn convergence_does_not_depend_on_the_request_rate() {
        let busy = PeakEwma::new(Instant::now(), Instant::now());
        let quiet = PeakEwma::new(Instant::now(), Instant::now());
        for i in 1..=1000 {
            tokio::time::advance(Duration::from_millis(5)).await;
            busy.observe(Duration::from_millis(1), Instant::now());
            if i % 100 == 0 {
                quiet.observe(Duration::from_millis(1), Instant::now());
            }
        }
        let (b, q) = (busy.get(Instant::now()), quiet.get(Instant::now()));
        assert!((b - q).abs() / b < 1e-9, "{} vs {}", ms(b), ms(q));
        // Both are on their way from 30 ms to 1 ms: 1 + 29 e^-0.5.
        assert!(
            (ms(b) - (1.0 + 29.0 * (-0.5f64).exp())).abs() < 1e-6,
            "{}",
            ms(b)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn estimates_compare_without_the_clock() {
        let epoch = Instant::now();
        let a = PeakEwma::new(epoch, Instant::now());
        tokio::time::advance(Duration::from_secs(3)).await;
        let b = PeakEwma::new(epoch, Instant::now());
        tokio::time::advance(Duration::from_secs(4)).await;
        let now = Instant::now();
        let ((ra, sa), (rb, sb)) = (a.raw(), b.raw());
        let ratio = a.get(now) / b.get(now);
        assert!((ratio - ra / rb * PeakEwma::decays_since(sa, sb)).abs() < 1e-12);
        assert!((ratio - (-0.3f64).exp()).abs() < 1e-12, "{ratio}");
    }
}
