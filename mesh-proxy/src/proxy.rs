//! Starting, reconfiguring and draining a proxy.
//!
//! [`RunningProxy::start`] binds every listener first (a port conflict fails the start with
//! nothing left running), serves admin (`/ready` answers 503 until the end of start), then
//! the outbound and inbound listeners, publishes the config's endpoints to discovery, and only
//! then reports ready. [`RunningProxy::shutdown`] is the drain:
//! `/ready` turns 503, listeners stop accepting, in-flight requests get up to the Bootstrap's
//! `terminationDrainDuration` to finish, then the admin server stops.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use mesh_core::config::{Bootstrap, MeshConfig};
use mesh_core::discovery::{EndpointPublisher, ServiceKey};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use mesh_resilience::budget::RetryBudgets;
use mesh_resilience::pool_limits::CircuitBreakers;
use mesh_routing::balance::BalanceLayer;
use mesh_routing::{RouteTable, SourceContext};

use mesh_tls::acceptor::MtlsAcceptor;
use mesh_tls::authz::AuthorizationPolicies;
use mesh_tls::connector::MtlsConnector;
use mesh_tls::credentials::Credentials;
use mesh_tls::peer_auth::{DEFAULT_ROOT_NAMESPACE, Mode, PeerAuthenticationPolicy};

use crate::inbound::{self, AppProtocol};
use crate::outbound;
use crate::server;
use crate::tcp;
use crate::telemetry::Telemetry;
use crate::upstream::Upstream;

