//! `directResponse`: answer with a fixed status and body, without calling any service.
//!
//! As Envoy's `direct_response`: a non-empty body is sent as `text/plain`, and no response
//! flag is set (the reply is the route's intended answer, not a proxy failure). The body is
//! one `Bytes` built at load; each response shares it.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use mesh_core::body::{self, BoxBody};
use mesh_core::config::networking::HttpDirectResponse;

#[derive(Clone, Debug)]
pub(crate) struct DirectResponse {
    status: StatusCode,
    body: Bytes,
}

impl DirectResponse {
    pub(crate) fn compile(d: &HttpDirectResponse) -> DirectResponse {
        DirectResponse {
            // Validation keeps the status in 200..=599.
            status: StatusCode::from_u16(d.status).unwrap_or(StatusCode::OK),
            body: d
                .body
                .as_ref()
                .map_or_else(Bytes::new, |b| Bytes::copy_from_slice(b.as_bytes())),
        }
    }

    pub(crate) fn response(&self) -> Response<BoxBody> {
        let mut response = Response::new(if self.body.is_empty() {
            body::empty()
        } else {
            body::full(self.body.clone())
        });
        *response.status_mut() = self.status;
        if !self.body.is_empty() {
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn status_and_body() {
        let spec: HttpDirectResponse =
            serde_json::from_str(r#"{"status": 418, "body": {"string": "I'm a teapot"}}"#)
                .expect("spec");
        let resp = DirectResponse::compile(&spec).response();
        assert_eq!(resp.status().as_u16(), 418);
        assert_eq!(resp.headers()[CONTENT_TYPE], "text/plain");
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(bytes, "I'm a teapot");

        let spec: HttpDirectResponse = serde_json::from_str(r#"{"status": 204}"#).expect("spec");
        let resp = DirectResponse::compile(&spec).response();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert!(resp.headers().get(CONTENT_TYPE).is_none());
    }
}
