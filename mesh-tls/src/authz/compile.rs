//! Policies compiled into matcher vectors, and their evaluation.
//!
//! A rule is stored as Istio evaluates it: `from` is a list of sources (ORed), each a list of
//! field tests (ANDed); `to` the same for operations; `when` one list of tests (ANDed). Each
//! test is a small enum over one request attribute with a `negate` bit for the `not*` forms.
//! A field that is absent in the policy is simply not stored, so evaluation only walks what
//! the policy wrote.

use std::cell::OnceCell;
use std::sync::Arc;

use http::HeaderName;
use ipnet::IpNet;
use mesh_core::Identity;
use mesh_core::config::AuthorizationPolicy;
use mesh_core::config::security::{AuthorizationAction, Condition, Operation, Rule, RuleSource};

use super::AuthzRequest;
use super::matcher::{PathMatch, StrMatch, any_host, any_net, any_path, any_str};
use mesh_core::net::parse_ip_net;

/// One compiled policy.
#[derive(Debug)]
pub(crate) struct CompiledPolicy {
    /// `namespace/name`.
    pub(crate) name: Arc<str>,
    pub(crate) rules: Vec<CompiledRule>,
}

#[derive(Debug)]
pub(crate) struct CompiledRule {
    from: Vec<Vec<Field>>,
    to: Vec<Vec<Field>>,
    when: Vec<Field>,
    /// The rule tests an HTTP-only attribute; an ALLOW rule like that never matches TCP.
    http_only: bool,
}

/// A `serviceAccounts` entry: `(namespace, name)`.
type Account = (Box<str>, Box<str>);

/// One attribute test; `negate` for `notPrincipals`, `notValues`, ...
#[derive(Debug)]
struct Field {
    test: Test,
    negate: bool,
}

#[derive(Debug)]
enum Test {
    /// The peer's principal (`cluster.local/ns/a/sa/b`); no peer identity: no match.
    Principal(Box<[StrMatch]>),
    /// The namespace of the peer's identity; no (Istio-shaped) identity: no match.
    Namespace(Box<[StrMatch]>),
    /// `(namespace, service account)` of the peer's identity, exact.
    ServiceAccount(Box<[Account]>),
    SourceIp(Box<[IpNet]>),
    DestinationIp(Box<[IpNet]>),
    DestinationPort(Box<[u16]>),
    // HTTP only from here.
    Host(Box<[StrMatch]>),
    Method(Box<[StrMatch]>),
    Path(Box<[PathMatch]>),
    Header(HeaderName, Box<[StrMatch]>),
}

impl Test {
    fn is_http_only(&self) -> bool {
        matches!(
            self,
            Test::Host(_) | Test::Method(_) | Test::Path(_) | Test::Header(..)
        )
    }
}

/// A policy field this proxy cannot compile. Validation rejects them all at load, so this
/// only guards against a config that skipped validation.
#[derive(Debug)]
pub(crate) struct Unsupported(pub(crate) String);

impl CompiledPolicy {
    /// Compiles `policy`. A field that cannot be compiled is handled as Istio handles a
    /// field it cannot translate: an ALLOW policy drops the whole rule (it allows less),
    /// DENY and AUDIT drop only that field (they deny or audit more).
    pub(crate) fn compile(policy: &AuthorizationPolicy) -> CompiledPolicy {
        let name: Arc<str> = format!("{}/{}", policy.namespace(), policy.name()).into();
        let strict = policy.spec.action == AuthorizationAction::Allow;
        let rules = policy
            .spec
            .rules
            .iter()
            .enumerate()
            .filter_map(|(i, rule)| match compile_rule(rule, strict) {
                Ok(rule) => Some(rule),
                Err(Unsupported(why)) => {
                    tracing::warn!(policy = %name, rule = i, "ignoring rule: {why}");
                    None
                }
            })
            .collect();
        CompiledPolicy { name, rules }
    }

