//! The launcher's child processes: each app and each proxy is the launcher's own executable
//! run with a hidden subcommand, in its own process group (Ctrl-C reaches the launcher only,
//! which then stops them in order), with its output in a log file.
//!
//! A child's stdout goes straight to its log; its stderr passes through the launcher, which
//! copies it to the log and echoes the lines that report an error to the terminal. A child
//! asks the kernel for SIGTERM when the launcher dies ([`die_with_parent`]), so nothing
//! outlives a killed launcher.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

/// The environment variable through which a child learns its launcher's pid.
pub const PARENT_PID_ENV: &str = "BOOKINFO_LAUNCHER_PID";

/// In a child: ask for SIGTERM when the launcher exits, and exit at once if it already has.
/// Does nothing in a process not started by the launcher.
pub fn die_with_parent() {
    let Some(parent) = std::env::var(PARENT_PID_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return;
    };
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM) {
        eprintln!("cannot ask to be stopped with the launcher: {e}");
    }
    if nix::unistd::getppid() != Pid::from_raw(parent) {
        eprintln!("the launcher (pid {parent}) is gone; exiting");
        std::process::exit(1);
    }
}

/// One child process.
#[derive(Debug)]
pub struct Proc {
    /// What it is (`reviews-v2`, `reviews-v2-sidecar`).
    pub name: String,
    pub pid: u32,
    pub log: PathBuf,
    /// How it exited, once it has.
    pub status: Option<ExitStatus>,
}

/// A child that exited.
#[derive(Debug)]
pub struct Exited {
    pub name: String,
    pub pid: u32,
    pub status: ExitStatus,
    pub log: PathBuf,
}

impl Exited {
    /// `NAME (pid N) exited with STATUS; the end of LOG:` and the log's last lines.
    pub fn report(&self) -> String {
        format!(
            "{} (pid {}) exited with {}; the end of {}:\n{}",
            self.name,
            self.pid,
            self.status,
            self.log.display(),
            log_tail(&self.log, 15)
        )
    }
}

/// The last `n` lines of a log file, indented.
pub fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..]
                .iter()
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        }
        Err(e) => format!("    (cannot read it: {e})"),
    }
}

/// Whether a line of a child's stderr reports an error.
pub fn is_error_line(line: &str) -> bool {
    line.contains(" ERROR ")
        || line.starts_with("ERROR")
        || line.starts_with("error")
        || line.starts_with("Error")
        || line.contains("panicked at")
}

/// The launcher's children.
#[derive(Debug)]
pub struct Children {
    procs: Vec<Proc>,
    tx: mpsc::UnboundedSender<(usize, ExitStatus)>,
    rx: mpsc::UnboundedReceiver<(usize, ExitStatus)>,
}

impl Default for Children {
    fn default() -> Self {
        Children::new()
    }
}

impl Children {
    pub fn new() -> Children {
        let (tx, rx) = mpsc::unbounded_channel();
        Children {
            procs: Vec::new(),
            tx,
            rx,
        }
    }

    pub fn procs(&self) -> &[Proc] {
        &self.procs
    }

    /// Whether any child still runs.
    pub fn any_running(&self) -> bool {
        self.procs.iter().any(|p| p.status.is_none())
    }

