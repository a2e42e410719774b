//! The per-layer cache of resolved series: what keeps the request path off the label sets.
//!
//! A request's series is decided by a handful of facts: the destination service, the peer
//! (its metadata and principal), the status, the flags, the gRPC status, the protocol and
//! whether the connection was mutual TLS. [`SeriesKey`] holds exactly those, each in its
//! cheapest comparable form:
//!
//! - the service as the route's `Arc<ServicePort>` **by address** (outbound; routes are
//!   compiled once per config, so one request after another hands the same `Arc`), or the
//!   resolver's `Arc<str>` by content (inbound: a resolver may build its answer);
//! - the peer's metadata **by address**: the layer interns decoded headers
//!   ([`PeerInterner`](super::peer::PeerInterner)), so equal headers share one `Arc`;
//! - the principal by content (an `Arc<str>` inside, some 50 bytes to hash);
//! - the rest as small integers.
//!
//! Keys hold their `Arc`s, so an address cannot be reused by another service or peer while
//! a key names it. On a hit the request path hashes those few words, takes a read lock and
//! clones one `Arc` of handles; it never builds or hashes the 25 label values, and never
//! touches a `Family` (whose guards are never held: handles are clones sharing the
//! registry's atomics).
//!
//! **Bounded.** At [`SERIES_CACHE_CAPACITY`] entries the map is cleared before the next
//! insert: memory stays bounded whatever peers send, and after config reloads (new route
//! `Arc`s, so new keys) the live working set refills within a request each, where a cache
//! that merely stopped inserting would leave every new route on the slow path for good. The
//! slow path, a miss, builds the labels and resolves the six families once. Either way the
//! answer is the same series: the cache only saves work.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, PoisonError, RwLock};

use mesh_core::config::ServicePort;
use mesh_core::{Identity, ResponseFlags};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use super::peer::PeerMetadata;

/// How many series one layer keeps resolved.
pub const SERIES_CACHE_CAPACITY: usize = 1024;

/// An `Arc` compared and hashed by address.
#[derive(Clone, Debug)]
pub(crate) struct ByAddress<T>(pub(crate) Arc<T>);

impl<T> PartialEq for ByAddress<T> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl<T> Eq for ByAddress<T> {}

impl<T> Hash for ByAddress<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        std::ptr::hash(Arc::as_ptr(&self.0), state);
    }
}

/// The destination service, as cheaply as it can be compared.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ServiceKey {
    Unknown,
    Route(ByAddress<ServicePort>),
    Name(Arc<str>),
}

/// No `grpc-status` seen (or not a gRPC request): the label is empty.
pub(crate) const NO_GRPC_STATUS: u8 = u8::MAX;

/// Everything that decides a request's series.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SeriesKey {
    pub(crate) service: ServiceKey,
    pub(crate) peer: Option<ByAddress<PeerMetadata>>,
    pub(crate) principal: Option<Identity>,
    pub(crate) code: u16,
    pub(crate) flags: ResponseFlags,
    pub(crate) grpc_status: u8,
    pub(crate) grpc: bool,
    pub(crate) mtls: bool,
}

/// One series' resolved handles.
#[derive(Debug)]
pub(crate) struct SeriesHandles {
    pub(crate) requests: Counter,
    pub(crate) duration: Histogram,
    pub(crate) request_bytes: Histogram,
    pub(crate) response_bytes: Histogram,
    /// gRPC only: request and response message counters.
    pub(crate) messages: Option<(Counter, Counter)>,
}

/// FxHash (rustc's hasher, from `rustc-hash`): several times faster than SipHash on these
/// keys. Its weakness, no defence against chosen collisions, is bounded here: the maps it
/// serves hold at most [`SERIES_CACHE_CAPACITY`] and [`MAX_PEERS`](super::peer::MAX_PEERS)
/// entries, and their keys come from verified peers and this proxy's own config.
pub(crate) type FxBuildHasher = rustc_hash::FxBuildHasher;

#[derive(Debug, Default)]
pub(crate) struct SeriesCache {
    map: RwLock<HashMap<SeriesKey, Arc<SeriesHandles>, FxBuildHasher>>,
}

impl SeriesCache {
    /// The handles for `key`, built by `build` on a miss (outside the lock).
    pub(crate) fn get_or_build(
        &self,
        key: SeriesKey,
        build: impl FnOnce(&SeriesKey) -> SeriesHandles,
    ) -> Arc<SeriesHandles> {
        if let Some(handles) = self
            .map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return handles.clone();
        }
        let handles = Arc::new(build(&key));
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= SERIES_CACHE_CAPACITY {
            map.clear();
        }
        // Two misses racing both build; the families dedupe, so both got the same series.
        map.entry(key).or_insert(handles).clone()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}
