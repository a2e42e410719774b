//! Outlier detection: endpoints that keep failing are ejected from balancing for a while
//! (Istio's `trafficPolicy.outlierDetection`, Envoy's consecutive-error detectors).
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use mesh_core::body::{self, BoxBody, BoxError};
//! use mesh_core::config::networking::{OutlierDetection, TrafficPolicy};
//! use mesh_core::health::HealthRegistry;
//! use mesh_core::target::{RouteTarget, UpstreamTarget};
//! use mesh_resilience::outlier::OutlierDetectionLayer;
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! // An endpoint that always answers 500.
//! let failing = service_fn(|_req: http::Request<BoxBody>| async {
//!     let mut resp = http::Response::new(body::empty());
//!     *resp.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
//!     Ok::<_, BoxError>(resp)
//! });
//! let health = Arc::new(HealthRegistry::new());
//! let svc = OutlierDetectionLayer::new(health.clone()).layer(failing);
//!
//! // What routing and the balancer put into each request.
//! let policy = TrafficPolicy {
//!     outlier_detection: Some(OutlierDetection {
//!         consecutive_5xx_errors: Some(3),
//!         ..Default::default()
//!     }),
//!     ..Default::default()
//! };
//! # let target = mesh_resilience::doc_support::route_target("reviews:9080");
//! let target = RouteTarget { traffic_policy: Some(Arc::new(policy)), ..target };
//! let addr = "10.0.0.7:9080".parse().unwrap();
//! for _ in 0..3 {
//!     let mut req = http::Request::new(body::empty());
//!     req.extensions_mut().insert(target.clone());
//!     req.extensions_mut().insert(UpstreamTarget::new(addr, false, target.name.clone()));
//!     svc.clone().oneshot(req).await.unwrap();
//! }
//! // Ejected on the third 500, for `baseEjectionTime` (30 s by default).
//! let now = tokio::time::Instant::now();
//! assert!(health.endpoint(addr).is_ejected(now.into_std()));
//! tokio::time::advance(Duration::from_secs(30)).await;
//! assert!(!health.endpoint(addr).is_ejected(tokio::time::Instant::now().into_std()));
//! # }
//! ```
//!
//! # Where it sits
//!
//! ```text
//! Retry → Balance → OutlierDetection → RecordEndpoint → Upstream
//!           ▲ skips ejected     │ counts, ejects
//!           └──── HealthRegistry (mesh_core::health) ◄┘
//! ```
//!
//! Right below the balancer, so it sees every attempt with the endpoint the balancer chose
//! ([`UpstreamTarget`]) and the route's traffic policy ([`RouteTarget`]), and the typed
//! [`ProxyError`] of the upstream client rather than a local reply. It writes the shared
//! [`HealthRegistry`]; the balancer (`BalanceLayer::with_health` over the same registry) skips
//! what it ejects. A request without both extensions, or whose target has no
//! `outlierDetection`, passes untouched (Istio: outlier detection only runs when the block is
//! present).
//!
//! # Semantics (Istio's mapping onto Envoy)
//!
//! | setting | default | meaning here |
//! |---|---|---|
//! | `consecutive5xxErrors` | 5 (0: off) | 5xx responses and local-origin failures in a row |
//! | `consecutiveGatewayErrors` | off | 502, 503, 504 and local-origin failures in a row |
//! | `consecutiveErrors` (deprecated) | - | gateway errors, and turns `consecutive5xxErrors`' default off, as Istio does |
//! | `splitExternalLocalOriginErrors` | false | count local-origin failures apart |
//! | `consecutiveLocalOriginFailures` | 5 | local-origin failures in a row (only when split) |
//! | `interval` | 10 s | paces the decay of the ejection multiplier |
//! | `baseEjectionTime` | 30 s | ejection time = base × times ejected, at most 300 s |
//! | `maxEjectionPercent` | 10 | of the balanced set; one host is always ejectable |
//! | `minHealthPercent` | 0 (off) | read by the balancer: below it, balance over all |
//!
//! - **Local-origin failures** are the upstream client's errors: `UF` (connect failure),
//!   `UC`/`UR` (connection terminated, stream reset), `LR`, `UPE` and `UT`. Unsplit, Envoy
//!   turns them into 503/504 for its counters, so they count as 5xx and as gateway errors; split,
//!   they count only towards `consecutiveLocalOriginFailures`, and any response (the
//!   connection worked) resets that counter. Other errors (`UO`, `UH`, ...) say nothing about the
//!   endpoint and are ignored.
//! - **Counters follow Envoy**: a non-5xx response resets the 5xx and gateway counters; a 5xx
//!   that is not 502/503/504 resets the gateway counter. A counter that reaches its threshold
//!   is reset whether or not the ejection happens (the endpoint was already ejected, or
//!   `maxEjectionPercent` forbade it), so a further run of failures is needed to try again.
//! - **Inline ejection**: on the response or error that reaches a threshold, as Envoy ejects
//!   for consecutive errors. Responses are classified on their headers; a body that fails
//!   later is not counted.
//! - **Return**: an ejected endpoint comes back as soon as its ejection time has passed
//!   (checked when the balancer picks, no sweep task); see [`mesh_core::health`] for that, the
//!   decay of the multiplier per `interval` in service, and how `maxEjectionPercent` counts.
//! - **Per-request cost**: the settings are resolved from the target's `outlierDetection`
//!   (a few `Option`s, no allocation) and the endpoint's health found by address in the
//!   registry (a read lock and one hash lookup); the future holds three `Arc` clones.
//!
//! Not done: Envoy's success-rate and failure-percentage detectors (Istio does not expose
//! them), `outlierDetectionHttpErrorCodes`, and attempts cut short above this layer (a per-try
//! timeout drops the attempt rather than failing it, so it is not counted as `UT`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use mesh_core::body::BoxError;
use mesh_core::config::networking::OutlierDetection as OutlierConfig;
use mesh_core::health::{Counter, Ejection, EndpointHealth, HealthRegistry};
use mesh_core::target::{RouteTarget, UpstreamTarget};
use mesh_core::{ProxyError, ResponseFlags};
use pin_project_lite::pin_project;

