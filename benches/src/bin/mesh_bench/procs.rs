//! Child processes (sidecars, HAProxies, load tools), their readiness, and what `/proc`
//! says about them: CPU time and resident memory.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long a sidecar or an HAProxy may take to say it is ready.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Stderr lines kept per child, quoted when it fails to start.
const KEPT_LINES: usize = 40;

/// Every long-lived child of the harness. Dropping it (normal exit, `?` error, panic unwind)
/// kills and reaps them all, so no proxy outlives a run. A Ctrl-C reaches the children too:
/// they are in the terminal's foreground process group with the harness.
#[derive(Debug, Default)]
pub struct Children {
    list: Vec<(String, Child)>,
}

impl Children {
    fn push(&mut self, name: &str, child: Child) -> &mut Child {
        self.list.push((name.to_owned(), child));
        let last = self.list.len() - 1;
        &mut self.list[last].1
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.list {
            let _ = child.kill();
        }
        for (_, child) in &mut self.list {
            let _ = child.wait();
        }
    }
}

/// A process whose CPU and memory the harness reads.
#[derive(Debug, Clone)]
pub struct Proc {
    /// What it is in the contender ("sidecar", "client sidecar", "front haproxy", ...).
    pub role: &'static str,
    pub pid: u32,
    /// A `mesh-proxy` (the memory targets apply to these).
    pub mesh: bool,
    /// Holds the client connections (the 1,000-connection memory target applies to it).
    pub front: bool,
}

/// The last stderr lines of a child, shared with the thread draining its pipe.
type Tail = Arc<Mutex<VecDeque<String>>>;

fn tail_text(tail: &Tail) -> String {
    match tail.lock() {
        Ok(lines) => lines.iter().cloned().collect::<Vec<_>>().join("\n"),
        Err(_) => String::new(),
    }
}

/// Drains `child`'s stderr for its whole life (a full pipe would block its logging), keeps
/// the last lines, and sends the lines containing `marker` on the returned channel.
fn drain_stderr(
    child: &mut Child,
    marker: &'static str,
) -> anyhow::Result<(Receiver<String>, Tail)> {
    let stderr = child.stderr.take().context("child stderr was not piped")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let tail: Tail = Arc::default();
    let kept = tail.clone();
    std::thread::Builder::new()
        .name("child-stderr".into())
        .spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let line = strip_ansi(&line);
                if !marker.is_empty() && line.contains(marker) {
                    let _ = tx.send(line.clone());
                }
                if let Ok(mut lines) = kept.lock() {
                    if lines.len() == KEPT_LINES {
                        lines.pop_front();
                    }
                    lines.push_back(line);
                }
            }
        })
        .context("cannot start a thread reading a child's stderr")?;
    Ok((rx, tail))
}

/// Removes ANSI colour sequences (`ESC [ ... m`), should the log be coloured.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The listeners a `mesh-proxy` reported in its "proxy ready" line.
#[derive(Debug, Clone, Copy)]
pub struct Ready {
    pub pid: u32,
    pub outbound: SocketAddr,
    pub inbound: Option<SocketAddr>,
}

/// Starts `mesh-proxy run --config CONFIG` and waits for its "proxy ready" log line
/// (`RUST_LOG=info`), from which it takes the ephemeral listener addresses.
pub fn start_mesh_proxy(
    children: &mut Children,
    bin: &Path,
    name: &str,
    config: &Path,
) -> anyhow::Result<Ready> {
    let child = Command::new(bin)
        .arg("run")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let child = children.push(name, child);
    let pid = child.id();
    let (rx, tail) = drain_stderr(child, "proxy ready")?;
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let line = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => break line,
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {}
        }
        if let Some(status) = child.try_wait()? {
            std::thread::sleep(Duration::from_millis(100));
            bail!(
                "mesh-proxy {name} exited ({status}) before it was ready; its stderr:\n{}",
                tail_text(&tail)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "mesh-proxy {name} did not log \"proxy ready\" within {STARTUP_TIMEOUT:?}; its stderr:\n{}",
                tail_text(&tail)
            );
        }
    };
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .map(|v| v.trim_start_matches("Some(").trim_end_matches(')'))
    };
    let addr = |key: &str| -> anyhow::Result<SocketAddr> {
        let v = field(key).with_context(|| format!("no {key}= in the ready line: {line}"))?;
        v.parse()
            .with_context(|| format!("{key}={v} is not an address, in: {line}"))
    };
    let inbound = match field("inbound") {
        None | Some("None") => None,
        Some(_) => Some(addr("inbound")?),
    };
    Ok(Ready {
        pid,
        outbound: addr("outbound")?,
        inbound,
    })
}

