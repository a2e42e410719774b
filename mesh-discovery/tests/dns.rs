//! The DNS provider against a tiny authoritative server on loopback.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, bail};
use mesh_discovery::dns::{DnsError, DnsProvider, DnsSettings, Resolved};
use mesh_discovery::testing::{DnsServer as TestDns, Mode};
use tokio::sync::watch;
use tokio::time::Instant;

/// Waits (up to `within`) until the answers satisfy `pred`, and returns them.
async fn wait_for(
    rx: &mut watch::Receiver<Resolved>,
    within: Duration,
    what: &str,
    pred: impl Fn(&Resolved) -> bool,
) -> anyhow::Result<Resolved> {
    let deadline = Instant::now() + within;
    loop {
        let current = rx.borrow_and_update().clone();
        if pred(&current) {
            return Ok(current);
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => bail!("provider stopped while waiting for {what}"),
            Err(_) => bail!("timed out after {within:?} waiting for {what}; last: {current:?}"),
        }
    }
}

fn v4(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, last)
}

fn ips(addrs: &[Ipv4Addr]) -> Vec<IpAddr> {
    addrs.iter().copied().map(IpAddr::V4).collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|name| (*name).to_owned()).collect()
}

const API: &str = "api.mesh.test";

#[tokio::test]
async fn resolves_a_name_through_the_configured_server() -> anyhow::Result<()> {
    let server = TestDns::start(30, &[(API, &[v4(10)])]).await?;
    let (_names_tx, names_rx) = watch::channel(names(&[API]));
    let provider = DnsProvider::spawn(
        server.settings(Duration::from_secs(1), Duration::from_secs(60)),
        names_rx,
    )?;
    let mut rx = provider.resolved();
    let answers = wait_for(&mut rx, Duration::from_secs(5), "the first answer", |r| {
        r.contains_key(API)
    })
    .await?;
    assert_eq!(answers.get(API), Some(&ips(&[v4(10)])));
    assert_eq!(answers.len(), 1, "{answers:?}");
    Ok(())
}

