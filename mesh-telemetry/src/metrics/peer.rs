//! Peer metadata exchange: how two sidecars learn each other's workload labels.
//!
//! Istio's proxies exchange their node metadata in the `x-envoy-peer-metadata` header (or
//! over ALPN for TCP); ours do the same in [`PEER_METADATA_HEADER`], with a compact,
//! human-readable encoding:
//!
//! ```text
//! x-mesh-peer-metadata: n=reviews-v2;ns=default;app=reviews;v=v2;c=Kubernetes
//! ```
//!
//! Keys: `n` workload name, `ns` namespace, `app`, `v` version, `cs`/`cr` canonical
//! service/revision (sent only when they differ from Istio's fallbacks), `c` cluster.
//!
//! # Choices
//!
//! - **No escaping at all.** Values are restricted to `[A-Za-z0-9._-]` (Kubernetes names
//!   and label values), so `;` and `=` never occur in them and the decoder is a split, not a
//!   parser. A value of our own outside that set is left out of the header (the peer then
//!   reports `unknown` for it) rather than escaped: metric label values should not carry
//!   such characters anyway.
//! - **Bounded and total decoding.** At most [`MAX_HEADER_LEN`] bytes and [`MAX_FIELDS`]
//!   fields; each value at most 63 bytes (253 for the workload name and cluster, DNS
//!   names), never empty; a repeated key is an error. Unknown keys with well-formed values
//!   are skipped, so a newer peer may add fields. Errors never echo the peer's bytes.
//! - **Encoded once** per [`WorkloadInfo`](super::WorkloadInfo), into a `HeaderValue` each
//!   request clones (a reference count).
//! - **Interned.** A layer decodes a given header value once and keeps the result in a
//!   bounded table ([`MAX_PEERS`] entries), so the request path compares pointers, and a
//!   peer cycling through fresh values cannot grow memory (or the metric series) without
//!   bound: past the cap, unseen values are reported as `unknown`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use http::header::{HeaderName, HeaderValue};

use super::cache::FxBuildHasher;
use super::workload::{LATEST, WorkloadInfo};

/// The header carrying a sidecar's workload metadata to its peer.
pub const PEER_METADATA_HEADER: HeaderName = HeaderName::from_static("x-mesh-peer-metadata");

/// The longest header value the decoder looks at.
pub const MAX_HEADER_LEN: usize = 1024;

/// The most `key=value` fields a header may have.
pub const MAX_FIELDS: usize = 16;

/// How many distinct peer headers one layer remembers.
pub const MAX_PEERS: usize = 1024;

/// The longest workload name or cluster (a DNS name).
const MAX_DNS_NAME: usize = 253;
/// The longest namespace or label value (a DNS label / Kubernetes label value).
const MAX_LABEL: usize = 63;
/// The longest key of a field this version does not know.
const MAX_KEY: usize = 16;

/// A peer's workload, as its sidecar described itself. Every field is optional: a peer
/// leaves out what it does not know.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerMetadata {
    pub workload: Option<Arc<str>>,
    pub namespace: Option<Arc<str>>,
    pub app: Option<Arc<str>>,
    pub version: Option<Arc<str>>,
    pub canonical_service: Option<Arc<str>>,
    pub canonical_revision: Option<Arc<str>>,
    pub cluster: Option<Arc<str>>,
}

/// Why a peer metadata header was rejected. Never carries the peer's bytes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerMetadataError {
    #[error("peer metadata is longer than {MAX_HEADER_LEN} bytes")]
    TooLong,
    #[error("peer metadata has more than {MAX_FIELDS} fields")]
    TooManyFields,
    #[error("peer metadata field #{0} is not a well-formed key=value")]
    Malformed(usize),
    #[error("peer metadata key `{0}` is repeated")]
    Repeated(&'static str),
    #[error(
        "peer metadata value of `{key}` is empty, longer than {max} bytes or has characters \
         outside [A-Za-z0-9._-]"
    )]
    BadValue { key: &'static str, max: usize },
    #[error("peer metadata names no workload")]
    NoWorkload,
}

