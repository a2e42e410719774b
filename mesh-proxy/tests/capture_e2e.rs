//! Transparent capture for real: inside a network namespace this test creates, the real
//! `mesh-proxy iptables install` writes the REDIRECT rules, the real binary runs as the
//! proxy user (UID 1337, so its own connections are not captured), and plain clients that
//! know nothing of the proxy dial service addresses. Their traffic is captured, proxied and
//! counted; `outboundTrafficPolicy` decides what happens to destinations the mesh does not
//! know.
//!
//! The outer test re-runs this binary's inner test under `unshare -n`, so nothing touches
//! the machine's own network; it needs root (CI runs as root) and `iptables`, which
//! `scripts/test.sh` installs.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::app::App;
use support::{get, http1_client, text};

const BIN: &str = env!("CARGO_BIN_EXE_mesh-proxy");
const INNER: &str = "captured_inside_a_network_namespace";
const IN_NETNS: &str = "MESH_CAPTURE_TEST_IN_NETNS";

/// Service addresses (VIPs): routed out of the namespace's veth, so the OUTPUT chain sees them.
const REVIEWS_VIP: &str = "10.10.0.5";
const ECHO_VIP: &str = "10.10.0.6";
/// A second address of the echo service, which a VirtualService `tcp` route sends to the
/// greeter service instead (`destinationSubnets`).
const ECHO_CANARY_VIP: &str = "10.10.0.7";
/// The outside namespace's subnet, declared as a `resolution: NONE` ServiceEntry's
/// `addresses` for a TCP port a greeter listens on outside.
const OUTSIDE_RANGE: &str = "10.10.0.0/24";
const OUTSIDE_TCP_PORT: u16 = 7001;
/// A TLS port outside, declared by a `resolution: NONE` ServiceEntry for `*.outside.example`
/// (no addresses: the ClientHello's SNI finds it).
const OUTSIDE_TLS_PORT: u16 = 8443;
/// A host outside the mesh: the far end of the veth pair, in a second namespace.
const EXTERNAL_IP: &str = "10.10.0.2";

#[test]
fn transparent_capture_in_a_network_namespace() {
    let exe = std::env::current_exe().unwrap();
    let status = Command::new("unshare")
        .args(["-n", "--"])
        .arg(exe)
        .args(["--exact", INNER, "--include-ignored", "--nocapture"])
        .env(IN_NETNS, "1")
        .status()
        .expect("cannot run unshare (util-linux)");
    assert!(
        status.success(),
        "the capture test inside the namespace failed"
    );
}

/// Kills and reaps a child when dropped, so a failing assertion leaves no process behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Deletes the named namespace when dropped.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn sh(cmd: &str) {
    let status = Command::new("sh").args(["-c", cmd]).status().unwrap();
    assert!(status.success(), "`{cmd}` failed");
}

fn config(
    dir: &Path,
    mode: &str,
    app: SocketAddr,
    echo: SocketAddr,
    greeter: SocketAddr,
) -> String {
    let yaml = format!(
        "apiVersion: mesh-proxy/v1
kind: Bootstrap
metadata: {{ name: client, namespace: default }}
spec:
  workload: {{ name: client, labels: {{ app: client }} }}
  outbound: {{ listen: \"127.0.0.1:15001\" }}
  admin: {{ listen: \"127.0.0.1:15000\" }}
  outboundTrafficPolicy: {{ mode: {mode} }}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: reviews, namespace: default }}
spec:
  hosts: [reviews]
  addresses: [{REVIEWS_VIP}]
  ports: [{{ number: 9080, name: http, protocol: HTTP }}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints: [{{ address: {}, ports: {{ http: {} }} }}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: echo, namespace: default }}
spec:
  hosts: [echo]
  addresses: [{ECHO_VIP}, {ECHO_CANARY_VIP}]
  ports: [{{ number: 7000, name: tcp, protocol: TCP }}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints: [{{ address: {}, ports: {{ tcp: {} }} }}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: greeter, namespace: default }}
spec:
  hosts: [greeter]
  ports: [{{ number: 7000, name: tcp, protocol: TCP }}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints: [{{ address: {}, ports: {{ tcp: {} }} }}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: echo, namespace: default }}
spec:
  hosts: [echo]
  tcp:
  - match: [{{ destinationSubnets: [{ECHO_CANARY_VIP}/32] }}]
    route: [{{ destination: {{ host: greeter }} }}]
---
# Outside the mesh, declared: `resolution: NONE` sends connections to where they were going.
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: outside-http, namespace: default }}
spec:
  hosts: [outside.example]
  ports: [{{ number: 8080, name: http, protocol: HTTP }}]
  resolution: NONE
  location: MESH_EXTERNAL
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: outside-tcp, namespace: default }}
spec:
  hosts: [outside-tcp.example]
  addresses: [{OUTSIDE_RANGE}]
  ports: [{{ number: {OUTSIDE_TCP_PORT}, name: tcp, protocol: TCP }}]
  resolution: NONE
  location: MESH_EXTERNAL
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: outside-tls, namespace: default }}
spec:
  hosts: [\"*.outside.example\"]
  ports: [{{ number: {OUTSIDE_TLS_PORT}, name: tls, protocol: TLS }}]
  resolution: NONE
  location: MESH_EXTERNAL
",
        app.ip(),
        app.port(),
        echo.ip(),
        echo.port(),
        greeter.ip(),
        greeter.port()
    );
    let path = dir.join("mesh.yaml");
    let tmp = dir.join("mesh.yaml.tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path.display().to_string()
}

