//! The client side of TLS: mesh mTLS to another sidecar ([`MtlsConnector`]), and TLS
//! origination to services outside the mesh ([`OriginationTls`], DestinationRule
//! `tls.mode: SIMPLE | MUTUAL`).
//!
//! A mesh client verifies the server's chain against the trust bundle and then its SPIFFE ID
//! against the identities the destination may run as (a ServiceEntry's `subjectAltNames`, an
//! endpoint's service account); with none given, a chain to the bundle is enough, as in Istio.
//! SNI carries no meaning between sidecars here, so one fixed name is sent unless the caller
//! names one (Istio sends `outbound_.PORT_.SUBSET_.HOST`).
//!
//! ```no_run
//! use mesh_core::Identity;
//! use mesh_core::config::bootstrap::IdentityFiles;
//! use mesh_tls::connector::MtlsConnector;
//! use mesh_tls::credentials::Credentials;
//! use tokio::io::AsyncWriteExt;
//!
//! # async fn call() -> Result<(), Box<dyn std::error::Error>> {
//! let credentials = Credentials::load(&IdentityFiles {
//!     cert: "certs/cert.pem".into(),
//!     key: "certs/key.pem".into(),
//!     trust_bundle: "certs/root.pem".into(),
//! })?;
//! let connector = MtlsConnector::new(credentials);
//! let reviews = Identity::parse("spiffe://cluster.local/ns/default/sa/reviews")?;
//! let tcp = tokio::net::TcpStream::connect("10.0.0.7:15006").await?;
//! let mut connected = connector.connect(tcp, &[reviews], false).await?;
//! connected.stream.write_all(b"GET / HTTP/1.1\r\nhost: reviews\r\n\r\n").await?;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::Identity;
use mesh_core::config::networking::{ClientTlsMode, ClientTlsSettings};
use rustls::ClientConfig;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::version::{TLS12, TLS13};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::acceptor::{DEFAULT_HANDSHAKE_TIMEOUT, handshake_error, peer_of};
use crate::credentials::{ALPN_H2, ALPN_HTTP11, Credentials, TlsError, trust_bundle_file};
use crate::verify::{
    self, AcceptedName, InsecureServerVerifier, NameMismatch, SanServerVerifier, provider,
};

/// The SNI a mesh client sends unless told otherwise.
pub const DEFAULT_MESH_SNI: &str = "outbound_.mesh.svc";

/// Dials mesh mTLS with the current credentials.
#[derive(Clone, Debug)]
pub struct MtlsConnector {
    credentials: Arc<Credentials>,
    server_name: ServerName<'static>,
    handshake_timeout: Duration,
}

/// A mesh connection whose handshake and identity check succeeded.
pub struct Connected<IO> {
    pub stream: tokio_rustls::client::TlsStream<IO>,
    /// The server's SPIFFE ID.
    pub peer: Identity,
}

impl<IO> fmt::Debug for Connected<IO> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connected")
            .field("peer", &self.peer.as_str())
            .finish_non_exhaustive()
    }
}

impl MtlsConnector {
    pub fn new(credentials: Arc<Credentials>) -> MtlsConnector {
        MtlsConnector {
            credentials,
            // A valid literal; the fallback (no SNI at all) is never taken.
            server_name: ServerName::try_from(DEFAULT_MESH_SNI)
                .unwrap_or(ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    /// Sends `name` as SNI (e.g. Istio's `outbound_.9080_._.reviews.default.svc.cluster.local`).
    pub fn with_server_name(mut self, name: &str) -> Result<MtlsConnector, TlsError> {
        self.server_name = server_name(name)?;
        Ok(self)
    }

    pub fn with_handshake_timeout(mut self, timeout: Duration) -> MtlsConnector {
        self.handshake_timeout = timeout;
        self
    }

    pub fn credentials(&self) -> &Arc<Credentials> {
        &self.credentials
    }

    /// Runs the client handshake on `io`, offering ALPN `h2` if `http2` else `http/1.1`, and
    /// checks the server's SPIFFE ID is one of `expected` (any, when `expected` is empty).
    pub async fn connect<IO>(
        &self,
        io: IO,
        expected: &[Identity],
        http2: bool,
    ) -> Result<Connected<IO>, TlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let connector =
            tokio_rustls::TlsConnector::from(self.credentials.client_config_with_alpn(http2));
        let stream = match tokio::time::timeout(
            self.handshake_timeout,
            connector.connect(self.server_name.clone(), io),
        )
        .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(handshake_error("outbound", &e)),
            Err(_) => {
                return Err(TlsError::HandshakeTimeout {
                    side: "outbound",
                    timeout: self.handshake_timeout,
                });
            }
        };
        let certs = stream.get_ref().1.peer_certificates();
        let peer = peer_of(certs)?;
        if !expected.is_empty() && !expected.contains(&peer) {
            return Err(TlsError::IdentityMismatch {
                expected: expected.iter().map(|id| id.to_string()).collect(),
                presented: certs
                    .and_then(|c| c.first())
                    .map(verify::peer_identities)
                    .unwrap_or_default(),
            });
        }
        Ok(Connected { stream, peer })
    }
}

fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string()).map_err(|_| TlsError::InvalidServerName {
        name: name.to_string(),
    })
}

