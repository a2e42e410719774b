//! The matcher forms of `AuthorizationPolicy`, compiled once from the policy's strings.
//!
//! Every form works on bytes (header values need not be UTF-8) and allocates nothing when
//! it runs: patterns are parsed and, where the match is case-insensitive, lower-cased at
//! compile time.

use std::net::IpAddr;

use ipnet::IpNet;

/// Istio's string match: `*` alone (present, any value), `abc*` (prefix), `*abc` (suffix),
/// otherwise exact. A `*` anywhere else is a literal character, as in Istio.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StrMatch {
    Any,
    Exact(Box<[u8]>),
    Prefix(Box<[u8]>),
    Suffix(Box<[u8]>),
}

impl StrMatch {
    /// Parses Istio's forms. `lowercase` folds ASCII case for the case-insensitive fields
    /// (hosts), whose request values are then compared with [`Self::matches_ignore_case`].
    pub(crate) fn new(pattern: &str, lowercase: bool) -> StrMatch {
        let bytes = |s: &str| -> Box<[u8]> {
            if lowercase {
                s.to_ascii_lowercase().into_bytes().into_boxed_slice()
            } else {
                s.as_bytes().into()
            }
        };
        if pattern == "*" {
            StrMatch::Any
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            StrMatch::Suffix(bytes(suffix))
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            StrMatch::Prefix(bytes(prefix))
        } else {
            StrMatch::Exact(bytes(pattern))
        }
    }

    /// Case-sensitive match of a present value.
    pub(crate) fn matches(&self, value: &[u8]) -> bool {
        match self {
            StrMatch::Any => true,
            StrMatch::Exact(p) => value == &p[..],
            StrMatch::Prefix(p) => value.starts_with(p),
            StrMatch::Suffix(p) => value.ends_with(p),
        }
    }

    /// ASCII case-insensitive match; the pattern was lower-cased at compile time.
    pub(crate) fn matches_ignore_case(&self, value: &[u8]) -> bool {
        match self {
            StrMatch::Any => true,
            StrMatch::Exact(p) => value.eq_ignore_ascii_case(p),
            StrMatch::Prefix(p) => value
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p)),
            StrMatch::Suffix(p) => value
                .len()
                .checked_sub(p.len())
                .is_some_and(|start| value[start..].eq_ignore_ascii_case(p)),
        }
    }
}

/// True when any matcher of `list` matches `value`.
pub(crate) fn any_str(list: &[StrMatch], value: &[u8]) -> bool {
    list.iter().any(|m| m.matches(value))
}

/// A host match (`hosts`/`notHosts`): case-insensitive, and a request host with a port
/// (`example.com:8080`) also matches a pattern written without one, as Envoy matches
/// `:authority` once the port is stripped.
pub(crate) fn any_host(list: &[StrMatch], host: &str) -> bool {
    let full = host.as_bytes();
    let bare = strip_port(host).as_bytes();
    list.iter().any(|m| {
        m.matches_ignore_case(full) || (bare.len() != full.len() && m.matches_ignore_case(bare))
    })
}

/// `host:port` → `host`; `[::1]:80` → `[::1]`; anything else unchanged.
pub(crate) fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(i)
            if i + 1 < host.len()
                && host[i + 1..].bytes().all(|b| b.is_ascii_digit())
                && (!host[..i].contains(':') || host[..i].ends_with(']')) =>
        {
            &host[..i]
        }
        _ => host,
    }
}

/// One element of a path template: `{*}` is one non-empty segment, `{**}` (last only) the
/// rest of the path, possibly empty, slashes included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Segment {
    Literal(Box<str>),
    One,
    Rest,
}

/// A `paths`/`notPaths` entry: Istio's string forms, or an Envoy URI template when it
/// contains `{*}` or `{**}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PathMatch {
    Str(StrMatch),
    /// The segments after the leading `/`.
    Template(Box<[Segment]>),
}

impl PathMatch {
    pub(crate) fn new(pattern: &str) -> PathMatch {
        if pattern.contains("{*}") || pattern.contains("{**}") {
            let segments = pattern
                .strip_prefix('/')
                .unwrap_or(pattern)
                .split('/')
                .map(|s| match s {
                    "{*}" => Segment::One,
                    "{**}" => Segment::Rest,
                    s => Segment::Literal(s.into()),
                })
                .collect();
            PathMatch::Template(segments)
        } else {
            PathMatch::Str(StrMatch::new(pattern, false))
        }
    }

    pub(crate) fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Str(m) => m.matches(path.as_bytes()),
            PathMatch::Template(segments) => {
                let Some(mut rest) = path.strip_prefix('/') else {
                    return false;
                };
                for (i, segment) in segments.iter().enumerate() {
                    let last = i + 1 == segments.len();
                    if *segment == Segment::Rest {
                        // Validation keeps `{**}` last.
                        return last;
                    }
                    let (head, tail) = match rest.find('/') {
                        Some(j) => (&rest[..j], Some(&rest[j + 1..])),
                        None => (rest, None),
                    };
                    let ok = match segment {
                        Segment::One => !head.is_empty(),
                        Segment::Literal(l) => head == &**l,
                        Segment::Rest => true,
                    };
                    if !ok {
                        return false;
                    }
                    match (tail, last) {
                        (None, true) => return true,
                        // The path ended before the template, or went on after it.
                        (None, false) | (Some(_), true) => return false,
                        (Some(t), false) => rest = t,
                    }
                }
                false
            }
        }
    }
}

/// True when any path matcher matches.
pub(crate) fn any_path(list: &[PathMatch], path: &str) -> bool {
    list.iter().any(|m| m.matches(path))
}

