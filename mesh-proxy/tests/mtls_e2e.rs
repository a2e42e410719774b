//! Mutual TLS between real sidecars, with certificates from `mesh-proxy ca`: the caller's
//! identity reaching the app, PeerAuthentication modes, a foreign CA, an identity mismatch,
//! certificate rotation without restart, and AuthorizationPolicy by principal.
#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::StatusCode;
use hyper_util::rt::TokioIo;
use mesh_proxy::RunningProxy;
use mesh_tls::connector::MtlsConnector;
use mesh_tls::credentials::Credentials;
use support::app::App;
use support::pki::{Pki, STRICT, files, sidecar};
use support::{bootstrap, get, http1_client, start_proxy, text};

/// The server side: the `reviews` app behind its sidecar, with `extra` config.
async fn reviews_sidecar(pki: &Pki, app: &App, extra: &str) -> RunningProxy {
    let certs = pki.issue("reviews");
    start_proxy(&format!(
        "{}{extra}",
        sidecar("reviews", Some(app.addr), &certs)
    ))
    .await
}

/// The client side: `productpage`'s sidecar, calling `reviews` at `server`.
async fn productpage_sidecar(certs: &Path, server: SocketAddr, sa: &str) -> RunningProxy {
    start_proxy(&format!(
        "{}{}",
        sidecar("productpage", None, certs),
        support::reviews_entry(server, Some(sa))
    ))
    .await
}

