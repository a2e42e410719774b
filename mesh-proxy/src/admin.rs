//! The admin server (Istio's port 15000, loopback by default).
//!
//! - `GET /ready`: 200 once the config is loaded and every listener is bound; 503 before that
//!   and while draining (so an orchestrator stops sending traffic first).
//! - `GET /live`: 200 while the process runs.
//! - `GET /config_dump`: the effective configuration as JSON.
//! - `GET /clusters`: every balanced service (and subset) with its endpoints, named
//!   `address:port`, and their live figures (weight, in-flight, EWMA latency, health).
//!
//! Reads are GET (or HEAD); anything else answers 405, as Envoy refuses mutations by GET.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use mesh_core::body::{self, BoxBody};
use tower::util::BoxCloneSyncService;

use crate::proxy::Shared;
use crate::server::HttpService;

/// The admin service over the proxy's shared state.
pub fn service(shared: Arc<Shared>) -> HttpService {
    BoxCloneSyncService::new(tower::service_fn(move |req: Request<BoxBody>| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(&shared, &req)) }
    }))
}

fn handle(shared: &Shared, req: &Request<BoxBody>) -> Response<BoxBody> {
    let path = req.uri().path();
    let known = matches!(path, "/ready" | "/live" | "/config_dump" | "/clusters");
    if !known {
        return text(
            StatusCode::NOT_FOUND,
            "unknown admin path; try /ready, /live, /config_dump, /clusters\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match path {
        "/ready" if shared.is_ready() => text(StatusCode::OK, "LIVE\n"),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "NOT READY\n"),
        "/live" => text(StatusCode::OK, "LIVE\n"),
        "/clusters" => json(&shared.clusters()),
        _ => json(&shared.config().to_json()),
    }
}

fn json(value: &impl serde::Serialize) -> Response<BoxBody> {
    match serde_json::to_vec_pretty(value) {
        Ok(json) => {
            let mut r = Response::new(body::full(json));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot render JSON: {e}\n"),
        ),
    }
}

fn text(status: StatusCode, msg: &str) -> Response<BoxBody> {
    let mut r = Response::new(body::full(msg.to_owned()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