/// True when `ip` is in one of `nets`. IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`, as a
/// dual-stack listener reports IPv4 peers) are compared as IPv4.
///
/// Never inlined: inlined into the field loop, the compiler hoisted the canonicalization of
/// both request addresses into the loop's entry, so every rule paid for it (about 100
/// instructions per rule, most of the evaluation) even with no IP field anywhere.
#[inline(never)]
pub(crate) fn any_net(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    nets.iter().any(|n| n.contains(&ip))
}

#[cfg(test)]
mod tests {
    use mesh_core::net::parse_ip_net;

    use super::*;

    #[test]
    fn string_forms() {
        let exact = StrMatch::new("cluster.local/ns/a/sa/b", false);
        assert!(exact.matches(b"cluster.local/ns/a/sa/b"));
        assert!(!exact.matches(b"cluster.local/ns/a/sa/bb"));
        assert!(!exact.matches(b"Cluster.local/ns/a/sa/b"));

        let prefix = StrMatch::new("cluster.local/ns/a/*", false);
        assert!(prefix.matches(b"cluster.local/ns/a/sa/x"));
        assert!(!prefix.matches(b"cluster.local/ns/ab/sa/x"));

        let suffix = StrMatch::new("*/sa/b", false);
        assert!(suffix.matches(b"td/ns/x/sa/b"));
        assert!(!suffix.matches(b"td/ns/x/sa/bc"));

        assert!(StrMatch::new("*", false).matches(b""));
        assert!(StrMatch::new("*", false).matches(b"anything"));

        // A `*` in the middle is literal.
        let middle = StrMatch::new("a*b", false);
        assert!(middle.matches(b"a*b"));
        assert!(!middle.matches(b"axb"));
    }

    #[test]
    fn hosts_ignore_case_and_port() {
        let list = [StrMatch::new("Bookinfo.COM", true)];
        assert!(any_host(&list, "bookinfo.com"));
        assert!(any_host(&list, "BOOKINFO.com:8080"));
        assert!(!any_host(&list, "bookinfo.com.evil"));
        let suffix = [StrMatch::new("*.Example.com", true)];
        assert!(any_host(&suffix, "api.EXAMPLE.com:443"));
        assert!(!any_host(&suffix, "example.com"));
        let prefix = [StrMatch::new("api.*", true)];
        assert!(any_host(&prefix, "API.x"));
        assert!(!any_host(&prefix, "ap"));
        // A pattern with a port matches only that port.
        let with_port = [StrMatch::new("a.com:8080", true)];
        assert!(any_host(&with_port, "a.com:8080"));
        assert!(!any_host(&with_port, "a.com:9090"));
        assert!(!any_host(&with_port, "a.com"));
    }

    #[test]
    fn port_stripping() {
        assert_eq!(strip_port("a.com:80"), "a.com");
        assert_eq!(strip_port("a.com"), "a.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(strip_port("a.com:"), "a.com:");
        assert_eq!(strip_port("a.com:x"), "a.com:x");
    }

    #[test]
    fn path_forms() {
        let m = |p: &str, path: &str| PathMatch::new(p).matches(path);
        assert!(m("/api/*", "/api/v1"));
        assert!(m("/api/*", "/api/"));
        assert!(!m("/api/*", "/api"));
        assert!(m("*.png", "/img/a.png"));
        assert!(!m("*.png", "/img/a.png/x"));
        assert!(m("*", "/"));
        assert!(m("/exact", "/exact"));
        assert!(!m("/exact", "/exact/"));
    }

    #[test]
    fn path_templates() {
        let m = |p: &str, path: &str| PathMatch::new(p).matches(path);
        assert!(m("/foo/{*}", "/foo/bar"));
        assert!(!m("/foo/{*}", "/foo/bar/baz"));
        assert!(!m("/foo/{*}", "/foo/"));
        assert!(!m("/foo/{*}", "/foo"));
        assert!(m("/foo/{*}/baz", "/foo/bar/baz"));
        assert!(!m("/foo/{*}/baz", "/foo/bar/qux"));
        assert!(m("/foo/{**}", "/foo/bar/baz"));
        assert!(m("/foo/{**}", "/foo/"));
        assert!(m("/foo/{**}", "/foo/a"));
        assert!(!m("/foo/{**}", "/foo"));
        assert!(!m("/foo/{**}", "/foobar"));
        assert!(m("/{*}/{**}", "/a/b/c"));
        assert!(!m("/{*}/{**}", "/"));
        assert!(!m("/foo/{*}", "foo/bar"));
    }

    #[test]
    fn ip_blocks() {
        let nets: Vec<IpNet> = ["10.0.0.0/8", "192.168.1.7", "2001:db8::/32"]
            .iter()
            .filter_map(|s| parse_ip_net(s))
            .collect();
        assert_eq!(nets.len(), 3);
        assert!(any_net(&nets, "10.1.2.3".parse().unwrap()));
        assert!(any_net(&nets, "192.168.1.7".parse().unwrap()));
        assert!(!any_net(&nets, "192.168.1.8".parse().unwrap()));
        assert!(any_net(&nets, "2001:db8::1".parse().unwrap()));
        assert!(any_net(&nets, "::ffff:10.9.9.9".parse().unwrap()));
        assert!(!any_net(&nets, "11.0.0.1".parse().unwrap()));
        // Host bits set in a CIDR are ignored, as Envoy does.
        let loose = parse_ip_net("10.1.2.3/8").unwrap();
        assert!(any_net(&[loose], "10.200.0.1".parse().unwrap()));
    }
}
