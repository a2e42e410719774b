//! Access logs: one line per request, in Istio's text format or as JSON, written off the
//! request path.
//!
//! [`AccessLog`] is the destination (the Bootstrap's `accessLog`: `stdout`, `stderr` or a
//! file; or any [`AsyncWrite`](tokio::io::AsyncWrite)); [`AccessLogLayer`] logs every request
//! that passes through it, once its response body has ended.
//!
//! ```
//! use http_body_util::BodyExt;
//! use mesh_core::body::{self, BoxBody, BoxError};
//! use mesh_core::config::bootstrap::AccessLogEncoding;
//! use mesh_telemetry::access_log::{AccessLog, AccessLogLayer, RequestBody};
//! use tokio::io::AsyncBufReadExt;
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let (writer, reader) = tokio::io::duplex(64 * 1024);
//! let log = AccessLog::from_writer(writer, AccessLogEncoding::Json).unwrap();
//! // The inner service sees the request body wrapped (counted).
//! let app = service_fn(|_req: http::Request<RequestBody<BoxBody>>| async {
//!     Ok::<_, BoxError>(http::Response::new(body::full("hello")))
//! });
//! let svc = AccessLogLayer::new(log.clone()).layer(app);
//!
//! let req = http::Request::get("http://reviews:9080/reviews/1").body(body::empty()).unwrap();
//! let response = svc.oneshot(req).await.unwrap();
//! // The end of the response body (or its drop) completes the line.
//! response.into_body().collect().await.unwrap();
//! log.flush().await.unwrap();
//!
//! let mut line = String::new();
//! tokio::io::BufReader::new(reader).read_line(&mut line).await.unwrap();
//! let line: serde_json::Value = serde_json::from_str(&line).unwrap();
//! assert_eq!(line["path"], "/reviews/1");
//! assert_eq!(line["authority"], "reviews:9080");
//! assert_eq!(line["response_code"], 200);
//! assert_eq!(line["bytes_sent"], 5);
//! assert_eq!(line["response_flags"], "-");
//! # }
//! ```
//!
//! # Fields
//!
//! TEXT is Istio's default line (Envoy's default plus Istio's fields), with the peer's
//! principal and the trace id appended:
//!
//! ```text
//! [2026-01-02T03:04:05.678Z] "GET /reviews/1 HTTP/1.1" 200 - - - "-" 0 5 3 - "10.1.0.4" "curl/8.5.0"
//!   "0f6c…" "reviews:9080" "10.0.0.7:9080" outbound|9080|v1|reviews.default.svc.cluster.local
//!   - 127.0.0.1:15001 127.0.0.1:40112 - - spiffe://cluster.local/ns/default/sa/reviews
//!   4bf92f3577b34da6a3ce929d0e0e4736
//! ```
//!
//! (one line), that is `[START_TIME] "METHOD PATH PROTOCOL" RESPONSE_CODE RESPONSE_FLAGS
//! RESPONSE_CODE_DETAILS CONNECTION_TERMINATION_DETAILS "UPSTREAM_TRANSPORT_FAILURE_REASON"
//! BYTES_RECEIVED BYTES_SENT DURATION UPSTREAM_SERVICE_TIME "X-FORWARDED-FOR" "USER-AGENT"
//! "X-REQUEST-ID" "AUTHORITY" "UPSTREAM_HOST" UPSTREAM_CLUSTER UPSTREAM_LOCAL_ADDRESS
//! DOWNSTREAM_LOCAL_ADDRESS DOWNSTREAM_REMOTE_ADDRESS REQUESTED_SERVER_NAME ROUTE_NAME
//! PEER_PRINCIPAL TRACE_ID`. Columns this proxy does not track (code details, termination
//! details, transport failure reason, upstream service time, upstream local address, SNI,
//! route name) print `-`, so tools that parse Istio's columns by position still work. Any
//! unset value prints `-`.
//!
//! JSON uses Istio's keys — `start_time`, `method`, `path`, `protocol`, `response_code`,
//! `response_flags`, `bytes_received`, `bytes_sent`, `duration`, `x_forwarded_for`,
//! `user_agent`, `request_id`, `authority`, `upstream_host`, `upstream_cluster`,
//! `downstream_local_address`, `downstream_remote_address`, `route_name` — plus
//! `peer_principal` and `trace_id`; counts and the status are numbers, unset values `null`.
//! `response_flags` is `"-"` when there are none, as Envoy writes it in either encoding.
//!
//! - **path** is `x-envoy-original-path` when present, else the request's path and query, as
//!   seen when the request entered this layer (before any rewrite).
//! - **response flags** are the response's `x-mesh-response-flags` as received (a peer
//!   proxy's flags first), plus any in the response's `ResponseFlags` extension (DI) that
//!   the header does not name.
//! - **upstream host / cluster** come from [`StreamInfo`]: the last attempt's endpoint, and
//!   `outbound|PORT|SUBSET|HOST` from the route's [`RouteTarget`](mesh_core::target::RouteTarget).
//!   An inbound layer ([`AccessLogLayer::inbound`]) logs `inbound|APP_PORT||`.
//! - **peer principal** is the full SPIFFE ID of the other workload: on inbound the verified
//!   downstream [`Identity`] (request extension), on outbound the verified upstream identity
//!   ([`StreamInfo::upstream_peer`]).
//! - **duration** runs from the request entering this layer to the end of the response body.
//!
//! # How a request ends
//!
//! Exactly one line per request:
//!
//! - the response body ends (or the response has no body): the normal line;
//! - the response body is dropped before its end: the line has the status sent and flag `DC`
//!   (downstream connection termination), as Envoy logs a client that went away — except for
//!   HEAD, 1xx, 204 and 304 responses and a CONNECT's 2xx, whose bodies are never read;
//! - the response body fails: its `ProxyError`'s flags, else `UR` (the upstream reset);
//! - the inner service fails: a [`ProxyError`] logs the status and flags the local reply
//!   will carry; any other error logs status `0` (no response known to have been sent, as
//!   Envoy logs a stream without a response) and no flags;
//! - the response future is dropped (the client left while waiting): status `0`, flag `DC`;
//! - an upgrade (`101`, WebSocket) is logged when its response goes out: the bytes of the
//!   tunnel that follows are not this exchange's.
//!
//! # Cost
//!
//! The request path captures reference-counted clones (method, path, five header values,
//! the [`StreamInfo`]) into one boxed entry, and at the end hands it to a bounded channel
//! with `try_send`; it never formats, locks or waits for I/O. A request with a body
//! allocates one more counter for its bytes. The writer task renders lines with a
//! hand-written encoder straight into its buffer (no `serde_json::Value` tree, no `format!`;
//! the date is rendered once per second), and writes the buffer when it reaches 64 KiB,
//! when its oldest line is [`DEFAULT_FLUSH_INTERVAL`] old, on [`AccessLog::flush`], and
//! when the last handle is gone.
//! When the channel is full the line is dropped and counted ([`AccessLog::dropped`]): a slow
//! disk loses log lines, never requests' time. Without this layer in the stack there is no
//! cost at all.
//!
//! # Escaping
//!
//! A header value may hold any byte but CR, LF, NUL and DEL, and peers control many of them.
//! Non-UTF-8 bytes are printed as U+FFFD. In TEXT, `"` and `\` are backslash-escaped and
//! control characters written `\n`, `\t`, `\xHH`; unquoted columns (flags from a peer)
//! also escape spaces and quotes (`\x20`, `\x22`). JSON strings are escaped per RFC 8259. A
//! line is always one line.
//!
//! # Placement
//!
//! Outermost, inside the layer that turns errors into local replies or outside it: inside,
//! errors reach this layer as [`ProxyError`]s; outside, as responses with their flags
//! header. Request headers are read as the request enters this layer, so put it inside the
//! layer that sets `x-request-id` and `x-forwarded-for` to log theirs. The inner service
//! receives the request body wrapped in [`RequestBody`] (which counts bytes).
//!
//! [`Identity`]: mesh_core::Identity
//! [`ProxyError`]: mesh_core::ProxyError

