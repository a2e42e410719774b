//! What admin `GET /clusters` shows: every balanced endpoint set and the state of each of its
//! endpoints.
//!
//! ```json
//! [
//!   {
//!     "name": "reviews.default.svc.cluster.local:9080/v2",
//!     "service": "reviews.default.svc.cluster.local:9080",
//!     "subset": "v2",
//!     "policy": "PEAK_EWMA",
//!     "endpoints": [
//!       {
//!         "address": "10.0.0.7:9080",
//!         "weight": 1,
//!         "in_flight": 2,
//!         "ewma_ms": 12.5,
//!         "health": "healthy",
//!         "labels": { "version": "v2" }
//!       }
//!     ]
//!   }
//! ]
//! ```

use std::net::SocketAddr;

use mesh_core::Labels;
use serde::Serialize;

/// One balanced endpoint set: a service port, or a subset of one.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClusterStatus {
    /// The route target's name: `host:port`, and the subset when there is one.
    pub name: String,
    /// `host:port`.
    pub service: String,
    /// The DestinationRule subset; absent for the whole service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// The policy of the latest request (`PEAK_EWMA`, `LEAST_REQUEST`, `ROUND_ROBIN`,
    /// `RANDOM`, `RING_HASH`, `MAGLEV`).
    pub policy: &'static str,
    pub endpoints: Vec<EndpointStatus>,
}

/// One endpoint of a set.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EndpointStatus {
    /// `ip:port`.
    pub address: SocketAddr,
    pub weight: u32,
    /// Requests sent and not finished (through any set that contains this address).
    pub in_flight: u32,
    /// The peak-EWMA latency estimate now, in milliseconds (30 before any response, then
    /// decaying between samples).
    pub ewma_ms: f64,
    pub health: Health,
    pub labels: Labels,
}

/// Whether the balancer sends to an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    /// Ejected by outlier detection now (`mesh_core::health`).
    Ejected,
}
