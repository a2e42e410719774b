//! The Bookinfo launcher end to end: the real binary, its 13 child processes (six apps, six
//! sidecars, the ingress gateway), real sockets on loopback, on a free port range.
// Test code: a failed unwrap is a failed test, and says so best.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use examples::bookinfo::apps::productpage::{REVIEWS_ERROR, reviews_version};
use examples::bookinfo::apps::reviews::RATINGS_UNAVAILABLE;
use examples::bookinfo::topology::{PORT_SPAN, Ports, WORKLOADS, ingress_gateway, productpage};
use http_body_util::BodyExt;
use mesh_core::body::{self, BoxBody};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A port base whose whole span is free now (and stays clear of the kernel's ephemeral
/// range). Tests in this binary run at once, so each gets its own slice of a range that starts
/// at a random place.
fn free_port_base() -> u16 {
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU16> = std::sync::OnceLock::new();
    let next =
        NEXT.get_or_init(|| std::sync::atomic::AtomicU16::new(fastrand::u16(20_000..26_000)));
    for _ in 0..100 {
        let base = next.fetch_add(PORT_SPAN + 10, std::sync::atomic::Ordering::Relaxed);
        if base > 32_000 - PORT_SPAN {
            next.store(20_000, std::sync::atomic::Ordering::Relaxed);
            continue;
        }
        let free = (base..base + PORT_SPAN).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok());
        if free {
            return base;
        }
    }
    panic!("no free range of {PORT_SPAN} ports in 20000..32000");
}

/// The launcher as a child of the test.
struct Launcher {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    /// Everything it printed, for failure messages.
    output: Arc<Mutex<Vec<String>>>,
    ports: Ports,
    runtime_dir: PathBuf,
}

