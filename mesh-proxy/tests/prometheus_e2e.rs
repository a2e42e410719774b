//! A real Prometheus server scrapes two real mTLS sidecars (`productpage` calling `reviews`)
//! and its HTTP API returns Istio's metrics with Istio's labels: the proof that what
//! `/metrics` serves is what Prometheus (and so Istio's dashboards and Kiali) can read.
//!
//! The `prometheus` binary comes from Debian's `prometheus` package, which `scripts/test.sh`
//! installs. Without it this test fails (it does not skip): a skipped test proves nothing.
#![allow(clippy::unwrap_used)] // a test that cannot set up should fail loudly

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::StatusCode;
use mesh_core::Identity;
use mesh_tls::ca::{CertificateAuthority, DEFAULT_TTL};
use serde_json::Value;
use support::app::App;
use support::pki::{STRICT, sidecar};
use support::{Client, get, http1_client, start_proxy, text};

const REVIEWS_FQDN: &str = "reviews.default.svc.cluster.local";

/// How long Prometheus gets to start, scrape and show what it scraped. Scrapes run every
/// second; the bound is for a loaded CI machine, not an expectation.
const PATIENCE: Duration = Duration::from_secs(30);

/// The `prometheus` executable on `PATH`, or a failure that says where it comes from.
fn prometheus_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("prometheus"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`prometheus` is not on PATH. This test runs a real Prometheus server; \
                 scripts/test.sh installs it (Debian package `prometheus`: \
                 apt-get install -y --no-install-recommends prometheus)"
            )
        })
}

/// Workload certificates for service account `sa` from `ca`, written as `dir/sa/{cert,key,
/// root}.pem` (the files a Bootstrap's `identity` names).
fn issue(ca: &CertificateAuthority, dir: &Path, sa: &str) -> PathBuf {
    let id = Identity::parse(&format!("spiffe://cluster.local/ns/default/sa/{sa}")).unwrap();
    let out = dir.join(sa);
    ca.issue(&id, DEFAULT_TTL).unwrap().save(&out).unwrap();
    out
}

/// A Prometheus server of our own (not the Debian package's service, which may hold 9090),
/// killed when dropped so a failing test leaves no process behind.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping each `(job, target, metrics_path)` every second, and waits
    /// until it is ready.
    async fn start(jobs: &[(&str, SocketAddr, &str)]) -> Prometheus {
        let binary = prometheus_binary();
        let mut scrape = String::new();
        for (job, target, path) in jobs {
            scrape.push_str(&format!(
                "  - job_name: {job}\n    metrics_path: {path}\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ));
        }
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{scrape}"
        );
        // A free port can be taken between our probe and Prometheus' bind; then it exits at
        // once, and another port is tried.
        let mut failures = Vec::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("prometheus.yml"), &config).unwrap();
            let addr = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
            let child = Command::new(&binary)
                .current_dir(dir.path())
                .arg(format!(
                    "--config.file={}",
                    dir.path().join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
            let mut prometheus = Prometheus { child, addr, dir };
            match prometheus.wait_ready().await {
                Ok(()) => return prometheus,
                Err(why) => failures.push(why),
            }
        }
        panic!("Prometheus did not start:\n{}", failures.join("\n---\n"));
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Polls `/-/ready`; an early exit or a timeout is an error carrying the server's log.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let client = http1_client();
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!("prometheus exited ({status}):\n{}", self.log()));
            }
            let req = get(self.addr, &self.addr.to_string(), "/-/ready");
            if let Ok(resp) = client.request(req).await
                && resp.status() == StatusCode::OK
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("not ready after {PATIENCE:?}:\n{}", self.log()))
    }

    /// `GET` an API path; the `data` of a `success` answer.
    async fn api(&self, client: &Client, path_and_query: &str) -> Value {
        let req = get(self.addr, &self.addr.to_string(), path_and_query);
        let resp = client.request(req).await.unwrap();
        let status = resp.status();
        let body = text(resp).await;
        assert_eq!(status, StatusCode::OK, "{path_and_query}: {body}");
        let json: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["status"], "success", "{path_and_query}: {body}");
        json["data"].clone()
    }

    /// The instant vector `query` returns, as (labels, value) pairs.
    async fn query(&self, client: &Client, query: &str) -> Vec<(Value, f64)> {
        let data = self
            .api(client, &format!("/api/v1/query?query={}", encode(query)))
            .await;
        assert_eq!(data["resultType"], "vector", "{data}");
        data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let value = s["value"][1].as_str().unwrap().parse::<f64>().unwrap();
                (s["metric"].clone(), value)
            })
            .collect()
    }

    /// Polls `istio_requests_total` until `done` holds for the result; on timeout fails with
    /// the last result, the scrape targets' health and Prometheus' log.
    async fn wait_for<F>(&self, client: &Client, what: &str, done: F) -> Vec<(Value, f64)>
    where
        F: Fn(&[(Value, f64)]) -> bool,
    {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let series = self.query(client, "istio_requests_total").await;
            if done(&series) {
                return series;
            }
            if Instant::now() > deadline {
                let targets = self.api(client, "/api/v1/targets").await;
                panic!(
                    "after {PATIENCE:?}, Prometheus still lacks {what}.\n\
                     istio_requests_total: {series:#?}\ntargets: {targets:#}\nlog:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Percent-encodes a query parameter (PromQL has braces, quotes, `=` and spaces).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of label `name` of a series, `""` when absent.
fn label<'a>(metric: &'a Value, name: &str) -> &'a str {
    metric[name].as_str().unwrap_or("")
}

/// The series of `reporter` with `response_code`.
fn find<'a>(
    series: &'a [(Value, f64)],
    reporter: &str,
    response_code: &str,
) -> Vec<&'a (Value, f64)> {
    series
        .iter()
        .filter(|(m, _)| {
            label(m, "reporter") == reporter && label(m, "response_code") == response_code
        })
        .collect()
}

