//! A retry budget, so that retries cannot multiply an outage.
//!
//! Retries help when a few requests fail; when every request fails they only add load to a
//! service that is already down. A budget caps them: over a sliding window of `ttl`, retries
//! may add at most `retry_ratio` of the original requests plus `min_per_sec` retries a
//! second. The defaults (10 s, 10/s, 20 %) are Linkerd's `ServiceProfile` budget, which the
//! Gateway API's `retryConstraint` (`budget {percent: 20, interval: 10s}`, `minRetryRate
//! {count: 10, interval: 1s}`) standardised.
//!
//! ```
//! use std::time::Duration;
//! use mesh_resilience::budget::RetryBudget;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // No traffic yet: only the minimum is available, 10/s over the 10 s window.
//! let budget = RetryBudget::new(Duration::from_secs(10), 10, 0.2).unwrap();
//! assert_eq!((0..200).filter(|_| budget.withdraw()).count(), 100);
//! // Every original request deposits; five of them pay for one retry.
//! for _ in 0..50 {
//!     budget.deposit();
//! }
//! assert_eq!((0..200).filter(|_| budget.withdraw()).count(), 10);
//! # }
//! ```
//!
//! # How it counts
//!
//! The balance is `min_per_sec × ttl` (the minimum, as a reserve for the window) plus
//! `retry_ratio` per deposit, less one per withdrawal, counting only the deposits and
//! withdrawals of the last `ttl`. The window is cut into ten slots of `ttl / 10`; a slot's
//! count is dropped when the slot is reused, so an entry counts for at least `ttl` and at most
//! `ttl + ttl / 10`: the budget errs on the side of fewer retries. Amounts are kept in
//! thousandths of a retry, so any ratio (0.3, 0.15) is kept exactly to three decimals.
//!
//! Consequences worth knowing (all Linkerd's too):
//!
//! - The minimum is a reserve, not a refill: a fresh budget may spend `min_per_sec × ttl`
//!   retries at once, and each comes back `ttl` after it was spent. Over a sustained outage
//!   that averages to `min_per_sec` a second; over one window it is a burst.
//! - Deposits age out too: traffic long ago buys no retries now.
//!
//! # Why not `tower::retry::budget::TpsBudget`
//!
//! It is the same design (Linkerd builds its budget from it), but in tower 0.5 its expiry
//! skips a slot whenever it runs slightly more than one slot after the previous one, which is
//! what irregular real traffic does: each tick then clears two slots, and deposits and
//! withdrawals live about half the `ttl` (measured: a deposit made at 0 s was gone by 6 s of a
//! 10 s window with calls every 1.005 s). That doubles the minimum's rate and lets retries
//! through that the configuration forbids. Its constructor also panics on arguments outside
//! its ranges, and these come from configuration. The reimplementation is a few dozen lines
//! under one uncontended mutex (no lock is held across an `.await`: these are synchronous
//! calls), and it reads [`tokio::time::Instant`], so tests run it on paused time.
//!
//! Who deposits and withdraws: [`Retry`](crate::retry::Retry) deposits once per request that
//! could be retried (a route with retries on, a request that is not `CONNECT`) and withdraws
//! once per retry. A refused withdrawal returns the failure in hand, flagged `UO` as Envoy
//! flags a retry overflow.
//!
//! # Scope
//!
//! One `Arc<RetryBudget>` given to [`RetryLayer::new`](crate::retry::RetryLayer::new) is
//! shared by every route of that stack. A sidecar wants one budget per upstream cluster, as
//! Envoy and Linkerd keep them: with one shared budget, the deposits of a busy healthy
//! service would pay for the retries of a failing one, which could then retry far more than
//! 20 % of its own traffic. [`RetryBudgets`] keeps a budget per cluster (the route target's
//! `host:port/subset`), created on the cluster's first request with the settings of its
//! DestinationRule's `trafficPolicy.retryBudget`:
//!
//! - `percent` is the ratio (Istio's `retryBudget.percent`; unset, Linkerd's 20 %);
//! - `minRetryConcurrency` becomes the minimum per second. Envoy's minimum is retries in
//!   flight at once; this budget counts retries over time, so the nearest meaning is a floor
//!   of retries a second (unset, Linkerd's 10). A cluster with almost no traffic can still
//!   retry at that rate, which is what both minimums exist for.

