//! The proxy's own connection counters, per listener: `mesh_downstream_connections_total`
//! (accepted) and `mesh_downstream_connections_active` (open now), Envoy's
//! `downstream_cx_total` / `downstream_cx_active` under this proxy's prefix.
//!
//! The `listener` label is one of a fixed set of names (`outbound`, `inbound`, `admin`,
//! `gateway`, `sidecar egress`, `sidecar ingress`), never an address, so its cardinality is
//! bounded by the code, not by traffic.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: &'static str,
}

/// Connection counters of one proxy, shared by its listeners.
#[derive(Clone, Debug, Default)]
pub struct ConnectionMetrics {
    accepted: Family<ListenerLabel, Counter>,
    active: Family<ListenerLabel, Gauge>,
}

impl ConnectionMetrics {
    /// Registers the counters in `metrics`.
    pub fn register(metrics: &mesh_telemetry::metrics::Metrics) -> ConnectionMetrics {
        let m = ConnectionMetrics::default();
        metrics.register(
            "mesh_downstream_connections",
            "Connections accepted, by listener",
            m.accepted.clone(),
        );
        metrics.register(
            "mesh_downstream_connections_active",
            "Connections open now, by listener",
            m.active.clone(),
        );
        m
    }

    /// Counts a connection accepted on `listener`; it stays active until the guard drops.
    pub fn opened(&self, listener: &'static str) -> OpenConnection {
        let label = ListenerLabel { listener };
        self.accepted.get_or_create(&label).inc();
        let active = self.active.get_or_create(&label).clone();
        active.inc();
        OpenConnection { active }
    }
}

/// An open connection, counted in `mesh_downstream_connections_active` until dropped.
#[derive(Debug)]
pub struct OpenConnection {
    active: Gauge,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.active.dec();
    }
}