mod format;
mod sink;

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Buf;
use http::header::{HOST, HeaderName, USER_AGENT};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use mesh_core::body::BoxError;
use mesh_core::conn::ClientInfo;
use mesh_core::flags::RESPONSE_FLAGS_HEADER;
use mesh_core::stream_info::StreamInfo;
use mesh_core::{Identity, ProxyError, ResponseFlags};
use pin_project_lite::pin_project;

use format::{Entry, LayerConfig};
pub use sink::{
    AccessLog, AccessLogBuilder, AccessLogError, Clock, DEFAULT_CAPACITY, DEFAULT_FLUSH_INTERVAL,
};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_ENVOY_ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");

/// Logs every request to an [`AccessLog`]; see the module docs.
#[derive(Clone, Debug)]
pub struct AccessLogLayer {
    pub(crate) log: AccessLog,
    pub(crate) config: Arc<LayerConfig>,
}

impl AccessLogLayer {
    /// An outbound (client-side) log: cluster from the route, peer = the upstream's identity.
    pub fn new(log: AccessLog) -> Self {
        AccessLogLayer {
            log,
            config: Arc::new(LayerConfig {
                inbound: false,
                cluster: None,
            }),
        }
    }

    /// An inbound (server-side) log in front of the app on `app_port`: cluster
    /// `inbound|APP_PORT||` as Istio names it, peer = the verified downstream identity.
    pub fn inbound(log: AccessLog, app_port: u16) -> Self {
        AccessLogLayer {
            log,
            config: Arc::new(LayerConfig {
                inbound: true,
                cluster: Some(format!("inbound|{app_port}||").into()),
            }),
        }
    }

