//! The trust store: trusted publishers, revocations and anti-rollback marks, in redb.
//!
//! Every mutation is one redb write transaction, so a crash leaves either the old or the new
//! state. Values are small fixed layouts (little-endian), decoded defensively: a corrupt
//! record is an error naming the table, never a panic.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use referee_muscle::{
    FormatError, Header, KeyId, MuscleId, PublisherPublicKey, TrustFacts, TrustView, TrustedPublisher,
};

/// Publisher key id → [`encode_publisher`] record.
const PUBLISHERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("publishers");
/// [`Revocation::key`] → revoked-at (u64 LE) followed by the UTF-8 reason.
const REVOCATIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("revocations");
/// Publisher key id ‖ muscle name → highest accepted version.
const ACCEPTED: TableDefinition<&[u8], u64> = TableDefinition::new("accepted_versions");

/// Errors of the trust store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// The database could not be opened or used.
    #[error("trust store {context}: {source}")]
    Database {
        /// What was being done.
        context: &'static str,
        /// The redb error.
        #[source]
        source: Box<redb::Error>,
    },
    /// A stored record is not in the expected layout.
    #[error("trust store record in table `{table}` is corrupt; restore the store from a backup or re-add the entry")]
    Corrupt {
        /// The table.
        table: &'static str,
    },
    /// The muscle name is not valid.
    #[error("invalid muscle name: {0}")]
    InvalidName(#[from] FormatError),
    /// The publisher is not in the store.
    #[error("publisher {0} is not in the trust store (see `referee trust list`)")]
    UnknownPublisher(KeyId),
}

fn db_err<E: Into<redb::Error>>(context: &'static str) -> impl FnOnce(E) -> TrustError {
    move |e| TrustError::Database { context, source: Box::new(e.into()) }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A trusted publisher as stored.
#[derive(Clone, Debug)]
pub struct PublisherEntry {
    /// The key.
    pub key: PublisherPublicKey,
    /// Operator's label.
    pub label: String,
    /// Whether hybrid ML-DSA-65 signatures are required.
    pub require_post_quantum: bool,
    /// When it was added (seconds since the epoch).
    pub added_at: u64,
}

/// What can be revoked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revocation {
    /// Every muscle of a publisher.
    Publisher(KeyId),
    /// Every version of a muscle.
    Muscle(MuscleId),
    /// One version of a muscle.
    MuscleVersion(MuscleId, u64),
}

impl Revocation {
    /// Table key: kind byte, then the id, then the version (big-endian, so keys sort).
    fn key(&self) -> Vec<u8> {
        match self {
            Self::Publisher(id) => [&[0u8][..], &id.0].concat(),
            Self::Muscle(id) => [&[1u8][..], &id.0].concat(),
            Self::MuscleVersion(id, v) => [&[2u8][..], &id.0, &v.to_be_bytes()].concat(),
        }
    }

    fn from_key(key: &[u8]) -> Option<Self> {
        let (kind, rest) = key.split_first()?;
        match (kind, rest.len()) {
            (0, 32) => Some(Self::Publisher(KeyId(rest.try_into().ok()?))),
            (1, 16) => Some(Self::Muscle(MuscleId(rest.try_into().ok()?))),
            (2, 24) => {
                let (id, v) = rest.split_at(16);
                Some(Self::MuscleVersion(MuscleId(id.try_into().ok()?), u64::from_be_bytes(v.try_into().ok()?)))
            }
            _ => None,
        }
    }
}

/// A stored revocation.
#[derive(Clone, Debug)]
pub struct RevocationEntry {
    /// What is revoked.
    pub what: Revocation,
    /// When (seconds since the epoch).
    pub revoked_at: u64,
    /// Operator's reason.
    pub reason: String,
}

/// A stored anti-rollback mark.
#[derive(Clone, Debug)]
pub struct AcceptedEntry {
    /// Publisher.
    pub publisher: KeyId,
    /// Muscle name.
    pub name: String,
    /// Highest accepted version.
    pub version: u64,
}

/// Whether [`TrustStore::add_publisher`] changed anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddOutcome {
    /// The key was not trusted before.
    Added,
    /// The key was already trusted; its label and flags were updated.
    Updated,
}

fn encode_publisher(entry: &PublisherEntry) -> Vec<u8> {
    let label = entry.label.as_bytes();
    let label = label.get(..label.len().min(255)).unwrap_or_default();
    let mut out = Vec::with_capacity(10 + label.len() + 2048);
    out.push(u8::from(entry.require_post_quantum));
    out.extend_from_slice(&entry.added_at.to_le_bytes());
    out.push(label.len() as u8);
    out.extend_from_slice(label);
    out.extend_from_slice(&entry.key.to_bytes());
    out
}

fn decode_publisher(bytes: &[u8]) -> Option<PublisherEntry> {
    let (&flags, rest) = bytes.split_first()?;
    let (added, rest) = rest.split_at_checked(8)?;
    let (&label_len, rest) = rest.split_first()?;
    let (label, key) = rest.split_at_checked(usize::from(label_len))?;
    Some(PublisherEntry {
        key: PublisherPublicKey::from_bytes(key).ok()?,
        label: String::from_utf8(label.to_vec()).ok()?,
        require_post_quantum: flags & 1 != 0,
        added_at: u64::from_le_bytes(added.try_into().ok()?),
    })
}

