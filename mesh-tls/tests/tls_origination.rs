//! TLS origination to a service outside the mesh (DestinationRule `tls.mode: SIMPLE | MUTUAL`).

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

use std::path::{Path, PathBuf};
use std::sync::Arc;

use mesh_core::config::networking::{ClientTlsMode, ClientTlsSettings};
use mesh_tls::ca::{CertificateAuthority, DEFAULT_TTL};
use mesh_tls::connector::OriginationTls;
use mesh_tls::credentials::TlsError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A public-style PKI: a root and a server certificate for DNS names.
struct Pki {
    root_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key_pem: String,
}

fn pki(names: &[&str]) -> Pki {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Example Root");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let leaf = params.signed_by(&key, &issuer).unwrap();
    Pki {
        root_pem: ca_cert.pem(),
        chain: vec![leaf.der().clone(), ca_cert.der().clone()],
        key_pem: key.serialize_pem(),
    }
}

/// The ALPN protocol the server negotiated; `None` if its exchange failed.
type Alpn = tokio::task::JoinHandle<Option<Vec<u8>>>;

/// A TLS server (optionally requiring client certs from `client_roots`) that echoes 4 bytes
/// and reports the ALPN it negotiated.
async fn server(pki: &Pki, client_roots: Option<&str>) -> (std::net::SocketAddr, Alpn) {
    let provider = mesh_tls::verify::provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_roots {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
                .unwrap();
            builder.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap(),
            )
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(
            pki.chain.clone(),
            PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.ok()?;
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.ok()?;
        tls.write_all(&buf).await.ok()?;
        alpn
    });
    (addr, task)
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path: PathBuf = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn simple(ca: Option<String>) -> ClientTlsSettings {
    ClientTlsSettings {
        mode: ClientTlsMode::Simple,
        ca_certificates: ca,
        ..Default::default()
    }
}

async fn ping(
    tls: &OriginationTls,
    addr: std::net::SocketAddr,
    host: &str,
    http2: bool,
) -> Result<(), TlsError> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut stream = tls.connect(tcp, host, http2).await?;
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    Ok(())
}

#[tokio::test]
async fn simple_verifies_the_host_name_against_ca_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(&["api.example.com"]);
    let tls =
        OriginationTls::from_settings(&simple(Some(write(dir.path(), "ca.pem", &pki.root_pem))))
            .unwrap();

    for http2 in [true, false] {
        let (addr, task) = server(&pki, None).await;
        ping(&tls, addr, "api.example.com", http2).await.unwrap();
        let alpn = task.await.unwrap().unwrap();
        assert_eq!(
            alpn,
            if http2 {
                b"h2".to_vec()
            } else {
                b"http/1.1".to_vec()
            }
        );
    }

    // The certificate does not name the host dialled.
    let (addr, _task) = server(&pki, None).await;
    let err = ping(&tls, addr, "other.example.com", false)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("not valid for the server name"),
        "{err}"
    );
}

#[tokio::test]
async fn sni_setting_overrides_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(&["api.example.com"]);
    let mut settings = simple(Some(write(dir.path(), "ca.pem", &pki.root_pem)));
    settings.sni = Some("api.example.com".to_string());
    let tls = OriginationTls::from_settings(&settings).unwrap();
    let (addr, _task) = server(&pki, None).await;
    ping(&tls, addr, "anything.internal", false).await.unwrap();
}

#[tokio::test]
async fn subject_alt_names_accept_listed_names_whatever_the_sni() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(&["api.example.com"]);
    let ca = write(dir.path(), "ca.pem", &pki.root_pem);
    let mut settings = simple(Some(ca));
    settings.subject_alt_names = vec!["api.example.com".to_string()];
    let tls = OriginationTls::from_settings(&settings).unwrap();
    let (addr, _task) = server(&pki, None).await;
    ping(&tls, addr, "10-0-0-1.internal", false).await.unwrap();

    settings.subject_alt_names = vec![
        "billing.example.com".to_string(),
        "spiffe://example.com/billing".to_string(),
    ];
    let tls = OriginationTls::from_settings(&settings).unwrap();
    let (addr, _task) = server(&pki, None).await;
    let err = ping(&tls, addr, "api.example.com", false)
        .await
        .unwrap_err();
    match &err {
        TlsError::IdentityMismatch {
            expected,
            presented,
        } => {
            assert_eq!(expected.len(), 2);
            assert_eq!(presented, &["api.example.com".to_string()]);
        }
        other => panic!("expected IdentityMismatch, got {other:?}"),
    }
}

