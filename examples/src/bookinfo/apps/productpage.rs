//! Bookinfo's `productpage`: the HTML page at `GET /productpage`, its JSON API under
//! `/api/v1/products`, and sign-in (`POST /login`, `GET /logout`).
//!
//! The page asks `details` and `reviews` (through this app's sidecar, by `Host` header) and
//! renders whatever came back: when a call fails or times out, the page still renders, with
//! Bookinfo's "Error fetching product reviews!" (or details) in that section. As Bookinfo's
//! productpage, it gives reviews 3 s per attempt and tries twice (the "bug" Istio's fault
//! injection task finds: with a 7 s delay between reviews and ratings, the page gives up on
//! reviews after about 6 s). The user is the `user` cookie (set by `/login`) or the `u` query
//! parameter, and is sent downstream as `end-user`.
//!
//! The reviews section names the version that served it in `data-reviews-version`:
//!
//! ```
//! use examples::bookinfo::apps::productpage::{Page, reviews_version, render};
//!
//! let reviews = serde_json::json!({
//!     "version": "v3", "podname": "reviews-v3",
//!     "reviews": [{ "reviewer": "Reviewer1", "text": "Fun.",
//!                   "rating": { "stars": 4, "color": "red" } }],
//! });
//! let page = Page {
//!     user: Some("jason"),
//!     details: Err("details did not answer within 3s".into()),
//!     reviews: examples::bookinfo::apps::productpage::parse_reviews(&reviews),
//! };
//! let html = render(&page);
//! assert_eq!(reviews_version(&html), Some("v3"));
//! assert!(html.contains("Error fetching product details!"));
//! ```

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use http::header::{COOKIE, LOCATION, SET_COOKIE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use mesh_core::body::BoxBody;
use serde_json::{Value, json};

use super::{CallError, Downstream, forwarded_headers, json, not_found, product_id, respond};

/// The book Bookinfo sells.
pub const TITLE: &str = "The Comedy of Errors";
/// Its summary, as Bookinfo shows it (HTML).
pub const DESCRIPTION_HTML: &str = "<a href=\"https://en.wikipedia.org/wiki/The_Comedy_of_Errors\">Wikipedia Summary</a>: The Comedy of Errors is one of <b>William Shakespeare's</b> early plays. It is his shortest and one of his most farcical comedies, with a major part of the humour coming from slapstick and mistaken identity, in addition to puns and word play.";
/// What the page says when details fail (Bookinfo's text).
pub const DETAILS_ERROR: &str = "Error fetching product details!";
pub const DETAILS_UNAVAILABLE: &str =
    "Sorry, product details are currently unavailable for this book.";
/// What the page says when reviews fail (Bookinfo's text).
pub const REVIEWS_ERROR: &str = "Error fetching product reviews!";
pub const REVIEWS_UNAVAILABLE: &str =
    "Sorry, product reviews are currently unavailable for this book.";

/// Bookinfo's productpage timeout for each call to reviews and details.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bookinfo's productpage tries reviews twice.
pub const REVIEWS_ATTEMPTS: u32 = 2;

/// How the productpage app runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// This app's sidecar's outbound listener, through which it calls details and reviews.
    pub outbound: SocketAddr,
    /// Client timeout of each attempt at reviews (Bookinfo: 3 s, two attempts).
    pub reviews_timeout: Duration,
    /// Client timeout of the call to details (and ratings, for the API).
    pub details_timeout: Duration,
}