fn accepted_key(publisher: &KeyId, name: &str) -> Vec<u8> {
    [&publisher.0[..], name.as_bytes()].concat()
}

/// The trust store of one referee.
pub struct TrustStore {
    db: Database,
}

impl std::fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustStore").finish_non_exhaustive()
    }
}

impl TrustStore {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, TrustError> {
        let db = Database::create(path).map_err(db_err("open"))?;
        // Trusted publishers, revocations, anti-rollback marks: the owner's only.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| TrustError::Database { context: "chmod 600", source: Box::new(redb::Error::Io(e)) })?;
        let txn = db.begin_write().map_err(db_err("initialise"))?;
        {
            txn.open_table(PUBLISHERS).map_err(db_err("initialise"))?;
            txn.open_table(REVOCATIONS).map_err(db_err("initialise"))?;
            txn.open_table(ACCEPTED).map_err(db_err("initialise"))?;
        }
        txn.commit().map_err(db_err("initialise"))?;
        Ok(Self { db })
    }

    /// Trusts a publisher key (or updates its label and post-quantum requirement).
    pub fn add_publisher(
        &self,
        key: &PublisherPublicKey,
        label: &str,
        require_post_quantum: bool,
    ) -> Result<AddOutcome, TrustError> {
        let id = key.key_id();
        let txn = self.db.begin_write().map_err(db_err("write"))?;
        let outcome = {
            let mut table = txn.open_table(PUBLISHERS).map_err(db_err("write"))?;
            let existing =
                table.get(id.0.as_slice()).map_err(db_err("read"))?.and_then(|v| decode_publisher(v.value()));
            let entry = PublisherEntry {
                key: key.clone(),
                label: label.to_owned(),
                require_post_quantum,
                added_at: existing.as_ref().map_or_else(now, |e| e.added_at),
            };
            table.insert(id.0.as_slice(), encode_publisher(&entry).as_slice()).map_err(db_err("write"))?;
            if existing.is_some() { AddOutcome::Updated } else { AddOutcome::Added }
        };
        txn.commit().map_err(db_err("commit"))?;
        Ok(outcome)
    }

    /// Stops trusting a publisher. Returns whether it was trusted.
    pub fn remove_publisher(&self, id: &KeyId) -> Result<bool, TrustError> {
        let txn = self.db.begin_write().map_err(db_err("write"))?;
        let removed = txn
            .open_table(PUBLISHERS)
            .map_err(db_err("write"))?
            .remove(id.0.as_slice())
            .map_err(db_err("write"))?
            .is_some();
        txn.commit().map_err(db_err("commit"))?;
        Ok(removed)
    }

    /// All trusted publishers, ordered by key id.
    pub fn publishers(&self) -> Result<Vec<PublisherEntry>, TrustError> {
        let txn = self.db.begin_read().map_err(db_err("read"))?;
        let table = txn.open_table(PUBLISHERS).map_err(db_err("read"))?;
        table
            .iter()
            .map_err(db_err("read"))?
            .map(|row| {
                let (_, v) = row.map_err(db_err("read"))?;
                decode_publisher(v.value()).ok_or(TrustError::Corrupt { table: "publishers" })
            })
            .collect()
    }

    /// Records a revocation. Revoking twice keeps the first time and reason.
    pub fn revoke(&self, what: Revocation, reason: &str) -> Result<(), TrustError> {
        let key = what.key();
        let value = [&now().to_le_bytes()[..], reason.as_bytes()].concat();
        let txn = self.db.begin_write().map_err(db_err("write"))?;
        {
            let mut table = txn.open_table(REVOCATIONS).map_err(db_err("write"))?;
            if table.get(key.as_slice()).map_err(db_err("read"))?.is_none() {
                table.insert(key.as_slice(), value.as_slice()).map_err(db_err("write"))?;
            }
        }
        txn.commit().map_err(db_err("commit"))
    }

    /// All revocations.
    pub fn revocations(&self) -> Result<Vec<RevocationEntry>, TrustError> {
        let txn = self.db.begin_read().map_err(db_err("read"))?;
        let table = txn.open_table(REVOCATIONS).map_err(db_err("read"))?;
        table
            .iter()
            .map_err(db_err("read"))?
            .map(|row| {
                let (k, v) = row.map_err(db_err("read"))?;
                let corrupt = TrustError::Corrupt { table: "revocations" };
                let what = Revocation::from_key(k.value()).ok_or(TrustError::Corrupt { table: "revocations" })?;
                let (at, reason) = v.value().split_at_checked(8).ok_or(TrustError::Corrupt { table: "revocations" })?;
                Ok(RevocationEntry {
                    what,
                    revoked_at: u64::from_le_bytes(at.try_into().map_err(|_| corrupt)?),
                    reason: String::from_utf8_lossy(reason).into_owned(),
                })
            })
            .collect()
    }

