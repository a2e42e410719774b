//! Which algorithm picks the endpoint: compiled from a DestinationRule's
//! `trafficPolicy.loadBalancer`.

use mesh_core::config::networking::{ConsistentHashLb, HttpCookie, LoadBalancerSettings, SimpleLb};
use serde::Serialize;

use super::warmup::Warmup;

/// Envoy's (and Istio's) default minimum ring size for ring hash.
pub const DEFAULT_MIN_RING_SIZE: u64 = 1024;
/// Envoy's upper bound on the number of ring entries (`maximum_ring_size`).
pub const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;
/// Envoy's (and Istio's) default Maglev table size, a prime.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u64 = 65537;
/// Envoy's upper bound on the Maglev table size.
pub const MAX_MAGLEV_TABLE_SIZE: u64 = 5_000_011;

/// A load-balancing algorithm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Policy {
    /// Power of two choices over peak-EWMA latency × in-flight requests (Linkerd's balancer);
    /// what a DestinationRule without `loadBalancer.simple` (or with `UNSPECIFIED`) gets.
    #[default]
    PeakEwma,
    /// Power of two choices over in-flight requests (Envoy's `LEAST_REQUEST`, choice count 2).
    LeastRequest,
    /// Envoy's round robin: a rotating index when weights are equal, earliest-deadline-first
    /// over `1 / weight` otherwise.
    RoundRobin,
    /// A weighted random endpoint.
    Random,
    /// Consistent hashing on a ring of `xxHash64(address_i)` points.
    RingHash { minimum_ring_size: u64 },
    /// Consistent hashing through a Maglev lookup table of `table_size` (prime) entries.
    Maglev { table_size: u64 },
}

impl Policy {
    /// The name shown in `/clusters`.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::PeakEwma => "PEAK_EWMA",
            Policy::LeastRequest => "LEAST_REQUEST",
            Policy::RoundRobin => "ROUND_ROBIN",
            Policy::Random => "RANDOM",
            Policy::RingHash { .. } => "RING_HASH",
            Policy::Maglev { .. } => "MAGLEV",
        }
    }

    /// Whether the policy consults a hash table (and a request hash key).
    pub fn is_hash(self) -> bool {
        matches!(self, Policy::RingHash { .. } | Policy::Maglev { .. })
    }

    /// Whether slow start applies (Envoy: round robin and least request; our default is the
    /// least-request family too).
    pub(crate) fn supports_warmup(self) -> bool {
        matches!(
            self,
            Policy::PeakEwma | Policy::LeastRequest | Policy::RoundRobin
        )
    }

    /// The algorithm a DestinationRule's `loadBalancer` asks for.
    ///
    /// `consistentHash` wins over `simple` (Istio's `lbPolicy` is a oneof). `PASSTHROUGH`
    /// needs the caller's original destination, which the balancer does not know yet: it
    /// balances as `RANDOM`. `LEAST_CONN` is the deprecated spelling of `LEAST_REQUEST`.
    pub fn from_settings(lb: &LoadBalancerSettings) -> Policy {
        if let Some(hash) = &lb.consistent_hash {
            return Policy::from_consistent_hash(hash);
        }
        match lb.simple {
            None | Some(SimpleLb::Unspecified) => Policy::PeakEwma,
            Some(SimpleLb::LeastRequest | SimpleLb::LeastConn) => Policy::LeastRequest,
            Some(SimpleLb::RoundRobin) => Policy::RoundRobin,
            Some(SimpleLb::Random | SimpleLb::Passthrough) => Policy::Random,
        }
    }

    /// Maglev when `maglev` is set, else a ring (Istio's default), sized by `ringHash` or the
    /// deprecated top-level `minimumRingSize`.
    fn from_consistent_hash(hash: &ConsistentHashLb) -> Policy {
        if let Some(maglev) = &hash.maglev {
            let size = maglev.table_size.unwrap_or(DEFAULT_MAGLEV_TABLE_SIZE);
            return Policy::Maglev {
                table_size: maglev_table_size(size),
            };
        }
        let min = hash
            .ring_hash
            .as_ref()
            .and_then(|r| r.minimum_ring_size)
            .or(hash.minimum_ring_size)
            .filter(|&n| n > 0)
            .unwrap_or(DEFAULT_MIN_RING_SIZE);
        Policy::RingHash {
            minimum_ring_size: min.min(MAX_RING_SIZE),
        }
    }
}

/// A usable Maglev table size: the smallest prime ≥ `size` (Envoy rejects non-primes; we
/// round up rather than fail a request), at least 2 and at most Envoy's maximum.
pub(crate) fn maglev_table_size(size: u64) -> u64 {
    let mut n = size.clamp(2, MAX_MAGLEV_TABLE_SIZE);
    while !is_prime(n) {
        n += 1;
    }
    n
}

