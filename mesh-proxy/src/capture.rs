//! Transparently captured traffic: connections the kernel redirected to the outbound
//! listener (`mesh-proxy iptables install`, Istio's init container rules), and the Bootstrap's
//! `outboundTrafficPolicy` for destinations the mesh does not know.
//!
//! A redirected connection carries its original destination (`SO_ORIGINAL_DST`), read once at
//! accept ([`original_destination`]). Its first bytes decide the path (`crate::detect`):
//! - **HTTP** is served by the outbound HTTP stack and routed by `Host` as any request; the
//!   [`EgressPolicyLayer`] in front of routing handles a `Host` no service or VirtualService
//!   serves: under `ALLOW_ANY` (Istio's default) the request goes on to the original
//!   destination as it was addressed (Istio's `PassthroughCluster`); under `REGISTRY_ONLY` it
//!   is refused `502` with flag `NR` (Istio's `BlackHoleCluster`).
//! - **Anything else** is opaque TCP: to a known service when the original destination is one
//!   of its ServiceEntry `addresses` (VIPs) or endpoints, on the service's port; else, under
//!   `ALLOW_ANY`, straight to the original destination; under `REGISTRY_ONLY` the connection
//!   is closed.
//!
//! A request addressed by `Host` (or absolute URI) to an unknown host on the proxy's own port
//! has no original destination: it is `404 NR` under `ALLOW_ANY` and `502 NR` under
//! `REGISTRY_ONLY`. The proxy never resolves a client-supplied host on its own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures::future::{BoxFuture, Either};
use http::{Request, Response, StatusCode};
use mesh_core::ProxyError;
use mesh_core::body::{BoxBody, BoxError};
use mesh_core::config::MeshConfig;
use mesh_core::config::ServicePort;
use mesh_core::config::networking::OutboundTrafficMode;
use mesh_core::conn::OriginalDestination;
use mesh_core::host::wildcard_matches;
use mesh_core::net::{IpNet, parse_ip_net};
use mesh_core::target::UpstreamTarget;
use mesh_routing::RouteTable;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tower::{Layer, Service, ServiceExt};

use crate::client_hello::Rewind;
use crate::tcp_out::{OutboundTcp, proxy_captured, proxy_captured_hello};
use crate::upstream::{DEFAULT_CONNECT_TIMEOUT, Upstream};

/// Istio's name for the cluster of traffic to destinations the mesh does not know.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";

/// Where a redirected connection was going: `SO_ORIGINAL_DST` (or its IPv6 twin), or `None`
/// when the connection was not redirected (the original destination is the listener itself)
/// or the kernel has no record of it (no conntrack entry: not redirected).
pub fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let sock = socket2::SockRef::from(stream);
    let original = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    }
    .ok()?
    .as_socket()?;
    (original != local).then_some(original)
}

/// The outbound traffic policy mode in force for the proxy `config` describes: its Istio
/// `Sidecar`'s `outboundTrafficPolicy` when one sets it (the workload's, its namespace's or
/// the root namespace's, in that order), else the Bootstrap's, else Istio's default
/// `ALLOW_ANY`. Worked out once per config, with the route table, which carries it.
pub fn outbound_mode(config: &MeshConfig) -> OutboundTrafficMode {
    crate::sidecar_listeners::outbound_traffic_mode(config).unwrap_or_else(|| {
        config
            .bootstrap()
            .map_or(OutboundTrafficMode::AllowAny, |b| {
                b.spec.outbound_traffic_policy.mode
            })
    })
}

/// The services a captured connection may be addressed to, by the address it was dialled
/// at: each ServiceEntry `addresses` entry (a VIP, or a CIDR range of them) with each of its
/// ports, and each endpoint address. Built once per config; looked up per connection: an
/// exact address first, then the narrowest range holding it.
#[derive(Debug, Default)]
pub struct ServiceAddresses {
    by_addr: HashMap<SocketAddr, Arc<ServicePort>>,
    /// `(range, port, service)`, longest prefix first.
    ranges: Vec<(IpNet, u16, Arc<ServicePort>)>,
    /// The `TLS`/`HTTPS` service ports by port number, for a ClientHello's SNI: exact hosts
    /// first, then wildcards, the most specific first.
    tls: HashMap<u16, Vec<Arc<ServicePort>>>,
}

