//! Hot reload through a real sidecar: config files on disk, watched by directory, changed
//! under steady load; a change applies within 2 s without a failed request, an invalid one
//! is rejected and counted while the last good config keeps serving, and a Kubernetes
//! ConfigMap-style symlink swap is seen.

#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mesh_proxy::RunningProxy;
use support::app::App;
use support::{bootstrap, get, http1_client, service_entry_labeled, text, virtual_service};

/// The spec's bound: a valid change is in force within 2 s of the write.
const APPLY_BOUND: Duration = Duration::from_secs(2);

/// The config: two versions of `reviews`, and a VirtualService sending `v1_weight`% to v1.
fn mesh_yaml(v1: SocketAddr, v2: SocketAddr, v1_weight: u32) -> String {
    let v2_weight = 100 - v1_weight;
    format!(
        "{}{}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: reviews }}
spec:
  host: reviews
  subsets:
  - {{ name: v1, labels: {{ version: v1 }} }}
  - {{ name: v2, labels: {{ version: v2 }} }}
{}",
        bootstrap("client", None),
        service_entry_labeled("reviews", 9080, &[(v1, "v1"), (v2, "v2")]),
        virtual_service(
            "reviews",
            &format!(
                "  - route:
    - {{ destination: {{ host: reviews, subset: v1 }}, weight: {v1_weight} }}
    - {{ destination: {{ host: reviews, subset: v2 }}, weight: {v2_weight} }}
"
            )
        ),
    )
}

/// Replaces `path`'s content atomically, as `kubectl cp`, editors and config managers do.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn start(path: &Path) -> (RunningProxy, mesh_proxy::reload::ConfigWatch) {
    let config = mesh_core::config::load_files(&[path]).unwrap();
    let proxy = RunningProxy::start(Arc::new(config)).await.unwrap();
    let watch = proxy.watch_config(vec![path.to_path_buf()]).unwrap();
    (proxy, watch)
}

