//! [`ResourceWatch`]: list the prefix, watch from the revision after the list, and start over
//! (list again) whenever the watch breaks. See the module docs of [`crate::etcd`] for why
//! snapshots are full pictures, why revisions are checked and why progress is requested.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Event, EventType, GetOptions, KeyValue, WatchOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::backoff::Backoff;
use super::{EtcdError, EtcdOptions, MAX_RESPONSE_BYTES, ResourceKey, connect, request};

/// How often an idle watch asks etcd for a progress notification.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// A watch that has answered nothing (not even progress requests) for this long is taken for
/// dead and resynced. Generous against a busy etcd: losing a connection outright is noticed at
/// once (the stream fails); this is for paths that die silently.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One stored resource as last seen.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredResource {
    pub key: ResourceKey,
    pub yaml: String,
    /// The etcd revision of the resource's last change.
    pub mod_revision: i64,
}

/// Everything under the prefix at one etcd revision.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoreSnapshot {
    /// The revision of the list or watch response this state was read from. Responses that
    /// change nothing are not published, so etcd itself may be further along.
    pub revision: i64,
    pub resources: BTreeMap<ResourceKey, StoredResource>,
    /// Keys under the prefix that are not `<group>/<kind>/<namespace>/<name>`, or whose value
    /// is not UTF-8: reported, not applied. Sorted.
    pub malformed_keys: Vec<String>,
}

/// One change to one key, as a list entry (a put) or a watch event shows it.
#[derive(Clone, Copy, Debug)]
struct Change<'a> {
    delete: bool,
    key: &'a [u8],
    value: &'a [u8],
    mod_revision: i64,
}

impl<'a> Change<'a> {
    fn put(kv: &'a KeyValue) -> Self {
        Change {
            delete: false,
            key: kv.key(),
            value: kv.value(),
            mod_revision: kv.mod_revision(),
        }
    }

    fn from_event(event: &'a Event) -> Option<Self> {
        let kv = event.kv()?;
        Some(Change {
            // etcd's protocol has two event types; etcd-client panics on any other value,
            // which only a server speaking some other protocol could send.
            delete: event.event_type() == EventType::Delete,
            ..Change::put(kv)
        })
    }

    fn resource_key(&self, prefix: &str) -> Option<ResourceKey> {
        std::str::from_utf8(self.key)
            .ok()
            .and_then(|key| ResourceKey::parse(prefix, key))
    }
}

impl StoreSnapshot {
    /// The state a list response shows.
    fn from_list(prefix: &str, revision: i64, kvs: &[KeyValue]) -> StoreSnapshot {
        let mut snapshot = StoreSnapshot {
            revision,
            ..StoreSnapshot::default()
        };
        for kv in kvs {
            snapshot.put(prefix, &Change::put(kv));
        }
        snapshot
    }

    /// Same resources and malformed keys; the revision alone changing (writes elsewhere in
    /// etcd) is no news to consumers.
    fn same_content(&self, other: &StoreSnapshot) -> bool {
        self.resources == other.resources && self.malformed_keys == other.malformed_keys
    }

    /// Applies one watch event unless it is old news: at or below `list_revision` (the list
    /// already showed it) or at or below what is stored for its key.
    fn apply(&mut self, prefix: &str, list_revision: i64, change: &Change<'_>) {
        if change.mod_revision <= list_revision {
            return;
        }
        if let Some(key) = change.resource_key(prefix)
            && self
                .resources
                .get(&key)
                .is_some_and(|stored| change.mod_revision <= stored.mod_revision)
        {
            return;
        }
        if change.delete {
            self.delete(prefix, change);
        } else {
            self.put(prefix, change);
        }
    }

    fn put(&mut self, prefix: &str, change: &Change<'_>) {
        let key = change.resource_key(prefix);
        match (key, std::str::from_utf8(change.value)) {
            (Some(key), Ok(yaml)) => {
                self.remove_malformed(change);
                self.resources.insert(
                    key.clone(),
                    StoredResource {
                        key,
                        yaml: yaml.to_owned(),
                        mod_revision: change.mod_revision,
                    },
                );
            }
            (key, _) => {
                if let Some(key) = key {
                    self.resources.remove(&key);
                }
                let text = String::from_utf8_lossy(change.key).into_owned();
                if let Err(at) = self.malformed_keys.binary_search(&text) {
                    tracing::debug!(key = %text, "etcd key under the prefix is not a resource");
                    self.malformed_keys.insert(at, text);
                }
            }
        }
    }

