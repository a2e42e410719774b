//! What a mesh mTLS connection costs to set up: full TLS 1.3 handshakes, both sides
//! authenticated with ECDSA P-256 SVIDs from `mesh_tls::ca`, over an in-memory
//! `tokio::io::duplex` pipe so the figure is CPU only (no sockets, no scheduler hops between
//! threads).
//!
//! - `mtls_handshake/h2`: `MtlsAcceptor::accept` and `MtlsConnector::connect` (expected
//!   server identity checked, ALPN `h2`), both on one current-thread runtime: the pair's
//!   combined cost, so one core does about this many handshakes a second with both ends on it.
//! - `mtls_handshake/http11`: the same offering `http/1.1`.
//!
//! Session resumption is off in the mesh configs, so every iteration is a full handshake: an
//! ECDHE key exchange (the group negotiated is printed once at start), two ECDSA P-256
//! signatures and two chain verifications.
//!
//! `cargo bench -p benches --bench tls -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mesh_core::Identity;
use mesh_tls::acceptor::MtlsAcceptor;
use mesh_tls::ca::{CertificateAuthority, DEFAULT_TTL};
use mesh_tls::connector::MtlsConnector;
use mesh_tls::credentials::Credentials;

fn credentials(ca: &CertificateAuthority, id: &Identity) -> Arc<Credentials> {
    let svid = ca.issue(id, DEFAULT_TTL).expect("issue a certificate");
    Credentials::from_pem(&svid.cert_pem, &svid.key_pem, &svid.root_pem).expect("credentials")
}

fn handshakes(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    let ca = CertificateAuthority::generate("cluster.local").expect("a CA");
    let reviews = Identity::parse("spiffe://cluster.local/ns/default/sa/reviews").expect("id");
    let productpage =
        Identity::parse("spiffe://cluster.local/ns/default/sa/productpage").expect("id");
    let acceptor = MtlsAcceptor::new(credentials(&ca, &reviews));
    let connector = MtlsConnector::new(credentials(&ca, &productpage));
    let expected = [reviews];

    // One handshake up front: check it is TLS 1.3 and say which key exchange it used.
    rt.block_on(async {
        let (client_io, server_io) = tokio::io::duplex(16 * 1024);
        let (accepted, connected) = tokio::join!(
            acceptor.accept(server_io),
            connector.connect(client_io, &expected, true)
        );
        let conn = accepted.expect("server handshake").stream;
        drop(connected.expect("client handshake"));
        let conn = conn.get_ref().1;
        // (Compared by name: this crate does not depend on rustls itself.)
        let version = format!("{:?}", conn.protocol_version());
        assert_eq!(version, "Some(TLSv1_3)");
        eprintln!(
            "mtls_handshake: TLS 1.3, key exchange {:?}",
            conn.negotiated_key_exchange_group().map(|g| g.name())
        );
    });

    let mut group = c.benchmark_group("mtls_handshake");
    group.throughput(Throughput::Elements(1));
    for (name, http2) in [("h2", true), ("http11", false)] {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                let (client_io, server_io) = tokio::io::duplex(16 * 1024);
                let acceptor = &acceptor;
                let connector = &connector;
                let expected = &expected;
                async move {
                    let (accepted, connected) = tokio::join!(
                        acceptor.accept(server_io),
                        connector.connect(client_io, expected, http2)
                    );
                    let accepted = accepted.expect("server handshake");
                    let connected = connected.expect("client handshake");
                    assert_eq!(accepted.alpn_h2, http2);
                    black_box((accepted.peer, connected.peer))
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, handshakes);
criterion_main!(benches);
