//! The Bookinfo launcher: one command that makes a CA and the certificates, writes the mesh
//! config, starts every app and every proxy as a child process, waits until all are ready,
//! prints the URLs, switches routing scenarios typed on stdin, optionally drives load, and
//! stops everything on Ctrl-C or SIGTERM.
//!
//! The binary (`src/bin/bookinfo.rs`) is a thin shell over [`main`]; the children are the
//! same executable run as `bookinfo sidecar run --config ...` (mesh-proxy's command line,
//! [`mesh_proxy::cli::main`]) and `bookinfo app NAME --listen ADDR ...` ([`app_main`]).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mesh_core::body::{self, BoxBody};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use super::apps::productpage::{self, reviews_version};
use super::apps::reviews::Version;
use super::apps::{self, App};
use super::children::{Children, Exited, die_with_parent};
use super::mesh::{self, RuntimeDir};
use super::scenario::{self, Scenario};
use super::topology::{self, Ports, Role, WORKLOADS, Workload};

/// The launcher's command line.
#[derive(Args, Debug, Clone)]
pub struct Options {
    /// The routing scenario to start with (name or number): 1 all-v1, 2 jason-v2,
    /// 3 canary-90-10, 4 v3, 5 ratings-delay, 6 ratings-abort. Type another one (or its
    /// number) and Enter to switch live.
    #[arg(long, default_value = "all-v1", value_parser = parse_scenario)]
    pub scenario: &'static Scenario,
    /// Move every port: the gateway listens on BASE, the apps and proxies on BASE+10..BASE+40.
    #[arg(long, default_value_t = topology::DEFAULT_PORT_BASE)]
    pub port_base: u16,
    /// Send this many requests per second to the product page through the gateway (half of
    /// them as jason), so the metrics move; a summary every 10 s.
    #[arg(long, value_name = "RPS")]
    pub load: Option<f64>,
    /// The delay the ratings-delay scenario injects for jason (Istio's task: 7s).
    #[arg(long, value_name = "DURATION")]
    pub fault_delay: Option<mesh_core::config::Duration>,
    /// productpage's client timeout for each of its two attempts at reviews (Bookinfo: 3s).
    #[arg(long, value_name = "DURATION", default_value = "3s")]
    pub reviews_timeout: mesh_core::config::Duration,
    /// Where to put certificates, config and logs (default: a new directory under the system
    /// temp dir, removed on exit). A directory given here is kept.
    #[arg(long, value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
    /// Keep the runtime directory on exit.
    #[arg(long)]
    pub keep_runtime_dir: bool,
    /// How long every app and proxy may take to become ready.
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    pub startup_timeout: mesh_core::config::Duration,
}

fn parse_scenario(s: &str) -> Result<&'static Scenario, String> {
    scenario::find(s).ok_or_else(|| format!("unknown scenario {s:?}; one of {}", scenario::menu()))
}

/// Which Bookinfo app a child runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AppName {
    Productpage,
    Details,
    Reviews,
    Ratings,
}

/// `bookinfo app NAME ...`: one Bookinfo app (a child of the launcher).
#[derive(Args, Debug, Clone)]
pub struct AppOptions {
    pub name: AppName,
    /// Where the app listens (its sidecar's inbound `app`).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Its sidecar's outbound listener (productpage and reviews call through it).
    #[arg(long)]
    pub outbound: Option<SocketAddr>,
    /// The reviews version.
    #[arg(long, default_value = "v1")]
    pub version: Version,
    /// productpage's timeout per attempt at reviews.
    #[arg(long, default_value = "3s")]
    pub reviews_timeout: mesh_core::config::Duration,
}

impl AppOptions {
    fn app(&self) -> anyhow::Result<App> {
        let outbound = || {
            self.outbound
                .with_context(|| format!("the {:?} app needs --outbound", self.name))
        };
        Ok(match self.name {
            AppName::Productpage => App::Productpage(productpage::Settings {
                reviews_timeout: self.reviews_timeout.get(),
                ..productpage::Settings::new(outbound()?)
            }),
            AppName::Details => App::Details,
            AppName::Ratings => App::Ratings,
            AppName::Reviews => App::Reviews(apps::reviews::Settings {
                version: self.version,
                outbound: match self.version {
                    Version::V1 => self.outbound,
                    _ => Some(outbound()?),
                },
            }),
        })
    }

