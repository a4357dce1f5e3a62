//! The append-only, hash-chained audit log.
//!
//! Record `n` is stored under key `n` (from 1) as `prev_hash (32) ‖ time_ms (u64 LE) ‖ event
//! JSON`, and its hash is `SHA-256("referee/audit/v1" ‖ n (u64 LE) ‖ stored bytes)`. Each record
//! covers its predecessor's hash, and a separate head entry holds the last sequence number and
//! hash, so modification, deletion (also of the tail), insertion and reordering all break a
//! link that [`AuditLog::verify`] reports with its position.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::RuntimeError;

const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_records");
const HEAD: TableDefinition<&str, &[u8]> = TableDefinition::new("audit_head");

/// Hash of the (empty) chain before the first record.
pub const GENESIS: [u8; 32] = [0; 32];

/// One decoded audit record.
#[derive(Clone, Debug)]
pub struct AuditRecord {
    /// Sequence number, from 1.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The event: `{"kind": …, …}`.
    pub event: Value,
    /// This record's hash.
    pub hash: [u8; 32],
}

/// Where and how the chain is broken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuditViolation {
    /// A sequence number is missing: a record was deleted (or the log re-numbered).
    #[error("record {expected} is missing (found {found} next): a record was deleted or inserted")]
    Gap {
        /// The sequence number that should come next.
        expected: u64,
        /// The one found instead.
        found: u64,
    },
    /// A record does not link to its predecessor's hash.
    #[error("record {seq} does not link to record {prev}: one of them was modified, inserted or reordered")]
    BrokenLink {
        /// The record whose link is wrong.
        seq: u64,
        /// Its predecessor.
        prev: u64,
    },
    /// A record is too short to hold its fixed fields, or its event is not JSON.
    #[error("record {seq} is malformed: it was modified")]
    Malformed {
        /// The record.
        seq: u64,
    },
    /// The head entry does not match the last record.
    #[error(
        "the log ends at record {last} but the head says {head_seq}: records were deleted from or appended to the end"
    )]
    HeadMismatch {
        /// Last record present.
        last: u64,
        /// Sequence number the head records.
        head_seq: u64,
    },
}

/// Result of a successful verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditHead {
    /// Number of records.
    pub records: u64,
    /// Hash of the last record ([`GENESIS`] when empty).
    pub hash: [u8; 32],
}

fn record_hash(seq: u64, stored: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(b"referee/audit/v1")
        .chain_update(seq.to_le_bytes())
        .chain_update(stored)
        .finalize()
        .into()
}

fn decode_head(bytes: &[u8]) -> Option<(u64, [u8; 32])> {
    let (seq, hash) = bytes.split_at_checked(8)?;
    Some((u64::from_le_bytes(seq.try_into().ok()?), hash.try_into().ok()?))
}

fn db_err<E: Into<redb::Error>>(e: E) -> RuntimeError {
    RuntimeError::Store(e.into().to_string())
}

/// The audit log of one referee, in its state database.
#[derive(Clone)]
pub struct AuditLog {
    db: Arc<Database>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Uses (and initialises) the audit tables of `db`.
    pub fn new(db: Arc<Database>) -> Result<Self, RuntimeError> {
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(RECORDS).map_err(db_err)?;
        txn.open_table(HEAD).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(Self { db })
    }

    /// Opens the audit log of an existing state database, to verify or read it without a
    /// running referee.
    pub fn open_existing(path: &std::path::Path) -> Result<Self, RuntimeError> {
        let db = Database::open(path).map_err(|e| RuntimeError::Store(format!("{}: {e}", path.display())))?;
        Self::new(Arc::new(db))
    }

    /// Appends one event durably and returns its sequence number.
    pub fn append(&self, event: &Value) -> Result<u64, RuntimeError> {
        self.append_batch(std::slice::from_ref(event))
    }