    /// The cluster name logged when routing chose none (on inbound: instead of
    /// `inbound|APP_PORT||`), for compositions with their own naming.
    pub fn with_cluster(self, name: impl Into<Arc<str>>) -> Self {
        AccessLogLayer {
            config: Arc::new(LayerConfig {
                inbound: self.config.inbound,
                cluster: Some(name.into()),
            }),
            log: self.log,
        }
    }
}

impl<S> tower::Layer<S> for AccessLogLayer {
    type Service = AccessLogService<S>;
    fn layer(&self, inner: S) -> AccessLogService<S> {
        AccessLogService {
            inner,
            log: self.log.clone(),
            config: self.config.clone(),
        }
    }
}

/// The service made by [`AccessLogLayer`].
#[derive(Clone, Debug)]
pub struct AccessLogService<S> {
    inner: S,
    log: AccessLog,
    config: Arc<LayerConfig>,
}

impl<S, ReqB, ResB> tower::Service<Request<ReqB>> for AccessLogService<S>
where
    S: tower::Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    S::Error: 'static,
    ReqB: Body,
    ResB: Body,
    ResB::Error: 'static,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let info = StreamInfo::attach(&mut req);
        // Most requests (GETs) have no body: no counter for them.
        let received = (!req.body().is_end_stream()).then(|| Arc::new(AtomicU64::new(0)));
        let entry = capture(
            &req,
            &self.log,
            &self.config,
            info,
            tokio::time::Instant::now(),
            received.clone(),
        );
        let req = req.map(|inner| RequestBody { inner, received });
        ResponseFuture {
            inner: self.inner.call(req),
            pending: Some(Pending {
                entry: Some(entry),
                log: self.log.clone(),
            }),
        }
    }
}

/// The request's entry, its duration counted from `started`.
pub(crate) fn capture<B>(
    req: &Request<B>,
    log: &AccessLog,
    config: &Arc<LayerConfig>,
    info: StreamInfo,
    started: tokio::time::Instant,
    received_counter: Option<Arc<AtomicU64>>,
) -> Box<Entry> {
    let headers = req.headers();
    let uri = req.uri();
    let extensions = req.extensions();
    let authority = uri.authority().cloned();
    Box::new(Entry {
        start: log.now(),
        started,
        method: req.method().clone(),
        path: uri.path_and_query().cloned(),
        original_path: headers.get(X_ENVOY_ORIGINAL_PATH).cloned(),
        version: req.version(),
        host: match authority {
            Some(_) => None,
            None => headers.get(HOST).cloned(),
        },
        authority,
        forwarded_for: headers.get(X_FORWARDED_FOR).cloned(),
        user_agent: headers.get(USER_AGENT).cloned(),
        request_id: headers.get(X_REQUEST_ID).cloned(),
        downstream: extensions.get::<ClientInfo>().map(|c| (c.remote, c.local)),
        downstream_peer: match config.inbound {
            true => extensions.get::<Identity>().cloned(),
            false => None,
        },
        info,
        layer: config.clone(),
        received_counter,
        received: 0,
        status: 0,
        flags_header: None,
        flags: ResponseFlags::EMPTY,
        sent: 0,
        duration: Duration::ZERO,
    })
}