impl Launcher {
    /// Starts `bookinfo --port-base B ARGS...` and waits for its "Bookinfo is up" line.
    fn start(args: &[&str]) -> Launcher {
        let base = free_port_base();
        let mut child = Command::new(env!("CARGO_BIN_EXE_bookinfo"))
            .arg("--port-base")
            .arg(base.to_string())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let (out, tx_out) = (output.clone(), tx.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                out.lock().unwrap().push(line.clone());
                let _ = tx_out.send(line);
            }
        });
        let stderr = child.stderr.take().unwrap();
        let err = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                err.lock().unwrap().push(format!("stderr: {line}"));
                let _ = tx.send(format!("stderr: {line}"));
            }
        });
        let stdin = child.stdin.take().unwrap();
        let mut launcher = Launcher {
            child,
            stdin,
            lines,
            output,
            ports: Ports::new(base).unwrap(),
            runtime_dir: PathBuf::new(),
        };
        launcher.wait_line(
            |l| l.starts_with("Bookinfo is up"),
            Duration::from_secs(120),
        );
        let dir = launcher.wait_line(
            |l| l.trim_start().starts_with("runtime dir"),
            Duration::from_secs(5),
        );
        launcher.runtime_dir =
            PathBuf::from(dir.trim_start().trim_start_matches("runtime dir").trim());
        launcher
    }

    /// Waits for a line the launcher prints (stdout or stderr) that satisfies `pred`.
    fn wait_line(&mut self, pred: impl Fn(&str) -> bool, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return line,
                Ok(_) => {}
                Err(_) => panic!(
                    "the launcher did not print the expected line within {within:?}; it printed:\n{}",
                    self.printed()
                ),
            }
        }
    }

    fn printed(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// Types a line on the launcher's stdin.
    fn type_line(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    /// The pids of the launcher's children, from /proc.
    fn children(&self) -> Vec<i32> {
        let me = self.pid();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // pid (comm) state ppid ...; comm may hold spaces, so split after the last ')'.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            if rest
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<i32>().ok())
                == Some(me)
            {
                pids.push(pid);
            }
        }
        pids
    }

    /// Sends SIGTERM and waits for the launcher's exit code.
    fn terminate(&mut self) -> Option<i32> {
        kill(Pid::from_raw(self.pid()), Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "the launcher did not exit within 30 s of SIGTERM; it printed:\n{}",
                self.printed()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM; asserts exit code 0, every child gone and the runtime dir removed.
    fn stop_cleanly(mut self) {
        let children = self.children();
        assert_eq!(
            children.len(),
            13,
            "expected 13 child processes (6 apps, 6 sidecars, the gateway), found {children:?}"
        );
        let code = self.terminate();
        assert_eq!(code, Some(0), "launcher output:\n{}", self.printed());
        for pid in children {
            assert!(
                !std::path::Path::new(&format!("/proc/{pid}")).exists(),
                "child {pid} outlived the launcher"
            );
        }
        assert!(
            !self.runtime_dir.as_os_str().is_empty() && !self.runtime_dir.exists(),
            "runtime dir {} not removed",
            self.runtime_dir.display()
        );
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

type Client =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, BoxBody>;

fn client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// What a GET answered.
#[derive(Debug)]
struct Page {
    status: u16,
    body: String,
    took: Duration,
}

impl Page {
    fn version(&self) -> Option<&str> {
        reviews_version(&self.body)
    }
}

/// `GET http://{addr}{path}` with an optional `Host` and `Cookie`, within 20 s.
async fn get(
    client: &Client,
    addr: SocketAddr,
    host: Option<&str>,
    path: &str,
    cookie: Option<&str>,
) -> Result<Page, String> {
    let mut req = http::Request::get(format!("http://{addr}{path}"));
    if let Some(host) = host {
        req = req.header("host", host);
    }
    if let Some(cookie) = cookie {
        req = req.header("cookie", cookie);
    }
    let req = req.body(body::empty()).unwrap();
    let started = Instant::now();
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Page {
            status,
            body: String::from_utf8_lossy(&bytes).into_owned(),
            took: started.elapsed(),
        })
    };
    tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .map_err(|_| format!("http://{addr}{path} did not answer within 20 s"))?
}

/// The product page through the ingress gateway.
async fn via_gateway(client: &Client, l: &Launcher, user: Option<&str>) -> Result<Page, String> {
    let cookie = user.map(|u| format!("user={u}"));
    get(
        client,
        l.ports.gateway(),
        None,
        "/productpage",
        cookie.as_deref(),
    )
    .await
}

/// Polls `probe` until `done` holds for its answer, at most `within`.
async fn poll_until<F, Fut>(
    what: &str,
    within: Duration,
    mut probe: F,
    done: impl Fn(&Page) -> bool,
) -> Page
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Page, String>>,
{
    let deadline = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < deadline {
        match probe().await {
            Ok(page) if done(&page) => return page,
            Ok(page) => {
                last = format!(
                    "status {} version {:?} after {:?}",
                    page.status,
                    page.version(),
                    page.took
                )
            }
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not within {within:?}; last answer: {last}");
}

fn assert_full_page(page: &Page, version: &str) {
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(page.version(), Some(version), "{}", page.body);
    assert!(
        page.body.contains("<dt>ISBN-10:</dt><dd>1234567890</dd>"),
        "no details: {}",
        page.body
    );
    assert!(!page.body.contains("Error fetching"), "{}", page.body);
}

/// `istio_requests_total` lines of a proxy's `/metrics`.
async fn requests_total(client: &Client, admin: SocketAddr) -> Vec<String> {
    let page = get(client, admin, None, "/metrics", None).await.unwrap();
    page.body
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .map(str::to_owned)
        .collect()
}

/// Through productpage's sidecar (no gateway needed): every hop is mTLS, the metrics say so,
/// and SIGTERM stops all 13 processes with exit code 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_runs_over_mutual_tls_and_stops_cleanly() {
    let l = Launcher::start(&[]);
    let client = client();
    let outbound = l.ports.outbound(productpage());
    for user in [None, Some("user=jason")] {
        let page = get(
            &client,
            outbound,
            Some("productpage:9080"),
            "/productpage",
            user,
        )
        .await
        .unwrap();
        assert_full_page(&page, "v1");
    }
    let api = get(
        &client,
        outbound,
        Some("productpage:9080"),
        "/api/v1/products/0/ratings",
        None,
    )
    .await
    .unwrap();
    assert_eq!(api.status, 200, "{}", api.body);
    assert!(api.body.contains("\"Reviewer1\":5"), "{}", api.body);

    // Each workload that served a request reported it as the destination over mutual TLS,
    // with the caller's SPIFFE principal; none reported a plain-text request.
    for (w, caller) in [
        ("productpage-v1", "productpage"),
        ("details-v1", "productpage"),
        ("reviews-v1", "productpage"),
        ("ratings-v1", "productpage"),
    ] {
        let admin = l
            .ports
            .admin(WORKLOADS.iter().find(|x| x.name == w).unwrap());
        let lines = requests_total(&client, admin).await;
        let destination: Vec<_> = lines
            .iter()
            .filter(|l| l.contains("reporter=\"destination\""))
            .collect();
        assert!(
            destination.iter().any(|l| {
                l.contains("connection_security_policy=\"mutual_tls\"")
                && l.contains("response_code=\"200\"")
                && l.contains(&format!(
                    "source_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-{caller}\""
                ))
            }),
            "{w}: no mutual_tls destination report: {destination:#?}"
        );
        assert!(
            destination
                .iter()
                .all(|l| l.contains("connection_security_policy=\"mutual_tls\"")),
            "{w}: a destination report without mutual_tls: {destination:#?}"
        );
    }
    l.stop_cleanly();
}

/// The ingress gateway serves Istio's `bookinfo` VirtualService: the product page with details
/// and reviews v1 under all-v1, the API, and 404 elsewhere; productpage sees the gateway's
/// identity over mutual TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_serves_the_product_page() {
    let l = Launcher::start(&[]);
    let client = client();
    let page = poll_until(
        "the product page through the gateway",
        Duration::from_secs(10),
        || via_gateway(&client, &l, None),
        |p| p.status == 200,
    )
    .await;
    assert_full_page(&page, "v1");
    assert_full_page(
        &via_gateway(&client, &l, Some("jason")).await.unwrap(),
        "v1",
    );
    let api = get(&client, l.ports.gateway(), None, "/api/v1/products", None)
        .await
        .unwrap();
    assert_eq!(api.status, 200);
    assert!(api.body.contains("The Comedy of Errors"));
    let css = get(
        &client,
        l.ports.gateway(),
        None,
        "/static/bookinfo.css",
        None,
    )
    .await
    .unwrap();
    assert_eq!(css.status, 200);
    let other = get(&client, l.ports.gateway(), None, "/details/0", None)
        .await
        .unwrap();
    assert_eq!(
        other.status, 404,
        "only the bookinfo VirtualService's paths are exposed"
    );

    let lines = requests_total(&client, l.ports.admin(productpage())).await;
    assert!(
        lines.iter().any(|l| l.contains("reporter=\"destination\"")
            && l.contains("source_principal=\"spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account\"")
            && l.contains("connection_security_policy=\"mutual_tls\"")),
        "productpage has no mutual_tls report of the gateway's requests: {lines:#?}"
    );
    let gw = requests_total(&client, l.ports.admin(ingress_gateway())).await;
    assert!(
        gw.iter().any(|l| l.contains("reporter=\"source\"")
            && l.contains("destination_service=\"productpage.default.svc.cluster.local\"")),
        "the gateway reports no requests to productpage: {gw:#?}"
    );
    l.stop_cleanly();
}

/// Scenarios typed on the launcher's stdin switch the routing live: jason-v2 (by name),
/// canary-90-10 (by number) within ±5 points over 1,000 requests, ratings-delay (2 s for
/// jason, against a 1 s productpage timeout) and ratings-abort.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scenarios_switch_live() {
    let mut l = Launcher::start(&["--fault-delay", "2s", "--reviews-timeout", "1s"]);
    let client = client();
    let jason = poll_until(
        "jason's page through the gateway under all-v1",
        Duration::from_secs(10),
        || via_gateway(&client, &l, Some("jason")),
        |p| p.status == 200,
    )
    .await;
    assert_full_page(&jason, "v1");

    // jason-v2: jason sees reviews v2 with black stars, everyone else v1.
    l.type_line("jason-v2");
    l.wait_line(
        |s| s.starts_with("scenario jason-v2 (2)"),
        Duration::from_secs(5),
    );
    let jason = poll_until(
        "jason sees v2 after switching to jason-v2",
        Duration::from_secs(10),
        || via_gateway(&client, &l, Some("jason")),
        |p| p.version() == Some("v2"),
    )
    .await;
    assert_full_page(&jason, "v2");
    assert_eq!(jason.body.matches("data-color=\"black\"").count(), 2);
    for _ in 0..20 {
        assert_full_page(&via_gateway(&client, &l, None).await.unwrap(), "v1");
    }

    // canary-90-10 (typed as its number): jason is no longer pinned to v2 once it applies.
    l.type_line("3");
    l.wait_line(
        |s| s.starts_with("scenario canary-90-10 (3)"),
        Duration::from_secs(5),
    );
    poll_until(
        "jason sees v1 after switching to canary-90-10",
        Duration::from_secs(10),
        || via_gateway(&client, &l, Some("jason")),
        |p| p.version() == Some("v1"),
    )
    .await;
    let counts = Arc::new(Mutex::new(
        std::collections::BTreeMap::<String, usize>::new(),
    ));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (client, counts, next, gateway) = (
            client.clone(),
            counts.clone(),
            next.clone(),
            l.ports.gateway(),
        );
        workers.spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 1000 {
                let page = get(&client, gateway, None, "/productpage", None)
                    .await
                    .unwrap();
                let key = match (page.status, page.version()) {
                    (200, Some(v)) => v.to_owned(),
                    (s, v) => format!("status {s} version {v:?}"),
                };
                *counts.lock().unwrap().entry(key).or_default() += 1;
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        r.unwrap();
    }
    let counts = counts.lock().unwrap().clone();
    let (v1, v2) = (
        counts.get("v1").copied().unwrap_or(0),
        counts.get("v2").copied().unwrap_or(0),
    );
    assert_eq!(v1 + v2, 1000, "every page from v1 or v2: {counts:?}");
    assert!(
        (50..=150).contains(&v2),
        "v2 should get 10% ± 5 points of 1,000: {counts:?}"
    );

    // ratings-delay: jason's reviews (v2) wait 2 s for ratings; productpage gives up after
    // 1 s, twice, and shows the error. Everyone else is fast.
    l.type_line("ratings-delay");
    l.wait_line(
        |s| s.starts_with("scenario ratings-delay (5)"),
        Duration::from_secs(5),
    );
    let slow = poll_until(
        "jason's page shows the reviews error under ratings-delay",
        Duration::from_secs(20),
        || via_gateway(&client, &l, Some("jason")),
        |p| p.body.contains(REVIEWS_ERROR),
    )
    .await;
    assert_eq!(slow.status, 200, "the page still renders");
    assert!(
        slow.took >= Duration::from_millis(1900),
        "two 1 s attempts at reviews: {:?}",
        slow.took
    );
    assert!(
        slow.body.contains("<dt>ISBN-10:</dt>"),
        "details still shown"
    );
    let fast = via_gateway(&client, &l, None).await.unwrap();
    assert_full_page(&fast, "v1");
    assert!(
        fast.took < Duration::from_millis(900),
        "others are not delayed: {:?}",
        fast.took
    );

    // ratings-abort: jason's ratings answer 500; reviews v2 says so in each review.
    l.type_line("6");
    l.wait_line(
        |s| s.starts_with("scenario ratings-abort (6)"),
        Duration::from_secs(5),
    );
    let aborted = poll_until(
        "jason's page shows ratings unavailable under ratings-abort",
        Duration::from_secs(10),
        || via_gateway(&client, &l, Some("jason")),
        |p| p.body.contains(RATINGS_UNAVAILABLE),
    )
    .await;
    assert_full_page(&aborted, "v2");
    assert_eq!(aborted.body.matches(RATINGS_UNAVAILABLE).count(), 2);

    l.stop_cleanly();
}

