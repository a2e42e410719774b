//! Istio `AuthorizationPolicy` for this workload: the policies that apply, compiled once per
//! config into matcher vectors, evaluated per request with lookups only, and
//! [`AuthzLayer`], which answers a denied request with Envoy's `403 RBAC: access denied`.
//!
//! ```
//! use std::sync::Arc;
//! use arc_swap::ArcSwap;
//! use mesh_core::body::{self, BoxBody, BoxError};
//! use mesh_core::config::{self, Source};
//! use mesh_core::conn::ClientInfo;
//! use mesh_core::{Identity, Labels};
//! use mesh_tls::authz::{AuthorizationPolicies, AuthzLayer};
//! use mesh_tls::peer_auth::DEFAULT_ROOT_NAMESPACE;
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let yaml = r#"
//! apiVersion: security.istio.io/v1
//! kind: AuthorizationPolicy
//! metadata: {name: details-viewer, namespace: default}
//! spec:
//!   selector: {matchLabels: {app: details}}
//!   action: ALLOW
//!   rules:
//!   - from: [{source: {principals: ["cluster.local/ns/default/sa/bookinfo-productpage"]}}]
//!     to: [{operation: {methods: ["GET"]}}]
//! "#;
//! let config = config::load_sources(&[Source::new("authz.yaml", yaml)]).unwrap();
//! let labels: Labels = [("app", "details")].into_iter().collect();
//! let policies =
//!     AuthorizationPolicies::for_workload(&config, "default", &labels, DEFAULT_ROOT_NAMESPACE);
//! let policies = Arc::new(ArcSwap::from_pointee(policies));
//!
//! let app = service_fn(|_req: http::Request<BoxBody>| async {
//!     Ok::<_, BoxError>(http::Response::new(body::full("details")))
//! });
//! let svc = AuthzLayer::new(policies).layer(app);
//!
//! let request = |peer: Option<&str>, method: &str| {
//!     let mut req = http::Request::builder()
//!         .method(method)
//!         .uri("/details/0")
//!         .header("host", "details:9080")
//!         .body(body::empty())
//!         .unwrap();
//!     req.extensions_mut().insert(ClientInfo {
//!         remote: "10.0.0.7:40000".parse().unwrap(),
//!         local: "10.0.0.9:9080".parse().unwrap(),
//!         tls: peer.is_some(),
//!     });
//!     if let Some(p) = peer {
//!         req.extensions_mut().insert(Identity::from_principal(p).unwrap());
//!     }
//!     req
//! };
//! let productpage = Some("cluster.local/ns/default/sa/bookinfo-productpage");
//!
//! let ok = svc.clone().oneshot(request(productpage, "GET")).await.unwrap();
//! assert_eq!(ok.status(), 200);
//!
//! // Another method, or no verified peer: Envoy's RBAC answer, the app is not called.
//! for (peer, method) in [(productpage, "DELETE"), (None, "GET")] {
//!     let denied = svc.clone().oneshot(request(peer, method)).await.unwrap();
//!     assert_eq!(denied.status(), 403);
//!     let body = http_body_util::BodyExt::collect(denied.into_body()).await.unwrap();
//!     assert_eq!(body.to_bytes(), "RBAC: access denied");
//! }
//! # }
//! ```
//!
//! # Why it is shaped this way
//!
//! - **Compiled once.** [`AuthorizationPolicies::for_workload`] picks the policies Istio
//!   would apply to this workload and compiles every rule into small matcher enums
//!   (strings split into exact/prefix/suffix/any, hosts lower-cased, CIDRs parsed, header
//!   names built); [`AuthorizationPolicies::evaluate`] walks vectors and allocates nothing
//!   (a header sent several times is joined once, as Envoy matches it). The peer's principal
//!   is read once per evaluation, its namespace and service account parsed at most once.
//! - **Indexed by principal.** Each action's policies are indexed by the peer principals
//!   they require (exact, prefix, suffix, `*`), so a request checks only the policies its
//!   peer can match, plus those that name no principal; the first match in config order is
//!   still the one reported (see `index.rs` for why that is exact). The proxy keeps the
//!   result in an `ArcSwap` next to its config and swaps it on reload; each request loads
//!   the current one.
//! - **Selection** (Istio): a policy in the root namespace (`istio-system`, see
//!   [`DEFAULT_ROOT_NAMESPACE`](crate::peer_auth::DEFAULT_ROOT_NAMESPACE)) applies to every
//!   workload of the mesh whose labels its selector matches (no selector: all of them); a
//!   policy in the workload's namespace applies with no selector or a matching one. Policies
//!   with `targetRef`/`targetRefs` bind to gateways and waypoints, never to a sidecar, so they
//!   are skipped. CUSTOM is rejected at load.
//! - **Order** (Istio): DENY first (any match denies), then ALLOW (no ALLOW policy: allow;
//!   otherwise allow only when one matches). AUDIT never changes the outcome; a matching AUDIT
//!   policy sets [`Decision::audited`].
//! - **Rule semantics** (Istio): a rule matches when every field it writes matches; entries
//!   of one field are ORed, `from` and `to` entries are ORed, `when` conditions ANDed; a rule
//!   with nothing in it matches everything; a policy matches when any rule does, so a policy
//!   without rules matches nothing (an ALLOW `spec: {}` denies everything, a DENY `spec: {}`
//!   denies nothing).
//! - **No peer identity** (plain text, or a peer without a certificate): positive
//!   `principals`, `namespaces`, `serviceAccounts`, `source.principal` and
//!   `source.namespace` do not match, and their negations hold. That is Envoy's RBAC: the
//!   `authenticated` principal matcher is false without a peer certificate, and Istio
//!   compiles `notPrincipals` into `not_id` of it. So `principals: ["*"]` means "any mTLS
//!   peer", and a DENY with `notPrincipals: [...]` also denies plain text. The same holds
//!   for an identity that is not Istio-shaped (`/ns/<ns>/sa/<sa>`) for namespaces and
//!   service accounts.
//! - **TCP** (`http: None`, Istio's "authorization for TCP traffic"): an ALLOW rule that
//!   uses an HTTP-only field (`hosts`, `methods`, `paths`, their `not*`, a
//!   `request.headers[...]` condition) never matches TCP, since Istio drops such a rule when
//!   it builds the TCP filter; in a DENY or AUDIT rule those fields are ignored and the rest
//!   of the rule decides, so a DENY with `methods: [GET]` alone denies every TCP connection.
//!   Both err on the side of denying.
//! - **Strings**: principals, namespaces, methods, paths and header values compare
//!   case-sensitively; hosts case-insensitively, and a request host with a port matches a
//!   pattern written without one. Paths with `{*}`/`{**}` are Envoy URI templates (`{*}` one
//!   segment, `{**}` the rest, last only). The path is matched as the request carries it
//!   (without the query): nothing normalizes it before this layer yet (Envoy's Istio default
//!   resolves `.`/`..` and merges slashes first).
//! - **Sources**: `ipBlocks` and the `source.ip` condition test the connection's peer
//!   address. `remoteIpBlocks` and `remote.ip` test it too: Istio reads the original client
//!   from `X-Forwarded-For` only behind trusted proxies (`numTrustedProxies`, a gateway
//!   setting), and a sidecar trusts none, so a client could otherwise spoof it.
//!   `serviceAccounts` entries are `<namespace>/<name>` and match the peer identity's
//!   namespace and service account (any trust domain).
//! - **Unsupported fields** (`requestPrincipals`, `request.auth.*`, `connection.sni`, ...) are
//!   rejected at load. Should one reach compilation anyway, an ALLOW policy drops the rule
//!   and DENY/AUDIT drop the field, Istio's own fallback: both deny more, never less.

