//! The listeners of Istio's `Sidecar` resource: one local port per service, for a proxy
//! without traffic capture (Istio's `captureMode: NONE`).
//!
//! **Which Sidecar.** As Istio picks it: in the proxy's namespace (its Bootstrap's), the
//! Sidecar whose `workloadSelector` matches the Bootstrap's workload labels; else the
//! namespace's Sidecar without a selector; else the selector-less Sidecar of Istio's root
//! namespace (`istio-system`). When several qualify at one level the first loaded wins (Istio
//! takes the oldest) and the others are named in a warning.
//!
//! **Egress listeners.** Each `egress` entry with a `port` that has a `bind`, or says
//! `captureMode: NONE` (bind then defaults to `127.0.0.1`, as Istio's), listens on
//! `bind:port.number`. By the port's protocol:
//! - `HTTP`, `HTTP2`, `GRPC`, `GRPC-Web`: the outbound HTTP stack, exactly as the outbound
//!   listener serves it (routes by `Host`, whatever port the listener has);
//! - anything else (`TCP`, `TLS`, `MONGO`, `MYSQL`, `REDIS`, an unknown name): opaque TCP,
//!   with no protocol detection at all, so a server that speaks first (SMTP, MySQL) is
//!   connected at once. Each connection goes to the service among the entry's `hosts` that
//!   has a port numbered `port.number` (`crate::tcp_out`). Hosts are Istio's
//!   `namespace/dnsName`: the namespace `*` (any), `.` (the Sidecar's own) or a name, `~`
//!   (none); the name `*`, a `*.suffix` wildcard, or a host, a short one (`reviews`) being
//!   qualified in the entry's namespace, or in the proxy's for `*` and `.`. The service is
//!   looked up in the current config snapshot (cached per snapshot), so a reload that
//!   changes the ServiceEntries or the Sidecar's hosts applies to the next connection; the
//!   set of listeners itself is fixed at start. When several services match, the first
//!   (in `hosts` order, then load order) is used and the rest are named in a warning; when
//!   none does, the listener closes every connection and says why in a warning, once per
//!   snapshot.
//!
//! **Ingress listeners.** Each `ingress` entry with a `defaultEndpoint` (`127.0.0.1:PORT`, or
//! `0.0.0.0:PORT`, taken as loopback) listens on `bind:port.number` (bind default `0.0.0.0`)
//! and serves as the Bootstrap's inbound listener does, with the endpoint as the app:
//! PeerAuthentication (of the endpoint's port, as Istio's `portLevelMtls` names the
//! workload port), AuthorizationPolicies, XFCC, rate limit and `reporter="destination"`
//! telemetry for HTTP ports (HTTP/1.1 to the app for `HTTP`, HTTP/2 for `HTTP2`/`GRPC`/
//! `GRPC-Web`), the opaque-TCP inbound path (`crate::tcp`) for every other protocol.
//!
//! Unix domain sockets (`unix://` binds and endpoints) are not supported: such an entry fails
//! the start, naming it, rather than being silently left out.
//!
//! **Outbound traffic policy.** A Sidecar's `outboundTrafficPolicy.mode` overrides the
//! Bootstrap's for this proxy ([`outbound_traffic_mode`]): the first one set along Istio's
//! inheritance, the workload's Sidecar, its namespace's, the root namespace's. Its
//! `egressProxy` is not applied.
//!
//! **Scope.** Egress entries without a port (the catch-all) name the services the proxy sees
//! at all ([`egress_scope`]): the route table routes no other host (`404 NR`, or passthrough
//! for a captured connection under `ALLOW_ANY`), and captured TCP knows no other service's
//! address. `inboundConnectionPool` is not applied.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use mesh_core::Identity;
use mesh_core::config::bootstrap::RateLimitSettings;
use mesh_core::config::networking::{
    CaptureMode, EgressListener, IngressListener, OutboundTrafficMode,
};
use mesh_core::config::{MeshConfig, Protocol, ServicePort, Sidecar};
use mesh_routing::HostPattern;
use mesh_tls::acceptor::MtlsAcceptor;
use mesh_tls::authz::AuthorizationPolicies;
use mesh_tls::credentials::Credentials;
use mesh_tls::peer_auth::{DEFAULT_ROOT_NAMESPACE, PeerAuthenticationPolicy};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::inbound::{self, AppProtocol};
use crate::server::{self, HttpService, InboundTls, Transport};
use crate::tcp::{self, InboundTcp};
use crate::tcp_out::{self, OutboundTcp};
use crate::telemetry::Telemetry;
use crate::upstream::Upstream;

