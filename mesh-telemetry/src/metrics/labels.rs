//! Istio's label sets, in Istio's order, and the pieces they are assembled from.
//!
//! A series' labels are built only when a layer first meets a combination (a cache miss);
//! the values are `Arc<str>`s so the parts shared by many series (this workload's side, a
//! service) are built once.

use std::sync::Arc;

use mesh_core::Identity;
use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};

use super::peer::PeerMetadata;
use super::workload::{UNKNOWN, WorkloadInfo};

/// The HTTP metrics' labels, in the order Istio's stats filter writes them.
pub const HTTP_LABEL_NAMES: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// The TCP metrics' labels: the HTTP ones without `response_code` and
/// `grpc_response_status`, as Istio.
pub const TCP_LABEL_NAMES: [&str; 23] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

/// The label values of one HTTP series, in [`HTTP_LABEL_NAMES`] order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct HttpLabels(pub(crate) [Arc<str>; 25]);

/// The label values of one TCP series, in [`TCP_LABEL_NAMES`] order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TcpLabels(pub(crate) [Arc<str>; 23]);

impl EncodeLabelSet for HttpLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        encode_pairs(&HTTP_LABEL_NAMES, &self.0, encoder)
    }
}

impl EncodeLabelSet for TcpLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        encode_pairs(&TCP_LABEL_NAMES, &self.0, encoder)
    }
}

fn encode_pairs(
    names: &[&str],
    values: &[Arc<str>],
    encoder: &mut LabelSetEncoder,
) -> Result<(), std::fmt::Error> {
    for (name, value) in names.iter().zip(values) {
        (*name, &**value).encode(encoder.encode_label())?;
    }
    Ok(())
}

/// Who reports a series: the client side (`source`) or the server side (`destination`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// Istio's `connection_security_policy`: `mutual_tls` or `none` on destination reports,
/// `unknown` on source reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SecurityPolicy {
    MutualTls,
    None,
    Unknown,
}

impl SecurityPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityPolicy::MutualTls => "mutual_tls",
            SecurityPolicy::None => "none",
            SecurityPolicy::Unknown => UNKNOWN,
        }
    }
}

/// One side's workload labels (source or destination).
#[derive(Clone, Debug)]
pub(crate) struct WorkloadLabels {
    pub(crate) workload: Arc<str>,
    pub(crate) namespace: Arc<str>,
    pub(crate) principal: Arc<str>,
    pub(crate) app: Arc<str>,
    pub(crate) version: Arc<str>,
    pub(crate) canonical_service: Arc<str>,
    pub(crate) canonical_revision: Arc<str>,
    pub(crate) cluster: Arc<str>,
}

fn or_unknown(v: Option<&str>) -> Arc<str> {
    Arc::from(v.unwrap_or(UNKNOWN))
}

impl WorkloadLabels {
    /// This proxy's own side.
    pub(crate) fn own(w: &WorkloadInfo) -> WorkloadLabels {
        WorkloadLabels {
            workload: Arc::from(w.name.as_str()),
            namespace: Arc::from(w.namespace.as_str()),
            principal: or_unknown(w.principal.as_ref().map(Identity::as_str)),
            app: or_unknown(w.app.as_deref()),
            version: or_unknown(w.version.as_deref()),
            canonical_service: Arc::from(w.canonical_service()),
            canonical_revision: Arc::from(w.canonical_revision()),
            cluster: Arc::from(w.cluster()),
        }
    }

    /// The peer's side: what its (trusted) metadata says, and its verified identity.
    pub(crate) fn peer(meta: Option<&PeerMetadata>, principal: Option<&Identity>) -> Self {
        let field = |f: fn(&PeerMetadata) -> Option<&str>| or_unknown(meta.and_then(f));
        WorkloadLabels {
            workload: field(|m| m.workload.as_deref()),
            namespace: field(|m| m.namespace.as_deref()),
            principal: or_unknown(principal.map(Identity::as_str)),
            app: field(|m| m.app.as_deref()),
            version: field(|m| m.version.as_deref()),
            canonical_service: field(PeerMetadata::canonical_service),
            canonical_revision: field(|m| Some(m.canonical_revision())),
            cluster: field(|m| m.cluster.as_deref()),
        }
    }
}

/// The `destination_service*` labels.
#[derive(Clone, Debug)]
pub(crate) struct ServiceLabels {
    pub(crate) service: Arc<str>,
    pub(crate) name: Arc<str>,
    pub(crate) namespace: Arc<str>,
}

impl ServiceLabels {
    pub(crate) fn unknown() -> ServiceLabels {
        let u: Arc<str> = Arc::from(UNKNOWN);
        ServiceLabels {
            service: u.clone(),
            name: u.clone(),
            namespace: u,
        }
    }

