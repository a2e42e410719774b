//! What the telemetry layers cost a request: metrics, an unsampled span, the access log.
//!
//! The stacks are the sidecar's own: `mesh_proxy::telemetry::Telemetry::{outbound, inbound}`
//! over the rest of the stack (here an endpoint that answers 200 with an 11-byte body), so
//! the layers, their order (access log → metrics → trace → rest) and the boxing between
//! them are exactly what the proxy runs. Each iteration is one request as the listener and
//! `ProxyHeaders` hand it over (`ClientInfo`, `host`, `user-agent`, `accept`,
//! `x-forwarded-for`, `x-forwarded-proto`, `x-request-id` and an unsampled `traceparent`),
//! through a clone of the stack (the server clones its stack per request), the response
//! body read to its end (where metrics and the log line are recorded).
//!
//! Outbound (this workload, `reviews-v1`, calls `ratings:9080`), the endpoint stands for
//! routing and the upstream connection: it records the route (from the config's registry),
//! the endpoint's address and its verified identity in `StreamInfo`, and answers with the
//! upstream sidecar's peer metadata header, as an mTLS hop in the mesh does. Inbound
//! (`productpage-v1` calls this workload), the request carries the caller's verified
//! `Identity` and its peer metadata header, and the real resolver names the service.
//!
//! - `baseline`: the outbound request to the endpoint, no layers.
//! - `baseline_inbound`: the inbound request (one more header and the `Identity`), no layers.
//! - `metrics_outbound`, `metrics_inbound`: the metrics layer alone, on the label-cache hit
//!   path (the warm-up fills the cache).
//! - `metrics_trace_unsampled`: outbound, metrics and a CLIENT trace layer with
//!   `sampling: 0` and no collector, on a request whose `traceparent` is unsampled: the
//!   propagation path (no span object).
//! - `metrics_trace_unsampled_access_log_json`, `..._text`: the same under the access log,
//!   writing JSON or Istio's text line to a writer that discards (and counts) the bytes.
//!
//! A case's overhead is its time less its baseline's (`baseline_inbound` for
//! `metrics_inbound`); every case, baselines included, boxes its stack the same way and
//! clones it once per request, so those costs cancel out.
//!
//! **The access log's writer task is inside the measured time.** The log formats its lines
//! on a task of the runtime it was opened in, here the bench's current-thread runtime. Under
//! `to_async` all iterations of a sample run inside one `block_on`, and a current-thread
//! runtime runs its other tasks only while the `block_on` future is pending: since every
//! request here completes without waiting, the writer would never run while the clock
//! runs, its channel would fill after 8192 lines, and every later line would be dropped
//! (the cheap path: `try_send` fails, nothing is formatted). So every `YIELD_EVERY` (32)
//! requests, in every case, the iteration ends with `tokio::task::yield_now()`, during which
//! the writer takes the lines waiting (a batch of that many, as it does under load; it
//! takes up to 256 per wake-up), formats them into its buffer and, every 64 KiB or 500 ms,
//! writes the buffer out. The figure is the request's cost plus its line's formatting and
//! its share of the writer's wake-up. After each access log case the bench flushes the log
//! and panics if any line was dropped: every line was formatted, nearly all of them while
//! measured (at most one batch per sample spills into the next sample or the flush).
//!
//! `cargo bench -p benches --bench telemetry -- --warm-up-time 1 --measurement-time 3`

#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use criterion::{Criterion, criterion_group, criterion_main};
use http::header::{ACCEPT, HOST, HeaderName, HeaderValue, USER_AGENT};
use http::{Request, Response};
use http_body_util::BodyExt;
use mesh_core::Identity;
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::config::bootstrap::{AccessLogEncoding, TracingSettings};
use mesh_core::config::{MeshConfig, Source, load_sources};
use mesh_core::conn::ClientInfo;
use mesh_core::stream_info::StreamInfo;
use mesh_core::target::RouteTarget;
use mesh_proxy::telemetry::{Inner, Telemetry};
use mesh_telemetry::access_log::AccessLog;
use mesh_telemetry::metrics::{PEER_METADATA_HEADER, PeerMetadata, WorkloadInfo};
use mesh_telemetry::trace::Tracing;
use tokio::io::AsyncWrite;
use tokio::runtime::Runtime;
use tower::util::BoxCloneSyncService;
use tower::{ServiceExt, service_fn};

