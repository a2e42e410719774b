//! One compiled HTTP route (an `HTTPRoute` for one virtual host port) and what it does to a
//! request once it matched.
//!
//! The order of operations is Istio's filter chain: CORS (a preflight is answered), fault
//! delay, fault abort, then the route's action — `redirect`, `directResponse`, or forwarding:
//! pick a destination by weight, rewrite the path and authority, apply request header
//! operations (route, then destination), hand the destination's [`RouteTarget`] to the
//! layers below as a request extension, and fire the mirrors. On the way back, response
//! header operations (route, then destination) and CORS headers are added, and the response
//! flags the route caused (DI) are merged into the response's extensions.

use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderValue;
use http::{Request, Response};
use mesh_core::body::BoxBody;
use mesh_core::config::networking::HttpRoute;
use mesh_core::stream_info::StreamInfo;
use mesh_core::{ProxyError, ResponseFlags};

use crate::authority::request_authority;
use crate::cors::Cors;
use crate::destination::{Destinations, Resolver, Target};
use crate::direct::DirectResponse;
use crate::fault::Fault;
use crate::fraction::Fraction;
use crate::headers::{AuthorityRewrite, HeaderRules};
use crate::layer::InnerService;
use crate::matcher::{MatchBlock, RequestView, RewriteBase};
use crate::mirror::{self, DEFAULT_MIRROR_TIMEOUT, Mirror};
use crate::redirect::Redirect;
use crate::rewrite::{self, UriRewrite};

/// A compiled HTTP route.
#[derive(Debug)]
pub(crate) struct RouteRule {
    pub name: Option<Box<str>>,
    /// OR-ed; never empty (a route without `match` has one catch-all block).
    pub blocks: Box<[MatchBlock]>,
    pub cors: Option<Cors>,
    pub fault: Option<Fault>,
    pub headers: HeaderRules,
    pub action: Action,
}

#[derive(Debug)]
pub(crate) enum Action {
    Forward(Forward),
    Redirect(Redirect),
    Direct(DirectResponse),
}

#[derive(Debug)]
pub(crate) struct Forward {
    pub destinations: Destinations,
    rewrite: Option<UriRewrite>,
    /// `rewrite.authority`, else the route's `headers` `host`; beats a destination's.
    authority: Option<AuthorityRewrite>,
    mirrors: Box<[Mirror]>,
    mirror_timeout: Duration,
}

impl RouteRule {
    /// Compiles `route` for a virtual host on `port`, with the match blocks that survived the
    /// table's pruning.
    pub(crate) fn compile(
        route: &HttpRoute,
        blocks: Vec<MatchBlock>,
        port: u16,
        resolver: &mut Resolver<'_>,
    ) -> RouteRule {
        let headers = HeaderRules::compile(route.headers.as_ref());
        let action = if let Some(redirect) = &route.redirect {
            Action::Redirect(Redirect::compile(redirect, port))
        } else if let Some(direct) = &route.direct_response {
            Action::Direct(DirectResponse::compile(direct))
        } else {
            Action::Forward(Forward::compile(route, &headers, port, resolver))
        };
        RouteRule {
            name: route.name.as_deref().map(Into::into),
            blocks: blocks.into_boxed_slice(),
            cors: route.cors_policy.as_ref().map(Cors::compile),
            fault: route.fault.as_ref().and_then(Fault::compile),
            headers,
            action,
        }
    }

    /// Istio's route for a service without a VirtualService: everything to the service.
    pub(crate) fn default_route(target: Target) -> RouteRule {
        RouteRule {
            name: Some("default".into()),
            blocks: Box::new([MatchBlock::catch_all()]),
            cors: None,
            fault: None,
            headers: HeaderRules::default(),
            action: Action::Forward(Forward {
                destinations: Destinations::new(vec![(target, 1, HeaderRules::default())]),
                rewrite: None,
                authority: None,
                mirrors: Box::new([]),
                mirror_timeout: DEFAULT_MIRROR_TIMEOUT,
            }),
        }
    }

    /// The index of the first block that matches.
    pub(crate) fn matching_block(&self, v: &RequestView<'_>) -> Option<usize> {
        self.blocks.iter().position(|b| b.matches(v))
    }
}

impl Forward {
    fn compile(
        route: &HttpRoute,
        headers: &HeaderRules,
        port: u16,
        resolver: &mut Resolver<'_>,
    ) -> Forward {
        let timeout = route.timeout.filter(|t| !t.is_zero()).map(|t| t.get());
        let retry = resolver.retry(crate::policy::retry_policy(route.retries.as_ref()));
        let destinations = Destinations::new(
            route
                .route
                .iter()
                .map(|d| {
                    let target = resolver.resolve(&d.destination, port, timeout, &retry);
                    (
                        target,
                        d.weight.unwrap_or(0),
                        HeaderRules::compile(d.headers.as_ref()),
                    )
                })
                .collect(),
        );
        let mirror_fraction = match (route.mirror_percentage, route.mirror_percent) {
            (Some(p), _) => Fraction::from_percent(p),
            (None, Some(p)) => Fraction::from_integer_percent(p),
            (None, None) => Fraction::ALWAYS,
        };
        let no_retry = resolver.no_retry();
        let mirrors = route
            .mirror
            .iter()
            .map(|d| (d, mirror_fraction))
            .chain(route.mirrors.iter().map(|m| {
                let fraction = m
                    .percentage
                    .map_or(Fraction::ALWAYS, Fraction::from_percent);
                (&m.destination, fraction)
            }))
            .filter(|(_, fraction)| !fraction.is_never())
            .filter_map(
                |(d, fraction)| match resolver.resolve(d, port, timeout, &no_retry) {
                    Target::Found(target) => Some(Mirror { target, fraction }),
                    Target::Missing(why) => {
                        tracing::warn!(route = ?route.name, "mirror left out: {why}");
                        None
                    }
                },
            )
            .collect();
        let rewrite = route.rewrite.as_ref();
        Forward {
            destinations,
            rewrite: rewrite.and_then(UriRewrite::compile),
            authority: rewrite
                .and_then(|r| r.authority.as_deref())
                .and_then(AuthorityRewrite::new)
                .or_else(|| headers.authority.clone()),
            mirrors,
            mirror_timeout: timeout.unwrap_or(DEFAULT_MIRROR_TIMEOUT),
        }
    }
}

