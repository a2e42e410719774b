//! Mutual TLS for the mesh.
//!
//! Nothing is implemented here yet: the foundation proxy speaks plaintext. This crate is where
//! these belong, on rustls with the aws-lc-rs provider only:
//!
//! - a small CA (ECDSA P-256, SPIFFE URI SANs) behind `mesh-proxy ca init|issue`;
//! - server and client configs that present this workload's SVID and verify the peer's
//!   SPIFFE identity against the trust bundle, with certificate rotation from watched files;
//! - `PeerAuthentication` modes (STRICT, PERMISSIVE, DISABLE) on the inbound listener;
//! - `AuthorizationPolicy` evaluation as a tower layer on the inbound stack.
#![forbid(unsafe_code)]
