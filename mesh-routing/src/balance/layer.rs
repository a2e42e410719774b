use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::task::{Context, Poll};

use http::header::{HeaderValue, UPGRADE};
use http::{Request, Response, Version};
use mesh_core::body::{BoxBody, BoxError};
use mesh_core::config::networking::Resolution;
use mesh_core::conn::OriginalDestination;
use mesh_core::discovery::{Discover, ServiceKey};
use mesh_core::health::HealthRegistry;
use mesh_core::target::{PreviousAttempts, RouteTarget, UpstreamTarget};
use mesh_core::{HostName, ProxyError, ResponseFlags};

use super::endpoint_set::SubsetBalancer;
use super::future::{ResponseFuture, track_body};
use super::hash_key::{RequestKey, request_key};
use super::picker::Node;
use super::policy::{Policy, resolve};
use super::state::{EndpointState, InFlight, Registry};
use super::status::ClusterStatus;

/// The balancing layer of the proxy: `RouteTarget` in, `UpstreamTarget` out.
///
/// ```
/// use std::sync::Arc;
///
/// use http::{Request, Response};
/// use mesh_core::body::{self, BoxBody, BoxError};
/// use mesh_core::config::{ServicePort, Protocol};
/// use mesh_core::config::networking::{Resolution, ServiceLocation};
/// use mesh_core::discovery::{EndpointPublisher, ServiceKey};
/// use mesh_core::target::{RetryPolicy, RouteTarget, UpstreamTarget};
/// use mesh_core::{Endpoint, HostName};
/// use mesh_routing::balance::BalanceLayer;
/// use tower::{Layer, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let host = HostName::qualify("reviews", "default");
/// let publisher = Arc::new(EndpointPublisher::default());
/// publisher.publish([(
///     ServiceKey::new(host.clone(), 9080),
///     vec![Endpoint::new("10.0.0.1:9080".parse().unwrap())],
/// )]);
///
/// let layer = BalanceLayer::new(publisher.clone());
/// let svc = layer.layer(service_fn(|req: Request<BoxBody>| async move {
///     let target = req.extensions().get::<UpstreamTarget>().unwrap();
///     assert_eq!(target.addr.to_string(), "10.0.0.1:9080");
///     Ok::<_, BoxError>(Response::new(body::empty()))
/// }));
///
/// // What the routing layer would have decided: no DestinationRule, so the default policy.
/// let service = ServicePort {
///     host: host.clone(), number: 9080, name: "http".into(), protocol: Protocol::Http,
///     resolution: Resolution::Static, location: ServiceLocation::MeshInternal,
///     endpoints: vec![], dns_endpoints: vec![], subject_alt_names: vec![],
///     service_entry: "reviews".into(), namespace: "default".into(),
/// };
/// let mut req = Request::new(body::empty());
/// req.extensions_mut().insert(RouteTarget {
///     service: Arc::new(service),
///     subset: None,
///     traffic_policy: None,
///     timeout: None,
///     retry: Arc::new(RetryPolicy::none()),
///     name: "reviews.default.svc.cluster.local:9080".into(),
/// });
/// svc.oneshot(req).await.unwrap();
///
/// let clusters = layer.clusters();
/// assert_eq!(clusters[0].policy, "PEAK_EWMA");
/// assert_eq!(clusters[0].endpoints[0].in_flight, 0);
/// # }
/// ```
///
/// Per request: the [`RouteTarget`] extension (none: a `NC` error) names the service port,
/// the subset and the traffic policy. The endpoint set of (service port, subset) is found in
/// a read-mostly map (created on first use, outside any lock held across an `.await`), the
/// policy is read from `trafficPolicy.loadBalancer` (without allocating), the endpoint is
/// picked from the set's current snapshot (an empty one: `UH`), and an [`UpstreamTarget`]
/// goes into the extensions for the upstream client.
///
/// The request counts as in flight on its endpoint from the pick until its response body
/// ends or is dropped (or the call fails); the time to the response headers is the latency
/// sample (tower's `CompleteOnResponse`). Failed calls are not latency samples: a fast
/// failure must not make an endpoint look fast (outlier detection deals with failures).
///
/// Keep one layer for the life of the proxy (it is `Clone`, clones share everything): its
/// per-endpoint state, and the endpoint addresses that key the upstream connection pools,
/// then survive config reloads and endpoint changes.
#[derive(Clone)]
pub struct BalanceLayer {
    shared: Arc<Shared>,
}

