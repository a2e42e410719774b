//! A small certificate authority for the mesh: one self-signed root per trust domain that
//! issues short-lived SPIFFE X.509-SVIDs.
//!
//! Istio's `istiod` plays this part in Kubernetes; without a control plane, `mesh-proxy ca
//! init|issue` writes the files a Bootstrap's `identity` points at. Keys are ECDSA P-256 (what
//! istiod issues by default, and the cheapest handshake on aws-lc-rs). The root carries no URI
//! name constraints, because webpki rejects them; trust-domain scoping is enforced here, at
//! issue time, and by identity checks at the peers.
//!
//! ```
//! use std::time::Duration;
//! use mesh_core::Identity;
//! use mesh_tls::ca::CertificateAuthority;
//!
//! let ca = CertificateAuthority::generate("cluster.local")?;
//! let id = Identity::parse("spiffe://cluster.local/ns/default/sa/reviews")?;
//! let svid = ca.issue(&id, Duration::from_secs(3600))?;
//! assert!(svid.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
//! assert_eq!(svid.root_pem, ca.root_pem());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use mesh_core::Identity;
use mesh_core::identity::IdentityError;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use time::OffsetDateTime;

/// Lifetime of an issued certificate when none is given: Istio's default workload TTL.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Lifetime of a generated root.
pub const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// How far back `notBefore` is set, so a peer whose clock runs a little behind accepts a
/// certificate issued a moment ago.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// File names inside a CA directory and an issued-certificate directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
pub const ROOT_FILE: &str = "root.pem";

/// Why the CA could not be created, loaded, saved or could not issue.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("invalid trust domain {trust_domain:?}: {reason}")]
    InvalidTrustDomain {
        trust_domain: String,
        reason: &'static str,
    },
    #[error(
        "cannot issue a certificate for {identity}: its trust domain is not the CA's ({ca_trust_domain})"
    )]
    TrustDomainMismatch {
        identity: String,
        ca_trust_domain: String,
    },
    #[error(
        "cannot issue a certificate for {identity}: the lifetime must be more than zero and at most {max_days} days"
    )]
    InvalidTtl { identity: String, max_days: u64 },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a usable CA: {reason}", path.display())]
    InvalidCa { path: PathBuf, reason: String },
    #[error("cannot {action}: {source}")]
    Crypto {
        action: &'static str,
        source: rcgen::Error,
    },
}

/// A root CA for one trust domain, able to issue workload certificates.
pub struct CertificateAuthority {
    trust_domain: String,
    root_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// A certificate issued by [`CertificateAuthority::issue`], in PEM.
#[derive(Clone)]
pub struct IssuedCertificate {
    /// The leaf, then the CA certificate.
    pub cert_pem: String,
    /// The leaf's PKCS#8 private key.
    pub key_pem: String,
    /// The CA certificate: the trust bundle peers verify this leaf against.
    pub root_pem: String,
    /// The leaf's serial number, lower-case hex.
    pub serial_hex: String,
    /// The leaf's `notAfter` (whole seconds, as encoded).
    pub not_after: SystemTime,
}

impl fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCertificate")
            .field("serial_hex", &self.serial_hex)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl IssuedCertificate {
    /// Writes `dir/cert.pem`, `dir/key.pem` (mode 0600 on unix) and `dir/root.pem`, creating
    /// `dir`. Each file is written aside and renamed into place, so a watcher never reads half
    /// a file.
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        create_dir(dir)?;
        write_file(&dir.join(KEY_FILE), &self.key_pem, true)?;
        write_file(&dir.join(CERT_FILE), &self.cert_pem, false)?;
        write_file(&dir.join(ROOT_FILE), &self.root_pem, false)
    }
}