/// The fields, their keys and length limits.
#[derive(Clone, Copy)]
enum Field {
    Workload,
    Namespace,
    App,
    Version,
    CanonicalService,
    CanonicalRevision,
    Cluster,
}

const FIELDS: [(Field, &str, usize); 7] = [
    (Field::Workload, "n", MAX_DNS_NAME),
    (Field::Namespace, "ns", MAX_LABEL),
    (Field::App, "app", MAX_LABEL),
    (Field::Version, "v", MAX_LABEL),
    (Field::CanonicalService, "cs", MAX_LABEL),
    (Field::CanonicalRevision, "cr", MAX_LABEL),
    (Field::Cluster, "c", MAX_DNS_NAME),
];

impl PeerMetadata {
    /// What this proxy tells its peers about `workload`. Values outside the safe charset
    /// are left out, as are canonical names equal to Istio's fallbacks.
    pub fn of(workload: &WorkloadInfo) -> PeerMetadata {
        let keep = |v: &str, max: usize| valid_value(v.as_bytes(), max).then(|| Arc::from(v));
        let opt = |v: Option<&str>, max: usize| v.and_then(|v| keep(v, max));
        let fallback_service = workload.app.as_deref().unwrap_or(&workload.name);
        let fallback_revision = workload.version.as_deref().unwrap_or(LATEST);
        PeerMetadata {
            workload: keep(&workload.name, MAX_DNS_NAME),
            namespace: keep(&workload.namespace, MAX_LABEL),
            app: opt(workload.app.as_deref(), MAX_LABEL),
            version: opt(workload.version.as_deref(), MAX_LABEL),
            canonical_service: opt(
                Some(workload.canonical_service()).filter(|s| *s != fallback_service),
                MAX_LABEL,
            ),
            canonical_revision: opt(
                Some(workload.canonical_revision()).filter(|r| *r != fallback_revision),
                MAX_LABEL,
            ),
            cluster: opt(workload.cluster.as_deref(), MAX_DNS_NAME),
        }
    }

    /// The header value, or `None` when there is nothing valid to say (no workload name).
    pub fn encode(&self) -> Option<HeaderValue> {
        self.workload.as_ref()?;
        let mut out = String::with_capacity(96);
        for (field, key, max) in FIELDS {
            if let Some(v) = self.get(field).filter(|v| valid_value(v.as_bytes(), max)) {
                if !out.is_empty() {
                    out.push(';');
                }
                out.push_str(key);
                out.push('=');
                out.push_str(v);
            }
        }
        HeaderValue::from_str(&out).ok()
    }

    /// Decodes a header value; see the module docs for the rules. Never panics.
    pub fn decode(raw: &[u8]) -> Result<PeerMetadata, PeerMetadataError> {
        if raw.len() > MAX_HEADER_LEN {
            return Err(PeerMetadataError::TooLong);
        }
        let mut meta = PeerMetadata::default();
        for (i, pair) in raw.split(|b| *b == b';').enumerate() {
            if i >= MAX_FIELDS {
                return Err(PeerMetadataError::TooManyFields);
            }
            let eq = pair
                .iter()
                .position(|b| *b == b'=')
                .ok_or(PeerMetadataError::Malformed(i))?;
            let (key, value) = (&pair[..eq], &pair[eq + 1..]);
            match FIELDS.iter().find(|(_, k, _)| k.as_bytes() == key) {
                Some(&(field, key, max)) => {
                    if !valid_value(value, max) {
                        return Err(PeerMetadataError::BadValue { key, max });
                    }
                    let slot = meta.slot(field);
                    if slot.is_some() {
                        return Err(PeerMetadataError::Repeated(key));
                    }
                    // `valid_value` admits ASCII only, so this is always `Ok`.
                    let s = std::str::from_utf8(value)
                        .map_err(|_| PeerMetadataError::BadValue { key, max })?;
                    *slot = Some(Arc::from(s));
                }
                None => {
                    let key_ok = !key.is_empty()
                        && key.len() <= MAX_KEY
                        && key
                            .iter()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
                    if !key_ok || !valid_value(value, MAX_DNS_NAME) {
                        return Err(PeerMetadataError::Malformed(i));
                    }
                }
            }
        }
        if meta.workload.is_none() {
            return Err(PeerMetadataError::NoWorkload);
        }
        Ok(meta)
    }