/// Endpoint sets by host, then (port, subset): looked up with a borrowed host name.
type Sets = HashMap<HostName, Vec<Arc<SubsetBalancer>>>;

struct Shared {
    discovery: Arc<dyn Discover>,
    sets: RwLock<Sets>,
    registry: Arc<Registry>,
    /// The in-flight count of requests to `resolution: NONE` services, which have no
    /// endpoint set (see [`Shared::original_destination`]).
    original: Arc<EndpointState>,
}

impl std::fmt::Debug for BalanceLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalanceLayer").finish_non_exhaustive()
    }
}

impl BalanceLayer {
    /// A layer that asks `discovery` for endpoint sets, with a health registry of its own
    /// (share it with outlier detection through [`BalanceLayer::health`]).
    pub fn new(discovery: Arc<dyn Discover>) -> Self {
        Self::with_health(discovery, Arc::default())
    }

    /// A layer that asks `discovery` for endpoint sets and skips the endpoints outlier
    /// detection ejects in `health` (the registry given to
    /// `mesh_resilience::outlier::OutlierDetectionLayer`).
    pub fn with_health(discovery: Arc<dyn Discover>, health: Arc<HealthRegistry>) -> Self {
        BalanceLayer {
            shared: Arc::new(Shared {
                discovery,
                sets: RwLock::default(),
                registry: Arc::new(Registry::new(health)),
                original: Arc::new(EndpointState::new(
                    tokio::time::Instant::now(),
                    true,
                    Arc::default(),
                )),
            }),
        }
    }

    /// The health registry this layer reads ejections from.
    pub fn health(&self) -> Arc<HealthRegistry> {
        self.shared.registry.health.clone()
    }

    /// Every endpoint set balanced so far, sorted by name, with the state of each endpoint
    /// (admin `GET /clusters`; see [`ClusterStatus`] for the JSON).
    pub fn clusters(&self) -> Vec<ClusterStatus> {
        let sets: Vec<Arc<SubsetBalancer>> = {
            self.shared
                .read_sets()
                .values()
                .flatten()
                .cloned()
                .collect()
        };
        let mut out: Vec<ClusterStatus> = sets.iter().map(|s| s.status()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

impl<S> tower::Layer<S> for BalanceLayer {
    type Service = Balance<S>;
    fn layer(&self, inner: S) -> Balance<S> {
        Balance {
            shared: self.shared.clone(),
            inner,
        }
    }
}

/// The service made by [`BalanceLayer`].
#[derive(Clone)]
pub struct Balance<S> {
    shared: Arc<Shared>,
    inner: S,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Balance<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balance")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, B> tower::Service<Request<B>> for Balance<S>
where
    S: tower::Service<Request<B>, Response = Response<BoxBody>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, Response<BoxBody>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let picked = match self.shared.pick(&req) {
            Ok(picked) => picked,
            Err(e) => return ResponseFuture::failed(e),
        };
        req.extensions_mut().insert(picked.target);
        ResponseFuture::called(self.inner.call(req), picked.claim, track_body)
            .with_set_cookie(picked.set_cookie)
    }
}

/// How many times a retry re-picks to avoid endpoints already tried (Envoy's
/// `host_selection_retry_max_attempts` as Istio sets it).
const HOST_SELECTION_RETRY_MAX_ATTEMPTS: u64 = 5;

/// Which endpoints of a snapshot a pick skips for outlier detection: none when the target has
/// no `outlierDetection`; else the ejected ones, unless fewer than `minHealthPercent` of the
/// endpoints are in service (panic mode: balance over all of them, as Envoy's
/// `healthy_panic_threshold`). The clock is read, and panic mode worked out (a pass over
/// the set), only when a pick lands on an endpoint that was ever ejected.
struct Ejections<'a> {
    nodes: &'a [Node],
    /// `minHealthPercent`; `None`: outlier detection is off for the target.
    min_health_percent: Option<u32>,
    now: Option<std::time::Instant>,
    panic: Option<bool>,
}

impl<'a> Ejections<'a> {
    fn new(nodes: &'a [Node], min_health_percent: Option<u32>) -> Self {
        Ejections {
            nodes,
            min_health_percent,
            now: None,
            panic: None,
        }
    }

