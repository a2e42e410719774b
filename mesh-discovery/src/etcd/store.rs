//! [`ResourceStore`]: one-shot reads and writes of resources, for the CLI.

use std::collections::BTreeSet;
use std::fmt;

use etcd_client::{Client, GetOptions, Txn, TxnOp};

use super::{EtcdError, EtcdOptions, ResourceKey, connect, request};

/// CLI-style operations on the resources under one prefix.
pub struct ResourceStore {
    client: Client,
    prefix: String,
    endpoints: String,
}

impl fmt::Debug for ResourceStore {
    // etcd_client::Client has no Debug; where it points is what matters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResourceStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl ResourceStore {
    pub async fn connect(options: &EtcdOptions) -> Result<ResourceStore, EtcdError> {
        Ok(ResourceStore {
            client: connect(options).await?,
            prefix: options.normalized_prefix().to_owned(),
            endpoints: options.endpoints_label(),
        })
    }

    /// Writes all (key, yaml) pairs in ONE etcd transaction (all or nothing). Keys must be
    /// valid (no empty segment, no `/` in one) and distinct: etcd rejects a transaction that
    /// writes a key twice, and saying which key is clearer than its error.
    pub async fn put_all(&mut self, resources: &[(ResourceKey, String)]) -> Result<(), EtcdError> {
        if resources.is_empty() {
            return Ok(());
        }
        let mut seen = BTreeSet::new();
        let mut ops = Vec::with_capacity(resources.len());
        for (key, yaml) in resources {
            if let Some(reason) = key.invalid_reason() {
                return Err(EtcdError::InvalidKey {
                    key: key.to_string(),
                    reason,
                });
            }
            if !seen.insert(key) {
                return Err(EtcdError::InvalidKey {
                    key: key.to_string(),
                    reason: "given twice in one apply",
                });
            }
            ops.push(TxnOp::put(key.etcd_key(&self.prefix), yaml.as_str(), None));
        }
        let label = if resources.len() == 1 {
            resources[0].0.etcd_key(&self.prefix)
        } else {
            format!("{} resources under {}/", resources.len(), self.prefix)
        };
        let txn = Txn::new().and_then(ops);
        request("transaction", &label, &self.endpoints, self.client.txn(txn)).await?;
        Ok(())
    }

    /// Every stored resource, optionally only of `kind` (case-insensitive match on the kind
    /// segment) and `name`, sorted by key. Keys under the prefix of another shape are skipped.
    pub async fn list(
        &mut self,
        kind: Option<&str>,
        name: Option<&str>,
    ) -> Result<Vec<(ResourceKey, String)>, EtcdError> {
        let range = format!("{}/", self.prefix);
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(super::MAX_RESPONSE_BYTES);
        let response = request(
            "list",
            &range,
            &self.endpoints,
            kv.get(range.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let mut resources = Vec::new();
        for kv in response.kvs() {
            let Some(key) = std::str::from_utf8(kv.key())
                .ok()
                .and_then(|k| ResourceKey::parse(&self.prefix, k))
            else {
                continue;
            };
            if kind.is_some_and(|kind| !key.kind.eq_ignore_ascii_case(kind))
                || name.is_some_and(|name| key.name != name)
            {
                continue;
            }
            let Ok(yaml) = std::str::from_utf8(kv.value()) else {
                return Err(EtcdError::NotUtf8 {
                    key: key.etcd_key(&self.prefix),
                    endpoints: self.endpoints.clone(),
                });
            };
            resources.push((key, yaml.to_owned()));
        }
        resources.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(resources)
    }

    /// Deletes one resource; Ok(false) when it was not there.
    pub async fn delete(&mut self, key: &ResourceKey) -> Result<bool, EtcdError> {
        let etcd_key = key.etcd_key(&self.prefix);
        let response = request(
            "delete",
            &etcd_key,
            &self.endpoints,
            self.client.delete(etcd_key.as_str(), None),
        )
        .await?;
        Ok(response.deleted() > 0)
    }
}
