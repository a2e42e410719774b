//! The outbound stack: the local app calls another service through this proxy.
//!
//! ```text
//! LocalReply → ProxyHeaders → [telemetry] → EgressPolicy → Route → RequestTimeout → Retry
//!   → Balance → OutlierDetection → PoolLimits → RecordEndpoint → Upstream
//! ```
//!
//! [`EgressPolicy`](crate::capture::EgressPolicyLayer) applies the Bootstrap's
//! `outboundTrafficPolicy` to hosts no virtual host serves: a captured request goes on to its
//! original destination under `ALLOW_ANY`; under `REGISTRY_ONLY` an unknown host is `502 NR`.
//!
//! [`Route`](mesh_routing::RouteLayer) finds the virtual host by the request's authority
//! (absolute-form URI or HTTP/2 `:authority`, else `Host`; no port means 80), applies the
//! VirtualService (matches, faults, redirects, rewrites, header operations, mirrors, weighted
//! destinations) and attaches a `RouteTarget`; an unknown host answers 404 `NR`.
//! [`Balance`](mesh_routing::balance::BalanceLayer) picks an endpoint of the target's subset
//! by the DestinationRule's policy (default: P2C over peak EWMA) and attaches an
//! `UpstreamTarget`; [`Upstream`] sends it. Between routing and balancing, the route's
//! `timeout` bounds the whole request (504 `UT`) and its retry policy (Istio's default when it
//! sets none) retries within its cluster's retry budget (20% of requests + 10/s over 10 s unless the
//! DestinationRule's `retryBudget` says otherwise);
//! `RecordEndpoint` tells the retry layer which endpoint each attempt went to. Outlier
//! detection (the DestinationRule's `outlierDetection`) counts each endpoint's consecutive
//! errors in the health registry it shares with the balancer, which skips ejected endpoints.
//! Connection-pool limits (the DestinationRule's `connectionPool`, Envoy's circuit breakers)
//! count requests, pending requests, connections and retries per cluster and answer `503 UO`
//! past a limit.

use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh_resilience::budget::RetryBudgets;
use mesh_resilience::outlier::OutlierDetectionLayer;
use mesh_resilience::pool_limits::{CircuitBreakers, PoolLimitsLayer};
use mesh_resilience::previous::RecordEndpointLayer;
use mesh_resilience::retry::RetryLayer;
use mesh_resilience::timeout::RequestTimeoutLayer;
use mesh_routing::balance::BalanceLayer;
use mesh_routing::{RouteLayer, RouteTable};
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use crate::capture::EgressPolicyLayer;
use crate::headers::ProxyHeadersLayer;
use crate::local_reply::LocalReplyLayer;
use crate::server::HttpService;
use crate::telemetry::Telemetry;
use crate::upstream::Upstream;

/// Builds the outbound stack over the proxy's swappable route table, its balancer and its
/// per-cluster retry budgets.
pub fn stack(
    routes: &Arc<ArcSwap<RouteTable>>,
    balancer: &BalanceLayer,
    budgets: &Arc<RetryBudgets>,
    breakers: &Arc<CircuitBreakers>,
    telemetry: &Telemetry,
    upstream: Upstream,
) -> HttpService {
    let routed = BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(EgressPolicyLayer::new(routes.clone(), upstream.clone()))
            .layer(RouteLayer::new(routes.clone()))
            .layer(RequestTimeoutLayer)
            .layer(RetryLayer::per_cluster(budgets.clone()).with_circuit_breakers(breakers.clone()))
            .layer(balancer.clone())
            .layer(OutlierDetectionLayer::new(balancer.health()))
            .layer(PoolLimitsLayer::new(breakers.clone()))
            .layer(RecordEndpointLayer)
            .service(upstream),
    );
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(LocalReplyLayer)
            .layer(ProxyHeadersLayer)
            .service(telemetry.outbound(routed)),
    )
}
