//! [`RouteLayer`]: applies the current [`RouteTable`] to each request.
//!
//! ```
//! use std::sync::Arc;
//!
//! use arc_swap::ArcSwap;
//! use http::{Request, Response};
//! use mesh_core::body::{self, BoxBody, BoxError};
//! use mesh_core::config::{Source, load_sources};
//! use mesh_core::{ProxyError, ResponseFlags};
//! use mesh_routing::{RouteLayer, RouteTable, SourceContext};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), BoxError> {
//! let table = |yaml: &str| -> Result<RouteTable, BoxError> {
//!     let config = load_sources(&[Source::new("mesh.yaml", yaml)])?;
//!     Ok(RouteTable::build(&config, &SourceContext::from_config(&config)))
//! };
//! let entry = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: { name: api }\nspec: { hosts: [api], ports: [{ number: 80, name: http }] }\n";
//! let tables = Arc::new(ArcSwap::from_pointee(table(entry)?));
//! let app = service_fn(|_: Request<BoxBody>| async { Ok::<_, BoxError>(Response::new(body::empty())) });
//! let routed = RouteLayer::new(tables.clone()).layer(app);
//!
//! let req = || Request::get("/").header("host", "api").body(body::empty()).expect("request");
//! assert!(routed.clone().oneshot(req()).await.is_ok());
//!
//! // A new table applies to the next request: here `api` is no longer known (404 NR).
//! tables.store(Arc::new(table(&entry.replace("hosts: [api]", "hosts: [web]"))?));
//! let error = routed.clone().oneshot(req()).await.expect_err("no route");
//! let error = ProxyError::find(&error).expect("a ProxyError");
//! assert_eq!(error.flags(), ResponseFlags::NO_ROUTE_FOUND);
//! # Ok(()) }
//! ```
//!
//! The table is read through an `ArcSwap`, without a lock: swapping in a rebuilt table
//! applies to the next request, while a request already routed keeps the `Arc` of its route
//! and finishes on it. Per request: find the virtual host and route (404 `NR` errors when
//! there is none), then run the route (see `route.rs` for the order of its steps).
//!
//! Outputs for the layers below: the chosen destination's [`RouteTarget`] as a request
//! extension (service port, subset, merged traffic policy, timeout, retry policy). On the
//! response: the [`ResponseFlags`] the route caused (DI), merged into the response's
//! extensions. Failures are `Err(BoxError)` holding a [`ProxyError`]: 404 `NR` (no route),
//! 503 `NC` (the destination's service or subset does not exist). Local answers the route
//! itself gives — CORS preflights, fault aborts (with `x-mesh-response-flags: FI`),
//! redirects, direct responses — are `Ok` responses.
//!
//! [`RouteTarget`]: mesh_core::target::RouteTarget
//! [`ResponseFlags`]: mesh_core::ResponseFlags
//! [`ProxyError`]: mesh_core::ProxyError

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::{Request, Response};
use mesh_core::ResponseFlags;
use mesh_core::body::{BoxBody, BoxError};
use pin_project_lite::pin_project;
use tower::Service;

use crate::cors::CorsDecision;
use crate::route::{Ctx, Finish, Step};
use crate::table::RouteTable;

/// Routes requests by the current [`RouteTable`], read lock-free on each request (a swapped
/// table applies to the next request; one in flight finishes on the route it matched).
///
/// Per request: the virtual host and first matching route (else `Err` with a
/// [`ProxyError`](mesh_core::ProxyError), 404 `NR`); then CORS (a preflight is answered),
/// fault delay (flag DI in the response's extensions), fault abort (a local reply flagged
/// FI), redirect, direct response, or forwarding: a weighted destination (503 `NC` when its
/// service or subset does not exist), path and authority rewrites, request header
/// operations, the destination's [`RouteTarget`](mesh_core::target::RouteTarget) inserted
/// in the request's extensions, mirrors fired; on the response, header operations and CORS
/// headers.
#[derive(Clone, Debug)]
pub struct RouteLayer {
    table: Arc<ArcSwap<RouteTable>>,
}

impl RouteLayer {
    /// Reads the table through `table`, so a swapped table applies to the next request.
    pub fn new(table: Arc<ArcSwap<RouteTable>>) -> RouteLayer {
        RouteLayer { table }
    }
}

impl<S> tower::Layer<S> for RouteLayer {
    type Service = Route<S>;
    fn layer(&self, inner: S) -> Route<S> {
        Route {
            table: self.table.clone(),
            inner,
        }
    }
}

/// The service made by [`RouteLayer`].
#[derive(Clone, Debug)]
pub struct Route<S> {
    table: Arc<ArcSwap<RouteTable>>,
    inner: S,
}

