//! `corsPolicy`: Envoy's CORS filter, per route.
//!
//! A request with an `Origin` is a CORS request when the origin is allowed: one of
//! `allowOrigins` (or the deprecated exact `allowOrigin`) matches it, or matches `*`.
//! - A preflight (`OPTIONS` with `Access-Control-Request-Method`) from an allowed origin is
//!   answered here with 200 and `access-control-allow-origin` (the origin),
//!   `-allow-credentials`, `-allow-methods`, `-allow-headers`, `-max-age` as configured; it
//!   never reaches a service.
//! - An actual request from an allowed origin goes on; its response gets
//!   `access-control-allow-origin`, `-allow-credentials` and `-expose-headers`.
//! - A preflight from an origin that is not allowed is forwarded (Istio's default,
//!   `unmatchedPreflights: FORWARD`) or, with `IGNORE`, answered 200 with no CORS headers.
//!   Other requests from such an origin get no CORS headers.
//!
//! Header values are built once; per request this is a header lookup and the origin match.

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_METHOD, CONTENT_LENGTH, HeaderMap, HeaderValue, ORIGIN,
};
use http::{Method, Response};
use mesh_core::body::{self, BoxBody};
use mesh_core::config::StringMatch;
use mesh_core::config::networking::{CorsPolicy, UnmatchedPreflights};

#[derive(Clone, Debug)]
pub(crate) struct Cors {
    origins: Box<[StringMatch]>,
    allow_methods: Option<HeaderValue>,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    allow_credentials: bool,
    forward_unmatched_preflights: bool,
}

/// What the CORS policy makes of a request.
#[derive(Debug)]
pub(crate) enum CorsDecision {
    /// Not a CORS request (or from an origin that is not allowed): nothing to do.
    None,
    /// A preflight, answered here.
    Preflight(Response<BoxBody>),
    /// An allowed cross-origin request: add CORS headers to its response.
    Actual(HeaderValue),
}

impl Cors {
    pub(crate) fn compile(p: &CorsPolicy) -> Cors {
        let list = |items: &[String]| {
            (!items.is_empty())
                .then(|| HeaderValue::from_str(&items.join(",")).ok())
                .flatten()
        };
        let origins = if p.allow_origins.is_empty() {
            p.allow_origin
                .iter()
                .map(|o| StringMatch::Exact(o.clone()))
                .collect()
        } else {
            p.allow_origins.clone().into_boxed_slice()
        };
        Cors {
            origins,
            allow_methods: list(&p.allow_methods),
            allow_headers: list(&p.allow_headers),
            expose_headers: list(&p.expose_headers),
            max_age: p.max_age.map(|d| HeaderValue::from(d.get().as_secs())),
            allow_credentials: p.allow_credentials == Some(true),
            forward_unmatched_preflights: p.unmatched_preflights
                != Some(UnmatchedPreflights::Ignore),
        }
    }

    fn allows(&self, origin: &str) -> bool {
        self.origins
            .iter()
            .any(|m| m.matches("*") || m.matches(origin))
    }

    pub(crate) fn decide(&self, method: &Method, headers: &HeaderMap) -> CorsDecision {
        let Some(origin) = headers.get(ORIGIN).filter(|o| !o.is_empty()) else {
            return CorsDecision::None;
        };
        let allowed = origin.to_str().is_ok_and(|o| self.allows(o));
        let preflight = method == Method::OPTIONS
            && headers
                .get(ACCESS_CONTROL_REQUEST_METHOD)
                .is_some_and(|m| !m.is_empty());
        match (allowed, preflight) {
            (true, true) => CorsDecision::Preflight(self.preflight(origin)),
            (true, false) => CorsDecision::Actual(origin.clone()),
            (false, true) if !self.forward_unmatched_preflights => {
                CorsDecision::Preflight(empty_ok())
            }
            (false, _) => CorsDecision::None,
        }
    }