impl Settings {
    /// Bookinfo's timeouts, calling through `outbound`.
    pub fn new(outbound: SocketAddr) -> Settings {
        Settings {
            outbound,
            reviews_timeout: DEFAULT_TIMEOUT,
            details_timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// Everything the product page shows.
#[derive(Debug)]
pub struct Page<'a> {
    /// The signed-in user.
    pub user: Option<&'a str>,
    /// Details' JSON, or why it is missing.
    pub details: Result<Value, String>,
    /// The reviews, or why they are missing.
    pub reviews: Result<Reviews, String>,
}

/// What reviews answered, as the page shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Reviews {
    /// `v1`, `v2` or `v3`.
    pub version: String,
    /// The instance that served them (`reviews-v2`).
    pub podname: String,
    pub reviews: Vec<Review>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Review {
    pub reviewer: String,
    pub text: String,
    pub rating: Rating,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Rating {
    /// Reviews v1: no ratings.
    None,
    /// `stars` out of 5, in `color` (`black` for v2, `red` for v3).
    Stars { stars: u8, color: String },
    /// Reviews could not get ratings.
    Error(String),
}

/// Reads reviews' JSON answer.
pub fn parse_reviews(v: &Value) -> Result<Reviews, String> {
    let podname = v
        .get("podname")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_owned();
    let version = v
        .get("version")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| podname.strip_prefix("reviews-").map(str::to_owned))
        .ok_or("reviews did not say its version")?;
    let list = v
        .get("reviews")
        .and_then(Value::as_array)
        .ok_or("reviews sent no `reviews` list")?;
    let reviews = list
        .iter()
        .map(|r| {
            let text = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
            let rating = match r.get("rating") {
                None => Rating::None,
                Some(rating) => match (rating.get("stars").and_then(Value::as_u64), rating) {
                    (Some(stars), _) => Rating::Stars {
                        stars: stars.min(5) as u8,
                        color: rating
                            .get("color")
                            .and_then(Value::as_str)
                            .unwrap_or("black")
                            .to_owned(),
                    },
                    (None, r) => Rating::Error(
                        r.get("error")
                            .and_then(Value::as_str)
                            .unwrap_or("no rating")
                            .to_owned(),
                    ),
                },
            };
            Review {
                reviewer: text("reviewer"),
                text: text("text"),
                rating,
            }
        })
        .collect();
    Ok(Reviews {
        version,
        podname,
        reviews,
    })
}

/// The `data-reviews-version` of a rendered page: which reviews version served it (`None`
/// when the reviews section shows an error).
pub fn reviews_version(html: &str) -> Option<&str> {
    let start = html.find("data-reviews-version=\"")? + "data-reviews-version=\"".len();
    let len = html[start..].find('"')?;
    Some(&html[start..start + len])
}

/// Escapes text for HTML.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The product page.
pub fn render(page: &Page<'_>) -> String {
    let mut h = String::with_capacity(4096);
    h.push_str(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>Simple Bookstore App</title>\n\
         <link rel=\"stylesheet\" href=\"static/bookinfo.css\">\n</head>\n<body>\n\
         <nav class=\"navbar\"><a class=\"brand\" href=\"productpage\">BookInfo Sample</a>\n",
    );
    match page.user {
        Some(user) => {
            let _ = writeln!(
                h,
                "<span class=\"user\" id=\"user\">{}</span> <a class=\"logout\" href=\"logout\">sign out</a>",
                escape(user)
            );
        }
        None => h.push_str(
            "<form class=\"login\" method=\"post\" action=\"login\">\
             <input name=\"username\" placeholder=\"User Name\"> \
             <input type=\"password\" name=\"passwd\" placeholder=\"Password\"> \
             <button type=\"submit\">Sign in</button></form>\n",
        ),
    }
    let _ = write!(
        h,
        "</nav>\n<main>\n<h1 class=\"title\">{}</h1>\n<p class=\"summary\">{DESCRIPTION_HTML}</p>\n",
        escape(TITLE)
    );
    render_details(&mut h, &page.details);
    render_reviews(&mut h, &page.reviews);
    h.push_str("</main>\n</body>\n</html>\n");
    h
}

fn render_details(h: &mut String, details: &Result<Value, String>) {
    match details {
        Ok(d) => {
            h.push_str("<section id=\"details\" class=\"details\">\n<h4>Book Details</h4>\n<dl>\n");
            for (label, key) in [
                ("Type", "type"),
                ("Pages", "pages"),
                ("Publisher", "publisher"),
                ("Language", "language"),
                ("ISBN-10", "ISBN-10"),
                ("ISBN-13", "ISBN-13"),
            ] {
                let value = match d.get(key) {
                    Some(Value::String(s)) => s.clone(),
                    Some(v) => v.to_string(),
                    None => "-".into(),
                };
                let _ = writeln!(h, "<dt>{label}:</dt><dd>{}</dd>", escape(&value));
            }
            h.push_str("</dl>\n</section>\n");
        }
        Err(why) => {
            let _ = write!(
                h,
                "<section id=\"details\" class=\"details error\">\n<h4>{DETAILS_ERROR}</h4>\n\
                 <p>{DETAILS_UNAVAILABLE}</p>\n<p><small class=\"reason\">{}</small></p>\n</section>\n",
                escape(why)
            );
        }
    }
}

fn render_reviews(h: &mut String, reviews: &Result<Reviews, String>) {
    match reviews {
        Ok(r) => {
            let _ = writeln!(
                h,
                "<section id=\"reviews\" class=\"reviews\" data-reviews-version=\"{}\">\n<h4>Book Reviews</h4>",
                escape(&r.version)
            );
            for review in &r.reviews {
                let _ = write!(
                    h,
                    "<blockquote>\n<p>{}</p>\n<small>{}</small>\n",
                    escape(&review.text),
                    escape(&review.reviewer)
                );
                match &review.rating {
                    Rating::None => {}
                    Rating::Stars { stars, color } => {
                        let stars = (*stars).min(5);
                        let _ = writeln!(
                            h,
                            "<div class=\"rating\" data-stars=\"{stars}\" data-color=\"{c}\" style=\"color: {c}\">{}{}</div>",
                            "\u{2605}".repeat(stars.into()),
                            "\u{2606}".repeat((5 - stars).into()),
                            c = escape(color),
                        );
                    }
                    Rating::Error(e) => {
                        let _ = writeln!(h, "<p class=\"rating error\"><i>{}</i></p>", escape(e));
                    }
                }
                h.push_str("</blockquote>\n");
            }
            let _ = write!(
                h,
                "<dl><dt>Reviews served by:</dt><dd class=\"podname\">{}</dd></dl>\n</section>\n",
                escape(&r.podname)
            );
        }
        Err(why) => {
            let _ = write!(
                h,
                "<section id=\"reviews\" class=\"reviews error\">\n<h4>{REVIEWS_ERROR}</h4>\n\
                 <p>{REVIEWS_UNAVAILABLE}</p>\n<p><small class=\"reason\">{}</small></p>\n</section>\n",
                escape(why)
            );
        }
    }
}

/// The index page at `/`.
fn index() -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\"><title>Simple Bookstore App</title></head>\n\
         <body>\n<h3>Hello! This is a simple bookstore application consisting of four services \
         as shown below</h3>\n<pre>productpage -> details\n            -> reviews (v1 | v2 | v3) -> ratings</pre>\n\
         <p><a href=\"productpage?u=normal\">Normal user</a> \
         <a href=\"productpage?u=test\">Test user</a></p>\n<p>{}</p>\n</body>\n</html>\n",
        escape(TITLE)
    )
}