/// Which app answered a request for reviews through `outbound`.
async fn answered_by(client: &support::Client, outbound: SocketAddr) -> String {
    let resp = client
        .request(get(outbound, "reviews:9080", "/"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let app = resp.headers()["x-app"].to_str().unwrap().to_owned();
    text(resp).await;
    app
}

/// Polls until every one of 10 consecutive requests lands on `app`, within the bound.
async fn wait_for_all_to(client: &support::Client, outbound: SocketAddr, app: &str) -> Duration {
    let start = Instant::now();
    loop {
        let mut all = true;
        for _ in 0..10 {
            if answered_by(client, outbound).await != app {
                all = false;
                break;
            }
        }
        if all {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < APPLY_BOUND,
            "the change sending everything to {app} was not in force {APPLY_BOUND:?} after the write"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metrics(admin: SocketAddr) -> String {
    let resp = http1_client()
        .request(
            http::Request::get(format!("http://{admin}/metrics"))
                .body(mesh_core::body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    text(resp).await
}

fn metric_value(text: &str, line_prefix: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_changes_under_steady_load_fail_no_request_and_each_split_applies() {
    let v1 = App::start("v1").await;
    let v2 = App::start("v2").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    write_atomically(&path, &mesh_yaml(v1.addr, v2.addr, 100));
    let (proxy, _watch) = start(&path).await;
    let outbound = proxy.outbound_addr().unwrap();

    // Four clients keep requests flowing the whole time; every response must be a 200.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
        clients.spawn(async move {
            let client = http1_client();
            while !stop.load(Ordering::Relaxed) {
                let ok = match client.request(get(outbound, "reviews:9080", "/")).await {
                    Ok(resp) => {
                        let ok = resp.status() == 200;
                        text(resp).await;
                        ok
                    }
                    Err(_) => false,
                };
                sent.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }

    let probe = http1_client();
    wait_for_all_to(&probe, outbound, "v1").await;
    let mut slowest = Duration::ZERO;
    for change in 1..=20 {
        // Odd changes send everything to v2, even ones back to v1: each is visible.
        let (weight, app) = if change % 2 == 1 {
            (0, "v2")
        } else {
            (100, "v1")
        };
        write_atomically(&path, &mesh_yaml(v1.addr, v2.addr, weight));
        slowest = slowest.max(wait_for_all_to(&probe, outbound, app).await);
    }
    stop.store(true, Ordering::Relaxed);
    while clients.join_next().await.is_some() {}

    let sent = sent.load(Ordering::Relaxed);
    assert!(sent > 100, "the load ran ({sent} requests)");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "failed of {sent} requests"
    );
    let text = metrics(proxy.admin_addr()).await;
    assert_eq!(
        metric_value(&text, "mesh_config_reloads_total{result=\"success\"}"),
        Some(20.0),
        "{text}"
    );
    eprintln!("{sent} requests across 20 changes; slowest change applied in {slowest:?}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_change_is_rejected_and_counted_and_the_last_good_config_keeps_serving() {
    let v1 = App::start("v1").await;
    let v2 = App::start("v2").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    write_atomically(&path, &mesh_yaml(v1.addr, v2.addr, 100));
    let (proxy, _watch) = start(&path).await;
    let outbound = proxy.outbound_addr().unwrap();
    let admin = proxy.admin_addr();
    let client = http1_client();
    wait_for_all_to(&client, outbound, "v1").await;

    // A change to v2 with a misspelled field: the whole file is rejected.
    let invalid = mesh_yaml(v1.addr, v2.addr, 0).replace("subsets:", "subsetz:");
    write_atomically(&path, &invalid);
    let start = Instant::now();
    let text = loop {
        let text = metrics(admin).await;
        if metric_value(&text, "mesh_config_reloads_total{result=\"rejected\"}") == Some(1.0) {
            break text;
        }
        assert!(
            start.elapsed() < APPLY_BOUND,
            "no rejection counted:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        metric_value(&text, "mesh_config_last_reload_successful"),
        Some(0.0)
    );
    assert_eq!(
        metric_value(&text, "mesh_config_reloads_total{result=\"success\"}"),
        Some(0.0)
    );
    for _ in 0..20 {
        assert_eq!(
            answered_by(&client, outbound).await,
            "v1",
            "last good config"
        );
    }

    // Fixed: it applies, and the gauge says so.
    write_atomically(&path, &mesh_yaml(v1.addr, v2.addr, 0));
    wait_for_all_to(&client, outbound, "v2").await;
    let text = metrics(admin).await;
    assert_eq!(
        metric_value(&text, "mesh_config_last_reload_successful"),
        Some(1.0)
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_style_symlink_swap_is_seen() {
    // Kubernetes mounts a ConfigMap as DIR/mesh.yaml -> ..data/mesh.yaml, ..data ->
    // ..<timestamp>/, and updates it by renaming a new ..data symlink over the old one: the
    // file the proxy was given never changes as a directory entry.
    let v1 = App::start("v1").await;
    let v2 = App::start("v2").await;
    let dir = tempfile::tempdir().unwrap();
    let version = |n: u32, weight: u32| -> PathBuf {
        let d = dir.path().join(format!("..2026_12_07_{n}"));
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("mesh.yaml"), mesh_yaml(v1.addr, v2.addr, weight)).unwrap();
        d
    };
    let swap_data_to = |target: &Path| {
        let tmp = dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(target.file_name().unwrap(), &tmp).unwrap();
        std::fs::rename(&tmp, dir.path().join("..data")).unwrap();
    };
    swap_data_to(&version(1, 100));
    let path = dir.path().join("mesh.yaml");
    std::os::unix::fs::symlink("..data/mesh.yaml", &path).unwrap();
    let (proxy, _watch) = start(&path).await;
    let outbound = proxy.outbound_addr().unwrap();
    let client = http1_client();
    wait_for_all_to(&client, outbound, "v1").await;

    swap_data_to(&version(2, 0));
    wait_for_all_to(&client, outbound, "v2").await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn admin_mutations_are_post_only_and_post_drain_asks_for_a_drain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    write_atomically(&path, &bootstrap("client", None));
    let (proxy, _watch) = start(&path).await;
    let admin = proxy.admin_addr();
    let client = http1_client();
    let call = |method: &str, path: &str| {
        http::Request::builder()
            .method(method)
            .uri(format!("http://{admin}{path}"))
            .body(mesh_core::body::empty())
            .unwrap()
    };
    for path in ["/drain", "/logging?level=debug"] {
        let resp = client.request(call("GET", path)).await.unwrap();
        assert_eq!(resp.status(), 405, "GET {path}");
    }
    // In-process, the test owns logging: the proxy says it is not its to change.
    let resp = client
        .request(call("POST", "/logging?level=debug"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 501);
    assert!(text(resp).await.contains("not controlled by this proxy"));

    let resp = client.request(call("GET", "/ready")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = client.request(call("POST", "/drain")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = client.request(call("GET", "/ready")).await.unwrap();
    assert_eq!(
        resp.status(),
        503,
        "/ready turns 503 at once on POST /drain"
    );
    tokio::time::timeout(Duration::from_secs(5), proxy.drain_requested())
        .await
        .expect("POST /drain reaches the proxy's owner");
    proxy.shutdown().await;
}
