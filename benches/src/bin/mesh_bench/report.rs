//! The markdown section: machine, tools, one table per load, memory, and the targets.

use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::load::{Load, Params};
use crate::procs::version_line;
use crate::setup::Contender;
use crate::{Args, Measured, Memory};

/// The performance issue's targets.
const ONE_HOP_VS_HAPROXY: f64 = 1.0;
const TWO_HOP_MTLS_VS_DIRECT: f64 = 0.45;
const TWO_HOP_MTLS_ADDED_P50_MS: f64 = 0.25;
const RSS_IDLE_MIB: f64 = 15.0;
const RSS_CONNS_MIB: f64 = 60.0;

/// What the report says about the run besides the measurements.
#[derive(Debug)]
pub struct Meta {
    pub command: String,
    pub date: String,
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub load_before: String,
    pub load_after: String,
    pub wrk: String,
    pub oha: String,
    pub h2load: String,
    pub haproxy: Option<String>,
    pub mesh_proxy: String,
    pub commit: String,
    pub rounds: usize,
    pub seconds: u64,
    pub connections: usize,
    pub rate: u32,
    pub idle_connections: usize,
    pub concurrency: u32,
    /// Clock ticks per second (`getconf CLK_TCK`).
    pub tck: u64,
    pub took: Duration,
}

impl Meta {
    /// Machine facts and tool versions; fails naming a missing load tool.
    pub fn collect(
        command: &str,
        rounds: usize,
        seconds: u64,
        args: &Args,
    ) -> anyhow::Result<Meta> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let haproxy = match version_line("haproxy", &["-v"]) {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("skipping the HAProxy contenders: {e}");
                None
            }
        };
        Ok(Meta {
            command: command.to_owned(),
            date: output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default(),
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            load_before: loadavg()?,
            load_after: String::new(),
            wrk: version_line("wrk", &["-v"])?,
            oha: version_line("oha", &["--version"])?,
            h2load: version_line("h2load", &["--version"])?,
            haproxy,
            mesh_proxy: String::new(),
            commit: output("git", &["rev-parse", "--short", "HEAD"])
                .unwrap_or_else(|| "unknown".into()),
            rounds,
            seconds,
            connections: args.connections,
            rate: args.rate,
            idle_connections: args.idle_connections,
            concurrency: args.concurrency,
            tck: 0,
            took: Duration::ZERO,
        })
    }

    pub fn finish(&mut self, took: Duration) {
        self.took = took;
        self.load_after = loadavg().unwrap_or_default();
    }
}

/// The three load averages of `/proc/loadavg`.
fn loadavg() -> anyhow::Result<String> {
    let text = std::fs::read_to_string("/proc/loadavg").context("cannot read /proc/loadavg")?;
    Ok(text
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" "))
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Medians over the rounds of one contender under one load.
#[derive(Debug, Clone, Copy, Default)]
struct Summary {
    rps: f64,
    p50: f64,
    p99: f64,
    p999: f64,
}

fn summarize(rounds: &[Measured]) -> Option<Summary> {
    let field = |f: fn(&Measured) -> f64| median(rounds.iter().map(f).collect());
    Some(Summary {
        rps: field(|m| m.sample.rps)?,
        p50: field(|m| m.sample.p50)?,
        p99: field(|m| m.sample.p99)?,
        p999: field(|m| m.sample.p999)?,
    })
}

/// Median CPU ms per 1,000 requests of each process.
fn cpu_medians(rounds: &[Measured], procs: usize) -> Vec<f64> {
    (0..procs)
        .filter_map(|i| {
            median(
                rounds
                    .iter()
                    .filter_map(|m| m.cpu.get(i).copied())
                    .collect(),
            )
        })
        .collect()
}

/// `1,234,567`
fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One figure per process: `x` alone, or `sum (a + b)`.
fn per_process(values: &[f64], decimals: usize) -> String {
    match values {
        [] => "—".into(),
        [one] => format!("{one:.decimals$}"),
        many => {
            let sum: f64 = many.iter().sum();
            let parts: Vec<String> = many.iter().map(|v| format!("{v:.decimals$}")).collect();
            format!("{sum:.decimals$} ({})", parts.join(" + "))
        }
    }
}