    fn skips(&mut self, index: usize) -> bool {
        let Some(min_health_percent) = self.min_health_percent else {
            return false;
        };
        let Some(node) = self.nodes.get(index) else {
            return false;
        };
        if node.state.health.ejected_until().is_none() {
            return false;
        }
        let now = *self
            .now
            .get_or_insert_with(|| tokio::time::Instant::now().into_std());
        if !node.state.health.is_ejected(now) {
            return false;
        }
        let nodes = self.nodes;
        let panic = *self.panic.get_or_insert_with(|| {
            let healthy = nodes
                .iter()
                .filter(|n| !n.state.health.is_ejected(now))
                .count();
            healthy * 100 < min_health_percent as usize * nodes.len()
        });
        !panic
    }
}

/// A hash for the `attempt`th re-pick of a hash policy, derived from the request's.
fn rehash(hash: u64, attempt: u64) -> u64 {
    xxhash_rust::xxh64::xxh64(&hash.to_le_bytes(), attempt)
}

fn all_ejected(service: &str) -> ProxyError {
    ProxyError::new(
        ResponseFlags::NO_HEALTHY_UPSTREAM,
        format_args!(
            "no healthy upstream: every endpoint of {service} is ejected by outlier detection"
        ),
    )
}

struct Picked {
    target: UpstreamTarget,
    claim: InFlight,
    set_cookie: Option<HeaderValue>,
}

impl Shared {
    /// A `resolution: NONE` service (Envoy's `ORIGINAL_DST` cluster): no endpoints to balance
    /// over; the request goes where its connection was going before capture redirected it
    /// (`OriginalDestination`). Without one (a client that dialled the proxy itself) there
    /// is nowhere to send it: `UH`, saying why.
    fn original_destination<B>(
        &self,
        target: &RouteTarget,
        req: &Request<B>,
    ) -> Result<Picked, ProxyError> {
        let Some(OriginalDestination(addr)) = req.extensions().get::<OriginalDestination>() else {
            return Err(ProxyError::new(
                ResponseFlags::NO_HEALTHY_UPSTREAM,
                format_args!(
                    "no healthy upstream: {} has resolution NONE, which sends a connection to its original destination, and this one was not redirected to the proxy",
                    target.name
                ),
            ));
        };
        let http2 = target.service.protocol.is_http2() || req.version() == Version::HTTP_2;
        Ok(Picked {
            target: UpstreamTarget::new(*addr, http2, target.name.clone()),
            claim: InFlight::start(self.original.clone()),
            set_cookie: None,
        })
    }

