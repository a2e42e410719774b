//! `rewrite`: the path (`uri` or `uriRegexRewrite`) and the authority of a forwarded request.
//!
//! `rewrite.uri` is Envoy's `prefix_rewrite`, which is what Istio generates for a
//! VirtualService (`pilot/pkg/networking/core/route/route.go`, `applyHTTPRouteDestination`:
//! `action.PrefixRewrite = uri`). It replaces what the selecting match block matched:
//! - a `prefix` match: that many leading bytes of `:path`, query included;
//! - an `exact` or `regex` match: the whole path, the query string kept;
//! - no uri match: Istio's catch-all `prefix: /`, so the leading `/`.
//!
//! The replacement is literal, so a prefix `/v1` rewritten to `/` turns `/v1/api` into
//! `//api` and `/v1` into `/`: Istio does exactly that for VirtualServices (istio/istio#26828;
//! Envoy's docs on `prefix_rewrite` recommend two routes, `/v1/` → `/` and `/v1` → `/`). Only
//! routes converted from the Gateway API get the slash-preserving regex (`^/v1(/?)(.*)` →
//! `/\2`, `UseGatewaySemantics`), which a VirtualService can ask for explicitly with
//! `uriRegexRewrite`. An empty `rewrite.uri` is no rewrite, as in Istio.
//!
//! `uriRegexRewrite` is Envoy's `regex_rewrite`: every match in the path (without the query
//! string) is replaced, `\1` naming capture groups; the query string is kept.

use http::Request;
use http::uri::{PathAndQuery, Uri};
use mesh_core::ProxyError;
use mesh_core::ResponseFlags;
use mesh_core::config::networking::{HttpRewrite, RegexRewrite};

use crate::matcher::RewriteBase;

/// A compiled path rewrite.
#[derive(Clone, Debug)]
pub(crate) enum UriRewrite {
    Prefix(Box<str>),
    Regex(RegexRewrite),
}

impl UriRewrite {
    pub(crate) fn compile(rewrite: &HttpRewrite) -> Option<UriRewrite> {
        if let Some(regex) = &rewrite.uri_regex_rewrite {
            return Some(UriRewrite::Regex(regex.clone()));
        }
        rewrite
            .uri
            .as_deref()
            .filter(|uri| !uri.is_empty())
            .map(|uri| UriRewrite::Prefix(uri.into()))
    }

    /// The new `:path` for a request whose path is `path` and whose `:path` (with the query)
    /// is `path_and_query`; `None` when nothing changes.
    pub(crate) fn rewritten(
        &self,
        base: RewriteBase,
        path: &str,
        path_and_query: &str,
    ) -> Option<String> {
        // `path_and_query` is `path` followed by `?query`, if any.
        let query = path_and_query.get(path.len()..).unwrap_or("");
        match self {
            UriRewrite::Prefix(replacement) => {
                let rest = match base {
                    // Istio's catch-all is `prefix: /`: a path that does not start with `/`
                    // (`OPTIONS *`) has no prefix to replace.
                    RewriteBase::Prefix(1) if !path_and_query.starts_with('/') => return None,
                    RewriteBase::Prefix(n) => path_and_query.get(n..)?,
                    RewriteBase::WholePath => query,
                };
                Some([replacement, rest].concat())
            }
            UriRewrite::Regex(regex) => Some([&*regex.apply(path), query].concat()),
        }
    }
}

