//! Distributed tracing: one OpenTelemetry span per request, W3C and B3 propagation, sampling
//! as Istio does it, OTLP/gRPC export.
//!
//! [`Tracing`] is built once from the Bootstrap's `tracing` settings and the workload's
//! service name; [`TraceLayer::server`] goes on the inbound stack and [`TraceLayer::client`] on
//! the outbound one. For each request the layer reads the caller's trace context, decides
//! whether the trace is sampled, starts a span as a child of the caller's (a root when there is
//! none), writes the new span's context into the request it forwards, records the trace id in
//! the request's [`StreamInfo`](mesh_core::stream_info::StreamInfo) for the access log, and
//! ends the span when the response body ends (or is dropped).
//!
//! ```
//! use mesh_core::body::BoxError;
//! use mesh_core::config::bootstrap::TracingSettings;
//! use mesh_telemetry::trace::{TraceLayer, Tracing};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // No collector: spans are propagated, not exported.
//! let settings = TracingSettings { sampling: 1.0, otlp: None };
//! let tracing = Tracing::new(&settings, "productpage.default").unwrap();
//!
//! let app = service_fn(|req: http::Request<String>| async move {
//!     // The app sees this proxy's span as its parent, in the caller's trace, sampled as the
//!     // caller decided.
//!     let tp = req.headers()["traceparent"].to_str().unwrap().to_string();
//!     Ok::<_, BoxError>(http::Response::new(tp))
//! });
//! let svc = TraceLayer::server(&tracing).layer(app);
//! let req = http::Request::builder()
//!     .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
//!     .body(String::new())
//!     .unwrap();
//! let seen = svc.oneshot(req).await.unwrap().into_body().into_inner();
//! assert!(seen.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
//! assert!(seen.ends_with("-01"));
//! assert!(!seen.contains("00f067aa0ba902b7"), "a new span id");
//! # }
//! ```
//!
//! # Choices
//!
//! - **Propagation.** Incoming: a valid `traceparent` wins, else `b3`, else `x-b3-*`; anything
//!   malformed is ignored and a new trace starts (never an error). Outgoing: `traceparent`
//!   always, and B3 in each form the request came with, so B3 apps keep working behind the
//!   proxy; `tracestate` is forwarded untouched (and dropped when the trace restarts). The
//!   codec is hand-written, allocation-free on the read side, rather than the OpenTelemetry
//!   propagators (which allocate per request and read B3 differently from its spec: a context
//!   without a sampling state is deferred, debug means sampled); they are the tests' oracles.
//! - **Sampling.** Parent-based: a caller's decision stands (sampled over 0 %, unsampled over
//!   100 %); with none (a new trace, or a deferred B3 context) the `sampling` percentage
//!   decides on the trace id, as OpenTelemetry's ratio sampler does. Without a collector the
//!   decision is still made and propagated, so proxies downstream that do export record the
//!   same traces.
//! - **Cost.** An unsampled request gets no span object: the layer finds the trace headers in
//!   one walk over the request's headers, parses them in place, draws a span id (a
//!   thread-local generator), writes `traceparent` with `-00` (the one allocation) and records
//!   the trace id: about 2,200 instructions for a request with five headers and a
//!   `traceparent`, half of them the new header value (validate, allocate, replace). Sampled
//!   requests pay for an SDK span, its attributes and one boxed record that rides in the
//!   response body.
//! - **Export.** With `otlp`, spans go through the SDK's batch processor (bounded queue, 2048
//!   spans by default) to the collector over plaintext OTLP/gRPC. When the collector is down
//!   or slow the queue fills and new spans are dropped: ending a span is a `try_send`, so a
//!   request never waits. Where export runs: the batch processor has its own thread, which
//!   blocks on each export; the gRPC connection's I/O runs on a one-worker tokio runtime the
//!   pipeline owns (thread `mesh-otlp`). The SDK's tonic exporter must be built inside a
//!   tokio runtime, and exports fail or hang if that runtime stops or (current-thread) is
//!   blocked by a flush; owning one avoids all three, keeps export off the proxy's workers
//!   and lets [`Tracing::new`] run with or without a runtime. [`Tracing::shutdown`] flushes at
//!   drain (on a blocking thread); dropping the last handle flushes in the background. Export
//!   failures are logged through `tracing` (targets `opentelemetry_sdk`,
//!   `opentelemetry-otlp`).
//! - **Span names** are bounded, never per path: a routed request is named like Istio's route
//!   decorator, `{service host}:{port}/*` (`reviews.default.svc.cluster.local:9080/*`); an
//!   unrouted outbound request `{authority}/*` (the local app chose it); an inbound request
//!   without a route `{service name}/*`, since the `Host` a peer sends is not ours to trust
//!   for cardinality. The path is an attribute (`url.path`, query removed).
//! - **Attributes**: `http.request.method`, `url.path`, `server.address`/`server.port` (from
//!   the authority), `http.response.status_code`, `response_flags` (Envoy's, `-` when none),
//!   `guid:x-request-id` (Envoy's tag), `upstream_cluster` (Istio's
//!   `outbound|9080|v1|reviews.default.svc.cluster.local`) when routed; on SERVER spans
//!   `network.peer.address`/`.port` (the downstream connection) and `source_principal` (the
//!   verified mTLS peer); on CLIENT spans `network.peer.address`/`.port` (the endpoint that
//!   answered) and `destination_principal` (its verified identity). A 5xx response, a failed
//!   inner service or a failed response body sets the span's status to error and
//!   `error.type`.
//! - The service name (the OTLP resource's `service.name`) is the caller's to choose; Istio
//!   uses `{app}.{namespace}`.

