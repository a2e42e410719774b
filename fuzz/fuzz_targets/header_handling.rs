//! Header handling: the proxy's code that reads or rewrites client-controlled headers, on
//! arbitrary header names and values.
//!
//! Input: an HTTP/1-like text, so seeds are readable and the fuzzer's mutations stay close to
//! real requests. Lines end at `\n` (a trailing `\r` is dropped):
//!
//! ```text
//! METHOD URI [VERSION [OPTIONS [PEER]]]     request line; VERSION HTTP/1.0, HTTP/1.1 (default), HTTP/2
//! name: value                               request headers (up to 64)
//!                                           empty line
//! STATUS                                    the upstream's status (default 200)
//! name: value                               the upstream's response headers (up to 64)
//! ```
//!
//! OPTIONS letters: `N` no `ClientInfo` (no client address), `T` the client came over TLS, `6`
//! an IPv6 client, `I` log as an inbound access log. PEER: the verified mTLS identity
//! (`spiffe://…`; anything that does not parse as one means none). Names and values are
//! built with `HeaderName::from_bytes` / `HeaderValue::from_bytes`; what `http` refuses is
//! skipped, anything it accepts (obs-text bytes, leading spaces, empty values, repeated
//! names) goes in. Methods and URIs that `http` refuses fall back to `GET` and `/`.
//!
//! Each input goes through these, none of which may panic; the invariants each one documents
//! are asserted (see docs/FUZZING.md for the list):
//! 1. `mesh_proxy::headers::ProxyHeadersLayer` (hop-by-hop removal, `Connection`-named headers,
//!    `TE: trailers`, `x-forwarded-for/-proto`, `x-request-id`, upgrades and `101`s) on the
//!    request and on the response; `mesh_proxy::upgrade::{is_upgrade_request, Tunnel::of}`;
//!    `mesh_core::host::split_authority` on the authority and every value.
//! 2. `mesh_proxy::xfcc::ForwardClientCertLayer` (sanitize and set XFCC), and
//!    `mesh_core::Identity::parse` on every header value.
//! 3. `mesh_telemetry::trace::TraceLayer` (server and client, 0 % and 100 % sampling, no
//!    collector): W3C `traceparent`/`tracestate` and B3 (`b3`, `x-b3-*`) extraction/injection.
//! 4. `mesh_telemetry::access_log::AccessLogLayer` in JSON and TEXT: escaping of
//!    `user-agent`, `x-forwarded-for`, `x-request-id`, `x-envoy-original-path`, the authority,
//!    the response's `x-mesh-response-flags`.
//! 5. `mesh_telemetry::metrics::MetricsLayer` inbound and outbound (peer metadata exchange,
//!    gRPC status and response flags read from the response); `PeerMetadata::decode` and
//!    `Format::from_accept` on every value.
//! 6. `mesh_routing`: `RouteTable::select`, `request_authority`, and `RouteLayer` over
//!    `BalanceLayer` on a fixed config: header/query/URI matches, `withoutHeaders`, header
//!    operations, URI and authority rewrites, CORS, redirects, direct responses, and
//!    consistent hashing on a header, a cookie (generated with a ttl), a query parameter and
//!    the source IP, with ring hash and Maglev.
//! 7. `mesh_tls::authz`: `AuthorizationPolicies::evaluate` and `AuthzLayer` with
//!    `request.headers[...]` conditions, hosts, paths and methods.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use libfuzzer_sys::fuzz_target;
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::config::bootstrap::{AccessLogEncoding, TracingSettings};
use mesh_core::config::{MeshConfig, Source};
use mesh_core::conn::ClientInfo;
use mesh_core::discovery::{EndpointPublisher, ServiceKey};
use mesh_core::host::split_authority;
use mesh_core::target::UpstreamTarget;
use mesh_core::{Identity, Labels};
use mesh_proxy::headers::ProxyHeadersLayer;
use mesh_proxy::upgrade::{Tunnel, is_upgrade_headers, is_upgrade_request};
use mesh_proxy::xfcc::{ForwardClientCertLayer, XFCC};
use mesh_routing::balance::BalanceLayer;
use mesh_routing::{RouteLayer, RouteTable, SourceContext, request_authority};
use mesh_telemetry::access_log::{AccessLog, AccessLogLayer};
use mesh_telemetry::metrics::{
    Format, Metrics, MetricsLayer, PEER_METADATA_HEADER, PeerMetadata, WorkloadInfo,
};
use mesh_telemetry::trace::{TraceLayer, Tracing};
use mesh_tls::authz::{AuthorizationPolicies, AuthzLayer, AuthzRequest, HttpAttributes};
use tokio::io::AsyncReadExt;
use tower::{Layer, Service, ServiceExt};

// ---------------------------------------------------------------------------------------
// The input

struct Input {
    method: Method,
    uri: Uri,
    version: Version,
    client: Option<ClientInfo>,
    inbound_log: bool,
    peer: Option<Identity>,
    request: Vec<(HeaderName, HeaderValue)>,
    status: StatusCode,
    response: Vec<(HeaderName, HeaderValue)>,
}

const MAX_HEADERS: usize = 64;

fn header_line(line: &[u8]) -> Option<(HeaderName, HeaderValue)> {
    let (name, value) = match line.iter().position(|&b| b == b':') {
        // A leading ':' keeps pseudo-header-like names in play (`:authority` is refused by
        // `http`, which is the point).
        Some(0) => match line[1..].iter().position(|&b| b == b':') {
            Some(i) => (&line[..i + 1], &line[i + 2..]),
            None => (line, &b""[..]),
        },
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &b""[..]),
    };
    let value = value.strip_prefix(b" ").unwrap_or(value);
    let name = HeaderName::from_bytes(name).ok()?;
    let value = HeaderValue::from_bytes(value).ok()?;
    Some((name, value))
}

