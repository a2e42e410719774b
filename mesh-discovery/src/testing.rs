//! Test support (feature `testing`): [`DnsServer`] answers DNS as a test says; [`EtcdServer`] runs a throwaway single-member etcd on
//! free loopback ports with its own temporary data directory, for this crate's tests and for
//! end-to-end tests of crates built on it (enable `mesh-discovery/testing` in their
//! dev-dependencies).
//!
//! The binary is `/usr/bin/etcd` (Debian's `etcd-server`) or `etcd` on `PATH`. The server
//! runs with short raft timers (50 ms heartbeat, 500 ms election) so that it starts and
//! restarts in well under a second; this also lowers etcd's minimum lease TTL to 1 s.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use tempfile::TempDir;
use tokio::time::Instant;

use crate::etcd::{EtcdAuth, EtcdOptions, EtcdTls, connect};

mod dns_server;
pub use dns_server::{DnsServer, Mode, ServerState};

/// How long [`EtcdServer::start`] and [`EtcdServer::restart`] wait for etcd to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A port on 127.0.0.1 that nothing listens on right now (the OS picked it; it is released at
/// once, so it stays free unless another process happens to take it).
pub fn free_loopback_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Files of the throwaway PKI made for [`EtcdServer::start_tls`]: one CA that signed etcd's
/// serving certificate (for `127.0.0.1` and `localhost`) and a client certificate.
#[derive(Clone, Debug)]
pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// A running etcd for tests. Dropping it kills the process and deletes its directory.
#[derive(Debug)]
pub struct EtcdServer {
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    pki: Option<TestPki>,
    auth: Option<EtcdAuth>,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd on free loopback ports with its own temp data dir and waits until it
    /// answers (at most 20 s; the error quotes the end of etcd's log).
    pub async fn start() -> anyhow::Result<EtcdServer> {
        Self::launch(None, false).await
    }

    /// Like [`EtcdServer::start`] on a given client port, e.g. one a client was already told
    /// about (see [`free_loopback_port`]).
    pub async fn start_on(client_port: u16) -> anyhow::Result<EtcdServer> {
        Self::launch(Some(client_port), false).await
    }

    /// Starts etcd serving clients over TLS only (`https://127.0.0.1:PORT`) and requiring a
    /// client certificate signed by its CA; [`EtcdServer::options`] carries the client side.
    pub async fn start_tls() -> anyhow::Result<EtcdServer> {
        Self::launch(None, true).await
    }

