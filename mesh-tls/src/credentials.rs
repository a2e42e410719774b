//! This workload's SVID, private key and trust bundle, swappable while the proxy runs.
//!
//! Workload certificates live a day (Istio's default), so they are replaced under running
//! connections. [`Credentials`] holds the current set as an immutable snapshot in an
//! `ArcSwap`: a reload validates the *whole* new set (PEM, key matches the leaf, leaf chains to
//! the bundle, leaf names a SPIFFE ID) before swapping, so a cert written a moment before its
//! key, or a truncated file, never reaches a handshake; the last good set stays in force.
//! Established connections keep the keys they negotiated; new handshakes read the current
//! snapshot. The TLS configs are rebuilt on each swap (a new trust bundle applies to the next
//! handshake too), and the certificate resolvers in them read the current key on every
//! handshake, so even a config held since before the swap presents the new certificate.
//!
//! Session resumption is off on both sides: every connection verifies the peer against the
//! current bundle and presents the current certificate, and mesh connections are long-lived
//! and pooled, so full handshakes cost little.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use mesh_core::Identity;
use mesh_core::config::bootstrap::IdentityFiles;
use mesh_core::identity::IdentityError;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::version::{TLS12, TLS13};
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};

use crate::verify::{self, MeshServerVerifier, list, provider};

/// ALPN protocol ids.
pub(crate) const ALPN_H2: &[u8] = b"h2";
pub(crate) const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Why credentials could not be loaded, or a TLS connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{what}: invalid PEM ({reason})")]
    Pem { what: String, reason: String },
    #[error("{what} holds no certificate")]
    NoCertificate { what: String },
    #[error("{what} holds no private key")]
    NoPrivateKey { what: String },
    #[error("{what}: unusable private key ({reason})")]
    BadKey { what: String, reason: String },
    #[error("the private key in {key} does not match the certificate in {cert}")]
    KeyMismatch { cert: String, key: String },
    #[error("{what}: the trust bundle is unusable ({reason})")]
    BadTrustBundle { what: String, reason: String },
    #[error("the certificate in {cert} has no SPIFFE ID (no URI SAN)")]
    NoSpiffeId { cert: String },
    #[error("the certificate in {cert} names {uri:?}, not a valid SPIFFE ID: {source}")]
    InvalidSpiffeId {
        cert: String,
        uri: String,
        source: IdentityError,
    },
    #[error("the certificate in {cert} does not chain to the trust bundle {bundle}: {reason}")]
    Untrusted {
        cert: String,
        bundle: String,
        reason: String,
    },
    #[error("cannot build the TLS config: {0}")]
    Config(String),
    #[error("DestinationRule tls: {0}")]
    Origination(String),
    #[error("{side} TLS handshake failed: {reason}")]
    Handshake { side: &'static str, reason: String },
    #[error("{side} TLS handshake did not finish within {timeout:?}")]
    HandshakeTimeout {
        side: &'static str,
        timeout: Duration,
    },
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("the peer's certificate has no SPIFFE ID (SANs: {})", list(presented))]
    PeerWithoutSpiffeId { presented: Vec<String> },
    #[error(
        "server identity mismatch: expected {}, presented {}",
        list(expected),
        list(presented)
    )]
    IdentityMismatch {
        expected: Vec<String>,
        presented: Vec<String>,
    },
    #[error("invalid TLS server name {name:?}")]
    InvalidServerName { name: String },
}

/// The three PEM files as last read, to tell whether anything changed.
#[derive(Clone, PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    bundle: Vec<u8>,
}

impl Contents {
    fn read(files: &IdentityFiles) -> Result<Contents, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        Ok(Contents {
            cert: read(&files.cert)?,
            key: read(&files.key)?,
            bundle: read(&files.trust_bundle)?,
        })
    }

    async fn read_async(files: &IdentityFiles) -> Result<Contents, TlsError> {
        async fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
            tokio::fs::read(path)
                .await
                .map_err(|source| TlsError::Read {
                    path: path.to_path_buf(),
                    source,
                })
        }
        Ok(Contents {
            cert: read(&files.cert).await?,
            key: read(&files.key).await?,
            bundle: read(&files.trust_bundle).await?,
        })
    }
}

