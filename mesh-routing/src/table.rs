//! The route table: per virtual host (host and port), the ordered HTTP routes, compiled from
//! VirtualServices, DestinationRules and ServiceEntries for one proxy.
//!
//! Building resolves everything that is static for the proxy, so a request only looks up
//! and matches:
//! - VirtualServices apply when exported to the proxy's namespace and bound to its gateways
//!   (`gateways` empty or `mesh` for a sidecar). Match blocks whose `port` differs from the
//!   virtual host's, or whose `sourceLabels` / `sourceNamespace` / `gateways` cannot match
//!   this proxy, are dropped; a route left with no block is dropped (it can never match).
//! - Every ServiceEntry port is a virtual host. One VirtualService serves a host: the first
//!   loaded that names it exactly, else the most specific wildcard one. Two binding the same
//!   host to the mesh are rejected at load (Istio merges VirtualServices only on gateways);
//!   should a config reach the table with one anyway, the later one is ignored for that host,
//!   with a warning. A host no VirtualService routes (or whose VirtualService has no route left for
//!   this proxy and port) gets one default route to itself, Istio's default route.
//! - A VirtualService host that no ServiceEntry defines gets a virtual host on port 80 only:
//!   Istio builds sidecar routes for services it knows, plus port 80 for other names so a
//!   VirtualService can steer traffic for external names; any other port of such a host is
//!   not routed (404 NR).
//! - Delegation (`delegate`) is expanded into the delegating route, as Istio merges them.
//! - On a gateway (`SourceContext::gateways` not empty), each port of the Gateway servers
//!   that select the proxy gets its own virtual hosts, as Istio builds one route
//!   configuration per gateway port: every host (exact, `*.suffix` or `*`) of the
//!   VirtualServices bound to a Gateway with a server on that port, with match blocks
//!   filtered by that port. A request accepted on a listener whose port is a gateway port
//!   (its `ClientInfo::local`) is routed by its host alone there: the authority's port is
//!   ignored (Envoy's gateway domains are `host` and `host:*`), and no ServiceEntry host is
//!   routed without a VirtualService (a gateway exposes only what is bound to it).
//!
//! - Every service port also gets its routes for connections proxied as bytes: the `tls`
//!   routes (by SNI), then the `tcp` routes, of the VirtualService that serves the host,
//!   filtered the same way, then the service itself (see `crate::tcp`).
//!
//! Lookup is one hash probe on the lower-cased host (every alias a client may use,
//! `HostName::aliases`), then a scan of that host's few ports; wildcard hosts are tried after,
//! most specific first. Nothing allocates on a hit.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use http::Request;
use mesh_core::config::networking::{
    HttpMatchRequest, HttpRoute, L4MatchAttributes, OutboundTrafficMode, RouteDestination,
    TlsMatchAttributes, VirtualService,
};
use mesh_core::config::{MeshConfig, ServicePort, exported_to};
use mesh_core::conn::ClientInfo;
use mesh_core::host::{HostName, split_authority, wildcard_matches};
use mesh_core::labels::Labels;
use mesh_core::{ProxyError, ResponseFlags};

use crate::authority::request_authority;
use crate::delegate;
use crate::destination::{Destinations, Resolver};
use crate::headers::HeaderRules;
use crate::matcher::{MatchBlock, QuickKey, QuickPrefix, RequestView};
use crate::route::RouteRule;
use crate::scope::HostPattern;
use crate::tcp::{TcpBlock, TcpRoutes, TcpRule};

/// Who this proxy is, as far as routing cares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceContext {
    /// The proxy's namespace: where short names resolve, what `exportTo` and
    /// `sourceNamespace` are checked against.
    pub namespace: String,
    /// The proxy's workload labels, for `sourceLabels` and DestinationRule
    /// `workloadSelector`s.
    pub labels: Labels,
    /// The gateways this proxy is, as `namespace/name`; empty for a sidecar (Istio's implicit
    /// `mesh`).
    pub gateways: Vec<String>,
    /// The services a sidecar sees, as its Istio `Sidecar`'s catch-all egress entry (the one
    /// without a port) names them; `None`: every service exported to it. Hosts outside are
    /// not routed: unknown to the proxy, as Istio leaves them out of the sidecar's config.
    pub egress_hosts: Option<Vec<HostPattern>>,
}

impl SourceContext {
    /// A sidecar in `namespace` with workload `labels`.
    pub fn sidecar(namespace: impl Into<String>, labels: Labels) -> SourceContext {
        SourceContext {
            namespace: namespace.into(),
            labels,
            gateways: Vec::new(),
            egress_hosts: None,
        }
    }

