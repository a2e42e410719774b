//! The mesh's files in the runtime directory: a CA and one certificate per workload, and the
//! config every proxy loads.
//!
//! ```text
//! RUNTIME/
//!   certs/ca/{ca.pem,ca-key.pem}             the mesh CA (mesh_tls::ca)
//!   certs/<service account>/{cert.pem,key.pem,root.pem}
//!   config/mesh.yaml                         ServiceEntries, Istio's DestinationRules
//!                                            (destination-rule-all-mtls), STRICT mTLS
//!   config/routing.yaml                      the scenario's VirtualServices (rewritten live)
//!   config/gateway.yaml                      bookinfo-gateway + the bookinfo VirtualService
//!   config/<workload>.yaml                   each proxy's Bootstrap
//!   logs/<workload>.log                      each app's output
//!   logs/<workload>-sidecar.log              each proxy's output (with its access log)
//! ```
//!
//! Each sidecar runs with `--config config/<workload>.yaml --config config/mesh.yaml
//! --config config/routing.yaml`; the gateway with `config/gateway.yaml` too.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use mesh_core::Identity;
use mesh_tls::ca::{CertificateAuthority, DEFAULT_TTL};

use super::apps::SERVICE_PORT;
use super::scenario::Scenario;
use super::topology::{Ports, Role, SERVICES, TRUST_DOMAIN, WORKLOADS, Workload};

/// Istio's Bookinfo DestinationRules (embedded from `examples/bookinfo/config`).
pub const DESTINATION_RULES: &str =
    include_str!("../../bookinfo/config/destination-rule-all-mtls.yaml");
/// The mesh-wide STRICT PeerAuthentication.
pub const PEER_AUTHENTICATION: &str =
    include_str!("../../bookinfo/config/peer-authentication.yaml");
/// Istio's `bookinfo-gateway` Gateway and `bookinfo` VirtualService.
pub const GATEWAY: &str = include_str!("../../bookinfo/config/bookinfo-gateway.yaml");

/// The Gateway server's port line the launcher rewrites to the gateway's port.
const GATEWAY_PORT_LINE: &str = "number: 8080";

/// Paths inside the runtime directory.
#[derive(Clone, Debug)]
pub struct RuntimeDir {
    root: PathBuf,
}