mod compile;
mod index;
mod layer;
mod matcher;
#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::sync::Arc;

use mesh_core::config::security::AuthorizationAction;
use mesh_core::config::{AuthorizationPolicy, MeshConfig};
use mesh_core::{Identity, Labels};

use compile::{CompiledPolicy, Peer};
use index::PolicySet;

pub use layer::{Authz, AuthzLayer, DENIED_BODY, ResponseFuture};

/// The authorization policies of one workload, compiled; see the module docs.
#[derive(Debug, Default)]
pub struct AuthorizationPolicies {
    deny: PolicySet,
    allow: PolicySet,
    audit: PolicySet,
}

/// What a request or connection is, for authorization.
#[derive(Clone, Copy, Debug)]
pub struct AuthzRequest<'a> {
    /// The verified peer identity (mTLS); `None` for plain text.
    pub peer: Option<&'a Identity>,
    /// The connection's peer address.
    pub source_ip: IpAddr,
    /// The address and port the connection was accepted on.
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    /// `None` for a TCP connection.
    pub http: Option<HttpAttributes<'a>>,
}

/// The HTTP attributes of a request.
#[derive(Clone, Copy, Debug)]
pub struct HttpAttributes<'a> {
    pub method: &'a str,
    /// Without the query.
    pub path: &'a str,
    /// `:authority` or `Host`, as sent (port included, if any).
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// The outcome of [`AuthorizationPolicies::evaluate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `namespace/name` of the policy that decided: the matching DENY policy, or the
    /// matching ALLOW policy. `None` when no policy matched (allowed because no ALLOW policy
    /// applies, or denied because none of them matched: Envoy's `matched_policy[none]`).
    pub policy: Option<Arc<str>>,
    /// A matching AUDIT policy asks for this request to be audited (logged).
    pub audited: bool,
}

