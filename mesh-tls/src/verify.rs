//! Certificate verification for the mesh, and reading SPIFFE IDs off certificates.
//!
//! Why custom verifiers: rustls' standard `WebPkiServerVerifier` checks the server's chain
//! *and* that the certificate names the DNS name dialled. SPIFFE SVIDs carry only a URI SAN,
//! so a mesh client verifies the chain against the trust bundle (webpki, through rustls'
//! [`verify_server_cert_signed_by_trust_anchor`]) and then checks the peer's SPIFFE ID
//! itself, as Envoy does with Istio's `match_subject_alt_names`. The server side needs nothing
//! custom: rustls' `WebPkiClientVerifier` never looks at names.
//!
//! webpki verifies chains but exposes no SAN list, so the names are read with `x509-parser`
//! from the already verified leaf.

use std::fmt;
use std::sync::{Arc, OnceLock};

use mesh_core::Identity;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use x509_parser::extensions::GeneralName;

/// The one crypto provider of the mesh: aws-lc-rs, passed explicitly to every config so the
/// library works whether or not the process installed a default.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// Every URI SAN of `cert` (empty if it has none or does not parse).
pub fn peer_identities(cert: &CertificateDer<'_>) -> Vec<String> {
    general_names(cert, |name| match name {
        GeneralName::URI(uri) => Some(uri.to_string()),
        _ => None,
    })
}

/// The first URI SAN of `cert` that is a valid SPIFFE ID.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Option<Identity> {
    peer_identities(cert)
        .iter()
        .find_map(|uri| Identity::parse(uri).ok())
}

/// Every DNS and URI SAN of `cert`, for error messages.
pub fn subject_alt_names(cert: &CertificateDer<'_>) -> Vec<String> {
    general_names(cert, |name| match name {
        GeneralName::URI(uri) => Some(uri.to_string()),
        GeneralName::DNSName(dns) => Some(dns.to_string()),
        _ => None,
    })
}