    /// The command line that runs this app.
    pub fn to_args(&self) -> Vec<OsString> {
        let name = match self.name {
            AppName::Productpage => "productpage",
            AppName::Details => "details",
            AppName::Reviews => "reviews",
            AppName::Ratings => "ratings",
        };
        let mut args: Vec<OsString> = vec![
            "app".into(),
            name.into(),
            "--listen".into(),
            self.listen.to_string().into(),
            "--version".into(),
            self.version.as_str().into(),
            "--reviews-timeout".into(),
            self.reviews_timeout.to_string().into(),
        ];
        if let Some(outbound) = self.outbound {
            args.push("--outbound".into());
            args.push(outbound.to_string().into());
        }
        args
    }
}

fn app_options(w: &Workload, ports: &Ports, reviews_timeout: Duration) -> Option<AppOptions> {
    let (name, version, outbound) = match w.role {
        Role::Productpage => (AppName::Productpage, Version::V1, true),
        Role::Details => (AppName::Details, Version::V1, false),
        Role::Ratings => (AppName::Ratings, Version::V1, false),
        Role::Reviews(v) => (AppName::Reviews, v, v != Version::V1),
        Role::IngressGateway => return None,
    };
    Some(AppOptions {
        name,
        listen: ports.app(w),
        outbound: outbound.then(|| ports.outbound(w)),
        version,
        reviews_timeout: mesh_core::config::Duration(reviews_timeout),
    })
}

/// Runs one app until SIGTERM or SIGINT; exits 0 then.
pub fn app_main(opts: &AppOptions) -> ExitCode {
    die_with_parent();
    init_logging();
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")
        .and_then(|rt| rt.block_on(run_app(opts)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_app(opts: &AppOptions) -> anyhow::Result<()> {
    let app = opts.app()?;
    let name = app.workload();
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("{name} cannot listen on {}", opts.listen))?;
    tracing::info!("{name} listening on {}", opts.listen);
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        () = apps::serve(listener, app) => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("{name} stopping");
    Ok(())
}

/// `bookinfo sidecar ARGS...`: mesh-proxy's command line (`run --config ...`).
pub fn sidecar_main(args: Vec<OsString>) -> ExitCode {
    die_with_parent();
    let argv = std::iter::once(OsString::from("mesh-proxy")).chain(args);
    mesh_proxy::cli::main(argv)
}

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs the launcher; `exe` is the executable its children run (normally itself).
pub fn main(opts: Options, exe: PathBuf) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // `block_on` runs the launcher on this (the main) thread, so the children it forks get
    // their parent-death signal only when the launcher itself exits.
    let code = match runtime.block_on(run(opts, exe)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

/// Fails naming the first address already taken.
pub fn check_ports_free(ports: &Ports) -> anyhow::Result<()> {
    for (what, addr) in ports.all() {
        if let Err(e) = TcpListener::bind(addr) {
            bail!(
                "port {} ({what}) is not free: {e}; pick other ports with --port-base (the mesh uses {}..{})",
                addr.port(),
                ports.base(),
                ports.base() + topology::PORT_SPAN
            );
        }
    }
    Ok(())
}

/// Signals and stdin lines, set up before anything starts so none is missed.
struct Inputs {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    stdin: mpsc::UnboundedReceiver<String>,
}

impl Inputs {
    fn new() -> anyhow::Result<Inputs> {
        let term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        // A plain thread: a blocked read of stdin must not hold up the runtime's shutdown.
        let (tx, stdin) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                let mut line = String::new();
                while matches!(std::io::stdin().read_line(&mut line), Ok(n) if n > 0) {
                    if tx.send(std::mem::take(&mut line)).is_err() {
                        break;
                    }
                }
            })
            .context("cannot start the stdin reader")?;
        Ok(Inputs { term, int, stdin })
    }
}

/// Waits for SIGTERM or SIGINT; returns its name.
async fn stop_signal(
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) -> &'static str {
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// The whole launcher run: set up, start, serve, stop. Every child has exited when it
/// returns.
pub async fn run(opts: Options, exe: PathBuf) -> anyhow::Result<()> {
    let mut inputs = Inputs::new()?;
    let ports = Ports::new(opts.port_base).map_err(anyhow::Error::msg)?;
    check_ports_free(&ports)?;
    let (root, remove) = match &opts.runtime_dir {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("bookinfo-{}", std::process::id())),
            !opts.keep_runtime_dir,
        ),
    };
    let dir = RuntimeDir::new(&root)?;
    let result = async {
        std::fs::create_dir_all(dir.root())
            .with_context(|| format!("cannot create {}", dir.root().display()))?;
        mesh::issue_certificates(&dir)?;
        let delay = opts.fault_delay.map(|d| d.get());
        mesh::write_configs(&dir, &ports, opts.scenario, delay)?;
        let mut children = Children::new();
        let served = serve(&opts, &exe, &dir, &ports, &mut children, &mut inputs).await;
        if children.any_running() {
            println!("stopping {} processes...", children.procs().len());
        }
        let problems = children.terminate_all(Duration::from_secs(10)).await;
        for p in &problems {
            eprintln!("warning: {p}");
        }
        served?;
        println!(
            "all {} processes have exited{}",
            children.procs().len(),
            if problems.is_empty() {
                ""
            } else {
                " (see the warnings above)"
            }
        );
        anyhow::Ok(())
    }
    .await;
    if remove && result.is_err() && dir.logs_dir().exists() {
        println!(
            "runtime directory kept for its logs: {}",
            dir.logs_dir().display()
        );
    } else if remove {
        if let Err(e) = std::fs::remove_dir_all(dir.root()) {
            eprintln!("warning: cannot remove {}: {e}", dir.root().display());
        }
    } else {
        println!("runtime directory kept: {}", dir.root().display());
    }
    result
}

