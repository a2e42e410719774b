//! Shared fixtures for the `balance_*` tests: a discovery board, route targets, and an
//! in-process backend that answers with the endpoint it was sent to.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::config::networking::{
    ConsistentHashLb, LoadBalancerSettings, MagLev, SimpleLb, TrafficPolicy,
};
use mesh_core::config::{Protocol, ServicePort};
use mesh_core::discovery::{EndpointPublisher, ServiceKey};
use mesh_core::target::{RetryPolicy, RouteTarget, Subset, UpstreamTarget};
use mesh_core::{Endpoint, HostName, Labels};
use mesh_routing::balance::{BalanceLayer, ClusterStatus};
use tokio::sync::watch;
use tower::{Layer, Service, ServiceExt};

pub const PORT: u16 = 9080;

pub fn host() -> HostName {
    HostName::qualify("reviews", "default")
}

pub fn key() -> ServiceKey {
    ServiceKey::new(host(), PORT)
}

/// `10.0.0.<n>:9080`.
pub fn addr(n: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, n], PORT))
}

pub fn endpoint(n: u8, weight: u32, labels: &[(&str, &str)]) -> Endpoint {
    Endpoint {
        weight,
        labels: labels.iter().copied().collect(),
        ..Endpoint::new(addr(n))
    }
}

/// Endpoints `1..=n`, weight 1, no labels.
pub fn endpoints(n: u8) -> Vec<Endpoint> {
    (1..=n).map(|i| endpoint(i, 1, &[])).collect()
}

pub fn simple(policy: SimpleLb) -> LoadBalancerSettings {
    LoadBalancerSettings {
        simple: Some(policy),
        ..Default::default()
    }
}

pub fn consistent(hash: ConsistentHashLb, maglev: bool) -> LoadBalancerSettings {
    LoadBalancerSettings {
        consistent_hash: Some(ConsistentHashLb {
            maglev: maglev.then(MagLev::default),
            ..hash
        }),
        ..Default::default()
    }
}

pub fn by_header(name: &str, maglev: bool) -> LoadBalancerSettings {
    consistent(
        ConsistentHashLb {
            http_header_name: Some(name.into()),
            ..Default::default()
        },
        maglev,
    )
}

/// What routing would hand the balancer for `reviews:9080`.
pub fn target(lb: Option<LoadBalancerSettings>, subset: Option<(&str, Labels)>) -> RouteTarget {
    let service = ServicePort::new(host(), PORT, Protocol::Http);
    let name = match &subset {
        Some((s, _)) => format!("{}/{s}", key()),
        None => key().to_string(),
    };
    RouteTarget {
        service: Arc::new(service),
        subset: subset.map(|(name, labels)| {
            Arc::new(Subset {
                name: name.into(),
                labels,
            })
        }),
        traffic_policy: lb.map(|lb| {
            Arc::new(TrafficPolicy {
                load_balancer: Some(lb),
                ..Default::default()
            })
        }),
        timeout: None,
        retry: Arc::new(RetryPolicy::none()),
        name: name.into(),
    }
}

pub fn request(target: &RouteTarget) -> Request<BoxBody> {
    let mut req = Request::new(body::empty());
    req.extensions_mut().insert(target.clone());
    req
}

/// A request to `target` with one header.
pub fn request_with(
    target: &RouteTarget,
    name: &'static str,
    value: impl std::fmt::Display,
) -> Request<BoxBody> {
    let mut req = request(target);
    let value = HeaderValue::from_str(&value.to_string()).expect("a header value");
    req.headers_mut().insert(name, value);
    req
}

/// A request the backend holds until its gate opens.
pub fn held(target: &RouteTarget) -> Request<BoxBody> {
    request_with(target, "x-hold", 1)
}

/// The header the backend names its endpoint in.
pub const ENDPOINT: &str = "x-endpoint";

/// The backend's behaviour: per-address latency, and a gate that requests carrying
/// `x-hold` wait on before answering.
#[derive(Clone, Default)]
pub struct Backend {
    pub delays: Arc<HashMap<SocketAddr, Duration>>,
    pub gate: Option<watch::Receiver<bool>>,
}

pub type Svc = tower::util::BoxCloneService<Request<BoxBody>, Response<BoxBody>, BoxError>;

impl Backend {
    /// A backend holding `x-hold` requests until the returned sender sends `true`.
    pub fn gated() -> (watch::Sender<bool>, Backend) {
        let (open, gate) = watch::channel(false);
        let backend = Backend {
            gate: Some(gate),
            ..Default::default()
        };
        (open, backend)
    }

