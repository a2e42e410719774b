//! Where lines go: a bounded channel to one writer task that renders, buffers and writes.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use mesh_core::config::bootstrap::{AccessLogEncoding, AccessLogSettings};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::format::{self, Entry};

/// Lines waiting for the writer task before new ones are dropped.
pub const DEFAULT_CAPACITY: usize = 8192;

/// How long a line may sit in the writer's buffer. Half of the one second promised (Envoy
/// flushes every second), so a line reaches its file well within a second of its response
/// even when the writer task is late.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(500);

/// The buffer is written out once it holds this much, whatever the interval.
const HIGH_WATER: usize = 64 * 1024;

/// Lines taken off the channel per wake-up of the writer task.
const BATCH: usize = 256;

/// The wall clock that stamps `start_time`; replaceable for tests.
pub type Clock = fn() -> SystemTime;

/// Why an access log cannot be opened or flushed.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("cannot open access log file {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("the access log needs a tokio runtime to run its writer task")]
    NoRuntime,
    #[error("writing the access log to {destination} failed: {source}")]
    Write {
        destination: Arc<str>,
        source: io::Error,
    },
    #[error("the access log writer has stopped")]
    Closed,
}

/// An access log: a handle to the task that writes its lines. Cheap to clone; the writer
/// flushes and stops when the last handle (and the last request it is logging) is gone.
///
/// Lines are handed over through a bounded channel and never wait for I/O: when the channel
/// is full (the destination is slower than the traffic) the line is **dropped** and counted
/// in [`dropped`](AccessLog::dropped). A log must never slow the data path.
#[derive(Clone)]
pub struct AccessLog {
    shared: Arc<Shared>,
}

struct Shared {
    tx: mpsc::Sender<Msg>,
    encoding: AccessLogEncoding,
    clock: Clock,
    /// Lines lost: channel full, writer gone, or a failed write.
    dropped: Arc<AtomicU64>,
    destination: Arc<str>,
}

pub(crate) enum Msg {
    Entry(Box<Entry>),
    Flush(oneshot::Sender<Result<(), AccessLogError>>),
}

impl AccessLog {
    /// Opens the Bootstrap's `accessLog`: `stdout`, `stderr`, or a file (created if missing,
    /// appended to). Must run inside a tokio runtime, where the writer task is spawned.
    pub fn open(settings: &AccessLogSettings) -> Result<AccessLog, AccessLogError> {
        AccessLog::builder(settings.encoding).open(&settings.path)
    }

    /// A log writing to any async writer (an embedder's sink, a test's buffer).
    pub fn from_writer<W>(
        writer: W,
        encoding: AccessLogEncoding,
    ) -> Result<AccessLog, AccessLogError>
    where
        W: AsyncWrite + Send + Unpin + 'static,
    {
        AccessLog::builder(encoding).writer(writer)
    }

    /// A log with settings beyond the encoding (channel capacity, flush interval, clock).
    pub fn builder(encoding: AccessLogEncoding) -> AccessLogBuilder {
        AccessLogBuilder {
            encoding,
            capacity: DEFAULT_CAPACITY,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            clock: SystemTime::now,
        }
    }

    pub fn encoding(&self) -> AccessLogEncoding {
        self.shared.encoding
    }

    /// Lines lost so far: dropped because the channel was full (or the writer had stopped),
    /// or lost in a failed write.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Writes out every line handed over before this call and flushes the destination; for
    /// drain, before the process exits (a runtime that shuts down cancels the writer task
    /// and loses what it buffered). Waits for channel capacity: not for the data path.
    pub async fn flush(&self) -> Result<(), AccessLogError> {
        let (ack, done) = oneshot::channel();
        self.shared
            .tx
            .send(Msg::Flush(ack))
            .await
            .map_err(|_| AccessLogError::Closed)?;
        done.await.map_err(|_| AccessLogError::Closed)?
    }

    pub(crate) fn now(&self) -> SystemTime {
        (self.shared.clock)()
    }