/// Istio's `consecutive5xxErrors` default.
pub const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
/// Istio's `consecutiveLocalOriginFailures` default.
pub const DEFAULT_CONSECUTIVE_LOCAL_ORIGIN: u32 = 5;

/// An `outlierDetection` block with Istio's defaults applied. A threshold of 0 is off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierSettings {
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    /// Used only when `split_local_origin`.
    pub consecutive_local_origin: u32,
    /// `splitExternalLocalOriginErrors`.
    pub split_local_origin: bool,
    pub ejection: Ejection,
}

impl OutlierSettings {
    /// Applies Istio's defaults and its mapping of the deprecated `consecutiveErrors`.
    pub fn from_config(config: &OutlierConfig) -> Self {
        let deprecated = config.consecutive_errors.filter(|&n| n > 0);
        let defaults = Ejection::default();
        let duration = |d: Option<mesh_core::config::types::Duration>, default: Duration| {
            d.map_or(default, |d| d.get())
        };
        OutlierSettings {
            consecutive_5xx: config.consecutive_5xx_errors.unwrap_or(match deprecated {
                Some(_) => 0,
                None => DEFAULT_CONSECUTIVE_5XX,
            }),
            consecutive_gateway: config
                .consecutive_gateway_errors
                .or(deprecated)
                .unwrap_or(0),
            consecutive_local_origin: config
                .consecutive_local_origin_failures
                .unwrap_or(DEFAULT_CONSECUTIVE_LOCAL_ORIGIN),
            split_local_origin: config.split_external_local_origin_errors.unwrap_or(false),
            ejection: Ejection {
                interval: duration(config.interval, defaults.interval),
                base_ejection_time: duration(
                    config.base_ejection_time,
                    defaults.base_ejection_time,
                ),
                max_ejection_time: defaults.max_ejection_time,
                max_ejection_percent: config
                    .max_ejection_percent
                    .unwrap_or(defaults.max_ejection_percent),
            },
        }
    }