    /// Any rule matches. No rules: nothing matches.
    pub(crate) fn matches(&self, req: &AuthzRequest<'_>, peer: &Peer<'_>, allow: bool) -> bool {
        self.rules.iter().any(|r| r.matches(req, peer, allow))
    }

    /// A necessary condition on the peer's principal: `Some(patterns)` when the policy can
    /// only match a request whose peer principal matches one of `patterns` (so a request
    /// without a peer, or whose principal matches none of them, cannot match); `None` when
    /// some rule can match without a positive principal test.
    ///
    /// Why it is sound: a rule matches only when every field of its `when` holds and, if it
    /// has `from` entries, every field of one of them holds. A positive (`negate: false`)
    /// `Principal` field holds only for a peer whose principal matches one of its patterns
    /// (no peer: it does not hold, whatever the protocol; HTTP-only fields are the only
    /// ones ignored for TCP). So a rule with such a field in `when` needs one of that
    /// field's patterns; a rule whose every `from` entry has one needs one pattern of those
    /// fields' union; a policy needs the union over its rules, and one without rules,
    /// which matches nothing, needs an empty set.
    pub(crate) fn principal_gate(&self) -> Option<Vec<&StrMatch>> {
        let mut gate = Vec::new();
        for rule in &self.rules {
            if let Some(list) = positive_principals(&rule.when) {
                gate.extend(list);
                continue;
            }
            if rule.from.is_empty() {
                return None;
            }
            for source in &rule.from {
                gate.extend(positive_principals(source)?);
            }
        }
        Some(gate)
    }
}

/// The patterns of the first positive principal test of `fields`. The fields of one group
/// must all hold, so any one such test is a necessary condition for the group.
fn positive_principals(fields: &[Field]) -> Option<&[StrMatch]> {
    fields.iter().find_map(|f| match &f.test {
        Test::Principal(list) if !f.negate => Some(&**list),
        _ => None,
    })
}

/// The peer's attributes, read once per evaluation rather than once per field.
pub(crate) struct Peer<'a> {
    identity: Option<&'a Identity>,
    /// Istio's principal form (no `spiffe://`).
    principal: Option<&'a [u8]>,
    /// `(namespace, service account)` of an Istio-shaped identity, parsed on the first
    /// namespace or service-account test, at most once per evaluation.
    istio: OnceCell<Option<(&'a str, &'a str)>>,
}

impl<'a> Peer<'a> {
    pub(crate) fn new(identity: Option<&'a Identity>) -> Peer<'a> {
        Peer {
            identity,
            principal: identity.map(|p| p.principal().as_bytes()),
            istio: OnceCell::new(),
        }
    }

    pub(crate) fn principal(&self) -> Option<&'a [u8]> {
        self.principal
    }

    /// `namespace()` and `service_account()` are both set exactly when the identity's path
    /// is Istio's `/ns/<ns>/sa/<sa>`, so the pair stands for either.
    fn istio(&self) -> Option<(&'a str, &'a str)> {
        *self.istio.get_or_init(|| {
            let p = self.identity?;
            Some((p.namespace()?, p.service_account()?))
        })
    }
}

impl CompiledRule {
    fn matches(&self, req: &AuthzRequest<'_>, peer: &Peer<'_>, allow: bool) -> bool {
        if allow && self.http_only && req.http.is_none() {
            return false;
        }
        let all = |fields: &[Field]| fields.iter().all(|f| f.matches(req, peer));
        (self.from.is_empty() || self.from.iter().any(|s| all(s)))
            && (self.to.is_empty() || self.to.iter().any(|o| all(o)))
            && all(&self.when)
    }
}