impl CertificateAuthority {
    /// A new self-signed root for `trust_domain` (e.g. `cluster.local`).
    pub fn generate(trust_domain: &str) -> Result<CertificateAuthority, CaError> {
        let domain_id = trust_domain_id(trust_domain)?;
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| CaError::Crypto {
                action: "generate the CA key",
                source,
            })?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, trust_domain);
        params.distinguished_name = dn;
        // The trust domain's own SPIFFE ID, as the X.509-SVID spec suggests for signing certs;
        // `load` reads the trust domain back from it.
        params.subject_alt_names = vec![SanType::URI(domain_id.as_str().try_into().map_err(
            |source| CaError::Crypto {
                action: "encode the trust domain URI",
                source,
            },
        )?)];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + ROOT_TTL;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(|source| CaError::Crypto {
            action: "sign the CA certificate",
            source,
        })?;
        let key_pem = key.serialize_pem();
        Ok(CertificateAuthority {
            trust_domain: trust_domain.to_string(),
            root_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Reads `dir/ca.pem` and `dir/ca-key.pem` (as written by [`save`](Self::save)).
    pub fn load(dir: &Path) -> Result<CertificateAuthority, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let root_pem = read_file(&cert_path)?;
        let key_pem = read_file(&key_path)?;
        let invalid = |path: &Path, reason: String| CaError::InvalidCa {
            path: path.to_path_buf(),
            reason,
        };
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| invalid(&key_path, format!("not a PEM private key ({e})")))?;
        let der = pem_certificate(&root_pem)
            .ok_or_else(|| invalid(&cert_path, "holds no PEM certificate".to_string()))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| invalid(&cert_path, format!("not an X.509 certificate ({e})")))?;
        if !x509.is_ca() {
            return Err(invalid(
                &cert_path,
                "not a CA certificate (basicConstraints CA:FALSE)".into(),
            ));
        }
        if x509.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            return Err(invalid(
                &key_path,
                format!(
                    "the key does not match the certificate in {}",
                    cert_path.display()
                ),
            ));
        }
        let trust_domain = ca_trust_domain(&x509).ok_or_else(|| {
            invalid(
                &cert_path,
                "names no trust domain (no spiffe:// URI SAN, no common name)".into(),
            )
        })?;
        trust_domain_id(&trust_domain)?;
        let issuer = Issuer::from_ca_cert_pem(&root_pem, key)
            .map_err(|e| invalid(&cert_path, format!("cannot sign with it ({e})")))?;
        Ok(CertificateAuthority {
            trust_domain,
            root_pem,
            key_pem,
            issuer,
        })
    }

    /// Writes `dir/ca.pem` and `dir/ca-key.pem` (mode 0600 on unix), creating `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        create_dir(dir)?;
        write_file(&dir.join(CA_KEY_FILE), &self.key_pem, true)?;
        write_file(&dir.join(CA_CERT_FILE), &self.root_pem, false)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate in PEM: the trust bundle.
    pub fn root_pem(&self) -> String {
        self.root_pem.clone()
    }

    /// Issues an X.509-SVID for `id`, valid from a minute ago for `ttl`.
    pub fn issue(&self, id: &Identity, ttl: Duration) -> Result<IssuedCertificate, CaError> {
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::TrustDomainMismatch {
                identity: id.to_string(),
                ca_trust_domain: self.trust_domain.clone(),
            });
        }
        let bad_ttl = || CaError::InvalidTtl {
            identity: id.to_string(),
            max_days: ROOT_TTL.as_secs() / 86_400,
        };
        if ttl.is_zero() || ttl > ROOT_TTL {
            return Err(bad_ttl());
        }
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| CaError::Crypto {
                action: "generate a workload key",
                source,
            })?;
        let mut params = CertificateParams::default();
        // SPIFFE SVIDs identify by the URI SAN alone; an empty subject makes rcgen mark the SAN
        // critical, as RFC 5280 requires.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names =
            vec![SanType::URI(id.as_str().try_into().map_err(|source| {
                CaError::Crypto {
                    action: "encode the SPIFFE ID",
                    source,
                }
            })?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .map_err(|_| bad_ttl())?;
        let not_after = now + ttl;
        params.not_before = now - CLOCK_SKEW;
        params.not_after = not_after;
        let serial = random_serial();
        let serial_hex = hex(serial.to_bytes().as_slice());
        params.serial_number = Some(serial);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| CaError::Crypto {
                action: "sign the workload certificate",
                source,
            })?;
        let mut cert_pem = cert.pem();
        if !cert_pem.ends_with('\n') {
            cert_pem.push('\n');
        }
        cert_pem.push_str(&self.root_pem);
        Ok(IssuedCertificate {
            cert_pem,
            key_pem: key.serialize_pem(),
            root_pem: self.root_pem.clone(),
            serial_hex,
            not_after: SystemTime::from(not_after),
        })
    }
}

