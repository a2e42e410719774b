//! `mesh-proxy iptables install|remove`: the NAT rules that send a pod's TCP through its
//! sidecar, as Istio's `istio-iptables` (the `istio-init` container) writes them.
//!
//! - Outbound: every TCP connection the workload opens is redirected to the outbound
//!   listener (15001), except the proxy's own (by its UID and GID, Istio's 1337), loopback
//!   destinations, and connections from 127.0.0.6 (Istio's inbound passthrough source).
//!   The proxy then reads where each connection was going with `SO_ORIGINAL_DST`.
//! - Inbound: every TCP connection arriving from outside is redirected to the inbound
//!   listener (15006), except the ports given with `--exclude-inbound-ports` (the admin and
//!   metrics ports by default, as Istio excludes 15020/15021/15090).
//!
//! Rules go in with one `iptables-restore --noflush` transaction, so a failure leaves nothing
//! half-installed; `install` removes earlier rules of ours first, so it can be re-run.
//! `--dry-run` prints the transaction instead. Why not a crate: the kernel interface is
//! iptables' own (nft or legacy backends alike), and the maintained Rust wrappers shell out
//! to the same binary one rule at a time, without the transaction.

use std::io::Write;
use std::process::{Command, ExitCode, Stdio};

use clap::Subcommand;

/// Our chains in the `nat` table.
const CHAINS: [&str; 4] = [
    "MESH_INBOUND",
    "MESH_IN_REDIRECT",
    "MESH_OUTPUT",
    "MESH_REDIRECT",
];

