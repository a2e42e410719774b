//! Embedding the mesh in a Rust client, with no sidecar ("proxyless mesh"): a canary split
//! from Istio YAML, retries under a budget, peak-EWMA balancing, mTLS with SPIFFE identities
//! and Istio's metrics, all as tower layers inside the calling process.
//!
//! ```text
//! cargo run -p examples --bin embed                      # 500 requests, 80/20 canary
//! cargo run -p examples --bin embed -- --v1-fail-every 3 # v1 fails every 3rd request
//! cargo run -p examples --bin embed -- --replicas 2      # two instances per version
//! ```
//!
//! The binary starts the servers of a `greeter` service on loopback (by default one `v1` and
//! one `v2` instance), each accepting only mesh mTLS with
//! [`MtlsAcceptor`](mesh_tls::acceptor::MtlsAcceptor) and a certificate from a
//! [`CertificateAuthority`](mesh_tls::ca::CertificateAuthority) made at start. It then sends
//! `N` requests through the stack below ([`EmbeddedClient`]) and prints the split between
//! versions, the attempts per instance, the retries and the client's metrics as Prometheus
//! text. `tests/embed.rs` runs the same [`Scenario`] and checks its [`Report`].
//!
//! # The stack, outermost first, and why each layer sits where it does
//!
//! ```text
//! MetricsLayer::outbound   (mesh-telemetry)  istio_requests_total{reporter="source",...}
//! RouteLayer               (mesh-routing)    Host → VirtualService → weighted subset (v1/v2)
//! RequestTimeoutLayer      (mesh-resilience) the route's timeout over every attempt
//! RetryLayer::per_cluster  (mesh-resilience) the route's retries, within a retry budget
//! BalanceLayer             (mesh-routing)    P2C over peak EWMA among the subset's endpoints
//! RecordEndpointLayer      (mesh-resilience) tells the retry layer which endpoint was tried
//! MtlsUpstream             (this module)     mTLS (MtlsConnector, SPIFFE ID checked), HTTP/2
//! ```
//!
//! - **Metrics outermost**: it must see every request exactly once, whatever happens inside
//!   (an unknown host, retries, a refused server identity), and read what the inner layers
//!   learnt (route, endpoint, the server's verified identity) through the request's
//!   `StreamInfo`. Retried attempts are one request to the caller, and one in the metrics.
//! - **Route before everything that needs a destination**: it picks the subset by the
//!   VirtualService weights and hands down a `RouteTarget` carrying the route's timeout and
//!   retry policy and the DestinationRule's traffic policy (retry budget, load balancer).
//! - **Timeout outside Retry**: the route's `timeout` bounds all attempts together; inside,
//!   it would bound each attempt (that is `perTryTimeout`'s job).
//! - **Retry above Balance**: each attempt is balanced anew, and (with
//!   `RecordEndpointLayer` below the balancer) a retry prefers an endpoint not tried yet. The
//!   route is *not* re-chosen per attempt: a request that drew `v2` stays on `v2`, so the
//!   split is the VirtualService's, whatever fails. The budget (the DestinationRule's
//!   `retryBudget`, per cluster) keeps retries from multiplying an outage.
//! - **Balance inside the subset**: power of two choices over peak-EWMA latency (the default
//!   with no `loadBalancer`); with `--replicas 2` a slow instance gets less traffic.
//! - **mTLS last**: the connection is made to the endpoint the balancer chose, and the
//!   server must present the SPIFFE ID the ServiceEntry endpoint's `serviceAccount` implies
//!   (`spiffe://cluster.local/ns/default/sa/greeter`); anything else is a connect failure
//!   (`503 UF`), which the retry layer may retry and then reports with `URX`.
//!
//! [`MtlsUpstream`] is written here, on [`MtlsConnector`] and hyper's HTTP/2 client, rather
//! than taken from `mesh_proxy::upstream::Upstream` (the stock sidecar's pooled client),
//! to show the TLS layer directly: about sixty lines dial, verify and keep one multiplexed
//! connection per endpoint. The stock `Upstream` does the same with connection-pool limits,
//! HTTP/1.1 pools and TLS origination; the custom proxy example
//! ([`custom_proxy`](crate::custom_proxy)) uses it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use http::uri::{Authority, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::config::networking::ClientTlsMode;
use mesh_core::config::{MeshConfig, Source, load_sources};
use mesh_core::discovery::{EndpointPublisher, ServiceKey};
use mesh_core::stream_info::StreamInfo;
use mesh_core::target::{RouteTarget, UpstreamTarget};
use mesh_core::{Identity, ProxyError, ResponseFlags};
use mesh_resilience::budget::RetryBudgets;
use mesh_resilience::previous::RecordEndpointLayer;
use mesh_resilience::retry::RetryLayer;
use mesh_resilience::timeout::RequestTimeoutLayer;
use mesh_routing::balance::BalanceLayer;
use mesh_routing::{RouteLayer, RouteTable, SourceContext};
use mesh_telemetry::metrics::{Format, Metrics, MetricsLayer, ServiceResolver, WorkloadInfo};
use mesh_tls::acceptor::MtlsAcceptor;
use mesh_tls::ca::{CertificateAuthority, DEFAULT_TTL};
use mesh_tls::connector::MtlsConnector;
use mesh_tls::credentials::Credentials;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder, ServiceExt};

