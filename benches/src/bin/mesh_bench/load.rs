//! The load generators: `wrk` (HTTP/1.1 closed loop), `oha` (HTTP/1.1 at a fixed rate) and
//! `h2load` (HTTP/2 prior knowledge), each run once and parsed into a [`Sample`].

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::procs::run_tool;
use crate::setup::HOST;

/// What one load window measured. Latencies in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub rps: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    /// Requests completed in the window (the denominator of CPU per request).
    pub requests: u64,
}

/// The three loads of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    Wrk,
    Oha,
    H2load,
}

impl Load {
    pub const ALL: [Load; 3] = [Load::Wrk, Load::Oha, Load::H2load];

    pub fn name(self) -> &'static str {
        match self {
            Load::Wrk => "wrk",
            Load::Oha => "oha",
            Load::H2load => "h2load",
        }
    }
}

/// The parameters every load shares.
#[derive(Debug, Clone)]
pub struct Params {
    pub connections: usize,
    pub rate: u32,
    pub streams: usize,
    pub seconds: u64,
    /// The `done` hook wrk runs to print p99.9 (and its request count).
    pub wrk_script: std::path::PathBuf,
    pub h2load_log: std::path::PathBuf,
}

/// wrk's Lua `done` hook: `--latency` prints p50..p99 but not p99.9.
pub const WRK_SCRIPT: &str = r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("MESHBENCH requests=%d errors=%d p999_us=%d\n",
    summary.requests, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(99.9)))
end
"#;

fn timeout(seconds: u64) -> Duration {
    Duration::from_secs(seconds + 60)
}

pub fn run(load: Load, addr: SocketAddr, p: &Params) -> anyhow::Result<Sample> {
    match load {
        Load::Wrk => wrk(addr, p, p.seconds),
        Load::Oha => oha(addr, p),
        Load::H2load => h2load(addr, p, p.seconds),
    }
}

/// `wrk -t1 -cN -dSs --latency`: closed loop, HTTP/1.1 keep-alive.
pub fn wrk(addr: SocketAddr, p: &Params, seconds: u64) -> anyhow::Result<Sample> {
    let out = run_tool(
        Command::new("wrk")
            .arg("-t1")
            .arg(format!("-c{}", p.connections))
            .arg(format!("-d{seconds}s"))
            .arg("--latency")
            .arg("-s")
            .arg(&p.wrk_script)
            .arg("-H")
            .arg(format!("Host: {HOST}"))
            .arg(format!("http://{addr}/")),
        timeout(seconds),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    if let Some(line) = text.lines().find(|l| l.contains("Non-2xx")) {
        bail!("wrk saw error responses ({}):\n{text}", line.trim());
    }
    if let Some(line) = text.lines().find(|l| l.contains("Socket errors")) {
        eprintln!("    wrk against {addr}: {}", line.trim());
    }
    let rps: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
    let percentile = |pct: &str| -> anyhow::Result<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(pct))
            .and_then(|v| duration_ms(v.trim()))
            .with_context(|| format!("no {pct} line in wrk's latency distribution:\n{text}"))
    };
    let hook = text
        .lines()
        .find_map(|l| l.strip_prefix("MESHBENCH "))
        .with_context(|| format!("wrk's done hook printed nothing:\n{text}"))?;
    let field = |key: &str| -> anyhow::Result<u64> {
        hook.split_whitespace()
            .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {key}= in wrk's done hook line: {hook}"))
    };
    Ok(Sample {
        rps,
        p50: percentile("50%")?,
        p99: percentile("99%")?,
        p999: field("p999_us")? as f64 / 1000.0,
        requests: field("requests")?,
    })
}

/// A wrk duration (`812.00us`, `1.20ms`, `2.01s`, `1.00m`) in milliseconds.
fn duration_ms(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = v.split_at(split);
    let num: f64 = num.parse().ok()?;
    let scale = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => return None,
    };
    Some(num * scale)
}

