//! The `mesh-proxy` binary: `validate`, and `run` with a graceful SIGTERM, SIGHUP reloads,
//! and admin `POST /logging` and `POST /drain`.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use support::app::App;
use support::binary::{BIN, Binary};
use support::{bootstrap, get, http1_client, service_entry, text};

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn validate_accepts_a_valid_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(
        &dir,
        "good.yaml",
        &format!(
            "{}{}",
            bootstrap("client", None),
            service_entry("echo", 80, "HTTP", &["127.0.0.1:9".parse().unwrap()])
        ),
    );
    let out = Command::new(BIN)
        .args(["validate", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 resources valid"));
}

#[test]
fn validate_names_file_document_field_and_line_of_a_misspelled_field() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        &dir,
        "bad.yaml",
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: reviews }
spec:
  host: reviews
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: reviews }
spec:
  hosts: [reviews]
  http:
  - route:
    - destination:
        hots: reviews
",
    );
    let out = Command::new(BIN)
        .args(["validate", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml"), "{err}");
    assert!(err.contains("document 2"), "{err}");
    assert!(err.contains("spec.http[0].route[0].destination"), "{err}");
    assert!(err.contains("hots"), "{err}");
    assert!(err.contains("line 15"), "{err}");
}

/// Starts the binary and reads its outbound address from the "proxy ready" log.
fn spawn_proxy(config: &std::path::Path) -> (std::process::Child, SocketAddr) {
    let (child, outbound, _) = spawn_proxy_with_admin(config);
    (child, outbound)
}

/// Starts the binary and reads its outbound and admin addresses from the "proxy ready" log.
fn spawn_proxy_with_admin(
    config: &std::path::Path,
) -> (std::process::Child, SocketAddr, SocketAddr) {
    let proxy = Binary::start(config, "info", "mesh-proxy");
    (proxy.child, proxy.outbound, proxy.admin)
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish_then_exits_zero() {
    let app = App::start("slow").await;
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        &dir,
        "mesh.yaml",
        &format!(
            "{}{}",
            bootstrap("client", None),
            service_entry("slow", 80, "HTTP", &[app.addr])
        ),
    );
    let (mut child, outbound) = spawn_proxy(&config);

    let http = http1_client();
    let started = Instant::now();
    let in_flight =
        tokio::spawn(async move { http.request(get(outbound, "slow", "/delay?ms=2000")).await });
    // Wait until the app holds the request, so SIGTERM lands mid-request.
    while app.received.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "request never reached the app"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());

    let resp = in_flight
        .await
        .unwrap()
        .expect("in-flight request completed");
    assert_eq!(resp.status(), 200);
    assert_eq!(text(resp).await, "slow waited 2000 ms");
    assert!(started.elapsed() >= Duration::from_secs(2));

    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "exit status after drain");
}

async fn admin_call(admin: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"))
        .body(mesh_core::body::empty())
        .unwrap();
    let resp = http1_client().request(req).await.unwrap();
    let status = resp.status().as_u16();
    (status, text(resp).await)
}

#[tokio::test]
async fn sighup_reloads_post_logging_sets_the_level_and_post_drain_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(&dir, "mesh.yaml", &bootstrap("client", None));
    let (mut child, _, admin) = spawn_proxy_with_admin(&config);
    let reloads = |metrics: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("mesh_config_reloads_total{result=\"success\"} "))
            .map(str::to_owned)
    };
    let (_, metrics) = admin_call(admin, "GET", "/metrics").await;
    assert_eq!(reloads(&metrics).as_deref(), Some("0"), "{metrics}");

    // SIGHUP reloads even though no file changed.
    let hup = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let started = Instant::now();
    loop {
        let (_, metrics) = admin_call(admin, "GET", "/metrics").await;
        if reloads(&metrics).as_deref() == Some("1") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no reload after SIGHUP:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (status, body) = admin_call(admin, "POST", "/logging?level=debug").await;
    assert_eq!((status, body.as_str()), (200, "log level: debug\n"));
    let (status, body) = admin_call(admin, "POST", "/logging?level=x=loud").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid level \"x=loud\""), "{body}");

    let (status, _) = admin_call(admin, "POST", "/drain").await;
    assert_eq!(status, 200);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "exit status after POST /drain");
}