    /// The sidecar `config`'s Bootstrap describes (its namespace and workload labels); a
    /// config without a Bootstrap is a sidecar in the default namespace with no labels.
    pub fn from_config(config: &MeshConfig) -> SourceContext {
        SourceContext::sidecar(
            config.proxy_namespace(),
            config
                .bootstrap()
                .map(|b| b.spec.workload.labels.clone())
                .unwrap_or_default(),
        )
    }

    /// Whether the sidecar's egress scope takes `service`.
    pub fn sees(&self, service: &ServicePort) -> bool {
        self.egress_hosts
            .as_ref()
            .is_none_or(|hosts| hosts.iter().any(|h| h.matches(service)))
    }

    /// Whether the sidecar's egress scope takes `host`, declared in `namespace`.
    fn sees_host(&self, namespace: &str, host: &HostName) -> bool {
        self.egress_hosts
            .as_ref()
            .is_none_or(|hosts| hosts.iter().any(|h| h.matches_host(namespace, host)))
    }

    /// Whether a VirtualService in `namespace` naming `gateway` addresses this proxy.
    fn is_gateway(&self, gateway: &str, namespace: &str) -> bool {
        if gateway == "mesh" {
            return self.gateways.is_empty() || self.gateways.iter().any(|g| g == "mesh");
        }
        match gateway.split_once('/') {
            Some(_) => self.gateways.iter().any(|g| g == gateway),
            None => self.gateways.iter().any(|g| {
                g.split_once('/')
                    .is_some_and(|(ns, name)| ns == namespace && name == gateway)
            }),
        }
    }

    /// Istio's `sourceMatchHTTP`: a block's `gateways` decide alone when set; otherwise its
    /// `sourceLabels` must select this proxy and `sourceNamespace` be its namespace.
    fn selects(&self, m: &HttpMatchRequest, vs_namespace: &str) -> bool {
        self.selected_by(
            &m.gateways,
            &m.source_labels,
            m.source_namespace.as_deref(),
            vs_namespace,
        )
    }

    /// [`selects`](Self::selects) for a `tcp` route's match block (Istio's `matchTCP`).
    fn selects_l4(&self, m: &L4MatchAttributes, vs_namespace: &str) -> bool {
        self.selected_by(
            &m.gateways,
            &m.source_labels,
            m.source_namespace.as_deref(),
            vs_namespace,
        )
    }

    /// [`selects`](Self::selects) for a `tls` route's match block.
    fn selects_tls(&self, m: &TlsMatchAttributes, vs_namespace: &str) -> bool {
        self.selected_by(
            &m.gateways,
            &m.source_labels,
            m.source_namespace.as_deref(),
            vs_namespace,
        )
    }

    fn selected_by(
        &self,
        gateways: &[String],
        source_labels: &Labels,
        source_namespace: Option<&str>,
        vs_namespace: &str,
    ) -> bool {
        if !gateways.is_empty() {
            return gateways.iter().any(|g| self.is_gateway(g, vs_namespace));
        }
        self.labels.matches(source_labels) && source_namespace.is_none_or(|ns| ns == self.namespace)
    }
}

/// A host and port's routes.
#[derive(Debug)]
pub(crate) struct VirtualHost {
    /// `host:port`, for messages.
    name: Arc<str>,
    routes: Arc<Routes>,
}

/// Ordered routes, with each one's necessary path prefix side by side for a fast scan.
#[derive(Debug)]
struct Routes {
    quick: Box<[QuickPrefix]>,
    rules: Box<[Arc<RouteRule>]>,
}

impl Routes {
    fn new(rules: Vec<RouteRule>) -> Routes {
        Routes {
            quick: rules
                .iter()
                .map(|r| QuickPrefix::for_blocks(&r.blocks))
                .collect(),
            rules: rules.into_iter().map(Arc::new).collect(),
        }
    }
}