/// Why the Sidecar's listeners cannot be set up. Fails the proxy's start.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("cannot bind the {listener} listener on {addr}: {source}")]
    Bind {
        listener: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "{listener}: bind `{bind}` is not an IP address (unix domain sockets are not supported)"
    )]
    BindAddress { listener: String, bind: String },
    #[error(
        "{listener}: defaultEndpoint `{endpoint}` is not IP:PORT (unix domain sockets are not supported)"
    )]
    DefaultEndpoint { listener: String, endpoint: String },
}

/// The Sidecar resource that applies to the proxy `config`'s Bootstrap describes, if any.
pub fn select(config: &MeshConfig) -> Option<&Sidecar> {
    let chosen = levels(config)?.into_iter().find(|c| !c.is_empty())?;
    if chosen.len() > 1 {
        let ignored: Vec<String> = chosen[1..]
            .iter()
            .map(|sc| format!("{}/{}", sc.namespace(), sc.name()))
            .collect();
        tracing::warn!(
            sidecar = %format!("{}/{}", chosen[0].namespace(), chosen[0].name()),
            ?ignored,
            "several Sidecars apply to this workload; using the first loaded"
        );
    }
    chosen.first().copied()
}

/// The services the proxy sees, as its Sidecar's catch-all egress entries (those without a
/// port) name them: their `hosts`, parsed. `None` when the Sidecar has no such entry, or
/// there is no Sidecar: the proxy sees every service exported to it.
pub fn egress_scope(config: &MeshConfig) -> Option<Vec<HostPattern>> {
    let sidecar = select(config)?;
    let proxy = config.proxy_namespace();
    let mut catch_all = sidecar
        .spec
        .egress
        .iter()
        .filter(|e| e.port.is_none())
        .peekable();
    catch_all.peek()?;
    Some(
        catch_all
            .flat_map(|e| &e.hosts)
            .map(|h| HostPattern::parse(h, sidecar.namespace(), proxy))
            .collect(),
    )
}

/// The outbound traffic policy mode the Sidecars give this proxy, if one does: the first
/// `outboundTrafficPolicy` set along Istio's inheritance, the workload's Sidecar, then its
/// namespace's, then the root namespace's. `None`: the mesh default (the Bootstrap's) applies.
pub fn outbound_traffic_mode(config: &MeshConfig) -> Option<OutboundTrafficMode> {
    levels(config)?
        .into_iter()
        .flatten()
        .find_map(|sc| sc.spec.outbound_traffic_policy.as_ref())
        .map(|p| p.mode)
}

/// The Sidecars that could apply to the proxy, most specific level first (each in load
/// order): those in its namespace selecting its labels, its namespace's selector-less ones,
/// the root namespace's selector-less ones.
fn levels(config: &MeshConfig) -> Option<[Vec<&Sidecar>; 3]> {
    let bootstrap = config.bootstrap()?;
    let namespace = bootstrap.namespace();
    let labels = &bootstrap.spec.workload.labels;
    let has_selector = |sc: &Sidecar| {
        sc.spec
            .workload_selector
            .as_ref()
            .is_some_and(|s| !s.labels.is_empty())
    };
    let selecting: Vec<&Sidecar> = config
        .sidecars()
        .iter()
        .filter(|sc| sc.namespace() == namespace && has_selector(sc))
        .filter(|sc| {
            sc.spec
                .workload_selector
                .as_ref()
                .is_some_and(|s| labels.matches(&s.labels))
        })
        .collect();
    let namespace_wide = |ns: &str| -> Vec<&Sidecar> {
        config
            .sidecars()
            .iter()
            .filter(|sc| sc.namespace() == ns && !has_selector(sc))
            .collect()
    };
    Some([
        selecting,
        namespace_wide(namespace),
        namespace_wide(DEFAULT_ROOT_NAMESPACE),
    ])
}

/// One listener of the Sidecar, bound.
struct Bound {
    listener: TcpListener,
    addr: SocketAddr,
    kind: Kind,
}

enum Kind {
    EgressHttp,
    EgressTcp(Arc<EgressTcp>),
    Ingress {
        app: SocketAddr,
        /// `None`: opaque TCP.
        protocol: Option<AppProtocol>,
    },
}

/// The Sidecar's listeners, bound and not yet serving.
pub(crate) struct SidecarListeners {
    egress: Vec<Bound>,
    ingress: Vec<Bound>,
}

