//! Loading: sources → documents → typed resources → validated, normalised [`MeshConfig`].
//!
//! Each document is parsed in two passes: a lenient header pass reads `apiVersion`, `kind`
//! and the name (for messages), then the typed pass for that kind parses it strictly. All
//! errors of all documents and files are collected; a configuration with any error is
//! rejected whole, so a bad edit never half-applies.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::bootstrap::BootstrapSpec;
use super::error::{ConfigError, ConfigErrors};
use super::networking::{
    Destination, DestinationRuleSpec, GatewaySpec, HttpRoute, Resolution, ServiceEntrySpec,
    SidecarSpec, VirtualServiceSpec, WorkloadEntrySpec,
};
use super::registry::ServiceRegistry;
use super::security::{AuthorizationPolicySpec, PeerAuthenticationSpec};
use super::types::{Origin, Resource};
use super::validate::{self, Issues};
use super::yaml::{self, Document, YamlError};
use super::{MeshConfig, Resources};
use crate::host::HostName;

/// A named YAML text: a file's contents, or a value read from etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// Shown in errors: the file name, or e.g. the etcd key.
    pub name: String,
    pub text: String,
}

impl Source {
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Self {
        Source {
            name: name.into(),
            text: text.into(),
        }
    }
}

/// Reads and loads YAML files. Unreadable files are reported with the other errors.
pub fn load_files(paths: &[impl AsRef<Path>]) -> Result<MeshConfig, ConfigErrors> {
    let mut sources = Vec::with_capacity(paths.len());
    let mut unreadable = Vec::new();
    for path in paths {
        let name = path.as_ref().display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => sources.push(Source { name, text }),
            Err(e) => unreadable.push(ConfigError::file(name, format!("cannot read: {e}"))),
        }
    }
    let mut loader = Loader {
        errors: unreadable,
        ..Loader::default()
    };
    for source in &sources {
        loader.source(source);
    }
    loader.finish()
}

/// Loads YAML texts (multi-document; empty documents are skipped).
pub fn load_sources(sources: &[Source]) -> Result<MeshConfig, ConfigErrors> {
    let mut loader = Loader::default();
    for source in sources {
        loader.source(source);
    }
    loader.finish()
}

/// What names one resource: its kind, namespace and name (unique in a configuration).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceId {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// A text stored under a resource's own key (an etcd value): it must hold exactly the
/// resource `id`, so a key can never define some other resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyedSource {
    pub id: ResourceId,
    pub source: Source,
}

/// The outcome of [`load_layered`].
#[derive(Clone, Debug)]
pub struct Layered {
    pub config: MeshConfig,
    /// Overlay resources left out because the base defines the same kind, namespace and
    /// name, with the overlay source that held them.
    pub shadowed: Vec<(ResourceId, String)>,
}

/// Loads `overlay` (resources from etcd) on top of `base` (the proxy's own files, already
/// loaded), validating the overlay exactly as files are and the whole as one configuration.
///
/// The merge rule: **the proxy's files win**. An overlay resource with the kind, namespace
/// and name of a base resource is left out and listed in [`Layered::shadowed`]; it is not
/// an error, because a shared store is expected to hold what one machine overrides locally.
/// A Bootstrap in the overlay is an error (it is one proxy's own settings), and so is a
/// source holding anything but exactly its `id`. Errors name the overlay source (the key),
/// so a caller can tell which stored resource to leave out.
pub fn load_layered(base: &MeshConfig, overlay: &[KeyedSource]) -> Result<Layered, ConfigErrors> {
    let ids = base.resources.ids();
    let mut loader = Loader {
        resources: base.resources.clone(),
        base_keys: ids.iter().map(|(key, _)| key.clone()).collect(),
        seen: ids.into_iter().collect(),
        expected: overlay
            .iter()
            .map(|k| (k.source.name.clone(), (k.id.clone(), 0)))
            .collect(),
        ..Loader::default()
    };
    for keyed in overlay {
        loader.source(&keyed.source);
    }
    let mut empty = Vec::new();
    for (name, (id, found)) in &loader.expected {
        let named = loader.errors.iter().any(|e| &e.file == name);
        if *found == 0 && !named {
            empty.push(ConfigError::file(
                name.clone(),
                format!("holds no resource (expected {id})"),
            ));
        }
    }
    loader.errors.extend(empty);
    let shadowed = std::mem::take(&mut loader.shadowed);
    let config = loader.finish()?;
    Ok(Layered { config, shadowed })
}

