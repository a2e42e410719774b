//! Which mTLS mode Istio's `PeerAuthentication` gives a workload's inbound port, resolved once
//! per config so that accepting a connection only looks up its port.
//!
//! ```
//! use mesh_core::Labels;
//! use mesh_core::config::{self, Source};
//! use mesh_tls::peer_auth::{DEFAULT_ROOT_NAMESPACE, Mode, PeerAuthenticationPolicy};
//!
//! let yaml = r#"
//! apiVersion: security.istio.io/v1
//! kind: PeerAuthentication
//! metadata: {name: default, namespace: istio-system}
//! spec: {mtls: {mode: STRICT}}
//! ---
//! apiVersion: security.istio.io/v1
//! kind: PeerAuthentication
//! metadata: {name: metrics, namespace: foo}
//! spec:
//!   selector: {matchLabels: {app: web}}
//!   portLevelMtls: {"9090": {mode: DISABLE}}
//! "#;
//! let config = config::load_sources(&[Source::new("pa.yaml", yaml)]).unwrap();
//! let labels: Labels = [("app", "web")].into_iter().collect();
//! let pa = PeerAuthenticationPolicy::for_workload(&config, "foo", &labels, DEFAULT_ROOT_NAMESPACE);
//! assert_eq!(pa.mode(8080), Mode::Strict); // the workload policy's UNSET inherits the mesh's
//! assert_eq!(pa.mode(9090), Mode::Disable);
//! ```
//!
//! Istio's rules, as `ComposePeerAuthentication` applies them:
//! - Three scopes: the mesh (a policy without selector in the root namespace), the
//!   workload's namespace (a policy without selector there), the workload (a policy in its
//!   namespace whose `selector` matches its labels; an empty `matchLabels` counts as no
//!   selector). A selector policy in the root namespace is a workload policy for the root
//!   namespace's own workloads only. The narrowest scope that sets a mode wins; `UNSET`
//!   inherits from the scope above; nothing set anywhere is `PERMISSIVE`.
//! - `portLevelMtls` of the workload policy overrides per port; an `UNSET` port inherits
//!   the workload's resolved mode. Ports are the ports the workload receives on (Istio's
//!   target ports), which [`PeerAuthenticationPolicy::mode`] is given.
//! - Several policies in one scope: Istio takes the oldest. A config file has no creation
//!   times, so the first by (namespace, name) is taken and the others are ignored;
//!   [`describe`](PeerAuthenticationPolicy::describe) names the policy that decided.

use std::fmt;

use mesh_core::Labels;
use mesh_core::config::security::MtlsMode;
use mesh_core::config::{MeshConfig, PeerAuthentication};

/// Istio's default `rootNamespace` (MeshConfig): policies there apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// A resolved mTLS mode (never `UNSET`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Only mTLS connections are accepted.
    Strict,
    /// mTLS and plain text are both accepted.
    Permissive,
    /// Only plain text: no TLS is terminated.
    Disable,
}