const STYLESHEET: &str = "body { font-family: sans-serif; margin: 0; }\n\
.navbar { background: #222; color: #eee; padding: 8px 16px; }\n\
.navbar a { color: #eee; }\n\
main { padding: 16px; }\n\
.error h4 { color: #a00; }\n\
blockquote { border-left: 4px solid #ddd; margin: 8px 0; padding: 4px 12px; }\n";

/// The user: the `user` cookie, else the `u` query parameter.
pub fn user_of<B>(req: &Request<B>) -> Option<String> {
    let from_cookie = req
        .headers()
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == "user")
        .map(|(_, v)| percent_decode(v));
    from_cookie
        .or_else(|| query_param(req.uri().query().unwrap_or(""), "u"))
        .filter(|u| !u.is_empty())
}

/// The first value of `name` in an `application/x-www-form-urlencoded` string.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(k, _)| percent_decode(k) == name)
        .map(|(_, v)| percent_decode(v))
}

/// Decodes `%XX` escapes and `+` (form encoding).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The headers productpage sends downstream: the forwarded ones, with `end-user` from the
/// user it serves (not from the caller).
fn downstream_headers(incoming: &HeaderMap, user: Option<&str>) -> HeaderMap {
    let mut headers = forwarded_headers(incoming);
    headers.remove("end-user");
    if let Some(v) = user.and_then(|u| HeaderValue::from_str(u).ok()) {
        headers.insert("end-user", v);
    }
    headers
}