/// Splits a YAML text into its resources, each with its own text, after validating the
/// text alone as a configuration: what `mesh-proxy config apply` stores, one key each.
pub fn split_resources(source: &Source) -> Result<Vec<(ResourceId, String)>, ConfigErrors> {
    let config = load_sources(std::slice::from_ref(source))?;
    let mut by_document: HashMap<usize, ResourceId> = config
        .resources
        .ids()
        .into_iter()
        .map(|((kind, namespace, name), origin)| {
            (
                origin.document,
                ResourceId {
                    kind,
                    namespace,
                    name,
                },
            )
        })
        .collect();
    Ok(yaml::split_documents(&source.text)
        .into_iter()
        .filter_map(|doc| {
            let id = by_document.remove(&doc.index)?;
            Some((id, doc.text.to_string()))
        })
        .collect())
}

/// The resource kinds this proxy understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Kind {
    Bootstrap,
    VirtualService,
    DestinationRule,
    ServiceEntry,
    WorkloadEntry,
    Gateway,
    Sidecar,
    PeerAuthentication,
    AuthorizationPolicy,
}

const NETWORKING: &str = "networking.istio.io";
const SECURITY: &str = "security.istio.io";
const PROXY: &str = "mesh-proxy";

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Bootstrap,
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::ServiceEntry,
        Kind::WorkloadEntry,
        Kind::Gateway,
        Kind::Sidecar,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Bootstrap => "Bootstrap",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::Gateway => "Gateway",
            Kind::Sidecar => "Sidecar",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }

    /// The API group (`networking.istio.io`, `security.istio.io`, `mesh-proxy`).
    pub fn group(self) -> &'static str {
        match self {
            Kind::Bootstrap => PROXY,
            Kind::PeerAuthentication | Kind::AuthorizationPolicy => SECURITY,
            _ => NETWORKING,
        }
    }

    /// The versions of the group accepted (all alike: the schemas are the same).
    pub fn versions(self) -> &'static [&'static str] {
        match self.group() {
            NETWORKING => &["v1", "v1beta1", "v1alpha3"],
            SECURITY => &["v1", "v1beta1"],
            _ => &["v1"],
        }
    }

    /// Dispatches on `apiVersion` and `kind`; the error says which one is wrong, and why.
    fn resolve(api_version: &str, kind: &str) -> Result<Kind, (&'static str, String)> {
        let Some(found) = Kind::ALL.into_iter().find(|k| k.as_str() == kind) else {
            let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
            return Err((
                "kind",
                format!("unknown kind `{kind}` (supported: {})", known.join(", ")),
            ));
        };
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        if group != found.group() || !found.versions().contains(&version) {
            let accepted: Vec<String> = found
                .versions()
                .iter()
                .map(|v| format!("{}/{v}", found.group()))
                .collect();
            return Err((
                "apiVersion",
                format!(
                    "apiVersion `{api_version}` is not supported for {kind} (use {})",
                    accepted.join(", ")
                ),
            ));
        }
        Ok(found)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the loader needs of each kind's spec.
trait Spec: DeserializeOwned + Default + Sized {
    const KIND: Kind;
    fn validate(&self, issues: &mut Issues);
    /// Qualifies short host names in the resource's namespace.
    fn qualify(&mut self, _namespace: &str) {}
    fn store(resources: &mut Resources) -> &mut Vec<Resource<Self>>;
}

/// Implements [`Spec`]: kind, where it is stored, its validation and, optionally, how its
/// hosts are qualified.
macro_rules! spec {
    ($spec:ty, $kind:ident, $field:ident, $validate:path $(, |$s:ident, $ns:ident| $qualify:block)?) => {
        impl Spec for $spec {
            const KIND: Kind = Kind::$kind;
            fn validate(&self, issues: &mut Issues) {
                $validate(self, issues)
            }
            $(fn qualify(&mut self, namespace: &str) {
                let ($s, $ns) = (self, namespace);
                $qualify
            })?
            fn store(resources: &mut Resources) -> &mut Vec<Resource<Self>> {
                &mut resources.$field
            }
        }
    };
}

spec!(BootstrapSpec, Bootstrap, bootstraps, validate::bootstrap);
spec!(
    VirtualServiceSpec,
    VirtualService,
    virtual_services,
    validate::virtual_service,
    |s, ns| {
        qualify_all(&mut s.hosts, ns);
        for route in &mut s.http {
            qualify_http(route, ns);
        }
        let l4 = s
            .tcp
            .iter_mut()
            .flat_map(|r| &mut r.route)
            .chain(s.tls.iter_mut().flat_map(|r| &mut r.route));
        for dest in l4 {
            qualify_destination(&mut dest.destination, ns);
        }
    }
);
spec!(
    DestinationRuleSpec,
    DestinationRule,
    destination_rules,
    validate::destination_rule,
    |s, ns| {
        s.host = qualify(&s.host, ns);
    }
);
spec!(
    ServiceEntrySpec,
    ServiceEntry,
    service_entries,
    validate::service_entry,
    |s, ns| {
        qualify_all(&mut s.hosts, ns);
    }
);
spec!(
    WorkloadEntrySpec,
    WorkloadEntry,
    workload_entries,
    validate::workload_entry
);
spec!(GatewaySpec, Gateway, gateways, validate::gateway);
spec!(SidecarSpec, Sidecar, sidecars, validate::sidecar);
spec!(
    PeerAuthenticationSpec,
    PeerAuthentication,
    peer_authentications,
    validate::peer_authentication
);
spec!(
    AuthorizationPolicySpec,
    AuthorizationPolicy,
    authorization_policies,
    validate::authorization_policy
);

fn qualify(host: &str, namespace: &str) -> String {
    HostName::qualify(host, namespace).as_str().to_string()
}

fn qualify_all(hosts: &mut [String], namespace: &str) {
    for host in hosts {
        *host = qualify(host, namespace);
    }
}

fn qualify_destination(d: &mut Destination, namespace: &str) {
    d.host = qualify(&d.host, namespace);
}

fn qualify_http(route: &mut HttpRoute, namespace: &str) {
    for dest in &mut route.route {
        qualify_destination(&mut dest.destination, namespace);
    }
    if let Some(mirror) = &mut route.mirror {
        qualify_destination(mirror, namespace);
    }
    for mirror in &mut route.mirrors {
        qualify_destination(&mut mirror.destination, namespace);
    }
}

/// The lenient first pass: enough to dispatch and to name the resource in messages.
#[derive(Deserialize)]
struct Header {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<HeaderMetadata>,
}

#[derive(Deserialize)]
struct HeaderMetadata {
    name: Option<String>,
}

#[derive(Default)]
struct Loader<'a> {
    resources: Resources,
    errors: Vec<ConfigError>,
    /// (kind, namespace, name) → where it was first defined.
    seen: HashMap<(Kind, String, String), Origin>,
    /// Parsed documents, to find lines for errors found after parsing.
    documents: HashMap<Origin, Document<'a>>,
    /// For [`load_layered`]: the base's resources, which overlay resources cannot replace.
    base_keys: std::collections::HashSet<(Kind, String, String)>,
    shadowed: Vec<(ResourceId, String)>,
    /// For [`load_layered`]: overlay source name → the resource it must hold, and how many
    /// resources it held.
    expected: HashMap<String, (ResourceId, usize)>,
}