/// What the Sidecar's listeners serve with: the proxy's stacks and policies.
pub(crate) struct Context<'a> {
    /// The outbound HTTP stack (the outbound listener's).
    pub outbound_http: HttpService,
    pub outbound_tcp: Arc<OutboundTcp>,
    /// For the inbound side.
    pub credentials: Option<Arc<Credentials>>,
    pub own_identity: Option<Identity>,
    pub peer_auth: Arc<ArcSwap<PeerAuthenticationPolicy>>,
    pub authz: Arc<ArcSwap<AuthorizationPolicies>>,
    pub telemetry: &'a Telemetry,
    pub rate_limit: Option<&'a RateLimitSettings>,
    pub upstream: Upstream,
    /// The Bootstrap's `limits` and the proxy's connection counters.
    pub listener: &'a server::ListenerOptions,
}

impl SidecarListeners {
    /// Binds the listeners of the Sidecar that applies to this proxy (none without one). A
    /// port conflict fails, naming the listener; nothing stays bound.
    pub(crate) async fn bind(config: &MeshConfig) -> Result<SidecarListeners, SidecarError> {
        let mut out = SidecarListeners {
            egress: Vec::new(),
            ingress: Vec::new(),
        };
        let Some(sidecar) = select(config) else {
            return Ok(out);
        };
        let id = format!("{}/{}", sidecar.namespace(), sidecar.name());
        for (i, entry) in sidecar.spec.egress.iter().enumerate() {
            let Some(port) = &entry.port else { continue };
            let explicit = entry.bind.is_some();
            if !explicit && entry.capture_mode != Some(CaptureMode::None) {
                continue;
            }
            let protocol = port.effective_protocol();
            let name = format!(
                "Sidecar {id} egress[{i}] ({} port {})",
                protocol.as_str(),
                port.number.get()
            );
            let ip = bind_ip(entry.bind.as_deref(), Ipv4Addr::LOCALHOST, &name)?;
            let addr = SocketAddr::new(ip, port.number.get());
            let kind = if protocol.is_http() {
                Kind::EgressHttp
            } else {
                let tcp = EgressTcp::new(name.clone(), entry, sidecar.namespace(), config);
                Kind::EgressTcp(Arc::new(tcp))
            };
            out.egress.push(bind_one(&name, addr, kind).await?);
        }
        for (i, entry) in sidecar.spec.ingress.iter().enumerate() {
            let protocol = entry.port.effective_protocol();
            let name = format!(
                "Sidecar {id} ingress[{i}] ({} port {})",
                protocol.as_str(),
                entry.port.number.get()
            );
            let Some(app) = default_endpoint(entry, &name)? else {
                tracing::warn!(listener = %name, "ingress listener without defaultEndpoint: not served");
                continue;
            };
            let ip = bind_ip(entry.bind.as_deref(), Ipv4Addr::UNSPECIFIED, &name)?;
            let addr = SocketAddr::new(ip, entry.port.number.get());
            let kind = Kind::Ingress {
                app,
                protocol: app_protocol(protocol),
            };
            out.ingress.push(bind_one(&name, addr, kind).await?);
        }
        Ok(out)
    }

    /// The egress listeners' addresses, in `egress` order.
    pub(crate) fn egress_addrs(&self) -> Vec<SocketAddr> {
        self.egress.iter().map(|b| b.addr).collect()
    }

    /// The ingress listeners' addresses, in `ingress` order.
    pub(crate) fn ingress_addrs(&self) -> Vec<SocketAddr> {
        self.ingress.iter().map(|b| b.addr).collect()
    }

