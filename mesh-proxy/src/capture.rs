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
use std::net::{IpAddr, SocketAddr};
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
use mesh_core::target::UpstreamTarget;
use mesh_routing::RouteTable;
use tokio::net::TcpStream;
use tower::{Layer, Service, ServiceExt};

use crate::tcp_out::{OutboundTcp, proxy_with_local};
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

/// The Bootstrap's `outboundTrafficPolicy.mode` of `config` (`ALLOW_ANY` without a
/// Bootstrap, as Istio's default).
pub fn outbound_mode(config: &MeshConfig) -> OutboundTrafficMode {
    config
        .bootstrap()
        .map_or(OutboundTrafficMode::AllowAny, |b| {
            b.spec.outbound_traffic_policy.mode
        })
}

/// The services a captured connection may be addressed to, by the address it was dialled
/// at: each ServiceEntry `addresses` entry (a VIP) with each of its ports, and each endpoint
/// address. Built once per config; looked up per connection.
#[derive(Debug, Default)]
pub struct ServiceAddresses {
    by_addr: HashMap<SocketAddr, Arc<ServicePort>>,
}

impl ServiceAddresses {
    pub fn build(config: &MeshConfig) -> ServiceAddresses {
        let mut by_addr = HashMap::new();
        let services = config.services();
        for entry in config.service_entries() {
            let vips = entry
                .spec
                .addresses
                .iter()
                .filter_map(|a| a.parse::<IpAddr>().ok());
            for vip in vips {
                for port in &entry.spec.ports {
                    let number = port.number.get();
                    let found = entry
                        .spec
                        .hosts
                        .iter()
                        .find_map(|h| services.lookup(&h.to_ascii_lowercase(), number));
                    if let Some(sp) = found {
                        by_addr
                            .entry(SocketAddr::new(vip, number))
                            .or_insert_with(|| sp.clone());
                    }
                }
            }
        }
        for sp in services.iter() {
            for ep in &sp.endpoints {
                by_addr.entry(ep.address).or_insert_with(|| sp.clone());
            }
        }
        ServiceAddresses { by_addr }
    }

    /// The service dialled at `addr`, if the mesh knows one.
    pub fn get(&self, addr: SocketAddr) -> Option<&Arc<ServicePort>> {
        self.by_addr.get(&addr)
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
        let addresses = ServiceAddresses::build(&first);
        CapturedTcp {
            addresses: ArcSwap::from_pointee((first, addresses)),
            config,
            tcp,
        }
    }

    /// The service dialled at `addr` in the config in force.
    pub fn service_at(&self, addr: SocketAddr) -> Option<Arc<ServicePort>> {
        let config = self.config.load_full();
        let current = self.addresses.load();
        if Arc::ptr_eq(&current.0, &config) {
            return current.1.get(addr).cloned();
        }
        // A reload swapped the config: index the new one (once; racing builders agree).
        let rebuilt = ServiceAddresses::build(&config);
        let found = rebuilt.get(addr).cloned();
        self.addresses.store(Arc::new((config, rebuilt)));
        found
    }

    /// Whether opaque TCP to `addr`, a destination no service claims, may pass.
    pub fn passthrough_allowed(&self) -> bool {
        outbound_mode(&self.config.load()) == OutboundTrafficMode::AllowAny
    }
}

/// Opaque TCP straight to `original`: Istio's `PassthroughCluster` for a destination the mesh
/// does not know, under `ALLOW_ANY`.
pub async fn passthrough(client: TcpStream, remote: SocketAddr, original: SocketAddr) {
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

/// Opaque TCP on a captured connection to `original`: to the service dialled, when the mesh
/// knows one; else straight through under `ALLOW_ANY`, closed under `REGISTRY_ONLY`.
pub async fn opaque(
    client: TcpStream,
    remote: SocketAddr,
    original: SocketAddr,
    tcp: &CapturedTcp,
) {
    if let Some(service) = tcp.service_at(original) {
        tracing::trace!(%remote, %original, service = %service.host, "captured TCP to a mesh service");
        // Failures are logged (naming service and endpoint) by the TCP path itself.
        // The original destination is the address the client dialled, for the TCP routes'
        // `destinationSubnets`.
        let _ = proxy_with_local(client, remote, Some(original), service, &tcp.tcp).await;
        return;
    }
    if tcp.passthrough_allowed() {
        return passthrough(client, remote, original).await;
    }
    tracing::info!(
        %remote,
        %original,
        "captured TCP connection refused: no service is known at its destination and outboundTrafficPolicy is REGISTRY_ONLY"
    );
}
