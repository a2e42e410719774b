//! `fault`: Envoy's fault filter, per route.
//!
//! The delay (`fixedDelay`) comes first; then the abort, which answers for the service:
//! - `httpStatus`: a local reply with that status and `fault filter abort`;
//! - `grpcStatus`: a gRPC trailers-only reply, HTTP 200 with `content-type: application/grpc`,
//!   `grpc-status` (the code of Istio's status name) and `grpc-message: fault filter abort`.
//!
//! Both set their response flag (DI, FI). Each is sampled on its own percentage, drawn per
//! request (parts per million, as Istio hands them to Envoy). An unset percentage is 100%
//! here, following Istio's reference documentation and the config model
//! (`FaultDelay::effective_percentage`); note that Istio's own translation leaves Envoy's
//! default, 0%, in place (istio/istio#36303), so write the percentage explicitly for
//! configurations that must behave the same under both.

use std::time::Duration;

use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use mesh_core::ResponseFlags;
use mesh_core::body::{self, BoxBody};
use mesh_core::config::networking::HttpFaultInjection;

use crate::fraction::Fraction;

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
const ABORT_MESSAGE: &str = "fault filter abort";

/// gRPC status names Istio accepts in `grpcStatus`, with their codes.
pub(crate) const GRPC_STATUS_CODES: [(&str, u8); 17] = [
    ("OK", 0),
    ("CANCELLED", 1),
    ("UNKNOWN", 2),
    ("INVALID_ARGUMENT", 3),
    ("DEADLINE_EXCEEDED", 4),
    ("NOT_FOUND", 5),
    ("ALREADY_EXISTS", 6),
    ("PERMISSION_DENIED", 7),
    ("RESOURCE_EXHAUSTED", 8),
    ("FAILED_PRECONDITION", 9),
    ("ABORTED", 10),
    ("OUT_OF_RANGE", 11),
    ("UNIMPLEMENTED", 12),
    ("INTERNAL", 13),
    ("UNAVAILABLE", 14),
    ("DATA_LOSS", 15),
    ("UNAUTHENTICATED", 16),
];

#[derive(Clone, Debug)]
enum Abort {
    Http(StatusCode),
    Grpc(HeaderValue),
}

#[derive(Clone, Debug)]
pub(crate) struct Fault {
    delay: Option<(Duration, Fraction)>,
    abort: Option<(Abort, Fraction)>,
}

impl Fault {
    /// `None` when nothing can ever be injected. Exponential delays and HTTP/2 error aborts
    /// are rejected by validation (Istio does not implement them either).
    pub(crate) fn compile(f: &HttpFaultInjection) -> Option<Fault> {
        let delay = f.delay.as_ref().and_then(|d| {
            Some((
                d.fixed_delay?.get(),
                Fraction::from_percent(d.effective_percentage()),
            ))
        });
        let abort = f.abort.as_ref().and_then(|a| {
            let kind = match (a.http_status, &a.grpc_status) {
                (Some(status), _) => Abort::Http(StatusCode::from_u16(status).ok()?),
                (None, Some(name)) => {
                    let code = GRPC_STATUS_CODES.iter().find(|(n, _)| n == name)?.1;
                    Abort::Grpc(HeaderValue::from(u16::from(code)))
                }
                (None, None) => return None,
            };
            Some((kind, Fraction::from_percent(a.effective_percentage())))
        });
        let delay = delay.filter(|(_, f)| !f.is_never());
        let abort = abort.filter(|(_, f)| !f.is_never());
        (delay.is_some() || abort.is_some()).then_some(Fault { delay, abort })
    }

    /// Draws the delay for this request.
    pub(crate) fn sample_delay(&self) -> Option<Duration> {
        self.delay
            .as_ref()
            .and_then(|(delay, fraction)| fraction.sample().then_some(*delay))
    }

    /// Draws the abort for this request: the reply, flagged FI plus `flags` (DI when the
    /// request was delayed first).
    pub(crate) fn sample_abort(&self, flags: ResponseFlags) -> Option<Response<BoxBody>> {
        let (abort, fraction) = self.abort.as_ref()?;
        if !fraction.sample() {
            return None;
        }
        let flags = flags | ResponseFlags::FAULT_INJECTED;
        Some(match abort {
            Abort::Http(status) => flags.local_reply(*status, ABORT_MESSAGE),
            Abort::Grpc(code) => {
                let mut response = Response::new(body::empty());
                let h = response.headers_mut();
                h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                h.insert(GRPC_STATUS, code.clone());
                h.insert(GRPC_MESSAGE, HeaderValue::from_static(ABORT_MESSAGE));
                flags.append_to(h);
                response
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::flags::RESPONSE_FLAGS_HEADER;

    fn fault(json: &str) -> Option<Fault> {
        Fault::compile(&serde_json::from_str(json).expect("fault"))
    }

    #[test]
    fn http_abort_is_a_flagged_local_reply() {
        let f = fault(r#"{"abort": {"httpStatus": 503, "percentage": {"value": 100}}}"#)
            .expect("fault");
        assert_eq!(f.sample_delay(), None);
        let resp = f.sample_abort(ResponseFlags::EMPTY).expect("aborted");
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[RESPONSE_FLAGS_HEADER], "FI");
        let resp = f
            .sample_abort(ResponseFlags::DELAY_INJECTED)
            .expect("aborted");
        assert_eq!(resp.headers()[RESPONSE_FLAGS_HEADER], "DI,FI");
    }

    #[test]
    fn grpc_abort_is_trailers_only() {
        let f = fault(r#"{"abort": {"grpcStatus": "UNAVAILABLE"}}"#).expect("fault");
        let resp = f
            .sample_abort(ResponseFlags::EMPTY)
            .expect("aborted: unset percentage is 100%");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/grpc");
        assert_eq!(resp.headers()["grpc-status"], "14");
        assert_eq!(resp.headers()["grpc-message"], ABORT_MESSAGE);
        assert_eq!(resp.headers()[RESPONSE_FLAGS_HEADER], "FI");
    }

    #[test]
    fn delay_with_legacy_percent_and_zero_percent_faults_vanish() {
        let f = fault(r#"{"delay": {"fixedDelay": "7s", "percent": 100}}"#).expect("fault");
        assert_eq!(f.sample_delay(), Some(Duration::from_secs(7)));
        assert!(f.sample_abort(ResponseFlags::EMPTY).is_none());
        assert!(fault(r#"{"delay": {"fixedDelay": "7s", "percentage": {"value": 0}}}"#).is_none());
        assert!(fault(r#"{"abort": {"httpStatus": 500, "percentage": {"value": 0}}}"#).is_none());
    }

    #[test]
    fn percentages_hold_over_a_large_seeded_sample() {
        fastrand::seed(42);
        let f = fault(
            r#"{"delay": {"fixedDelay": "1s", "percentage": {"value": 10}},
                "abort": {"httpStatus": 500, "percentage": {"value": 50}}}"#,
        )
        .expect("fault");
        let n = 100_000;
        let delayed = (0..n).filter(|_| f.sample_delay().is_some()).count();
        let aborted = (0..n)
            .filter(|_| f.sample_abort(ResponseFlags::EMPTY).is_some())
            .count();
        assert!((9_500..10_500).contains(&delayed), "{delayed}");
        assert!((49_000..51_000).contains(&aborted), "{aborted}");
    }
}
