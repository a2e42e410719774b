//! Load-balancer micro-benchmarks: a power-of-two-choices pick among 1,000 endpoints, Maglev
//! and ring-hash lookups, Maglev and ring rebuilds for 1,000 endpoints (which happen off the
//! request path, in the endpoint set's background task), and one request through the
//! balancing layer.
//!
//! `cargo bench -p benches --bench balance -- --warm-up-time 1 --measurement-time 3`

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::config::{Protocol, ServicePort};
use mesh_core::discovery::{EndpointPublisher, ServiceKey};
use mesh_core::target::{RetryPolicy, RouteTarget};
use mesh_core::{Endpoint, HostName};
use mesh_routing::balance::{BalanceLayer, Balancer, Maglev, Policy, RingHash};
use tower::{Layer, ServiceExt, service_fn};

const ENDPOINTS: usize = 1_000;

fn addresses() -> Vec<String> {
    (0..ENDPOINTS)
        .map(|i| format!("10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256))
        .collect()
}

/// Successive, well-spread request hashes.
fn next_hash(h: &mut u64) -> u64 {
    *h = h.wrapping_add(0x9E37_79B9_7F4A_7C15);
    *h
}

fn picks(c: &mut Criterion) {
    let ids = addresses();
    let svc = service_fn(|_: ()| async { Ok::<_, Infallible>(()) });
    let mut group = c.benchmark_group("balance/pick_1000");
    for policy in [
        Policy::PeakEwma,
        Policy::LeastRequest,
        Policy::RoundRobin,
        Policy::Random,
    ] {
        let lb = Balancer::new(policy, ids.iter().map(|id| (id.clone(), svc)));
        group.bench_function(policy.as_str(), |b| b.iter(|| black_box(lb.select(None))));
    }
    let weighted = Balancer::weighted(
        Policy::PeakEwma,
        ids.iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), 1 + (i % 4) as u32, svc)),
    );
    group.bench_function("PEAK_EWMA_weighted", |b| {
        b.iter(|| black_box(weighted.select(None)))
    });
    group.finish();
}

fn hashing(c: &mut Criterion) {
    let ids = addresses();
    let nodes = || ids.iter().map(|id| (id.as_str(), 1));
    let maglev = Maglev::new(nodes(), 65537);
    let ring = RingHash::new(nodes(), 1024);
    let mut group = c.benchmark_group("balance/hash_1000");
    let mut h = 0u64;
    group.bench_function("maglev_lookup", |b| {
        b.iter(|| black_box(maglev.lookup(next_hash(&mut h))))
    });
    group.bench_function("ring_hash_lookup", |b| {
        b.iter(|| black_box(ring.lookup(next_hash(&mut h))))
    });
    let svc = service_fn(|_: ()| async { Ok::<_, Infallible>(()) });
    let lb = Balancer::new(
        Policy::Maglev { table_size: 65537 },
        ids.iter().map(|id| (id.clone(), svc)),
    );
    group.bench_function("maglev_pick", |b| {
        b.iter(|| black_box(lb.select(Some(next_hash(&mut h)))))
    });
    group.bench_function("maglev_build", |b| {
        b.iter(|| black_box(Maglev::new(nodes(), 65537)))
    });
    group.bench_function("ring_hash_build", |b| {
        b.iter(|| black_box(RingHash::new(nodes(), 1024)))
    });
    group.finish();
}

fn layer(c: &mut Criterion) {
    let host = HostName::qualify("reviews", "default");
    let publisher = Arc::new(EndpointPublisher::default());
    let endpoints = addresses()
        .iter()
        .filter_map(|a| a.parse().ok())
        .map(Endpoint::new)
        .collect();
    publisher.publish([(ServiceKey::new(host.clone(), 9080), endpoints)]);
    let svc = BalanceLayer::new(publisher).layer(service_fn(|_: Request<BoxBody>| async {
        Ok::<_, BoxError>(Response::new(body::empty()))
    }));
    let target = RouteTarget {
        retry: Arc::new(RetryPolicy::none()),
        ..RouteTarget::new(Arc::new(ServicePort::new(host, 9080, Protocol::Http)))
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    c.bench_function("balance/layer_call_1000", |b| {
        b.to_async(&rt).iter(|| {
            let mut req = Request::new(body::empty());
            req.extensions_mut().insert(target.clone());
            svc.clone().oneshot(req)
        })
    });
}

criterion_group!(benches, picks, hashing, layer);
criterion_main!(benches);