fn trust_domain_id(trust_domain: &str) -> Result<Identity, CaError> {
    let id = Identity::parse(&format!("spiffe://{trust_domain}")).map_err(
        |IdentityError { reason, .. }| CaError::InvalidTrustDomain {
            trust_domain: trust_domain.to_string(),
            reason,
        },
    )?;
    if trust_domain.contains('/') {
        return Err(CaError::InvalidTrustDomain {
            trust_domain: trust_domain.to_string(),
            reason: "must not contain '/'",
        });
    }
    Ok(id)
}

/// The trust domain a CA certificate names: its `spiffe://domain` URI SAN, else its CN.
fn ca_trust_domain(x509: &x509_parser::certificate::X509Certificate<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && let Ok(id) = Identity::parse(uri)
                && id.path().is_empty()
            {
                return Some(id.trust_domain().to_string());
            }
        }
    }
    x509.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
}

/// 128 random bits, positive and without a leading zero byte, so the DER INTEGER's bytes are
/// exactly these and `serial_hex` matches what a parser reads back.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    let random = rustls::crypto::aws_lc_rs::default_provider().secure_random;
    if random.fill(&mut bytes).is_err() {
        // aws-lc's RNG does not fail in practice; fall back to the clock rather than panic.
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = nanos.to_be_bytes();
    }
    bytes[0] = (bytes[0] & 0x7f).max(1);
    SerialNumber::from_slice(&bytes)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn pem_certificate(pem: &str) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .map(|c| c.to_vec())
}

