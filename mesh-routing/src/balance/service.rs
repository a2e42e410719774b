use std::fmt::{self, Display};
use std::sync::Arc;
use std::task::{Context, Poll};

use mesh_core::body::BoxError;
use tower::ServiceExt;
use tower::util::Oneshot;

use super::future::{ResponseFuture, release};
use super::picker::{Node, Picker};
use super::policy::{Lb, Policy};
use super::state::{EndpointState, InFlight};

/// A balancer over any fixed set of tower services, with the layer's pick code.
///
/// ```
/// use mesh_routing::balance::{Balancer, Policy, hash_key};
/// use tower::{Service, ServiceExt, service_fn};
///
/// fn backend(name: &'static str) -> impl Service<String, Response = String, Error = std::convert::Infallible, Future = impl Send> + Clone {
///     service_fn(move |req: String| async move { Ok(format!("{name} got {req}")) })
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// // Weighted round robin: b gets three requests for every one a gets.
/// let mut rr = Balancer::weighted(Policy::RoundRobin, [("a", 1, backend("a")), ("b", 3, backend("b"))]);
/// let mut answers = Vec::new();
/// for _ in 0..4 {
///     answers.push(rr.ready().await.unwrap().call("hi".into()).await.unwrap());
/// }
/// assert_eq!(answers.iter().filter(|a| a.starts_with("b")).count(), 3);
///
/// // Consistent hashing on the request itself: one key, one backend.
/// let mut maglev = Balancer::new(
///     Policy::Maglev { table_size: 65537 },
///     [("a", backend("a")), ("b", backend("b")), ("c", backend("c"))],
/// )
/// .hash_by(|req: &String| Some(hash_key(req)));
/// let first = maglev.ready().await.unwrap().call("alice".into()).await.unwrap();
/// let again = maglev.ready().await.unwrap().call("alice".into()).await.unwrap();
/// assert_eq!(first, again);
/// # }
/// ```
///
/// `poll_ready` is always ready: each call clones the chosen service and drives it with
/// [`ServiceExt::oneshot`] (its own `poll_ready`, then `call`), so one endpoint applying
/// backpressure never blocks requests bound for the others. A request counts as in flight
/// until its response arrives (the response type is opaque here; the proxy's layer counts
/// until the body ends). The set is fixed; the proxy's layer is the one that follows
/// discovery.
pub struct Balancer<K, S, H = NoHash> {
    shared: Arc<Shared<K, S>>,
    lb: Lb,
    hasher: H,
}

struct Shared<K, S> {
    keys: Vec<K>,
    services: Vec<S>,
    picker: Picker,
}

/// The hash key of a request, for the consistent-hash policies.
pub trait HashRequest<Req> {
    /// `None`: no key, the request goes to a random point of the table (as Envoy).
    fn hash_request(&self, req: &Req) -> Option<u64>;
}

/// No request has a hash key (the default; hash policies then pick at random).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHash;

impl<Req> HashRequest<Req> for NoHash {
    fn hash_request(&self, _: &Req) -> Option<u64> {
        None
    }
}

impl<Req, F: Fn(&Req) -> Option<u64>> HashRequest<Req> for F {
    fn hash_request(&self, req: &Req) -> Option<u64> {
        self(req)
    }
}

/// The balancer has no services.
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error("no endpoints to balance over")]
pub struct NoEndpoints;

/// The load of one service of a [`Balancer`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Load<'a, K> {
    pub key: &'a K,
    pub weight: u32,
    pub in_flight: u32,
    /// The peak-EWMA latency estimate now, in milliseconds.
    pub ewma_ms: f64,
}

impl<K: Display, S> Balancer<K, S> {
    /// A balancer over services of weight 1. `K` names each one; consistent hashing hashes
    /// its `Display` form (use `ip:port` addresses to agree with Envoy).
    pub fn new(policy: Policy, services: impl IntoIterator<Item = (K, S)>) -> Self {
        Self::weighted(policy, services.into_iter().map(|(k, s)| (k, 1, s)))
    }

    /// A balancer over weighted services (weight 0 counts as 1).
    pub fn weighted(policy: Policy, services: impl IntoIterator<Item = (K, u32, S)>) -> Self {
        let epoch = tokio::time::Instant::now();
        let mut keys = Vec::new();
        let mut nodes = Vec::new();
        let mut svcs = Vec::new();
        for (key, weight, svc) in services {
            nodes.push(Node::new(
                key.to_string(),
                weight,
                Arc::new(EndpointState::new(epoch, true, Default::default())),
            ));
            keys.push(key);
            svcs.push(svc);
        }
        let picker = Picker::new(nodes);
        picker.prepare(policy);
        Balancer {
            shared: Arc::new(Shared {
                keys,
                services: svcs,
                picker,
            }),
            lb: Lb::new(policy, None),
            hasher: NoHash,
        }
    }
}

impl<K, S, H> Balancer<K, S, H> {
    /// Hashes requests with `hasher` (for [`Policy::RingHash`] and [`Policy::Maglev`]); a
    /// closure `Fn(&Req) -> Option<u64>` will do (see [`hash_key`](super::hash_key)).
    pub fn hash_by<H2>(self, hasher: H2) -> Balancer<K, S, H2> {
        Balancer {
            shared: self.shared,
            lb: self.lb,
            hasher,
        }
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.lb.policy
    }

    /// The service the next request with `hash` would go to, without sending anything.
    pub fn select(&self, hash: Option<u64>) -> Option<&K> {
        let index = self.shared.picker.pick(&self.lb, hash)?;
        self.shared.keys.get(index)
    }

    /// Each service's weight, in-flight requests and latency estimate.
    pub fn loads(&self) -> impl Iterator<Item = Load<'_, K>> {
        let now = tokio::time::Instant::now();
        self.shared
            .keys
            .iter()
            .zip(self.shared.picker.nodes())
            .map(move |(key, node)| Load {
                key,
                weight: node.weight(),
                in_flight: node.state.in_flight(),
                ewma_ms: node.state.ewma.get(now) / 1e6,
            })
    }

    pub fn len(&self) -> usize {
        self.shared.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shared.keys.is_empty()
    }
}

impl<K, S, H: Clone> Clone for Balancer<K, S, H> {
    fn clone(&self) -> Self {
        Balancer {
            shared: self.shared.clone(),
            lb: self.lb,
            hasher: self.hasher.clone(),
        }
    }
}

impl<K: fmt::Debug, S, H> fmt::Debug for Balancer<K, S, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("policy", &self.lb.policy)
            .field("keys", &self.shared.keys)
            .finish_non_exhaustive()
    }
}

impl<K, S, H, Req> tower::Service<Req> for Balancer<K, S, H>
where
    S: tower::Service<Req> + Clone,
    S::Error: Into<BoxError>,
    H: HashRequest<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<Oneshot<S, Req>, S::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let hash = self.hasher.hash_request(&req);
        let shared = &self.shared;
        let picked = shared
            .picker
            .pick(&self.lb, hash)
            .and_then(|i| Some((shared.services.get(i)?, shared.picker.nodes().get(i)?)));
        match picked {
            Some((svc, node)) => ResponseFuture::called(
                svc.clone().oneshot(req),
                InFlight::start(node.state.clone()),
                release,
            ),
            None => ResponseFuture::failed(NoEndpoints),
        }
    }
}
