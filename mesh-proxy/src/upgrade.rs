//! HTTP/1.1 upgrades (WebSocket and any other protocol) and `CONNECT` tunnels, through the
//! whole stack, as Envoy (and so Istio's sidecars) proxies them.
//!
//! ```
//! use mesh_proxy::upgrade::{Tunnel, is_upgrade_request};
//!
//! let mut ws = http::Request::get("/chat")
//!     .header("connection", "keep-alive, Upgrade")
//!     .header("upgrade", "websocket")
//!     .body(())
//!     .unwrap();
//! assert!(is_upgrade_request(&ws));
//! // Without the connection hyper's server hands over, there is nothing to tunnel.
//! assert!(matches!(Tunnel::of(&mut ws), Tunnel::None));
//!
//! // `h2c` is a request to switch this very connection to HTTP/2: never forwarded.
//! let h2c = http::Request::get("/")
//!     .header("connection", "upgrade")
//!     .header("upgrade", "h2c")
//!     .body(())
//!     .unwrap();
//! assert!(!is_upgrade_request(&h2c));
//! ```
//!
//! # What is an upgrade
//!
//! An HTTP/1.1 request with `Connection: upgrade` and an `Upgrade` header naming any protocol
//! but `h2c` (Envoy's `isUpgrade`, with `h2c` stripped as Envoy strips it). Istio enables
//! upgrades by default (WebSocket in particular), so every protocol is allowed. HTTP/2
//! requests carry no upgrades; HTTP/1.0 cannot ask for one.
//!
//! [`ProxyHeadersLayer`](crate::headers::ProxyHeadersLayer) keeps `Upgrade` and
//! `Connection: upgrade` on such a request (every other hop-by-hop header still goes), and
//! keeps them on a `101 Switching Protocols` answer; everything else is stripped as before.
//! The layers in between see an ordinary request: routing picks the destination, the
//! balancer the endpoint. The retry layer does not retry an upgrade (nor `CONNECT`): the
//! client's connection can be handed over once. The route timeout bounds the time until the
//! `101` only — the tunnel runs in its own task once the response is returned, as Envoy
//! disables the route timeout for an upgraded stream.
//!
//! # How (in [`Upstream`](crate::upstream::Upstream))
//!
//! - **Upgrade**: the request goes out on a **fresh, dedicated** HTTP/1.1 connection to the
//!   endpoint (secured as any request to it: plaintext, mesh mTLS or TLS origination), never
//!   a pooled one, and that connection is never pooled after: it belongs to the tunnel. An
//!   upgrade always speaks HTTP/1.1 upstream, whatever the cluster's protocol (HTTP/2's
//!   extended CONNECT, RFC 8441, is not implemented). When the endpoint answers `101`, both
//!   connections are taken over (`hyper::upgrade::on` on the client's request and on the
//!   endpoint's response) and joined by [`splice`]; the `101` goes back to the client with
//!   the endpoint's `Upgrade`, `Connection` and `Sec-WebSocket-*` headers. Any other answer
//!   (`200`, `400`, `426`) is an ordinary response and the connection closes after it.
//! - **CONNECT** (`CONNECT host:port`, HTTP/1.1): Envoy's semantics for an HTTP proxy with
//!   CONNECT enabled. The authority is routed like any `Host` (an unknown one answers
//!   `404 NR`), the balancer picks an endpoint of the service, the proxy opens a connection
//!   to it (secured as any request to it), answers `200`, and joins the two. Over HTTP/2 a
//!   `CONNECT` that hyper hands over the same way takes the same path, untested; extended
//!   CONNECT (`:protocol`) is out of scope.
//! - **Failures** are those of any request: an endpoint that refuses the connection is
//!   `503 UF`; a cluster at `maxConnections` is `503 UO` (a tunnel holds its connection slot
//!   for as long as it lasts). Once tunnelled, a side that closes or fails ends the tunnel.
//! - **Half-close**: when one side's read ends, the other side's write is shut down (TCP
//!   FIN; over TLS, `close_notify` then FIN), and bytes keep flowing the other way until it
//!   ends too: a client may send its last message, shut its write side and still read every
//!   byte the server sends after (Envoy's half-close on upgraded streams).
//! - **Without a connection to take over** (an embedding that does not serve through hyper,
//!   a server built without upgrades, a mirrored copy): the upgrade headers are removed and
//!   the request goes out as an ordinary one, since a `101` could not be honoured.
//!
//! Telemetry sees the `101` (or the `200` of a `CONNECT`) as the response, as Envoy logs it;
//! the bytes of the tunnel are not counted in `istio_request_bytes`/`istio_response_bytes`.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// The `Connection` value an upgrade request and its `101` carry.
pub const CONNECTION_UPGRADE: HeaderValue = HeaderValue::from_static("upgrade");

/// Whether `req` asks to switch protocols on its HTTP/1.1 connection: `Connection` names
/// `upgrade` and `Upgrade` names a protocol other than `h2c`.
pub fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11 && is_upgrade_headers(req.headers())
}

/// [`is_upgrade_request`] on headers alone.
pub fn is_upgrade_headers(headers: &HeaderMap) -> bool {
    has_token(headers, header::CONNECTION, "upgrade")
        && headers.contains_key(header::UPGRADE)
        && !has_token(headers, header::UPGRADE, "h2c")
}

