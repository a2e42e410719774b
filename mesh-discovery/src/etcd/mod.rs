//! Istio resources kept in etcd, and this workload's own `WorkloadEntry` published there.
//!
//! # Layout
//!
//! One key per resource, `<prefix>/<group>/<kind>/<namespace>/<name>` (for example
//! `/mesh/networking.istio.io/VirtualService/default/reviews`), whose value is the resource's
//! YAML text. [`ResourceKey`] is the four segments after the prefix; keys under the prefix that
//! are not exactly four non-empty segments are reported (in [`StoreSnapshot::malformed_keys`]),
//! never applied.
//!
//! # Pieces
//!
//! - [`ResourceStore`]: the CLI's `config apply/get/delete`. `apply` is one etcd transaction,
//!   so a set of resources that only makes sense together (a `VirtualService` and the
//!   `DestinationRule` defining its subsets) is never seen half written by a proxy.
//! - [`ResourceWatch`]: what a proxy follows. It lists the prefix, then watches from the
//!   revision after the list, and publishes [`StoreSnapshot`]s on a `tokio::sync::watch`.
//! - [`Registration`]: this workload's `WorkloadEntry` under a lease kept alive while the proxy
//!   runs, so a proxy that dies disappears from everyone's view after the lease's TTL.
//!
//! # Why these choices
//!
//! - **Full snapshots, not deltas.** Consumers compile the whole config anyway (routes refer to
//!   destination rules refer to service entries), and a full picture is what makes a resync
//!   after compaction or a lost connection trivially correct: a key deleted while we were not
//!   watching is simply absent from the next snapshot, with no "delete" to synthesise. The
//!   snapshot is behind an `Arc`, so handing it out costs nothing.
//! - **Revisions are checked per key.** Every event carries the revision it happened at. An
//!   event at or below the revision of the list a watch started from, or at or below the
//!   revision already stored for its key, is old news (a replay after re-watching from an
//!   older revision) and is skipped, so nothing is applied twice or applied over newer data.
//! - **Progress requests.** An idle watch receives nothing, which looks exactly like a dead
//!   one. About once a second the watcher asks etcd for a progress notification; each answer
//!   (like any response) refreshes [`ResourceWatch::last_sync`], which a "seconds since last
//!   sync" gauge reads, and a watch that stops answering altogether is torn down and resynced.
//!   etcd 3.4 answers progress requests with its current revision, which may be ahead of
//!   events not yet delivered, so a progress notification never moves a snapshot's revision.
//! - **Every request has a deadline.** The client's balanced channel queues a request while
//!   no endpoint is reachable instead of failing it, so without our own bound a call to a
//!   dead etcd might never return. Connecting also issues one `Status` request, because
//!   the channel itself connects lazily and would otherwise "succeed" against nothing.
//! - **Reconnect on every resync.** A fresh client re-authenticates (etcd's simple tokens do
//!   not survive a restart of the server) and drops whatever state the old channel was in.

mod backoff;
mod registration;
mod store;
mod watch;

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub use registration::Registration;
pub use store::ResourceStore;
pub use watch::{ResourceWatch, StoreSnapshot, StoredResource};

/// [`EtcdOptions::connect_timeout`] unless set otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound on one unary request (get, put, txn, lease grant, ...): see the module docs on why
/// every request needs one.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest response we accept (a list of the whole prefix): well above the client's 4 MiB
/// default, which a few thousand resources would exceed.
pub(crate) const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// HTTP/2 keep-alive pings on open streams, so a watch or lease keep-alive over a silently dead
/// connection fails within about 15 s. etcd's server refuses pings more often than every 5 s
/// and pings on connections without streams (it answers with GOAWAY), hence 10 s and not while
/// idle.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach etcd.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// `http://host:port` or `https://host:port` (https needs [`EtcdOptions::tls`]).
    pub endpoints: Vec<String>,
    /// Key prefix of all resources, e.g. `/mesh`. A trailing `/` is ignored.
    pub prefix: String,
    pub tls: Option<EtcdTls>,
    pub auth: Option<EtcdAuth>,
    /// Bound on connecting (TCP, TLS, authentication and one `Status` round trip).
    pub connect_timeout: Duration,
}