    /// Raises the anti-rollback mark for the header's (publisher, name) to its version.
    /// Never lowers it. Returns the mark after the call.
    pub fn record_accepted(&self, header: &Header) -> Result<u64, TrustError> {
        let key = accepted_key(&header.publisher, &header.name);
        // Reloading an accepted version is common; skip the durable write when nothing changes.
        let current = {
            let txn = self.db.begin_read().map_err(db_err("read"))?;
            let table = txn.open_table(ACCEPTED).map_err(db_err("read"))?;
            table.get(key.as_slice()).map_err(db_err("read"))?.map(|v| v.value())
        };
        if let Some(mark) = current.filter(|m| *m >= header.version) {
            return Ok(mark);
        }
        let txn = self.db.begin_write().map_err(db_err("write"))?;
        let mark = {
            let mut table = txn.open_table(ACCEPTED).map_err(db_err("write"))?;
            let current = table.get(key.as_slice()).map_err(db_err("read"))?.map(|v| v.value());
            let mark = current.map_or(header.version, |c| c.max(header.version));
            table.insert(key.as_slice(), mark).map_err(db_err("write"))?;
            mark
        };
        txn.commit().map_err(db_err("commit"))?;
        Ok(mark)
    }

    /// The operator's explicit override: sets the mark for (publisher, name) to `version`,
    /// allowing versions from `version` up. Returns the previous mark.
    pub fn allow_rollback(&self, publisher: &KeyId, name: &str, version: u64) -> Result<Option<u64>, TrustError> {
        referee_muscle::Header::validate_name(name)?;
        let key = accepted_key(publisher, name);
        let txn = self.db.begin_write().map_err(db_err("write"))?;
        let previous = {
            let mut table = txn.open_table(ACCEPTED).map_err(db_err("write"))?;
            table.insert(key.as_slice(), version).map_err(db_err("write"))?.map(|v| v.value())
        };
        txn.commit().map_err(db_err("commit"))?;
        Ok(previous)
    }

    /// All anti-rollback marks.
    pub fn accepted(&self) -> Result<Vec<AcceptedEntry>, TrustError> {
        let txn = self.db.begin_read().map_err(db_err("read"))?;
        let table = txn.open_table(ACCEPTED).map_err(db_err("read"))?;
        table
            .iter()
            .map_err(db_err("read"))?
            .map(|row| {
                let (k, v) = row.map_err(db_err("read"))?;
                let (id, name) =
                    k.value().split_at_checked(32).ok_or(TrustError::Corrupt { table: "accepted_versions" })?;
                Ok(AcceptedEntry {
                    publisher: KeyId(id.try_into().map_err(|_| TrustError::Corrupt { table: "accepted_versions" })?),
                    name: String::from_utf8_lossy(name).into_owned(),
                    version: v.value(),
                })
            })
            .collect()
    }

    fn lookup(&self, header: &Header) -> Result<TrustFacts, TrustError> {
        let txn = self.db.begin_read().map_err(db_err("read"))?;
        let publishers = txn.open_table(PUBLISHERS).map_err(db_err("read"))?;
        let publisher = match publishers.get(header.publisher.0.as_slice()).map_err(db_err("read"))? {
            Some(v) => {
                let entry = decode_publisher(v.value()).ok_or(TrustError::Corrupt { table: "publishers" })?;
                Some(TrustedPublisher { key: entry.key, require_post_quantum: entry.require_post_quantum })
            }
            None => None,
        };
        let revocations = txn.open_table(REVOCATIONS).map_err(db_err("read"))?;
        let revoked = |what: Revocation| -> Result<bool, TrustError> {
            Ok(revocations.get(what.key().as_slice()).map_err(db_err("read"))?.is_some())
        };
        let accepted = txn.open_table(ACCEPTED).map_err(db_err("read"))?;
        let highest_accepted = accepted
            .get(accepted_key(&header.publisher, &header.name).as_slice())
            .map_err(db_err("read"))?
            .map(|v| v.value());
        Ok(TrustFacts {
            publisher,
            publisher_revoked: revoked(Revocation::Publisher(header.publisher))?,
            muscle_revoked: revoked(Revocation::Muscle(header.muscle_id))?,
            version_revoked: revoked(Revocation::MuscleVersion(header.muscle_id, header.version))?,
            highest_accepted,
        })
    }
}

impl TrustView for TrustStore {
    fn facts(&self, header: &Header) -> Result<TrustFacts, String> {
        self.lookup(header).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn revocation_keys_round_trip(id in any::<[u8; 32]>(), mid in any::<[u8; 16]>(), v in any::<u64>()) {
            for what in [Revocation::Publisher(KeyId(id)), Revocation::Muscle(MuscleId(mid)), Revocation::MuscleVersion(MuscleId(mid), v)] {
                prop_assert_eq!(Revocation::from_key(&what.key()), Some(what));
            }
        }

        #[test]
        fn corrupt_records_decode_to_none_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..2100)) {
            let _ = decode_publisher(&bytes);
            let _ = Revocation::from_key(&bytes);
        }
    }
}
