//! `ResourceWatch` against a real etcd: the first snapshot, live changes, resync after
//! compaction and after etcd was unreachable or restarted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mesh_discovery::etcd::{EtcdOptions, ResourceKey, ResourceStore, ResourceWatch, StoreSnapshot};
use mesh_discovery::testing::{EtcdServer, free_loopback_port};
use tokio::sync::watch;

/// How soon a change written to etcd must show in a snapshot of a connected watch.
const LIVE: Duration = Duration::from_secs(1);
/// How soon a watch must catch up after etcd comes back (reconnect backoff is capped at 5 s).
const RECOVERY: Duration = Duration::from_secs(10);

type Snapshots = watch::Receiver<Option<Arc<StoreSnapshot>>>;

fn key(name: &str) -> ResourceKey {
    ResourceKey::new("networking.istio.io", "VirtualService", "default", name)
}

fn etcd_key(name: &str) -> String {
    key(name).etcd_key("/mesh")
}

/// Waits up to `within` for a snapshot satisfying `check`.
async fn snapshot_where(
    snapshots: &mut Snapshots,
    within: Duration,
    what: &str,
    mut check: impl FnMut(&StoreSnapshot) -> bool,
) -> anyhow::Result<Arc<StoreSnapshot>> {
    let waited = tokio::time::timeout(
        within,
        snapshots.wait_for(|snapshot| snapshot.as_deref().is_some_and(&mut check)),
    )
    .await
    .map(|found| found.map(|snapshot| snapshot.clone()));
    match waited {
        Ok(Ok(snapshot)) => snapshot.context("checked to be Some"),
        Ok(Err(_)) => anyhow::bail!("the watch task ended while waiting for {what}"),
        Err(_) => anyhow::bail!(
            "no snapshot with {what} within {within:?}; last: {:?}",
            snapshots.borrow()
        ),
    }
}

fn yaml_of(snapshot: &StoreSnapshot, name: &str) -> Option<String> {
    snapshot
        .resources
        .get(&key(name))
        .map(|resource| resource.yaml.clone())
}

/// What etcd holds under `/mesh`, as name -> yaml.
async fn etcd_contents(options: &EtcdOptions) -> anyhow::Result<BTreeMap<String, String>> {
    let mut store = ResourceStore::connect(options).await?;
    Ok(store
        .list(None, None)
        .await?
        .into_iter()
        .map(|(key, yaml)| (key.name, yaml))
        .collect())
}

fn contents(snapshot: &StoreSnapshot) -> BTreeMap<String, String> {
    snapshot
        .resources
        .values()
        .map(|resource| (resource.key.name.clone(), resource.yaml.clone()))
        .collect()
}

#[tokio::test]
async fn follows_puts_updates_and_deletes() -> anyhow::Result<()> {
    let server = EtcdServer::start().await?;
    let options = server.options("/mesh");
    let mut client = server.client().await?;
    client.put(etcd_key("reviews"), "v: 1", None).await?;
    client.put("/mesh/not/a/resource", "x", None).await?;
    client
        .put(
            "/mesh2/networking.istio.io/VirtualService/default/elsewhere",
            "x",
            None,
        )
        .await?;

    let watch = ResourceWatch::spawn(options);
    let mut snapshots = watch.snapshots();
    let first = snapshot_where(&mut snapshots, RECOVERY, "the first list", |_| true).await?;
    assert_eq!(yaml_of(&first, "reviews").as_deref(), Some("v: 1"));
    assert_eq!(first.resources.len(), 1);
    assert_eq!(
        first.malformed_keys,
        vec!["/mesh/not/a/resource".to_owned()]
    );
    let stored = &first.resources[&key("reviews")];
    assert!(stored.mod_revision > 0 && stored.mod_revision <= first.revision);

    client.put(etcd_key("ratings"), "v: 1", None).await?;
    let added = snapshot_where(&mut snapshots, LIVE, "ratings added", |s| {
        yaml_of(s, "ratings").is_some()
    })
    .await?;
    assert!(added.revision > first.revision);
    assert_eq!(yaml_of(&added, "reviews").as_deref(), Some("v: 1"));

    client.put(etcd_key("reviews"), "v: 2", None).await?;
    let updated = snapshot_where(&mut snapshots, LIVE, "reviews updated", |s| {
        yaml_of(s, "reviews").as_deref() == Some("v: 2")
    })
    .await?;
    assert!(updated.revision > added.revision);
    assert!(updated.resources[&key("reviews")].mod_revision > stored.mod_revision);

    client.delete(etcd_key("ratings"), None).await?;
    let deleted = snapshot_where(&mut snapshots, LIVE, "ratings deleted", |s| {
        yaml_of(s, "ratings").is_none()
    })
    .await?;
    assert!(deleted.revision > updated.revision);
    assert_eq!(deleted.resources.len(), 1);

    client.delete("/mesh/not/a/resource", None).await?;
    snapshot_where(&mut snapshots, LIVE, "no malformed key", |s| {
        s.malformed_keys.is_empty()
    })
    .await?;

    // Idle: progress notifications keep last_sync fresh.
    let last_sync = watch.last_sync();
    let before = (*last_sync.borrow()).context("synced")?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = (*last_sync.borrow()).context("synced")?;
    assert!(
        after >= before + Duration::from_millis(1000),
        "last_sync moved by {:?} in 2.5 s of idle",
        after - before
    );
    assert!(after.elapsed() < Duration::from_millis(1500));
    Ok(())
}