/// Runs the real binary as UID/GID 1337, the proxy user the iptables rules exempt.
fn spawn_proxy_as_1337(config: &str) -> Reaped {
    let mut child = Command::new("setpriv")
        .args([
            "--reuid=1337",
            "--regid=1337",
            "--clear-groups",
            BIN,
            "run",
            "--config",
            config,
        ])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run setpriv (util-linux)");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[mesh-proxy] {line}");
            if line.contains("proxy ready") {
                let _ = tx.send(());
            }
        }
    });
    let child = Reaped(child);
    rx.recv_timeout(Duration::from_secs(20))
        .expect("the proxy logged readiness");
    child
}

/// A TCP echo server: echoes until the client shuts its side, then closes its own.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

async fn metrics() -> String {
    let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
    let resp = http1_client()
        .request(
            http::Request::get(format!("http://{admin}/metrics"))
                .body(mesh_core::body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    text(resp).await
}

#[ignore = "runs inside a network namespace, started by transparent_capture_in_a_network_namespace"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_inside_a_network_namespace() {
    assert!(
        std::env::var_os(IN_NETNS).is_some(),
        "run through transparent_capture_in_a_network_namespace: it creates the namespace"
    );
    // This namespace: loopback, and a veth whose far end lives in a second namespace (the
    // world outside the mesh), so service addresses route out through it.
    let outside = format!("mesh-outside-{}", std::process::id());
    sh("ip link set lo up");
    sh(&format!("ip netns add {outside}"));
    let _outside = Netns(outside.clone());
    sh("ip link add veth0 type veth peer name veth1");
    sh(&format!("ip link set veth1 netns {outside}"));
    sh("ip addr add 10.10.0.1/24 dev veth0 && ip link set veth0 up");
    sh(&format!(
        "ip netns exec {outside} sh -c 'ip link set lo up && ip addr add {EXTERNAL_IP}/24 dev veth1 && ip link set veth1 up'"
    ));
    // A server outside the mesh, for passthrough.
    let _external = Reaped(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &outside,
                "python3",
                "-m",
                "http.server",
                "8080",
                "--bind",
                EXTERNAL_IP,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start python3's http.server outside the mesh"),
    );
    // And TCP servers there that greet and hang up (on the TLS port too: SNI routing needs
    // only the ClientHello, not a handshake).
    let greeter_outside = |port: u16| {
        let script = format!(
            "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('{EXTERNAL_IP}', {port}))\ns.listen(16)\nwhile True:\n    c, _ = s.accept()\n    c.sendall(b'outside\\n')\n    c.close()\n"
        );
        Reaped(
            Command::new("ip")
                .args(["netns", "exec", &outside, "python3", "-c", &script])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("cannot start a python3 TCP server outside the mesh"),
        )
    };
    let _external_tcp = greeter_outside(OUTSIDE_TCP_PORT);
    let _external_tls = greeter_outside(OUTSIDE_TLS_PORT);

    let app = App::start("reviews").await;
    let echo = echo_server().await;
    let greeter = support::tcp::speaks_first("greeter\n").await;
    let dir = tempfile::tempdir().unwrap();
    // The proxy runs as another user: it must read its config.
    sh(&format!("chmod 755 {}", dir.path().display()));
    let path = config(dir.path(), "ALLOW_ANY", app.addr, echo, greeter);
    let _proxy = spawn_proxy_as_1337(&path);

    let install = Command::new(BIN)
        .args(["iptables", "install", "--no-inbound"])
        .status()
        .unwrap();
    assert!(install.success(), "mesh-proxy iptables install");

    // HTTP to the service's address, as an app resolving `reviews` to its VIP does.
    let client = http1_client();
    let vip: SocketAddr = format!("{REVIEWS_VIP}:9080").parse().unwrap();
    let resp = client.request(get(vip, "reviews:9080", "/")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-app"], "reviews");
    assert_eq!(text(resp).await, "hello from reviews");
    let m = metrics().await;
    assert!(
        m.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("reporter=\"source\"")
            && l.contains("destination_service=\"reviews.default.svc.cluster.local\"")
            && l.contains("response_code=\"200\"")),
        "the captured request is counted:\n{m}"
    );

    // Opaque TCP to a TCP service's address: detected as not HTTP, sent to its endpoint,
    // half-close kept.
    let mut tcp = TcpStream::connect(format!("{ECHO_VIP}:7000"))
        .await
        .unwrap();
    tcp.write_all(b"ping over captured tcp").await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut echoed))
        .await
        .expect("the echo came back")
        .unwrap();
    assert_eq!(echoed, b"ping over captured tcp");

    // The same service at its other address: the VirtualService's `tcp` route matches the
    // original destination (`destinationSubnets`) and sends the connection to the greeter.
    let mut canary = TcpStream::connect(format!("{ECHO_CANARY_VIP}:7000"))
        .await
        .unwrap();
    let mut greeting = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(10), canary.read_exact(&mut greeting))
        .await
        .expect("the greeter answers")
        .unwrap();
    assert_eq!(&greeting, b"greeter\n");
    drop(canary);
    let m = metrics().await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("destination_service=\"greeter.default.svc.cluster.local\"")),
        "the routed connection is counted against the service it went to:\n{m}"
    );

    // A destination the mesh does not know: ALLOW_ANY passes it through as addressed.
    let outside_addr: SocketAddr = format!("{EXTERNAL_IP}:8080").parse().unwrap();
    let started = Instant::now();
    let resp = loop {
        // python's server may still be starting.
        match client
            .request(get(outside_addr, &outside_addr.to_string(), "/"))
            .await
        {
            Ok(resp) if resp.status() != 503 => break resp,
            _ if started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!("passthrough never answered: {other:?}"),
        }
    };
    assert_eq!(
        resp.status(),
        200,
        "passthrough to the original destination"
    );
    text(resp).await;

    // REGISTRY_ONLY (by hot reload): the unknown destination is refused 502 NR; the mesh's
    // own services still work.
    config(dir.path(), "REGISTRY_ONLY", app.addr, echo, greeter);
    let started = Instant::now();
    loop {
        let resp = client
            .request(get(outside_addr, &outside_addr.to_string(), "/"))
            .await
            .unwrap();
        let status = resp.status();
        let flags = resp
            .headers()
            .get("x-mesh-response-flags")
            .map(|v| v.to_str().unwrap().to_owned());
        text(resp).await;
        if status == 502 {
            assert_eq!(flags.as_deref(), Some("NR"));
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "REGISTRY_ONLY never applied (last status {status})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resp = client.request(get(vip, "reviews:9080", "/")).await.unwrap();
    assert_eq!(resp.status(), 200, "known services still pass");
    text(resp).await;

    // Outside hosts a `resolution: NONE` ServiceEntry declares pass under REGISTRY_ONLY and
    // reach the address the client dialled: HTTP by its host...
    let resp = client
        .request(get(outside_addr, "outside.example:8080", "/"))
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "HTTP to a NONE service's original destination"
    );
    text(resp).await;
    // ...and opaque TCP by an address in the entry's range.
    let mut tcp = TcpStream::connect(format!("{EXTERNAL_IP}:{OUTSIDE_TCP_PORT}"))
        .await
        .unwrap();
    let mut greeting = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut greeting))
        .await
        .expect("the outside greeter answers")
        .unwrap();
    assert_eq!(greeting, b"outside\n");
    // ...and TLS by its ClientHello's SNI, to the address dialled; an SNI nothing declares
    // is refused like any unknown destination.
    let outside_tls = format!("{EXTERNAL_IP}:{OUTSIDE_TLS_PORT}");
    for (sni, expected) in [
        ("api.outside.example", &b"outside\n"[..]),
        ("other.example", &b""[..]),
    ] {
        let mut tls = TcpStream::connect(&outside_tls).await.unwrap();
        tls.write_all(&support::tcp::client_hello(sni))
            .await
            .unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer));
        read.await.expect("answered or closed").unwrap_or_default();
        assert_eq!(answer, expected, "SNI {sni}");
    }
    let m = metrics().await;
    for (family, service) in [
        ("istio_requests_total{", "outside.example"),
        ("istio_tcp_connections_opened_total{", "outside-tcp.example"),
        ("istio_tcp_connections_opened_total{", "*.outside.example"),
    ] {
        assert!(
            m.lines().any(|l| l.starts_with(family)
                && l.contains(&format!("destination_service=\"{service}\""))),
            "{service} is counted:\n{m}"
        );
    }

    let remove = Command::new(BIN)
        .args(["iptables", "remove"])
        .status()
        .unwrap();
    assert!(remove.success(), "mesh-proxy iptables remove");
    let rules = Command::new("iptables")
        .args(["-t", "nat", "-S"])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(!rules.contains("MESH_"), "rules left behind:\n{rules}");
}

