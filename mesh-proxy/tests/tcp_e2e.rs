//! Outbound opaque TCP and Istio's `Sidecar` listeners (`captureMode: NONE`), over real
//! sockets on loopback: a TCP egress listener proxying over mTLS to a sidecar whose inbound
//! is opaque TCP (half-close kept, metrics on both sides), a server that speaks first, an
//! HTTP egress listener, ingress listeners, and a service that cannot be reached.
#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_proxy::sidecar_listeners::SidecarError;
use mesh_proxy::{RunningProxy, StartError};
use support::app::App;
use support::pki::{Pki, STRICT, sidecar};
use support::tcp::{
    client_hello, closed_port, echo_server, free_ports, speaks_first, two_versions,
};
use support::{bootstrap, get, http1_client, load, text, wait_ready};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Starts a proxy whose config needs `n` fixed ports (Sidecar listeners cannot ask for port
/// 0): free ports are picked, and picked again on the rare conflict with another test.
async fn start_with_ports(n: usize, yaml: impl Fn(&[u16]) -> String) -> (RunningProxy, Vec<u16>) {
    for _ in 0..5 {
        let ports = free_ports(n);
        match RunningProxy::start(load(&yaml(&ports))).await {
            Ok(proxy) => {
                wait_ready(proxy.admin_addr()).await;
                return (proxy, ports);
            }
            Err(StartError::Sidecar(SidecarError::Bind { .. })) => continue,
            Err(e) => panic!("proxy did not start: {e}"),
        }
    }
    panic!("no free ports after 5 tries");
}

/// A STATIC, mesh-internal ServiceEntry `host` with one TCP port `port` served at `endpoint`;
/// with `sa`, the endpoint is a mesh workload (mTLS, service account `sa`).
fn tcp_entry(host: &str, port: u16, endpoint: SocketAddr, sa: Option<&str>) -> String {
    let labels = match sa {
        Some(sa) => {
            format!("{{ app: {host}, security.istio.io/tlsMode: istio }}\n    serviceAccount: {sa}")
        }
        None => format!("{{ app: {host} }}"),
    };
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: {host}, namespace: default }}
spec:
  hosts: [{host}]
  ports: [{{ number: {port}, name: tcp, protocol: TCP }}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints:
  - address: \"{}\"
    ports: {{ tcp: {} }}
    labels: {labels}
",
        endpoint.ip(),
        endpoint.port()
    )
}

/// A Sidecar for workload `app` with the given `egress:`/`ingress:` YAML (indented by two).
fn sidecar_resource(app: &str, listeners: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: {app}, namespace: default }}
spec:
  workloadSelector: {{ labels: {{ app: {app} }} }}
{listeners}"
    )
}

/// A client sidecar (`sleep`, mTLS identity from `pki`) whose Sidecar resource has a TCP
/// egress listener on a free port for `tcp-echo`, a mesh workload (service account
/// `tcp-echo`) at `inbound`; returns the proxy and the listener's port.
async fn tcp_echo_client(pki: &Pki, inbound: SocketAddr) -> (RunningProxy, Vec<u16>) {
    let client_certs = pki.issue("sleep");
    start_with_ports(1, |p| {
        format!(
            "{}{}{}",
            sidecar("sleep", None, &client_certs),
            tcp_entry("tcp-echo", p[0], inbound, Some("tcp-echo")),
            sidecar_resource(
                "sleep",
                &format!(
                    "  egress:
  - port: {{ number: {}, protocol: TCP, name: tcp }}
    bind: 127.0.0.1
    hosts: [\"./tcp-echo\"]
",
                    p[0]
                )
            )
        )
    })
    .await
}

/// Writes `data`, shuts the write side, and reads until the other side closes (bounded).
async fn half_close_echo(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(data).await.unwrap();
    conn.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut out))
        .await
        .expect("the echo and its EOF arrive")
        .unwrap();
    out
}

async fn metrics(admin: SocketAddr) -> String {
    let resp = http1_client()
        .request(get(admin, "admin", "/metrics"))
        .await
        .unwrap();
    text(resp).await
}

