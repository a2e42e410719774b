//! This proxy's own workload: the `source_*` labels of what it sends, the `destination_*`
//! labels of what it receives, and what it tells its peers in the metadata exchange.

use mesh_core::{Identity, Labels};

/// The value of every label nothing is known for (Istio's).
pub const UNKNOWN: &str = "unknown";

/// Istio's canonical revision when the workload has no version label.
pub const LATEST: &str = "latest";

/// The workload this proxy runs next to, as Istio's metric labels name it.
///
/// Built once (the lead builds it from the Bootstrap's `workload`); the metrics layers
/// precompute their label values from it, so changing it means building new layers.
///
/// ```
/// use mesh_telemetry::metrics::WorkloadInfo;
///
/// let me = WorkloadInfo::new("reviews-v2", "default")
///     .with_app("reviews")
///     .with_version("v2");
/// assert_eq!(me.canonical_service(), "reviews");
/// assert_eq!(me.canonical_revision(), "v2");
/// assert_eq!(me.cluster(), "unknown");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadInfo {
    /// The workload name (`reviews-v2`): `source_workload` / `destination_workload`.
    pub name: String,
    /// `source_workload_namespace` / `destination_workload_namespace`.
    pub namespace: String,
    /// The `app` label: `*_app`.
    pub app: Option<String>,
    /// The `version` label: `*_version`.
    pub version: Option<String>,
    /// `*_canonical_service` when it differs from Istio's fallback (`app`, then the name).
    pub canonical_service: Option<String>,
    /// `*_canonical_revision` when it differs from Istio's fallback (`version`, then
    /// `latest`).
    pub canonical_revision: Option<String>,
    /// This workload's SPIFFE identity, when it has one: `*_principal`.
    pub principal: Option<Identity>,
    /// `*_cluster`; `unknown` when not given (Istio says `Kubernetes` inside one).
    pub cluster: Option<String>,
}

impl WorkloadInfo {
    /// A workload with a name and namespace and nothing else known.
    pub fn new(name: impl Into<String>, namespace: impl Into<String>) -> WorkloadInfo {
        WorkloadInfo {
            name: name.into(),
            namespace: namespace.into(),
            app: None,
            version: None,
            canonical_service: None,
            canonical_revision: None,
            principal: None,
            cluster: None,
        }
    }

    /// A workload described by its labels, with Istio's precedence for the canonical
    /// service (`service.istio.io/canonical-name`, `app.kubernetes.io/name`, `app`) and
    /// revision (`service.istio.io/canonical-revision`, `app.kubernetes.io/version`,
    /// `version`).
    pub fn from_labels(
        name: impl Into<String>,
        namespace: impl Into<String>,
        labels: &Labels,
    ) -> WorkloadInfo {
        let owned = |key: &str| labels.get(key).map(str::to_string);
        let first = |keys: &[&str]| keys.iter().find_map(|k| owned(k));
        WorkloadInfo {
            app: owned("app"),
            version: owned("version"),
            canonical_service: first(&[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
            ]),
            canonical_revision: first(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
            ]),
            ..WorkloadInfo::new(name, namespace)
        }
    }

    pub fn with_app(mut self, app: impl Into<String>) -> WorkloadInfo {
        self.app = Some(app.into());
        self
    }

    pub fn with_version(mut self, version: impl Into<String>) -> WorkloadInfo {
        self.version = Some(version.into());
        self
    }

    pub fn with_principal(mut self, principal: Identity) -> WorkloadInfo {
        self.principal = Some(principal);
        self
    }

    pub fn with_cluster(mut self, cluster: impl Into<String>) -> WorkloadInfo {
        self.cluster = Some(cluster.into());
        self
    }

    /// The canonical service: the explicit one, else `app`, else the workload name.
    pub fn canonical_service(&self) -> &str {
        self.canonical_service
            .as_deref()
            .or(self.app.as_deref())
            .unwrap_or(&self.name)
    }

    /// The canonical revision: the explicit one, else `version`, else `latest`.
    pub fn canonical_revision(&self) -> &str {
        self.canonical_revision
            .as_deref()
            .or(self.version.as_deref())
            .unwrap_or(LATEST)
    }

    /// The cluster, `unknown` when not given.
    pub fn cluster(&self) -> &str {
        self.cluster.as_deref().unwrap_or(UNKNOWN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_istio_precedence() {
        let labels: Labels = [
            ("app", "reviews"),
            ("version", "v2"),
            ("app.kubernetes.io/name", "reviews-canonical"),
        ]
        .into_iter()
        .collect();
        let w = WorkloadInfo::from_labels("reviews-v2", "default", &labels);
        assert_eq!(w.app.as_deref(), Some("reviews"));
        assert_eq!(w.canonical_service(), "reviews-canonical");
        assert_eq!(w.canonical_revision(), "v2");

        let bare = WorkloadInfo::new("job-7", "batch");
        assert_eq!(bare.canonical_service(), "job-7");
        assert_eq!(bare.canonical_revision(), "latest");
        assert_eq!(bare.cluster(), "unknown");
    }
}