async fn fetch_details(
    settings: &Settings,
    client: &Downstream,
    id: u32,
    headers: &HeaderMap,
) -> Result<Value, CallError> {
    client
        .get_json(
            settings.outbound,
            "details",
            &format!("/details/{id}"),
            headers,
            settings.details_timeout,
        )
        .await
}

async fn fetch_reviews(
    settings: &Settings,
    client: &Downstream,
    id: u32,
    headers: &HeaderMap,
) -> Result<Value, CallError> {
    let mut last = None;
    for _ in 0..REVIEWS_ATTEMPTS {
        match client
            .get_json(
                settings.outbound,
                "reviews",
                &format!("/reviews/{id}"),
                headers,
                settings.reviews_timeout,
            )
            .await
        {
            Ok(v) => return Ok(v),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(CallError::Transport {
        service: "reviews".into(),
        error: "no attempt made".into(),
    }))
}

pub(super) async fn handle(
    settings: &Settings,
    client: &Downstream,
    req: Request<Incoming>,
) -> Response<BoxBody> {
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (_, "/health") => json(
            StatusCode::OK,
            &json!({ "status": "Product page is healthy" }),
        ),
        (_, "/" | "/index.html") => respond(StatusCode::OK, "text/html; charset=utf-8", index()),
        (_, "/productpage") => product_page(settings, client, &req).await,
        (&Method::POST, "/login") => {
            let form = match Limited::new(req.into_body(), 64 * 1024).collect().await {
                Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
                Err(e) => {
                    return respond(
                        StatusCode::BAD_REQUEST,
                        "text/plain; charset=utf-8",
                        format!("cannot read the login form: {e}\n"),
                    );
                }
            };
            login(query_param(&form, "username"))
        }
        (_, "/login") => login(query_param(req.uri().query().unwrap_or(""), "username")),
        (_, "/logout") => redirect_with_cookie("user=; Path=/; Max-Age=0"),
        (_, "/static/bookinfo.css") => respond(
            StatusCode::OK,
            "text/css; charset=utf-8",
            STYLESHEET.to_owned(),
        ),
        (_, "/api/v1/products") => json(
            StatusCode::OK,
            &json!([{ "id": 0, "title": TITLE, "descriptionHtml": DESCRIPTION_HTML }]),
        ),
        (_, p) if p.starts_with("/api/v1/products/") => api(settings, client, &req).await,
        (_, p) => not_found(p),
    }
}

async fn product_page<B>(
    settings: &Settings,
    client: &Downstream,
    req: &Request<B>,
) -> Response<BoxBody> {
    let user = user_of(req);
    let headers = downstream_headers(req.headers(), user.as_deref());
    let (details, reviews) = tokio::join!(
        fetch_details(settings, client, 0, &headers),
        fetch_reviews(settings, client, 0, &headers)
    );
    if let Err(e) = &details {
        tracing::warn!(error = %e, "details unavailable");
    }
    if let Err(e) = &reviews {
        tracing::warn!(error = %e, "reviews unavailable");
    }
    let page = Page {
        user: user.as_deref(),
        details: details.map_err(|e| e.to_string()),
        reviews: reviews
            .map_err(|e| e.to_string())
            .and_then(|v| parse_reviews(&v)),
    };
    respond(StatusCode::OK, "text/html; charset=utf-8", render(&page))
}

