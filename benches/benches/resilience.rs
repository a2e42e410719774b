//! What the request timeout and the retry layer cost a request that succeeds the first time.
//!
//! Every case sends one request carrying a `RouteTarget` (as routing leaves it) to an
//! endpoint that answers at once; `baseline` and `baseline_body_1k` have no layers, the others
//! put `RequestTimeout → Retry` in front. The overhead is a case's time less its baseline.
//!
//! - `default_retries`: Istio's default policy (2 retries), no route timeout, empty body:
//!   the budget deposit, the `PreviousAttempts` list, one clone of the request head, the
//!   boxed retry loop.
//! - `default_retries_timeout`: the same with a 15 s route timeout (a timer armed and
//!   cancelled).
//! - `default_retries_body_1k`: a 1 KiB request body, copied for replay as the endpoint reads
//!   it.
//! - `no_retries_timeout`: `attempts: 0` and a route timeout: the pass-through path.
//! - `all_layers`: `RequestTimeout → Retry → OutlierDetection → PoolLimits → endpoint`, as
//!   the sidecar stacks them (retries on per-cluster budgets), with
//!   a 15 s route timeout, Istio's default retries, and a DestinationRule setting
//!   `outlierDetection` and every `connectionPool` limit (so each counter is taken and given
//!   back, and the response body holds the request slot until it ends).
//!
//! `cargo bench -p benches --bench resilience -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::BodyExt;
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::config::networking::TrafficPolicy;
use mesh_core::health::HealthRegistry;
use mesh_core::target::{RetryPolicy, RouteTarget, UpstreamTarget};
use mesh_resilience::budget::RetryBudgets;
use mesh_resilience::doc_support::route_target;
use mesh_resilience::outlier::OutlierDetectionLayer;
use mesh_resilience::pool_limits::{CircuitBreakers, PoolLimitsLayer};
use mesh_resilience::{RequestTimeoutLayer, RetryBudget, RetryLayer};
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

type Svc = BoxCloneService<Request<BoxBody>, Response<BoxBody>, BoxError>;

/// An endpoint that reads the request body and answers 200.
async fn endpoint(req: Request<BoxBody>) -> Result<Response<BoxBody>, BoxError> {
    black_box(req.into_body().collect().await?);
    Ok(Response::new(body::empty()))
}

/// The endpoint alone. Every case is boxed the same way, so the box's cost cancels out.
fn bare() -> Svc {
    BoxCloneService::new(service_fn(endpoint))
}

/// `RequestTimeout → Retry → OutlierDetection → PoolLimits → endpoint`.
fn with_all_layers() -> Svc {
    let breakers = Arc::new(CircuitBreakers::default());
    BoxCloneService::new(
        ServiceBuilder::new()
            .layer(RequestTimeoutLayer)
            .layer(
                RetryLayer::per_cluster(Arc::new(RetryBudgets::default()))
                    .with_circuit_breakers(breakers.clone()),
            )
            .layer(OutlierDetectionLayer::new(Arc::new(HealthRegistry::new())))
            .layer(PoolLimitsLayer::new(breakers))
            .service(service_fn(endpoint)),
    )
}

/// A DestinationRule traffic policy with outlier detection and every pool limit set.
fn limited_policy() -> TrafficPolicy {
    let yaml = "
connectionPool:
  tcp: { maxConnections: 100, connectTimeout: 1s }
  http: { http1MaxPendingRequests: 100, http2MaxRequests: 1000, maxRetries: 10, maxRequestsPerConnection: 100 }
outlierDetection: { consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s }
";
    serde_saphyr::from_str(yaml).expect("a valid traffic policy")
}

/// `RequestTimeout → Retry → endpoint`.
fn with_layers() -> Svc {
    BoxCloneService::new(
        ServiceBuilder::new()
            .layer(RequestTimeoutLayer)
            .layer(RetryLayer::new(Arc::new(RetryBudget::default())))
            .service(service_fn(endpoint)),
    )
}

fn target(timeout: Option<Duration>, retry: RetryPolicy) -> RouteTarget {
    RouteTarget {
        timeout,
        retry: Arc::new(retry),
        ..route_target("reviews:9080")
    }
}

fn success_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    static KIB: [u8; 1024] = [b'x'; 1024];
    let kib: &'static [u8] = &KIB;
    let timeout = Some(Duration::from_secs(15));
    let default = RetryPolicy::istio_default;
    // (name, with the layers, route timeout, retry policy, request body)
    let cases = [
        ("baseline", false, None, default(), None),
        ("baseline_body_1k", false, None, default(), Some(kib)),
        ("default_retries", true, None, default(), None),
        ("default_retries_timeout", true, timeout, default(), None),
        ("default_retries_body_1k", true, None, default(), Some(kib)),
        (
            "no_retries_timeout",
            true,
            timeout,
            RetryPolicy::none(),
            None,
        ),
    ];
    let mut group = c.benchmark_group("resilience/success");
    {
        let svc = with_all_layers();
        let target = RouteTarget {
            traffic_policy: Some(Arc::new(limited_policy())),
            ..target(timeout, default())
        };
        let addr = "10.0.0.7:9080".parse().expect("an address");
        let upstream = UpstreamTarget::new(addr, false, "reviews:9080".into());
        group.bench_function("all_layers", |b| {
            b.to_async(&rt).iter(|| {
                let mut svc = svc.clone();
                let mut req = Request::new(body::empty());
                req.extensions_mut().insert(target.clone());
                req.extensions_mut().insert(upstream.clone());
                async move {
                    // Dropping the response (as the other cases do) gives the request slot,
                    // held by its body, back.
                    let resp = svc.ready().await?.call(req).await?;
                    Ok::<_, BoxError>(black_box(resp))
                }
            })
        });
    }
    for (name, layered, timeout, retry, payload) in cases {
        let svc = if layered { with_layers() } else { bare() };
        let target = target(timeout, retry);
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                let mut svc = svc.clone();
                let body = payload.map_or_else(body::empty, body::full);
                let mut req = Request::new(body);
                req.extensions_mut().insert(target.clone());
                async move {
                    let resp = svc.ready().await?.call(req).await?;
                    Ok::<_, BoxError>(black_box(resp))
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, success_path);
criterion_main!(benches);
