//! [`MetricsLayer`]: Istio's request metrics for one side of a sidecar.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{HeaderMap, HeaderValue, Request, Response, Uri};
use mesh_core::Identity;
use mesh_core::body::BoxError;
use mesh_core::stream_info::StreamInfo;
use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::body::{RequestBody, ResponseBody};
use super::cache::{NO_GRPC_STATUS, SeriesCache, SeriesHandles, SeriesKey, ServiceKey};
use super::labels::{
    Outcome, Reporter, SecurityPolicy, ServiceLabels, WorkloadLabels, http_labels,
};
use super::peer::{PEER_METADATA_HEADER, PeerInterner, PeerMetadata};
use super::record::Recorder;
use super::registry::Metrics;
use super::workload::WorkloadInfo;

/// Maps a request's authority (`Host` / `:authority`, as the client wrote it, port
/// included) to the FQDN of a service this proxy knows, for the inbound side's
/// `destination_service`. `None`: the label is `unknown`.
pub type ServiceResolver = Arc<dyn Fn(&str) -> Option<Arc<str>> + Send + Sync>;

/// Which side of the sidecar a layer reports for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    /// The local app calling out: `reporter="source"`.
    Outbound,
    /// A peer calling the local app: `reporter="destination"`.
    Inbound,
}

/// What every request of one layer shares.
pub(crate) struct Shared {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) direction: Direction,
    resolver: Option<ServiceResolver>,
    /// Our metadata header, encoded once.
    pub(crate) own_header: Option<HeaderValue>,
    own: WorkloadLabels,
    pub(crate) peers: PeerInterner,
    pub(crate) series: SeriesCache,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("direction", &self.direction)
            .field("own_header", &self.own_header)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// A request enters: its recorder, started at `start`, after the peer metadata
    /// exchange on the request's headers. `info` (outbound) is where the inner layers will
    /// record the route and the upstream's identity. Shared by [`MetricsService`] and the
    /// combined layer ([`crate::combined`]), so both do exactly the same.
    pub(crate) fn begin<B>(
        self: &Arc<Self>,
        req: &mut Request<B>,
        start: Instant,
        info: Option<StreamInfo>,
    ) -> Recorder {
        let grpc = is_grpc(req.headers());
        let mut recorder = Recorder::new(self.clone(), start, grpc);
        match self.direction {
            Direction::Outbound => {
                if let Some(info) = info {
                    recorder.set_stream_info(info);
                }
                // `insert` also replaces whatever the app may have put there.
                match &self.own_header {
                    Some(ours) => req.headers_mut().insert(PEER_METADATA_HEADER, ours.clone()),
                    None => req.headers_mut().remove(PEER_METADATA_HEADER),
                };
            }
            Direction::Inbound => {
                // Always removed: the app must not see it, whoever sent it.
                let theirs = req.headers_mut().remove(PEER_METADATA_HEADER);
                if let Some(peer) = req.extensions().get::<Identity>() {
                    recorder.mtls = true;
                    recorder.principal = Some(peer.clone());
                    if let Some(theirs) = theirs {
                        recorder.peer = self.peers.get(theirs.as_bytes());
                        recorder.reply_metadata = true;
                    }
                }
                if let Some(resolve) = &self.resolver
                    && let Some(authority) = authority(req.uri(), req.headers())
                    && let Some(fqdn) = resolve(authority)
                {
                    recorder.service = ServiceKey::Name(fqdn);
                }
            }
        }
        recorder
    }

    /// A cache miss: build the series' labels and resolve its handles in the families.
    pub(crate) fn build_series(&self, key: &SeriesKey) -> SeriesHandles {
        let peer = WorkloadLabels::peer(key.peer.as_ref().map(|p| &*p.0), key.principal.as_ref());
        let service = match &key.service {
            ServiceKey::Unknown => ServiceLabels::unknown(),
            ServiceKey::Route(port) => ServiceLabels::from_fqdn(port.0.host.as_str()),
            ServiceKey::Name(fqdn) => ServiceLabels::from_fqdn(fqdn),
        };
        let grpc_status = match key.grpc_status {
            NO_GRPC_STATUS => Arc::from(""),
            code => Arc::from(code.to_string()),
        };
        let outcome = Outcome {
            protocol: if key.grpc { "grpc" } else { "http" },
            response_code: Arc::from(key.code.to_string()),
            grpc_status,
            flags: Arc::from(key.flags.to_string()),
            security: match (self.direction, key.mtls) {
                (Direction::Outbound, _) => SecurityPolicy::Unknown,
                (Direction::Inbound, true) => SecurityPolicy::MutualTls,
                (Direction::Inbound, false) => SecurityPolicy::None,
            },
        };
        let labels = match self.direction {
            Direction::Outbound => {
                http_labels(Reporter::Source, &self.own, &peer, &service, &outcome)
            }
            Direction::Inbound => {
                http_labels(Reporter::Destination, &peer, &self.own, &service, &outcome)
            }
        };
        let m = &self.metrics;
        SeriesHandles {
            requests: m.requests.get_or_create_owned(&labels),
            duration: m.duration.get_or_create_owned(&labels),
            request_bytes: m.request_bytes.get_or_create_owned(&labels),
            response_bytes: m.response_bytes.get_or_create_owned(&labels),
            messages: key.grpc.then(|| {
                (
                    m.request_messages.get_or_create_owned(&labels),
                    m.response_messages.get_or_create_owned(&labels),
                )
            }),
        }
    }
}