/// `/api/v1/products/{id}`, `/api/v1/products/{id}/reviews`, `/api/v1/products/{id}/ratings`.
async fn api<B>(settings: &Settings, client: &Downstream, req: &Request<B>) -> Response<BoxBody> {
    let path = req.uri().path();
    let rest = path.trim_start_matches("/api/v1/products/");
    let (id, what) = rest.split_once('/').unwrap_or((rest, ""));
    let Some(id) = product_id(&format!("/{id}"), "/") else {
        return json(
            StatusCode::BAD_REQUEST,
            &json!({ "error": "please provide numeric product id" }),
        );
    };
    let user = user_of(req);
    let headers = downstream_headers(req.headers(), user.as_deref());
    let answer = match what {
        "" => fetch_details(settings, client, id, &headers).await,
        "reviews" => fetch_reviews(settings, client, id, &headers).await,
        "ratings" => {
            client
                .get_json(
                    settings.outbound,
                    "ratings",
                    &format!("/ratings/{id}"),
                    &headers,
                    settings.details_timeout,
                )
                .await
        }
        _ => return not_found(path),
    };
    match answer {
        Ok(v) => json(StatusCode::OK, &v),
        Err(e) => {
            let status = match &e {
                CallError::Status { status, .. } => *status,
                CallError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            json(status, &json!({ "error": e.to_string() }))
        }
    }
}

fn login(user: Option<String>) -> Response<BoxBody> {
    match user.filter(|u| !u.is_empty()) {
        Some(user) => {
            let encoded: String = user
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            redirect_with_cookie(&format!("user={encoded}; Path=/"))
        }
        None => respond(
            StatusCode::BAD_REQUEST,
            "text/plain; charset=utf-8",
            "sign in needs a username\n".into(),
        ),
    }
}

fn redirect_with_cookie(cookie: &str) -> Response<BoxBody> {
    let mut resp = respond(
        StatusCode::FOUND,
        "text/plain; charset=utf-8",
        String::new(),
    );
    resp.headers_mut()
        .insert(LOCATION, HeaderValue::from_static("/productpage"));
    if let Ok(v) = HeaderValue::from_str(cookie) {
        resp.headers_mut().insert(SET_COOKIE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bookinfo::apps::details::book_details;
    use crate::bookinfo::apps::reviews::{RATINGS_UNAVAILABLE, Version, reviews_json};

    fn page_with(reviews: Value) -> String {
        render(&Page {
            user: None,
            details: Ok(book_details(0)),
            reviews: parse_reviews(&reviews),
        })
    }

    #[test]
    fn v1_page_names_its_version_and_has_no_stars() {
        let html = page_with(reviews_json(Version::V1, 0, None));
        assert_eq!(reviews_version(&html), Some("v1"));
        assert!(!html.contains('\u{2605}'));
        assert!(!html.contains("class=\"rating"));
        assert!(html.contains("Reviews served by:"));
        assert!(html.contains("reviews-v1"));
        assert!(html.contains("<dt>ISBN-10:</dt><dd>1234567890</dd>"));
        assert!(html.contains("<dt>Publisher:</dt><dd>PublisherA</dd>"));
    }

    #[test]
    fn v2_black_stars_and_v3_red_stars() {
        let ratings = json!({ "Reviewer1": 5, "Reviewer2": 4 });
        let v2 = page_with(reviews_json(Version::V2, 0, Some(Ok(&ratings))));
        assert_eq!(reviews_version(&v2), Some("v2"));
        assert!(v2.contains(
            "data-stars=\"5\" data-color=\"black\" style=\"color: black\">\u{2605}\u{2605}\u{2605}\u{2605}\u{2605}</div>"
        ));
        assert!(v2.contains(
            "data-stars=\"4\" data-color=\"black\" style=\"color: black\">\u{2605}\u{2605}\u{2605}\u{2605}\u{2606}</div>"
        ));
        assert!(!v2.contains("data-color=\"red\""));
        let v3 = page_with(reviews_json(Version::V3, 0, Some(Ok(&ratings))));
        assert_eq!(reviews_version(&v3), Some("v3"));
        assert_eq!(v3.matches("data-color=\"red\"").count(), 2);
        assert!(!v3.contains("data-color=\"black\""));
    }

    #[test]
    fn ratings_unavailable_shows_in_each_review() {
        let html = page_with(reviews_json(
            Version::V2,
            0,
            Some(Err("ratings answered 500".into())),
        ));
        assert_eq!(reviews_version(&html), Some("v2"));
        assert_eq!(html.matches(RATINGS_UNAVAILABLE).count(), 2);
    }

    #[test]
    fn failed_calls_still_render_the_page() {
        let html = render(&Page {
            user: Some("jason"),
            details: Err("details answered 503 Service Unavailable (response flags UH)".into()),
            reviews: Err("reviews did not answer within 3s".into()),
        });
        assert_eq!(reviews_version(&html), None);
        assert!(html.contains(REVIEWS_ERROR));
        assert!(html.contains(REVIEWS_UNAVAILABLE));
        assert!(html.contains(DETAILS_ERROR));
        assert!(html.contains("reviews did not answer within 3s"));
        assert!(html.contains("<span class=\"user\" id=\"user\">jason</span>"));
        assert!(html.contains(TITLE));
    }

    #[test]
    fn user_names_are_escaped() {
        let html = render(&Page {
            user: Some("<script>x</script>"),
            details: Err("x".into()),
            reviews: Err("y".into()),
        });
        assert!(!html.contains("<script>"));
        assert!(html.contains("&lt;script&gt;x&lt;/script&gt;"));
    }

    #[test]
    fn user_from_cookie_then_query() {
        let req = Request::get("/productpage?u=bob")
            .header("cookie", "a=1; user=jason")
            .body(())
            .unwrap();
        assert_eq!(user_of(&req).as_deref(), Some("jason"));
        let req = Request::get("/productpage?x=1&u=bob%20smith")
            .body(())
            .unwrap();
        assert_eq!(user_of(&req).as_deref(), Some("bob smith"));
        let req = Request::get("/productpage").body(()).unwrap();
        assert_eq!(user_of(&req), None);
        let req = Request::get("/productpage")
            .header("cookie", "user=")
            .body(())
            .unwrap();
        assert_eq!(user_of(&req), None);
    }

    #[test]
    fn end_user_comes_from_the_user_not_the_caller() {
        let mut incoming = HeaderMap::new();
        incoming.insert("end-user", HeaderValue::from_static("mallory"));
        incoming.insert("x-request-id", HeaderValue::from_static("r1"));
        let h = downstream_headers(&incoming, Some("jason"));
        assert_eq!(h["end-user"], "jason");
        assert_eq!(h["x-request-id"], "r1");
        let h = downstream_headers(&incoming, None);
        assert!(h.get("end-user").is_none());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4A%61son"), "Jason");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(
            query_param("username=jason&passwd=x", "username").as_deref(),
            Some("jason")
        );
        assert_eq!(query_param("flag&u=1", "flag").as_deref(), Some(""));
    }

    #[test]
    fn login_sets_the_cookie() {
        let resp = login(Some("jason".into()));
        assert_eq!(resp.status(), StatusCode::FOUND);
        assert_eq!(resp.headers()[SET_COOKIE], "user=jason; Path=/");
        assert_eq!(resp.headers()[LOCATION], "/productpage");
        assert_eq!(login(None).status(), StatusCode::BAD_REQUEST);
    }
}