/// Why a proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "the configuration has no Bootstrap resource (apiVersion: mesh-proxy/v1, kind: Bootstrap)"
    )]
    NoBootstrap,
    #[error("{0} is not supported by this version of the proxy")]
    Unsupported(&'static str),
    #[error("cannot load the Bootstrap identity: {0}")]
    Identity(#[from] mesh_tls::TlsError),
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    #[error("cannot bind the {listener} listener on {addr}: {source}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// A Gateway server that cannot be served (certificate files, mode, protocol).
    #[error(transparent)]
    Gateway(#[from] Box<crate::gateway::GatewayError>),
    /// `listener` names the gateways and the address.
    #[error("cannot bind the listener of {listener}: {source}")]
    GatewayBind {
        listener: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// A Sidecar egress/ingress listener that cannot be bound (named with its port).
    #[error(transparent)]
    Sidecar(#[from] crate::sidecar_listeners::SidecarError),
    #[error(transparent)]
    Discovery(#[from] crate::discovery::DiscoveryError),
}

/// State shared by the listeners and the admin server.
#[derive(Debug)]
pub struct Shared {
    config: Arc<ArcSwap<MeshConfig>>,
    /// The route table compiled from `config`, swapped with it.
    routes: Arc<ArcSwap<RouteTable>>,
    endpoints: Arc<EndpointPublisher>,
    /// One balancer for the proxy's life, so per-endpoint state survives reloads.
    balancer: BalanceLayer,
    /// This workload's PeerAuthentication and AuthorizationPolicies, compiled from `config`
    /// and swapped with it.
    peer_auth: Arc<ArcSwap<PeerAuthenticationPolicy>>,
    authz: Arc<ArcSwap<AuthorizationPolicies>>,
    /// This workload's SVID and trust bundle, when the Bootstrap names them.
    credentials: Option<Arc<Credentials>>,
    /// Metrics (and the workload they describe), shared by both stacks and `/metrics`.
    telemetry: Telemetry,
    /// `mesh_config_reloads_total{result}`, counted by the config watch.
    reload_metrics: crate::reload::ReloadMetrics,
    /// Notified by admin `POST /drain`; the binary then drains as on SIGTERM.
    drain_requested: tokio::sync::Notify,
    ready: AtomicBool,
    /// The proxy's own files and the etcd layer over them; the lock orders config changes
    /// (file reloads, etcd snapshots, DNS answers) and is never held across an `.await`.
    layers: std::sync::Mutex<Layers>,
    /// The names `resolution: DNS` services need, watched by the DNS provider.
    dns_names: watch::Sender<std::collections::BTreeSet<String>>,
    /// The DNS provider's last good answers.
    dns_resolved: std::sync::Mutex<mesh_discovery::dns::Resolved>,
    /// This workload's WorkloadEntry in etcd, when the Bootstrap says `register`.
    #[cfg(feature = "etcd")]
    registration: std::sync::OnceLock<Arc<crate::discovery::store::RegistrationValue>>,
}

#[derive(Debug)]
struct Layers {
    /// The configuration loaded from the proxy's files (or given by an embedder).
    files: Arc<MeshConfig>,
    /// Resources from etcd, when the Bootstrap names `discovery.etcd`.
    #[cfg(feature = "etcd")]
    store: Option<crate::discovery::store::StoreLayer>,
}

impl Shared {
    pub fn config(&self) -> Arc<MeshConfig> {
        self.config.load_full()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Per-endpoint balancer state, for admin `/clusters`.
    pub fn clusters(&self) -> Vec<mesh_routing::balance::ClusterStatus> {
        self.balancer.clusters()
    }

    /// Outlier-detection state, shared by the balancer and the outlier layer.
    pub fn health(&self) -> Arc<mesh_core::health::HealthRegistry> {
        self.balancer.health()
    }

    /// The workload's identity, when it has one.
    pub fn credentials(&self) -> Option<&Arc<Credentials>> {
        self.credentials.as_ref()
    }

    /// The proxy's telemetry (its metrics registry, for `/metrics`).
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    pub(crate) fn reload_metrics(&self) -> &crate::reload::ReloadMetrics {
        &self.reload_metrics
    }

    /// Asks whoever runs the proxy to drain it (admin `POST /drain`): `/ready` turns 503 at
    /// once, so an orchestrator stops sending traffic before the listeners close.
    pub fn request_drain(&self) {
        self.set_ready(false);
        self.drain_requested.notify_one();
    }

    fn new(
        config: Arc<MeshConfig>,
        bootstrap: &Bootstrap,
        credentials: Option<Arc<Credentials>>,
    ) -> Result<Shared, StartError> {
        let endpoints = Arc::new(EndpointPublisher::default());
        let (peer_auth, authz) = build_security(&config);
        let layers = Layers {
            files: config.clone(),
            #[cfg(feature = "etcd")]
            store: bootstrap
                .etcd()
                .map(|etcd| crate::discovery::store::StoreLayer::new(&etcd.prefix)),
        };
        let (dns_names, _) = watch::channel(crate::discovery::dns_names(&config));
        let config = Arc::new(ArcSwap::new(config));
        let telemetry = Telemetry::new(
            bootstrap,
            credentials.as_ref().map(|c| c.identity()),
            config.clone(),
        )?;
        Ok(Shared {
            routes: Arc::new(ArcSwap::from_pointee(build_routes(&config.load()))),
            peer_auth: Arc::new(ArcSwap::from_pointee(peer_auth)),
            authz: Arc::new(ArcSwap::from_pointee(authz)),
            config,
            balancer: BalanceLayer::new(endpoints.clone()),
            endpoints,
            credentials,
            reload_metrics: crate::reload::ReloadMetrics::register(&telemetry.metrics),
            drain_requested: tokio::sync::Notify::new(),
            telemetry,
            ready: AtomicBool::new(false),
            layers: std::sync::Mutex::new(layers),
            dns_names,
            dns_resolved: std::sync::Mutex::new(Default::default()),
            #[cfg(feature = "etcd")]
            registration: std::sync::OnceLock::new(),
        })
    }

    fn layers(&self) -> std::sync::MutexGuard<'_, Layers> {
        self.layers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a new configuration of the proxy's files (a reload, or an embedder's
    /// `apply_config`), under the etcd layer when there is one. Err when the files do not
    /// hold together with what is left of the layer; the config in force stays.
    pub(crate) fn apply_files(
        &self,
        files: Arc<MeshConfig>,
    ) -> Result<(), mesh_core::config::ConfigErrors> {
        let mut layers = self.layers();
        #[cfg(feature = "etcd")]
        let composed = match layers.store.as_mut() {
            Some(store) => {
                let wanted = store.wanted();
                let composed = store.compose(&files, wanted)?;
                crate::discovery::store::log_composition(&composed);
                Arc::new(composed.config)
            }
            None => files.clone(),
        };
        #[cfg(not(feature = "etcd"))]
        let composed = files.clone();
        layers.files = files;
        self.apply(composed);
        Ok(())
    }

    #[cfg(feature = "etcd")]
    /// Applies what etcd holds now over the proxy's files. A stored resource that fails
    /// validation is left out (counted as a rejected reload); the rest applies.
    pub(crate) fn apply_store(&self, snapshot: &mesh_discovery::etcd::StoreSnapshot) {
        let mut layers = self.layers();
        let files = layers.files.clone();
        let Some(store) = layers.store.as_mut() else {
            return;
        };
        for key in &snapshot.malformed_keys {
            tracing::warn!(
                key,
                "etcd key is not <prefix>/<group>/<kind>/<namespace>/<name>; ignored"
            );
        }
        match store.compose(&files, crate::discovery::store::snapshot_texts(snapshot)) {
            Ok(composed) => {
                crate::discovery::store::log_composition(&composed);
                let clean = composed.rejected.is_empty();
                let resources = composed.config.resource_count();
                self.apply(Arc::new(composed.config));
                self.reload_metrics.record(clean);
                tracing::info!(
                    revision = snapshot.revision,
                    resources,
                    "etcd resources applied"
                );
            }
            Err(errors) => {
                self.reload_metrics.record(false);
                tracing::error!(
                    revision = snapshot.revision,
                    "etcd change rejected; the last good config stays in force:\n{errors}"
                );
            }
        }
    }

    /// New DNS answers: the endpoint sets of DNS services are published again.
    pub(crate) fn apply_dns(&self, resolved: mesh_discovery::dns::Resolved) {
        let _layers = self.layers();
        *self.dns_resolved.lock().unwrap_or_else(|p| p.into_inner()) = resolved;
        self.publish_endpoints(&self.config());
    }

    /// The DNS names the config needs, for the DNS provider.
    pub(crate) fn dns_names(&self) -> watch::Receiver<std::collections::BTreeSet<String>> {
        self.dns_names.subscribe()
    }

    #[cfg(feature = "etcd")]
    pub(crate) fn set_registration(&self, value: Arc<crate::discovery::store::RegistrationValue>) {
        let _ = self.registration.set(value);
    }

    /// Turns `/ready` on or off, publishing or withdrawing this workload's registration.
    fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
        #[cfg(feature = "etcd")]
        if let Some(registration) = self.registration.get() {
            registration.set_ready(ready);
        }
    }

    /// Applies `config` to new requests: endpoints first, so that routes never point at a
    /// service whose endpoints are not published yet. Security policies apply to the next
    /// connection (PeerAuthentication) and the next request (AuthorizationPolicy).
    fn apply(&self, config: Arc<MeshConfig>) {
        self.dns_names.send_if_modified(|names| {
            let wanted = crate::discovery::dns_names(&config);
            let changed = *names != wanted;
            *names = wanted;
            changed
        });
        #[cfg(feature = "etcd")]
        if let Some(registration) = self.registration.get() {
            registration.update(&config, self.is_ready());
        }
        self.publish_endpoints(&config);
        self.routes.store(Arc::new(build_routes(&config)));
        let (peer_auth, authz) = build_security(&config);
        self.peer_auth.store(Arc::new(peer_auth));
        self.authz.store(Arc::new(authz));
        self.config.store(config);
    }

    fn publish_endpoints(&self, config: &MeshConfig) {
        let resolved = self
            .dns_resolved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.endpoints.publish(config.services().iter().map(|port| {
            let endpoints = if port.dns_endpoints.is_empty() {
                port.endpoints.clone()
            } else {
                crate::discovery::dns_endpoints(port, &resolved)
            };
            (ServiceKey::new(port.host.clone(), port.number), endpoints)
        }));
    }
}

/// A proxy whose listeners are bound and serving.
#[derive(Debug)]
pub struct RunningProxy {
    shared: Arc<Shared>,
    outbound: Option<SocketAddr>,
    inbound: Option<SocketAddr>,
    /// The gateway listeners' addresses, in listener order.
    gateways: Vec<SocketAddr>,
    /// The Sidecar resource's egress and ingress listeners' addresses, in its order.
    sidecar_egress: Vec<SocketAddr>,
    sidecar_ingress: Vec<SocketAddr>,
    admin: SocketAddr,
    stop_listeners: watch::Sender<bool>,
    stop_admin: watch::Sender<bool>,
    listeners: Vec<JoinHandle<()>>,
    admin_task: JoinHandle<()>,
    maintenance: JoinHandle<()>,
    /// Re-reads the identity files, so rotated certificates apply to new handshakes.
    cert_watch: Option<JoinHandle<()>>,
    /// DNS, the etcd watch and this workload's registration.
    discovery: crate::discovery::DiscoveryTasks,
}

async fn bind(listener: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            listener,
            addr,
            source,
        })
}

impl RunningProxy {
    /// Binds the listeners of `config`'s Bootstrap and starts serving.
    pub async fn start(config: Arc<MeshConfig>) -> Result<RunningProxy, StartError> {
        let bootstrap = config.bootstrap().ok_or(StartError::NoBootstrap)?;
        let drain = bootstrap.termination_drain_duration();
        let limits = bootstrap.spec.limits.clone();
        let rate_limit = bootstrap.spec.rate_limit;
        let admin_addr = bootstrap.admin_listen();
        let outbound_addr = bootstrap.outbound_listen();
        let inbound = bootstrap
            .spec
            .inbound
            .as_ref()
            .map(|i| (i.listen, i.app, app_protocol(i.protocol)));

        // The identity is loaded before anything binds: a bad certificate fails the start.
        let credentials = bootstrap
            .spec
            .identity
            .as_ref()
            .map(Credentials::load)
            .transpose()?;
        let own_identity = credentials.as_ref().map(|c| c.identity());
        let shared = Arc::new(Shared::new(config.clone(), bootstrap, credentials.clone())?);
        crate::admin::register_proxy_metrics(&shared);
        let options = server::ListenerOptions {
            limits: limits.clone(),
            connections: Some(crate::conn_metrics::ConnectionMetrics::register(
                &shared.telemetry.metrics,
            )),
        };
        let (stop_admin, admin_stop_rx) = watch::channel(false);
        let (stop_listeners, stop_rx) = watch::channel(false);
        // The Gateways that select this proxy, certificates read: a bad one fails the start.
        let gateway_plan = crate::gateway::plan(&config).map_err(Box::new)?;

        // Bind everything before serving anything, so a port conflict leaves nothing running.
        let admin_listener = bind("admin", admin_addr).await?;
        let admin = local_addr(&admin_listener, "admin", admin_addr)?;
        let out_listener = bind("outbound", outbound_addr).await?;
        let outbound = local_addr(&out_listener, "outbound", outbound_addr)?;
        let inbound = match inbound {
            Some((listen, app, protocol)) => {
                let listener = bind("inbound", listen).await?;
                let addr = local_addr(&listener, "inbound", listen)?;
                Some((listener, addr, app, protocol))
            }
            None => None,
        };
        let mut gateway_listeners = Vec::with_capacity(gateway_plan.len());
        for gateway in gateway_plan {
            let bind_err = |source| StartError::GatewayBind {
                listener: gateway.name().to_string(),
                addr: gateway.addr(),
                source,
            };
            let listener = TcpListener::bind(gateway.addr()).await.map_err(bind_err)?;
            let addr = listener.local_addr().map_err(bind_err)?;
            gateway_listeners.push((listener, addr, Arc::new(gateway)));
        }
        let gateways: Vec<SocketAddr> = gateway_listeners.iter().map(|(_, a, _)| *a).collect();
        let sidecar_listeners = crate::sidecar_listeners::SidecarListeners::bind(&config).await?;
        let (sidecar_egress, sidecar_ingress) = (
            sidecar_listeners.egress_addrs(),
            sidecar_listeners.ingress_addrs(),
        );

        let admin_task = tokio::spawn(server::serve(
            "admin",
            admin_listener,
            crate::admin::service(shared.clone()),
            admin_stop_rx,
            Duration::from_secs(1),
        ));
        // Envoy's per-cluster circuit breakers (DestinationRule connectionPool), shared by the
        // retry layer (maxRetries), the pool-limit layer and the connection pools.
        let breakers = Arc::new(CircuitBreakers::default());
        let mut upstream = Upstream::default().with_circuit_breakers(breakers.clone());
        let mut cert_watch = None;
        if let Some(credentials) = &credentials {
            upstream = upstream.with_mesh_tls(MtlsConnector::new(credentials.clone()));
            cert_watch = Some(credentials.watch(CERT_POLL_INTERVAL));
            tracing::info!(identity = %credentials.identity(), serial = %credentials.serial_hex(), "workload identity loaded");
        }
        let app = inbound.as_ref().map(|(_, _, app, _)| *app);
        let maintenance = tokio::spawn(maintain_pools(
            shared.clone(),
            upstream.clone(),
            breakers.clone(),
            app,
        ));
        let budgets = Arc::new(RetryBudgets::default());
        // Transparent capture: redirected connections are detected (HTTP or opaque TCP) and
        // keep their original destination; direct ones are HTTP as always.
        // Outbound opaque TCP (Sidecar egress listeners, captured connections): the HTTP path's balancer, health,
        // breakers and mTLS client.
        let outbound_tcp = Arc::new(crate::tcp_out::OutboundTcp::new(
            shared.config.clone(),
            shared.routes.clone(),
            &shared.balancer,
            breakers.clone(),
            credentials.clone().map(MtlsConnector::new),
            shared.telemetry.tcp(),
        ));
        let captured = Arc::new(crate::capture::CapturedTcp::new(
            shared.config.clone(),
            outbound_tcp.clone(),
        ));
        let mut listeners = vec![tokio::spawn(server::serve_with(
            "outbound",
            out_listener,
            outbound::stack(
                &shared.routes,
                &shared.balancer,
                &budgets,
                &breakers,
                &shared.telemetry,
                upstream.clone(),
            ),
            server::Transport::Captured(captured),
            options.clone(),
            stop_rx.clone(),
            drain,
        ))];
        // Gateway listeners: the outbound stack (routes, retry budgets, breakers shared).
        for (listener, _, gateway) in gateway_listeners {
            let stack = outbound::stack(
                &shared.routes,
                &shared.balancer,
                &budgets,
                &breakers,
                &shared.telemetry,
                upstream.clone(),
            );
            listeners.push(tokio::spawn(crate::gateway::serve(
                listener,
                gateway,
                crate::gateway::Upstreams {
                    http: stack,
                    tcp: outbound_tcp.clone(),
                },
                options.clone(),
                stop_rx.clone(),
                drain,
            )));
        }
        listeners.extend(sidecar_listeners.serve(
            &crate::sidecar_listeners::Context {
                outbound_http: outbound::stack(
                    &shared.routes,
                    &shared.balancer,
                    &budgets,
                    &breakers,
                    &shared.telemetry,
                    upstream.clone(),
                ),
                outbound_tcp,
                credentials: credentials.clone(),
                own_identity: own_identity.clone(),
                peer_auth: shared.peer_auth.clone(),
                authz: shared.authz.clone(),
                telemetry: &shared.telemetry,
                rate_limit: rate_limit.as_ref(),
                upstream: upstream.clone(),
                listener: &options,
            },
            &stop_rx,
            drain,
        ));
        let inbound = inbound.map(|(listener, addr, app, protocol)| {
            let tls = Arc::new(server::InboundTls {
                acceptor: credentials.clone().map(MtlsAcceptor::new),
                peer_auth: shared.peer_auth.clone(),
                port: app.port(),
            });
            if credentials.is_none() && shared.peer_auth.load().mode(app.port()) == Mode::Strict {
                tracing::error!(
                    policy = %shared.peer_auth.load(),
                    "PeerAuthentication is STRICT but the Bootstrap has no identity: every inbound connection will be refused"
                );
            }
            let opaque = Arc::new(tcp::InboundTcp {
                app,
                tls: tls.clone(),
                authz: shared.authz.clone(),
                metrics: shared.telemetry.tcp(),
            });
            let Some(protocol) = protocol else {
                listeners.push(tokio::spawn(tcp::serve(listener, opaque, options.clone(), stop_rx, drain)));
                return addr;
            };
            // `auto` (Istio's protocol sniffing): HTTP by its first bytes, else opaque TCP.
            let transport = if protocol == AppProtocol::Auto {
                server::Transport::InboundDetect(tls, opaque)
            } else {
                server::Transport::Inbound(tls)
            };
            let stack = inbound::stack(
                app,
                protocol,
                rate_limit.as_ref(),
                &shared.authz,
                own_identity.clone(),
                &shared.telemetry,
                upstream.clone(),
            );
            listeners.push(tokio::spawn(server::serve_with(
                "inbound",
                listener,
                stack,
                transport,
                options.clone(),
                stop_rx,
                drain,
            )));
            addr
        });

        shared.publish_endpoints(&config);
        let discovery =
            crate::discovery::DiscoveryTasks::start(&shared, inbound, own_identity.as_ref())
                .await?;
        shared.set_ready(true);
        tracing::info!(%outbound, inbound = ?inbound, %admin, "proxy ready");
        Ok(RunningProxy {
            shared,
            outbound: Some(outbound),
            inbound,
            gateways,
            sidecar_egress,
            sidecar_ingress,
            admin,
            stop_listeners,
            stop_admin,
            listeners,
            admin_task,
            maintenance,
            cert_watch,
            discovery,
        })
    }

    pub fn outbound_addr(&self) -> Option<SocketAddr> {
        self.outbound
    }

    pub fn inbound_addr(&self) -> Option<SocketAddr> {
        self.inbound
    }

    /// The addresses of the gateway listeners (one per Gateway server `bind` and port), in
    /// listener order; empty when no Gateway selects this proxy.
    pub fn gateway_addrs(&self) -> Vec<SocketAddr> {
        self.gateways.clone()
    }

    /// The addresses of the Sidecar resource's egress listeners (entries with a `port` and a
    /// `bind` or `captureMode: NONE`), in `egress` order; empty without one.
    pub fn egress_addrs(&self) -> Vec<SocketAddr> {
        self.sidecar_egress.clone()
    }

    /// The addresses of the Sidecar resource's ingress listeners (entries with a
    /// `defaultEndpoint`), in `ingress` order; empty without one.
    pub fn ingress_addrs(&self) -> Vec<SocketAddr> {
        self.sidecar_ingress.clone()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Resolves when admin `POST /drain` asks for a drain; the caller then calls
    /// [`RunningProxy::shutdown`] (the binary does, and exits 0).
    pub async fn drain_requested(&self) {
        self.shared.drain_requested.notified().await;
    }

    /// Applies a new configuration to new requests; requests in flight finish on the old one.
    /// Listener addresses are fixed at start.
    /// With etcd, `config` replaces the files' part and the stored resources stay layered
    /// over it; Err (and nothing changes) when they do not hold together.
    pub fn apply_config(
        &self,
        config: Arc<MeshConfig>,
    ) -> Result<(), mesh_core::config::ConfigErrors> {
        self.shared.apply_files(config)
    }

    /// Drains: `/ready` turns 503, listeners stop accepting, in-flight requests finish (up to
    /// the drain deadline), then the admin server stops.
    pub async fn shutdown(self) {
        self.shared.set_ready(false);
        // Peers stop picking this workload before its listeners close.
        self.discovery.stop().await;
        let _ = self.stop_listeners.send(true);
        for task in self.listeners {
            let _ = task.await;
        }
        let _ = self.stop_admin.send(true);
        let _ = self.admin_task.await;
        self.maintenance.abort();
        if let Some(watch) = self.cert_watch {
            watch.abort();
        }
        // Every request has ended: write the access log's last lines, export the last spans.
        self.shared.telemetry.flush().await;
        tracing::info!("proxy drained");
    }
}

fn local_addr(
    listener: &TcpListener,
    name: &'static str,
    addr: SocketAddr,
) -> Result<SocketAddr, StartError> {
    listener.local_addr().map_err(|source| StartError::Bind {
        listener: name,
        addr,
        source,
    })
}

/// The HTTP version spoken to the app, or `None` for opaque TCP.
fn app_protocol(protocol: mesh_core::config::bootstrap::InboundProtocol) -> Option<AppProtocol> {
    use mesh_core::config::bootstrap::InboundProtocol as P;
    match protocol {
        P::Auto => Some(AppProtocol::Auto),
        P::Http => Some(AppProtocol::Http1),
        P::Http2 => Some(AppProtocol::Http2),
        P::Tcp => None,
    }
}

/// How often connection pools are checked against discovery and for idle connections.
const POOL_MAINTENANCE_INTERVAL: Duration = Duration::from_secs(5);

/// Drains the pools of endpoints that discovery no longer lists (within one interval of their
/// removal; requests in flight finish first) and closes connections idle past the timeout.
async fn maintain_pools(
    shared: Arc<Shared>,
    upstream: Upstream,
    breakers: Arc<CircuitBreakers>,
    app: Option<SocketAddr>,
) {
    let mut tick = tokio::time::interval(POOL_MAINTENANCE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let live: std::collections::HashSet<SocketAddr> = shared
            .endpoints
            .snapshot()
            .iter()
            .flat_map(|(_, set)| set.endpoints().iter().map(|e| e.address))
            .chain(app)
            .collect();
        upstream.retain(|addr| live.contains(&addr));
        upstream.prune_idle();
        breakers.prune();
    }
}

/// How often the identity files are checked for a rotated certificate.
const CERT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// This workload's PeerAuthentication and AuthorizationPolicies, by its Bootstrap's
/// namespace and labels (Istio's root namespace `istio-system` holds mesh-wide ones).
fn build_security(config: &MeshConfig) -> (PeerAuthenticationPolicy, AuthorizationPolicies) {
    let Some(bootstrap) = config.bootstrap() else {
        return Default::default();
    };
    let namespace = bootstrap.namespace();
    let labels = &bootstrap.spec.workload.labels;
    (
        PeerAuthenticationPolicy::for_workload(config, namespace, labels, DEFAULT_ROOT_NAMESPACE),
        AuthorizationPolicies::for_workload(config, namespace, labels, DEFAULT_ROOT_NAMESPACE),
    )
}

/// Compiles the routes of `config` for this proxy (its namespace and workload labels, the
/// Gateways that select it: their bound VirtualServices, not the `mesh` ones; its Sidecar's
/// egress scope and outbound traffic policy).
pub(crate) fn build_routes(config: &MeshConfig) -> RouteTable {
    let mut source = SourceContext::from_config(config);
    source.gateways = crate::gateway::gateway_names(config);
    source.egress_hosts = crate::sidecar_listeners::egress_scope(config);
    let table = RouteTable::build(config, &source)
        .with_outbound_mode(crate::capture::outbound_mode(config));
    for warning in table.warnings() {
        tracing::warn!("{warning}");
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, StatusCode};
    use mesh_core::body;
    use mesh_core::config::{Source, load_sources};
    use tower::ServiceExt;

    #[tokio::test]
    async fn ready_is_503_until_the_proxy_says_so() {
        let config = load_sources(&[Source::new(
            "t.yaml",
            "apiVersion: mesh-proxy/v1\nkind: Bootstrap\nmetadata: { name: t }\nspec:\n  workload: { name: t }\n",
        )])
        .unwrap();
        let config = Arc::new(config);
        let bootstrap = config.bootstrap().unwrap().clone();
        let shared = Arc::new(Shared::new(config, &bootstrap, None).unwrap());
        let admin = crate::admin::service(shared.clone());
        let ready = || Request::get("/ready").body(body::empty()).unwrap();
        let resp = admin.clone().oneshot(ready()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        shared.ready.store(true, Ordering::Release);
        let resp = admin.oneshot(ready()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_port_conflict_fails_the_start_naming_the_listener() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let yaml = format!(
            "apiVersion: mesh-proxy/v1\nkind: Bootstrap\nmetadata: {{ name: t }}\nspec:\n  workload: {{ name: t }}\n  outbound: {{ listen: \"127.0.0.1:{port}\" }}\n  admin: {{ listen: \"127.0.0.1:0\" }}\n"
        );
        let config = load_sources(&[Source::new("t.yaml", yaml)]).unwrap();
        let err = RunningProxy::start(Arc::new(config)).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("outbound listener"), "{msg}");
        assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    }
}
