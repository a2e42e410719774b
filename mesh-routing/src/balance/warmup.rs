use std::time::Duration;

use mesh_core::config::networking::LoadBalancerSettings;

/// Envoy's default `min_weight_percent`.
pub const DEFAULT_MINIMUM_PERCENT: f64 = 10.0;
/// Envoy's default `aggression` (a linear ramp).
pub const DEFAULT_AGGRESSION: f64 = 1.0;

/// Slow start (Istio's `warmup` / `warmupDurationSecs`, Envoy's `slow_start_config`).
///
/// An endpoint that joined the set less than `duration` ago has its weight scaled by
///
/// ```text
/// factor = max(minimum_percent / 100, time_factor ^ (1 / aggression))
/// time_factor = max(seconds since added, 1) / duration in seconds
/// ```
///
/// as Envoy does (defaults: minimum 10 %, aggression 1.0, i.e. a linear ramp). Endpoints the
/// balancer finds when it first sees a service are warm: their age is unknown, and a restarted
/// proxy must not throttle a fleet that has been serving for hours.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Warmup {
    duration: Duration,
    /// As a fraction in (0, 1].
    minimum: f64,
    /// `1 / aggression`.
    exponent: f64,
}

impl Warmup {
    /// A window of `duration` with Envoy's defaults (10 % minimum, aggression 1.0).
    pub fn new(duration: Duration) -> Warmup {
        Warmup {
            duration,
            minimum: DEFAULT_MINIMUM_PERCENT / 100.0,
            exponent: 1.0 / DEFAULT_AGGRESSION,
        }
    }

    /// The weight fraction an endpoint starts with (clamped to 0.1 %..=100 %).
    pub fn with_minimum_percent(mut self, percent: f64) -> Warmup {
        self.minimum = if percent.is_finite() {
            (percent / 100.0).clamp(0.001, 1.0)
        } else {
            DEFAULT_MINIMUM_PERCENT / 100.0
        };
        self
    }

    /// How fast the weight ramps up: above 1 faster early on, below 1 slower. Non-positive or
    /// non-finite values fall back to 1.0.
    pub fn with_aggression(mut self, aggression: f64) -> Warmup {
        let aggression = if aggression.is_finite() && aggression > 0.0 {
            aggression
        } else {
            DEFAULT_AGGRESSION
        };
        self.exponent = 1.0 / aggression;
        self
    }

    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// `warmup` when set, else the deprecated `warmupDurationSecs`; a zero window is none.
    pub fn from_settings(lb: &LoadBalancerSettings) -> Option<Warmup> {
        let warmup = if let Some(w) = &lb.warmup {
            let mut out = Warmup::new(w.duration.get());
            if let Some(p) = w.minimum_percent {
                out = out.with_minimum_percent(p);
            }
            if let Some(a) = w.aggression {
                out = out.with_aggression(a);
            }
            out
        } else {
            Warmup::new(lb.warmup_duration_secs?.get())
        };
        (!warmup.duration.is_zero()).then_some(warmup)
    }

    /// The weight multiplier of an endpoint added `age` ago, in `[minimum, 1]`.
    pub fn factor(&self, age: Duration) -> f64 {
        if age >= self.duration {
            return 1.0;
        }
        let window = self.duration.as_secs_f64();
        let time_factor = age.as_secs_f64().max(1.0) / window;
        time_factor.powf(self.exponent).clamp(self.minimum, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::Duration as ConfigDuration;
    use mesh_core::config::networking::WarmupConfiguration;

    #[test]
    fn linear_ramp_with_a_floor() {
        let w = Warmup::new(Duration::from_secs(100));
        assert_eq!(w.factor(Duration::ZERO), 0.1);
        assert_eq!(w.factor(Duration::from_secs(5)), 0.1);
        assert!((w.factor(Duration::from_secs(50)) - 0.5).abs() < 1e-9);
        assert_eq!(w.factor(Duration::from_secs(100)), 1.0);
        assert_eq!(w.factor(Duration::from_secs(1000)), 1.0);
    }

    #[test]
    fn aggression_bends_the_ramp() {
        let fast = Warmup::new(Duration::from_secs(100)).with_aggression(2.0);
        let slow = Warmup::new(Duration::from_secs(100)).with_aggression(0.5);
        let quarter = Duration::from_secs(25);
        assert!((fast.factor(quarter) - 0.5).abs() < 1e-9);
        assert!((slow.factor(quarter) - 0.1).abs() < 1e-9); // 0.0625, floored
        let none = Warmup::new(Duration::from_secs(100))
            .with_minimum_percent(0.0)
            .with_aggression(0.5);
        assert!((none.factor(quarter) - 0.0625).abs() < 1e-9);
    }

    #[test]
    fn settings_prefer_warmup_over_the_deprecated_field() {
        let mut lb = LoadBalancerSettings {
            warmup_duration_secs: Some(ConfigDuration::from_secs(30)),
            ..Default::default()
        };
        assert_eq!(
            Warmup::from_settings(&lb),
            Some(Warmup::new(Duration::from_secs(30)))
        );
        lb.warmup = Some(WarmupConfiguration {
            duration: ConfigDuration::from_secs(60),
            minimum_percent: Some(20.0),
            aggression: Some(2.0),
        });
        let w = Warmup::from_settings(&lb).unwrap();
        assert_eq!(w.duration(), Duration::from_secs(60));
        assert!((w.factor(Duration::from_secs(1)) - 0.2).abs() < 1e-9);
        lb.warmup = None;
        lb.warmup_duration_secs = Some(ConfigDuration::ZERO);
        assert_eq!(Warmup::from_settings(&lb), None);
    }
}
