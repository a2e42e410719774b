//! Per-endpoint balancer state, shared by every snapshot of an endpoint set that contains the
//! endpoint, and the in-flight guard each request holds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

use mesh_core::health::{EndpointHealth, HealthRegistry};
use tokio::time::Instant;

use super::ewma::PeakEwma;
use super::warmup::Warmup;

/// What the balancer knows about one endpoint. Lives as long as some snapshot or request
/// holds it, so in-flight counts and latency survive endpoint-set changes that keep the
/// endpoint.
#[derive(Debug)]
pub(crate) struct EndpointState {
    in_flight: AtomicU32,
    pub(crate) ewma: PeakEwma,
    /// When the endpoint joined, for slow start; `None` when it was there from the start.
    added_at: Option<Instant>,
    /// Outlier-detection state of the address, shared with the outlier-detection layer
    /// through the [`HealthRegistry`].
    pub(crate) health: Arc<EndpointHealth>,
}

impl EndpointState {
    /// A state for an endpoint joining now; `warm` ones skip slow start. `epoch` is the
    /// balancer's time base (see `PeakEwma`).
    pub(crate) fn new(epoch: Instant, warm: bool, health: Arc<EndpointHealth>) -> EndpointState {
        let now = Instant::now();
        EndpointState {
            in_flight: AtomicU32::new(0),
            ewma: PeakEwma::new(epoch, now),
            added_at: (!warm).then_some(now),
            health,
        }
    }

    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn added_at(&self) -> Option<Instant> {
        self.added_at
    }

    /// The slow-start weight multiplier at `now`.
    pub(crate) fn warmup_factor(&self, warmup: &Warmup, now: Instant) -> f64 {
        match self.added_at {
            Some(added) => warmup.factor(now.saturating_duration_since(added)),
            None => 1.0,
        }
    }

    /// Whether outlier detection has ejected the endpoint at `now`.
    pub(crate) fn is_ejected(&self, now: Instant) -> bool {
        self.health.is_ejected(now.into_std())
    }
}

/// One request's claim on an endpoint: counted in flight from the pick until dropped (when
/// the response body ends or is dropped, or the call fails).
#[derive(Debug)]
pub(crate) struct InFlight {
    state: Arc<EndpointState>,
    sent_at: Instant,
}

impl InFlight {
    pub(crate) fn start(state: Arc<EndpointState>) -> InFlight {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            state,
            sent_at: Instant::now(),
        }
    }

    /// Response headers arrived: one latency sample (tower's `CompleteOnResponse`).
    pub(crate) fn responded(&self) {
        let now = Instant::now();
        self.state
            .ewma
            .observe(now.saturating_duration_since(self.sent_at), now);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Endpoint states by address, shared by every endpoint set of one layer, so that two subsets
/// (or two services) sending to one address see the same load, and a set rebuilt after a
/// change finds the states of the endpoints it keeps. Entries are weak: a state lives while a
/// snapshot or an in-flight request holds it. Only rebuilds (off the request path) lock it.
#[derive(Debug)]
pub(crate) struct Registry {
    epoch: Instant,
    states: Mutex<HashMap<SocketAddr, Weak<EndpointState>>>,
    /// Outlier-detection state, shared with the outlier-detection layer.
    pub(crate) health: Arc<HealthRegistry>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new(Arc::default())
    }
}

impl Registry {
    pub(crate) fn new(health: Arc<HealthRegistry>) -> Self {
        Registry {
            epoch: Instant::now(),
            states: Mutex::default(),
            health,
        }
    }

    /// The state of `addr`, created if no live one exists (warm or slow-starting).
    pub(crate) fn get_or_create(&self, addr: SocketAddr, warm: bool) -> Arc<EndpointState> {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(state) = states.get(&addr).and_then(Weak::upgrade) {
            return state;
        }
        let health = self.health.endpoint(addr);
        let state = Arc::new(EndpointState::new(self.epoch, warm, health));
        states.insert(addr, Arc::downgrade(&state));
        state
    }

    /// Forgets addresses whose state nobody holds any more.
    pub(crate) fn prune(&self) {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states.retain(|_, state| state.strong_count() > 0);
        drop(states);
        self.health.prune(Instant::now().into_std());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn states_are_shared_by_address_while_held() {
        let registry = Registry::default();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let a = registry.get_or_create(addr, true);
        let guard = InFlight::start(a.clone());
        assert_eq!(registry.get_or_create(addr, false).in_flight(), 1);
        drop(guard);
        assert_eq!(a.in_flight(), 0);
        assert!(a.added_at().is_none());
        drop(a);
        registry.prune();
        // Gone: the next one is a new endpoint, slow-starting.
        assert!(registry.get_or_create(addr, false).added_at().is_some());
    }
}