/// How errors name the three inputs: file paths, or what an embedder passed.
struct Names {
    cert: String,
    key: String,
    bundle: String,
}

impl Names {
    fn of(files: &IdentityFiles) -> Names {
        Names {
            cert: files.cert.display().to_string(),
            key: files.key.display().to_string(),
            bundle: files.trust_bundle.display().to_string(),
        }
    }

    fn in_memory() -> Names {
        Names {
            cert: "the certificate chain PEM".to_string(),
            key: "the private key PEM".to_string(),
            bundle: "the trust bundle PEM".to_string(),
        }
    }
}

/// One validated credential set and the configs built from it.
struct Snapshot {
    identity: Identity,
    serial_hex: String,
    not_before: SystemTime,
    not_after: SystemTime,
    contents: Contents,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    client_h2: Arc<ClientConfig>,
    client_http11: Arc<ClientConfig>,
}

/// This workload's mesh identity: SVID, key and trust bundle, reloadable.
pub struct Credentials {
    files: Option<IdentityFiles>,
    names: Names,
    current: ArcSwap<Snapshot>,
    /// The current certificate and key, read by the resolvers inside every config built.
    key: Arc<ArcSwap<CertifiedKey>>,
    /// Serializes reloads, so the key and the snapshot are swapped as one.
    reloading: std::sync::Mutex<()>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snap = self.current.load();
        f.debug_struct("Credentials")
            .field("identity", &snap.identity.as_str())
            .field("serial", &snap.serial_hex)
            .field("not_after", &snap.not_after)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Reads and validates the Bootstrap `identity` files.
    pub fn load(files: &IdentityFiles) -> Result<Arc<Credentials>, TlsError> {
        let contents = Contents::read(files)?;
        Credentials::new(Some(files.clone()), Names::of(files), contents)
    }

    /// Credentials from PEM text, with no files behind them (`reload` has nothing to do).
    pub fn from_pem(
        cert_chain_pem: &str,
        key_pem: &str,
        trust_bundle_pem: &str,
    ) -> Result<Arc<Credentials>, TlsError> {
        let contents = Contents {
            cert: cert_chain_pem.as_bytes().to_vec(),
            key: key_pem.as_bytes().to_vec(),
            bundle: trust_bundle_pem.as_bytes().to_vec(),
        };
        Credentials::new(None, Names::in_memory(), contents)
    }

    fn new(
        files: Option<IdentityFiles>,
        names: Names,
        contents: Contents,
    ) -> Result<Arc<Credentials>, TlsError> {
        let (valid, key) = validate(&contents, &names)?;
        let key = Arc::new(key);
        let shared = Arc::new(ArcSwap::new(key.clone()));
        let snapshot = build(valid, &shared, contents)?;
        Ok(Arc::new(Credentials {
            files,
            names,
            current: ArcSwap::from_pointee(snapshot),
            key: shared,
            reloading: std::sync::Mutex::new(()),
        }))
    }

    /// The SPIFFE ID of the current certificate.
    pub fn identity(&self) -> Identity {
        self.current.load().identity.clone()
    }

    /// The current certificate's `notAfter`.
    pub fn not_after(&self) -> SystemTime {
        self.current.load().not_after
    }

    /// The current certificate's `notBefore`.
    pub fn not_before(&self) -> SystemTime {
        self.current.load().not_before
    }

    /// The current certificate's serial number, lower-case hex.
    pub fn serial_hex(&self) -> String {
        self.current.load().serial_hex.clone()
    }

    /// The files these credentials reload from; `None` for [`from_pem`](Self::from_pem).
    pub fn files(&self) -> Option<&IdentityFiles> {
        self.files.as_ref()
    }