    /// Serves every listener until `stop` turns true; each drains for at most `drain`.
    pub(crate) fn serve(
        self,
        ctx: &Context<'_>,
        stop: &watch::Receiver<bool>,
        drain: Duration,
    ) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        for bound in self.egress.into_iter().chain(self.ingress) {
            let task = match bound.kind {
                Kind::EgressHttp => tokio::spawn(server::serve_with(
                    "sidecar egress",
                    bound.listener,
                    ctx.outbound_http.clone(),
                    Transport::Plain,
                    ctx.listener.clone(),
                    stop.clone(),
                    drain,
                )),
                Kind::EgressTcp(egress) => tokio::spawn(serve_egress_tcp(
                    bound.listener,
                    egress,
                    ctx.outbound_tcp.clone(),
                    ctx.listener.clone(),
                    stop.clone(),
                    drain,
                )),
                Kind::Ingress { app, protocol } => {
                    let tls = Arc::new(InboundTls {
                        acceptor: ctx.credentials.clone().map(MtlsAcceptor::new),
                        peer_auth: ctx.peer_auth.clone(),
                        port: app.port(),
                    });
                    match protocol {
                        None => {
                            let inbound = Arc::new(InboundTcp {
                                app,
                                tls,
                                authz: ctx.authz.clone(),
                                metrics: ctx.telemetry.tcp(),
                            });
                            tokio::spawn(tcp::serve(
                                bound.listener,
                                inbound,
                                ctx.listener.clone(),
                                stop.clone(),
                                drain,
                            ))
                        }
                        Some(protocol) => {
                            let stack = inbound::stack(
                                app,
                                protocol,
                                ctx.rate_limit,
                                &ctx.authz,
                                ctx.own_identity.clone(),
                                ctx.telemetry,
                                ctx.upstream.clone(),
                            );
                            tokio::spawn(server::serve_with(
                                "sidecar ingress",
                                bound.listener,
                                stack,
                                Transport::Inbound(tls),
                                ctx.listener.clone(),
                                stop.clone(),
                                drain,
                            ))
                        }
                    }
                }
            };
            tasks.push(task);
        }
        tasks
    }
}

async fn bind_one(name: &str, addr: SocketAddr, kind: Kind) -> Result<Bound, SidecarError> {
    let bind_err = |source| SidecarError::Bind {
        listener: name.to_string(),
        addr,
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    tracing::info!(listener = %name, %addr, "Sidecar listener bound");
    Ok(Bound {
        listener,
        addr,
        kind,
    })
}

/// The IP of a listener's `bind`, or `default` without one.
fn bind_ip(bind: Option<&str>, default: Ipv4Addr, listener: &str) -> Result<IpAddr, SidecarError> {
    match bind {
        None => Ok(IpAddr::V4(default)),
        Some(text) => text
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| SidecarError::BindAddress {
                listener: listener.to_string(),
                bind: text.to_string(),
            }),
    }
}

