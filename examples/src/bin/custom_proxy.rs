//! A custom edge proxy composed from the mesh's layers (not the stock sidecar).
//!
//! `cargo run -p examples --bin custom_proxy` starts two `greeter` instances (`v1`, `v2`) that
//! accept only mesh mTLS, and an edge proxy on `127.0.0.1:8000` that takes plaintext HTTP,
//! applies AuthorizationPolicies (and, with `--rps`, a rate limit), routes by a
//! VirtualService, retries, balances, records Istio metrics and calls the greeters over mTLS.
//! It sends a few sample requests, prints them, and serves until Ctrl-C (`--once`: exits).
//! See `examples/src/custom_proxy.rs` for the stack and why it is ordered as it is.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use examples::custom_proxy::{CANARY_HEADER, EdgeOptions, EdgeProxy, edge_yaml, send};
use examples::embed::{Pki, ServerSpec, load_yaml, start_server};
use mesh_core::config::bootstrap::RateLimitSettings;

/// A sample request: method, host, path, extra headers.
type Sample<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str)]);

#[derive(Parser, Debug)]
struct Args {
    /// Where the edge listens for plaintext clients.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Limit the edge to this many requests per second (token bucket); none by default.
    #[arg(long)]
    rps: Option<u32>,
    /// The bucket's burst (default: the rate).
    #[arg(long)]
    burst: Option<u32>,
    /// Send the sample requests, print them and exit instead of waiting for Ctrl-C.
    #[arg(long)]
    once: bool,
    /// Print the generated Istio YAML.
    #[arg(long)]
    show_yaml: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();

    let pki = Pki::generate()?;
    let v1 = start_server(&pki, ServerSpec::new("greeter-v1", "v1")).await?;
    let v2 = start_server(&pki, ServerSpec::new("greeter-v2", "v2")).await?;
    let yaml = edge_yaml(&[(v1.addr, "v1"), (v2.addr, "v2")]);
    if args.show_yaml {
        println!("{yaml}");
    }
    let config = load_yaml("edge.yaml", &yaml)?;
    let options = EdgeOptions {
        listen: args.listen,
        rate_limit: args.rps.map(|rps| RateLimitSettings {
            requests_per_second: rps,
            burst: args.burst.unwrap_or(rps),
            per_principal: false,
        }),
    };
    let edge = EdgeProxy::start(&config, pki.credentials("edge-gateway")?, &options)
        .await
        .with_context(|| format!("cannot start the edge proxy on {}", args.listen))?;
    let addr = edge.addr();
    println!("greeter-v1   https://{}  (mTLS only)", v1.addr);
    println!("greeter-v2   https://{}  (mTLS only)", v2.addr);
    println!("edge proxy   http://{addr}/  (plaintext in, mTLS out)");
    println!();

    let samples: [Sample<'_>; 6] = [
        ("GET", "greeter", "/hello", &[]),
        ("GET", "greeter", "/hello", &[(CANARY_HEADER, "yes")]),
        ("GET", "greeter", "/admin/users", &[]),
        ("DELETE", "greeter", "/hello", &[]),
        ("GET", "nowhere.example", "/", &[]),
        ("HEAD", "greeter", "/hello", &[]),
    ];
    for (method, host, path, headers) in samples {
        let answer = send(addr, method, host, path, headers).await?;
        let extra: Vec<String> = headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        println!(
            "{method} http://{host}{path} {} -> {} flags={} version={}  {}",
            extra.join(" "),
            answer.status,
            if answer.flags.is_empty() {
                "-"
            } else {
                &answer.flags
            },
            if answer.version.is_empty() {
                "-"
            } else {
                &answer.version
            },
            answer.body.trim_end(),
        );
    }
    println!("\nedge metrics (reporter=\"source\"):");
    for line in edge.metrics_text().lines() {
        if line.starts_with("istio_requests_total") {
            println!("{line}");
        }
    }
    println!();
    println!("try: curl -i -H 'Host: greeter' http://{addr}/hello");
    println!("     curl -i -H 'Host: greeter' -H '{CANARY_HEADER}: yes' http://{addr}/hello");
    println!("     curl -i -H 'Host: greeter' http://{addr}/admin/users");

    if !args.once {
        println!("Ctrl-C to drain and stop.");
        tokio::signal::ctrl_c().await?;
    }
    edge.shutdown().await;
    drop((v1, v2));
    Ok(())
}
