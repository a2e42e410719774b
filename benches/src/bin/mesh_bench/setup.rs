//! The contenders: the backend, certificates, the sidecars' Istio YAML, the HAProxy configs,
//! and the processes that serve each path.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use mesh_core::Identity;
use mesh_tls::ca::CertificateAuthority;

use crate::procs::{self, Children, Proc};

/// The service name and port the sidecars know the backend by; clients send it as `Host`.
pub const HOST: &str = "backend:8080";
const SERVICE_PORT: u16 = 8080;

/// One path from the load generator to the backend.
#[derive(Debug, Clone)]
pub struct Contender {
    pub name: &'static str,
    /// Where the load generator connects.
    pub addr: SocketAddr,
    /// The proxy processes on the path, the front one first (none for `direct`).
    pub procs: Vec<Proc>,
}

/// How the proxies are configured, recorded in the report.
#[derive(Debug, Clone, Copy)]
pub struct ProxySettings {
    /// Bootstrap `spec.concurrency` of every sidecar (worker threads).
    pub concurrency: u32,
}

/// The backend: answers `200 hello` to every request, HTTP/1.1 keep-alive or HTTP/2 prior
/// knowledge (h2c), on its own thread running a current-thread tokio runtime.
///
/// In-process rather than a separate process: it needs no second binary, every contender
/// shares the very same backend, its CPU is never mistaken for a proxy's (the harness only
/// reads the proxies' `/proc` entries), and one thread keeps it comparable to HAProxy's
/// `nbthread 1`. The harness's main thread only waits on the load tool during a window, so
/// the backend thread has its process to itself.
pub fn start_backend() -> anyhow::Result<SocketAddr> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("backend: cannot bind 127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("backend: cannot build its runtime")?;
    std::thread::Builder::new()
        .name("backend".into())
        .spawn(move || {
            rt.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => benches::serve_hello(listener).await,
                    Err(e) => eprintln!("backend: {e}"),
                }
            })
        })
        .context("backend: cannot start its thread")?;
    Ok(addr)
}

/// Certificates for the `client` and `server` service accounts, from one mesh CA
/// (`mesh_tls::ca`): `DIR/SA/{cert,key,root}.pem` for the sidecars, and `DIR/SA/haproxy.pem`
/// (certificate chain then key, the form HAProxy's `crt` takes) for the HAProxies.
fn issue_certificates(dir: &Path) -> anyhow::Result<()> {
    let ca = CertificateAuthority::generate("cluster.local").context("cannot create the CA")?;
    for sa in ["client", "server"] {
        let id = Identity::parse(&format!("spiffe://cluster.local/ns/default/sa/{sa}"))
            .with_context(|| format!("bad SPIFFE ID for {sa}"))?;
        let out = dir.join(sa);
        ca.issue(&id, mesh_tls::ca::DEFAULT_TTL)
            .with_context(|| format!("cannot issue the {sa} certificate"))?
            .save(&out)
            .with_context(|| format!("cannot save the {sa} certificate"))?;
        let cert = std::fs::read_to_string(out.join("cert.pem"))?;
        let key = std::fs::read_to_string(out.join("key.pem"))?;
        std::fs::write(out.join("haproxy.pem"), format!("{cert}{key}"))?;
    }
    Ok(())
}

/// A sidecar's Bootstrap (see [`benches::sidecar_yaml`]) with the harness's settings.
fn sidecar(
    name: &str,
    app: Option<SocketAddr>,
    certs: Option<&Path>,
    settings: ProxySettings,
) -> String {
    benches::sidecar_yaml(name, app, certs, Some(settings.concurrency))
}

/// The backend service as a client sidecar sees it, served at `endpoint`; with `mtls`, the
/// endpoint carries Istio's `security.istio.io/tlsMode: istio` label and the server's
/// service account, so the sidecar originates mTLS and checks that identity.
fn service_entry(endpoint: SocketAddr, mtls: bool) -> String {
    benches::backend_entry(SERVICE_PORT, endpoint, mtls)
}

/// A DestinationRule upgrading the backend's HTTP/1.1 requests to HTTP/2 between sidecars.
const H2_UPGRADE: &str = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: backend, namespace: default }
spec:
  host: backend
  trafficPolicy:
    connectionPool: { http: { h2UpgradePolicy: UPGRADE } }
";

/// An HAProxy with one thread, HTTP mode, keep-alive to the server and connection reuse,
/// no logging. `bind_extra` / `server_extra` add TLS to either side.
fn haproxy_config(
    listen: SocketAddr,
    bind_extra: &str,
    server: SocketAddr,
    server_extra: &str,
) -> String {
    format!(
        "global
    nbthread 1
    maxconn 4096

defaults
    mode http
    maxconn 4096
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-keep-alive 120s

frontend fe
    bind {listen}{bind_extra}
    default_backend be

backend be
    server s1 {server}{server_extra}
"
    )
}

