//! Test harness: real backends on loopback and sidecars started in-process.
// Harness code: a failure here is a broken test setup, and a panic says so best.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

pub mod app;
pub mod binary;
pub mod grpc;
pub mod pki;
pub mod tcp;

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::config::{self, MeshConfig, Source};
use mesh_proxy::RunningProxy;

/// Loads YAML text as one config file.
pub fn load(yaml: &str) -> Arc<MeshConfig> {
    match config::load_sources(&[Source {
        name: "test.yaml".into(),
        text: yaml.into(),
    }]) {
        Ok(c) => Arc::new(c),
        Err(e) => panic!("test config is invalid:\n{e}"),
    }
}

/// A Bootstrap on ephemeral loopback ports, with an inbound listener when `app` is given.
pub fn bootstrap(name: &str, app: Option<SocketAddr>) -> String {
    let inbound = match app {
        Some(app) => format!("  inbound: {{ listen: \"127.0.0.1:0\", app: \"{app}\" }}\n"),
        None => String::new(),
    };
    format!(
        "apiVersion: mesh-proxy/v1
kind: Bootstrap
metadata: {{ name: {name}, namespace: default }}
spec:
  workload: {{ name: {name}, labels: {{ app: {name} }} }}
{inbound}  outbound: {{ listen: \"127.0.0.1:0\" }}
  admin: {{ listen: \"127.0.0.1:0\" }}
  terminationDrainDuration: 5s
"
    )
}

/// A STATIC ServiceEntry for `host` on `port` (protocol `protocol`) served at `endpoints`
/// (with none, by a workload selector that matches nothing).
pub fn service_entry(host: &str, port: u16, protocol: &str, endpoints: &[SocketAddr]) -> String {
    let labeled: Vec<_> = endpoints.iter().map(|ep| (*ep, "")).collect();
    service_entry_with(host, port, protocol, &labeled)
}

/// `reviews:9080` (an HTTP port named `http`, location MESH_INTERNAL) with one endpoint at
/// `addr` labelled `app: reviews`; with `sa`, the endpoint is a mesh workload speaking mTLS
/// (Istio's `security.istio.io/tlsMode: istio` label) under service account `sa`, so the
/// caller's sidecar originates mTLS and expects that identity.
pub fn reviews_entry(addr: SocketAddr, sa: Option<&str>) -> String {
    let labels = match sa {
        Some(sa) => format!(
            "{{ app: reviews, security.istio.io/tlsMode: istio }}\n    serviceAccount: {sa}"
        ),
        None => "{ app: reviews }".to_owned(),
    };
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: reviews, namespace: default }}
spec:
  hosts: [reviews]
  ports: [{{ number: 9080, name: http, protocol: HTTP }}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints:
  - address: \"{}\"
    ports: {{ http: {} }}
    labels: {labels}
",
        addr.ip(),
        addr.port()
    )
}

/// A STATIC ServiceEntry whose endpoints carry `app: HOST, version: VERSION` labels, for
/// DestinationRule subsets.
pub fn service_entry_labeled(host: &str, port: u16, endpoints: &[(SocketAddr, &str)]) -> String {
    service_entry_with(host, port, "HTTP", endpoints)
}

fn service_entry_with(
    host: &str,
    port: u16,
    protocol: &str,
    endpoints: &[(SocketAddr, &str)],
) -> String {
    let mut out = format!(
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: {host}, namespace: default }}
spec:
  hosts: [{host}]
  ports: [{{ number: {port}, name: p{port}, protocol: {protocol} }}]
  resolution: STATIC
  location: MESH_INTERNAL
"
    );
    if endpoints.is_empty() {
        // The service exists but selects workloads that are not registered (yet).
        out.push_str(&format!(
            "  workloadSelector: {{ labels: {{ app: {host} }} }}\n"
        ));
        return out;
    }
    out.push_str("  endpoints:\n");
    for (ep, version) in endpoints {
        let labels = if version.is_empty() {
            String::new()
        } else {
            format!(", labels: {{ app: {host}, version: {version} }}")
        };
        out.push_str(&format!(
            "  - {{ address: \"{}\", ports: {{ p{port}: {} }}{labels} }}\n",
            ep.ip(),
            ep.port()
        ));
    }
    out
}

/// Starts a proxy and waits until its admin `/ready` says 200.
pub async fn start_proxy(yaml: &str) -> RunningProxy {
    let proxy = match RunningProxy::start(load(yaml)).await {
        Ok(p) => p,
        Err(e) => panic!("proxy did not start: {e}"),
    };
    wait_ready(proxy.admin_addr()).await;
    proxy
}

/// A client sidecar (no inbound) that knows one HTTP service, `host:80`, served at
/// `endpoints`.
pub async fn client_proxy(host: &str, endpoints: &[SocketAddr]) -> RunningProxy {
    start_proxy(&format!(
        "{}{}",
        bootstrap("client", None),
        service_entry(host, 80, "HTTP", endpoints)
    ))
    .await
}

/// Polls `GET /ready` on an admin address until it answers 200 (at most 10 s).
pub async fn wait_ready(admin: SocketAddr) {
    let client = http1_client();
    for _ in 0..200 {
        let req = http::Request::get(format!("http://{admin}/ready"))
            .body(mesh_core::body::empty())
            .unwrap();
        if let Ok(resp) = client.request(req).await
            && resp.status() == 200
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{admin}/ready never answered 200");
}

pub type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    mesh_core::body::BoxBody,
>;

/// A plain HTTP/1.1 client, as an app would use.
pub fn http1_client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// An HTTP/2 prior-knowledge client.
pub fn http2_client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// `GET` through a proxy listener at `via`, with the given `Host`.
pub fn get(via: SocketAddr, host: &str, path: &str) -> http::Request<mesh_core::body::BoxBody> {
    http::Request::get(format!("http://{via}{path}"))
        .header("host", host)
        .body(mesh_core::body::empty())
        .unwrap()
}

/// Reads a whole response body as text.
pub async fn text(resp: http::Response<hyper::body::Incoming>) -> String {
    use http_body_util::BodyExt;
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A VirtualService `name` for host `name` with the given `http:` routes (YAML list items,
/// indented by two spaces).
pub fn virtual_service(name: &str, http: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: {name} }}
spec:
  hosts: [{name}]
  http:
{http}"
    )
}

/// Sends `total` requests built by `make` through `concurrency` workers and counts the
/// responses by `key(status, headers)`.
pub async fn tally<F, K>(
    client: &Client,
    total: usize,
    concurrency: usize,
    make: F,
    key: K,
) -> std::collections::BTreeMap<String, usize>
where
    F: Fn() -> http::Request<mesh_core::body::BoxBody> + Send + Sync + 'static,
    K: Fn(http::StatusCode, &http::HeaderMap) -> String + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let key = Arc::new(key);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, make, key, next) = (client.clone(), make.clone(), key.clone(), next.clone());
        workers.spawn(async move {
            let mut counts = std::collections::BTreeMap::<String, usize>::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                let resp = client.request(make()).await.unwrap();
                let k = key(resp.status(), resp.headers());
                text(resp).await;
                *counts.entry(k).or_default() += 1;
            }
            counts
        });
    }
    let mut all = std::collections::BTreeMap::new();
    while let Some(counts) = workers.join_next().await {
        for (k, n) in counts.unwrap() {
            *all.entry(k).or_default() += n;
        }
    }
    all
}
