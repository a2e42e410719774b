//! [`Registration`]: this workload's `WorkloadEntry` kept in etcd under a lease.
//!
//! The key lives exactly as long as the lease: kept alive every ttl/3 while the proxy runs,
//! revoked on a clean withdraw (drain), and left to expire after one TTL when the proxy dies
//! without saying so. When etcd is lost the task reconnects with backoff and re-puts the
//! value; a lease that expired meanwhile (etcd answers "lease not found", or a keep-alive
//! reports TTL 0) is granted anew.

use std::time::Duration;

use etcd_client::{Client, PutOptions};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::backoff::Backoff;
use super::{EtcdError, EtcdOptions, REQUEST_TIMEOUT, ResourceKey, connect, request};

/// This workload's `WorkloadEntry` kept in etcd under a lease.
#[derive(Debug)]
pub struct Registration {
    key: String,
    withdraw: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Drop for Registration {
    /// Stops keeping the lease alive without revoking it: the key goes after one TTL, as it
    /// would if the process died.
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Registration {
    /// Publishes `value` (YAML) at `key` under a lease of `ttl` (whole seconds, at least 1;
    /// etcd may raise very short TTLs to its minimum), kept alive every ttl/3 for as long as
    /// the Registration lives and `value` is Some; when the watched value changes it is re-put
    /// under the same lease; None withdraws it (the lease is revoked, the key is gone) until
    /// the value is Some again. If the sender of `value` goes away, the last value stays
    /// published. etcd unreachable or lost: retried with backoff; a lease found expired is
    /// re-granted and the key re-put. Must be called within a tokio runtime.
    pub fn spawn(
        options: EtcdOptions,
        key: ResourceKey,
        ttl: Duration,
        value: watch::Receiver<Option<String>>,
    ) -> Registration {
        let etcd_key = key.etcd_key(&options.prefix);
        let (withdraw_tx, withdraw_rx) = oneshot::channel();
        let keeper = LeaseKeeper {
            endpoints: options.endpoints_label(),
            options,
            key: etcd_key.clone(),
            ttl_seconds: ttl_seconds(ttl),
            value,
            value_open: true,
            client: None,
            lease: None,
            backoff: Backoff::new(),
        };
        Registration {
            key: etcd_key,
            withdraw: Some(withdraw_tx),
            task: tokio::spawn(keeper.run(withdraw_rx)),
        }
    }

    /// Revokes the lease now (the key disappears at once) and stops; for drain. If etcd cannot
    /// be reached within a few seconds the key is left to expire with its lease.
    pub async fn withdraw(mut self) {
        if let Some(withdraw) = self.withdraw.take() {
            let _ = withdraw.send(());
        }
        // Connecting plus one revoke, each bounded; beyond that, give up (Drop aborts).
        let bound = REQUEST_TIMEOUT * 3;
        if tokio::time::timeout(bound, &mut self.task).await.is_err() {
            tracing::warn!(key = %self.key, "etcd registration not withdrawn in time; it expires with its lease");
        }
    }
}

/// Lease TTL in whole seconds as etcd takes it: rounded up, at least 1.
fn ttl_seconds(ttl: Duration) -> i64 {
    let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(seconds.max(1)).unwrap_or(i64::MAX)
}

fn is_lease_not_found(error: &EtcdError) -> bool {
    // etcd's ErrLeaseNotFound ("etcdserver: requested lease not found"); etcd-client reports
    // it as a gRPC status from put/revoke and as its own error from opening a keep-alive.
    match error {
        EtcdError::Request { source, .. } => source.to_string().contains("lease not found"),
        _ => false,
    }
}

/// Why keeping the current lease alive stopped, short of an error.
enum KeepAliveEnd {
    /// The value changed to None: revoke.
    Withdrawn,
    /// etcd reported the lease gone: grant a new one and put again.
    LeaseExpired,
}

/// The background task's state. `client` and `lease` live here rather than in a session so a
/// withdraw that interrupts a session still knows which lease to revoke.
struct LeaseKeeper {
    options: EtcdOptions,
    endpoints: String,
    key: String,
    ttl_seconds: i64,
    value: watch::Receiver<Option<String>>,
    /// False once the value's sender is gone: the last value stays.
    value_open: bool,
    client: Option<Client>,
    lease: Option<i64>,
    backoff: Backoff,
}

impl LeaseKeeper {
    async fn run(mut self, withdraw: oneshot::Receiver<()>) {
        tokio::select! {
            // Only an explicit withdraw; a dropped Registration aborts this task instead.
            Ok(()) = withdraw => {}
            () = self.keep_registered() => {}
        }
        self.revoke_on_withdraw().await;
    }

    async fn revoke_on_withdraw(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        let client = match self.client.take() {
            Some(client) => client,
            None => match connect(&self.options).await {
                Ok(client) => client,
                Err(error) => {
                    tracing::warn!(key = %self.key, %error, "etcd registration not revoked; it expires with its lease");
                    return;
                }
            },
        };
        match self.revoke(&client, lease).await {
            Ok(()) => tracing::info!(key = %self.key, "etcd registration withdrawn"),
            Err(error) => {
                tracing::warn!(key = %self.key, %error, "etcd registration not revoked; it expires with its lease")
            }
        }
    }

    /// Runs until the task is stopped from outside.
    async fn keep_registered(&mut self) {
        loop {
            let client = match self.client.clone() {
                Some(client) => client,
                None => match connect(&self.options).await {
                    Ok(client) => {
                        self.client = Some(client.clone());
                        client
                    }
                    Err(error) => {
                        let delay = self.backoff.next_delay();
                        tracing::warn!(key = %self.key, %error, retry_in = ?delay, "etcd unreachable; registration retrying");
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                },
            };
            if let Err(error) = self.session(client).await {
                self.client = None;
                let delay = self.backoff.next_delay();
                tracing::warn!(key = %self.key, %error, retry_in = ?delay, "etcd registration reconnecting");
                tokio::time::sleep(delay).await;
            }
        }
    }

    /// Publishes and keeps alive on one client until an error (then the caller reconnects).
    async fn session(&mut self, client: Client) -> Result<(), EtcdError> {
        loop {
            let current = self.value.borrow_and_update().clone();
            let Some(yaml) = current else {
                if let Some(lease) = self.lease {
                    self.revoke(&client, lease).await?;
                    self.lease = None;
                    tracing::info!(key = %self.key, "etcd registration withdrawn (no value)");
                }
                self.wait_for_value().await;
                continue;
            };
            let lease = match self.lease {
                Some(lease) => lease,
                None => {
                    let granted = request(
                        "lease grant",
                        &self.key,
                        &self.endpoints,
                        client.lease_client().grant(self.ttl_seconds, None),
                    )
                    .await?;
                    self.lease = Some(granted.id());
                    granted.id()
                }
            };
            match self.put(&client, lease, &yaml).await {
                Ok(()) => {}
                Err(error) if is_lease_not_found(&error) => {
                    tracing::info!(key = %self.key, "etcd lease expired; granting a new one");
                    self.lease = None;
                    continue;
                }
                Err(error) => return Err(error),
            }
            self.backoff.reset();
            match self.keep_alive(&client, lease).await? {
                KeepAliveEnd::Withdrawn => {}
                KeepAliveEnd::LeaseExpired => {
                    tracing::info!(key = %self.key, "etcd lease expired; granting a new one");
                    self.lease = None;
                }
            }
        }
    }

    /// Waits until the value may have become Some (forever once its sender is gone).
    async fn wait_for_value(&mut self) {
        if !self.value_open || self.value.changed().await.is_err() {
            self.value_open = false;
            std::future::pending::<()>().await;
        }
    }

    async fn put(&self, client: &Client, lease: i64, yaml: &str) -> Result<(), EtcdError> {
        request(
            "put",
            &self.key,
            &self.endpoints,
            client.kv_client().put(
                self.key.as_str(),
                yaml,
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await?;
        Ok(())
    }

    /// Revokes `lease`; one already gone counts as revoked.
    async fn revoke(&self, client: &Client, lease: i64) -> Result<(), EtcdError> {
        let revoked = request(
            "lease revoke",
            &self.key,
            &self.endpoints,
            client.lease_client().revoke(lease),
        )
        .await;
        match revoked {
            Err(error) if !is_lease_not_found(&error) => Err(error),
            _ => Ok(()),
        }
    }

    /// Keeps `lease` alive, re-putting the value when it changes, until the value goes None,
    /// the lease is reported expired, or an error.
    async fn keep_alive(&mut self, client: &Client, lease: i64) -> Result<KeepAliveEnd, EtcdError> {
        let opened = request(
            "lease keep-alive",
            &self.key,
            &self.endpoints,
            client.lease_client().keep_alive(lease),
        )
        .await;
        let (mut keeper, mut responses) = match opened {
            Ok(opened) => opened,
            // Opening sends one keep-alive and fails when etcd answers TTL 0.
            Err(error) if is_lease_not_found(&error) => return Ok(KeepAliveEnd::LeaseExpired),
            Err(error) => return Err(error),
        };
        let ttl = Duration::from_secs(u64::try_from(self.ttl_seconds).unwrap_or(1));
        let period = ttl / 3;
        let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_answer = Instant::now();
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    if last_answer.elapsed() >= ttl {
                        return Err(self.lost(format!("no keep-alive answer for {ttl:?}")));
                    }
                    if let Err(error) = keeper.keep_alive().await {
                        return Err(self.lost(error.to_string()));
                    }
                }
                answer = responses.message() => match answer {
                    Ok(Some(answer)) if answer.ttl() <= 0 => return Ok(KeepAliveEnd::LeaseExpired),
                    Ok(Some(_)) => last_answer = Instant::now(),
                    Ok(None) => return Err(self.lost("etcd closed the keep-alive stream".to_owned())),
                    Err(error) => return Err(self.lost(error.to_string())),
                },
                changed = self.value.changed(), if self.value_open => {
                    if changed.is_err() {
                        self.value_open = false;
                        continue;
                    }
                    let current = self.value.borrow_and_update().clone();
                    match current {
                        Some(yaml) => match self.put(client, lease, &yaml).await {
                            Ok(()) => {}
                            Err(error) if is_lease_not_found(&error) => {
                                return Ok(KeepAliveEnd::LeaseExpired);
                            }
                            Err(error) => return Err(error),
                        },
                        None => return Ok(KeepAliveEnd::Withdrawn),
                    }
                }
            }
        }
    }

    fn lost(&self, reason: String) -> EtcdError {
        EtcdError::StreamEnded {
            key: self.key.clone(),
            endpoints: self.endpoints.clone(),
            reason: format!("lease keep-alive: {reason}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rounds_up_to_whole_seconds() {
        assert_eq!(ttl_seconds(Duration::from_millis(1)), 1);
        assert_eq!(ttl_seconds(Duration::from_secs(2)), 2);
        assert_eq!(ttl_seconds(Duration::from_millis(2500)), 3);
        assert_eq!(ttl_seconds(Duration::ZERO), 1);
    }
}