fn read_file(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), CaError> {
    std::fs::create_dir_all(dir).map_err(|source| CaError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

/// Writes `path` through a temporary file in the same directory and a rename.
fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CaError> {
    let fail = |source| CaError::Write {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(&tmp).map_err(fail)?;
    #[cfg(unix)]
    if private {
        // `mode` applies only when the file is created; a stale temp file keeps its mode.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(fail)?;
    }
    file.write_all(contents.as_bytes()).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;

    fn reviews() -> Identity {
        Identity::parse("spiffe://cluster.local/ns/default/sa/reviews").unwrap()
    }

    fn parse_first(pem: &str) -> Vec<u8> {
        pem_certificate(pem).unwrap()
    }

    #[test]
    fn root_is_a_p256_ca_for_the_trust_domain() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let der = parse_first(&ca.root_pem());
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(x509.is_ca());
        let ku = x509.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        assert_eq!(
            x509.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "cluster.local"
        );
        assert_eq!(
            x509.signature_algorithm.algorithm,
            x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256
        );
        let lifetime =
            x509.validity().not_after.timestamp() - x509.validity().not_before.timestamp();
        assert!(lifetime > 9 * 365 * 86_400, "{lifetime}");
        assert!(x509.name_constraints().unwrap().is_none());
    }

    #[test]
    fn leaf_has_the_spiffe_san_both_ekus_and_the_ttl() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let svid = ca.issue(&reviews(), Duration::from_secs(3600)).unwrap();
        let der = parse_first(&svid.cert_pem);
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!x509.is_ca());
        let sans: Vec<_> = x509
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(sans, ["spiffe://cluster.local/ns/default/sa/reviews"]);
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(x509.key_usage().unwrap().unwrap().value.digital_signature());
        assert_eq!(hex(x509.raw_serial()), svid.serial_hex);
        let nb = x509.validity().not_before.timestamp();
        let na = x509.validity().not_after.timestamp();
        assert_eq!(na - nb, 3600 + 60, "notBefore is a minute early");
        let expected = svid
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert_eq!(na, expected);
        // The chain file holds the leaf then the root.
        assert_eq!(svid.cert_pem.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(svid.cert_pem.ends_with(&ca.root_pem()));
    }

    #[test]
    fn serials_are_random() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let a = ca.issue(&reviews(), DEFAULT_TTL).unwrap();
        let b = ca.issue(&reviews(), DEFAULT_TTL).unwrap();
        assert_ne!(a.serial_hex, b.serial_hex);
        assert_eq!(a.serial_hex.len(), 32);
    }

    #[test]
    fn refuses_another_trust_domain_and_bad_ttls() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let other = Identity::parse("spiffe://example.org/ns/default/sa/reviews").unwrap();
        let err = ca.issue(&other, DEFAULT_TTL).unwrap_err();
        assert!(matches!(err, CaError::TrustDomainMismatch { .. }));
        assert!(err.to_string().contains("example.org"), "{err}");
        assert!(err.to_string().contains("cluster.local"), "{err}");
        assert!(matches!(
            ca.issue(&reviews(), Duration::ZERO),
            Err(CaError::InvalidTtl { .. })
        ));
    }

    #[test]
    fn rejects_invalid_trust_domains() {
        for bad in ["", "Cluster.Local", "a/b", "spiffe://x"] {
            assert!(
                matches!(
                    CertificateAuthority::generate(bad),
                    Err(CaError::InvalidTrustDomain { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn save_then_load_round_trips_and_keeps_issuing() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("example.org").unwrap();
        ca.save(dir.path()).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let loaded = CertificateAuthority::load(dir.path()).unwrap();
        assert_eq!(loaded.trust_domain(), "example.org");
        assert_eq!(loaded.root_pem(), ca.root_pem());
        let id = Identity::parse("spiffe://example.org/ns/a/sa/b").unwrap();
        let svid = loaded.issue(&id, DEFAULT_TTL).unwrap();
        // Issued by the loaded CA: the issuer name is the root's subject.
        let der = parse_first(&svid.cert_pem);
        let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
        let root_der = parse_first(&ca.root_pem());
        let (_, root) = x509_parser::parse_x509_certificate(&root_der).unwrap();
        assert_eq!(leaf.issuer(), root.subject());
        leaf.verify_signature(Some(root.public_key())).unwrap();
    }

    #[test]
    fn load_rejects_a_key_of_another_ca() {
        let dir = tempfile::tempdir().unwrap();
        let a = CertificateAuthority::generate("cluster.local").unwrap();
        let b = CertificateAuthority::generate("cluster.local").unwrap();
        a.save(dir.path()).unwrap();
        std::fs::write(dir.path().join(CA_KEY_FILE), &b.key_pem).unwrap();
        let err = CertificateAuthority::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        let missing = CertificateAuthority::load(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(missing, CaError::Read { .. }), "{missing}");
    }

    #[test]
    fn issued_certificate_save_writes_three_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let svid = ca.issue(&reviews(), DEFAULT_TTL).unwrap();
        let out = dir.path().join("nested/out");
        svid.save(&out).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join(CERT_FILE)).unwrap(),
            svid.cert_pem
        );
        assert_eq!(
            std::fs::read_to_string(out.join(KEY_FILE)).unwrap(),
            svid.key_pem
        );
        assert_eq!(
            std::fs::read_to_string(out.join(ROOT_FILE)).unwrap(),
            ca.root_pem()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(out.join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