/// This proxy (`reviews-v1`, app on 9080) and the two services it deals with.
const CONFIG: &str = r#"
apiVersion: mesh-proxy/v1
kind: Bootstrap
metadata: { name: reviews-v1, namespace: default }
spec:
  workload: { name: reviews-v1, labels: { app: reviews, version: v1 } }
  inbound: { listen: "127.0.0.1:15006", app: "127.0.0.1:9080" }
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: reviews, namespace: default }
spec:
  hosts: [reviews]
  location: MESH_INTERNAL
  ports: [{ number: 9080, name: http, protocol: HTTP }]
  resolution: STATIC
  endpoints: [{ address: 10.0.0.5 }]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: ratings, namespace: default }
spec:
  hosts: [ratings]
  location: MESH_INTERNAL
  ports: [{ number: 9080, name: http, protocol: HTTP }]
  resolution: STATIC
  endpoints: [{ address: 10.0.0.7 }]
"#;

/// An incoming W3C context whose caller decided not to sample.
const TRACEPARENT_UNSAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";

/// Requests between two yields to the runtime, when the access log's writer runs; well
/// under its channel's 8192 lines.
const YIELD_EVERY: u64 = 32;

// Names and values built once: parsing headers is the HTTP server's cost, not telemetry's.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

#[derive(Clone, Copy)]
enum Side {
    Outbound,
    Inbound,
}

/// What the requests and the endpoints share.
struct Fixture {
    config: Arc<MeshConfig>,
    /// The outbound route's decision, as routing records it.
    route: RouteTarget,
    /// The peer on the other end: `ratings-v1` upstream, `productpage-v1` downstream.
    peer_identity: Identity,
    peer_metadata: HeaderValue,
    client: ClientInfo,
}

impl Fixture {
    fn new() -> Fixture {
        let config = Arc::new(load_sources(&[Source::new("bench.yaml", CONFIG)]).unwrap());
        let ratings = config.services().lookup("ratings", 9080).unwrap().clone();
        Fixture {
            route: RouteTarget::new(ratings),
            config,
            peer_identity: Identity::parse("spiffe://cluster.local/ns/default/sa/peer").unwrap(),
            peer_metadata: PeerMetadata::of(
                &WorkloadInfo::new("peer-v1", "default")
                    .with_app("peer")
                    .with_version("v1"),
            )
            .encode()
            .unwrap(),
            client: ClientInfo {
                remote: "127.0.0.1:40112".parse().unwrap(),
                local: "127.0.0.1:15001".parse().unwrap(),
                tls: false,
            },
        }
    }

    /// The sidecar's telemetry for this Bootstrap: metrics only, until a case adds tracing
    /// or an access log.
    fn telemetry(&self) -> Telemetry {
        let bootstrap = self.config.bootstrap().unwrap();
        let identity = Identity::parse("spiffe://cluster.local/ns/default/sa/reviews").unwrap();
        Telemetry::new(
            bootstrap,
            Some(identity),
            Arc::new(ArcSwap::new(self.config.clone())),
        )
        .unwrap()
    }

    /// The rest of the stack, boxed as the sidecar boxes it.
    fn endpoint(&self, side: Side) -> Inner {
        let route = self.route.clone();
        let peer = self.peer_identity.clone();
        let metadata = self.peer_metadata.clone();
        let upstream = "10.0.0.7:9080".parse().unwrap();
        BoxCloneSyncService::new(service_fn(move |req: Request<BoxBody>| {
            let mut resp = Response::new(body::full(&b"{\"stars\":5}"[..]));
            if let Side::Outbound = side {
                // Without telemetry layers there is no StreamInfo: routing skips recording.
                if let Some(info) = req.extensions().get::<StreamInfo>() {
                    info.set_route(&route);
                    info.set_upstream(upstream);
                    info.set_upstream_peer(peer.clone());
                }
                resp.headers_mut()
                    .insert(PEER_METADATA_HEADER, metadata.clone());
            }
            // The request body is empty (a GET); dropping it is reading it.
            drop(req);
            async move { Ok::<_, BoxError>(resp) }
        }))
    }

