//! The tower layer: one span per request, SERVER on the inbound side, CLIENT on the outbound.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use mesh_core::Identity;
use mesh_core::conn::ClientInfo;
use mesh_core::flags::RESPONSE_FLAGS_HEADER;
use mesh_core::host::split_authority;
use mesh_core::stream_info::StreamInfo;
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags,
    TraceId, TraceState, Tracer as _,
};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, Span as SdkSpan};
use pin_project_lite::pin_project;

use super::Tracing;
use super::export::Export;
use super::propagation::{self, Extracted, Outgoing, TRACESTATE};

/// Which side of the proxy a stack serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Inbound: a peer calls this workload; SERVER spans.
    Server,
    /// Outbound: this workload calls a service; CLIENT spans.
    Client,
}

/// Traces each request with one span; see the [module docs](super).
#[derive(Clone, Debug)]
pub struct TraceLayer {
    pub(crate) tracing: Tracing,
    pub(crate) kind: Kind,
}

impl TraceLayer {
    /// For the inbound stack: spans of kind SERVER.
    pub fn server(tracing: &Tracing) -> TraceLayer {
        TraceLayer {
            tracing: tracing.clone(),
            kind: Kind::Server,
        }
    }

    /// For the outbound stack: spans of kind CLIENT.
    pub fn client(tracing: &Tracing) -> TraceLayer {
        TraceLayer {
            tracing: tracing.clone(),
            kind: Kind::Client,
        }
    }
}

impl<S> tower::Layer<S> for TraceLayer {
    type Service = Trace<S>;
    fn layer(&self, inner: S) -> Trace<S> {
        Trace {
            inner,
            tracing: self.tracing.clone(),
            kind: self.kind,
        }
    }
}

/// The service made by [`TraceLayer`].
#[derive(Clone, Debug)]
pub struct Trace<S> {
    inner: S,
    tracing: Tracing,
    kind: Kind,
}

impl<S, B, RB> tower::Service<Request<B>> for Trace<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    S::Error: fmt::Display,
    RB: Body,
{
    type Response = Response<TraceBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let span = start(&self.tracing, self.kind, &mut req, None);
        ResponseFuture {
            inner: self.inner.call(req),
            span,
        }
    }
}

/// Decides, propagates and (when sampled and exporting) starts the request's span.
///
/// The unsampled path allocates only the forwarded `traceparent` value (and B3 values when
/// B3 came in): no span object, no attributes, no `Context`. `info`: the request's
/// [`StreamInfo`] when the caller already attached it (else attached here).
pub(crate) fn start<B>(
    tracing: &Tracing,
    kind: Kind,
    req: &mut Request<B>,
    info: Option<StreamInfo>,
) -> Option<Box<Recording>> {
    let inner = &tracing.inner;
    let extracted = propagation::extract(req.headers());
    let mut trace_id = match extracted.parent {
        Some(parent) => parent.trace_id,
        None => new_trace_id(),
    };
    let sampled = inner.sampler.decide(extracted.sampled, trace_id);

    let mut span = None;
    if sampled && let Some(export) = &inner.export {
        let started = start_span(export, &inner.service_name, kind, &extracted, req);
        // A shut-down provider hands out invalid contexts: then propagate our own ids.
        if started.span_context().is_valid() {
            span = Some(started);
        }
    }
    let span_id = match &span {
        Some(span) => {
            // The SDK drew the ids of a new trace itself.
            trace_id = span.span_context().trace_id();
            span.span_context().span_id()
        }
        None => new_span_id(),
    };

    let out = Outgoing {
        trace_id,
        span_id,
        parent_span_id: extracted.parent.map(|p| p.span_id),
        sampled,
    };
    propagation::inject(req.headers_mut(), &extracted, &out);
    let info = info.unwrap_or_else(|| StreamInfo::attach(req));
    info.set_trace_id(trace_id.to_bytes());
    span.map(|span| Box::new(Recording { span, info, kind }))
}

fn new_trace_id() -> TraceId {
    // The SDK's generator: a thread-local SmallRng. Zero is the invalid id (odds 2^-128).
    let id = RandomIdGenerator::default().new_trace_id();
    if id == TraceId::INVALID {
        TraceId::from(1)
    } else {
        id
    }
}

fn new_span_id() -> SpanId {
    let id = RandomIdGenerator::default().new_span_id();
    if id == SpanId::INVALID {
        SpanId::from(1)
    } else {
        id
    }
}

