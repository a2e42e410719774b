//! Istio's Bookinfo on loopback, in one command: `cargo run --release -p examples --bin
//! bookinfo`. Makes a CA and a certificate per workload, starts productpage, details,
//! reviews v1/v2/v3 and ratings, each behind its own `mesh-proxy` sidecar (a child process),
//! and an ingress gateway on `http://127.0.0.1:8080/productpage`; type a scenario name and
//! Enter to change the routing live; Ctrl-C stops everything. `--help` lists the flags.
//!
//! The same executable is each child: `bookinfo sidecar run --config ...` is mesh-proxy's
//! command line, `bookinfo app NAME --listen ADDR ...` one Bookinfo app (both hidden).

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use examples::bookinfo::launcher::{self, AppOptions, Options};

#[derive(Parser, Debug)]
#[command(
    name = "bookinfo",
    about = "Istio's Bookinfo on loopback: six apps, each behind a mesh-proxy sidecar, and an ingress gateway",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    launch: Options,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// A mesh-proxy sidecar: mesh-proxy's own command line (e.g. `run --config FILE...`).
    #[command(hide = true)]
    Sidecar {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<OsString>,
    },
    /// One Bookinfo app.
    #[command(hide = true)]
    App(AppOptions),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Sidecar { args }) => launcher::sidecar_main(args),
        Some(Command::App(app)) => launcher::app_main(&app),
        None => match std::env::current_exe() {
            Ok(exe) => launcher::main(cli.launch, exe),
            Err(e) => {
                eprintln!("error: cannot find this program's executable to run its children: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