/// Whether any comma-separated token of `name`'s values is `token` (ASCII case-insensitive).
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// What the upstream client does with a request.
#[derive(Debug)]
pub enum Tunnel {
    /// An ordinary request.
    None,
    /// An HTTP/1.1 upgrade; the client's connection once the `101` is written.
    Upgrade(OnUpgrade),
    /// A `CONNECT`; the client's connection once the `200` is written.
    Connect(OnUpgrade),
}

impl Tunnel {
    /// Classifies `req`, taking the client's connection hand-over out of its extensions when
    /// it is a tunnel. An upgrade request without one loses its upgrade headers and becomes
    /// an ordinary request (see the module docs); a `CONNECT` without one stays `None` and
    /// the caller refuses it.
    pub fn of<B>(req: &mut Request<B>) -> Tunnel {
        let connect = req.method() == Method::CONNECT;
        let upgrade = !connect && is_upgrade_request(req);
        if !connect && !upgrade {
            return Tunnel::None;
        }
        match req.extensions_mut().remove::<OnUpgrade>() {
            Some(on) if connect => Tunnel::Connect(on),
            Some(on) => Tunnel::Upgrade(on),
            None => {
                if upgrade {
                    req.headers_mut().remove(header::UPGRADE);
                    req.headers_mut().remove(header::CONNECTION);
                }
                Tunnel::None
            }
        }
    }
}

/// What a tunnel's log lines name: the service and the endpoint.
#[derive(Clone, Debug)]
pub struct TunnelName {
    pub service: Arc<str>,
    pub endpoint: SocketAddr,
    pub kind: &'static str,
}

impl fmt::Display for TunnelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} to {} endpoint {}",
            self.kind, self.service, self.endpoint
        )
    }
}

/// Joins the client's connection (once hyper hands it over) to the endpoint's (once
/// `upstream` yields it) and copies bytes both ways until both directions have ended,
/// passing on each side's end of stream as a write shutdown to the other (half-close), or
/// until it has been idle an hour. `hold` (the cluster's connection slot) is released when
/// the tunnel ends.
pub async fn splice<U, E, H>(
    downstream: OnUpgrade,
    upstream: impl Future<Output = Result<U, E>>,
    name: TunnelName,
    hold: H,
) where
    U: AsyncRead + AsyncWrite + Unpin,
    E: fmt::Display,
{
    let client = match downstream.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            tracing::debug!(tunnel = %name, error = %e, "the client connection was not handed over");
            return;
        }
    };
    let mut server = match upstream.await {
        Ok(io) => io,
        Err(e) => {
            tracing::debug!(tunnel = %name, error = %e, "the endpoint connection was not handed over");
            return;
        }
    };
    // Every byte of the tunnel crosses the client side, so tracking it sees both directions.
    let (mut client, activity) = crate::idle::Tracked::new(TokioIo::new(client));
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut server) => match copied {
            Ok((sent, received)) => {
                tracing::debug!(tunnel = %name, sent, received, "tunnel closed");
            }
            Err(e) => {
                tracing::debug!(tunnel = %name, error = %e, "tunnel ended with an error");
            }
        },
        () = activity.idle_for(TUNNEL_IDLE_TIMEOUT) => {
            tracing::debug!(tunnel = %name, "idle tunnel closed");
        }
    }
    drop(hold);
}

/// A tunnel with no byte either way for this long is closed: Istio's idle timeout for
/// connections (1 h), as for opaque TCP.
const TUNNEL_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get("/").version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn recognises_upgrades_as_envoy_does() {
        let ws = [("connection", "Upgrade"), ("upgrade", "websocket")];
        assert!(is_upgrade_request(&req(Version::HTTP_11, &ws)));
        assert!(is_upgrade_request(&req(
            Version::HTTP_11,
            &[
                ("connection", "keep-alive, UPGRADE"),
                ("upgrade", "custom-proto")
            ]
        )));
        // Not HTTP/1.1, no `Connection: upgrade`, no `Upgrade`, or h2c: not an upgrade.
        assert!(!is_upgrade_request(&req(Version::HTTP_10, &ws)));
        assert!(!is_upgrade_request(&req(Version::HTTP_2, &ws)));
        assert!(!is_upgrade_request(&req(
            Version::HTTP_11,
            &[("connection", "keep-alive"), ("upgrade", "websocket")]
        )));
        assert!(!is_upgrade_request(&req(
            Version::HTTP_11,
            &[("connection", "upgrade")]
        )));
        assert!(!is_upgrade_request(&req(
            Version::HTTP_11,
            &[
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", "H2C")
            ]
        )));
    }

    #[test]
    fn an_upgrade_without_a_connection_to_take_over_is_an_ordinary_request() {
        let mut r = req(
            Version::HTTP_11,
            &[("connection", "upgrade"), ("upgrade", "websocket")],
        );
        assert!(matches!(Tunnel::of(&mut r), Tunnel::None));
        assert!(r.headers().get("upgrade").is_none());
        assert!(r.headers().get("connection").is_none());

        let mut connect = Request::connect("echo:7000").body(()).unwrap();
        assert!(matches!(Tunnel::of(&mut connect), Tunnel::None));
    }
}