async fn serve(
    opts: &Options,
    exe: &Path,
    dir: &RuntimeDir,
    ports: &Ports,
    children: &mut Children,
    inputs: &mut Inputs,
) -> anyhow::Result<()> {
    let delay = opts.fault_delay.map(|d| d.get());
    for w in &WORKLOADS {
        if let Some(app) = app_options(w, ports, opts.reviews_timeout.get()) {
            children.spawn(w.name, exe, &app.to_args(), &dir.app_log(w))?;
        }
        let mut args: Vec<OsString> = vec!["sidecar".into(), "run".into()];
        for file in dir.proxy_configs(w) {
            args.push("--config".into());
            args.push(file.into());
        }
        let name = if w.has_app() {
            format!("{}-sidecar", w.name)
        } else {
            w.name.to_owned()
        };
        children.spawn(&name, exe, &args, &dir.sidecar_log(w))?;
    }

    let started = Instant::now();
    let client = http_client();
    let deadline = opts.startup_timeout.get();
    tokio::select! {
        ready = wait_ready(&client, ports, deadline) => ready?,
        exited = children.next_exit() => return Err(died(exited, "while starting")),
        sig = stop_signal(&mut inputs.term, &mut inputs.int) => {
            println!("{sig}: stopping before the mesh was ready");
            return Ok(());
        }
    }
    print_banner(opts, dir, ports, children, started.elapsed());

    let mut current = opts.scenario;
    let mut check: Option<tokio::task::JoinHandle<()>> = None;
    let load = opts.load.map(|rps| start_load(ports.gateway(), rps));
    let mut stdin_open = true;
    let result = loop {
        tokio::select! {
            sig = stop_signal(&mut inputs.term, &mut inputs.int) => {
                println!("{sig}: stopping the mesh");
                break Ok(());
            }
            exited = children.next_exit() => break Err(died(exited, "while running")),
            line = inputs.stdin.recv(), if stdin_open => {
                let Some(line) = line else {
                    stdin_open = false;
                    continue;
                };
                let input = line.trim();
                if input.is_empty() {
                    continue;
                }
                let Some(next) = scenario::find(input) else {
                    println!("unknown scenario {input:?}; type one of: {}", scenario::menu());
                    continue;
                };
                if let Err(e) = mesh::write_routing(dir, next, delay) {
                    println!("cannot switch to {}: {e:#}", next.name);
                    continue;
                }
                let changes = next.changes_from(current, delay);
                println!(
                    "scenario {} ({}): rewrote {}",
                    next.name,
                    next.number,
                    dir.routing_file().display()
                );
                if changes.is_empty() {
                    println!("  no routing changes");
                }
                for change in changes {
                    println!("  {change}");
                }
                current = next;
                if let Some(task) = check.take() {
                    task.abort();
                }
                check = Some(tokio::spawn(confirm_in_force(
                    client.clone(),
                    *ports,
                    next,
                    delay,
                )));
            }
        }
    };
    if let Some(task) = check {
        task.abort();
    }
    if let Some(load) = load {
        load.abort();
    }
    result
}

fn died(exited: Option<Exited>, when: &str) -> anyhow::Error {
    match exited {
        Some(e) => anyhow::anyhow!("{when}: {}", e.report()),
        None => anyhow::anyhow!("{when}: lost track of the child processes"),
    }
}

