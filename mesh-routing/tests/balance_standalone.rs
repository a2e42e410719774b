//! The standalone `Balancer` over plain tower services.

use std::convert::Infallible;
use std::time::Duration;

use mesh_routing::balance::{Balancer, NoEndpoints, Policy, hash_key};
use tokio::sync::watch;
use tower::{Service, ServiceExt, service_fn};

/// A service named `name` that answers after `delay`, or once `gate` opens.
fn backend(
    name: &'static str,
    delay: Duration,
    gate: watch::Receiver<bool>,
) -> impl Service<u32, Response = &'static str, Error = Infallible, Future = impl Send> + Clone {
    service_fn(move |_req: u32| {
        let mut gate = gate.clone();
        async move {
            tokio::time::sleep(delay).await;
            let _ = gate.wait_for(|open| *open).await;
            Ok(name)
        }
    })
}

#[tokio::test(start_paused = true)]
async fn peak_ewma_avoids_the_slow_service() {
    let (_open, gate) = watch::channel(true);
    let mut lb = Balancer::new(
        Policy::PeakEwma,
        [
            (
                "fast-1",
                backend("fast-1", Duration::from_millis(2), gate.clone()),
            ),
            (
                "slow",
                backend("slow", Duration::from_millis(60), gate.clone()),
            ),
            (
                "fast-2",
                backend("fast-2", Duration::from_millis(2), gate.clone()),
            ),
        ],
    );
    let mut slow = 0;
    for i in 0..1_000 {
        if lb.ready().await.unwrap().call(i).await.unwrap() == "slow" {
            slow += 1;
        }
    }
    assert!(slow < 50, "{slow}");
    let loads: Vec<_> = lb.loads().collect();
    assert!(loads[1].ewma_ms > loads[0].ewma_ms, "{loads:?}");
}

#[tokio::test(start_paused = true)]
async fn requests_count_in_flight_until_they_answer() {
    let (open, gate) = watch::channel(false);
    let lb = Balancer::new(
        Policy::LeastRequest,
        [
            ("a", backend("a", Duration::ZERO, gate.clone())),
            ("b", backend("b", Duration::ZERO, gate.clone())),
        ],
    );
    let mut tasks = Vec::new();
    for i in 0..6 {
        // Clones share the state.
        let mut lb = lb.clone();
        let fut = lb.ready().await.unwrap().call(i);
        tasks.push(tokio::spawn(fut));
    }
    let in_flight: Vec<u32> = lb.loads().map(|l| l.in_flight).collect();
    assert_eq!(in_flight, [3, 3]);
    open.send(true).unwrap();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert!(lb.loads().all(|l| l.in_flight == 0));
}

#[tokio::test(start_paused = true)]
async fn hashing_and_selection() {
    let (_open, gate) = watch::channel(true);
    let services = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
        .map(|name| (name, backend(name, Duration::ZERO, gate.clone())));
    let mut lb = Balancer::new(
        Policy::RingHash {
            minimum_ring_size: 1024,
        },
        services,
    )
    .hash_by(|req: &u32| Some(hash_key(req.to_le_bytes())));
    for key in 0..100u32 {
        let expected = *lb.select(Some(hash_key(key.to_le_bytes()))).unwrap();
        for _ in 0..3 {
            assert_eq!(lb.ready().await.unwrap().call(key).await.unwrap(), expected);
        }
    }
    assert_eq!(lb.len(), 3);
}

#[tokio::test]
async fn an_empty_balancer_fails_calls() {
    type Svc = tower::util::BoxCloneService<u32, &'static str, Infallible>;
    let mut empty: Balancer<&str, Svc> = Balancer::new(Policy::Random, []);
    assert!(empty.is_empty());
    assert!(empty.select(None).is_none());
    let err = empty.ready().await.unwrap().call(1).await.unwrap_err();
    assert!(err.downcast_ref::<NoEndpoints>().is_some(), "{err}");
}
