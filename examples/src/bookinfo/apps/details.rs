//! Bookinfo's `details` service: the book's facts as JSON at `GET /details/{id}`.

use http::{Request, Response, StatusCode};
use mesh_core::body::BoxBody;
use serde_json::json;

use super::{json, not_found, product_id};

/// What Bookinfo's details v1 answers for product `id`.
pub fn book_details(id: u32) -> serde_json::Value {
    json!({
        "id": id,
        "author": "William Shakespeare",
        "year": 1595,
        "type": "paperback",
        "pages": 200,
        "publisher": "PublisherA",
        "language": "English",
        "ISBN-10": "1234567890",
        "ISBN-13": "123-1234567890",
    })
}

pub(super) fn handle<B>(req: &Request<B>) -> Response<BoxBody> {
    let path = req.uri().path();
    if path == "/health" {
        return json(StatusCode::OK, &json!({ "status": "Details is healthy" }));
    }
    match product_id(path, "/details/") {
        Some(id) => json(StatusCode::OK, &book_details(id)),
        None if path.starts_with("/details/") => json(
            StatusCode::BAD_REQUEST,
            &json!({ "error": "please provide numeric product id" }),
        ),
        None => not_found(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_of_a_product() {
        let req = Request::get("/details/0").body(()).unwrap();
        let resp = handle(&req);
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(book_details(0)["author"], "William Shakespeare");
        let bad = Request::get("/details/x").body(()).unwrap();
        assert_eq!(handle(&bad).status(), StatusCode::BAD_REQUEST);
        let other = Request::get("/nope").body(()).unwrap();
        assert_eq!(handle(&other).status(), StatusCode::NOT_FOUND);
    }
}
