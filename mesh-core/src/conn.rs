//! What the proxy knows about the downstream connection a request arrived on.
//!
//! Listeners insert a [`ClientInfo`] into every request's extensions, so layers that care
//! about the peer (forwarding headers, authorization by IP or identity, telemetry) read it
//! without the connection being threaded through every signature.

use std::net::SocketAddr;

/// The downstream connection of a request.
#[derive(Clone, Debug)]
pub struct ClientInfo {
    /// The peer's address.
    pub remote: SocketAddr,
    /// The address of the listener that accepted the connection.
    pub local: SocketAddr,
    /// Whether the connection was TLS (it is not, until mesh-tls lands on the inbound side).
    pub tls: bool,
}

/// Where a transparently captured connection was going before the kernel redirected it to
/// the proxy (`SO_ORIGINAL_DST` after an iptables `REDIRECT`). Present only on connections
/// that were redirected: a client that dialled the proxy's own port has none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDestination(pub SocketAddr);
