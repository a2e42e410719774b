//! Private keys never leave their file: not in the logs at `trace`, not in any admin answer,
//! not in the error about a broken key. The rest of the security posture is tested beside
//! the feature it concerns: admin on loopback by default (mesh-core `config_bootstrap.rs`),
//! admin mutations POST-only (`hot_reload_e2e.rs`), a forged `x-forwarded-client-cert`
//! dropped unless it came over mTLS from a mesh peer (`mtls_e2e.rs`).
#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};

use http::{Method, StatusCode};
use support::app::App;
use support::binary::{BIN, Binary};
use support::pki::{Pki, STRICT, sidecar};
use support::{get, http1_client, start_proxy, text};

/// The binary, running with every log line kept.
struct Sidecar {
    child: Child,
    log: Arc<Mutex<String>>,
    inbound: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `mesh-proxy run` at `RUST_LOG=trace` (every crate: rustls and hyper included).
fn spawn_traced(config: &Path) -> Sidecar {
    let proxy = Binary::start(config, "trace", "reviews");
    Sidecar {
        inbound: proxy.inbound.expect("an inbound listener"),
        admin: proxy.admin,
        child: proxy.child,
        log: proxy.log,
    }
}

/// The base64 lines of a PEM file's body: what a leak of the key would show.
fn pem_body_lines(pem: &str) -> Vec<String> {
    pem.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("-----"))
        .map(str::to_owned)
        .collect()
}

/// Fails when `haystack` (named `what`) holds the key or any PEM private-key block.
fn assert_no_key(what: &str, haystack: &str, key_lines: &[String]) {
    assert!(
        !haystack.contains("PRIVATE KEY"),
        "{what} shows a PEM private key block"
    );
    for line in key_lines {
        // Every body line is 64 base64 characters but the last; a 16-character piece of any
        // of them is specific enough to mean the key material is there.
        let piece = &line[..line.len().min(16)];
        assert!(
            piece.len() < 16 || !haystack.contains(piece),
            "{what} shows private key material ({piece}...)"
        );
    }
}

async fn admin(admin: SocketAddr, method: Method, path: &str) -> (StatusCode, String) {
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"))
        .body(mesh_core::body::empty())
        .unwrap();
    let resp = http1_client().request(req).await.unwrap();
    let status = resp.status();
    (status, text(resp).await)
}

#[tokio::test]
async fn private_keys_never_reach_logs_admin_answers_or_errors() {
    let pki = Pki::new();
    let server_certs = pki.issue("reviews");
    let key_lines = pem_body_lines(&std::fs::read_to_string(server_certs.join("key.pem")).unwrap());
    assert!(key_lines.len() >= 2, "the test key has a body");

    // The server sidecar is the binary, logging everything at trace, mTLS STRICT.
    let app = App::start("reviews").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("reviews.yaml");
    std::fs::write(
        &config,
        format!(
            "{}{STRICT}",
            sidecar("reviews", Some(app.addr), &server_certs)
        ),
    )
    .unwrap();
    let server = spawn_traced(&config);

    // A client sidecar calls it over mTLS: the key was loaded and used for handshakes.
    let client = start_proxy(&format!(
        "{}{}",
        sidecar("productpage", None, &pki.issue("productpage")),
        support::reviews_entry(server.inbound, Some("reviews"))
    ))
    .await;
    for _ in 0..3 {
        let resp = http1_client()
            .request(get(client.outbound_addr().unwrap(), "reviews:9080", "/"))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(text(resp).await, "hello from reviews");
    }

    // Every read-only admin answer: the dump shows where the key is, never what it is.
    for path in ["/config_dump", "/clusters", "/metrics", "/ready", "/live"] {
        let (status, body) = admin(server.admin, Method::GET, path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert_no_key(path, &body, &key_lines);
    }
    let (_, dump) = admin(server.admin, Method::GET, "/config_dump").await;
    assert!(
        dump.contains("key.pem"),
        "the dump names the key file: {dump}"
    );

    // A SIGHUP reload re-reads the identity files; drain; then the whole trace log.
    let hup = Command::new("kill")
        .args(["-HUP", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let (status, _) = admin(server.admin, Method::POST, "/drain").await;
    assert_eq!(status, StatusCode::OK);
    let mut server = server;
    let exit = tokio::task::spawn_blocking(move || {
        let status = server.child.wait();
        (status, server)
    })
    .await
    .unwrap();
    let (status, server) = exit;
    assert_eq!(status.unwrap().code(), Some(0));
    let log = server.log.lock().unwrap().clone();
    assert!(
        log.lines().count() > 50,
        "trace logging was on: {} lines",
        log.lines().count()
    );
    assert_no_key("the trace log", &log, &key_lines);
    client.shutdown().await;

    // A key file that holds a broken key: the error names the file and what is wrong with
    // it, never its content.
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    for file in ["cert.pem", "root.pem"] {
        std::fs::copy(server_certs.join(file), broken.join(file)).unwrap();
    }
    let secret = "U0VDUkVUS0VZTUFURVJJQUxTRUNSRVRLRVlNQVRFUklBTFNFQ1JFVEtFWU1BVEVSSUFM";
    std::fs::write(
        broken.join("key.pem"),
        format!("-----BEGIN PRIVATE KEY-----\n{secret}\n-----END PRIVATE KEY-----\n"),
    )
    .unwrap();
    let config = dir.path().join("broken.yaml");
    std::fs::write(&config, sidecar("reviews", Some(app.addr), &broken)).unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    assert!(!out.status.success(), "a broken key must stop the start");
    let err = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        err.contains(&broken.join("key.pem").display().to_string()),
        "the error names the key file: {err}"
    );
    assert!(
        !err.contains(&secret[..16]),
        "the error shows the key: {err}"
    );
}
