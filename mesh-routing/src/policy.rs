//! What a route hands to the resilience and balancing layers: the effective DestinationRule
//! traffic policy of a destination, and the compiled retry policy.
//!
//! Traffic policy, as Istio's `MergeTrafficPolicy` (`pilot/pkg/networking/core/cluster`):
//! the host-level policy, with the host-level `portLevelSettings` entry for the port
//! replacing `loadBalancer`, `connectionPool`, `outlierDetection` and `tls` wholesale (port
//! settings "do not inherit"); then, for a subset, every field the subset's policy sets
//! overrides that; then the subset's own port-level entry replaces those four fields again.
//! The result has no `portLevelSettings` left: it is the policy for one port.
//!
//! Retries, as Istio's `retry.ConvertPolicy`: no `retries` is Istio's default policy;
//! `attempts` absent or 0 disables retrying; otherwise the default with `attempts`, and
//! `retryOn` (with its bare status codes), `perTryTimeout` and `backoff` when given.

use mesh_core::config::networking::{HttpRetry, PortTrafficPolicy, TrafficPolicy};
use mesh_core::target::{RetryOn, RetryPolicy};

use crate::merge::fill_unset;

/// The policy for `port` of a host with `host_policy`, narrowed to a subset with
/// `subset_policy`.
pub(crate) fn effective_policy(
    host_policy: Option<&TrafficPolicy>,
    subset_policy: Option<&TrafficPolicy>,
    port: u16,
) -> Option<TrafficPolicy> {
    let host = host_policy.map(|p| with_port_settings(p.clone(), p, port));
    let Some(subset) = subset_policy else {
        return host;
    };
    // The subset's settings, with the host's where the subset sets none.
    let mut merged = subset.clone();
    if let Some(host) = &host {
        fill_unset!(
            merged, host;
            load_balancer,
            connection_pool,
            outlier_detection,
            tls,
            tunnel,
            proxy_protocol,
            retry_budget
        );
    }
    Some(with_port_settings(merged, subset, port))
}

/// Applies `source`'s port-level entry for `port` to `policy` (wholesale, as Istio).
fn with_port_settings(
    mut policy: TrafficPolicy,
    source: &TrafficPolicy,
    port: u16,
) -> TrafficPolicy {
    let entry = source
        .port_level_settings
        .iter()
        .find(|p| p.port.is_some_and(|sel| sel.number.get() == port));
    if let Some(PortTrafficPolicy {
        load_balancer,
        connection_pool,
        outlier_detection,
        tls,
        port: _,
    }) = entry
    {
        policy.load_balancer = load_balancer.clone();
        policy.connection_pool = connection_pool.clone();
        policy.outlier_detection = outlier_detection.clone();
        policy.tls = tls.clone();
    }
    policy.port_level_settings = Vec::new();
    policy
}

/// Istio's translation of a route's `retries`.
pub(crate) fn retry_policy(retries: Option<&HttpRetry>) -> RetryPolicy {
    let Some(retries) = retries else {
        return RetryPolicy::istio_default();
    };
    let attempts = retries.attempts.unwrap_or(0);
    if attempts == 0 {
        return RetryPolicy::none();
    }
    let mut policy = RetryPolicy::istio_default();
    policy.attempts = attempts;
    if let Some(text) = retries.retry_on.as_deref().filter(|t| !t.trim().is_empty()) {
        match RetryOn::parse(text) {
            Ok(on) => policy.retry_on = on,
            // Validation rejects unknown tokens; keep Istio's default conditions otherwise.
            Err(e) => tracing::warn!("{e}; keeping the default retry conditions"),
        }
    }
    policy.per_try_timeout = retries.per_try_timeout.map(|d| d.get());
    if let Some(backoff) = retries.backoff {
        policy.backoff = backoff.get();
    }
    policy
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn policy(json: &str) -> TrafficPolicy {
        serde_json::from_str(json).expect("TrafficPolicy")
    }

    fn lb(p: &TrafficPolicy) -> Option<&'static str> {
        use mesh_core::config::networking::SimpleLb::*;
        p.load_balancer
            .as_ref()
            .and_then(|lb| lb.simple)
            .map(|s| match s {
                RoundRobin => "RR",
                LeastRequest | LeastConn => "LR",
                Random => "RANDOM",
                _ => "other",
            })
    }

    #[test]
    fn subset_overrides_host_and_port_settings_replace_wholesale() {
        let host = policy(
            r#"{"loadBalancer": {"simple": "ROUND_ROBIN"},
                "connectionPool": {"tcp": {"maxConnections": 100}},
                "portLevelSettings": [{"port": {"number": 9080}, "loadBalancer": {"simple": "RANDOM"}}]}"#,
        );
        let subset = policy(r#"{"loadBalancer": {"simple": "LEAST_REQUEST"}}"#);

        let p = effective_policy(Some(&host), None, 80).expect("host policy");
        assert_eq!(lb(&p), Some("RR"));
        assert!(p.connection_pool.is_some());
        assert!(p.port_level_settings.is_empty());

        let p = effective_policy(Some(&host), None, 9080).expect("port policy");
        assert_eq!(lb(&p), Some("RANDOM"));
        assert!(
            p.connection_pool.is_none(),
            "port-level settings do not inherit"
        );

        let p = effective_policy(Some(&host), Some(&subset), 80).expect("merged");
        assert_eq!(lb(&p), Some("LR"), "the subset overrides the host");
        assert!(
            p.connection_pool.is_some(),
            "fields the subset leaves unset are the host's"
        );

        let subset_ports = policy(
            r#"{"portLevelSettings": [{"port": {"number": 9080}, "loadBalancer": {"simple": "ROUND_ROBIN"}}]}"#,
        );
        let p = effective_policy(Some(&host), Some(&subset_ports), 9080).expect("merged");
        assert_eq!(lb(&p), Some("RR"), "the subset's port settings come last");
        assert!(effective_policy(None, None, 80).is_none());
        let p = effective_policy(None, Some(&subset), 80).expect("subset only");
        assert_eq!(lb(&p), Some("LR"));
    }

    #[test]
    fn retries_follow_istio() {
        assert_eq!(retry_policy(None), RetryPolicy::istio_default());
        let retry =
            |json: &str| retry_policy(Some(&serde_json::from_str(json).expect("HTTPRetry")));
        assert_eq!(retry(r#"{"attempts": 0}"#).attempts, 0);
        assert_eq!(
            retry(r#"{"perTryTimeout": "1s"}"#).attempts,
            0,
            "attempts unset is 0"
        );
        let p = retry(
            r#"{"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx,429", "backoff": "100ms"}"#,
        );
        assert_eq!(p.attempts, 3);
        assert_eq!(p.per_try_timeout, Some(Duration::from_secs(2)));
        assert!(p.retry_on.contains(RetryOn::FIVE_XX));
        assert!(!p.retry_on.contains(RetryOn::CONNECT_FAILURE));
        assert_eq!(p.retry_on.status_codes, [429]);
        assert_eq!(p.backoff, Duration::from_millis(100));
        let p = retry(r#"{"attempts": 5}"#);
        assert_eq!(
            p.retry_on,
            RetryOn::istio_default(),
            "default conditions kept"
        );
        assert_eq!(p.backoff, RetryPolicy::DEFAULT_BACKOFF);
    }
}