/// TLS origination for a DestinationRule's `tls` with mode `SIMPLE` or `MUTUAL`.
///
/// - `caCertificates` is required unless `insecureSkipVerify: true`: the mesh ships no
///   system roots;
/// - `MUTUAL` requires `clientCertificate` and `privateKey`;
/// - `subjectAltNames`: DNS names or URIs, any of which the server certificate must carry;
///   empty: the SNI name is verified as a DNS name, as a browser would;
/// - `sni`: sent instead of the host name given to [`connect`](Self::connect).
///
/// `credentialName` (a Kubernetes secret) and `caCrl` are not supported and fail the build,
/// rather than be silently ignored.
#[derive(Clone)]
pub struct OriginationTls {
    h2: Arc<ClientConfig>,
    http11: Arc<ClientConfig>,
    sni: Option<ServerName<'static>>,
    handshake_timeout: Duration,
}

impl fmt::Debug for OriginationTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OriginationTls")
            .field("sni", &self.sni)
            .finish_non_exhaustive()
    }
}

impl OriginationTls {
    pub fn from_settings(settings: &ClientTlsSettings) -> Result<OriginationTls, TlsError> {
        let fail = |m: String| TlsError::Origination(m);
        let mutual = match settings.mode {
            ClientTlsMode::Simple => false,
            ClientTlsMode::Mutual => true,
            ClientTlsMode::Disable => {
                return Err(fail("mode DISABLE originates no TLS".to_string()));
            }
            ClientTlsMode::IstioMutual => {
                return Err(fail(
                    "mode ISTIO_MUTUAL uses the workload identity (MtlsConnector), not origination settings"
                        .to_string(),
                ));
            }
        };
        if settings.credential_name.is_some() {
            return Err(fail(
                "credentialName is not supported (no secret store); give clientCertificate, privateKey and caCertificates as files".to_string(),
            ));
        }
        if settings.ca_crl.is_some() {
            return Err(fail("caCrl is not supported".to_string()));
        }
        let insecure = settings.insecure_skip_verify.unwrap_or(false);
        let verifier: Arc<dyn ServerCertVerifier> = if insecure {
            Arc::new(InsecureServerVerifier::new())
        } else {
            let Some(ca) = &settings.ca_certificates else {
                return Err(fail(
                    "caCertificates is required to verify the server (no system roots are shipped); or set insecureSkipVerify: true".to_string(),
                ));
            };
            let roots = trust_bundle_file(Path::new(ca))?;
            if settings.subject_alt_names.is_empty() {
                WebPkiServerVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| fail(format!("caCertificates {ca}: {e}")))?
            } else {
                let accepted = settings
                    .subject_alt_names
                    .iter()
                    .map(|name| {
                        AcceptedName::parse(name).ok_or_else(|| {
                            fail(format!(
                                "subjectAltNames entry {name:?} is neither a DNS name nor a URI"
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Arc::new(SanServerVerifier::new(roots, accepted))
            }
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&TLS13, &TLS12])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = if mutual {
            let (Some(cert), Some(key)) = (&settings.client_certificate, &settings.private_key)
            else {
                return Err(fail(
                    "mode MUTUAL requires clientCertificate and privateKey".to_string(),
                ));
            };
            let chain = read_chain(Path::new(cert))?;
            let key_der = read_key(Path::new(key))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                        cert: cert.clone(),
                        key: key.clone(),
                    },
                    e => TlsError::BadKey {
                        what: key.clone(),
                        reason: e.to_string(),
                    },
                })?
        } else {
            builder.with_no_client_auth()
        };
        let sni = settings.sni.as_deref().map(server_name).transpose()?;
        let mut h2 = config.clone();
        h2.alpn_protocols = vec![ALPN_H2.to_vec()];
        let mut http11 = config;
        http11.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
        Ok(OriginationTls {
            h2: Arc::new(h2),
            http11: Arc::new(http11),
            sni,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        })
    }

    pub fn with_handshake_timeout(mut self, timeout: Duration) -> OriginationTls {
        self.handshake_timeout = timeout;
        self
    }

    /// Runs the client handshake, sending the configured `sni` or else `host_for_sni`.
    pub async fn connect<IO>(
        &self,
        io: IO,
        host_for_sni: &str,
        http2: bool,
    ) -> Result<tokio_rustls::client::TlsStream<IO>, TlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let name = match &self.sni {
            Some(name) => name.clone(),
            None => server_name(host_for_sni)?,
        };
        let config = if http2 { &self.h2 } else { &self.http11 };
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        match tokio::time::timeout(self.handshake_timeout, connector.connect(name, io)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => {
                let carried = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .and_then(verify::carried::<NameMismatch>);
                match carried {
                    Some(m) => Err(TlsError::IdentityMismatch {
                        expected: m.expected.clone(),
                        presented: m.presented.clone(),
                    }),
                    None => Err(handshake_error("outbound", &e)),
                }
            }
            Err(_) => Err(TlsError::HandshakeTimeout {
                side: "outbound",
                timeout: self.handshake_timeout,
            }),
        }
    }
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let what = path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let chain: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            what: what.clone(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { what });
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let what = path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey { what },
        e => TlsError::Pem {
            what,
            reason: e.to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acceptor::MtlsAcceptor;
    use crate::ca::{CertificateAuthority, DEFAULT_TTL};

    fn creds(ca: &CertificateAuthority, sa: &str) -> Arc<Credentials> {
        let id = Identity::for_service_account("cluster.local", "default", sa).unwrap();
        let svid = ca.issue(&id, DEFAULT_TTL).unwrap();
        Credentials::from_pem(&svid.cert_pem, &svid.key_pem, &svid.root_pem).unwrap()
    }

    #[test]
    fn server_names_are_validated() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let connector = MtlsConnector::new(creds(&ca, "productpage"));
        assert!(matches!(
            connector.clone().with_server_name("not a name"),
            Err(TlsError::InvalidServerName { .. })
        ));
        connector
            .with_server_name("outbound_.9080_._.reviews.default.svc.cluster.local")
            .unwrap();
    }

