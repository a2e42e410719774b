//! The four Bookinfo services as small hyper 1 servers: [`productpage`] (the HTML page, which
//! calls `details` and `reviews`), [`details`], [`reviews`] (v1 without stars, v2 black stars,
//! v3 red stars; v2 and v3 call `ratings`) and [`ratings`].
//!
//! Each app calls the others the way an app behind a sidecar does: plain HTTP to its own
//! sidecar's outbound listener, naming the service in the `Host` header (`reviews:9080`). As
//! Istio's Bookinfo, every app forwards the tracing headers it received ([`FORWARDED_HEADERS`])
//! and the user as `end-user`, so the sidecars' traces join up and `end-user` routing works
//! at every hop.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use examples::bookinfo::apps::{App, serve};
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! let task = tokio::spawn(serve(listener, App::Details));
//! // GET http://{addr}/details/0 answers Bookinfo's details JSON.
//! # let _ = (addr, task); Ok(()) }
//! ```

pub mod details;
pub mod productpage;
pub mod ratings;
pub mod reviews;

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use mesh_core::body::{self, BoxBody};
use tokio::net::TcpListener;

/// The port every Bookinfo service has in the mesh (Istio's Kubernetes Services use 9080).
pub const SERVICE_PORT: u16 = 9080;

/// The headers Bookinfo's apps copy from the request they serve onto the requests they make:
/// the request id and every tracing format Istio's sample propagates, the user agent, and the
/// user (`end-user`, which routing rules match on).
pub const FORWARDED_HEADERS: &[&str] = &[
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
    "x-ot-span-context",
    "x-datadog-trace-id",
    "x-datadog-parent-id",
    "x-datadog-sampling-priority",
    "x-cloud-trace-context",
    "grpc-trace-bin",
    "sw8",
    "user-agent",
    "end-user",
];

/// One Bookinfo app and what it needs to run.
#[derive(Clone, Debug)]
pub enum App {
    Productpage(productpage::Settings),
    Details,
    Reviews(reviews::Settings),
    Ratings,
}

impl App {
    /// The workload name, e.g. `reviews-v2`.
    pub fn workload(&self) -> String {
        match self {
            App::Productpage(_) => "productpage-v1".into(),
            App::Details => "details-v1".into(),
            App::Reviews(s) => format!("reviews-{}", s.version),
            App::Ratings => "ratings-v1".into(),
        }
    }
}

/// Serves `app` on `listener` until the task is dropped or aborted.
pub async fn serve(listener: TcpListener, app: App) {
    let state = Arc::new(State {
        app,
        client: Downstream::new(),
    });
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        let svc = hyper::service::service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(state.handle(req).await) }
        });
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

struct State {
    app: App,
    client: Downstream,
}

impl State {
    async fn handle(&self, req: Request<Incoming>) -> Response<BoxBody> {
        match &self.app {
            App::Productpage(settings) => productpage::handle(settings, &self.client, req).await,
            App::Details => details::handle(&req),
            App::Reviews(settings) => reviews::handle(settings, &self.client, &req).await,
            App::Ratings => ratings::handle(&req),
        }
    }
}

/// The headers of `incoming` that Bookinfo forwards downstream.
pub fn forwarded_headers(incoming: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in FORWARDED_HEADERS {
        for value in incoming.get_all(*name) {
            out.append(HeaderName::from_static(name), value.clone());
        }
    }
    out
}

/// Why a call to another Bookinfo service failed.
#[derive(Debug)]
pub enum CallError {
    /// No complete answer within the client timeout.
    Timeout { service: String, after: Duration },
    /// The sidecar's outbound listener could not be reached or the exchange broke.
    Transport { service: String, error: String },
    /// An answer other than 200.
    Status {
        service: String,
        status: StatusCode,
        flags: Option<String>,
    },
    /// A 200 whose body is not the JSON the service sends.
    Body { service: String, error: String },
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Timeout { service, after } => {
                write!(f, "{service} did not answer within {after:?}")
            }
            CallError::Transport { service, error } => write!(f, "calling {service}: {error}"),
            CallError::Status {
                service,
                status,
                flags,
            } => {
                write!(f, "{service} answered {status}")?;
                if let Some(flags) = flags {
                    write!(f, " (response flags {flags})")?;
                }
                Ok(())
            }
            CallError::Body { service, error } => {
                write!(f, "{service} sent an unreadable answer: {error}")
            }
        }
    }
}

impl std::error::Error for CallError {}

/// A plain HTTP/1.1 client to this app's sidecar, as a Bookinfo app uses.
#[derive(Clone, Debug)]
pub struct Downstream {
    client: Client<HttpConnector, BoxBody>,
}

impl Default for Downstream {
    fn default() -> Self {
        Downstream::new()
    }
}

