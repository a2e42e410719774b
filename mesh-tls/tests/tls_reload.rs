//! Certificate rotation: loading from files, `reload`, `watch`, and keeping the last good set.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_core::Identity;
use mesh_core::config::bootstrap::IdentityFiles;
use mesh_tls::acceptor::MtlsAcceptor;
use mesh_tls::ca::{CertificateAuthority, DEFAULT_TTL, IssuedCertificate};
use mesh_tls::connector::MtlsConnector;
use mesh_tls::credentials::{Credentials, TlsError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/reviews";
const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/productpage";

fn id(s: &str) -> Identity {
    Identity::parse(s).unwrap()
}

fn files(dir: &Path) -> IdentityFiles {
    IdentityFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        trust_bundle: dir.join("root.pem"),
    }
}

fn issue(ca: &CertificateAuthority, spiffe: &str) -> IssuedCertificate {
    ca.issue(&id(spiffe), DEFAULT_TTL).unwrap()
}

/// An mTLS echo server: every accepted connection echoes until closed.
async fn echo_server(acceptor: MtlsAcceptor) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(accepted) = acceptor.accept(tcp).await else {
                    return;
                };
                let (mut r, mut w) = tokio::io::split(accepted.stream);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// The serial of the certificate the server presented on this connection.
fn server_serial(stream: &tokio_rustls::client::TlsStream<TcpStream>) -> String {
    let leaf = &stream.get_ref().1.peer_certificates().unwrap()[0];
    let (_, x509) = x509_parser::parse_x509_certificate(leaf).unwrap();
    x509.raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn dial(
    addr: std::net::SocketAddr,
    client: &Arc<Credentials>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    MtlsConnector::new(client.clone())
        .connect(tcp, &[id(REVIEWS)], false)
        .await
        .unwrap()
        .stream
}

async fn echo(stream: &mut tokio_rustls::client::TlsStream<TcpStream>, msg: &[u8]) {
    stream.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, msg);
}

#[tokio::test]
async fn load_reads_identity_serial_and_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let svid = issue(&ca, REVIEWS);
    svid.save(dir.path()).unwrap();
    let creds = Credentials::load(&files(dir.path())).unwrap();
    assert_eq!(creds.identity(), id(REVIEWS));
    assert_eq!(creds.serial_hex(), svid.serial_hex);
    assert_eq!(creds.not_after(), svid.not_after);
    assert!(!creds.expiring_soon());
    // Nothing changed: reload reports so.
    assert!(!creds.reload().unwrap());
}

#[tokio::test]
async fn a_short_lived_certificate_is_expiring_soon() {
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let svid = ca.issue(&id(REVIEWS), Duration::from_secs(1800)).unwrap();
    let creds = Credentials::from_pem(&svid.cert_pem, &svid.key_pem, &svid.root_pem).unwrap();
    assert!(creds.expiring_soon(), "30 minutes left is under an hour");
}

#[tokio::test]
async fn load_rejects_invalid_sets_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let other = CertificateAuthority::generate("example.org").unwrap();
    let svid = issue(&ca, REVIEWS);
    svid.save(dir.path()).unwrap();
    let f = files(dir.path());

    // Key of another certificate.
    let stranger = issue(&ca, PRODUCTPAGE);
    std::fs::write(&f.key, &stranger.key_pem).unwrap();
    let err = Credentials::load(&f).unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("key.pem"), "{err}");
    std::fs::write(&f.key, &svid.key_pem).unwrap();

    // Trust bundle of another CA.
    std::fs::write(&f.trust_bundle, other.root_pem()).unwrap();
    let err = Credentials::load(&f).unwrap_err();
    assert!(matches!(err, TlsError::Untrusted { .. }), "{err:?}");
    assert!(err.to_string().contains("root.pem"), "{err}");
    std::fs::write(&f.trust_bundle, ca.root_pem()).unwrap();

    // Not PEM at all, and a missing file.
    std::fs::write(&f.key, "garbage").unwrap();
    let err = Credentials::load(&f).unwrap_err();
    assert!(err.to_string().contains("key.pem"), "{err}");
    std::fs::remove_file(&f.key).unwrap();
    let err = Credentials::load(&f).unwrap_err();
    assert!(matches!(err, TlsError::Read { .. }), "{err:?}");

    // A leaf without a SPIFFE ID (a plain DNS certificate from rcgen).
    let plain = rcgen::generate_simple_self_signed(vec!["reviews.example".to_string()]).unwrap();
    let err = Credentials::from_pem(
        &plain.cert.pem(),
        &plain.signing_key.serialize_pem(),
        &plain.cert.pem(),
    )
    .unwrap_err();
    assert!(matches!(err, TlsError::NoSpiffeId { .. }), "{err:?}");
}

#[tokio::test]
async fn reload_serves_the_new_cert_to_new_handshakes_and_keeps_old_connections() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let first = issue(&ca, REVIEWS);
    first.save(dir.path()).unwrap();
    let server = Credentials::load(&files(dir.path())).unwrap();
    let client = {
        let svid = issue(&ca, PRODUCTPAGE);
        Credentials::from_pem(&svid.cert_pem, &svid.key_pem, &svid.root_pem).unwrap()
    };
    let addr = echo_server(MtlsAcceptor::new(server.clone())).await;

    let mut old = dial(addr, &client).await;
    assert_eq!(server_serial(&old), first.serial_hex);
    echo(&mut old, b"before").await;

    let second = issue(&ca, REVIEWS);
    second.save(dir.path()).unwrap();
    assert!(server.reload().unwrap(), "new files are picked up");
    assert_eq!(server.serial_hex(), second.serial_hex);

    let mut new = dial(addr, &client).await;
    assert_eq!(server_serial(&new), second.serial_hex);
    echo(&mut new, b"new").await;
    // The connection from before the swap still works.
    echo(&mut old, b"after the swap").await;
}