/// A child that dies on its own stops the launcher: every other child is stopped, the dead
/// one's log is quoted, the exit code is 1, and the runtime dir is kept for its logs.
#[test]
fn a_dead_child_stops_the_mesh() {
    let mut l = Launcher::start(&[]);
    let children = l.children();
    let details = children
        .iter()
        .copied()
        .find(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.windows(2)
                .any(|w| w[0] == b"app" && w[1] == b"details")
        })
        .expect("the details app is a child of the launcher");
    kill(Pid::from_raw(details), Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(status) = l.child.try_wait().unwrap() {
            break status.code();
        }
        assert!(
            Instant::now() < deadline,
            "launcher still running:\n{}",
            l.printed()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // Let the output threads drain.
    l.wait_line(|s| s.contains("details-v1 (pid"), Duration::from_secs(5));
    assert_eq!(code, Some(1), "{}", l.printed());
    for pid in children {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "child {pid} outlived the launcher"
        );
    }
    assert!(l.runtime_dir.join("logs").join("details-v1.log").exists());
    std::fs::remove_dir_all(&l.runtime_dir).unwrap();
}

/// A port already taken is named, and the launcher exits non-zero without leaving anything.
#[test]
fn a_taken_port_fails_the_launch() {
    let base = free_port_base();
    let _taken = TcpListener::bind(("127.0.0.1", base + 10)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bookinfo"))
        .arg("--port-base")
        .arg(base.to_string())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("port {} (the productpage-v1 app)", base + 10)),
        "{err}"
    );
}