/// `oha -z Ss -q RATE -c N --no-tui --output-format json`: HTTP/1.1 at a fixed rate.
pub fn oha(addr: SocketAddr, p: &Params) -> anyhow::Result<Sample> {
    let out = run_tool(
        Command::new("oha")
            .arg("-z")
            .arg(format!("{}s", p.seconds))
            .arg("-q")
            .arg(p.rate.to_string())
            .arg("-c")
            .arg(p.connections.to_string())
            .arg("--no-tui")
            .arg("--output-format")
            .arg("json")
            .arg("--host")
            .arg(HOST)
            .arg(format!("http://{addr}/")),
        timeout(p.seconds),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("oha failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("oha's output is not JSON:\n{text}"))?;
    let object = |key: &str| -> anyhow::Result<&serde_json::Map<String, serde_json::Value>> {
        report[key]
            .as_object()
            .with_context(|| format!("no {key} object in oha's output:\n{text}"))
    };
    let mut ok = 0;
    for (code, n) in object("statusCodeDistribution")? {
        let n = n.as_u64().unwrap_or(0);
        if code == "200" {
            ok = n;
        } else if n > 0 {
            bail!("oha saw {n} responses with status {code} against {addr}");
        }
    }
    for (error, n) in object("errorDistribution")? {
        // Requests still in flight when -z ends are aborted: expected, not a failure.
        if !error.contains("deadline") {
            eprintln!("    oha against {addr}: {n} × {error}");
        }
    }
    let percentiles = object("latencyPercentiles")?;
    let secs = |key: &str| -> anyhow::Result<f64> {
        percentiles
            .get(key)
            .and_then(serde_json::Value::as_f64)
            .with_context(|| format!("no latencyPercentiles.{key} in oha's output:\n{text}"))
    };
    let rps = object("summary")?
        .get("requestsPerSec")
        .and_then(serde_json::Value::as_f64)
        .context("no summary.requestsPerSec in oha's output")?;
    Ok(Sample {
        rps,
        p50: secs("p50")? * 1000.0,
        p99: secs("p99")? * 1000.0,
        p999: secs("p99.9")? * 1000.0,
        requests: ok,
    })
}

/// `h2load -c N -m STREAMS -D S`: HTTP/2 with prior knowledge over cleartext (the URL is
/// `http://`), `:authority` set to the service. Percentiles come from its per-request log.
pub fn h2load(addr: SocketAddr, p: &Params, seconds: u64) -> anyhow::Result<Sample> {
    let out = run_tool(
        Command::new("h2load")
            .arg("-c")
            .arg(p.connections.to_string())
            .arg("-m")
            .arg(p.streams.to_string())
            .arg("-D")
            .arg(seconds.to_string())
            .arg("-H")
            .arg(format!(":authority: {HOST}"))
            .arg(format!("--log-file={}", p.h2load_log.display()))
            .arg(format!("http://{addr}/")),
        timeout(seconds),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (succeeded, rps) = h2load_summary(&text)?;
    if !out.status.success() || succeeded == 0 {
        bail!(
            "h2load got no successful response: {}",
            h2load_reason(&text, &String::from_utf8_lossy(&out.stderr))
        );
    }
    let (p50, p99, p999) = log_percentiles(&p.h2load_log)?;
    Ok(Sample {
        rps,
        p50,
        p99,
        p999,
        requests: succeeded,
    })
}

/// (succeeded requests, req/s) from h2load's summary; fails on non-2xx responses.
fn h2load_summary(text: &str) -> anyhow::Result<(u64, f64)> {
    let requests = text
        .lines()
        .find_map(|l| l.strip_prefix("requests:"))
        .with_context(|| format!("no `requests:` line in h2load's output:\n{text}"))?;
    let count = |what: &str| -> u64 {
        requests
            .split(',')
            .find_map(|part| part.trim().strip_suffix(what))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    let succeeded = count("succeeded");
    let status = text
        .lines()
        .find_map(|l| l.strip_prefix("status codes:"))
        .unwrap_or("");
    for part in status.split(',') {
        let mut words = part.split_whitespace();
        if let (Some(n), Some(class)) = (words.next(), words.next())
            && class != "2xx"
            && n != "0"
        {
            bail!("h2load saw {n} {class} responses:\n{text}");
        }
    }
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in"))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.trim().strip_suffix("req/s"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    Ok((succeeded, rps))
}

fn h2load_reason(stdout: &str, stderr: &str) -> String {
    let lines: Vec<&str> = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("error")
                || l.contains("fail")
                || l.contains("requests:")
                || l.contains("no protocol")
        })
        .collect();
    lines.join(" / ")
}

/// p50, p99, p99.9 in ms from h2load's `--log-file` (tab-separated: start µs, status,
/// duration µs).
fn log_percentiles(path: &Path) -> anyhow::Result<(f64, f64, f64)> {
    let log = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read h2load's log {}", path.display()))?;
    let mut us: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split('\t').nth(2))
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    if us.is_empty() {
        bail!("h2load's log {} has no requests", path.display());
    }
    us.sort_unstable();
    let at = |pct: f64| {
        let i = ((pct / 100.0) * us.len() as f64).ceil() as usize;
        us[i.clamp(1, us.len()) - 1] as f64 / 1000.0
    };
    Ok((at(50.0), at(99.0), at(99.9)))
}

/// Does `addr` serve HTTP/2 with prior knowledge? A short h2load probe: `Ok(None)` when it
/// does, `Ok(Some(why))` when it does not.
pub fn h2c_probe(addr: SocketAddr) -> anyhow::Result<Option<String>> {
    let out = run_tool(
        Command::new("h2load")
            .args(["-n", "200", "-c", "1", "-m", "1"])
            .arg("-H")
            .arg(format!(":authority: {HOST}"))
            .arg(format!("http://{addr}/")),
        Duration::from_secs(20),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match h2load_summary(&text) {
        Ok((200, _)) => Ok(None),
        Ok((n, _)) => Ok(Some(format!(
            "{n} of 200 probe requests succeeded ({})",
            h2load_reason(&text, &stderr)
        ))),
        Err(e) => Ok(Some(format!("{e:#}"))),
    }
}