#[tokio::test]
async fn an_invalid_new_set_is_rejected_and_the_old_cert_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let first = issue(&ca, REVIEWS);
    first.save(dir.path()).unwrap();
    let f = files(dir.path());
    let server = Credentials::load(&f).unwrap();
    let client = {
        let svid = issue(&ca, PRODUCTPAGE);
        Credentials::from_pem(&svid.cert_pem, &svid.key_pem, &svid.root_pem).unwrap()
    };
    let addr = echo_server(MtlsAcceptor::new(server.clone())).await;

    // A corrupt key file.
    std::fs::write(
        &f.key,
        "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let err = server.reload().unwrap_err();
    assert!(err.to_string().contains("key.pem"), "{err}");
    assert_eq!(server.serial_hex(), first.serial_hex);
    let mut conn = dial(addr, &client).await;
    assert_eq!(server_serial(&conn), first.serial_hex);
    echo(&mut conn, b"still fine").await;

    // A rotation caught half-way: the new cert is written, the key is still the old one.
    std::fs::write(&f.key, &first.key_pem).unwrap();
    let second = issue(&ca, REVIEWS);
    std::fs::write(&f.cert, &second.cert_pem).unwrap();
    let err = server.reload().unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
    let conn = dial(addr, &client).await;
    assert_eq!(server_serial(&conn), first.serial_hex);

    // The key arrives: now the pair is valid and swapped in.
    std::fs::write(&f.key, &second.key_pem).unwrap();
    assert!(server.reload().unwrap());
    let conn = dial(addr, &client).await;
    assert_eq!(server_serial(&conn), second.serial_hex);
}

#[tokio::test]
async fn a_new_trust_bundle_applies_to_new_handshakes() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = CertificateAuthority::generate("cluster.local").unwrap();
    let new_ca = CertificateAuthority::generate("cluster.local").unwrap();
    let svid = issue(&old_ca, REVIEWS);
    svid.save(dir.path()).unwrap();
    let f = files(dir.path());
    let server = Credentials::load(&f).unwrap();
    let addr = echo_server(MtlsAcceptor::new(server.clone())).await;
    // A client from the new CA that trusts both roots.
    let client = {
        let c = issue(&new_ca, PRODUCTPAGE);
        let bundle = format!("{}{}", old_ca.root_pem(), new_ca.root_pem());
        Credentials::from_pem(&c.cert_pem, &c.key_pem, &bundle).unwrap()
    };
    // Before: the server trusts only the old root, so the client's cert is refused.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut refused = MtlsConnector::new(client.clone())
        .connect(tcp, &[], false)
        .await
        .unwrap()
        .stream;
    let _ = refused.write_all(b"x").await;
    let mut buf = [0u8; 1];
    assert!(refused.read_exact(&mut buf).await.is_err());

    // The bundle now holds both roots: the same client gets through.
    std::fs::write(
        &f.trust_bundle,
        format!("{}{}", old_ca.root_pem(), new_ca.root_pem()),
    )
    .unwrap();
    assert!(server.reload().unwrap());
    let mut conn = dial(addr, &client).await;
    echo(&mut conn, b"trusted").await;
}

#[tokio::test]
async fn watch_picks_up_a_rename_replaced_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let first = issue(&ca, REVIEWS);
    first.save(dir.path()).unwrap();
    let server = Credentials::load(&files(dir.path())).unwrap();
    let watcher = server.watch(Duration::from_millis(20));

    // `save` writes each file aside and renames it over the old one.
    let second = issue(&ca, REVIEWS);
    second.save(dir.path()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.serial_hex() != second.serial_hex {
        assert!(
            Instant::now() < deadline,
            "watch did not pick up the new cert"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A bad rotation is not taken; a good one after it is.
    std::fs::write(dir.path().join("key.pem"), "garbage").unwrap();
    let third = issue(&ca, REVIEWS);
    // Give the watcher a few polls on the bad key, then fix it.
    let settle = Instant::now() + Duration::from_millis(100);
    while Instant::now() < settle {
        assert_eq!(server.serial_hex(), second.serial_hex);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    third.save(dir.path()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.serial_hex() != third.serial_hex {
        assert!(
            Instant::now() < deadline,
            "watch did not pick up the fixed set"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    watcher.abort();
}

#[cfg(unix)]
#[tokio::test]
async fn watch_follows_a_symlink_swap() {
    // Kubernetes secret volumes: the files are symlinks into a `..data` directory that is
    // swapped atomically.
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let first = issue(&ca, REVIEWS);
    first.save(&dir.path().join("v1")).unwrap();
    std::os::unix::fs::symlink("v1", dir.path().join("..data")).unwrap();
    for name in ["cert.pem", "key.pem", "root.pem"] {
        std::os::unix::fs::symlink(format!("..data/{name}"), dir.path().join(name)).unwrap();
    }
    let server = Credentials::load(&files(dir.path())).unwrap();
    assert_eq!(server.serial_hex(), first.serial_hex);
    let _watcher = server.watch(Duration::from_millis(20));

    let second = issue(&ca, REVIEWS);
    second.save(&dir.path().join("v2")).unwrap();
    std::os::unix::fs::symlink("v2", dir.path().join("..data_tmp")).unwrap();
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.serial_hex() != second.serial_hex {
        assert!(
            Instant::now() < deadline,
            "watch did not follow the symlink swap"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
