//! Istio's standard metrics, with Istio's names, types, buckets and labels, so Istio's
//! Grafana dashboards and Kiali read them unchanged.
//!
//! ```
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use mesh_core::config::{Protocol, ServicePort};
//! use mesh_core::stream_info::StreamInfo;
//! use mesh_core::target::RouteTarget;
//! use mesh_core::{HostName, body::BoxError};
//! use mesh_telemetry::metrics::{Format, Metrics, MetricsLayer, PEER_METADATA_HEADER, WorkloadInfo};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let metrics = Arc::new(Metrics::new());
//! let me = WorkloadInfo::new("productpage-v1", "default").with_app("productpage").with_version("v1");
//! let reviews = RouteTarget::new(Arc::new(ServicePort::new(
//!     HostName::qualify("reviews", "default"), 9080, Protocol::Http,
//! )));
//!
//! // Stands for the rest of the outbound stack: routing records its decision.
//! let rest = service_fn(move |req: http::Request<_>| {
//!     assert!(req.headers().contains_key(PEER_METADATA_HEADER), "our metadata goes out");
//!     req.extensions().get::<StreamInfo>().unwrap().set_route(&reviews);
//!     async { Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from("ok")))) }
//! });
//! let svc = MetricsLayer::outbound(metrics.clone(), Arc::new(me)).layer(rest);
//! let response = svc.oneshot(http::Request::new(Full::new(Bytes::new()))).await.unwrap();
//! response.into_body().collect().await.unwrap(); // recorded when the body ends
//!
//! let text = metrics.encode(Format::Prometheus);
//! assert!(text.contains(concat!(
//!     r#"istio_requests_total{reporter="source",source_workload="productpage-v1","#,
//!     r#"source_canonical_service="productpage",source_canonical_revision="v1","#,
//! )));
//! assert!(text.contains(concat!(
//!     r#"destination_service="reviews.default.svc.cluster.local","#,
//!     r#"destination_canonical_service="unknown",destination_canonical_revision="unknown","#,
//!     r#"destination_service_name="reviews",destination_service_namespace="default","#,
//!     r#"destination_cluster="unknown",request_protocol="http",response_code="200","#,
//!     r#"grpc_response_status="",response_flags="-",connection_security_policy="unknown"} 1"#,
//! )));
//! # }
//! ```
//!
//! # What there is
//!
//! - [`Metrics`]: the registry, one per proxy. `istio_requests_total`,
//!   `istio_request_duration_milliseconds` (Envoy's default buckets, 0.5 ms to 1 h),
//!   `istio_request_bytes` / `istio_response_bytes` (body sizes; 1 B to 10 MB by powers of
//!   ten), `istio_request_messages_total` / `istio_response_messages_total` (gRPC only), the
//!   four `istio_tcp_*` families, and `process_*` read from `/proc/self` at scrape time.
//!   [`Metrics::encode`] renders Prometheus text 0.0.4 or OpenMetrics ([`Format`], picked
//!   from `Accept` by [`Format::from_accept`]); [`Metrics::register`] adds the proxy's own.
//! - [`MetricsLayer::outbound`] (`reporter="source"`) and [`MetricsLayer::inbound`]
//!   (`reporter="destination"`): the HTTP metrics of each request.
//! - [`TcpMetrics`]: the TCP metrics of each opaque connection.
//! - The peer metadata exchange ([`PEER_METADATA_HEADER`], [`PeerMetadata`]): how each side
//!   learns the other's workload labels.
//!
//! # Where each label comes from
//!
//! | labels | outbound (`source`) | inbound (`destination`) |
//! |---|---|---|
//! | `source_*` | this [`WorkloadInfo`] | the caller's metadata header; `source_principal` its verified [`Identity`](mesh_core::Identity) |
//! | `destination_*` workload | the upstream sidecar's metadata header on the response; `destination_principal` [`StreamInfo::upstream_peer`](mesh_core::stream_info::StreamInfo::upstream_peer) | this [`WorkloadInfo`] |
//! | `destination_service*` | the route's service ([`StreamInfo::route`](mesh_core::stream_info::StreamInfo::route)) | the [`ServiceResolver`] on the authority |
//! | `connection_security_policy` | `unknown` (as Istio's source reports) | `mutual_tls` with a verified `Identity`, else `none` |
//! | `request_protocol` | `grpc` for `content-type: application/grpc` (`+proto`, ...), else `http` | same |
//! | `response_code` | the status; `0` when the caller left before any response | same |
//! | `grpc_response_status` | `grpc-status` of the head or the trailers (0–16, else `2`); empty when none or not gRPC | same |
//! | `response_flags` | Envoy codes in `x-mesh-response-flags`, `-` when none | same |
//!
//! Anything not known is `unknown`. A raw authority or path never becomes a label value:
//! services come from the route or the resolver (the registry), peers from a bounded,
//! charset-checked header, flags and gRPC statuses from fixed sets.
//!
//! # Choices
//!
//! - **Recorded when the response body ends**, as Istio records at stream end: the count,
//!   the duration (from the call to the last response byte, on tokio's clock, so paused
//!   time in tests), the request and response body sizes (the bytes of the data frames that
//!   went through each body) and the gRPC messages (5-byte length prefixes counted in each
//!   direction). A request is recorded exactly once: when its body ends; when its body is
//!   dropped unfinished or its future before any response (the caller went away: flag
//!   `DC`, and code `0` without a response); or when the inner service fails — then with the
//!   status and flags of its [`ProxyError`](mesh_core::ProxyError), else `502 UPE`, which is
//!   what `LocalReply` answers. So the layer may sit just inside `LocalReply` (it sees the
//!   errors) or outside it (it sees the local replies).
//! - **Label handles are cached per layer.** The request path neither builds nor hashes
//!   Istio's 25 label values: it looks up a small key (the route's `Arc<ServicePort>` and the
//!   interned peer metadata by address, the principal, and small integers) in a bounded map
//!   and gets the series' counter and histogram handles (see *Label caching* below).
//! - **Peer metadata is trusted only from a verified peer**: on the inbound side when the
//!   request carries an [`Identity`](mesh_core::Identity) (the listener inserts one for mTLS
//!   clients only), on the outbound side when [`StreamInfo::upstream_peer`] is set (the
//!   upstream connection was mTLS-verified). Otherwise the header is ignored, and the peer's
//!   workload labels stay `unknown`. Either way the header is removed: the app never sees its
//!   peer's (inbound request, outbound response). The inbound side answers with its own header
//!   only to a verified peer that sent one, so plain-text clients never learn it. The outbound
//!   side sends its header on every request: which requests leave over mTLS is decided
//!   further in.
//! - **Bodies are wrapped, not boxed.** The inner service gets a [`RequestBody<B>`] and the
//!   caller a [`ResponseBody<RB>`], tower-http style; in a stack of
//!   [`BoxBody`](mesh_core::body::BoxBody)s box them on either side:
//!
//! ```
//! # use std::sync::Arc;
//! # use mesh_core::body::{BoxBody, BoxError, boxed};
//! # use mesh_telemetry::metrics::{Metrics, MetricsLayer, WorkloadInfo};
//! # use tower::{ServiceBuilder, service_fn, util::BoxCloneSyncService};
//! # let metrics = Arc::new(Metrics::new());
//! # let me = Arc::new(WorkloadInfo::new("productpage-v1", "default"));
//! # let rest = service_fn(|_req: http::Request<BoxBody>| async {
//! #     Ok::<_, BoxError>(http::Response::new(mesh_core::body::empty()))
//! # });
//! let stack: BoxCloneSyncService<http::Request<BoxBody>, http::Response<BoxBody>, BoxError> =
//!     BoxCloneSyncService::new(
//!         ServiceBuilder::new()
//!             .map_response(|r: http::Response<_>| r.map(boxed))
//!             .layer(MetricsLayer::outbound(metrics, me))
//!             .map_request(|r: http::Request<_>| r.map(boxed))
//!             .service(rest),
//!     );
//! ```
//!
//! # Label caching
//!
//! Each layer keeps a map from a series key to the series' handles (clones of the
//! registry's counters and histograms, which share their atomics; no `Family` guard is ever
//! held). The key holds what decides a series, each in its cheapest form: the service as
//! the route's `Arc<ServicePort>` by address (inbound: the resolver's `Arc<str>`), the peer
//! metadata as an interned `Arc` by address, the principal, and status, flags, gRPC status,
//! protocol and security as small integers. A hit costs one hash of a few words, a read
//! lock and an `Arc` clone. The map is bounded ([`SERIES_CACHE_CAPACITY`]): when full it is
//! cleared, so hostile peers cannot grow it and config reloads (new route `Arc`s) refill it
//! with the live set rather than leaving new routes uncached. Decoded peer headers are
//! interned in a table bounded by [`MAX_PEERS`]; past it, unseen peers are reported as
//! `unknown`, which also bounds the series a hostile verified peer can create. Both maps
//! hash with FxHash rather than SipHash (bounded maps, keys from verified peers and config).
//!
//! What a request costs through the layer is measured by the `telemetry` criterion bench
//! (`cargo bench -p benches --bench telemetry`), recorded in `benches/RESULTS.md`.
//!
//! [`StreamInfo::upstream_peer`]: mesh_core::stream_info::StreamInfo::upstream_peer

