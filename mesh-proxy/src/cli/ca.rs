//! `mesh-proxy ca init|issue`: a root CA and workload certificates on disk, for meshes
//! without a control plane to issue them (the files a Bootstrap's `identity` names).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;

use clap::Subcommand;
use mesh_core::Identity;
use mesh_tls::ca::{self, CertificateAuthority};

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Create a root CA: writes DIR/ca.pem and DIR/ca-key.pem (creating DIR).
    Init {
        /// The trust domain, e.g. cluster.local.
        #[arg(long)]
        trust_domain: String,
        /// Directory to write the CA into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Replace an existing CA key in DIR (every certificate it issued stops verifying).
        #[arg(long)]
        force: bool,
    },
    /// Issue a workload certificate: writes DIR/cert.pem (leaf, then chain), DIR/key.pem and
    /// DIR/root.pem (the trust bundle), creating DIR.
    Issue {
        /// Directory holding ca.pem and ca-key.pem.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The workload's SPIFFE ID, e.g. spiffe://cluster.local/ns/default/sa/reviews.
        #[arg(long)]
        spiffe_id: String,
        /// Directory to write the certificate into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Lifetime, as a Go duration (e.g. 24h, 90m).
        #[arg(long, default_value = "24h")]
        ttl: String,
    },
}

pub fn run(command: CaCommand) -> ExitCode {
    let result = match command {
        CaCommand::Init {
            trust_domain,
            out,
            force,
        } => init(&trust_domain, &out, force),
        CaCommand::Issue {
            ca,
            spiffe_id,
            out,
            ttl,
        } => issue(&ca, &spiffe_id, &out, &ttl),
    };
    match result {
        Ok(message) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init(trust_domain: &str, out: &Path, force: bool) -> Result<String, String> {
    let key = out.join(ca::CA_KEY_FILE);
    if key.exists() && !force {
        return Err(format!(
            "{} already exists; pass --force to replace the CA (certificates it issued will stop verifying)",
            key.display()
        ));
    }
    let authority = CertificateAuthority::generate(trust_domain).map_err(|e| e.to_string())?;
    authority.save(out).map_err(|e| e.to_string())?;
    Ok(format!(
        "wrote {} and {} (trust domain {trust_domain})",
        out.join(ca::CA_CERT_FILE).display(),
        key.display()
    ))
}

fn issue(ca_dir: &Path, spiffe_id: &str, out: &Path, ttl: &str) -> Result<String, String> {
    let id = Identity::parse(spiffe_id).map_err(|e| format!("--spiffe-id: {e}"))?;
    let ttl = mesh_core::config::Duration::from_str(ttl)
        .map_err(|e| format!("--ttl: {e}"))?
        .get();
    let authority = CertificateAuthority::load(ca_dir).map_err(|e| e.to_string())?;
    let issued = authority.issue(&id, ttl).map_err(|e| e.to_string())?;
    issued.save(out).map_err(|e| e.to_string())?;
    Ok(format!(
        "wrote {}, {} and {} for {id} (serial {}, valid for {ttl:?})",
        out.join(ca::CERT_FILE).display(),
        out.join(ca::KEY_FILE).display(),
        out.join(ca::ROOT_FILE).display(),
        issued.serial_hex,
    ))
}