    #[tokio::test]
    async fn mismatch_lists_every_expected_identity() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let (client, server) = tokio::io::duplex(16 * 1024);
        let acceptor = MtlsAcceptor::new(creds(&ca, "ratings"));
        let connector = MtlsConnector::new(creds(&ca, "productpage"));
        let expected = [
            Identity::for_service_account("cluster.local", "default", "reviews").unwrap(),
            Identity::for_service_account("cluster.local", "prod", "reviews").unwrap(),
        ];
        let (_, connected) = tokio::join!(
            acceptor.accept(server),
            connector.connect(client, &expected, false)
        );
        assert_eq!(
            connected.unwrap_err().to_string(),
            "server identity mismatch: expected spiffe://cluster.local/ns/default/sa/reviews, \
             spiffe://cluster.local/ns/prod/sa/reviews, presented \
             spiffe://cluster.local/ns/default/sa/ratings"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_server_times_out() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let (client, _server) = tokio::io::duplex(16 * 1024);
        let connector = MtlsConnector::new(creds(&ca, "productpage"))
            .with_handshake_timeout(Duration::from_secs(2));
        let err = connector.connect(client, &[], true).await.unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::HandshakeTimeout {
                    side: "outbound",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn disable_mode_is_not_origination() {
        let err = OriginationTls::from_settings(&ClientTlsSettings::default()).unwrap_err();
        assert!(err.to_string().contains("DISABLE"), "{err}");
        let err = OriginationTls::from_settings(&ClientTlsSettings {
            mode: ClientTlsMode::Simple,
            credential_name: Some("secret".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("credentialName"), "{err}");
    }
}