/// The routing decisions for every host this proxy knows: per host and port (every alias a
/// client may use), the ordered HTTP routes with their destinations resolved. Hosts of
/// ServiceEntries without a VirtualService get a default route to themselves; VirtualService
/// hosts that no ServiceEntry defines are routed on port 80 only. Share it as
/// `Arc<ArcSwap<RouteTable>>` with [`RouteLayer`](crate::RouteLayer) and swap in a rebuilt
/// one when the configuration changes.
#[derive(Debug, Default)]
pub struct RouteTable {
    hosts: HashMap<Box<str>, Vec<(u16, Arc<VirtualHost>)>>,
    /// Most specific first.
    wildcards: Vec<(Box<str>, u16, Arc<VirtualHost>)>,
    /// Gateway virtual hosts: host → (gateway port, routes); see the module docs.
    gateway_hosts: HashMap<Box<str>, Vec<(u16, Arc<VirtualHost>)>>,
    /// Gateway wildcard hosts (`*` included), most specific first.
    gateway_wildcards: Vec<(Box<str>, u16, Arc<VirtualHost>)>,
    /// The ports of the Gateway servers that select this proxy; empty for a sidecar.
    gateway_ports: Vec<u16>,
    /// TLS and opaque TCP routes per service host (its canonical name) and port; see
    /// `crate::tcp`.
    tcp: HashMap<Box<str>, Vec<(u16, Arc<TcpRoutes>)>>,
    /// The TLS and opaque TCP routes of the VirtualServices bound to this proxy's Gateways,
    /// per gateway port.
    gateway_tcp: Vec<(u16, Arc<TcpRoutes>)>,
    /// The Bootstrap's `outboundTrafficPolicy.mode`: what becomes of hosts no virtual host
    /// serves (the proxy's egress policy layer reads it with the table it goes with).
    outbound_mode: OutboundTrafficMode,
    /// Who the table was built for: its Sidecar egress scope is what [`sees`](Self::sees)
    /// answers from.
    source: SourceContext,
    warnings: Vec<String>,
}

/// The route a request matched.
#[derive(Clone, Debug)]
pub struct Selection {
    pub(crate) route: Arc<RouteRule>,
    pub(crate) block: usize,
}

impl Selection {
    /// The route's `name`, if it has one (`default` for a service's default route).
    pub fn route_name(&self) -> Option<&str> {
        self.route.name.as_deref()
    }

    /// The `name` of the match block that matched, if it has one.
    pub fn match_name(&self) -> Option<&str> {
        self.route.blocks.get(self.block)?.name.as_deref()
    }
}

impl RouteTable {
    /// Compiles the routes of `config` as the proxy `source` sees them. Infallible on a
    /// validated config; what can only be judged across resources (a delegate that does not
    /// exist, a mirror to an unknown host) is logged and listed in
    /// [`warnings`](Self::warnings).
    pub fn build(config: &MeshConfig, source: &SourceContext) -> RouteTable {
        let mut table = Builder::new(config, source).build();
        table.source = source.clone();
        table.outbound_mode = config
            .bootstrap()
            .map_or(OutboundTrafficMode::AllowAny, |b| {
                b.spec.outbound_traffic_policy.mode
            });
        table
    }

    /// Whether the proxy the table was built for sees `service` (its Sidecar egress scope;
    /// every service without one): what else that proxy knows by address must agree.
    pub fn sees(&self, service: &ServicePort) -> bool {
        self.source.sees(service)
    }

    /// The Bootstrap's `outboundTrafficPolicy.mode` (Istio's default `ALLOW_ANY` without one),
    /// or the one given to [`with_outbound_mode`](Self::with_outbound_mode).
    pub fn outbound_mode(&self) -> OutboundTrafficMode {
        self.outbound_mode
    }

    /// The table with another outbound traffic policy mode: a proxy whose Istio `Sidecar`
    /// sets `outboundTrafficPolicy` overrides the mesh-wide one with it.
    pub fn with_outbound_mode(mut self, mode: OutboundTrafficMode) -> RouteTable {
        self.outbound_mode = mode;
        self
    }

