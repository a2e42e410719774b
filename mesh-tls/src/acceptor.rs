//! The server side of mesh mTLS: the inbound listener wraps each accepted connection before
//! the HTTP server sees it.
//!
//! The handshake requires a client certificate that chains to the trust bundle and carries a
//! SPIFFE ID; the caller gets that ID (for authorization policies and
//! `x-forwarded-client-cert`) and whether ALPN chose HTTP/2. A handshake is bounded by a
//! timeout so a peer that connects and goes quiet cannot hold a task forever.
//!
//! ```no_run
//! use mesh_core::config::bootstrap::IdentityFiles;
//! use mesh_tls::acceptor::MtlsAcceptor;
//! use mesh_tls::credentials::Credentials;
//!
//! # async fn serve() -> Result<(), Box<dyn std::error::Error>> {
//! let credentials = Credentials::load(&IdentityFiles {
//!     cert: "certs/cert.pem".into(),
//!     key: "certs/key.pem".into(),
//!     trust_bundle: "certs/root.pem".into(),
//! })?;
//! let acceptor = MtlsAcceptor::new(credentials);
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:15006").await?;
//! loop {
//!     let (tcp, _) = listener.accept().await?;
//!     let acceptor = acceptor.clone();
//!     tokio::spawn(async move {
//!         match acceptor.accept(tcp).await {
//!             Ok(accepted) => println!("{} (h2: {})", accepted.peer, accepted.alpn_h2),
//!             Err(e) => eprintln!("{e}"),
//!         }
//!     });
//! }
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::Identity;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::credentials::{ALPN_H2, Credentials, TlsError};
use crate::verify;

/// How long a handshake may take unless [`MtlsAcceptor::with_handshake_timeout`] says otherwise.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts mesh mTLS connections with the current credentials.
#[derive(Clone, Debug)]
pub struct MtlsAcceptor {
    credentials: Arc<Credentials>,
    handshake_timeout: Duration,
}

/// A connection whose handshake succeeded.
pub struct Accepted<IO> {
    pub stream: tokio_rustls::server::TlsStream<IO>,
    /// The client's SPIFFE ID.
    pub peer: Identity,
    /// ALPN negotiated `h2`.
    pub alpn_h2: bool,
}

impl<IO> fmt::Debug for Accepted<IO> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Accepted")
            .field("peer", &self.peer.as_str())
            .field("alpn_h2", &self.alpn_h2)
            .finish_non_exhaustive()
    }
}

impl MtlsAcceptor {
    pub fn new(credentials: Arc<Credentials>) -> MtlsAcceptor {
        MtlsAcceptor {
            credentials,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    pub fn with_handshake_timeout(mut self, timeout: Duration) -> MtlsAcceptor {
        self.handshake_timeout = timeout;
        self
    }

    pub fn credentials(&self) -> &Arc<Credentials> {
        &self.credentials
    }

    /// Runs the server handshake on `io` and returns the stream with the client's identity.
    pub async fn accept<IO>(&self, io: IO) -> Result<Accepted<IO>, TlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.credentials.server_config());
        let stream = match tokio::time::timeout(self.handshake_timeout, acceptor.accept(io)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(handshake_error("inbound", &e)),
            Err(_) => {
                return Err(TlsError::HandshakeTimeout {
                    side: "inbound",
                    timeout: self.handshake_timeout,
                });
            }
        };
        let conn = stream.get_ref().1;
        let peer = peer_of(conn.peer_certificates())?;
        let alpn_h2 = conn.alpn_protocol() == Some(ALPN_H2);
        Ok(Accepted {
            stream,
            peer,
            alpn_h2,
        })
    }
}

/// The SPIFFE ID of the leaf the peer presented.
pub(crate) fn peer_of(
    certs: Option<&[rustls::pki_types::CertificateDer<'static>]>,
) -> Result<Identity, TlsError> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or(TlsError::NoPeerCertificate)?;
    verify::peer_identity(leaf).ok_or_else(|| TlsError::PeerWithoutSpiffeId {
        presented: verify::subject_alt_names(leaf),
    })
}

/// A handshake failure as one sentence.
pub(crate) fn handshake_error(side: &'static str, e: &std::io::Error) -> TlsError {
    let reason = match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(err) => verify::describe(err),
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the peer closed the connection during the handshake".to_string()
        }
        None => e.to_string(),
    };
    TlsError::Handshake { side, reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{CertificateAuthority, DEFAULT_TTL};
    use crate::connector::MtlsConnector;

    fn creds(ca: &CertificateAuthority, sa: &str) -> Arc<Credentials> {
        let id = Identity::for_service_account("cluster.local", "default", sa).unwrap();
        let svid = ca.issue(&id, DEFAULT_TTL).unwrap();
        Credentials::from_pem(&svid.cert_pem, &svid.key_pem, &svid.root_pem).unwrap()
    }

    #[tokio::test]
    async fn accepts_over_any_stream() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let (client, server) = tokio::io::duplex(16 * 1024);
        let acceptor = MtlsAcceptor::new(creds(&ca, "reviews"));
        let connector = MtlsConnector::new(creds(&ca, "productpage"));
        let (accepted, connected) = tokio::join!(
            acceptor.accept(server),
            connector.connect(client, &[], true)
        );
        let accepted = accepted.unwrap();
        assert_eq!(accepted.peer.service_account(), Some("productpage"));
        assert!(accepted.alpn_h2);
        assert_eq!(connected.unwrap().peer.service_account(), Some("reviews"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_times_out() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let (_client, server) = tokio::io::duplex(1024);
        let acceptor =
            MtlsAcceptor::new(creds(&ca, "reviews")).with_handshake_timeout(Duration::from_secs(3));
        let err = acceptor.accept(server).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "inbound TLS handshake did not finish within 3s"
        );
    }

    #[test]
    fn peer_without_certificates_is_named() {
        assert!(matches!(peer_of(None), Err(TlsError::NoPeerCertificate)));
        assert!(matches!(
            peer_of(Some(&[])),
            Err(TlsError::NoPeerCertificate)
        ));
    }

    #[test]
    fn handshake_errors_read_as_sentences() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::NoCertificatesPresented,
        );
        assert_eq!(
            handshake_error("inbound", &io).to_string(),
            "inbound TLS handshake failed: the peer presented no certificate (mesh mTLS requires one)"
        );
        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert!(
            handshake_error("outbound", &eof)
                .to_string()
                .contains("closed the connection during the handshake")
        );
    }
}