impl Downstream {
    pub fn new() -> Downstream {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http();
        Downstream { client }
    }

    /// `GET http://{via}{path}` with `Host: {service}:9080` and `headers`, answered with 200
    /// and a JSON body within `timeout`.
    pub async fn get_json(
        &self,
        via: SocketAddr,
        service: &str,
        path: &str,
        headers: &HeaderMap,
        timeout: Duration,
    ) -> Result<serde_json::Value, CallError> {
        let call = async {
            let mut req = Request::get(format!("http://{via}{path}"))
                .body(body::empty())
                .map_err(|e| CallError::Transport {
                    service: service.to_owned(),
                    error: e.to_string(),
                })?;
            *req.headers_mut() = headers.clone();
            let host =
                HeaderValue::from_str(&format!("{service}:{SERVICE_PORT}")).map_err(|e| {
                    CallError::Transport {
                        service: service.to_owned(),
                        error: e.to_string(),
                    }
                })?;
            req.headers_mut().insert(HOST, host);
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| CallError::Transport {
                    service: service.to_owned(),
                    error: format!("{e} (via the sidecar at {via})"),
                })?;
            let status = resp.status();
            let flags = resp
                .headers()
                .get("x-mesh-response-flags")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| CallError::Transport {
                    service: service.to_owned(),
                    error: e.to_string(),
                })?
                .to_bytes();
            if status != StatusCode::OK {
                return Err(CallError::Status {
                    service: service.to_owned(),
                    status,
                    flags,
                });
            }
            serde_json::from_slice(&bytes).map_err(|e| CallError::Body {
                service: service.to_owned(),
                error: e.to_string(),
            })
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(CallError::Timeout {
                service: service.to_owned(),
                after: timeout,
            }),
        }
    }
}

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<BoxBody> {
    respond(status, "application/json", value.to_string())
}

/// A response with a content type.
pub fn respond(status: StatusCode, content_type: &str, text: String) -> Response<BoxBody> {
    let mut resp = Response::new(body::full(text));
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(CONTENT_TYPE, v);
    }
    resp
}

/// `404` with Bookinfo's plain answer.
pub fn not_found(path: &str) -> Response<BoxBody> {
    respond(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        format!("404 page not found: {path}\n"),
    )
}

/// The product id of a `/{prefix}/{id}` path, e.g. `/reviews/0` with prefix `/reviews/`.
pub fn product_id(path: &str, prefix: &str) -> Option<u32> {
    path.strip_prefix(prefix)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_tracing_headers_and_end_user_only() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        h.insert("x-b3-traceid", HeaderValue::from_static("80f198ee56343ba8"));
        h.insert("end-user", HeaderValue::from_static("jason"));
        h.insert("cookie", HeaderValue::from_static("user=jason"));
        h.insert("content-length", HeaderValue::from_static("0"));
        let out = forwarded_headers(&h);
        assert_eq!(out.len(), 4);
        assert_eq!(out["end-user"], "jason");
        assert!(out.get("cookie").is_none());
        assert!(out.get("content-length").is_none());
    }

    #[test]
    fn product_ids() {
        assert_eq!(product_id("/reviews/0", "/reviews/"), Some(0));
        assert_eq!(product_id("/reviews/12", "/reviews/"), Some(12));
        assert_eq!(product_id("/reviews/x", "/reviews/"), None);
        assert_eq!(product_id("/ratings/1", "/reviews/"), None);
    }
}

