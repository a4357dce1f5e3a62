//! The `kv_*` capabilities' storage: one namespace per (publisher, muscle name), with a quota.

use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use sha2::{Digest, Sha256};

use crate::error::RuntimeError;

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
const KV_USAGE: TableDefinition<&[u8], u64> = TableDefinition::new("kv_usage");

/// Longest key.
pub const MAX_KEY_LEN: usize = 256;
/// Longest value.
pub const MAX_VALUE_LEN: usize = 64 * 1024;

/// A namespace id: SHA-256 of publisher id and muscle name.
pub(crate) type Namespace = [u8; 32];

pub(crate) fn namespace(publisher: &referee_muscle::KeyId, name: &str) -> Namespace {
    Sha256::new()
        .chain_update(b"referee/kv/v1")
        .chain_update(publisher.0)
        .chain_update(name.as_bytes())
        .finalize()
        .into()
}

fn db_err<E: Into<redb::Error>>(e: E) -> RuntimeError {
    RuntimeError::Store(e.into().to_string())
}

/// Outcome of a put.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Put {
    Stored,
    OverQuota { used: u64, quota: u64 },
}

#[derive(Clone)]
pub(crate) struct Kv {
    db: Arc<Database>,
}

impl Kv {
    pub(crate) fn new(db: Arc<Database>) -> Result<Self, RuntimeError> {
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(KV).map_err(db_err)?;
        txn.open_table(KV_USAGE).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(Self { db })
    }

    fn full_key(ns: &Namespace, key: &[u8]) -> Vec<u8> {
        [ns.as_slice(), key].concat()
    }

    pub(crate) fn get(&self, ns: &Namespace, key: &[u8]) -> Result<Option<Vec<u8>>, RuntimeError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(KV).map_err(db_err)?;
        Ok(table.get(Self::full_key(ns, key).as_slice()).map_err(db_err)?.map(|v| v.value().to_vec()))
    }

    /// Stores `value` unless the namespace's usage (keys + values) would exceed `quota`.
    pub(crate) fn put(&self, ns: &Namespace, key: &[u8], value: &[u8], quota: u64) -> Result<Put, RuntimeError> {
        let full = Self::full_key(ns, key);
        let txn = self.db.begin_write().map_err(db_err)?;
        let outcome = {
            let mut table = txn.open_table(KV).map_err(db_err)?;
            let mut usage = txn.open_table(KV_USAGE).map_err(db_err)?;
            let used = usage.get(ns.as_slice()).map_err(db_err)?.map_or(0, |v| v.value());
            let old = table.get(full.as_slice()).map_err(db_err)?.map_or(0, |v| (key.len() + v.value().len()) as u64);
            let new_used = used - old.min(used) + (key.len() + value.len()) as u64;
            if new_used > quota {
                Put::OverQuota { used, quota }
            } else {
                table.insert(full.as_slice(), value).map_err(db_err)?;
                usage.insert(ns.as_slice(), new_used).map_err(db_err)?;
                Put::Stored
            }
        };
        if outcome == Put::Stored {
            txn.commit().map_err(db_err)?;
        } else {
            txn.abort().map_err(db_err)?;
        }
        Ok(outcome)
    }

    /// Deletes a key; returns whether it existed.
    pub(crate) fn delete(&self, ns: &Namespace, key: &[u8]) -> Result<bool, RuntimeError> {
        let full = Self::full_key(ns, key);
        let txn = self.db.begin_write().map_err(db_err)?;
        let existed = {
            let mut table = txn.open_table(KV).map_err(db_err)?;
            let mut usage = txn.open_table(KV_USAGE).map_err(db_err)?;
            let removed = table.remove(full.as_slice()).map_err(db_err)?.map(|v| (key.len() + v.value().len()) as u64);
            if let Some(freed) = removed {
                let used = usage.get(ns.as_slice()).map_err(db_err)?.map_or(0, |v| v.value());
                usage.insert(ns.as_slice(), used.saturating_sub(freed)).map_err(db_err)?;
            }
            removed.is_some()
        };
        txn.commit().map_err(db_err)?;
        Ok(existed)
    }
}