/// Records Istio's request metrics for one side of the sidecar; see the
/// [module docs](super).
///
/// Build one per listener side and clone it into each connection's stack: the series cache
/// and the peer table live in the layer, so every clone shares them.
#[derive(Clone, Debug)]
pub struct MetricsLayer {
    pub(crate) shared: Arc<Shared>,
}

impl MetricsLayer {
    /// The outbound side (`reporter="source"`): this workload calls the route's service.
    pub fn outbound(metrics: Arc<Metrics>, workload: Arc<WorkloadInfo>) -> MetricsLayer {
        MetricsLayer::new(metrics, &workload, Direction::Outbound, None)
    }

    /// The inbound side (`reporter="destination"`): a peer calls this workload;
    /// `resolver` names the service a request's authority addresses.
    pub fn inbound(
        metrics: Arc<Metrics>,
        workload: Arc<WorkloadInfo>,
        resolver: ServiceResolver,
    ) -> MetricsLayer {
        MetricsLayer::new(metrics, &workload, Direction::Inbound, Some(resolver))
    }

    fn new(
        metrics: Arc<Metrics>,
        workload: &WorkloadInfo,
        direction: Direction,
        resolver: Option<ServiceResolver>,
    ) -> MetricsLayer {
        let own_header = PeerMetadata::of(workload).encode();
        if own_header.is_none() {
            tracing::warn!(
                workload = %workload.name,
                "workload name is not a valid peer metadata value; peers will report it as unknown"
            );
        }
        MetricsLayer {
            shared: Arc::new(Shared {
                metrics,
                direction,
                resolver,
                own_header,
                own: WorkloadLabels::own(workload),
                peers: PeerInterner::default(),
                series: SeriesCache::default(),
            }),
        }
    }

    #[cfg(test)]
    pub(crate) fn cached_series(&self) -> usize {
        self.shared.series.len()
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;
    fn layer(&self, inner: S) -> MetricsService<S> {
        MetricsService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service made by [`MetricsLayer`].
#[derive(Clone, Debug)]
pub struct MetricsService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B, RB> tower::Service<Request<B>> for MetricsService<S>
where
    S: tower::Service<Request<RequestBody<B>>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    RB: http_body::Body,
{
    type Response = Response<ResponseBody<RB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let info = match self.shared.direction {
            Direction::Outbound => Some(StreamInfo::attach(&mut req)),
            Direction::Inbound => None,
        };
        let mut recorder = self.shared.begin(&mut req, Instant::now(), info);
        let grpc = recorder.grpc;
        let tally = recorder.request_tally();
        let req = req.map(|body| RequestBody::new(body, tally, grpc));
        ResponseFuture {
            inner: self.inner.call(req),
            recorder: Some(recorder),
        }
    }
}

/// `content-type: application/grpc` (and `application/grpc+proto`, ...; not gRPC-Web,
/// whose bodies differ), as Envoy tells a gRPC request.
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.as_bytes().strip_prefix(b"application/grpc"))
        .is_some_and(|rest| matches!(rest.first(), None | Some(b'+' | b';')))
}

