//! `mesh-proxy ca init|issue`: the files it writes load as workload credentials.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use mesh_core::Identity;
use mesh_core::config::bootstrap::IdentityFiles;
use mesh_tls::credentials::Credentials;

const BIN: &str = env!("CARGO_BIN_EXE_mesh-proxy");

fn mesh_proxy(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn init_then_issue_writes_loadable_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let out_dir = dir.path().join("reviews/certs");

    let out = mesh_proxy(&[
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--out",
        path(&ca_dir),
    ]);
    assert_ok(&out);
    assert!(ca_dir.join("ca.pem").is_file());
    assert!(ca_dir.join("ca-key.pem").is_file());

    let out = mesh_proxy(&[
        "ca",
        "issue",
        "--ca",
        path(&ca_dir),
        "--spiffe-id",
        "spiffe://cluster.local/ns/default/sa/reviews",
        "--out",
        path(&out_dir),
        "--ttl",
        "2h",
    ]);
    assert_ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("spiffe://cluster.local/ns/default/sa/reviews")
    );

    // cert.pem is the leaf then the chain; root.pem is the CA certificate.
    let cert = std::fs::read_to_string(out_dir.join("cert.pem")).unwrap();
    let root = std::fs::read_to_string(out_dir.join("root.pem")).unwrap();
    assert_eq!(cert.matches("BEGIN CERTIFICATE").count(), 2);
    assert!(cert.ends_with(&root));
    assert_eq!(
        root,
        std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap()
    );

    // Loading validates the key against the leaf and the leaf against the bundle.
    let creds = Credentials::load(&IdentityFiles {
        cert: out_dir.join("cert.pem"),
        key: out_dir.join("key.pem"),
        trust_bundle: out_dir.join("root.pem"),
    })
    .unwrap();
    assert_eq!(
        creds.identity(),
        Identity::parse("spiffe://cluster.local/ns/default/sa/reviews").unwrap()
    );
    let left = creds.not_after().duration_since(SystemTime::now()).unwrap();
    assert!(
        left > Duration::from_secs(2 * 3600 - 120) && left <= Duration::from_secs(2 * 3600),
        "{left:?}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&creds.serial_hex()));

    // A second `init` into the same directory refuses to replace the CA key.
    let again = mesh_proxy(&[
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--out",
        path(&ca_dir),
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
}

#[test]
fn bad_input_exits_non_zero_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    assert_ok(&mesh_proxy(&[
        "ca",
        "init",
        "--trust-domain",
        "cluster.local",
        "--out",
        path(&ca_dir),
    ]));
    let issue = |id: &str, ttl: &str| {
        mesh_proxy(&[
            "ca",
            "issue",
            "--ca",
            path(&ca_dir),
            "--spiffe-id",
            id,
            "--out",
            path(&dir.path().join("out")),
            "--ttl",
            ttl,
        ])
    };
    let cases = [
        (
            "http://cluster.local/ns/default/sa/reviews",
            "24h",
            "must start with spiffe://",
        ),
        (
            "spiffe://example.org/ns/default/sa/reviews",
            "24h",
            "cluster.local",
        ),
        (
            "spiffe://cluster.local/ns/default/sa/reviews",
            "soon",
            "--ttl",
        ),
    ];
    for (id, ttl, expected) in cases {
        let out = issue(id, ttl);
        assert!(!out.status.success(), "{id} {ttl}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{id} {ttl}: {stderr}");
    }
    assert!(
        !dir.path().join("out").exists(),
        "nothing written on failure"
    );

    let out = mesh_proxy(&[
        "ca",
        "init",
        "--trust-domain",
        "Not_Valid/x",
        "--out",
        path(&dir.path().join("x")),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid trust domain"));

    let out = mesh_proxy(&[
        "ca",
        "issue",
        "--ca",
        path(&dir.path().join("missing")),
        "--spiffe-id",
        "spiffe://cluster.local/ns/default/sa/reviews",
        "--out",
        path(&dir.path().join("out")),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ca.pem"));
}