fn write(path: PathBuf, text: &str) -> anyhow::Result<PathBuf> {
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

fn mesh(role: &'static str, pid: u32, front: bool) -> Proc {
    Proc {
        role,
        pid,
        mesh: true,
        front,
    }
}

fn haproxy(role: &'static str, pid: u32, front: bool) -> Proc {
    Proc {
        role,
        pid,
        mesh: false,
        front,
    }
}

/// Starts every contender's processes (they idle until their turn) and returns the
/// contenders, `direct` first.
pub fn start_all(
    children: &mut Children,
    dir: &Path,
    bin: &Path,
    backend: SocketAddr,
    settings: ProxySettings,
    with_haproxy: bool,
) -> anyhow::Result<Vec<Contender>> {
    issue_certificates(dir)?;
    let client_certs = dir.join("client");
    let server_certs = dir.join("server");
    let mut out = vec![Contender {
        name: "direct",
        addr: backend,
        procs: Vec::new(),
    }];

    // 1-hop: one sidecar's outbound listener straight to the backend.
    let cfg = write(
        dir.join("one-hop.yaml"),
        &format!(
            "{}{}",
            sidecar("client", None, None, settings),
            service_entry(backend, false)
        ),
    )?;
    let one = procs::start_mesh_proxy(children, bin, "1-hop sidecar", &cfg)?;
    out.push(Contender {
        name: "1-hop",
        addr: one.outbound,
        procs: vec![mesh("sidecar", one.pid, true)],
    });

    // 2-hop and 2-hop-mtls: client sidecar → server sidecar's inbound → backend;
    // 2-hop-mtls-h2: the client sidecar's DestinationRule upgrades the hop between the
    // sidecars to HTTP/2 (`h2UpgradePolicy: UPGRADE`), the backend still gets HTTP/1.1.
    for (name, mtls, h2) in [
        ("2-hop", false, false),
        ("2-hop-mtls", true, false),
        ("2-hop-mtls-h2", true, true),
    ] {
        let cfg = write(
            dir.join(format!("{name}-server.yaml")),
            &sidecar(
                "server",
                Some(backend),
                mtls.then_some(server_certs.as_path()),
                settings,
            ),
        )?;
        let server =
            procs::start_mesh_proxy(children, bin, &format!("{name} server sidecar"), &cfg)?;
        let inbound = server
            .inbound
            .with_context(|| format!("{name}: the server sidecar reported no inbound listener"))?;
        let cfg = write(
            dir.join(format!("{name}-client.yaml")),
            &format!(
                "{}{}{}",
                sidecar(
                    "client",
                    None,
                    mtls.then_some(client_certs.as_path()),
                    settings
                ),
                service_entry(inbound, mtls),
                if h2 { H2_UPGRADE } else { "" }
            ),
        )?;
        let client =
            procs::start_mesh_proxy(children, bin, &format!("{name} client sidecar"), &cfg)?;
        out.push(Contender {
            name,
            addr: client.outbound,
            procs: vec![
                mesh("client sidecar", client.pid, true),
                mesh("server sidecar", server.pid, false),
            ],
        });
    }

    if with_haproxy {
        let listen = procs::free_port()?;
        let cfg = write(
            dir.join("haproxy-1-hop.cfg"),
            &haproxy_config(listen, "", backend, ""),
        )?;
        let pid = procs::start_haproxy(children, "haproxy-1-hop", &cfg, listen)?;
        out.push(Contender {
            name: "haproxy-1-hop",
            addr: listen,
            procs: vec![haproxy("haproxy", pid, true)],
        });

        // Mutual TLS between the two, with the sidecars' kind of certificates (ECDSA P-256
        // SPIFFE SVIDs from the same CA); the chain is verified both ways.
        let back_listen = procs::free_port()?;
        let tls = |sa: &Path| {
            format!(
                " ssl crt {} ca-file {} verify required",
                sa.join("haproxy.pem").display(),
                sa.join("root.pem").display()
            )
        };
        let cfg = write(
            dir.join("haproxy-2-hop-server.cfg"),
            &haproxy_config(back_listen, &tls(&server_certs), backend, ""),
        )?;
        let back = procs::start_haproxy(children, "haproxy-2-hop server", &cfg, back_listen)?;
        let front_listen = procs::free_port()?;
        let cfg = write(
            dir.join("haproxy-2-hop-client.cfg"),
            &haproxy_config(front_listen, "", back_listen, &tls(&client_certs)),
        )?;
        let front = procs::start_haproxy(children, "haproxy-2-hop client", &cfg, front_listen)?;
        out.push(Contender {
            name: "haproxy-2-hop-tls",
            addr: front_listen,
            procs: vec![
                haproxy("client haproxy", front, true),
                haproxy("server haproxy", back, false),
            ],
        });
    }
    Ok(out)
}

/// Sends one HTTP/1.1 request (`Host: backend:8080`) on `stream` and reads the response
/// through its `hello` body; returns the status line.
pub fn one_request(stream: &mut TcpStream) -> anyhow::Result<String> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).context("reading the response")?;
        if n == 0 {
            bail!(
                "connection closed before a whole response: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let status = head.lines().next().unwrap_or("").to_owned();
            if !status.contains(" 200") {
                bail!("answered {status:?}:\n{text}");
            }
            if body.contains("hello") {
                return Ok(status);
            }
        }
        if buf.len() > 64 * 1024 {
            bail!("response too long, no `hello` body");
        }
    }
}

/// One request through `c`, checking the path works end to end.
pub fn smoke(c: &Contender) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(c.addr)
        .with_context(|| format!("{}: cannot connect to {}", c.name, c.addr))?;
    one_request(&mut stream).with_context(|| format!("{}: the check request failed", c.name))?;
    Ok(())
}
