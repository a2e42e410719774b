//! Opaque-TCP backends on loopback: an echo server that keeps half-close, and a server that
//! speaks first (as SMTP and MySQL servers do).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Echoes each connection's bytes back as they arrive; when the client shuts its write side,
/// the echo finishes and the server shuts its own (half-close both ways).
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// Writes `greeting` as soon as a connection is accepted, then echoes what it reads until
/// the client closes.
pub async fn speaks_first(greeting: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                if conn.write_all(greeting.as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A loopback port nothing listens on (bound, read, released).
pub fn closed_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct loopback ports that were free a moment ago (all bound at once, then
/// released): for listeners whose port the config must name. Callers retry on the rare
/// conflict.
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A STATIC ServiceEntry for `host` (port `port`, named `l4`, `protocol`) with two endpoints
/// labelled `version: v1` and `version: v2`, and a DestinationRule naming the two subsets:
/// the YAML of the L4 traffic-shifting tests (no leading `---`).
pub fn two_versions(host: &str, port: u16, protocol: &str, [v1, v2]: [SocketAddr; 2]) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: versions, namespace: default }}
spec:
  hosts: [\"{host}\"]
  ports: [{{ number: {port}, name: l4, protocol: {protocol} }}]
  resolution: STATIC
  endpoints:
  - {{ address: \"{}\", ports: {{ l4: {} }}, labels: {{ version: v1 }} }}
  - {{ address: \"{}\", ports: {{ l4: {} }}, labels: {{ version: v2 }} }}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: versions, namespace: default }}
spec:
  host: \"{host}\"
  subsets:
  - {{ name: v1, labels: {{ version: v1 }} }}
  - {{ name: v2, labels: {{ version: v2 }} }}
",
        v1.ip(),
        v1.port(),
        v2.ip(),
        v2.port()
    )
}

/// The first flight of a TLS client for `sni`, as rustls writes it: what a proxy reading
/// SNI sees, for a backend that need not speak TLS.
pub fn client_hello(sni: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(mesh_tls::verify::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}