    fn preflight(&self, origin: &HeaderValue) -> Response<BoxBody> {
        let mut response = empty_ok();
        let h = response.headers_mut();
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        if self.allow_credentials {
            h.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        for (name, value) in [
            (ACCESS_CONTROL_ALLOW_METHODS, &self.allow_methods),
            (ACCESS_CONTROL_ALLOW_HEADERS, &self.allow_headers),
            (ACCESS_CONTROL_MAX_AGE, &self.max_age),
        ] {
            if let Some(value) = value {
                h.insert(name, value.clone());
            }
        }
        response
    }

    /// Headers on the response to an allowed actual request.
    pub(crate) fn on_response(&self, origin: &HeaderValue, headers: &mut HeaderMap) {
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        if self.allow_credentials {
            headers.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(expose) = &self.expose_headers {
            headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
        }
    }
}

fn empty_ok() -> Response<BoxBody> {
    let mut response = Response::new(body::empty());
    response
        .headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn cors(json: &str) -> Cors {
        Cors::compile(&serde_json::from_str(json).expect("CorsPolicy"))
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                    HeaderValue::from_str(v).expect("value"),
                )
            })
            .collect()
    }

    const POLICY: &str = r#"{"allowOrigins": [{"exact": "https://example.com"}, {"regex": "https://.*\\.example\\.org"}],
        "allowMethods": ["GET", "POST"], "allowHeaders": ["x-a", "x-b"], "exposeHeaders": ["x-c"],
        "maxAge": "24h", "allowCredentials": true}"#;

    #[test]
    fn preflight_from_an_allowed_origin_is_answered_locally() {
        let c = cors(POLICY);
        let h = headers(&[
            ("origin", "https://app.example.org"),
            ("access-control-request-method", "POST"),
        ]);
        let CorsDecision::Preflight(resp) = c.decide(&Method::OPTIONS, &h) else {
            panic!("a preflight")
        };
        assert_eq!(resp.status(), StatusCode::OK);
        let h = resp.headers();
        assert_eq!(h[ACCESS_CONTROL_ALLOW_ORIGIN], "https://app.example.org");
        assert_eq!(h[ACCESS_CONTROL_ALLOW_METHODS], "GET,POST");
        assert_eq!(h[ACCESS_CONTROL_ALLOW_HEADERS], "x-a,x-b");
        assert_eq!(h[ACCESS_CONTROL_MAX_AGE], "86400");
        assert_eq!(h[ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        assert!(h.get(ACCESS_CONTROL_EXPOSE_HEADERS).is_none());
    }

    #[test]
    fn actual_requests_get_headers_on_the_response() {
        let c = cors(POLICY);
        let h = headers(&[("origin", "https://example.com")]);
        let CorsDecision::Actual(origin) = c.decide(&Method::GET, &h) else {
            panic!("an actual CORS request")
        };
        let mut out = HeaderMap::new();
        c.on_response(&origin, &mut out);
        assert_eq!(out[ACCESS_CONTROL_ALLOW_ORIGIN], "https://example.com");
        assert_eq!(out[ACCESS_CONTROL_EXPOSE_HEADERS], "x-c");
        assert_eq!(out[ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        // OPTIONS without Access-Control-Request-Method is not a preflight.
        assert!(matches!(
            c.decide(&Method::OPTIONS, &h),
            CorsDecision::Actual(_)
        ));
        assert!(matches!(
            c.decide(&Method::GET, &HeaderMap::new()),
            CorsDecision::None
        ));
    }

    #[test]
    fn unmatched_origins_forward_or_are_ignored() {
        let preflight = headers(&[
            ("origin", "https://evil.test"),
            ("access-control-request-method", "GET"),
        ]);
        let c = cors(POLICY);
        assert!(
            matches!(c.decide(&Method::OPTIONS, &preflight), CorsDecision::None),
            "forwarded"
        );
        assert!(matches!(
            c.decide(&Method::GET, &preflight),
            CorsDecision::None
        ));
        let c =
            cors(r#"{"allowOrigins": [{"exact": "https://a"}], "unmatchedPreflights": "IGNORE"}"#);
        let CorsDecision::Preflight(resp) = c.decide(&Method::OPTIONS, &preflight) else {
            panic!("answered")
        };
        assert!(resp.headers().get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
    }

    #[test]
    fn star_and_legacy_allow_origin() {
        let c = cors(r#"{"allowOrigins": [{"exact": "*"}]}"#);
        let h = headers(&[("origin", "https://anyone")]);
        assert!(
            matches!(c.decide(&Method::GET, &h), CorsDecision::Actual(o) if o == "https://anyone")
        );
        let c = cors(r#"{"allowOrigin": ["https://anyone"]}"#);
        assert!(matches!(
            c.decide(&Method::GET, &h),
            CorsDecision::Actual(_)
        ));
        let c = cors(r#"{}"#);
        assert!(matches!(c.decide(&Method::GET, &h), CorsDecision::None));
    }
}