fn parse(data: &[u8]) -> Option<Input> {
    let mut lines = data
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let first = lines.next()?;
    let mut tokens = first.split(|&b| b == b' ');
    let method = tokens
        .next()
        .and_then(|m| Method::from_bytes(m).ok())
        .unwrap_or(Method::GET);
    let uri = tokens
        .next()
        .and_then(|u| Uri::try_from(u).ok())
        .unwrap_or_else(|| Uri::from_static("/"));
    let version = match tokens.next() {
        Some(b"HTTP/1.0") => Version::HTTP_10,
        Some(b"HTTP/2") | Some(b"HTTP/2.0") => Version::HTTP_2,
        Some(b"HTTP/0.9") => Version::HTTP_09,
        _ => Version::HTTP_11,
    };
    let options = tokens.next().unwrap_or_default();
    let peer = tokens
        .next()
        .and_then(|p| std::str::from_utf8(p).ok())
        .and_then(|p| Identity::parse(p).ok());
    let has = |c: u8| options.contains(&c);
    let client = (!has(b'N')).then(|| ClientInfo {
        remote: if has(b'6') {
            "[2001:db8::7]:40000".parse().expect("an address")
        } else {
            "10.1.2.3:40000".parse().expect("an address")
        },
        local: "10.0.0.9:15006".parse().expect("an address"),
        tls: has(b'T'),
    });

    let mut request = Vec::new();
    for line in lines.by_ref() {
        if line.is_empty() {
            break;
        }
        if request.len() < MAX_HEADERS
            && let Some(pair) = header_line(line)
        {
            request.push(pair);
        }
    }
    let status = lines
        .next()
        .and_then(|l| std::str::from_utf8(l).ok())
        .and_then(|l| l.trim().parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let mut response = Vec::new();
    for line in lines {
        if response.len() < MAX_HEADERS
            && let Some(pair) = header_line(line)
        {
            response.push(pair);
        }
    }
    Some(Input {
        method,
        uri,
        version,
        client,
        inbound_log: has(b'I'),
        peer,
        request,
        status,
        response,
    })
}

fn map_of(pairs: &[(HeaderName, HeaderValue)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(name.clone(), value.clone());
    }
    map
}

impl Input {
    fn request(&self) -> Request<BoxBody> {
        let mut req = Request::new(body::empty());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = map_of(&self.request);
        if let Some(client) = &self.client {
            req.extensions_mut().insert(client.clone());
        }
        if let Some(peer) = &self.peer {
            req.extensions_mut().insert(peer.clone());
        }
        req
    }
}

// ---------------------------------------------------------------------------------------
// The upstream: records what reached it, answers with the input's status and headers.

#[derive(Clone, Debug)]
struct Seen {
    headers: HeaderMap,
    uri: Uri,
    upstream: Option<SocketAddr>,
}

#[derive(Clone)]
struct Upstream {
    seen: Arc<Mutex<Vec<Seen>>>,
    status: StatusCode,
    headers: HeaderMap,
}

impl Upstream {
    fn new(input: &Input) -> Upstream {
        Upstream {
            seen: Arc::default(),
            status: input.status,
            headers: map_of(&input.response),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("not poisoned").clone()
    }
}

impl<B> Service<Request<B>> for Upstream {
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<BoxBody>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.seen.lock().expect("not poisoned").push(Seen {
            headers: req.headers().clone(),
            uri: req.uri().clone(),
            upstream: req.extensions().get::<UpstreamTarget>().map(|t| t.addr),
        });
        let mut resp = Response::new(body::empty());
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.headers.clone();
        std::future::ready(Ok(resp))
    }
}

fn values<'a>(map: &'a HeaderMap, name: &HeaderName) -> Vec<&'a [u8]> {
    map.get_all(name)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect()
}

// ---------------------------------------------------------------------------------------
// Shared fixtures, built once per process.

const ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: shop, namespace: default }
spec:
  hosts: [shop, shop-canary, hash-header, hash-cookie, hash-query, hash-ip, hash-maglev]
  ports: [{ number: 80, name: http }]
  resolution: STATIC
  endpoints:
  - { address: 10.0.0.1, labels: { version: v1 } }
  - { address: 10.0.0.2, labels: { version: v2 } }
  - { address: 10.0.0.3, labels: { version: v1 } }
  - { address: 10.0.0.4, labels: { version: v2 } }
  - { address: 10.0.0.5, labels: { version: v1 } }
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: shop, namespace: default }
spec:
  hosts: [shop]
  http:
  - name: canary
    match: [{ headers: { x-canary: { exact: "yes" } } }]
    route: [{ destination: { host: shop-canary } }]
  - name: by-header-regex
    match:
    - headers: { x-version: { regex: "v[0-9]+" } }
      withoutHeaders: { x-debug: {} }
    route:
    - destination: { host: shop, subset: v2 }
      headers:
        request: { set: { x-req-set: "1" }, add: { x-req-add: "a" }, remove: [x-req-remove] }
        response: { set: { x-resp-set: "1" }, add: { x-resp-add: "a" }, remove: [x-resp-remove] }
  - name: query
    match:
    - queryParams: { user: { prefix: "a" } }
    - uri: { prefix: /api/ }
      ignoreUriCase: true
    rewrite: { uri: /v2/ }
    route: [{ destination: { host: shop } }]
  - name: regex-rewrite
    match: [{ uri: { regex: "/items/[0-9]+" }, method: { exact: GET } }]
    rewrite:
      authority: items.internal
      uriRegexRewrite: { match: "^/items/([0-9]+)", rewrite: "/item/\\1" }
    route: [{ destination: { host: shop } }]
  - name: cors
    match: [{ uri: { prefix: /cors } }]
    corsPolicy:
      allowOrigins: [{ exact: "https://example.com" }, { regex: "https://.*\\.example\\.org" }]
      allowMethods: [GET, POST]
      allowHeaders: [x-a]
      exposeHeaders: [x-b]
      maxAge: 24h
      allowCredentials: true
    route: [{ destination: { host: shop } }]
  - name: redirect
    match: [{ uri: { exact: /old } }]
    redirect: { uri: /new, authority: new.example.com }
  - name: redirect-port
    match: [{ uri: { exact: /old2 } }]
    redirect: { uri: /new2, port: 8443 }
  - name: redirect-scheme
    match: [{ uri: { prefix: /tls } }]
    redirect: { scheme: https }
  - name: mirror
    match: [{ uri: { prefix: /mirror } }]
    route: [{ destination: { host: shop } }]
    mirror: { host: shop-canary }
    mirrorPercentage: { value: 100 }
  - name: direct
    match: [{ uri: { prefix: /health } }, { authority: { prefix: "health." } }, { scheme: { exact: https }, uri: { exact: /secure } }]
    directResponse: { status: 200, body: { string: "ok" } }
  # Not `default`: that is the name of the route a host without a VirtualService gets.
  - name: catch-all
    headers:
      request: { remove: [x-strip-me], set: { host: rewritten.shop } }
    route:
    - { destination: { host: shop, subset: v1 }, weight: 50 }
    - { destination: { host: shop, subset: v2 }, weight: 50 }
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: shop, namespace: default }
spec:
  host: shop
  trafficPolicy: { loadBalancer: { simple: ROUND_ROBIN } }
  subsets:
  - { name: v1, labels: { version: v1 } }
  - { name: v2, labels: { version: v2 } }
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: hash-header, namespace: default }
spec:
  host: hash-header
  trafficPolicy: { loadBalancer: { consistentHash: { httpHeaderName: x-user } } }
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: hash-maglev, namespace: default }
spec:
  host: hash-maglev
  trafficPolicy: { loadBalancer: { consistentHash: { httpHeaderName: x-user, maglev: {} } } }
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: hash-cookie, namespace: default }
spec:
  host: hash-cookie
  trafficPolicy:
    loadBalancer:
      consistentHash: { httpCookie: { name: session, path: /, ttl: 60s } }
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: hash-query, namespace: default }
spec:
  host: hash-query
  trafficPolicy: { loadBalancer: { consistentHash: { httpQueryParameterName: user } } }
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: hash-ip, namespace: default }
spec:
  host: hash-ip
  trafficPolicy: { loadBalancer: { consistentHash: { useSourceIp: true } } }
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: deny-header, namespace: default }
spec:
  action: DENY
  rules:
  - when: [{ key: "request.headers[x-deny]", values: ["yes"] }]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: allow-some, namespace: default }
