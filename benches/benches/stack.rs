//! What the sidecar's whole outbound and inbound stacks cost a request, in-process, over
//! loopback to a real hyper backend.
//!
//! Every case sends `GET /` with `Host: backend:8080` and reads the 5-byte answer of a hyper
//! backend on `127.0.0.1`, one request at a time, on one current-thread runtime that also runs
//! the backend (so no case pays a cross-thread wake-up the others do not):
//!
//! - `bare_hyper`: a hyper HTTP/1.1 client connection (`hyper::client::conn::http1`) straight to
//!   the backend: the floor, what any proxy's upstream leg costs at least.
//! - `upstream`: the sidecar's pooled upstream client alone ([`Upstream`]), given the endpoint
//!   the balancer would choose.
//! - `outbound_stack`: [`mesh_proxy::outbound::stack`] as the sidecar builds it — local
//!   replies, proxy headers, metrics, egress policy, routing (a ServiceEntry, no
//!   VirtualService: Istio's default route), request timeout, Istio's default retries on a
//!   retry budget, P2C over peak EWMA, outlier detection, pool limits, the upstream client.
//! - `inbound_stack`: [`mesh_proxy::inbound::stack`] with no AuthorizationPolicy (allowed),
//!   XFCC, metrics, forwarding to the backend as the local app.
//!
//! A stack's overhead is its time less `bare_hyper`'s; the target is ≤ 5 µs for the outbound
//! stack (issue 11). What it leaves out: the sidecar's own server side (reading the request
//! from the app's connection), which a listener adds whatever the stack.
//!
//! `cargo bench -p benches --bench stack -- --warm-up-time 2 --measurement-time 5`

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use mesh_core::body::{self, BoxBody};
use mesh_core::config::{MeshConfig, Source, load_sources};
use mesh_core::conn::ClientInfo;
use mesh_core::discovery::{EndpointPublisher, ServiceKey};
use mesh_proxy::inbound::AppProtocol;
use mesh_proxy::server::HttpService;
use mesh_proxy::telemetry::Telemetry;
use mesh_proxy::upstream::{Upstream, UpstreamTarget};
use mesh_resilience::budget::RetryBudgets;
use mesh_resilience::pool_limits::CircuitBreakers;
use mesh_routing::balance::BalanceLayer;
use mesh_routing::{RouteTable, SourceContext};
use mesh_tls::authz::AuthorizationPolicies;
use tokio::runtime::Runtime;
use tower::{Service, ServiceExt};

const HOST: &str = "backend:8080";

/// A backend answering `200 hello` ([`benches::serve_hello`]), on the bench's runtime.
async fn start_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the backend");
    let addr = listener.local_addr().expect("backend address");
    tokio::spawn(benches::serve_hello(listener));
    addr
}

/// The sidecar's config: a Bootstrap and the backend's ServiceEntry.
fn config(backend: SocketAddr) -> MeshConfig {
    let yaml = format!(
        "{}{}",
        benches::sidecar_yaml("client", Some(backend), None, Some(1)),
        benches::backend_entry(8080, backend, false)
    );
    load_sources(&[Source::new("bench.yaml", yaml)]).expect("a valid bench config")
}

/// The stacks the sidecar builds for `config`, from the same parts `RunningProxy` uses.
struct Stacks {
    outbound: HttpService,
    inbound: HttpService,
}