impl ServiceAddresses {
    /// The addresses of `config`'s services that `routes` (the route table built from it
    /// for this proxy) sees: a Sidecar egress scope hides the others.
    pub fn build(config: &MeshConfig, routes: &RouteTable) -> ServiceAddresses {
        let mut by_addr = HashMap::new();
        let mut ranges = Vec::new();
        let services = config.services();
        let sees = |sp: &ServicePort| routes.sees(sp);
        for entry in config.service_entries() {
            for address in &entry.spec.addresses {
                // Validated at load: an IP address or a CIDR; a /32 (/128) is an address.
                let Some(net) = parse_ip_net(address) else {
                    continue;
                };
                for port in &entry.spec.ports {
                    let number = port.number.get();
                    let found = entry
                        .spec
                        .hosts
                        .iter()
                        .find_map(|h| services.lookup(&h.to_ascii_lowercase(), number));
                    let Some(sp) = found.filter(|sp| sees(sp)) else {
                        continue;
                    };
                    if net.prefix_len() == net.max_prefix_len() {
                        by_addr
                            .entry(SocketAddr::new(net.addr(), number))
                            .or_insert_with(|| sp.clone());
                    } else {
                        ranges.push((net, number, sp.clone()));
                    }
                }
            }
        }
        // Narrowest first; among equals the first loaded (a stable sort keeps load order).
        ranges.sort_by_key(|(net, _, _)| std::cmp::Reverse(net.prefix_len()));
        for sp in services.iter().filter(|sp| sees(sp)) {
            for ep in &sp.endpoints {
                by_addr.entry(ep.address).or_insert_with(|| sp.clone());
            }
        }
        let mut tls: HashMap<u16, Vec<Arc<ServicePort>>> = HashMap::new();
        for sp in services
            .iter()
            .filter(|sp| sp.protocol.is_tls() && sees(sp))
        {
            tls.entry(sp.number).or_default().push(sp.clone());
        }
        for ports in tls.values_mut() {
            ports.sort_by_key(|sp| {
                let host = sp.host.as_str();
                (host.starts_with('*'), std::cmp::Reverse(host.len()))
            });
        }
        ServiceAddresses {
            by_addr,
            ranges,
            tls,
        }
    }

    /// Whether some `TLS`/`HTTPS` service has port `port`: whether a ClientHello's SNI on a
    /// connection to that port is worth reading.
    pub fn has_tls_port(&self, port: u16) -> bool {
        self.tls.contains_key(&port)
    }

    /// The `TLS`/`HTTPS` service on `port` whose host names `sni` (exact, else the most
    /// specific wildcard): Envoy's SNI filter chain match on a sidecar's port listener.
    pub fn by_sni(&self, sni: &str, port: u16) -> Option<&Arc<ServicePort>> {
        self.tls
            .get(&port)?
            .iter()
            .find(|sp| wildcard_matches(sp.host.as_str(), sni))
    }

    /// The service dialled at `addr`, if the mesh knows one.
    pub fn get(&self, addr: SocketAddr) -> Option<&Arc<ServicePort>> {
        // An IPv4 destination seen through a dual-stack socket is `::ffff:a.b.c.d`.
        let ip = addr.ip().to_canonical();
        if let Some(found) = self.by_addr.get(&SocketAddr::new(ip, addr.port())) {
            return Some(found);
        }
        self.ranges
            .iter()
            .find(|(net, port, _)| *port == addr.port() && net.contains(&ip))
            .map(|(_, _, service)| service)
    }
}

/// Routing's view of unknown hosts under the Bootstrap's `outboundTrafficPolicy`: see the
/// module docs. Sits just before the route layer.
#[derive(Clone, Debug)]
pub struct EgressPolicyLayer {
    /// The route table knows both which hosts are served and the Bootstrap's mode.
    routes: Arc<ArcSwap<RouteTable>>,
    /// Where passthrough requests go out.
    upstream: Upstream,
}