    /// What was ignored while building, one line each.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// How many (name, port) pairs route, aliases included.
    pub fn len(&self) -> usize {
        self.hosts.values().map(Vec::len).sum::<usize>()
            + self.wildcards.len()
            + self.gateway_hosts.values().map(Vec::len).sum::<usize>()
            + self.gateway_wildcards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Finds the route for a request: the virtual host of its authority (URI authority,
    /// else `Host`; no port is 80), then the first route with a matching block.
    ///
    /// A request accepted on a gateway port (its `ClientInfo` local port) is looked up among
    /// that port's gateway virtual hosts by host alone.
    ///
    /// Errors: 404 `NR` when no virtual host serves the authority, or when one does but none
    /// of its routes matches.
    pub fn select<B>(&self, req: &Request<B>) -> Result<Selection, ProxyError> {
        let authority = request_authority(req);
        let vhost = self
            .virtual_host_of(req, authority)
            .ok_or_else(|| ProxyError::no_route(authority))?;
        let view = RequestView::new(req, authority);
        let routes = &vhost.routes;
        let key = QuickKey::new(view.path_and_query);
        routes
            .quick
            .iter()
            .zip(routes.rules.iter())
            .filter(|(quick, _)| quick.admits(&key))
            .find_map(|(_, route)| {
                route.matching_block(&view).map(|block| Selection {
                    route: route.clone(),
                    block,
                })
            })
            .ok_or_else(|| {
                ProxyError::new(
                    ResponseFlags::NO_ROUTE_FOUND,
                    format_args!(
                        "no route: no route of {} matches {} {}",
                        vhost.name, view.method, view.path
                    ),
                )
            })
    }

    /// The route of an opaque TCP connection from `client` to `service` (a port of the
    /// registry the table was built from), `sni` the server name of the TLS ClientHello it
    /// opened with, if any: the target its VirtualService's `tls` routes (by SNI) or `tcp`
    /// routes draw (port, source and subnet matches, weights), else the service itself with
    /// its DestinationRule policy. `None` when the table does not
    /// know the service port (built from another config snapshot).
    ///
    /// Errors: `NC` when the route's destination is not a known service, port or subset.
    pub fn select_tcp(
        &self,
        service: &ServicePort,
        client: &ClientInfo,
        sni: Option<&str>,
    ) -> Option<Result<mesh_core::target::RouteTarget, ProxyError>> {
        let (_, routes) = self
            .tcp
            .get(service.host.as_str())?
            .iter()
            .find(|(port, _)| *port == service.number)?;
        Some(routes.select(client, sni))
    }

    /// The route of a connection from `client` accepted on gateway port `port` (a Gateway
    /// server with protocol `TCP`), `sni` as for [`select_tcp`](Self::select_tcp): the `tls`
    /// and `tcp` routes of the VirtualServices bound to the Gateways with a server on that
    /// port, in load order. `None` when no such route names the port.
    ///
    /// Errors: `NR` when no route applies to the connection (a gateway port has no service
    /// of its own to fall back on), `NC` when the route's destination is unknown.
    pub fn select_gateway_tcp(
        &self,
        port: u16,
        client: &ClientInfo,
        sni: Option<&str>,
    ) -> Option<Result<mesh_core::target::RouteTarget, ProxyError>> {
        let (_, routes) = self.gateway_tcp.iter().find(|(p, _)| *p == port)?;
        Some(routes.select(client, sni))
    }

    /// Whether some virtual host serves the request's authority (whether or not one of its
    /// routes then matches): what tells a host the mesh knows from one it does not, for the
    /// proxy's `outboundTrafficPolicy`.
    pub fn serves<B>(&self, req: &Request<B>) -> bool {
        self.virtual_host_of(req, request_authority(req)).is_some()
    }

    /// The virtual host for `authority` (the request's): among the gateway virtual hosts of
    /// the port it arrived on, or the sidecar's.
    fn virtual_host_of<B>(&self, req: &Request<B>, authority: &str) -> Option<&VirtualHost> {
        let gateway_port = if self.gateway_ports.is_empty() {
            None
        } else {
            req.extensions()
                .get::<ClientInfo>()
                .map(|info| info.local.port())
                .filter(|port| self.gateway_ports.contains(port))
        };
        let (host, port) = split_authority(authority)?;
        // Clients send lower-case hosts almost always; only the rare other case allocates.
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        match gateway_port {
            Some(port) => self.gateway_virtual_host(host, port),
            None => self.virtual_host(host, port),
        }
    }

    fn virtual_host(&self, host: &str, port: u16) -> Option<&VirtualHost> {
        let by_name = self
            .hosts
            .get(host)
            .and_then(|ports| ports.iter().find(|(p, _)| *p == port));
        match by_name {
            Some((_, vhost)) => Some(vhost),
            None => self
                .wildcards
                .iter()
                .find(|(pattern, p, _)| *p == port && wildcard_matches(pattern, host))
                .map(|(_, _, vhost)| &**vhost),
        }
    }

    fn gateway_virtual_host(&self, host: &str, port: u16) -> Option<&VirtualHost> {
        let by_name = self
            .gateway_hosts
            .get(host)
            .and_then(|ports| ports.iter().find(|(p, _)| *p == port));
        match by_name {
            Some((_, vhost)) => Some(vhost),
            None => self
                .gateway_wildcards
                .iter()
                .find(|(pattern, p, _)| *p == port && wildcard_matches(pattern, host))
                .map(|(_, _, vhost)| &**vhost),
        }
    }

    /// Adds `host:port` unless it is there already (the first definition wins).
    fn insert(&mut self, host: &str, port: u16, vhost: &Arc<VirtualHost>) {
        insert_into(&mut self.hosts, &mut self.wildcards, host, port, vhost);
    }

    /// [`insert`](Self::insert) for a gateway port's virtual hosts.
    fn insert_gateway(&mut self, host: &str, port: u16, vhost: &Arc<VirtualHost>) {
        insert_into(
            &mut self.gateway_hosts,
            &mut self.gateway_wildcards,
            host,
            port,
            vhost,
        );
    }
}

type HostMap = HashMap<Box<str>, Vec<(u16, Arc<VirtualHost>)>>;
type WildcardList = Vec<(Box<str>, u16, Arc<VirtualHost>)>;

fn insert_into(
    hosts: &mut HostMap,
    wildcards: &mut WildcardList,
    host: &str,
    port: u16,
    vhost: &Arc<VirtualHost>,
) {
    if host.starts_with('*') {
        if !wildcards.iter().any(|(h, p, _)| &**h == host && *p == port) {
            wildcards.push((host.into(), port, vhost.clone()));
        }
        return;
    }
    let ports = hosts.entry(host.into()).or_default();
    if !ports.iter().any(|(p, _)| *p == port) {
        ports.push((port, vhost.clone()));
    }
}

struct Builder<'a> {
    config: &'a MeshConfig,
    source: &'a SourceContext,
    resolver: Resolver<'a>,
    /// The VirtualServices that apply to this proxy, in load order.
    virtual_services: Vec<&'a VirtualService>,
    /// Compiled routes per (virtual service, port); `None`: no route survived.
    compiled: HashMap<(usize, u16), Option<Arc<Routes>>>,
    table: RouteTable,
}

impl<'a> Builder<'a> {
    fn new(config: &'a MeshConfig, source: &'a SourceContext) -> Builder<'a> {
        let virtual_services = config
            .virtual_services()
            .iter()
            .filter(|vs| !vs.spec.hosts.is_empty())
            .filter(|vs| exported_to(&vs.spec.export_to, vs.namespace(), &source.namespace))
            .filter(|vs| {
                if vs.spec.gateways.is_empty() {
                    source.is_gateway("mesh", vs.namespace())
                } else {
                    vs.spec
                        .gateways
                        .iter()
                        .any(|g| source.is_gateway(g, vs.namespace()))
                }
            })
            .collect();
        Builder {
            config,
            source,
            resolver: Resolver::new(config, source),
            virtual_services,
            compiled: HashMap::new(),
            table: RouteTable::default(),
        }
    }