    /// The mesh server config: client certificate required and verified against the trust
    /// bundle; ALPN `h2`, `http/1.1`.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current.load().server.clone()
    }

    /// The mesh client config without ALPN: presents the current certificate and verifies the
    /// server's chain against the trust bundle (the SPIFFE ID is checked by the connector).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.current.load().client.clone()
    }

    /// The mesh client config offering ALPN `h2` (`http2`) or `http/1.1`.
    pub fn client_config_with_alpn(&self, http2: bool) -> Arc<ClientConfig> {
        let snap = self.current.load();
        if http2 {
            snap.client_h2.clone()
        } else {
            snap.client_http11.clone()
        }
    }

    /// Re-reads the files. `Ok(true)`: they changed and the new set is now in force;
    /// `Ok(false)`: nothing changed (or there are no files); `Err`: the new set is invalid
    /// and the old one stays.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let Some(files) = &self.files else {
            return Ok(false);
        };
        let contents = Contents::read(files)?;
        self.apply(contents)
    }

    fn apply(&self, contents: Contents) -> Result<bool, TlsError> {
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.current.load().contents == contents {
            return Ok(false);
        }
        let (valid, key) = validate(&contents, &self.names)?;
        let key = Arc::new(key);
        let snapshot = build(valid, &self.key, contents)?;
        self.key.store(key);
        self.current.store(Arc::new(snapshot));
        Ok(true)
    }

    /// Whether the certificate expires within a fifth of its lifetime or within an hour.
    pub fn expiring_soon(&self) -> bool {
        self.expiry_warning(SystemTime::now()).is_some()
    }

    fn expiry_warning(&self, now: SystemTime) -> Option<&'static str> {
        let snap = self.current.load();
        let lifetime = snap
            .not_after
            .duration_since(snap.not_before)
            .unwrap_or_default();
        let left = snap.not_after.duration_since(now).unwrap_or_default();
        if left.is_zero() {
            Some("has expired")
        } else if left < Duration::from_secs(3600) {
            Some("expires within 1 h")
        } else if left < lifetime / 5 {
            Some("expires within a fifth of its lifetime")
        } else {
            None
        }
    }

    /// Polls the files every `every` and reloads on change: logs the new serial on a swap, a
    /// warning on an invalid new set (once per distinct content) and when the certificate
    /// nears expiry. Files are re-read by path, so replacement by rename or a symlink swap
    /// (Kubernetes secrets) is seen. The task ends when the credentials are dropped. Must be
    /// called inside a tokio runtime.
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let every = every.max(Duration::from_millis(1));
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut rejected: Option<Contents> = None;
            let mut last_error: Option<String> = None;
            let mut warned: Option<(String, &'static str)> = None;
            loop {
                ticker.tick().await;
                let Some(creds) = weak.upgrade() else { return };
                if let Some(files) = &creds.files {
                    match Contents::read_async(files).await {
                        Ok(contents) => {
                            last_error = None;
                            if rejected.as_ref() != Some(&contents) {
                                match creds.apply(contents.clone()) {
                                    Ok(true) => {
                                        rejected = None;
                                        tracing::info!(
                                            identity = %creds.identity(),
                                            serial = %creds.serial_hex(),
                                            cert = %files.cert.display(),
                                            "loaded new workload certificate"
                                        );
                                    }
                                    Ok(false) => rejected = None,
                                    Err(e) => {
                                        tracing::warn!(
                                            error = %e,
                                            serial = %creds.serial_hex(),
                                            "rejected new workload credentials; keeping the current ones"
                                        );
                                        rejected = Some(contents);
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            let message = e.to_string();
                            if last_error.as_ref() != Some(&message) {
                                tracing::warn!(error = %message, "cannot re-read workload credentials; keeping the current ones");
                                last_error = Some(message);
                            }
                        }
                    }
                }
                let serial = creds.serial_hex();
                if let Some(why) = creds.expiry_warning(SystemTime::now())
                    && warned.as_ref() != Some(&(serial.clone(), why))
                {
                    tracing::warn!(
                        identity = %creds.identity(),
                        serial = %serial,
                        not_after = ?creds.not_after(),
                        "workload certificate {why}"
                    );
                    warned = Some((serial, why));
                }
            }
        })
    }
}

