//! The OTLP/gRPC export pipeline: an OpenTelemetry SDK tracer whose batch processor hands
//! spans to `opentelemetry-otlp`'s tonic exporter.
//!
//! Where things run:
//! - A span ends on the thread that ends it (a request worker) with a `try_send` into the batch
//!   processor's bounded queue: when it is full, the span is dropped (and counted in one warning
//!   log); a request never waits for telemetry.
//! - The SDK's batch processor owns one OS thread (`OpenTelemetry.Traces.BatchProcessor`). It
//!   collects spans and, every `scheduled_delay` or when a batch is full, blocks on the export
//!   of the batch (`futures_executor::block_on`), so a slow or absent collector stalls only
//!   that thread, whose queue then fills and drops.
//! - The exporter's tonic channel must be created inside a tokio runtime, whose tasks then
//!   do the gRPC connection's I/O (the SDK's documented pitfall: build the provider outside a
//!   runtime and tonic panics; build it inside one that later stops, or a current-thread one
//!   whose only thread is blocked in a flush, and exports hang or fail). So the pipeline
//!   brings its own: a one-worker tokio runtime (thread `mesh-otlp`), created with it and
//!   stopped with it. `Tracing::new` therefore works with or without a runtime, export I/O
//!   never runs on the proxy's request workers, and a flush during drain does not depend on
//!   the serving runtime.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::InstrumentationScope;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanExporter,
};

use super::{ExportOptions, TracingError};