impl Mode {
    /// Istio's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Strict => "STRICT",
            Mode::Permissive => "PERMISSIVE",
            Mode::Disable => "DISABLE",
        }
    }

    fn from_config(mode: MtlsMode) -> Option<Mode> {
        match mode {
            MtlsMode::Unset => None,
            MtlsMode::Disable => Some(Mode::Disable),
            MtlsMode::Permissive => Some(Mode::Permissive),
            MtlsMode::Strict => Some(Mode::Strict),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The mTLS modes of one workload's ports; see the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthenticationPolicy {
    mode: Mode,
    /// Which scope and policy set `mode`, e.g. `mesh-wide policy istio-system/default`.
    mode_from: String,
    /// `portLevelMtls`, resolved, sorted by port.
    ports: Vec<(u16, Mode)>,
    /// The workload policy, when it had port-level settings.
    ports_from: Option<String>,
}

impl Default for PeerAuthenticationPolicy {
    /// No policy: PERMISSIVE everywhere.
    fn default() -> Self {
        PeerAuthenticationPolicy {
            mode: Mode::Permissive,
            mode_from: "no policy (default)".into(),
            ports: Vec::new(),
            ports_from: None,
        }
    }
}

impl PeerAuthenticationPolicy {
    /// Resolves the policies of `config` for a workload in `namespace` with `labels`;
    /// `root_namespace` is Istio's `rootNamespace` (usually [`DEFAULT_ROOT_NAMESPACE`]).
    pub fn for_workload(
        config: &MeshConfig,
        namespace: &str,
        labels: &Labels,
        root_namespace: &str,
    ) -> PeerAuthenticationPolicy {
        let mut all: Vec<&PeerAuthentication> = config.peer_authentications().iter().collect();
        all.sort_by(|a, b| (a.namespace(), a.name()).cmp(&(b.namespace(), b.name())));
        let has_selector = |p: &PeerAuthentication| {
            p.spec
                .selector
                .as_ref()
                .is_some_and(|s| !s.match_labels.is_empty())
        };
        let first =
            |pred: &dyn Fn(&PeerAuthentication) -> bool| all.iter().copied().find(|p| pred(p));

        let mesh = first(&|p| p.namespace() == root_namespace && !has_selector(p));
        let ns = (namespace != root_namespace)
            .then(|| first(&|p| p.namespace() == namespace && !has_selector(p)))
            .flatten();
        let workload = first(&|p| {
            p.namespace() == namespace
                && p.spec
                    .selector
                    .as_ref()
                    .is_some_and(|s| !s.match_labels.is_empty() && labels.matches(&s.match_labels))
        });

        let mut out = PeerAuthenticationPolicy::default();
        let scopes = [
            ("mesh-wide", mesh),
            ("namespace", ns),
            ("workload", workload),
        ];
        for (scope, policy) in scopes {
            let Some(policy) = policy else { continue };
            let mode = policy
                .spec
                .mtls
                .as_ref()
                .and_then(|m| Mode::from_config(m.mode));
            if let Some(mode) = mode {
                out.mode = mode;
                out.mode_from = format!("{scope} policy {}/{}", policy.namespace(), policy.name());
            }
        }
        if let Some(w) = workload
            && !w.spec.port_level_mtls.is_empty()
        {
            out.ports = w
                .spec
                .port_level_mtls
                .iter()
                .map(|(port, m)| (port.get(), Mode::from_config(m.mode).unwrap_or(out.mode)))
                .collect();
            out.ports.sort_unstable_by_key(|(p, _)| *p);
            out.ports_from = Some(format!("{}/{}", w.namespace(), w.name()));
        }
        out
    }

    /// The mode for connections to `port`.
    pub fn mode(&self, port: u16) -> Mode {
        match self.ports.binary_search_by_key(&port, |(p, _)| *p) {
            Ok(i) => self.ports[i].1,
            Err(_) => self.mode,
        }
    }

    /// The workload-wide mode (ports without a port-level setting).
    pub fn default_mode(&self) -> Mode {
        self.mode
    }

    /// For logs: the modes and the policies that decided them, e.g.
    /// `STRICT (mesh-wide policy istio-system/default); port 9090 DISABLE (workload policy foo/metrics)`.
    pub fn describe(&self) -> String {
        let mut s = format!("{} ({})", self.mode, self.mode_from);
        if let Some(from) = &self.ports_from {
            for (port, mode) in &self.ports {
                s.push_str(&format!("; port {port} {mode} (workload policy {from})"));
            }
        }
        s
    }
}

impl fmt::Display for PeerAuthenticationPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::{self, Source};

    fn load(yaml: &str) -> MeshConfig {
        match config::load_sources(&[Source::new("pa.yaml", yaml)]) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    fn pa(name: &str, ns: &str, body: &str) -> String {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}\n"
        )
    }

    fn web() -> Labels {
        [("app", "web")].into_iter().collect()
    }

    fn resolve(yaml: &str, ns: &str, labels: &Labels) -> PeerAuthenticationPolicy {
        PeerAuthenticationPolicy::for_workload(&load(yaml), ns, labels, DEFAULT_ROOT_NAMESPACE)
    }

    #[test]
    fn nothing_set_is_permissive() {
        let p = resolve("", "foo", &web());
        assert_eq!(p.mode(80), Mode::Permissive);
        assert!(p.describe().contains("no policy"), "{}", p.describe());
        // A policy that sets nothing anywhere is still PERMISSIVE.
        let p = resolve(
            &pa("default", "istio-system", "  mtls: {mode: UNSET}"),
            "foo",
            &web(),
        );
        assert_eq!(p.mode(80), Mode::Permissive);
    }

    #[test]
    fn mesh_namespace_workload_and_port_precedence() {
        let yaml = [
            pa("default", "istio-system", "  mtls: {mode: STRICT}"),
            pa("default", "foo", "  mtls: {mode: PERMISSIVE}"),
            pa(
                "web",
                "foo",
                "  selector: {matchLabels: {app: web}}\n  portLevelMtls:\n    \"9090\": {mode: DISABLE}\n    \"8443\": {mode: UNSET}",
            ),
        ]
        .concat();
        let p = resolve(&yaml, "foo", &web());
        // The workload policy is UNSET: it inherits the namespace's PERMISSIVE, which beats
        // the mesh's STRICT.
        assert_eq!(p.mode(8080), Mode::Permissive);
        assert_eq!(p.mode(9090), Mode::Disable);
        // An UNSET port inherits the resolved workload mode.
        assert_eq!(p.mode(8443), Mode::Permissive);
        let d = p.describe();
        assert!(
            d.starts_with("PERMISSIVE (namespace policy foo/default)"),
            "{d}"
        );
        assert!(
            d.contains("port 9090 DISABLE (workload policy foo/web)"),
            "{d}"
        );

        // Another namespace only sees the mesh-wide policy.
        let p = resolve(&yaml, "bar", &web());
        assert_eq!(p.mode(9090), Mode::Strict);
        assert!(
            p.describe()
                .contains("mesh-wide policy istio-system/default")
        );

        // The selector does not match: no port override, namespace mode.
        let other: Labels = [("app", "db")].into_iter().collect();
        let p = resolve(&yaml, "foo", &other);
        assert_eq!(p.mode(9090), Mode::Permissive);
    }

    #[test]
    fn unset_inherits_through_every_scope() {
        let yaml = [
            pa("default", "istio-system", "  mtls: {mode: STRICT}"),
            pa("default", "foo", "  mtls: {mode: UNSET}"),
            pa(
                "web",
                "foo",
                "  selector: {matchLabels: {app: web}}\n  mtls: {}",
            ),
        ]
        .concat();
        assert_eq!(resolve(&yaml, "foo", &web()).mode(1), Mode::Strict);

        // The workload policy sets a mode: it wins over both.
        let yaml = [
            pa("default", "istio-system", "  mtls: {mode: STRICT}"),
            pa(
                "web",
                "foo",
                "  selector: {matchLabels: {app: web}}\n  mtls: {mode: DISABLE}",
            ),
        ]
        .concat();
        assert_eq!(resolve(&yaml, "foo", &web()).mode(1), Mode::Disable);
    }

    #[test]
    fn selector_policies_apply_only_in_their_namespace() {
        // A selector policy in the root namespace is not mesh-wide.
        let yaml = pa(
            "web",
            "istio-system",
            "  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}",
        );
        assert_eq!(resolve(&yaml, "foo", &web()).mode(1), Mode::Permissive);
        assert_eq!(resolve(&yaml, "istio-system", &web()).mode(1), Mode::Strict);
        // A policy in another namespace does nothing here.
        let yaml = pa("default", "bar", "  mtls: {mode: STRICT}");
        assert_eq!(resolve(&yaml, "foo", &web()).mode(1), Mode::Permissive);
    }

    #[test]
    fn several_in_one_scope_first_by_name_wins() {
        // Written in the other order: the name order decides, not the file order.
        let yaml = [
            pa("zz", "foo", "  mtls: {mode: DISABLE}"),
            pa("aa", "foo", "  mtls: {mode: STRICT}"),
        ]
        .concat();
        let p = resolve(&yaml, "foo", &web());
        assert_eq!(p.mode(1), Mode::Strict);
        assert!(p.describe().contains("foo/aa"));
    }

    #[test]
    fn custom_root_namespace() {
        let yaml = pa("default", "mesh-root", "  mtls: {mode: STRICT}");
        let config = load(&yaml);
        let p = PeerAuthenticationPolicy::for_workload(&config, "foo", &web(), "mesh-root");
        assert_eq!(p.mode(1), Mode::Strict);
        let p =
            PeerAuthenticationPolicy::for_workload(&config, "foo", &web(), DEFAULT_ROOT_NAMESPACE);
        assert_eq!(p.mode(1), Mode::Permissive);
    }
}