    /// Appends `events` in order, durably, in one transaction (one disk sync for all of them);
    /// returns the last one's sequence number (the current head's when `events` is empty).
    pub fn append_batch(&self, events: &[Value]) -> Result<u64, RuntimeError> {
        let time_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let txn = self.db.begin_write().map_err(db_err)?;
        let seq = {
            let mut head = txn.open_table(HEAD).map_err(db_err)?;
            let (mut seq, mut prev) = match head.get("head").map_err(db_err)? {
                Some(v) => decode_head(v.value()).ok_or_else(|| RuntimeError::Store("audit head is corrupt".into()))?,
                None => (0, GENESIS),
            };
            let mut records = txn.open_table(RECORDS).map_err(db_err)?;
            for event in events {
                seq += 1;
                let mut stored = Vec::with_capacity(128);
                stored.extend_from_slice(&prev);
                stored.extend_from_slice(&time_ms.to_le_bytes());
                stored.extend_from_slice(event.to_string().as_bytes());
                prev = record_hash(seq, &stored);
                records.insert(seq, stored.as_slice()).map_err(db_err)?;
            }
            head.insert("head", [&seq.to_le_bytes()[..], &prev].concat().as_slice()).map_err(db_err)?;
            seq
        };
        txn.commit().map_err(db_err)?;
        Ok(seq)
    }

