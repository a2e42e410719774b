//! Exponential backoff with full jitter between attempts.

use std::ops::Range;
use std::time::Duration;

/// Envoy's retry backoff: retry `n` (1 for the first retry) waits a uniformly random time in
/// `[0, min(cap, base · 2^(n-1)))`, with `cap = 10 × base` (25 ms base: ceilings 25, 50,
/// 100, 200, 250, 250 ms, ...). Full jitter spreads the retries of many clients that failed
/// together, so they do not hit the recovering service in one wave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
}

impl Backoff {
    /// Envoy's cap: ten times the base interval.
    pub fn new(base: Duration) -> Self {
        Backoff {
            base,
            cap: base.saturating_mul(10),
        }
    }

    /// The exclusive upper bound of retry `n`'s delay.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(31);
        self.base.saturating_mul(1 << doublings).min(self.cap)
    }

    /// A random delay before retry `n`.
    pub fn delay(&self, retry: u32) -> Duration {
        self.jitter(retry, fastrand::u64)
    }

    /// [`delay`](Self::delay) drawing from `rng`.
    pub fn delay_with(&self, retry: u32, rng: &mut fastrand::Rng) -> Duration {
        self.jitter(retry, |range| rng.u64(range))
    }

    fn jitter(&self, retry: u32, draw: impl FnOnce(Range<u64>) -> u64) -> Duration {
        let ceiling = u64::try_from(self.ceiling(retry).as_nanos()).unwrap_or(u64::MAX);
        if ceiling == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(draw(0..ceiling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_ten_times_the_base() {
        let b = Backoff::new(Duration::from_millis(25));
        let ms: Vec<u128> = (1..=7).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(ms, [25, 50, 100, 200, 250, 250, 250]);
        assert_eq!(b.ceiling(1_000), Duration::from_millis(250));
        assert_eq!(Backoff::new(Duration::ZERO).delay(3), Duration::ZERO);
    }

    #[test]
    fn delays_are_fully_jittered_below_the_ceiling() {
        let b = Backoff::new(Duration::from_millis(25));
        let mut rng = fastrand::Rng::with_seed(7);
        for n in 1..=6 {
            let ceiling = b.ceiling(n);
            let samples: Vec<Duration> = (0..2_000).map(|_| b.delay_with(n, &mut rng)).collect();
            assert!(samples.iter().all(|d| *d < ceiling), "retry {n}");
            // Full jitter: the whole range is used, from near zero to near the ceiling.
            let min = samples.iter().min().unwrap();
            let max = samples.iter().max().unwrap();
            assert!(*min < ceiling / 50, "retry {n}: min {min:?}");
            assert!(*max > ceiling * 49 / 50, "retry {n}: max {max:?}");
            let mean = samples.iter().sum::<Duration>() / 2_000;
            assert!(
                mean > ceiling * 9 / 20 && mean < ceiling * 11 / 20,
                "retry {n}"
            );
        }
    }
}