impl<'a> Loader<'a> {
    fn source(&mut self, source: &'a Source) {
        for doc in yaml::split_documents(&source.text) {
            self.document(&source.name, doc);
        }
    }

    fn document(&mut self, file: &str, doc: Document<'a>) {
        let origin = Origin {
            file: file.to_string(),
            document: doc.index,
        };
        let header = match yaml::parse::<Option<Header>>(&doc) {
            Ok(Some(header)) => header,
            Ok(None) => return, // an empty document
            Err(e) => return self.errors.push(from_yaml(&origin, None, e)),
        };
        let name = header.metadata.and_then(|m| m.name);
        let label = header.kind.as_deref().map(|k| match &name {
            Some(name) => format!("{k} {name}"),
            None => k.to_string(),
        });
        let kind = match (&header.api_version, &header.kind) {
            (Some(api_version), Some(kind)) => {
                Kind::resolve(api_version, kind).map_err(|(path, message)| (Some(path), message))
            }
            (None, _) => Err((None, "missing field `apiVersion`".to_string())),
            (_, None) => Err((None, "missing field `kind`".to_string())),
        };
        let kind = match kind {
            Ok(kind) => kind,
            Err((path, message)) => {
                let (line, column) = yaml::locate(&doc, path.unwrap_or(""));
                return self.errors.push(ConfigError {
                    file: origin.file,
                    document: Some(origin.document),
                    resource: label,
                    path: path.map(str::to_string),
                    line,
                    column,
                    message,
                });
            }
        };
        self.documents.insert(origin.clone(), doc);
        match kind {
            Kind::Bootstrap => self.typed::<BootstrapSpec>(origin, label),
            Kind::VirtualService => self.typed::<VirtualServiceSpec>(origin, label),
            Kind::DestinationRule => self.typed::<DestinationRuleSpec>(origin, label),
            Kind::ServiceEntry => self.typed::<ServiceEntrySpec>(origin, label),
            Kind::WorkloadEntry => self.typed::<WorkloadEntrySpec>(origin, label),
            Kind::Gateway => self.typed::<GatewaySpec>(origin, label),
            Kind::Sidecar => self.typed::<SidecarSpec>(origin, label),
            Kind::PeerAuthentication => self.typed::<PeerAuthenticationSpec>(origin, label),
            Kind::AuthorizationPolicy => self.typed::<AuthorizationPolicySpec>(origin, label),
        }
    }