    fn delete(&mut self, prefix: &str, change: &Change<'_>) {
        if let Some(key) = change.resource_key(prefix) {
            self.resources.remove(&key);
        }
        self.remove_malformed(change);
    }

    fn remove_malformed(&mut self, change: &Change<'_>) {
        if self.malformed_keys.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(change.key);
        if let Ok(at) = self
            .malformed_keys
            .binary_search_by(|k| k.as_str().cmp(&text))
        {
            self.malformed_keys.remove(at);
        }
    }
}

/// Lists the prefix, then watches from that revision; a background task, aborted on drop.
#[derive(Debug)]
pub struct ResourceWatch {
    snapshots: watch::Receiver<Option<Arc<StoreSnapshot>>>,
    last_sync: watch::Receiver<Option<Instant>>,
    task: JoinHandle<()>,
}

impl Drop for ResourceWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ResourceWatch {
    /// Starts following `options.prefix`. Must be called within a tokio runtime. Never fails:
    /// an unreachable etcd is retried with backoff (and logged at warn) until it answers.
    pub fn spawn(options: EtcdOptions) -> ResourceWatch {
        Self::spawn_inner(options, None)
    }

    /// Like [`ResourceWatch::spawn`], but the first watch starts at `revision` instead of the
    /// revision after the first list, so a test can make it replay old events (which must be
    /// skipped) or start at a compacted revision (which must lead to a resync).
    #[doc(hidden)]
    pub fn spawn_replaying_from(options: EtcdOptions, revision: i64) -> ResourceWatch {
        Self::spawn_inner(options, Some(revision))
    }

    fn spawn_inner(options: EtcdOptions, replay_from: Option<i64>) -> ResourceWatch {
        let (snapshots_tx, snapshots) = watch::channel(None);
        let (last_sync_tx, last_sync) = watch::channel(None);
        let follower = Follower {
            prefix: options.normalized_prefix().to_owned(),
            range: options.range_prefix(),
            endpoints: options.endpoints_label(),
            options,
            replay_from,
            snapshots: snapshots_tx,
            last_sync: last_sync_tx,
            backoff: Backoff::new(),
        };
        ResourceWatch {
            snapshots,
            last_sync,
            task: tokio::spawn(follower.run()),
        }
    }

    /// None until the first successful list; then every applied state. Consumers apply the
    /// whole snapshot (it is a full picture, not a delta). A resync that changed nothing
    /// publishes nothing.
    pub fn snapshots(&self) -> watch::Receiver<Option<Arc<StoreSnapshot>>> {
        self.snapshots.clone()
    }

    /// When the watch was last known in sync with etcd (a list, a watch response or a
    /// progress notification), on tokio's clock; None before the first sync. Refreshed about
    /// every second while connected, so `elapsed()` is the "seconds since last sync" gauge.
    pub fn last_sync(&self) -> watch::Receiver<Option<Instant>> {
        self.last_sync.clone()
    }
}

/// Why one list-then-watch session ended.
enum SessionEnd {
    /// etcd canceled the watch, typically because its start revision was compacted away:
    /// expected now and then, logged at info.
    Canceled(String),
    /// Anything else (etcd unreachable, stream broken or silent): logged at warn.
    Failed(EtcdError),
}

/// The background task's state.
struct Follower {
    options: EtcdOptions,
    prefix: String,
    range: String,
    endpoints: String,
    replay_from: Option<i64>,
    snapshots: watch::Sender<Option<Arc<StoreSnapshot>>>,
    last_sync: watch::Sender<Option<Instant>>,
    backoff: Backoff,
}