struct Meta {
    serial_hex: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

/// A credential set that passed [`validate`].
struct Valid {
    identity: Identity,
    meta: Meta,
    roots: Arc<RootCertStore>,
}

/// Checks a credential set: PEM parses, the key matches the leaf, the leaf chains to the
/// bundle now and names a SPIFFE ID.
fn validate(contents: &Contents, names: &Names) -> Result<(Valid, CertifiedKey), TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&contents.cert)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            what: names.cert.clone(),
            reason: e.to_string(),
        })?;
    let Some(leaf) = chain.first().cloned() else {
        return Err(TlsError::NoCertificate {
            what: names.cert.clone(),
        });
    };
    let key = PrivateKeyDer::from_pem_slice(&contents.key).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            what: names.key.clone(),
        },
        e => TlsError::Pem {
            what: names.key.clone(),
            reason: e.to_string(),
        },
    })?;
    let roots = trust_bundle(&contents.bundle, &names.bundle)?;

    let certified =
        CertifiedKey::from_der(chain.clone(), key, &provider()).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                cert: names.cert.clone(),
                key: names.key.clone(),
            },
            e => TlsError::BadKey {
                what: names.key.clone(),
                reason: e.to_string(),
            },
        })?;
    if let Err(rustls::Error::InconsistentKeys(_)) = certified.keys_match() {
        return Err(TlsError::KeyMismatch {
            cert: names.cert.clone(),
            key: names.key.clone(),
        });
    }

    verify::verify_chain(&roots, &leaf, &chain[1..], UnixTime::now()).map_err(|e| {
        TlsError::Untrusted {
            cert: names.cert.clone(),
            bundle: names.bundle.clone(),
            reason: verify::describe(&e).replace("the peer's certificate", "it"),
        }
    })?;

    let uris = verify::peer_identities(&leaf);
    let identity = match uris.iter().find_map(|u| Identity::parse(u).ok()) {
        Some(id) => id,
        None => {
            let no_id = || TlsError::NoSpiffeId {
                cert: names.cert.clone(),
            };
            return Err(match uris.first().map(|u| (u, Identity::parse(u))) {
                Some((uri, Err(source))) => TlsError::InvalidSpiffeId {
                    cert: names.cert.clone(),
                    uri: uri.clone(),
                    source,
                },
                _ => no_id(),
            });
        }
    };

    let (_, x509) = x509_parser::parse_x509_certificate(&leaf).map_err(|e| TlsError::Pem {
        what: names.cert.clone(),
        reason: e.to_string(),
    })?;
    let to_system = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        }
    };
    let meta = Meta {
        serial_hex: crate::ca::hex(x509.raw_serial()),
        not_before: to_system(x509.validity().not_before),
        not_after: to_system(x509.validity().not_after),
    };
    Ok((
        Valid {
            identity,
            meta,
            roots,
        },
        certified,
    ))
}

fn trust_bundle(pem: &[u8], what: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| TlsError::Pem {
            what: what.to_string(),
            reason: e.to_string(),
        })?;
        roots.add(cert).map_err(|e| TlsError::BadTrustBundle {
            what: what.to_string(),
            reason: e.to_string(),
        })?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoCertificate {
            what: what.to_string(),
        });
    }
    Ok(Arc::new(roots))
}

/// A trust bundle from a PEM file (for origination's `caCertificates`).
pub(crate) fn trust_bundle_file(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    trust_bundle(&pem, &path.display().to_string())
}

