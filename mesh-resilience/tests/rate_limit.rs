//! Local rate limiting on paused tokio time: the limiter's clock is `tokio::time::Instant`,
//! so `advance` moves it and 10 seconds of load take no time and give the same counts on
//! every run.

use std::time::Duration;

use http::{Request, Response};
use mesh_core::body::BoxError;
use mesh_core::config::bootstrap::RateLimitSettings;
use mesh_core::{Identity, ProxyError, ResponseFlags};
use mesh_resilience::rate_limit::RateLimitLayer;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt, service_fn};

type Svc = BoxCloneSyncService<Request<()>, Response<()>, BoxError>;

fn limited(requests_per_second: u32, burst: u32, per_principal: bool) -> Svc {
    let app = service_fn(|_req: Request<()>| async { Ok::<_, BoxError>(Response::new(())) });
    let settings = RateLimitSettings {
        requests_per_second,
        burst,
        per_principal,
    };
    BoxCloneSyncService::new(RateLimitLayer::new(&settings).layer(app))
}

fn principal(sa: &str) -> Identity {
    Identity::parse(&format!("spiffe://cluster.local/ns/default/sa/{sa}")).expect("SPIFFE ID")
}

/// Sends one request, from `caller` when given; `Ok(())` if it went through, else the
/// rate-limit error's message (after checking it is one: RL, 429).
async fn send(svc: &Svc, caller: Option<&Identity>) -> Result<(), String> {
    let mut req = Request::new(());
    if let Some(identity) = caller {
        req.extensions_mut().insert(identity.clone());
    }
    match svc.clone().oneshot(req).await {
        Ok(_) => Ok(()),
        Err(e) => {
            let e = ProxyError::find(&e).expect("a ProxyError");
            assert_eq!(e.flags(), ResponseFlags::RATE_LIMITED);
            assert_eq!(e.status(), 429);
            Err(e.to_string())
        }
    }
}

/// How many of `n` back-to-back requests from `caller` go through.
async fn admitted(svc: &Svc, caller: Option<&Identity>, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        ok += usize::from(send(svc, caller).await.is_ok());
    }
    ok
}

#[tokio::test(start_paused = true)]
async fn steady_overload_is_cut_to_the_limit() {
    // 100 rps (burst 100) under 200 rps offered, one request every 5 ms, for 10 s.
    let svc = limited(100, 100, false);
    let mut per_second = [0usize; 10];
    let mut refused = 0;
    for i in 0..2000 {
        match send(&svc, None).await {
            Ok(()) => per_second[i / 200] += 1,
            Err(_) => refused += 1,
        }
        tokio::time::advance(Duration::from_millis(5)).await;
    }
    // The first second spends the burst on top of the rate; from then on, the rate.
    assert!((195..=200).contains(&per_second[0]), "{per_second:?}");
    for (second, n) in per_second.iter().enumerate().skip(1) {
        assert!((99..=101).contains(n), "second {second}: {per_second:?}");
    }
    let total: usize = per_second.iter().sum();
    assert!((1095..=1105).contains(&total), "{per_second:?}");
    assert_eq!(total + refused, 2000);
}

#[tokio::test(start_paused = true)]
async fn burst_then_the_rate() {
    let svc = limited(10, 50, false);
    assert_eq!(admitted(&svc, None, 60).await, 50, "the burst, at once");
    assert_eq!(
        send(&svc, None).await,
        Err("rate limited: more than 10 requests per second (burst 50) to this workload".into())
    );
    // One token back every 100 ms.
    tokio::time::advance(Duration::from_millis(100)).await;
    assert_eq!(admitted(&svc, None, 5).await, 1);
    // Full again after burst / rate = 5 s.
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(admitted(&svc, None, 60).await, 50);
}

#[tokio::test(start_paused = true)]
async fn each_principal_has_its_own_bucket() {
    let svc = limited(10, 10, true);
    let (reviews, ratings) = (principal("reviews"), principal("ratings"));
    assert_eq!(admitted(&svc, Some(&reviews), 15).await, 10);
    assert_eq!(
        send(&svc, Some(&reviews)).await,
        Err(
            "rate limited: more than 10 requests per second (burst 10) from \
             spiffe://cluster.local/ns/default/sa/reviews"
                .into()
        )
    );
    // Neither another principal nor the unauthenticated callers are touched.
    assert_eq!(admitted(&svc, Some(&ratings), 15).await, 10);
    assert_eq!(admitted(&svc, None, 15).await, 10);
}

#[tokio::test(start_paused = true)]
async fn callers_without_identity_share_the_workload_bucket() {
    let svc = limited(10, 10, true);
    assert_eq!(admitted(&svc, None, 6).await, 6);
    assert_eq!(
        admitted(&svc, None, 10).await,
        4,
        "one bucket for all of them"
    );
    assert_eq!(
        send(&svc, None).await,
        Err(
            "rate limited: more than 10 requests per second (burst 10) from callers \
             without an identity"
                .into()
        )
    );
    assert_eq!(admitted(&svc, Some(&principal("reviews")), 1).await, 1);
}

#[tokio::test(start_paused = true)]
async fn without_per_principal_identities_share_the_workload_bucket() {
    let svc = limited(10, 10, false);
    assert_eq!(admitted(&svc, Some(&principal("reviews")), 10).await, 10);
    assert_eq!(admitted(&svc, Some(&principal("ratings")), 5).await, 0);
    assert_eq!(admitted(&svc, None, 5).await, 0);
}

#[tokio::test(start_paused = true)]
async fn clones_and_services_of_one_layer_share_the_limit() {
    let settings = RateLimitSettings {
        requests_per_second: 5,
        burst: 5,
        per_principal: false,
    };
    let layer = RateLimitLayer::new(&settings);
    let app = service_fn(|_req: Request<()>| async { Ok::<_, BoxError>(Response::new(())) });
    // As the proxy does: one service per connection, all made by the same layer.
    let a = BoxCloneSyncService::new(layer.layer(app));
    let b = BoxCloneSyncService::new(layer.layer(app));
    assert_eq!(admitted(&a, None, 3).await, 3);
    assert_eq!(admitted(&b, None, 5).await, 2);
}