    /// The peer's canonical service: its explicit one, else `app`, else its workload name.
    pub fn canonical_service(&self) -> Option<&str> {
        self.canonical_service
            .as_deref()
            .or(self.app.as_deref())
            .or(self.workload.as_deref())
    }

    /// The peer's canonical revision: its explicit one, else `version`, else `latest`.
    pub fn canonical_revision(&self) -> &str {
        self.canonical_revision
            .as_deref()
            .or(self.version.as_deref())
            .unwrap_or(LATEST)
    }

    fn get(&self, field: Field) -> Option<&str> {
        match field {
            Field::Workload => self.workload.as_deref(),
            Field::Namespace => self.namespace.as_deref(),
            Field::App => self.app.as_deref(),
            Field::Version => self.version.as_deref(),
            Field::CanonicalService => self.canonical_service.as_deref(),
            Field::CanonicalRevision => self.canonical_revision.as_deref(),
            Field::Cluster => self.cluster.as_deref(),
        }
    }

    fn slot(&mut self, field: Field) -> &mut Option<Arc<str>> {
        match field {
            Field::Workload => &mut self.workload,
            Field::Namespace => &mut self.namespace,
            Field::App => &mut self.app,
            Field::Version => &mut self.version,
            Field::CanonicalService => &mut self.canonical_service,
            Field::CanonicalRevision => &mut self.canonical_revision,
            Field::Cluster => &mut self.cluster,
        }
    }
}