/// The HAProxy set-up a sidecar contender is compared with.
fn haproxy_peer(name: &str) -> Option<&'static str> {
    match name {
        "1-hop" => Some("haproxy-1-hop"),
        "2-hop" | "2-hop-mtls" | "2-hop-mtls-h2" => Some("haproxy-2-hop-tls"),
        _ => None,
    }
}

pub fn render(
    meta: &Meta,
    contenders: &[Contender],
    results: &[Vec<Vec<Measured>>],
    memory: &[Memory],
    h2c: &[Option<String>],
    params: &Params,
) -> String {
    let mut s = String::new();
    let index = |name: &str| contenders.iter().position(|c| c.name == name);
    let summaries: Vec<Vec<Option<Summary>>> = results
        .iter()
        .map(|per_load| per_load.iter().map(|r| summarize(r)).collect())
        .collect();
    let get = |load: Load, name: &str| -> Option<Summary> {
        let li = Load::ALL.iter().position(|l| *l == load)?;
        summaries[li][index(name)?]
    };

    let day = meta.date.split_whitespace().next().unwrap_or(&meta.date);
    let _ = writeln!(s, "## End-to-end: mesh-bench ({day})\n");
    let _ = writeln!(
        s,
        "Command: `{}` (took {:.0} s). Date: {}.",
        meta.command,
        meta.took.as_secs_f64(),
        meta.date
    );
    let _ = writeln!(
        s,
        "Machine: {} cores (`nproc`), CPU \"{}\", kernel {}. Load average (1, 5, 15 min) \
         before the run: {}; after: {}.",
        meta.nproc, meta.cpu_model, meta.kernel, meta.load_before, meta.load_after
    );
    let _ = writeln!(
        s,
        "Tools: {}; oha {}; h2load {}; {}. mesh-proxy: release build, HEAD at {} ({}).",
        meta.wrk.split(" Copyright").next().unwrap_or(&meta.wrk),
        meta.oha.trim_start_matches("oha "),
        meta.h2load.trim_start_matches("h2load "),
        meta.haproxy
            .as_deref()
            .map_or("HAProxy: not on the PATH, skipped".to_owned(), |v| v
                .split(" - ")
                .next()
                .unwrap_or(v)
                .to_owned()),
        meta.commit,
        meta.mesh_proxy
    );
    let _ = writeln!(
        s,
        "\nSet-up, all on loopback: every sidecar is its own `mesh-proxy run --config FILE` \
         process with `concurrency: {}` (worker threads), no access log, no tracing; every \
         HAProxy is its own process with `nbthread 1`, `mode http`, `option http-keep-alive`, \
         `http-reuse always`, no logging (the 2-hop pair speaks TLS between them with the same \
         kind of certificates as the sidecars: ECDSA P-256 SPIFFE certificates from one \
         `mesh_tls::ca` CA, verified both ways). The backend runs in the harness on one thread \
         (hyper, HTTP/1.1 and h2c) and answers `200 hello`. Clients send `Host: {}`. {} \
         round(s) of {} s per load window; the contenders' order rotates each round; every \
         figure is the median over the rounds. The load generator, the proxies and the backend \
         share the machine's cores.",
        meta.concurrency,
        crate::setup::HOST,
        meta.rounds,
        meta.seconds
    );
    let _ = writeln!(
        s,
        "\nColumns: latencies in ms. CPU: user + system time of the proxy processes over the \
         load window (`/proc/PID/stat`, {} Hz ticks) in ms per 1,000 requests, which is also \
         milli-cores per 1,000 req/s; for two proxies the sum, then (client + server). RSS: \
         `VmRSS` in MiB, idle after startup and with {} idle keep-alive connections held to the \
         front proxy (one request sent on each); for two proxies the sum, then (client + \
         server). \"vs direct\" and \"vs HAProxy\" divide req/s (for oha, which runs at a fixed \
         rate, they subtract p50 instead); the HAProxy compared with is `haproxy-1-hop` for \
         `1-hop` and `haproxy-2-hop-tls` for the two-hop paths.",
        meta.tck,
        thousands(meta.idle_connections as f64)
    );

    for (li, &load) in Load::ALL.iter().enumerate() {
        let title = match load {
            Load::Wrk => format!(
                "HTTP/1.1, closed loop: `wrk -t1 -c{} -d{}s --latency` (p99.9 from a Lua `done` hook)",
                params.connections, params.seconds
            ),
            Load::Oha => format!(
                "HTTP/1.1 at a fixed {} req/s: `oha -z {}s -q {} -c {} --no-tui --output-format json`",
                params.rate, params.seconds, params.rate, params.connections
            ),
            Load::H2load => format!(
                "HTTP/2 with prior knowledge (h2c): `h2load -c {} -m {} -D {}` (percentiles from its `--log-file`)",
                params.connections, params.streams, params.seconds
            ),
        };
        let _ = writeln!(s, "\n### {title}\n");
        let (vs_direct, vs_haproxy) = if load == Load::Oha {
            ("p50 over direct", "p50 over HAProxy")
        } else {
            ("vs direct", "vs HAProxy")
        };
        let _ = writeln!(
            s,
            "| contender | req/s | p50 | p99 | p99.9 | CPU ms / 1k req | RSS idle | RSS {} conns | {vs_direct} | {vs_haproxy} |",
            thousands(meta.idle_connections as f64)
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let direct = get(load, "direct");
        let mut missing = Vec::new();
        for (ci, c) in contenders.iter().enumerate() {
            let Some(sum) = summaries[li][ci] else {
                let why = h2c[ci].clone().unwrap_or_else(|| "not measured".into());
                let _ = writeln!(s, "| {} | n/a | | | | | | | | |", c.name);
                missing.push(format!("`{}`: {why}", c.name));
                continue;
            };
            let cpu = per_process(&cpu_medians(&results[li][ci], c.procs.len()), 1);
            let m = &memory[ci];
            let idle = per_process(&m.idle.iter().map(|k| mib(*k)).collect::<Vec<_>>(), 1);
            let conns = per_process(&m.conns.iter().map(|k| mib(*k)).collect::<Vec<_>>(), 1);
            let peer = haproxy_peer(c.name).and_then(|h| get(load, h));
            let (vd, vh) = if load == Load::Oha {
                (
                    direct.map_or("—".into(), |d| format!("{:+.3}", sum.p50 - d.p50)),
                    peer.map_or("—".into(), |h| format!("{:+.3}", sum.p50 - h.p50)),
                )
            } else {
                (
                    direct.map_or("—".into(), |d| format!("{:.2}×", sum.rps / d.rps)),
                    peer.map_or("—".into(), |h| format!("{:.2}×", sum.rps / h.rps)),
                )
            };
            let _ = writeln!(
                s,
                "| {} | {} | {:.3} | {:.3} | {:.3} | {cpu} | {idle} | {conns} | {vd} | {vh} |",
                c.name,
                thousands(sum.rps),
                sum.p50,
                sum.p99,
                sum.p999
            );
        }
        if !missing.is_empty() {
            let _ = writeln!(s, "\nn/a: {}.", missing.join("; "));
        }
    }

    let _ = writeln!(s, "\n### Memory per process (VmRSS, MiB)\n");
    let _ = writeln!(
        s,
        "| contender | process | idle | {} idle conns | after the loads | peak (VmHWM) |",
        thousands(meta.idle_connections as f64)
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|");
    for (c, m) in contenders.iter().zip(memory) {
        for (i, p) in c.procs.iter().enumerate() {
            let cell = |v: &Vec<u64>| v.get(i).map_or("—".into(), |k| format!("{:.1}", mib(*k)));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                c.name,
                p.role,
                cell(&m.idle),
                cell(&m.conns),
                cell(&m.after),
                cell(&m.peak)
            );
        }
    }

    let _ = writeln!(s, "\n### Targets\n");
    for line in targets(meta, contenders, memory, &get) {
        let _ = writeln!(s, "- {line}");
    }
    s
}

fn verdict(met: bool) -> &'static str {
    if met { "**met**" } else { "**missed**" }
}

