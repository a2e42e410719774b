//! A custom proxy composed from the layers: a small edge proxy, not the stock sidecar.
//!
//! ```text
//! cargo run -p examples --bin custom_proxy                  # serve on 127.0.0.1:8000
//! cargo run -p examples --bin custom_proxy -- --once        # sample requests, then exit
//! cargo run -p examples --bin custom_proxy -- --rps 2 --burst 4
//! ```
//!
//! It accepts plaintext HTTP from clients outside the mesh (HTTP/1.1 and HTTP/2 on one
//! port, served by [`mesh_proxy::server::serve`]), decides whether a request may pass, and
//! sends it into the mesh over mTLS: to the `greeter` instances of the
//! [`embed`](crate::embed) example, which accept nothing but mesh mTLS. It is the shape of an
//! ingress gateway: the stock sidecar's pieces, restacked.
//!
//! Try it by hand while it runs:
//!
//! ```text
//! curl -i -H 'Host: greeter' http://127.0.0.1:8000/hello                    # 200 from v1
//! curl -i -H 'Host: greeter' -H 'x-canary: yes' http://127.0.0.1:8000/hello # 200 from v2
//! curl -i -H 'Host: greeter' http://127.0.0.1:8000/admin/users              # 403 (DENY)
//! curl -i -X DELETE -H 'Host: greeter' http://127.0.0.1:8000/hello          # 403 (no ALLOW)
//! curl -i -H 'Host: nowhere' http://127.0.0.1:8000/                         # 404 NR
//! ```
//!
//! # The stack, outermost first, and why each layer sits where it does
//!
//! ```text
//! LocalReply        (mesh-proxy)      errors → Envoy-style replies (status, x-mesh-response-flags)
//! ProxyHeaders      (mesh-proxy)      hop-by-hop headers out; x-forwarded-for/-proto; x-request-id
//! MetricsLayer      (mesh-telemetry)  istio_requests_total{reporter="source",...}
//! AuthzLayer        (mesh-tls)        AuthorizationPolicy for workload app=edge → 403
//! RateLimitLayer    (mesh-resilience) optional: a token bucket for the whole edge → 429 RL
//! RouteLayer        (mesh-routing)    Host + headers → VirtualService → subset; unknown host 404 NR
//! RequestTimeout    (mesh-resilience) the route's timeout over every attempt
//! Retry             (mesh-resilience) the route's retries within a per-cluster budget
//! Balance           (mesh-routing)    P2C over peak EWMA inside the subset
//! RecordEndpoint    (mesh-resilience) which endpoint each attempt went to (for retries)
//! Upstream          (mesh-proxy)      pooled connections, mesh mTLS (ISTIO_MUTUAL), SPIFFE ID checked
//! ```
//!
//! - **LocalReply outermost**: every layer below fails with a typed `ProxyError`; only the
//!   edge turns it into a response, so the retry and metrics layers see failures as failures.
//! - **Metrics above authorization and the rate limit**: refused requests are traffic too;
//!   Istio counts a 403 or a 429 like any other response. (Put it below them to count only
//!   what reached routing.)
//! - **Authorization before the rate limit**: a request the policy refuses spends no token,
//!   so a flood of forbidden requests cannot starve allowed ones. Both come before routing,
//!   so nothing refused costs a route lookup or an upstream connection. Clients here are
//!   plaintext, so the policies decide on method, path, host and source address (an ALLOW
//!   naming `principals` would refuse them all: no peer identity).
//! - **Route, then timeout, retry, balance, upstream**: the sidecar's own order (see
//!   `mesh-proxy/src/outbound.rs`): the route decides the destination and its policies; the
//!   timeout bounds all attempts, the retry re-balances each attempt, and the upstream dials
//!   the endpoint the balancer chose, originating mTLS because the DestinationRule says
//!   `ISTIO_MUTUAL`, and checks the server's SPIFFE ID against the endpoint's
//!   `serviceAccount`.
//!
//! Here the stock `mesh_proxy::upstream::Upstream` is the innermost service: it already
//! pools HTTP/1.1 and HTTP/2 connections per endpoint and originates mesh mTLS with a
//! [`MtlsConnector`]; the [`embed`](crate::embed) example shows the same step written
//! directly on the connector.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use mesh_core::body::{self, BoxBody};
use mesh_core::config::MeshConfig;
use mesh_core::config::bootstrap::RateLimitSettings;
use mesh_core::discovery::{EndpointPublisher, ServiceKey};
use mesh_core::labels::Labels;
use mesh_proxy::headers::ProxyHeadersLayer;
use mesh_proxy::local_reply::LocalReplyLayer;
use mesh_proxy::server::HttpService;
use mesh_proxy::upstream::Upstream;
use mesh_resilience::budget::RetryBudgets;
use mesh_resilience::previous::RecordEndpointLayer;
use mesh_resilience::rate_limit::RateLimitLayer;
use mesh_resilience::retry::RetryLayer;
use mesh_resilience::timeout::RequestTimeoutLayer;
use mesh_routing::balance::BalanceLayer;
use mesh_routing::{RouteLayer, RouteTable, SourceContext};
use mesh_telemetry::metrics::{Format, Metrics, MetricsLayer, WorkloadInfo};
use mesh_tls::authz::{AuthorizationPolicies, AuthzLayer};
use mesh_tls::connector::MtlsConnector;
use mesh_tls::credentials::Credentials;
use mesh_tls::peer_auth::DEFAULT_ROOT_NAMESPACE;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use crate::embed::{NAMESPACE, SERVICE, SERVICE_ACCOUNT};