fn print_banner(
    opts: &Options,
    dir: &RuntimeDir,
    ports: &Ports,
    children: &Children,
    took: Duration,
) {
    let gw = ports.gateway();
    println!(
        "Bookinfo is up: {} processes ready in {:.1}s, scenario {}.",
        children.procs().len(),
        took.as_secs_f64(),
        opts.scenario.name
    );
    println!();
    println!("  product page  http://{gw}/productpage");
    println!("  as jason      http://{gw}/productpage?u=jason   (or sign in; cookie user=jason)");
    println!();
    println!("  proxy admin (/metrics, /ready, /config_dump, /clusters):");
    for w in &WORKLOADS {
        println!("    {:<21} http://{}/metrics", w.name, ports.admin(w));
    }
    println!();
    println!("  runtime dir   {}", dir.root().display());
    println!("    logs        {}", dir.logs_dir().display());
    println!("    config      {}", dir.config_dir().display());
    println!("    certs       {}", dir.root().join("certs").display());
    println!();
    for (svc, what) in opts.scenario.describe(opts.fault_delay.map(|d| d.get())) {
        println!("  {svc:<12} {what}");
    }
    println!();
    println!(
        "Type a scenario (name or number) and Enter to switch: {}",
        scenario::menu()
    );
    println!("Ctrl-C stops everything.");
}

type HttpClient = Client<HttpConnector, BoxBody>;

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(10))
        .build_http()
}

/// `GET http://{addr}{path}`: status and body, within 2 s.
async fn get(client: &HttpClient, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    get_within(client, addr, path, Duration::from_secs(2)).await
}

