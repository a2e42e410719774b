//! The Istio ingress gateway end to end: real gateway listeners on loopback, real TLS
//! handshakes, VirtualServices bound to the Gateway, real backends (and one behind a STRICT
//! mTLS sidecar).
//!
//! Gateway ports are real numbers (Istio's port numbers cannot be 0): each test reserves a
//! free loopback port and retries the start on the rare collision
//! ([`mesh_proxy::StartError::GatewayBind`]), then reads the listener from
//! `RunningProxy::gateway_addrs`.
#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod support;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::Identity;
use mesh_proxy::{RunningProxy, StartError};
use mesh_tls::ca::CertificateAuthority;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::app::App;
use support::pki::{Pki, STRICT, sidecar};
use support::{bootstrap, get, http1_client, load, service_entry, text, wait_ready};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A CA made with `mesh_tls::ca`, issuing DNS-named server certificates (rcgen, signed with
/// the CA's saved key, as a real ingress certificate would be) and SPIFFE client certificates.
struct Certs {
    ca: CertificateAuthority,
    dir: tempfile::TempDir,
}

impl Certs {
    fn new() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        ca.save(&dir.path().join("ca")).unwrap();
        Certs { ca, dir }
    }

    /// Writes `cert.pem` (leaf, then CA), `key.pem` and `root.pem` for DNS `names` into
    /// `dir/sub`: the `credentialName` directory layout.
    fn server(&self, sub: &str, names: &[&str]) -> PathBuf {
        let ca_dir = self.dir.path().join("ca");
        let ca_pem = std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap();
        let ca_key =
            rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca-key.pem")).unwrap())
                .unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let out = self.dir.path().join(sub);
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("cert.pem"), format!("{}{ca_pem}", cert.pem())).unwrap();
        std::fs::write(out.join("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(out.join("root.pem"), &ca_pem).unwrap();
        out
    }

    /// A SPIFFE client certificate from the CA: (chain, key).
    fn client(&self, sa: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let id = Identity::parse(&format!("spiffe://cluster.local/ns/default/sa/{sa}")).unwrap();
        let issued = self.ca.issue(&id, Duration::from_secs(3600)).unwrap();
        let chain = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
        (chain, key)
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca.root_pem().as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        roots
    }
}

/// A port free on loopback right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a proxy from `yaml(port)` with a free gateway port, retrying when another process
/// took the port in between; waits for `/ready`. Returns the gateway listener's address.
async fn start_gateway(yaml: impl Fn(u16) -> String) -> (RunningProxy, SocketAddr) {
    for _ in 0..5 {
        match RunningProxy::start(load(&yaml(free_port()))).await {
            Ok(proxy) => {
                wait_ready(proxy.admin_addr()).await;
                let addrs = proxy.gateway_addrs();
                assert_eq!(addrs.len(), 1, "{addrs:?}");
                return (proxy, addrs[0]);
            }
            Err(StartError::GatewayBind { .. }) => continue,
            Err(e) => panic!("gateway did not start: {e}"),
        }
    }
    panic!("no free gateway port after 5 tries");
}

/// The gateway workload's Bootstrap (labels `app: ingressgateway`), without identity.
fn gateway_bootstrap() -> String {
    bootstrap("ingressgateway", None)
}

fn gateway(servers: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{ name: my-gateway, namespace: default }}
spec:
  selector: {{ app: ingressgateway }}
  servers:
{servers}"
    )
}

/// A VirtualService bound to `my-gateway` for `hosts`, routing everything to `dest`.
fn bound_vs(name: &str, hosts: &str, dest: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: {name} }}
spec:
  hosts: {hosts}
  gateways: [my-gateway]
  http:
  - route: [{{ destination: {{ host: {dest} }} }}]
"
    )
}

struct Client {
    roots: Arc<RootCertStore>,
    cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: Vec<Vec<u8>>,
    send_sni: bool,
}

impl Client {
    fn new(certs: &Certs) -> Client {
        Client {
            roots: Arc::new(certs.roots()),
            cert: None,
            alpn: vec![b"http/1.1".to_vec()],
            send_sni: true,
        }
    }

