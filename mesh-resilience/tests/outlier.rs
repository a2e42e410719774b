//! Outlier detection end to end: `Balance → OutlierDetection → endpoints` over one shared
//! `HealthRegistry`, with in-process endpoints on paused tokio time.
#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::config::networking::{
    ConsistentHashLb, LoadBalancerSettings, OutlierDetection, SimpleLb, TrafficPolicy,
};
use mesh_core::config::types::Duration as ConfigDuration;
use mesh_core::config::{Protocol, ServicePort};
use mesh_core::discovery::{EndpointPublisher, ServiceKey};
use mesh_core::health::HealthRegistry;
use mesh_core::target::{RouteTarget, UpstreamTarget};
use mesh_core::{Endpoint, HostName, ProxyError, ResponseFlags};
use mesh_resilience::outlier::OutlierDetectionLayer;
use mesh_routing::balance::{BalanceLayer, Health};
use tokio::time::{Instant, advance};
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt, service_fn};

type Svc = BoxCloneService<Request<BoxBody>, Response<BoxBody>, BoxError>;

/// How an endpoint fails.
#[derive(Clone, Copy)]
enum Fail {
    Status(u16),
    /// A connect failure (`UF`), as the upstream client reports it.
    Connect,
}

struct Mesh {
    svc: Svc,
    balance: BalanceLayer,
    health: Arc<HealthRegistry>,
    addrs: Vec<SocketAddr>,
    hits: Arc<Vec<AtomicUsize>>,
    target: RouteTarget,
}

impl Mesh {
    /// `n` endpoints balanced round robin (unless `lb` says otherwise), those in `failing`
    /// failing every request, under `outlier`.
    fn new(n: usize, failing: &[(usize, Fail)], outlier: OutlierDetection) -> Mesh {
        Self::with_lb(n, failing, outlier, simple(SimpleLb::RoundRobin))
    }

    fn with_lb(
        n: usize,
        failing: &[(usize, Fail)],
        outlier: OutlierDetection,
        lb: LoadBalancerSettings,
    ) -> Mesh {
        let addrs: Vec<SocketAddr> = (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i as u8], 9080)))
            .collect();
        let host = HostName::qualify("reviews", "default");
        let publisher = Arc::new(EndpointPublisher::default());
        publisher.publish([(
            ServiceKey::new(host.clone(), 9080),
            addrs.iter().map(|a| Endpoint::new(*a)).collect(),
        )]);
        let health = Arc::new(HealthRegistry::new());
        let balance = BalanceLayer::with_health(publisher, health.clone());
        let hits: Arc<Vec<AtomicUsize>> = Arc::new((0..n).map(|_| AtomicUsize::new(0)).collect());
        let (seen, known, failing) = (hits.clone(), addrs.clone(), failing.to_vec());
        let endpoints = service_fn(move |req: Request<BoxBody>| {
            let addr = req.extensions().get::<UpstreamTarget>().unwrap().addr;
            let i = known.iter().position(|a| *a == addr).unwrap();
            seen[i].fetch_add(1, Ordering::SeqCst);
            let fail = failing.iter().find(|(f, _)| *f == i).map(|(_, how)| *how);
            async move {
                match fail {
                    None => Ok::<_, BoxError>(status(200)),
                    Some(Fail::Status(code)) => Ok(status(code)),
                    Some(Fail::Connect) => {
                        Err(ProxyError::connect_failed("reviews:9080", addr, "refused").into())
                    }
                }
            }
        });
        let svc = ServiceBuilder::new()
            .layer(balance.clone())
            .layer(OutlierDetectionLayer::new(health.clone()))
            .service(endpoints);
        let service = ServicePort::new(host, 9080, Protocol::Http);
        let policy = TrafficPolicy {
            load_balancer: Some(lb),
            outlier_detection: Some(outlier),
            ..Default::default()
        };
        let target = RouteTarget {
            traffic_policy: Some(Arc::new(policy)),
            ..RouteTarget::new(Arc::new(service))
        };
        Mesh {
            svc: BoxCloneService::new(svc),
            balance,
            health,
            addrs,
            hits,
            target,
        }
    }

    /// Sends `n` requests one after the other; returns the errors' flags.
    async fn send(&self, n: usize) -> Vec<ResponseFlags> {
        let mut errors = Vec::new();
        for _ in 0..n {
            let mut req = Request::new(body::empty());
            req.extensions_mut().insert(self.target.clone());
            if let Err(e) = self.svc.clone().oneshot(req).await {
                errors.push(ProxyError::find(&e).unwrap().flags());
            }
        }
        errors
    }

    /// Requests each endpoint received since the last call.
    fn take_hits(&self) -> Vec<usize> {
        self.hits
            .iter()
            .map(|h| h.swap(0, Ordering::SeqCst))
            .collect()
    }

    fn ejected(&self, i: usize) -> bool {
        self.health
            .endpoint(self.addrs[i])
            .is_ejected(Instant::now().into_std())
    }

    /// The ejection time of endpoint `i` left from now.
    fn ejection_left(&self, i: usize) -> Duration {
        let until = self.health.endpoint(self.addrs[i]).ejected_until().unwrap();
        until.saturating_duration_since(Instant::now().into_std())
    }
}

