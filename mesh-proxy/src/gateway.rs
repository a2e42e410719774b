//! The Istio ingress gateway: the listeners of the `Gateway` resources that select this proxy.
//!
//! A proxy serves every `Gateway` whose `spec.selector` labels are all among its Bootstrap's
//! `spec.workload.labels`. An **empty selector selects nothing** (Istio would select every
//! gateway workload; without Kubernetes every proxy would then become a gateway, which is
//! never what a stray `Gateway` means). Its name for VirtualService binding is
//! `namespace/name` ([`gateway_names`]); `proxy.rs` hands those names to
//! [`mesh_routing::SourceContext::gateways`], so the route table holds the VirtualServices
//! bound to them (and not the `mesh`-only ones) in per-port gateway virtual hosts, looked up
//! by the port of the listener a request arrived on, as Istio builds one route configuration
//! per gateway port.
//!
//! [`plan`] groups the servers into one listener per (`bind`, `port.number`) (`bind`
//! defaults to `0.0.0.0`) and compiles everything a connection needs once:
//! - `HTTP`/`HTTP2`/`GRPC` servers: plaintext HTTP/1.1 and HTTP/2 (prior knowledge). The
//!   request's host (the port dropped) picks the most specific server whose `hosts` match
//!   (exact before `*.suffix`, longer suffixes first, `*` last; a `namespace/` prefix is
//!   stripped); none: `404` with `x-mesh-response-flags: NR`, as the sidecar answers an
//!   unknown host. A server with `tls.httpsRedirect: true` answers `301` with
//!   `Location: https://<Host as sent><path and query>` (Envoy's `require_tls`, which keeps
//!   the `Host` value as it came).
//! - `HTTPS`/`TLS` servers, `tls.mode`:
//!   - `SIMPLE`: TLS terminated with the server's certificate; `MUTUAL`: a client
//!     certificate verified against the CA is required as well (`OPTIONAL_MUTUAL`: verified
//!     when sent). HTTP (ALPN `h2`, `http/1.1`) is served on the decrypted stream, with the
//!     same host check restricted to the server the SNI chose (Istio's per-server route
//!     configuration). A terminated `TLS` server serves HTTP too: routing its stream by a
//!     VirtualService's `tcp` routes is not supported.
//!   - `PASSTHROUGH`: not terminated; the SNI chooses a VirtualService `tls` route bound to
//!     the gateway (`match.sniHosts`, and `port` when given; several destinations drawn by
//!     `weight`), and the raw stream, ClientHello included, goes through the proxy's
//!     outbound TCP path (`crate::tcp_out`: the balancer over the destination's endpoints,
//!     outlier detection, TCP metrics), as the `TCP` servers below. No route: closed (`NR`).
//!
//! - `TCP` servers (also `MONGO`, `REDIS`, `MYSQL`, which a gateway proxies as TCP): each
//!   connection goes where the `tls`/`tcp` routes of the VirtualServices bound to the
//!   gateway for that port send it (`match.port`, source and subnet matches, weights; see
//!   `mesh_routing::RouteTable::select_gateway_tcp`), through the proxy's outbound TCP path
//!   (`crate::tcp_out`: balancing, outlier detection, mesh mTLS, TCP metrics). A connection
//!   no route takes is closed (`NR`). A port's TCP servers cannot share it with HTTP or TLS
//!   ones.
//!
//!   Certificates: `serverCertificate` / `privateKey` / `caCertificates` are file paths; or
//!   `credentialName` names a **directory** holding `cert.pem` (the chain), `key.pem` and,
//!   for MUTUAL, `root.pem` (the client CA): the layout `mesh-proxy ca issue --out DIR`
//!   writes (there is no secret store to look a Kubernetes secret up in). An explicit
//!   `caCertificates` wins over `root.pem`. Files are read once, at start.
//!
//! Several servers on one port are told apart by the ClientHello's SNI, which this module
//! reads itself (the bytes are buffered and replayed to rustls or to the passthrough
//! destination) and matches like hosts (exact, then wildcards); a ClientHello without SNI, or
//! with one no server names, goes to the port's first server. Why not rustls's
//! `ResolvesServerCertUsingSni`: servers on one port may differ in more than the
//! certificate — client authentication (`SIMPLE` beside `MUTUAL`), termination itself
//! (`PASSTHROUGH`) — and their hosts may be wildcards, which that resolver does not match;
//! so a whole `ServerConfig` (rustls, aws-lc-rs provider) is chosen per server before the
//! handshake.
//!
//! Requests then go through the very stack the sidecar's outbound listener uses
//! ([`crate::outbound::stack`]: telemetry, routing, retries, balancing, mesh mTLS
//! origination), so a gateway with a Bootstrap `identity` calls mesh workloads over
//! ISTIO_MUTUAL. The listener set is fixed at start, like the other listeners: a `Gateway`
//! change on config reload changes routing (the names bound, the `tls`/`tcp` routes) but
//! binds or closes nothing until restart.