mod body;
mod cache;
mod exposition;
mod labels;
mod layer;
mod peer;
mod process;
mod record;
mod registry;
mod tcp;
mod workload;

#[cfg(all(feature = "trace", feature = "access-log"))]
pub(crate) use body::{GrpcFramer, RequestTally};
pub use body::{RequestBody, ResponseBody};
pub use cache::SERIES_CACHE_CAPACITY;
pub use exposition::{Format, OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE};
pub use labels::{HTTP_LABEL_NAMES, Reporter, SecurityPolicy, TCP_LABEL_NAMES};
#[cfg(all(feature = "trace", feature = "access-log"))]
pub(crate) use layer::Direction;
pub use layer::{MetricsLayer, MetricsService, ResponseFuture, ServiceResolver};
pub use peer::{
    MAX_FIELDS, MAX_HEADER_LEN, MAX_PEERS, PEER_METADATA_HEADER, PeerMetadata, PeerMetadataError,
};
pub use process::ProcessCollector;
#[cfg(all(feature = "trace", feature = "access-log"))]
pub(crate) use record::Recorder;
pub use registry::{DURATION_BUCKETS_MS, Metrics, SIZE_BUCKETS_BYTES};
pub use tcp::{TcpConnection, TcpConnectionMetrics, TcpMetrics};
pub use workload::{LATEST, UNKNOWN, WorkloadInfo};