    fn warn(&mut self, message: String) {
        tracing::warn!("{message}");
        self.table.warnings.push(message);
    }

    fn build(mut self) -> RouteTable {
        // Which VirtualService serves each host name.
        let mut exact: HashMap<&'a str, usize> = HashMap::new();
        let mut wildcard: Vec<(&'a str, usize)> = Vec::new();
        for (i, vs) in self.virtual_services.clone().into_iter().enumerate() {
            for host in &vs.spec.hosts {
                if host.starts_with('*') {
                    wildcard.push((host, i));
                } else if let Some(first) = exact.get(host.as_str()) {
                    let first = self.virtual_services[*first];
                    if !std::ptr::eq(first, vs) {
                        self.warn(format!(
                            "VirtualService {}/{} also routes {host}, which VirtualService {}/{} routes; ignored for that host",
                            vs.namespace(),
                            vs.name(),
                            first.namespace(),
                            first.name()
                        ));
                    }
                } else {
                    exact.insert(host, i);
                }
            }
        }
        // Longest pattern first: the most specific wildcard wins.
        wildcard.sort_by_key(|(host, _)| std::cmp::Reverse(host.len()));
        let vs_for = |host: &str| {
            exact.get(host).copied().or_else(|| {
                wildcard
                    .iter()
                    .find(|(pattern, _)| wildcard_matches(pattern, host))
                    .map(|(_, i)| *i)
            })
        };

        // Every service port, then the aliases of their names.
        let registry = self.resolver.registry();
        let mut service_hosts = HashSet::new();
        let mut named = Vec::new();
        for service in registry.iter() {
            service_hosts.insert(service.host.as_str());
            if !self.source.sees(service) {
                continue;
            }
            let serving = vs_for(service.host.as_str());
            let routes = serving
                .and_then(|i| self.routes_for(i, service.number))
                .unwrap_or_else(|| self.default_routes(service));
            let tcp = self.tcp_routes(serving, service);
            self.table
                .tcp
                .entry(service.host.as_str().into())
                .or_default()
                .push((service.number, tcp));
            let vhost = Arc::new(VirtualHost {
                name: format!("{}:{}", service.host, service.number).into(),
                routes,
            });
            self.table
                .insert(service.host.as_str(), service.number, &vhost);
            named.push((&service.host, service.number, vhost));
        }

        // VirtualService hosts outside the registry: port 80 only (Istio's sidecar rule).
        let mut external = Vec::new();
        for (host, i) in exact
            .iter()
            .map(|(h, i)| (*h, *i))
            .chain(wildcard.iter().copied())
        {
            let known = if host.starts_with('*') {
                service_hosts.iter().any(|s| wildcard_matches(host, s))
            } else {
                service_hosts.contains(host)
            };
            let vs_namespace = self.virtual_services[i].namespace();
            let name = HostName::qualify(host, vs_namespace);
            if !known
                && self.source.sees_host(vs_namespace, &name)
                && let Some(routes) = self.routes_for(i, 80)
            {
                let vhost = Arc::new(VirtualHost {
                    name: format!("{host}:80").into(),
                    routes,
                });
                self.table.insert(host, 80, &vhost);
                external.push((name, vhost));
            }
        }
        let namespace = self.resolver.namespace().to_string();
        for (host, port, vhost) in &named {
            if !host.is_wildcard() {
                for alias in host.aliases(&namespace) {
                    self.table.insert(&alias, *port, vhost);
                }
            }
        }
        for (host, vhost) in &external {
            if !host.is_wildcard() {
                for alias in host.aliases(&namespace) {
                    self.table.insert(&alias, 80, vhost);
                }
            }
        }
        self.table
            .wildcards
            .sort_by_key(|(pattern, _, _)| std::cmp::Reverse(pattern.len()));
        self.build_gateways(&namespace);
        self.table
    }

    /// The gateway virtual hosts: per port of the Gateway servers that select this proxy,
    /// every host of the VirtualServices bound to a Gateway with a server on that port
    /// (the first VirtualService naming a host wins, as on the sidecar).
    fn build_gateways(&mut self, namespace: &str) {
        if self.source.gateways.is_empty() {
            return;
        }
        // Port → the `namespace/name`s of this proxy's Gateways with a server on it.
        let mut ports: Vec<(u16, Vec<String>)> = Vec::new();
        for gw in self.config.gateways() {
            let name = format!("{}/{}", gw.namespace(), gw.name());
            if !self.source.gateways.contains(&name) {
                continue;
            }
            for server in &gw.spec.servers {
                let port = server.port.number.get();
                match ports.iter_mut().find(|(p, _)| *p == port) {
                    Some((_, names)) if names.contains(&name) => {}
                    Some((_, names)) => names.push(name.clone()),
                    None => ports.push((port, vec![name.clone()])),
                }
            }
        }
        for (port, names) in ports {
            self.table.gateway_ports.push(port);
            let mut tcp_rules = Vec::new();
            for i in 0..self.virtual_services.len() {
                let vs = self.virtual_services[i];
                let bound = vs.spec.gateways.iter().any(|g| {
                    let qualified = match g.split_once('/') {
                        Some(_) => g.clone(),
                        None => format!("{}/{g}", vs.namespace()),
                    };
                    names.contains(&qualified)
                });
                if !bound {
                    continue;
                }
                tcp_rules.extend(self.l4_rules(vs, port));
                let Some(routes) = self.routes_for(i, port) else {
                    continue;
                };
                for host in &vs.spec.hosts {
                    let vhost = Arc::new(VirtualHost {
                        name: format!("{host}:{port}").into(),
                        routes: routes.clone(),
                    });
                    let name = HostName::qualify(host, vs.namespace());
                    if name.as_str().starts_with('*') {
                        self.table.insert_gateway(name.as_str(), port, &vhost);
                    } else {
                        for alias in name.aliases(namespace) {
                            self.table.insert_gateway(&alias, port, &vhost);
                        }
                    }
                }
            }
            if !tcp_rules.is_empty() {
                // A gateway port has no service of its own to fall back on.
                let routes = TcpRoutes::new(format!("gateway port {port}"), tcp_rules, None);
                self.table.gateway_tcp.push((port, Arc::new(routes)));
            }
        }
        self.table
            .gateway_wildcards
            .sort_by_key(|(pattern, _, _)| std::cmp::Reverse(pattern.len()));
    }

    fn default_routes(&mut self, service: &Arc<ServicePort>) -> Arc<Routes> {
        let retry = self
            .resolver
            .retry(mesh_core::target::RetryPolicy::istio_default());
        let target = self
            .resolver
            .target(service, service.host.as_str(), None, None, &retry);
        Arc::new(Routes::new(vec![RouteRule::default_route(target)]))
    }

    /// The routes of `service` for connections proxied as bytes: virtual service `i`'s `tls`
    /// and `tcp` routes whose blocks can match this proxy on the service's port, then the
    /// service itself.
    fn tcp_routes(&mut self, i: Option<usize>, service: &Arc<ServicePort>) -> Arc<TcpRoutes> {
        let no_retry = self.resolver.no_retry();
        let rules = match i {
            Some(i) => self.l4_rules(self.virtual_services[i], service.number),
            None => Vec::new(),
        };
        let default = self
            .resolver
            .target(service, service.host.as_str(), None, None, &no_retry);
        let name = format!("{}:{}", service.host, service.number);
        Arc::new(TcpRoutes::new(name, rules, Some(default)))
    }

    /// `vs`'s `tls` routes, then its `tcp` routes, with the blocks that can match this proxy
    /// on `port`; a route left without a block is dropped.
    fn l4_rules(&mut self, vs: &VirtualService, port: u16) -> Vec<TcpRule> {
        let mut rules = Vec::new();
        for route in &vs.spec.tls {
            let blocks: Vec<TcpBlock> = route
                .r#match
                .iter()
                .filter(|m| m.port.is_none_or(|p| p.get() == port))
                .filter(|m| self.source.selects_tls(m, vs.namespace()))
                .map(TcpBlock::compile_tls)
                .collect();
            // A TLS route always has blocks (validated): none left, none can match.
            if !blocks.is_empty() {
                let destinations = self.l4_destinations(&route.route, port);
                rules.push(TcpRule::new(blocks, destinations));
            }
        }
        for route in &vs.spec.tcp {
            let blocks: Vec<TcpBlock> = route
                .r#match
                .iter()
                .filter(|m| m.port.is_none_or(|p| p.get() == port))
                .filter(|m| self.source.selects_l4(m, vs.namespace()))
                .map(TcpBlock::compile)
                .collect();
            if blocks.is_empty() && !route.r#match.is_empty() {
                // No block can match this proxy on this port.
                continue;
            }
            let destinations = self.l4_destinations(&route.route, port);
            rules.push(TcpRule::new(blocks, destinations));
        }
        rules
    }

