//! Bookinfo's `ratings` service: each reviewer's stars as JSON at `GET /ratings/{id}`.

use http::{Request, Response, StatusCode};
use mesh_core::body::BoxBody;
use serde_json::json;

use super::{json, not_found, product_id};

/// What Bookinfo's ratings v1 answers for product `id`.
pub fn product_ratings(id: u32) -> serde_json::Value {
    json!({ "id": id, "ratings": { "Reviewer1": 5, "Reviewer2": 4 } })
}

pub(super) fn handle<B>(req: &Request<B>) -> Response<BoxBody> {
    let path = req.uri().path();
    if path == "/health" {
        return json(StatusCode::OK, &json!({ "status": "Ratings is healthy" }));
    }
    match product_id(path, "/ratings/") {
        Some(id) => json(StatusCode::OK, &product_ratings(id)),
        None if path.starts_with("/ratings/") => json(
            StatusCode::BAD_REQUEST,
            &json!({ "error": "please provide numeric product ID" }),
        ),
        None => not_found(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratings_of_a_product() {
        assert_eq!(product_ratings(0)["ratings"]["Reviewer1"], 5);
        let req = Request::get("/ratings/0").body(()).unwrap();
        assert_eq!(handle(&req).status(), StatusCode::OK);
        let bad = Request::get("/ratings/zero").body(()).unwrap();
        assert_eq!(handle(&bad).status(), StatusCode::BAD_REQUEST);
    }
}