    /// Hands a finished entry to the writer, or drops it if the channel is full.
    pub(crate) fn submit(&self, entry: Box<Entry>) {
        if self.shared.tx.try_send(Msg::Entry(entry)).is_err() {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessLog")
            .field("destination", &self.shared.destination)
            .field("encoding", &self.shared.encoding)
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

/// Builds an [`AccessLog`]; see [`AccessLog::builder`].
#[derive(Clone, Debug)]
pub struct AccessLogBuilder {
    encoding: AccessLogEncoding,
    capacity: usize,
    flush_interval: Duration,
    clock: Clock,
}

impl AccessLogBuilder {
    /// Lines that may wait for the writer before new ones are dropped (default
    /// [`DEFAULT_CAPACITY`]; at least 1).
    pub fn capacity(mut self, lines: usize) -> Self {
        self.capacity = lines.max(1);
        self
    }

    /// The longest a line stays buffered before it is written (default
    /// [`DEFAULT_FLUSH_INTERVAL`]); zero writes every batch at once.
    pub fn flush_interval(mut self, interval: Duration) -> Self {
        self.flush_interval = interval;
        self
    }

    /// The clock for `start_time` (default `SystemTime::now`). Durations are measured on
    /// tokio's clock, so paused-time tests see exact values.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// `stdout`, `stderr` or a file path (created if missing, appended to).
    pub fn open(self, path: &str) -> Result<AccessLog, AccessLogError> {
        match path {
            "stdout" => self.spawn(tokio::io::stdout(), "stdout".into()),
            "stderr" => self.spawn(tokio::io::stderr(), "stderr".into()),
            _ => {
                // Opened synchronously: this runs once, at startup or reload, and the error
                // (naming the path) belongs to the caller, not to a background task.
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| AccessLogError::Open {
                        path: path.into(),
                        source,
                    })?;
                self.spawn(tokio::fs::File::from_std(file), path.into())
            }
        }
    }

    /// Any async writer.
    pub fn writer<W>(self, writer: W) -> Result<AccessLog, AccessLogError>
    where
        W: AsyncWrite + Send + Unpin + 'static,
    {
        self.spawn(writer, "writer".into())
    }

    fn spawn<W>(self, writer: W, destination: Arc<str>) -> Result<AccessLog, AccessLogError>
    where
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| AccessLogError::NoRuntime)?;
        let (tx, rx) = mpsc::channel(self.capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let task = Writer {
            rx,
            sink: writer,
            encoding: self.encoding,
            flush_interval: self.flush_interval,
            dropped: dropped.clone(),
            destination: destination.clone(),
            buf: Vec::with_capacity(HIGH_WATER + HIGH_WATER / 4),
            lines: 0,
            failing: false,
            clock: format::TimeCache::default(),
        };
        runtime.spawn(task.run());
        Ok(AccessLog {
            shared: Arc::new(Shared {
                tx,
                encoding: self.encoding,
                clock: self.clock,
                dropped,
                destination,
            }),
        })
    }
}

/// The writer task's state.
struct Writer<W> {
    rx: mpsc::Receiver<Msg>,
    sink: W,
    encoding: AccessLogEncoding,
    flush_interval: Duration,
    dropped: Arc<AtomicU64>,
    destination: Arc<str>,
    buf: Vec<u8>,
    /// Lines in `buf`, counted as dropped if writing them fails.
    lines: u64,
    /// Whether the last write failed (to warn once per failure streak, not per write).
    failing: bool,
    clock: format::TimeCache,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    async fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH);
        let sleep = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(sleep);
        // Whether `sleep` is the deadline of the oldest buffered line.
        let mut armed = false;
        loop {
            tokio::select! {
                n = self.rx.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        break; // every handle is gone
                    }
                }
                () = sleep.as_mut(), if armed => {
                    armed = false;
                    let _ = self.write_out().await;
                    continue;
                }
            }
            for msg in batch.drain(..) {
                match msg {
                    Msg::Entry(entry) => {
                        format::encode(&entry, self.encoding, &mut self.clock, &mut self.buf);
                        self.lines += 1;
                    }
                    Msg::Flush(ack) => {
                        armed = false;
                        let _ = ack.send(self.write_out().await);
                    }
                }
            }
            if self.buf.len() >= HIGH_WATER {
                armed = false;
                let _ = self.write_out().await;
            } else if !self.buf.is_empty() && !armed {
                armed = true;
                sleep.as_mut().reset(Instant::now() + self.flush_interval);
            }
        }
        let _ = self.write_out().await;
    }

    /// Writes and flushes the buffer; on failure its lines are counted as dropped.
    async fn write_out(&mut self) -> Result<(), AccessLogError> {
        let mut result = Ok(());
        if !self.buf.is_empty() {
            result = self.sink.write_all(&self.buf).await;
        }
        // Flushed even when nothing was buffered: a flush request asks the file, too.
        if result.is_ok() {
            result = self.sink.flush().await;
        }
        let lines = std::mem::take(&mut self.lines);
        self.buf.clear();
        match result {
            Ok(()) => {
                self.failing = false;
                Ok(())
            }
            Err(source) => {
                self.dropped.fetch_add(lines, Ordering::Relaxed);
                if !self.failing {
                    tracing::warn!(
                        destination = %self.destination,
                        error = %source,
                        lines,
                        "access log write failed; lines dropped"
                    );
                }
                self.failing = true;
                Err(AccessLogError::Write {
                    destination: self.destination.clone(),
                    source,
                })
            }
        }
    }
}