// FxHash: looked up on every request, keyed by config (cluster names) and endpoint addresses.
use rustc_hash::FxHashMap as HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mesh_core::target::RouteTarget;
use tokio::time::Instant;

/// Slots the window is cut into.
const SLOTS: u32 = 10;
/// One more ring entry than slots: the slot being reused is dropped only after a full `ttl`.
const RING: usize = SLOTS as usize + 1;
/// Amounts are in thousandths of a retry.
const RETRY: i64 = 1000;

/// Retries may add at most `retry_ratio` of the requests plus `min_per_sec` a second, over a
/// window of `ttl`; see the module docs.
#[derive(Debug)]
pub struct RetryBudget {
    ttl: Duration,
    min_per_sec: u32,
    retry_ratio: f32,
    /// What a deposit adds, in thousandths of a retry.
    deposit: i64,
    /// The minimum for one window, in thousandths of a retry.
    reserve: i64,
    slot: Duration,
    window: Mutex<Window>,
}

/// The net amounts deposited in the last `RING` slots.
#[derive(Debug)]
struct Window {
    origin: Instant,
    /// The slot `now` falls in, counted from `origin`.
    current: u64,
    net: [i64; RING],
}

/// Arguments a [`RetryBudget`] cannot be built from.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RetryBudgetError {
    #[error("retry budget ttl must be between 1s and 60s, got {0:?}")]
    Ttl(Duration),
    #[error("retry budget ratio must be between 0 and 1000, got {0}")]
    Ratio(f32),
}

impl RetryBudget {
    /// Linkerd's default window.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
    /// Linkerd's default minimum: 10 retries a second.
    pub const DEFAULT_MIN_PER_SEC: u32 = 10;
    /// Linkerd's default ratio: retries add at most 20 % to the load.
    pub const DEFAULT_RETRY_RATIO: f32 = 0.2;

    /// A budget over a window of `ttl` (1 s to 60 s, Linkerd's range) allowing `min_per_sec`
    /// retries a second plus `retry_ratio` (0 to 1000) retries per request.
    pub fn new(
        ttl: Duration,
        min_per_sec: u32,
        retry_ratio: f32,
    ) -> Result<RetryBudget, RetryBudgetError> {
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&ttl) {
            return Err(RetryBudgetError::Ttl(ttl));
        }
        // `contains` is false for NaN too.
        if !(0.0..=1000.0).contains(&retry_ratio) {
            return Err(RetryBudgetError::Ratio(retry_ratio));
        }
        Ok(Self::build(ttl, min_per_sec, retry_ratio))
    }

    /// A budget from arguments already in range.
    fn build(ttl: Duration, min_per_sec: u32, retry_ratio: f32) -> RetryBudget {
        // ≤ 4.3e9 × 60 000 and ≤ 1e6: both far inside i64.
        let reserve = i64::from(min_per_sec) * ttl.as_millis() as i64;
        let deposit = (f64::from(retry_ratio) * RETRY as f64).round() as i64;
        RetryBudget {
            ttl,
            min_per_sec,
            retry_ratio,
            deposit,
            reserve,
            slot: ttl / SLOTS,
            window: Mutex::new(Window {
                origin: Instant::now(),
                current: 0,
                net: [0; RING],
            }),
        }
    }

    /// Records an original request: it pays `retry_ratio` of a retry.
    pub fn deposit(&self) {
        self.update(|window| {
            window.add(self.deposit);
        });
    }

    /// Takes one retry from the budget; `false` when the budget is spent.
    pub fn withdraw(&self) -> bool {
        self.update(|window| {
            let balance = self.reserve + window.net.iter().sum::<i64>();
            if balance < RETRY {
                return false;
            }
            window.add(-RETRY);
            true
        })
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn min_per_sec(&self) -> u32 {
        self.min_per_sec
    }

    pub fn retry_ratio(&self) -> f32 {
        self.retry_ratio
    }

    fn update<T>(&self, f: impl FnOnce(&mut Window) -> T) -> T {
        let now = Instant::now();
        // Nothing panics under the lock; a poisoned one still holds consistent numbers.
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        window.advance(now, self.slot);
        f(&mut window)
    }
}