fn targets(
    meta: &Meta,
    contenders: &[Contender],
    memory: &[Memory],
    get: &dyn Fn(Load, &str) -> Option<Summary>,
) -> Vec<String> {
    let mut out = Vec::new();
    match (get(Load::Wrk, "1-hop"), get(Load::Wrk, "haproxy-1-hop")) {
        (Some(m), Some(h)) => {
            let r = m.rps / h.rps;
            out.push(format!(
                "One hop, HTTP/1.1, {} connections (wrk): throughput ≥ {ONE_HOP_VS_HAPROXY:.1}× HAProxy: {} — {} against {} req/s, {r:.2}× ({:+.0} %).",
                meta.connections,
                verdict(r >= ONE_HOP_VS_HAPROXY),
                thousands(m.rps),
                thousands(h.rps),
                (r - 1.0) * 100.0
            ));
            out.push(format!(
                "One hop, p99 ≤ HAProxy's (wrk): {} — {:.3} ms against {:.3} ms ({:+.3} ms, {:.2}×).",
                verdict(m.p99 <= h.p99),
                m.p99,
                h.p99,
                m.p99 - h.p99,
                m.p99 / h.p99
            ));
        }
        _ => out.push("One hop against HAProxy: not measured (no HAProxy contender).".into()),
    }
    for name in ["2-hop-mtls", "2-hop-mtls-h2"] {
        match (get(Load::Wrk, name), get(Load::Wrk, "direct")) {
            (Some(m), Some(d)) => {
                let r = m.rps / d.rps;
                out.push(format!(
                    "Two hops with mTLS, `{name}` (wrk): throughput ≥ {:.0} % of direct: {} — {} against {} req/s, {:.1} % ({:+.1} points).",
                    TWO_HOP_MTLS_VS_DIRECT * 100.0,
                    verdict(r >= TWO_HOP_MTLS_VS_DIRECT),
                    thousands(m.rps),
                    thousands(d.rps),
                    r * 100.0,
                    (r - TWO_HOP_MTLS_VS_DIRECT) * 100.0
                ));
            }
            _ => out.push(format!(
                "Two hops with mTLS, `{name}`, against direct (wrk): not measured."
            )),
        }
        match (get(Load::Oha, name), get(Load::Oha, "direct")) {
            (Some(m), Some(d)) => {
                let added = m.p50 - d.p50;
                out.push(format!(
                    "Two hops with mTLS, `{name}`, at {} req/s (oha): added p50 ≤ {TWO_HOP_MTLS_ADDED_P50_MS} ms over direct: {} — {:.3} ms against {:.3} ms, {added:+.3} ms ({:+.3} ms from the target).",
                    thousands(meta.rate as f64),
                    verdict(added <= TWO_HOP_MTLS_ADDED_P50_MS),
                    m.p50,
                    d.p50,
                    added - TWO_HOP_MTLS_ADDED_P50_MS
                ));
            }
            _ => out.push(format!(
                "Two hops with mTLS, `{name}`, at 1,000 req/s (oha): not measured."
            )),
        }
    }
    let mut idle_worst: Option<(f64, String)> = None;
    let mut conns_worst: Option<(f64, String)> = None;
    for (c, m) in contenders.iter().zip(memory) {
        for (i, p) in c.procs.iter().enumerate().filter(|(_, p)| p.mesh) {
            let who = format!("{} {}", c.name, p.role);
            if let Some(k) = m.idle.get(i) {
                let v = mib(*k);
                if idle_worst.as_ref().is_none_or(|(w, _)| v > *w) {
                    idle_worst = Some((v, who.clone()));
                }
            }
            if p.front
                && let Some(k) = m.conns.get(i)
            {
                let v = mib(*k);
                if conns_worst.as_ref().is_none_or(|(w, _)| v > *w) {
                    conns_worst = Some((v, who));
                }
            }
        }
    }
    if let Some((v, who)) = idle_worst {
        out.push(format!(
            "Sidecar RSS idle ≤ {RSS_IDLE_MIB:.0} MB: {} — largest {v:.1} MiB ({who}), {:+.1} MiB from the target.",
            verdict(v <= RSS_IDLE_MIB),
            v - RSS_IDLE_MIB
        ));
    }
    if let Some((v, who)) = conns_worst {
        out.push(format!(
            "Sidecar RSS with {} connections ≤ {RSS_CONNS_MIB:.0} MB: {} — largest {v:.1} MiB ({who}, the proxy holding them), {:+.1} MiB from the target.",
            thousands(meta.idle_connections as f64),
            verdict(v <= RSS_CONNS_MIB),
            v - RSS_CONNS_MIB
        ));
    }
    out
}