/// TLS towards etcd: the CA that signed etcd's serving certificate, and optionally a client
/// certificate (for etcd's `--client-cert-auth`).
#[derive(Clone, Debug)]
pub struct EtcdTls {
    /// PEM CA certificate(s) to verify etcd's certificate with.
    pub ca: PathBuf,
    /// PEM client certificate chain; set together with `key`.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// Name to verify etcd's certificate against instead of the endpoint's host.
    pub domain: Option<String>,
}

/// etcd user name and password (etcd's `auth enable`).
#[derive(Clone)]
pub struct EtcdAuth {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for EtcdAuth {
    /// The password stays out of logs and panics.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl EtcdOptions {
    /// Plain (no TLS, no auth) options with the default connect timeout; `prefix` loses any
    /// trailing `/`.
    pub fn new(endpoints: Vec<String>, prefix: impl Into<String>) -> Self {
        EtcdOptions {
            endpoints,
            prefix: normalize_prefix(&prefix.into()).to_owned(),
            tls: None,
            auth: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    pub fn with_tls(mut self, tls: EtcdTls) -> Self {
        self.tls = Some(tls);
        self
    }

    pub fn with_auth(mut self, auth: EtcdAuth) -> Self {
        self.auth = Some(auth);
        self
    }

    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The prefix without trailing `/` (the field is public, so it may not be normalised).
    pub(crate) fn normalized_prefix(&self) -> &str {
        normalize_prefix(&self.prefix)
    }

    /// `<prefix>/`: what lists and watches range over, so `/mesh` never matches `/mesh2/...`.
    pub(crate) fn range_prefix(&self) -> String {
        format!("{}/", self.normalized_prefix())
    }

    /// The endpoints as one string for errors and logs.
    pub(crate) fn endpoints_label(&self) -> String {
        self.endpoints.join(",")
    }
}

fn normalize_prefix(prefix: &str) -> &str {
    prefix.trim_end_matches('/')
}

/// `<group>/<kind>/<namespace>/<name>` of one resource.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceKey {
    pub group: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl ResourceKey {
    pub fn new(
        group: impl Into<String>,
        kind: impl Into<String>,
        namespace: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        ResourceKey {
            group: group.into(),
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// `<prefix>/<group>/<kind>/<namespace>/<name>` (a trailing `/` on `prefix` is ignored).
    pub fn etcd_key(&self, prefix: &str) -> String {
        format!("{}/{self}", normalize_prefix(prefix))
    }

    /// None when `key` is not `<prefix>/<group>/<kind>/<namespace>/<name>` (exactly 4
    /// non-empty segments).
    pub fn parse(prefix: &str, key: &str) -> Option<ResourceKey> {
        let rest = key
            .strip_prefix(normalize_prefix(prefix))?
            .strip_prefix('/')?;
        let mut segments = rest.split('/');
        let mut next = || segments.next().filter(|s| !s.is_empty());
        let parsed = ResourceKey::new(next()?, next()?, next()?, next()?);
        match segments.next() {
            None => Some(parsed),
            Some(_) => None,
        }
    }

    /// Why this key cannot be stored (a segment that is empty or holds `/` would make a key
    /// that [`ResourceKey::parse`] rejects, so a watcher would report it as malformed).
    pub(crate) fn invalid_reason(&self) -> Option<&'static str> {
        let segments = [&self.group, &self.kind, &self.namespace, &self.name];
        if segments.iter().any(|s| s.is_empty()) {
            Some("a segment is empty")
        } else if segments.iter().any(|s| s.contains('/')) {
            Some("a segment contains `/`")
        } else {
            None
        }
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}/{}",
            self.group, self.kind, self.namespace, self.name
        )
    }
}

/// What went wrong talking to etcd. Each names the endpoints and/or key involved once.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd options for {endpoints}: {reason}")]
    InvalidOptions { endpoints: String, reason: String },
    #[error("cannot read etcd TLS file {}: {source}", path.display())]
    TlsFileRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("etcd TLS file {} is not usable: {reason}", path.display())]
    TlsFileInvalid { path: PathBuf, reason: String },
    #[error("cannot connect to etcd at {endpoints}: {source}")]
    Connect {
        endpoints: String,
        source: etcd_client::Error,
    },
    #[error("etcd at {endpoints} did not answer within {timeout:?}")]
    ConnectTimeout {
        endpoints: String,
        timeout: Duration,
    },
    #[error("etcd {operation} of {key} at {endpoints} failed: {source}")]
    Request {
        operation: &'static str,
        key: String,
        endpoints: String,
        source: etcd_client::Error,
    },
    #[error("etcd {operation} of {key} at {endpoints} got no answer within {timeout:?}")]
    RequestTimeout {
        operation: &'static str,
        key: String,
        endpoints: String,
        timeout: Duration,
    },
    #[error("invalid resource key {key}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("value of {key} at {endpoints} is not UTF-8")]
    NotUtf8 { key: String, endpoints: String },
    #[error("etcd stream for {key} at {endpoints} ended: {reason}")]
    StreamEnded {
        key: String,
        endpoints: String,
        reason: String,
    },
}