/// The trust domain of the example mesh.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The namespace everything runs in.
pub const NAMESPACE: &str = "default";
/// The service the client calls, as it names it in `Host`.
pub const SERVICE: &str = "greeter";
/// The service's FQDN, as metrics name it.
pub const SERVICE_FQDN: &str = "greeter.default.svc.cluster.local";
/// The service account every genuine greeter instance runs as (the ServiceEntry endpoints
/// say so, and the client checks it).
pub const SERVICE_ACCOUNT: &str = "greeter";
/// The header in which a greeter instance names its version.
pub const VERSION_HEADER: &str = "x-greeter-version";

/// A whole stack, type-erased: what [`EmbeddedClient`] calls.
pub type ClientStack = BoxCloneSyncService<Request<BoxBody>, Response<BoxBody>, BoxError>;

// ---------------------------------------------------------------------------------------
// Identities

/// The example mesh's CA: issues each workload its SPIFFE certificate.
#[derive(Debug)]
pub struct Pki {
    ca: CertificateAuthority,
}

impl Pki {
    /// A fresh root for [`TRUST_DOMAIN`].
    pub fn generate() -> anyhow::Result<Pki> {
        Ok(Pki {
            ca: CertificateAuthority::generate(TRUST_DOMAIN)?,
        })
    }

    /// Credentials for `service_account` in [`NAMESPACE`]: certificate, key, trust bundle.
    pub fn credentials(&self, service_account: &str) -> anyhow::Result<Arc<Credentials>> {
        let id = Identity::for_service_account(TRUST_DOMAIN, NAMESPACE, service_account)?;
        let svid = self.ca.issue(&id, DEFAULT_TTL)?;
        Ok(Credentials::from_pem(
            &svid.cert_pem,
            &svid.key_pem,
            &svid.root_pem,
        )?)
    }

    /// The CA itself (to issue more, or to build a foreign one in a test).
    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }
}

// ---------------------------------------------------------------------------------------
// The greeter servers

/// One greeter instance to start.
#[derive(Clone, Debug)]
pub struct ServerSpec {
    /// The workload name (`greeter-v1`), in responses and metrics.
    pub workload: String,
    /// The `version` label: `v1` or `v2`.
    pub version: String,
    /// The service account of the certificate this instance presents. A genuine instance
    /// runs as [`SERVICE_ACCOUNT`]; anything else is an impostor the client must refuse.
    pub service_account: String,
    /// Answer `503` to every `n`-th request (a flaky instance); `None`: never.
    pub fail_every: Option<u64>,
    /// Wait this long before answering (a slow instance).
    pub delay: Option<Duration>,
}

impl ServerSpec {
    /// A healthy, genuine instance of `version`.
    pub fn new(workload: impl Into<String>, version: impl Into<String>) -> ServerSpec {
        ServerSpec {
            workload: workload.into(),
            version: version.into(),
            service_account: SERVICE_ACCOUNT.to_string(),
            fail_every: None,
            delay: None,
        }
    }
}

/// What a server saw.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// mTLS handshakes that succeeded.
    pub handshakes: AtomicU64,
    /// HTTP requests that reached the app.
    pub requests: AtomicU64,
    /// Of those, the ones answered `503` on purpose.
    pub failed: AtomicU64,
}

