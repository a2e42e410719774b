//! `mesh-proxy`: the sidecar's command line (the code is [`mesh_proxy::cli`]).

fn main() -> std::process::ExitCode {
    mesh_proxy::cli::main(std::env::args_os())
}