/// The apps wired together in-process through a stand-in for their sidecars: a plain HTTP
/// router that dispatches by `Host`, records what each service was sent, and can stall one.
#[cfg(test)]
mod wiring_tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::productpage::{REVIEWS_ERROR, reviews_version};
    use super::reviews::Version;
    use super::*;

    type Seen = Arc<Mutex<Vec<(String, HeaderMap)>>>;

    async fn start(app: App) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, app));
        addr
    }

    /// Serves a fake outbound listener on `listener`: `Host: svc:9080` goes to `routes[svc]`,
    /// after `stall` when it names that service.
    fn fake_outbound(
        listener: TcpListener,
        routes: HashMap<&'static str, SocketAddr>,
        stall: Option<(&'static str, Duration)>,
        seen: Seen,
    ) {
        let routes = Arc::new(routes);
        let client: Client<HttpConnector, BoxBody> =
            Client::builder(TokioExecutor::new()).build_http();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (routes, client, seen) = (routes.clone(), client.clone(), seen.clone());
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (routes, client, seen) = (routes.clone(), client.clone(), seen.clone());
                    async move {
                        let host = req.headers()[HOST].to_str().unwrap().to_owned();
                        let service = host.split(':').next().unwrap().to_owned();
                        seen.lock()
                            .unwrap()
                            .push((host.clone(), req.headers().clone()));
                        if let Some((slow, delay)) = stall
                            && slow == service
                        {
                            tokio::time::sleep(delay).await;
                        }
                        let target = routes[service.as_str()];
                        let (parts, _) = req.into_parts();
                        let mut fwd = Request::get(format!("http://{target}{}", parts.uri.path()))
                            .body(body::empty())
                            .unwrap();
                        *fwd.headers_mut() = parts.headers;
                        let resp = client.request(fwd).await.unwrap();
                        Ok::<_, Infallible>(resp.map(body::boxed))
                    }
                });
                tokio::spawn(async move {
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    }

    /// Bookinfo with reviews v2 behind a fake outbound; returns productpage's address.
    async fn bookinfo(
        stall: Option<(&'static str, Duration)>,
        reviews_timeout: Duration,
        seen: Seen,
    ) -> SocketAddr {
        let outbound = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let via = outbound.local_addr().unwrap();
        let routes = HashMap::from([
            ("details", start(App::Details).await),
            ("ratings", start(App::Ratings).await),
            (
                "reviews",
                start(App::Reviews(reviews::Settings {
                    version: Version::V2,
                    outbound: Some(via),
                }))
                .await,
            ),
        ]);
        fake_outbound(outbound, routes, stall, seen);
        start(App::Productpage(productpage::Settings {
            reviews_timeout,
            ..productpage::Settings::new(via)
        }))
        .await
    }

    async fn page(productpage: SocketAddr, headers: &[(&str, &str)]) -> (String, Duration) {
        let client: Client<HttpConnector, BoxBody> =
            Client::builder(TokioExecutor::new()).build_http();
        let mut req = Request::get(format!("http://{productpage}/productpage"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let started = std::time::Instant::now();
        let resp = client
            .request(req.body(body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            String::from_utf8_lossy(&bytes).into_owned(),
            started.elapsed(),
        )
    }

    #[tokio::test]
    async fn user_and_tracing_headers_reach_every_hop() {
        let seen = Seen::default();
        let productpage = bookinfo(None, Duration::from_secs(3), seen.clone()).await;
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let (html, _) = page(
            productpage,
            &[
                ("cookie", "user=jason"),
                ("x-request-id", "req-1"),
                ("traceparent", traceparent),
                ("x-b3-traceid", "80f198ee56343ba8"),
            ],
        )
        .await;
        assert_eq!(reviews_version(&html), Some("v2"));
        assert_eq!(html.matches("data-color=\"black\"").count(), 2);
        let seen = seen.lock().unwrap();
        let hosts: Vec<&str> = seen.iter().map(|(h, _)| h.as_str()).collect();
        for host in ["details:9080", "reviews:9080", "ratings:9080"] {
            assert!(hosts.contains(&host), "{hosts:?}");
        }
        for (host, headers) in seen.iter() {
            assert_eq!(headers["end-user"], "jason", "{host}");
            assert_eq!(headers["x-request-id"], "req-1", "{host}");
            assert_eq!(headers["traceparent"], traceparent, "{host}");
            assert_eq!(headers["x-b3-traceid"], "80f198ee56343ba8", "{host}");
            assert!(headers.get("cookie").is_none(), "{host}");
        }
    }

    #[tokio::test]
    async fn slow_reviews_time_out_twice_and_the_page_still_renders() {
        let seen = Seen::default();
        let timeout = Duration::from_millis(300);
        let productpage = bookinfo(
            Some(("reviews", Duration::from_secs(5))),
            timeout,
            seen.clone(),
        )
        .await;
        let (html, took) = page(productpage, &[]).await;
        assert!(html.contains(REVIEWS_ERROR), "{html}");
        assert!(
            html.contains("reviews did not answer within 300ms"),
            "{html}"
        );
        assert!(html.contains("<dt>ISBN-10:</dt>"), "details still shown");
        assert_eq!(reviews_version(&html), None);
        assert!(
            took >= timeout * 2 && took < Duration::from_secs(3),
            "{took:?}"
        );
        let attempts = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(h, _)| h == "reviews:9080")
            .count();
        assert_eq!(attempts, 2, "Bookinfo tries reviews twice");
    }

    #[tokio::test]
    async fn slow_ratings_show_in_the_reviews() {
        // Reviews v2 waits 10 s for ratings; a productpage timeout shorter than the stall
        // still fails, a longer one shows stars.
        let seen = Seen::default();
        let productpage = bookinfo(
            Some(("ratings", Duration::from_millis(200))),
            Duration::from_secs(3),
            seen,
        )
        .await;
        let (html, took) = page(productpage, &[]).await;
        assert_eq!(reviews_version(&html), Some("v2"));
        assert!(took >= Duration::from_millis(200));
        assert_eq!(html.matches("data-stars=").count(), 2);
    }
}