/// An ingress entry's `defaultEndpoint` as the app's address (`0.0.0.0` means the workload
/// itself: loopback here).
fn default_endpoint(
    entry: &IngressListener,
    listener: &str,
) -> Result<Option<SocketAddr>, SidecarError> {
    let Some(text) = entry.default_endpoint.as_deref() else {
        return Ok(None);
    };
    let mut addr: SocketAddr = text.parse().map_err(|_| SidecarError::DefaultEndpoint {
        listener: listener.to_string(),
        endpoint: text.to_string(),
    })?;
    if addr.ip().is_unspecified() {
        addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    Ok(Some(addr))
}

/// The HTTP version spoken to the app of an ingress port, `None` for opaque TCP (Istio
/// treats `HTTP2`, `GRPC` and `GRPC-Web` ports as HTTP/2).
fn app_protocol(protocol: Protocol) -> Option<AppProtocol> {
    match protocol {
        Protocol::Http => Some(AppProtocol::Http1),
        Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb => Some(AppProtocol::Http2),
        _ => None,
    }
}

/// An opaque-TCP egress listener: which service its connections go to, re-resolved for each
/// new config snapshot.
struct EgressTcp {
    name: String,
    port: u16,
    hosts: Vec<HostPattern>,
    resolved: Mutex<Option<Resolved>>,
}

/// The service of a listener as of one config snapshot, or why there is none.
struct Resolved {
    config: Arc<MeshConfig>,
    service: Result<Arc<ServicePort>, Arc<str>>,
}

impl EgressTcp {
    fn new(name: String, entry: &EgressListener, own: &str, config: &MeshConfig) -> EgressTcp {
        let proxy = config.proxy_namespace();
        let egress = EgressTcp {
            name,
            port: entry.port.as_ref().map_or(0, |p| p.number.get()),
            hosts: entry
                .hosts
                .iter()
                .map(|h| HostPattern::parse(h, own, proxy))
                .collect(),
            resolved: Mutex::new(None),
        };
        // Said at load: what the listener will proxy to, or why it will refuse.
        let _ = egress.resolve_in(config);
        egress
    }

    /// The service this listener proxies to in `config`, with the warnings Istio's
    /// resolution would give (several matches, none).
    fn resolve_in(&self, config: &MeshConfig) -> Result<Arc<ServicePort>, Arc<str>> {
        let mut found: Vec<&Arc<ServicePort>> = Vec::new();
        for pattern in &self.hosts {
            for service in config.services().iter() {
                if service.number == self.port
                    && pattern.matches(service)
                    && !found.iter().any(|f| f.host == service.host)
                {
                    found.push(service);
                }
            }
        }
        match found.as_slice() {
            [] => {
                let why: Arc<str> = format!(
                    "no service among the hosts {:?} has port {}",
                    self.hosts_text(),
                    self.port
                )
                .into();
                tracing::warn!(listener = %self.name, "{why}: connections will be closed");
                Err(why)
            }
            [one] => {
                tracing::info!(listener = %self.name, service = %one.host, port = one.number, "TCP egress listener proxies to the service");
                Ok((*one).clone())
            }
            [first, rest @ ..] => {
                let ignored: Vec<&str> = rest.iter().map(|s| s.host.as_str()).collect();
                tracing::warn!(listener = %self.name, service = %first.host, ?ignored, "several services match a TCP egress listener; using the first");
                Ok((*first).clone())
            }
        }
    }

    fn hosts_text(&self) -> Vec<String> {
        self.hosts.iter().map(ToString::to_string).collect()
    }

    /// The service for a new connection, from the current snapshot (resolved once per
    /// snapshot; the lock is never held across an await).
    fn service(&self, config: Arc<MeshConfig>) -> Result<Arc<ServicePort>, Arc<str>> {
        let mut resolved = self.resolved.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = resolved.as_ref()
            && Arc::ptr_eq(&r.config, &config)
        {
            return r.service.clone();
        }
        let service = self.resolve_in(&config);
        *resolved = Some(Resolved {
            config,
            service: service.clone(),
        });
        service
    }
}

/// Serves an opaque-TCP egress listener until `shutdown`, then lets connections finish for
/// at most `drain_timeout`.
async fn serve_egress_tcp(
    listener: TcpListener,
    egress: Arc<EgressTcp>,
    ctx: Arc<OutboundTcp>,
    options: server::ListenerOptions,
    shutdown: watch::Receiver<bool>,
    drain_timeout: Duration,
) {
    crate::tcp::serve_connections(
        "sidecar egress",
        listener,
        options,
        move |stream, remote| egress_connection(stream, remote, egress.clone(), ctx.clone()),
        shutdown,
        drain_timeout,
    )
    .await
}

async fn egress_connection(
    stream: TcpStream,
    remote: SocketAddr,
    egress: Arc<EgressTcp>,
    ctx: Arc<OutboundTcp>,
) {
    let service = match egress.service(ctx.config()) {
        Ok(service) => service,
        Err(why) => {
            tracing::debug!(listener = %egress.name, %remote, "connection closed: {why}");
            return;
        }
    };
    let local = stream.local_addr().ok();
    // Logged inside, naming the service and endpoint.
    let _ = tcp_out::proxy_with_local(stream, remote, local, service, &ctx).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::{Source, load_sources};

    fn config(yaml: &str) -> MeshConfig {
        let bootstrap = "apiVersion: mesh-proxy/v1\nkind: Bootstrap\nmetadata: { name: c, namespace: shop }\nspec:\n  workload: { name: c, labels: { app: c } }\n";
        load_sources(&[Source::new("t.yaml", format!("{bootstrap}---\n{yaml}"))]).unwrap()
    }

    const SIDECARS: &str = "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: { name: wide, namespace: shop }
spec:
  egress: [{ hosts: [\"./*\"] }]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: { name: mine, namespace: shop }
spec:
  workloadSelector: { labels: { app: c } }
  egress: [{ hosts: [\"./*\"] }]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: { name: other, namespace: shop }
spec:
  workloadSelector: { labels: { app: d } }
  egress: [{ hosts: [\"./*\"] }]
";

    #[test]
    fn the_selecting_sidecar_wins_over_the_namespace_one() {
        let c = config(SIDECARS);
        assert_eq!(select(&c).map(|s| s.name()), Some("mine"));
        let c = config(&SIDECARS.replace("app: c }", "app: x }"));
        assert_eq!(select(&c).map(|s| s.name()), Some("wide"));
        let c = config(&SIDECARS.replace("namespace: shop", "namespace: other"));
        assert!(select(&c).is_none());
    }

    #[test]
    fn ingress_protocols() {
        assert_eq!(app_protocol(Protocol::Http), Some(AppProtocol::Http1));
        assert_eq!(app_protocol(Protocol::Grpc), Some(AppProtocol::Http2));
        assert_eq!(app_protocol(Protocol::Mysql), None);
        assert_eq!(app_protocol(Protocol::Tcp), None);
    }
}
