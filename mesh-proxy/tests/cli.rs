//! The `mesh-proxy` binary: `validate`, and `run` with a graceful SIGTERM.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::app::App;
use support::{bootstrap, get, http1_client, service_entry, text};

const BIN: &str = env!("CARGO_BIN_EXE_mesh-proxy");

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

/// Starts the binary and reads its admin and outbound addresses from the "proxy ready" log.
fn spawn_proxy(config: &std::path::Path) -> (std::process::Child, SocketAddr) {
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[mesh-proxy] {line}");
            if line.contains("proxy ready") {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("proxy logged readiness");
    let field = |name: &str| -> SocketAddr {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}= in {line}"))
            .parse()
            .unwrap()
    };
    let outbound = field("outbound");
    (child, outbound)
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
