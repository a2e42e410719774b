//! The route layer's actions on requests and responses, over an in-process inner service.

#![allow(clippy::unwrap_used)]

mod routing_support;

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, StatusCode};
use mesh_core::ResponseFlags;
use mesh_core::body;
use mesh_core::flags::RESPONSE_FLAGS_HEADER;
use mesh_core::target::RouteTarget;
use routing_support::*;
use tower::ServiceExt;

const VS: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: { name: reviews }\nspec:\n  hosts: [reviews]\n  http:\n";

fn rules(http: &str) -> String {
    format!("{VS}{http}")
}

fn values(h: &http::HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn header_operations_at_route_and_destination_level() {
    let h = Harness::new(&rules(
        "  - headers:
      request:
        set: { x-route: r, x-both: route }
        add: { x-added: route }
        remove: [x-secret]
      response:
        set: { x-resp-route: r }
        add: { x-app: route-added }
        remove: [x-target]
    route:
    - destination: { host: reviews, subset: v1 }
      headers:
        request:
          set: { x-both: destination }
          add: { x-added: destination }
          remove: [x-route-only]
        response:
          set: { x-resp-dest: d }
",
    ));
    let mut req = get("reviews:9080", "/");
    for (k, v) in [
        ("x-secret", "s"),
        ("x-added", "client"),
        ("x-route-only", "1"),
        ("x-both", "client"),
    ] {
        req = with_header(req, k, v);
    }
    let resp = h.ok(req).await;
    let seen = h.last().headers;
    assert_eq!(values(&seen, "x-route"), ["r"]);
    assert_eq!(
        values(&seen, "x-both"),
        ["destination"],
        "destination-level ops run after the route's"
    );
    assert_eq!(values(&seen, "x-added"), ["client", "route", "destination"]);
    assert!(seen.get("x-secret").is_none() && seen.get("x-route-only").is_none());
    let r = resp.headers();
    assert_eq!(values(r, "x-resp-route"), ["r"]);
    assert_eq!(values(r, "x-resp-dest"), ["d"]);
    assert_eq!(values(r, "x-app"), ["1", "route-added"]);
    assert!(r.get("x-target").is_none());
}

#[tokio::test]
async fn prefix_rewrite_to_slash_is_literal_as_in_istio() {
    let h = Harness::new(&rules(
        "  - match: [{ uri: { prefix: /v1 } }]
    rewrite: { uri: / }
    route: [{ destination: { host: reviews } }]
  - match: [{ uri: { prefix: /wpcatalog }, name: wp }, { uri: { prefix: /consumercatalog } }]
    rewrite: { uri: /newcatalog }
    route: [{ destination: { host: reviews } }]
  - match: [{ uri: { exact: /exact } }]
    rewrite: { uri: /replaced, authority: backend.example:8080 }
    route: [{ destination: { host: reviews } }]
  - match: [{ uri: { prefix: /service/ } }]
    rewrite: { uriRegexRewrite: { match: '^/service/([^/]+)(/.*)$', rewrite: '\\2/instance/\\1' } }
    route: [{ destination: { host: reviews } }]
",
    ));
    let path = |h: &Harness| h.last().uri.to_string();
    h.ok(get("reviews:9080", "/v1/api")).await;
    assert_eq!(
        path(&h),
        "//api",
        "Envoy's prefix_rewrite, as Istio configures it"
    );
    h.ok(get("reviews:9080", "/v1")).await;
    assert_eq!(path(&h), "/");
    h.ok(get("reviews:9080", "/wpcatalog/item?id=1")).await;
    assert_eq!(path(&h), "/newcatalog/item?id=1");
    h.ok(get("reviews:9080", "/consumercatalog/x")).await;
    assert_eq!(
        path(&h),
        "/newcatalog/x",
        "the block that matched decides the prefix"
    );
    h.ok(get("reviews:9080", "/exact?q=1")).await;
    assert_eq!(path(&h), "/replaced?q=1");
    assert_eq!(h.last().headers["host"], "backend.example:8080");
    h.ok(get("reviews:9080", "/service/foo/v1/api")).await;
    assert_eq!(path(&h), "/v1/api/instance/foo");
}

#[tokio::test]
async fn authority_rewrite_applies_to_absolute_uris_too() {
    let h = Harness::new(&rules(
        "  - headers: { request: { set: { host: from-headers } } }
    route: [{ destination: { host: reviews } }]
",
    ));
    let req = Request::get("http://reviews:9080/x")
        .body(body::empty())
        .unwrap();
    h.ok(req).await;
    let seen = h.last();
    assert_eq!(seen.uri.to_string(), "http://from-headers/x");
    assert_eq!(seen.headers["host"], "from-headers");
}

#[tokio::test]
async fn redirects_and_direct_responses_answer_locally() {
    let h = Harness::new(&rules(
        "  - match: [{ uri: { exact: /moved } }]
    redirect: { uri: /new-home, authority: bookinfo.example, scheme: https, redirectCode: 302 }
    headers: { response: { set: { x-route: redirect } } }
  - match: [{ uri: { exact: /moved-default } }]
    redirect: { uri: /elsewhere }
  - match: [{ uri: { exact: /teapot } }]
    directResponse: { status: 418, body: { string: \"I'm a teapot\" } }
",
    ));
    let resp = h.ok(get("reviews:9080", "/moved")).await;
    assert_eq!(resp.status(), StatusCode::FOUND);
    assert_eq!(
        resp.headers()["location"],
        "https://bookinfo.example/new-home"
    );
    assert_eq!(
        resp.headers()["x-route"],
        "redirect",
        "route response headers apply"
    );
    let resp = h.ok(get("reviews:9080", "/moved-default?q=1")).await;
    assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        resp.headers()["location"],
        "http://reviews:9080/elsewhere?q=1"
    );
    let resp = h.ok(get("reviews:9080", "/teapot")).await;
    assert_eq!(resp.status().as_u16(), 418);
    assert!(resp.headers().get(RESPONSE_FLAGS_HEADER).is_none());
    assert_eq!(text(resp).await, "I'm a teapot");
    assert!(
        h.seen.lock().unwrap().is_empty(),
        "nothing reached a service"
    );
}

#[tokio::test(start_paused = true)]
async fn a_fixed_delay_waits_and_flags_di() {
    let h = Harness::new(&rules(
        "  - match: [{ headers: { end-user: { exact: jason } } }]
    fault: { delay: { fixedDelay: 7s, percentage: { value: 100 } } }
    route: [{ destination: { host: reviews, subset: v1 } }]
  - route: [{ destination: { host: reviews, subset: v1 } }]
",
    ));
    let started = tokio::time::Instant::now();
    let resp = h.ok(get("reviews:9080", "/")).await;
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert!(resp.extensions().get::<ResponseFlags>().is_none());

    let started = tokio::time::Instant::now();
    let resp = h
        .ok(with_header(get("reviews:9080", "/"), "end-user", "jason"))
        .await;
    assert!(
        started.elapsed() >= Duration::from_secs(7),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.extensions().get::<ResponseFlags>(),
        Some(&ResponseFlags::DELAY_INJECTED)
    );
    assert!(
        resp.headers().get(RESPONSE_FLAGS_HEADER).is_none(),
        "no header for DI on a normal response"
    );
}

#[tokio::test(start_paused = true)]
async fn delay_then_abort_flags_both() {
    let h = Harness::new(&rules(
        "  - fault:
      delay: { fixedDelay: 1s, percentage: { value: 100 } }
      abort: { httpStatus: 503, percentage: { value: 100 } }
    route: [{ destination: { host: reviews } }]
",
    ));
    let started = tokio::time::Instant::now();
    let resp = h.ok(get("reviews:9080", "/")).await;
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()[RESPONSE_FLAGS_HEADER], "DI,FI");
    assert_eq!(
        resp.extensions().get::<ResponseFlags>(),
        Some(&(ResponseFlags::DELAY_INJECTED | ResponseFlags::FAULT_INJECTED))
    );
    assert!(h.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn aborts_answer_with_http_or_grpc_status_in_proportion() {
    fastrand::seed(3);
    let h = Harness::new(&rules(
        "  - match: [{ uri: { prefix: /grpc } }]
    fault: { abort: { grpcStatus: UNAVAILABLE, percentage: { value: 100 } } }
    route: [{ destination: { host: reviews } }]
  - fault: { abort: { httpStatus: 500, percentage: { value: 25 } } }
    route: [{ destination: { host: reviews } }]
",
    ));
    let resp = h.ok(get("reviews:9080", "/grpc/pkg.Svc/Call")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    assert_eq!(resp.headers()["grpc-status"], "14");
    assert_eq!(resp.headers()[RESPONSE_FLAGS_HEADER], "FI");

    let n = 4_000;
    let mut aborted = 0;
    for _ in 0..n {
        let resp = h.ok(get("reviews:9080", "/")).await;
        if resp.status() == StatusCode::INTERNAL_SERVER_ERROR {
            assert_eq!(resp.headers()[RESPONSE_FLAGS_HEADER], "FI");
            assert_eq!(
                resp.extensions().get::<ResponseFlags>(),
                Some(&ResponseFlags::FAULT_INJECTED)
            );
            aborted += 1;
        }
    }
    let share = aborted as f64 * 100.0 / n as f64;
    assert!((23.0..=27.0).contains(&share), "{share}%");
    assert_eq!(h.seen.lock().unwrap().len(), n - aborted);
}

#[tokio::test]
async fn route_flags_merge_with_flags_already_on_the_response() {
    let table = table(&rules(
        "  - fault: { delay: { fixedDelay: 1ms, percentage: { value: 100 } } }
    route: [{ destination: { host: reviews } }]
",
    ));
    let inner = tower::service_fn(|_req: Request<body::BoxBody>| async {
        let mut resp = http::Response::new(body::empty());
        resp.extensions_mut()
            .insert(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
        Ok::<_, body::BoxError>(resp)
    });
    let table = Arc::new(arc_swap::ArcSwap::from_pointee(table));
    let router = tower::Layer::layer(&mesh_routing::RouteLayer::new(table), inner);
    let resp = router.oneshot(get("reviews:9080", "/")).await.unwrap();
    assert_eq!(
        resp.extensions().get::<ResponseFlags>(),
        Some(&(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED | ResponseFlags::DELAY_INJECTED))
    );
}

/// Waits until the inner service has seen `n` requests.
async fn seen_at_least(h: &Harness, n: usize) {
    for _ in 0..1000 {
        if h.seen.lock().unwrap().len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!(
        "the inner service saw {} requests, not {n}",
        h.seen.lock().unwrap().len()
    );
}

const MIRRORED: &str = "  - route: [{ destination: { host: reviews, subset: v1 } }]
    timeout: 2s
    mirror: { host: shadow }
    mirrorPercentage: { value: 100 }
";

#[tokio::test]
async fn a_mirror_copy_reaches_the_shadow_with_its_own_target() {
    let h = Harness::new(&rules(MIRRORED));
    let req = Request::post("/orders")
        .header("host", "reviews:9080")
        .header("x-trace", "t1")
        .body(body::full("order #1"))
        .unwrap();
    let resp = h.ok(req).await;
    assert_eq!(
        resp.headers()["x-target"],
        "reviews.default.svc.cluster.local:9080/v1"
    );
    assert_eq!(
        text(resp).await,
        "reviews.default.svc.cluster.local:9080/v1"
    );
    seen_at_least(&h, 2).await;
    let seen = h.seen.lock().unwrap().clone();
    let shadow = seen
        .iter()
        .find(|s| s.target.service.host.as_str() == "shadow.default.svc.cluster.local")
        .unwrap();
    let primary = seen.iter().find(|s| s.target.subset.is_some()).unwrap();
    assert_eq!(shadow.headers["host"], "reviews-shadow:9080");
    assert_eq!(primary.headers["host"], "reviews:9080");
    assert_eq!(shadow.uri, "/orders");
    assert_eq!(shadow.headers["x-trace"], "t1");
    assert_eq!(shadow.body, "order #1", "the body is teed to the shadow");
    assert_eq!(primary.body, "order #1");
    assert_eq!(shadow.target.retry.attempts, 0, "shadows are not retried");
    assert_eq!(shadow.target.timeout, Some(Duration::from_secs(2)));
}

#[tokio::test]
async fn a_failing_or_hanging_shadow_is_invisible_to_the_caller() {
    for answer in ["fail", "hang"] {
        let behaviour: Behaviour =
            Arc::new(
                move |t: &RouteTarget| match (t.service.host.as_str(), answer) {
                    ("shadow.default.svc.cluster.local", "fail") => Answer::Fail,
                    ("shadow.default.svc.cluster.local", _) => Answer::Hang,
                    _ => Answer::Ok,
                },
            );
        let h = Harness::with(table(&rules(MIRRORED)), behaviour);
        let resp = tokio::time::timeout(Duration::from_secs(5), h.ok(get("reviews:9080", "/")))
            .await
            .expect("the primary is not held up by the shadow");
        assert_eq!(resp.status(), StatusCode::OK, "{answer}");
        assert_eq!(
            resp.headers()["x-target"],
            "reviews.default.svc.cluster.local:9080/v1"
        );
    }
}

#[tokio::test]
async fn mirror_percentages_are_honoured() {
    fastrand::seed(9);
    let h = Harness::new(&rules(
        "  - route: [{ destination: { host: reviews } }]
    mirrors:
    - { destination: { host: shadow }, percentage: { value: 20 } }
    - { destination: { host: details }, percentage: { value: 0 } }
",
    ));
    let n = 2_000;
    for _ in 0..n {
        h.ok(get("reviews:9080", "/")).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let seen = h.seen.lock().unwrap();
    let count = |host: &str| {
        seen.iter()
            .filter(|s| s.target.service.host.as_str() == host)
            .count()
    };
    assert_eq!(count("reviews.default.svc.cluster.local"), n);
    assert_eq!(count("details.default.svc.cluster.local"), 0);
    let share = count("shadow.default.svc.cluster.local") as f64 * 100.0 / n as f64;
    assert!((17.0..=23.0).contains(&share), "{share}%");
}

#[tokio::test]
async fn cors_preflight_is_answered_and_actual_responses_get_headers() {
    let h = Harness::new(&rules(
        "  - corsPolicy:
      allowOrigins: [{ exact: 'https://example.com' }]
      allowMethods: [GET, POST]
      allowHeaders: [x-token]
      exposeHeaders: [x-target]
      maxAge: 1h
    route: [{ destination: { host: reviews } }]
",
    ));
    let preflight = Request::builder()
        .method(Method::OPTIONS)
        .uri("/api")
        .header("host", "reviews:9080")
        .header("origin", "https://example.com")
        .header("access-control-request-method", "POST")
        .body(body::empty())
        .unwrap();
    let resp = h.ok(preflight).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://example.com"
    );
    assert_eq!(resp.headers()["access-control-allow-methods"], "GET,POST");
    assert_eq!(resp.headers()["access-control-allow-headers"], "x-token");
    assert_eq!(resp.headers()["access-control-max-age"], "3600");
    assert!(
        h.seen.lock().unwrap().is_empty(),
        "the preflight never reached the service"
    );

    let resp = h
        .ok(with_header(
            get("reviews:9080", "/api"),
            "origin",
            "https://example.com",
        ))
        .await;
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://example.com"
    );
    assert_eq!(resp.headers()["access-control-expose-headers"], "x-target");
    let resp = h
        .ok(with_header(
            get("reviews:9080", "/api"),
            "origin",
            "https://evil.test",
        ))
        .await;
    assert!(resp.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test(start_paused = true)]
async fn a_swapped_table_applies_to_new_requests_while_in_flight_ones_finish_on_the_old_route() {
    let h = Harness::new(&rules(
        "  - fault: { delay: { fixedDelay: 10s, percentage: { value: 100 } } }
    route: [{ destination: { host: reviews, subset: v1 } }]
",
    ));
    let in_flight = tokio::spawn(h.router.clone().oneshot(get("reviews:9080", "/")));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(h.seen.lock().unwrap().is_empty(), "still in its delay");

    h.table.store(Arc::new(table(&rules(
        "  - route: [{ destination: { host: reviews, subset: v3 } }]\n",
    ))));
    let resp = h.ok(get("reviews:9080", "/")).await;
    assert_eq!(
        resp.headers()["x-target"],
        "reviews.default.svc.cluster.local:9080/v3",
        "no restart needed"
    );

    let old = in_flight.await.unwrap().unwrap();
    assert_eq!(
        old.headers()["x-target"],
        "reviews.default.svc.cluster.local:9080/v1"
    );
    assert_eq!(
        old.extensions().get::<ResponseFlags>(),
        Some(&ResponseFlags::DELAY_INJECTED)
    );
}
