//! Consistent hashing: Maglev's disruption bounds as properties, and cookie affinity through
//! the layer.

mod balance_support;

use balance_support::*;
use http::header::{COOKIE, SET_COOKIE};
use mesh_core::config::Duration as ConfigDuration;
use mesh_core::config::networking::{ConsistentHashLb, HttpCookie};
use mesh_core::conn::ClientInfo;
use mesh_routing::balance::{Maglev, RingHash, hash_key};
use proptest::prelude::*;
use tower::ServiceExt;

const KEYS: u64 = 10_000;

fn owners(table: &Maglev) -> Vec<usize> {
    (0..KEYS)
        .map(|k| {
            table
                .lookup(hash_key(k.to_le_bytes()))
                .expect("a non-empty table")
        })
        .collect()
}

/// Five distinct `ip:port` addresses.
fn addresses() -> impl Strategy<Value = Vec<String>> {
    proptest::collection::hash_set((any::<[u8; 4]>(), 1024u16..), 5).prop_map(|set| {
        set.into_iter()
            .map(|(ip, port)| std::net::SocketAddr::from((ip, port)).to_string())
            .collect()
    })
}

proptest! {
    // A fixed seed: the same 64 generated endpoint sets on every run, so CI never fails on a
    // draw nobody can reproduce (a failure prints the set).
    #![proptest_config(ProptestConfig {
        cases: 64,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x6d61676c6576),
        ..ProptestConfig::default()
    })]

    /// Adding a fifth endpoint to four moves at most a quarter of the keys (a fifth is the
    /// ideal), nearly all of them to the new endpoint: Maglev's permutation-filled table
    /// moves around 1% between old endpoints (1.13% was seen on one random set), so 2%.
    #[test]
    fn maglev_adding_an_endpoint_moves_at_most_a_quarter(ids in addresses()) {
        let nodes: Vec<(&str, u32)> = ids.iter().map(|s| (s.as_str(), 1)).collect();
        let four = owners(&Maglev::new(nodes[..4].iter().copied(), 65537));
        let five = owners(&Maglev::new(nodes.iter().copied(), 65537));
        let moved = four.iter().zip(&five).filter(|(a, b)| a != b).count();
        let elsewhere = four.iter().zip(&five).filter(|(a, b)| a != b && **b != 4).count();
        prop_assert!(moved as u64 <= KEYS / 4, "{} of {} keys moved", moved, KEYS);
        prop_assert!(elsewhere as u64 <= KEYS / 50, "{} keys moved between old endpoints", elsewhere);
    }

    /// Removing an endpoint moves every one of its keys, and (Maglev not being strictly
    /// minimal) at most 2 % of the others'.
    #[test]
    fn maglev_removing_an_endpoint_moves_its_keys(ids in addresses(), gone in 0usize..5) {
        let nodes: Vec<(&str, u32)> = ids.iter().map(|s| (s.as_str(), 1)).collect();
        let rest: Vec<(&str, u32)> = nodes.iter().enumerate()
            .filter(|(i, _)| *i != gone).map(|(_, n)| *n).collect();
        let before = owners(&Maglev::new(nodes.iter().copied(), 65537));
        let after = owners(&Maglev::new(rest.iter().copied(), 65537));
        let mut others_moved = 0;
        for (b, a) in before.iter().zip(&after) {
            let a_id = rest[*a].0;
            if *b == gone {
                prop_assert_ne!(a_id, nodes[gone].0);
            } else if a_id != nodes[*b].0 {
                others_moved += 1;
            }
        }
        prop_assert!(others_moved as u64 <= KEYS / 50, "{} keys of remaining endpoints moved", others_moved);
    }

    /// Ring hash (Envoy's construction) moves more: the old endpoints lose points too.
    #[test]
    fn ring_hash_adding_an_endpoint_moves_under_forty_percent(ids in addresses()) {
        let nodes: Vec<(&str, u32)> = ids.iter().map(|s| (s.as_str(), 1)).collect();
        let lookup = |ring: &RingHash| -> Vec<usize> {
            (0..KEYS).map(|k| ring.lookup(hash_key(k.to_le_bytes())).expect("a ring")).collect()
        };
        let four = lookup(&RingHash::new(nodes[..4].iter().copied(), 1024));
        let five = lookup(&RingHash::new(nodes.iter().copied(), 1024));
        let moved = four.iter().zip(&five).filter(|(a, b)| a != b).count();
        prop_assert!(moved as u64 <= KEYS * 2 / 5, "{} of {} keys moved", moved, KEYS);
    }

    /// The same set in another order builds a table that sends every key to the same
    /// address: proxies that list endpoints differently still agree.
    #[test]
    fn tables_depend_on_the_set_not_its_order(ids in addresses()) {
        let nodes: Vec<(&str, u32)> = ids.iter().map(|s| (s.as_str(), 1)).collect();
        let mut reversed = nodes.clone();
        reversed.reverse();
        let ring = RingHash::new(nodes.iter().copied(), 1024);
        let ring_rev = RingHash::new(reversed.iter().copied(), 1024);
        for k in 0..1_000u64 {
            let h = hash_key(k.to_le_bytes());
            prop_assert_eq!(nodes[ring.lookup(h).unwrap()].0, reversed[ring_rev.lookup(h).unwrap()].0);
        }
    }
}

