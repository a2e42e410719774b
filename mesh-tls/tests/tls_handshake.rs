//! Mesh mTLS over real loopback sockets: identities, ALPN, and every way a handshake must fail.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

use std::sync::Arc;
use std::time::Duration;

use mesh_core::Identity;
use mesh_tls::acceptor::MtlsAcceptor;
use mesh_tls::ca::{CertificateAuthority, DEFAULT_TTL};
use mesh_tls::connector::MtlsConnector;
use mesh_tls::credentials::{Credentials, TlsError};
use mesh_tls::detect;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/reviews";
const RATINGS: &str = "spiffe://cluster.local/ns/default/sa/ratings";
const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/productpage";

fn id(s: &str) -> Identity {
    Identity::parse(s).unwrap()
}

fn creds(ca: &CertificateAuthority, spiffe: &str) -> Arc<Credentials> {
    let svid = ca.issue(&id(spiffe), DEFAULT_TTL).unwrap();
    Credentials::from_pem(&svid.cert_pem, &svid.key_pem, &svid.root_pem).unwrap()
}

/// What the server saw: the client's identity and whether ALPN chose h2.
type ServerSide = tokio::task::JoinHandle<Result<(Identity, bool), TlsError>>;

/// A listener that runs the acceptor on one connection and hands back the result.
async fn serve_once(acceptor: MtlsAcceptor) -> (std::net::SocketAddr, ServerSide) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut accepted = acceptor.accept(tcp).await?;
        // Echo one message so the client can check the channel works.
        let mut buf = [0u8; 5];
        if accepted.stream.read_exact(&mut buf).await.is_ok() {
            let _ = accepted.stream.write_all(&buf).await;
            let _ = accepted.stream.flush().await;
        }
        Ok((accepted.peer, accepted.alpn_h2))
    });
    (addr, task)
}

#[tokio::test]
async fn handshake_exchanges_identities_and_negotiates_alpn() {
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let server = creds(&ca, REVIEWS);
    let client = creds(&ca, PRODUCTPAGE);
    for http2 in [true, false] {
        let (addr, task) = serve_once(MtlsAcceptor::new(server.clone())).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut connected = MtlsConnector::new(client.clone())
            .connect(tcp, &[id(REVIEWS)], http2)
            .await
            .unwrap();
        assert_eq!(connected.peer, id(REVIEWS));
        let expected_alpn: &[u8] = if http2 { b"h2" } else { b"http/1.1" };
        assert_eq!(
            connected.stream.get_ref().1.alpn_protocol(),
            Some(expected_alpn)
        );
        connected.stream.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        connected.stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        let (peer, alpn_h2) = task.await.unwrap().unwrap();
        assert_eq!(
            peer,
            id(PRODUCTPAGE),
            "the server sees the client's SPIFFE ID"
        );
        assert_eq!(alpn_h2, http2);
    }
}

#[tokio::test]
async fn no_expected_identities_accepts_any_server_of_the_trust_domain() {
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let (addr, task) = serve_once(MtlsAcceptor::new(creds(&ca, RATINGS))).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connected = MtlsConnector::new(creds(&ca, PRODUCTPAGE))
        .connect(tcp, &[], false)
        .await
        .unwrap();
    assert_eq!(connected.peer, id(RATINGS));
    drop(connected);
    let _ = task.await.unwrap();
}

