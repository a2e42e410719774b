//! The process's log subscriber, with its level changeable at run time (admin
//! `POST /logging?level=`, as Envoy's).
//!
//! The binary installs it ([`init`]); a program that embeds the proxy as a library keeps its
//! own subscriber, and then `/logging` answers that the level is not the proxy's to change.

use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

/// Log line format on stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Swaps the installed subscriber's filter; set once by [`init`].
static SET_FILTER: OnceLock<SetFilter> = OnceLock::new();

/// Why a level change was refused.
#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    #[error(
        "the log level is not controlled by this proxy (it runs inside a program with its own logging)"
    )]
    NotInstalled,
    #[error(
        "invalid level {given:?}: use trace, debug, info, warning, error, critical or off, or a RUST_LOG directive ({reason})"
    )]
    Invalid { given: String, reason: String },
    #[error("cannot change the log level: {0}")]
    Reload(String),
}

/// Installs the stderr subscriber: level from `RUST_LOG` (default `info`), `format` lines,
/// colours only on a terminal. Does nothing if the process already has a subscriber.
pub fn init(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let installed = match format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(filter)
            .with(lines)
            .try_init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(lines.json())
            .try_init(),
    };
    if installed.is_ok() {
        let _ = SET_FILTER.set(Box::new(move |f| {
            handle.reload(f).map_err(|e| e.to_string())
        }));
    }
}

/// Sets the level of every logger: Envoy's level names (`trace`, `debug`, `info`, `warning`,
/// `error`, `critical`, `off`), or any `RUST_LOG` directive (`mesh_proxy=debug,info`).
pub fn set_level(level: &str) -> Result<(), LogLevelError> {
    let set = SET_FILTER.get().ok_or(LogLevelError::NotInstalled)?;
    let directive = match level {
        "warning" => "warn",
        "critical" => "error",
        other => other,
    };
    let filter = EnvFilter::try_new(directive).map_err(|e| LogLevelError::Invalid {
        given: level.to_owned(),
        reason: e.to_string(),
    })?;
    set(filter).map_err(LogLevelError::Reload)?;
    tracing::info!(level, "log level changed");
    Ok(())
}