use std::collections::HashMap;

use crate::client_hello::{Rewind, read_client_hello};
use std::convert::Infallible;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::header::LOCATION;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use mesh_core::ResponseFlags;
use mesh_core::body::{self, BoxBody};
use mesh_core::config::networking::{Server, ServerTlsMode, ServerTlsSettings};
use mesh_core::config::{Gateway, MeshConfig, Protocol};
use mesh_core::conn::ClientInfo;
use mesh_core::host::{split_authority, wildcard_matches};
use mesh_tls::TlsError;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::version::{TLS12, TLS13};
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tower::ServiceExt;

use crate::server::HttpService;
use crate::tcp_out::OutboundTcp;

/// How long a client has to send its ClientHello and finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the gateway listeners could not be planned: the gateway, server and port named once.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("Gateway {gateway} server {server} (port {port}): {reason}")]
    Server {
        gateway: String,
        server: usize,
        port: u16,
        reason: String,
    },
    #[error("Gateway {gateway} server {server} (port {port}): {source}")]
    Tls {
        gateway: String,
        server: usize,
        port: u16,
        source: TlsError,
    },
    #[error("gateway listener {addr} ({gateways}): {reason}")]
    Listener {
        addr: SocketAddr,
        gateways: String,
        reason: String,
    },
}

/// The `Gateway`s that select this proxy: every label of `spec.selector` is among the
/// Bootstrap's workload labels; an empty selector selects nothing (see the module docs).
pub fn selected(config: &MeshConfig) -> Vec<&Gateway> {
    let Some(bootstrap) = config.bootstrap() else {
        return Vec::new();
    };
    let labels = &bootstrap.spec.workload.labels;
    config
        .gateways()
        .iter()
        .filter(|gw| !gw.spec.selector.is_empty() && labels.matches(&gw.spec.selector))
        .collect()
}

/// The `namespace/name` of every Gateway that selects this proxy, for
/// [`mesh_routing::SourceContext::gateways`].
pub fn gateway_names(config: &MeshConfig) -> Vec<String> {
    selected(config).into_iter().map(qualified_name).collect()
}

fn qualified_name(gw: &Gateway) -> String {
    format!("{}/{}", gw.namespace(), gw.name())
}

/// One gateway listener: an address and the servers it serves, compiled.
#[derive(Debug)]
pub struct GatewayListener {
    addr: SocketAddr,
    /// `gateway ns/a, ns/b on 0.0.0.0:443`, for logs and errors.
    name: String,
    /// The `namespace/name`s of the Gateways with a server here.
    gateways: Vec<String>,
    kind: ListenerKind,
}

#[derive(Debug)]
enum ListenerKind {
    /// HTTP servers: a request's host picks the server.
    Plain(Arc<HostRouter>),
    /// TLS servers: the ClientHello's SNI picks the server.
    Tls(TlsServers),
    /// TCP servers: the bound VirtualServices' `tcp` routes for the port pick the service.
    Tcp,
}

impl GatewayListener {
    /// Where the listener binds (`bind`, else `0.0.0.0`, and `port.number`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A name for logs and errors: the gateways and the address.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `namespace/name`s of the Gateways with a server on this listener.
    pub fn gateways(&self) -> &[String] {
        &self.gateways
    }
}

