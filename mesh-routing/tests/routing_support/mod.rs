//! Helpers for the routing tests: configs from YAML, a recording inner service, requests.

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, Uri};
use http_body_util::BodyExt;
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::config::{MeshConfig, Source, load_sources};
use mesh_core::target::RouteTarget;
use mesh_core::{Labels, ProxyError, ResponseFlags};
use mesh_routing::{Route, RouteLayer, RouteTable, SourceContext};
use tower::{Layer, ServiceExt};

/// Services every test can route to: `reviews` (9080, endpoints labelled v1..v3),
/// `ratings` (two ports), `shadow`, and `details`; DestinationRule subsets for reviews.
pub const BASE: &str = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: reviews }
spec:
  hosts: [reviews]
  ports: [{ number: 9080, name: http }]
  resolution: STATIC
  endpoints:
  - { address: 10.0.0.1, labels: { version: v1 } }
  - { address: 10.0.0.2, labels: { version: v2 } }
  - { address: 10.0.0.3, labels: { version: v3 } }
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: others }
spec:
  hosts: [shadow, details]
  ports: [{ number: 9080, name: http }]
  resolution: STATIC
  endpoints: [{ address: 10.0.2.1 }]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: ratings }
spec:
  hosts: [ratings]
  ports: [{ number: 9080, name: http }, { number: 8080, name: http-admin }]
  resolution: STATIC
  endpoints: [{ address: 10.0.1.1 }]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: reviews }
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: { simple: ROUND_ROBIN }
    connectionPool: { tcp: { maxConnections: 100 } }
  subsets:
  - name: v1
    labels: { version: v1 }
  - name: v2
    labels: { version: v2 }
    trafficPolicy: { loadBalancer: { simple: LEAST_REQUEST } }
  - name: v3
    labels: { version: v3 }
";

pub fn config(rules: &str) -> MeshConfig {
    let text = format!("{BASE}---\n{rules}");
    load_sources(&[Source::new("test.yaml", text)]).unwrap_or_else(|e| panic!("{e}"))
}

/// The sidecar of `productpage` in `default`.
pub fn productpage() -> SourceContext {
    SourceContext::sidecar(
        "default",
        [("app", "productpage"), ("version", "v1")]
            .into_iter()
            .collect::<Labels>(),
    )
}

pub fn table(rules: &str) -> RouteTable {
    RouteTable::build(&config(rules), &productpage())
}

/// What the inner service saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub target: RouteTarget,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// How the inner service answers a request routed to `target`.
pub type Behaviour = Arc<dyn Fn(&RouteTarget) -> Answer + Send + Sync>;

pub enum Answer {
    Ok,
    Fail,
    Hang,
}

pub type Inner = tower::util::BoxCloneSyncService<Request<BoxBody>, Response<BoxBody>, BoxError>;

/// A router over a recording inner service.
pub struct Harness {
    pub table: Arc<ArcSwap<RouteTable>>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub router: Route<Inner>,
}

impl Harness {
    pub fn new(rules: &str) -> Harness {
        Harness::with(table(rules), Arc::new(|_: &RouteTarget| Answer::Ok))
    }

    pub fn with(table: RouteTable, behaviour: Behaviour) -> Harness {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let inner = tower::service_fn(move |req: Request<BoxBody>| {
            let record = record.clone();
            let behaviour = behaviour.clone();
            async move {
                let target = req
                    .extensions()
                    .get::<RouteTarget>()
                    .cloned()
                    .expect("a RouteTarget");
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                record.lock().unwrap().push(Seen {
                    target: target.clone(),
                    uri: parts.uri.clone(),
                    headers: parts.headers.clone(),
                    body,
                });
                match behaviour(&target) {
                    Answer::Ok => {}
                    Answer::Fail => {
                        return Err::<Response<BoxBody>, BoxError>("shadow down".into());
                    }
                    Answer::Hang => futures::future::pending::<()>().await,
                }
                let mut resp = Response::new(body::full(target.name.to_string()));
                resp.headers_mut()
                    .insert("x-target", target.name.parse().unwrap());
                resp.headers_mut().insert("x-app", "1".parse().unwrap());
                Ok(resp)
            }
        });
        let table = Arc::new(ArcSwap::from_pointee(table));
        let router = RouteLayer::new(table.clone()).layer(Inner::new(inner));
        Harness {
            table,
            seen,
            router,
        }
    }

    pub async fn send(&self, req: Request<BoxBody>) -> Result<Response<BoxBody>, BoxError> {
        self.router.clone().oneshot(req).await
    }

    /// Sends and expects a response; returns it.
    pub async fn ok(&self, req: Request<BoxBody>) -> Response<BoxBody> {
        self.send(req)
            .await
            .unwrap_or_else(|e| panic!("expected a response, got {e}"))
    }

    /// Sends and expects a `ProxyError`; returns its flags, status and message.
    pub async fn fails(&self, req: Request<BoxBody>) -> (ResponseFlags, u16, String) {
        let Err(e) = self.send(req).await else {
            panic!("expected an error")
        };
        let p = ProxyError::find(&e).expect("a ProxyError");
        (p.flags(), p.status().as_u16(), p.to_string())
    }

    /// The target name of the last request the inner service saw.
    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request reached the service")
    }
}

/// `GET path` with `Host: host`.
pub fn get(host: &str, path: &str) -> Request<BoxBody> {
    Request::get(path)
        .header("host", host)
        .body(body::empty())
        .unwrap()
}

pub fn with_header(mut req: Request<BoxBody>, name: &'static str, value: &str) -> Request<BoxBody> {
    req.headers_mut().append(name, value.parse().unwrap());
    req
}

pub async fn text(resp: Response<BoxBody>) -> String {
    String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
}