/// A running greeter instance; stops when dropped.
#[derive(Debug)]
pub struct GreeterServer {
    pub addr: SocketAddr,
    pub spec: ServerSpec,
    pub stats: Arc<ServerStats>,
    /// The server side's own metrics (`reporter="destination"`).
    pub metrics: Arc<Metrics>,
    task: JoinHandle<()>,
}

impl Drop for GreeterServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a greeter instance on an ephemeral loopback port. It accepts mesh mTLS only (a
/// client certificate from `pki` is required), serves HTTP/1.1 and HTTP/2, answers
/// `hello from <workload>` with [`VERSION_HEADER`], and records Istio's inbound metrics, which
/// also answers a verified caller with its workload metadata (so the client's metrics name
/// `destination_workload` and `destination_version`).
pub async fn start_server(pki: &Pki, spec: ServerSpec) -> anyhow::Result<GreeterServer> {
    let credentials = pki.credentials(&spec.service_account)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stats = Arc::new(ServerStats::default());
    let metrics = Arc::new(Metrics::without_process_metrics());
    let workload = Arc::new(
        WorkloadInfo::new(&spec.workload, NAMESPACE)
            .with_app(SERVICE)
            .with_version(&spec.version)
            .with_principal(credentials.identity()),
    );
    let resolver: ServiceResolver = Arc::new(|authority: &str| {
        let host = authority.split(':').next().unwrap_or(authority);
        (host == SERVICE || host == SERVICE_FQDN).then(|| Arc::from(SERVICE_FQDN))
    });
    let app = greeter_app(spec.clone(), stats.clone());
    let stack: ClientStack = BoxCloneSyncService::new(
        ServiceBuilder::new()
            .map_response(|r: Response<_>| r.map(body::boxed))
            .layer(MetricsLayer::inbound(metrics.clone(), workload, resolver))
            .map_request(|r: Request<_>| r.map(body::boxed))
            .service(app),
    );
    let acceptor = MtlsAcceptor::new(credentials);
    let task = tokio::spawn(accept_loop(listener, acceptor, stack, stats.clone()));
    Ok(GreeterServer {
        addr,
        spec,
        stats,
        metrics,
        task,
    })
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: MtlsAcceptor,
    stack: ClientStack,
    stats: Arc<ServerStats>,
) {
    loop {
        let Ok((tcp, remote)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let stack = stack.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            // The handshake runs in the connection's task: a slow client never holds up
            // the accept loop.
            let accepted = match acceptor.accept(tcp).await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::debug!(%remote, error = %e, "mTLS handshake refused");
                    return;
                }
            };
            stats.handshakes.fetch_add(1, Ordering::Relaxed);
            let peer = accepted.peer;
            let svc =
                hyper::service::service_fn(move |req| serve_one(stack.clone(), peer.clone(), req));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(accepted.stream), svc)
                .await;
        });
    }
}

/// One request of a verified connection: tagged with the caller's identity (for the metrics
/// layer, and any authorization), then through the server's stack.
fn serve_one(
    stack: ClientStack,
    peer: Identity,
    req: Request<hyper::body::Incoming>,
) -> Pin<Box<dyn Future<Output = Result<Response<BoxBody>, std::convert::Infallible>> + Send>> {
    let mut req: Request<BoxBody> = req.map(body::boxed);
    req.extensions_mut().insert(peer);
    let pending: Pending = Box::pin(stack.oneshot(req));
    Box::pin(async move {
        Ok(pending.await.unwrap_or_else(|e| {
            let mut response = Response::new(body::full(format!("{e}\n")));
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            response
        }))
    })
}

/// A response on its way (boxed, so that its type names no lifetimes for the compiler to
/// generalise over when the future is spawned).
pub type Pending = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, BoxError>> + Send>>;

fn greeter_app(
    spec: ServerSpec,
    stats: Arc<ServerStats>,
) -> impl Service<
    Request<BoxBody>,
    Response = Response<BoxBody>,
    Error = BoxError,
    Future = impl Future<Output = Result<Response<BoxBody>, BoxError>> + Send,