mod export;
mod layer;
mod propagation;
mod sampler;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::config::bootstrap::TracingSettings;

#[cfg(all(feature = "metrics", feature = "access-log"))]
pub(crate) use layer::{Recording, start};
pub use layer::{ResponseFuture, Trace, TraceBody, TraceLayer};

use export::Export;
use sampler::Sampler;

/// The tracing of one proxy: sampling, propagation and (optionally) export. Cheap to clone;
/// clones share one export pipeline.
#[derive(Clone)]
pub struct Tracing {
    inner: Arc<Inner>,
}

struct Inner {
    service_name: Arc<str>,
    percent: f64,
    sampler: Sampler,
    export: Option<Export>,
}

impl fmt::Debug for Tracing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracing")
            .field("service_name", &self.inner.service_name)
            .field("sampling", &self.inner.percent)
            .field("export", &self.inner.export)
            .finish()
    }
}

/// How spans are batched and exported; the defaults are the OpenTelemetry SDK's.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportOptions {
    /// Spans waiting for export; past this, new spans are dropped.
    pub max_queue_size: usize,
    /// Spans per export request.
    pub max_export_batch_size: usize,
    /// How long a span may wait for a batch to fill before it is exported anyway.
    pub scheduled_delay: Duration,
    /// Bound on one export (retries included) and on the flush at shutdown.
    pub export_timeout: Duration,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            max_queue_size: 2048,
            max_export_batch_size: 512,
            scheduled_delay: Duration::from_secs(5),
            export_timeout: Duration::from_secs(10),
        }
    }
}

/// Why tracing could not start, or a flush failed.
#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    #[error("tracing sampling {0} is not a percentage in 0..=100")]
    Sampling(f64),
    #[error("tracing collector {url:?}: {reason}")]
    Collector { url: String, reason: String },
    #[error("starting the span export runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("exporting spans: {0}")]
    Export(String),
}

impl Tracing {
    /// Tracing as the Bootstrap's `tracing` settings say, for the workload `service_name`
    /// (Istio's `{app}.{namespace}`), with default export options.
    ///
    /// Works with or without a tokio runtime; with `otlp`, it starts the export pipeline (which
    /// connects lazily: an absent collector is not an error here).
    pub fn new(
        settings: &TracingSettings,
        service_name: impl Into<String>,
    ) -> Result<Tracing, TracingError> {
        Tracing::with_options(settings, service_name, ExportOptions::default())
    }

    /// [`new`](Tracing::new) with explicit batching and timeouts.
    pub fn with_options(
        settings: &TracingSettings,
        service_name: impl Into<String>,
        options: ExportOptions,
    ) -> Result<Tracing, TracingError> {
        let service_name: String = service_name.into();
        let sampler = Sampler::from_percent(settings.sampling)
            .ok_or(TracingError::Sampling(settings.sampling))?;
        let export = match settings.otlp.as_deref() {
            Some(url) => Some(Export::start(url, &service_name, &options)?),
            None => None,
        };
        Ok(Tracing {
            inner: Arc::new(Inner {
                service_name: service_name.into(),
                percent: settings.sampling,
                sampler,
                export,
            }),
        })
    }

    /// The service name spans are reported under.
    pub fn service_name(&self) -> &str {
        &self.inner.service_name
    }

    /// The percentage of new traces sampled.
    pub fn sampling(&self) -> f64 {
        self.inner.percent
    }

    /// Whether spans are exported (an `otlp` collector is configured).
    pub fn exports(&self) -> bool {
        self.inner.export.is_some()
    }

    /// Exports the spans queued so far and waits for the export (bounded by the export
    /// timeout). Nothing to do without a collector.
    pub async fn flush(&self) -> Result<(), TracingError> {
        match &self.inner.export {
            Some(export) => export.flush().await,
            None => Ok(()),
        }
    }

    /// For drain: exports the queued spans, then stops exporting. Spans that end afterwards
    /// are dropped; propagation goes on. Idempotent.
    pub async fn shutdown(&self) -> Result<(), TracingError> {
        match &self.inner.export {
            Some(export) => export.shutdown().await,
            None => Ok(()),
        }
    }
}

#[cfg(test)]
impl Tracing {
    /// Tracing that hands its spans to `exporter` (batched as in production).
    pub(crate) fn with_exporter(
        sampling: f64,
        exporter: impl opentelemetry_sdk::trace::SpanExporter + 'static,
    ) -> Tracing {
        let export = Export::with_exporter(
            exporter,
            export::RuntimeGuard(None),
            "reviews.default",
            &ExportOptions::default(),
        );
        Tracing {
            inner: Arc::new(Inner {
                service_name: "reviews.default".into(),
                percent: sampling,
                sampler: Sampler::from_percent(sampling).expect("a percentage"),
                export: Some(export),
            }),
        }
    }
}
