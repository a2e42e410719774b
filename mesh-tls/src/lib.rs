//! Mutual TLS for the mesh, on rustls with the aws-lc-rs provider only.
//!
//! - [`ca`]: a small CA (ECDSA P-256, SPIFFE URI SANs) behind `mesh-proxy ca init|issue`;
//! - [`credentials`]: this workload's SVID and trust bundle, reloaded from watched files;
//! - [`verify`]: chain verification against the trust bundle and SPIFFE identity checks;
//! - [`acceptor`] / [`connector`]: the server and client sides of a mesh mTLS connection;
//! - [`detect`]: telling a TLS ClientHello from plaintext (PERMISSIVE mode);
//! - [`peer_auth`]: which `PeerAuthentication` mode applies to a workload's port;
//! - [`authz`]: `AuthorizationPolicy` evaluation, and `AuthzLayer` for the inbound stack.
#![forbid(unsafe_code)]

pub mod acceptor;
pub mod authz;
pub mod ca;
pub mod connector;
pub mod credentials;
pub mod detect;
pub mod peer_auth;
pub mod verify;

pub use acceptor::{Accepted, MtlsAcceptor};
pub use ca::{CaError, CertificateAuthority, IssuedCertificate};
pub use connector::{Connected, MtlsConnector, OriginationTls};
pub use credentials::{Credentials, TlsError};