impl Follower {
    async fn run(mut self) {
        loop {
            let client = match connect(&self.options).await {
                Ok(client) => client,
                Err(error) => {
                    let delay = self.backoff.next_delay();
                    tracing::warn!(
                        endpoints = %self.endpoints,
                        prefix = %self.range,
                        %error,
                        retry_in = ?delay,
                        "etcd unreachable; resource watch retrying"
                    );
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            let ended = self.follow(client).await;
            let delay = self.backoff.next_delay();
            match ended {
                SessionEnd::Canceled(reason) => {
                    tracing::info!(
                        endpoints = %self.endpoints,
                        prefix = %self.range,
                        %reason,
                        resync_in = ?delay,
                        "etcd watch canceled; resyncing"
                    )
                }
                SessionEnd::Failed(error) => {
                    tracing::warn!(%error, resync_in = ?delay, "etcd watch resyncing")
                }
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// One list-then-watch session; returns why it ended (the caller resyncs).
    async fn follow(&mut self, client: Client) -> SessionEnd {
        let mut kv = client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let list = request(
            "list",
            &self.range,
            &self.endpoints,
            kv.get(self.range.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await;
        let list = match list {
            Ok(list) => list,
            Err(error) => return SessionEnd::Failed(error),
        };
        let Some(list_revision) = list.header().map(|header| header.revision()) else {
            return self.ended("the list response has no header".to_owned());
        };
        let mut snapshot = StoreSnapshot::from_list(&self.prefix, list_revision, list.kvs());
        drop(list);
        self.mark_synced();
        self.publish(&snapshot);

        let start = self.replay_from.take().unwrap_or(list_revision + 1);
        let mut watch_client = client
            .watch_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let stream = request(
            "watch",
            &self.range,
            &self.endpoints,
            watch_client.watch(
                self.range.as_str(),
                Some(WatchOptions::new().with_prefix().with_start_revision(start)),
            ),
        )
        .await;
        let (mut requests, mut responses) = match stream {
            Ok(stream) => stream.split(),
            Err(error) => return SessionEnd::Failed(error),
        };

        let mut progress = tokio::time::interval(PROGRESS_INTERVAL);
        progress.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_response = Instant::now();
        loop {
            tokio::select! {
                _ = progress.tick() => {
                    if last_response.elapsed() > STALL_TIMEOUT {
                        return self.ended(format!("no response for {STALL_TIMEOUT:?}"));
                    }
                    if let Err(error) = requests.request_progress().await {
                        return self.ended(format!("progress request not sent: {error}"));
                    }
                }
                message = responses.message() => {
                    let response = match message {
                        Ok(Some(response)) => response,
                        Ok(None) => return self.ended("etcd closed the stream".to_owned()),
                        Err(source) => {
                            return SessionEnd::Failed(EtcdError::Request {
                                operation: "watch",
                                key: self.range.clone(),
                                endpoints: self.endpoints.clone(),
                                source,
                            });
                        }
                    };
                    last_response = Instant::now();
                    // A watch etcd accepted resets the backoff; one created only to be
                    // canceled (compacted start, no permission) must not, or a cancel at every
                    // creation would resync in a tight loop.
                    if response.created() && !response.canceled() {
                        self.backoff.reset();
                    }
                    if response.canceled() {
                        let reason = if response.compact_revision() > 0 {
                            format!(
                                "revision {start} is compacted (etcd kept history from {})",
                                response.compact_revision()
                            )
                        } else {
                            format!("canceled by etcd: {}", response.cancel_reason())
                        };
                        return SessionEnd::Canceled(reason);
                    }
                    self.mark_synced();
                    if response.events().is_empty() {
                        // Created, or a progress notification: etcd 3.4 answers those with its
                        // current revision, possibly ahead of events still on the way, so the
                        // snapshot's revision is not moved.
                        continue;
                    }
                    for change in response.events().iter().filter_map(Change::from_event) {
                        snapshot.apply(&self.prefix, list_revision, &change);
                    }
                    let newest_event = response
                        .events()
                        .iter()
                        .filter_map(|event| event.kv().map(KeyValue::mod_revision))
                        .max()
                        .unwrap_or(snapshot.revision);
                    let header_revision =
                        response.header().map_or(newest_event, |header| header.revision());
                    snapshot.revision = snapshot.revision.max(header_revision);
                    self.publish(&snapshot);
                }
            }
        }
    }

    fn ended(&self, reason: String) -> SessionEnd {
        SessionEnd::Failed(EtcdError::StreamEnded {
            key: self.range.clone(),
            endpoints: self.endpoints.clone(),
            reason,
        })
    }

    fn mark_synced(&self) {
        self.last_sync.send_replace(Some(Instant::now()));
    }

    /// Publishes `snapshot` unless consumers already have the same content.
    fn publish(&self, snapshot: &StoreSnapshot) {
        let unchanged = self
            .snapshots
            .borrow()
            .as_deref()
            .is_some_and(|published| published.same_content(snapshot));
        if !unchanged {
            self.snapshots
                .send_replace(Some(Arc::new(snapshot.clone())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIX: &str = "/mesh";

    fn put(key: &'static str, value: &'static str, mod_revision: i64) -> Change<'static> {
        Change {
            delete: false,
            key: key.as_bytes(),
            value: value.as_bytes(),
            mod_revision,
        }
    }

    fn delete(key: &'static str, mod_revision: i64) -> Change<'static> {
        Change {
            delete: true,
            value: b"",
            ..put(key, "", mod_revision)
        }
    }

    const A: &str = "/mesh/g/Kind/ns/a";

    fn a() -> ResourceKey {
        ResourceKey::new("g", "Kind", "ns", "a")
    }

    /// The snapshot a list at revision 10 gives when `a` was last written at 8.
    fn listed() -> StoreSnapshot {
        let mut snapshot = StoreSnapshot {
            revision: 10,
            ..StoreSnapshot::default()
        };
        snapshot.put(PREFIX, &put(A, "v8", 8));
        snapshot
    }

    #[test]
    fn events_the_list_already_covered_are_skipped() {
        let mut snapshot = listed();
        // Replays of history up to the list: an older value, a key created and deleted since.
        snapshot.apply(PREFIX, 10, &put(A, "v7", 7));
        snapshot.apply(PREFIX, 10, &put("/mesh/g/Kind/ns/b", "gone", 9));
        assert_eq!(snapshot, listed());
        snapshot.apply(PREFIX, 10, &delete(A, 10));
        assert_eq!(snapshot, listed());
    }

    #[test]
    fn events_at_or_below_a_keys_revision_are_skipped() {
        let mut snapshot = listed();
        snapshot.apply(PREFIX, 10, &put(A, "v12", 12));
        snapshot.apply(PREFIX, 10, &put(A, "v11", 11));
        snapshot.apply(PREFIX, 10, &put(A, "again", 12));
        snapshot.apply(PREFIX, 10, &delete(A, 11));
        assert_eq!(snapshot.resources[&a()].yaml, "v12");
        assert_eq!(snapshot.resources[&a()].mod_revision, 12);
        snapshot.apply(PREFIX, 10, &delete(A, 13));
        assert!(snapshot.resources.is_empty());
    }

    #[test]
    fn malformed_keys_and_values_are_reported_not_applied() {
        let mut snapshot = listed();
        snapshot.apply(PREFIX, 10, &put("/mesh/g/Kind/a", "short", 11));
        snapshot.apply(PREFIX, 10, &put("/mesh/g/Kind/ns/a/extra", "long", 12));
        snapshot.apply(
            PREFIX,
            10,
            &Change {
                value: &[0xff, 0xfe],
                ..put(A, "", 13)
            },
        );
        assert!(snapshot.resources.is_empty(), "{snapshot:?}");
        assert_eq!(
            snapshot.malformed_keys,
            vec![
                "/mesh/g/Kind/a".to_owned(),
                A.to_owned(),
                "/mesh/g/Kind/ns/a/extra".to_owned()
            ]
        );
        // A good value again, and deletes, clear the reports.
        snapshot.apply(PREFIX, 10, &put(A, "fixed", 14));
        snapshot.apply(PREFIX, 10, &delete("/mesh/g/Kind/a", 15));
        assert_eq!(snapshot.resources[&a()].yaml, "fixed");
        assert_eq!(
            snapshot.malformed_keys,
            vec!["/mesh/g/Kind/ns/a/extra".to_owned()]
        );
    }

    #[test]
    fn only_content_changes_count_as_news() {
        let a = listed();
        let mut b = listed();
        b.revision = 20;
        assert!(a.same_content(&b));
        b.apply(PREFIX, 10, &put(A, "v21", 21));
        assert!(!a.same_content(&b));
    }
}
