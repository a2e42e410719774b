//! "This share of requests": fault percentages, mirror percentages.
//!
//! Istio hands percentages to Envoy as a `FractionalPercent` in parts per million
//! (`uint32(percent * 10000)`), so a `Percent { value: 0.0001 }` still means something and
//! comparisons are integer. The draw is `fastrand`'s thread-local generator: no lock, and a
//! test can seed it.

use mesh_core::config::Percent;

/// A share of requests in parts per million.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fraction(u32);

const MILLION: u32 = 1_000_000;

impl Fraction {
    pub(crate) const ALWAYS: Fraction = Fraction(MILLION);

    /// Istio's translation of a percentage (already checked to be in `0..=100`).
    pub(crate) fn from_percent(percent: Percent) -> Fraction {
        // `as` saturates (and maps NaN to 0), so this cannot leave 0..=MILLION.
        Fraction(((percent.value * 10_000.0) as u32).min(MILLION))
    }

    /// The legacy integer percentages (`percent: 10`, `mirrorPercent: 10`).
    pub(crate) fn from_integer_percent(percent: u32) -> Fraction {
        Fraction(percent.saturating_mul(10_000).min(MILLION))
    }

    pub(crate) fn is_never(self) -> bool {
        self.0 == 0
    }

    /// Draws: true for this share of calls.
    pub(crate) fn sample(self) -> bool {
        match self.0 {
            0 => false,
            MILLION.. => true,
            n => fastrand::u32(..MILLION) < n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translates_as_istio_and_samples_in_proportion() {
        assert_eq!(
            Fraction::from_percent(Percent { value: 12.5 }),
            Fraction(125_000)
        );
        assert_eq!(Fraction::from_percent(Percent::HUNDRED), Fraction::ALWAYS);
        assert_eq!(Fraction::from_integer_percent(7), Fraction(70_000));
        assert!(Fraction::from_percent(Percent { value: 0.0 }).is_never());
        assert!((0..1000).all(|_| Fraction::ALWAYS.sample()));
        assert!((0..1000).all(|_| !Fraction(0).sample()));
        fastrand::seed(7);
        let quarter = Fraction::from_percent(Percent { value: 25.0 });
        let hits = (0..100_000).filter(|_| quarter.sample()).count();
        assert!((24_000..26_000).contains(&hits), "{hits}");
    }
}