fn header(resp: &http::Response<hyper::body::Incoming>, name: &str) -> String {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn two_sidecars_speak_mtls_and_strict_refuses_plaintext() {
    let pki = Pki::new();
    let app = App::start("reviews").await;
    let server = reviews_sidecar(&pki, &app, STRICT).await;
    let inbound = server.inbound_addr().unwrap();
    let client = productpage_sidecar(&pki.issue("productpage"), inbound, "reviews").await;

    // A forged XFCC from the calling app never reaches the server's app.
    let mut req = get(client.outbound_addr().unwrap(), "reviews:9080", "/");
    req.headers_mut().insert(
        "x-forwarded-client-cert",
        "URI=spiffe://cluster.local/ns/default/sa/admin"
            .parse()
            .unwrap(),
    );
    let resp = http1_client().request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        header(&resp, "x-seen-xfcc"),
        "By=spiffe://cluster.local/ns/default/sa/reviews;\
         URI=spiffe://cluster.local/ns/default/sa/productpage"
    );
    assert_eq!(text(resp).await, "hello from reviews");

    // A plaintext client straight to the STRICT inbound listener is disconnected.
    let plain = http1_client()
        .request(get(inbound, "reviews:9080", "/"))
        .await;
    assert!(plain.is_err(), "plaintext accepted: {plain:?}");
    assert_eq!(app.received.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn permissive_accepts_mtls_and_plaintext_on_one_port() {
    let pki = Pki::new();
    let app = App::start("reviews").await;
    // No PeerAuthentication: Istio's default, PERMISSIVE.
    let server = reviews_sidecar(&pki, &app, "").await;
    let inbound = server.inbound_addr().unwrap();
    let client = productpage_sidecar(&pki.issue("productpage"), inbound, "reviews").await;

    let mtls = http1_client()
        .request(get(client.outbound_addr().unwrap(), "reviews:9080", "/"))
        .await
        .unwrap();
    assert_eq!(mtls.status(), StatusCode::OK);
    assert!(
        header(&mtls, "x-seen-xfcc")
            .ends_with("URI=spiffe://cluster.local/ns/default/sa/productpage"),
        "{}",
        header(&mtls, "x-seen-xfcc")
    );

    let mut req = get(inbound, "reviews:9080", "/");
    req.headers_mut().insert(
        "x-forwarded-client-cert",
        "URI=spiffe://cluster.local/ns/default/sa/admin"
            .parse()
            .unwrap(),
    );
    let plain = http1_client().request(req).await.unwrap();
    assert_eq!(plain.status(), StatusCode::OK);
    // No verified peer, so no XFCC, and the forged one is gone.
    assert_eq!(header(&plain, "x-seen-xfcc"), "-");
}

#[tokio::test]
async fn a_sidecar_from_another_ca_is_refused() {
    let pki = Pki::new();
    let app = App::start("reviews").await;
    let server = reviews_sidecar(&pki, &app, STRICT).await;
    let inbound = server.inbound_addr().unwrap();
    let stranger = Pki::new();
    let client = productpage_sidecar(&stranger.issue("productpage"), inbound, "reviews").await;

    let resp = http1_client()
        .request(get(client.outbound_addr().unwrap(), "reviews:9080", "/"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(header(&resp, "x-mesh-response-flags").starts_with("UF"));
    let body = text(resp).await;
    assert!(body.contains("TLS handshake failed"), "{body}");
    assert_eq!(app.received.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_unexpected_server_identity_fails_with_both_names() {
    let pki = Pki::new();
    let app = App::start("reviews").await;
    let server = reviews_sidecar(&pki, &app, STRICT).await;
    // Discovery says the endpoint runs as `ratings`; the server presents `reviews`.
    let client = productpage_sidecar(
        &pki.issue("productpage"),
        server.inbound_addr().unwrap(),
        "ratings",
    )
    .await;

    let resp = http1_client()
        .request(get(client.outbound_addr().unwrap(), "reviews:9080", "/"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(header(&resp, "x-mesh-response-flags").starts_with("UF"));
    let body = text(resp).await;
    assert!(
        body.contains(
            "server identity mismatch: expected spiffe://cluster.local/ns/default/sa/ratings, \
             presented spiffe://cluster.local/ns/default/sa/reviews"
        ),
        "{body}"
    );
    assert_eq!(app.received.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// The serial number of the certificate a server presents to a new mTLS handshake, and the
/// TLS stream, still open.
async fn handshake(
    connector: &MtlsConnector,
    addr: SocketAddr,
) -> (
    String,
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connected = connector.connect(tcp, &[], false).await.unwrap();
    let leaf = connected.stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    (cert.raw_serial_as_string(), connected.stream)
}

#[tokio::test]
async fn rotated_certificate_files_apply_to_new_handshakes_without_restart() {
    let pki = Pki::new();
    let app = App::start("reviews").await;
    let server = reviews_sidecar(&pki, &app, STRICT).await;
    let inbound = server.inbound_addr().unwrap();
    let client_certs = pki.issue("productpage");
    let connector = MtlsConnector::new(Credentials::load(&files(&client_certs)).unwrap());

    // The certificate's expiry is exported: Istio's 24 h default TTL from now.
    let resp = http1_client()
        .request(get(server.admin_addr(), "admin", "/metrics"))
        .await
        .unwrap();
    let metrics = text(resp).await;
    let expiry: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("mesh_identity_cert_expiration_timestamp_seconds "))
        .unwrap_or_else(|| panic!("no expiry gauge in:\n{metrics}"))
        .trim()
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        (now + 23 * 3600..now + 25 * 3600).contains(&expiry),
        "{expiry} vs now {now}"
    );

    let (before, stream) = handshake(&connector, inbound).await;
    // An HTTP/1.1 connection over that first handshake.
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);

    pki.issue("reviews"); // new key and certificate in the same files
    let mut after = before.clone();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = handshake(&connector, inbound).await.0;
        if after != before {
            break;
        }
    }
    assert_ne!(
        after, before,
        "new handshakes still present the old certificate"
    );

    // The connection made before the rotation still carries requests.
    let req = http::Request::get("/")
        .header("host", "reviews:9080")
        .body(mesh_core::body::empty())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn authorization_policy_by_principal_method_and_path() {
    let pki = Pki::new();
    let app = App::start("reviews").await;
    let policy = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: reviews-viewer, namespace: default }
spec:
  selector: { matchLabels: { app: reviews } }
  action: ALLOW
  rules:
  - from: [{ source: { principals: [cluster.local/ns/default/sa/productpage] } }]
    to: [{ operation: { methods: [GET], paths: [\"/api/*\"] } }]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: deny-admin, namespace: default }
spec:
  action: DENY
  rules:
  - to: [{ operation: { paths: [\"/api/admin*\"] } }]
";
    let server = reviews_sidecar(&pki, &app, &format!("{STRICT}{policy}")).await;
    let inbound = server.inbound_addr().unwrap();
    let productpage = productpage_sidecar(&pki.issue("productpage"), inbound, "reviews").await;
    let ratings = productpage_sidecar(&pki.issue("ratings"), inbound, "reviews").await;
    let http = http1_client();
    let call = |proxy: &RunningProxy, method: &str, path: &str| {
        http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", proxy.outbound_addr().unwrap()))
            .header("host", "reviews:9080")
            .body(mesh_core::body::empty())
            .unwrap()
    };

    let resp = http
        .request(call(&productpage, "GET", "/api/v1"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    for (proxy, method, path) in [
        (&productpage, "POST", "/api/v1"),   // other method
        (&productpage, "GET", "/other"),     // other path
        (&ratings, "GET", "/api/v1"),        // other principal
        (&productpage, "GET", "/api/admin"), // the DENY policy wins over the ALLOW
    ] {
        let resp = http.request(call(proxy, method, path)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{method} {path}");
        assert_eq!(text(resp).await, "RBAC: access denied");
    }
    assert_eq!(app.received.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// A TCP echo server (Istio's tcp-echo), answering each connection's bytes back.
async fn tcp_echo() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Sends `hello` over a connection and reads what comes back until the other side closes
/// its half; `None` when the connection is cut instead.
async fn echo<S>(mut stream: S) -> Option<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(b"hello").await.ok()?;
    stream.shutdown().await.ok()?;
    let mut out = String::new();
    stream.read_to_string(&mut out).await.ok()?;
    (!out.is_empty()).then_some(out)
}

/// Istio's TCP authorization task: the tcp-echo workload behind a STRICT sidecar whose
/// inbound listener proxies opaque TCP, with a policy that allows one principal on the
/// workload's port. The connection is decided as a whole, before any byte reaches the app.
#[tokio::test]
async fn tcp_authorization_by_principal_on_an_opaque_tcp_listener() {
    let pki = Pki::new();
    let app = tcp_echo().await;
    let policy = format!(
        "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{ name: tcp-policy, namespace: default }}
spec:
  selector: {{ matchLabels: {{ app: tcp-echo }} }}
  action: ALLOW
  rules:
  - from: [{{ source: {{ principals: [cluster.local/ns/default/sa/sleep] }} }}]
    to: [{{ operation: {{ ports: [\"{}\"] }} }}]
",
        app.port()
    );
    let certs = pki.issue("tcp-echo");
    let bootstrap = sidecar("tcp-echo", Some(app), &certs).replace(
        &format!("app: \"{app}\" }}"),
        &format!("app: \"{app}\", protocol: tcp }}"),
    );
    let server = start_proxy(&format!("{bootstrap}{STRICT}{policy}")).await;
    let inbound = server.inbound_addr().unwrap();

    let connect = |sa: &str| {
        let connector = MtlsConnector::new(Credentials::load(&files(&pki.issue(sa))).unwrap());
        async move {
            let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
            connector.connect(tcp, &[], false).await.unwrap().stream
        }
    };
    // The allowed principal gets its bytes echoed, half-close and all.
    assert_eq!(echo(connect("sleep").await).await.as_deref(), Some("hello"));
    // Another principal is cut off.
    assert_eq!(echo(connect("productpage").await).await, None);
    // Plaintext never gets past STRICT.
    let plain = tokio::net::TcpStream::connect(inbound).await.unwrap();
    assert_eq!(echo(plain).await, None);
}

/// `GET http://reviews:9080/` from an HTTP/2 client (prior knowledge) through `client`'s
/// outbound listener: the service named in `:authority`.
async fn h2_get_reviews(client: &RunningProxy) -> http::Response<hyper::body::Incoming> {
    let stream = tokio::net::TcpStream::connect(client.outbound_addr().unwrap())
        .await
        .unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("http://reviews:9080/")
        .body(mesh_core::body::empty())
        .unwrap();
    h2.send_request(req).await.unwrap()
}

/// HTTP/2 between sidecars: ALPN `h2` on the mTLS connection, and the app sees HTTP/2.
#[tokio::test]
async fn http2_between_sidecars_over_mtls() {
    let pki = Pki::new();
    let app = App::start("reviews").await;
    let server = reviews_sidecar(&pki, &app, STRICT).await;
    let client = productpage_sidecar(
        &pki.issue("productpage"),
        server.inbound_addr().unwrap(),
        "reviews",
    )
    .await;
    let resp = h2_get_reviews(&client).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-seen-version"), "HTTP/2.0");
    assert!(header(&resp, "x-seen-xfcc").contains("sa/productpage"));
}

/// A DestinationRule with `h2UpgradePolicy: UPGRADE` for `reviews`.
const H2_UPGRADE: &str = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: reviews, namespace: default }
spec:
  host: reviews
  trafficPolicy:
    connectionPool: { http: { h2UpgradePolicy: UPGRADE } }
";

/// `mesh_downstream_connections_total{listener="inbound"}` of a proxy.
async fn inbound_connections(proxy: &RunningProxy) -> u64 {
    let resp = http1_client()
        .request(get(proxy.admin_addr(), "admin", "/metrics"))
        .await
        .unwrap();
    let metrics = text(resp).await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("mesh_downstream_connections_total{listener=\"inbound\"} "))
        .unwrap_or_else(|| panic!("no inbound connection counter in:\n{metrics}"))
        .trim()
        .parse()
        .unwrap()
}

/// 16 HTTP/1.1 requests at once through the client sidecar, each held 300 ms by the app;
/// every answer's `x-seen-version` and `x-seen-orig-proto`.
async fn concurrent_http1(client: &RunningProxy) -> Vec<(String, String)> {
    let outbound = client.outbound_addr().unwrap();
    let calls = (0..16).map(|_| async move {
        let resp = http1_client()
            .request(get(outbound, "reviews:9080", "/delay?ms=300"))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(header(&resp, "x-seen-xfcc").contains("sa/productpage"));
        (
            header(&resp, "x-seen-version"),
            header(&resp, "x-seen-orig-proto"),
        )
    });
    futures::future::join_all(calls).await
}

/// `h2UpgradePolicy: UPGRADE`: HTTP/1.1 requests cross between the sidecars as streams of one
/// mTLS HTTP/2 connection, and the app still gets HTTP/1.1 without the proxies' marker
/// header; without the rule, the same requests take one connection each.
#[tokio::test]
async fn h2_upgrade_carries_http1_requests_over_one_connection_between_sidecars() {
    let pki = Pki::new();
    let app = App::start("reviews").await;
    let server = reviews_sidecar(&pki, &app, STRICT).await;
    let inbound = server.inbound_addr().unwrap();
    let certs = pki.issue("productpage");

    let upgrading = start_proxy(&format!(
        "{}{}{H2_UPGRADE}",
        sidecar("productpage", None, &certs),
        support::reviews_entry(inbound, Some("reviews"))
    ))
    .await;
    let seen = concurrent_http1(&upgrading).await;
    assert!(
        seen.iter().all(|s| *s == ("HTTP/1.1".into(), "-".into())),
        "{seen:?}"
    );
    assert_eq!(inbound_connections(&server).await, 1);

    // An HTTP/2 client is not marked: its request reaches the app as HTTP/2.
    let resp = h2_get_reviews(&upgrading).await;
    assert_eq!(header(&resp, "x-seen-version"), "HTTP/2.0");
    assert_eq!(inbound_connections(&server).await, 1);

    // An app cannot forge the marker: it is removed from requests the proxy did not upgrade.
    let plain = productpage_sidecar(&certs, inbound, "reviews").await;
    let mut req = get(plain.outbound_addr().unwrap(), "reviews:9080", "/");
    req.headers_mut()
        .insert("x-mesh-orig-proto", "HTTP/1.1".parse().unwrap());
    let resp = http1_client().request(req).await.unwrap();
    assert_eq!(header(&resp, "x-seen-orig-proto"), "-");
    let before = inbound_connections(&server).await;

    // Without the rule: HTTP/1.1 hop by hop, a connection per concurrent request.
    let seen = concurrent_http1(&plain).await;
    assert!(seen.iter().all(|s| s.0 == "HTTP/1.1"), "{seen:?}");
    let opened = inbound_connections(&server).await - before;
    assert!(
        opened >= 8,
        "{opened} connections for 16 concurrent requests"
    );
}

/// An HTTPS server outside the mesh, with a certificate for `external.example` from a
/// public-style root (not the mesh CA): what `tls.mode: SIMPLE` originates TLS to.
async fn external_https(dir: &Path) -> (SocketAddr, String) {
    use rustls::pki_types::pem::PemObject;
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["external.example".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let ca_path = dir.join("external-root.pem");
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();

    let config = rustls::ServerConfig::builder_with_provider(mesh_tls::verify::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
                .unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().unwrap_or("-").to_owned();
                let svc = hyper::service::service_fn(move |_req| {
                    let sni = sni.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            mesh_core::body::full(format!("hello over TLS to {sni}")),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, ca_path.display().to_string())
}

/// Istio's egress TLS origination: the app speaks plain HTTP to its sidecar, which opens
/// TLS to the external service (verifying its name against the given root); with the wrong
/// root the connection fails `503 UF`.
#[tokio::test]
async fn simple_tls_origination_to_an_external_service() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, ca) = external_https(dir.path()).await;
    let other_root = Pki::new();
    let config = |ca: &str| {
        format!(
            "{}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: external, namespace: default }}
spec:
  hosts: [external.example]
  ports: [{{ number: 80, name: http, protocol: HTTP }}]
  resolution: STATIC
  location: MESH_EXTERNAL
  endpoints: [{{ address: \"{}\", ports: {{ http: {} }} }}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: external, namespace: default }}
spec:
  host: external.example
  trafficPolicy: {{ tls: {{ mode: SIMPLE, caCertificates: \"{ca}\" }} }}
",
            bootstrap("client", None),
            addr.ip(),
            addr.port()
        )
    };
    let proxy = start_proxy(&config(&ca)).await;
    let resp = http1_client()
        .request(get(proxy.outbound_addr().unwrap(), "external.example", "/"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(text(resp).await, "hello over TLS to external.example");

    let wrong = other_root.dir.path().join("ca").join("ca.pem");
    let proxy = start_proxy(&config(&wrong.display().to_string())).await;
    let resp = http1_client()
        .request(get(proxy.outbound_addr().unwrap(), "external.example", "/"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(header(&resp, "x-mesh-response-flags").starts_with("UF"));
}