/// Replaces the request's `:path`, keeping its scheme and authority.
pub(crate) fn set_path<B>(req: &mut Request<B>, path_and_query: String) -> Result<(), ProxyError> {
    let pq = PathAndQuery::try_from(path_and_query).map_err(|e| {
        ProxyError::new(
            ResponseFlags::EMPTY,
            format_args!("the route's rewrite produced an invalid path: {e}"),
        )
        .with_status(http::StatusCode::INTERNAL_SERVER_ERROR)
    })?;
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.path_and_query = Some(pq);
    // Setting a valid path on a URI that had one keeps it valid.
    *req.uri_mut() = Uri::from_parts(parts).unwrap_or_default();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::types::Regex;

    fn prefix(to: &str) -> UriRewrite {
        UriRewrite::Prefix(to.into())
    }

    fn apply(rw: &UriRewrite, base: RewriteBase, pq: &str) -> Option<String> {
        let path = pq.split_once('?').map_or(pq, |(p, _)| p);
        rw.rewritten(base, path, pq)
    }

    #[test]
    fn prefix_v1_to_slash_keeps_istios_double_slash() {
        let base = RewriteBase::Prefix("/v1".len());
        let rw = prefix("/");
        assert_eq!(apply(&rw, base, "/v1/api").as_deref(), Some("//api"));
        assert_eq!(apply(&rw, base, "/v1").as_deref(), Some("/"));
        assert_eq!(apply(&rw, base, "/v1?x=1").as_deref(), Some("/?x=1"));
        assert_eq!(apply(&rw, base, "/v1api").as_deref(), Some("/api"));
        // The two-route recipe Envoy documents strips the prefix cleanly.
        let base = RewriteBase::Prefix("/v1/".len());
        assert_eq!(apply(&rw, base, "/v1/api").as_deref(), Some("/api"));
    }

    #[test]
    fn prefix_rewrite_replaces_what_the_block_matched() {
        let rw = prefix("/newcatalog");
        let base = RewriteBase::Prefix("/wpcatalog".len());
        assert_eq!(
            apply(&rw, base, "/wpcatalog/item?id=3").as_deref(),
            Some("/newcatalog/item?id=3")
        );
        // Exact and regex matches replace the whole path and keep the query.
        assert_eq!(
            apply(&rw, RewriteBase::WholePath, "/old/thing?id=3").as_deref(),
            Some("/newcatalog?id=3")
        );
        // No uri match: Istio's `prefix: /`.
        let rw = prefix("/api/");
        assert_eq!(
            apply(&rw, RewriteBase::Prefix(1), "/users").as_deref(),
            Some("/api/users")
        );
        assert_eq!(apply(&rw, RewriteBase::Prefix(1), "*"), None);
    }

    #[test]
    fn regex_rewrite_applies_to_the_path_and_keeps_the_query() {
        let rw = UriRewrite::Regex(RegexRewrite::new(
            Regex::new("^/service/([^/]+)(/.*)$").expect("regex"),
            "\\2/instance/\\1",
        ));
        assert_eq!(
            apply(&rw, RewriteBase::Prefix(1), "/service/foo/v1/api?x=1").as_deref(),
            Some("/v1/api/instance/foo?x=1")
        );
        let rw = UriRewrite::Regex(RegexRewrite::new(
            Regex::new("^/v1(/?)(.*)").expect("r"),
            "/\\2",
        ));
        assert_eq!(
            apply(&rw, RewriteBase::Prefix(3), "/v1/api").as_deref(),
            Some("/api")
        );
        assert_eq!(
            apply(&rw, RewriteBase::Prefix(3), "/v1").as_deref(),
            Some("/")
        );
    }

    #[test]
    fn empty_uri_is_no_rewrite_and_regex_wins() {
        let spec = |json: &str| -> HttpRewrite { serde_json::from_str(json).expect("rewrite") };
        assert!(UriRewrite::compile(&spec(r#"{"uri": ""}"#)).is_none());
        assert!(UriRewrite::compile(&spec(r#"{"authority": "a"}"#)).is_none());
        assert!(matches!(
            UriRewrite::compile(&spec(r#"{"uri": "/x"}"#)),
            Some(UriRewrite::Prefix(_))
        ));
    }

    #[test]
    fn set_path_keeps_scheme_and_authority() {
        let mut req = Request::get("http://reviews:9080/v1/api?x=1")
            .body(())
            .expect("request");
        set_path(&mut req, "//api?x=1".into()).expect("valid");
        assert_eq!(req.uri(), "http://reviews:9080//api?x=1");
        let mut req = Request::get("/a").body(()).expect("request");
        set_path(&mut req, "/b".into()).expect("valid");
        assert_eq!(req.uri(), "/b");
        assert!(set_path(&mut req, "/bad path".into()).is_err());
    }
}