> + Clone
+ Send
+ Sync {
    let spec = Arc::new(spec);
    tower::service_fn(move |_req: Request<BoxBody>| {
        let spec = spec.clone();
        let stats = stats.clone();
        async move {
            if let Some(delay) = spec.delay {
                tokio::time::sleep(delay).await;
            }
            let n = stats.requests.fetch_add(1, Ordering::Relaxed) + 1;
            let fail = spec
                .fail_every
                .is_some_and(|k| k > 0 && n.is_multiple_of(k));
            let (status, text) = if fail {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{} is having a bad moment\n", spec.workload),
                )
            } else {
                (StatusCode::OK, format!("hello from {}\n", spec.workload))
            };
            let response = Response::builder()
                .status(status)
                .header(VERSION_HEADER, spec.version.as_str())
                .body(body::full(text))?;
            Ok::<_, BoxError>(response)
        }
    })
}

// ---------------------------------------------------------------------------------------
// The mesh config

/// The Istio resources of the example: a ServiceEntry listing the instances (each with its
/// `version` label and service account), a DestinationRule with subsets `v1` and `v2` (mesh
/// mTLS, a retry budget, the default peak-EWMA balancer), and a VirtualService splitting
/// `100 - v2_weight` / `v2_weight` between them with retries on 5xx.
pub fn mesh_yaml(endpoints: &[(SocketAddr, &str)], v2_weight: u32) -> String {
    let v2_weight = v2_weight.min(100);
    let v1_weight = 100 - v2_weight;
    let mut yaml = format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: {SERVICE}, namespace: {NAMESPACE} }}
spec:
  hosts: [{SERVICE}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{ number: 80, name: http, protocol: HTTP2 }}]
  endpoints:
"#
    );
    for (addr, version) in endpoints {
        yaml.push_str(&format!(
            "  - {{ address: {}, ports: {{ http: {} }}, labels: {{ app: {SERVICE}, version: {version} }}, serviceAccount: {SERVICE_ACCOUNT} }}\n",
            addr.ip(),
            addr.port(),
        ));
    }
    yaml.push_str(&format!(
        r#"---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: {SERVICE}, namespace: {NAMESPACE} }}
spec:
  host: {SERVICE}
  trafficPolicy:
    tls: {{ mode: ISTIO_MUTUAL }}
    retryBudget: {{ percent: {{ value: 20 }}, minRetryConcurrency: 10 }}
  subsets:
  - {{ name: v1, labels: {{ version: v1 }} }}
  - {{ name: v2, labels: {{ version: v2 }} }}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: {SERVICE}, namespace: {NAMESPACE} }}
spec:
  hosts: [{SERVICE}]
  http:
  - timeout: 10s
    retries: {{ attempts: 3, perTryTimeout: 2s, retryOn: "5xx" }}
    route:
    - {{ destination: {{ host: {SERVICE}, subset: v1 }}, weight: {v1_weight} }}
    - {{ destination: {{ host: {SERVICE}, subset: v2 }}, weight: {v2_weight} }}
"#
    ));
    yaml
}

/// Loads Istio YAML into a config snapshot, with every error the loader found.
pub fn load_yaml(name: &str, yaml: &str) -> anyhow::Result<MeshConfig> {
    load_sources(&[Source::new(name, yaml)]).map_err(|e| anyhow::anyhow!("{e}"))
}

// ---------------------------------------------------------------------------------------
// The client's mTLS upstream

/// The innermost service of the embedded stack: sends each request to the endpoint the
/// balancer chose ([`UpstreamTarget`]) over mesh mTLS, checking that the server presents the
/// SPIFFE ID the endpoint's service account (or the ServiceEntry's `subjectAltNames`) says.
/// One HTTP/2 connection per endpoint, dialled on first use and again when it closes.
///
/// Failures are [`ProxyError`]s, so the retry layer can classify them: a refused
/// handshake or identity is `UF` (connect failure), a broken stream `UC`/`UR`.
#[derive(Clone, Debug)]
pub struct MtlsUpstream {
    connector: MtlsConnector,
    trust_domain: Arc<str>,
    connections: Arc<Mutex<HashMap<SocketAddr, Connection>>>,
    attempts: Arc<Mutex<BTreeMap<SocketAddr, u64>>>,
}

#[derive(Clone, Debug)]
struct Connection {
    sender: http2::SendRequest<BoxBody>,
    peer: Identity,
}

impl MtlsUpstream {
    pub fn new(credentials: Arc<Credentials>) -> MtlsUpstream {
        let trust_domain = Arc::from(credentials.identity().trust_domain());
        MtlsUpstream {
            connector: MtlsConnector::new(credentials),
            trust_domain,
            connections: Arc::default(),
            attempts: Arc::default(),
        }
    }