impl EgressPolicyLayer {
    pub fn new(routes: Arc<ArcSwap<RouteTable>>, upstream: Upstream) -> EgressPolicyLayer {
        EgressPolicyLayer { routes, upstream }
    }
}

impl<S> Layer<S> for EgressPolicyLayer {
    type Service = EgressPolicy<S>;

    fn layer(&self, inner: S) -> EgressPolicy<S> {
        EgressPolicy {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`EgressPolicyLayer`].
#[derive(Clone, Debug)]
pub struct EgressPolicy<S> {
    inner: S,
    layer: EgressPolicyLayer,
}

impl<S> Service<Request<BoxBody>> for EgressPolicy<S>
where
    S: Service<Request<BoxBody>, Response = Response<BoxBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response<BoxBody>, BoxError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<BoxBody>) -> Self::Future {
        let original = req.extensions().get::<OriginalDestination>().copied();
        let mode = {
            let routes = self.layer.routes.load();
            let mode = routes.outbound_mode();
            // The default — ALLOW_ANY on a connection made to the proxy itself — needs no
            // decision here (routing answers an unknown host 404 NR), so the request path pays
            // no second host lookup; otherwise a host the mesh serves goes on unchanged.
            if (mode == OutboundTrafficMode::AllowAny && original.is_none()) || routes.serves(&req)
            {
                return Either::Left(self.inner.call(req));
            }
            mode
        };
        match (mode, original) {
            (OutboundTrafficMode::RegistryOnly, _) => {
                let refused = ProxyError::no_route(mesh_routing::request_authority(&req))
                    .with_status(StatusCode::BAD_GATEWAY);
                Either::Right(Box::pin(std::future::ready(Err(refused.into()))))
            }
            (OutboundTrafficMode::AllowAny, Some(OriginalDestination(addr))) => {
                req.extensions_mut().insert(UpstreamTarget::new(
                    addr,
                    false,
                    Arc::from(PASSTHROUGH_CLUSTER),
                ));
                Either::Right(Box::pin(self.layer.upstream.clone().oneshot(req)))
            }
            // Decided above: routing answers 404 NR.
            (OutboundTrafficMode::AllowAny, None) => Either::Left(self.inner.call(req)),
        }
    }
}

/// What opaque TCP on a captured connection needs.
#[derive(Debug)]
pub struct CapturedTcp {
    pub config: Arc<ArcSwap<MeshConfig>>,
    /// How opaque TCP reaches a mesh service (balancing, mTLS, metrics).
    tcp: Arc<OutboundTcp>,
    /// [`ServiceAddresses`] of the config in force (held, so it is compared by identity),
    /// rebuilt when a reload swaps it.
    addresses: ArcSwap<(Arc<MeshConfig>, ServiceAddresses)>,
}

impl CapturedTcp {
    pub fn new(config: Arc<ArcSwap<MeshConfig>>, tcp: Arc<OutboundTcp>) -> CapturedTcp {
        let first = config.load_full();
        let addresses = ServiceAddresses::build(&first, &tcp.routes());
        CapturedTcp {
            addresses: ArcSwap::from_pointee((first, addresses)),
            config,
            tcp,
        }
    }

    /// The service dialled at `addr` in the config in force.
    pub fn service_at(&self, addr: SocketAddr) -> Option<Arc<ServicePort>> {
        self.addresses().1.get(addr).cloned()
    }

    /// The [`ServiceAddresses`] of the config in force.
    fn addresses(&self) -> Arc<(Arc<MeshConfig>, ServiceAddresses)> {
        let config = self.config.load_full();
        let current = self.addresses.load_full();
        if Arc::ptr_eq(&current.0, &config) {
            return current;
        }
        // A reload swapped the config: index the new one (once; racing builders agree).
        // The routes are swapped in before the config (`proxy.rs`), so they are this config's.
        let addresses = ServiceAddresses::build(&config, &self.tcp.routes());
        let rebuilt = Arc::new((config, addresses));
        self.addresses.store(rebuilt.clone());
        rebuilt
    }