impl<S> Service<Request<BoxBody>> for Route<S>
where
    S: Service<Request<BoxBody>, Response = Response<BoxBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<BoxBody>) -> Self::Future {
        // The guard is dropped at the end of this statement: the request holds its route's
        // `Arc`, not the table.
        let selection = self.table.load().select(&req);
        let selection = match selection {
            Ok(selection) => selection,
            Err(e) => return ResponseFuture::ready(Err(e.into())),
        };
        let route = selection.route;
        let origin = match route
            .cors
            .as_ref()
            .map(|c| c.decide(req.method(), req.headers()))
        {
            Some(CorsDecision::Preflight(reply)) => return ResponseFuture::ready(Ok(reply)),
            Some(CorsDecision::Actual(origin)) => Some(origin),
            Some(CorsDecision::None) | None => None,
        };
        let delay = route.fault.as_ref().and_then(|f| f.sample_delay());
        let mut ctx = Ctx {
            route,
            block: selection.block,
            origin,
            flags: ResponseFlags::EMPTY,
        };
        if let Some(delay) = delay {
            ctx.flags = ResponseFlags::DELAY_INJECTED;
            // Take the service that was polled ready; leave a clone for the next call.
            let clone = self.inner.clone();
            let inner = std::mem::replace(&mut self.inner, clone);
            return ResponseFuture::delayed(delay, ctx, req, inner);
        }
        match ctx.proceed(req, &self.inner) {
            Step::Reply(reply) => ResponseFuture::ready(Ok(reply)),
            Step::Fail(e) => ResponseFuture::ready(Err(e.into())),
            Step::Forward(req, finish) => ResponseFuture {
                state: State::Inner {
                    future: self.inner.call(req),
                    finish: Some(finish),
                },
            },
        }
    }
}

/// What the route layer needs of the service it wraps: `Route<S>`'s bounds, named once
/// for the crate's helpers (the public impl spells them out).
pub(crate) trait InnerService:
    Service<
        Request<BoxBody>,
        Response = Response<BoxBody>,
        Error = BoxError,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> InnerService for S where
    S: Service<
            Request<BoxBody>,
            Response = Response<BoxBody>,
            Error = BoxError,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// A boxed response future. Async blocks that await the inner service hold its future
/// boxed through a plain function ([`boxed_call`]) rather than by name: naming
/// `S::Future` inside an async block that must be `Send` trips rustc's inference of
/// higher-ranked lifetimes ("implementation of `Send` is not general enough").
pub(crate) type BoxFuture =
    Pin<Box<dyn Future<Output = Result<Response<BoxBody>, BoxError>> + Send>>;

fn boxed_call<S: InnerService>(inner: &mut S, req: Request<BoxBody>) -> BoxFuture {
    Box::pin(inner.call(req))
}

pin_project! {
    /// Future of [`Route`]. Pin-projected on the common paths (an immediate answer, or the
    /// inner service's future plus what to add to its response). A fault-injected delay is
    /// a boxed `async` block instead: sleeping, then deciding, then maybe calling the inner
    /// service reads far more clearly as sequential code, and the box is paid only by
    /// requests that are being delayed on purpose.
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Ready { result: Option<Result<Response<BoxBody>, BoxError>> },
        Inner { #[pin] future: F, finish: Option<Finish> },
        Delayed { future: BoxFuture },
    }
}

impl<F> ResponseFuture<F> {
    fn ready(result: Result<Response<BoxBody>, BoxError>) -> Self {
        ResponseFuture {
            state: State::Ready {
                result: Some(result),
            },
        }
    }

    fn delayed<S>(delay: std::time::Duration, ctx: Ctx, req: Request<BoxBody>, mut inner: S) -> Self
    where
        S: InnerService,
    {
        let future = async move {
            tokio::time::sleep(delay).await;
            match ctx.proceed(req, &inner) {
                Step::Reply(reply) => Ok(reply),
                Step::Fail(e) => Err(e.into()),
                Step::Forward(req, finish) => {
                    // Boxed by a plain function: see `BoxFuture`.
                    let mut response = boxed_call(&mut inner, req).await?;
                    finish.apply(&mut response);
                    Ok(response)
                }
            }
        };
        ResponseFuture {
            state: State::Delayed {
                future: Box::pin(future),
            },
        }
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<BoxBody>, BoxError>>,
{
    type Output = Result<Response<BoxBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Ready { result } => Poll::Ready(
                result
                    .take()
                    .unwrap_or_else(|| Err("ResponseFuture polled after completion".into())),
            ),
            StateProj::Inner { future, finish } => {
                let mut response = std::task::ready!(future.poll(cx))?;
                if let Some(finish) = finish.take() {
                    finish.apply(&mut response);
                }
                Poll::Ready(Ok(response))
            }
            StateProj::Delayed { future } => future.as_mut().poll(cx),
        }
    }
}
