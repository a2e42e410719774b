//! What is worth retrying: Envoy's `retry_on` conditions applied to one attempt's outcome.

use http::header::{CONTENT_TYPE, HeaderMap, HeaderName};
use http::{Response, StatusCode};
use mesh_core::body::BoxError;
use mesh_core::target::RetryOn;
use mesh_core::{ProxyError, ResponseFlags};

/// The header a gRPC status travels in: response headers of a trailers-only response, else
/// the trailers.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// Envoy's mark on a response its rate-limit filter refused (`envoy-ratelimited`).
const ENVOY_RATELIMITED: HeaderName = HeaderName::from_static("x-envoy-ratelimited");

/// gRPC codes and the `retryOn` tokens that name them.
const GRPC_CODES: [(u32, u32); 5] = [
    (1, RetryOn::GRPC_CANCELLED),
    (4, RetryOn::GRPC_DEADLINE_EXCEEDED),
    (8, RetryOn::GRPC_RESOURCE_EXHAUSTED),
    (13, RetryOn::GRPC_INTERNAL),
    (14, RetryOn::GRPC_UNAVAILABLE),
];

/// The decision on a response's headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Hand it to the client.
    Done,
    Retry,
    /// A gRPC response without a status in its headers: the status is in the trailers.
    PeekTrailers,
}

/// Whether a response status is retried: `5xx`, `gateway-error` (502, 503, 504),
/// `retriable-4xx` (409), `retriable-status-codes` (the policy's list, bare codes included).
pub(crate) fn status(on: &RetryOn, status: StatusCode) -> bool {
    let code = status.as_u16();
    (on.contains(RetryOn::FIVE_XX) && status.is_server_error())
        || (on.contains(RetryOn::GATEWAY_ERROR) && matches!(code, 502..=504))
        || (on.contains(RetryOn::RETRIABLE_4XX) && code == 409)
        || (on.contains(RetryOn::RETRIABLE_STATUS_CODES) && on.status_codes.contains(&code))
}

/// The decision on a response's status and headers; `may_peek` says whether waiting for a
/// gRPC response's trailers could still lead to a retry.
pub(crate) fn response<B>(on: &RetryOn, response: &Response<B>, may_peek: bool) -> Verdict {
    let headers = response.headers();
    if status(on, response.status())
        || (on.contains(RetryOn::ENVOY_RATELIMITED) && headers.contains_key(ENVOY_RATELIMITED))
    {
        return Verdict::Retry;
    }
    if !wants_grpc(on) || !is_grpc(headers) {
        return Verdict::Done;
    }
    match grpc(on, headers) {
        Some(true) => Verdict::Retry,
        Some(false) => Verdict::Done,
        None if may_peek => Verdict::PeekTrailers,
        None => Verdict::Done,
    }
}

