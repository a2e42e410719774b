//! End-to-end load harness: the `mesh-proxy` sidecar against a direct connection and against
//! HAProxy, on loopback, under three loads, with each proxy process's CPU time and memory.
//!
//! ```text
//! cargo build --release -p mesh-proxy        # the sidecar binary the harness runs
//! cargo run --release -p benches --bin mesh_bench -- [--quick] [--out FILE]
//! ```
//!
//! Contenders (every proxy a separate process, so `/proc/PID` gives its own CPU and RSS):
//! - `direct`: the load generator straight to the backend;
//! - `1-hop`: one sidecar (`mesh-proxy run --config FILE`), its outbound listener, `Host:
//!   backend:8080` naming the service, to the backend;
//! - `2-hop`: client sidecar → server sidecar's inbound listener → backend, plaintext;
//! - `2-hop-mtls`: the same with mutual TLS (auto-mTLS by the endpoint's
//!   `security.istio.io/tlsMode: istio` label; the server side `STRICT`);
//! - `2-hop-mtls-h2`: `2-hop-mtls` with the client sidecar's DestinationRule saying
//!   `h2UpgradePolicy: UPGRADE`, so the sidecars carry the HTTP/1.1 requests as streams of
//!   HTTP/2 connections between them (the backend still gets HTTP/1.1);
//! - when `haproxy` is on the PATH: `haproxy-1-hop` (one HAProxy, `nbthread 1`, HTTP mode,
//!   keep-alive and `http-reuse always` to the backend, no logging) and `haproxy-2-hop-tls`
//!   (two such HAProxies with mutual TLS between them, certificates from the same CA).
//!
//! The backend is in this process: see [`setup::start_backend`] for why.
//!
//! Loads: `wrk -t1 -c32 --latency` (HTTP/1.1 closed loop; a Lua `done` hook adds p99.9),
//! `oha -q 1000 -c 32` (HTTP/1.1 at a fixed, moderate rate: latency percentiles), and
//! `h2load -c 32 -m 10` (HTTP/2 with prior knowledge; only against contenders that pass an
//! h2c probe first). Every round runs every contender once per load, in an order rotated
//! each round, and the report gives each figure's median over the rounds. Over each load
//! window the harness reads each proxy's utime + stime (`/proc/PID/stat`, clock ticks of
//! `getconf CLK_TCK`) and reports CPU milliseconds per 1,000 requests (equivalently,
//! milli-cores per 1,000 req/s). Memory (`VmRSS` of `/proc/PID/status`): idle after startup,
//! then with 1,000 idle keep-alive connections held open to the front proxy (one request
//! sent on each first), then after all the loads.
//!
//! It prints a markdown section (machine, date, command, tool versions, one table per load,
//! memory, and the performance issue's targets with met/missed); `--out FILE` also writes it.
//! Every child process is killed when the harness ends, on success, error or panic.

mod load;
mod procs;
mod report;
mod setup;

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;

use load::{Load, Params};
use procs::Children;
use setup::{Contender, ProxySettings};

#[derive(Parser, Debug)]
#[command(about = "End-to-end load harness: mesh-proxy against direct and HAProxy")]
struct Args {
    /// One round of short loads (3 s each): a check that everything works, in under 2 minutes.
    #[arg(long)]
    quick: bool,
    /// Rounds (default 3; 1 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds per load window (default 10; 3 with --quick).
    #[arg(long)]
    seconds: Option<u64>,
    /// Open connections of every load generator.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// oha's fixed request rate (requests per second, all connections together).
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// HTTP/2 streams per connection for h2load (-m).
    #[arg(long, default_value_t = 10)]
    streams: usize,
    /// Idle connections held to each front proxy for the memory figure.
    #[arg(long, default_value_t = 1000)]
    idle_connections: usize,
    /// Worker threads of every sidecar (Bootstrap `spec.concurrency`); 1 matches HAProxy's
    /// `nbthread 1`.
    #[arg(long, default_value_t = 1)]
    concurrency: u32,
    /// Skip the HAProxy contenders even when `haproxy` is on the PATH.
    #[arg(long)]
    no_haproxy: bool,
    /// The mesh-proxy binary (default: `mesh-proxy` next to this executable).
    #[arg(long)]
    mesh_proxy: Option<PathBuf>,
    /// Also write the markdown section to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Everything measured, indexed `[load][contender]` then by round.
#[derive(Debug, Default)]
pub struct Measured {
    pub sample: load::Sample,
    /// CPU ms per 1,000 requests of each process of the contender, in `procs` order.
    pub cpu: Vec<f64>,
}

/// Memory of each process of each contender, KiB.
#[derive(Debug, Default, Clone)]
pub struct Memory {
    pub idle: Vec<u64>,
    pub conns: Vec<u64>,
    pub after: Vec<u64>,
    pub peak: Vec<u64>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let seconds = args
        .seconds
        .unwrap_or(if args.quick { 3 } else { 10 })
        .max(1);
    let warmup = if args.quick { 1 } else { 2 };
    let started = Instant::now();

