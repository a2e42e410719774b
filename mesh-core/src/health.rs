//! Passive health of endpoints: the outlier-detection state that resilience writes and the
//! balancer reads.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use mesh_core::health::{Ejection, HealthRegistry};
//!
//! let registry = HealthRegistry::new();
//! let a = "10.0.0.1:9080".parse().unwrap();
//! let b = "10.0.0.2:9080".parse().unwrap();
//! // The balancer records which endpoints make up each set it balances.
//! registry.set_cluster("reviews:9080".into(), [a, b]);
//!
//! // Outlier detection ejects `a` (Istio's defaults: 30 s base, 10 %, at least one host).
//! let now = Instant::now();
//! let health = registry.endpoint(a);
//! let ejected = registry.try_eject(&health, "reviews:9080", &Ejection::default(), now);
//! assert_eq!(ejected, Some(Duration::from_secs(30)));
//! assert!(health.is_ejected(now + Duration::from_secs(29)));
//! assert!(!health.is_ejected(now + Duration::from_secs(30)));
//!
//! // 10 % of two endpoints: once one is out, the other stays in.
//! let other = registry.endpoint(b);
//! assert_eq!(registry.try_eject(&other, "reviews:9080", &Ejection::default(), now), None);
//! ```
//!
//! # Choices
//!
//! - **Keyed by address.** One [`EndpointHealth`] per `SocketAddr`, shared by every set that
//!   contains the address (Envoy keeps one per cluster and host). A pod failing for one subset
//!   fails for the others too, and the state survives endpoint-set changes and config reloads,
//!   like the balancer's other per-endpoint state.
//! - **Atomics, no clock of its own.** Times are nanoseconds after the registry's epoch (the
//!   first `now` any caller hands in), so callers pass `tokio::time::Instant::now().into_std()`
//!   and paused test time works. The request path reads one atomic to know that an endpoint is
//!   not ejected.
//! - **Lazy return.** An endpoint is ejected while `now < ejected_until`: it comes back the
//!   moment its ejection time has passed, with no sweep task (Envoy returns it on the first
//!   `interval` tick after that, up to one interval later). `interval` paces the decay of
//!   the ejection multiplier instead: each whole interval an endpoint spends back in service
//!   takes one off the count of times it was ejected, computed at its next ejection.
//! - **Ejection time**: `baseEjectionTime × times ejected`, capped at
//!   `max(300 s, baseEjectionTime)` (Envoy's `max_ejection_time`); the multiplier stops growing
//!   at the cap, so it decays from there.
//! - **`maxEjectionPercent`** is checked against the set the failing request was balanced
//!   over (the cluster, as [`HealthRegistry::set_cluster`] recorded it): an ejection is allowed
//!   when no member is ejected (at least one host is always ejectable) or when
//!   `(ejected + 1) / members ≤ maxEjectionPercent`. A set the registry does not know counts
//!   as nothing ejected. Ejections are serialised by a lock held only for that check.

// FxHash: looked up on every request, keyed by config (cluster names) and endpoint addresses.
use rustc_hash::FxHashMap as HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

/// Envoy's `max_ejection_time` default.
pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// The time base of one registry: set by the first `now` a caller hands in.
#[derive(Debug, Default)]
struct Clock(OnceLock<Instant>);

impl Clock {
    fn nanos(&self, now: Instant) -> u64 {
        let epoch = *self.0.get_or_init(|| now);
        u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn instant(&self, nanos: u64) -> Option<Instant> {
        self.0.get()?.checked_add(Duration::from_nanos(nanos))
    }
}

/// A consecutive-failure counter of an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// 5xx responses and (unless split) local-origin failures: Envoy's `consecutive_5xx`.
    FiveXx,
    /// 502, 503, 504 and (unless split) local-origin failures: `consecutive_gateway_failure`.
    Gateway,
    /// Connect failures, resets and timeouts when they are counted apart
    /// (`splitExternalLocalOriginErrors`): `consecutive_local_origin_failure`.
    LocalOrigin,
}

/// The outlier state of one endpoint address.
#[derive(Debug)]
pub struct EndpointHealth {
    clock: Arc<Clock>,
    /// Nanoseconds after the epoch until which the endpoint is ejected; 0: never ejected.
    ejected_until: AtomicU64,
    /// Envoy's ejection-time multiplier.
    times_ejected: AtomicU32,
    counters: [AtomicU32; 3],
}

impl Default for EndpointHealth {
    /// A health kept in no registry (never ejected unless someone ejects it).
    fn default() -> Self {
        EndpointHealth::new(Arc::default())
    }
}

impl EndpointHealth {
    fn new(clock: Arc<Clock>) -> Self {
        EndpointHealth {
            clock,
            ejected_until: AtomicU64::new(0),
            times_ejected: AtomicU32::new(0),
            counters: Default::default(),
        }
    }