    /// Attempts sent to each endpoint so far (a retried request counts once per attempt).
    pub fn attempts(&self) -> BTreeMap<SocketAddr, u64> {
        self.attempts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn send(self, req: Request<BoxBody>) -> Result<Response<BoxBody>, BoxError> {
        let Some(target) = req.extensions().get::<UpstreamTarget>().cloned() else {
            return Err(ProxyError::new(
                ResponseFlags::NO_CLUSTER_FOUND,
                "no upstream target: MtlsUpstream needs a balancer in front of it",
            )
            .into());
        };
        *self
            .attempts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(target.addr)
            .or_default() += 1;
        let route = req.extensions().get::<RouteTarget>().cloned();
        if let Some(mode) = route
            .as_ref()
            .and_then(|r| r.traffic_policy.as_deref())
            .and_then(|p| p.tls.as_ref())
            .map(|tls| tls.mode)
            && mode != ClientTlsMode::IstioMutual
        {
            return Err(ProxyError::connect_failed(
                &target.service,
                target.addr,
                format_args!(
                    "this client speaks only mesh mTLS, the DestinationRule asks for {mode:?}"
                ),
            )
            .into());
        }
        let expected = self.expected_identities(route.as_ref(), &target)?;
        let info = req.extensions().get::<StreamInfo>().cloned();
        if let Some(info) = &info {
            info.set_upstream(target.addr);
        }
        let conn = self.connection(&target, &expected).await?;
        if let Some(info) = &info {
            info.set_upstream_peer(conn.peer.clone());
        }
        let mut sender = conn.sender;
        let failed = |e: hyper::Error| upstream_error(&target, &e);
        sender.ready().await.map_err(failed)?;
        let response = sender.send_request(to_http2(req)).await.map_err(failed)?;
        Ok(response.map(body::boxed))
    }

    /// Who the endpoint may be: the ServiceEntry's `subjectAltNames`, else the identity of the
    /// endpoint's service account; none at all leaves it to the chain (as Istio does).
    fn expected_identities(
        &self,
        route: Option<&RouteTarget>,
        target: &UpstreamTarget,
    ) -> Result<Vec<Identity>, ProxyError> {
        let bad = |e: &dyn fmt::Display| {
            ProxyError::connect_failed(&target.service, target.addr, format_args!("{e}"))
        };
        if let Some(route) = route
            && !route.service.subject_alt_names.is_empty()
        {
            return route
                .service
                .subject_alt_names
                .iter()
                .map(|san| Identity::parse(san).map_err(|e| bad(&e)))
                .collect();
        }
        let namespace = route.map_or(NAMESPACE, |r| r.service.namespace.as_str());
        match target
            .endpoint_tls
            .as_ref()
            .and_then(|t| t.service_account.as_deref())
        {
            Some(sa) => Identity::for_service_account(&self.trust_domain, namespace, sa)
                .map(|id| vec![id])
                .map_err(|e| bad(&e)),
            None => Ok(Vec::new()),
        }
    }

    async fn connection(
        &self,
        target: &UpstreamTarget,
        expected: &[Identity],
    ) -> Result<Connection, ProxyError> {
        let cached = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&target.addr)
            .filter(|c| !c.sender.is_closed())
            .cloned();
        if let Some(conn) = cached
            && (expected.is_empty() || expected.contains(&conn.peer))
        {
            return Ok(conn);
        }
        let failed = |e: &dyn fmt::Display| {
            ProxyError::connect_failed(&target.service, target.addr, format_args!("{e}"))
        };
        let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target.addr))
            .await
            .map_err(|_| failed(&"TCP connect timed out after 5s"))?
            .map_err(|e| failed(&e))?;
        let _ = tcp.set_nodelay(true);
        // The handshake verifies the chain against the trust bundle, then the SPIFFE ID.
        let tls = self
            .connector
            .connect(tcp, expected, true)
            .await
            .map_err(|e| failed(&e))?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(tls.stream))
            .await
            .map_err(|e| failed(&e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
            }
        });
        let conn = Connection {
            sender,
            peer: tls.peer,
        };
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(target.addr, conn.clone());
        Ok(conn)
    }
}

impl Service<Request<BoxBody>> for MtlsUpstream {
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<BoxBody>) -> Self::Future {
        Box::pin(self.clone().send(req))
    }
}

