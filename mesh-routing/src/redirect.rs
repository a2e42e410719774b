//! `redirect`: answer with a 3xx and a `Location` built from the request, as Envoy's
//! `RedirectAction` does.
//!
//! - Scheme: `redirect.scheme`, else the request's.
//! - Port: `redirect.port`, or the request's port with `derivePort: FROM_REQUEST_PORT`,
//!   replaces the request's; it is not written when it is the scheme's default (80 with
//!   `http`, 443 with `https`), as the field's documentation says. (Istio's translation
//!   drops such a port from the Envoy config altogether, which makes Envoy keep a request's
//!   non-default port: a documented "port 80" redirect from `:9080` would stay on 9080; we
//!   follow the documentation.) `FROM_PROTOCOL_DEFAULT` or no port keeps Envoy's default.
//! - Host: `redirect.authority`, else the request's authority, whose port is dropped when a
//!   port is set or when the scheme changes away from a request on its default port
//!   (`http://a:80` redirected to `https` does not become `https://a:80`).
//! - Path: `redirect.uri`, which keeps the request's query string unless it has its own;
//!   else the request's path and query.
//! - Status: `redirectCode`, default 301. The body is empty.

use http::header::{CONTENT_LENGTH, HeaderValue, LOCATION};
use http::{Response, StatusCode};
use mesh_core::body::{self, BoxBody};
use mesh_core::config::networking::{HttpRedirect, RedirectPortSelection};

use crate::matcher::RequestView;

/// A compiled redirect, for one virtual host port.
#[derive(Clone, Debug)]
pub(crate) struct Redirect {
    scheme: Option<Box<str>>,
    host: Option<Box<str>>,
    /// The port that replaces the request's, written out (`:8443`, or `""` for the
    /// scheme's default); decided for this virtual host's port.
    port: Option<Box<str>>,
    path: Option<Box<str>>,
    status: StatusCode,
}

impl Redirect {
    /// `request_port` is the port of the virtual host the route serves (what
    /// `FROM_REQUEST_PORT` means for a sidecar).
    pub(crate) fn compile(r: &HttpRedirect, request_port: u16) -> Redirect {
        let port = match (r.port, r.derive_port) {
            (Some(port), _) => Some(port.get()),
            (None, Some(RedirectPortSelection::FromRequestPort)) => Some(request_port),
            (None, _) => None,
        };
        // The scheme's default port replaces the request's but is not written, as Istio
        // intends (a sidecar is never the TLS end, so the scheme defaults to http).
        let scheme_for_port = r.scheme.as_deref().unwrap_or("http");
        let port = port.map(|p| {
            if p == 80 && scheme_for_port == "http" || p == 443 && scheme_for_port == "https" {
                String::new()
            } else {
                format!(":{p}")
            }
        });
        Redirect {
            scheme: r.scheme.as_deref().map(Into::into),
            host: r.authority.as_deref().map(Into::into),
            port: port.map(Into::into),
            path: r.uri.as_deref().map(Into::into),
            // Validation keeps codes in 300..=399; Envoy supports 301, 302, 303, 307, 308.
            status: r
                .redirect_code
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::MOVED_PERMANENTLY),
        }
    }

    pub(crate) fn location(&self, v: &RequestView<'_>) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(v.scheme);
        let port = self.port.as_deref().unwrap_or("");
        let host = match &self.host {
            Some(host) => host,
            None => request_host(v.authority, v.scheme, scheme, self.port.is_some()),
        };
        let mut location = format!("{scheme}://{host}{port}");
        match self.path.as_deref() {
            Some(path) => {
                location.push_str(path);
                if !path.contains('?') {
                    // The request's `?query`, if any.
                    location.push_str(v.path_and_query.get(v.path.len()..).unwrap_or(""));
                }
            }
            None => location.push_str(v.path_and_query),
        }
        location
    }

    pub(crate) fn response(&self, v: &RequestView<'_>) -> Response<BoxBody> {
        let mut response = Response::new(body::empty());
        *response.status_mut() = self.status;
        // The location is built from a valid request and validated config parts.
        if let Ok(location) = HeaderValue::from_str(&self.location(v)) {
            response.headers_mut().insert(LOCATION, location);
        }
        response
            .headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        response
    }
}