fn general_names(
    cert: &CertificateDer<'_>,
    pick: impl Fn(&GeneralName<'_>) -> Option<String>,
) -> Vec<String> {
    let Ok((_, x509)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    match x509.subject_alternative_name() {
        Ok(Some(san)) => san.value.general_names.iter().filter_map(pick).collect(),
        _ => Vec::new(),
    }
}

/// Verifies `end_entity` (with `intermediates`) chains to `roots` at `now`, ignoring names.
pub fn verify_chain(
    roots: &RootCertStore,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<(), rustls::Error> {
    let parsed = ParsedCertificate::try_from(end_entity)?;
    verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        intermediates,
        now,
        provider().signature_verification_algorithms.all,
    )
}

/// The server side of mesh mTLS as a client sees it: the chain must lead to the trust bundle
/// and the leaf must carry a SPIFFE ID. Which SPIFFE ID is acceptable depends on the
/// destination and is checked by the connector once the handshake is done.
pub struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl MeshServerVerifier {
    pub fn new(roots: Arc<RootCertStore>) -> MeshServerVerifier {
        MeshServerVerifier {
            roots,
            algorithms: provider().signature_verification_algorithms,
        }
    }
}

impl fmt::Debug for MeshServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshServerVerifier")
            .field("roots", &self.roots.len())
            .finish()
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        if peer_identity(end_entity).is_none() {
            return Err(other_cert_error(NoSpiffeId {
                presented: subject_alt_names(end_entity),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// What an origination verifier accepts as the server's name, from a DestinationRule's
/// `subjectAltNames`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AcceptedName {
    /// A DNS name (wildcards in the certificate match, as webpki matches them).
    Dns(ServerName<'static>),
    /// A URI SAN, compared exactly (e.g. a SPIFFE ID).
    Uri(String),
}

impl AcceptedName {
    /// A `subjectAltNames` entry: a URI if it has a scheme, else a DNS name.
    pub fn parse(name: &str) -> Option<AcceptedName> {
        if name.contains("://") {
            return Some(AcceptedName::Uri(name.to_string()));
        }
        ServerName::try_from(name.to_string())
            .ok()
            .map(AcceptedName::Dns)
    }

    fn as_string(&self) -> String {
        match self {
            AcceptedName::Dns(name) => name.to_str().into_owned(),
            AcceptedName::Uri(uri) => uri.clone(),
        }
    }
}

/// A server verifier for TLS origination (DestinationRule `SIMPLE`/`MUTUAL`) with
/// `subjectAltNames`: the chain must lead to `caCertificates` and the certificate must carry
/// one of the names, whatever SNI was sent.
pub struct SanServerVerifier {
    roots: Arc<RootCertStore>,
    accepted: Vec<AcceptedName>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SanServerVerifier {
    pub fn new(roots: Arc<RootCertStore>, accepted: Vec<AcceptedName>) -> SanServerVerifier {
        SanServerVerifier {
            roots,
            accepted,
            algorithms: provider().signature_verification_algorithms,
        }
    }
}

impl fmt::Debug for SanServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SanServerVerifier")
            .field("roots", &self.roots.len())
            .field("accepted", &self.accepted)
            .finish()
    }
}

impl ServerCertVerifier for SanServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let uris = peer_identities(end_entity);
        let matched = self.accepted.iter().any(|name| match name {
            AcceptedName::Dns(dns) => rustls::client::verify_server_name(&parsed, dns).is_ok(),
            AcceptedName::Uri(uri) => uris.iter().any(|u| u == uri),
        });
        if matched {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(other_cert_error(NameMismatch {
                expected: self.accepted.iter().map(AcceptedName::as_string).collect(),
                presented: subject_alt_names(end_entity),
            }))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// DestinationRule `insecureSkipVerify: true`: any certificate is accepted (the handshake
/// signatures are still checked, so the peer holds the key of what it sent).
pub struct InsecureServerVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl InsecureServerVerifier {
    pub fn new() -> InsecureServerVerifier {
        InsecureServerVerifier {
            algorithms: provider().signature_verification_algorithms,
        }
    }
}

impl Default for InsecureServerVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for InsecureServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("InsecureServerVerifier")
    }
}

impl ServerCertVerifier for InsecureServerVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A server certificate that verified but carries no SPIFFE ID.
#[derive(Debug, thiserror::Error)]
#[error("the certificate has no SPIFFE ID (SANs: {})", list(presented))]
pub(crate) struct NoSpiffeId {
    pub(crate) presented: Vec<String>,
}

/// A server certificate that verified but names none of the accepted names.
#[derive(Debug, thiserror::Error)]
#[error("expected {}, presented {}", list(expected), list(presented))]
pub(crate) struct NameMismatch {
    pub(crate) expected: Vec<String>,
    pub(crate) presented: Vec<String>,
}

fn other_cert_error(e: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Our own error carried through rustls inside a handshake failure, if it is one.
pub(crate) fn carried<E: std::error::Error + 'static>(err: &rustls::Error) -> Option<&E> {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<E>()
        }
        _ => None,
    }
}

/// `a, b, c`, or `nothing` for an empty list.
pub(crate) fn list(items: &[String]) -> String {
    if items.is_empty() {
        "nothing".to_string()
    } else {
        items.join(", ")
    }
}

/// One sentence on why a handshake failed, from the error rustls reported.
pub(crate) fn describe(err: &rustls::Error) -> String {
    use rustls::AlertDescription as A;
    match err {
        rustls::Error::NoCertificatesPresented => {
            "the peer presented no certificate (mesh mTLS requires one)".to_string()
        }
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => {
                "the peer's certificate is not issued by a CA in the trust bundle (unknown issuer)"
                    .to_string()
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the peer's certificate has expired".to_string()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the peer's certificate is not valid yet (check clocks)".to_string()
            }
            CertificateError::BadSignature => {
                "the peer's certificate does not verify against the trust bundle (bad signature: \
                 issued by another CA of the same name?)"
                    .to_string()
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("the peer's certificate is not valid for the server name ({cert:?})")
            }
            CertificateError::Other(OtherError(inner)) => {
                format!("the peer's certificate is not acceptable: {inner}")
            }
            other => format!("the peer's certificate is invalid ({other:?})"),
        },
        rustls::Error::AlertReceived(alert) => match alert {
            A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::CertificateRequired
            | A::UnsupportedCertificate
            | A::CertificateExpired => format!(
                "the peer rejected our certificate (alert {alert:?}): are both sides on the same trust bundle?"
            ),
            A::NoApplicationProtocol => {
                "the peer accepts none of the ALPN protocols offered (alert NoApplicationProtocol)"
                    .to_string()
            }
            other => format!("the peer aborted the handshake (alert {other:?})"),
        },
        rustls::Error::InvalidMessage(m) => {
            format!("the peer does not speak TLS (invalid message: {m:?})")
        }
        rustls::Error::NoApplicationProtocol => {
            "no ALPN protocol in common with the peer".to_string()
        }
        rustls::Error::PeerIncompatible(p) => format!("the peer is incompatible ({p:?})"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{CertificateAuthority, DEFAULT_TTL};
    use rustls::pki_types::pem::PemObject;

    fn leaf(ca: &CertificateAuthority, id: &str) -> Vec<CertificateDer<'static>> {
        let svid = ca
            .issue(&Identity::parse(id).unwrap(), DEFAULT_TTL)
            .unwrap();
        CertificateDer::pem_slice_iter(svid.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn roots(ca: &CertificateAuthority) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.root_pem().as_bytes()).unwrap())
            .unwrap();
        Arc::new(roots)
    }

    #[test]
    fn reads_uri_sans_and_the_spiffe_id() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let chain = leaf(&ca, "spiffe://cluster.local/ns/default/sa/reviews");
        assert_eq!(
            peer_identities(&chain[0]),
            ["spiffe://cluster.local/ns/default/sa/reviews"]
        );
        let id = peer_identity(&chain[0]).unwrap();
        assert_eq!(id.service_account(), Some("reviews"));
        // The root's URI SAN names the trust domain only.
        assert_eq!(peer_identities(&chain[1]), ["spiffe://cluster.local"]);
        assert!(peer_identities(&CertificateDer::from(vec![1, 2, 3])).is_empty());
    }

    #[test]
    fn chain_verifies_against_its_own_root_only() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let other = CertificateAuthority::generate("example.org").unwrap();
        let twin = CertificateAuthority::generate("cluster.local").unwrap();
        let chain = leaf(&ca, "spiffe://cluster.local/ns/default/sa/reviews");
        let now = UnixTime::now();
        verify_chain(&roots(&ca), &chain[0], &chain[1..], now).unwrap();
        let err = verify_chain(&roots(&other), &chain[0], &chain[1..], now).unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        );
        // Another root of the same name: found by name, rejected by signature.
        let err = verify_chain(&roots(&twin), &chain[0], &chain[1..], now).unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::BadSignature)
        );
        assert!(describe(&err).contains("trust bundle"));
    }

    #[test]
    fn mesh_verifier_ignores_the_dns_name_but_checks_the_chain() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let chain = leaf(&ca, "spiffe://cluster.local/ns/default/sa/reviews");
        let name = ServerName::try_from("whatever.example").unwrap();
        let ok = MeshServerVerifier::new(roots(&ca));
        ok.verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .unwrap();
        let other = CertificateAuthority::generate("cluster.local").unwrap();
        let bad = MeshServerVerifier::new(roots(&other));
        assert!(
            bad.verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
                .is_err()
        );
    }

    #[test]
    fn san_verifier_accepts_listed_uris_and_rejects_others() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let chain = leaf(&ca, "spiffe://cluster.local/ns/default/sa/reviews");
        let name = ServerName::try_from("reviews.example").unwrap();
        let accept = |names: &[&str]| {
            SanServerVerifier::new(
                roots(&ca),
                names
                    .iter()
                    .map(|n| AcceptedName::parse(n).unwrap())
                    .collect(),
            )
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
        };
        accept(&["spiffe://cluster.local/ns/default/sa/reviews"]).unwrap();
        let err = accept(&[
            "spiffe://cluster.local/ns/default/sa/ratings",
            "ratings.example",
        ])
        .unwrap_err();
        let carried = carried::<NameMismatch>(&err).unwrap();
        assert_eq!(
            carried.presented,
            ["spiffe://cluster.local/ns/default/sa/reviews"]
        );
        assert_eq!(carried.expected.len(), 2);
    }

    #[test]
    fn accepted_names_parse_as_uri_or_dns() {
        assert!(matches!(
            AcceptedName::parse("spiffe://a/b"),
            Some(AcceptedName::Uri(_))
        ));
        assert!(matches!(
            AcceptedName::parse("api.example.com"),
            Some(AcceptedName::Dns(_))
        ));
        assert_eq!(AcceptedName::parse("not a name"), None);
    }
}
