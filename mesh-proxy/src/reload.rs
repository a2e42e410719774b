//! Hot reload: the config files are watched and re-read, and a valid change applies to new
//! requests without a restart.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let paths = vec![std::path::PathBuf::from("mesh.yaml")];
//! let config = mesh_core::config::load_files(&paths)?;
//! let proxy = mesh_proxy::RunningProxy::start(std::sync::Arc::new(config)).await?;
//! let watch = proxy.watch_config(paths)?; // edits to mesh.yaml now apply within a second
//! watch.reload_now(); // what SIGHUP does: re-read even if no file event was seen
//! # Ok(()) }
//! ```
//!
//! Choices:
//! - The **directories** holding the files are watched, not the files: Kubernetes mounts a
//!   ConfigMap as symlinks into a `..data` directory it swaps atomically, and editors and
//!   `mv` replace a file by renaming over it; a watch on the file itself would follow the old
//!   inode and miss both. Events are debounced (100 ms) so one save is one reload.
//! - Every reload re-reads **all** the files and validates them as a whole, exactly as at
//!   start (`mesh_core::config::load_sources`): a change that is only valid together with
//!   another file's change is applied once both are there, and an invalid one is rejected
//!   whole — logged with its errors, counted as `mesh_config_reloads_total{result="rejected"}`
//!   — while the last good configuration stays in force.
//! - A file event whose files read the same as the config in force is not a reload (editors
//!   touch files; a ConfigMap sync rewrites unchanged ones). SIGHUP ([`ConfigWatch::reload_now`])
//!   always reloads.
//! - Applying swaps the compiled routes, endpoints and policies (`arc_swap`) for new requests;
//!   requests in flight finish on the config they started with. Listener addresses, identity
//!   files and telemetry settings in the Bootstrap are fixed at start: a reload that changes
//!   them applies everything else and warns that those need a restart, as Envoy's bootstrap
//!   does. The Bootstrap's `outboundTrafficPolicy` applies on reload.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::config::{MeshConfig, Source, load_sources};
use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::RunningProxy;
use crate::proxy::Shared;

/// How long file events are gathered before one reload.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Why the config files cannot be watched.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch the config directory {dir}: {source}")]
    Watch { dir: PathBuf, source: notify::Error },
}

/// `mesh_config_reloads_total{result}` and `mesh_config_last_reload_successful`, in the
/// proxy's registry.
#[derive(Clone, Debug)]
pub struct ReloadMetrics {
    reloads: Family<ReloadResult, Counter>,
    last_successful: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadResult {
    result: &'static str,
}

impl ReloadMetrics {
    /// Registers the reload metrics in `metrics`.
    pub fn register(metrics: &mesh_telemetry::metrics::Metrics) -> ReloadMetrics {
        let m = ReloadMetrics {
            reloads: Family::default(),
            last_successful: Gauge::default(),
        };
        // Both results show from the start, so a rate() over them has a zero to begin from.
        for result in ["success", "rejected"] {
            let _ = m.reloads.get_or_create(&ReloadResult { result });
        }
        m.last_successful.set(1);
        metrics.register(
            "mesh_config_reloads",
            "Config reloads by result: success (applied) or rejected (invalid; the last good config stays)",
            m.reloads.clone(),
        );
        metrics.register(
            "mesh_config_last_reload_successful",
            "Whether the last config reload was applied (1) or rejected (0)",
            m.last_successful.clone(),
        );
        m
    }

    pub(crate) fn record(&self, ok: bool) {
        let result = if ok { "success" } else { "rejected" };
        self.reloads.get_or_create(&ReloadResult { result }).inc();
        self.last_successful.set(i64::from(ok));
    }
}

/// Watches a running proxy's config files; dropping it (or [`ConfigWatch::stop`]) stops
/// watching.
#[derive(Debug)]
pub struct ConfigWatch {
    trigger: mpsc::UnboundedSender<Trigger>,
    task: JoinHandle<()>,
}

#[derive(Debug)]
enum Trigger {
    /// The files may have changed: reload if they did.
    FilesChanged,
    /// Reload whatever the files say (SIGHUP).
    Forced,
}

impl ConfigWatch {
    /// Re-reads the files now and applies them if valid, as SIGHUP does.
    pub fn reload_now(&self) {
        let _ = self.trigger.send(Trigger::Forced);
    }