    fn typed<S: Spec>(&mut self, origin: Origin, label: Option<String>) {
        let Some(doc) = self.documents.get(&origin).copied() else {
            return;
        };
        let mut resource: Resource<S> = match yaml::parse(&doc) {
            Ok(resource) => resource,
            Err(e) => return self.errors.push(from_yaml(&origin, label, e)),
        };
        let mut issues = Issues::default();
        if resource.metadata.name.is_empty() {
            issues.add("metadata.name", "name is required");
        }
        resource.spec.validate(&mut issues);
        let key = (
            S::KIND,
            resource.metadata.namespace.clone(),
            resource.metadata.name.clone(),
        );
        let id = ResourceId {
            kind: key.0,
            namespace: key.1.clone(),
            name: key.2.clone(),
        };
        if let Some((expected, found)) = self.expected.get_mut(&origin.file) {
            *found += 1;
            if S::KIND == Kind::Bootstrap {
                issues.add(
                    "kind",
                    "a Bootstrap is one proxy's own settings: it belongs in that proxy's files, not in a shared store",
                );
            } else if *found > 1 {
                issues.add(
                    "kind",
                    format!(
                        "a second resource under the key of {expected}: one key holds one resource"
                    ),
                );
            } else if *expected != id {
                issues.add(
                    "metadata",
                    format!("this key must hold {expected}, not {id}"),
                );
            } else if self.base_keys.contains(&key) {
                self.shadowed.push((id, origin.file));
                return;
            }
            if !issues.0.is_empty() {
                return self.issues(&origin, label.as_deref(), issues);
            }
        }
        if let Some(first) = self.seen.get(&key) {
            issues.add(
                "metadata.name",
                format!(
                    "duplicate {} {}/{}: already defined in {first}",
                    S::KIND,
                    key.1,
                    key.2
                ),
            );
        } else if S::KIND == Kind::Bootstrap
            && let Some(first) = self.resources.bootstraps.first()
        {
            issues.add(
                "kind",
                format!(
                    "a second Bootstrap (the first is in {}); a proxy takes exactly one",
                    first.origin
                ),
            );
        }
        if !issues.0.is_empty() {
            return self.issues(&origin, label.as_deref(), issues);
        }
        self.seen.insert(key, origin.clone());
        resource.spec.qualify(&resource.metadata.namespace);
        resource.origin = origin;
        S::store(&mut self.resources).push(resource);
    }

    fn issues(&mut self, origin: &Origin, label: Option<&str>, issues: Issues) {
        let doc = self.documents.get(origin);
        for (path, message) in issues.0 {
            let (line, column) = doc.map_or((None, None), |doc| yaml::locate(doc, &path));
            self.errors.push(ConfigError {
                file: origin.file.clone(),
                document: Some(origin.document),
                resource: label.map(str::to_string),
                path: Some(path),
                line,
                column,
                message,
            });
        }
    }

