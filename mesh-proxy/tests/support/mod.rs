//! Test harness: real backends on loopback and sidecars started in-process.
// Harness code: a failure here is a broken test setup, and a panic says so best.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

pub mod app;
pub mod grpc;

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
{}
",
        // With no endpoints, select workloads that are not registered (yet): the service
        // exists but has nobody to serve it.
        if endpoints.is_empty() {
            format!("  workloadSelector: {{ labels: {{ app: {host} }} }}")
        } else {
            "  endpoints:".to_string()
        }
    );
    for ep in endpoints {
        out.push_str(&format!(
            "  - {{ address: \"{}\", ports: {{ p{port}: {} }} }}\n",
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