/// Polls `/metrics` until a line starting with `name` contains every one of `labels` (at
/// most 10 s); returns that line.
async fn metric_line(admin: SocketAddr, name: &str, labels: &[&str]) -> String {
    let mut last = String::new();
    for _ in 0..100 {
        last = metrics(admin).await;
        if let Some(line) = last
            .lines()
            .find(|l| l.starts_with(name) && labels.iter().all(|want| l.contains(want)))
        {
            return line.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no {name} line with {labels:?} in:\n{last}");
}

/// Acceptance 1: a client sidecar's TCP egress listener, mTLS to a STRICT server sidecar
/// whose inbound is opaque TCP; the client half-closes and reads the whole echo, then EOF.
#[tokio::test]
async fn tcp_echo_with_half_close_through_an_egress_listener_over_mtls() {
    let pki = Pki::new();
    let echo = echo_server().await;
    let server_certs = pki.issue("tcp-echo");
    let server_yaml = sidecar("tcp-echo", Some(echo), &server_certs).replace(
        &format!("app: \"{echo}\" }}"),
        &format!("app: \"{echo}\", protocol: tcp }}"),
    );
    let server = support::start_proxy(&format!("{server_yaml}{STRICT}")).await;
    let inbound = server.inbound_addr().unwrap();

    let (client, ports) = tcp_echo_client(&pki, inbound).await;
    let egress = client.egress_addrs();
    assert_eq!(egress, [SocketAddr::from(([127, 0, 0, 1], ports[0]))]);

    // Larger than one read, so the copy really streams; the EOF after it is the half-close.
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(half_close_echo(egress[0], &payload).await, payload);
    assert_eq!(
        half_close_echo(egress[0], b"hello mesh").await,
        b"hello mesh"
    );

    let server_line = metric_line(
        server.admin_addr(),
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"destination\"",
            "connection_security_policy=\"mutual_tls\"",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"",
        ],
    )
    .await;
    assert!(server_line.ends_with(" 2"), "{server_line}");
    let client_opened = metric_line(
        client.admin_addr(),
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"source\"",
            "destination_service=\"tcp-echo.default.svc.cluster.local\"",
            "destination_principal=\"spiffe://cluster.local/ns/default/sa/tcp-echo\"",
            "response_flags=\"-\"",
        ],
    )
    .await;
    assert!(client_opened.ends_with(" 2"), "{client_opened}");
    let sent = metric_line(
        client.admin_addr(),
        "istio_tcp_sent_bytes_total",
        &["reporter=\"source\"", "tcp-echo.default.svc.cluster.local"],
    )
    .await;
    assert!(
        sent.ends_with(&format!(" {}", payload.len() + 10)),
        "{sent}"
    );
    metric_line(
        client.admin_addr(),
        "istio_tcp_connections_closed_total",
        &["reporter=\"source\"", "tcp-echo.default.svc.cluster.local"],
    )
    .await;

    client.shutdown().await;
    server.shutdown().await;
}

/// The DestinationRule of a TCP service applies as on the HTTP path: `ISTIO_MUTUAL` makes
/// the connection mTLS (the STRICT server would refuse plaintext; the endpoint has no
/// `tlsMode` label), and `connectionPool.tcp.idleTimeout` closes a quiet connection.
#[tokio::test]
async fn the_destination_rule_sets_mtls_and_the_idle_timeout() {
    let pki = Pki::new();
    let echo = echo_server().await;
    let server_certs = pki.issue("tcp-echo");
    let server_yaml = sidecar("tcp-echo", Some(echo), &server_certs).replace(
        &format!("app: \"{echo}\" }}"),
        &format!("app: \"{echo}\", protocol: tcp }}"),
    );
    let server = support::start_proxy(&format!("{server_yaml}{STRICT}")).await;
    let inbound = server.inbound_addr().unwrap();
    let client_certs = pki.issue("sleep");
    let (client, _) = start_with_ports(1, |p| {
        format!(
            "{}{}{}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: tcp-echo, namespace: default }}
spec:
  host: tcp-echo
  trafficPolicy:
    tls: {{ mode: ISTIO_MUTUAL }}
    connectionPool: {{ tcp: {{ idleTimeout: 300ms }} }}
",
            sidecar("sleep", None, &client_certs),
            tcp_entry("tcp-echo", p[0], inbound, None),
            sidecar_resource(
                "sleep",
                &format!(
                    "  egress:
  - port: {{ number: {}, protocol: TCP, name: tcp }}
    bind: 127.0.0.1
    hosts: [\"./tcp-echo\"]
",
                    p[0]
                )
            )
        )
    })
    .await;
    let egress = client.egress_addrs()[0];
    assert_eq!(half_close_echo(egress, b"over mtls").await, b"over mtls");
    // A connection that stays quiet is closed by the proxy (the echo server never would).
    let mut conn = TcpStream::connect(egress).await.unwrap();
    conn.write_all(b"x").await.unwrap();
    let mut buf = [0u8; 1];
    conn.read_exact(&mut buf).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0))),
        "closed after the idle timeout: {read:?}"
    );
    client.shutdown().await;
    server.shutdown().await;
}

