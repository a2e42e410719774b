//! Istio traffic rules end to end through the sidecar: Bookinfo's routing, canary splits,
//! fault injection, rewrites, redirects, direct responses and mirroring, over loopback.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod support;

use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use mesh_core::body;
use mesh_proxy::RunningProxy;
use support::app::App;
use support::{
    bootstrap, get, http1_client, service_entry, service_entry_labeled, start_proxy, tally, text,
    virtual_service,
};

/// Bookinfo's reviews v1, v2, v3 behind a client sidecar, with Istio's
/// `destination-rule-all.yaml` subsets for reviews.
struct Reviews {
    v1: App,
    v2: App,
    v3: App,
}

impl Reviews {
    async fn start() -> Reviews {
        Reviews {
            v1: App::start("reviews-v1").await,
            v2: App::start("reviews-v2").await,
            v3: App::start("reviews-v3").await,
        }
    }

    /// The client sidecar's config with `rules` (VirtualServices) added.
    fn config(&self, rules: &str) -> String {
        format!(
            "{}{}{}{rules}",
            bootstrap("productpage", None),
            service_entry_labeled(
                "reviews",
                9080,
                &[
                    (self.v1.addr, "v1"),
                    (self.v2.addr, "v2"),
                    (self.v3.addr, "v3")
                ]
            ),
            "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: reviews }
spec:
  host: reviews
  subsets:
  - { name: v1, labels: { version: v1 } }
  - { name: v2, labels: { version: v2 } }
  - { name: v3, labels: { version: v3 } }
",
        )
    }
}

fn app_of(_: StatusCode, h: &http::HeaderMap) -> String {
    h.get("x-app")
        .map_or("-".into(), |v| v.to_str().unwrap().to_owned())
}

/// Istio's `virtual-service-reviews-test-v2.yaml`.
fn jason_v2() -> String {
    virtual_service(
        "reviews",
        "  - match:
    - headers:
        end-user: { exact: jason }
    route:
    - destination: { host: reviews, subset: v2 }
  - route:
    - destination: { host: reviews, subset: v1 }
",
    )
}

