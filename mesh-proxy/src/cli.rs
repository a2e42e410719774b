//! `mesh-proxy`'s command line, as a library function so other programs can be the sidecar:
//! the Bookinfo launcher runs each sidecar as a child process of itself through [`main`].
//!
//! ```no_run
//! // `mesh-proxy validate --config mesh.yaml`, in-process:
//! let code = mesh_proxy::cli::main(["mesh-proxy", "validate", "--config", "mesh.yaml"]);
//! # let _ = code;
//! ```

mod ca;
#[cfg(feature = "etcd")]
mod config;
mod iptables;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};

use crate::RunningProxy;

#[derive(Parser, Debug)]
#[command(
    name = "mesh-proxy",
    version,
    about = "A service mesh sidecar that speaks Istio's configuration"
)]
struct Cli {
    /// Log line format on stderr (level from RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the sidecar.
    Run {
        /// Config file (multi-document YAML); repeat for several.
        #[arg(long = "config", short = 'c', required = true)]
        config: Vec<PathBuf>,
    },
    /// Check config files; exits non-zero and names every error.
    Validate {
        #[arg(long = "config", short = 'c', required = true)]
        config: Vec<PathBuf>,
    },
    /// A small CA for the mesh: create a root, issue workload certificates.
    Ca {
        #[command(subcommand)]
        command: ca::CaCommand,
    },
    /// Transparent capture: write or remove the iptables rules that redirect the workload's
    /// TCP to the sidecar (Istio's istio-init).
    Iptables {
        #[command(subcommand)]
        command: iptables::IptablesCommand,
    },
    /// Resources in etcd, shared by every proxy whose Bootstrap names `discovery.etcd`.
    #[cfg(feature = "etcd")]
    Config {
        #[command(subcommand)]
        command: config::ConfigCommand,
    },
}

/// Runs the command line `args` (the first item is the program name, as in `std::env::args_os`)
/// to completion: parses it (printing help or the usage error and exiting the process as clap
/// does), sets up logging and runs the command.
pub fn main<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    init_logging(cli.log_format);
    match cli.command {
        Command::Validate { config } => validate(&config),
        Command::Run { config } => run(&config),
        Command::Ca { command } => ca::run(command),
        Command::Iptables { command } => iptables::run(command),
        #[cfg(feature = "etcd")]
        Command::Config { command } => config::run(command),
    }
}

fn init_logging(format: LogFormat) {
    crate::logging::init(match format {
        LogFormat::Text => crate::logging::LogFormat::Text,
        LogFormat::Json => crate::logging::LogFormat::Json,
    });
}

fn validate(paths: &[PathBuf]) -> ExitCode {
    match mesh_core::config::load_files(paths) {
        Ok(config) => {
            println!("{} resources valid", config.resource_count());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::FAILURE
        }
    }
}

fn run(paths: &[PathBuf]) -> ExitCode {
    let config = match mesh_core::config::load_files(paths) {
        Ok(config) => Arc::new(config),
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    raise_open_files_limit();
    // Istio's ProxyConfig.concurrency: worker threads; 2 when unset, as Istio's sidecar.
    let workers = config
        .bootstrap()
        .and_then(|b| b.spec.concurrency)
        .map_or(2, |n| n.max(1) as usize);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Signal handlers go in before the proxy says it is ready: a SIGHUP or SIGTERM sent
        // right after readiness (a reload, a rollout) must not meet the default action,
        // which kills the process.
        let signals = Signals::watch();
        let proxy = match RunningProxy::start(config).await {
            Ok(proxy) => proxy,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        // Hot reload: file changes (watched by directory) and SIGHUP. Without a watch the
        // proxy still runs, on the config it started with.
        let watch = match proxy.watch_config(paths.to_vec()) {
            Ok(watch) => Some(watch),
            Err(e) => {
                tracing::error!("{e}; config changes need a restart");
                None
            }
        };
        let why = until_drain(&proxy, watch.as_ref(), signals).await;
        tracing::info!("draining ({why})");
        drop(watch);
        proxy.shutdown().await;
        ExitCode::SUCCESS
    })
}

/// SIGTERM and SIGHUP, each `None` when it cannot be watched.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn watch() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            term: signal(SignalKind::terminate())
                .map_err(|e| tracing::warn!(error = %e, "cannot watch SIGTERM"))
                .ok(),
            hup: signal(SignalKind::hangup())
                .map_err(
                    |e| tracing::warn!(error = %e, "cannot watch SIGHUP; file changes still reload"),
                )
                .ok(),
        }
    }
}

/// Waits for what ends the proxy — SIGTERM, Ctrl-C or admin `POST /drain` — reloading the
/// config on each SIGHUP meanwhile. Says which one it was.
async fn until_drain(
    proxy: &RunningProxy,
    watch: Option<&crate::reload::ConfigWatch>,
    signals: Signals,
) -> &'static str {
    let Signals { mut term, mut hup } = signals;
    loop {
        tokio::select! {
            Some(()) = recv(&mut term) => return "SIGTERM",
            _ = tokio::signal::ctrl_c() => return "interrupt",
            () = proxy.drain_requested() => return "POST /drain",
            Some(()) = recv(&mut hup) => {
                tracing::info!("SIGHUP: reloading the config");
                if let Some(watch) = watch {
                    watch.reload_now();
                }
            }
        }
    }
}

/// The next signal, or never when the signal cannot be watched.
async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// Connections are bounded by file descriptors, not by a limit of ours: raise the soft
/// open-files limit to the hard one, as Envoy's and Linkerd's images do.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-files limit"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open-files limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-files limit"),
    }
}