/// The edge proxy's workload name (metrics) and its `app` label (policy selection).
pub const EDGE_WORKLOAD: &str = "edge-gateway";
pub const EDGE_APP: &str = "edge";
/// The header that sends a request to the canary (`v2`).
pub const CANARY_HEADER: &str = "x-canary";

/// The Istio resources of the edge: the `greeter` ServiceEntry (its instances), a
/// DestinationRule (subsets, `ISTIO_MUTUAL`), a VirtualService (`x-canary: yes` → `v2`, the
/// rest → `v1`, retries on 5xx) and two AuthorizationPolicies for `app: edge` (DENY
/// `/admin` and below; ALLOW only `GET` and `HEAD`).
pub fn edge_yaml(endpoints: &[(SocketAddr, &str)]) -> String {
    let mut yaml = format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: {SERVICE}, namespace: {NAMESPACE} }}
spec:
  hosts: [{SERVICE}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{ number: 80, name: http, protocol: HTTP }}]
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
  - name: canary
    match: [{{ headers: {{ {CANARY_HEADER}: {{ exact: "yes" }} }} }}]
    retries: {{ attempts: 3, retryOn: "5xx" }}
    route: [{{ destination: {{ host: {SERVICE}, subset: v2 }} }}]
  - name: stable
    timeout: 10s
    retries: {{ attempts: 3, retryOn: "5xx" }}
    route: [{{ destination: {{ host: {SERVICE}, subset: v1 }} }}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{ name: edge-no-admin, namespace: {NAMESPACE} }}
spec:
  selector: {{ matchLabels: {{ app: {EDGE_APP} }} }}
  action: DENY
  rules:
  - to: [{{ operation: {{ paths: ["/admin", "/admin/*"] }} }}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{ name: edge-read-only, namespace: {NAMESPACE} }}
spec:
  selector: {{ matchLabels: {{ app: {EDGE_APP} }} }}
  action: ALLOW
  rules:
  - to: [{{ operation: {{ methods: ["GET", "HEAD"] }} }}]
"#
    ));
    yaml
}

/// How to run the edge.
#[derive(Clone, Debug)]
pub struct EdgeOptions {
    /// Where clients connect (plaintext HTTP/1.1 and HTTP/2).
    pub listen: SocketAddr,
    /// A token bucket for every request that passed authorization; `None`: no limit.
    pub rate_limit: Option<RateLimitSettings>,
}

impl Default for EdgeOptions {
    fn default() -> Self {
        EdgeOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            rate_limit: None,
        }
    }
}

