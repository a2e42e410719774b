//! The sidecar's telemetry, built once per proxy from the Bootstrap: Istio's metrics on
//! both stacks (`reporter="source"` outbound, `"destination"` inbound), and, when the
//! Bootstrap has `tracing`, one span per request (CLIENT outbound, SERVER inbound) with W3C
//! and B3 propagation and OTLP export; when it has `accessLog`, one line per request. Order:
//! access log, metrics, span, then the rest (DESIGN.md's request path). The three run as one
//! layer, `mesh_telemetry::combined::TelemetryLayer`, which does what they do stacked with
//! the bodies wrapped (and boxed) once instead of once per layer.
//!
//! The layers sit just inside `LocalReply` and `ProxyHeaders`: they see every failure as the
//! `ProxyError` `LocalReply` will answer with (status and flags), and the `x-request-id`
//! `ProxyHeaders` made sure of. What the inner layers decide (route, endpoint, its identity)
//! reaches them through `mesh_core::stream_info::StreamInfo`.

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Request, Response};
use mesh_core::body::{self, BoxBody, BoxError};
use mesh_core::config::{Bootstrap, MeshConfig};
use mesh_core::{HostName, Identity};
use mesh_telemetry::access_log::{AccessLog, AccessLogError, AccessLogLayer};
use mesh_telemetry::combined::TelemetryLayer;
use mesh_telemetry::metrics::{Metrics, MetricsLayer, ServiceResolver, TcpMetrics, WorkloadInfo};
use mesh_telemetry::trace::{TraceLayer, Tracing, TracingError};

/// Why the Bootstrap's telemetry settings cannot be put to work.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot set up tracing: {0}")]
    Tracing(#[from] TracingError),
    #[error("cannot open the access log: {0}")]
    AccessLog(#[from] AccessLogError),
}
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

/// A stack below the telemetry layers, or one with them.
pub type Inner = BoxCloneSyncService<Request<BoxBody>, Response<BoxBody>, BoxError>;

/// Everything the telemetry layers of one proxy share.
#[derive(Debug)]
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    pub workload: Arc<WorkloadInfo>,
    /// The Bootstrap's `tracing`; without it, no trace layer (nothing is propagated).
    pub tracing: Option<Tracing>,
    /// The Bootstrap's `accessLog`; without it, no access log layer.
    pub access_log: Option<AccessLog>,
    /// The app's port, for the inbound access log's `inbound|PORT||` cluster.
    app_port: u16,
    config: Arc<ArcSwap<MeshConfig>>,
}

impl Telemetry {
    /// From the Bootstrap's workload (name, namespace, labels) and identity.
    pub fn new(
        bootstrap: &Bootstrap,
        identity: Option<Identity>,
        config: Arc<ArcSwap<MeshConfig>>,
    ) -> Result<Telemetry, TelemetryError> {
        let spec = &bootstrap.spec;
        let mut workload = WorkloadInfo::from_labels(
            &spec.workload.name,
            bootstrap.namespace(),
            &spec.workload.labels,
        );
        if let Some(identity) = identity {
            workload = workload.with_principal(identity);
        }
        // Istio names a workload's spans `{app}.{namespace}`.
        let tracing = spec
            .tracing
            .as_ref()
            .map(|t| {
                Tracing::new(
                    t,
                    format!("{}.{}", workload.canonical_service(), workload.namespace),
                )
            })
            .transpose()?;
        let access_log = spec.access_log.as_ref().map(AccessLog::open).transpose()?;
        Ok(Telemetry {
            metrics: Arc::new(Metrics::new()),
            workload: Arc::new(workload),
            tracing,
            access_log,
            app_port: spec.inbound.as_ref().map_or(0, |i| i.app.port()),
            config,
        })
    }

    /// Writes what the access log holds (at drain) and ends trace export.
    pub async fn flush(&self) {
        if let Some(log) = &self.access_log
            && let Err(e) = log.flush().await
        {
            tracing::warn!(error = %e, "access log flush failed");
        }
        if let Some(tracing) = &self.tracing
            && let Err(e) = tracing.shutdown().await
        {
            tracing::warn!(error = %e, "trace export shutdown failed");
        }
    }

    /// Wraps the outbound stack below the telemetry layers.
    pub fn outbound(&self, inner: Inner) -> Inner {
        self.wrap(
            inner,
            MetricsLayer::outbound(self.metrics.clone(), self.workload.clone()),
            TraceLayer::client,
            self.access_log
                .as_ref()
                .map(|log| AccessLogLayer::new(log.clone())),
        )
    }

    /// Wraps the inbound stack below the telemetry layers.
    pub fn inbound(&self, inner: Inner) -> Inner {
        self.wrap(
            inner,
            MetricsLayer::inbound(self.metrics.clone(), self.workload.clone(), self.resolver()),
            TraceLayer::server,
            self.access_log
                .as_ref()
                .map(|log| AccessLogLayer::inbound(log.clone(), self.app_port)),
        )
    }

    /// `inner` under the access log (when on), `metrics` and a trace layer of the kind
    /// `trace` builds (when tracing is on), in that order, as one layer: the combined
    /// layer does what the three stacked do, with the bodies wrapped (and boxed) once
    /// rather than once per layer.
    fn wrap(
        &self,
        inner: Inner,
        metrics: MetricsLayer,
        trace: fn(&Tracing) -> TraceLayer,
        access_log: Option<AccessLogLayer>,
    ) -> Inner {
        let layer = TelemetryLayer::new(metrics, self.tracing.as_ref().map(trace), access_log);
        BoxCloneSyncService::new(
            ServiceBuilder::new()
                .map_response(|r: Response<_>| r.map(body::boxed))
                .layer(layer)
                .service(inner),
        )
    }

    /// The TCP metrics of the opaque-TCP listener.
    pub fn tcp(&self) -> TcpMetrics {
        TcpMetrics::new(self.metrics.clone(), &self.workload)
    }

    /// Maps an inbound request's authority to a service of the current config (any alias,
    /// the port as written or 80), so `destination_service` is a known FQDN or `unknown`,
    /// never a client's raw `Host`. The returned name shares the registry's allocation, which
    /// the metrics layer keys its label cache on.
    fn resolver(&self) -> ServiceResolver {
        let config = self.config.clone();
        Arc::new(move |authority: &str| {
            let (host, port) = mesh_core::host::split_authority(authority)?;
            let config = config.load();
            let lookup = |host: &str| {
                config
                    .services()
                    .lookup(host, port)
                    .map(|sp| HostName::to_arc(&sp.host))
            };
            if host.bytes().any(|b| b.is_ascii_uppercase()) {
                lookup(&host.to_ascii_lowercase())
            } else {
                lookup(host)
            }
        })
    }
}
