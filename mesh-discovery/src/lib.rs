//! Discovery back ends: where endpoints and resources come from when they are not in the
//! proxy's own files.
//!
//! - [`dns`]: `ServiceEntry` `resolution: DNS` hosts resolved with hickory-resolver,
//!   re-resolved on TTL, the last good answer kept when DNS fails.
//! - [`etcd`]: Istio resources stored in etcd (`<prefix>/<group>/<kind>/<namespace>/<name>`),
//!   listed then watched with resync after compaction or reconnect; this workload's
//!   `WorkloadEntry` published under a lease; the CLI's `config apply/get/delete`.
//!
//! A crate of its own because etcd-client (tonic, prost, a protoc build step) and
//! hickory-resolver are heavy, and an embedder using only files should not compile them.

#![forbid(unsafe_code)]

pub mod dns;
#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "testing")]
pub mod testing;