impl Field {
    fn matches(&self, req: &AuthzRequest<'_>, peer: &Peer<'_>) -> bool {
        let hit = match &self.test {
            Test::Principal(list) => peer.principal().is_some_and(|p| any_str(list, p)),
            Test::Namespace(list) => peer
                .istio()
                .is_some_and(|(ns, _)| any_str(list, ns.as_bytes())),
            Test::ServiceAccount(list) => peer
                .istio()
                .is_some_and(|(ns, sa)| list.iter().any(|(n, s)| **n == *ns && **s == *sa)),
            Test::SourceIp(nets) => any_net(nets, req.source_ip),
            Test::DestinationIp(nets) => any_net(nets, req.destination_ip),
            Test::DestinationPort(ports) => ports.contains(&req.destination_port),
            // HTTP-only attributes on a TCP connection: only DENY and AUDIT rules get here
            // (ALLOW rules with them were skipped above), and for those Istio ignores the
            // field, so it holds whether negated or not.
            Test::Host(list) => match &req.http {
                Some(h) => any_host(list, h.host),
                None => return true,
            },
            Test::Method(list) => match &req.http {
                Some(h) => any_str(list, h.method.as_bytes()),
                None => return true,
            },
            Test::Path(list) => match &req.http {
                Some(h) => any_path(list, h.path),
                None => return true,
            },
            Test::Header(name, list) => match &req.http {
                Some(h) => header_matches(h.headers, name, list),
                None => return true,
            },
        };
        hit != self.negate
    }
}

/// Envoy's header match: an absent header does not match (so `notValues` holds); several
/// values are matched as one comma-joined string, which is the only case that allocates.
fn header_matches(headers: &http::HeaderMap, name: &HeaderName, list: &[StrMatch]) -> bool {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return false;
    };
    match values.next() {
        None => any_str(list, first.as_bytes()),
        Some(second) => {
            let mut joined = first.as_bytes().to_vec();
            for v in std::iter::once(second).chain(values) {
                joined.push(b',');
                joined.extend_from_slice(v.as_bytes());
            }
            any_str(list, &joined)
        }
    }
}

/// Builds the fields of one rule. `strict` (ALLOW): any unsupported field fails the rule;
/// otherwise the field is dropped.
fn compile_rule(rule: &Rule, strict: bool) -> Result<CompiledRule, Unsupported> {
    let mut sink = FieldSink {
        strict,
        out: Vec::new(),
    };
    let mut from = Vec::with_capacity(rule.from.len());
    for f in &rule.from {
        sink.source(&f.source)?;
        from.push(std::mem::take(&mut sink.out));
    }
    let mut to = Vec::with_capacity(rule.to.len());
    for t in &rule.to {
        sink.operation(&t.operation)?;
        to.push(std::mem::take(&mut sink.out));
    }
    for c in &rule.when {
        sink.condition(c)?;
    }
    let when = sink.out;
    let http_only = from
        .iter()
        .chain(to.iter())
        .chain(std::iter::once(&when))
        .flatten()
        .any(|f| f.test.is_http_only());
    Ok(CompiledRule {
        from,
        to,
        when,
        http_only,
    })
}

struct FieldSink {
    strict: bool,
    out: Vec<Field>,
}

impl FieldSink {
    /// Adds `values` (as a positive test) and `not_values` (negated) built by `build`.
    fn pair<T>(
        &mut self,
        values: &[String],
        not_values: &[String],
        build: impl Fn(&[String]) -> Result<T, Unsupported>,
        wrap: impl Fn(T) -> Test,
    ) -> Result<(), Unsupported> {
        for (list, negate) in [(values, false), (not_values, true)] {
            if list.is_empty() {
                continue;
            }
            match build(list) {
                Ok(t) => self.out.push(Field {
                    test: wrap(t),
                    negate,
                }),
                Err(e) if self.strict => return Err(e),
                Err(e) => tracing::warn!("ignoring field: {}", e.0),
            }
        }
        Ok(())
    }

    fn unsupported(&self, what: &str, values: &[String]) -> Result<(), Unsupported> {
        if values.is_empty() {
            return Ok(());
        }
        let e = Unsupported(format!("{what} is not supported"));
        if self.strict {
            return Err(e);
        }
        // Dropping the field widens a DENY/AUDIT rule, as Istio does.
        tracing::warn!("ignoring field: {}", e.0);
        Ok(())
    }

