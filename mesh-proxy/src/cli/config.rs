//! `mesh-proxy config apply|get|delete`: the resources every proxy with `discovery.etcd`
//! watches, kept in etcd one key per resource (`<prefix>/<group>/<kind>/<namespace>/<name>`).
//!
//! `apply` validates the whole file exactly as a proxy would load it before it writes
//! anything, then writes every resource in one etcd transaction: a file is applied whole or
//! not at all, as `kubectl apply` of one manifest is meant to be. A Bootstrap is refused: it
//! is one proxy's own settings, never shared.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use mesh_core::config::{Kind, Source, split_resources};
use mesh_discovery::etcd::{EtcdAuth, EtcdOptions, EtcdTls, ResourceKey, ResourceStore};

use crate::discovery::resource_key;

/// Where the store is.
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// etcd endpoint(s), e.g. http://127.0.0.1:2379 (repeat or comma-separate for several).
    #[arg(long, required = true, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Key prefix the proxies watch.
    #[arg(long, default_value = mesh_core::config::bootstrap::DEFAULT_ETCD_PREFIX)]
    prefix: String,
    /// CA file for https:// endpoints.
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    /// Client certificate and key for etcd's --client-cert-auth.
    #[arg(long, requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    #[arg(long, requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// etcd user; the password is read from ETCD_PASSWORD (never from the command line,
    /// where `ps` would show it).
    #[arg(long)]
    etcd_user: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Validate a file of resources, then write them all to etcd in one transaction.
    Apply {
        #[arg(short = 'f', long = "filename", required = true)]
        file: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Print what is stored: everything, a kind, or one resource (YAML, `---` between).
    Get {
        kind: Option<String>,
        name: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Delete one resource.
    Delete {
        kind: String,
        name: String,
        #[arg(short = 'n', long, default_value = mesh_core::host::DEFAULT_NAMESPACE)]
        namespace: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

pub fn run(command: ConfigCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(command: ConfigCommand) -> Result<(), String> {
    match command {
        ConfigCommand::Apply { file, store } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let source = Source::new(file.display().to_string(), text);
            let resources = split_resources(&source).map_err(|errors| errors.to_string())?;
            if let Some((id, _)) = resources.iter().find(|(id, _)| id.kind == Kind::Bootstrap) {
                return Err(format!(
                    "{}: {id}: a Bootstrap is one proxy's own settings and is not stored in etcd",
                    file.display()
                ));
            }
            if resources.is_empty() {
                return Err(format!("{}: no resources", file.display()));
            }
            let writes: Vec<(ResourceKey, String)> = resources
                .iter()
                .map(|(id, text)| (resource_key(id), text.clone()))
                .collect();
            let mut store = connect(&store).await?;
            store.put_all(&writes).await.map_err(|e| e.to_string())?;
            for (key, _) in &writes {
                println!("{key} applied");
            }
            Ok(())
        }
        ConfigCommand::Get { kind, name, store } => {
            let kind = kind.as_deref().map(canonical_kind).transpose()?;
            let mut store = connect(&store).await?;
            let found = store
                .list(kind.map(Kind::as_str), name.as_deref())
                .await
                .map_err(|e| e.to_string())?;
            if found.is_empty() && name.is_some() {
                return Err("not found".to_string());
            }
            for (i, (key, yaml)) in found.iter().enumerate() {
                if i > 0 {
                    println!("---");
                }
                println!("# {key}");
                print!("{}", yaml.trim_end_matches('\n'));
                println!();
            }
            Ok(())
        }
        ConfigCommand::Delete {
            kind,
            name,
            namespace,
            store,
        } => {
            let kind = canonical_kind(&kind)?;
            let key = ResourceKey {
                group: kind.group().to_string(),
                kind: kind.as_str().to_string(),
                namespace,
                name,
            };
            let mut store = connect(&store).await?;
            if store.delete(&key).await.map_err(|e| e.to_string())? {
                println!("{key} deleted");
                Ok(())
            } else {
                Err(format!("{key} not found"))
            }
        }
    }
}

/// `virtualservice`, `VirtualService` and `virtualservices` all name VirtualService, as
/// kubectl accepts.
fn canonical_kind(kind: &str) -> Result<Kind, String> {
    let wanted = kind.to_ascii_lowercase();
    let wanted = wanted
        .strip_suffix('s')
        .filter(|w| !w.is_empty())
        .unwrap_or(&wanted);
    Kind::ALL
        .into_iter()
        .filter(|k| *k != Kind::Bootstrap)
        .find(|k| {
            let name = k.as_str().to_ascii_lowercase();
            name == wanted || name == kind.to_ascii_lowercase()
        })
        .ok_or_else(|| {
            let known: Vec<&str> = Kind::ALL
                .iter()
                .filter(|k| **k != Kind::Bootstrap)
                .map(|k| k.as_str())
                .collect();
            format!("unknown kind `{kind}` (one of: {})", known.join(", "))
        })
}

async fn connect(args: &StoreArgs) -> Result<ResourceStore, String> {
    let mut options = EtcdOptions::new(args.etcd.clone(), args.prefix.clone());
    if let Some(ca) = &args.etcd_ca {
        options.tls = Some(EtcdTls {
            ca: ca.clone(),
            cert: args.etcd_cert.clone(),
            key: args.etcd_key.clone(),
            domain: None,
        });
    }
    if let Some(username) = &args.etcd_user {
        let password = std::env::var("ETCD_PASSWORD")
            .map_err(|_| "--etcd-user needs the password in ETCD_PASSWORD".to_string())?;
        options.auth = Some(EtcdAuth {
            username: username.clone(),
            password,
        });
    }
    ResourceStore::connect(&options)
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_named_as_kubectl_names_them() {
        for (given, kind) in [
            ("VirtualService", Kind::VirtualService),
            ("virtualservice", Kind::VirtualService),
            ("virtualservices", Kind::VirtualService),
            ("serviceentry", Kind::ServiceEntry),
            ("AuthorizationPolicy", Kind::AuthorizationPolicy),
        ] {
            assert_eq!(canonical_kind(given), Ok(kind), "{given}");
        }
        assert!(canonical_kind("Bootstrap").is_err());
        assert!(canonical_kind("pods").is_err_and(|e| e.contains("VirtualService")));
    }
}