    /// Whether opaque TCP to `addr`, a destination no service claims, may pass: the mode
    /// the route table of the config in force carries (see [`outbound_mode`]).
    pub fn passthrough_allowed(&self) -> bool {
        self.tcp.routes().outbound_mode() == OutboundTrafficMode::AllowAny
    }
}

/// Opaque TCP straight to `original`: Istio's `PassthroughCluster` for a destination the mesh
/// does not know, under `ALLOW_ANY`.
pub async fn passthrough<C>(client: C, remote: SocketAddr, original: SocketAddr)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let upstream = match tokio::time::timeout(DEFAULT_CONNECT_TIMEOUT, TcpStream::connect(original))
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(%remote, %original, error = %e, "passthrough: cannot connect to the original destination");
            return;
        }
        Err(_) => {
            tracing::info!(%remote, %original, "passthrough: connecting to the original destination timed out");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    crate::tcp::copy(client, upstream, remote).await;
}

/// Opaque TCP on a captured connection to `original` (`tls`: it opened with a TLS record):
/// to the service dialled, when the mesh knows one by address; else, for TLS to a port some
/// `TLS`/`HTTPS` service has, to the service its ClientHello's SNI names (as Envoy's sidecar
/// matches SNI on a port listener: `*.wikipedia.org` on 443 with `resolution: NONE`); else
/// straight through under `ALLOW_ANY`, closed under `REGISTRY_ONLY`.
pub async fn opaque(
    mut client: TcpStream,
    remote: SocketAddr,
    original: SocketAddr,
    tls: bool,
    tcp: &CapturedTcp,
) {
    // Failures are logged (naming service and endpoint) by the TCP path itself. The
    // original destination is the address the client dialled, for the TCP routes'
    // `destinationSubnets`, and where `resolution: NONE` services' connections go.
    let addresses = tcp.addresses();
    if let Some(service) = addresses.1.get(original).cloned() {
        drop(addresses);
        tracing::trace!(%remote, %original, service = %service.host, "captured TCP to a mesh service");
        let _ = proxy_captured(client, remote, original, service, &tcp.tcp).await;
        return;
    }
    if !(tls && addresses.1.has_tls_port(original.port())) {
        return unknown(client, remote, original, tcp).await;
    }
    let hello = crate::tcp_out::read_sni(&mut client, remote).await;
    let service = hello
        .sni
        .as_deref()
        .and_then(|sni| addresses.1.by_sni(sni, original.port()))
        .cloned();
    drop(addresses);
    match service {
        Some(service) => {
            tracing::trace!(%remote, %original, service = %service.host, "captured TLS to a service by SNI");
            let _ = proxy_captured_hello(client, hello, remote, original, service, &tcp.tcp).await;
        }
        None => unknown(Rewind::new(hello.bytes, client), remote, original, tcp).await,
    }
}