/// Plans the listeners of the Gateways that select this proxy, in the order their first
/// server appears (Gateways in load order). Certificates are read and checked here, so a bad
/// file fails the start before anything binds.
pub fn plan(config: &MeshConfig) -> Result<Vec<GatewayListener>, GatewayError> {
    struct Group<'a> {
        addr: SocketAddr,
        gateways: Vec<String>,
        servers: Vec<(String, usize, &'a Server)>,
    }
    let mut groups: Vec<Group<'_>> = Vec::new();
    for gw in selected(config) {
        let gw_name = qualified_name(gw);
        for (i, server) in gw.spec.servers.iter().enumerate() {
            let port = server.port.number.get();
            let ip = match server.bind.as_deref() {
                None | Some("") => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                Some(bind) => bind.parse().map_err(|_| GatewayError::Server {
                    gateway: gw_name.clone(),
                    server: i,
                    port,
                    reason: format!(
                        "bind {bind:?} is not an IP address (unix domain sockets are not supported)"
                    ),
                })?,
            };
            let addr = SocketAddr::new(ip, port);
            let group = match groups.iter_mut().position(|g| g.addr == addr) {
                Some(at) => &mut groups[at],
                None => {
                    groups.push(Group {
                        addr,
                        gateways: Vec::new(),
                        servers: Vec::new(),
                    });
                    let last = groups.len() - 1;
                    &mut groups[last]
                }
            };
            if !group.gateways.contains(&gw_name) {
                group.gateways.push(gw_name.clone());
            }
            group.servers.push((gw_name.clone(), i, server));
        }
    }
    groups
        .into_iter()
        .map(|group| {
            let name = format!("gateway {} on {}", group.gateways.join(", "), group.addr);
            let kind = compile_listener(&group.servers, group.addr, &group.gateways)?;
            Ok(GatewayListener {
                addr: group.addr,
                name,
                gateways: group.gateways,
                kind,
            })
        })
        .collect()
}

fn compile_listener(
    servers: &[(String, usize, &Server)],
    addr: SocketAddr,
    gateways: &[String],
) -> Result<ListenerKind, GatewayError> {
    let port = addr.port();
    let mut plain = Vec::new();
    let mut tls = Vec::new();
    let mut tcp = false;
    for (gateway, i, server) in servers {
        let fail = |reason: String| GatewayError::Server {
            gateway: gateway.clone(),
            server: *i,
            port,
            reason,
        };
        match server.port.effective_protocol() {
            Protocol::Http | Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb => {
                let redirect = server
                    .tls
                    .as_ref()
                    .and_then(|t| t.https_redirect)
                    .unwrap_or(false);
                plain.push((server.hosts.as_slice(), redirect));
            }
            Protocol::Https | Protocol::Tls => {
                let Some(settings) = &server.tls else {
                    return Err(fail(
                        "an HTTPS/TLS server needs a tls block with a mode".to_string(),
                    ));
                };
                let mode = match settings.mode.unwrap_or(ServerTlsMode::Simple) {
                    ServerTlsMode::Passthrough => TlsMode::Passthrough,
                    ServerTlsMode::Simple => TlsMode::Terminate(
                        server_config(settings, Auth::None).map_err(|e| e.at(gateway, *i, port))?,
                    ),
                    ServerTlsMode::Mutual => TlsMode::Terminate(
                        server_config(settings, Auth::Required)
                            .map_err(|e| e.at(gateway, *i, port))?,
                    ),
                    ServerTlsMode::OptionalMutual => TlsMode::Terminate(
                        server_config(settings, Auth::Optional)
                            .map_err(|e| e.at(gateway, *i, port))?,
                    ),
                    other @ (ServerTlsMode::AutoPassthrough | ServerTlsMode::IstioMutual) => {
                        return Err(fail(format!("tls.mode {other:?} is not supported")));
                    }
                };
                tls.push(TlsServer {
                    hosts: Arc::new(HostRouter::new([(server.hosts.as_slice(), false)])),
                    mode,
                });
            }
            Protocol::Tcp | Protocol::Mongo | Protocol::Redis | Protocol::Mysql => tcp = true,
            other => {
                return Err(fail(format!(
                    "protocol {other:?} is not supported on a gateway (HTTP, HTTP2, GRPC, HTTPS, TLS, TCP)"
                )));
            }
        }
    }
    let gateways_list = gateways.join(", ");
    if tcp {
        return if plain.is_empty() && tls.is_empty() {
            Ok(ListenerKind::Tcp)
        } else {
            Err(GatewayError::Listener {
                addr,
                gateways: gateways_list,
                reason: "TCP servers cannot share a port with HTTP or TLS servers".to_string(),
            })
        };
    }
    match (plain.is_empty(), tls.is_empty()) {
        (false, true) => Ok(ListenerKind::Plain(Arc::new(HostRouter::new(plain)))),
        (true, false) => {
            let sni = HostMatcher::new(servers.iter().filter_map(|(_, _, s)| {
                matches!(s.port.effective_protocol(), Protocol::Https | Protocol::Tls)
                    .then_some(s.hosts.as_slice())
            }));
            Ok(ListenerKind::Tls(TlsServers { servers: tls, sni }))
        }
        _ => Err(GatewayError::Listener {
            addr,
            gateways: gateways_list,
            reason: "plaintext (HTTP) and TLS (HTTPS, TLS) servers cannot share a port".to_string(),
        }),
    }
}