/// Starts a sampled span with what the request says; the response adds the rest.
fn start_span<B>(
    export: &Export,
    service_name: &str,
    kind: Kind,
    extracted: &Extracted,
    req: &Request<B>,
) -> SdkSpan {
    let parent = match extracted.parent {
        Some(parent) => {
            let trace_state = if extracted.w3c {
                req.headers()
                    .get(TRACESTATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| TraceState::from_str(v).ok())
                    .unwrap_or_default()
            } else {
                TraceState::default()
            };
            let flags = if extracted.sampled == Some(true) {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            };
            let sc = SpanContext::new(parent.trace_id, parent.span_id, flags, true, trace_state);
            opentelemetry::Context::new().with_remote_span_context(sc)
        }
        None => opentelemetry::Context::new(),
    };

    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(http::header::HOST)?.to_str().ok());
    let mut attributes = Vec::with_capacity(12);
    attributes.push(KeyValue::new(
        "http.request.method",
        req.method().as_str().to_string(),
    ));
    attributes.push(KeyValue::new("url.path", req.uri().path().to_string()));
    if let Some((host, port)) = authority.and_then(split_authority) {
        attributes.push(KeyValue::new("server.address", host.to_string()));
        attributes.push(KeyValue::new("server.port", i64::from(port)));
    }
    if let Some(id) = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
    {
        // Envoy's tag name, which Istio users search by.
        attributes.push(KeyValue::new("guid:x-request-id", id.to_string()));
    }
    let name = match kind {
        Kind::Server => {
            if let Some(client) = req.extensions().get::<ClientInfo>() {
                attributes.push(KeyValue::new(
                    "network.peer.address",
                    client.remote.ip().to_string(),
                ));
                attributes.push(KeyValue::new(
                    "network.peer.port",
                    i64::from(client.remote.port()),
                ));
            }
            if let Some(peer) = req.extensions().get::<Identity>() {
                attributes.push(KeyValue::new("source_principal", peer.to_string()));
            }
            format!("{service_name}/*")
        }
        Kind::Client => match authority {
            Some(authority) => format!("{authority}/*"),
            None => req.method().as_str().to_string(),
        },
    };
    let builder = SpanBuilder::from_name(name)
        .with_kind(match kind {
            Kind::Server => SpanKind::Server,
            Kind::Client => SpanKind::Client,
        })
        .with_attributes(attributes);
    export.tracer.build_with_context(builder, &parent)
}

/// A sampled request's span, from start to the end of its response body.
pub(crate) struct Recording {
    span: SdkSpan,
    info: StreamInfo,
    kind: Kind,
}

impl Recording {
    /// What the response and the inner layers tell: status, flags, route, endpoint, peer.
    pub(crate) fn on_response<RB>(&mut self, response: &Response<RB>) {
        let status = response.status();
        let span = &mut self.span;
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        ));
        let flags = response
            .headers()
            .get(RESPONSE_FLAGS_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        span.set_attribute(KeyValue::new("response_flags", flags.to_string()));
        if let Some(route) = self.info.route() {
            let (host, port) = (&route.service.host, route.service.number);
            // Istio's operation name (its route decorator): per service, never per path.
            span.update_name(format!("{host}:{port}/*"));
            let cluster = match self.kind {
                Kind::Client => {
                    let subset = route.subset.as_ref().map_or("", |s| s.name.as_str());
                    format!("outbound|{port}|{subset}|{host}")
                }
                Kind::Server => format!("inbound|{port}||"),
            };
            span.set_attribute(KeyValue::new("upstream_cluster", cluster));
        }
        if self.kind == Kind::Client {
            if let Some(addr) = self.info.upstream() {
                span.set_attribute(KeyValue::new("network.peer.address", addr.ip().to_string()));
                span.set_attribute(KeyValue::new("network.peer.port", i64::from(addr.port())));
            }
            if let Some(peer) = self.info.upstream_peer() {
                span.set_attribute(KeyValue::new("destination_principal", peer.to_string()));
            }
        }
        if status.is_server_error() {
            span.set_attribute(KeyValue::new(
                "error.type",
                Value::from(status.as_str().to_string()),
            ));
            // OpenTelemetry's HTTP conventions: the status code says it all, no description.
            span.set_status(Status::error(""));
        }
    }

    pub(crate) fn fail(mut self: Box<Self>, error: &dyn fmt::Display) {
        self.span
            .set_attribute(KeyValue::new("error.type", "_OTHER"));
        self.span.set_status(Status::error(error.to_string()));
        self.span.end();
    }

    pub(crate) fn end(mut self: Box<Self>) {
        self.span.end();
    }
}

pin_project! {
    /// Future of [`Trace`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        span: Option<Box<Recording>>,
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("sampled", &self.span.is_some())
            .finish_non_exhaustive()
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    RB: Body,
    E: fmt::Display,
{
    type Output = Result<Response<TraceBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let mut span = this.span.take();
        Poll::Ready(match result {
            Ok(response) => {
                if let Some(recording) = span.as_mut() {
                    recording.on_response(&response);
                }
                if response.body().is_end_stream()
                    && let Some(recording) = span.take()
                {
                    // hyper may never poll a body that is already at its end.
                    recording.end();
                }
                Ok(response.map(|inner| TraceBody { inner, span }))
            }
            Err(error) => {
                if let Some(recording) = span {
                    recording.fail(&error);
                }
                Err(error)
            }
        })
    }
}

pin_project! {
    /// The response body: ends the request's span at its last frame, on its error, or when
    /// dropped before either (the client went away).
    pub struct TraceBody<B> {
        #[pin]
        inner: B,
        span: Option<Box<Recording>>,
    }
}

impl<B> TraceBody<B> {
    /// The wrapped body.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B> fmt::Debug for TraceBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceBody")
            .field("recording", &self.span.is_some())
            .finish_non_exhaustive()
    }
}

impl<B> Body for TraceBody<B>
where
    B: Body,
    B::Error: fmt::Display,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if this.span.is_some() {
            match &frame {
                Some(Ok(_)) if !this.inner.is_end_stream() => {}
                Some(Err(error)) => {
                    if let Some(recording) = this.span.take() {
                        recording.fail(error);
                    }
                }
                _ => {
                    if let Some(recording) = this.span.take() {
                        recording.end();
                    }
                }
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

#[cfg(test)]
mod tests;
