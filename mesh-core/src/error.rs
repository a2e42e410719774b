//! The error a proxy answers for itself.
//!
//! Layers fail with a [`ProxyError`]; the outermost layer of each stack turns it into a local
//! reply (status, `x-mesh-response-flags`, a one-line reason). Keeping it an error until the
//! edge lets the layers in between (retries, outlier detection, metrics) see what went wrong
//! as a typed value rather than parse a response.
//!
//! The message names the service and endpoint involved once; the wrapped cause is rendered
//! into it rather than chained, so a reader never sees the same fact twice.

use std::fmt;

use http::StatusCode;

use crate::body::BoxError;
use crate::flags::ResponseFlags;

/// A failure the proxy answers with a local reply.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ProxyError {
    flags: ResponseFlags,
    status: StatusCode,
    message: String,
}

impl ProxyError {
    /// An error with the status its flags imply (503 when none does).
    pub fn new(flags: ResponseFlags, message: impl fmt::Display) -> Self {
        ProxyError {
            flags,
            status: flags.status().unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            message: message.to_string(),
        }
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// NR: nothing serves this authority.
    pub fn no_route(authority: &str) -> Self {
        Self::new(
            ResponseFlags::NO_ROUTE_FOUND,
            format_args!("no route: no service is known for host {authority:?}"),
        )
    }

    /// UH: the service is known but has no endpoint to send to.
    pub fn no_healthy_upstream(service: impl fmt::Display) -> Self {
        Self::new(
            ResponseFlags::NO_HEALTHY_UPSTREAM,
            format_args!("no healthy upstream: {service} has no endpoints"),
        )
    }

    /// UF: connecting to `endpoint` of `service` failed.
    pub fn connect_failed(
        service: impl fmt::Display,
        endpoint: impl fmt::Display,
        cause: impl fmt::Display,
    ) -> Self {
        Self::new(
            ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
            format_args!("upstream connect error: {service} endpoint {endpoint}: {cause}"),
        )
    }

    pub fn flags(&self) -> ResponseFlags {
        self.flags
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Finds a `ProxyError` in a boxed error, as services pass it up.
    pub fn find(error: &BoxError) -> Option<&ProxyError> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
        while let Some(e) = cur {
            if let Some(p) = e.downcast_ref::<ProxyError>() {
                return Some(p);
            }
            cur = e.source();
        }
        None
    }
}
