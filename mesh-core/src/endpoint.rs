//! An endpoint: one address serving a service port.

use std::net::SocketAddr;

use serde::Serialize;

use crate::labels::Labels;

/// One instance of a service: where it listens, what it is labelled (subsets select on
/// these), its load-balancing weight and the service account whose identity it presents.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub address: SocketAddr,
    pub labels: Labels,
    /// Relative weight among the endpoints of one service; Istio's default is 1.
    pub weight: u32,
    /// Kubernetes service account of the workload, from which its SPIFFE ID follows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

impl Endpoint {
    /// An endpoint with no labels, weight 1 and no service account.
    pub fn new(address: SocketAddr) -> Self {
        Endpoint {
            address,
            labels: Labels::new(),
            weight: 1,
            service_account: None,
        }
    }
}