#[tokio::test]
async fn replaying_old_history_leaves_the_snapshot_equal_to_etcd() -> anyhow::Result<()> {
    let server = EtcdServer::start().await?;
    let options = server.options("/mesh");
    let mut client = server.client().await?;
    let first_write = client.put(etcd_key("a"), "v: 1", None).await?;
    let first_revision = first_write.header().map_or(0, |h| h.revision());
    client.put(etcd_key("gone"), "v: 1", None).await?;
    client.delete(etcd_key("gone"), None).await?;
    client.put(etcd_key("a"), "v: 2", None).await?;

    // The first watch replays all of that history after a list that already has the result
    // (the skipping rules themselves are unit-tested in the crate: here one response carries
    // the whole replay, so only its net effect is visible).
    let watch = ResourceWatch::spawn_replaying_from(options.clone(), first_revision);
    let mut snapshots = watch.snapshots();
    client.put(etcd_key("b"), "v: 1", None).await?;
    let seen = snapshot_where(&mut snapshots, RECOVERY, "b", |s| yaml_of(s, "b").is_some()).await?;
    assert_eq!(contents(&seen), etcd_contents(&options).await?);
    assert_eq!(yaml_of(&seen, "a").as_deref(), Some("v: 2"));
    Ok(())
}

#[tokio::test]
async fn a_watch_from_a_compacted_revision_resyncs() -> anyhow::Result<()> {
    let server = EtcdServer::start().await?;
    let options = server.options("/mesh");
    let mut client = server.client().await?;
    let first_write = client.put(etcd_key("a"), "v: 1", None).await?;
    let first_revision = first_write.header().map_or(0, |h| h.revision());
    client.put(etcd_key("b"), "v: 1", None).await?;
    let latest = client.put(etcd_key("a"), "v: 2", None).await?;
    let compact_to = latest.header().map_or(0, |h| h.revision());
    client
        .compact(
            compact_to,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await?;

    // etcd cancels the first watch (its start is compacted away); only a resync (list again,
    // watch from the new revision) lets the later change through.
    let watch = ResourceWatch::spawn_replaying_from(options.clone(), first_revision);
    let mut snapshots = watch.snapshots();
    snapshot_where(&mut snapshots, RECOVERY, "the first list", |_| true).await?;
    client.put(etcd_key("c"), "v: 1", None).await?;
    let seen = snapshot_where(
        &mut snapshots,
        RECOVERY.min(Duration::from_secs(3)),
        "c",
        |s| yaml_of(s, "c").is_some(),
    )
    .await?;
    assert_eq!(contents(&seen), etcd_contents(&options).await?);
    Ok(())
}

#[tokio::test]
async fn changes_while_etcd_was_down_and_compacted_are_caught_up() -> anyhow::Result<()> {
    let mut server = EtcdServer::start().await?;
    let options = server.options("/mesh");
    {
        let mut client = server.client().await?;
        for name in ["keep", "update", "delete"] {
            client.put(etcd_key(name), "v: 1", None).await?;
        }
    }
    let watch = ResourceWatch::spawn(options.clone());
    let mut snapshots = watch.snapshots();
    let first = snapshot_where(&mut snapshots, RECOVERY, "three resources", |s| {
        s.resources.len() == 3
    })
    .await?;

    server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart().await?;
    // Write and compact at once, most likely before the watch has reconnected (its backoff
    // has grown while etcd was down): it must not rely on history it did not see.
    let mut client = server.client().await?;
    client.put(etcd_key("update"), "v: 2", None).await?;
    client.delete(etcd_key("delete"), None).await?;
    let latest = client.put(etcd_key("added"), "v: 1", None).await?;
    let compact_to = latest.header().map_or(0, |h| h.revision());
    client
        .compact(
            compact_to,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await?;

    let caught_up = snapshot_where(
        &mut snapshots,
        RECOVERY,
        "the changes made while away",
        |s| {
            yaml_of(s, "added").is_some()
                && yaml_of(s, "delete").is_none()
                && yaml_of(s, "update").as_deref() == Some("v: 2")
        },
    )
    .await?;
    assert_eq!(contents(&caught_up), etcd_contents(&options).await?);
    assert!(caught_up.revision > first.revision);
    Ok(())
}

#[tokio::test]
async fn etcd_unreachable_at_start_then_restarted() -> anyhow::Result<()> {
    let port = free_loopback_port()?;
    let options = EtcdOptions::new(vec![format!("http://127.0.0.1:{port}")], "/mesh");
    let watch = ResourceWatch::spawn(options.clone());
    let mut snapshots = watch.snapshots();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(snapshots.borrow().is_none());
    assert!(watch.last_sync().borrow().is_none());

    let mut server = EtcdServer::start_on(port).await?;
    let mut client = server.client().await?;
    client.put(etcd_key("early"), "v: 1", None).await?;
    snapshot_where(&mut snapshots, RECOVERY, "early", |s| {
        yaml_of(s, "early").is_some()
    })
    .await?;
    drop(client);

    server.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.restart().await?;
    let mut client = server.client().await?;
    client.put(etcd_key("late"), "v: 1", None).await?;
    let seen = snapshot_where(&mut snapshots, RECOVERY, "late", |s| {
        yaml_of(s, "late").is_some()
    })
    .await?;
    assert_eq!(yaml_of(&seen, "early").as_deref(), Some("v: 1"));
    let synced = (*watch.last_sync().borrow()).context("synced")?;
    assert!(synced.elapsed() < Duration::from_secs(2));
    Ok(())
}