// ---------------------------------------------------------------------------------------
// Host matching

/// Server hosts compiled for lookups: exact names in a map, wildcards most specific first.
/// The value is the index of the first server naming the pattern.
#[derive(Debug, Default)]
struct HostMatcher {
    exact: HashMap<String, usize>,
    /// `*.suffix` and `*`, longest first.
    wildcards: Vec<(String, usize)>,
}

impl HostMatcher {
    fn new<'a>(servers: impl IntoIterator<Item = &'a [String]>) -> HostMatcher {
        let mut matcher = HostMatcher::default();
        for (i, hosts) in servers.into_iter().enumerate() {
            for host in hosts {
                let host = server_host(host);
                if host.starts_with('*') {
                    if !matcher.wildcards.iter().any(|(h, _)| *h == host) {
                        matcher.wildcards.push((host, i));
                    }
                } else {
                    matcher.exact.entry(host).or_insert(i);
                }
            }
        }
        // Stable: among patterns of one length, the first server's stays first.
        matcher
            .wildcards
            .sort_by_key(|(h, _)| std::cmp::Reverse(h.len()));
        matcher
    }

    /// The server for a lower-case host name.
    fn find(&self, host: &str) -> Option<usize> {
        self.exact.get(host).copied().or_else(|| {
            self.wildcards
                .iter()
                .find(|(pattern, _)| wildcard_matches(pattern, host))
                .map(|(_, i)| *i)
        })
    }
}

/// A server `hosts` entry without its `namespace/` prefix, lower-case.
fn server_host(host: &str) -> String {
    let host = host.split_once('/').map_or(host, |(_, h)| h);
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Which server of a listener a request's host selects, and what it does with it.
#[derive(Debug)]
struct HostRouter {
    hosts: HostMatcher,
    /// Per server: `tls.httpsRedirect`.
    redirect: Vec<bool>,
}

impl HostRouter {
    fn new<'a>(servers: impl IntoIterator<Item = (&'a [String], bool)>) -> HostRouter {
        let (hosts, redirect): (Vec<&[String]>, Vec<bool>) = servers.into_iter().unzip();
        HostRouter {
            hosts: HostMatcher::new(hosts),
            redirect,
        }
    }

    /// `None` to pass the request on; `Some(reply)` to answer it here (404 NR, 301).
    fn admit<B>(&self, req: &Request<B>) -> Option<Response<BoxBody>> {
        let authority = mesh_routing::request_authority(req);
        let host = split_authority(authority).map_or("", |(host, _)| host);
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        let Some(server) = self.hosts.find(host) else {
            return Some(ResponseFlags::NO_ROUTE_FOUND.local_reply(
                StatusCode::NOT_FOUND,
                format_args!("no route: this gateway serves no host {authority:?}"),
            ));
        };
        if !self.redirect.get(server).copied().unwrap_or(false) {
            return None;
        }
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let mut resp = Response::new(body::empty());
        match HeaderValue::try_from(format!("https://{authority}{path}")) {
            Ok(location) => {
                *resp.status_mut() = StatusCode::MOVED_PERMANENTLY;
                resp.headers_mut().insert(LOCATION, location);
            }
            Err(_) => *resp.status_mut() = StatusCode::BAD_REQUEST,
        }
        Some(resp)
    }
}

