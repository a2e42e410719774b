//! Route matching and the route layer.
//!
//! - `select/100_routes/*`: `RouteTable::select` on a virtual host with 100 routes, half
//!   matching a header and a uri regex, half a uri regex alone, then a catch-all; requests
//!   that hit the first route, the 50th, the last specific one, and the catch-all.
//! - `layer/hit`: the whole `RouteLayer` on a request that matches a header route with two
//!   request header operations, over an inner service that answers at once (the future is
//!   polled once with a no-op waker, so no runtime is measured).
//!
//! Run: `cargo bench -p benches --bench routing -- --warm-up-time 1 --measurement-time 3`.

#![allow(clippy::unwrap_used)]

use std::fmt::Write;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use arc_swap::ArcSwap;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::config::{MeshConfig, Source, load_sources};
use mesh_routing::{RouteLayer, RouteTable, SourceContext};
use tower::{Layer, Service};

const SERVICES: &str = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: reviews }
spec:
  hosts: [reviews]
  ports: [{ number: 9080, name: http }]
  resolution: STATIC
  endpoints:
  - { address: 10.0.0.1, labels: { version: v1 } }
  - { address: 10.0.0.2, labels: { version: v2 } }
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: reviews }
spec:
  host: reviews
  subsets:
  - { name: v1, labels: { version: v1 } }
  - { name: v2, labels: { version: v2 } }
";

fn load(rules: &str) -> MeshConfig {
    load_sources(&[Source::new("bench.yaml", format!("{SERVICES}---\n{rules}"))]).unwrap()
}

/// 100 routes: even ones match `x-tenant` and a uri regex, odd ones a uri regex alone;
/// then a catch-all.
fn hundred_routes() -> MeshConfig {
    let mut yaml = String::from(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: { name: reviews }\nspec:\n  hosts: [reviews]\n  http:\n",
    );
    for i in 0..100 {
        let tenant = if i % 2 == 0 {
            format!(", headers: {{ x-tenant: {{ exact: t{i} }} }}")
        } else {
            String::new()
        };
        writeln!(
            yaml,
            "  - match: [{{ uri: {{ regex: '/api/v{i}/items/[0-9]+' }}{tenant} }}]\n    route: [{{ destination: {{ host: reviews, subset: v2 }} }}]"
        )
        .unwrap();
    }
    yaml.push_str("  - route: [{ destination: { host: reviews, subset: v1 } }]\n");
    load(&yaml)
}

fn request(path: &str, tenant: Option<&str>) -> Request<BoxBody> {
    let mut req = Request::get(path).header("host", "reviews:9080");
    if let Some(t) = tenant {
        req = req.header("x-tenant", t);
    }
    req.header("user-agent", "bench")
        .body(body::empty())
        .unwrap()
}

fn select(c: &mut Criterion) {
    let config = hundred_routes();
    let table = RouteTable::build(&config, &SourceContext::from_config(&config));
    let mut group = c.benchmark_group("select/100_routes");
    for (name, req) in [
        ("first", request("/api/v0/items/42", Some("t0"))),
        ("route_50", request("/api/v50/items/42", Some("t50"))),
        ("route_99", request("/api/v99/items/42", None)),
        ("catch_all", request("/web/home", Some("t7"))),
    ] {
        assert!(table.select(&req).is_ok());
        group.bench_function(name, |b| {
            b.iter(|| black_box(table.select(black_box(&req))))
        });
    }
    group.finish();
}

fn layer(c: &mut Criterion) {
    let config = load(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: reviews }
spec:
  hosts: [reviews]
  http:
  - match: [{ headers: { end-user: { exact: jason } } }]
    headers: { request: { set: { x-route: jason }, remove: [x-debug] } }
    route: [{ destination: { host: reviews, subset: v2 } }]
  - route: [{ destination: { host: reviews, subset: v1 } }]
",
    );
    let table = RouteTable::build(&config, &SourceContext::from_config(&config));
    let inner = tower::service_fn(|_req: Request<BoxBody>| async {
        Ok::<_, BoxError>(Response::new(body::empty()))
    });
    let mut routed = RouteLayer::new(Arc::new(ArcSwap::from_pointee(table))).layer(inner);
    let mut cx = Context::from_waker(Waker::noop());
    c.bench_function("layer/hit", |b| {
        b.iter_batched(
            || {
                let mut req = request("/reviews/1", None);
                req.headers_mut()
                    .insert("end-user", "jason".parse().unwrap());
                req
            },
            |req| {
                assert!(routed.poll_ready(&mut cx).is_ready());
                let future = pin!(routed.call(req));
                match future.poll(&mut cx) {
                    Poll::Ready(Ok(response)) => black_box(response),
                    _ => unreachable!("the inner service answers at once"),
                }
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, select, layer);
criterion_main!(benches);