    /// Counts `outcome` on `health`; returns whether a threshold was reached (and resets the
    /// counters that reached theirs).
    fn record(&self, health: &EndpointHealth, outcome: Outcome) -> bool {
        let mut tripped = false;
        let mut count = |counter: Counter, threshold: u32| {
            if threshold > 0 && health.count(counter) >= threshold {
                health.reset(counter);
                tripped = true;
            }
        };
        match outcome {
            Outcome::Status(status) => {
                if self.split_local_origin {
                    health.reset(Counter::LocalOrigin);
                }
                if status >= 500 {
                    if matches!(status, 502..=504) {
                        count(Counter::Gateway, self.consecutive_gateway);
                    } else {
                        health.reset(Counter::Gateway);
                    }
                    count(Counter::FiveXx, self.consecutive_5xx);
                } else {
                    health.reset(Counter::FiveXx);
                    health.reset(Counter::Gateway);
                }
            }
            Outcome::LocalOrigin if self.split_local_origin => {
                count(Counter::LocalOrigin, self.consecutive_local_origin);
            }
            Outcome::LocalOrigin => {
                count(Counter::Gateway, self.consecutive_gateway);
                count(Counter::FiveXx, self.consecutive_5xx);
            }
            Outcome::Ignored => {}
        }
        tripped
    }
}

/// What one attempt says about its endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Status(u16),
    LocalOrigin,
    Ignored,
}

/// The upstream client's failures that are the endpoint's (or the network's) doing.
const LOCAL_ORIGIN: [ResponseFlags; 6] = [
    ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
    ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
    ResponseFlags::UPSTREAM_REMOTE_RESET,
    ResponseFlags::LOCAL_RESET,
    ResponseFlags::UPSTREAM_PROTOCOL_ERROR,
    ResponseFlags::UPSTREAM_REQUEST_TIMEOUT,
];

fn classify_error(error: &BoxError) -> Outcome {
    match ProxyError::find(error) {
        Some(e) if LOCAL_ORIGIN.iter().any(|&f| e.flags().contains(f)) => Outcome::LocalOrigin,
        _ => Outcome::Ignored,
    }
}

/// Counts each attempt's outcome against its endpoint and ejects outliers into a
/// [`HealthRegistry`]; see the module docs. Place it right below the balancer.
#[derive(Clone, Debug)]
pub struct OutlierDetectionLayer {
    health: Arc<HealthRegistry>,
}

impl OutlierDetectionLayer {
    /// A layer writing into `health`, the registry the balancer reads.
    pub fn new(health: Arc<HealthRegistry>) -> Self {
        OutlierDetectionLayer { health }
    }
}

impl<S> tower::Layer<S> for OutlierDetectionLayer {
    type Service = OutlierDetection<S>;
    fn layer(&self, inner: S) -> OutlierDetection<S> {
        OutlierDetection {
            health: self.health.clone(),
            inner,
        }
    }
}

/// The service made by [`OutlierDetectionLayer`].
#[derive(Clone, Debug)]
pub struct OutlierDetection<S> {
    health: Arc<HealthRegistry>,
    inner: S,
}

impl<S, B, RB> tower::Service<Request<B>> for OutlierDetection<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let ext = req.extensions();
        let watch = match (ext.get::<RouteTarget>(), ext.get::<UpstreamTarget>()) {
            (Some(route), Some(upstream)) => route
                .traffic_policy
                .as_deref()
                .and_then(|p| p.outlier_detection.as_ref())
                .map(|config| Watch {
                    settings: OutlierSettings::from_config(config),
                    endpoint: self.health.endpoint(upstream.addr),
                    registry: self.health.clone(),
                    cluster: route.name.clone(),
                }),
            _ => None,
        };
        ResponseFuture {
            inner: self.inner.call(req),
            watch,
        }
    }
}

/// One attempt under watch.
#[derive(Debug)]
struct Watch {
    settings: OutlierSettings,
    endpoint: Arc<EndpointHealth>,
    registry: Arc<HealthRegistry>,
    /// The balanced set the endpoint was picked from (the route target's name).
    cluster: Arc<str>,
}