fn status(code: u16) -> Response<BoxBody> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::from_u16(code).unwrap();
    resp
}

fn simple(lb: SimpleLb) -> LoadBalancerSettings {
    LoadBalancerSettings {
        simple: Some(lb),
        ..Default::default()
    }
}

fn consecutive_5xx(n: u32) -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx_errors: Some(n),
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_endpoint_is_ejected_for_base_ejection_time_then_returns() {
    let mesh = Mesh::new(3, &[(0, Fail::Status(500))], consecutive_5xx(3));
    // Round robin: every third request goes to the failing endpoint; its third 500 ejects it.
    mesh.send(9).await;
    assert_eq!(mesh.take_hits(), [3, 3, 3]);
    assert!(mesh.ejected(0));
    let clusters = mesh.balance.clusters();
    let health: Vec<Health> = clusters[0].endpoints.iter().map(|e| e.health).collect();
    assert_eq!(health, [Health::Ejected, Health::Healthy, Health::Healthy]);

    // Nothing for the 30 s of `baseEjectionTime`, every other endpoint sharing its load.
    for _ in 0..29 {
        assert!(mesh.send(10).await.is_empty());
        advance(Duration::from_secs(1)).await;
    }
    advance(Duration::from_millis(999)).await;
    mesh.send(10).await;
    let hits = mesh.take_hits();
    assert_eq!(hits[0], 0, "{hits:?}");
    assert_eq!(hits[1] + hits[2], 300);

    // Back once its ejection time has passed.
    advance(Duration::from_millis(1)).await;
    assert!(!mesh.ejected(0));
    mesh.send(3).await;
    assert_eq!(mesh.take_hits(), [1, 1, 1]);
    assert_eq!(
        mesh.balance.clusters()[0].endpoints[0].health,
        Health::Healthy
    );
}

#[tokio::test(start_paused = true)]
async fn ejection_time_grows_with_times_ejected_caps_at_300s_and_decays() {
    let mesh = Mesh::new(3, &[(0, Fail::Status(500))], consecutive_5xx(1));
    let mut times = Vec::new();
    for _ in 0..11 {
        mesh.send(3).await; // one of them goes to the failing endpoint
        assert!(mesh.ejected(0));
        let left = mesh.ejection_left(0);
        times.push(left.as_secs());
        advance(left).await;
    }
    assert_eq!(times, [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300]);
    // Back in service for three whole intervals (10 s each): three off the multiplier.
    advance(Duration::from_secs(35)).await;
    mesh.send(3).await;
    assert_eq!(mesh.ejection_left(0), Duration::from_secs(240));
}

#[tokio::test(start_paused = true)]
async fn max_ejection_percent_limits_ejections_but_one_host_is_always_ejectable() {
    let failing = [(0, Fail::Status(500)), (1, Fail::Status(500))];
    // Istio's default 10 % of 4 is less than one host: one is ejected all the same, not two.
    let mesh = Mesh::new(4, &failing, consecutive_5xx(2));
    mesh.send(40).await;
    // Round robin starts at a random endpoint: either failing one may trip first.
    let out = match (mesh.ejected(0), mesh.ejected(1)) {
        (true, false) => 0,
        (false, true) => 1,
        both => panic!("exactly one ejected, not {both:?}"),
    };
    mesh.take_hits();
    mesh.send(30).await;
    let hits = mesh.take_hits();
    assert_eq!(hits[out], 0, "{hits:?}");
    assert!(
        hits.iter().enumerate().all(|(i, &h)| i == out || h >= 5),
        "{hits:?}"
    );

    // 50 %: both.
    let half = OutlierDetection {
        max_ejection_percent: Some(50),
        ..consecutive_5xx(2)
    };
    let mesh = Mesh::new(4, &failing, half);
    mesh.send(40).await;
    assert!(mesh.ejected(0) && mesh.ejected(1));
    mesh.take_hits();
    mesh.send(30).await;
    assert_eq!(mesh.take_hits(), [0, 0, 15, 15]);
}