/// `n` calls from the productpage app to `host` through its sidecar, each answered `status`.
async fn calls(client: &Client, outbound: SocketAddr, host: &str, n: usize, status: StatusCode) {
    for _ in 0..n {
        let resp = client.request(get(outbound, host, "/")).await.unwrap();
        assert_eq!(resp.status(), status, "{host}");
        // The metrics are recorded when the response body ends.
        text(resp).await;
    }
}

#[tokio::test]
async fn prometheus_scrapes_istio_metrics_from_two_mtls_sidecars() {
    // Before any setup: without the binary nothing below can be checked.
    prometheus_binary();

    let certs = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let app = App::start("reviews").await;
    let server = start_proxy(&format!(
        "{}{STRICT}{}",
        sidecar(
            "reviews",
            Some(app.addr),
            &issue(&ca, certs.path(), "reviews")
        ),
        // Only the service's name and port matter on this side; its own endpoint is not
        // known before it starts.
        support::reviews_entry(app.addr, Some("reviews"))
    ))
    .await;
    let client_sidecar = start_proxy(&format!(
        "{}{}",
        sidecar(
            "productpage",
            None,
            &issue(&ca, certs.path(), "productpage")
        ),
        support::reviews_entry(server.inbound_addr().unwrap(), Some("reviews"))
    ))
    .await;
    let outbound = client_sidecar.outbound_addr().unwrap();
    let http = http1_client();

    // Known traffic before the first scrape: 3 calls through both sidecars, and one to a
    // host no sidecar knows (404 NR, reported by the caller's sidecar only).
    calls(&http, outbound, "reviews:9080", 3, StatusCode::OK).await;
    calls(&http, outbound, "ratings:9080", 1, StatusCode::NOT_FOUND).await;
    assert_eq!(
        app.received.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "the app saw other traffic than the test's"
    );

    // productpage's sidecar on `/metrics`, reviews' on Envoy's `/stats/prometheus`.
    let prometheus = Prometheus::start(&[
        ("productpage", client_sidecar.admin_addr(), "/metrics"),
        ("reviews", server.admin_addr(), "/stats/prometheus"),
    ])
    .await;

    let count_is = |n: f64| {
        move |s: &[(Value, f64)]| {
            let ok = |reporter| {
                let found = find(s, reporter, "200");
                found.len() == 1 && found[0].1 == n
            };
            ok("source") && ok("destination") && !find(s, "source", "404").is_empty()
        }
    };
    let series = prometheus
        .wait_for(&http, "3 calls reported by both sidecars", count_is(3.0))
        .await;

    // The caller's report: its own workload, and the callee's learned over the mTLS
    // connection's metadata exchange.
    let (source, _) = find(&series, "source", "200")[0];
    for (name, want) in [
        ("job", "productpage"),
        ("instance", client_sidecar.admin_addr().to_string().as_str()),
        ("source_workload", "productpage"),
        ("source_workload_namespace", "default"),
        ("source_canonical_service", "productpage"),
        ("destination_workload", "reviews"),
        ("destination_workload_namespace", "default"),
        ("destination_canonical_service", "reviews"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/default/sa/reviews",
        ),
        ("destination_service", REVIEWS_FQDN),
        ("destination_service_name", "reviews"),
        ("destination_service_namespace", "default"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("response_flags", "-"),
        // Istio's source reports do not claim a policy.
        ("connection_security_policy", "unknown"),
    ] {
        assert_eq!(label(source, name), want, "{name} of {source:#}");
    }

    // The callee's report, from the other sidecar through the other metrics path.
    let (destination, _) = find(&series, "destination", "200")[0];
    for (name, want) in [
        ("job", "reviews"),
        ("instance", server.admin_addr().to_string().as_str()),
        ("source_workload", "productpage"),
        ("source_workload_namespace", "default"),
        ("source_canonical_service", "productpage"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/default/sa/productpage",
        ),
        ("destination_workload", "reviews"),
        ("destination_workload_namespace", "default"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/default/sa/reviews",
        ),
        ("destination_service", REVIEWS_FQDN),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ] {
        assert_eq!(label(destination, name), want, "{name} of {destination:#}");
    }

    // The unrouted call: the caller's sidecar answered it, nobody served it.
    let nr = find(&series, "source", "404");
    assert_eq!(nr.len(), 1, "{series:#?}");
    let (nr, count) = nr[0];
    assert_eq!(*count, 1.0);
    assert_eq!(label(nr, "response_flags"), "NR", "{nr:#}");
    assert_eq!(label(nr, "source_workload"), "productpage", "{nr:#}");
    assert_eq!(label(nr, "destination_service"), "unknown", "{nr:#}");
    assert_eq!(label(nr, "destination_workload"), "unknown", "{nr:#}");
    assert!(
        find(&series, "destination", "404").is_empty(),
        "{series:#?}"
    );
    // Nothing else: one series per reporter and outcome.
    assert_eq!(series.len(), 3, "{series:#?}");

    // Traffic while Prometheus scrapes: later scrapes see the counters grow.
    calls(&http, outbound, "reviews:9080", 2, StatusCode::OK).await;
    prometheus
        .wait_for(&http, "5 calls reported by both sidecars", count_is(5.0))
        .await;

    // The other families came through too: the duration histogram with one observation per
    // call on each side, and the body-size histograms.
    let durations = prometheus
        .query(
            &http,
            &format!(
                "istio_request_duration_milliseconds_count{{destination_service=\"{REVIEWS_FQDN}\"}}"
            ),
        )
        .await;
    let mut by_reporter: Vec<_> = durations
        .iter()
        .map(|(m, v)| (label(m, "reporter").to_owned(), *v))
        .collect();
    by_reporter.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        by_reporter,
        [("destination".to_owned(), 5.0), ("source".to_owned(), 5.0)],
        "{durations:#?}"
    );
    let names = prometheus
        .api(
            &http,
            &format!(
                "/api/v1/label/__name__/values?{}",
                encode_match("{job=~\"productpage|reviews\"}")
            ),
        )
        .await;
    let names: Vec<&str> = names
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    for name in [
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
        "istio_request_duration_milliseconds_sum",
        "istio_request_bytes_bucket",
        "istio_response_bytes_bucket",
        "process_resident_memory_bytes",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }

    // The series API agrees: each sidecar exported its reporter's series for the service.
    let found = prometheus
        .api(
            &http,
            &format!(
                "/api/v1/series?{}",
                encode_match(&format!(
                    "istio_requests_total{{destination_service=\"{REVIEWS_FQDN}\"}}"
                ))
            ),
        )
        .await;
    let mut jobs: Vec<(&str, &str)> = found
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (label(m, "job"), label(m, "reporter")))
        .collect();
    jobs.sort();
    assert_eq!(
        jobs,
        [("productpage", "source"), ("reviews", "destination")],
        "{found:#}"
    );

    // Prometheus goes first, so it never scrapes a sidecar that is shutting down.
    drop(prometheus);
    drop(server);
}

/// `match[]=SELECTOR`, encoded.
fn encode_match(selector: &str) -> String {
    format!("match%5B%5D={}", encode(selector))
}
