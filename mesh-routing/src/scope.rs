//! Istio's `namespace/dnsName` host patterns, as a `Sidecar` resource's `egress.hosts` name
//! services: which services an egress listener serves, and which ones the proxy sees at all
//! ([`SourceContext::egress_hosts`](crate::SourceContext::egress_hosts)).

use std::fmt;

use mesh_core::HostName;
use mesh_core::config::ServicePort;
use mesh_core::host::wildcard_matches;

/// One `hosts` entry of a Sidecar egress listener: `namespace/dnsName`. The namespace is `*`
/// (any), `.` (the Sidecar's own), `~` (none) or a name; the name is `*`, a `*.suffix`
/// wildcard, or a host, a short one (`reviews`) qualified in the entry's namespace, or in
/// the proxy's for `*` and `.`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPattern {
    /// `None`: any namespace; `Some("")` never matches (`~`).
    namespace: Option<String>,
    name: NamePattern,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum NamePattern {
    Any,
    /// `*.example.com`.
    Wildcard(String),
    /// A qualified host.
    Exact(HostName),
}

impl HostPattern {
    /// `own`: the Sidecar's namespace (`.`); short names qualify in the entry's namespace,
    /// else in `proxy`'s.
    pub fn parse(text: &str, own: &str, proxy: &str) -> HostPattern {
        let (ns, dns) = text.split_once('/').unwrap_or(("*", text));
        let namespace = match ns {
            "*" => None,
            "." => Some(own.to_string()),
            "~" => Some(String::new()),
            ns => Some(ns.to_string()),
        };
        let name = match dns {
            "*" => NamePattern::Any,
            d if d.starts_with("*.") => NamePattern::Wildcard(d.to_ascii_lowercase()),
            d => {
                let qualify_in = match namespace.as_deref() {
                    Some(ns) if !ns.is_empty() => ns,
                    _ => proxy,
                };
                NamePattern::Exact(HostName::qualify(d, qualify_in))
            }
        };
        HostPattern { namespace, name }
    }

    /// Whether the pattern names `service` (a port of a ServiceEntry in its `namespace`).
    pub fn matches(&self, service: &ServicePort) -> bool {
        self.matches_host(&service.namespace, &service.host)
    }

    /// Whether the pattern names `host` as declared in `namespace`.
    pub fn matches_host(&self, namespace: &str, host: &HostName) -> bool {
        if let Some(ns) = &self.namespace
            && ns != namespace
        {
            return false;
        }
        match &self.name {
            NamePattern::Any => true,
            // A wildcard host (`*.example.com`) is named by the same pattern or a broader
            // one (`*.com`), as Istio compares wildcard hosts.
            NamePattern::Wildcard(pattern) => wildcard_matches(pattern, host.as_str()),
            NamePattern::Exact(exact) => exact == host,
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = match self.namespace.as_deref() {
            None => "*",
            Some("") => "~",
            Some(ns) => ns,
        };
        match &self.name {
            NamePattern::Any => write!(f, "{ns}/*"),
            NamePattern::Wildcard(w) => write!(f, "{ns}/{w}"),
            NamePattern::Exact(host) => write!(f, "{ns}/{host}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use mesh_core::config::Protocol;

    use super::*;

    fn service(host: &str, namespace: &str, port: u16) -> ServicePort {
        let mut sp = ServicePort::new(HostName::qualify(host, namespace), port, Protocol::Tcp);
        sp.namespace = namespace.to_string();
        sp
    }

    #[test]
    fn host_patterns_follow_istio() {
        let p = |t: &str| HostPattern::parse(t, "shop", "shop");
        let mysql = service("mysql", "db", 3306);
        let reviews = service("reviews", "shop", 9080);
        assert!(p("*/mysql.db.svc.cluster.local").matches(&mysql));
        assert!(
            p("db/mysql").matches(&mysql),
            "short names qualify in the entry's namespace"
        );
        assert!(!p("./mysql").matches(&mysql));
        assert!(p("./reviews").matches(&reviews));
        assert!(p("shop/*").matches(&reviews));
        assert!(!p("shop/*").matches(&mysql));
        assert!(p("*/*.svc.cluster.local").matches(&mysql));
        assert!(!p("~/*").matches(&mysql));
        assert_eq!(
            p("./reviews").to_string(),
            "shop/reviews.shop.svc.cluster.local"
        );
        assert_eq!(p("~/*").to_string(), "~/*");
    }
}