#[tokio::test]
async fn bookinfo_jason_sees_v2_and_everyone_else_v1() {
    let reviews = Reviews::start().await;
    let proxy = start_proxy(&reviews.config(&jason_v2())).await;
    let outbound = proxy.outbound_addr().unwrap();
    let http = http1_client();
    for user in ["jason", "alice", ""] {
        for _ in 0..20 {
            let mut req = get(outbound, "reviews:9080", "/reviews/0");
            if !user.is_empty() {
                req.headers_mut().insert("end-user", user.parse().unwrap());
            }
            let resp = http.request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let want = if user == "jason" {
                "reviews-v2"
            } else {
                "reviews-v1"
            };
            assert_eq!(resp.headers()["x-app"], want, "user {user:?}");
            text(resp).await;
        }
    }
    assert_eq!(
        reviews
            .v3
            .received
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn canary_90_10_lands_within_two_points_over_10000_requests() {
    let reviews = Reviews::start().await;
    // Istio's `virtual-service-reviews-90-10.yaml`.
    let proxy = start_proxy(&reviews.config(&virtual_service(
        "reviews",
        "  - route:
    - destination: { host: reviews, subset: v1 }
      weight: 90
    - destination: { host: reviews, subset: v2 }
      weight: 10
",
    )))
    .await;
    let outbound = proxy.outbound_addr().unwrap();
    let counts = tally(
        &http1_client(),
        10_000,
        32,
        move || get(outbound, "reviews:9080", "/"),
        app_of,
    )
    .await;
    let v1 = counts.get("reviews-v1").copied().unwrap_or(0);
    let v2 = counts.get("reviews-v2").copied().unwrap_or(0);
    assert_eq!(v1 + v2, 10_000, "{counts:?}");
    let share = v1 as f64 / 100.0;
    assert!(
        (88.0..=92.0).contains(&share),
        "v1 got {share}% ({counts:?})"
    );
}

#[tokio::test]
async fn a_50_percent_abort_lands_within_three_points_over_2000_requests() {
    let reviews = Reviews::start().await;
    let proxy = start_proxy(&reviews.config(&virtual_service(
        "reviews",
        "  - fault:
      abort:
        httpStatus: 500
        percentage: { value: 50 }
    route:
    - destination: { host: reviews, subset: v1 }
",
    )))
    .await;
    let outbound = proxy.outbound_addr().unwrap();
    let counts = tally(
        &http1_client(),
        2_000,
        16,
        move || get(outbound, "reviews:9080", "/"),
        |status, h| {
            let flags = h
                .get("x-mesh-response-flags")
                .map_or("-", |v| v.to_str().unwrap());
            format!("{} {flags}", status.as_u16())
        },
    )
    .await;
    let aborted = counts.get("500 FI").copied().unwrap_or(0);
    let passed = counts.get("200 -").copied().unwrap_or(0);
    assert_eq!(aborted + passed, 2_000, "{counts:?}");
    let share = aborted as f64 / 20.0;
    assert!(
        (47.0..=53.0).contains(&share),
        "aborted {share}% ({counts:?})"
    );
}

#[tokio::test]
async fn a_fixed_delay_applies_only_to_the_matched_header() {
    let reviews = Reviews::start().await;
    let proxy = start_proxy(&reviews.config(&virtual_service(
        "reviews",
        "  - match:
    - headers:
        end-user: { exact: jason }
    fault:
      delay:
        fixedDelay: 2s
        percentage: { value: 100 }
    route:
    - destination: { host: reviews, subset: v1 }
  - route:
    - destination: { host: reviews, subset: v1 }
",
    )))
    .await;
    let outbound = proxy.outbound_addr().unwrap();
    let http = http1_client();

    let started = Instant::now();
    let resp = http
        .request(get(outbound, "reviews:9080", "/"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    text(resp).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no delay without the header"
    );

    let mut req = get(outbound, "reviews:9080", "/");
    req.headers_mut()
        .insert("end-user", "jason".parse().unwrap());
    let started = Instant::now();
    let resp = http.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-app"], "reviews-v1");
    text(resp).await;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "jason waits the fixed delay"
    );
}

#[tokio::test]
async fn rewrites_redirects_and_direct_responses() {
    let reviews = Reviews::start().await;
    let proxy = start_proxy(&reviews.config(&virtual_service(
        "reviews",
        "  - match: [{ uri: { prefix: /old/ } }]
    rewrite: { uri: /new/ }
    route: [{ destination: { host: reviews, subset: v1 } }]
  - match: [{ uri: { prefix: /v1 } }]
    rewrite: { uri: / }
    route: [{ destination: { host: reviews, subset: v1 } }]
  - match: [{ uri: { exact: /moved } }]
    redirect: { uri: /new-home, authority: bookinfo.example, scheme: https, redirectCode: 302 }
  - match: [{ uri: { exact: /moved-default } }]
    redirect: { uri: /elsewhere }
  - match: [{ uri: { exact: /teapot } }]
    directResponse: { status: 418, body: { string: \"I'm a teapot\" } }
  - route: [{ destination: { host: reviews, subset: v1 } }]
",
    )))
    .await;
    let outbound = proxy.outbound_addr().unwrap();
    let http = http1_client();

    let resp = http
        .request(get(outbound, "reviews:9080", "/old/page?q=1"))
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-seen-path"], "/new/page?q=1");

    // Istio hands `rewrite.uri` to Envoy as a literal prefix replacement, so `/v1` → `/`
    // on `/v1/api` leaves a double slash (istio/istio#26828; match `/v1/` to avoid it).
    let resp = http
        .request(get(outbound, "reviews:9080", "/v1/api"))
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-seen-path"], "//api");
    let resp = http
        .request(get(outbound, "reviews:9080", "/v1"))
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-seen-path"], "/");

    let resp = http
        .request(get(outbound, "reviews:9080", "/moved"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    assert_eq!(
        resp.headers()["location"],
        "https://bookinfo.example/new-home"
    );

    let resp = http
        .request(get(outbound, "reviews:9080", "/moved-default"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(resp.headers()["location"], "http://reviews:9080/elsewhere");

    let resp = http
        .request(get(outbound, "reviews:9080", "/teapot"))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 418);
    assert_eq!(text(resp).await, "I'm a teapot");
    assert_eq!(
        reviews
            .v1
            .received
            .load(std::sync::atomic::Ordering::SeqCst),
        3,
        "only the rewrites reached the app"
    );
}

#[tokio::test]
async fn a_mirror_copy_reaches_the_shadow_while_the_caller_gets_the_primary() {
    let reviews = Reviews::start().await;
    let shadow = App::start("shadow").await;
    let config = format!(
        "{}{}",
        reviews.config(&virtual_service(
            "reviews",
            "  - route: [{ destination: { host: reviews, subset: v1 } }]
    mirror: { host: reviews-shadow-store }
    mirrorPercentage: { value: 100 }
"
        )),
        service_entry("reviews-shadow-store", 9080, "HTTP", &[shadow.addr]),
    );
    let proxy = start_proxy(&config).await;
    let outbound = proxy.outbound_addr().unwrap();
    let http = http1_client();
    let resp = http
        .request(get(outbound, "reviews:9080", "/mirrored"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-app"], "reviews-v1");
    assert_eq!(text(resp).await, "hello from reviews-v1");

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = shadow.seen.lock().unwrap().clone();
        if let Some((host, path)) = seen.first() {
            assert!(
                host.starts_with("reviews-shadow"),
                "shadow Host is suffixed: {host}"
            );
            assert_eq!(path, "/mirrored");
            break;
        }
        assert!(Instant::now() < deadline, "the shadow never saw the copy");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A dead shadow is invisible to the caller.
    shadow.kill();
    let resp = http
        .request(get(outbound, "reviews:9080", "/again"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-app"], "reviews-v1");
}

#[tokio::test]
async fn a_changed_virtual_service_applies_to_new_requests_without_restart() {
    let reviews = Reviews::start().await;
    let proxy: RunningProxy = start_proxy(&reviews.config(&jason_v2())).await;
    let outbound = proxy.outbound_addr().unwrap();
    let http = http1_client();
    let resp = http
        .request(get(outbound, "reviews:9080", "/"))
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-app"], "reviews-v1");

    // Istio's `virtual-service-reviews-v3.yaml`.
    proxy
        .apply_config(support::load(&reviews.config(&virtual_service(
            "reviews",
            "  - route: [{ destination: { host: reviews, subset: v3 } }]
",
        ))))
        .expect("the new config applies");
    let resp = http
        .request(get(outbound, "reviews:9080", "/"))
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-app"], "reviews-v3");
    let req = Request::get(format!("http://{outbound}/"))
        .header("host", "reviews:9080")
        .body(body::empty())
        .unwrap();
    let resp = http.request(req).await.unwrap();
    assert_eq!(resp.headers()["x-app"], "reviews-v3");
}