/// Without capture, a request names its host: one the mesh does not know is `404 NR` under
/// `ALLOW_ANY` and `502 NR` under `REGISTRY_ONLY`, and the proxy connects nowhere.
#[tokio::test]
async fn an_unknown_host_by_host_header_is_404_or_502_by_outbound_traffic_policy() {
    let app = App::start("reviews").await;
    // An Istio Sidecar's `outboundTrafficPolicy` overrides the mesh's (the Bootstrap's): the
    // namespace's selector-less one, or the workload's own before it.
    let sidecar = |selector: &str, mode: &str| {
        format!(
            "---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: scope{}, namespace: default }}
spec:
{selector}  outboundTrafficPolicy: {{ mode: {mode} }}
",
            selector.len()
        )
    };
    let workload = "  workloadSelector: { labels: { app: client } }\n";
    let cases = [
        ("ALLOW_ANY", String::new(), 404),
        ("REGISTRY_ONLY", String::new(), 502),
        ("ALLOW_ANY", sidecar("", "REGISTRY_ONLY"), 502),
        (
            "ALLOW_ANY",
            sidecar("", "REGISTRY_ONLY") + &sidecar(workload, "ALLOW_ANY"),
            404,
        ),
    ];
    let runs = cases.len();
    for (mode, sidecars, status) in cases {
        let yaml = format!(
            "{}  outboundTrafficPolicy: {{ mode: {mode} }}\n{}{sidecars}",
            support::bootstrap("client", None),
            support::service_entry("reviews", 9080, "HTTP", &[app.addr])
        );
        let proxy = support::start_proxy(&yaml).await;
        let outbound = proxy.outbound_addr().unwrap();
        let client = http1_client();
        let resp = client
            .request(get(outbound, "unknown.example.com", "/"))
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{mode} {sidecars}");
        assert_eq!(resp.headers()["x-mesh-response-flags"], "NR", "{mode}");
        let body = text(resp).await;
        assert!(body.contains("unknown.example.com"), "{mode}: {body}");
        let resp = client
            .request(get(outbound, "reviews:9080", "/"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{mode}: a known host passes");
        text(resp).await;
        proxy.shutdown().await;
    }
    assert_eq!(
        app.received.load(std::sync::atomic::Ordering::SeqCst),
        runs,
        "only the known host's requests reached an app"
    );
}
