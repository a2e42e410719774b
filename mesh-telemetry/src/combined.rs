//! [`TelemetryLayer`]: the metrics, trace and access log layers as one, for a sidecar that
//! runs them all on `BoxBody` stacks.
//!
//! Stacked one by one, each layer wraps the request body, its future and the response body,
//! and a `BoxBody` stack must box each of those bodies between layers (and a boxed stack
//! boxes each future): per request, a dozen allocations and several indirect calls that do
//! nothing but pass things along, plus a [`StreamInfo`] looked up three times and the clock
//! read by each layer. This layer does what [`AccessLogLayer`] → [`MetricsLayer`] →
//! [`TraceLayer`] do, in that order, with one future, one response body wrapper, one
//! [`StreamInfo`] and one clock reading at the start; a request without a body (the common
//! GET) is passed on unwrapped, as there is nothing to count.
//!
//! What each layer records is exactly what it records alone: the request goes through the
//! access log's capture, then the metrics' peer metadata exchange, then the trace's
//! propagation (each sees the headers as the one before left them); the response head and
//! each body frame go through the trace, then the metrics, then the access log; an error or
//! a drop reaches them in that order too. The layers' own code does the work (the same
//! functions the standalone layers call), so the two cannot drift apart.
//!
//! ```
//! use std::sync::Arc;
//! use http_body_util::BodyExt;
//! use mesh_core::body::{self, BoxBody, BoxError};
//! use mesh_core::config::bootstrap::TracingSettings;
//! use mesh_telemetry::combined::TelemetryLayer;
//! use mesh_telemetry::metrics::{Format, Metrics, MetricsLayer, WorkloadInfo};
//! use mesh_telemetry::trace::{TraceLayer, Tracing};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let metrics = Arc::new(Metrics::new());
//! let me = Arc::new(WorkloadInfo::new("productpage-v1", "default"));
//! let tracing = Tracing::new(&TracingSettings { sampling: 0.0, otlp: None }, "productpage.default")
//!     .unwrap();
//! let rest = service_fn(|req: http::Request<BoxBody>| async move {
//!     assert!(req.headers().contains_key("traceparent"));
//!     Ok::<_, BoxError>(http::Response::new(body::full("ok")))
//! });
//! let layer = TelemetryLayer::new(
//!     MetricsLayer::outbound(metrics.clone(), me),
//!     Some(TraceLayer::client(&tracing)),
//!     None,
//! );
//! let response = layer.layer(rest).oneshot(http::Request::new(body::empty())).await.unwrap();
//! response.into_body().collect().await.unwrap(); // recorded when the body ends
//! assert!(metrics.encode(Format::Prometheus).contains("istio_requests_total{"));
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use mesh_core::ResponseFlags;
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::flags::RESPONSE_FLAGS_HEADER;
use mesh_core::stream_info::StreamInfo;
use pin_project_lite::pin_project;
use tokio::time::Instant;

use crate::access_log::{self, AccessLogLayer, Pending};
use crate::metrics::{Direction, GrpcFramer, MetricsLayer, Recorder, RequestTally};
use crate::trace::{self, Recording, TraceLayer};

/// The access log (when given), metrics and trace (when given) layers as one; see the
/// [module docs](self).
#[derive(Clone, Debug)]
pub struct TelemetryLayer {
    /// One `Arc` for the three: the server clones its stack per request, and each clone
    /// of a service costs an atomic increment (and decrement) per `Arc` it holds.
    shared: Arc<Layers>,
}

#[derive(Debug)]
struct Layers {
    metrics: MetricsLayer,
    trace: Option<TraceLayer>,
    access_log: Option<AccessLogLayer>,
}

impl TelemetryLayer {
    /// What `access_log`, `metrics` and `trace` would do stacked in that order (outermost
    /// first), with their settings (side, cluster names, tracing, log).
    pub fn new(
        metrics: MetricsLayer,
        trace: Option<TraceLayer>,
        access_log: Option<AccessLogLayer>,
    ) -> TelemetryLayer {
        TelemetryLayer {
            shared: Arc::new(Layers {
                metrics,
                trace,
                access_log,
            }),
        }
    }
}