    /// A `tcp` or `tls` route's weighted destinations, resolved for a connection on `port`.
    fn l4_destinations(&mut self, route: &[RouteDestination], port: u16) -> Destinations {
        let no_retry = self.resolver.no_retry();
        Destinations::new(
            route
                .iter()
                .map(|d| {
                    let target = self.resolver.resolve(&d.destination, port, None, &no_retry);
                    (target, d.weight.unwrap_or(0), HeaderRules::default())
                })
                .collect(),
        )
    }

    /// The routes of virtual service `i` for a virtual host on `port`.
    fn routes_for(&mut self, i: usize, port: u16) -> Option<Arc<Routes>> {
        if let Some(done) = self.compiled.get(&(i, port)) {
            return done.clone();
        }
        let vs = self.virtual_services[i];
        let mut rules = Vec::new();
        for route in &vs.spec.http {
            match &route.delegate {
                None => self.compile_route(vs, route, port, &mut rules),
                Some(d) => {
                    let namespace = d.namespace.as_deref().unwrap_or(vs.namespace());
                    let target = self
                        .config
                        .virtual_services()
                        .iter()
                        .find(|t| t.name() == d.name && t.namespace() == namespace);
                    let Some(target) = target else {
                        self.warn(format!(
                            "VirtualService {}/{}: delegate {namespace}/{} does not exist; its route is left out",
                            vs.namespace(),
                            vs.name(),
                            d.name
                        ));
                        continue;
                    };
                    for merged in delegate::merge(route, &target.spec.http) {
                        self.compile_route(vs, &merged, port, &mut rules);
                    }
                }
            }
        }
        let routes = (!rules.is_empty()).then(|| Arc::new(Routes::new(rules)));
        self.compiled.insert((i, port), routes.clone());
        routes
    }

