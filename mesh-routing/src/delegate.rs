//! `delegate`: a route handing its traffic to the routes of another VirtualService, merged
//! into the delegating route as Istio does (`mergeHTTPRoute`, `mergeHTTPMatchRequests`).
//!
//! Each delegate route becomes a route of the root: its match blocks are each root block
//! combined with each delegate block (the delegate's fields win, the root fills what the
//! delegate leaves unset; headers and query parameters are united), and every field the
//! delegate leaves unset (`rewrite`, `timeout`, `retries`, `fault`, `mirror`, `corsPolicy`,
//! `headers`, ...) is the root's. A combination Istio calls a conflict is dropped: a
//! delegate `uri` outside the root's, or the same header or query parameter matched two
//! ways.

use std::collections::BTreeMap;

use mesh_core::config::StringMatch;
use mesh_core::config::networking::{HttpMatchRequest, HttpRoute};

use crate::merge::fill_unset;

/// The routes a root route with `delegate` stands for.
pub(crate) fn merge(root: &HttpRoute, delegate_routes: &[HttpRoute]) -> Vec<HttpRoute> {
    delegate_routes
        .iter()
        .filter_map(|d| merge_route(root, d))
        .collect()
}

fn merge_route(root: &HttpRoute, delegate: &HttpRoute) -> Option<HttpRoute> {
    let mut out = delegate.clone();
    out.r#match = match (root.r#match.is_empty(), delegate.r#match.is_empty()) {
        (true, _) => delegate.r#match.clone(),
        (false, true) => root.r#match.clone(),
        (false, false) => {
            let merged: Vec<HttpMatchRequest> = root
                .r#match
                .iter()
                .flat_map(|r| {
                    delegate
                        .r#match
                        .iter()
                        .filter_map(move |d| merge_match(r, d))
                })
                .collect();
            if merged.is_empty() {
                return None;
            }
            merged
        }
    };
    out.name = match (&root.name, &delegate.name) {
        (Some(r), Some(d)) => Some(format!("{r}-{d}")),
        (r, d) => d.clone().or_else(|| r.clone()),
    };
    fill_unset!(
        out, root;
        rewrite,
        direct_response,
        timeout,
        retries,
        fault,
        mirror,
        mirror_percent,
        mirror_percentage,
        cors_policy,
        headers
    );
    if out.mirrors.is_empty() {
        out.mirrors = root.mirrors.clone();
    }
    Some(out)
}

fn merge_match(root: &HttpMatchRequest, delegate: &HttpMatchRequest) -> Option<HttpMatchRequest> {
    let mut out = delegate.clone();
    out.uri = match (&root.uri, &delegate.uri) {
        (Some(r), Some(d)) => Some(within(r, d)?.clone()),
        (r, d) => d.clone().or_else(|| r.clone()),
    };
    fill_unset!(
        out, root;
        scheme,
        method,
        authority,
        port,
        ignore_uri_case,
        source_namespace
    );
    if out.source_labels.is_empty() {
        out.source_labels = root.source_labels.clone();
    }
    if out.gateways.is_empty() {
        out.gateways = root.gateways.clone();
    }
    unite(&mut out.headers, &root.headers)?;
    unite(&mut out.query_params, &root.query_params)?;
    unite(&mut out.without_headers, &root.without_headers)?;
    Some(out)
}

/// The delegate's uri match when it lies within the root's (Istio's conflict check).
fn within<'d>(root: &StringMatch, delegate: &'d StringMatch) -> Option<&'d StringMatch> {
    let inside = match (root, delegate) {
        (StringMatch::Prefix(r), StringMatch::Prefix(d) | StringMatch::Exact(d)) => {
            d.starts_with(r.as_str())
        }
        (StringMatch::Exact(r), StringMatch::Exact(d)) => r == d,
        (StringMatch::Regex(r), StringMatch::Regex(d)) => r.as_str() == d.as_str(),
        (StringMatch::Any, _) => true,
        _ => false,
    };
    inside.then_some(delegate)
}

/// Adds the root's entries; the same key matched differently is a conflict.
fn unite(
    into: &mut BTreeMap<String, StringMatch>,
    root: &BTreeMap<String, StringMatch>,
) -> Option<()> {
    for (key, m) in root {
        match into.get(key) {
            Some(existing) if !same(existing, m) => return None,
            Some(_) => {}
            None => {
                into.insert(key.clone(), m.clone());
            }
        }
    }
    Some(())
}

fn same(a: &StringMatch, b: &StringMatch) -> bool {
    match (a, b) {
        (StringMatch::Exact(x), StringMatch::Exact(y))
        | (StringMatch::Prefix(x), StringMatch::Prefix(y)) => x == y,
        (StringMatch::Regex(x), StringMatch::Regex(y)) => x.as_str() == y.as_str(),
        (StringMatch::Any, StringMatch::Any) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(json: &str) -> HttpRoute {
        serde_json::from_str(json).expect("HTTPRoute")
    }

    #[test]
    fn delegate_routes_inherit_and_narrow_the_root() {
        let root = route(
            r#"{"name": "reviews", "match": [{"uri": {"prefix": "/reviews"}, "headers": {"x-a": {"exact": "1"}}}],
                "delegate": {"name": "d"}, "timeout": "3s"}"#,
        );
        let inside = route(
            r#"{"name": "v2", "match": [{"uri": {"prefix": "/reviews/v2"}}], "route": [{"destination": {"host": "r"}}]}"#,
        );
        let outside = route(
            r#"{"match": [{"uri": {"prefix": "/ratings"}}], "route": [{"destination": {"host": "r"}}]}"#,
        );
        let catch_all = route(r#"{"route": [{"destination": {"host": "r"}}], "timeout": "1s"}"#);
        let merged = merge(&root, &[inside, outside, catch_all]);
        assert_eq!(merged.len(), 2, "the conflicting /ratings route is dropped");
        assert_eq!(merged[0].name.as_deref(), Some("reviews-v2"));
        assert!(
            matches!(&merged[0].r#match[0].uri, Some(StringMatch::Prefix(p)) if p == "/reviews/v2")
        );
        assert!(
            merged[0].r#match[0].headers.contains_key("x-a"),
            "root conditions kept"
        );
        assert_eq!(
            merged[0].timeout.map(|t| t.get().as_secs()),
            Some(3),
            "inherited"
        );
        assert_eq!(
            merged[1].timeout.map(|t| t.get().as_secs()),
            Some(1),
            "the delegate's own wins"
        );
        assert!(
            matches!(&merged[1].r#match[0].uri, Some(StringMatch::Prefix(p)) if p == "/reviews")
        );
    }
}