fn is_prime(n: u64) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Everything the balancing layer needs from `loadBalancer`, borrowed from the compiled
/// config so that resolving it per request allocates nothing.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Resolved<'a> {
    pub(crate) lb: Lb,
    pub(crate) hash_on: HashOn<'a>,
}

/// An algorithm with its slow-start setting.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Lb {
    pub(crate) policy: Policy,
    /// Only set for policies that support slow start.
    pub(crate) warmup: Option<Warmup>,
}

impl Lb {
    pub(crate) fn new(policy: Policy, warmup: Option<Warmup>) -> Lb {
        Lb {
            policy,
            warmup: warmup.filter(|_| policy.supports_warmup()),
        }
    }
}

/// What a consistent-hash policy hashes (Istio's `consistentHash.hashKey` oneof).
#[derive(Clone, Copy, Debug)]
pub(crate) enum HashOn<'a> {
    Header(&'a str),
    Cookie(&'a HttpCookie),
    SourceIp,
    QueryParameter(&'a str),
    /// A consistent-hash policy without a key, or a policy that does not hash.
    Nothing,
}

pub(crate) fn resolve(lb: Option<&LoadBalancerSettings>) -> Resolved<'_> {
    let Some(lb) = lb else {
        return Resolved {
            lb: Lb::default(),
            hash_on: HashOn::Nothing,
        };
    };
    let hash_on = match &lb.consistent_hash {
        Some(h) => {
            if let Some(name) = &h.http_header_name {
                HashOn::Header(name)
            } else if let Some(cookie) = &h.http_cookie {
                HashOn::Cookie(cookie)
            } else if h.use_source_ip == Some(true) {
                HashOn::SourceIp
            } else if let Some(name) = &h.http_query_parameter_name {
                HashOn::QueryParameter(name)
            } else {
                HashOn::Nothing
            }
        }
        None => HashOn::Nothing,
    };
    Resolved {
        lb: Lb::new(Policy::from_settings(lb), Warmup::from_settings(lb)),
        hash_on,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::networking::{MagLev, RingHash};

    #[test]
    fn simple_policies_map_to_algorithms() {
        let mut lb = LoadBalancerSettings::default();
        assert_eq!(Policy::from_settings(&lb), Policy::PeakEwma);
        for (simple, policy) in [
            (SimpleLb::Unspecified, Policy::PeakEwma),
            (SimpleLb::LeastConn, Policy::LeastRequest),
            (SimpleLb::LeastRequest, Policy::LeastRequest),
            (SimpleLb::RoundRobin, Policy::RoundRobin),
            (SimpleLb::Random, Policy::Random),
            (SimpleLb::Passthrough, Policy::Random),
        ] {
            lb.simple = Some(simple);
            assert_eq!(Policy::from_settings(&lb), policy);
        }
    }

    #[test]
    fn consistent_hash_defaults_to_a_1024_ring() {
        let mut lb = LoadBalancerSettings {
            consistent_hash: Some(ConsistentHashLb {
                http_header_name: Some("x-user".into()),
                ..Default::default()
            }),
            simple: Some(SimpleLb::RoundRobin),
            ..Default::default()
        };
        assert_eq!(
            Policy::from_settings(&lb),
            Policy::RingHash {
                minimum_ring_size: 1024
            }
        );
        let hash = lb.consistent_hash.as_mut().unwrap();
        hash.minimum_ring_size = Some(10);
        assert_eq!(
            Policy::from_settings(&lb),
            Policy::RingHash {
                minimum_ring_size: 10
            }
        );
        let hash = lb.consistent_hash.as_mut().unwrap();
        hash.ring_hash = Some(RingHash {
            minimum_ring_size: Some(2048),
        });
        assert_eq!(
            Policy::from_settings(&lb),
            Policy::RingHash {
                minimum_ring_size: 2048
            }
        );
        let hash = lb.consistent_hash.as_mut().unwrap();
        hash.maglev = Some(MagLev::default());
        assert_eq!(
            Policy::from_settings(&lb),
            Policy::Maglev { table_size: 65537 }
        );
        assert!(matches!(
            resolve(Some(&lb)).hash_on,
            HashOn::Header("x-user")
        ));
    }

    #[test]
    fn maglev_sizes_round_up_to_primes() {
        assert_eq!(maglev_table_size(65537), 65537);
        assert_eq!(maglev_table_size(1000), 1009);
        assert_eq!(maglev_table_size(0), 2);
        assert_eq!(maglev_table_size(u64::MAX), MAX_MAGLEV_TABLE_SIZE);
        assert!(is_prime(MAX_MAGLEV_TABLE_SIZE));
    }
}