    pub fn service(
        self,
    ) -> impl Service<
        Request<BoxBody>,
        Response = Response<BoxBody>,
        Error = BoxError,
        Future = impl Send,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(move |req: Request<BoxBody>| {
            let this = self.clone();
            async move {
                let target = req
                    .extensions()
                    .get::<UpstreamTarget>()
                    .ok_or("no upstream target")?
                    .clone();
                if let Some(delay) = this.delays.get(&target.addr) {
                    tokio::time::sleep(*delay).await;
                }
                if req.headers().contains_key("x-hold")
                    && let Some(mut gate) = this.gate.clone()
                {
                    gate.wait_for(|open| *open).await?;
                }
                let mut resp = Response::new(body::empty());
                resp.headers_mut()
                    .insert(ENDPOINT, HeaderValue::from_str(&target.addr.to_string())?);
                if target.http2 {
                    resp.headers_mut()
                        .insert("x-http2", HeaderValue::from_static("1"));
                }
                Ok::<_, BoxError>(resp)
            }
        })
    }
}

/// A discovery board with `reviews:9080` published, and a balancer over it.
pub struct Harness {
    pub publisher: Arc<EndpointPublisher>,
    pub layer: BalanceLayer,
    pub svc: Svc,
}

impl Harness {
    pub fn new(endpoints: Vec<Endpoint>, backend: Backend) -> Harness {
        let publisher = Arc::new(EndpointPublisher::default());
        publisher.publish([(key(), endpoints)]);
        let layer = BalanceLayer::new(publisher.clone());
        let svc = Svc::new(layer.layer(backend.service()));
        Harness {
            publisher,
            layer,
            svc,
        }
    }

    pub fn publish(&self, endpoints: Vec<Endpoint>) {
        self.publisher.publish([(key(), endpoints)]);
    }

    /// Sends one request and returns the endpoint that answered.
    pub async fn send(&self, req: Request<BoxBody>) -> Result<SocketAddr, BoxError> {
        let resp = self.svc.clone().oneshot(req).await?;
        endpoint_of(&resp)
    }

    /// Sends `n` sequential requests made by `make`, counting answers per endpoint.
    pub async fn count(
        &self,
        n: usize,
        mut make: impl FnMut(usize) -> Request<BoxBody>,
    ) -> HashMap<SocketAddr, usize> {
        let mut counts = HashMap::new();
        for i in 0..n {
            let addr = self.send(make(i)).await.expect("request failed");
            *counts.entry(addr).or_default() += 1;
        }
        counts
    }

    /// Sends `n` held requests (each picked as it is called), in background tasks.
    pub async fn start_held(
        &self,
        target: &RouteTarget,
        n: usize,
    ) -> Vec<tokio::task::JoinHandle<Result<Response<BoxBody>, BoxError>>> {
        let mut svc = self.svc.clone();
        let mut pending = Vec::new();
        for _ in 0..n {
            let ready = svc.ready().await.expect("the balancer is always ready");
            pending.push(tokio::spawn(ready.call(held(target))));
        }
        pending
    }

    /// The one cluster balanced so far.
    pub fn cluster(&self) -> ClusterStatus {
        let mut clusters = self.layer.clusters();
        assert_eq!(clusters.len(), 1, "{clusters:?}");
        clusters.remove(0)
    }

    /// In-flight requests on `addr` (0 before the first request created the cluster).
    pub fn in_flight(&self, addr: SocketAddr) -> u32 {
        self.layer
            .clusters()
            .iter()
            .flat_map(|c| &c.endpoints)
            .find(|e| e.address == addr)
            .map_or(0, |e| e.in_flight)
    }

    /// Waits until the balancer's set (rebuilt in the background, hash tables on the blocking
    /// pool) has `n` endpoints, polling for up to ten seconds of real time.
    pub async fn wait_for_len(&self, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if self.cluster().endpoints.len() == n {
                return;
            }
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_micros(100));
        }
        let cluster = self.cluster();
        panic!("the endpoint set never reached {n} endpoints: {cluster:?}");
    }
}

pub fn endpoint_of(resp: &Response<BoxBody>) -> Result<SocketAddr, BoxError> {
    Ok(resp
        .headers()
        .get(ENDPOINT)
        .ok_or("no endpoint header")?
        .to_str()?
        .parse()?)
}