    fn pick<B>(&self, req: &Request<B>) -> Result<Picked, ProxyError> {
        let Some(target) = req.extensions().get::<RouteTarget>() else {
            return Err(ProxyError::new(
                ResponseFlags::NO_CLUSTER_FOUND,
                "no cluster: the request has no route target (the balancer needs routing in front of it)",
            ));
        };
        if target.service.resolution == Resolution::None {
            return self.original_destination(target, req);
        }
        let settings = target
            .traffic_policy
            .as_deref()
            .and_then(|p| p.load_balancer.as_ref());
        let resolved = resolve(settings);
        let policy = resolved.lb.policy;
        let set = self.set_for(target, policy);
        set.note_policy(policy);
        let key = if policy.is_hash() {
            request_key(&resolved.hash_on, req)
        } else {
            RequestKey::default()
        };
        let snapshot = set.snapshot();
        // Re-picks (attempt > 0) of hash policies look up a hash derived from the key, so a
        // key whose endpoint is ejected goes to the same stand-in every time.
        let pick = |attempt: u64| {
            let hash = key
                .hash
                .map(|h| if attempt == 0 { h } else { rehash(h, attempt) });
            snapshot
                .picker
                .pick(&resolved.lb, hash)
                .ok_or_else(|| ProxyError::no_healthy_upstream(&target.name))
        };
        let outlier = target
            .traffic_policy
            .as_deref()
            .and_then(|p| p.outlier_detection.as_ref());
        let mut ejection = Ejections::new(
            snapshot.picker.nodes(),
            outlier.map(|o| o.min_health_percent.unwrap_or(0)),
        );
        let tried = req
            .extensions()
            .get::<PreviousAttempts>()
            .filter(|_| !policy.is_hash());
        let mut index = pick(0)?;
        // Re-pick a bounded number of times away from ejected endpoints, and for a retry
        // away from endpoints its earlier attempts used (Envoy's `previous_hosts` predicate,
        // on by default in Istio; hash policies stick to their endpoint), then take what
        // comes as long as it is not ejected.
        let used = |index: usize| {
            tried.is_some_and(|tried| {
                snapshot
                    .endpoints
                    .get(index)
                    .is_some_and(|e| tried.contains(e.address))
            })
        };
        for attempt in 1..=HOST_SELECTION_RETRY_MAX_ATTEMPTS {
            if !used(index) && !ejection.skips(index) {
                break;
            }
            index = pick(attempt)?;
        }
        if used(index) {
            // Re-picks can keep landing on a tried endpoint: P2C over two endpoints compares
            // both every time and prefers the same one (a dead endpoint refusing connections
            // looks fast). A retry then takes the next endpoint it has not tried, if any.
            let n = snapshot.picker.nodes().len();
            if let Some(fresh) = (1..n)
                .map(|k| (index + k) % n)
                .find(|&i| !used(i) && !ejection.skips(i))
            {
                index = fresh;
            }
        }
        if ejection.skips(index) {
            // The next endpoint in the set that is in service.
            let n = snapshot.picker.nodes().len();
            index = (1..n)
                .map(|k| (index + k) % n)
                .find(|&i| !ejection.skips(i))
                .ok_or_else(|| all_ejected(&target.name))?;
        }
        let (Some(endpoint), Some(node)) = (
            snapshot.endpoints.get(index),
            snapshot.picker.nodes().get(index),
        ) else {
            return Err(ProxyError::no_healthy_upstream(&target.name));
        };
        // An HTTP/2 or gRPC port, or a client that already speaks HTTP/2, gets HTTP/2; so
        // does an HTTP/1.x request the DestinationRule upgrades (not a protocol upgrade such
        // as WebSocket, which takes an HTTP/1.1 connection of its own).
        let native = target.service.protocol.is_http2() || req.version() == Version::HTTP_2;
        let h2_upgrade =
            !native && target.upgrades_to_http2() && !req.headers().contains_key(UPGRADE);
        Ok(Picked {
            target: UpstreamTarget {
                addr: endpoint.address,
                http2: native || h2_upgrade,
                h2_upgrade,
                service: target.name.clone(),
                endpoint_tls: snapshot.tls.get(index).cloned().flatten(),
            },
            claim: InFlight::start(node.state.clone()),
            set_cookie: key.set_cookie,
        })
    }

    /// The endpoint set of the target's (service port, subset), created on first use.
    fn set_for(&self, target: &RouteTarget, policy: Policy) -> Arc<SubsetBalancer> {
        let service = &target.service;
        let subset = target.subset.as_ref();
        let find = |sets: &Sets| {
            sets.get(&service.host)?
                .iter()
                .find(|s| s.serves(service.number, subset))
                .cloned()
        };
        if let Some(set) = find(&self.read_sets()) {
            return set;
        }
        // Built outside the lock: the first snapshot (and hash table) can take a while.
        let key = ServiceKey::new(service.host.clone(), service.number);
        let watch = self.discovery.watch(&key);
        let fresh = SubsetBalancer::start(
            key,
            target.subset.clone(),
            target.name.clone(),
            watch,
            self.registry.clone(),
            policy,
        );
        let mut sets = self.sets.write().unwrap_or_else(|p| p.into_inner());
        if let Some(set) = find(&sets) {
            return set;
        }
        let list = sets.entry(service.host.clone()).or_default();
        // A subset of this name with other labels is from an older config: replace it.
        list.retain(|s| {
            !(s.key.port == service.number
                && s.subset.as_ref().map(|s| &s.name) == subset.map(|s| &s.name))
        });
        list.push(fresh.clone());
        fresh
    }

    fn read_sets(&self) -> RwLockReadGuard<'_, Sets> {
        self.sets.read().unwrap_or_else(|p| p.into_inner())
    }
}