/// The request's authority: the URI's (HTTP/2, absolute-form HTTP/1.1), else `Host`.
fn authority<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(http::header::HOST)?.to_str().ok())
}

pin_project! {
    /// Future of [`MetricsService`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        recorder: Option<Recorder>,
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: Into<BoxError>,
    RB: http_body::Body,
{
    type Output = Result<Response<ResponseBody<RB>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let mut recorder = this.recorder.take();
        Poll::Ready(match result {
            Ok(mut response) => {
                if let Some(recorder) = &mut recorder {
                    recorder.on_response(&mut response);
                    if response.body().is_end_stream() {
                        recorder.mark_ended();
                    }
                }
                Ok(response.map(|body| ResponseBody::new(body, recorder)))
            }
            Err(e) => {
                let e = e.into();
                if let Some(recorder) = &mut recorder {
                    recorder.on_error(&e);
                }
                // Dropping `recorder` records the failure.
                Err(e)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tower::{Layer, ServiceExt, service_fn};

    type Req = Request<RequestBody<Full<Bytes>>>;
    type Reply = std::future::Ready<Result<Response<Full<Bytes>>, std::convert::Infallible>>;
    type App = tower::util::ServiceFn<fn(Req) -> Reply>;

    fn ok(_req: Req) -> Reply {
        std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"ok")))))
    }

    fn app() -> App {
        service_fn(ok as fn(Req) -> Reply)
    }

    /// A permissive resolver (a real one answers only for registry services): every
    /// authority is its own service, so a test can make as many series as it likes.
    fn every_authority() -> ServiceResolver {
        Arc::new(|authority: &str| Some(Arc::from(authority)))
    }

    async fn call(layer: &MetricsLayer, host: &str) {
        let req = Request::builder()
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = layer.layer(app()).oneshot(req).await.unwrap();
        resp.into_body().collect().await.unwrap();
    }

    #[test]
    fn grpc_is_told_by_content_type() {
        let grpc = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
            is_grpc(&h)
        };
        assert!(grpc("application/grpc"));
        assert!(grpc("application/grpc+proto"));
        assert!(grpc("application/grpc;charset=utf-8"));
        assert!(!grpc("application/grpc-web"));
        assert!(!grpc("application/json"));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[tokio::test]
    async fn a_series_is_resolved_once_and_the_cache_stays_bounded() {
        let metrics = Arc::new(Metrics::without_process_metrics());
        let me = Arc::new(WorkloadInfo::new("reviews-v2", "default"));
        let layer = MetricsLayer::inbound(metrics.clone(), me, every_authority());
        for _ in 0..10 {
            call(&layer, "reviews").await;
        }
        assert_eq!(layer.cached_series(), 1);
        // Many distinct series: the cache never passes its bound, and every request is
        // still counted in its own series.
        let n = super::super::SERIES_CACHE_CAPACITY + 100;
        for i in 0..n {
            call(&layer, &format!("svc-{i}")).await;
            assert!(layer.cached_series() <= super::super::SERIES_CACHE_CAPACITY);
        }
        // `reviews` and the first 1023 filled it; the next cleared it and 100 followed.
        assert_eq!(
            layer.cached_series(),
            101,
            "cleared once when full, then refilled"
        );
        call(&layer, "reviews").await;
        let text = metrics.encode(super::super::Format::Prometheus);
        let reviews = text
            .lines()
            .find(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains("destination_service=\"reviews\"")
            })
            .unwrap();
        assert!(reviews.ends_with(" 11"), "{reviews}");
        let series = text
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .count();
        assert_eq!(series, n + 1);
    }
}
