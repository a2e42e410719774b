//! Istio's TCP metrics for opaque TCP proxying: one [`TcpConnectionMetrics`] per proxied
//! connection.
//!
//! ```
//! use std::sync::Arc;
//! use mesh_core::Identity;
//! use mesh_telemetry::metrics::{
//!     Format, Metrics, Reporter, SecurityPolicy, TcpConnection, TcpMetrics, WorkloadInfo,
//! };
//!
//! let metrics = Arc::new(Metrics::new());
//! let tcp = TcpMetrics::new(metrics.clone(), &WorkloadInfo::new("mysql-v1", "db"));
//! let mut conn = tcp.connection(TcpConnection {
//!     peer: Some(Identity::parse("spiffe://cluster.local/ns/shop/sa/orders").unwrap()),
//!     destination_service: Some("mysql.db.svc.cluster.local".into()),
//!     security: SecurityPolicy::MutualTls,
//!     ..TcpConnection::new(Reporter::Destination)
//! });
//! conn.opened();
//! conn.add_received(120); // the client's query
//! conn.add_sent(4096); // the rows
//! drop(conn); // closed
//! let text = metrics.encode(Format::Prometheus);
//! assert!(text.contains("istio_tcp_sent_bytes_total{reporter=\"destination\""));
//! assert!(text.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/orders\""));
//! assert!(text.contains("request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"mutual_tls\"} 4096"));
//! ```
//!
//! Labels are resolved once per connection (four family lookups when it is made), not per
//! byte: the handle keeps the counters.

use std::sync::Arc;

use mesh_core::{Identity, ResponseFlags};
use prometheus_client::metrics::counter::Counter;

use super::labels::{Reporter, SecurityPolicy, ServiceLabels, WorkloadLabels, tcp_labels};
use super::peer::PeerMetadata;
use super::registry::Metrics;
use super::workload::WorkloadInfo;

/// Makes [`TcpConnectionMetrics`] for this workload's connections.
#[derive(Clone, Debug)]
pub struct TcpMetrics {
    metrics: Arc<Metrics>,
    own: Arc<WorkloadLabels>,
}

/// What is known of one TCP connection when it is proxied.
#[derive(Clone, Debug)]
pub struct TcpConnection {
    /// `Source` on the outbound side, `Destination` on the inbound side.
    pub reporter: Reporter,
    /// The peer's verified identity (inbound: the client's; outbound: the server's).
    pub peer: Option<Identity>,
    /// The peer's workload, if a trusted exchange told it.
    pub peer_metadata: Option<PeerMetadata>,
    /// The FQDN of the service the connection is for.
    pub destination_service: Option<Arc<str>>,
    pub security: SecurityPolicy,
    /// Why the proxy ended the connection itself (`UF` when the upstream could not be
    /// reached, say).
    pub response_flags: ResponseFlags,
}

impl TcpConnection {
    /// Nothing known but the side: `unknown` everywhere, security `unknown`, no flags.
    pub fn new(reporter: Reporter) -> TcpConnection {
        TcpConnection {
            reporter,
            peer: None,
            peer_metadata: None,
            destination_service: None,
            security: SecurityPolicy::Unknown,
            response_flags: ResponseFlags::EMPTY,
        }
    }
}

impl TcpMetrics {
    pub fn new(metrics: Arc<Metrics>, workload: &WorkloadInfo) -> TcpMetrics {
        TcpMetrics {
            metrics,
            own: Arc::new(WorkloadLabels::own(workload)),
        }
    }

    /// The counters of one connection (its series exist from here, at zero). Nothing is
    /// counted until [`TcpConnectionMetrics::opened`] is called.
    pub fn connection(&self, conn: TcpConnection) -> TcpConnectionMetrics {
        let peer = WorkloadLabels::peer(conn.peer_metadata.as_ref(), conn.peer.as_ref());
        let service = conn
            .destination_service
            .as_deref()
            .map_or_else(ServiceLabels::unknown, ServiceLabels::from_fqdn);
        let (source, destination) = match conn.reporter {
            Reporter::Source => (&*self.own, &peer),
            Reporter::Destination => (&peer, &*self.own),
        };
        let labels = tcp_labels(
            conn.reporter,
            source,
            destination,
            &service,
            Arc::from(conn.response_flags.to_string()),
            conn.security,
        );
        let m = &self.metrics;
        TcpConnectionMetrics {
            sent: m.tcp_sent.get_or_create_owned(&labels),
            received: m.tcp_received.get_or_create_owned(&labels),
            opened: m.tcp_opened.get_or_create_owned(&labels),
            closed: m.tcp_closed.get_or_create_owned(&labels),
            state: State::New,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    New,
    Open,
    Closed,
}

/// One connection's counters. Counting bytes takes `&self`, so both copy directions can
/// share it by reference.
#[derive(Debug)]
pub struct TcpConnectionMetrics {
    sent: Counter,
    received: Counter,
    opened: Counter,
    closed: Counter,
    state: State,
}

impl TcpConnectionMetrics {
    /// Counts the connection as opened (once).
    pub fn opened(&mut self) {
        if self.state == State::New {
            self.opened.inc();
            self.state = State::Open;
        }
    }

    /// Bytes sent toward the downstream client: the response direction, as Istio's
    /// `istio_tcp_sent_bytes_total` counts, whichever side reports.
    pub fn add_sent(&self, bytes: u64) {
        self.sent.inc_by(bytes);
    }

    /// Bytes received from the downstream client: the request direction
    /// (`istio_tcp_received_bytes_total`).
    pub fn add_received(&self, bytes: u64) {
        self.received.inc_by(bytes);
    }

    /// Counts the connection as closed (once, and only if it was opened). Dropping the
    /// handle does the same.
    pub fn closed(&mut self) {
        if self.state == State::Open {
            self.closed.inc();
            self.state = State::Closed;
        }
    }
}

impl Drop for TcpConnectionMetrics {
    fn drop(&mut self) {
        self.closed();
    }
}