/// Starts `haproxy -db -f CONFIG` (foreground, so the child is the one worker process) and
/// waits until `listen` accepts connections.
pub fn start_haproxy(
    children: &mut Children,
    name: &str,
    config: &Path,
    listen: SocketAddr,
) -> anyhow::Result<u32> {
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start haproxy (is it on the PATH? Debian: apt-get install haproxy)")?;
    let child = children.push(name, child);
    let pid = child.id();
    let (_rx, tail) = drain_stderr(child, "")?;
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            std::thread::sleep(Duration::from_millis(100));
            bail!(
                "{name} exited ({status}) at startup; its stderr:\n{}\nconfig {}",
                tail_text(&tail),
                config.display()
            );
        }
        if TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok() {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            bail!(
                "{name} did not listen on {listen} within {STARTUP_TIMEOUT:?}; its stderr:\n{}",
                tail_text(&tail)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A free loopback port (bound then released: HAProxy cannot report an ephemeral port).
pub fn free_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// Runs a load tool to completion, killing it after `timeout`. A tool missing from the PATH
/// is named in the error, with its Debian package.
pub fn run_tool(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| missing_tool(&program, e))?;
    let mut stdout = child.stdout.take().context("stdout not piped")?;
    let mut stderr = child.stderr.take().context("stderr not piped")?;
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{program} did not finish within {timeout:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

pub fn missing_tool(program: &str, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        let package = match program {
            "oha" => "cargo install oha",
            "h2load" => "apt-get install nghttp2-client",
            "haproxy" => "apt-get install haproxy",
            "wrk" => "apt-get install wrk",
            _ => "install it",
        };
        anyhow::anyhow!("`{program}` is not on the PATH ({package})")
    } else {
        anyhow::anyhow!("cannot run `{program}`: {e}")
    }
}

/// The first line a command prints (stdout, else stderr), for the tool-versions line.
pub fn version_line(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| missing_tool(program, e))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_owned())
}

/// Clock ticks per second, as `getconf CLK_TCK` says (the unit of `/proc/PID/stat` times).
pub fn clock_ticks() -> anyhow::Result<u64> {
    let out = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .map_err(|e| missing_tool("getconf", e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("`getconf CLK_TCK` printed {text:?}"))
}

/// utime + stime of `pid`, in clock ticks (`/proc/PID/stat` fields 14 and 15).
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // The command name (field 2) is parenthesised and may hold spaces: count after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("unexpected {path}: {stat}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let get = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no field {} in {path}: {stat}", i + 3))
    };
    Ok(get(11)? + get(12)?)
}

/// Resident memory of `pid`: (VmRSS, VmHWM) in KiB, from `/proc/PID/status`.
pub fn rss_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let get = |key: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {key} in {path}"))
    };
    Ok((get("VmRSS:")?, get("VmHWM:")?))
}

/// The soft limit on open files of this process, from `/proc/self/limits`.
pub fn open_files_limit() -> anyhow::Result<u64> {
    let limits =
        std::fs::read_to_string("/proc/self/limits").context("cannot read /proc/self/limits")?;
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next())
        .map(|v| {
            if v == "unlimited" {
                Ok(u64::MAX)
            } else {
                v.parse()
            }
        })
        .transpose()?
        .context("no \"Max open files\" in /proc/self/limits")
}
