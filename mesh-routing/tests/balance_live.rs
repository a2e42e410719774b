//! Live endpoint sets: discovery changes apply to the next requests without disturbing the
//! ones in flight, and per-endpoint state survives changes that keep the endpoint.

mod balance_support;

use std::time::Duration;

use balance_support::*;
use mesh_core::config::networking::{LoadBalancerSettings, SimpleLb, WarmupConfiguration};

#[tokio::test(start_paused = true)]
async fn removing_an_endpoint_lets_its_requests_in_flight_complete() {
    let (open, backend) = Backend::gated();
    let h = Harness::new(endpoints(4), backend);
    let t = target(Some(simple(SimpleLb::RoundRobin)), None);
    let pending = h.start_held(&t, 50).await;
    let on_removed = h.in_flight(addr(4));
    assert!(on_removed >= 12, "{:?}", h.cluster());

    // Endpoint 4 goes away while its requests are held.
    h.publish(endpoints(3));
    h.wait_for_len(3).await;
    let counts = h.count(30, |_| request(&t)).await;
    assert!(!counts.contains_key(&addr(4)), "{counts:?}");
    assert_eq!(counts.len(), 3);

    open.send(true).unwrap();
    let mut answered_by_removed = 0;
    for p in pending {
        let resp = p.await.unwrap().expect("a request in flight failed");
        if endpoint_of(&resp).unwrap() == addr(4) {
            answered_by_removed += 1;
        }
    }
    assert_eq!(answered_by_removed, on_removed);
    assert!(h.cluster().endpoints.iter().all(|e| e.in_flight == 0));
}

#[tokio::test(start_paused = true)]
async fn additions_apply_and_state_survives_for_unchanged_addresses() {
    let (open, mut backend) = Backend::gated();
    backend.delays = std::sync::Arc::new([(addr(1), Duration::from_millis(80))].into());
    let h = Harness::new(endpoints(2), backend);
    let t = target(Some(simple(SimpleLb::RoundRobin)), None);
    // Latency samples on both endpoints.
    h.count(10, |_| request(&t)).await;
    let ewma_before = h.cluster().endpoints[0].ewma_ms;
    assert!(ewma_before > 70.0, "{:?}", h.cluster());
    // One request held on each.
    let pending = h.start_held(&t, 2).await;

    // A third endpoint joins; the first two keep their counters and estimates.
    h.publish(endpoints(3));
    h.wait_for_len(3).await;
    let cluster = h.cluster();
    assert_eq!(cluster.endpoints[0].in_flight, 1);
    assert_eq!(cluster.endpoints[1].in_flight, 1);
    assert_eq!(cluster.endpoints[2].in_flight, 0);
    assert!(
        (cluster.endpoints[0].ewma_ms - ewma_before).abs() < 1.0,
        "{cluster:?}"
    );

    let counts = h.count(30, |_| request(&t)).await;
    assert_eq!(counts.get(&addr(3)), Some(&10));

    open.send(true).unwrap();
    for p in pending {
        p.await.unwrap().unwrap();
    }
    assert!(h.cluster().endpoints.iter().all(|e| e.in_flight == 0));
}

#[tokio::test(start_paused = true)]
async fn a_new_endpoint_warms_up() {
    let h = Harness::new(endpoints(2), Backend::default());
    let lb = LoadBalancerSettings {
        simple: Some(SimpleLb::RoundRobin),
        warmup: Some(WarmupConfiguration {
            duration: mesh_core::config::Duration::from_secs(60),
            minimum_percent: None,
            aggression: None,
        }),
        ..Default::default()
    };
    let t = target(Some(lb), None);
    // The endpoints found first are warm: even.
    let counts = h.count(200, |_| request(&t)).await;
    assert_eq!(counts.get(&addr(1)), Some(&100));

    h.publish(endpoints(3));
    h.wait_for_len(3).await;
    // Just joined: 10 % of a full weight.
    let counts = h.count(2_100, |_| request(&t)).await;
    let new = counts.get(&addr(3)).copied().unwrap_or(0);
    assert!(new.abs_diff(100) <= 5, "{counts:?}");
    // After the window: a full share.
    tokio::time::advance(Duration::from_secs(60)).await;
    let counts = h.count(3_000, |_| request(&t)).await;
    let new = counts.get(&addr(3)).copied().unwrap_or(0);
    assert!(new.abs_diff(1_000) <= 10, "{counts:?}");
}

#[tokio::test(start_paused = true)]
async fn an_emptied_set_fails_with_uh_and_recovers() {
    let h = Harness::new(endpoints(2), Backend::default());
    let t = target(None, None);
    h.send(request(&t)).await.unwrap();
    h.publish(vec![]);
    h.wait_for_len(0).await;
    let err = h.send(request(&t)).await.unwrap_err();
    assert_eq!(
        mesh_core::ProxyError::find(&err).unwrap().flags(),
        mesh_core::ResponseFlags::NO_HEALTHY_UPSTREAM
    );
    h.publish(endpoints(1));
    h.wait_for_len(1).await;
    assert_eq!(h.send(request(&t)).await.unwrap(), addr(1));
}

#[tokio::test(start_paused = true)]
async fn hash_tables_follow_set_changes() {
    let h = Harness::new(endpoints(4), Backend::default());
    let t = target(Some(by_header("x-user", true)), None);
    let with_user = |user: usize| request_with(&t, "x-user", format!("user-{user}"));
    let mut before = Vec::new();
    for user in 0..400 {
        before.push(h.send(with_user(user)).await.unwrap());
    }
    h.publish(endpoints(5));
    h.wait_for_len(5).await;
    let mut moved = 0;
    for (user, old) in before.iter().enumerate() {
        let now = h.send(with_user(user)).await.unwrap();
        if now != *old {
            moved += 1;
            assert!(
                now == addr(5) || moved < 8,
                "user {user} moved to {now}, not the new one"
            );
        }
    }
    assert!(moved > 40 && moved < 110, "{moved} of 400 moved");
}