fn upstream_error(target: &UpstreamTarget, e: &hyper::Error) -> ProxyError {
    let flags = if e.is_closed() || e.is_canceled() || e.is_incomplete_message() {
        ResponseFlags::UPSTREAM_CONNECTION_TERMINATION
    } else {
        ResponseFlags::UPSTREAM_REMOTE_RESET
    };
    let mut message = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        message.push_str(&format!(": {c}"));
        cause = c.source();
    }
    ProxyError::new(
        flags,
        format_args!(
            "upstream error: {} endpoint {}: {message}",
            target.service, target.addr
        ),
    )
}

/// HTTP/2 carries the authority in the URI (`:authority`), not in `Host`.
fn to_http2(mut req: Request<BoxBody>) -> Request<BoxBody> {
    let host = req.headers_mut().remove(http::header::HOST);
    if req.uri().authority().is_none() || req.uri().scheme().is_none() {
        let authority = req
            .uri()
            .authority()
            .cloned()
            .or_else(|| host.and_then(|h| Authority::try_from(h.as_bytes()).ok()))
            .unwrap_or_else(|| Authority::from_static("localhost"));
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(authority);
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    *req.version_mut() = Version::HTTP_2;
    req
}

// ---------------------------------------------------------------------------------------
// The embedded client

/// A client with the mesh inside: see the module docs for its stack.
#[derive(Clone, Debug)]
pub struct EmbeddedClient {
    stack: ClientStack,
    metrics: Arc<Metrics>,
    upstream: MtlsUpstream,
    balancer: BalanceLayer,
    /// Swap a rebuilt table in to change the routes; the next request uses it.
    pub routes: Arc<ArcSwap<RouteTable>>,
    /// Publish new endpoint sets to change who the balancer sees.
    pub endpoints: Arc<EndpointPublisher>,
}

impl EmbeddedClient {
    /// A client for the services of `config`, calling as the workload `name` with
    /// `credentials` (its SVID and the mesh's trust bundle).
    pub fn new(
        config: &MeshConfig,
        name: &str,
        credentials: Arc<Credentials>,
    ) -> anyhow::Result<EmbeddedClient> {
        // Routing: the VirtualService and DestinationRule compiled for a sidecar-less
        // workload in NAMESPACE.
        let source = SourceContext::sidecar(NAMESPACE, Default::default());
        let table = RouteTable::build(config, &source);
        for warning in table.warnings() {
            tracing::warn!("{warning}");
        }
        let routes = Arc::new(ArcSwap::from_pointee(table));
        // Discovery: the ServiceEntry endpoints, published once (a DNS or etcd provider
        // would keep publishing). The balancer follows the published sets.
        let endpoints = Arc::new(EndpointPublisher::default());
        endpoints.publish(config.services().iter().map(|port| {
            (
                ServiceKey::new(port.host.clone(), port.number),
                port.endpoints.clone(),
            )
        }));
        let balancer = BalanceLayer::new(endpoints.clone());
        let metrics = Arc::new(Metrics::without_process_metrics());
        let workload = Arc::new(
            WorkloadInfo::new(name, NAMESPACE)
                .with_app(name)
                .with_version("v1")
                .with_principal(credentials.identity()),
        );
        let upstream = MtlsUpstream::new(credentials);
        let stack = BoxCloneSyncService::new(
            ServiceBuilder::new()
                .map_response(|r: Response<_>| r.map(body::boxed))
                .layer(MetricsLayer::outbound(metrics.clone(), workload))
                .map_request(|r: Request<_>| r.map(body::boxed))
                .layer(RouteLayer::new(routes.clone()))
                .layer(RequestTimeoutLayer)
                .layer(RetryLayer::per_cluster(Arc::new(RetryBudgets::default())))
                .layer(balancer.clone())
                .layer(RecordEndpointLayer)
                .service(upstream.clone()),
        );
        Ok(EmbeddedClient {
            stack,
            metrics,
            upstream,
            balancer,
            routes,
            endpoints,
        })
    }

    /// Sends `req` through the stack. Local failures (unknown host, a refused server
    /// identity after retries, ...) are `Err` holding a [`ProxyError`] with Envoy's flags.
    pub fn send(&self, req: Request<BoxBody>) -> Pending {
        Box::pin(self.stack.clone().oneshot(req))
    }

    /// `GET http://{host}{path}` through the stack.
    pub fn get(&self, host: &str, path: &str) -> Pending {
        match Request::get(path).header("host", host).body(body::empty()) {
            Ok(req) => self.send(req),
            Err(e) => Box::pin(std::future::ready(Err(e.into()))),
        }
    }

    /// The client's metrics as Prometheus text.
    pub fn metrics_text(&self) -> String {
        self.metrics.encode(Format::Prometheus)
    }

    /// Attempts per endpoint so far.
    pub fn attempts(&self) -> BTreeMap<SocketAddr, u64> {
        self.upstream.attempts()
    }

    /// The balancer's view: per endpoint set, each endpoint's in-flight count and EWMA.
    pub fn clusters(&self) -> Vec<mesh_routing::balance::ClusterStatus> {
        self.balancer.clusters()
    }
}

// ---------------------------------------------------------------------------------------
// The scenario: servers, config, client, N requests

/// What to start.
#[derive(Clone, Debug)]
pub struct ScenarioOptions {
    /// Percent of requests for `v2`; the rest go to `v1`.
    pub v2_weight: u32,
    /// Instances per version.
    pub replicas: usize,
    /// The first `v1` instance answers 503 to every n-th request.
    pub v1_fail_every: Option<u64>,
    /// The first `v1` instance waits this long before answering.
    pub v1_delay: Option<Duration>,
    /// The `v2` instances present this service account instead of [`SERVICE_ACCOUNT`].
    pub v2_service_account: Option<String>,
}

impl Default for ScenarioOptions {
    fn default() -> Self {
        ScenarioOptions {
            v2_weight: 20,
            replicas: 1,
            v1_fail_every: None,
            v1_delay: None,
            v2_service_account: None,
        }
    }
}

/// The greeter instances and a client configured for them.
#[derive(Debug)]
pub struct Scenario {
    pub pki: Pki,
    pub servers: Vec<GreeterServer>,
    pub client: EmbeddedClient,
    pub yaml: String,
}

impl Scenario {
    /// Starts the instances on loopback and builds the client from the generated YAML.
    pub async fn start(options: &ScenarioOptions) -> anyhow::Result<Scenario> {
        let pki = Pki::generate()?;
        let mut servers = Vec::new();
        for version in ["v1", "v2"] {
            for replica in 0..options.replicas.max(1) {
                let workload = match options.replicas {
                    0 | 1 => format!("{SERVICE}-{version}"),
                    _ => format!("{SERVICE}-{version}-{}", char::from(b'a' + replica as u8)),
                };
                let mut spec = ServerSpec::new(workload, version);
                if version == "v1" && replica == 0 {
                    spec.fail_every = options.v1_fail_every;
                    spec.delay = options.v1_delay;
                }
                if version == "v2"
                    && let Some(sa) = &options.v2_service_account
                {
                    spec.service_account = sa.clone();
                }
                servers.push(start_server(&pki, spec).await?);
            }
        }
        let endpoints: Vec<(SocketAddr, &str)> = servers
            .iter()
            .map(|s| (s.addr, s.spec.version.as_str()))
            .collect();
        let yaml = mesh_yaml(&endpoints, options.v2_weight);
        let config = load_yaml("embed.yaml", &yaml)?;
        let client = EmbeddedClient::new(&config, "embed-client", pki.credentials("embed-client")?)
            .context("cannot build the embedded client")?;
        Ok(Scenario {
            pki,
            servers,
            client,
            yaml,
        })
    }

    /// Sends `requests` GETs to the greeter, `concurrency` at a time, and reports.
    pub async fn run(&self, requests: usize, concurrency: usize) -> Report {
        run(&self.client, &self.servers, requests, concurrency).await
    }
}

/// One request's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The answering instance's version, its status and the flags the stack added.
    Answered {
        version: String,
        status: u16,
        flags: String,
    },
    /// A local failure: status, Envoy flags, message.
    Failed {
        status: u16,
        flags: String,
        message: String,
    },
}