/// Whether any gRPC condition is set.
pub(crate) fn wants_grpc(on: &RetryOn) -> bool {
    GRPC_CODES
        .iter()
        .any(|(_, condition)| on.contains(*condition))
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Whether the `grpc-status` in `headers` (response headers or trailers) is retried; `None`
/// when there is none.
pub(crate) fn grpc(on: &RetryOn, headers: &HeaderMap) -> Option<bool> {
    let code: u32 = headers
        .get(GRPC_STATUS)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(
        GRPC_CODES
            .iter()
            .any(|(c, condition)| *c == code && on.contains(*condition)),
    )
}

/// Whether a failed attempt is retried, from the [`ProxyError`] flags the stack below set:
/// `UF` is a connect failure; `UC`, `UR`, `LR` and `UPE` are resets; `UT` (a per-try
/// timeout) counts as a reset too, as Envoy's per-try timeout does. `5xx` and
/// `gateway-error` include all of these, `reset` too (Envoy counts a connect failure as a
/// reset). Anything else (`UH`, `UO`, `NR`, errors no layer classified) is not retried.
pub(crate) fn error(on: &RetryOn, error: &BoxError) -> bool {
    let Some(e) = ProxyError::find(error) else {
        return false;
    };
    let flags = e.flags();
    let connect = flags.contains(ResponseFlags::UPSTREAM_CONNECTION_FAILURE);
    if connect
        && (on.contains(RetryOn::CONNECT_FAILURE) || on.contains(RetryOn::RESET_BEFORE_REQUEST))
    {
        return true;
    }
    let refused = is_refused_stream(e);
    if refused && on.contains(RetryOn::REFUSED_STREAM) {
        return true;
    }
    let reset = connect
        || refused
        || [
            ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
            ResponseFlags::UPSTREAM_REMOTE_RESET,
            ResponseFlags::LOCAL_RESET,
            ResponseFlags::UPSTREAM_PROTOCOL_ERROR,
            ResponseFlags::UPSTREAM_REQUEST_TIMEOUT,
        ]
        .into_iter()
        .any(|f| flags.contains(f));
    reset
        && (on.contains(RetryOn::RESET)
            || on.contains(RetryOn::FIVE_XX)
            || on.contains(RetryOn::GATEWAY_ERROR))
}

/// An HTTP/2 `REFUSED_STREAM` reset: the server did not process the request at all. The
/// upstream client renders the h2 error into the `ProxyError`'s message (h2 describes the
/// reason as "refused stream before processing any application logic"); there is no typed
/// marker to read, so the text is what we have.
fn is_refused_stream(e: &ProxyError) -> bool {
    let message = e.to_string();
    message.contains("refused stream") || message.contains("REFUSED_STREAM")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(text: &str) -> RetryOn {
        RetryOn::parse(text).unwrap()
    }

    fn code(c: u16) -> StatusCode {
        StatusCode::from_u16(c).unwrap()
    }

    #[test]
    fn statuses_per_token() {
        let five = on("5xx");
        assert!(
            [500, 502, 503, 504, 599]
                .iter()
                .all(|c| status(&five, code(*c)))
        );
        assert!(
            ![200, 404, 409, 429, 499]
                .iter()
                .any(|c| status(&five, code(*c)))
        );

        let gateway = on("gateway-error");
        assert!([502, 503, 504].iter().all(|c| status(&gateway, code(*c))));
        assert!(
            ![500, 501, 505, 409]
                .iter()
                .any(|c| status(&gateway, code(*c)))
        );

        let four = on("retriable-4xx");
        assert!(status(&four, code(409)));
        assert!(![400, 404, 429, 503].iter().any(|c| status(&four, code(*c))));

        // Bare codes become retriable status codes.
        let bare = on("429,418");
        assert!(status(&bare, code(429)) && status(&bare, code(418)));
        assert!(!status(&bare, code(503)));

        // Istio's default: 503 only, through retriable-status-codes.
        let default = RetryOn::istio_default();
        assert!(status(&default, code(503)));
        assert!(
            ![500, 502, 504, 409]
                .iter()
                .any(|c| status(&default, code(*c)))
        );
        // The list alone does nothing without the condition.
        let mut listed = on("connect-failure");
        listed.status_codes.push(500);
        assert!(!status(&listed, code(500)));
    }

    #[test]
    fn envoy_ratelimited_header() {
        let resp = Response::builder()
            .status(429)
            .header("x-envoy-ratelimited", "true")
            .body(())
            .unwrap();
        assert_eq!(
            response(&on("envoy-ratelimited"), &resp, true),
            Verdict::Retry
        );
        assert_eq!(response(&on("5xx"), &resp, true), Verdict::Done);
    }

    fn grpc_response(status: Option<&str>) -> Response<()> {
        let mut b = Response::builder().header("content-type", "application/grpc+proto");
        if let Some(s) = status {
            b = b.header("grpc-status", s);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn grpc_status_in_headers_per_token() {
        for (token, code) in crate::test_support::GRPC_TOKENS {
            let resp = grpc_response(Some(code));
            assert_eq!(response(&on(token), &resp, true), Verdict::Retry, "{token}");
            // Another token does not retry this code.
            let other = if token == "internal" {
                "unavailable"
            } else {
                "internal"
            };
            assert_eq!(response(&on(other), &resp, true), Verdict::Done, "{token}");
        }
        let ok = grpc_response(Some("0"));
        assert_eq!(
            response(&on("unavailable,internal"), &ok, true),
            Verdict::Done
        );
        // Not gRPC: a grpc-status header means nothing.
        let plain = Response::builder()
            .header("grpc-status", "14")
            .body(())
            .unwrap();
        assert_eq!(response(&on("unavailable"), &plain, true), Verdict::Done);
    }

    #[test]
    fn grpc_without_status_peeks_only_when_it_could_matter() {
        let resp = grpc_response(None);
        assert_eq!(
            response(&on("unavailable"), &resp, true),
            Verdict::PeekTrailers
        );
        assert_eq!(response(&on("unavailable"), &resp, false), Verdict::Done);
        // No gRPC condition: nothing to peek for.
        assert_eq!(response(&on("5xx"), &resp, true), Verdict::Done);
        let mut trailers = HeaderMap::new();
        trailers.insert(GRPC_STATUS, "14".parse().unwrap());
        assert_eq!(grpc(&on("unavailable"), &trailers), Some(true));
        assert_eq!(grpc(&on("cancelled"), &trailers), Some(false));
        assert_eq!(grpc(&on("cancelled"), &HeaderMap::new()), None);
    }

    fn err(flags: ResponseFlags, message: &str) -> BoxError {
        ProxyError::new(flags, message).into()
    }

    #[test]
    fn errors_per_token() {
        use ResponseFlags as F;
        let uf = err(F::UPSTREAM_CONNECTION_FAILURE, "connection refused");
        let uc = err(F::UPSTREAM_CONNECTION_TERMINATION, "connection closed");
        let ur = err(
            F::UPSTREAM_REMOTE_RESET,
            "stream error received: stream no longer needed",
        );
        let lr = err(F::LOCAL_RESET, "reset");
        let upe = err(F::UPSTREAM_PROTOCOL_ERROR, "bad status line");
        let ut = err(F::UPSTREAM_REQUEST_TIMEOUT, "per-try timeout");
        let refused = err(
            F::UPSTREAM_REMOTE_RESET,
            "upstream error: reviews endpoint 10.0.0.1:9080: http2 error: stream error received: refused stream before processing any application logic",
        );

        let connect = on("connect-failure");
        assert!(error(&connect, &uf));
        assert!(
            ![&uc, &ur, &lr, &upe, &ut, &refused]
                .iter()
                .any(|e| error(&connect, e))
        );
        assert!(error(&on("reset-before-request"), &uf));
        assert!(!error(&on("reset-before-request"), &ur));

        let refused_stream = on("refused-stream");
        assert!(error(&refused_stream, &refused));
        assert!(![&uf, &uc, &ur].iter().any(|e| error(&refused_stream, e)));

        for token in ["reset", "5xx", "gateway-error"] {
            let on = on(token);
            assert!(
                [&uf, &uc, &ur, &lr, &upe, &ut, &refused]
                    .iter()
                    .all(|e| error(&on, e)),
                "{token}"
            );
        }

        // Never retried: no healthy upstream, overflow, no route, unclassified errors.
        let all = on("5xx,reset,connect-failure,refused-stream,gateway-error");
        for never in [
            err(F::NO_HEALTHY_UPSTREAM, "no endpoints"),
            err(F::UPSTREAM_OVERFLOW, "pool full"),
            err(F::NO_ROUTE_FOUND, "no route"),
            "some other failure".into(),
        ] {
            assert!(!error(&all, &never), "{never}");
        }
        // Default: connect failures and refused streams, not resets.
        let default = RetryOn::istio_default();
        assert!(error(&default, &uf) && error(&default, &refused));
        assert!(!error(&default, &ur) && !error(&default, &ut));
    }
}
