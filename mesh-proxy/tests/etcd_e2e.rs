//! Discovery across machines through a real etcd: three `mesh-proxy` binaries — two workloads
//! that register themselves, one client — and `mesh-proxy config apply|delete` writing the
//! rules they all watch.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use mesh_discovery::testing::EtcdServer;
use support::app::App;
use support::binary::{BIN, Binary};
use support::tcp::free_ports;
use support::{get, http1_client};

/// A `mesh-proxy run` child, killed when dropped.
struct Sidecar {
    child: Child,
    admin: SocketAddr,
    outbound: SocketAddr,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bootstrap(
    name: &str,
    labels: &str,
    etcd: &str,
    ports: &[u16],
    inbound: Option<(u16, SocketAddr)>,
) -> String {
    let inbound = inbound.map_or(String::new(), |(port, app)| {
        format!(
            "  inbound: {{ listen: \"127.0.0.1:{port}\", app: \"{app}\", protocol: http }}\n  register: {{ ttl: 2s }}\n"
        )
    });
    format!(
        "apiVersion: mesh-proxy/v1
kind: Bootstrap
metadata: {{ name: {name} }}
spec:
  workload: {{ name: {name}, labels: {labels} }}
  outbound: {{ listen: \"127.0.0.1:{}\" }}
  admin: {{ listen: \"127.0.0.1:{}\" }}
  discovery: {{ etcd: {{ endpoints: [\"{etcd}\"], prefix: /mesh }} }}
{inbound}",
        ports[0], ports[1]
    )
}

fn spawn(dir: &Path, name: &str, yaml: &str) -> Sidecar {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    let proxy = Binary::start(&path, "info", name);
    Sidecar {
        admin: proxy.admin,
        outbound: proxy.outbound,
        child: proxy.child,
    }
}

/// `mesh-proxy config ARGS --etcd ENDPOINT`, asserting success; its stdout.
fn config_cli(etcd: &str, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("config")
        .args(args)
        .args(["--etcd", etcd])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "config {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

async fn admin_get(admin: SocketAddr, path: &str) -> String {
    let resp = http1_client()
        .request(
            http::Request::get(format!("http://{admin}{path}"))
                .body(mesh_core::body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    support::text(resp).await
}

/// The endpoint addresses the client's `/clusters` lists for reviews.
async fn cluster_endpoints(admin: SocketAddr) -> Vec<String> {
    let body = admin_get(admin, "/clusters").await;
    let clusters: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut out: Vec<String> = clusters
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| {
            c["service"]
                .as_str()
                .is_some_and(|s| s.starts_with("reviews"))
        })
        .flat_map(|c| c["endpoints"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e["address"].as_str().map(str::to_string))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Which app answered one request to reviews through the client (or the status).
async fn who(client: SocketAddr) -> String {
    match http1_client()
        .request(get(client, "reviews:9080", "/"))
        .await
    {
        Ok(resp) if resp.status() == 200 => resp
            .headers()
            .get("x-app")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_string(),
        Ok(resp) => resp.status().as_str().to_string(),
        Err(e) => format!("error: {e}"),
    }
}

/// Polls until `n` consecutive answers satisfy `ok`; returns how long it took.
async fn until_consistently(
    client: SocketAddr,
    n: usize,
    deadline: Duration,
    ok: impl Fn(&str) -> bool,
) -> Duration {
    let started = Instant::now();
    let mut streak = 0;
    let mut first_ok = None;
    let mut last = String::new();
    while streak < n {
        assert!(
            started.elapsed() < deadline,
            "not consistent within {deadline:?}; last answer {last}"
        );
        last = who(client).await;
        if ok(&last) {
            first_ok.get_or_insert(started.elapsed());
            streak += 1;
        } else {
            first_ok = None;
            streak = 0;
        }
    }
    first_ok.unwrap_or_default()
}

const SERVICE: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: reviews }
spec:
  hosts: [reviews]
  ports: [{ number: 9080, name: http, protocol: HTTP }]
  resolution: STATIC
  workloadSelector: { labels: { app: reviews } }
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: reviews }
spec:
  host: reviews
  trafficPolicy: { loadBalancer: { simple: ROUND_ROBIN } }
  subsets:
  - { name: v1, labels: { version: v1 } }
  - { name: v2, labels: { version: v2 } }
";

fn route_to(subset: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: reviews }}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {{ host: reviews, subset: {subset} }}
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_register_rules_apply_from_etcd_and_etcd_loss_keeps_the_last_state() {
    let mut etcd = EtcdServer::start().await.unwrap();
    let endpoint = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let v1_app = App::start("v1").await;
    let v2_app = App::start("v2").await;
    let ports = free_ports(8);

    // The service and its subsets, shared through etcd before anyone starts.
    let service = write(dir.path(), "service.yaml", SERVICE);
    let applied = config_cli(&endpoint, &["apply", "-f", service.to_str().unwrap()]);
    assert!(
        applied.contains("ServiceEntry/default/reviews applied"),
        "{applied}"
    );

    let v1 = spawn(
        dir.path(),
        "reviews-v1",
        &bootstrap(
            "reviews-v1",
            "{ app: reviews, version: v1 }",
            &endpoint,
            &ports[0..2],
            Some((ports[6], v1_app.addr)),
        ),
    );
    let v2 = spawn(
        dir.path(),
        "reviews-v2",
        &bootstrap(
            "reviews-v2",
            "{ app: reviews, version: v2 }",
            &endpoint,
            &ports[2..4],
            Some((ports[7], v2_app.addr)),
        ),
    );
    let client = spawn(
        dir.path(),
        "productpage",
        &bootstrap(
            "productpage",
            "{ app: productpage }",
            &endpoint,
            &ports[4..6],
            None,
        ),
    );
    let (v1_addr, v2_addr) = (
        format!("127.0.0.1:{}", ports[6]),
        format!("127.0.0.1:{}", ports[7]),
    );

    // Both workloads registered and became the ServiceEntry's endpoints on the client.
    let started = Instant::now();
    loop {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..10 {
            seen.insert(who(client.outbound).await);
        }
        if seen.contains("v1") && seen.contains("v2") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "answers seen: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut both = vec![v1_addr.clone(), v2_addr.clone()];
    both.sort();
    assert_eq!(cluster_endpoints(client.admin).await, both);
    let stored = config_cli(&endpoint, &["get", "WorkloadEntry"]);
    assert!(
        stored.contains("reviews-v1-127-0-0-1") && stored.contains("reviews-v2-127-0-0-1"),
        "{stored}"
    );

    // A VirtualService applied through the CLI reroutes the client within a second.
    let to_v2 = write(dir.path(), "to-v2.yaml", &route_to("v2"));
    config_cli(&endpoint, &["apply", "-f", to_v2.to_str().unwrap()]);
    let took = until_consistently(client.outbound, 20, Duration::from_secs(5), |a| a == "v2").await;
    assert!(took < Duration::from_secs(1), "rerouted after {took:?}");
    eprintln!("rerouted to v2 {took:?} after `config apply` returned");

    // Deleting it restores the split.
    let deleted = config_cli(
        &endpoint,
        &["delete", "VirtualService", "reviews", "-n", "default"],
    );
    assert!(deleted.contains("deleted"), "{deleted}");
    let started = Instant::now();
    loop {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..10 {
            seen.insert(who(client.outbound).await);
        }
        if seen.contains("v1") && seen.contains("v2") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "answers seen: {seen:?}"
        );
    }

    // A workload killed with SIGKILL cannot withdraw itself: its lease expires (2 s) and it
    // leaves the client's endpoints.
    let mut v1 = v1;
    v1.child.kill().unwrap();
    let _ = v1.child.wait();
    let started = Instant::now();
    while cluster_endpoints(client.admin).await.contains(&v1_addr) {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "v1 still listed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cluster_endpoints(client.admin).await, vec![v2_addr.clone()]);
    until_consistently(client.outbound, 10, Duration::from_secs(5), |a| a == "v2").await;

    // etcd gone: traffic keeps flowing on the last state, the client stays ready, and the
    // sync-age gauge shows how stale it is.
    etcd.kill();
    let started = Instant::now();
    for _ in 0..30 {
        assert_eq!(who(client.outbound).await, "v2");
    }
    let ready = http1_client()
        .request(
            http::Request::get(format!("http://{}/ready", client.admin))
                .body(mesh_core::body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    loop {
        let metrics = admin_get(client.admin, "/metrics").await;
        let age = metrics
            .lines()
            .find_map(|l| l.strip_prefix("mesh_etcd_sync_age_seconds "))
            .and_then(|v| v.trim().parse::<i64>().ok())
            .unwrap_or_else(|| panic!("no sync age gauge in\n{metrics}"));
        if age >= 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "sync age stuck at {age}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(who(client.outbound).await, "v2");

    // etcd back: a change applied afterwards arrives (the watch resyncs by itself).
    etcd.restart().await.unwrap();
    let to_v1 = write(dir.path(), "to-v1.yaml", &route_to("v1"));
    config_cli(&endpoint, &["apply", "-f", to_v1.to_str().unwrap()]);
    // Only v1's subset is routed to and v1 is gone: no healthy upstream.
    until_consistently(client.outbound, 5, Duration::from_secs(15), |a| a == "503").await;
    drop(v2);
}

#[test]
fn config_apply_validates_everything_before_writing_anything() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let etcd = runtime.block_on(EtcdServer::start()).unwrap();
    let endpoint = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    // A valid VirtualService, then an invalid DestinationRule: nothing may be stored.
    let mixed = write(
        dir.path(),
        "mixed.yaml",
        &format!(
            "{}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{ name: reviews }}\nspec:\n  host: reviews\n  trafficPolicy: {{ loadBalancer: {{ simple: FASTEST }} }}\n",
            route_to("v1")
        ),
    );
    let out = Command::new(BIN)
        .args(["config", "apply", "-f"])
        .arg(&mixed)
        .args(["--etcd", &endpoint])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mixed.yaml") && err.contains("document 2") && err.contains("FASTEST"),
        "{err}"
    );
    assert_eq!(
        config_cli(&endpoint, &["get"]).trim(),
        "",
        "nothing was written"
    );

    // A Bootstrap is refused: it belongs to one proxy.
    let boot = write(
        dir.path(),
        "boot.yaml",
        "apiVersion: mesh-proxy/v1\nkind: Bootstrap\nmetadata: { name: x }\nspec:\n  workload: { name: x }\n",
    );
    let out = Command::new(BIN)
        .args(["config", "apply", "-f"])
        .arg(&boot)
        .args(["--etcd", &endpoint])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Bootstrap"));

    // get by kind and name; delete of what is not there fails.
    let good = write(dir.path(), "good.yaml", SERVICE);
    config_cli(&endpoint, &["apply", "-f", good.to_str().unwrap()]);
    let one = config_cli(&endpoint, &["get", "destinationrule", "reviews"]);
    assert!(
        one.contains("kind: DestinationRule") && !one.contains("kind: ServiceEntry"),
        "{one}"
    );
    let all = config_cli(&endpoint, &["get"]);
    assert!(
        all.contains("kind: DestinationRule") && all.contains("kind: ServiceEntry"),
        "{all}"
    );
    let out = Command::new(BIN)
        .args([
            "config",
            "delete",
            "VirtualService",
            "nope",
            "--etcd",
            &endpoint,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

/// A client whose files route `echo` to `app`, watching etcd at `etcd`.
fn echo_client(etcd_block: &str, ports: &[u16], app: SocketAddr) -> String {
    format!(
        "apiVersion: mesh-proxy/v1
kind: Bootstrap
metadata: {{ name: client }}
spec:
  workload: {{ name: client }}
  outbound: {{ listen: \"127.0.0.1:{}\" }}
  admin: {{ listen: \"127.0.0.1:{}\" }}
  discovery:
    etcd:
{etcd_block}
---
{}",
        ports[0],
        ports[1],
        support::service_entry("echo", 80, "HTTP", &[app])
    )
}

/// A VirtualService for `echo` that marks its responses, so a test sees it in force.
const MARKED_ECHO: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: echo }
spec:
  hosts: [echo]
  http:
  - headers: { response: { set: { x-from-etcd: \"yes\" } } }
    route:
    - destination: { host: echo }
";

async fn marked(client: SocketAddr) -> Option<bool> {
    let resp = http1_client()
        .request(get(client, "echo", "/"))
        .await
        .ok()?;
    (resp.status() == 200).then(|| resp.headers().contains_key("x-from-etcd"))
}

fn metric(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_starts_on_its_files_without_etcd_and_ignores_an_invalid_stored_resource() {
    let app = App::start("echo").await;
    let etcd_port = mesh_discovery::testing::free_loopback_port().unwrap();
    let endpoint = format!("http://127.0.0.1:{etcd_port}");
    let dir = tempfile::tempdir().unwrap();
    let client = spawn(
        dir.path(),
        "client",
        &echo_client(
            &format!("      endpoints: [\"{endpoint}\"]"),
            &free_ports(2),
            app.addr,
        ),
    );
    // No etcd: the files serve.
    assert_eq!(marked(client.outbound).await, Some(false));

    // etcd arrives later, already holding a valid rule and an invalid one (written past the
    // CLI, which would refuse it).
    let etcd = EtcdServer::start_on(etcd_port).await.unwrap();
    let mut raw = etcd.client().await.unwrap();
    raw.put(
        "/mesh/networking.istio.io/VirtualService/default/broken",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: { name: broken }\nspec:\n  hosts: [echo-two]\n  http:\n  - route: []\n",
        None,
    )
    .await
    .unwrap();
    let rule = write(dir.path(), "marked.yaml", MARKED_ECHO);
    config_cli(&endpoint, &["apply", "-f", rule.to_str().unwrap()]);

    // The watch connects by itself (backoff) and the valid rule applies.
    let started = Instant::now();
    while marked(client.outbound).await != Some(true) {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the etcd rule never applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The invalid one is counted, named in no config, and changed nothing else.
    let metrics = admin_get(client.admin, "/metrics").await;
    let rejected = metric(&metrics, "mesh_config_reloads_total{result=\"rejected\"} ");
    assert!(rejected.is_some_and(|n| n >= 1.0), "{metrics}");
    let dump = admin_get(client.admin, "/config_dump").await;
    assert!(
        dump.contains("etcd:/mesh/networking.istio.io/VirtualService/default/echo"),
        "the applied rule shows its key as origin: {dump}"
    );
    assert!(
        !dump.contains("echo-two"),
        "the invalid rule is not in force"
    );

    // Fixing it makes it apply; the files' service keeps working throughout.
    raw.put(
        "/mesh/networking.istio.io/VirtualService/default/broken",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: { name: broken }\nspec:\n  hosts: [echo-two]\n  http:\n  - route: [{ destination: { host: echo } }]\n",
        None,
    )
    .await
    .unwrap();
    let started = Instant::now();
    while !admin_get(client.admin, "/config_dump")
        .await
        .contains("echo-two")
    {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the fixed rule never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(marked(client.outbound).await, Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_client_certificates_and_a_password() {
    let app = App::start("echo").await;
    let mut etcd = EtcdServer::start_tls().await.unwrap();
    etcd.enable_auth("s3cret-pass").await.unwrap();
    let pki = etcd.pki().unwrap().clone();
    let endpoint = etcd.endpoint();
    assert!(endpoint.starts_with("https://"));
    let dir = tempfile::tempdir().unwrap();
    let password = write(dir.path(), "etcd-password", "s3cret-pass\n");
    let block = format!(
        "      endpoints: [\"{endpoint}\"]
      tls: {{ ca: {}, cert: {}, key: {} }}
      username: root
      passwordFile: {}",
        pki.ca.display(),
        pki.client_cert.display(),
        pki.client_key.display(),
        password.display()
    );
    let client = spawn(
        dir.path(),
        "client",
        &echo_client(&block, &free_ports(2), app.addr),
    );

    // The CLI over the same TLS, with the password from the environment.
    let rule = write(dir.path(), "marked.yaml", MARKED_ECHO);
    let out = Command::new(BIN)
        .args(["config", "apply", "-f"])
        .arg(&rule)
        .args(["--etcd", &endpoint, "--etcd-user", "root", "--etcd-ca"])
        .arg(&pki.ca)
        .arg("--etcd-cert")
        .arg(&pki.client_cert)
        .arg("--etcd-key")
        .arg(&pki.client_key)
        .env("ETCD_PASSWORD", "s3cret-pass")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let started = Instant::now();
    while marked(client.outbound).await != Some(true) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the rule never applied over TLS"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The password is read from its file and never shown.
    let dump = admin_get(client.admin, "/config_dump").await;
    assert!(
        dump.contains("passwordFile") && !dump.contains("s3cret-pass"),
        "{dump}"
    );

    // A wrong password is refused by etcd, and the CLI says so.
    let out = Command::new(BIN)
        .args([
            "config",
            "get",
            "--etcd",
            &endpoint,
            "--etcd-user",
            "root",
            "--etcd-ca",
        ])
        .arg(&pki.ca)
        .arg("--etcd-cert")
        .arg(&pki.client_cert)
        .arg("--etcd-key")
        .arg(&pki.client_key)
        .env("ETCD_PASSWORD", "wrong")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("authentication failed") || err.contains("invalid"),
        "{err}"
    );
}