    /// Walks the whole chain; the first violation found is returned with its position.
    pub fn verify(&self) -> Result<Result<AuditHead, AuditViolation>, RuntimeError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let records = txn.open_table(RECORDS).map_err(db_err)?;
        let mut expected = 1u64;
        let mut prev_hash = GENESIS;
        for row in records.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let seq = k.value();
            if seq != expected {
                return Ok(Err(AuditViolation::Gap { expected, found: seq }));
            }
            let stored = v.value();
            let Some(link) = stored.get(..32) else {
                return Ok(Err(AuditViolation::Malformed { seq }));
            };
            if link != prev_hash {
                return Ok(Err(AuditViolation::BrokenLink { seq, prev: seq - 1 }));
            }
            prev_hash = record_hash(seq, stored);
            expected += 1;
        }
        let last = expected - 1;
        let head = txn.open_table(HEAD).map_err(db_err)?;
        let (head_seq, head_hash) = match head.get("head").map_err(db_err)? {
            Some(v) => decode_head(v.value()).unwrap_or((u64::MAX, GENESIS)),
            None => (0, GENESIS),
        };
        if head_seq != last || head_hash != prev_hash {
            return Ok(Err(AuditViolation::HeadMismatch { last, head_seq }));
        }
        Ok(Ok(AuditHead { records: last, hash: prev_hash }))
    }

    /// The head (record count and last hash) without verifying the chain.
    pub fn head(&self) -> Result<AuditHead, RuntimeError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let head = txn.open_table(HEAD).map_err(db_err)?;
        let (records, hash) = match head.get("head").map_err(db_err)? {
            Some(v) => decode_head(v.value()).ok_or_else(|| RuntimeError::Store("audit head is corrupt".into()))?,
            None => (0, GENESIS),
        };
        Ok(AuditHead { records, hash })
    }

    /// The last `n` records, oldest first.
    pub fn tail(&self, n: usize) -> Result<Vec<AuditRecord>, RuntimeError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let records = txn.open_table(RECORDS).map_err(db_err)?;
        let mut out = Vec::with_capacity(n);
        for row in records.iter().map_err(db_err)?.rev().take(n) {
            let (k, v) = row.map_err(db_err)?;
            let stored = v.value();
            let time_ms = stored.get(32..40).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes);
            let event = stored.get(40..).and_then(|b| serde_json::from_slice(b).ok()).unwrap_or(Value::Null);
            out.push(AuditRecord { seq: k.value(), time_ms, event, hash: record_hash(k.value(), stored) });
        }
        out.reverse();
        Ok(out)
    }

    /// Test and forensics hook: the raw stored bytes of every record, and a way to write them
    /// back, so tamper tests can edit the store exactly as an attacker with file access could.
    #[doc(hidden)]
    pub fn raw_records(&self) -> Result<Vec<(u64, Vec<u8>)>, RuntimeError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let records = txn.open_table(RECORDS).map_err(db_err)?;
        records
            .iter()
            .map_err(db_err)?
            .map(|row| row.map(|(k, v)| (k.value(), v.value().to_vec())).map_err(db_err))
            .collect()
    }

    /// See [`Self::raw_records`]: replaces the whole table (head untouched).
    #[doc(hidden)]
    pub fn overwrite_raw_records(&self, rows: &[(u64, Vec<u8>)]) -> Result<(), RuntimeError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        txn.delete_table(RECORDS).map_err(db_err)?;
        {
            let mut table = txn.open_table(RECORDS).map_err(db_err)?;
            for (k, v) in rows {
                table.insert(*k, v.as_slice()).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn log_with(n: u64) -> Result<(tempfile::TempDir, AuditLog), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let db = Arc::new(Database::create(dir.path().join("state.redb"))?);
        let log = AuditLog::new(db)?;
        for i in 0..n {
            log.append(&json!({ "kind": "test", "i": i }))?;
        }
        Ok((dir, log))
    }

    #[test]
    fn intact_chain_verifies_and_head_matches() -> TestResult {
        let (_dir, log) = log_with(5)?;
        let head = log.verify()?.map_err(|v| v.to_string())?;
        assert_eq!(head.records, 5);
        assert_eq!(head, log.head()?);
        assert_eq!(log.tail(2)?.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![4, 5]);
        Ok(())
    }

    #[test]
    fn modification_is_detected_at_the_next_link() -> TestResult {
        let (_dir, log) = log_with(5)?;
        let mut rows = log.raw_records()?;
        if let Some(last) = rows.get_mut(2).and_then(|(_, bytes)| bytes.last_mut()) {
            *last ^= 1;
        }
        log.overwrite_raw_records(&rows)?;
        assert_eq!(log.verify()?, Err(AuditViolation::BrokenLink { seq: 4, prev: 3 }));
        Ok(())
    }

    #[test]
    fn deletion_in_the_middle_and_at_the_end_is_detected() -> TestResult {
        let (_dir, log) = log_with(5)?;
        let rows = log.raw_records()?;
        let without_3: Vec<_> = rows.iter().filter(|(k, _)| *k != 3).cloned().collect();
        log.overwrite_raw_records(&without_3)?;
        assert_eq!(log.verify()?, Err(AuditViolation::Gap { expected: 3, found: 4 }));
        let without_tail: Vec<_> = rows.iter().filter(|(k, _)| *k != 5).cloned().collect();
        log.overwrite_raw_records(&without_tail)?;
        assert_eq!(log.verify()?, Err(AuditViolation::HeadMismatch { last: 4, head_seq: 5 }));
        Ok(())
    }

    #[test]
    fn insertion_and_reordering_are_detected() -> TestResult {
        let (_dir, log) = log_with(4)?;
        let rows = log.raw_records()?;
        // Reorder: swap the contents of records 2 and 3.
        let mut swapped = rows.clone();
        if let [_, a, b, ..] = swapped.as_mut_slice() {
            std::mem::swap(&mut a.1, &mut b.1);
        }
        log.overwrite_raw_records(&swapped)?;
        assert_eq!(log.verify()?, Err(AuditViolation::BrokenLink { seq: 2, prev: 1 }));
        // Insert: a forged record 3 pushed between 2 and the renumbered rest.
        let mut inserted: Vec<_> = rows.iter().take(2).cloned().collect();
        inserted.push((3, rows.get(1).map(|r| r.1.clone()).unwrap_or_default()));
        inserted.extend(rows.iter().skip(2).map(|(k, v)| (k + 1, v.clone())));
        log.overwrite_raw_records(&inserted)?;
        assert!(matches!(log.verify()?, Err(AuditViolation::BrokenLink { seq: 3, .. })));
        Ok(())
    }
}