    /// Stops watching.
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for ConfigWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RunningProxy {
    /// Watches `paths` (the files this proxy's config was loaded from) and applies every
    /// valid change; see the [module docs](crate::reload).
    pub fn watch_config(&self, paths: Vec<PathBuf>) -> Result<ConfigWatch, WatchError> {
        let (trigger, triggers) = mpsc::unbounded_channel();
        let events = trigger.clone();
        let mut debouncer = new_debouncer(DEBOUNCE, None, move |result: DebounceEventResult| {
            match result {
                Ok(events_seen) if events_seen.is_empty() => {}
                Ok(_) => {
                    let _ = events.send(Trigger::FilesChanged);
                }
                Err(errors) => {
                    for e in errors {
                        tracing::warn!(error = %e, "config watch error");
                    }
                    // A watch error may hide a change: look at the files.
                    let _ = events.send(Trigger::FilesChanged);
                }
            }
        })
        .map_err(|source| WatchError::Watch {
            dir: PathBuf::from("."),
            source,
        })?;
        let mut dirs: Vec<PathBuf> = paths.iter().map(|p| directory_of(p)).collect();
        dirs.sort();
        dirs.dedup();
        for dir in &dirs {
            debouncer
                .watch(dir, RecursiveMode::NonRecursive)
                .map_err(|source| WatchError::Watch {
                    dir: dir.clone(),
                    source,
                })?;
        }
        tracing::info!(
            ?dirs,
            "watching config files for changes (SIGHUP reloads too)"
        );
        let reloader = Reloader {
            shared: self.shared().clone(),
            in_force: read_all(&paths),
            paths,
        };
        let task = tokio::spawn(reloader.run(triggers, debouncer));
        Ok(ConfigWatch { trigger, task })
    }
}

/// The directory to watch for `path` (its parent; `.` for a bare file name).
fn directory_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The files' texts, or what made them unreadable.
type Texts = Vec<Result<String, String>>;

fn read_all(paths: &[PathBuf]) -> Texts {
    paths
        .iter()
        .map(|p| std::fs::read_to_string(p).map_err(|e| e.to_string()))
        .collect()
}

struct Reloader {
    shared: Arc<Shared>,
    paths: Vec<PathBuf>,
    /// What the files said at the last reload (applied or rejected), to skip events that
    /// changed nothing.
    in_force: Texts,
}

impl Reloader {
    async fn run<D: Send + 'static>(
        mut self,
        mut triggers: mpsc::UnboundedReceiver<Trigger>,
        // Held for as long as the watch runs: dropping it stops the file watcher.
        _debouncer: D,
    ) {
        while let Some(trigger) = triggers.recv().await {
            let paths = self.paths.clone();
            // Small files, but still blocking I/O: off the runtime's workers.
            let Ok(texts) = tokio::task::spawn_blocking(move || read_all(&paths)).await else {
                continue;
            };
            if matches!(trigger, Trigger::FilesChanged) && texts == self.in_force {
                continue;
            }
            self.reload(&texts);
            self.in_force = texts;
        }
    }

    fn reload(&self, texts: &Texts) {
        let metrics = self.shared.reload_metrics();
        let mut sources = Vec::with_capacity(texts.len());
        let mut unreadable = Vec::new();
        for (path, text) in self.paths.iter().zip(texts) {
            match text {
                Ok(text) => sources.push(Source::new(path.display().to_string(), text.clone())),
                Err(e) => unreadable.push(format!("{}: cannot read: {e}", path.display())),
            }
        }
        if !unreadable.is_empty() {
            metrics.record(false);
            tracing::error!(
                errors = %unreadable.join("; "),
                "config reload rejected; the last good config stays in force"
            );
            return;
        }
        let config = match load_sources(&sources) {
            Ok(config) => config,
            Err(errors) => {
                metrics.record(false);
                tracing::error!(
                    "config reload rejected; the last good config stays in force:\n{errors}"
                );
                return;
            }
        };
        let running = self.shared.config();
        if let Err(why) = bootstrap_check(&running, &config) {
            metrics.record(false);
            tracing::error!("config reload rejected; the last good config stays in force: {why}");
            return;
        }
        let resources = config.resource_count();
        if let Err(errors) = self.shared.apply_files(Arc::new(config)) {
            metrics.record(false);
            tracing::error!(
                "config reload rejected (the files do not hold together with the resources from etcd); the last good config stays in force:\n{errors}"
            );
            return;
        }
        metrics.record(true);
        tracing::info!(resources, "config reloaded");
    }
}

/// A reload must keep a Bootstrap; a changed one applies at the next start.
fn bootstrap_check(running: &MeshConfig, new: &MeshConfig) -> Result<(), String> {
    let Some(bootstrap) = new.bootstrap() else {
        return Err("the new configuration has no Bootstrap resource".into());
    };
    // `outboundTrafficPolicy` is read with the routes, so it applies on reload like them.
    let spec = |b: &mesh_core::config::Bootstrap| {
        let mut v = serde_json::to_value(&b.spec).ok()?;
        if let Some(m) = v.as_object_mut() {
            m.remove("outboundTrafficPolicy");
        }
        Some(v)
    };
    if running.bootstrap().and_then(spec) != spec(bootstrap) {
        tracing::warn!(
            "the Bootstrap changed: listeners, identity and telemetry settings apply at the next start; the rest of the change applies now"
        );
    }
    Ok(())
}