/// A captured connection the mesh knows no service for: straight through under
/// `ALLOW_ANY`, closed under `REGISTRY_ONLY`.
async fn unknown<C>(client: C, remote: SocketAddr, original: SocketAddr, tcp: &CapturedTcp)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    if tcp.passthrough_allowed() {
        return passthrough(client, remote, original).await;
    }
    tracing::info!(
        %remote,
        %original,
        "captured TCP connection refused: no service is known at its destination and outboundTrafficPolicy is REGISTRY_ONLY"
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use mesh_core::config::{Source, load_sources};

    use super::*;

    /// A `resolution: NONE` ServiceEntry `name` for `host` on `port` (`protocol`), with
    /// `addresses` (a YAML list's items, maybe none).
    fn entry(name: &str, host: &str, addresses: &str, port: u16, protocol: &str) -> String {
        format!(
            "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: {name} }}
spec:
  hosts: [\"{host}\"]
  addresses: [{addresses}]
  ports: [{{ number: {port}, name: p, protocol: {protocol} }}]
  resolution: NONE
"
        )
    }

    #[test]
    fn an_exact_address_wins_then_the_narrowest_range_on_the_port() {
        let yaml = [
            entry("wide", "wide.example", "10.0.0.0/8", 5432, "TCP"),
            entry("narrow", "narrow.example", "10.1.0.0/16", 5432, "TCP"),
            entry("exact", "exact.example", "10.1.2.3", 5432, "TCP"),
            entry(
                "other-port",
                "other-port.example",
                "10.0.0.0/8",
                3306,
                "TCP",
            ),
        ]
        .concat();
        let config = load_sources(&[Source::new("t.yaml", yaml)]).unwrap();
        let addresses = ServiceAddresses::build(&config, &crate::proxy::build_routes(&config));
        let at = |addr: &str| {
            addresses
                .get(addr.parse().unwrap())
                .map(|s| s.host.as_str().to_string())
        };
        assert_eq!(at("10.1.2.3:5432").as_deref(), Some("exact.example"));
        assert_eq!(
            at("[::ffff:10.1.2.3]:5432").as_deref(),
            Some("exact.example")
        );
        assert_eq!(at("10.1.9.9:5432").as_deref(), Some("narrow.example"));
        assert_eq!(at("10.200.0.1:5432").as_deref(), Some("wide.example"));
        // An IPv4 peer seen through a dual-stack socket.
        assert_eq!(
            at("[::ffff:10.200.0.1]:5432").as_deref(),
            Some("wide.example")
        );
        assert_eq!(at("10.200.0.1:3306").as_deref(), Some("other-port.example"));
        assert_eq!(at("10.200.0.1:80"), None);
        assert_eq!(at("192.168.0.1:5432"), None);
    }

    #[test]
    fn a_sidecar_egress_scope_hides_the_addresses_of_services_outside_it() {
        let yaml = [
            "apiVersion: mesh-proxy/v1
kind: Bootstrap
metadata: { name: client, namespace: default }
spec:
  workload: { name: client, labels: { app: client } }
  outbound: { listen: \"127.0.0.1:0\" }
  admin: { listen: \"127.0.0.1:0\" }
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: { name: scope, namespace: default }
spec:
  egress: [{ hosts: [\"./seen.example\"] }]
"
            .to_string(),
            entry("seen", "seen.example", "10.1.0.0/16", 5432, "TCP"),
            entry("hidden", "hidden.example", "10.2.0.1", 5432, "TCP"),
            entry("hidden-tls", "*.hidden.example", "", 443, "TLS"),
        ]
        .concat();
        let config = load_sources(&[Source::new("t.yaml", yaml)]).unwrap();
        let addresses = ServiceAddresses::build(&config, &crate::proxy::build_routes(&config));
        assert!(addresses.get("10.1.2.3:5432".parse().unwrap()).is_some());
        assert!(addresses.get("10.2.0.1:5432".parse().unwrap()).is_none());
        assert!(!addresses.has_tls_port(443));
    }

    #[test]
    fn an_sni_finds_the_exact_host_then_the_most_specific_wildcard_on_the_port() {
        let yaml = [
            entry("any", "*.org", "", 443, "TLS"),
            entry("wiki", "*.wikipedia.org", "", 443, "TLS"),
            entry("en", "en.wikipedia.org", "", 443, "TLS"),
            entry("alt", "*.wikipedia.org", "", 8443, "TLS"),
        ]
        .concat();
        let config = load_sources(&[Source::new("t.yaml", yaml)]).unwrap();
        let addresses = ServiceAddresses::build(&config, &crate::proxy::build_routes(&config));
        let by = |sni: &str, port: u16| {
            addresses
                .by_sni(sni, port)
                .map(|s| s.host.as_str().to_string())
        };
        assert!(addresses.has_tls_port(443) && !addresses.has_tls_port(80));
        assert_eq!(
            by("en.wikipedia.org", 443).as_deref(),
            Some("en.wikipedia.org")
        );
        assert_eq!(
            by("de.wikipedia.org", 443).as_deref(),
            Some("*.wikipedia.org")
        );
        assert_eq!(by("example.org", 443).as_deref(), Some("*.org"));
        assert_eq!(
            by("en.wikipedia.org", 8443).as_deref(),
            Some("*.wikipedia.org")
        );
        assert_eq!(by("example.com", 443), None);
    }
}