impl<S> tower::Layer<S> for TelemetryLayer {
    type Service = TelemetryService<S>;
    fn layer(&self, inner: S) -> TelemetryService<S> {
        TelemetryService {
            inner,
            layers: self.shared.clone(),
        }
    }
}

/// The service made by [`TelemetryLayer`].
#[derive(Clone, Debug)]
pub struct TelemetryService<S> {
    inner: S,
    layers: Arc<Layers>,
}

impl<S, RB> tower::Service<Request<BoxBody>> for TelemetryService<S>
where
    S: tower::Service<Request<BoxBody>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    RB: Body<Data = Bytes>,
    RB::Error: fmt::Display + 'static,
{
    type Response = Response<ResponseBody<RB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<BoxBody>) -> Self::Future {
        let layer = &*self.layers;
        // One record and one clock reading for all three: stacked, each layer would attach
        // (or look up) the record and read the clock itself, nanoseconds apart.
        // The inbound metrics alone do not read it: then, as with `MetricsLayer` alone, the
        // request gets none (and the inner layers record nothing).
        let needs_info = layer.metrics.shared.direction == Direction::Outbound
            || layer.trace.is_some()
            || layer.access_log.is_some();
        let info = needs_info.then(|| StreamInfo::attach(&mut req));
        let start = Instant::now();
        // A body already at its end yields no frame: nothing to count, so no counters and
        // no wrapper (what the wrappers would count is zero).
        let has_body = !req.body().is_end_stream();

        // The access log, outermost: the request as it arrived.
        let mut received = None;
        let log_info = match (&info, &layer.access_log) {
            (Some(info), Some(_)) => Some(info.clone()),
            // Not reached (`needs_info`), but never a line without its record.
            (None, Some(_)) => Some(StreamInfo::attach(&mut req)),
            (_, None) => None,
        };
        let pending = layer.access_log.as_ref().zip(log_info).map(|(log, info)| {
            // As `AccessLogLayer`: a counter only for a request with a body.
            received = has_body.then(|| Arc::new(AtomicU64::new(0)));
            let entry =
                access_log::capture(&req, &log.log, &log.config, info, start, received.clone());
            Pending {
                entry: Some(entry),
                log: log.log.clone(),
            }
        });

        // The metrics: the peer metadata exchange on the request's headers.
        let mut recorder = layer.metrics.shared.begin(&mut req, start, info.clone());

        // The trace, innermost: propagation on the headers as the metrics left them.
        let span = layer
            .trace
            .as_ref()
            .and_then(|t| trace::start(&t.tracing, t.kind, &mut req, info));

        let req = if has_body {
            let grpc = recorder.grpc;
            let tally = recorder.request_tally();
            req.map(|inner| {
                body::boxed(CountedBody {
                    inner,
                    tally,
                    framer: grpc.then(GrpcFramer::default),
                    received,
                })
            })
        } else {
            req
        };
        ResponseFuture {
            inner: self.inner.call(req),
            span,
            recorder: Some(recorder),
            pending,
        }
    }
}

pin_project! {
    /// The request body the inner service sees (boxed) when there is one: counted for the
    /// metrics (bytes, gRPC messages) and the access log (bytes).
    struct CountedBody {
        #[pin]
        inner: BoxBody,
        tally: Arc<RequestTally>,
        framer: Option<GrpcFramer>,
        received: Option<Arc<AtomicU64>>,
    }
}