/// What a run of the embedded client saw.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub requests: usize,
    /// `2xx` responses.
    pub succeeded: usize,
    /// `2xx` responses by the answering instance's version.
    pub by_version: BTreeMap<String, usize>,
    /// Everything else, by `"<status> <flags>"`, with the first message seen for each.
    pub failures: BTreeMap<String, (usize, String)>,
    /// Attempts per instance (workload name), as the client's upstream counted them.
    pub attempts: BTreeMap<String, u64>,
    /// Attempts beyond the first of each request.
    pub retries: u64,
    /// The client's metrics, Prometheus text.
    pub metrics: String,
}

impl Report {
    /// The share of successful responses that came from `version`.
    pub fn share(&self, version: &str) -> f64 {
        if self.succeeded == 0 {
            return 0.0;
        }
        self.by_version.get(version).copied().unwrap_or(0) as f64 / self.succeeded as f64
    }

    /// How many requests failed.
    pub fn failed(&self) -> usize {
        self.failures.values().map(|(n, _)| n).sum()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} requests: {} succeeded, {} failed",
            self.requests,
            self.succeeded,
            self.failed()
        )?;
        for (version, n) in &self.by_version {
            writeln!(
                f,
                "  {version}: {n:>5} ({:.1}%)",
                100.0 * self.share(version)
            )?;
        }
        for (kind, (n, message)) in &self.failures {
            writeln!(f, "  failed {kind}: {n} (e.g. {message})")?;
        }
        writeln!(f, "attempts per instance (retries: {}):", self.retries)?;
        for (instance, n) in &self.attempts {
            writeln!(f, "  {instance}: {n}")?;
        }
        Ok(())
    }
}