/// The next thing to do with a request, once its route ran.
pub(crate) enum Step {
    /// Answered here (abort, redirect, direct response), finished.
    Reply(Response<BoxBody>),
    Fail(ProxyError),
    /// Call the inner service, then finish its response.
    Forward(Request<BoxBody>, Finish),
}

/// A request's state between matching and forwarding.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub route: Arc<RouteRule>,
    pub block: usize,
    /// The allowed CORS origin, for the response.
    pub origin: Option<HeaderValue>,
    /// Flags the route caused so far (DI).
    pub flags: ResponseFlags,
}

impl Ctx {
    /// Abort, redirect, direct response or forward, in that order.
    pub(crate) fn proceed<S>(self, mut req: Request<BoxBody>, inner: &S) -> Step
    where
        S: InnerService,
    {
        let route = self.route.clone();
        // The destination is picked before a fault is sampled, as Envoy picks the route's
        // cluster before its fault filter runs: an aborted request is still reported against
        // the service it was routed to (metrics, access log, span).
        let picked = match &route.action {
            Action::Forward(forward) => forward.destinations.pick(),
            _ => None,
        };
        if let Some((_, dest)) = picked
            && let Target::Found(target) = &dest.target
            && let Some(info) = req.extensions().get::<StreamInfo>()
        {
            info.set_route(target);
        }
        if let Some(reply) = route
            .fault
            .as_ref()
            .and_then(|f| f.sample_abort(self.flags))
        {
            let mut finish = self.finish(None, false);
            finish.flags |= ResponseFlags::FAULT_INJECTED;
            return Step::Reply(finish.applied(reply));
        }
        let forward = match &route.action {
            Action::Redirect(redirect) => {
                let reply = redirect.response(&RequestView::new(&req, request_authority(&req)));
                return Step::Reply(self.finish(None, true).applied(reply));
            }
            Action::Direct(direct) => {
                return Step::Reply(self.finish(None, true).applied(direct.response()));
            }
            Action::Forward(forward) => forward,
        };
        let Some((index, dest)) = picked else {
            return Step::Fail(ProxyError::new(
                ResponseFlags::NO_CLUSTER_FOUND,
                "no cluster: the route has no destination",
            ));
        };
        let target = match &dest.target {
            Target::Found(target) => target,
            Target::Missing(why) => {
                return Step::Fail(ProxyError::new(ResponseFlags::NO_CLUSTER_FOUND, why));
            }
        };
        if let Some(rewrite) = &forward.rewrite {
            let base = route
                .blocks
                .get(self.block)
                .map_or(RewriteBase::Prefix(1), |b| b.rewrite_base);
            let uri = req.uri();
            let path = uri.path();
            let path_and_query = uri.path_and_query().map_or(path, |pq| pq.as_str());
            if let Some(new) = rewrite.rewritten(base, path, path_and_query)
                && let Err(e) = rewrite::set_path(&mut req, new)
            {
                return Step::Fail(e);
            }
        }
        if let Some(authority) = forward
            .authority
            .as_ref()
            .or(dest.headers.authority.as_ref())
        {
            authority.apply(&mut req);
        }
        route.headers.request.apply(req.headers_mut());
        dest.headers.request.apply(req.headers_mut());
        if let Some(info) = req.extensions().get::<StreamInfo>() {
            info.set_route(target);
        }
        req.extensions_mut().insert(target.clone());
        mirror::fire(&forward.mirrors, &mut req, inner, forward.mirror_timeout);
        Step::Forward(req, self.finish(Some(index), true))
    }

    fn finish(self, destination: Option<usize>, response_ops: bool) -> Finish {
        Finish {
            route: self.route,
            destination,
            response_ops,
            origin: self.origin,
            flags: self.flags,
        }
    }
}

/// What happens to a response on its way back through the route.
#[derive(Debug)]
pub(crate) struct Finish {
    route: Arc<RouteRule>,
    destination: Option<usize>,
    /// Route-level response header operations apply (not to fault aborts, which Envoy
    /// answers before the router).
    response_ops: bool,
    origin: Option<HeaderValue>,
    flags: ResponseFlags,
}

impl Finish {
    pub(crate) fn apply(&self, response: &mut Response<BoxBody>) {
        if self.response_ops {
            self.route.headers.response.apply(response.headers_mut());
        }
        if let (Action::Forward(forward), Some(index)) = (&self.route.action, self.destination)
            && let Some(dest) = forward.destinations.get(index)
        {
            dest.headers.response.apply(response.headers_mut());
        }
        if let (Some(cors), Some(origin)) = (&self.route.cors, &self.origin) {
            cors.on_response(origin, response.headers_mut());
        }
        if !self.flags.is_empty() {
            let extensions = response.extensions_mut();
            match extensions.get_mut::<ResponseFlags>() {
                Some(flags) => flags.insert(self.flags),
                None => {
                    extensions.insert(self.flags);
                }
            }
        }
    }

    fn applied(self, mut response: Response<BoxBody>) -> Response<BoxBody> {
        self.apply(&mut response);
        response
    }
}