    /// Checks between resources, then the registry.
    fn finish(mut self) -> Result<MeshConfig, ConfigErrors> {
        self.cross_checks();
        if !self.errors.is_empty() {
            return Err(ConfigErrors(self.errors));
        }
        let namespace = self
            .resources
            .bootstraps
            .first()
            .map_or(crate::host::DEFAULT_NAMESPACE, |b| b.namespace())
            .to_string();
        let services = ServiceRegistry::build(
            &self.resources.service_entries,
            &self.resources.workload_entries,
            &namespace,
        );
        Ok(MeshConfig {
            resources: self.resources,
            services,
        })
    }

    fn cross_checks(&mut self) {
        // A VirtualService without hosts is only valid as some other one's delegate.
        let delegates: Vec<(String, String)> = self
            .resources
            .virtual_services
            .iter()
            .flat_map(|vs| {
                vs.spec
                    .http
                    .iter()
                    .filter_map(|r| r.delegate.as_ref())
                    .map(|d| {
                        let ns = d
                            .namespace
                            .clone()
                            .unwrap_or_else(|| vs.metadata.namespace.clone());
                        (ns, d.name.clone())
                    })
            })
            .collect();
        let mut found = Vec::new();
        for vs in &self.resources.virtual_services {
            let key = (vs.metadata.namespace.clone(), vs.metadata.name.clone());
            if vs.spec.hosts.is_empty() && !delegates.contains(&key) {
                found.push((
                    vs.origin.clone(),
                    format!("VirtualService {}", vs.name()),
                    "spec.hosts".to_string(),
                    "at least one host is required (only a delegate VirtualService has none)"
                        .to_string(),
                ));
            }
        }
        // Sidecars route a host by one VirtualService only (Istio merges VirtualServices for
        // the same host on gateways, never for the mesh), so a second one binding the same
        // host to the mesh is a conflict, reported on the later one.
        let mut mesh_hosts: HashMap<&str, &Resource<VirtualServiceSpec>> = HashMap::new();
        for vs in &self.resources.virtual_services {
            let for_mesh =
                vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == "mesh");
            if !for_mesh {
                continue;
            }
            for (i, host) in vs.spec.hosts.iter().enumerate() {
                match mesh_hosts.get(host.as_str()) {
                    Some(first) => found.push((
                        vs.origin.clone(),
                        format!("VirtualService {}", vs.name()),
                        format!("spec.hosts[{i}]"),
                        format!(
                            "host `{host}` is already routed by VirtualService {}/{} ({}); sidecars use one VirtualService per host, so merge their routes",
                            first.namespace(),
                            first.name(),
                            first.origin
                        ),
                    )),
                    None => {
                        mesh_hosts.insert(host.as_str(), vs);
                    }
                }
            }
        }
        // WorkloadEntries picked by a STATIC ServiceEntry must have IP addresses.
        for se in &self.resources.service_entries {
            let Some(selector) = &se.spec.workload_selector else {
                continue;
            };
            if se.spec.resolution.is_dns() {
                continue;
            }
            for we in &self.resources.workload_entries {
                if we.namespace() == se.namespace()
                    && we.spec.labels.matches(&selector.labels)
                    && we.spec.address.parse::<std::net::IpAddr>().is_err()
                {
                    let resolution = if se.spec.resolution == Resolution::Static {
                        "STATIC"
                    } else {
                        "NONE"
                    };
                    found.push((we.origin.clone(), format!("WorkloadEntry {}", we.name()), "spec.address".to_string(),
                        format!("`{}` is not an IP address, as ServiceEntry {} (resolution {resolution}) needs", we.spec.address, se.name())));
                }
            }
        }
        for (origin, label, path, message) in found {
            let mut issues = Issues::default();
            issues.add(path, message);
            self.issues(&origin, Some(&label), issues);
        }
    }
}

fn from_yaml(origin: &Origin, label: Option<String>, e: YamlError) -> ConfigError {
    ConfigError {
        file: origin.file.clone(),
        document: Some(origin.document),
        resource: label,
        path: e.path,
        line: e.line,
        column: e.column,
        message: e.message,
    }
}
