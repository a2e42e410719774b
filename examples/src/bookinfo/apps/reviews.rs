//! Bookinfo's `reviews` service at `GET /reviews/{id}`, in its three versions: v1 shows no
//! ratings, v2 asks `ratings` and shows black stars, v3 red stars.
//!
//! As Bookinfo's Java service, v2 waits up to 10 s for ratings and v3 up to 2.5 s; when ratings
//! fails, each review carries `"rating": {"error": "Ratings service is currently unavailable"}`
//! instead of stars. The answer names its version (`"version": "v2"`, besides Bookinfo's
//! `podname`), so the product page can say which one served it.

use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use mesh_core::body::BoxBody;
use serde_json::json;

use super::{Downstream, forwarded_headers, json, not_found, product_id};

/// What ratings' failure looks like in a review, as Bookinfo says it.
pub const RATINGS_UNAVAILABLE: &str = "Ratings service is currently unavailable";

/// A version of reviews.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
    V3,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
            Version::V3 => "v3",
        }
    }

    /// The star colour, `None` for v1 (which shows no ratings).
    pub fn star_color(self) -> Option<&'static str> {
        match self {
            Version::V1 => None,
            Version::V2 => Some("black"),
            Version::V3 => Some("red"),
        }
    }

    /// How long this version waits for ratings (Bookinfo: 10 s for black stars, 2.5 s red).
    pub fn ratings_timeout(self) -> Duration {
        match self {
            Version::V3 => Duration::from_millis(2500),
            _ => Duration::from_secs(10),
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Version {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "v1" => Ok(Version::V1),
            "v2" => Ok(Version::V2),
            "v3" => Ok(Version::V3),
            _ => Err(format!("unknown reviews version {s:?} (v1, v2 or v3)")),
        }
    }
}

/// How a reviews app runs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub version: Version,
    /// This app's sidecar's outbound listener, through which it calls `ratings` (v2 and v3).
    pub outbound: Option<SocketAddr>,
}

/// The two reviews of product `id`; `ratings` is what the ratings service answered (its
/// `ratings` object), or why it failed, and is ignored by v1.
pub fn reviews_json(
    version: Version,
    id: u32,
    ratings: Option<Result<&serde_json::Value, String>>,
) -> serde_json::Value {
    let texts = [
        (
            "Reviewer1",
            "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!",
        ),
        (
            "Reviewer2",
            "Absolutely fun and entertaining. The play lacks thematic depth when compared to \
             other plays by Shakespeare.",
        ),
    ];
    let reviews: Vec<_> = texts
        .iter()
        .map(|(reviewer, text)| {
            let mut review = json!({ "reviewer": reviewer, "text": text });
            if let (Some(color), Some(ratings)) = (version.star_color(), &ratings) {
                review["rating"] = match ratings {
                    Ok(r) => match r.get(*reviewer).and_then(serde_json::Value::as_u64) {
                        Some(stars) => json!({ "stars": stars, "color": color }),
                        None => json!({ "error": RATINGS_UNAVAILABLE }),
                    },
                    Err(_) => json!({ "error": RATINGS_UNAVAILABLE }),
                };
            }
            review
        })
        .collect();
    json!({
        "id": id.to_string(),
        "podname": format!("reviews-{version}"),
        "clustername": "null",
        "version": version.as_str(),
        "reviews": reviews,
    })
}

pub(super) async fn handle<B>(
    settings: &Settings,
    client: &Downstream,
    req: &Request<B>,
) -> Response<BoxBody> {
    let path = req.uri().path();
    if path == "/health" {
        return json(StatusCode::OK, &json!({ "status": "Reviews is healthy" }));
    }
    let Some(id) = product_id(path, "/reviews/") else {
        return not_found(path);
    };
    let version = settings.version;
    if version.star_color().is_none() {
        return json(StatusCode::OK, &reviews_json(version, id, None));
    }
    let Some(outbound) = settings.outbound else {
        let why = Err("no outbound listener to call ratings through".to_owned());
        return json(StatusCode::OK, &reviews_json(version, id, Some(why)));
    };
    let headers = forwarded_headers(req.headers());
    let answer = client
        .get_json(
            outbound,
            "ratings",
            &format!("/ratings/{id}"),
            &headers,
            version.ratings_timeout(),
        )
        .await;
    let ratings = match &answer {
        Ok(body) => match body.get("ratings") {
            Some(r) => Ok(r),
            None => Err("ratings sent no `ratings` object".to_owned()),
        },
        Err(e) => {
            tracing::warn!(error = %e, "ratings unavailable");
            Err(e.to_string())
        }
    };
    json(StatusCode::OK, &reviews_json(version, id, Some(ratings)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_has_no_ratings() {
        let v = reviews_json(Version::V1, 0, None);
        assert_eq!(v["version"], "v1");
        assert_eq!(v["reviews"].as_array().unwrap().len(), 2);
        assert!(v["reviews"][0].get("rating").is_none());
    }

    #[test]
    fn v2_black_and_v3_red_stars_from_ratings() {
        let ratings = json!({ "Reviewer1": 5, "Reviewer2": 4 });
        let v2 = reviews_json(Version::V2, 0, Some(Ok(&ratings)));
        assert_eq!(
            v2["reviews"][0]["rating"],
            json!({ "stars": 5, "color": "black" })
        );
        assert_eq!(
            v2["reviews"][1]["rating"],
            json!({ "stars": 4, "color": "black" })
        );
        let v3 = reviews_json(Version::V3, 0, Some(Ok(&ratings)));
        assert_eq!(v3["reviews"][0]["rating"]["color"], "red");
        assert_eq!(v3["podname"], "reviews-v3");
    }

    #[test]
    fn ratings_failure_is_said_in_each_review() {
        let v = reviews_json(Version::V2, 0, Some(Err("ratings answered 500".into())));
        assert_eq!(v["reviews"][0]["rating"]["error"], RATINGS_UNAVAILABLE);
        assert_eq!(v["reviews"][1]["rating"]["error"], RATINGS_UNAVAILABLE);
    }

    #[test]
    fn timeouts_as_bookinfo() {
        assert_eq!(Version::V2.ratings_timeout(), Duration::from_secs(10));
        assert_eq!(Version::V3.ratings_timeout(), Duration::from_millis(2500));
        assert_eq!("v3".parse::<Version>().unwrap(), Version::V3);
        assert!("v4".parse::<Version>().is_err());
    }
}