    /// Starts `exe ARGS...` as child `name`, its output appended to `log`. Call it from the
    /// thread that stays alive as long as the launcher (its main thread): the kernel's
    /// parent-death signal follows the thread that forked.
    pub fn spawn(
        &mut self,
        name: &str,
        exe: &Path,
        args: &[OsString],
        log: &Path,
    ) -> anyhow::Result<u32> {
        let open =
            || -> std::io::Result<File> { OpenOptions::new().create(true).append(true).open(log) };
        let out = open().with_context(|| format!("cannot open {name}'s log {}", log.display()))?;
        let mut err_log =
            open().with_context(|| format!("cannot open {name}'s log {}", log.display()))?;
        let mut child = tokio::process::Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::piped())
            .process_group(0)
            .env(PARENT_PID_ENV, std::process::id().to_string())
            .kill_on_drop(false)
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", exe.display()))?;
        let pid = child
            .id()
            .with_context(|| format!("{name} exited before it got a pid"))?;
        if let Some(stderr) = child.stderr.take() {
            let name = name.to_owned();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let _ = writeln!(err_log, "{line}");
                    if is_error_line(&line) {
                        eprintln!("[{name}] {line}");
                    }
                }
            });
        }
        let index = self.procs.len();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            match child.wait().await {
                Ok(status) => {
                    let _ = tx.send((index, status));
                }
                Err(e) => eprintln!("cannot wait for child pid {pid}: {e}"),
            }
        });
        self.procs.push(Proc {
            name: name.to_owned(),
            pid,
            log: log.to_path_buf(),
            status: None,
        });
        Ok(pid)
    }

    /// The next child to exit (waits for it).
    pub async fn next_exit(&mut self) -> Option<Exited> {
        let (index, status) = self.rx.recv().await?;
        let p = self.procs.get_mut(index)?;
        p.status = Some(status);
        Some(Exited {
            name: p.name.clone(),
            pid: p.pid,
            status,
            log: p.log.clone(),
        })
    }

    fn signal_running(&self, signal: Signal) {
        for p in self.procs.iter().filter(|p| p.status.is_none()) {
            let Ok(pid) = i32::try_from(p.pid) else {
                continue;
            };
            if let Err(e) = kill(Pid::from_raw(pid), signal)
                && e != nix::errno::Errno::ESRCH
            {
                eprintln!("cannot send {signal} to {} (pid {}): {e}", p.name, p.pid);
            }
        }
    }

    /// Sends SIGTERM to every running child and waits until all have exited; a child still
    /// running after `grace` gets SIGKILL. Returns what went wrong (non-zero exits, kills).
    pub async fn terminate_all(&mut self, grace: Duration) -> Vec<String> {
        let mut problems = Vec::new();
        self.signal_running(Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + grace;
        let mut killed = false;
        while self.any_running() {
            let timeout = if killed {
                tokio::time::Instant::now() + Duration::from_secs(5)
            } else {
                deadline
            };
            match tokio::time::timeout_at(timeout, self.next_exit()).await {
                Ok(Some(exited)) => {
                    if !exited.status.success() {
                        problems.push(format!(
                            "{} (pid {}) exited with {} (log: {})",
                            exited.name,
                            exited.pid,
                            exited.status,
                            exited.log.display()
                        ));
                    }
                }
                Ok(None) => break,
                Err(_) if !killed => {
                    for p in self.procs.iter().filter(|p| p.status.is_none()) {
                        problems.push(format!(
                            "{} (pid {}) did not stop within {grace:?} of SIGTERM; killed",
                            p.name, p.pid
                        ));
                    }
                    self.signal_running(Signal::SIGKILL);
                    killed = true;
                }
                Err(_) => {
                    for p in self.procs.iter().filter(|p| p.status.is_none()) {
                        problems.push(format!("{} (pid {}) survived SIGKILL", p.name, p.pid));
                    }
                    break;
                }
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_lines() {
        assert!(is_error_line(
            "2026-01-01T00:00:00Z ERROR mesh_proxy: cannot bind 127.0.0.1:8080"
        ));
        assert!(is_error_line("error: unexpected argument"));
        assert!(!is_error_line(
            "2026-01-01T00:00:00Z  INFO mesh_proxy: ready"
        ));
    }

    #[tokio::test]
    async fn terminate_stops_children_and_reports_failures() {
        let dir = std::env::temp_dir().join(format!("bookinfo-children-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut children = Children::new();
        let sh = Path::new("/bin/sh");
        children
            .spawn(
                "sleeper",
                sh,
                &["-c".into(), "exec sleep 30".into()],
                &dir.join("a.log"),
            )
            .unwrap();
        children
            .spawn(
                "stubborn",
                sh,
                &[
                    "-c".into(),
                    "trap '' TERM; echo started >&2; sleep 30".into(),
                ],
                &dir.join("b.log"),
            )
            .unwrap();
        // Let the stubborn shell install its trap.
        for _ in 0..100 {
            if std::fs::read_to_string(dir.join("b.log"))
                .unwrap_or_default()
                .contains("started")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let problems = children.terminate_all(Duration::from_millis(500)).await;
        assert!(!children.any_running());
        assert!(
            problems
                .iter()
                .any(|p| p.contains("stubborn") && p.contains("killed")),
            "{problems:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