fn stacks(config: MeshConfig, backend: SocketAddr) -> Stacks {
    let routes = Arc::new(ArcSwap::from_pointee(RouteTable::build(
        &config,
        &SourceContext::from_config(&config),
    )));
    let endpoints = Arc::new(EndpointPublisher::default());
    endpoints.publish(config.services().iter().map(|port| {
        (
            ServiceKey::new(port.host.clone(), port.number),
            port.endpoints.clone(),
        )
    }));
    let bootstrap = config.bootstrap().expect("a Bootstrap").clone();
    let shared = Arc::new(ArcSwap::from_pointee(config));
    let telemetry = Telemetry::new(&bootstrap, None, shared).expect("telemetry");
    let breakers = Arc::new(CircuitBreakers::default());
    let upstream = Upstream::default().with_circuit_breakers(breakers.clone());
    let outbound = mesh_proxy::outbound::stack(
        &routes,
        &BalanceLayer::new(endpoints),
        &Arc::new(RetryBudgets::default()),
        &breakers,
        &telemetry,
        upstream.clone(),
    );
    let inbound = mesh_proxy::inbound::stack(
        backend,
        AppProtocol::Auto,
        None,
        &Arc::new(ArcSwap::from_pointee(AuthorizationPolicies::default())),
        None,
        &telemetry,
        upstream,
    );
    Stacks { outbound, inbound }
}

/// A request as the sidecar's listener hands it to a stack.
fn request(listener: SocketAddr) -> Request<BoxBody> {
    let mut req = Request::builder()
        .uri("/")
        .header(http::header::HOST, HOST)
        .body(body::empty())
        .expect("a valid request");
    req.extensions_mut().insert(ClientInfo {
        remote: SocketAddr::from(([127, 0, 0, 1], 40000)),
        local: listener,
        tls: false,
    });
    req
}

async fn send<S>(svc: &mut S, req: Request<BoxBody>)
where
    S: Service<Request<BoxBody>, Response = Response<BoxBody>>,
    S::Error: std::fmt::Debug,
{
    let resp = svc
        .ready()
        .await
        .expect("ready")
        .call(req)
        .await
        .expect("a response");
    assert_eq!(resp.status(), http::StatusCode::OK);
    black_box(resp.into_body().collect().await.expect("the body"));
}

fn whole_stacks(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let backend = rt.block_on(start_backend());
    let listener = SocketAddr::from(([127, 0, 0, 1], 15001));
    let mut group = c.benchmark_group("stack");

    let mut bare = rt.block_on(bare_client(backend));
    group.bench_function("bare_hyper", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    bare.ready().await.expect("the connection is open");
                    let req = Request::builder()
                        .uri("/")
                        .header(http::header::HOST, HOST)
                        .body(body::empty())
                        .expect("a valid request");
                    let resp = bare.send_request(req).await.expect("a response");
                    black_box(resp.into_body().collect().await.expect("the body"));
                }
                start.elapsed()
            })
        })
    });

    let mut upstream = Upstream::default();
    group.bench_function("upstream", |b| {
        bench_svc(b, &rt, &mut upstream, || {
            let mut req = request(listener);
            req.extensions_mut()
                .insert(UpstreamTarget::new(backend, false, Arc::from("backend")));
            req
        })
    });

    let Stacks {
        mut outbound,
        mut inbound,
    } = stacks(config(backend), backend);
    group.bench_function("outbound_stack", |b| {
        bench_svc(b, &rt, &mut outbound, || request(listener))
    });
    group.bench_function("inbound_stack", |b| {
        bench_svc(b, &rt, &mut inbound, || request(listener))
    });
    group.finish();
}

/// Times `iters` requests made by `make`, one after another, through `svc`.
fn bench_svc<S>(
    b: &mut criterion::Bencher<'_>,
    rt: &Runtime,
    svc: &mut S,
    make: impl Fn() -> Request<BoxBody>,
) where
    S: Service<Request<BoxBody>, Response = Response<BoxBody>>,
    S::Error: std::fmt::Debug,
{
    b.iter_custom(|iters| {
        rt.block_on(async {
            let start = Instant::now();
            for _ in 0..iters {
                send(svc, make()).await;
            }
            start.elapsed()
        })
    });
}

async fn bare_client(backend: SocketAddr) -> hyper::client::conn::http1::SendRequest<BoxBody> {
    let stream = tokio::net::TcpStream::connect(backend)
        .await
        .expect("connect to the backend");
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    sender
}

criterion_group!(benches, whole_stacks);
criterion_main!(benches);
