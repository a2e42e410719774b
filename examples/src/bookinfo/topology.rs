//! Who runs in the Bookinfo mesh and on which loopback ports.
//!
//! Six app workloads (productpage v1, details v1, ratings v1, reviews v1/v2/v3), each with a
//! sidecar, plus the ingress gateway. Every port is `--port-base` plus a fixed offset, so one
//! flag moves the whole mesh:
//!
//! | port | what |
//! |---|---|
//! | base | the ingress gateway's `bookinfo-gateway` server (default 8080) |
//! | base + 10 + 4·i | workload i's app |
//! | base + 11 + 4·i | workload i's sidecar inbound listener (the mesh endpoint, mTLS) |
//! | base + 12 + 4·i | workload i's sidecar outbound listener (its app calls through it) |
//! | base + 13 + 4·i | workload i's sidecar admin (`/ready`, `/metrics`, ...) |
//!
//! with i in the order of [`WORKLOADS`] (the gateway last; it has no app nor inbound).
//!
//! ```
//! use examples::bookinfo::topology::{Ports, WORKLOADS};
//!
//! let ports = Ports::new(8080)?;
//! assert_eq!(ports.gateway().port(), 8080);
//! assert_eq!(ports.app(&WORKLOADS[0]).port(), 8090); // productpage
//! # Ok::<(), String>(())
//! ```

use std::net::{Ipv4Addr, SocketAddr};

use super::apps::reviews::Version;

/// The default `--port-base`: the gateway on 8080.
pub const DEFAULT_PORT_BASE: u16 = 8080;
/// How many consecutive ports from the base the mesh may use.
pub const PORT_SPAN: u16 = 40;

/// The trust domain of every identity.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// What a workload runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Productpage,
    Details,
    Ratings,
    Reviews(Version),
    IngressGateway,
}

/// One workload of the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Workload name, as a Kubernetes Deployment would be called (`reviews-v2`).
    pub name: &'static str,
    /// The Kubernetes service (and `app` label) it belongs to.
    pub app: &'static str,
    /// Its `version` label.
    pub version: &'static str,
    pub role: Role,
    /// Its slot in the port layout.
    pub slot: u16,
}

impl Workload {
    /// Its namespace: `default`, or `istio-system` for the gateway.
    pub fn namespace(&self) -> &'static str {
        match self.role {
            Role::IngressGateway => "istio-system",
            _ => "default",
        }
    }

    /// Its Kubernetes service account (Istio's Bookinfo names them `bookinfo-<service>`).
    pub fn service_account(&self) -> String {
        match self.role {
            Role::IngressGateway => "istio-ingressgateway-service-account".into(),
            _ => format!("bookinfo-{}", self.app),
        }
    }

    /// Its SPIFFE identity.
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}",
            self.namespace(),
            self.service_account()
        )
    }

    /// Whether an app runs behind it (all but the gateway).
    pub fn has_app(&self) -> bool {
        self.role != Role::IngressGateway
    }
}

const fn workload(
    name: &'static str,
    app: &'static str,
    version: &'static str,
    role: Role,
    slot: u16,
) -> Workload {
    Workload {
        name,
        app,
        version,
        role,
        slot,
    }
}

/// Every workload, in port-slot order; the ingress gateway last.
pub const WORKLOADS: [Workload; 7] = [
    workload("productpage-v1", "productpage", "v1", Role::Productpage, 0),
    workload("details-v1", "details", "v1", Role::Details, 1),
    workload("ratings-v1", "ratings", "v1", Role::Ratings, 2),
    workload("reviews-v1", "reviews", "v1", Role::Reviews(Version::V1), 3),
    workload("reviews-v2", "reviews", "v2", Role::Reviews(Version::V2), 4),
    workload("reviews-v3", "reviews", "v3", Role::Reviews(Version::V3), 5),
    workload(
        "istio-ingressgateway",
        "istio-ingressgateway",
        "v1",
        Role::IngressGateway,
        6,
    ),
];

/// The ingress gateway's entry in [`WORKLOADS`].
pub fn ingress_gateway() -> &'static Workload {
    &WORKLOADS[6]
}

/// The productpage's entry in [`WORKLOADS`].
pub fn productpage() -> &'static Workload {
    &WORKLOADS[0]
}

/// The mesh's services, each with its workloads.
pub const SERVICES: [&str; 4] = ["productpage", "details", "reviews", "ratings"];

/// The port layout for one `--port-base`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    base: u16,
}

impl Ports {
    /// The layout from `base`; fails when the span does not fit below 65536.
    pub fn new(base: u16) -> Result<Ports, String> {
        if base == 0 || base.checked_add(PORT_SPAN).is_none() {
            return Err(format!(
                "--port-base {base} leaves no room for the mesh's {PORT_SPAN} ports (use 1..={})",
                u16::MAX - PORT_SPAN
            ));
        }
        Ok(Ports { base })
    }

    pub fn base(&self) -> u16 {
        self.base
    }

    fn at(&self, offset: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.base + offset))
    }

    /// The ingress gateway's HTTP server (`bookinfo-gateway`, port `number`).
    pub fn gateway(&self) -> SocketAddr {
        self.at(0)
    }

    pub fn app(&self, w: &Workload) -> SocketAddr {
        self.at(10 + 4 * w.slot)
    }

    pub fn inbound(&self, w: &Workload) -> SocketAddr {
        self.at(11 + 4 * w.slot)
    }

    pub fn outbound(&self, w: &Workload) -> SocketAddr {
        self.at(12 + 4 * w.slot)
    }

    pub fn admin(&self, w: &Workload) -> SocketAddr {
        self.at(13 + 4 * w.slot)
    }

    /// Every address the mesh listens on, each with what it is.
    pub fn all(&self) -> Vec<(String, SocketAddr)> {
        let mut out = vec![("the ingress gateway".to_owned(), self.gateway())];
        for w in &WORKLOADS {
            if w.has_app() {
                out.push((format!("the {} app", w.name), self.app(w)));
                out.push((format!("{}'s sidecar inbound", w.name), self.inbound(w)));
            }
            out.push((format!("{}'s sidecar outbound", w.name), self.outbound(w)));
            out.push((format!("{}'s sidecar admin", w.name), self.admin(w)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_within_the_span() {
        let ports = Ports::new(20000).unwrap();
        let all = ports.all();
        let mut seen: Vec<u16> = all.iter().map(|(_, a)| a.port()).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), all.len());
        assert!(seen.iter().all(|p| (20000..20000 + PORT_SPAN).contains(p)));
        assert!(Ports::new(u16::MAX - 10).is_err());
        assert!(Ports::new(0).is_err());
    }

    #[test]
    fn identities_as_istio_bookinfo() {
        assert_eq!(
            WORKLOADS[4].spiffe_id(),
            "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
        );
        assert_eq!(
            ingress_gateway().spiffe_id(),
            "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
        );
        assert_eq!(productpage().name, "productpage-v1");
    }
}