    /// From a service's FQDN: the name is its first DNS label; the namespace its second,
    /// when the third is `svc` (`reviews.default.svc.cluster.local`), else unknown.
    pub(crate) fn from_fqdn(fqdn: &str) -> ServiceLabels {
        let mut parts = fqdn.split('.');
        let name = parts.next().filter(|s| !s.is_empty());
        let namespace = parts.next().filter(|ns| !ns.is_empty());
        let namespace = namespace.filter(|_| parts.next() == Some("svc"));
        ServiceLabels {
            service: Arc::from(fqdn),
            name: or_unknown(name),
            namespace: or_unknown(namespace),
        }
    }
}

/// The per-series values that are neither workload nor service.
#[derive(Clone, Debug)]
pub(crate) struct Outcome {
    pub(crate) protocol: &'static str,
    pub(crate) response_code: Arc<str>,
    pub(crate) grpc_status: Arc<str>,
    pub(crate) flags: Arc<str>,
    pub(crate) security: SecurityPolicy,
}

pub(crate) fn http_labels(
    reporter: Reporter,
    source: &WorkloadLabels,
    destination: &WorkloadLabels,
    service: &ServiceLabels,
    outcome: &Outcome,
) -> HttpLabels {
    HttpLabels(with_tail(
        shared_labels(reporter, source, destination, service),
        [
            Arc::from(outcome.protocol),
            outcome.response_code.clone(),
            outcome.grpc_status.clone(),
            outcome.flags.clone(),
            Arc::from(outcome.security.as_str()),
        ],
    ))
}

pub(crate) fn tcp_labels(
    reporter: Reporter,
    source: &WorkloadLabels,
    destination: &WorkloadLabels,
    service: &ServiceLabels,
    flags: Arc<str>,
    security: SecurityPolicy,
) -> TcpLabels {
    TcpLabels(with_tail(
        shared_labels(reporter, source, destination, service),
        [Arc::from("tcp"), flags, Arc::from(security.as_str())],
    ))
}

/// The first 20 values, in Istio's order, that the HTTP and TCP label sets share: reporter,
/// source workload, destination workload and service.
fn shared_labels(
    reporter: Reporter,
    s: &WorkloadLabels,
    d: &WorkloadLabels,
    service: &ServiceLabels,
) -> [Arc<str>; 20] {
    [
        Arc::from(reporter.as_str()),
        s.workload.clone(),
        s.canonical_service.clone(),
        s.canonical_revision.clone(),
        s.namespace.clone(),
        s.principal.clone(),
        s.app.clone(),
        s.version.clone(),
        s.cluster.clone(),
        d.workload.clone(),
        d.namespace.clone(),
        d.principal.clone(),
        d.app.clone(),
        d.version.clone(),
        service.service.clone(),
        d.canonical_service.clone(),
        d.canonical_revision.clone(),
        service.name.clone(),
        service.namespace.clone(),
        d.cluster.clone(),
    ]
}

/// `head` then `tail`, as one array of `N` (= 20 + `T`; checked by the callers' types).
fn with_tail<const T: usize, const N: usize>(
    head: [Arc<str>; 20],
    tail: [Arc<str>; T],
) -> [Arc<str>; N] {
    const { assert!(N == 20 + T) };
    let mut values = head.into_iter().chain(tail);
    // The const assertion makes the iterator exactly N long; the fallback is never taken.
    std::array::from_fn(|_| values.next().unwrap_or_else(|| Arc::from(UNKNOWN)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_follow_kubernetes_dns() {
        let s = ServiceLabels::from_fqdn("reviews.default.svc.cluster.local");
        assert_eq!((&*s.name, &*s.namespace), ("reviews", "default"));
        let s = ServiceLabels::from_fqdn("reviews.prod.svc.corp.example");
        assert_eq!((&*s.name, &*s.namespace), ("reviews", "prod"));
        let s = ServiceLabels::from_fqdn("api.example.com");
        assert_eq!((&*s.name, &*s.namespace), ("api", "unknown"));
        let s = ServiceLabels::from_fqdn("localhost");
        assert_eq!((&*s.name, &*s.namespace), ("localhost", "unknown"));
    }

    #[test]
    fn tcp_names_are_the_http_names_minus_two() {
        let http: Vec<_> = HTTP_LABEL_NAMES
            .iter()
            .filter(|n| !matches!(**n, "response_code" | "grpc_response_status"))
            .collect();
        assert_eq!(http, TCP_LABEL_NAMES.iter().collect::<Vec<_>>());
    }
}