    /// One request as the listener and `ProxyHeaders` leave it.
    fn request(&self, side: Side) -> Request<BoxBody> {
        let (host, xff) = match side {
            Side::Outbound => ("ratings:9080", "127.0.0.1"),
            Side::Inbound => ("reviews:9080", "10.0.0.3"),
        };
        let mut req = Request::new(body::empty());
        *req.uri_mut() = http::Uri::from_static("/ratings/0");
        let headers = req.headers_mut();
        let v = HeaderValue::from_static;
        headers.insert(HOST, v(host));
        headers.insert(USER_AGENT, v("Go-http-client/1.1"));
        headers.insert(ACCEPT, v("*/*"));
        headers.insert(X_FORWARDED_FOR, v(xff));
        headers.insert(X_FORWARDED_PROTO, v("http"));
        headers.insert(X_REQUEST_ID, v("a8b1c6e0-4c3b-4c1f-9a5e-0d3f2b6c7e11"));
        headers.insert(TRACEPARENT, v(TRACEPARENT_UNSAMPLED));
        req.extensions_mut().insert(self.client.clone());
        if let Side::Inbound = side {
            req.headers_mut()
                .insert(PEER_METADATA_HEADER, self.peer_metadata.clone());
            req.extensions_mut().insert(self.peer_identity.clone());
        }
        req
    }
}

/// A writer that discards what it is given and counts the bytes.
struct Discard(Arc<AtomicU64>);

impl AsyncWrite for Discard {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Benches one request per iteration through `svc`; returns how many were sent.
fn bench(
    c: &mut Criterion,
    rt: &Runtime,
    fixture: &Fixture,
    name: &str,
    side: Side,
    svc: Inner,
) -> u64 {
    let mut sent = 0u64;
    c.bench_function(&format!("telemetry/{name}"), |b| {
        b.to_async(rt).iter(|| {
            sent += 1;
            let yields = sent.is_multiple_of(YIELD_EVERY);
            let svc = svc.clone();
            let req = fixture.request(side);
            async move {
                let resp = svc.oneshot(req).await?;
                let body = resp.into_body().collect().await?;
                // Lets the access log's writer task take the lines waiting now, while the
                // clock runs (see the module docs); in every case, so the yield's own cost
                // cancels out.
                if yields {
                    tokio::task::yield_now().await;
                }
                Ok::<_, BoxError>(black_box(body))
            }
        })
    });
    sent
}

fn telemetry(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    // The access log spawns its writer task on the current runtime.
    let _enter = rt.enter();
    let fixture = Fixture::new();
    let unsampled = TracingSettings {
        sampling: 0.0,
        otlp: None,
    };

    bench(
        c,
        &rt,
        &fixture,
        "baseline",
        Side::Outbound,
        fixture.endpoint(Side::Outbound),
    );
    bench(
        c,
        &rt,
        &fixture,
        "baseline_inbound",
        Side::Inbound,
        fixture.endpoint(Side::Inbound),
    );

    let t = fixture.telemetry();
    let svc = t.outbound(fixture.endpoint(Side::Outbound));
    bench(c, &rt, &fixture, "metrics_outbound", Side::Outbound, svc);

    let t = fixture.telemetry();
    let svc = t.inbound(fixture.endpoint(Side::Inbound));
    bench(c, &rt, &fixture, "metrics_inbound", Side::Inbound, svc);

    let mut t = fixture.telemetry();
    t.tracing = Some(Tracing::new(&unsampled, "reviews.default").unwrap());
    let svc = t.outbound(fixture.endpoint(Side::Outbound));
    bench(
        c,
        &rt,
        &fixture,
        "metrics_trace_unsampled",
        Side::Outbound,
        svc,
    );

    for (suffix, encoding) in [
        ("json", AccessLogEncoding::Json),
        ("text", AccessLogEncoding::Text),
    ] {
        let written = Arc::new(AtomicU64::new(0));
        let log = AccessLog::from_writer(Discard(written.clone()), encoding).unwrap();
        let mut t = fixture.telemetry();
        t.tracing = Some(Tracing::new(&unsampled, "reviews.default").unwrap());
        t.access_log = Some(log.clone());
        let svc = t.outbound(fixture.endpoint(Side::Outbound));
        let name = format!("metrics_trace_unsampled_access_log_{suffix}");
        let sent = bench(c, &rt, &fixture, &name, Side::Outbound, svc);
        // Every line was handed over and formatted, none dropped for a full channel (which
        // would mean the writer did not run while measured).
        rt.block_on(log.flush()).unwrap();
        let bytes = written.load(Ordering::Relaxed);
        assert_eq!(log.dropped(), 0, "{name}: access log lines were dropped");
        assert!(bytes > 0, "{name}: nothing was written");
        eprintln!(
            "{name}: {sent} requests, {bytes} bytes logged ({} per request), 0 dropped",
            bytes / sent.max(1)
        );
    }
}

criterion_group!(benches, telemetry);
criterion_main!(benches);