/// Acceptance 2: a server that speaks first (SMTP's greeting) behind a TCP egress listener
/// (`captureMode: NONE`, so bound on 127.0.0.1 by default): the greeting arrives without
/// the client sending a byte, as no protocol detection waits for it.
#[tokio::test]
async fn a_server_that_speaks_first_is_not_stalled() {
    let smtp = speaks_first("220 greeting\r\n").await;
    let (client, _) = start_with_ports(1, |p| {
        format!(
            "{}{}{}",
            bootstrap("client", None),
            tcp_entry("smtp", p[0], smtp, None),
            sidecar_resource(
                "client",
                &format!(
                    "  egress:
  - port: {{ number: {}, name: smtp }}
    captureMode: NONE
    hosts: [\"*/smtp.default.svc.cluster.local\"]
",
                    p[0]
                )
            )
        )
    })
    .await;
    let egress = client.egress_addrs()[0];
    assert!(egress.ip().is_loopback(), "{egress}");
    let mut conn = TcpStream::connect(egress).await.unwrap();
    let mut greeting = [0u8; 14];
    tokio::time::timeout(Duration::from_secs(2), conn.read_exact(&mut greeting))
        .await
        .expect("the greeting arrives without the client speaking")
        .unwrap();
    assert_eq!(&greeting, b"220 greeting\r\n");
    // And the connection carries the client's bytes afterwards.
    conn.write_all(b"EHLO me\r\n").await.unwrap();
    let mut reply = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&reply, b"EHLO me\r\n");
    client.shutdown().await;
}