#[tokio::test]
async fn an_unknown_ca_fails_unless_insecure_skip_verify() {
    let dir = tempfile::tempdir().unwrap();
    let ours = pki(&["api.example.com"]);
    let theirs = pki(&["api.example.com"]);
    let tls =
        OriginationTls::from_settings(&simple(Some(write(dir.path(), "ca.pem", &ours.root_pem))))
            .unwrap();
    let (addr, _task) = server(&theirs, None).await;
    let err = ping(&tls, addr, "api.example.com", false)
        .await
        .unwrap_err();
    assert!(matches!(err, TlsError::Handshake { .. }), "{err:?}");

    let insecure = OriginationTls::from_settings(&ClientTlsSettings {
        mode: ClientTlsMode::Simple,
        insecure_skip_verify: Some(true),
        ..Default::default()
    })
    .unwrap();
    let (addr, _task) = server(&theirs, None).await;
    ping(&insecure, addr, "api.example.com", false)
        .await
        .unwrap();
}

#[tokio::test]
async fn mutual_presents_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let server_pki = pki(&["api.example.com"]);
    // Any certificate will do as a client certificate; take one from the mesh CA.
    let mesh = CertificateAuthority::generate("cluster.local").unwrap();
    let client = mesh
        .issue(
            &mesh_core::Identity::parse("spiffe://cluster.local/ns/default/sa/egress").unwrap(),
            DEFAULT_TTL,
        )
        .unwrap();
    let settings = ClientTlsSettings {
        mode: ClientTlsMode::Mutual,
        ca_certificates: Some(write(dir.path(), "ca.pem", &server_pki.root_pem)),
        client_certificate: Some(write(dir.path(), "client.pem", &client.cert_pem)),
        private_key: Some(write(dir.path(), "client-key.pem", &client.key_pem)),
        ..Default::default()
    };
    let tls = OriginationTls::from_settings(&settings).unwrap();
    let (addr, _task) = server(&server_pki, Some(&mesh.root_pem())).await;
    ping(&tls, addr, "api.example.com", false).await.unwrap();

    // Without a client certificate the same server refuses (SIMPLE to a server wanting mTLS).
    let simple_tls =
        OriginationTls::from_settings(&simple(settings.ca_certificates.clone())).unwrap();
    let (addr, task) = server(&server_pki, Some(&mesh.root_pem())).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    if let Ok(mut stream) = simple_tls.connect(tcp, "api.example.com", false).await {
        let _ = stream.write_all(b"ping").await;
        let mut buf = [0u8; 4];
        assert!(stream.read_exact(&mut buf).await.is_err());
    }
    assert_eq!(task.await.unwrap(), None);
}

#[test]
fn settings_errors_are_clear() {
    let err = OriginationTls::from_settings(&simple(None)).unwrap_err();
    assert!(
        err.to_string().contains("caCertificates is required"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let pki = pki(&["api.example.com"]);
    let ca = write(dir.path(), "ca.pem", &pki.root_pem);
    let err = OriginationTls::from_settings(&ClientTlsSettings {
        mode: ClientTlsMode::Mutual,
        ca_certificates: Some(ca.clone()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("MUTUAL requires clientCertificate and privateKey"),
        "{err}"
    );

    let err =
        OriginationTls::from_settings(&simple(Some("/nonexistent/ca.pem".into()))).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");

    let mut settings = simple(Some(ca));
    settings.subject_alt_names = vec!["not a name".to_string()];
    let err = OriginationTls::from_settings(&settings).unwrap_err();
    assert!(err.to_string().contains("not a name"), "{err}");

    let err = OriginationTls::from_settings(&ClientTlsSettings {
        mode: ClientTlsMode::IstioMutual,
        ..Default::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("ISTIO_MUTUAL"), "{err}");
}
