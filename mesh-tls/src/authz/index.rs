//! [`PolicySet`]: one action's policies in config order, with an index of them by the peer
//! principal they require, so that evaluation checks only the policies that can match.
//!
//! Most policies name their callers (`principals`, `source.principal`). Each policy's
//! [`principal gate`](CompiledPolicy::principal_gate) — patterns one of which the peer's
//! principal must match for the policy to match at all — is filed under each of its patterns:
//! exact principals in a hash map, prefixes and suffixes in hash maps keyed by the pattern
//! (looked up once per distinct pattern length, on that many leading or trailing bytes of
//! the principal), `*` in a list for any peer. Policies without a gate are always checked.
//! Every list holds policy positions in increasing order.
//!
//! A request's candidates are the union of the lists its principal selects, plus the
//! ungated list: every policy that can match is in it (a policy that matches satisfies its
//! gate, so it was filed under a pattern its principal matches). The first matching policy
//! is found without merging the lists: each list is walked in order until a policy matches
//! or the position reaches the best match so far, and the smallest position wins. A policy
//! before the first match never matches, so every walk reaches the first match unless it was
//! already found; the reported policy is the same as a scan of every policy in config order.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::AuthzRequest;
use super::compile::{CompiledPolicy, Peer};
use super::matcher::StrMatch;

/// Positions of policies in their [`PolicySet`], in increasing order.
type Positions = Box<[usize]>;

/// Byte-string keys (principals and pieces of them) to the policies filed under them.
type ByBytes = HashMap<Box<[u8]>, Vec<usize>, BuildHasherDefault<BytesHasher>>;

/// The policies of one action, in config order, and their principal index.
#[derive(Debug, Default)]
pub(crate) struct PolicySet {
    policies: Vec<CompiledPolicy>,
    /// Policies that can match without a positive principal test.
    ungated: Positions,
    /// Policies with a `*` principal: any peer with an identity.
    any_peer: Positions,
    exact: ByBytes,
    prefix: ByBytes,
    suffix: ByBytes,
    /// The distinct key lengths of `prefix` and `suffix`, ascending.
    prefix_lens: Box<[usize]>,
    suffix_lens: Box<[usize]>,
}

impl PolicySet {
    /// Indexes `policies`, keeping their order.
    pub(crate) fn new(policies: Vec<CompiledPolicy>) -> PolicySet {
        let mut ungated = Vec::new();
        let mut any_peer = Vec::new();
        let mut exact = ByBytes::default();
        let mut prefix = ByBytes::default();
        let mut suffix = ByBytes::default();
        for (pos, policy) in policies.iter().enumerate() {
            let Some(gate) = policy.principal_gate() else {
                ungated.push(pos);
                continue;
            };
            for pattern in gate {
                let list = match pattern {
                    StrMatch::Any => &mut any_peer,
                    StrMatch::Exact(p) => exact.entry(p.clone()).or_default(),
                    StrMatch::Prefix(p) => prefix.entry(p.clone()).or_default(),
                    StrMatch::Suffix(p) => suffix.entry(p.clone()).or_default(),
                };
                // Positions are pushed in increasing order; a policy naming the same
                // pattern twice is filed once.
                if list.last() != Some(&pos) {
                    list.push(pos);
                }
            }
        }
        let lens = |map: &ByBytes| -> Box<[usize]> {
            let mut lens: Vec<usize> = map.keys().map(|k| k.len()).collect();
            lens.sort_unstable();
            lens.dedup();
            lens.into()
        };
        let prefix_lens = lens(&prefix);
        let suffix_lens = lens(&suffix);
        PolicySet {
            ungated: ungated.into(),
            any_peer: any_peer.into(),
            exact,
            prefix,
            suffix,
            prefix_lens,
            suffix_lens,
            policies,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.policies.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The first policy, in config order, that matches; see the module docs.
    pub(crate) fn first_match(
        &self,
        req: &AuthzRequest<'_>,
        peer: &Peer<'_>,
        allow: bool,
    ) -> Option<&CompiledPolicy> {
        if self.policies.is_empty() {
            return None;
        }
        // `best` is always a matching position (or past the end), so no position before
        // the first match is ever skipped.
        let mut best = self.policies.len();
        let mut walk = |list: &[usize]| {
            for &pos in list {
                if pos >= best {
                    return;
                }
                if self
                    .policies
                    .get(pos)
                    .is_some_and(|p| p.matches(req, peer, allow))
                {
                    best = pos;
                    return;
                }
            }
        };
        walk(&self.ungated);
        if let Some(principal) = peer.principal() {
            walk(&self.any_peer);
            if let Some(list) = self.exact.get(principal) {
                walk(list);
            }
            for &len in &self.prefix_lens {
                let Some(head) = principal.get(..len) else {
                    // Longer prefixes do not fit either.
                    break;
                };
                if let Some(list) = self.prefix.get(head) {
                    walk(list);
                }
            }
            for &len in &self.suffix_lens {
                let Some(tail) = principal
                    .len()
                    .checked_sub(len)
                    .and_then(|start| principal.get(start..))
                else {
                    break;
                };
                if let Some(list) = self.suffix.get(tail) {
                    walk(list);
                }
            }
        }
        self.policies.get(best)
    }

    /// The first match by a scan of every policy, without the index (tests compare).
    #[cfg(test)]
    pub(crate) fn scan_first_match(
        &self,
        req: &AuthzRequest<'_>,
        peer: &Peer<'_>,
        allow: bool,
    ) -> Option<&CompiledPolicy> {
        self.policies.iter().find(|p| p.matches(req, peer, allow))
    }

    /// How many policies are checked on every request, whatever the peer (tests).
    #[cfg(test)]
    pub(crate) fn ungated_len(&self) -> usize {
        self.ungated.len()
    }
}

/// A fast hash for the index's byte-string keys, 8 bytes a step (FxHash's mixing, with a
/// final avalanche for the bits `HashMap` takes its buckets from). Not DoS-resistant, and
/// need not be: the keys are the operator's policies, and a request only looks one up.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BytesHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl BytesHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for BytesHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // murmur3's fmix64.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}