#[tokio::test(start_paused = true)]
async fn below_min_health_percent_the_balancer_panics_and_uses_every_endpoint() {
    let failing = [(0, Fail::Status(500)), (1, Fail::Status(500))];
    let outlier = |min_health_percent| OutlierDetection {
        max_ejection_percent: Some(100),
        min_health_percent: Some(min_health_percent),
        ..consecutive_5xx(1)
    };
    // Istio's default 0: no panic mode; the one endpoint left takes everything.
    let mesh = Mesh::new(3, &failing, outlier(0));
    mesh.send(6).await;
    assert!(mesh.ejected(0) && mesh.ejected(1));
    mesh.take_hits();
    mesh.send(30).await;
    assert_eq!(mesh.take_hits(), [0, 0, 30]);

    // 50 %: one endpoint of three in service is below it, so all three share the traffic.
    let mesh = Mesh::new(3, &failing, outlier(50));
    mesh.send(6).await;
    assert!(mesh.ejected(0) && mesh.ejected(1));
    mesh.take_hits();
    mesh.send(30).await;
    assert_eq!(mesh.take_hits(), [10, 10, 10]);

    // A lone endpoint, ejected, without panic mode: no healthy upstream (Envoy's UH).
    let mesh = Mesh::new(1, &[(0, Fail::Status(500))], outlier(0));
    assert!(mesh.send(1).await.is_empty());
    let errors = mesh.send(1).await;
    assert_eq!(errors, [ResponseFlags::NO_HEALTHY_UPSTREAM]);
}

#[tokio::test(start_paused = true)]
async fn gateway_errors_count_502_503_504_only() {
    let gateway = OutlierDetection {
        consecutive_5xx_errors: Some(0),
        consecutive_gateway_errors: Some(3),
        base_ejection_time: Some(ConfigDuration::from_secs(5)),
        ..Default::default()
    };
    let mesh = Mesh::new(
        3,
        &[(0, Fail::Status(500)), (1, Fail::Status(503))],
        gateway.clone(),
    );
    mesh.send(30).await;
    assert!(!mesh.ejected(0), "500 is not a gateway error");
    assert!(mesh.ejected(1));
    assert_eq!(
        mesh.ejection_left(1),
        Duration::from_secs(5),
        "baseEjectionTime"
    );

    // The same endpoints under consecutive 5xx: the 500 one trips it.
    let mesh = Mesh::new(3, &[(0, Fail::Status(500))], consecutive_5xx(3));
    mesh.send(9).await;
    assert!(mesh.ejected(0));
}

#[tokio::test(start_paused = true)]
async fn local_origin_failures_count_as_errors_or_apart() {
    // Unsplit: a connect failure counts towards consecutive 5xx (Istio's default 5).
    let mesh = Mesh::new(3, &[(0, Fail::Connect)], OutlierDetection::default());
    let errors = mesh.send(12).await;
    assert_eq!(errors.len(), 4);
    assert!(
        errors
            .iter()
            .all(|f| f.contains(ResponseFlags::UPSTREAM_CONNECTION_FAILURE))
    );
    assert!(!mesh.ejected(0));
    mesh.send(3).await;
    assert!(mesh.ejected(0));

    // Split: only `consecutiveLocalOriginFailures` counts them, and 5xx responses do not.
    let split = OutlierDetection {
        split_external_local_origin_errors: Some(true),
        consecutive_local_origin_failures: Some(2),
        consecutive_5xx_errors: Some(3),
        max_ejection_percent: Some(100),
        ..Default::default()
    };
    let mesh = Mesh::new(3, &[(0, Fail::Connect), (1, Fail::Status(500))], split);
    mesh.send(6).await;
    assert!(mesh.ejected(0));
    assert!(!mesh.ejected(1));
    mesh.send(4).await; // the 500 endpoint's third 500
    assert!(mesh.ejected(1));
}

#[tokio::test(start_paused = true)]
async fn hash_policies_send_an_ejected_endpoints_keys_to_one_stand_in() {
    let lb = LoadBalancerSettings {
        consistent_hash: Some(ConsistentHashLb {
            http_header_name: Some("x-user".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let failing = [(0, Fail::Status(500))];
    let mesh = Mesh::with_lb(3, &failing, consecutive_5xx(1), lb);
    // Find a key hashed to the failing endpoint.
    let send_as = |user: String| {
        let mut req = Request::new(body::empty());
        req.extensions_mut().insert(mesh.target.clone());
        req.headers_mut().insert("x-user", user.parse().unwrap());
        mesh.svc.clone().oneshot(req)
    };
    let mut key = None;
    for i in 0..100 {
        send_as(format!("user-{i}")).await.unwrap();
        if mesh.take_hits()[0] == 1 {
            key = Some(format!("user-{i}"));
            break;
        }
    }
    let key = key.unwrap();
    assert!(mesh.ejected(0));
    for _ in 0..10 {
        send_as(key.clone()).await.unwrap();
    }
    let hits = mesh.take_hits();
    assert_eq!(hits[0], 0);
    assert!(hits.contains(&10), "one stand-in for the key: {hits:?}");
}
