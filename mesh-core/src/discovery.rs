//! Discovery: the endpoint set of a service port as a value that changes over time.
//!
//! Consumers (balancers) hold an [`EndpointWatch`], a `tokio::sync::watch` receiver: reading
//! the current set is a cheap borrow on the request path, and waiting for the next change is
//! an `await` in a background task. Every provider (the static one fed by `ServiceEntry`
//! endpoints here; DNS and etcd later) publishes through [`EndpointPublisher`], so consumers
//! never know where endpoints came from.
//!
//! A key nobody has published yet is watchable: its set starts empty and fills in when a
//! provider publishes it, so a config that names a service before its endpoints are known
//! works without ordering rules.
//!
//! ```
//! use mesh_core::discovery::{EndpointPublisher, ServiceKey, Discover};
//! use mesh_core::{Endpoint, HostName};
//!
//! let publisher = EndpointPublisher::default();
//! let key = ServiceKey::new(HostName::qualify("reviews", "default"), 9080);
//! let watch = publisher.watch(&key);
//! assert!(watch.borrow().is_empty());
//!
//! publisher.publish([(key.clone(), vec![Endpoint::new("127.0.0.1:19081".parse().unwrap())])]);
//! assert_eq!(watch.borrow().len(), 1);
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::endpoint::Endpoint;
use crate::host::HostName;

/// A service port: what a client asks for, and what discovery answers about.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub host: HostName,
    pub port: u16,
}

impl ServiceKey {
    pub fn new(host: HostName, port: u16) -> Self {
        ServiceKey { host, port }
    }
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// The endpoints of one service port at one moment. Immutable; a change is a new set.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EndpointSet {
    endpoints: Vec<Endpoint>,
}

impl EndpointSet {
    pub fn new(endpoints: Vec<Endpoint>) -> Self {
        EndpointSet { endpoints }
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }
}

/// The current endpoints of a service port, and every later change.
pub type EndpointWatch = watch::Receiver<Arc<EndpointSet>>;

/// Something that can be asked for the endpoints of a service port.
pub trait Discover: Send + Sync + 'static {
    /// A watch on `key`'s endpoint set; empty until a provider publishes it.
    fn watch(&self, key: &ServiceKey) -> EndpointWatch;
}

/// The shared board providers publish endpoint sets on and consumers watch.
///
/// The lock guards only the key → sender map; it is never held across an `.await` and
/// consumers read through their own receivers, so the request path never touches it.
#[derive(Debug, Default)]
pub struct EndpointPublisher {
    channels: Mutex<HashMap<ServiceKey, watch::Sender<Arc<EndpointSet>>>>,
}

impl EndpointPublisher {
    /// Replaces the whole picture: every key given gets its set; every key known before but
    /// absent now becomes empty (its service was removed). Watchers are woken only for sets
    /// that really changed, so a config reload that leaves a service alone leaves its
    /// balancer (and its pooled connections) alone.
    pub fn publish(&self, sets: impl IntoIterator<Item = (ServiceKey, Vec<Endpoint>)>) {
        let mut fresh: HashMap<ServiceKey, Vec<Endpoint>> = sets.into_iter().collect();
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        for (key, tx) in channels.iter() {
            let endpoints = fresh.remove(key).unwrap_or_default();
            tx.send_if_modified(|current| {
                if current.endpoints == endpoints {
                    false
                } else {
                    *current = Arc::new(EndpointSet::new(endpoints));
                    true
                }
            });
        }
        for (key, endpoints) in fresh {
            let (tx, _) = watch::channel(Arc::new(EndpointSet::new(endpoints)));
            channels.insert(key, tx);
        }
    }

    /// The keys currently published (for admin views).
    pub fn snapshot(&self) -> Vec<(ServiceKey, Arc<EndpointSet>)> {
        let channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = channels
            .iter()
            .map(|(k, tx)| (k.clone(), tx.borrow().clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

impl Discover for EndpointPublisher {
    fn watch(&self, key: &ServiceKey) -> EndpointWatch {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels
            .entry(key.clone())
            .or_insert_with(|| watch::channel(Arc::new(EndpointSet::default())).0)
            .subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16) -> Endpoint {
        Endpoint::new(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
    }

    #[tokio::test]
    async fn watchers_see_changes_and_removals() {
        let publisher = EndpointPublisher::default();
        let key = ServiceKey::new(HostName::qualify("reviews", "default"), 9080);
        let mut watch = publisher.watch(&key);
        assert!(watch.borrow_and_update().is_empty());

        publisher.publish([(key.clone(), vec![ep(1), ep(2)])]);
        watch.changed().await.unwrap();
        assert_eq!(watch.borrow_and_update().len(), 2);

        // The same set again is not a change.
        publisher.publish([(key.clone(), vec![ep(1), ep(2)])]);
        assert!(!watch.has_changed().unwrap());

        // A key left out of a publish is removed: its set becomes empty.
        publisher.publish([]);
        watch.changed().await.unwrap();
        assert!(watch.borrow().is_empty());
    }
}
