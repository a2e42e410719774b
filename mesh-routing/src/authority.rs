//! Reading a request's authority, and the small pieces of authority arithmetic redirects and
//! mirrors need.

use http::Request;
use http::header::HOST;

/// The authority the request names: the URI's (HTTP/2 `:authority`, absolute-form HTTP/1.1),
/// else the `Host` header, else `""`.
pub fn request_authority<B>(req: &Request<B>) -> &str {
    match req.uri().authority() {
        Some(authority) => authority.as_str(),
        None => req
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or(""),
    }
}

/// Where the `:port` of an authority starts, if it has one (IPv6 literals included).
pub(crate) fn port_start(authority: &str) -> Option<usize> {
    if authority.starts_with('[') {
        authority.rfind("]:").map(|i| i + 1)
    } else {
        authority.rfind(':')
    }
}

/// Envoy's shadow host: `-shadow` appended to the host, before any port
/// (`reviews:9080` → `reviews-shadow:9080`).
pub(crate) fn shadow_authority(authority: &str) -> String {
    match port_start(authority) {
        Some(i) => format!("{}-shadow{}", &authority[..i], &authority[i..]),
        None => format!("{authority}-shadow"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_sources_and_shadow_names() {
        let req = Request::get("http://a:81/")
            .header("host", "b")
            .body(())
            .expect("req");
        assert_eq!(request_authority(&req), "a:81");
        let req = Request::get("/").header("host", "b").body(()).expect("req");
        assert_eq!(request_authority(&req), "b");
        assert_eq!(request_authority(&Request::new(())), "");
        assert_eq!(shadow_authority("reviews:9080"), "reviews-shadow:9080");
        assert_eq!(shadow_authority("reviews"), "reviews-shadow");
        assert_eq!(shadow_authority("[::1]:80"), "[::1]-shadow:80");
        assert_eq!(port_start("[::1]"), None);
    }
}