    fn compile_route(
        &mut self,
        vs: &VirtualService,
        route: &HttpRoute,
        port: u16,
        out: &mut Vec<RouteRule>,
    ) {
        let blocks = if route.r#match.is_empty() {
            vec![MatchBlock::catch_all()]
        } else {
            let blocks: Vec<MatchBlock> = route
                .r#match
                .iter()
                .filter(|m| m.port.is_none_or(|p| p.get() == port))
                .filter(|m| self.source.selects(m, vs.namespace()))
                .map(MatchBlock::compile)
                .collect();
            if blocks.is_empty() {
                return;
            }
            blocks
        };
        out.push(RouteRule::compile(route, blocks, port, &mut self.resolver));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateways_resolve_in_the_virtual_services_namespace() {
        let sidecar = SourceContext::sidecar("default", Labels::new());
        assert!(sidecar.is_gateway("mesh", "x"));
        assert!(!sidecar.is_gateway("public", "x"));
        let gateway = SourceContext {
            gateways: vec!["istio-system/public".into()],
            ..SourceContext::default()
        };
        assert!(!gateway.is_gateway("mesh", "x"));
        assert!(gateway.is_gateway("istio-system/public", "x"));
        assert!(gateway.is_gateway("public", "istio-system"));
        assert!(!gateway.is_gateway("public", "default"));
    }