/// Connects (with TLS/auth when set), bounded by `connect_timeout`. Succeeds only once etcd
/// has answered a `Status` request, so an unreachable etcd is an error here and not at the
/// first real request.
pub async fn connect(options: &EtcdOptions) -> Result<Client, EtcdError> {
    let endpoints = options.endpoints_label();
    if options.endpoints.is_empty() {
        return Err(EtcdError::InvalidOptions {
            endpoints,
            reason: "no endpoints".to_owned(),
        });
    }
    let https = options.endpoints.iter().any(|e| e.starts_with("https://"));
    let http = options.endpoints.iter().any(|e| !e.starts_with("https://"));
    match (&options.tls, https, http) {
        (Some(_), _, true) => {
            return Err(EtcdError::InvalidOptions {
                endpoints,
                reason: "TLS is set, so every endpoint must be https://".to_owned(),
            });
        }
        (None, true, _) => {
            return Err(EtcdError::InvalidOptions {
                endpoints,
                reason: "https:// endpoints need TLS options (at least the CA)".to_owned(),
            });
        }
        _ => {}
    }

    let mut connect_options = ConnectOptions::new()
        .with_connect_timeout(options.connect_timeout)
        .with_keep_alive(KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT)
        .with_keep_alive_while_idle(false);
    if let Some(tls) = &options.tls {
        connect_options = connect_options.with_tls(load_tls(&endpoints, tls).await?);
    }
    if let Some(auth) = &options.auth {
        // Simple tokens expire after etcd's --auth-token-ttl of inactivity; refresh on demand.
        connect_options = connect_options
            .with_user(&auth.username, &auth.password)
            .with_auto_token_refresh(true);
    }

    let attempt = async {
        let mut client = Client::connect(&options.endpoints, Some(connect_options)).await?;
        client.status().await?;
        Ok::<_, etcd_client::Error>(client)
    };
    match tokio::time::timeout(options.connect_timeout, attempt).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(source)) => Err(EtcdError::Connect { endpoints, source }),
        Err(_) => Err(EtcdError::ConnectTimeout {
            endpoints,
            timeout: options.connect_timeout,
        }),
    }
}