impl Body for CountedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(data) = frame.as_ref().and_then(|f| f.as_ref().ok()?.data_ref()) {
            let len = data.len() as u64;
            this.tally.bytes.fetch_add(len, Ordering::Relaxed);
            if let Some(framer) = this.framer {
                let started = framer.feed(data);
                if started > 0 {
                    this.tally.messages.fetch_add(started, Ordering::Relaxed);
                }
            }
            if let Some(received) = this.received {
                received.fetch_add(len, Ordering::Relaxed);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// Future of [`TelemetryService`]. The fields drop in the order the stacked layers'
    /// futures would drop them: the inner future, the span, the metrics, the log line.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        span: Option<Box<Recording>>,
        recorder: Option<Recorder>,
        pending: Option<Pending>,
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("sampled", &self.span.is_some())
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: Into<BoxError>,
    RB: Body<Data = Bytes>,
{
    type Output = Result<Response<ResponseBody<RB>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let mut span = this.span.take();
        let mut recorder = this.recorder.take();
        let mut pending = this.pending.take();
        match result {
            Ok(mut response) => {
                let ended = response.body().is_end_stream();
                // The trace first (innermost), as `trace::ResponseFuture`.
                if let Some(recording) = span.as_mut() {
                    recording.on_response(&response);
                }
                if ended && let Some(recording) = span.take() {
                    // hyper may never poll a body that is already at its end.
                    recording.end();
                }
                // Then the metrics, as `metrics::ResponseFuture`.
                if let Some(recorder) = &mut recorder {
                    recorder.on_response(&mut response);
                    if ended {
                        recorder.mark_ended();
                    }
                }
                // Then the access log, as `access_log::ResponseFuture`.
                if let Some(entry) = pending.as_mut().and_then(Pending::entry) {
                    entry.status = response.status().as_u16();
                    entry.flags_header = response.headers().get(RESPONSE_FLAGS_HEADER).cloned();
                    if let Some(flags) = response.extensions().get::<ResponseFlags>() {
                        entry.flags |= *flags;
                    }
                }
                if ended {
                    // Nothing more will be read from it (hyper may never poll it).
                    if let Some(p) = pending.as_mut() {
                        p.finish();
                    }
                    pending = None;
                }
                Poll::Ready(Ok(response.map(|inner| ResponseBody {
                    inner,
                    span,
                    recorder,
                    pending,
                })))
            }
            Err(error) => {
                let error: BoxError = error.into();
                if let Some(recording) = span {
                    recording.fail(&error);
                }
                if let Some(mut recorder) = recorder {
                    recorder.on_error(&error);
                    // Dropping it records the failure.
                }
                if let Some(mut p) = pending {
                    if let (Some(entry), Some(e)) = (p.entry(), access_log::proxy_error(&error)) {
                        entry.status = e.status().as_u16();
                        entry.flags |= e.flags();
                    }
                    p.finish();
                }
                Poll::Ready(Err(error))
            }
        }
    }
}

pin_project! {
    /// The response body: the inner service's, seen by the trace, the metrics and the
    /// access log in that order. Its end (or drop) ends the span, records the metrics and
    /// hands the log line over; the fields drop in that order.
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
        span: Option<Box<Recording>>,
        recorder: Option<Recorder>,
        pending: Option<Pending>,
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("recording", &self.span.is_some())
            .field("recorded", &self.recorder.is_none())
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: fmt::Display + 'static,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        let end = match &frame {
            Some(Ok(_)) => this.inner.is_end_stream(),
            Some(Err(_)) | None => true,
        };
        // The trace, as `TraceBody`.
        if end && let Some(recording) = this.span.take() {
            match &frame {
                Some(Err(error)) => recording.fail(error),
                _ => recording.end(),
            }
        }
        // The metrics, as `metrics::ResponseBody`.
        if let Some(recorder) = this.recorder.as_mut()
            && let Some(Ok(frame)) = &frame
        {
            if let Some(data) = frame.data_ref() {
                recorder.on_response_data(data);
            } else if let Some(trailers) = frame.trailers_ref() {
                recorder.on_trailers(trailers);
            }
        }
        if end && let Some(recorder) = this.recorder.take() {
            recorder.mark_ended();
            // Dropping the recorder records the request.
        }
        // The access log, as `access_log::ResponseBody`.
        if let Some(pending) = this.pending.as_mut() {
            match &frame {
                Some(Ok(f)) => {
                    if let (Some(data), Some(entry)) = (f.data_ref(), pending.entry()) {
                        entry.sent += data.len() as u64;
                    }
                }
                Some(Err(error)) => {
                    if let Some(entry) = pending.entry() {
                        entry.flags |= match access_log::proxy_error(error) {
                            Some(e) => e.flags(),
                            None => ResponseFlags::UPSTREAM_REMOTE_RESET,
                        };
                    }
                }
                None => {}
            }
            if end {
                pending.finish();
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end && let Some(recorder) = &self.recorder {
            // The server stops polling a body that says it is over and drops it: the
            // recorder must not take that for a caller who went away.
            recorder.mark_ended();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
