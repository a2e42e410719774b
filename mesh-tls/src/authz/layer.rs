//! [`AuthzLayer`]: the inbound HTTP check, before the request reaches the app.
//!
//! A denied request is answered here, as Envoy's RBAC filter answers it: `403`,
//! `content-type: text/plain`, body `RBAC: access denied`, and the inner service is never
//! called. No response flag is set: Envoy sets none for an RBAC denial (only
//! `response_code_details: rbac_access_denied_matched_policy[...]`; `UAEX` belongs to
//! ext-authz, which this proxy does not run), so no `x-mesh-response-flags` header is added.
//! The [`Decision`] rides on the 403's extensions (and on an allowed request's extensions
//! when an AUDIT policy matched) for telemetry; the deciding policy is logged at debug.
//!
//! Inputs, all from the request: the verified peer is the [`Identity`] in its extensions
//! (only the mTLS layer inserts one; none means plain text), addresses come from
//! [`ClientInfo`] (remote = source, local = destination IP and port). A request without
//! `ClientInfo` is denied when any policy applies: deciding on made-up addresses could allow
//! what a policy meant to refuse.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::{HeaderValue, Request, Response, StatusCode};
use mesh_core::Identity;
use mesh_core::body::{self, BoxBody};
use mesh_core::conn::ClientInfo;
use pin_project_lite::pin_project;

use super::{AuthorizationPolicies, AuthzRequest, Decision, HttpAttributes};

/// Envoy's body for an RBAC denial.
pub const DENIED_BODY: &str = "RBAC: access denied";

/// Checks every request against the current [`AuthorizationPolicies`]; see the module docs.
#[derive(Clone, Debug)]
pub struct AuthzLayer {
    policies: Arc<ArcSwap<AuthorizationPolicies>>,
    destination_port: Option<u16>,
}

impl AuthzLayer {
    /// Policies are loaded per request, so a swap applies to the next request.
    pub fn new(policies: Arc<ArcSwap<AuthorizationPolicies>>) -> Self {
        AuthzLayer {
            policies,
            destination_port: None,
        }
    }

    /// Takes `port` as the destination port (`to.operation.ports`, `destination.port`)
    /// rather than the listener's: a sidecar's inbound listener (15006) fronts the workload's
    /// port, which is what Istio policies name.
    pub fn with_destination_port(mut self, port: u16) -> Self {
        self.destination_port = Some(port);
        self
    }
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = Authz<S>;
    fn layer(&self, inner: S) -> Authz<S> {
        Authz {
            inner,
            policies: self.policies.clone(),
            destination_port: self.destination_port,
        }
    }
}

/// The service made by [`AuthzLayer`].
#[derive(Clone, Debug)]
pub struct Authz<S> {
    inner: S,
    policies: Arc<ArcSwap<AuthorizationPolicies>>,
    destination_port: Option<u16>,
}

impl<S, B> tower::Service<Request<B>> for Authz<S>
where
    S: tower::Service<Request<B>, Response = Response<BoxBody>>,
{
    type Response = Response<BoxBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let policies = self.policies.load();
        if policies.is_empty() {
            return ResponseFuture::Allowed {
                inner: self.inner.call(req),
            };
        }
        let decision = decide(&policies, &req, self.destination_port);
        if decision.allowed {
            if decision.audited {
                req.extensions_mut().insert(decision);
            }
            return ResponseFuture::Allowed {
                inner: self.inner.call(req),
            };
        }
        tracing::debug!(
            policy = decision.policy.as_deref().unwrap_or("none"),
            method = %req.method(),
            path = req.uri().path(),
            "RBAC: access denied"
        );
        ResponseFuture::Denied {
            response: Some(denied(decision)),
        }
    }
}

fn decide<B>(
    policies: &AuthorizationPolicies,
    req: &Request<B>,
    destination_port: Option<u16>,
) -> Decision {
    let Some(client) = req.extensions().get::<ClientInfo>() else {
        tracing::warn!("request without ClientInfo: denied, addresses unknown");
        return Decision {
            allowed: false,
            policy: None,
            audited: false,
        };
    };
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("");
    policies.evaluate(&AuthzRequest {
        peer: req.extensions().get::<Identity>(),
        source_ip: client.remote.ip(),
        destination_ip: client.local.ip(),
        destination_port: destination_port.unwrap_or(client.local.port()),
        http: Some(HttpAttributes {
            method: req.method().as_str(),
            path: req.uri().path(),
            host,
            headers: req.headers(),
        }),
    })
}

/// Envoy's RBAC local reply.
fn denied(decision: Decision) -> Response<BoxBody> {
    let mut response = Response::new(body::full(DENIED_BODY));
    *response.status_mut() = StatusCode::FORBIDDEN;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    response.extensions_mut().insert(decision);
    response
}

pin_project! {
    /// The future of [`Authz`]: the inner service's, or the 403.
    #[project = Projection]
    #[derive(Debug)]
    pub enum ResponseFuture<F> {
        Allowed { #[pin] inner: F },
        Denied { response: Option<Response<BoxBody>> },
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<BoxBody>, E>>,
{
    type Output = Result<Response<BoxBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projection::Allowed { inner } => inner.poll(cx),
            // Polled again after completion: answer the 403 again rather than panic.
            Projection::Denied { response } => {
                Poll::Ready(Ok(response.take().unwrap_or_else(|| {
                    denied(Decision {
                        allowed: false,
                        policy: None,
                        audited: false,
                    })
                })))
            }
        }
    }
}