/// Non-empty, at most `max` bytes of `[A-Za-z0-9._-]`.
fn valid_value(v: &[u8], max: usize) -> bool {
    !v.is_empty()
        && v.len() <= max
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Decoded peer headers by their bytes, so each distinct value is decoded once and the
/// request path keys metric series by pointer. Bounded by [`MAX_PEERS`].
#[derive(Debug, Default)]
pub(crate) struct PeerInterner {
    peers: RwLock<HashMap<Box<[u8]>, Arc<PeerMetadata>, FxBuildHasher>>,
    full_warned: AtomicBool,
}

impl PeerInterner {
    /// The decoded, shared metadata for a header value; `None` when it does not decode, or
    /// when the table is full and the value is new.
    pub(crate) fn get(&self, raw: &[u8]) -> Option<Arc<PeerMetadata>> {
        if let Some(meta) = self
            .peers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(raw)
        {
            return Some(meta.clone());
        }
        // Failures are not remembered: garbage must not take the room of real peers, and
        // decoding a bounded header again costs little.
        let meta = match PeerMetadata::decode(raw) {
            Ok(meta) => Arc::new(meta),
            Err(e) => {
                tracing::debug!(error = %e, "ignoring peer metadata");
                return None;
            }
        };
        let mut peers = self.peers.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = peers.get(raw) {
            return Some(existing.clone());
        }
        if peers.len() >= MAX_PEERS {
            if !self.full_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    max = MAX_PEERS,
                    "too many distinct peer metadata values; new peers are reported as unknown"
                );
            }
            return None;
        }
        peers.insert(raw.into(), meta.clone());
        Some(meta)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.peers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reviews() -> WorkloadInfo {
        WorkloadInfo::new("reviews-v2", "default")
            .with_app("reviews")
            .with_version("v2")
            .with_cluster("Kubernetes")
    }

    #[test]
    fn round_trips_compactly() {
        let meta = PeerMetadata::of(&reviews());
        let header = meta.encode().unwrap();
        assert_eq!(
            header.to_str().unwrap(),
            "n=reviews-v2;ns=default;app=reviews;v=v2;c=Kubernetes"
        );
        let back = PeerMetadata::decode(header.as_bytes()).unwrap();
        assert_eq!(back, meta);
        assert_eq!(back.canonical_service(), Some("reviews"));
        assert_eq!(back.canonical_revision(), "v2");
    }

    #[test]
    fn canonical_names_travel_only_when_they_differ() {
        let mut w = reviews();
        w.canonical_service = Some("reviews-svc".into());
        let header = PeerMetadata::of(&w).encode().unwrap();
        assert!(header.to_str().unwrap().contains(";cs=reviews-svc;"));
        let back = PeerMetadata::decode(header.as_bytes()).unwrap();
        assert_eq!(back.canonical_service(), Some("reviews-svc"));
        // Our own odd values are left out, not escaped.
        let odd = WorkloadInfo::new("ok", "default").with_app("has space");
        assert_eq!(
            PeerMetadata::of(&odd).encode().unwrap().to_str().unwrap(),
            "n=ok;ns=default"
        );
    }

    #[test]
    fn hostile_values_are_rejected_without_panicking() {
        use PeerMetadataError as E;
        let long = format!("n={}", "a".repeat(MAX_HEADER_LEN));
        let long_label = format!("n=a;app={}", "a".repeat(64));
        let many = "n=a;".to_string() + &"x=1;".repeat(MAX_FIELDS);
        let cases: Vec<(&[u8], E)> = vec![
            (long.as_bytes(), E::TooLong),
            (
                long_label.as_bytes(),
                E::BadValue {
                    key: "app",
                    max: 63,
                },
            ),
            (many.as_bytes(), E::TooManyFields),
            (b"", E::Malformed(0)),
            (b"garbage", E::Malformed(0)),
            (b"n=a;;", E::Malformed(1)),
            (b"n=a b", E::BadValue { key: "n", max: 253 }),
            (b"n=a;ns=", E::BadValue { key: "ns", max: 63 }),
            (b"n=a;ns=x\"y", E::BadValue { key: "ns", max: 63 }),
            (b"n=\xff\xfe", E::BadValue { key: "n", max: 253 }),
            (b"n=a;n=b", E::Repeated("n")),
            (b"ns=default", E::NoWorkload),
            (b"n=a;X-Y=z", E::Malformed(1)),
            (b"n=a;zz=\n", E::Malformed(1)),
        ];
        for (raw, want) in cases {
            assert_eq!(
                PeerMetadata::decode(raw),
                Err(want),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        // A newer peer's extra field is skipped.
        let meta = PeerMetadata::decode(b"n=a;ns=b;zone=eu-1").unwrap();
        assert_eq!(meta.workload.as_deref(), Some("a"));
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics() {
        // A fixed-seed walk over short byte strings built from the interesting bytes.
        let alphabet = b"n=;sapv.c_-\xff\x00 A9";
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 24) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| alphabet[((seed >> (i % 8 * 8)) as usize + i) % alphabet.len()])
                .collect();
            let _ = PeerMetadata::decode(&bytes);
        }
    }

    #[test]
    fn the_interner_is_bounded() {
        let interner = PeerInterner::default();
        let a = interner.get(b"n=a").unwrap();
        assert!(Arc::ptr_eq(&a, &interner.get(b"n=a").unwrap()));
        assert!(interner.get(b"garbage").is_none());
        assert_eq!(interner.len(), 1);
        for i in 1..MAX_PEERS {
            assert!(interner.get(format!("n=w{i}").as_bytes()).is_some());
        }
        assert_eq!(interner.len(), MAX_PEERS);
        assert!(interner.get(b"n=one-too-many").is_none());
        assert!(interner.get(b"n=a").is_some(), "known peers still resolve");
        assert_eq!(interner.len(), MAX_PEERS);
    }
}