impl Watch {
    fn observe(&self, outcome: Outcome) {
        if !self.settings.record(&self.endpoint, outcome) {
            return;
        }
        let now = tokio::time::Instant::now().into_std();
        let ejected =
            self.registry
                .try_eject(&self.endpoint, &self.cluster, &self.settings.ejection, now);
        if let Some(duration) = ejected {
            tracing::info!(
                cluster = %self.cluster,
                times = self.endpoint.times_ejected(),
                ?duration,
                "outlier detection ejected an endpoint"
            );
        }
    }
}

pin_project! {
    /// Future of [`OutlierDetection`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        watch: Option<Watch>,
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("watch", &self.watch)
            .finish_non_exhaustive()
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<RB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx)).map_err(Into::into);
        if let Some(watch) = this.watch.take() {
            watch.observe(match &result {
                Ok(resp) => Outcome::Status(resp.status().as_u16()),
                Err(e) => classify_error(e),
            });
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(config: OutlierConfig) -> OutlierSettings {
        OutlierSettings::from_config(&config)
    }

    #[test]
    fn istio_defaults_and_deprecated_consecutive_errors() {
        let s = settings(OutlierConfig::default());
        assert_eq!(s.consecutive_5xx, 5);
        assert_eq!(s.consecutive_gateway, 0);
        assert!(!s.split_local_origin);
        assert_eq!(s.ejection, Ejection::default());
        let s = settings(OutlierConfig {
            consecutive_errors: Some(7),
            ..Default::default()
        });
        assert_eq!((s.consecutive_5xx, s.consecutive_gateway), (0, 7));
    }

    #[test]
    fn gateway_errors_are_a_subset_of_5xx() {
        let s = settings(OutlierConfig {
            consecutive_5xx_errors: Some(0),
            consecutive_gateway_errors: Some(2),
            ..Default::default()
        });
        let h = EndpointHealth::default();
        // A 500 breaks a run of gateway errors; 5xx is off.
        assert!(!s.record(&h, Outcome::Status(502)));
        assert!(!s.record(&h, Outcome::Status(500)));
        assert!(!s.record(&h, Outcome::Status(503)));
        assert!(
            s.record(&h, Outcome::LocalOrigin),
            "UF counts as a gateway error"
        );
        // Reset on trip, and by a success.
        assert_eq!(h.consecutive(Counter::Gateway), 0);
        assert!(!s.record(&h, Outcome::Status(504)));
        assert!(!s.record(&h, Outcome::Status(200)));
        assert!(!s.record(&h, Outcome::Status(504)));
        assert!(!s.record(&h, Outcome::Ignored));
        assert!(s.record(&h, Outcome::Status(504)));
    }

    #[test]
    fn split_local_origin_counts_apart() {
        let s = settings(OutlierConfig {
            consecutive_5xx_errors: Some(2),
            split_external_local_origin_errors: Some(true),
            consecutive_local_origin_failures: Some(2),
            ..Default::default()
        });
        let h = EndpointHealth::default();
        assert!(!s.record(&h, Outcome::LocalOrigin));
        assert!(
            !s.record(&h, Outcome::Status(500)),
            "a response resets local origin"
        );
        assert!(!s.record(&h, Outcome::LocalOrigin));
        assert_eq!(
            h.consecutive(Counter::FiveXx),
            1,
            "UF is not a 5xx when split"
        );
        assert!(s.record(&h, Outcome::LocalOrigin));
    }

    #[test]
    fn errors_are_classified_by_flag() {
        let uf: BoxError = ProxyError::connect_failed("s", "a", "refused").into();
        assert_eq!(classify_error(&uf), Outcome::LocalOrigin);
        let ut: BoxError = ProxyError::new(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT, "t").into();
        assert_eq!(classify_error(&ut), Outcome::LocalOrigin);
        let uo: BoxError = ProxyError::new(ResponseFlags::UPSTREAM_OVERFLOW, "o").into();
        assert_eq!(classify_error(&uo), Outcome::Ignored);
        let other: BoxError = "something".into();
        assert_eq!(classify_error(&other), Outcome::Ignored);
    }
}