// ---------------------------------------------------------------------------------------
// TLS

#[derive(Debug)]
struct TlsServers {
    servers: Vec<TlsServer>,
    /// SNI → index into `servers`.
    sni: HostMatcher,
}

#[derive(Debug)]
struct TlsServer {
    /// This server's hosts: a terminated request's host must be one of them.
    hosts: Arc<HostRouter>,
    mode: TlsMode,
}

enum TlsMode {
    Terminate(Arc<ServerConfig>),
    Passthrough,
}

impl fmt::Debug for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsMode::Terminate(_) => f.write_str("Terminate"),
            TlsMode::Passthrough => f.write_str("Passthrough"),
        }
    }
}

#[derive(Clone, Copy)]
enum Auth {
    None,
    Optional,
    Required,
}

/// A certificate problem, before the gateway and server are known.
enum CertError {
    Tls(TlsError),
    Other(String),
}

impl CertError {
    fn at(self, gateway: &str, server: usize, port: u16) -> GatewayError {
        match self {
            CertError::Tls(source) => GatewayError::Tls {
                gateway: gateway.to_string(),
                server,
                port,
                source,
            },
            CertError::Other(reason) => GatewayError::Server {
                gateway: gateway.to_string(),
                server,
                port,
                reason,
            },
        }
    }
}

impl From<TlsError> for CertError {
    fn from(e: TlsError) -> Self {
        CertError::Tls(e)
    }
}

