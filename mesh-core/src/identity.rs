//! Workload identity as a SPIFFE ID.
//!
//! Istio names a workload `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` and
//! writes it in policies without the scheme (its "principal" form,
//! `cluster.local/ns/default/sa/reviews`). [`Identity`] accepts any valid SPIFFE ID, since
//! peers issued by SPIRE or another mesh may use other paths, and exposes the namespace and
//! service account when the path has Istio's shape.
//!
//! Validation follows the SPIFFE ID specification: lower-case scheme `spiffe`, a trust domain
//! of at most 255 bytes of `[a-z0-9.-_]`, path segments of `[a-zA-Z0-9.-_]` that are neither empty, `.` nor `..`,
//! no query, fragment, port or user info, at most 2048 bytes.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const SCHEME: &str = "spiffe://";
const MAX_LEN: usize = 2048;
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// A validated SPIFFE ID.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// The whole URI; the trust domain ends at `path_start`.
    uri: Arc<str>,
    path_start: usize,
}

/// Why a string is not a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid SPIFFE ID {id:?}: {reason}")]
pub struct IdentityError {
    pub id: String,
    pub reason: &'static str,
}

impl Identity {
    /// Parses `spiffe://trust-domain/path`.
    pub fn parse(id: &str) -> Result<Identity, IdentityError> {
        let fail = |reason| IdentityError {
            id: id.to_string(),
            reason,
        };
        if id.len() > MAX_LEN {
            return Err(fail("longer than 2048 bytes"));
        }
        let rest = id
            .strip_prefix(SCHEME)
            .ok_or_else(|| fail("must start with spiffe://"))?;
        let (domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if domain.is_empty() {
            return Err(fail("trust domain is empty"));
        }
        // The SPIFFE ID specification bounds the trust domain as RFC 3986 bounds a host.
        if domain.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(fail("trust domain is longer than 255 bytes"));
        }
        if !domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(fail(
                "trust domain may hold only lower-case letters, digits, '-', '.', '_'",
            ));
        }
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                match segment {
                    "" => return Err(fail("path has an empty segment")),
                    "." | ".." => return Err(fail("path has a '.' or '..' segment")),
                    s if !s
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) =>
                    {
                        return Err(fail(
                            "path segments may hold only letters, digits, '-', '.', '_'",
                        ));
                    }
                    _ => {}
                }
            }
        }
        Ok(Identity {
            uri: id.into(),
            path_start: SCHEME.len() + domain.len(),
        })
    }

    /// Parses Istio's principal form, `cluster.local/ns/default/sa/reviews`.
    pub fn from_principal(principal: &str) -> Result<Identity, IdentityError> {
        Identity::parse(&format!("{SCHEME}{principal}"))
    }

    /// The Istio identity of service account `sa` in namespace `ns`.
    pub fn for_service_account(
        trust_domain: &str,
        ns: &str,
        sa: &str,
    ) -> Result<Identity, IdentityError> {
        Identity::parse(&format!("{SCHEME}{trust_domain}/ns/{ns}/sa/{sa}"))
    }

    #[inline]
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    #[inline]
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..self.path_start]
    }

    /// The path, with its leading `/`, or empty.
    #[inline]
    pub fn path(&self) -> &str {
        &self.uri[self.path_start..]
    }

    /// Istio's principal form: the ID without `spiffe://`.
    #[inline]
    pub fn principal(&self) -> &str {
        &self.uri[SCHEME.len()..]
    }

    /// The namespace, when the path is Istio's `/ns/<ns>/sa/<sa>`.
    pub fn namespace(&self) -> Option<&str> {
        self.istio_path().map(|(ns, _)| ns)
    }

    /// The service account, when the path is Istio's `/ns/<ns>/sa/<sa>`.
    pub fn service_account(&self) -> Option<&str> {
        self.istio_path().map(|(_, sa)| sa)
    }

    fn istio_path(&self) -> Option<(&str, &str)> {
        let mut it = self.path().strip_prefix('/')?.split('/');
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl FromStr for Identity {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Identity::parse(s)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.uri)
    }
}

impl Serialize for Identity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Identity::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_identity_round_trips() {
        let id = Identity::parse("spiffe://cluster.local/ns/default/sa/reviews").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), Some("default"));
        assert_eq!(id.service_account(), Some("reviews"));
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/reviews");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/reviews"
        );
        assert_eq!(
            Identity::from_principal("cluster.local/ns/default/sa/reviews").unwrap(),
            id
        );
        assert_eq!(
            Identity::for_service_account("cluster.local", "default", "reviews").unwrap(),
            id
        );
    }

    #[test]
    fn non_istio_paths_are_valid_but_have_no_namespace() {
        let id = Identity::parse("spiffe://example.org/dc/dc1/svc/web").unwrap();
        assert_eq!(id.namespace(), None);
        assert_eq!(id.path(), "/dc/dc1/svc/web");
        let bare = Identity::parse("spiffe://example.org").unwrap();
        assert_eq!(bare.path(), "");
        assert_eq!(bare.service_account(), None);
    }

    #[test]
    fn invalid_ids_say_why() {
        for (id, why) in [
            ("http://cluster.local/ns/a/sa/b", "spiffe://"),
            ("spiffe:///ns/a", "trust domain is empty"),
            ("spiffe://Cluster.local/ns/a", "lower-case"),
            ("spiffe://td:8080/ns/a", "lower-case"),
            ("spiffe://td/ns//sa/b", "empty segment"),
            ("spiffe://td/ns/../sa/b", "'..'"),
            ("spiffe://td/ns/a/", "empty segment"),
            ("spiffe://td/ns/a?x=1", "path segments"),
        ] {
            let err = Identity::parse(id).unwrap_err();
            assert!(err.to_string().contains(why), "{id}: {err}");
        }
        assert!(Identity::parse(&format!("spiffe://td/{}", "a".repeat(2100))).is_err());
    }
}