/// Reads and checks the PEM files up front, so a wrong path or a key where a certificate
/// belongs is reported with the file's name rather than as an opaque handshake failure.
async fn load_tls(endpoints: &str, tls: &EtcdTls) -> Result<TlsOptions, EtcdError> {
    let ca = read_certificates(&tls.ca).await?;
    let mut config = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
    match (&tls.cert, &tls.key) {
        (Some(cert_path), Some(key_path)) => {
            let cert = read_certificates(cert_path).await?;
            let key = read_file(key_path).await?;
            if let Err(e) = PrivateKeyDer::from_pem_slice(&key) {
                return Err(EtcdError::TlsFileInvalid {
                    path: key_path.clone(),
                    reason: format!("no PEM private key ({e})"),
                });
            }
            config = config.identity(Identity::from_pem(cert, key));
        }
        (None, None) => {}
        _ => {
            return Err(EtcdError::InvalidOptions {
                endpoints: endpoints.to_owned(),
                reason: "a TLS client certificate and its key are set together".to_owned(),
            });
        }
    }
    if let Some(domain) = &tls.domain {
        config = config.domain_name(domain.clone());
    }
    Ok(config)
}

async fn read_file(path: &Path) -> Result<Vec<u8>, EtcdError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| EtcdError::TlsFileRead {
            path: path.to_owned(),
            source,
        })
}

async fn read_certificates(path: &Path) -> Result<Vec<u8>, EtcdError> {
    let pem = read_file(path).await?;
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        if let Err(e) = cert {
            return Err(EtcdError::TlsFileInvalid {
                path: path.to_owned(),
                reason: format!("bad PEM ({e})"),
            });
        }
        count += 1;
    }
    if count == 0 {
        return Err(EtcdError::TlsFileInvalid {
            path: path.to_owned(),
            reason: "no PEM certificate in it".to_owned(),
        });
    }
    Ok(pem)
}

/// Runs one etcd request under [`REQUEST_TIMEOUT`], naming the operation, key and endpoints
/// in its error.
pub(crate) async fn request<T>(
    operation: &'static str,
    key: &str,
    endpoints: &str,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(EtcdError::Request {
            operation,
            key: key.to_owned(),
            endpoints: endpoints.to_owned(),
            source,
        }),
        Err(_) => Err(EtcdError::RequestTimeout {
            operation,
            key: key.to_owned(),
            endpoints: endpoints.to_owned(),
            timeout: REQUEST_TIMEOUT,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_reject_other_shapes() {
        let key = ResourceKey::new(
            "networking.istio.io",
            "VirtualService",
            "default",
            "reviews",
        );
        let etcd_key = key.etcd_key("/mesh/");
        assert_eq!(
            etcd_key,
            "/mesh/networking.istio.io/VirtualService/default/reviews"
        );
        assert_eq!(ResourceKey::parse("/mesh", &etcd_key), Some(key.clone()));
        assert_eq!(ResourceKey::parse("/mesh/", &etcd_key), Some(key));
        for bad in [
            "/mesh/a/b/c",
            "/mesh/a/b/c/d/e",
            "/mesh/a//c/d",
            "/mesh/a/b/c/",
            "/mesh2/a/b/c/d",
            "/meshx/a/b/c/d",
            "/other/a/b/c/d",
        ] {
            assert_eq!(ResourceKey::parse("/mesh", bad), None, "{bad}");
        }
        assert_eq!(
            ResourceKey::parse("", "/g/k/n/x"),
            Some(ResourceKey::new("g", "k", "n", "x"))
        );
    }

    #[test]
    fn options_normalise_the_prefix_and_hide_the_password() {
        let options =
            EtcdOptions::new(vec!["http://127.0.0.1:2379".into()], "/mesh//").with_auth(EtcdAuth {
                username: "root".into(),
                password: "hunter2".into(),
            });
        assert_eq!(options.prefix, "/mesh");
        assert_eq!(options.range_prefix(), "/mesh/");
        let printed = format!("{options:?}");
        assert!(printed.contains("root"), "{printed}");
        assert!(!printed.contains("hunter2"), "{printed}");
    }

    #[test]
    fn invalid_keys_are_named() {
        assert_eq!(
            ResourceKey::new("g", "", "n", "x").invalid_reason(),
            Some("a segment is empty")
        );
        assert_eq!(
            ResourceKey::new("g", "k", "n/m", "x").invalid_reason(),
            Some("a segment contains `/`")
        );
        assert_eq!(ResourceKey::new("g", "k", "n", "x").invalid_reason(), None);
    }
}