    /// Whether the endpoint is ejected at `now`. One atomic load when it never was.
    pub fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && self.clock.nanos(now) < until
    }

    /// When the latest ejection ends (or ended); `None` if the endpoint was never ejected.
    pub fn ejected_until(&self) -> Option<Instant> {
        match self.ejected_until.load(Ordering::Relaxed) {
            0 => None,
            until => self.clock.instant(until),
        }
    }

    /// The ejection-time multiplier: how many times in a row the endpoint was ejected (decayed
    /// as of its latest ejection).
    pub fn times_ejected(&self) -> u32 {
        self.times_ejected.load(Ordering::Relaxed)
    }

    /// Counts one more failure on `counter`; returns the new count.
    pub fn count(&self, counter: Counter) -> u32 {
        self.counters[counter as usize].fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The current count of `counter`.
    pub fn consecutive(&self, counter: Counter) -> u32 {
        self.counters[counter as usize].load(Ordering::Relaxed)
    }

    /// Resets `counter` (a success, or a failure that broke its run), without writing when it
    /// is already zero.
    pub fn reset(&self, counter: Counter) {
        let c = &self.counters[counter as usize];
        if c.load(Ordering::Relaxed) != 0 {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// Ejects the endpoint from `now`; returns for how long. Callers serialise (see
    /// [`HealthRegistry::try_eject`]).
    fn eject(&self, ejection: &Ejection, now: Instant) -> Duration {
        let now_ns = self.clock.nanos(now);
        let base = ejection.base_ejection_time.max(Duration::from_millis(1));
        let cap = ejection.max_ejection_time.max(base);
        // One off the multiplier for each whole interval spent back in service.
        let previous = self.times_ejected.load(Ordering::Relaxed);
        let back_since = self.ejected_until.load(Ordering::Relaxed);
        let healthy_intervals = match ejection.interval.as_nanos() {
            0 => 0,
            interval => {
                let healthy = u128::from(now_ns.saturating_sub(back_since));
                u32::try_from(healthy / interval).unwrap_or(u32::MAX)
            }
        };
        let max_times = u32::try_from(cap.as_nanos().div_ceil(base.as_nanos())).unwrap_or(1);
        let times = (previous.saturating_sub(healthy_intervals) + 1).min(max_times.max(1));
        let duration = base.saturating_mul(times).min(cap);
        let until = now_ns.saturating_add(u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX));
        self.times_ejected.store(times, Ordering::Relaxed);
        self.ejected_until.store(until.max(1), Ordering::Relaxed);
        duration
    }
}

/// How ejections are timed and bounded (the `outlierDetection` fields that are not
/// thresholds), with Istio's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ejection {
    /// Paces the decay of the ejection multiplier (Istio's default 10 s).
    pub interval: Duration,
    /// Istio's default 30 s.
    pub base_ejection_time: Duration,
    /// Envoy's default 300 s (at least `base_ejection_time`).
    pub max_ejection_time: Duration,
    /// Istio's default 10 %; one host is always ejectable.
    pub max_ejection_percent: u32,
}

impl Default for Ejection {
    fn default() -> Self {
        Ejection {
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: MAX_EJECTION_TIME,
            max_ejection_percent: 10,
        }
    }
}

type Members = Arc<[Arc<EndpointHealth>]>;

/// The health of every endpoint address, and the members of every balanced set.
///
/// Share one (`Arc`) between the outlier-detection layer and the balancer for the life of the
/// proxy.
#[derive(Debug, Default)]
pub struct HealthRegistry {
    clock: Arc<Clock>,
    endpoints: RwLock<HashMap<SocketAddr, Arc<EndpointHealth>>>,
    clusters: RwLock<HashMap<Arc<str>, Members>>,
    /// Held while deciding and applying one ejection, so two cannot both pass
    /// `maxEjectionPercent`.
    ejecting: Mutex<()>,
    /// Ejections so far, for metrics.
    ejections: std::sync::atomic::AtomicU64,
}