/// The running pipeline; dropping it shuts it down (see [`Drop`]).
pub(crate) struct Export {
    pub(crate) tracer: SdkTracer,
    provider: SdkTracerProvider,
    runtime: RuntimeGuard,
    shut_down: AtomicBool,
    shutdown_timeout: Duration,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("shut_down", &self.shut_down.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Export {
    pub(crate) fn start(
        url: &str,
        service_name: &str,
        options: &ExportOptions,
    ) -> Result<Export, TracingError> {
        check_url(url)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("mesh-otlp")
            .enable_io()
            .enable_time()
            .build()
            .map_err(TracingError::Runtime)?;
        let runtime = RuntimeGuard(Some(runtime));
        let exporter = {
            // The channel's worker task is spawned here, onto our runtime.
            let _entered = runtime.0.as_ref().map(|rt| rt.enter());
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(url)
                // Bounds each export, its retries of transient failures (the exporter's
                // default policy) included.
                .with_timeout(options.export_timeout)
                .build()
                .map_err(|e| TracingError::Collector {
                    url: url.to_string(),
                    reason: e.to_string(),
                })?
        };
        Ok(Export::with_exporter(
            exporter,
            runtime,
            service_name,
            options,
        ))
    }

    /// The pipeline around `exporter` (OTLP, or the tests' own).
    pub(crate) fn with_exporter(
        exporter: impl SpanExporter + 'static,
        runtime: RuntimeGuard,
        service_name: &str,
        options: &ExportOptions,
    ) -> Export {
        // Every field is set, so OTEL_BSP_* environment variables do not override the config.
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(options.max_queue_size.max(1))
            .with_max_export_batch_size(options.max_export_batch_size.max(1))
            .with_scheduled_delay(options.scheduled_delay)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(
                BatchSpanProcessor::builder(exporter)
                    .with_batch_config(batch)
                    .build(),
            )
            // The layer decides before it asks for a span, and asks only for sampled ones.
            .with_sampler(Sampler::AlwaysOn)
            .with_resource(
                Resource::builder()
                    .with_service_name(service_name.to_string())
                    .build(),
            )
            .build();
        let tracer = provider.tracer_with_scope(
            InstrumentationScope::builder("mesh-telemetry")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        );
        Export {
            tracer,
            provider,
            runtime,
            shut_down: AtomicBool::new(false),
            shutdown_timeout: options.export_timeout,
        }
    }

    /// Exports what is queued; waits for the export (bounded by the export timeout).
    pub(crate) async fn flush(&self) -> Result<(), TracingError> {
        let provider = self.provider.clone();
        blocking(move || provider.force_flush()).await
    }

    /// Exports what is queued and stops: spans ended afterwards are dropped.
    pub(crate) async fn shutdown(&self) -> Result<(), TracingError> {
        if self.shut_down.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let provider = self.provider.clone();
        let timeout = self.shutdown_timeout;
        blocking(move || provider.shutdown_with_timeout(timeout)).await
    }
}

impl Drop for Export {
    /// Without an explicit [`shutdown`](Export::shutdown), the queued spans are flushed by a
    /// short-lived thread: shutting the SDK down blocks, and the last `Tracing` may well be
    /// dropped on a runtime worker.
    fn drop(&mut self) {
        if self.shut_down.swap(true, Ordering::AcqRel) {
            return;
        }
        let provider = self.provider.clone();
        let runtime = RuntimeGuard(self.runtime.0.take());
        let timeout = self.shutdown_timeout;
        let _ = std::thread::Builder::new()
            .name("mesh-otlp-shutdown".into())
            .spawn(move || {
                let _ = provider.shutdown_with_timeout(timeout);
                drop(runtime);
            });
        // Should the thread not start, the closure and its runtime are dropped here, which
        // the guard makes safe anywhere; the spans still queued are lost.
    }
}

/// Owns the export runtime; stops it without blocking, which is allowed in async contexts
/// (dropping a `Runtime` there panics).
pub(crate) struct RuntimeGuard(pub(crate) Option<tokio::runtime::Runtime>);

impl Drop for RuntimeGuard {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Runs a blocking SDK call off the async worker threads when there are any.
async fn blocking(
    f: impl FnOnce() -> opentelemetry_sdk::error::OTelSdkResult + Send + 'static,
) -> Result<(), TracingError> {
    let result = match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle
            .spawn_blocking(f)
            .await
            .map_err(|e| TracingError::Export(e.to_string()))?,
        Err(_) => f(),
    };
    result.map_err(|e| TracingError::Export(e.to_string()))
}

/// Plaintext OTLP/gRPC only: `http://host:port`. (TLS would need a tonic TLS feature; the
/// collector is normally a node-local agent.)
fn check_url(url: &str) -> Result<(), TracingError> {
    let fail = |reason: &str| TracingError::Collector {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|_| fail("not a URL (expected http://host:port)"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(fail(
                "TLS to the collector is not supported; use a plaintext http:// collector",
            ));
        }
        _ => return Err(fail("expected an http://host:port URL")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(fail("the URL names no host"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collector_urls_are_checked() {
        assert!(check_url("http://127.0.0.1:4317").is_ok());
        assert!(check_url("http://otel-collector.istio-system:4317").is_ok());
        for (bad, why) in [
            ("127.0.0.1:4317", "expected an http://"),
            ("https://collector:4317", "TLS"),
            ("http://", "not a URL"),
            ("", "not a URL"),
            ("grpc://collector:4317", "expected an http://"),
        ] {
            let err = check_url(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn starts_and_stops_without_a_runtime_or_a_collector() {
        // Nothing listens on port 9; building connects lazily and so succeeds; dropping the
        // pipeline outside any runtime must neither panic nor hang.
        let export =
            Export::start("http://127.0.0.1:9", "svc.ns", &ExportOptions::default()).unwrap();
        drop(export);
    }

    #[tokio::test]
    async fn drops_inside_a_runtime_without_panicking() {
        let export =
            Export::start("http://127.0.0.1:9", "svc.ns", &ExportOptions::default()).unwrap();
        drop(export);
        let export =
            Export::start("http://127.0.0.1:9", "svc.ns", &ExportOptions::default()).unwrap();
        // Nothing queued: shutdown has nothing to wait for.
        export.shutdown().await.unwrap();
        export.shutdown().await.unwrap();
    }
}