    let mut meta = report::Meta::collect(&args_line(), rounds, seconds, &args)?;
    let with_haproxy = !args.no_haproxy && meta.haproxy.is_some();
    let bin = mesh_proxy_binary(args.mesh_proxy.clone())?;
    // HEAD may be newer than the binary: say when the binary was built, too.
    let built = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC", "-r"])
        .arg(&bin)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    meta.mesh_proxy = format!("{}, built {built}", bin.display());
    let needed = args.idle_connections as u64 + 256;
    let limit = procs::open_files_limit()?;
    if limit < needed {
        bail!(
            "this process may open {limit} files, and holding {} idle connections needs about \
             {needed}: run `ulimit -n {}` in the shell first",
            args.idle_connections,
            needed.next_power_of_two()
        );
    }
    let tck = procs::clock_ticks()?;
    meta.tck = tck;
    eprintln!("mesh_bench: {}", meta.command);
    eprintln!("load average before: {}", meta.load_before);

    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let backend = setup::start_backend()?;
    let mut children = Children::default();
    let settings = ProxySettings {
        concurrency: args.concurrency,
    };
    let contenders = setup::start_all(
        &mut children,
        dir.path(),
        &bin,
        backend,
        settings,
        with_haproxy,
    )?;
    for c in &contenders {
        setup::smoke(c)?;
    }
    eprintln!(
        "started {} contenders in {:.1} s: {}",
        contenders.len(),
        started.elapsed().as_secs_f64(),
        contenders
            .iter()
            .map(|c| {
                let pids: Vec<String> = c.procs.iter().map(|p| p.pid.to_string()).collect();
                if pids.is_empty() {
                    format!("{}={}", c.name, c.addr)
                } else {
                    format!("{}={} (pid {})", c.name, c.addr, pids.join(","))
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    );

    // Memory at idle, then with idle connections held to the front proxy.
    std::thread::sleep(Duration::from_secs(1));
    let mut memory = vec![Memory::default(); contenders.len()];
    for (c, m) in contenders.iter().zip(&mut memory) {
        for p in &c.procs {
            m.idle.push(procs::rss_kib(p.pid)?.0);
        }
    }
    for (c, m) in contenders.iter().zip(&mut memory) {
        if c.procs.is_empty() {
            continue;
        }
        m.conns = with_idle_connections(c, args.idle_connections)?;
        eprintln!(
            "{:<18} RSS KiB idle {:?}, with {} connections {:?}",
            c.name, m.idle, args.idle_connections, m.conns
        );
    }

    let params = Params {
        connections: args.connections,
        rate: args.rate,
        streams: args.streams,
        seconds,
        wrk_script: dir.path().join("p999.lua"),
        h2load_log: dir.path().join("h2load.log"),
    };
    std::fs::write(&params.wrk_script, load::WRK_SCRIPT)?;

    // Which contenders speak HTTP/2 with prior knowledge.
    let mut h2c = Vec::new();
    for c in &contenders {
        let why = load::h2c_probe(c.addr)?;
        if let Some(why) = &why {
            eprintln!("{:<18} h2load: n/a ({why})", c.name);
        }
        h2c.push(why);
    }

    for c in &contenders {
        load::wrk(c.addr, &params, warmup).with_context(|| format!("{}: warm-up", c.name))?;
    }

    let mut results: Vec<Vec<Vec<Measured>>> = Load::ALL
        .iter()
        .map(|_| contenders.iter().map(|_| Vec::new()).collect())
        .collect();
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..contenders.len()).collect();
        order.rotate_left(round % contenders.len());
        for (li, &kind) in Load::ALL.iter().enumerate() {
            for &ci in &order {
                let c = &contenders[ci];
                if kind == Load::H2load && h2c[ci].is_some() {
                    continue;
                }
                let m =
                    measure(c, tck, || load::run(kind, c.addr, &params)).with_context(|| {
                        format!("round {}: {} under {}", round + 1, c.name, kind.name())
                    })?;
                eprintln!(
                    "round {}/{rounds} {:<7} {:<18} {:>9.0} req/s  p50 {:>7.3}  p99 {:>7.3}  p99.9 {:>7.3} ms  CPU ms/1k req {:?}",
                    round + 1,
                    kind.name(),
                    c.name,
                    m.sample.rps,
                    m.sample.p50,
                    m.sample.p99,
                    m.sample.p999,
                    m.cpu
                        .iter()
                        .map(|v| (v * 10.0).round() / 10.0)
                        .collect::<Vec<_>>()
                );
                results[li][ci].push(m);
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }

    for (c, m) in contenders.iter().zip(&mut memory) {
        for p in &c.procs {
            let (rss, hwm) = procs::rss_kib(p.pid)?;
            m.after.push(rss);
            m.peak.push(hwm);
        }
    }
    meta.finish(started.elapsed());
    let text = report::render(&meta, &contenders, &results, &memory, &h2c, &params);
    println!("{text}");
    if let Some(out) = &args.out {
        std::fs::write(out, &text).with_context(|| format!("cannot write {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    drop(children);
    Ok(())
}

/// Runs one load window and the CPU each of `c`'s processes spent in it.
fn measure(
    c: &Contender,
    tck: u64,
    run: impl FnOnce() -> anyhow::Result<load::Sample>,
) -> anyhow::Result<Measured> {
    let before = c
        .procs
        .iter()
        .map(|p| procs::cpu_ticks(p.pid))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let sample = run()?;
    let mut cpu = Vec::new();
    for (p, b) in c.procs.iter().zip(before) {
        let ticks = procs::cpu_ticks(p.pid)?.saturating_sub(b);
        let ms = ticks as f64 * 1000.0 / tck as f64;
        cpu.push(ms / (sample.requests.max(1) as f64 / 1000.0));
    }
    Ok(Measured { sample, cpu })
}

/// Opens `n` connections to the front of `c`, sends one request on each and keeps them
/// open; returns each process's VmRSS (KiB) a second later, then closes them.
fn with_idle_connections(c: &Contender, n: usize) -> anyhow::Result<Vec<u64>> {
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let mut stream = TcpStream::connect(c.addr)
            .with_context(|| format!("{}: connection {i} of {n} to {} failed", c.name, c.addr))?;
        setup::one_request(&mut stream)
            .with_context(|| format!("{}: request on connection {i} of {n}", c.name))?;
        held.push(stream);
    }
    std::thread::sleep(Duration::from_secs(1));
    let rss = c
        .procs
        .iter()
        .map(|p| procs::rss_kib(p.pid).map(|r| r.0))
        .collect::<anyhow::Result<Vec<_>>>()?;
    drop(held);
    std::thread::sleep(Duration::from_millis(500));
    Ok(rss)
}

/// `target/release/mesh-proxy`, next to this executable (`target/release/mesh_bench`).
fn mesh_proxy_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(p) => p,
        None => std::env::current_exe()
            .context("cannot find this executable's path")?
            .parent()
            .context("this executable has no parent directory")?
            .join("mesh-proxy"),
    };
    if !path.is_file() {
        bail!(
            "no mesh-proxy binary at {}: build it first with `cargo build --release -p mesh-proxy` \
             (or pass --mesh-proxy PATH)",
            path.display()
        );
    }
    Ok(path)
}

/// The command as a user types it.
fn args_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut line = "cargo run --release -p benches --bin mesh_bench".to_owned();
    if !args.is_empty() {
        line.push_str(" -- ");
        line.push_str(&args.join(" "));
    }
    line
}
