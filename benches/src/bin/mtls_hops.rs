//! Two sidecar hops, plaintext against mutual TLS, under `wrk`: what mTLS between sidecars
//! costs in throughput, as a ratio measured in one run on one machine.
//!
//! ```text
//! cargo run --release -p benches --bin mtls_hops -- [--rounds 5] [--seconds 5] [--connections 32]
//! ```
//!
//! It starts, in this process: a backend answering `hello` to every request; a plaintext
//! pair of sidecars (client sidecar → server sidecar → backend); and an mTLS pair, whose
//! certificates come from `mesh_tls::ca` and whose server side is `STRICT`. Then it runs
//! `wrk` (closed loop, HTTP/1.1 keep-alive, one thread) against the direct backend and each
//! pair's client sidecar, alternating the order every round because the machine drifts, and
//! prints each contender's median requests per second and the mTLS/plaintext ratio. The load
//! generator, the sidecars and the backend share the machine's cores: the ratio, not the
//! absolute figure, is what carries over.
//!
//! Needs `wrk` on the PATH (Debian: `apt-get install wrk`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use mesh_core::Identity;
use mesh_proxy::RunningProxy;
use mesh_tls::ca::CertificateAuthority;

#[derive(Parser, Debug)]
struct Args {
    /// Rounds; each runs every contender once.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds of load per contender per round.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Open connections (wrk -c).
    #[arg(long, default_value_t = 32)]
    connections: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Two workers: the proxies and the backend share them, as a sidecar shares a pod.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let (direct, plain, mtls, _proxies) = rt.block_on(start(dir.path()))?;

    let contenders = [("direct", direct), ("plaintext", plain), ("mtls", mtls)];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); contenders.len()];
    for round in 0..args.rounds {
        let mut order: Vec<usize> = (0..contenders.len()).collect();
        order.rotate_left(round % contenders.len());
        for i in order {
            let (name, addr) = contenders[i];
            let rps = wrk(addr, &args)?;
            eprintln!("round {round}: {name:<9} {rps:>10.0} req/s");
            results[i].push(rps);
        }
    }
    let medians: Vec<f64> = results.iter_mut().map(|r| median(r)).collect();
    println!("| path | median req/s | vs direct |");
    println!("|---|---|---|");
    for ((name, _), m) in contenders.iter().zip(&medians) {
        println!("| {name} | {m:.0} | {:.2} |", m / medians[0]);
    }
    println!(
        "mTLS two hops / plaintext two hops: {:.2} (over {} rounds of {} s, {} connections)",
        medians[2] / medians[1],
        args.rounds,
        args.seconds,
        args.connections
    );
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Runs wrk against `addr` (with `Host: backend`) and returns its requests per second.
fn wrk(addr: SocketAddr, args: &Args) -> anyhow::Result<f64> {
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{}", args.connections),
            &format!("-d{}s", args.seconds),
            "-H",
            "Host: backend",
            &format!("http://{addr}/"),
        ])
        .output()
        .context("cannot run wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    if let Some(line) = text.lines().find(|l| l.contains("Non-2xx")) {
        bail!("wrk saw errors ({line}):\n{text}");
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))
}

type Started = (SocketAddr, SocketAddr, SocketAddr, Vec<RunningProxy>);

/// The backend, then both pairs of sidecars; returns the addresses wrk calls.
async fn start(dir: &Path) -> anyhow::Result<Started> {
    let backend = backend().await?;
    let ca = CertificateAuthority::generate("cluster.local")?;
    for sa in ["client", "server"] {
        let id = Identity::parse(&format!("spiffe://cluster.local/ns/default/sa/{sa}"))?;
        ca.issue(&id, mesh_tls::ca::DEFAULT_TTL)?
            .save(&dir.join(sa))?;
    }
    let mut proxies = Vec::new();
    let client_of = |tls: bool| {
        let dir = dir.to_owned();
        async move {
            let server = proxy(&sidecar(
                "server",
                Some(backend),
                tls.then(|| dir.join("server")),
            ))
            .await?;
            let inbound = server.inbound_addr().context("no inbound listener")?;
            let client = proxy(&format!(
                "{}{}",
                sidecar("client", None, tls.then(|| dir.join("client"))),
                service_entry(inbound, tls)
            ))
            .await?;
            let outbound = client.outbound_addr().context("no outbound listener")?;
            anyhow::Ok((outbound, [server, client]))
        }
    };
    let (plain, pair) = client_of(false).await?;
    proxies.extend(pair);
    let (mtls, pair) = client_of(true).await?;
    proxies.extend(pair);
    Ok((backend, plain, mtls, proxies))
}

async fn proxy(yaml: &str) -> anyhow::Result<RunningProxy> {
    let config = mesh_core::config::load_sources(&[mesh_core::config::Source {
        name: "mtls_hops.yaml".into(),
        text: yaml.into(),
    }])
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(RunningProxy::start(Arc::new(config)).await?)
}

fn sidecar(name: &str, app: Option<SocketAddr>, certs: Option<std::path::PathBuf>) -> String {
    benches::sidecar_yaml(name, app, certs.as_deref(), None)
}

/// The backend service as the client sidecar sees it: the server sidecar's inbound
/// listener, with Istio's auto-mTLS label when `tls`.
fn service_entry(inbound: SocketAddr, tls: bool) -> String {
    benches::backend_entry(80, inbound, tls)
}

/// A backend that answers `hello` to everything ([`benches::serve_hello`]).
async fn backend() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(benches::serve_hello(listener));
    Ok(addr)
}