spec:
  action: ALLOW
  rules:
  - to: [{ operation: { methods: [GET, HEAD], paths: ["/api/*", "/items/{*}", "*/public"], hosts: ["shop", "*.example.com"] } }]
  - when: [{ key: "request.headers[x-token]", values: ["secret-*", "*-admin"] }]
  - from: [{ source: { principals: ["cluster.local/ns/default/*"] } }]
    when: [{ key: "request.headers[x-role]", notValues: ["guest"] }]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: audit-curl, namespace: default }
spec:
  action: AUDIT
  rules:
  - when: [{ key: "request.headers[user-agent]", values: ["curl/*"] }]
"#;

struct Fixtures {
    runtime: tokio::runtime::Runtime,
    table: Arc<ArcSwap<RouteTable>>,
    balance: BalanceLayer,
    policies: Arc<ArcSwap<AuthorizationPolicies>>,
    unsampled: Tracing,
    sampled: Tracing,
    own: Identity,
    workload: Arc<WorkloadInfo>,
    /// `MESH_FUZZ_DEBUG` set: print what routing made of each input (to check seeds).
    debug: bool,
}

fn fixtures() -> &'static Fixtures {
    thread_local! {
        static FIXTURES: &'static Fixtures = Box::leak(Box::new(build_fixtures()));
    }
    FIXTURES.with(|f| *f)
}

fn build_fixtures() -> Fixtures {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    let config: MeshConfig = mesh_core::config::load_sources(&[Source::new("routes.yaml", ROUTES)])
        .unwrap_or_else(|e| panic!("the fuzz fixture config does not load:\n{e}"));
    let labels: Labels = [("app", "productpage"), ("version", "v1")]
        .into_iter()
        .collect();
    let table = RouteTable::build(&config, &SourceContext::sidecar("default", labels.clone()));
    assert!(table.warnings().is_empty(), "{:?}", table.warnings());
    let publisher = Arc::new(EndpointPublisher::default());
    publisher.publish(config.services().iter().map(|port| {
        (
            ServiceKey::new(port.host.clone(), port.number),
            port.endpoints.clone(),
        )
    }));
    let policies = AuthorizationPolicies::for_workload(&config, "default", &labels, "istio-system");
    assert_eq!(policies.len(), 3, "the fixture's policies apply");
    let tracing = |sampling| {
        Tracing::new(
            &TracingSettings {
                sampling,
                otlp: None,
            },
            "productpage.default",
        )
        .expect("tracing without a collector")
    };
    Fixtures {
        runtime,
        table: Arc::new(ArcSwap::from_pointee(table)),
        balance: BalanceLayer::new(publisher),
        policies: Arc::new(ArcSwap::from_pointee(policies)),
        unsampled: tracing(0.0),
        sampled: tracing(100.0),
        own: Identity::parse("spiffe://cluster.local/ns/default/sa/productpage")
            .expect("a SPIFFE ID"),
        workload: Arc::new(
            WorkloadInfo::new("productpage-v1", "default")
                .with_app("productpage")
                .with_version("v1"),
        ),
        debug: std::env::var_os("MESH_FUZZ_DEBUG").is_some(),
    }
}

// ---------------------------------------------------------------------------------------
// 1. ProxyHeaders

/// The names a `Connection` header lists, as RFC 9110 §7.6.1 defines them (and as
/// `headers.rs` documents): comma-separated tokens of its values, `TE` excepted.
fn connection_named(map: &HeaderMap) -> Vec<HeaderName> {
    map.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| *n != header::TE)
        .collect()
}