/// The certificate, key and client CA files of a server (see the module docs for
/// `credentialName`).
fn credential_files(
    settings: &ServerTlsSettings,
) -> Result<(PathBuf, PathBuf, Option<PathBuf>), CertError> {
    if let Some(dir) = &settings.credential_name {
        let dir = Path::new(dir);
        let ca = settings
            .ca_certificates
            .as_ref()
            .map(PathBuf::from)
            .unwrap_or_else(|| dir.join(mesh_tls::ca::ROOT_FILE));
        return Ok((
            dir.join(mesh_tls::ca::CERT_FILE),
            dir.join(mesh_tls::ca::KEY_FILE),
            Some(ca),
        ));
    }
    match (&settings.server_certificate, &settings.private_key) {
        (Some(cert), Some(key)) => Ok((
            PathBuf::from(cert),
            PathBuf::from(key),
            settings.ca_certificates.as_ref().map(PathBuf::from),
        )),
        _ => Err(CertError::Other(
            "TLS termination needs credentialName, or serverCertificate and privateKey".to_string(),
        )),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn server_config(settings: &ServerTlsSettings, auth: Auth) -> Result<Arc<ServerConfig>, CertError> {
    if !settings.credential_names.is_empty() {
        return Err(CertError::Other(
            "credentialNames is not supported; use credentialName (a directory)".to_string(),
        ));
    }
    let (cert_path, key_path, ca_path) = credential_files(settings)?;
    let cert_name = cert_path.display().to_string();
    let key_name = key_path.display().to_string();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(&cert_path)?)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            what: cert_name.clone(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { what: cert_name }.into());
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&key_path)?).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            what: key_name.clone(),
        },
        e => TlsError::Pem {
            what: key_name.clone(),
            reason: e.to_string(),
        },
    })?;
    let provider = mesh_tls::verify::provider();
    let mismatch = || TlsError::KeyMismatch {
        cert: cert_name.clone(),
        key: key_name.clone(),
    };
    let certified =
        CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => mismatch(),
            e => TlsError::BadKey {
                what: key_name.clone(),
                reason: e.to_string(),
            },
        })?;
    if let Err(rustls::Error::InconsistentKeys(_)) = certified.keys_match() {
        return Err(mismatch().into());
    }
    let config_err = |e: rustls::Error| CertError::Tls(TlsError::Config(e.to_string()));
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&TLS13, &TLS12])
        .map_err(config_err)?;
    let builder = match auth {
        Auth::None => builder.with_no_client_auth(),
        Auth::Optional | Auth::Required => {
            let Some(ca_path) = ca_path else {
                return Err(CertError::Other(
                    "MUTUAL needs caCertificates (or root.pem in the credentialName directory)"
                        .to_string(),
                ));
            };
            let what = ca_path.display().to_string();
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&read(&ca_path)?) {
                let cert = cert.map_err(|e| TlsError::Pem {
                    what: what.clone(),
                    reason: e.to_string(),
                })?;
                roots.add(cert).map_err(|e| TlsError::BadTrustBundle {
                    what: what.clone(),
                    reason: e.to_string(),
                })?;
            }
            if roots.is_empty() {
                return Err(TlsError::NoCertificate { what }.into());
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match auth {
                Auth::Optional => verifier.allow_unauthenticated(),
                _ => verifier,
            };
            let verifier = verifier
                .build()
                .map_err(|e| CertError::Tls(TlsError::Config(e.to_string())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(config_err)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

// ---------------------------------------------------------------------------------------
// Serving

/// The hyper service of one connection: tags each request with its connection, answers
/// what the server's hosts do not admit (404 NR, 301), passes the rest to the stack.
fn gateway_service(
    stack: HttpService,
    router: Arc<HostRouter>,
    info: ClientInfo,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<BoxBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<BoxBody>, Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |req: Request<Incoming>| {
        let mut req = req.map(body::boxed);
        req.extensions_mut().insert(info.clone());
        match router.admit(&req) {
            Some(reply) => futures::future::Either::Left(std::future::ready(Ok(reply))),
            None => futures::future::Either::Right(stack.clone().oneshot(req)),
        }
    })
}

/// What a gateway listener's connections share.
struct Shared {
    gateway: Arc<GatewayListener>,
    stack: HttpService,
    tcp: Arc<OutboundTcp>,
    builder: auto::Builder<TokioExecutor>,
    local: SocketAddr,
    idle_timeout: Duration,
}

/// Where a gateway sends what it accepts: requests to the outbound HTTP stack, TCP server
/// connections to the proxy's outbound TCP path.
pub struct Upstreams {
    pub http: HttpService,
    pub tcp: Arc<OutboundTcp>,
}

impl fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstreams").finish_non_exhaustive()
    }
}

/// Serves `gateway` on `listener` (bound to its [`addr`](GatewayListener::addr)) into
/// `upstreams` until `shutdown` turns true, then drains for at most `drain_timeout`:
/// HTTP/1.1 idle connections close, HTTP/2 gets a GOAWAY, passthrough and TCP streams get
/// the deadline to end.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<GatewayListener>,
    upstreams: Upstreams,
    options: crate::server::ListenerOptions,
    mut shutdown: watch::Receiver<bool>,
    drain_timeout: Duration,
) {
    let local = match listener.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            tracing::error!(listener = %gateway.name, error = %e, "listener has no local address");
            return;
        }
    };
    let shared = Arc::new(Shared {
        gateway,
        stack: upstreams.http,
        tcp: upstreams.tcp,
        builder: crate::server::http_builder(&options.limits),
        local,
        idle_timeout: options.limits.idle_timeout.get(),
    });
    let graceful = GracefulShutdown::new();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    let _ = stream.set_nodelay(true);
                    let counted = options.opened("gateway");
                    let conn = connection(shared.clone(), stream, remote, graceful.watcher());
                    conns.spawn(async move {
                        conn.await;
                        drop(counted);
                    });
                }
                Err(e) => {
                    tracing::warn!(listener = %shared.gateway.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = async { shutdown.wait_for(|stop| *stop).await.is_ok() } => break,
        }
    }
    drop(listener);
    tracing::debug!(listener = %shared.gateway.name, "stopped accepting; draining connections");
    let drained = tokio::time::timeout(drain_timeout, async {
        graceful.shutdown().await;
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            listener = %shared.gateway.name,
            ?drain_timeout,
            open = conns.len(),
            "drain deadline passed with connections still open"
        );
        conns.abort_all();
    }
}

