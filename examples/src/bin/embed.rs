//! A Rust client with the mesh embedded: no sidecar, the layers run in-process.
//!
//! `cargo run -p examples --bin embed` starts two `greeter` instances (`v1`, `v2`) on
//! loopback, each accepting only mesh mTLS, builds the client's stack from Istio YAML (an
//! 80/20 canary split, retries, peak-EWMA balancing, mTLS checking the servers' SPIFFE IDs,
//! Istio metrics), sends the requests and prints the split, the retries and the metrics.
//! See `examples/src/embed.rs` for the stack and why it is ordered as it is.

use std::time::Duration;

use clap::Parser;
use examples::embed::{Scenario, ScenarioOptions};

#[derive(Parser, Debug)]
struct Args {
    /// How many requests to send.
    #[arg(long, default_value_t = 500)]
    requests: usize,
    /// How many requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Percent of requests routed to v2 (the canary).
    #[arg(long, default_value_t = 20)]
    v2_weight: u32,
    /// Instances per version (2 shows peak-EWMA balancing inside a subset).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// The first v1 instance answers 503 to every n-th request (retries hide it).
    #[arg(long)]
    v1_fail_every: Option<u64>,
    /// The first v1 instance waits this many milliseconds before answering.
    #[arg(long)]
    v1_delay_ms: Option<u64>,
    /// The v2 instances present this service account instead of `greeter` (the client
    /// refuses them).
    #[arg(long)]
    v2_service_account: Option<String>,
    /// Print the generated Istio YAML too.
    #[arg(long)]
    show_yaml: bool,
    /// Print every metric line, not only `istio_requests_total`.
    #[arg(long)]
    all_metrics: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    let options = ScenarioOptions {
        v2_weight: args.v2_weight,
        replicas: args.replicas,
        v1_fail_every: args.v1_fail_every,
        v1_delay: args.v1_delay_ms.map(Duration::from_millis),
        v2_service_account: args.v2_service_account,
    };
    let scenario = Scenario::start(&options).await?;
    for server in &scenario.servers {
        println!(
            "{:<14} https://{}  (mTLS, presents spiffe://cluster.local/ns/default/sa/{})",
            server.spec.workload, server.addr, server.spec.service_account
        );
    }
    if args.show_yaml {
        println!("\n{}", scenario.yaml);
    }
    println!();
    let report = scenario.run(args.requests, args.concurrency).await;
    print!("{report}");
    for server in &scenario.servers {
        println!(
            "  {} served {} requests ({} failed on purpose) over {} mTLS connections",
            server.spec.workload,
            server
                .stats
                .requests
                .load(std::sync::atomic::Ordering::Relaxed),
            server
                .stats
                .failed
                .load(std::sync::atomic::Ordering::Relaxed),
            server
                .stats
                .handshakes
                .load(std::sync::atomic::Ordering::Relaxed),
        );
    }
    println!("\nclient metrics (reporter=\"source\"):");
    for line in report.metrics.lines() {
        if args.all_metrics || line.starts_with("istio_requests_total") {
            println!("{line}");
        }
    }
    Ok(())
}