/// Sends one GET and classifies what came back.
pub async fn call(client: &EmbeddedClient, path: &str) -> Outcome {
    match client.get(SERVICE, path).await {
        Ok(response) => {
            let status = response.status().as_u16();
            let version = header(&response, VERSION_HEADER);
            let flags = header(&response, mesh_core::flags::RESPONSE_FLAGS_HEADER.as_str());
            // Read the body to its end: the metrics layer records when it ends.
            let _ = response.into_body().collect().await;
            Outcome::Answered {
                version,
                status,
                flags,
            }
        }
        Err(e) => match ProxyError::find(&e) {
            Some(p) => Outcome::Failed {
                status: p.status().as_u16(),
                flags: p.flags().to_string(),
                message: p.to_string(),
            },
            None => Outcome::Failed {
                status: 502,
                flags: "UPE".to_string(),
                message: e.to_string(),
            },
        },
    }
}

/// Sends `requests` GETs to the greeter through `client`, `concurrency` at a time, and
/// reports the split, the failures, the attempts per instance of `servers` and the metrics.
pub async fn run(
    client: &EmbeddedClient,
    servers: &[GreeterServer],
    requests: usize,
    concurrency: usize,
) -> Report {
    let before: u64 = client.attempts().values().sum();
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let client = client.clone();
        let next = next.clone();
        workers.spawn(async move {
            let mut outcomes = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < requests {
                outcomes.push(call(&client, "/hello").await);
            }
            outcomes
        });
    }
    let mut report = Report {
        requests,
        ..Report::default()
    };
    while let Some(done) = workers.join_next().await {
        let outcomes = match done {
            Ok(outcomes) => outcomes,
            Err(e) => {
                report
                    .failures
                    .entry("worker panicked".to_string())
                    .or_insert((0, e.to_string()))
                    .0 += 1;
                continue;
            }
        };
        for outcome in outcomes {
            match outcome {
                Outcome::Answered {
                    version,
                    status: 200..=299,
                    ..
                } => {
                    report.succeeded += 1;
                    *report.by_version.entry(version).or_default() += 1;
                }
                Outcome::Answered {
                    version,
                    status,
                    flags,
                } => {
                    report
                        .failures
                        .entry(format!("{status} {}", or_dash(&flags)))
                        .or_insert((0, format!("answered by {version}")))
                        .0 += 1;
                }
                Outcome::Failed {
                    status,
                    flags,
                    message,
                } => {
                    report
                        .failures
                        .entry(format!("{status} {flags}"))
                        .or_insert((0, message))
                        .0 += 1;
                }
            }
        }
    }
    let attempts = client.attempts();
    let total: u64 = attempts.values().sum();
    report.retries = (total - before).saturating_sub(requests as u64);
    for (addr, n) in attempts {
        let name = servers
            .iter()
            .find(|s| s.addr == addr)
            .map_or_else(|| addr.to_string(), |s| s.spec.workload.clone());
        report.attempts.insert(name, n);
    }
    report.metrics = client.metrics_text();
    report
}

fn header<B>(response: &Response<B>, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}
