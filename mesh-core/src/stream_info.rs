//! What the inner layers of one request learn about it, for the telemetry layers above them.
//!
//! The access log, metrics and trace layers sit outermost: they see the request as it arrives
//! and the response as it leaves, but the route, the endpoint that answered, that
//! endpoint's verified identity and the trace id are decided further in. The outermost layer that wants them
//! puts a [`StreamInfo`] in the request's extensions ([`StreamInfo::attach`]); the route layer
//! and the upstream connector record into it; being shared, the outer layer reads it when the
//! response is done. Envoy's `StreamInfo` plays the same part.
//!
//! ```
//! use mesh_core::stream_info::StreamInfo;
//!
//! let mut req = http::Request::new(());
//! let info = StreamInfo::attach(&mut req);
//! // ... deep in the stack, the connector records the endpoint it used:
//! if let Some(info) = req.extensions().get::<StreamInfo>() {
//!     info.set_upstream("10.0.0.7:9080".parse().unwrap());
//! }
//! assert_eq!(info.upstream(), Some("10.0.0.7:9080".parse().unwrap()));
//! ```
//!
//! Recording is a few atomic or uncontended-lock operations and happens once per layer per
//! attempt; nothing here allocates after [`StreamInfo::attach`].

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use crate::identity::Identity;
use crate::target::RouteTarget;

/// Shared, per-request record filled by inner layers; cloning shares it.
#[derive(Clone, Debug, Default)]
pub struct StreamInfo(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    /// The first routing decision (a mirror's shadow request does not carry this record).
    route: OnceLock<RouteTarget>,
    /// The last attempt's endpoint and its verified identity: after retries, the one that
    /// answered.
    upstream: Mutex<Upstream>,
    /// The W3C trace id of the request's span, set by the trace layer (16 bytes).
    trace_id: OnceLock<[u8; 16]>,
}

#[derive(Debug, Default, Clone)]
struct Upstream {
    addr: Option<SocketAddr>,
    peer: Option<Identity>,
}

impl StreamInfo {
    /// The request's record, inserted if it has none yet (so stacked telemetry layers share
    /// one).
    pub fn attach<B>(req: &mut http::Request<B>) -> StreamInfo {
        req.extensions_mut()
            .get_or_insert_with(StreamInfo::default)
            .clone()
    }

    /// Records the route's decision; the first one stands.
    pub fn set_route(&self, target: &RouteTarget) {
        // A second call (a retry re-entering the route layer cannot, but a nested stack
        // could) keeps the first decision, which is what the client's request was routed by.
        let _ = self.0.route.set(target.clone());
    }

    /// The route's decision, once routed.
    pub fn route(&self) -> Option<&RouteTarget> {
        self.0.route.get()
    }

    /// Records the endpoint an attempt goes to (clearing the previous attempt's peer).
    pub fn set_upstream(&self, addr: SocketAddr) {
        let mut up = self.lock();
        up.addr = Some(addr);
        up.peer = None;
    }

    /// Records the identity the endpoint proved in its TLS handshake.
    pub fn set_upstream_peer(&self, peer: Identity) {
        self.lock().peer = Some(peer);
    }

    /// The endpoint of the last attempt.
    pub fn upstream(&self) -> Option<SocketAddr> {
        self.lock().addr
    }

    /// The verified identity of the last attempt's endpoint, when it spoke mTLS.
    pub fn upstream_peer(&self) -> Option<Identity> {
        self.lock().peer.clone()
    }

    /// Records the request's trace id (the trace layer, once it has a span context).
    pub fn set_trace_id(&self, id: [u8; 16]) {
        let _ = self.0.trace_id.set(id);
    }

    /// The request's trace id, if a trace layer ran.
    pub fn trace_id(&self) -> Option<[u8; 16]> {
        self.0.trace_id.get().copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Upstream> {
        // Nothing panics while holding this lock (plain field writes), so a poisoned lock
        // still holds consistent data.
        self.0
            .upstream
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_one_record_and_the_last_attempt_wins() {
        let mut req = http::Request::new(());
        let outer = StreamInfo::attach(&mut req);
        let again = StreamInfo::attach(&mut req);
        let inner = req.extensions().get::<StreamInfo>().cloned().unwrap();
        inner.set_upstream("127.0.0.1:1".parse().unwrap());
        inner.set_upstream_peer(Identity::parse("spiffe://cluster.local/ns/a/sa/b").unwrap());
        inner.set_upstream("127.0.0.1:2".parse().unwrap());
        assert_eq!(outer.upstream(), Some("127.0.0.1:2".parse().unwrap()));
        assert_eq!(
            again.upstream_peer(),
            None,
            "a new attempt clears the old peer"
        );
        assert!(outer.route().is_none());
    }
}