    async fn launch(client_port: Option<u16>, tls: bool) -> anyhow::Result<EtcdServer> {
        // A port picked here may be taken by someone else before etcd binds it; pick again.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut server = EtcdServer {
                dir: tempfile::Builder::new().prefix("mesh-etcd-").tempdir()?,
                client_port: match client_port {
                    Some(port) => port,
                    None => free_loopback_port()?,
                },
                peer_port: free_loopback_port()?,
                pki: None,
                auth: None,
                child: None,
            };
            if tls {
                server.pki = Some(write_pki(server.dir.path())?);
            }
            server.spawn()?;
            match server.wait_ready().await {
                Ok(()) => return Ok(server),
                Err(error)
                    if attempts < 3 && server.log_tail().contains("address already in use") =>
                {
                    tracing::debug!(%error, "etcd port taken; starting again on other ports");
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// `http://127.0.0.1:PORT` (`https://` for [`EtcdServer::start_tls`]).
    pub fn endpoint(&self) -> String {
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// Options reaching this server under `prefix`, with its TLS client side and the root
    /// credentials once [`EtcdServer::enable_auth`] has run.
    pub fn options(&self, prefix: &str) -> EtcdOptions {
        let mut options = EtcdOptions::new(vec![self.endpoint()], prefix);
        options.tls = self.client_tls();
        options.auth = self.auth.clone();
        options
    }

    /// The client side of [`EtcdServer::start_tls`]'s PKI; None for a plain server.
    pub fn client_tls(&self) -> Option<EtcdTls> {
        self.pki.as_ref().map(|pki| EtcdTls {
            ca: pki.ca.clone(),
            cert: Some(pki.client_cert.clone()),
            key: Some(pki.client_key.clone()),
            domain: None,
        })
    }

    pub fn pki(&self) -> Option<&TestPki> {
        self.pki.as_ref()
    }

    /// A connected client (as root once auth is enabled), for test set-up and inspection.
    pub async fn client(&self) -> anyhow::Result<etcd_client::Client> {
        Ok(connect(&self.options("")).await?)
    }

    /// Adds user `root` with `password` and the root role, then turns authentication on;
    /// later [`EtcdServer::options`] carry these credentials.
    pub async fn enable_auth(&mut self, password: &str) -> anyhow::Result<EtcdAuth> {
        let mut client = self.client().await?;
        client.user_add("root", password, None).await?;
        client.user_grant_role("root", "root").await?;
        client.auth_enable().await?;
        let auth = EtcdAuth {
            username: "root".to_owned(),
            password: password.to_owned(),
        };
        self.auth = Some(auth.clone());
        Ok(auth)
    }

    /// SIGKILLs etcd; the data dir and ports stay for [`EtcdServer::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again (killing it first if it runs) on the same ports and data dir, and
    /// waits until it answers.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_ready().await
    }

    /// The last lines of etcd's log (stdout and stderr of every run).
    pub fn log_tail(&self) -> String {
        const TAIL_BYTES: u64 = 4000;
        let mut text = String::new();
        if let Ok(mut file) = File::open(self.log_path()) {
            let length = file.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = file.seek(SeekFrom::Start(length.saturating_sub(TAIL_BYTES)));
            let mut bytes = Vec::new();
            let _ = file.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let binary = if Path::new("/usr/bin/etcd").exists() {
            PathBuf::from("/usr/bin/etcd")
        } else {
            PathBuf::from("etcd")
        };
        let client_url = self.endpoint();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("creating etcd's log file")?;
        let mut command = Command::new(&binary);
        command
            .arg("--name=test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .arg("--initial-cluster-state=new")
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        if let Some(pki) = &self.pki {
            command
                .arg(format!("--cert-file={}", pki.server_cert.display()))
                .arg(format!("--key-file={}", pki.server_key.display()))
                .arg("--client-cert-auth")
                .arg(format!("--trusted-ca-file={}", pki.ca.display()));
        }
        // etcd also reads its flags from ETCD_* variables; the test's environment must not
        // reconfigure it.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCD_") {
                command.env_remove(name);
            }
        }
        let child = command.spawn().with_context(|| {
            format!(
                "cannot run {} (Debian package etcd-server)",
                binary.display()
            )
        })?;
        self.child = Some(child);
        Ok(())
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut options = self.options("");
        options.connect_timeout = Duration::from_secs(1);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "etcd on port {} exited ({status}); log tail:\n{}",
                    self.client_port,
                    self.log_tail()
                );
            }
            let error = match connect(&options).await {
                Ok(_) => return Ok(()),
                Err(error) => error,
            };
            if Instant::now() >= deadline {
                self.kill();
                bail!(
                    "etcd on port {} did not answer within {READY_TIMEOUT:?} ({error}); log tail:\n{}",
                    self.client_port,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A CA, a serving certificate for 127.0.0.1/localhost and a client certificate, as PEM files
/// under `dir/pki`.
fn write_pki(dir: &Path) -> anyhow::Result<TestPki> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };

    let pki_dir = dir.join("pki");
    fs::create_dir_all(&pki_dir)?;
    let write = |name: &str, pem: String| -> anyhow::Result<PathBuf> {
        let path = pki_dir.join(name);
        fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    };

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "mesh-discovery test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca = write("ca.pem", ca_cert.pem())?;
    let issuer = Issuer::new(ca_params, ca_key);

    // etcd's own gRPC gateway dials the server with the serving certificate as its client
    // certificate, so that one is for both ends.
    let server_key = KeyPair::generate()?;
    let mut server_params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "etcd");
    server_params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let server_cert = server_params.signed_by(&server_key, &issuer)?;

    let client_key = KeyPair::generate()?;
    let mut client_params = CertificateParams::new(Vec::<String>::new())?;
    client_params
        .distinguished_name
        .push(DnType::CommonName, "mesh-test-client");
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client_params.signed_by(&client_key, &issuer)?;

    Ok(TestPki {
        ca,
        server_cert: write("server.pem", server_cert.pem())?,
        server_key: write("server-key.pem", server_key.serialize_pem())?,
        client_cert: write("client.pem", client_cert.pem())?,
        client_key: write("client-key.pem", client_key.serialize_pem())?,
    })
}