async fn connection(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    remote: SocketAddr,
    watcher: Watcher,
) {
    let name = &shared.gateway.name;
    // The address the client reached (the listener's own may be 0.0.0.0): what `tls`/`tcp`
    // routes match `destinationSubnets` against.
    let local = stream.local_addr().unwrap_or(shared.local);
    let tls = match &shared.gateway.kind {
        ListenerKind::Plain(router) => {
            let router = router.clone();
            serve_http(&shared, stream, remote, router, false, watcher).await;
            return;
        }
        ListenerKind::Tls(tls) => tls,
        ListenerKind::Tcp => {
            // Logged and counted inside, naming the route or its absence.
            let _ =
                crate::tcp_out::proxy_gateway_connection(stream, remote, local, None, &shared.tcp)
                    .await;
            return;
        }
    };
    let mut hello = Vec::with_capacity(2048);
    let read = read_client_hello(&mut stream, &mut hello);
    let sni = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read).await {
        Ok(Ok(sni)) => sni,
        Ok(Err(e)) => {
            tracing::debug!(listener = %name, %remote, error = %e, "no TLS ClientHello");
            return;
        }
        Err(_) => {
            tracing::debug!(listener = %name, %remote, "no ClientHello within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let index = sni.as_deref().and_then(|s| tls.sni.find(s)).unwrap_or(0);
    let Some(server) = tls.servers.get(index) else {
        return;
    };
    let io = Rewind::new(hello, stream);
    match &server.mode {
        TlsMode::Terminate(config) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
            let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await;
            match accepted {
                Ok(Ok(stream)) => {
                    let router = server.hosts.clone();
                    serve_http(&shared, stream, remote, router, true, watcher).await;
                }
                Ok(Err(e)) => {
                    tracing::info!(listener = %name, %remote, sni = ?sni, error = %e, "TLS handshake refused");
                }
                Err(_) => {
                    tracing::info!(listener = %name, %remote, sni = ?sni, "TLS handshake did not finish within {HANDSHAKE_TIMEOUT:?}");
                }
            }
        }
        TlsMode::Passthrough => {
            drop(watcher);
            // The bound `tls` routes by SNI, through the outbound TCP path; logged and
            // counted there.
            let _ = crate::tcp_out::proxy_gateway_connection(
                io,
                remote,
                local,
                sni.as_deref(),
                &shared.tcp,
            )
            .await;
        }
    }
}

/// Serves HTTP/1.1 or HTTP/2 on `io`: each request's host is checked against `router`, then
/// the request goes through the stack.
async fn serve_http<IO>(
    shared: &Shared,
    io: IO,
    remote: SocketAddr,
    router: Arc<HostRouter>,
    tls: bool,
    watcher: Watcher,
) where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let info = ClientInfo {
        remote,
        local: shared.local,
        tls,
    };
    let svc = gateway_service(shared.stack.clone(), router, info);
    crate::server::serve_http(
        &shared.builder,
        io,
        svc,
        watcher,
        shared.idle_timeout,
        "gateway",
        remote,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::{Source, load_sources};

    fn load(yaml: &str) -> MeshConfig {
        load_sources(&[Source::new("t.yaml", yaml)]).unwrap()
    }

    const BOOTSTRAP: &str = "apiVersion: mesh-proxy/v1
kind: Bootstrap
metadata: { name: gw, namespace: istio-system }
spec:
  workload: { name: gw, labels: { istio: ingressgateway, app: gw } }
";

    #[test]
    fn selectors_pick_gateways_and_an_empty_one_picks_none() {
        let config = load(&format!(
            "{BOOTSTRAP}---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{ name: public, namespace: istio-system }}
spec:
  selector: {{ istio: ingressgateway }}
  servers: [{{ port: {{ number: 8080, name: http, protocol: HTTP }}, hosts: ['*'] }}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{ name: other }}
spec:
  selector: {{ istio: egressgateway }}
  servers: [{{ port: {{ number: 8081, name: http, protocol: HTTP }}, hosts: ['*'] }}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{ name: everyone }}
spec:
  servers: [{{ port: {{ number: 8082, name: http, protocol: HTTP }}, hosts: ['*'] }}]
"
        ));
        assert_eq!(gateway_names(&config), vec!["istio-system/public"]);
        let listeners = plan(&config).unwrap();
        assert_eq!(listeners.len(), 1);
        assert_eq!(listeners[0].addr(), "0.0.0.0:8080".parse().unwrap());
    }

    /// A config with the gateway's Bootstrap and a Gateway `public` selecting it, with
    /// `servers` (YAML list items).
    fn public(servers: &str) -> MeshConfig {
        load(&format!(
            "{BOOTSTRAP}---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{ name: public }}
spec:
  selector: {{ app: gw }}
  servers:
{servers}"
        ))
    }

    #[test]
    fn servers_group_by_bind_and_port_and_a_mix_is_refused() {
        let config = public(
            "  - { port: { number: 8080, name: a, protocol: HTTP }, hosts: [a.example.com] }
  - { port: { number: 8080, name: b, protocol: HTTP }, hosts: [b.example.com] }
  - { port: { number: 8080, name: c, protocol: HTTP }, bind: 127.0.0.1, hosts: ['*'] }
",
        );
        let listeners = plan(&config).unwrap();
        let addrs: Vec<_> = listeners.iter().map(|l| l.addr().to_string()).collect();
        assert_eq!(addrs, ["0.0.0.0:8080", "127.0.0.1:8080"]);

        let mixed = public(
            "  - { port: { number: 8443, name: a, protocol: HTTP }, hosts: [a.example.com] }
  - port: { number: 8443, name: b, protocol: TLS }
    hosts: [b.example.com]
    tls: { mode: PASSTHROUGH }
",
        );
        let err = plan(&mixed).unwrap_err().to_string();
        assert!(err.contains("0.0.0.0:8443"), "{err}");
        assert!(err.contains("default/public"), "{err}");

        let tcp_and_http = public(
            "  - { port: { number: 31400, name: tcp, protocol: TCP }, hosts: ['*'] }
  - { port: { number: 31400, name: http, protocol: HTTP }, hosts: ['*'] }
  - { port: { number: 31401, name: mongo, protocol: MONGO }, hosts: ['*'] }
",
        );
        let err = plan(&tcp_and_http).unwrap_err().to_string();
        assert!(
            err.contains("0.0.0.0:31400") && err.contains("TCP servers cannot share a port"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_certificate_names_the_gateway_server_and_file() {
        let config = public(
            "  - port: { number: 443, name: https, protocol: HTTPS }
    hosts: [a.example.com]
    tls: { mode: SIMPLE, credentialName: /nonexistent/creds }
",
        );
        let err = plan(&config).unwrap_err().to_string();
        assert!(
            err.contains("Gateway default/public server 0 (port 443)"),
            "{err}"
        );
        assert!(err.contains("/nonexistent/creds/cert.pem"), "{err}");
    }

    #[test]
    fn hosts_match_most_specific_first_without_namespaces() {
        let servers = [
            vec!["*".to_string()],
            vec!["ns/*.example.com".to_string()],
            vec!["./API.example.com".to_string()],
        ];
        let m = HostMatcher::new(servers.iter().map(Vec::as_slice));
        assert_eq!(m.find("api.example.com"), Some(2));
        assert_eq!(m.find("www.example.com"), Some(1));
        assert_eq!(m.find("example.com"), Some(0));
        let none = HostMatcher::new([["a.example.com".to_string()].as_slice()]);
        assert_eq!(none.find("b.example.com"), None);
    }

    #[test]
    fn redirects_and_unknown_hosts_are_answered_here() {
        let hosts = [
            vec!["secure.example.com".to_string()],
            vec!["*".to_string()],
        ];
        let router = HostRouter::new([(hosts[0].as_slice(), true), (hosts[1].as_slice(), false)]);
        let req = Request::get("/a?b=c")
            .header("host", "Secure.example.com")
            .body(())
            .unwrap();
        let resp = router.admit(&req).unwrap();
        assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(resp.headers()[LOCATION], "https://Secure.example.com/a?b=c");
        let other = Request::get("/").header("host", "x.test").body(()).unwrap();
        assert!(router.admit(&other).is_none());

        let only = HostRouter::new([(hosts[0].as_slice(), false)]);
        let resp = only.admit(&other).unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(resp.headers()["x-mesh-response-flags"], "NR");
    }
}