/// `GET http://{addr}{path}`: status and body, within `timeout`.
async fn get_within(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    let req = http::Request::get(format!("http://{addr}{path}")).body(body::empty())?;
    let exchange = async {
        let resp = client.request(req).await?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .with_context(|| format!("http://{addr}{path} did not answer within {timeout:?}"))?
}

/// Waits until every proxy's admin `/ready` and every app's `/health` answer 200.
async fn wait_ready(client: &HttpClient, ports: &Ports, within: Duration) -> anyhow::Result<()> {
    let mut pending: Vec<(String, SocketAddr, &str)> = Vec::new();
    for w in &WORKLOADS {
        if w.has_app() {
            pending.push((format!("the {} app", w.name), ports.app(w), "/health"));
        }
        pending.push((format!("{}'s proxy", w.name), ports.admin(w), "/ready"));
    }
    let deadline = Instant::now() + within;
    loop {
        let mut still = Vec::new();
        for (what, addr, path) in pending {
            match get(client, addr, path).await {
                Ok((200, _)) => {}
                other => still.push((what, addr, path, other)),
            }
        }
        if still.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let list: Vec<String> = still
                .iter()
                .map(|(what, addr, path, last)| {
                    let last = match last {
                        Ok((status, _)) => format!("answered {status}"),
                        Err(e) => format!("{e:#}"),
                    };
                    format!("{what} (http://{addr}{path}: {last})")
                })
                .collect();
            bail!(
                "not ready within {within:?}: {}; see the logs",
                list.join(", ")
            );
        }
        pending = still.into_iter().map(|(w, a, p, _)| (w, a, p)).collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The VirtualServices of `scenario` as a proxy's `/config_dump` shows them: name to spec.
fn expected_routing(
    scenario: &Scenario,
    delay: Option<Duration>,
) -> anyhow::Result<BTreeMap<String, serde_json::Value>> {
    let yaml = scenario.render(delay).map_err(anyhow::Error::msg)?;
    let config = mesh_core::config::load_sources(&[mesh_core::config::Source {
        name: "routing.yaml".into(),
        text: yaml,
    }])
    .map_err(|e| anyhow::anyhow!("scenario {} does not load: {e}", scenario.name))?;
    Ok(virtual_services(&config.to_json()))
}

fn virtual_services(dump: &serde_json::Value) -> BTreeMap<String, serde_json::Value> {
    let key = mesh_core::config::Kind::VirtualService.as_str();
    dump.get(key)
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|vs| {
            let name = vs.pointer("/metadata/name")?.as_str()?;
            topology::SERVICES
                .contains(&name)
                .then(|| (name.to_owned(), vs.get("spec").cloned().unwrap_or_default()))
        })
        .collect()
}

/// Polls every proxy's `/config_dump` until its VirtualServices are the scenario's; prints
/// when all are, or which are not after 10 s.
async fn confirm_in_force(
    client: HttpClient,
    ports: Ports,
    scenario: &'static Scenario,
    delay: Option<Duration>,
) {
    let expected = match expected_routing(scenario, delay) {
        Ok(e) => e,
        Err(e) => {
            println!("cannot check the switch: {e:#}");
            return;
        }
    };
    let started = Instant::now();
    let mut pending: Vec<&Workload> = WORKLOADS.iter().collect();
    while started.elapsed() < Duration::from_secs(10) {
        let mut still = Vec::new();
        for w in pending {
            let current = get(&client, ports.admin(w), "/config_dump")
                .await
                .ok()
                .and_then(|(_, body)| serde_json::from_str(&body).ok())
                .map(|dump: serde_json::Value| virtual_services(&dump));
            if current.as_ref() != Some(&expected) {
                still.push(w);
            }
        }
        pending = still;
        if pending.is_empty() {
            println!(
                "scenario {} in force on all {} proxies ({} ms after the rewrite)",
                scenario.name,
                WORKLOADS.len(),
                started.elapsed().as_millis()
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let names: Vec<&str> = pending.iter().map(|w| w.name).collect();
    println!(
        "warning: scenario {} is not in force after 10 s on: {} (their /config_dump shows other \
         VirtualServices; a rejected file is named in their logs)",
        scenario.name,
        names.join(", ")
    );
}

/// What the load generator saw.
#[derive(Debug, Default)]
struct LoadStats {
    sent: u64,
    by_outcome: BTreeMap<String, u64>,
}

/// Sends `rps` requests per second to the product page through the gateway, half as jason;
/// prints a summary every 10 s.
fn start_load(gateway: SocketAddr, rps: f64) -> tokio::task::JoinHandle<()> {
    let stats = Arc::new(Mutex::new(LoadStats::default()));
    tokio::spawn(async move {
        let client = http_client();
        let period = Duration::from_secs_f64(1.0 / rps.clamp(0.01, 10_000.0));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut report = tokio::time::interval(Duration::from_secs(10));
        report.tick().await;
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    n += 1;
                    let (client, stats) = (client.clone(), stats.clone());
                    let path = if n.is_multiple_of(2) { "/productpage?u=jason" } else { "/productpage" };
                    tokio::spawn(async move {
                        let outcome = match get_within(&client, gateway, path, Duration::from_secs(15)).await {
                            Ok((200, html)) => match reviews_version(&html) {
                                Some(v) => format!("200 reviews-{v}"),
                                None => "200 reviews-error".to_owned(),
                            },
                            Ok((status, _)) => format!("{status}"),
                            Err(_) => "failed".to_owned(),
                        };
                        if let Ok(mut s) = stats.lock() {
                            s.sent += 1;
                            *s.by_outcome.entry(outcome).or_default() += 1;
                        }
                    });
                }
                _ = report.tick() => {
                    let summary = match stats.lock() {
                        Ok(mut s) => {
                            let line = s.by_outcome.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ");
                            let sent = s.sent;
                            *s = LoadStats::default();
                            format!("load: {sent} requests in the last 10 s ({line})")
                        }
                        Err(_) => continue,
                    };
                    println!("{summary}");
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_command_lines_parse_back() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            cmd: Cmd,
        }
        #[derive(clap::Subcommand)]
        enum Cmd {
            App(AppOptions),
        }
        use clap::Parser as _;
        let ports = Ports::new(20000).unwrap();
        for w in WORKLOADS.iter().filter(|w| w.has_app()) {
            let opts = app_options(w, &ports, Duration::from_secs(1)).unwrap();
            let argv = std::iter::once(OsString::from("bookinfo")).chain(opts.to_args());
            let Cmd::App(parsed) = Cli::try_parse_from(argv).unwrap().cmd;
            assert_eq!(parsed.listen, ports.app(w));
            assert_eq!(parsed.name, opts.name);
            assert_eq!(parsed.version, opts.version);
            assert_eq!(parsed.outbound, opts.outbound);
            assert_eq!(parsed.reviews_timeout.get(), Duration::from_secs(1));
            assert_eq!(parsed.app().unwrap().workload(), w.name);
        }
    }

    #[test]
    fn expected_routing_has_the_four_virtual_services() {
        for s in &scenario::SCENARIOS {
            let vs = expected_routing(s, Some(Duration::from_secs(2))).unwrap();
            assert_eq!(
                vs.keys().map(String::as_str).collect::<Vec<_>>(),
                ["details", "productpage", "ratings", "reviews"]
            );
        }
        let a = expected_routing(scenario::find("all-v1").unwrap(), None).unwrap();
        let b = expected_routing(scenario::find("jason-v2").unwrap(), None).unwrap();
        assert_eq!(a["details"], b["details"]);
        assert_ne!(a["reviews"], b["reviews"]);
    }

    #[test]
    fn a_taken_port_is_named() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let ports = Ports::new(port).unwrap();
        let err = check_ports_free(&ports).unwrap_err().to_string();
        assert!(
            err.contains(&format!("port {port} (the ingress gateway)")),
            "{err}"
        );
    }
}
