//! Opaque TCP and TLS routes: a VirtualService's `tls` and `tcp` routes, compiled per service
//! port with the HTTP routes ([`RouteTable::build`](crate::RouteTable::build)) and chosen per
//! connection by [`RouteTable::select_tcp`](crate::RouteTable::select_tcp).
//!
//! Istio's sidecar semantics (its outbound TCP filter chains):
//! - The VirtualService that routes a service's TCP traffic is the one that would route its
//!   HTTP traffic: exported to the proxy, bound to `mesh`, the first loaded naming the host
//!   exactly, else the most specific wildcard.
//! - A route applies to a connection when it has no `match`, or when one of its blocks does:
//!   the block's `port` (when set) is the service port and its `sourceLabels`,
//!   `sourceNamespace` and `gateways` select this proxy, all decided when the table is built;
//!   then, per connection, the address the client dialled is in one of its
//!   `destinationSubnets` and the client's own address is in its `sourceSubnet` (each when
//!   set).
//! - `tls` routes come first and apply only to a connection that opened with a TLS
//!   ClientHello naming an SNI: a block also needs one of its `sniHosts` (exact, `*.suffix`
//!   or `*`) to match it. `tcp` routes follow, for TLS and opaque TCP alike.
//! - The first route that applies takes the connection, and its destinations are drawn by
//!   weight, per connection: TCP traffic shifting.
//! - A connection no route takes, and every connection to a service no VirtualService routes
//!   with `tcp`, goes to the service itself with its DestinationRule policy (Istio's default
//!   filter chain for the service).
//! - On a gateway port (a `Gateway` server with protocol `TCP`), the routes are those of the
//!   VirtualServices bound to the Gateways with a server on the port, in load order, and a
//!   connection none applies to is refused (`NR`): there is no service to fall back on.
//! - A destination naming no known service, port or subset is Envoy's missing cluster: the
//!   connection is refused with `NC` and a message naming it, and a weighted split keeps its
//!   proportions.

use std::net::IpAddr;

use mesh_core::config::networking::{L4MatchAttributes, TlsMatchAttributes};
use mesh_core::conn::ClientInfo;
use mesh_core::host::wildcard_matches;
use mesh_core::net::{IpNet, parse_ip_net};
use mesh_core::target::RouteTarget;
use mesh_core::{ProxyError, ResponseFlags};

use crate::destination::{Destinations, Target};

/// The TCP routes of one service port.
#[derive(Debug)]
pub(crate) struct TcpRoutes {
    /// `host:port` or `gateway port N`, for messages.
    name: Box<str>,
    rules: Box<[TcpRule]>,
    /// The service itself, for connections no rule takes; `None` on a gateway port.
    default: Option<Target>,
}

#[derive(Debug)]
pub(crate) struct TcpRule {
    /// Empty: every connection (a route without `match`).
    blocks: Box<[TcpBlock]>,
    destinations: Destinations,
}

/// What is left of a match block to check per connection: its address conditions.
#[derive(Debug)]
pub(crate) struct TcpBlock {
    /// A `tls` route's `sniHosts` (lower case); `None` for a `tcp` route.
    sni_hosts: Option<Box<[Box<str>]>>,
    /// Empty: any destination address.
    destination_subnets: Box<[IpNet]>,
    source_subnet: Option<IpNet>,
}

impl TcpBlock {
    /// Compiles a block's address conditions (validated at load; text that does not parse
    /// would have been refused there, so it is skipped here rather than matching all).
    pub(crate) fn compile(m: &L4MatchAttributes) -> TcpBlock {
        TcpBlock {
            sni_hosts: None,
            destination_subnets: nets(&m.destination_subnets),
            source_subnet: m.source_subnet.as_deref().and_then(parse_ip_net),
        }
    }

    /// A `tls` route's block: its SNI names and destination subnets.
    pub(crate) fn compile_tls(m: &TlsMatchAttributes) -> TcpBlock {
        TcpBlock {
            sni_hosts: Some(
                m.sni_hosts
                    .iter()
                    .map(|h| h.to_ascii_lowercase().into_boxed_str())
                    .collect(),
            ),
            destination_subnets: nets(&m.destination_subnets),
            source_subnet: None,
        }
    }

    fn matches(&self, c: &Connection<'_>) -> bool {
        let sni_ok = match (&self.sni_hosts, c.sni) {
            (None, _) => true,
            (Some(hosts), Some(sni)) => hosts.iter().any(|h| wildcard_matches(h, sni)),
            (Some(_), None) => false,
        };
        let (source, destination) = (c.source, c.destination);
        sni_ok
            && (self.destination_subnets.is_empty()
                || self
                    .destination_subnets
                    .iter()
                    .any(|n| n.contains(&destination)))
            && self.source_subnet.is_none_or(|n| n.contains(&source))
    }
}

impl TcpRule {
    pub(crate) fn new(blocks: Vec<TcpBlock>, destinations: Destinations) -> TcpRule {
        TcpRule {
            blocks: blocks.into(),
            destinations,
        }
    }

    fn applies(&self, c: &Connection<'_>) -> bool {
        self.blocks.is_empty() || self.blocks.iter().any(|b| b.matches(c))
    }
}

impl TcpRoutes {
    pub(crate) fn new(name: String, rules: Vec<TcpRule>, default: Option<Target>) -> TcpRoutes {
        TcpRoutes {
            name: name.into(),
            rules: rules.into(),
            default,
        }
    }

    /// The target for a connection from `client` (its `remote` the source, its `local` the
    /// address it dialled) that opened with a ClientHello naming `sni`, if it did.
    pub(crate) fn select(
        &self,
        client: &ClientInfo,
        sni: Option<&str>,
    ) -> Result<RouteTarget, ProxyError> {
        let connection = Connection {
            // IPv4 peers of a dual-stack listener arrive as `::ffff:a.b.c.d`.
            source: client.remote.ip().to_canonical(),
            destination: client.local.ip().to_canonical(),
            sni,
        };
        let target = match self.rules.iter().find(|r| r.applies(&connection)) {
            Some(rule) => match rule.destinations.pick() {
                Some((_, dest)) => &dest.target,
                None => {
                    return Err(ProxyError::new(
                        ResponseFlags::NO_CLUSTER_FOUND,
                        "no cluster: the TCP route has no destination",
                    ));
                }
            },
            None => match &self.default {
                Some(default) => default,
                None => {
                    return Err(ProxyError::new(
                        ResponseFlags::NO_ROUTE_FOUND,
                        format_args!(
                            "no route: no TCP route of {} matches the connection from {}",
                            self.name, client.remote
                        ),
                    ));
                }
            },
        };
        match target {
            Target::Found(target) => Ok(target.clone()),
            Target::Missing(why) => Err(ProxyError::new(ResponseFlags::NO_CLUSTER_FOUND, why)),
        }
    }
}

/// `destinationSubnets`, parsed (validated at load; what does not parse is left out rather
/// than matching everything).
fn nets(subnets: &[String]) -> Box<[IpNet]> {
    subnets.iter().filter_map(|s| parse_ip_net(s)).collect()
}

/// What a connection is matched on.
struct Connection<'a> {
    source: IpAddr,
    destination: IpAddr,
    /// The ClientHello's server name, lower case.
    sni: Option<&'a str>,
}
