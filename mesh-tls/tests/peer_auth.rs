//! PeerAuthentication precedence on Istio's examples: a mesh-wide STRICT, a namespace
//! PERMISSIVE, and a workload policy that opens one port in plain text.

use mesh_core::Labels;
use mesh_core::config::{self, MeshConfig, Source};
use mesh_tls::peer_auth::{DEFAULT_ROOT_NAMESPACE, Mode, PeerAuthenticationPolicy};

const POLICIES: &str = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: legacy}
spec:
  mtls: {mode: PERMISSIVE}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: finance, namespace: legacy}
spec:
  selector:
    matchLabels: {app: finance}
  mtls: {mode: UNSET}
  portLevelMtls:
    \"8080\": {mode: DISABLE}
    \"8443\": {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict-db, namespace: prod}
spec:
  selector:
    matchLabels: {app: db}
  mtls: {mode: DISABLE}
";

fn config() -> MeshConfig {
    match config::load_sources(&[Source::new("pa.yaml", POLICIES)]) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

fn resolve(ns: &str, app: &str) -> PeerAuthenticationPolicy {
    let labels: Labels = [("app", app)].into_iter().collect();
    PeerAuthenticationPolicy::for_workload(&config(), ns, &labels, DEFAULT_ROOT_NAMESPACE)
}

#[test]
fn mesh_wide_strict_applies_where_nothing_narrower_does() {
    let p = resolve("prod", "web");
    assert_eq!(p.mode(80), Mode::Strict);
    assert_eq!(
        p.describe(),
        "STRICT (mesh-wide policy istio-system/default)"
    );
}

#[test]
fn namespace_permissive_overrides_mesh_strict() {
    let p = resolve("legacy", "web");
    assert_eq!(p.mode(8080), Mode::Permissive);
    assert_eq!(p.describe(), "PERMISSIVE (namespace policy legacy/default)");
}

#[test]
fn workload_port_level_overrides_and_unset_inherits() {
    let p = resolve("legacy", "finance");
    // The workload mode is UNSET: it inherits the namespace's PERMISSIVE.
    assert_eq!(p.default_mode(), Mode::Permissive);
    assert_eq!(p.mode(9000), Mode::Permissive);
    assert_eq!(p.mode(8080), Mode::Disable);
    assert_eq!(p.mode(8443), Mode::Strict);
    assert_eq!(
        p.describe(),
        "PERMISSIVE (namespace policy legacy/default); port 8080 DISABLE (workload policy \
         legacy/finance); port 8443 STRICT (workload policy legacy/finance)"
    );
}

#[test]
fn workload_mode_beats_mesh_and_selectors_must_match() {
    assert_eq!(resolve("prod", "db").mode(5432), Mode::Disable);
    // Same labels, another namespace: the workload policy is prod's only.
    assert_eq!(resolve("staging", "db").mode(5432), Mode::Strict);
    // Selector not matching.
    assert_eq!(resolve("legacy", "billing").mode(8080), Mode::Permissive);
}

#[test]
fn no_policies_means_permissive() {
    let p = PeerAuthenticationPolicy::for_workload(
        &MeshConfig::default(),
        "default",
        &Labels::new(),
        DEFAULT_ROOT_NAMESPACE,
    );
    assert_eq!(p, PeerAuthenticationPolicy::default());
    assert_eq!(p.mode(1), Mode::Permissive);
}
