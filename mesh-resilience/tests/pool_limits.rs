//! Connection-pool limits as layers over `service_fn` endpoints: the request limit, its slot
//! held until the response body ends, and `maxRetries` in the retry layer.
#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::{Request, Response};
use http_body_util::BodyExt;
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::config::networking::TrafficPolicy;
use mesh_core::target::RouteTarget;
use mesh_core::{ProxyError, ResponseFlags};
use mesh_resilience::doc_support::route_target;
use mesh_resilience::pool_limits::{CircuitBreakers, PoolLimits, PoolLimitsLayer};
use mesh_resilience::{RetryBudget, RetryLayer};
use tower::{Layer, ServiceBuilder, ServiceExt, service_fn};

fn target_with_pool(yaml: &str) -> RouteTarget {
    let policy: TrafficPolicy = serde_saphyr::from_str(yaml).unwrap();
    RouteTarget {
        traffic_policy: Some(Arc::new(policy)),
        ..route_target("reviews:9080")
    }
}

fn request(target: &RouteTarget) -> Request<BoxBody> {
    let mut req = Request::new(body::empty());
    req.extensions_mut().insert(target.clone());
    req
}

#[tokio::test(start_paused = true)]
async fn the_request_slot_is_held_until_the_body_ends() {
    let breakers = Arc::new(CircuitBreakers::default());
    let svc = PoolLimitsLayer::new(breakers.clone()).layer(service_fn(|_req| async {
        Ok::<_, BoxError>(Response::new(body::full("hello")))
    }));
    let target = target_with_pool("connectionPool: { http: { http2MaxRequests: 1 } }");

    let first = svc.clone().oneshot(request(&target)).await.unwrap();
    // The response is back but its body is unread: the request is still in flight.
    let err = svc.clone().oneshot(request(&target)).await.unwrap_err();
    let err = ProxyError::find(&err).unwrap();
    assert_eq!(err.flags(), ResponseFlags::UPSTREAM_OVERFLOW);
    assert_eq!(
        err.to_string(),
        "upstream overflow: reviews:9080 has 1 requests in flight (its DestinationRule \
         connectionPool limit)"
    );

    let bytes = first.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&bytes[..], b"hello");
    assert_eq!(breakers.cluster("reviews:9080").requests(), 0);
    let again = svc.clone().oneshot(request(&target)).await.unwrap();
    // A dropped body gives the slot back too.
    drop(again);
    assert_eq!(breakers.cluster("reviews:9080").requests(), 0);
}

#[tokio::test(start_paused = true)]
async fn clusters_without_limits_are_not_limited() {
    let breakers = Arc::new(CircuitBreakers::default());
    let svc = PoolLimitsLayer::new(breakers.clone()).layer(service_fn(|_req| async {
        Ok::<_, BoxError>(Response::new(body::empty()))
    }));
    let target = route_target("reviews:9080");
    let held: Vec<_> =
        futures::future::join_all((0..100).map(|_| svc.clone().oneshot(request(&target))))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    // Nothing is counted (or looked up) for a limit that is not set.
    assert_eq!(held.len(), 100);
    assert_eq!(breakers.cluster("reviews:9080").requests(), 0);
    drop(held);
    // An embedder's own limits win over the (absent) traffic policy.
    let mut req = request(&target);
    req.extensions_mut().insert(PoolLimits {
        max_requests: 0,
        ..PoolLimits::UNLIMITED
    });
    assert!(svc.oneshot(req).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn max_retries_bounds_the_retries_in_flight() {
    let breakers = Arc::new(CircuitBreakers::default());
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let down = service_fn(move |_req: Request<BoxBody>| {
        seen.fetch_add(1, Ordering::SeqCst);
        async {
            let e = ProxyError::connect_failed("reviews:9080", "10.0.0.7:9080", "refused");
            Err::<Response<BoxBody>, BoxError>(e.into())
        }
    });
    let svc = ServiceBuilder::new()
        .layer(
            RetryLayer::new(Arc::new(RetryBudget::default()))
                .with_circuit_breakers(breakers.clone()),
        )
        .service(down);
    let target = target_with_pool("connectionPool: { http: { maxRetries: 1 } }");

    // Another request's retry holds the cluster's only retry slot: this one is not retried.
    let limits = PoolLimits::for_target(&target);
    let slot = breakers.cluster("reviews:9080").try_retry(&limits).unwrap();
    let err = svc.clone().oneshot(request(&target)).await.unwrap_err();
    let err = ProxyError::find(&err).unwrap();
    assert_eq!(err.flags().to_string(), "UF,UO");
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // With the slot free, Istio's default two retries go out, one at a time.
    drop(slot);
    calls.store(0, Ordering::SeqCst);
    let err = svc.oneshot(request(&target)).await.unwrap_err();
    assert_eq!(
        ProxyError::find(&err).unwrap().flags().to_string(),
        "UF,URX"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(breakers.cluster("reviews:9080").retries(), 0);
}