fn build(
    valid: Valid,
    shared: &Arc<ArcSwap<CertifiedKey>>,
    contents: Contents,
) -> Result<Snapshot, TlsError> {
    let Valid {
        identity,
        meta,
        roots,
    } = valid;
    let config_err = |e: rustls::Error| TlsError::Config(e.to_string());
    let provider = provider();

    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
    let resolver = Arc::new(CurrentCert(shared.clone()));
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&TLS13, &TLS12])
        .map_err(config_err)?
        .with_client_cert_verifier(client_verifier)
        .with_cert_resolver(resolver.clone());
    server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
    server.session_storage = Arc::new(NoServerSessionStorage {});
    server.send_tls13_tickets = 0;

    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13, &TLS12])
        .map_err(config_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshServerVerifier::new(roots)))
        .with_client_cert_resolver(resolver);
    client.resumption = rustls::client::Resumption::disabled();
    let mut client_h2 = client.clone();
    client_h2.alpn_protocols = vec![ALPN_H2.to_vec()];
    let mut client_http11 = client.clone();
    client_http11.alpn_protocols = vec![ALPN_HTTP11.to_vec()];

    Ok(Snapshot {
        identity,
        serial_hex: meta.serial_hex,
        not_before: meta.not_before,
        not_after: meta.not_after,
        contents,
        server: Arc::new(server),
        client: Arc::new(client),
        client_h2: Arc::new(client_h2),
        client_http11: Arc::new(client_http11),
    })
}

/// Resolves to whatever certificate is current when the handshake runs.
struct CurrentCert(Arc<ArcSwap<CertifiedKey>>);

impl fmt::Debug for CurrentCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CurrentCert")
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CertificateAuthority;

    fn svid(ttl: Duration) -> Arc<Credentials> {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let id = Identity::parse("spiffe://cluster.local/ns/default/sa/reviews").unwrap();
        let svid = ca.issue(&id, ttl).unwrap();
        Credentials::from_pem(&svid.cert_pem, &svid.key_pem, &svid.root_pem).unwrap()
    }

    #[test]
    fn expiry_warning_says_which_threshold() {
        let day = svid(Duration::from_secs(24 * 3600));
        let now = SystemTime::now();
        assert_eq!(day.expiry_warning(now), None);
        // 24 h + 1 min lifetime: a fifth is about 4.8 h.
        assert_eq!(
            day.expiry_warning(day.not_after() - Duration::from_secs(4 * 3600)),
            Some("expires within a fifth of its lifetime")
        );
        assert_eq!(
            day.expiry_warning(day.not_after() - Duration::from_secs(1800)),
            Some("expires within 1 h")
        );
        assert_eq!(
            day.expiry_warning(day.not_after() + Duration::from_secs(1)),
            Some("has expired")
        );
        assert!(!day.expiring_soon());
        // Ten minutes: within the hour from the start.
        assert!(svid(Duration::from_secs(600)).expiring_soon());
    }

    #[test]
    fn in_memory_credentials_have_nothing_to_reload() {
        let creds = svid(Duration::from_secs(3600));
        assert!(!creds.reload().unwrap());
        assert!(creds.files().is_none());
        assert_eq!(creds.identity().service_account(), Some("reviews"));
        assert_eq!(creds.serial_hex().len(), 32);
    }

    #[test]
    fn configs_require_client_certs_and_offer_alpn() {
        let creds = svid(Duration::from_secs(3600));
        let server = creds.server_config();
        assert_eq!(
            server.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert_eq!(server.send_tls13_tickets, 0);
        assert!(creds.client_config().alpn_protocols.is_empty());
        assert_eq!(
            creds.client_config_with_alpn(true).alpn_protocols,
            [b"h2".to_vec()]
        );
        assert_eq!(
            creds.client_config_with_alpn(false).alpn_protocols,
            [b"http/1.1".to_vec()]
        );
    }

    #[test]
    fn a_uri_san_that_is_not_spiffe_is_named() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "https://reviews.example/".try_into().unwrap(),
        )];
        let cert = params.self_signed(&key).unwrap();
        let err =
            Credentials::from_pem(&cert.pem(), &key.serialize_pem(), &cert.pem()).unwrap_err();
        assert!(matches!(err, TlsError::InvalidSpiffeId { .. }), "{err:?}");
        assert!(
            err.to_string().contains("https://reviews.example/"),
            "{err}"
        );
    }

    #[test]
    fn empty_inputs_are_named() {
        let creds_err = Credentials::from_pem("", "", "").unwrap_err();
        assert!(
            matches!(creds_err, TlsError::NoCertificate { .. }),
            "{creds_err:?}"
        );
        assert!(creds_err.to_string().contains("certificate chain"));
    }
}
