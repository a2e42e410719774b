//! The demo: a small "hello" app behind a `mesh-proxy` sidecar, on loopback.
//!
//! `cargo run -p examples --bin demo` starts the app on 127.0.0.1:9080 and the sidecar with
//! `examples/config/demo.yaml`, sends a few requests through it to show what happens, prints
//! the commands to try by hand, and drains cleanly on Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use http_body_util::BodyExt;
use mesh_core::body;

#[derive(Parser, Debug)]
struct Args {
    /// The mesh config to run the sidecar with.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.yaml"))]
    config: PathBuf,
    /// Where the demo app listens (the config's inbound `app`).
    #[arg(long, default_value = "127.0.0.1:9080")]
    app: SocketAddr,
    /// Send the sample requests, print them and exit instead of waiting for Ctrl-C.
    #[arg(long)]
    once: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();

    let app = examples::hello::serve(args.app, "hello-v1")
        .await
        .with_context(|| format!("cannot start the demo app on {}", args.app))?;
    let config =
        mesh_core::config::load_files(&[&args.config]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let proxy = mesh_proxy::RunningProxy::start(Arc::new(config)).await?;
    let outbound = proxy
        .outbound_addr()
        .context("the demo config has no outbound listener")?;
    let admin = proxy.admin_addr();

    println!("demo app         http://{}/", args.app);
    println!("sidecar outbound http://{outbound}/   (send Host: hello)");
    if let Some(inbound) = proxy.inbound_addr() {
        println!("sidecar inbound  http://{inbound}/");
    }
    println!("sidecar admin    http://{admin}/ready  /live  /config_dump  /clusters");
    println!();

    for (host, path) in [("hello", "/"), ("hello", "/headers"), ("unknown", "/")] {
        let (status, flags, body) = call(outbound, host, path).await?;
        println!("GET http://{host}{path} via the sidecar -> {status} flags={flags}");
        for line in body.lines() {
            println!("    {line}");
        }
    }
    println!();
    println!("try: curl -s -H 'Host: hello' http://{outbound}/headers");
    println!("     curl -s http://{admin}/config_dump");

    if !args.once {
        println!("Ctrl-C to drain and stop.");
        tokio::signal::ctrl_c().await?;
    }
    proxy.shutdown().await;
    app.abort();
    Ok(())
}

async fn call(
    outbound: SocketAddr,
    host: &str,
    path: &str,
) -> anyhow::Result<(u16, String, String)> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<body::BoxBody>();
    let req = http::Request::get(format!("http://{outbound}{path}"))
        .header("host", host)
        .body(body::empty())?;
    let resp = client.request(req).await?;
    let status = resp.status().as_u16();
    let flags = resp
        .headers()
        .get("x-mesh-response-flags")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((status, flags, String::from_utf8_lossy(&bytes).into_owned()))
}
