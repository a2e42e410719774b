//! `Registration` against a real etcd: a key under a lease that lives while the registration
//! does.

use std::time::{Duration, Instant};

use anyhow::Context;
use mesh_discovery::etcd::{Registration, ResourceKey};
use mesh_discovery::testing::EtcdServer;
use tokio::sync::watch;

const TTL: Duration = Duration::from_secs(2);

fn workload() -> ResourceKey {
    ResourceKey::new(
        "networking.istio.io",
        "WorkloadEntry",
        "default",
        "reviews-1",
    )
}

fn etcd_key() -> String {
    workload().etcd_key("/mesh")
}

/// The key's value and lease id, if it exists.
async fn read(client: &mut etcd_client::Client) -> anyhow::Result<Option<(String, i64)>> {
    let response = client.get(etcd_key(), None).await?;
    Ok(match response.kvs().first() {
        Some(kv) => Some((kv.value_str()?.to_owned(), kv.lease())),
        None => None,
    })
}

/// Polls until the key's state satisfies `check`, for at most `within`.
async fn read_until(
    client: &mut etcd_client::Client,
    within: Duration,
    what: &str,
    check: impl Fn(&Option<(String, i64)>) -> bool,
) -> anyhow::Result<Option<(String, i64)>> {
    let deadline = Instant::now() + within;
    loop {
        let state = read(client).await?;
        if check(&state) {
            return Ok(state);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("{what} not seen within {within:?}; the key is {state:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn has_value(value: &'static str) -> impl Fn(&Option<(String, i64)>) -> bool {
    move |state| state.as_ref().is_some_and(|(v, _)| v == value)
}

fn is_gone(state: &Option<(String, i64)>) -> bool {
    state.is_none()
}

#[tokio::test]
async fn kept_alive_updated_and_expiring_after_drop() -> anyhow::Result<()> {
    let server = EtcdServer::start().await?;
    let mut client = server.client().await?;
    let (value, value_rx) = watch::channel(Some("address: 10.0.0.1".to_owned()));
    let registration = Registration::spawn(server.options("/mesh"), workload(), TTL, value_rx);

    let (_, lease) = read_until(
        &mut client,
        Duration::from_secs(2),
        "the entry",
        has_value("address: 10.0.0.1"),
    )
    .await?
    .context("present")?;
    assert_ne!(lease, 0, "the key is under a lease");

    // Kept alive well past one TTL.
    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    assert_eq!(
        read(&mut client).await?,
        Some(("address: 10.0.0.1".to_owned(), lease))
    );

    // A new value is re-put under the same lease.
    value.send_replace(Some("address: 10.0.0.2".to_owned()));
    let updated = read_until(
        &mut client,
        Duration::from_secs(1),
        "the new value",
        has_value("address: 10.0.0.2"),
    )
    .await?;
    assert_eq!(updated.map(|(_, lease)| lease), Some(lease));

    // Dropped without withdraw (as if the proxy died): gone after about one TTL, not at once.
    let dropped = Instant::now();
    drop(registration);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        read(&mut client).await?.is_some(),
        "expires with its lease, not at once"
    );
    read_until(&mut client, TTL + Duration::from_secs(2), "expiry", is_gone).await?;
    assert!(dropped.elapsed() >= Duration::from_secs(1));
    Ok(())
}

#[tokio::test]
async fn withdraw_removes_the_key_at_once() -> anyhow::Result<()> {
    let server = EtcdServer::start().await?;
    let mut client = server.client().await?;
    let (_value, value_rx) = watch::channel(Some("address: 10.0.0.1".to_owned()));
    let registration = Registration::spawn(server.options("/mesh"), workload(), TTL, value_rx);
    read_until(
        &mut client,
        Duration::from_secs(2),
        "the entry",
        has_value("address: 10.0.0.1"),
    )
    .await?;

    let started = Instant::now();
    registration.withdraw().await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(read(&mut client).await?, None);
    Ok(())
}

#[tokio::test]
async fn none_withdraws_and_some_publishes_again() -> anyhow::Result<()> {
    let server = EtcdServer::start().await?;
    let mut client = server.client().await?;
    let (value, value_rx) = watch::channel(None);
    let _registration = Registration::spawn(server.options("/mesh"), workload(), TTL, value_rx);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        read(&mut client).await?,
        None,
        "nothing published while None"
    );

    value.send_replace(Some("ready: true".to_owned()));
    let (_, first_lease) = read_until(
        &mut client,
        Duration::from_secs(2),
        "the entry",
        has_value("ready: true"),
    )
    .await?
    .context("present")?;

    value.send_replace(None);
    read_until(&mut client, Duration::from_secs(1), "withdrawal", is_gone).await?;
    let leases = client.leases().await?;
    assert!(
        leases
            .leases()
            .iter()
            .all(|lease| lease.id() != first_lease),
        "the lease is revoked, not left to expire"
    );

    value.send_replace(Some("ready: again".to_owned()));
    read_until(
        &mut client,
        Duration::from_secs(2),
        "republished entry",
        has_value("ready: again"),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_lease_revoked_behind_its_back_is_granted_again() -> anyhow::Result<()> {
    let server = EtcdServer::start().await?;
    let mut client = server.client().await?;
    let (_value, value_rx) = watch::channel(Some("address: 10.0.0.1".to_owned()));
    let _registration = Registration::spawn(server.options("/mesh"), workload(), TTL, value_rx);
    let (_, lease) = read_until(
        &mut client,
        Duration::from_secs(2),
        "the entry",
        has_value("address: 10.0.0.1"),
    )
    .await?
    .context("present")?;

    // What etcd does to a lease that expired: revoke it and its key.
    client.lease_revoke(lease).await?;
    let (_, new_lease) = read_until(
        &mut client,
        TTL + Duration::from_secs(2),
        "the entry under a new lease",
        |state| state.as_ref().is_some_and(|(_, l)| *l != lease),
    )
    .await?
    .context("present")?;
    assert_ne!(new_lease, 0);
    Ok(())
}

#[tokio::test]
async fn survives_etcd_down_longer_than_the_ttl() -> anyhow::Result<()> {
    let mut server = EtcdServer::start().await?;
    let (_value, value_rx) = watch::channel(Some("address: 10.0.0.1".to_owned()));
    let _registration = Registration::spawn(server.options("/mesh"), workload(), TTL, value_rx);
    let lease = {
        let mut client = server.client().await?;
        let (_, lease) = read_until(
            &mut client,
            Duration::from_secs(2),
            "the entry",
            has_value("address: 10.0.0.1"),
        )
        .await?
        .context("present")?;
        lease
    };

    server.kill();
    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    server.restart().await?;
    // etcd extends surviving leases on restart; revoke this one at once, as if it had run out
    // while etcd was away, so that coming back means finding the lease gone.
    let mut client = server.client().await?;
    let _ = client.lease_revoke(lease).await;
    let (_, new_lease) = read_until(
        &mut client,
        Duration::from_secs(8),
        "the entry under a new lease after the restart",
        |state| state.as_ref().is_some_and(|(_, l)| *l != lease && *l != 0),
    )
    .await?
    .context("present")?;

    // And kept alive from then on.
    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    assert_eq!(
        read(&mut client).await?,
        Some(("address: 10.0.0.1".to_owned(), new_lease))
    );
    Ok(())
}