    #[test]
    fn gateway_ports_route_bound_virtual_services_by_host_alone() {
        use mesh_core::config::{Source, load_sources};
        let yaml = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: { name: public, namespace: default }
spec:
  selector: { istio: ingressgateway }
  servers:
  - port: { number: 8080, name: http, protocol: HTTP }
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: productpage }
spec:
  hosts: [productpage]
  ports: [{ number: 9080, name: http, protocol: HTTP }]
  resolution: STATIC
  endpoints: [{ address: 127.0.0.1 }]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: any }
spec:
  hosts: ["*"]
  gateways: [public]
  http:
  - name: any
    match: [{ uri: { prefix: /productpage } }]
    route: [{ destination: { host: productpage } }]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: bookinfo }
spec:
  hosts: [bookinfo.example.com]
  gateways: [default/public]
  http:
  - name: bookinfo
    route: [{ destination: { host: productpage, port: { number: 9080 } } }]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: mesh-only }
spec:
  hosts: [mesh.example.com]
  http:
  - name: mesh-only
    route: [{ destination: { host: productpage } }]
"#;
        let config = load_sources(&[Source::new("t.yaml", yaml)]).unwrap();
        let source = SourceContext {
            namespace: "default".into(),
            gateways: vec!["default/public".into()],
            ..SourceContext::default()
        };
        let table = RouteTable::build(&config, &source);
        let on = |port: u16, host: &str, path: &str| {
            let mut req = Request::get(path).header("host", host).body(()).unwrap();
            req.extensions_mut().insert(ClientInfo {
                remote: "127.0.0.1:1".parse().unwrap(),
                local: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                tls: false,
            });
            table
                .select(&req)
                .map(|s| s.route_name().unwrap_or_default().to_string())
                .map_err(|e| e.flags().to_string())
        };
        // The exact host wins over `*`, whatever port the Host header names.
        assert_eq!(
            on(8080, "bookinfo.example.com", "/x").as_deref(),
            Ok("bookinfo")
        );
        assert_eq!(
            on(8080, "bookinfo.example.com:443", "/x").as_deref(),
            Ok("bookinfo")
        );
        assert_eq!(
            on(8080, "anything.test", "/productpage").as_deref(),
            Ok("any")
        );
        assert_eq!(
            on(8080, "anything.test", "/other").as_deref(),
            Err(&"NR".to_string())
        );
        // Mesh-only VirtualServices and bare services are not exposed on the gateway.
        assert_eq!(
            on(8080, "mesh.example.com", "/productpage").as_deref(),
            Ok("any")
        );
        assert_eq!(
            on(8080, "mesh.example.com", "/x").as_deref(),
            Err(&"NR".to_string())
        );
        // Not a gateway port: the sidecar lookup, by host and port.
        assert_eq!(
            on(15001, "bookinfo.example.com", "/x").as_deref(),
            Ok("bookinfo")
        );
        assert_eq!(
            on(15001, "bookinfo.example.com:443", "/x").as_deref(),
            Err(&"NR".to_string())
        );
    }
}
