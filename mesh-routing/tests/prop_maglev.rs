//! Maglev (Eisenbud et al., NSDI 2016) as the paper describes it, as properties over
//! generated endpoint sets of 4 to 20 addresses with Envoy's and Istio's table size, 65537.
//! (Adding an endpoint is covered in `balance_hashing.rs`; this file covers removal,
//! order independence and balance.) Every slot of the table is checked, not a sample of
//! keys: `lookup(h)` reads slot `h mod M`, so `h` in `0..M` visits each slot once.
//!
//! - Removal: the slots of the removed endpoint all move (to surviving endpoints), and
//!   few slots of the others move. Maglev is not strictly minimally disruptive (paper,
//!   §3.4): removing a backend shifts the round-robin claim order, so some entries change
//!   hands between survivors. The paper reports that churn as small next to the removed
//!   backend's share, shrinking as `M / N` grows, without a closed-form bound (it
//!   recommends `M > 100 × N`; here `M / N ≥ 3276`). So this measures and asserts only a
//!   loose ceiling: at most 5% of the other slots (`MAX_OTHERS_MOVED`), about four times
//!   the largest share seen over 400 random sets of 4 to 20 endpoints (1.13%, mean 0.26%).
//!   The largest fraction of a run is printed (`--nocapture`).
//! - Order: the table depends on the set of endpoints, not on the order they are listed
//!   in, so proxies listing the same endpoints differently send every key to the same one
//!   (as `Maglev`'s docs promise; nodes claim slots in address order).
//! - Balance: with equal weights the population loop hands out one slot per endpoint per
//!   turn, so each endpoint owns `⌊M/N⌋` or `⌈M/N⌉` slots.

#![allow(clippy::unwrap_used)]

use std::sync::Mutex;

use mesh_routing::balance::Maglev;
use proptest::prelude::*;

const M: u64 = 65537;
/// The largest share of surviving endpoints' slots a removal may move.
const MAX_OTHERS_MOVED: f64 = 0.05;

/// The largest fraction of other endpoints' slots seen moving, for the report.
static MAX_SEEN: Mutex<(f64, usize)> = Mutex::new((0.0, 0));

/// `n` distinct `ip:port` addresses.
fn addresses(n: std::ops::Range<usize>) -> impl Strategy<Value = Vec<String>> {
    n.prop_flat_map(|n| {
        proptest::collection::hash_set((any::<[u8; 4]>(), 1024u16..), n).prop_map(|set| {
            set.into_iter()
                .map(|(ip, port)| std::net::SocketAddr::from((ip, port)).to_string())
                .collect()
        })
    })
}

fn build(ids: &[String]) -> Maglev {
    Maglev::new(ids.iter().map(|s| (s.as_str(), 1)), M)
}

/// The address owning each slot.
fn owners<'a>(table: &Maglev, ids: &'a [String]) -> Vec<&'a str> {
    assert_eq!(table.len() as u64, M);
    (0..M)
        .map(|h| ids[table.lookup(h).unwrap()].as_str())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        // Reproducible: the same endpoint sets on every run.
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x6d61_676c_6576_0002),
        ..ProptestConfig::default()
    })]

    /// Removing one endpoint moves all of its slots and at most 5% of the others'.
    #[test]
    fn removal_moves_the_removed_endpoints_slots_and_few_others(
        ids in addresses(4..21),
        gone in any::<prop::sample::Index>(),
    ) {
        let gone = gone.index(ids.len());
        let rest: Vec<String> = ids.iter().enumerate()
            .filter(|(i, _)| *i != gone).map(|(_, s)| s.clone()).collect();
        let before = owners(&build(&ids), &ids);
        let after = owners(&build(&rest), &rest);
        let (mut others, mut others_moved) = (0usize, 0usize);
        for (b, a) in before.iter().zip(&after) {
            if *b == ids[gone] {
                prop_assert_ne!(*a, ids[gone].as_str());
            } else {
                others += 1;
                others_moved += usize::from(a != b);
            }
        }
        let fraction = others_moved as f64 / others as f64;
        {
            let mut max = MAX_SEEN.lock().unwrap();
            if fraction > max.0 {
                *max = (fraction, ids.len());
                println!("removal from {} endpoints moved {:.3}% of the others' slots", ids.len(), fraction * 100.0);
            }
        }
        prop_assert!(
            fraction <= MAX_OTHERS_MOVED,
            "removing 1 of {} moved {} of {} other slots ({:.2}%)",
            ids.len(), others_moved, others, fraction * 100.0
        );
    }

    /// The same endpoints in another order give a table that sends every slot to the same
    /// address.
    #[test]
    fn tables_depend_on_the_set_not_its_order(
        (ids, other) in addresses(4..21)
            .prop_flat_map(|ids| (Just(ids.clone()), Just(ids).prop_shuffle())),
    ) {
        let (a, b) = (owners(&build(&ids), &ids), owners(&build(&other), &other));
        let differ: Vec<usize> = (0..a.len()).filter(|&h| a[h] != b[h]).collect();
        prop_assert!(
            differ.is_empty(),
            "{} of {} slots differ; slot {}: {} vs {}",
            differ.len(), M, differ[0], a[differ[0]], b[differ[0]]
        );
    }

    /// Each of `N` equally weighted endpoints owns `⌊M/N⌋` or `⌈M/N⌉` slots.
    #[test]
    fn equal_weights_share_slots_within_one(ids in addresses(1..21)) {
        let table = build(&ids);
        let mut counts = vec![0u64; ids.len()];
        for h in 0..M {
            counts[table.lookup(h).unwrap()] += 1;
        }
        let n = ids.len() as u64;
        for (id, c) in ids.iter().zip(&counts) {
            prop_assert!(
                (M / n..=M.div_ceil(n)).contains(c),
                "{} owns {} slots of {} ({} endpoints)", id, c, M, n
            );
        }
    }
}

/// The smallest case where claim order would show: two endpoints, a 7-slot table.
#[test]
fn order_matters_minimal_case() {
    let (a, b) = ("10.0.0.1:80", "10.0.0.2:80");
    let ab = Maglev::new([(a, 1), (b, 1)], 7);
    let ba = Maglev::new([(b, 1), (a, 1)], 7);
    for slot in 0..7 {
        let x = [a, b][ab.lookup(slot).unwrap()];
        let y = [b, a][ba.lookup(slot).unwrap()];
        assert_eq!(x, y, "slot {slot}");
    }
}

/// Lookups are a pure function of the table: building twice gives the same owner for
/// every slot, and an empty set has no owner.
#[test]
fn lookups_are_deterministic() {
    let ids: Vec<String> = (1..=7).map(|i| format!("10.0.0.{i}:8080")).collect();
    assert_eq!(owners(&build(&ids), &ids), owners(&build(&ids), &ids));
    assert!(Maglev::new(std::iter::empty(), M).lookup(42).is_none());
}
