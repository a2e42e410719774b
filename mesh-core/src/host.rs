//! Host names, normalised the way Istio names services.
//!
//! Istio resolves a short name in the namespace of the resource that wrote it: `reviews` in
//! namespace `default` is `reviews.default.svc.cluster.local`. A client may call that service
//! by any of the names Kubernetes DNS search paths accept from its own namespace, so the
//! registry indexes every alias ([`HostName::aliases`]) once at load time and the request path
//! does one hash lookup on the `Host` header.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

/// The namespace a resource or proxy lives in when its metadata names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The cluster DNS domain Istio assumes.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// The port a `Host` header without a port refers to.
pub const DEFAULT_HTTP_PORT: u16 = 80;

/// A lower-case, fully qualified host name (or a wildcard such as `*.example.com`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct HostName(Arc<str>);

impl HostName {
    /// Qualifies `host` as Istio does for a resource in `namespace`: a name without a dot is
    /// a Kubernetes service of that namespace; anything else is taken as written, lower-cased.
    pub fn qualify(host: &str, namespace: &str) -> HostName {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if host.contains('.') || host.starts_with('*') {
            HostName(host.into())
        } else {
            HostName(format!("{host}.{namespace}.svc.{CLUSTER_DOMAIN}").into())
        }
    }

    /// The name as a shared string (a clone of the same allocation, so callers may key on
    /// its address).
    pub fn to_arc(&self) -> Arc<str> {
        self.0.clone()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.")
    }

    /// The namespace of an in-cluster name (`name.ns.svc.cluster.local`), if it is one.
    pub fn namespace(&self) -> Option<&str> {
        self.in_cluster().map(|(_, ns)| ns)
    }

    /// The names a client in `caller_namespace` may use for this host: the full name, and for
    /// an in-cluster service `name.ns.svc` and `name.ns`, plus the bare `name` from its own
    /// namespace (Kubernetes DNS search paths).
    pub fn aliases(&self, caller_namespace: &str) -> Vec<String> {
        let mut out = vec![self.0.to_string()];
        if let Some((name, ns)) = self.in_cluster() {
            out.push(format!("{name}.{ns}.svc"));
            out.push(format!("{name}.{ns}"));
            if ns == caller_namespace {
                out.push(name.to_string());
            }
        }
        out
    }

    fn in_cluster(&self) -> Option<(&str, &str)> {
        let rest = self.0.strip_suffix(CLUSTER_DOMAIN)?.strip_suffix(".svc.")?;
        let (name, ns) = rest.split_once('.')?;
        (!name.is_empty() && !ns.is_empty() && !ns.contains('.')).then_some((name, ns))
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// Istio's host wildcards: `*.example.com` matches `api.example.com` (not `example.com`);
/// `*` matches anything; any other pattern only itself.
pub fn wildcard_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern == host,
    }
}

/// Splits an HTTP authority (`Host` header or URI authority) into host and port; a missing
/// port is [`DEFAULT_HTTP_PORT`]. IPv6 literals keep their brackets off. Returns `None` for a
/// port that is not a number. Borrowed: this runs on every request.
pub fn split_authority(authority: &str) -> Option<(&str, u16)> {
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(port) => Some((host, port.parse().ok()?)),
            None if after.is_empty() => Some((host, DEFAULT_HTTP_PORT)),
            None => None,
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host, port.parse().ok()?)),
        None => Some((authority, DEFAULT_HTTP_PORT)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_resolve_in_the_resource_namespace() {
        assert_eq!(
            HostName::qualify("reviews", "default").as_str(),
            "reviews.default.svc.cluster.local"
        );
        assert_eq!(
            HostName::qualify("Reviews.Default.svc.cluster.local.", "other").as_str(),
            "reviews.default.svc.cluster.local"
        );
        assert_eq!(
            HostName::qualify("httpbin.org", "default").as_str(),
            "httpbin.org"
        );
        assert!(HostName::qualify("*.example.com", "default").is_wildcard());
    }

    #[test]
    fn aliases_follow_kubernetes_search_paths() {
        let host = HostName::qualify("reviews", "default");
        assert_eq!(host.namespace(), Some("default"));
        assert_eq!(
            host.aliases("default"),
            [
                "reviews.default.svc.cluster.local",
                "reviews.default.svc",
                "reviews.default",
                "reviews"
            ]
        );
        assert_eq!(
            host.aliases("prod").len(),
            3,
            "bare name only from the same namespace"
        );
        assert_eq!(
            HostName::qualify("httpbin.org", "x").aliases("x"),
            ["httpbin.org"]
        );
    }

    #[test]
    fn wildcards_match_subdomains_only() {
        assert!(wildcard_matches("*.example.com", "api.example.com"));
        assert!(!wildcard_matches("*.example.com", "example.com"));
        assert!(!wildcard_matches("*.example.com", "api.example.org"));
        assert!(wildcard_matches("*", "anything"));
        assert!(wildcard_matches("reviews", "reviews"));
    }

    #[test]
    fn authorities_split_with_default_port() {
        assert_eq!(split_authority("reviews"), Some(("reviews", 80)));
        assert_eq!(split_authority("reviews:9080"), Some(("reviews", 9080)));
        assert_eq!(split_authority("[::1]:8080"), Some(("::1", 8080)));
        assert_eq!(split_authority("[::1]"), Some(("::1", 80)));
        assert_eq!(split_authority("user@host:81"), Some(("host", 81)));
        assert_eq!(split_authority("reviews:http"), None);
        assert_eq!(split_authority("reviews:99999"), None);
    }
}