    /// Connects to `addr`, verifying the server certificate for `name` (sent as SNI unless
    /// `send_sni` is off).
    async fn connect(&self, addr: SocketAddr, name: &str) -> io::Result<TlsStream<TcpStream>> {
        let builder = rustls::ClientConfig::builder_with_provider(mesh_tls::verify::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.roots.clone());
        let mut config = match &self.cert {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = self.alpn.clone();
        config.enable_sni = self.send_sni;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await?;
        connector
            .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
            .await
    }
}

/// One HTTP/1.1 (or, with ALPN h2, HTTP/2) GET over an established TLS stream.
async fn send(
    stream: TlsStream<TcpStream>,
    host: &str,
    path: &str,
) -> Result<Response<Incoming>, hyper::Error> {
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let mut req = Request::get(path);
    req = if h2 {
        req.uri(format!("https://{host}{path}"))
    } else {
        req.header("host", host)
    };
    let req = req.body(mesh_core::body::empty()).unwrap();
    if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await?;
        tokio::spawn(conn);
        sender.send_request(req).await
    } else {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        sender.send_request(req).await
    }
}

fn header(resp: &Response<Incoming>, name: &str) -> String {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

fn tls_server(port: u16, name: &str, hosts: &str, tls: &str) -> String {
    format!(
        "  - port: {{ number: {port}, name: {name}, protocol: HTTPS }}
    bind: 127.0.0.1
    hosts: {hosts}
    tls: {tls}
"
    )
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

#[tokio::test]
async fn two_tls_hosts_share_a_port_by_sni_each_with_its_certificate() {
    let certs = Certs::new();
    let bookinfo_dir = certs.server("bookinfo", &["bookinfo.example.com"]);
    let api_dir = certs.server("api", &["*.api.example.com"]);
    let frontend = App::start("frontend").await;
    let backend = App::start("backend").await;
    let (proxy, addr) = start_gateway(|port| {
        format!(
            "{}{}{}{}{}{}",
            gateway_bootstrap(),
            gateway(&format!(
                "{}{}",
                // credentialName: the directory `mesh-proxy ca issue` writes.
                tls_server(
                    port,
                    "https-bookinfo",
                    "[bookinfo.example.com]",
                    &format!(
                        "{{ mode: SIMPLE, credentialName: \"{}\" }}",
                        path(&bookinfo_dir)
                    )
                ),
                tls_server(
                    port,
                    "https-api",
                    "[\"default/*.api.example.com\"]",
                    &format!(
                        "{{ mode: SIMPLE, serverCertificate: \"{}\", privateKey: \"{}\" }}",
                        path(&api_dir.join("cert.pem")),
                        path(&api_dir.join("key.pem"))
                    )
                ),
            )),
            service_entry("frontend", 80, "HTTP", &[frontend.addr]),
            service_entry("backend", 80, "HTTP", &[backend.addr]),
            bound_vs("bookinfo", "[bookinfo.example.com]", "frontend"),
            bound_vs("api", "[\"*.api.example.com\"]", "backend"),
        )
    })
    .await;
    let client = Client::new(&certs);

    // Each SNI gets its own certificate (the client checks the name) and its own backend.
    let tls = client.connect(addr, "bookinfo.example.com").await.unwrap();
    let resp = send(tls, "bookinfo.example.com", "/productpage")
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-app"), "frontend");
    assert_eq!(text(resp).await, "hello from frontend");

    let tls = client.connect(addr, "v1.api.example.com").await.unwrap();
    let resp = send(tls, "v1.api.example.com", "/items").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-app"), "backend");
    assert_eq!(header(&resp, "x-seen-host"), "v1.api.example.com");

    // HTTP/2 by ALPN on the same port.
    let h2 = Client {
        alpn: vec![b"h2".to_vec()],
        ..Client::new(&certs)
    };
    let tls = h2.connect(addr, "v2.api.example.com").await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let resp = send(tls, "v2.api.example.com", "/items").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(header(&resp, "x-app"), "backend");

    // Wildcard SNI matching picks the wildcard server's certificate; an SNI no server names
    // gets the first server's (bookinfo's), which the client rejects for that name.
    let ok = client.connect(addr, "bookinfo.api.example.com").await;
    assert!(ok.is_ok(), "the wildcard certificate covers it: {ok:?}");
    let err = client.connect(addr, "other.example.com").await;
    assert!(err.is_err(), "an unknown SNI got a certificate for it");

    // No SNI: the first server's certificate (bookinfo's), verified by that name.
    let no_sni = Client {
        send_sni: false,
        ..Client::new(&certs)
    };
    let tls = no_sni.connect(addr, "bookinfo.example.com").await.unwrap();
    let resp = send(tls, "bookinfo.example.com", "/").await.unwrap();
    assert_eq!(header(&resp, "x-app"), "frontend");

    // A Host the SNI's server does not serve: 404 NR, as Istio's per-server routes answer.
    let tls = client.connect(addr, "bookinfo.example.com").await.unwrap();
    let resp = send(tls, "v1.api.example.com", "/").await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(header(&resp, "x-mesh-response-flags"), "NR");

    assert_eq!(frontend.received.load(Ordering::SeqCst), 2);
    assert_eq!(backend.received.load(Ordering::SeqCst), 2);
    proxy.shutdown().await;
}

#[tokio::test]
async fn mutual_tls_refuses_a_client_without_a_certificate() {
    let certs = Certs::new();
    let dir = certs.server("bookinfo", &["bookinfo.example.com"]);
    let frontend = App::start("frontend").await;
    let (proxy, addr) = start_gateway(|port| {
        format!(
            "{}{}{}{}",
            gateway_bootstrap(),
            gateway(&tls_server(
                port,
                "https",
                "[bookinfo.example.com]",
                // root.pem in the credentialName directory is the client CA.
                &format!("{{ mode: MUTUAL, credentialName: \"{}\" }}", path(&dir))
            )),
            service_entry("frontend", 80, "HTTP", &[frontend.addr]),
            bound_vs("bookinfo", "[bookinfo.example.com]", "frontend"),
        )
    })
    .await;

    // Without a certificate: refused (at the handshake, or at once after it under TLS 1.3).
    let anonymous = Client::new(&certs);
    let refused = match anonymous.connect(addr, "bookinfo.example.com").await {
        Err(_) => true,
        Ok(tls) => send(tls, "bookinfo.example.com", "/").await.is_err(),
    };
    assert!(refused, "a client without a certificate got through");
    assert_eq!(frontend.received.load(Ordering::SeqCst), 0);

    // With one from the CA: served.
    let mutual = Client {
        cert: Some(certs.client("curl")),
        ..Client::new(&certs)
    };
    let tls = mutual.connect(addr, "bookinfo.example.com").await.unwrap();
    let resp = send(tls, "bookinfo.example.com", "/").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(text(resp).await, "hello from frontend");

    // A certificate from another CA is refused too.
    let foreign = Certs::new();
    let stranger = Client {
        cert: Some(foreign.client("curl")),
        ..Client::new(&certs)
    };
    let refused = match stranger.connect(addr, "bookinfo.example.com").await {
        Err(_) => true,
        Ok(tls) => send(tls, "bookinfo.example.com", "/").await.is_err(),
    };
    assert!(refused, "a client of a foreign CA got through");
    assert_eq!(frontend.received.load(Ordering::SeqCst), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn https_redirect_and_unknown_hosts_on_a_plaintext_gateway() {
    let frontend = App::start("frontend").await;
    let (proxy, addr) = start_gateway(|port| {
        format!(
            "{}{}{}{}",
            gateway_bootstrap(),
            gateway(&format!(
                "  - port: {{ number: {port}, name: http-redirect, protocol: HTTP }}
    bind: 127.0.0.1
    hosts: [bookinfo.example.com]
    tls: {{ httpsRedirect: true }}
  - port: {{ number: {port}, name: http, protocol: HTTP }}
    bind: 127.0.0.1
    hosts: [\"default/plain.example.com\"]
"
            )),
            service_entry("frontend", 80, "HTTP", &[frontend.addr]),
            bound_vs(
                "bookinfo",
                "[bookinfo.example.com, plain.example.com]",
                "frontend"
            ),
        )
    })
    .await;
    let client = http1_client();

    let resp = client
        .request(get(addr, "bookinfo.example.com", "/productpage?u=1"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        header(&resp, "location"),
        "https://bookinfo.example.com/productpage?u=1"
    );

    let resp = client
        .request(get(addr, "plain.example.com", "/"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-app"), "frontend");

    // A host no server of the port names: 404 NR, like the sidecar's unknown host.
    let resp = client
        .request(get(addr, "other.example.com", "/"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(header(&resp, "x-mesh-response-flags"), "NR");
    assert_eq!(frontend.received.load(Ordering::SeqCst), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_http_gateway_routes_bound_services_over_mtls_and_ignores_mesh_ones() {
    let pki = Pki::new();
    let app = App::start("productpage").await;
    let productpage = support::start_proxy(&format!(
        "{}{STRICT}",
        sidecar("productpage", Some(app.addr), &pki.issue("productpage"))
    ))
    .await;
    let inbound = productpage.inbound_addr().unwrap();
    let gateway_certs = pki.issue("ingressgateway");
    let (proxy, addr) = start_gateway(|port| {
        format!(
            "{}{}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: productpage, namespace: default }}
spec:
  hosts: [productpage]
  ports: [{{ number: 9080, name: http, protocol: HTTP }}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints:
  - address: \"{}\"
    ports: {{ http: {} }}
    labels: {{ app: productpage, security.istio.io/tlsMode: istio }}
    serviceAccount: productpage
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: bookinfo }}
spec:
  hosts: [\"*\"]
  gateways: [my-gateway]
  http:
  - match: [{{ uri: {{ prefix: /productpage }} }}]
    route: [{{ destination: {{ host: productpage, port: {{ number: 9080 }} }} }}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: productpage-mesh }}
spec:
  hosts: [productpage]
  http:
  - route: [{{ destination: {{ host: productpage }} }}]
",
            sidecar("ingressgateway", None, &gateway_certs),
            gateway(&format!(
                "  - port: {{ number: {port}, name: http, protocol: HTTP }}
    bind: 127.0.0.1
    hosts: [\"*\"]
"
            )),
            inbound.ip(),
            inbound.port()
        )
    })
    .await;
    let client = http1_client();

    let resp = client
        .request(get(addr, "bookinfo.example.com", "/productpage"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // The STRICT sidecar saw the gateway's SPIFFE identity: ISTIO_MUTUAL from the gateway.
    assert_eq!(
        header(&resp, "x-seen-xfcc"),
        "By=spiffe://cluster.local/ns/default/sa/productpage;\
         URI=spiffe://cluster.local/ns/default/sa/ingressgateway"
    );
    assert_eq!(text(resp).await, "hello from productpage");

    // The mesh-only VirtualService (it would route every path of `productpage`) is not
    // applied at the gateway, nor is the bare service exposed: only the bound `*` route is.
    let resp = client
        .request(get(addr, "productpage:9080", "/other"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(header(&resp, "x-mesh-response-flags"), "NR");
    assert_eq!(app.received.load(Ordering::SeqCst), 1);

    proxy.shutdown().await;
    productpage.shutdown().await;
}

#[tokio::test]
async fn passthrough_forwards_the_raw_tls_stream_by_sni() {
    let certs = Certs::new();
    let dir = certs.server("secure", &["secure.example.com"]);
    // The backend terminates TLS itself and answers `pong:` + what it read.
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("cert.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
    let server_config = rustls::ServerConfig::builder_with_provider(mesh_tls::verify::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = backend.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut buf = [0u8; 64];
                let n = tls.read(&mut buf).await.unwrap_or(0);
                let mut reply = b"pong:".to_vec();
                reply.extend_from_slice(&buf[..n]);
                let _ = tls.write_all(&reply).await;
                let _ = tls.shutdown().await;
            });
        }
    });

    let (proxy, addr) = start_gateway(|port| {
        format!(
            "{}{}{}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: secure }}
spec:
  hosts: [secure.example.com]
  gateways: [my-gateway]
  tls:
  - match: [{{ sniHosts: [secure.example.com] }}]
    route: [{{ destination: {{ host: secure-backend, port: {{ number: 443 }} }} }}]
",
            gateway_bootstrap(),
            gateway(&format!(
                "  - port: {{ number: {port}, name: tls, protocol: TLS }}
    bind: 127.0.0.1
    hosts: [secure.example.com, nowhere.example.com]
    tls: {{ mode: PASSTHROUGH }}
"
            )),
            service_entry("secure-backend", 443, "TLS", &[backend_addr]),
        )
    })
    .await;
    let client = Client::new(&certs);

    // The handshake is the backend's (the gateway holds no certificate at all).
    let mut tls = client.connect(addr, "secure.example.com").await.unwrap();
    tls.write_all(b"ping").await.unwrap();
    let mut reply = Vec::new();
    tls.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"pong:ping");
    drop(tls); // else the drain below waits for this stream to end
    // It went through the outbound TCP path, which counts it.
    let resp = http1_client()
        .request(get(proxy.admin_addr(), "admin", "/metrics"))
        .await
        .unwrap();
    let metrics = text(resp).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("destination_service=\"secure-backend.default.svc.cluster.local\"")),
        "{metrics}"
    );

    // A server host without a tls route: the connection is closed.
    let refused = client.connect(addr, "nowhere.example.com").await;
    assert!(refused.is_err(), "no route, yet a handshake: {refused:?}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_taken_gateway_port_fails_the_start_naming_the_listener() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let yaml = format!(
        "{}{}",
        gateway_bootstrap(),
        gateway(&format!(
            "  - port: {{ number: {port}, name: http, protocol: HTTP }}
    bind: 127.0.0.1
    hosts: [\"*\"]
"
        ))
    );
    let err = RunningProxy::start(load(&yaml)).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("gateway default/my-gateway on 127.0.0.1:{port}")),
        "{msg}"
    );
    assert!(matches!(err, StartError::GatewayBind { .. }), "{err:?}");
}

/// A gateway with one `TCP` server on `port` (`bind` YAML line, maybe empty), the
/// two-version `tcp-echo` service on 9000, and a VirtualService bound to the gateway whose
/// `tcp` routes are `routes` (YAML list items).
fn tcp_gateway(port: u16, bind: &str, [v1, v2]: [SocketAddr; 2], routes: &str) -> String {
    format!(
        "{}{}---
{}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: tcp-echo }}
spec:
  hosts: [\"*\"]
  gateways: [my-gateway]
  tcp:
{routes}",
        gateway_bootstrap(),
        gateway(&format!(
            "  - port: {{ number: {port}, name: tcp, protocol: TCP }}
{bind}    hosts: [\"*\"]
"
        )),
        support::tcp::two_versions("tcp-echo", 9000, "TCP", [v1, v2]),
    )
}

/// Istio's TCP traffic shifting through the ingress gateway: a `TCP` Gateway server, and a
/// VirtualService bound to it whose `tcp` route for that port splits connections 80/20
/// between two subsets; then a config whose route names another port leaves this one
/// without a route, and its connections are closed.
#[tokio::test]
async fn a_tcp_gateway_server_shifts_connections_by_weight() {
    let v1 = support::tcp::speaks_first("v1\n").await;
    let v2 = support::tcp::speaks_first("v2\n").await;
    let yaml = |port: u16, route_port: u16| {
        tcp_gateway(
            port,
            "    bind: 127.0.0.1\n",
            [v1, v2],
            &format!(
                "  - match: [{{ port: {route_port} }}]
    route:
    - {{ destination: {{ host: tcp-echo, port: {{ number: 9000 }}, subset: v1 }}, weight: 80 }}
    - {{ destination: {{ host: tcp-echo, port: {{ number: 9000 }}, subset: v2 }}, weight: 20 }}
"
            ),
        )
    };
    let (proxy, addr) = start_gateway(|port| yaml(port, port)).await;
    let mut seen = std::collections::HashMap::<String, u32>::new();
    for _ in 0..200 {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let mut hello = [0u8; 3];
        tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut hello))
            .await
            .expect("an endpoint greets through the gateway")
            .unwrap();
        *seen
            .entry(String::from_utf8_lossy(&hello).into_owned())
            .or_default() += 1;
    }
    let to_v1 = seen.get("v1\n").copied().unwrap_or(0);
    assert_eq!(
        to_v1 + seen.get("v2\n").copied().unwrap_or(0),
        200,
        "{seen:?}"
    );
    // 80 % of 200 is 160; ± 28 is five standard deviations of the binomial draw.
    assert!((132..=188).contains(&to_v1), "{seen:?}");

    // The route now names another port: nothing routes this one, so the gateway closes the
    // connection without a byte.
    proxy
        .apply_config(load(&yaml(addr.port(), addr.port().wrapping_add(1))))
        .unwrap();
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest))
        .await
        .expect("the gateway closes an unrouted connection")
        .unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    proxy.shutdown().await;
}

/// On a gateway bound to every address, a `tcp` route's `destinationSubnets` match the
/// address the client reached (here loopback), not the listener's `0.0.0.0`.
#[tokio::test]
async fn a_gateway_tcp_route_matches_the_address_the_client_reached() {
    let v1 = support::tcp::speaks_first("v1\n").await;
    let v2 = support::tcp::speaks_first("v2\n").await;
    let (proxy, addr) = start_gateway(|port| {
        tcp_gateway(
            port,
            "",
            [v1, v2],
            &format!(
                "  - match: [{{ port: {port}, destinationSubnets: [127.0.0.0/8] }}]
    route: [{{ destination: {{ host: tcp-echo, port: {{ number: 9000 }}, subset: v2 }} }}]
"
            ),
        )
    })
    .await;
    assert!(addr.ip().is_unspecified(), "{addr}");
    let mut conn = TcpStream::connect(("127.0.0.1", addr.port()))
        .await
        .unwrap();
    let mut hello = [0u8; 3];
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut hello))
        .await
        .expect("routed by the loopback destination")
        .unwrap();
    assert_eq!(&hello, b"v2\n");
    drop(conn);
    proxy.shutdown().await;
}
