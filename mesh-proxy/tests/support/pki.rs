//! A mesh CA made by the real `mesh-proxy ca` binary, and the workload certificates it
//! issues: what a sidecar's Bootstrap `identity` points at in the mTLS end-to-end tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use mesh_core::config::bootstrap::IdentityFiles;

use super::bootstrap;

/// The trust domain every [`Pki`] issues under.
pub const TD: &str = "cluster.local";

/// A CA made by the real binary (in `dir/ca`), and the workload certificates it issues
/// (each in `dir/SA`).
pub struct Pki {
    pub dir: tempfile::TempDir,
}

/// Runs `mesh-proxy ARGS...` and fails the test when it fails.
pub fn run(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mesh-proxy {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        run(&[
            "ca",
            "init",
            "--trust-domain",
            TD,
            "--out",
            ca.to_str().unwrap(),
        ]);
        Pki { dir }
    }

    /// Issues (or re-issues) the certificate of service account `sa` into its directory.
    pub fn issue(&self, sa: &str) -> PathBuf {
        let out = self.dir.path().join(sa);
        run(&[
            "ca",
            "issue",
            "--ca",
            self.dir.path().join("ca").to_str().unwrap(),
            "--spiffe-id",
            &format!("spiffe://{TD}/ns/default/sa/{sa}"),
            "--out",
            out.to_str().unwrap(),
        ]);
        out
    }
}

/// The identity files `mesh-proxy ca issue` wrote into `dir`.
pub fn files(dir: &Path) -> IdentityFiles {
    IdentityFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        trust_bundle: dir.join("root.pem"),
    }
}

/// A Bootstrap for workload `name` (service account `name`) with the identity in `certs`.
pub fn sidecar(name: &str, app: Option<SocketAddr>, certs: &Path) -> String {
    let identity = format!(
        "  identity: {{ cert: \"{}\", key: \"{}\", trustBundle: \"{}\" }}\n  outbound:",
        certs.join("cert.pem").display(),
        certs.join("key.pem").display(),
        certs.join("root.pem").display()
    );
    bootstrap(name, app).replacen("  outbound:", &identity, 1)
}

/// A mesh-wide STRICT PeerAuthentication for the `default` namespace.
pub const STRICT: &str = "---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: { name: default, namespace: default }
spec:
  mtls: { mode: STRICT }
";