impl Window {
    /// Moves to the slot `now` falls in, dropping the slots that left the window.
    fn advance(&mut self, now: Instant, slot: Duration) {
        let elapsed = now.saturating_duration_since(self.origin).as_nanos();
        let target = u64::try_from(elapsed / slot.as_nanos().max(1)).unwrap_or(u64::MAX);
        if target <= self.current {
            return;
        }
        let steps = (target - self.current).min(RING as u64);
        for i in 1..=steps {
            self.net[((self.current + i) % RING as u64) as usize] = 0;
        }
        self.current = target;
    }

    fn add(&mut self, amount: i64) {
        let i = (self.current % RING as u64) as usize;
        self.net[i] = self.net[i].saturating_add(amount);
    }
}

/// One [`RetryBudget`] per upstream cluster, configured by the cluster's DestinationRule
/// `trafficPolicy.retryBudget`; see the module docs.
#[derive(Debug)]
pub struct RetryBudgets {
    ttl: Duration,
    by_cluster: Mutex<HashMap<Arc<str>, ClusterBudget>>,
}

/// A cluster's budget and the settings it was made with.
type ClusterBudget = (BudgetSettings, Arc<RetryBudget>);

/// What a cluster's budget was made with, to see a changed DestinationRule.
#[derive(Clone, Copy, Debug, PartialEq)]
struct BudgetSettings {
    min_per_sec: u32,
    retry_ratio: f32,
}

impl RetryBudgets {
    /// Clusters a registry holds before it forgets them all (a config that names more is
    /// unusual; forgetting only resets windows, it never refuses a request).
    const MAX_CLUSTERS: usize = 10_000;

    /// Per-cluster budgets over windows of `ttl` (Linkerd's 10 s by default).
    pub fn new(ttl: Duration) -> Result<RetryBudgets, RetryBudgetError> {
        RetryBudget::new(ttl, 0, 0.0)?;
        Ok(RetryBudgets {
            ttl,
            by_cluster: Mutex::default(),
        })
    }

    /// The budget of `target`'s cluster, made on first use. A cluster whose DestinationRule
    /// changed its `retryBudget` starts a new window with the new settings.
    pub fn for_target(&self, target: &RouteTarget) -> Arc<RetryBudget> {
        let settings = Self::settings(target);
        let mut map = self
            .by_cluster
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((made_with, budget)) = map.get(&target.name)
            && *made_with == settings
        {
            return budget.clone();
        }
        if map.len() >= Self::MAX_CLUSTERS {
            map.clear();
        }
        let budget = Arc::new(RetryBudget::build(
            self.ttl,
            settings.min_per_sec,
            settings.retry_ratio,
        ));
        map.insert(target.name.clone(), (settings, budget.clone()));
        budget
    }

    fn settings(target: &RouteTarget) -> BudgetSettings {
        let configured = target
            .traffic_policy
            .as_ref()
            .and_then(|p| p.retry_budget.as_ref());
        BudgetSettings {
            min_per_sec: configured
                .and_then(|b| b.min_retry_concurrency)
                .unwrap_or(RetryBudget::DEFAULT_MIN_PER_SEC),
            // Config validation keeps percents in 0..=100.
            retry_ratio: configured
                .and_then(|b| b.percent)
                .map_or(RetryBudget::DEFAULT_RETRY_RATIO, |p| p.fraction() as f32),
        }
    }
}

impl Default for RetryBudgets {
    /// Linkerd's 10 s window.
    fn default() -> Self {
        RetryBudgets {
            ttl: RetryBudget::DEFAULT_TTL,
            by_cluster: Mutex::default(),
        }
    }
}