impl AuthorizationPolicies {
    /// The policies of `config` that apply to a sidecar workload in `namespace` with
    /// `labels`, in config order; `root_namespace` is Istio's mesh config `rootNamespace`
    /// (usually [`DEFAULT_ROOT_NAMESPACE`](crate::peer_auth::DEFAULT_ROOT_NAMESPACE)).
    pub fn for_workload(
        config: &MeshConfig,
        namespace: &str,
        labels: &Labels,
        root_namespace: &str,
    ) -> AuthorizationPolicies {
        Self::compile(config.authorization_policies().iter().filter(|p| {
            let spec = &p.spec;
            let in_scope = p.namespace() == namespace || p.namespace() == root_namespace;
            let for_sidecars = spec.target_ref.is_none() && spec.target_refs.is_empty();
            let selected = spec
                .selector
                .as_ref()
                .is_none_or(|s| labels.matches(&s.match_labels));
            in_scope && for_sidecars && selected
        }))
    }

    /// Compiles exactly `policies`, with no selection (tests, benchmarks, embedders that
    /// select themselves). CUSTOM policies are skipped (rejected at load).
    pub fn compile<'a>(
        policies: impl IntoIterator<Item = &'a AuthorizationPolicy>,
    ) -> AuthorizationPolicies {
        let (mut deny, mut allow, mut audit) = (Vec::new(), Vec::new(), Vec::new());
        for policy in policies {
            let list = match policy.spec.action {
                AuthorizationAction::Allow => &mut allow,
                AuthorizationAction::Deny => &mut deny,
                AuthorizationAction::Audit => &mut audit,
                AuthorizationAction::Custom => {
                    tracing::warn!(
                        policy = %format_args!("{}/{}", policy.namespace(), policy.name()),
                        "CUSTOM authorization is not supported; policy ignored"
                    );
                    continue;
                }
            };
            list.push(CompiledPolicy::compile(policy));
        }
        AuthorizationPolicies {
            deny: PolicySet::new(deny),
            allow: PolicySet::new(allow),
            audit: PolicySet::new(audit),
        }
    }

    /// No policy applies: every request is allowed, and the layer may be left out.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many policies apply (ALLOW, DENY and AUDIT).
    pub fn len(&self) -> usize {
        self.deny.len() + self.allow.len() + self.audit.len()
    }

    /// Decides a request: DENY, then ALLOW; AUDIT only marks. See the module docs.
    pub fn evaluate(&self, req: &AuthzRequest<'_>) -> Decision {
        let peer = Peer::new(req.peer);
        let audited = self.audit.first_match(req, &peer, false).is_some();
        if let Some(p) = self.deny.first_match(req, &peer, false) {
            return Decision {
                allowed: false,
                policy: Some(p.name.clone()),
                audited,
            };
        }
        if self.allow.is_empty() {
            return Decision {
                allowed: true,
                policy: None,
                audited,
            };
        }
        let allowed_by = self.allow.first_match(req, &peer, true);
        Decision {
            allowed: allowed_by.is_some(),
            policy: allowed_by.map(|p| p.name.clone()),
            audited,
        }
    }

    /// Decides a TCP connection (no HTTP attributes).
    pub fn check_connection(
        &self,
        peer: Option<&Identity>,
        source_ip: IpAddr,
        destination_ip: IpAddr,
        destination_port: u16,
    ) -> Decision {
        self.evaluate(&AuthzRequest {
            peer,
            source_ip,
            destination_ip,
            destination_port,
            http: None,
        })
    }
}