impl RuntimeDir {
    /// `root`, made absolute (the proxies get absolute paths).
    pub fn new(root: &Path) -> anyhow::Result<RuntimeDir> {
        let root = if root.is_absolute() {
            root.to_path_buf()
        } else {
            std::env::current_dir()
                .context("cannot read the current directory")?
                .join(root)
        };
        Ok(RuntimeDir { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.root.join("certs").join("ca")
    }

    /// The certificate directory of a workload (by service account).
    pub fn certs(&self, w: &Workload) -> PathBuf {
        self.root.join("certs").join(w.service_account())
    }

    pub fn config_dir(&self) -> PathBuf {
        self.root.join("config")
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    pub fn mesh_file(&self) -> PathBuf {
        self.config_dir().join("mesh.yaml")
    }

    pub fn routing_file(&self) -> PathBuf {
        self.config_dir().join("routing.yaml")
    }

    pub fn gateway_file(&self) -> PathBuf {
        self.config_dir().join("gateway.yaml")
    }

    pub fn bootstrap_file(&self, w: &Workload) -> PathBuf {
        self.config_dir().join(format!("{}.yaml", w.name))
    }

    pub fn app_log(&self, w: &Workload) -> PathBuf {
        self.logs_dir().join(format!("{}.log", w.name))
    }

    pub fn sidecar_log(&self, w: &Workload) -> PathBuf {
        self.logs_dir().join(format!("{}-sidecar.log", w.name))
    }

    /// The `--config` files of a workload's proxy.
    pub fn proxy_configs(&self, w: &Workload) -> Vec<PathBuf> {
        let mut files = vec![
            self.bootstrap_file(w),
            self.mesh_file(),
            self.routing_file(),
        ];
        if w.role == Role::IngressGateway {
            files.push(self.gateway_file());
        }
        files
    }
}

/// Creates a CA for `cluster.local` and issues each workload its SPIFFE certificate
/// (`spiffe://cluster.local/ns/default/sa/bookinfo-<service>`), into the runtime directory.
pub fn issue_certificates(dir: &RuntimeDir) -> anyhow::Result<()> {
    let ca = CertificateAuthority::generate(TRUST_DOMAIN)
        .context("cannot create the mesh CA for cluster.local")?;
    ca.save(&dir.ca_dir())
        .with_context(|| format!("cannot save the mesh CA in {}", dir.ca_dir().display()))?;
    let mut done = Vec::new();
    for w in &WORKLOADS {
        let sa = w.service_account();
        if done.contains(&sa) {
            continue;
        }
        let id = Identity::parse(&w.spiffe_id())
            .with_context(|| format!("{} is not a SPIFFE id", w.spiffe_id()))?;
        let svid = ca
            .issue(&id, DEFAULT_TTL)
            .with_context(|| format!("cannot issue the certificate of {}", w.spiffe_id()))?;
        svid.save(&dir.certs(w)).with_context(|| {
            format!(
                "cannot save the certificate of {} in {}",
                w.spiffe_id(),
                dir.certs(w).display()
            )
        })?;
        done.push(sa);
    }
    Ok(())
}

/// A YAML double-quoted string (JSON's quoting is valid YAML).
fn quoted(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

/// A proxy's Bootstrap: identity, inbound in front of its app (none for the gateway), its own
/// outbound and admin ports, its access log on stdout (the log file).
pub fn bootstrap(w: &Workload, ports: &Ports, dir: &RuntimeDir) -> String {
    let certs = dir.certs(w);
    let file = |name: &str| quoted(&certs.join(name).display().to_string());
    let labels = match w.role {
        Role::IngressGateway => "{ app: istio-ingressgateway, istio: ingressgateway }".to_owned(),
        _ => format!("{{ app: {}, version: {} }}", w.app, w.version),
    };
    let inbound = if w.has_app() {
        format!(
            "  inbound: {{ listen: \"{}\", app: \"{}\" }}\n",
            ports.inbound(w),
            ports.app(w)
        )
    } else {
        String::new()
    };
    format!(
        "# {name}'s proxy, written by the Bookinfo launcher.
apiVersion: mesh-proxy/v1
kind: Bootstrap
metadata: {{ name: {name}, namespace: {ns} }}
spec:
  workload:
    name: {name}
    labels: {labels}
    serviceAccount: {sa}
  identity:
    cert: {cert}
    key: {key}
    trustBundle: {root}
{inbound}  outbound: {{ listen: \"{outbound}\" }}
  admin: {{ listen: \"{admin}\" }}
  concurrency: 2
  accessLog: {{ path: stdout, encoding: TEXT }}
  terminationDrainDuration: 2s
",
        name = w.name,
        ns = w.namespace(),
        sa = w.service_account(),
        cert = file(mesh_tls::ca::CERT_FILE),
        key = file(mesh_tls::ca::KEY_FILE),
        root = file(mesh_tls::ca::ROOT_FILE),
        outbound = ports.outbound(w),
        admin = ports.admin(w),
    )
}

/// One ServiceEntry per Bookinfo service: port 9080 `http`, its workloads' sidecar inbound
/// listeners as endpoints, labelled with their version and Istio's
/// `security.istio.io/tlsMode: istio` and named by their service account, so callers
/// originate mTLS and check the server's identity.
pub fn service_entries(ports: &Ports) -> String {
    let mut out = String::new();
    for svc in SERVICES {
        let _ = write!(
            out,
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: {svc}, namespace: default }}
spec:
  hosts: [{svc}]
  location: MESH_INTERNAL
  ports: [{{ number: {SERVICE_PORT}, name: http, protocol: HTTP }}]
  resolution: STATIC
  endpoints:
"
        );
        for w in WORKLOADS.iter().filter(|w| w.app == svc) {
            let inbound = ports.inbound(w);
            let _ = write!(
                out,
                "  - address: {ip}
    ports: {{ http: {port} }}
    labels: {{ app: {svc}, version: {version}, security.istio.io/tlsMode: istio }}
    serviceAccount: {sa}
",
                ip = inbound.ip(),
                port = inbound.port(),
                version = w.version,
                sa = w.service_account(),
            );
        }
        out.push_str("---\n");
    }
    out
}

/// `config/mesh.yaml`: the ServiceEntries, Istio's DestinationRules, STRICT mTLS.
pub fn mesh_config(ports: &Ports) -> String {
    format!(
        "# The Bookinfo mesh, written by the launcher: where each service's workloads are,\n\
         # Istio's DestinationRules, and mesh-wide STRICT mTLS.\n{}{DESTINATION_RULES}{PEER_AUTHENTICATION}",
        service_entries(ports)
    )
}

/// `config/gateway.yaml`: Istio's Gateway on the gateway port.
pub fn gateway_config(ports: &Ports) -> Result<String, String> {
    match GATEWAY.matches(GATEWAY_PORT_LINE).count() {
        1 => Ok(GATEWAY.replace(
            GATEWAY_PORT_LINE,
            &format!("number: {}", ports.gateway().port()),
        )),
        n => Err(format!(
            "bookinfo-gateway.yaml has {n} `{GATEWAY_PORT_LINE}` lines; expected one"
        )),
    }
}

/// Writes `text` to `path` atomically: into a hidden file beside it, then renamed over it, so
/// a proxy watching the directory never reads half a file.
pub fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

/// Writes every config file for `scenario`.
pub fn write_configs(
    dir: &RuntimeDir,
    ports: &Ports,
    scenario: &Scenario,
    fault_delay: Option<Duration>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.config_dir())
        .with_context(|| format!("cannot create {}", dir.config_dir().display()))?;
    std::fs::create_dir_all(dir.logs_dir())
        .with_context(|| format!("cannot create {}", dir.logs_dir().display()))?;
    for w in &WORKLOADS {
        write_atomic(&dir.bootstrap_file(w), &bootstrap(w, ports, dir))?;
    }
    write_atomic(&dir.mesh_file(), &mesh_config(ports))?;
    write_atomic(
        &dir.gateway_file(),
        &gateway_config(ports).map_err(anyhow::Error::msg)?,
    )?;
    write_routing(dir, scenario, fault_delay)
}

/// Writes (or rewrites) `config/routing.yaml` for `scenario`.
pub fn write_routing(
    dir: &RuntimeDir,
    scenario: &Scenario,
    fault_delay: Option<Duration>,
) -> anyhow::Result<()> {
    let yaml = scenario.render(fault_delay).map_err(anyhow::Error::msg)?;
    write_atomic(&dir.routing_file(), &yaml)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bookinfo::scenario::SCENARIOS;
    use crate::bookinfo::topology::ingress_gateway;
    use mesh_core::config::{Source, load_sources};

    fn source(name: &str, text: String) -> Source {
        Source {
            name: name.into(),
            text,
        }
    }

    /// What each proxy loads is valid for the proxy's config loader, in every scenario.
    #[test]
    fn every_proxy_config_loads() {
        let tmp = std::env::temp_dir().join(format!("bookinfo-unit-{}", std::process::id()));
        let dir = RuntimeDir::new(&tmp).unwrap();
        let ports = Ports::new(20000).unwrap();
        for scenario in &SCENARIOS {
            for w in &WORKLOADS {
                let mut sources = vec![
                    source("bootstrap.yaml", bootstrap(w, &ports, &dir)),
                    source("mesh.yaml", mesh_config(&ports)),
                    source(
                        "routing.yaml",
                        scenario.render(Some(Duration::from_secs(2))).unwrap(),
                    ),
                ];
                if w.role == Role::IngressGateway {
                    sources.push(source("gateway.yaml", gateway_config(&ports).unwrap()));
                }
                if let Err(e) = load_sources(&sources) {
                    panic!("{} under {}:\n{e}", w.name, scenario.name);
                }
            }
        }
    }

    #[test]
    fn service_entries_name_every_endpoint() {
        let ports = Ports::new(20000).unwrap();
        let se = service_entries(&ports);
        assert_eq!(se.matches("kind: ServiceEntry").count(), 4);
        assert_eq!(se.matches("serviceAccount: bookinfo-reviews").count(), 3);
        assert_eq!(se.matches("security.istio.io/tlsMode: istio").count(), 6);
        assert!(se.contains(&format!("http: {}", ports.inbound(&WORKLOADS[4]).port())));
        let gw = gateway_config(&ports).unwrap();
        assert!(gw.contains("number: 20000"));
        assert!(gw.contains("bind: 127.0.0.1"));
        let b = bootstrap(
            ingress_gateway(),
            &ports,
            &RuntimeDir::new(Path::new("/r")).unwrap(),
        );
        assert!(b.contains("istio: ingressgateway"));
        assert!(!b.contains("inbound"));
    }

    #[test]
    fn atomic_write_replaces_the_file() {
        let tmp = std::env::temp_dir().join(format!("bookinfo-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let f = tmp.join("routing.yaml");
        write_atomic(&f, "a").unwrap();
        write_atomic(&f, "b").unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "b");
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 1);
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn certificates_for_every_service_account() {
        let tmp = std::env::temp_dir().join(format!("bookinfo-certs-{}", std::process::id()));
        let dir = RuntimeDir::new(&tmp).unwrap();
        issue_certificates(&dir).unwrap();
        for w in &WORKLOADS {
            let pem = std::fs::read_to_string(dir.certs(w).join("cert.pem")).unwrap();
            assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        }
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