impl Default for RetryBudget {
    /// 10 s window, 10 retries a second, 20 % of requests.
    fn default() -> Self {
        Self::build(
            Self::DEFAULT_TTL,
            Self::DEFAULT_MIN_PER_SEC,
            Self::DEFAULT_RETRY_RATIO,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spend(budget: &RetryBudget) -> usize {
        (0..100_000).take_while(|_| budget.withdraw()).count()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn the_minimum_is_a_reserve_for_the_window() {
        let budget = RetryBudget::default();
        // 10/s × 10 s, available at once on a fresh budget.
        assert_eq!(spend(&budget), 100);
        // Spent retries come back only when they age out: after at least the ttl.
        tokio::time::advance(ms(9_999)).await;
        assert_eq!(spend(&budget), 0);
        tokio::time::advance(ms(1_001)).await;
        assert_eq!(spend(&budget), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn entries_live_at_least_the_ttl_under_irregular_calls() {
        // tower's TpsBudget loses this deposit after about 6 s.
        let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0).unwrap();
        budget.deposit();
        for _ in 0..9 {
            tokio::time::advance(ms(1_005)).await;
            budget.deposit(); // an irregular tick, as real traffic gives
            assert!(budget.withdraw(), "{:?}", Instant::now());
        }
        // At 9.045 s the first deposit still counts.
        assert!(budget.withdraw());
        assert!(!budget.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_pay_a_ratio_of_retries_and_age_out() {
        let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.2).unwrap();
        assert_eq!(spend(&budget), 0);
        for _ in 0..1_000 {
            budget.deposit();
        }
        assert_eq!(spend(&budget), 200);
        for _ in 0..1_000 {
            budget.deposit();
        }
        tokio::time::advance(ms(11_000)).await;
        assert_eq!(spend(&budget), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn ratios_are_kept_exactly() {
        for (ratio, deposits, retries) in [(0.3, 100, 30), (0.15, 100, 15), (3.0, 10, 30)] {
            let budget = RetryBudget::new(Duration::from_secs(1), 0, ratio).unwrap();
            for _ in 0..deposits {
                budget.deposit();
            }
            assert_eq!(spend(&budget), retries, "ratio {ratio}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn minimum_and_ratio_add_up() {
        let budget = RetryBudget::new(Duration::from_secs(2), 5, 0.5).unwrap();
        for _ in 0..40 {
            budget.deposit();
        }
        // 5/s × 2 s + 40 × 0.5.
        assert_eq!(spend(&budget), 10 + 20);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sustained_outage_gets_the_ratio_plus_the_minimum_rate() {
        // 100 requests a second for 60 s, each wanting two retries.
        let budget = RetryBudget::default();
        let mut retries = 0;
        for i in 0..6_000u64 {
            // Irregular arrivals: 7 ms or 13 ms apart, 10 ms on average.
            let gap = if i % 2 == 0 { 7 } else { 13 };
            tokio::time::advance(ms(gap)).await;
            budget.deposit();
            retries += (0..2).filter(|_| budget.withdraw()).count();
        }
        // 20 % of 6 000 plus 10/s: 1 200 + 600, the reserve coming back once per window.
        assert!((1_700..=1_800).contains(&retries), "{retries}");
    }

    #[test]
    fn rejects_arguments_out_of_range() {
        let s = Duration::from_secs;
        assert_eq!(
            RetryBudget::new(ms(500), 10, 0.2).unwrap_err(),
            RetryBudgetError::Ttl(ms(500))
        );
        assert!(matches!(
            RetryBudget::new(s(61), 10, 0.2),
            Err(RetryBudgetError::Ttl(_))
        ));
        assert!(matches!(
            RetryBudget::new(s(10), 10, -0.1),
            Err(RetryBudgetError::Ratio(_))
        ));
        assert!(matches!(
            RetryBudget::new(s(10), 10, f32::NAN),
            Err(RetryBudgetError::Ratio(_))
        ));
        let ok = RetryBudget::new(s(60), u32::MAX, 1000.0).unwrap();
        assert_eq!(ok.ttl(), s(60));
        let d = RetryBudget::default();
        assert_eq!(
            (d.ttl(), d.min_per_sec(), d.retry_ratio()),
            (s(10), 10, 0.2)
        );
    }
}