    fn source(&mut self, s: &RuleSource) -> Result<(), Unsupported> {
        self.pair(
            &s.principals,
            &s.not_principals,
            strs(false),
            Test::Principal,
        )?;
        self.unsupported("requestPrincipals (JWT)", &s.request_principals)?;
        self.unsupported("notRequestPrincipals (JWT)", &s.not_request_principals)?;
        self.pair(
            &s.namespaces,
            &s.not_namespaces,
            strs(false),
            Test::Namespace,
        )?;
        self.pair(
            &s.service_accounts,
            &s.not_service_accounts,
            service_accounts,
            Test::ServiceAccount,
        )?;
        self.pair(&s.ip_blocks, &s.not_ip_blocks, nets, Test::SourceIp)?;
        // A sidecar trusts no proxy in front of it, so the original client is the peer.
        self.pair(
            &s.remote_ip_blocks,
            &s.not_remote_ip_blocks,
            nets,
            Test::SourceIp,
        )
    }

    fn operation(&mut self, op: &Operation) -> Result<(), Unsupported> {
        self.pair(&op.hosts, &op.not_hosts, strs(true), Test::Host)?;
        self.pair(&op.ports, &op.not_ports, ports, Test::DestinationPort)?;
        self.pair(&op.methods, &op.not_methods, strs(false), Test::Method)?;
        self.pair(&op.paths, &op.not_paths, paths, Test::Path)
    }

    fn condition(&mut self, c: &Condition) -> Result<(), Unsupported> {
        let (values, not) = (&c.values, &c.not_values);
        match c.key.as_str() {
            "source.principal" => self.pair(values, not, strs(false), Test::Principal),
            "source.namespace" => self.pair(values, not, strs(false), Test::Namespace),
            "source.ip" | "remote.ip" => self.pair(values, not, nets, Test::SourceIp),
            "destination.ip" => self.pair(values, not, nets, Test::DestinationIp),
            "destination.port" => self.pair(values, not, ports, Test::DestinationPort),
            key => match header_key(key) {
                Some(name) => self.pair(values, not, strs(false), |list| {
                    Test::Header(name.clone(), list)
                }),
                None => {
                    let mut all = values.clone();
                    all.extend(not.iter().cloned());
                    self.unsupported(&format!("condition key `{key}`"), &all)
                }
            },
        }
    }
}

/// `request.headers[x-token]` → `x-token`.
pub(crate) fn header_key(key: &str) -> Option<HeaderName> {
    let name = key.strip_prefix("request.headers[")?.strip_suffix(']')?;
    HeaderName::from_bytes(name.as_bytes()).ok()
}

fn strs(lowercase: bool) -> impl Fn(&[String]) -> Result<Box<[StrMatch]>, Unsupported> {
    move |list| Ok(list.iter().map(|s| StrMatch::new(s, lowercase)).collect())
}

fn paths(list: &[String]) -> Result<Box<[PathMatch]>, Unsupported> {
    Ok(list.iter().map(|s| PathMatch::new(s)).collect())
}

fn nets(list: &[String]) -> Result<Box<[IpNet]>, Unsupported> {
    list.iter()
        .map(|s| parse_ip_net(s).ok_or_else(|| Unsupported(format!("`{s}` is not an IP or CIDR"))))
        .collect()
}

fn ports(list: &[String]) -> Result<Box<[u16]>, Unsupported> {
    list.iter()
        .map(|s| {
            s.parse::<u16>()
                .map_err(|_| Unsupported(format!("`{s}` is not a port")))
        })
        .collect()
}

fn service_accounts(list: &[String]) -> Result<Box<[Account]>, Unsupported> {
    list.iter()
        .map(|s| match s.split_once('/') {
            Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                Ok((ns.into(), sa.into()))
            }
            _ => Err(Unsupported(format!(
                "service account `{s}` is not `<namespace>/<name>`"
            ))),
        })
        .collect()
}