#[tokio::test]
async fn expected_identity_mismatch_names_both() {
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let (addr, _task) = serve_once(MtlsAcceptor::new(creds(&ca, RATINGS))).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let err = MtlsConnector::new(creds(&ca, PRODUCTPAGE))
        .connect(tcp, &[id(REVIEWS)], true)
        .await
        .unwrap_err();
    match &err {
        TlsError::IdentityMismatch {
            expected,
            presented,
        } => {
            assert_eq!(expected, &[REVIEWS.to_string()]);
            assert_eq!(presented, &[RATINGS.to_string()]);
        }
        other => panic!("expected IdentityMismatch, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        format!("server identity mismatch: expected {REVIEWS}, presented {RATINGS}")
    );
}

#[tokio::test]
async fn one_of_several_expected_identities_is_enough() {
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let (addr, _task) = serve_once(MtlsAcceptor::new(creds(&ca, RATINGS))).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connected = MtlsConnector::new(creds(&ca, PRODUCTPAGE))
        .with_server_name("outbound_.9080_._.ratings.default.svc.cluster.local")
        .unwrap()
        .connect(tcp, &[id(REVIEWS), id(RATINGS)], true)
        .await
        .unwrap();
    assert_eq!(connected.peer, id(RATINGS));
}

#[tokio::test]
async fn peers_of_different_cas_fail_on_both_sides() {
    // Two roots of the same name (two clusters both called cluster.local).
    let ours = CertificateAuthority::generate("cluster.local").unwrap();
    let theirs = CertificateAuthority::generate("cluster.local").unwrap();
    let (addr, task) = serve_once(MtlsAcceptor::new(creds(&ours, REVIEWS))).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let err = MtlsConnector::new(creds(&theirs, PRODUCTPAGE))
        .connect(tcp, &[], false)
        .await
        .unwrap_err();
    assert!(
        matches!(err, TlsError::Handshake { .. }),
        "connector: {err:?}"
    );
    assert!(err.to_string().contains("trust bundle"), "{err}");
    let server_err = task.await.unwrap().unwrap_err();
    assert!(
        matches!(server_err, TlsError::Handshake { .. }),
        "acceptor: {server_err:?}"
    );
}

#[tokio::test]
async fn client_cert_from_another_ca_is_rejected_by_the_acceptor() {
    let ours = CertificateAuthority::generate("cluster.local").unwrap();
    let theirs = CertificateAuthority::generate("cluster.local").unwrap();
    // The client trusts both roots (so it accepts our server) but holds a cert of `theirs`.
    let svid = theirs.issue(&id(PRODUCTPAGE), DEFAULT_TTL).unwrap();
    let bundle = format!("{}{}", theirs.root_pem(), ours.root_pem());
    let client = Credentials::from_pem(&svid.cert_pem, &svid.key_pem, &bundle).unwrap();
    let (addr, task) = serve_once(MtlsAcceptor::new(creds(&ours, REVIEWS))).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    // TLS 1.3: the client finishes first; the rejection shows on its next read.
    if let Ok(mut connected) = MtlsConnector::new(client).connect(tcp, &[], false).await {
        let _ = connected.stream.write_all(b"hello").await;
        let mut buf = [0u8; 5];
        assert!(connected.stream.read_exact(&mut buf).await.is_err());
    }
    let err = task.await.unwrap().unwrap_err();
    assert!(
        err.to_string().contains("inbound TLS handshake failed")
            && err.to_string().contains("trust bundle"),
        "{err}"
    );
}

/// A raw rustls client: what a non-mesh or misconfigured peer does.
fn raw_client(
    ca: &CertificateAuthority,
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.root_pem().as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(mesh_tls::verify::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(mesh_tls::verify::MeshServerVerifier::new(
            Arc::new(roots),
        )));
    let config = match client_cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn raw_dial(addr: std::net::SocketAddr, connector: tokio_rustls::TlsConnector) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    if let Ok(mut tls) = connector
        .connect(ServerName::try_from("mesh").unwrap(), tcp)
        .await
    {
        let _ = tls.write_all(b"hello").await;
        let mut buf = [0u8; 5];
        let _ = tls.read_exact(&mut buf).await;
    }
}

#[tokio::test]
async fn client_without_a_certificate_is_rejected() {
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let (addr, task) = serve_once(MtlsAcceptor::new(creds(&ca, REVIEWS))).await;
    raw_dial(addr, raw_client(&ca, None)).await;
    let err = task.await.unwrap().unwrap_err();
    assert!(
        err.to_string().contains("presented no certificate"),
        "{err}"
    );
}

#[tokio::test]
async fn client_certificate_without_a_spiffe_id_is_rejected() {
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    // Sign a DNS-only leaf with the same CA key, through rcgen directly.
    let dir = tempfile::tempdir().unwrap();
    ca.save(dir.path()).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.path().join("ca-key.pem")).unwrap())
            .unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.root_pem(), ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["client.example".to_string()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = params.signed_by(&leaf_key, &issuer).unwrap();
    let key = PrivateKeyDer::from_pem_slice(leaf_key.serialize_pem().as_bytes()).unwrap();

    let (addr, task) = serve_once(MtlsAcceptor::new(creds(&ca, REVIEWS))).await;
    raw_dial(addr, raw_client(&ca, Some((vec![leaf.der().clone()], key)))).await;
    let err = task.await.unwrap().unwrap_err();
    match &err {
        TlsError::PeerWithoutSpiffeId { presented } => {
            assert_eq!(presented, &["client.example".to_string()])
        }
        other => panic!("expected PeerWithoutSpiffeId, got {other:?}"),
    }
    assert!(err.to_string().contains("no SPIFFE ID"), "{err}");
}

#[tokio::test]
async fn plaintext_client_is_rejected() {
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let (addr, task) = serve_once(MtlsAcceptor::new(creds(&ca, REVIEWS))).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: reviews\r\n\r\n")
        .await
        .unwrap();
    let err = task.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("does not speak TLS"), "{err}");
}

#[tokio::test]
async fn silent_client_times_out() {
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let acceptor =
        MtlsAcceptor::new(creds(&ca, REVIEWS)).with_handshake_timeout(Duration::from_millis(100));
    let (addr, task) = serve_once(acceptor).await;
    let _tcp = TcpStream::connect(addr).await.unwrap();
    let err = task.await.unwrap().unwrap_err();
    assert!(matches!(err, TlsError::HandshakeTimeout { .. }), "{err:?}");
}

#[tokio::test]
async fn detect_tells_a_client_hello_from_plaintext_without_consuming_it() {
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let acceptor = MtlsAcceptor::new(creds(&ca, REVIEWS));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();

    // A real mesh client: its ClientHello is TLS, and the handshake still succeeds after.
    let client = creds(&ca, PRODUCTPAGE);
    let dial = tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        MtlsConnector::new(client)
            .connect(tcp, &[], true)
            .await
            .map(|c| c.peer)
    });
    let (tcp, _) = listener.accept().await.unwrap();
    assert!(detect::is_tls(&tcp, Duration::from_secs(5)).await.unwrap());
    let accepted = acceptor.accept(tcp).await.unwrap();
    assert_eq!(accepted.peer, id(PRODUCTPAGE));
    assert_eq!(dial.await.unwrap().unwrap(), id(REVIEWS));

    // An HTTP/1.1 request is not.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    assert!(!detect::is_tls(&tcp, Duration::from_secs(5)).await.unwrap());
}