#[tokio::test]
async fn re_resolves_when_the_ttl_expires() -> anyhow::Result<()> {
    let server = TestDns::start(1, &[(API, &[v4(10)])]).await?;
    let (_names_tx, names_rx) = watch::channel(names(&[API]));
    let provider = DnsProvider::spawn(
        server.settings(Duration::from_secs(1), Duration::from_secs(2)),
        names_rx,
    )?;
    let mut rx = provider.resolved();
    wait_for(&mut rx, Duration::from_secs(5), "the first answer", |r| {
        r.get(API) == Some(&ips(&[v4(10)]))
    })
    .await?;

    // The same answer again, in any order, is not a change.
    server.set(API, &[v4(10), v4(10)]);
    let answered = server.seen(Mode::Answer);
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.seen(Mode::Answer) < answered + 2 {
        assert!(Instant::now() < deadline, "no re-resolution within 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!rx.has_changed()?, "an unchanged answer was published");

    // Unsorted and duplicated: reported sorted and deduplicated.
    server.set(API, &[v4(21), v4(20), v4(21)]);
    let answers = wait_for(&mut rx, Duration::from_secs(5), "the new answer", |r| {
        r.get(API) != Some(&ips(&[v4(10)]))
    })
    .await?;
    assert_eq!(answers.get(API), Some(&ips(&[v4(20), v4(21)])));
    Ok(())
}

#[tokio::test]
async fn keeps_the_last_good_answer_while_the_server_fails() -> anyhow::Result<()> {
    let server = TestDns::start(1, &[(API, &[v4(10)])]).await?;
    let (_names_tx, names_rx) = watch::channel(names(&[API]));
    // A 2 s ceiling also bounds each query attempt, so the silent phase stays short.
    let provider = DnsProvider::spawn(
        server.settings(Duration::from_secs(1), Duration::from_secs(2)),
        names_rx,
    )?;
    let mut rx = provider.resolved();
    let good = ips(&[v4(10)]);
    wait_for(&mut rx, Duration::from_secs(5), "the first answer", |r| {
        r.get(API) == Some(&good)
    })
    .await?;

    // Holds `good` until the server has seen `min_queries` in `mode` and `at_least` has passed.
    let hold = |mode: Mode, min_queries: usize, at_least: Duration| {
        let rx = rx.clone();
        let good = good.clone();
        let server = &server;
        async move {
            let start = Instant::now();
            let base = server.seen(mode);
            loop {
                let current = rx.borrow().clone();
                assert_eq!(current.get(API), Some(&good), "{mode:?}: answer lost");
                if server.seen(mode) >= base + min_queries && start.elapsed() >= at_least {
                    return;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(12),
                    "{mode:?}: only {} queries in 12 s",
                    server.seen(mode) - base
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    server.set_mode(Mode::ServFail);
    hold(Mode::ServFail, 2, Duration::from_secs(3)).await;
    server.set_mode(Mode::Silent);
    hold(Mode::Silent, 1, Duration::from_secs(2)).await;

    server.set(API, &[v4(30)]);
    server.set_mode(Mode::Answer);
    let answers = wait_for(&mut rx, Duration::from_secs(12), "recovery", |r| {
        r.get(API) == Some(&ips(&[v4(30)]))
    })
    .await?;
    assert_eq!(answers.len(), 1, "{answers:?}");
    Ok(())
}

#[tokio::test]
async fn follows_the_set_of_names() -> anyhow::Result<()> {
    let (a, b, c) = ("a.mesh.test", "b.mesh.test", "c.mesh.test");
    let server = TestDns::start(30, &[(a, &[v4(1)]), (b, &[v4(2)]), (c, &[v4(3)])]).await?;
    let (names_tx, names_rx) = watch::channel(names(&[a, b]));
    let provider = DnsProvider::spawn(
        server.settings(Duration::from_secs(1), Duration::from_secs(60)),
        names_rx,
    )?;
    let mut rx = provider.resolved();
    wait_for(&mut rx, Duration::from_secs(5), "a and b", |r| {
        r.contains_key(a) && r.contains_key(b)
    })
    .await?;

    names_tx.send_replace(names(&[b, c]));
    let answers = wait_for(&mut rx, Duration::from_secs(5), "a dropped, c added", |r| {
        !r.contains_key(a) && r.contains_key(c)
    })
    .await?;
    assert_eq!(answers.get(b), Some(&ips(&[v4(2)])));
    assert_eq!(answers.get(c), Some(&ips(&[v4(3)])));
    assert_eq!(answers.len(), 2, "{answers:?}");
    Ok(())
}

#[tokio::test]
async fn a_silent_name_does_not_delay_the_others() -> anyhow::Result<()> {
    // `a-slow` sorts first, so a one-name-at-a-time provider would block on it.
    let (slow, fast) = ("a-slow.mesh.test", "fast.mesh.test");
    let server = TestDns::start(30, &[(slow, &[v4(1)]), (fast, &[v4(2)])]).await?;
    server.stall(slow);
    let (_names_tx, names_rx) = watch::channel(names(&[slow, fast]));
    // A 60 s ceiling leaves the resolver's own 5 s per-attempt timeout for the silent name.
    let provider = DnsProvider::spawn(
        server.settings(Duration::from_secs(1), Duration::from_secs(60)),
        names_rx,
    )?;
    let mut rx = provider.resolved();
    let answers = wait_for(&mut rx, Duration::from_secs(2), "the fast name", |r| {
        r.contains_key(fast)
    })
    .await?;
    assert_eq!(answers.get(fast), Some(&ips(&[v4(2)])));
    assert!(!answers.contains_key(slow), "{answers:?}");
    Ok(())
}

#[tokio::test]
async fn localhost_resolves_through_the_system_configuration() -> anyhow::Result<()> {
    let (_names_tx, names_rx) = watch::channel(names(&["localhost"]));
    let provider = DnsProvider::spawn(DnsSettings::default(), names_rx)?;
    let mut rx = provider.resolved();
    let answers = wait_for(&mut rx, Duration::from_secs(5), "localhost", |r| {
        r.contains_key("localhost")
    })
    .await?;
    let addrs = answers.get("localhost").context("localhost missing")?;
    assert!(!addrs.is_empty());
    assert!(
        addrs.iter().all(IpAddr::is_loopback),
        "localhost resolved to {addrs:?}"
    );
    Ok(())
}

#[tokio::test]
async fn ip_literals_resolve_to_themselves_without_a_query() -> anyhow::Result<()> {
    let server = TestDns::start(30, &[]).await?;
    let literals = ["192.0.2.7", "::1", "2001:db8::1"];
    let (_names_tx, names_rx) = watch::channel(names(&literals));
    let provider = DnsProvider::spawn(
        server.settings(Duration::from_secs(1), Duration::from_secs(60)),
        names_rx,
    )?;
    let mut rx = provider.resolved();
    let answers = wait_for(&mut rx, Duration::from_secs(5), "the literals", |r| {
        r.len() == literals.len()
    })
    .await?;
    for literal in literals {
        let ip: IpAddr = literal.parse()?;
        assert_eq!(answers.get(literal), Some(&vec![ip]));
    }
    assert_eq!(server.seen_total(), 0, "an IP literal was queried");
    Ok(())
}

#[tokio::test]
async fn dropping_the_provider_closes_the_watch() -> anyhow::Result<()> {
    let (_names_tx, names_rx) = watch::channel(names(&["192.0.2.7"]));
    let provider = DnsProvider::spawn(
        DnsSettings {
            nameservers: vec![SocketAddr::from(([127, 0, 0, 1], 9))],
            ..DnsSettings::default()
        },
        names_rx,
    )?;
    let mut rx = provider.resolved();
    drop(provider);
    loop {
        match tokio::time::timeout(Duration::from_secs(5), rx.changed()).await {
            Ok(Ok(())) => continue,
            Ok(Err(_)) => return Ok(()),
            Err(_) => bail!("the watch stayed open after the provider was dropped"),
        }
    }
}

#[test]
fn rejects_a_zero_or_inverted_ttl_range() {
    let (_names_tx, names_rx) = watch::channel(BTreeSet::new());
    for (min_ttl, max_ttl) in [(0, 60), (10, 5)] {
        let settings = DnsSettings {
            min_ttl: Duration::from_secs(min_ttl),
            max_ttl: Duration::from_secs(max_ttl),
            ..DnsSettings::default()
        };
        let result = DnsProvider::spawn(settings, names_rx.clone());
        assert!(
            matches!(result, Err(DnsError::InvalidTtl { .. })),
            "{min_ttl}..{max_ttl}: {result:?}"
        );
    }
}

#[test]
fn spawning_outside_a_runtime_is_an_error() {
    let (_names_tx, names_rx) = watch::channel(BTreeSet::new());
    let result = DnsProvider::spawn(DnsSettings::default(), names_rx);
    assert!(matches!(result, Err(DnsError::NoRuntime)), "{result:?}");
}
