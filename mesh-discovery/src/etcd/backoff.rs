//! Retry delays while etcd is unreachable: 100 ms doubling to 5 s, each drawn at random from
//! the upper half of the current step so proxies restarted together (or cut off by one etcd
//! outage) do not reconnect in lockstep.

use std::time::Duration;

const FIRST: Duration = Duration::from_millis(100);
const MAX: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub(crate) struct Backoff {
    step: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff { step: FIRST }
    }

    /// The delay before the next attempt; each call doubles the step up to the cap.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(MAX);
        let half = step / 2;
        let millis = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(fastrand::u64(0..=millis))
    }

    /// After a success: the next failure starts again from the first step.
    pub(crate) fn reset(&mut self) {
        self.step = FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_with_jitter_and_resets() {
        let mut backoff = Backoff::new();
        let first = backoff.next_delay();
        assert!(
            first >= Duration::from_millis(50) && first <= FIRST,
            "{first:?}"
        );
        for _ in 0..10 {
            backoff.next_delay();
        }
        let capped = backoff.next_delay();
        assert!(capped >= MAX / 2 && capped <= MAX, "{capped:?}");
        backoff.reset();
        assert!(backoff.next_delay() <= FIRST);
    }
}
