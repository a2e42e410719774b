//! Load balancers: every Istio `DestinationRule` policy, over live endpoint sets.
//!
//! ```
//! use mesh_routing::balance::{Balancer, Policy};
//! use tower::{Service, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let backend = |name: &'static str| {
//!     service_fn(move |_req: ()| async move { Ok::<_, std::convert::Infallible>(name) })
//! };
//! // The default policy: power of two choices over peak-EWMA latency × in-flight requests.
//! let mut lb = Balancer::new(Policy::default(), [("a", backend("a")), ("b", backend("b"))]);
//! let answer = lb.ready().await.unwrap().call(()).await.unwrap();
//! assert!(answer == "a" || answer == "b");
//! assert!(lb.loads().all(|load| load.in_flight == 0));
//! # }
//! ```
//!
//! Two ways in, one pick code:
//!
//! - [`BalanceLayer`] → [`Balance`]: the proxy's layer. It reads the `RouteTarget` routing
//!   left in the request extensions, balances over the service port's endpoints from
//!   discovery (filtered by the subset's labels) with the policy of the target's
//!   `trafficPolicy.loadBalancer`, and leaves an `UpstreamTarget` for the upstream client.
//!   [`BalanceLayer::clusters`] is the admin `/clusters` view ([`ClusterStatus`]).
//! - [`Balancer`]: the same algorithms over any fixed set of tower services.
//!
//! # Policies
//!
//! | `loadBalancer` | [`Policy`] | what it does |
//! |---|---|---|
//! | none, `simple: UNSPECIFIED` | `PeakEwma` | P2C over `peak_ewma × (1 + in_flight / weight)` |
//! | `simple: LEAST_REQUEST` (`LEAST_CONN`) | `LeastRequest` | P2C over `1 + in_flight / weight` |
//! | `simple: ROUND_ROBIN` | `RoundRobin` | rotation; EDF when weights differ or during slow start |
//! | `simple: RANDOM` (`PASSTHROUGH`) | `Random` | weighted random |
//! | `consistentHash` (+ `ringHash`) | `RingHash` | ring of `minimumRingSize` (1024) points |
//! | `consistentHash.maglev` | `Maglev` | lookup table of `tableSize` (65537) entries |
//!
//! **Why P2C over peak EWMA by default.** Istio leaves the choice to the proxy and recommends
//! least request; Linkerd's balancer goes one better and weighs in-flight requests by each
//! endpoint's latency, so a slow endpoint (a bad node, a GC pause, a cold cache) is avoided
//! as soon as one slow response comes back, while power of two choices keeps the pick O(1)
//! and avoids the herd behaviour of always choosing the global minimum. The estimate starts
//! at 30 ms and has a 10 s time constant (Linkerd's defaults): a slower response replaces it
//! (the peak), faster ones are blended in over time, and read for a pick it decays towards
//! zero since its last sample, so an endpoint that was slow once is probed again later. Two
//! refinements over tower's `PeakEwma`: a sample weighs `1 - e^(-Δ/τ)` with `Δ` the time
//! since the endpoint's previous sample (tower: since the estimate was last read), so
//! estimates converge at the same pace however often an endpoint is picked; and estimates
//! within 5 % of each other count as equal, so weights decide between equally fast endpoints.
//! Two candidates are compared without reading the clock (both decay at the same rate, so
//! only the gap between their sample times matters): a pick among 1,000 endpoints costs
//! about 60 ns (see `benches/RESULTS.md`).
//!
//! **Least request** is Envoy's: two random distinct endpoints, the one with fewer active
//! requests wins (`choice_count` 2, `active_request_bias` 1).
//!
//! **Round robin** is Envoy's: a rotating index when weights are equal, earliest deadline
//! first (Envoy's EDF scheduler, each endpoint due every `1/weight`) otherwise, so 3:1
//! weights give exactly three picks to one per pick of the other.
//!
//! **Weights** (`Endpoint::weight`, Istio's default 1; 0 counts as 1) apply to every
//! policy. P2C draws its two candidates in proportion to weight and divides the in-flight
//! count by the weight in the cost (Envoy's weighted least request divides load by weight),
//! so idle endpoints share traffic exactly by weight and busy ones hold in-flight requests
//! in proportion to it. Random draws by weight; round robin schedules by weight; ring hash
//! gives each endpoint points, and Maglev table entries, in proportion to weight.
//!
//! **Consistent hashing** hashes a header, a cookie (generated when absent and a `ttl` is
//! set, as Envoy does), the source IP or a query parameter with xxHash64, and looks the hash
//! up in a ring (Ketama, as Envoy builds it: `"<ip:port>_<i>"` points, at least
//! `minimumRingSize`, default 1024) or a Maglev table (65537 entries, permutations from two
//! xxHash64 seeds of `ip:port`). A request without the key goes to a random point: Envoy's
//! behaviour. Tables are built when a set first uses the policy and rebuilt off the request
//! path when the set changes. See [`RingHash`] and [`Maglev`] (including how much each
//! moves keys when endpoints come and go).
//!
//! **Slow start** (`warmup`, `warmupDurationSecs`) applies to round robin, least request and
//! the default, as in Envoy: an endpoint that joined less than the window ago counts with
//! `weight × max(minimumPercent, (age / window)^(1/aggression))` (defaults 10 %, 1.0).
//! Endpoints present when a set is first balanced are warm. See [`Warmup`].
//!
//! **Outlier detection** (`trafficPolicy.outlierDetection`): `mesh_resilience`'s layer
//! below the balancer ejects endpoints into a shared `mesh_core::health::HealthRegistry`
//! ([`BalanceLayer::with_health`]). For a target with `outlierDetection`, every policy skips
//! ejected endpoints: a pick that lands on one is re-picked (up to five times, as for
//! retries; hash policies look up a hash derived from the request's, so a key whose endpoint
//! is ejected goes to one stand-in and every other key stays put), then the next endpoint of
//! the set in service is taken; none left: `503 UH`. When fewer than `minHealthPercent` of
//! the set are in service (Istio's default 0: never) the balancer panics, as Envoy does, and
//! balances over all of them. Targets without `outlierDetection` ignore ejections (Envoy's
//! ejections are per cluster). The clock is read only when a pick lands on an endpoint that
//! was ever ejected. `/clusters` shows `"health": "ejected"`.
//!
//! # Live endpoint sets
//!
//! Discovery publishes whole sets; a background task per (service port, subset) waits on the
//! discovery watch, rebuilds an immutable snapshot on each change (with the hash table the
//! set uses) and swaps it in: the request path only loads the current snapshot. Requests in flight
//! keep their endpoint; a removed endpoint stops being picked and drains. Per-endpoint state
//! (in-flight count, EWMA, slow-start clock, outlier health) is kept by address, so it
//! survives every change that keeps the address, and the endpoint addresses, which key the
//! upstream connection pools, stay the same.

mod endpoint_set;
mod ewma;
mod future;
mod hash_key;
mod layer;
mod maglev;
mod p2c;
mod picker;
mod policy;
mod random;
mod ring_hash;
mod round_robin;
mod service;
mod state;
mod status;
mod warmup;

pub use ewma::{DEFAULT_DECAY, DEFAULT_RTT};
pub use future::ResponseFuture;
pub use hash_key::hash_key;
pub use layer::{Balance, BalanceLayer};
pub use maglev::Maglev;
pub use policy::{DEFAULT_MAGLEV_TABLE_SIZE, DEFAULT_MIN_RING_SIZE, Policy};
pub use ring_hash::RingHash;
pub use service::{Balancer, HashRequest, Load, NoEndpoints, NoHash};
pub use status::{ClusterStatus, EndpointStatus, Health};
pub use warmup::Warmup;