/// Envoy's `processRequestHost`: the request's authority, its port dropped when a new port
/// is set, or when the scheme changes and the port was the old scheme's default.
fn request_host<'a>(
    authority: &'a str,
    old_scheme: &str,
    new_scheme: &str,
    new_port: bool,
) -> &'a str {
    let Some(port_start) = crate::authority::port_start(authority) else {
        return authority;
    };
    let port = &authority[port_start..];
    let default_of_old =
        old_scheme == "https" && port == ":443" || old_scheme == "http" && port == ":80";
    if new_port || new_scheme != old_scheme && default_of_old {
        &authority[..port_start]
    } else {
        authority
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn redirect(json: &str, port: u16) -> Redirect {
        let spec: HttpRedirect = serde_json::from_str(json).expect("redirect");
        Redirect::compile(&spec, port)
    }

    fn location(r: &Redirect, uri: &str, host: &str) -> String {
        let req = Request::get(uri)
            .header("host", host)
            .body(())
            .expect("request");
        r.location(&RequestView::new(&req, host))
    }

    #[test]
    fn uri_and_authority_replace_with_301_by_default() {
        let r = redirect(
            r#"{"uri": "/v1/bookRatings", "authority": "newratings.default.svc.cluster.local"}"#,
            9080,
        );
        assert_eq!(r.status, StatusCode::MOVED_PERMANENTLY);
        assert_eq!(
            location(&r, "/v1/getProductRatings", "ratings:9080"),
            "http://newratings.default.svc.cluster.local/v1/bookRatings"
        );
        assert_eq!(
            location(&r, "/v1/getProductRatings?id=1", "ratings:9080"),
            "http://newratings.default.svc.cluster.local/v1/bookRatings?id=1",
            "the request's query is kept"
        );
        let r = redirect(r#"{"uri": "/new?fresh=1"}"#, 80);
        assert_eq!(location(&r, "/old?id=1", "a"), "http://a/new?fresh=1");
    }

    #[test]
    fn code_scheme_and_port() {
        let r = redirect(r#"{"scheme": "https", "redirectCode": 308}"#, 80);
        assert_eq!(r.status, StatusCode::PERMANENT_REDIRECT);
        assert_eq!(location(&r, "/p?q", "shop"), "https://shop/p?q");
        assert_eq!(
            location(&r, "/p", "shop:80"),
            "https://shop/p",
            "old default port dropped"
        );
        assert_eq!(location(&r, "/p", "shop:8080"), "https://shop:8080/p");
        let r = redirect(r#"{"port": 8443, "scheme": "https"}"#, 80);
        assert_eq!(location(&r, "/p", "shop:8080"), "https://shop:8443/p");
        let r = redirect(r#"{"port": 443, "scheme": "https"}"#, 80);
        assert_eq!(
            location(&r, "/p", "shop:8080"),
            "https://shop/p",
            "default port omitted"
        );
        let r = redirect(r#"{"port": 80}"#, 9080);
        assert_eq!(location(&r, "/p", "shop:9080"), "http://shop/p");
        let r = redirect(
            r#"{"derivePort": "FROM_REQUEST_PORT", "authority": "b"}"#,
            9080,
        );
        assert_eq!(location(&r, "/p", "a:9080"), "http://b:9080/p");
        let r = redirect(
            r#"{"derivePort": "FROM_PROTOCOL_DEFAULT", "authority": "b"}"#,
            9080,
        );
        assert_eq!(location(&r, "/p", "a:9080"), "http://b/p");
        let r = redirect(r#"{"uri": "/x"}"#, 9080);
        assert_eq!(location(&r, "/p", "[::1]:9080"), "http://[::1]:9080/x");
    }

    #[test]
    fn response_is_an_empty_3xx_with_location() {
        let r = redirect(r#"{"uri": "/elsewhere", "redirectCode": 302}"#, 9080);
        let req = Request::get("/moved")
            .header("host", "reviews:9080")
            .body(())
            .expect("request");
        let resp = r.response(&RequestView::new(&req, "reviews:9080"));
        assert_eq!(resp.status(), StatusCode::FOUND);
        assert_eq!(resp.headers()[LOCATION], "http://reviews:9080/elsewhere");
    }
}