#[derive(Subcommand, Debug)]
pub enum IptablesCommand {
    /// Redirect the workload's TCP through the sidecar (needs CAP_NET_ADMIN).
    Install {
        #[command(flatten)]
        settings: Settings,
        /// Print the iptables-restore input instead of applying it.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove the rules `install` wrote.
    Remove {
        /// Print the commands instead of running them.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(clap::Args, Debug, Clone)]
pub struct Settings {
    /// The UID the proxy runs as; its own connections are never redirected.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// The GID the proxy runs as; its own connections are never redirected.
    #[arg(long, default_value_t = 1337)]
    pub proxy_gid: u32,
    /// The outbound listener's port.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// The inbound listener's port.
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// Inbound ports never redirected (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "15000,15020,15021,15090")]
    pub exclude_inbound_ports: Vec<u16>,
    /// Skip inbound capture (only outbound traffic goes through the proxy).
    #[arg(long)]
    pub no_inbound: bool,
}

pub fn run(command: IptablesCommand) -> ExitCode {
    let result = match command {
        IptablesCommand::Install { settings, dry_run } => {
            let rules = restore_input(&settings);
            if dry_run {
                print!("{rules}");
                return ExitCode::SUCCESS;
            }
            remove(false).and_then(|()| apply(&rules))
        }
        IptablesCommand::Remove { dry_run } => remove(dry_run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// The `iptables-restore` input for `settings`.
pub fn restore_input(s: &Settings) -> String {
    let mut out = String::from("*nat\n");
    for chain in CHAINS {
        out.push_str(&format!(":{chain} - [0:0]\n"));
    }
    let rule = |out: &mut String, r: String| {
        out.push_str(&r);
        out.push('\n');
    };
    let (uid, gid) = (s.proxy_uid, s.proxy_gid);
    rule(
        &mut out,
        format!(
            "-A MESH_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            s.outbound_port
        ),
    );
    rule(
        &mut out,
        format!(
            "-A MESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            s.inbound_port
        ),
    );
    // Outbound, in Istio's order.
    rule(
        &mut out,
        "-A MESH_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN".into(),
    );
    for (kind, id) in [("uid", uid), ("gid", gid)] {
        // The proxy calling its own workload through a service address goes inbound.
        rule(
            &mut out,
            format!(
                "-A MESH_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --{kind}-owner {id} -j MESH_IN_REDIRECT"
            ),
        );
        // The app talking to itself over loopback stays direct.
        rule(
            &mut out,
            format!("-A MESH_OUTPUT -o lo -m owner ! --{kind}-owner {id} -j RETURN"),
        );
        // The proxy's own connections are never redirected (no loop).
        rule(
            &mut out,
            format!("-A MESH_OUTPUT -m owner --{kind}-owner {id} -j RETURN"),
        );
    }
    rule(&mut out, "-A MESH_OUTPUT -d 127.0.0.1/32 -j RETURN".into());
    rule(&mut out, "-A MESH_OUTPUT -j MESH_REDIRECT".into());
    rule(&mut out, "-A OUTPUT -p tcp -j MESH_OUTPUT".into());
    if !s.no_inbound {
        for port in &s.exclude_inbound_ports {
            rule(
                &mut out,
                format!("-A MESH_INBOUND -p tcp --dport {port} -j RETURN"),
            );
        }
        rule(
            &mut out,
            "-A MESH_INBOUND -p tcp -j MESH_IN_REDIRECT".into(),
        );
        rule(&mut out, "-A PREROUTING -p tcp -j MESH_INBOUND".into());
    }
    out.push_str("COMMIT\n");
    out
}

fn apply(rules: &str) -> Result<(), String> {
    let mut child = Command::new("iptables-restore")
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run iptables-restore: {e} (is iptables installed?)"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(rules.as_bytes())
            .map_err(|e| format!("cannot write to iptables-restore: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("iptables-restore did not finish: {e}"))?;
    if out.status.success() {
        eprintln!("installed: outbound TCP → the proxy's outbound port, inbound → inbound port");
        Ok(())
    } else {
        Err(format!(
            "iptables-restore refused the rules ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Removes our jumps and chains; what is already absent is not an error.
fn remove(dry_run: bool) -> Result<(), String> {
    let mut commands: Vec<Vec<&str>> = vec![
        vec![
            "-t",
            "nat",
            "-D",
            "OUTPUT",
            "-p",
            "tcp",
            "-j",
            "MESH_OUTPUT",
        ],
        vec![
            "-t",
            "nat",
            "-D",
            "PREROUTING",
            "-p",
            "tcp",
            "-j",
            "MESH_INBOUND",
        ],
    ];
    for chain in CHAINS {
        commands.push(vec!["-t", "nat", "-F", chain]);
    }
    for chain in CHAINS {
        commands.push(vec!["-t", "nat", "-X", chain]);
    }
    for args in commands {
        if dry_run {
            println!("iptables {}", args.join(" "));
            continue;
        }
        let out = Command::new("iptables")
            .args(&args)
            .output()
            .map_err(|e| format!("cannot run iptables: {e} (is iptables installed?)"))?;
        let err = String::from_utf8_lossy(&out.stderr);
        let absent = err.contains("No chain/target/match")
            || err.contains("does a matching rule exist")
            || err.contains("doesn't exist")
            || err.contains("does not exist");
        if !out.status.success() && !absent {
            return Err(format!(
                "iptables {} failed: {}",
                args.join(" "),
                err.trim()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Settings {
        Settings {
            proxy_uid: 1337,
            proxy_gid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            exclude_inbound_ports: vec![15000, 15090],
            no_inbound: false,
        }
    }

    #[test]
    fn the_proxy_own_traffic_returns_before_the_redirect() {
        let rules = restore_input(&defaults());
        let own = rules
            .find("-A MESH_OUTPUT -m owner --uid-owner 1337 -j RETURN")
            .unwrap();
        let redirect = rules.find("-A MESH_OUTPUT -j MESH_REDIRECT").unwrap();
        assert!(own < redirect, "{rules}");
        assert!(rules.contains("REDIRECT --to-ports 15001"));
        assert!(rules.contains("REDIRECT --to-ports 15006"));
        assert!(rules.contains("-A MESH_INBOUND -p tcp --dport 15090 -j RETURN"));
        assert!(rules.ends_with("COMMIT\n"));
    }

    #[test]
    fn no_inbound_leaves_prerouting_alone() {
        let rules = restore_input(&Settings {
            no_inbound: true,
            ..defaults()
        });
        assert!(!rules.contains("PREROUTING"), "{rules}");
        assert!(rules.contains("-A OUTPUT -p tcp -j MESH_OUTPUT"));
    }
}