/// A request's entry until its line is handed to the writer. Dropped unfinished, it logs the
/// exchange as cut short by the client (`DC`).
pub(crate) struct Pending {
    pub(crate) entry: Option<Box<Entry>>,
    pub(crate) log: AccessLog,
}

impl Pending {
    pub(crate) fn entry(&mut self) -> Option<&mut Entry> {
        self.entry.as_deref_mut()
    }

    pub(crate) fn finish(&mut self) {
        if let Some(mut entry) = self.entry.take() {
            entry.close();
            self.log.submit(entry);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(entry) = self.entry() {
            if !entry.bodiless() {
                entry.flags |= ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION;
            }
            self.finish();
        }
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("finished", &self.entry.is_none())
            .finish_non_exhaustive()
    }
}

/// The [`ProxyError`] in an error, whether the error is one or a [`BoxError`] holding one.
pub(crate) fn proxy_error<E: 'static>(error: &E) -> Option<&ProxyError> {
    let any: &dyn Any = error;
    any.downcast_ref::<ProxyError>()
        .or_else(|| any.downcast_ref::<BoxError>().and_then(ProxyError::find))
}

pin_project! {
    /// Future of [`AccessLogService`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        pending: Option<Pending>,
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    ResB: Body,
    E: 'static,
{
    type Output = Result<Response<ResponseBody<ResB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let mut pending = this.pending.take();
        match result {
            Ok(response) => {
                if let Some(entry) = pending.as_mut().and_then(Pending::entry) {
                    entry.status = response.status().as_u16();
                    entry.flags_header = response.headers().get(RESPONSE_FLAGS_HEADER).cloned();
                    if let Some(flags) = response.extensions().get::<ResponseFlags>() {
                        entry.flags |= *flags;
                    }
                }
                if response.body().is_end_stream() {
                    // Nothing more will be read from it (hyper may never poll it).
                    if let Some(p) = pending.as_mut() {
                        p.finish();
                    }
                    pending = None;
                }
                Poll::Ready(Ok(response.map(|inner| ResponseBody { inner, pending })))
            }
            Err(error) => {
                if let Some(mut p) = pending {
                    if let (Some(entry), Some(e)) = (p.entry(), proxy_error(&error)) {
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
    /// The request body as the inner service sees it: the client's, counted.
    pub struct RequestBody<B> {
        #[pin]
        inner: B,
        received: Option<Arc<AtomicU64>>,
    }
}

impl<B> RequestBody<B> {
    /// The body underneath.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B> std::fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody").finish_non_exhaustive()
    }
}

impl<B: Body> Body for RequestBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        if let (Some(Ok(frame)), Some(counter)) = (&frame, this.received.as_ref())
            && let Some(data) = frame.data_ref()
        {
            counter.fetch_add(data.remaining() as u64, Ordering::Relaxed);
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
    /// The response body: the inner service's, counted; its end writes the line.
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
        pending: Option<Pending>,
    }
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Error: 'static,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let frame = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        let Some(pending) = this.pending.as_mut() else {
            return Poll::Ready(frame);
        };
        match &frame {
            Some(Ok(f)) => {
                if let (Some(data), Some(entry)) = (f.data_ref(), pending.entry()) {
                    entry.sent += data.remaining() as u64;
                }
                if this.inner.is_end_stream() {
                    pending.finish();
                }
            }
            Some(Err(error)) => {
                if let Some(entry) = pending.entry() {
                    entry.flags |= match proxy_error(error) {
                        Some(e) => e.flags(),
                        None => ResponseFlags::UPSTREAM_REMOTE_RESET,
                    };
                }
                pending.finish();
            }
            None => pending.finish(),
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
