//! `headers.request` / `headers.response`: `set`, `add`, `remove`, at route and destination
//! level, and the authority rewrites they imply.
//!
//! Envoy's order within one level: remove, then set (`OVERWRITE_IF_EXISTS_OR_ADD`), then add
//! (`APPEND_IF_EXISTS_OR_ADD`). As Istio translates them, `host` and `:authority` in `set` or
//! `add` are not headers but an authority rewrite (`set` wins over `add`), other pseudo
//! headers are ignored, and `remove` cannot remove `host` or a pseudo header. Header values
//! are literal (Envoy's `%VAR%` substitutions are not supported).
//!
//! Names and values are `HeaderName` / `HeaderValue`s built once; applying them clones
//! reference-counted values, it never parses.

use std::str::FromStr;

use http::Request;
use http::header::{HOST, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Uri};
use mesh_core::config::networking::{HeaderOperations, Headers};

/// One level's operations on one direction.
#[derive(Clone, Debug, Default)]
pub(crate) struct HeaderOps {
    remove: Box<[HeaderName]>,
    set: Box<[(HeaderName, HeaderValue)]>,
    add: Box<[(HeaderName, HeaderValue)]>,
}

impl HeaderOps {
    /// Compiles `ops`; returns the authority a `host`/`:authority` entry asks for.
    fn compile(ops: Option<&HeaderOperations>) -> (HeaderOps, Option<String>) {
        let Some(ops) = ops else {
            return (HeaderOps::default(), None);
        };
        let pairs = |map: &std::collections::BTreeMap<String, String>| -> Box<[_]> {
            map.iter()
                .filter(|(name, _)| !is_internal(name))
                .filter_map(|(name, value)| header_pair(name, value))
                .collect()
        };
        let authority_in = |map: &std::collections::BTreeMap<String, String>| {
            map.iter()
                .find(|(name, _)| is_authority(name))
                .map(|(_, v)| v.clone())
        };
        let authority = authority_in(&ops.set).or_else(|| authority_in(&ops.add));
        let compiled = HeaderOps {
            remove: ops
                .remove
                .iter()
                .filter(|name| !is_internal(name))
                .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
                .collect(),
            set: pairs(&ops.set),
            add: pairs(&ops.add),
        };
        (compiled, authority)
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// Validation rejects names and values that are not valid HTTP; should one slip through, it
/// is skipped rather than fail a request.
fn header_pair(name: &str, value: &str) -> Option<(HeaderName, HeaderValue)> {
    Some((
        HeaderName::from_bytes(name.as_bytes()).ok()?,
        HeaderValue::from_str(value).ok()?,
    ))
}

/// Istio's `isInternalHeader`: pseudo headers and `host` are not touched by header ops.
fn is_internal(name: &str) -> bool {
    name.starts_with(':') || name.eq_ignore_ascii_case("host")
}

fn is_authority(name: &str) -> bool {
    name.eq_ignore_ascii_case(":authority") || name.eq_ignore_ascii_case("host")
}

/// A new authority for the request: the `Host` header, and the URI's authority when the
/// request carries one (HTTP/2, absolute-form HTTP/1.1).
#[derive(Clone, Debug)]
pub(crate) struct AuthorityRewrite {
    header: HeaderValue,
    uri: Option<Authority>,
}

impl AuthorityRewrite {
    pub(crate) fn new(authority: &str) -> Option<AuthorityRewrite> {
        Some(AuthorityRewrite {
            header: HeaderValue::from_str(authority).ok()?,
            uri: Authority::from_str(authority).ok(),
        })
    }

    pub(crate) fn apply<B>(&self, req: &mut Request<B>) {
        req.headers_mut().insert(HOST, self.header.clone());
        if let (Some(authority), Some(_)) = (&self.uri, req.uri().authority()) {
            let mut parts = std::mem::take(req.uri_mut()).into_parts();
            parts.authority = Some(authority.clone());
            // Replacing a valid URI's authority with a valid authority keeps it valid.
            *req.uri_mut() = Uri::from_parts(parts).unwrap_or_default();
        }
    }
}

/// The `headers` of a route or of one destination.
#[derive(Clone, Debug, Default)]
pub(crate) struct HeaderRules {
    pub request: HeaderOps,
    pub response: HeaderOps,
    /// From `headers.request.set/add` of `host` or `:authority`.
    pub authority: Option<AuthorityRewrite>,
}

impl HeaderRules {
    pub(crate) fn compile(headers: Option<&Headers>) -> HeaderRules {
        let (request, authority) = HeaderOps::compile(headers.and_then(|h| h.request.as_ref()));
        let (response, _) = HeaderOps::compile(headers.and_then(|h| h.response.as_ref()));
        HeaderRules {
            request,
            response,
            authority: authority.as_deref().and_then(AuthorityRewrite::new),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(json: &str) -> HeaderRules {
        let headers: Headers = serde_json::from_str(json).expect("valid Headers");
        HeaderRules::compile(Some(&headers))
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        m
    }

    fn values(m: &HeaderMap, name: &str) -> Vec<String> {
        m.get_all(name)
            .iter()
            .map(|v| v.to_str().expect("ascii").to_owned())
            .collect()
    }

    #[test]
    fn remove_then_set_then_add() {
        let r = rules(
            r#"{"request": {"set": {"x-a": "1"}, "add": {"x-a": "2", "x-b": "3"}, "remove": ["x-c", "x-b"]}}"#,
        );
        let mut h = map(&[("x-a", "0"), ("x-a", "00"), ("x-b", "old"), ("x-c", "gone")]);
        r.request.apply(&mut h);
        assert_eq!(
            values(&h, "x-a"),
            ["1", "2"],
            "set replaces every value, add appends"
        );
        assert_eq!(values(&h, "x-b"), ["3"], "removed before added");
        assert!(h.get("x-c").is_none());
        assert!(r.response.is_empty() && r.authority.is_none());
    }

    #[test]
    fn host_is_an_authority_rewrite_not_a_header() {
        let r = rules(
            r#"{"request": {"add": {"host": "added"}, "set": {"Host": "set.example"}, "remove": ["host", ":path"]},
                "response": {"set": {"x-served-by": "mesh"}, "remove": ["server"]}}"#,
        );
        assert!(r.request.is_empty(), "{:?}", r.request);
        let mut req = Request::get("http://old.example/x")
            .header("host", "old.example")
            .body(())
            .expect("request");
        r.authority.as_ref().expect("authority").apply(&mut req);
        assert_eq!(req.headers()["host"], "set.example", "set wins over add");
        assert_eq!(req.uri(), "http://set.example/x");
        let mut h = map(&[("server", "app")]);
        r.response.apply(&mut h);
        assert_eq!(values(&h, "x-served-by"), ["mesh"]);
        assert!(h.get("server").is_none());
    }

    #[test]
    fn authority_rewrite_of_an_origin_form_request_sets_host_only() {
        let mut req = Request::get("/x").body(()).expect("request");
        AuthorityRewrite::new("backend:8080")
            .expect("valid")
            .apply(&mut req);
        assert_eq!(req.headers()["host"], "backend:8080");
        assert_eq!(req.uri(), "/x");
    }
}
