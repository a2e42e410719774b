//! The real `mesh-proxy` binary as a child process, its listener addresses read from the
//! "proxy ready" line it logs (every listener on port 0 in the tests' configs).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_mesh-proxy");

/// A started `mesh-proxy run`. Not killed on drop: tests wait for its exit or kill it.
pub struct Binary {
    pub child: Child,
    pub outbound: SocketAddr,
    pub inbound: Option<SocketAddr>,
    pub admin: SocketAddr,
    /// Every line it has logged on stderr so far.
    pub log: Arc<Mutex<String>>,
}

impl Binary {
    /// Starts `mesh-proxy run --config CONFIG` at `RUST_LOG=rust_log` and waits (at most
    /// 30 s) for readiness. Its stderr is echoed with a `[tag]` prefix (shown when a test
    /// fails) and kept in [`Binary::log`].
    pub fn start(config: &Path, rust_log: &str, tag: &str) -> Binary {
        let mut child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", rust_log)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let (log, tag) = (log.clone(), tag.to_owned());
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    eprintln!("[{tag}] {line}");
                    if line.contains("proxy ready") {
                        let _ = tx.send(line.clone());
                    }
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no readiness from {tag}:\n{}", log.lock().unwrap()));
        // `outbound=127.0.0.1:1 inbound=Some(127.0.0.1:2) admin=127.0.0.1:3`
        let field = |name: &str| -> Option<SocketAddr> {
            let value = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name}= in {line}"));
            let value = value
                .strip_prefix("Some(")
                .map_or(value, |v| v.trim_end_matches(')'));
            (value != "None").then(|| value.parse().unwrap())
        };
        Binary {
            outbound: field("outbound").unwrap(),
            inbound: field("inbound"),
            admin: field("admin").unwrap(),
            child,
            log,
        }
    }
}