/// A running edge proxy.
#[derive(Debug)]
pub struct EdgeProxy {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    balancer: BalanceLayer,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// Keeps the endpoint sets alive (the balancer watches them).
    _endpoints: Arc<EndpointPublisher>,
}

impl EdgeProxy {
    /// Builds the stack for `config`, binds `options.listen` and serves. `credentials` are
    /// the edge's own mesh identity, presented to the services it calls.
    pub async fn start(
        config: &MeshConfig,
        credentials: Arc<Credentials>,
        options: &EdgeOptions,
    ) -> anyhow::Result<EdgeProxy> {
        let labels: Labels = [("app", EDGE_APP)].into_iter().collect();
        let routes = RouteTable::build(config, &SourceContext::sidecar(NAMESPACE, labels.clone()));
        for warning in routes.warnings() {
            tracing::warn!("{warning}");
        }
        let routes = Arc::new(ArcSwap::from_pointee(routes));
        let policies =
            AuthorizationPolicies::for_workload(config, NAMESPACE, &labels, DEFAULT_ROOT_NAMESPACE);
        let policies = Arc::new(ArcSwap::from_pointee(policies));
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
            WorkloadInfo::new(EDGE_WORKLOAD, NAMESPACE)
                .with_app(EDGE_APP)
                .with_principal(credentials.identity()),
        );
        let upstream = Upstream::default().with_mesh_tls(MtlsConnector::new(credentials));

        // Into the mesh: the sidecar's outbound order.
        let routed = ServiceBuilder::new()
            .layer(RouteLayer::new(routes))
            .layer(RequestTimeoutLayer)
            .layer(RetryLayer::per_cluster(Arc::new(RetryBudgets::default())))
            .layer(balancer.clone())
            .layer(RecordEndpointLayer)
            .service(upstream);
        // At the door: who may come in, and how fast.
        let guarded = ServiceBuilder::new()
            .layer(AuthzLayer::new(policies))
            .option_layer(options.rate_limit.as_ref().map(RateLimitLayer::new))
            .service(routed);
        let counted = BoxCloneSyncService::new(
            ServiceBuilder::new()
                .map_response(|r: Response<_>| r.map(body::boxed))
                .layer(MetricsLayer::outbound(metrics.clone(), workload))
                .map_request(|r: Request<_>| r.map(body::boxed))
                .service(guarded),
        );
        let stack: HttpService = BoxCloneSyncService::new(
            ServiceBuilder::new()
                .layer(LocalReplyLayer)
                .layer(ProxyHeadersLayer)
                .service(counted),
        );

        let listener = TcpListener::bind(options.listen).await?;
        let addr = listener.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(mesh_proxy::server::serve(
            "edge",
            listener,
            stack,
            stop_rx,
            Duration::from_secs(5),
        ));
        Ok(EdgeProxy {
            addr,
            metrics,
            balancer,
            stop,
            task,
            _endpoints: endpoints,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The edge's metrics, Prometheus text.
    pub fn metrics_text(&self) -> String {
        self.metrics.encode(Format::Prometheus)
    }

    /// The balancer's view of the endpoint sets used so far.
    pub fn clusters(&self) -> Vec<mesh_routing::balance::ClusterStatus> {
        self.balancer.clusters()
    }

    /// Stops accepting, lets requests in flight finish (up to 5 s), and returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// What a plaintext client got back from the edge.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    /// `x-mesh-response-flags`, empty when none.
    pub flags: String,
    /// The answering greeter's version, empty when none answered.
    pub version: String,
    pub body: String,
}

/// Sends `method http://{host}{path}` to the edge at `edge` as a plain HTTP/1.1 client
/// would, with `headers`.
pub async fn send(
    edge: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Answer> {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<BoxBody>();
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{edge}{path}"))
        .header("host", host);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = client.request(req.body(body::empty())?).await?;
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let status = resp.status().as_u16();
    let flags = header("x-mesh-response-flags");
    let version = header(crate::embed::VERSION_HEADER);
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok(Answer {
        status,
        flags,
        version,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    })
}