impl HealthRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// The health of `addr`, created on first use.
    pub fn endpoint(&self, addr: SocketAddr) -> Arc<EndpointHealth> {
        if let Some(health) = self.get(addr) {
            return health;
        }
        let mut endpoints = self
            .endpoints
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        endpoints
            .entry(addr)
            .or_insert_with(|| Arc::new(EndpointHealth::new(self.clock.clone())))
            .clone()
    }

    /// The health of `addr`, if anyone created it.
    pub fn get(&self, addr: SocketAddr) -> Option<Arc<EndpointHealth>> {
        let endpoints = self
            .endpoints
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        endpoints.get(&addr).cloned()
    }

    /// Records the members of the balanced set `name` (the route target's name: `host:port`,
    /// and `/subset`), replacing what it had: the base of `maxEjectionPercent`.
    pub fn set_cluster(&self, name: Arc<str>, members: impl IntoIterator<Item = SocketAddr>) {
        let members: Members = members.into_iter().map(|a| self.endpoint(a)).collect();
        let mut clusters = self
            .clusters
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        clusters.insert(name, members);
    }

    /// How many members the set `name` has, and how many of them are ejected at `now`.
    pub fn cluster_ejected(&self, name: &str, now: Instant) -> Option<(usize, usize)> {
        let clusters = self.clusters.read().unwrap_or_else(PoisonError::into_inner);
        let members = clusters.get(name)?;
        let ejected = members.iter().filter(|m| m.is_ejected(now)).count();
        Some((members.len(), ejected))
    }

    /// Ejects `endpoint` (balanced as part of set `cluster`) at `now` if it is not ejected
    /// already and `maxEjectionPercent` allows; returns the ejection time.
    pub fn try_eject(
        &self,
        endpoint: &EndpointHealth,
        cluster: &str,
        ejection: &Ejection,
        now: Instant,
    ) -> Option<Duration> {
        let _serialised = self.ejecting.lock().unwrap_or_else(PoisonError::into_inner);
        if endpoint.is_ejected(now) {
            return None;
        }
        if let Some((members, ejected)) = self.cluster_ejected(cluster, now) {
            let allowed = ejected == 0
                || (ejected + 1) * 100 <= ejection.max_ejection_percent as usize * members;
            if !allowed {
                return None;
            }
        }
        self.ejections.fetch_add(1, Ordering::Relaxed);
        Some(endpoint.eject(ejection, now))
    }

    /// Ejections made since the registry was created (Envoy's
    /// `outlier_detection.ejections_enforced_total`).
    pub fn ejections_total(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Forgets endpoints nobody else holds (no set, balancer or request) and that are not
    /// ejected now.
    pub fn prune(&self, now: Instant) {
        let mut endpoints = self
            .endpoints
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        endpoints.retain(|_, h| Arc::strong_count(h) > 1 || h.is_ejected(now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 80))
    }

    #[test]
    fn ejection_time_grows_caps_and_decays() {
        let registry = HealthRegistry::new();
        let h = registry.endpoint(addr(1));
        let policy = Ejection::default();
        let mut now = Instant::now();
        let mut times = Vec::new();
        for _ in 0..12 {
            let d = registry.try_eject(&h, "c", &policy, now).unwrap();
            times.push(d.as_secs());
            // Ejected again right when it returns: no healthy interval in between.
            now += d;
        }
        assert_eq!(
            times,
            [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300]
        );
        assert_eq!(h.times_ejected(), 10);
        // Three whole intervals back in service take three off the multiplier.
        now += Duration::from_secs(35);
        assert_eq!(
            registry.try_eject(&h, "c", &policy, now),
            Some(Duration::from_secs(240))
        );
        assert_eq!(
            registry.try_eject(&h, "c", &policy, now),
            None,
            "already ejected"
        );
    }

    #[test]
    fn max_ejection_percent_counts_the_set() {
        let registry = HealthRegistry::new();
        registry.set_cluster("c".into(), (1..=10).map(addr));
        let now = Instant::now();
        let policy = Ejection {
            max_ejection_percent: 20,
            ..Ejection::default()
        };
        let ejected: Vec<bool> = (1..=10)
            .map(|i| {
                let h = registry.endpoint(addr(i));
                registry.try_eject(&h, "c", &policy, now).is_some()
            })
            .collect();
        assert_eq!(ejected.iter().filter(|e| **e).count(), 2);
        assert_eq!(registry.cluster_ejected("c", now), Some((10, 2)));
        // 0 %: still one.
        registry.set_cluster("d".into(), [addr(20), addr(21)]);
        let zero = Ejection {
            max_ejection_percent: 0,
            ..Ejection::default()
        };
        assert!(
            registry
                .try_eject(&registry.endpoint(addr(20)), "d", &zero, now)
                .is_some()
        );
        assert!(
            registry
                .try_eject(&registry.endpoint(addr(21)), "d", &zero, now)
                .is_none()
        );
    }

    #[test]
    fn counters_and_prune() {
        let registry = HealthRegistry::new();
        let h = registry.endpoint(addr(1));
        assert_eq!(h.count(Counter::FiveXx), 1);
        assert_eq!(h.count(Counter::FiveXx), 2);
        assert_eq!(h.consecutive(Counter::Gateway), 0);
        h.reset(Counter::FiveXx);
        assert_eq!(h.consecutive(Counter::FiveXx), 0);
        assert!(h.ejected_until().is_none());
        drop(h);
        registry.prune(Instant::now());
        assert!(registry.get(addr(1)).is_none());
    }
}