fn cookie_lb(ttl: Option<u64>) -> mesh_core::config::networking::LoadBalancerSettings {
    consistent(
        ConsistentHashLb {
            http_cookie: Some(HttpCookie {
                name: "session".into(),
                path: Some("/".into()),
                ttl: ttl.map(ConfigDuration::from_secs),
                attributes: vec![],
            }),
            ..Default::default()
        },
        false,
    )
}

#[tokio::test(start_paused = true)]
async fn cookie_hashing_sets_the_cookie_and_honours_it() {
    let h = Harness::new(endpoints(5), Backend::default());
    let t = target(Some(cookie_lb(Some(3600))), None);
    for client in 0..20u8 {
        let mut req = request(&t);
        req.extensions_mut().insert(ClientInfo {
            remote: ([192, 168, 1, client], 40_000).into(),
            local: ([127, 0, 0, 1], 15001).into(),
            tls: false,
        });
        let resp = h.svc.clone().oneshot(req).await.unwrap();
        let first = endpoint_of(&resp).unwrap();
        let set = resp.headers().get(SET_COOKIE).expect("a generated cookie");
        let set = set.to_str().unwrap();
        assert!(set.ends_with("; Max-Age=3600; Path=/; HttpOnly"), "{set}");
        let pair = set.split(';').next().unwrap();

        // The client sends it back: every request lands where the first one did.
        for _ in 0..10 {
            let mut req = request(&t);
            req.headers_mut()
                .insert(COOKIE, format!("theme=dark; {pair}").parse().unwrap());
            let resp = h.svc.clone().oneshot(req).await.unwrap();
            assert_eq!(endpoint_of(&resp).unwrap(), first, "{pair}");
            assert!(resp.headers().get(SET_COOKIE).is_none());
        }
    }
}

#[tokio::test(start_paused = true)]
async fn cookies_are_honoured_without_ttl_but_not_generated() {
    let h = Harness::new(endpoints(5), Backend::default());
    let t = target(Some(cookie_lb(None)), None);
    let resp = h.svc.clone().oneshot(request(&t)).await.unwrap();
    assert!(resp.headers().get(SET_COOKIE).is_none());
    let with_cookie = || {
        let mut req = request(&t);
        req.headers_mut()
            .insert(COOKIE, "session=abc".parse().unwrap());
        req
    };
    let first = h.send(with_cookie()).await.unwrap();
    for _ in 0..20 {
        assert_eq!(h.send(with_cookie()).await.unwrap(), first);
    }
}