fn has_token(map: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    map.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// `Tunnel::of` on a request with no connection to take over (no hyper `OnUpgrade`): an
/// upgrade loses its upgrade headers and goes on as an ordinary request (`upgrade.rs`).
fn tunnel(input: &Input) {
    let mut req = input.request();
    let upgrade = req.method() != Method::CONNECT && is_upgrade_request(&req);
    let before = req.headers().clone();
    let tunnel = Tunnel::of(&mut req);
    assert!(
        matches!(tunnel, Tunnel::None),
        "a tunnel without a connection to take over"
    );
    let after = req.headers();
    if upgrade {
        assert!(!after.contains_key(header::UPGRADE) && !after.contains_key(header::CONNECTION));
    } else {
        assert_eq!(after, &before, "Tunnel::of changed an ordinary request");
    }
    // Authorities as telemetry and routing split them.
    let authority = request_authority(&req);
    for text in std::iter::once(authority).chain(before.values().filter_map(|v| v.to_str().ok())) {
        if let Some((host, port)) = split_authority(text) {
            assert!(
                text.contains(host),
                "split_authority({text:?}) invented host {host:?}"
            );
            if !text.contains([':', '@']) && !text.starts_with('[') {
                assert_eq!(
                    (host, port),
                    (text, 80),
                    "split_authority({text:?}) without a port"
                );
            }
        }
    }
}

async fn proxy_headers(input: &Input) {
    let orig = map_of(&input.request);
    let req = input.request();
    let upgrade = is_upgrade_request(&req);
    assert_eq!(
        upgrade,
        input.version == Version::HTTP_11 && is_upgrade_headers(&orig),
        "is_upgrade_request disagrees with is_upgrade_headers"
    );
    assert_eq!(
        is_upgrade_headers(&orig),
        has_token(&orig, &header::CONNECTION, "upgrade")
            && orig.contains_key(header::UPGRADE)
            && !has_token(&orig, &header::UPGRADE, "h2c"),
        "is_upgrade_headers is not the documented rule"
    );

    let upstream = Upstream::new(input);
    let resp = ProxyHeadersLayer
        .layer(upstream.clone())
        .oneshot(req)
        .await
        .expect("the upstream answers");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    let out = &seen[0].headers;

    // Request side.
    let xff = HeaderName::from_static("x-forwarded-for");
    let xfp = HeaderName::from_static("x-forwarded-proto");
    let xrid = HeaderName::from_static("x-request-id");
    let named = connection_named(&orig);
    let mut removed: Vec<HeaderName> = vec![
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ];
    removed.extend(named.iter().cloned());
    let reset = [xff.clone(), xfp.clone(), xrid.clone(), header::TE];
    for name in &removed {
        if reset.contains(name)
            || (upgrade && (*name == header::UPGRADE || *name == header::CONNECTION))
        {
            continue;
        }
        assert!(
            !out.contains_key(name),
            "hop-by-hop header {name} reached the upstream: {:?}",
            values(out, name)
        );
    }
    if upgrade {
        let asked = orig
            .get(header::UPGRADE)
            .expect("an upgrade names a protocol");
        assert_eq!(
            values(out, &header::UPGRADE),
            [asked.as_bytes()],
            "Upgrade of an upgrade"
        );
        assert_eq!(
            values(out, &header::CONNECTION),
            [&b"upgrade"[..]],
            "Connection of an upgrade"
        );
    }
    let wants_trailers = has_token(&orig, &header::TE, "trailers");
    if wants_trailers {
        assert_eq!(
            values(out, &header::TE),
            [&b"trailers"[..]],
            "TE: trailers is kept alone"
        );
    } else {
        assert!(
            !out.contains_key(header::TE),
            "TE other than trailers reached the upstream"
        );
    }
    // What survives hop-by-hop removal is what the request says about itself.
    let survives = |name: &HeaderName| !named.contains(name) && orig.contains_key(name);
    match &input.client {
        Some(client) => {
            let ip = client.remote.ip().to_string();
            let prior = (!named.contains(&xff))
                .then(|| orig.get(&xff))
                .flatten()
                .and_then(|v| v.to_str().ok())
                .filter(|p| !p.trim().is_empty());
            let expected = match prior {
                Some(p) => format!("{p}, {ip}"),
                None => ip,
            };
            assert_eq!(
                values(out, &xff),
                [expected.as_bytes()],
                "x-forwarded-for does not end with the client's address"
            );
        }
        None if survives(&xff) => assert_eq!(values(out, &xff), values(&orig, &xff)),
        None => assert!(!out.contains_key(&xff)),
    }
    if survives(&xfp) {
        assert_eq!(
            values(out, &xfp),
            values(&orig, &xfp),
            "x-forwarded-proto was changed"
        );
    } else {
        let proto: &[u8] = if input.client.as_ref().is_some_and(|c| c.tls) {
            b"https"
        } else {
            b"http"
        };
        assert_eq!(
            values(out, &xfp),
            [proto],
            "x-forwarded-proto set when absent"
        );
    }
    if survives(&xrid) {
        assert_eq!(
            values(out, &xrid),
            values(&orig, &xrid),
            "x-request-id was changed"
        );
    } else {
        let ids = values(out, &xrid);
        assert_eq!(ids.len(), 1, "one generated x-request-id");
        let id = std::str::from_utf8(ids[0]).expect("a UUID is ASCII");
        assert!(
            id.len() == 36
                && id.as_bytes()[14] == b'4'
                && id
                    .bytes()
                    .enumerate()
                    .all(|(i, b)| if [8, 13, 18, 23].contains(&i) {
                        b == b'-'
                    } else {
                        b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
                    }),
            "generated x-request-id {id:?} is not a lower-case v4 UUID"
        );
    }
    // Everything else reaches the upstream untouched, and nothing is invented.
    for name in orig.keys() {
        if removed.contains(name) || reset.contains(name) {
            continue;
        }
        assert_eq!(
            values(out, name),
            values(&orig, name),
            "end-to-end header {name} changed"
        );
    }
    for name in out.keys() {
        assert!(
            orig.contains_key(name)
                || reset.contains(name)
                || (upgrade && (*name == header::UPGRADE || *name == header::CONNECTION)),
            "header {name} appeared from nowhere"
        );
    }

    // Response side.
    let sent = map_of(&input.response);
    let got = resp.headers();
    let resp_upgrade =
        input.status == StatusCode::SWITCHING_PROTOCOLS && sent.contains_key(header::UPGRADE);
    let named = connection_named(&sent);
    let mut removed: Vec<HeaderName> = vec![
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
    ];
    removed.extend(named);
    for name in &removed {
        if resp_upgrade && (*name == header::UPGRADE || *name == header::CONNECTION) {
            continue;
        }
        assert!(
            !got.contains_key(name),
            "hop-by-hop response header {name} reached the client"
        );
    }
    if resp_upgrade {
        let proto = sent.get(header::UPGRADE).expect("checked");
        assert_eq!(
            values(got, &header::UPGRADE),
            [proto.as_bytes()],
            "Upgrade of a 101"
        );
        assert_eq!(
            values(got, &header::CONNECTION),
            [&b"upgrade"[..]],
            "Connection of a 101"
        );
    }
    for name in sent.keys() {
        if !removed.contains(name) {
            assert_eq!(
                values(got, name),
                values(&sent, name),
                "response header {name} changed"
            );
        }
    }
    for name in got.keys() {
        assert!(
            sent.contains_key(name)
                || (resp_upgrade && (*name == header::UPGRADE || *name == header::CONNECTION)),
            "response header {name} appeared from nowhere"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 2. XFCC and identities

async fn xfcc(input: &Input, own: &Identity) {
    let orig = map_of(&input.request);
    for own in [Some(own.clone()), None] {
        let upstream = Upstream::new(input);
        ForwardClientCertLayer::new(own.clone())
            .layer(upstream.clone())
            .oneshot(input.request())
            .await
            .expect("the upstream answers");
        let seen = upstream.seen();
        let out = &seen[0].headers;
        match (&own, &input.peer) {
            (Some(own), Some(peer)) => {
                let expected = format!("By={own};URI={peer}");
                assert_eq!(
                    values(out, &XFCC),
                    [expected.as_bytes()],
                    "XFCC of an mTLS peer"
                );
            }
            _ => assert!(!out.contains_key(XFCC), "a client's XFCC reached the app"),
        }
        for name in orig.keys().filter(|n| **n != XFCC) {
            assert_eq!(
                values(out, name),
                values(&orig, name),
                "XFCC layer changed {name}"
            );
        }
    }
    // A SPIFFE ID is always a valid header value (the XFCC layer relies on it).
    for (_, value) in input.request.iter().chain(&input.response) {
        if let Ok(text) = value.to_str()
            && let Ok(id) = Identity::parse(text)
        {
            assert_eq!(id.to_string(), text, "Identity does not print as parsed");
            assert!(HeaderValue::from_str(id.as_str()).is_ok());
            let _ = (
                id.trust_domain(),
                id.path(),
                id.principal(),
                id.namespace(),
                id.service_account(),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// 3. Trace context propagation

fn is_lower_hex(s: &[u8]) -> bool {
    s.iter()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

fn hex_u128(s: &[u8]) -> u128 {
    u128::from_str_radix(std::str::from_utf8(s).expect("hex is ASCII"), 16).expect("hex")
}

/// A W3C Trace Context `traceparent` as the specification (level 1, §3.2) defines a valid
/// one: `version-traceid-parentid-flags`, lower-case hex, version `ff` invalid, version `00`
/// exactly 55 bytes, later versions may append `-…`; all-zero ids invalid. Optional
/// whitespace around a field value is not part of it. Returns (trace id, span id, sampled).
fn w3c_parent(value: &[u8]) -> Option<(u128, u128, bool)> {
    let v = value.trim_ascii();
    if v.len() < 55 || !is_lower_hex(&v[..2]) || &v[..2] == b"ff" {
        return None;
    }
    if (&v[..2] == b"00" && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let (trace, span, flags) = (&v[3..35], &v[36..52], &v[53..55]);
    if !is_lower_hex(trace) || !is_lower_hex(span) || !is_lower_hex(flags) {
        return None;
    }
    let (trace, span) = (hex_u128(trace), hex_u128(span));
    if trace == 0 || span == 0 {
        return None;
    }
    Some((trace, span, hex_u128(flags) & 1 == 1))
}

async fn trace(input: &Input, fx: &Fixtures) {
    let orig = map_of(&input.request);
    let tp = HeaderName::from_static("traceparent");
    let ts = HeaderName::from_static("tracestate");
    let b3 = HeaderName::from_static("b3");
    let b3_trace = HeaderName::from_static("x-b3-traceid");
    let b3_span = HeaderName::from_static("x-b3-spanid");
    let b3_sampled = HeaderName::from_static("x-b3-sampled");
    let b3_names = [
        b3.clone(),
        b3_trace.clone(),
        b3_span.clone(),
        HeaderName::from_static("x-b3-parentspanid"),
        b3_sampled.clone(),
        HeaderName::from_static("x-b3-flags"),
    ];
    let incoming = values(&orig, &tp);
    let parent = match incoming.as_slice() {
        [one] => w3c_parent(one),
        _ => None,
    };
    let no_b3 = b3_names.iter().all(|n| !orig.contains_key(n));

    for (tracing, percent) in [(&fx.unsampled, 0.0), (&fx.sampled, 100.0)] {
        for layer in [TraceLayer::server(tracing), TraceLayer::client(tracing)] {
            let upstream = Upstream::new(input);
            let resp = layer
                .layer(upstream.clone())
                .oneshot(input.request())
                .await
                .expect("the upstream answers");
            drop(resp);
            let seen = upstream.seen();
            let out = &seen[0].headers;
            let tps = values(out, &tp);
            assert_eq!(tps.len(), 1, "exactly one traceparent goes out");
            let v = tps[0];
            assert!(
                v.len() == 55
                    && v.starts_with(b"00-")
                    && v[35] == b'-'
                    && v[52] == b'-'
                    && is_lower_hex(&v[3..35])
                    && is_lower_hex(&v[36..52])
                    && (&v[53..] == b"00" || &v[53..] == b"01"),
                "malformed outgoing traceparent {:?}",
                String::from_utf8_lossy(v)
            );
            let (trace_id, span_id, sampled) =
                w3c_parent(v).expect("the outgoing traceparent is valid (non-zero ids)");
            let (trace_hex, span_hex) = (&v[3..35], &v[36..52]);
            if let Some((in_trace, _, in_sampled)) = parent {
                assert_eq!(
                    trace_id, in_trace,
                    "a valid traceparent's trace is continued"
                );
                assert_eq!(sampled, in_sampled, "the caller's sampling decision stands");
                assert_eq!(
                    values(out, &ts),
                    values(&orig, &ts),
                    "tracestate is forwarded untouched"
                );
            } else {
                assert!(
                    !out.contains_key(&ts),
                    "a tracestate without a valid traceparent went out"
                );
                if no_b3 {
                    assert_eq!(
                        sampled,
                        percent == 100.0,
                        "a new trace is sampled by percentage"
                    );
                }
            }
            // B3 goes back out in each form it came in, naming this proxy's span.
            let b3_trace_ok = |t: &[u8]| {
                (t.len() == 32 && t == trace_hex)
                    || (t.len() == 16
                        && &trace_hex[..16] == b"0000000000000000"
                        && t == &trace_hex[16..])
            };
            if orig.contains_key(&b3) {
                let out_b3 = values(out, &b3);
                assert_eq!(out_b3.len(), 1, "one b3 goes out");
                let parts: Vec<&[u8]> = out_b3[0].split(|&b| b == b'-').collect();
                assert!(
                    (parts.len() == 3 || parts.len() == 4)
                        && b3_trace_ok(parts[0])
                        && parts[1] == span_hex
                        && matches!(parts[2], b"0" | b"1" | b"d")
                        && (parts[2] == b"d" || (parts[2] == b"1") == sampled)
                        && parts
                            .get(3)
                            .is_none_or(|p| p.len() == 16 && is_lower_hex(p)),
                    "outgoing b3 {:?} does not match traceparent {:?}",
                    String::from_utf8_lossy(out_b3[0]),
                    String::from_utf8_lossy(v)
                );
            }
            if orig.contains_key(&b3_trace) || orig.contains_key(&b3_sampled) {
                let t = values(out, &b3_trace);
                assert!(
                    t.len() == 1 && b3_trace_ok(t[0]),
                    "x-b3-traceid {t:?} vs {v:?}"
                );
                assert_eq!(values(out, &b3_span), [span_hex], "x-b3-spanid");
            } else if !orig.contains_key(&b3) {
                for name in &b3_names {
                    assert_eq!(values(out, name), values(&orig, name), "{name} was touched");
                }
            }
            let _ = span_id;
        }
    }
}

// ---------------------------------------------------------------------------------------
// 4. Access logs

fn lossy(v: &HeaderValue) -> String {
    String::from_utf8_lossy(v.as_bytes()).into_owned()
}

async fn access_log(input: &Input) {
    let orig = map_of(&input.request);
    for encoding in [AccessLogEncoding::Json, AccessLogEncoding::Text] {
        let (writer, mut reader) = tokio::io::duplex(1 << 20);
        let log = AccessLog::from_writer(writer, encoding).expect("inside a runtime");
        let layer = if input.inbound_log {
            AccessLogLayer::inbound(log.clone(), 9080)
        } else {
            AccessLogLayer::new(log.clone())
        };
        let upstream = Upstream::new(input);
        let resp = layer
            .layer(upstream.clone())
            .oneshot(input.request())
            .await
            .expect("the upstream answers");
        drop(resp);
        log.flush().await.expect("the log flushes");
        // Every handle gone: the writer task writes what it has and closes the pipe.
        drop(layer);
        drop(log);
        let mut out = Vec::new();
        reader.read_to_end(&mut out).await.expect("reading the log");

        assert_eq!(
            out.iter().filter(|&&b| b == b'\n').count(),
            1,
            "not exactly one line: {:?}",
            String::from_utf8_lossy(&out)
        );
        assert_eq!(out.last(), Some(&b'\n'));
        let line = std::str::from_utf8(&out).expect("a log line is UTF-8");
        match encoding {
            AccessLogEncoding::Json => {
                let v: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                let first = |name: &str| orig.get(name).map(lossy);
                let expect_str = |key: &str, want: Option<String>| {
                    let got = &v[key];
                    match want {
                        Some(w) => assert_eq!(got.as_str(), Some(w.as_str()), "{key} in {line}"),
                        None => assert!(got.is_null(), "{key} should be null in {line}"),
                    }
                };
                expect_str("method", Some(input.method.as_str().to_string()));
                expect_str("user_agent", first("user-agent"));
                expect_str("x_forwarded_for", first("x-forwarded-for"));
                expect_str("request_id", first("x-request-id"));
                expect_str(
                    "path",
                    first("x-envoy-original-path")
                        .or_else(|| input.uri.path_and_query().map(|p| p.as_str().to_string())),
                );
                expect_str(
                    "authority",
                    match input.uri.authority() {
                        Some(a) => Some(a.as_str().to_string()),
                        None => first("host"),
                    },
                );
                assert_eq!(
                    v["response_code"].as_u64(),
                    Some(u64::from(input.status.as_u16())),
                    "{line}"
                );
            }
            AccessLogEncoding::Text => {
                assert!(
                    !line[..line.len() - 1]
                        .bytes()
                        .any(|b| b < 0x20 || b == 0x7f),
                    "an unescaped control character in {line:?}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 5. Metrics and peer metadata

async fn metrics(input: &Input, fx: &Fixtures) {
    let registry = Arc::new(Metrics::without_process_metrics());
    let own_header = PeerMetadata::of(&fx.workload)
        .encode()
        .expect("a valid own header");
    let resolver: mesh_telemetry::metrics::ServiceResolver =
        Arc::new(|authority: &str| Some(Arc::from(authority)));
    let layers = [
        (
            MetricsLayer::outbound(registry.clone(), fx.workload.clone()),
            true,
        ),
        (
            MetricsLayer::inbound(registry.clone(), fx.workload.clone(), resolver),
            false,
        ),
    ];
    for (layer, outbound) in layers {
        let upstream = Upstream::new(input);
        let resp = layer
            .layer(upstream.clone())
            .oneshot(input.request())
            .await
            .expect("the upstream answers");
        drop(resp);
        let seen = upstream.seen();
        let out = &seen[0].headers;
        if outbound {
            assert_eq!(
                values(out, &PEER_METADATA_HEADER),
                [own_header.as_bytes()],
                "outbound requests carry exactly our own peer metadata"
            );
        } else {
            assert!(
                !out.contains_key(PEER_METADATA_HEADER),
                "a peer's metadata header reached the app"
            );
        }
    }

    for (_, value) in input.request.iter().chain(&input.response) {
        if let Ok(meta) = PeerMetadata::decode(value.as_bytes()) {
            let encoded = meta.encode().expect("decoded metadata names a workload");
            assert_eq!(
                PeerMetadata::decode(encoded.as_bytes()),
                Ok(meta.clone()),
                "peer metadata does not round-trip"
            );
            let _ = (meta.canonical_service(), meta.canonical_revision());
        }
        if Format::from_accept(Some(value)) == Format::OpenMetrics {
            assert!(
                value.to_str().is_ok_and(|v| v
                    .to_ascii_lowercase()
                    .contains("application/openmetrics-text")),
                "OpenMetrics chosen for an Accept that does not name it: {value:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// 6. Routing and balancing

/// Envoy's header value for matching: several values comma-joined.
fn joined(map: &HeaderMap, name: &str) -> Option<String> {
    let mut parts = map.get_all(name).iter().peekable();
    parts.peek()?;
    Some(
        parts
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(","),
    )
}

/// The fixture's CORS origins: exact `https://example.com`, regex `https://.*\.example\.org`
/// (RE2 full match; header values that are `str`s hold no newline).
fn cors_allows(origin: &str) -> bool {
    origin == "https://example.com"
        || (origin.len() >= "https://.example.org".len()
            && origin.starts_with("https://")
            && origin.ends_with(".example.org"))
}

type Routed = Result<(Response<BoxBody>, Vec<Seen>), BoxError>;

async fn route_once(fx: &Fixtures, input: &Input, req: Request<BoxBody>) -> Routed {
    route_with(fx, &Upstream::new(input), req).await
}

async fn route_with(fx: &Fixtures, upstream: &Upstream, req: Request<BoxBody>) -> Routed {
    let svc = RouteLayer::new(fx.table.clone()).layer(fx.balance.layer(upstream.clone()));
    let resp = svc.oneshot(req).await?;
    Ok((resp, upstream.seen()))
}

/// Envoy's shadow host as `mirror.rs` documents it: `-shadow` appended to the host, before
/// any port (`reviews:9080` → `reviews-shadow:9080`, `[::1]:80` → `[::1]-shadow:80`).
fn shadow_of(authority: &str) -> String {
    let port = if authority.starts_with('[') {
        authority.rfind("]:").map(|i| i + 1)
    } else {
        authority.rfind(':')
    };
    match port {
        Some(i) => format!("{}-shadow{}", &authority[..i], &authority[i..]),
        None => format!("{authority}-shadow"),
    }
}

async fn routing(input: &Input, fx: &Fixtures) {
    let req = input.request();
    let orig = req.headers().clone();
    let authority = request_authority(&req).to_owned();
    let table = fx.table.load();
    let names = |s: &mesh_routing::Selection| {
        (
            s.route_name().map(str::to_owned),
            s.match_name().map(str::to_owned),
        )
    };
    let selected = table.select(&req).map(|s| names(&s)).ok();
    let again = table.select(&req).map(|s| names(&s)).ok();
    assert_eq!(selected, again, "route selection is not deterministic");
    let _ = table.serves(&req);
    let route = selected.and_then(|(route, _)| route);
    if authority == "shop" && joined(&orig, "x-canary").as_deref() == Some("yes") {
        assert_eq!(
            route.as_deref(),
            Some("canary"),
            "x-canary: yes routes to the canary"
        );
    }

    let upstream = Upstream::new(input);
    let first = route_with(fx, &upstream, req).await;
    if fx.debug {
        match &first {
            Ok((resp, seen)) => eprintln!(
                "route {route:?} for {authority:?}: {} upstream {:?} {:?}",
                resp.status(),
                seen.first().and_then(|s| s.upstream),
                seen.first().map(|s| &s.uri)
            ),
            Err(e) => eprintln!("route {route:?} for {authority:?}: error {e}"),
        }
    }
    let Ok((resp, seen)) = first else {
        return;
    };
    let sent = map_of(&input.response);

    match route.as_deref() {
        Some("by-header-regex") if seen.len() == 1 => {
            let h = &seen[0].headers;
            assert_eq!(
                values(h, &HeaderName::from_static("x-req-set")),
                [&b"1"[..]]
            );
            assert!(!h.contains_key("x-req-remove"));
            assert_eq!(
                h.get_all("x-req-add")
                    .iter()
                    .last()
                    .map(HeaderValue::as_bytes),
                Some(&b"a"[..])
            );
            let r = resp.headers();
            assert_eq!(
                values(r, &HeaderName::from_static("x-resp-set")),
                [&b"1"[..]]
            );
            assert!(!r.contains_key("x-resp-remove"));
            assert_eq!(
                r.get_all("x-resp-add")
                    .iter()
                    .last()
                    .map(HeaderValue::as_bytes),
                Some(&b"a"[..])
            );
        }
        Some("regex-rewrite") if seen.len() == 1 => {
            // `uri: {regex: "/items/[0-9]+"}` matched the whole path; `^/items/([0-9]+)` →
            // `/item/\1` rewrites it and keeps the query.
            let path = input.uri.path();
            let expected = format!("/item/{}", &path["/items/".len()..]);
            assert_eq!(seen[0].uri.path(), expected, "uriRegexRewrite of {path}");
            assert_eq!(
                seen[0].uri.query(),
                input.uri.query(),
                "the query survives a rewrite"
            );
        }
        Some("redirect") => {
            // `redirect: {uri: /new, authority: new.example.com}`: the request's scheme,
            // the new authority and path, the request's query.
            let scheme = match input.uri.scheme_str() {
                Some(s) => s,
                None if input.client.as_ref().is_some_and(|c| c.tls) => "https",
                None => "http",
            };
            let query = input
                .uri
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            let expected = format!("{scheme}://new.example.com/new{query}");
            assert!(seen.is_empty(), "a redirect reached the service");
            assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
            assert_eq!(
                values(resp.headers(), &header::LOCATION),
                [expected.as_bytes()],
                "redirect location"
            );
        }
        Some(name @ ("redirect-port" | "redirect-scheme")) => {
            assert!(seen.is_empty(), "a redirect reached the service");
            let location = resp.headers().get(header::LOCATION);
            let location = location
                .unwrap_or_else(|| panic!("{name} without a Location"))
                .to_str()
                .expect("a location is ASCII");
            if name == "redirect-port" {
                assert!(location.contains(":8443/new2"), "{name}: {location}");
            } else {
                assert!(location.starts_with("https://"), "{name}: {location}");
            }
        }
        Some("mirror") if seen.len() == 1 => {
            // The shadow goes out on a spawned task: let it run.
            for _ in 0..16 {
                tokio::task::yield_now().await;
            }
            let all = upstream.seen();
            if fx.debug {
                eprintln!("mirror: {} requests reached the service", all.len());
            }
            if let [primary, shadow] = all.as_slice() {
                let authority = match primary.uri.authority() {
                    Some(a) => a.as_str().to_owned(),
                    None => primary
                        .headers
                        .get(header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or("")
                        .to_owned(),
                };
                let expected = shadow_of(&authority);
                assert_eq!(
                    values(&shadow.headers, &header::HOST),
                    [expected.as_bytes()],
                    "the shadow's host"
                );
                for (name, value) in &primary.headers {
                    if name != header::HOST {
                        assert!(
                            shadow.headers.get_all(name).iter().any(|v| v == value),
                            "the shadow lost {name}"
                        );
                    }
                }
            }
        }
        Some("catch-all") if seen.len() == 1 => {
            assert!(
                !seen[0].headers.contains_key("x-strip-me"),
                "remove: [x-strip-me]"
            );
        }
        Some("cors") => {
            let origin = orig
                .get(header::ORIGIN)
                .filter(|o| !o.is_empty())
                .and_then(|o| o.to_str().ok())
                .filter(|o| cors_allows(o));
            let preflight = input.method == Method::OPTIONS
                && orig
                    .get(header::ACCESS_CONTROL_REQUEST_METHOD)
                    .is_some_and(|m| !m.is_empty());
            let acao = resp.headers().get(header::ACCESS_CONTROL_ALLOW_ORIGIN);
            if let (Some(origin), true) = (origin, preflight) {
                assert!(seen.is_empty(), "an allowed preflight reached the service");
                assert_eq!(resp.status(), StatusCode::OK);
                assert_eq!(acao.map(HeaderValue::as_bytes), Some(origin.as_bytes()));
            } else if !sent.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
                && let Some(acao) = acao
            {
                assert_eq!(
                    Some(acao.as_bytes()),
                    origin.map(str::as_bytes),
                    "access-control-allow-origin for an origin the policy does not allow"
                );
            }
        }
        _ => {}
    }

    // Consistent hashing: the same key reaches the same endpoint.
    let Some(endpoint) = seen.first().and_then(|s| s.upstream) else {
        return;
    };
    let has_client = input.client.is_some();
    let query_has_user = input.uri.query().is_some_and(|q| {
        q.split('&')
            .any(|pair| pair.split_once('=').map_or(pair, |(k, _)| k) == "user")
    });
    let keyed = match authority.as_str() {
        "hash-header" | "hash-maglev" => orig.contains_key("x-user"),
        "hash-query" => query_has_user,
        "hash-ip" | "hash-cookie" => has_client,
        _ => false,
    };
    if keyed && let Ok((_, again)) = route_once(fx, input, input.request()).await {
        assert_eq!(
            again.first().and_then(|s| s.upstream),
            Some(endpoint),
            "the same hash key went to another endpoint ({authority})"
        );
    }
    // A generated affinity cookie, sent back, keeps the client on its endpoint.
    let cookies = values(resp.headers(), &header::SET_COOKIE);
    if authority == "hash-cookie" && cookies.len() == values(&sent, &header::SET_COOKIE).len() + 1 {
        let generated = std::str::from_utf8(cookies[cookies.len() - 1]).expect("ASCII");
        let pair = generated.split(';').next().expect("a name=value");
        assert!(
            pair.starts_with("session=\""),
            "generated cookie {generated:?}"
        );
        let mut req = input.request();
        req.headers_mut().remove(header::COOKIE);
        req.headers_mut().insert(
            header::COOKIE,
            HeaderValue::from_str(pair).expect("a cookie value"),
        );
        if let Ok((resp, again)) = route_once(fx, input, req).await {
            assert_eq!(
                again.first().and_then(|s| s.upstream),
                Some(endpoint),
                "the affinity cookie {pair} went to another endpoint"
            );
            assert_eq!(
                values(resp.headers(), &header::SET_COOKIE).len(),
                values(&sent, &header::SET_COOKIE).len(),
                "a cookie was generated although the request carried one"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// 7. Authorization

async fn authz(input: &Input, fx: &Fixtures) {
    let req = input.request();
    let policies = fx.policies.load();
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("");
    let client = input.client.clone();
    let decision = client.as_ref().map(|client| {
        let ask = AuthzRequest {
            peer: input.peer.as_ref(),
            source_ip: client.remote.ip(),
            destination_ip: client.local.ip(),
            destination_port: 9080,
            http: Some(HttpAttributes {
                method: req.method().as_str(),
                path: req.uri().path(),
                host,
                headers: req.headers(),
            }),
        };
        let decision = policies.evaluate(&ask);
        assert_eq!(
            decision,
            policies.evaluate(&ask),
            "authorization is not deterministic"
        );
        // The DENY policy matches exactly `x-deny: yes` (several values are comma-joined).
        let deny = joined(req.headers(), "x-deny").as_deref() == Some("yes");
        assert_eq!(
            !decision.allowed && decision.policy.as_deref() == Some("default/deny-header"),
            deny,
            "DENY on request.headers[x-deny]: {decision:?}"
        );
        let _ = policies.check_connection(
            input.peer.as_ref(),
            client.remote.ip(),
            client.local.ip(),
            9080,
        );
        decision
    });
    let upstream = Upstream::new(input);
    let resp = AuthzLayer::new(fx.policies.clone())
        .with_destination_port(9080)
        .layer(upstream.clone())
        .oneshot(req)
        .await
        .expect("the upstream answers");
    let allowed = decision.is_some_and(|d| d.allowed);
    assert_eq!(
        resp.status() != StatusCode::FORBIDDEN || input.status == StatusCode::FORBIDDEN,
        allowed || input.status == StatusCode::FORBIDDEN,
        "the layer and evaluate disagree"
    );
    assert_eq!(
        upstream.seen().len(),
        usize::from(allowed),
        "a denied request reached the app"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = parse(data) else {
        return;
    };
    let fx = fixtures();
    tunnel(&input);
    fx.runtime.block_on(async {
        proxy_headers(&input).await;
        xfcc(&input, &fx.own).await;
        trace(&input, fx).await;
        access_log(&input).await;
        metrics(&input, fx).await;
        routing(&input, fx).await;
        authz(&input, fx).await;
    });
});