/// Acceptance 3: an HTTP egress listener serves the outbound HTTP stack: routed by Host.
#[tokio::test]
async fn an_http_egress_listener_routes_by_host() {
    let web = App::start("web").await;
    let other = App::start("other").await;
    let (client, ports) = start_with_ports(1, |p| {
        format!(
            "{}{}{}{}",
            bootstrap("client", None),
            support::service_entry("web", p[0], "HTTP", &[web.addr]),
            support::service_entry("other", p[0], "HTTP", &[other.addr]),
            sidecar_resource(
                "client",
                &format!(
                    "  egress:
  - port: {{ number: {}, protocol: HTTP, name: http }}
    bind: 127.0.0.1
    hosts: [\"./*\"]
",
                    p[0]
                )
            )
        )
    })
    .await;
    let egress = client.egress_addrs()[0];
    let http = http1_client();
    for (host, app) in [("web", "web"), ("other", "other")] {
        let resp = http
            .request(get(egress, &format!("{host}:{}", ports[0]), "/"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-app"], app);
        assert_eq!(text(resp).await, format!("hello from {app}"));
    }
    let resp = http.request(get(egress, "nowhere:1", "/")).await.unwrap();
    assert_eq!(resp.status(), 404, "an unknown host: no route");
    metric_line(
        client.admin_addr(),
        "istio_requests_total",
        &[
            "reporter=\"source\"",
            "destination_service=\"web.default.svc.cluster.local\"",
        ],
    )
    .await;
    client.shutdown().await;
}

/// Acceptance 4: ingress listeners forward to their defaultEndpoint, HTTP through the
/// inbound stack (XFCC, telemetry as destination), TCP through the opaque inbound path.
#[tokio::test]
async fn ingress_listeners_forward_to_their_default_endpoint() {
    let app = App::start("api").await;
    let echo = echo_server().await;
    let (server, ports) = start_with_ports(2, |p| {
        format!(
            "{}{}",
            bootstrap("api", None),
            sidecar_resource(
                "api",
                &format!(
                    "  ingress:
  - port: {{ number: {}, protocol: HTTP, name: http }}
    bind: 127.0.0.1
    defaultEndpoint: \"127.0.0.1:{}\"
  - port: {{ number: {}, protocol: TCP, name: tcp }}
    bind: 127.0.0.1
    defaultEndpoint: \"0.0.0.0:{}\"
",
                    p[0],
                    app.addr.port(),
                    p[1],
                    echo.port()
                )
            )
        )
    })
    .await;
    let ingress = server.ingress_addrs();
    assert_eq!(
        ingress,
        [
            SocketAddr::from(([127, 0, 0, 1], ports[0])),
            SocketAddr::from(([127, 0, 0, 1], ports[1]))
        ]
    );
    let resp = http1_client()
        .request(get(ingress[0], "api", "/hello"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-app"], "api");
    assert_eq!(resp.headers()["x-seen-path"], "/hello");
    assert!(resp.headers().contains_key("x-seen-request-id"));
    assert_eq!(text(resp).await, "hello from api");
    metric_line(
        server.admin_addr(),
        "istio_requests_total",
        &["reporter=\"destination\"", "response_code=\"200\""],
    )
    .await;

    assert_eq!(half_close_echo(ingress[1], b"ping").await, b"ping");
    metric_line(
        server.admin_addr(),
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"destination\"",
            "connection_security_policy=\"none\"",
        ],
    )
    .await;
    server.shutdown().await;
}

/// Captures the `tracing` output of the current thread (the test's current-thread runtime
/// runs every proxy task on it).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Reads until the proxy closes the connection; `true` when it did within 5 s.
async fn closed_by_proxy(addr: SocketAddr) -> bool {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Acceptance 5: TCP egress listeners whose service cannot be reached close the client's
/// connection at once (no hang), and the log names the service (and endpoint); a listener
/// whose hosts name no service refuses connections too, and says why.
#[tokio::test]
async fn an_unreachable_service_closes_the_client_connection_and_is_logged() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let dead = SocketAddr::from(([127, 0, 0, 1], closed_port()));
    let (client, ports) = start_with_ports(3, |p| {
        format!(
            "{}{}{}{}",
            bootstrap("client", None),
            tcp_entry("refusing", p[0], dead, None),
            support::service_entry("empty", p[1], "TCP", &[]),
            sidecar_resource(
                "client",
                &format!(
                    "  egress:
  - port: {{ number: {}, protocol: TCP, name: tcp }}
    bind: 127.0.0.1
    hosts: [\"./refusing\"]
  - port: {{ number: {}, protocol: MYSQL, name: mysql }}
    bind: 127.0.0.1
    hosts: [\"default/empty\"]
  - port: {{ number: {}, protocol: TCP, name: tcp }}
    bind: 127.0.0.1
    hosts: [\"./nothing\"]
",
                    p[0], p[1], p[2]
                )
            )
        )
    })
    .await;
    let egress = client.egress_addrs();
    assert_eq!(egress.len(), 3);

    // An endpoint that refuses: UF, naming the service and the endpoint.
    assert!(
        closed_by_proxy(egress[0]).await,
        "the client connection is closed"
    );
    let service = format!("refusing.default.svc.cluster.local:{}", ports[0]);
    let logged = logs.text();
    assert!(
        logged
            .lines()
            .any(|l| l.contains(&service) && l.contains(&dead.to_string())),
        "no log line names {service} and {dead}:\n{logged}"
    );
    metric_line(
        client.admin_addr(),
        "istio_tcp_connections_closed_total",
        &[
            "reporter=\"source\"",
            "destination_service=\"refusing.default.svc.cluster.local\"",
            "response_flags=\"UF\"",
        ],
    )
    .await;

    // A service without endpoints: UH.
    assert!(
        closed_by_proxy(egress[1]).await,
        "the client connection is closed"
    );
    let service = format!("empty.default.svc.cluster.local:{}", ports[1]);
    let logged = logs.text();
    assert!(
        logged
            .lines()
            .any(|l| l.contains(&service) && l.contains("no healthy upstream")),
        "no log line names {service}:\n{logged}"
    );

    // Hosts that match no service: the listener refuses, and said why at start.
    assert!(
        closed_by_proxy(egress[2]).await,
        "the client connection is closed"
    );
    let logged = logs.text();
    assert!(
        logged
            .lines()
            .any(|l| l.contains("egress[2]") && l.contains("nothing.default.svc.cluster.local")),
        "no log line says why egress[2] refuses:\n{logged}"
    );
    client.shutdown().await;
}

/// A Sidecar listener's port taken by someone else fails the start, naming the listener.
#[tokio::test]
async fn a_port_conflict_fails_the_start_naming_the_sidecar_listener() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let yaml = format!(
        "{}{}",
        bootstrap("client", None),
        sidecar_resource(
            "client",
            &format!(
                "  egress:
  - port: {{ number: {port}, protocol: TCP, name: tcp }}
    bind: 127.0.0.1
    hosts: [\"./*\"]
"
            )
        )
    );
    let err = RunningProxy::start(load(&yaml)).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("Sidecar default/client egress[0]"), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
}

/// `inbound.protocol: auto` (the default) sniffs after the TLS step: HTTP from a peer sidecar
/// is served as HTTP, and opaque TCP over mTLS — or in plaintext under PERMISSIVE — reaches
/// the app as bytes, with half-close, counted as TCP.
#[tokio::test]
async fn an_auto_inbound_tells_opaque_tcp_from_http() {
    let pki = Pki::new();
    let echo = echo_server().await;
    let server_certs = pki.issue("tcp-echo");
    // No protocol: `auto`. PERMISSIVE (Istio's default), so plaintext is accepted too.
    let server = support::start_proxy(&sidecar("tcp-echo", Some(echo), &server_certs)).await;
    let inbound = server.inbound_addr().unwrap();

    // Plaintext opaque bytes straight to the inbound listener.
    assert_eq!(
        half_close_echo(inbound, b"\x00\x01 not http").await,
        b"\x00\x01 not http"
    );

    // Over mTLS from a client sidecar's TCP egress listener.
    let (client, _) = tcp_echo_client(&pki, inbound).await;
    let egress = client.egress_addrs();
    let payload: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(half_close_echo(egress[0], &payload).await, payload);

    let line = metric_line(
        server.admin_addr(),
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"destination\"",
            "connection_security_policy=\"mutual_tls\"",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"",
        ],
    )
    .await;
    assert!(line.ends_with(" 1"), "{line}");
    let line = metric_line(
        server.admin_addr(),
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"destination\"",
            "connection_security_policy=\"none\"",
        ],
    )
    .await;
    assert!(line.ends_with(" 1"), "{line}");
    client.shutdown().await;
    server.shutdown().await;
}

/// A client config for the L4 routing tests: the service `host` on `port` (`protocol`)
/// with endpoints `v1` and `v2` (labelled `version`), their DestinationRule subsets, a
/// VirtualService for `host` with `routes` (its `tcp:`/`tls:` blocks, YAML at the indent of
/// `hosts`), and a Sidecar egress listener for `host` on `port`.
fn versions_config(
    host: &str,
    port: u16,
    protocol: &str,
    [v1, v2]: [SocketAddr; 2],
    routes: &str,
) -> String {
    format!(
        "{}---
{}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: versions, namespace: default }}
spec:
  hosts: [\"{host}\"]
{routes}{}",
        bootstrap("client", None),
        two_versions(host, port, protocol, [v1, v2]),
        sidecar_resource(
            "client",
            &format!(
                "  egress:
  - port: {{ number: {port}, protocol: {protocol}, name: l4 }}
    bind: 127.0.0.1
    hosts: [\"./{host}\"]
"
            )
        )
    )
}

/// The client config of the TCP traffic-shifting test: a `tcp` route sending `w1` % of the
/// connections to `tcp-echo`'s v1 and the rest to v2.
fn shifting_config(port: u16, versions: [SocketAddr; 2], w1: u32) -> String {
    versions_config(
        "tcp-echo",
        port,
        "TCP",
        versions,
        &format!(
            "  tcp:
  - match: [{{ port: {port} }}]
    route:
    - {{ destination: {{ host: tcp-echo, subset: v1 }}, weight: {w1} }}
    - {{ destination: {{ host: tcp-echo, subset: v2 }}, weight: {} }}
",
            100 - w1
        ),
    )
}

/// Connects to `addr` and reads the server's 3-byte greeting: which version answered.
async fn greeting(addr: SocketAddr) -> (TcpStream, String) {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let mut hello = [0u8; 3];
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut hello))
        .await
        .expect("the endpoint greets")
        .unwrap();
    (conn, String::from_utf8_lossy(&hello).into_owned())
}

/// Istio's TCP traffic shifting: a VirtualService `tcp` route splits connections 80/20
/// between two subsets, then a new config moves them all to v2 while a connection opened
/// to v1 before the change keeps working.
#[tokio::test]
async fn a_tcp_route_shifts_connections_between_subsets_by_weight() {
    let v1 = speaks_first("v1\n").await;
    let v2 = speaks_first("v2\n").await;
    let (client, ports) = start_with_ports(1, |p| shifting_config(p[0], [v1, v2], 80)).await;
    let egress = client.egress_addrs()[0];

    let mut seen = std::collections::HashMap::<String, u32>::new();
    for _ in 0..200 {
        let (_, version) = greeting(egress).await;
        *seen.entry(version).or_default() += 1;
    }
    let to_v1 = seen.get("v1\n").copied().unwrap_or(0);
    let to_v2 = seen.get("v2\n").copied().unwrap_or(0);
    assert_eq!(to_v1 + to_v2, 200, "{seen:?}");
    // 80 % of 200 is 160; ± 28 is five standard deviations of the binomial draw.
    assert!((132..=188).contains(&to_v1), "{seen:?}");

    // A connection that went to v1 before the change...
    let mut held = loop {
        let (conn, version) = greeting(egress).await;
        if version == "v1\n" {
            break conn;
        }
    };
    client
        .apply_config(support::load(&shifting_config(ports[0], [v1, v2], 0)))
        .unwrap();
    // ...new connections all go to v2...
    for _ in 0..50 {
        assert_eq!(greeting(egress).await.1, "v2\n");
    }
    // ...and the one in flight still carries bytes to v1.
    held.write_all(b"still here").await.unwrap();
    let mut echoed = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(5), held.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"still here");
    client.shutdown().await;
}

/// VirtualService `tls` routes on a sidecar: on a `TLS` port the proxy reads the
/// ClientHello, routes by its SNI (exact, then a wildcard), falls back to the `tcp` route
/// without a match, and replays the ClientHello to the endpoint byte for byte.
#[tokio::test]
async fn tls_routes_pick_the_endpoint_by_sni() {
    let v1 = speaks_first("v1\n").await;
    let v2 = speaks_first("v2\n").await;
    let (client, _) = start_with_ports(1, |p| {
        versions_config(
            "*.echo.example",
            p[0],
            "TLS",
            [v1, v2],
            "  tls:
  - match: [{ sniHosts: [v2.echo.example, \"*.beta.echo.example\"] }]
    route: [{ destination: { host: \"*.echo.example\", subset: v2 } }]
  tcp:
  - route: [{ destination: { host: \"*.echo.example\", subset: v1 } }]
",
        )
    })
    .await;
    let egress = client.egress_addrs()[0];
    for (sni, expected) in [
        ("v2.echo.example", "v2\n"),
        ("api.beta.echo.example", "v2\n"),
        ("v1.echo.example", "v1\n"),
        ("other.example", "v1\n"),
    ] {
        for _ in 0..5 {
            let hello = client_hello(sni);
            let mut conn = TcpStream::connect(egress).await.unwrap();
            conn.write_all(&hello).await.unwrap();
            // The greeting of the endpoint chosen, then the ClientHello echoed back whole.
            let mut answer = vec![0u8; 3 + hello.len()];
            tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut answer))
                .await
                .expect("the endpoint answers")
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&answer[..3]), expected, "SNI {sni}");
            assert_eq!(&answer[3..], hello.as_slice(), "SNI {sni}");
        }
    }
    // A client that is not TLS at all still gets through, by the tcp route.
    let mut conn = TcpStream::connect(egress).await.unwrap();
    conn.write_all(b"plain\n").await.unwrap();
    let mut answer = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&answer, b"v1\nplain\n");
    client.shutdown().await;
}
