//! Benchmarks for the mesh.
//!
//! This crate is where the criterion micro-benchmarks (route
//! match, balancer pick, authorization, metrics record, whole stacks in-process) and the
//! end-to-end load harness (direct connection, one and two sidecar hops, HAProxy) belong.
//! Every figure quoted anywhere in the project is recorded in `benches/RESULTS.md` with the
//! command that produced it.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::Path;

/// A sidecar's Bootstrap for the end-to-end harnesses: outbound and admin on ephemeral
/// loopback ports, an inbound listener in front of `app` when given, the identity written
/// by `mesh_tls::ca` into `certs` when given (then a mesh-wide `STRICT` PeerAuthentication
/// too), and `spec.concurrency` when given.
pub fn sidecar_yaml(
    name: &str,
    app: Option<SocketAddr>,
    certs: Option<&Path>,
    concurrency: Option<u32>,
) -> String {
    let inbound = app
        .map(|a| format!("  inbound: {{ listen: \"127.0.0.1:0\", app: \"{a}\" }}\n"))
        .unwrap_or_default();
    let identity = certs
        .map(|d| {
            format!(
                "  identity: {{ cert: \"{}\", key: \"{}\", trustBundle: \"{}\" }}\n",
                d.join("cert.pem").display(),
                d.join("key.pem").display(),
                d.join("root.pem").display()
            )
        })
        .unwrap_or_default();
    let concurrency = concurrency
        .map(|n| format!("  concurrency: {n}\n"))
        .unwrap_or_default();
    let strict = if certs.is_some() {
        "---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: { name: default, namespace: default }
spec: { mtls: { mode: STRICT } }
"
    } else {
        ""
    };
    format!(
        "apiVersion: mesh-proxy/v1
kind: Bootstrap
metadata: {{ name: {name}, namespace: default }}
spec:
  workload: {{ name: {name}, labels: {{ app: {name} }} }}
{concurrency}{identity}{inbound}  outbound: {{ listen: \"127.0.0.1:0\" }}
  admin: {{ listen: \"127.0.0.1:0\" }}
{strict}"
    )
}

/// The `backend` service on `port` as a client sidecar sees it: a STATIC ServiceEntry with one
/// endpoint at `endpoint`; with `mtls`, the endpoint carries Istio's
/// `security.istio.io/tlsMode: istio` label and the `server` service account, so the sidecar
/// originates mTLS and checks that identity.
pub fn backend_entry(port: u16, endpoint: SocketAddr, mtls: bool) -> String {
    let labels = if mtls {
        "labels: { security.istio.io/tlsMode: istio }, serviceAccount: server, "
    } else {
        ""
    };
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: backend, namespace: default }}
spec:
  hosts: [backend]
  ports: [{{ number: {port}, name: http, protocol: HTTP }}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints:
  - {{ address: \"{}\", {labels}ports: {{ http: {} }} }}
",
        endpoint.ip(),
        endpoint.port()
    )
}

/// Answers `200 hello` to every request on `listener`, HTTP/1.1 keep-alive or HTTP/2 with
/// prior knowledge (h2c), each connection on its own task: the backend of every harness and
/// bench here. An accept error (out of file descriptors, most likely) backs off for 10 ms
/// rather than spinning.
pub async fn serve_hello(listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(mesh_core::body::full(
                    "hello",
                )))
            });
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
        });
    }
}
