//! The event store: one redb file holding an append-only event stream per worknode.
//!
//! - **Sequence numbers** start at 1 per stream; a stream's *version* is its last sequence number
//!   (0 = empty).
//! - **Optimistic concurrency**: [`Expected::Exact`] refuses an append unless the stream is at that
//!   version ([`StoreError::Conflict`]).
//! - **Idempotency**: an event id is stored once. Re-appending an id is a no-op that returns the
//!   original sequence number (checked before the version, so a retry after a lost ack succeeds).
//! - **Group commit**: one writer thread drains every queued request into a single write
//!   transaction committed with [`Durability::Immediate`] (one fsync for the batch); callers are
//!   acknowledged only after that commit returned.
//! - **Snapshots** and worknode metadata live in their own tables, written through the same writer.
//!
//! Keys are fixed-width big-endian byte arrays (`stream(16) ‖ seq(8)`), so no platform-width integer
//! reaches the file and a range scan returns a stream in order.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use crate::error::StoreError;
use crate::id::WorknodeId;

const EVENTS: TableDefinition<&[u8; 24], &[u8]> = TableDefinition::new("wn_events");
const HEADS: TableDefinition<&[u8; 16], u64> = TableDefinition::new("wn_heads");
const EVENT_IDS: TableDefinition<&[u8; 16], &[u8; 24]> = TableDefinition::new("wn_event_ids");
const SNAPSHOTS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("wn_snapshots");
const META: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("wn_meta");
const REVOKED: TableDefinition<&[u8], u64> = TableDefinition::new("wn_revoked");
const KEPT: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("wn_kept");

/// A kept signed change as stored: its key (author replica and sequence number) and value.
pub type KeptRow = ([u8; 16], Vec<u8>);

/// A globally unique event id (a UUID v7 by default), the idempotency key.
pub type EventId = [u8; 16];

/// The version a writer expects the stream to be at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// No check.
    Any,
    /// The stream's last sequence number must be exactly this (0: the stream must be empty).
    Exact(u64),
}

/// An event to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Idempotency key.
    pub id: EventId,
    /// Opaque payload (the worknode system stores MessagePack-encoded deltas).
    pub body: Vec<u8>,
}

impl NewEvent {
    /// An event with a fresh UUID v7 id.
    pub fn new(body: Vec<u8>) -> Self {
        Self { id: *uuid::Uuid::now_v7().as_bytes(), body }
    }
}

/// A stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Position in its stream, from 1.
    pub seq: u64,
    /// Idempotency key.
    pub id: EventId,
    /// Payload.
    pub body: Vec<u8>,
}

/// The outcome of an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Sequence number of each event, in request order (original numbers for duplicates).
    pub seqs: Vec<u64>,
    /// The stream's version after the append.
    pub version: u64,
}

/// Counters for observing group commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Write transactions committed.
    pub commits: u64,
    /// Requests (appends and puts) acknowledged.
    pub requests: u64,
}

/// Tuning.
#[derive(Debug, Clone, Copy)]
pub struct StoreConfig {
    /// Most requests folded into one write transaction.
    pub max_batch: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self { max_batch: 4096 }
    }
}

#[derive(Debug, Clone, Copy)]
enum Aux {
    Snapshot,
    Meta,
    Revoked,
    Kept,
}

enum Cmd {
    Append {
        stream: WorknodeId,
        expected: Expected,
        events: Vec<NewEvent>,
        reply: SyncSender<Result<Appended, StoreError>>,
    },
    Put {
        table: Aux,
        key: Vec<u8>,
        value: Vec<u8>,
        reply: SyncSender<Result<(), StoreError>>,
    },
    /// Removes keys of a table (only [`Aux::Kept`] has removals).
    Remove {
        table: Aux,
        keys: Vec<Vec<u8>>,
        reply: SyncSender<Result<(), StoreError>>,
    },
}

pub(crate) type Opener = Box<dyn Fn() -> Result<Database, redb::Error> + Send + Sync>;

/// The database handle. After an I/O error (a full disk, say) redb refuses every operation
/// until the file is closed and opened again: the writer does that before its next batch, so
/// the store works again once the cause is gone, without a restart.
struct Db {
    current: RwLock<Option<Arc<Database>>>,
    /// A read hit an I/O error: reopen before the next.
    broken: std::sync::atomic::AtomicBool,
    open: Opener,
    path: String,
}

impl Db {
    fn closed(&self, reason: &str) -> StoreError {
        StoreError::Database { path: self.path.clone(), reason: reason.to_owned() }
    }

    fn get(&self) -> Result<Arc<Database>, StoreError> {
        if self.broken.swap(false, Ordering::AcqRel) {
            self.reopen()?;
        }
        if let Some(db) = self.current.read().unwrap_or_else(PoisonError::into_inner).clone() {
            return Ok(db);
        }
        // A failed reopen left it closed: try again.
        self.reopen()?;
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone().ok_or_else(|| self.closed("closed"))
    }

    /// Closes the file and opens it again (redb recovers it to its last commit).
    fn reopen(&self) -> Result<(), StoreError> {
        let mut slot = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(mut old) = slot.take() {
            // Readers clone the handle under the read lock and drop it when their read ends.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => break drop(db),
                    Err(held) if Instant::now() < deadline => {
                        old = held;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(held) => {
                        *slot = Some(held);
                        return Err(self.closed("cannot reopen after an I/O error: readers still hold the file"));
                    }
                }
            }
        }
        let db = (self.open)().map_err(|e| self.closed(&format!("cannot reopen after an I/O error: {e}")))?;
        *slot = Some(Arc::new(db));
        Ok(())
    }
}

/// A handle on the store; share it with `Arc`. Reads run on the caller's thread, writes on the
/// group-commit writer.
pub struct EventStore {
    db: Arc<Db>,
    path: PathBuf,
    tx: Option<Sender<Cmd>>,
    writer: Option<JoinHandle<()>>,
    commits: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    /// Bytes of kept signed changes queued without waiting and not yet committed.
    detached: Arc<AtomicUsize>,
}

/// Most bytes of kept signed changes waiting for the writer ([`EventStore::keep_detached`]):
/// beyond, a change is not stored (it is kept in memory only), so a disk slower than the
/// network does not queue copies without bound.
pub const DETACHED_MAX_BYTES: usize = 64 << 20;

impl std::fmt::Debug for EventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStore").field("path", &self.path).finish_non_exhaustive()
    }
}

fn key(stream: WorknodeId, seq: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(&stream.to_bytes());
    k[16..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn seq_of(k: &[u8; 24]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&k[16..]);
    u64::from_be_bytes(b)
}

fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt { what: what.into(), reason: reason.into() }
}

impl EventStore {
    /// Opens (or creates) the store at `path` and starts its writer thread.
    pub fn open(path: &Path, cfg: StoreConfig) -> Result<Self, StoreError> {
        let file = path.to_owned();
        let store = Self::open_with(path, cfg, Box::new(move || Database::create(&file).map_err(Into::into)))?;
        // Every worknode's state: the owner's only, whatever the umask.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(|e| {
            StoreError::Database { path: path.display().to_string(), reason: format!("chmod 600: {e}") }
        })?;
        Ok(store)
    }

    /// Opens the store with `open` (also used to reopen it after an I/O error).
    pub(crate) fn open_with(path: &Path, cfg: StoreConfig, open: Opener) -> Result<Self, StoreError> {
        let err = |e: redb::Error| StoreError::Database { path: path.display().to_string(), reason: e.to_string() };
        let db = Arc::new(open().map_err(err)?);
        let txn = db.begin_write().map_err(|e| err(e.into()))?;
        {
            txn.open_table(EVENTS).map_err(|e| err(e.into()))?;
            txn.open_table(HEADS).map_err(|e| err(e.into()))?;
            txn.open_table(EVENT_IDS).map_err(|e| err(e.into()))?;
            txn.open_table(SNAPSHOTS).map_err(|e| err(e.into()))?;
            txn.open_table(META).map_err(|e| err(e.into()))?;
            txn.open_table(REVOKED).map_err(|e| err(e.into()))?;
            txn.open_table(KEPT).map_err(|e| err(e.into()))?;
        }
        txn.commit().map_err(|e| err(e.into()))?;
        let db = Arc::new(Db {
            current: RwLock::new(Some(db)),
            broken: std::sync::atomic::AtomicBool::new(false),
            open,
            path: path.display().to_string(),
        });
        let (tx, rx) = mpsc::channel();
        let (commits, requests) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let detached = Arc::new(AtomicUsize::new(0));
        let writer = Writer {
            db: db.clone(),
            path: path.display().to_string(),
            max_batch: cfg.max_batch.max(1),
            commits: commits.clone(),
            requests: requests.clone(),
            detached: detached.clone(),
            poisoned: Cell::new(false),
        };
        let handle =
            std::thread::Builder::new().name("wn-store-writer".into()).spawn(move || writer.run(rx)).map_err(|e| {
                StoreError::Database {
                    path: path.display().to_string(),
                    reason: format!("cannot start writer thread: {e}"),
                }
            })?;
        Ok(Self { db, path: path.to_owned(), tx: Some(tx), writer: Some(handle), commits, requests, detached })
    }

    fn db_err<E: Into<redb::Error>>(&self, e: E) -> StoreError {
        let e = e.into();
        if matches!(e, redb::Error::PreviousIo | redb::Error::Io(_)) {
            // Reads fail too until the file is reopened: the next `get` does it, so a worknode
            // whose log must be read back recovers even when no write reaches the writer.
            self.db.broken.store(true, Ordering::Release);
        }
        StoreError::Database { path: self.path.display().to_string(), reason: e.to_string() }
    }

    fn submit<T>(&self, make: impl FnOnce(SyncSender<Result<T, StoreError>>) -> Cmd) -> Result<T, StoreError> {
        let (reply, wait) = mpsc::sync_channel(1);
        self.tx.as_ref().ok_or(StoreError::Closed)?.send(make(reply)).map_err(|_| StoreError::Closed)?;
        wait.recv().map_err(|_| StoreError::Closed)?
    }

    /// Appends `events` to `stream` and returns once they are durable (group-committed).
    pub fn append(
        &self,
        stream: WorknodeId,
        expected: Expected,
        events: Vec<NewEvent>,
    ) -> Result<Appended, StoreError> {
        self.submit(|reply| Cmd::Append { stream, expected, events, reply })
    }

    fn put(&self, table: Aux, key: Vec<u8>, value: Vec<u8>) -> Result<(), StoreError> {
        self.submit(|reply| Cmd::Put { table, key, value, reply })
    }

    /// Stores a snapshot of `stream`'s state as of sequence `seq` (replaces the previous one).
    pub fn save_snapshot(&self, stream: WorknodeId, seq: u64, state: &[u8]) -> Result<(), StoreError> {
        self.put(Aux::Snapshot, stream.to_bytes().to_vec(), [&seq.to_be_bytes()[..], state].concat())
    }

    /// Stores a worknode's metadata record (durable on return).
    pub fn put_meta(&self, stream: WorknodeId, meta: &[u8]) -> Result<(), StoreError> {
        self.put(Aux::Meta, stream.to_bytes().to_vec(), meta.to_vec())
    }

    /// Records a revoked token revocation id (durable on return).
    pub fn put_revoked(&self, revocation_id: &[u8]) -> Result<(), StoreError> {
        self.put(Aux::Revoked, revocation_id.to_vec(), Vec::new())
    }

    /// Queues `value` under `key` in the table of kept signed changes (the replication layer's
    /// store and forward) and returns at once: written with the next group commit, or lost with
    /// a crash before it (the replication layer repairs either way). Not queued (`false`) while
    /// [`DETACHED_MAX_BYTES`] wait already.
    pub fn keep_detached(&self, key: [u8; 16], value: Vec<u8>) -> bool {
        let len = value.len();
        if self.detached.fetch_add(len, Ordering::AcqRel).saturating_add(len) > DETACHED_MAX_BYTES {
            self.detached.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        let (reply, _) = mpsc::sync_channel(1);
        let queued = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.send(Cmd::Put { table: Aux::Kept, key: key.to_vec(), value, reply }).is_ok());
        if !queued {
            self.detached.fetch_sub(len, Ordering::AcqRel);
        }
        queued
    }

    /// Queues the removal of kept signed changes and returns at once (see
    /// [`EventStore::keep_detached`], whose bound it shares: beyond it the rows stay, and are
    /// dropped again when loaded).
    pub fn forget_detached(&self, keys: Vec<[u8; 16]>) {
        if keys.is_empty() {
            return;
        }
        let len = removal_bytes(keys.len());
        if self.detached.fetch_add(len, Ordering::AcqRel).saturating_add(len) > DETACHED_MAX_BYTES {
            self.detached.fetch_sub(len, Ordering::AcqRel);
            return;
        }
        let (reply, _) = mpsc::sync_channel(1);
        let keys = keys.iter().map(|k| k.to_vec()).collect();
        if self.tx.as_ref().is_none_or(|tx| tx.send(Cmd::Remove { table: Aux::Kept, keys, reply }).is_err()) {
            self.detached.fetch_sub(len, Ordering::AcqRel);
        }
    }

    /// Every kept signed change, by key.
    pub fn kept(&self) -> Result<Vec<KeptRow>, StoreError> {
        let db = self.db.get()?;
        let txn = db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(KEPT).map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = row.map_err(|e| self.db_err(e))?;
            out.push((*k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// The stream's version (last sequence number; 0 if empty).
    pub fn version(&self, stream: WorknodeId) -> Result<u64, StoreError> {
        let db = self.db.get()?;
        let txn = db.begin_read().map_err(|e| self.db_err(e))?;
        let heads = txn.open_table(HEADS).map_err(|e| self.db_err(e))?;
        Ok(heads.get(&stream.to_bytes()).map_err(|e| self.db_err(e))?.map_or(0, |v| v.value()))
    }

    /// Events of `stream` with sequence numbers `>= from`, in order.
    pub fn read(&self, stream: WorknodeId, from: u64) -> Result<Vec<StoredEvent>, StoreError> {
        let db = self.db.get()?;
        let txn = db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(EVENTS).map_err(|e| self.db_err(e))?;
        let (lo, hi) = (key(stream, from), key(stream, u64::MAX));
        let mut out = Vec::new();
        for row in table.range::<&[u8; 24]>(&lo..=&hi).map_err(|e| self.db_err(e))? {
            let (k, v) = row.map_err(|e| self.db_err(e))?;
            let v = v.value();
            let (id, body) = v
                .split_first_chunk::<16>()
                .ok_or_else(|| corrupt(format!("{stream}/{}", seq_of(k.value())), "event shorter than its id"))?;
            out.push(StoredEvent { seq: seq_of(k.value()), id: *id, body: body.to_vec() });
        }
        Ok(out)
    }

    /// Where event `id` is stored, if it is: its stream and sequence number (the idempotency
    /// lookup).
    pub fn find(&self, id: &EventId) -> Result<Option<(WorknodeId, u64)>, StoreError> {
        let db = self.db.get()?;
        let txn = db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(EVENT_IDS).map_err(|e| self.db_err(e))?;
        let Some(k) = table.get(id).map_err(|e| self.db_err(e))? else { return Ok(None) };
        let k = k.value();
        let mut stream = [0u8; 16];
        stream.copy_from_slice(&k[..16]);
        Ok(Some((WorknodeId::from_bytes(stream), seq_of(k))))
    }

    /// Event `id` if it is stored: its stream, sequence number and body (to tell a duplicate
    /// from another event under the same id).
    pub fn event(&self, id: &EventId) -> Result<Option<(WorknodeId, u64, Vec<u8>)>, StoreError> {
        let db = self.db.get()?;
        let txn = db.begin_read().map_err(|e| self.db_err(e))?;
        let ids = txn.open_table(EVENT_IDS).map_err(|e| self.db_err(e))?;
        let Some(k) = ids.get(id).map_err(|e| self.db_err(e))? else { return Ok(None) };
        let k = *k.value();
        let mut stream = [0u8; 16];
        stream.copy_from_slice(&k[..16]);
        let stream = WorknodeId::from_bytes(stream);
        let events = txn.open_table(EVENTS).map_err(|e| self.db_err(e))?;
        let Some(v) = events.get(&k).map_err(|e| self.db_err(e))? else {
            return Err(corrupt(format!("{stream}/{}", seq_of(&k)), "an event id without its event"));
        };
        let body = v
            .value()
            .get(16..)
            .ok_or_else(|| corrupt(format!("{stream}/{}", seq_of(&k)), "event shorter than its id"))?;
        Ok(Some((stream, seq_of(&k), body.to_vec())))
    }

    /// The latest snapshot of `stream`: `(seq, state)`.
    pub fn snapshot(&self, stream: WorknodeId) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let db = self.db.get()?;
        let txn = db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(SNAPSHOTS).map_err(|e| self.db_err(e))?;
        let Some(v) = table.get(&stream.to_bytes()).map_err(|e| self.db_err(e))? else { return Ok(None) };
        let v = v.value();
        let (seq, state) = v
            .split_first_chunk::<8>()
            .ok_or_else(|| corrupt(format!("snapshot of {stream}"), "shorter than its sequence number"))?;
        Ok(Some((u64::from_be_bytes(*seq), state.to_vec())))
    }

    /// Every worknode metadata record, in id order.
    pub fn metas(&self) -> Result<Vec<(WorknodeId, Vec<u8>)>, StoreError> {
        let db = self.db.get()?;
        let txn = db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(META).map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = row.map_err(|e| self.db_err(e))?;
            out.push((WorknodeId::from_bytes(*k.value()), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Every revoked revocation id.
    pub fn revoked(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        let db = self.db.get()?;
        let txn = db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(REVOKED).map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.db_err(e))? {
            out.push(row.map_err(|e| self.db_err(e))?.0.value().to_vec());
        }
        Ok(out)
    }

    /// Group-commit counters.
    pub fn stats(&self) -> StoreStats {
        StoreStats { commits: self.commits.load(Ordering::Relaxed), requests: self.requests.load(Ordering::Relaxed) }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for EventStore {
    fn drop(&mut self) {
        // Closing the channel stops the writer after it has committed what it already took.
        self.tx = None;
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

/// What a queued removal of `keys` kept changes counts against [`DETACHED_MAX_BYTES`].
fn removal_bytes(keys: usize) -> usize {
    64 + 40 * keys
}

/// Subtracts a batch's detached bytes when dropped (after its commit, or its failure).
struct Done<'a>(&'a AtomicUsize, usize);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        let n = self.1;
        let _ = self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some(v.saturating_sub(n)));
    }
}

struct Writer {
    db: Arc<Db>,
    path: String,
    max_batch: usize,
    commits: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    detached: Arc<AtomicUsize>,
    /// The last batch hit an I/O error: reopen before the next.
    poisoned: Cell<bool>,
}

/// A request's result, held until the batch commits.
enum Outcome {
    Append(SyncSender<Result<Appended, StoreError>>, Result<Appended, StoreError>),
    Put(SyncSender<Result<(), StoreError>>),
}

impl Writer {
    fn err<E: Into<redb::Error>>(&self, e: E) -> StoreError {
        let e = e.into();
        if matches!(e, redb::Error::PreviousIo | redb::Error::Io(_)) {
            self.poisoned.set(true);
        }
        StoreError::Database { path: self.path.clone(), reason: e.to_string() }
    }

    fn run(self, rx: Receiver<Cmd>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(cmd) => batch.push(cmd),
                    Err(_) => break,
                }
            }
            let n = batch.len() as u64;
            // Committed or failed below: either way no longer waiting.
            let detached: usize = batch
                .iter()
                .map(|c| match c {
                    Cmd::Put { table: Aux::Kept, value, .. } => value.len(),
                    Cmd::Remove { keys, .. } => removal_bytes(keys.len()),
                    _ => 0,
                })
                .sum();
            let _done = Done(&self.detached, detached);
            if self.poisoned.get() {
                match self.db.reopen() {
                    Ok(()) => self.poisoned.set(false),
                    Err(e) => {
                        for o in Self::unanswered(batch) {
                            match o {
                                Outcome::Append(reply, _) => drop(reply.send(Err(e.clone()))),
                                Outcome::Put(reply) => drop(reply.send(Err(e.clone()))),
                            }
                        }
                        continue;
                    }
                }
            }
            match self.commit(batch) {
                Ok(outcomes) => {
                    self.commits.fetch_add(1, Ordering::Relaxed);
                    self.requests.fetch_add(n, Ordering::Relaxed);
                    for o in outcomes {
                        match o {
                            Outcome::Append(reply, r) => drop(reply.send(r)),
                            Outcome::Put(reply) => drop(reply.send(Ok(()))),
                        }
                    }
                }
                // Nothing was committed: every caller in the batch gets the error.
                Err((e, replies)) => {
                    for o in replies {
                        match o {
                            Outcome::Append(reply, _) => drop(reply.send(Err(e.clone()))),
                            Outcome::Put(reply) => drop(reply.send(Err(e.clone()))),
                        }
                    }
                }
            }
        }
    }

    /// Runs the whole batch in one transaction. On failure nothing is committed and every caller
    /// gets the error.
    fn commit(&self, batch: Vec<Cmd>) -> Result<Vec<Outcome>, (StoreError, Vec<Outcome>)> {
        let db = match self.db.get() {
            Ok(db) => db,
            Err(e) => return Err((e, Self::unanswered(batch))),
        };
        let mut txn = match db.begin_write() {
            Ok(t) => t,
            Err(e) => return Err((self.err(e), Self::unanswered(batch))),
        };
        if let Err(e) = txn.set_durability(Durability::Immediate) {
            return Err((
                StoreError::Database { path: self.path.clone(), reason: e.to_string() },
                Self::unanswered(batch),
            ));
        }
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut failure = None;
        for cmd in batch {
            if failure.is_some() {
                outcomes.extend(Self::unanswered(vec![cmd]));
                continue;
            }
            match cmd {
                Cmd::Append { stream, expected, events, reply } => match self.append(&txn, stream, expected, events) {
                    Ok(r) => outcomes.push(Outcome::Append(reply, r)),
                    Err(e) => {
                        failure = Some(e);
                        outcomes.push(Outcome::Append(reply, Err(StoreError::Closed)));
                    }
                },
                Cmd::Put { table, key, value, reply } => {
                    if let Err(e) = self.put(&txn, table, &key, &value) {
                        failure = Some(e);
                    }
                    outcomes.push(Outcome::Put(reply));
                }
                Cmd::Remove { table, keys, reply } => {
                    if let Err(e) = self.remove(&txn, table, &keys) {
                        failure = Some(e);
                    }
                    outcomes.push(Outcome::Put(reply));
                }
            }
        }
        if let Some(e) = failure {
            drop(txn.abort());
            return Err((e, outcomes));
        }
        match txn.commit() {
            Ok(()) => Ok(outcomes),
            Err(e) => Err((self.err(e), outcomes)),
        }
    }

    fn unanswered(batch: Vec<Cmd>) -> Vec<Outcome> {
        batch
            .into_iter()
            .map(|c| match c {
                Cmd::Append { reply, .. } => Outcome::Append(reply, Err(StoreError::Closed)),
                Cmd::Put { reply, .. } | Cmd::Remove { reply, .. } => Outcome::Put(reply),
            })
            .collect()
    }

    /// One append inside the batch transaction. The outer `Result` is a database failure (aborts
    /// the batch); the inner one is this request's own outcome (a conflict).
    fn append(
        &self,
        txn: &WriteTransaction,
        stream: WorknodeId,
        expected: Expected,
        events: Vec<NewEvent>,
    ) -> Result<Result<Appended, StoreError>, StoreError> {
        let sid = stream.to_bytes();
        let mut ids = txn.open_table(EVENT_IDS).map_err(|e| self.err(e))?;
        let mut heads = txn.open_table(HEADS).map_err(|e| self.err(e))?;
        let mut table = txn.open_table(EVENTS).map_err(|e| self.err(e))?;
        let mut head = heads.get(&sid).map_err(|e| self.err(e))?.map_or(0, |v| v.value());
        // Duplicates first: a retried append must succeed even though the version moved.
        let mut seqs: Vec<Option<u64>> = Vec::with_capacity(events.len());
        for ev in &events {
            let dup = ids.get(&ev.id).map_err(|e| self.err(e))?.map(|v| seq_of(v.value()));
            seqs.push(dup);
        }
        if seqs.iter().all(Option::is_some) {
            return Ok(Ok(Appended { seqs: seqs.into_iter().flatten().collect(), version: head }));
        }
        if let Expected::Exact(v) = expected
            && v != head
        {
            return Ok(Err(StoreError::Conflict { stream, expected: v, actual: head }));
        }
        let mut out = Vec::with_capacity(events.len());
        for (ev, dup) in events.into_iter().zip(seqs) {
            // A second copy of an id within the same request is a duplicate of the first.
            let dup = match dup {
                Some(s) => Some(s),
                None => ids.get(&ev.id).map_err(|e| self.err(e))?.map(|v| seq_of(v.value())),
            };
            if let Some(s) = dup {
                out.push(s);
                continue;
            }
            head += 1;
            let k = key(stream, head);
            table.insert(&k, [&ev.id[..], &ev.body].concat().as_slice()).map_err(|e| self.err(e))?;
            ids.insert(&ev.id, &k).map_err(|e| self.err(e))?;
            out.push(head);
        }
        heads.insert(&sid, head).map_err(|e| self.err(e))?;
        Ok(Ok(Appended { seqs: out, version: head }))
    }

    fn put(&self, txn: &WriteTransaction, table: Aux, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let id: Option<[u8; 16]> = key.try_into().ok();
        match (table, id) {
            (Aux::Snapshot, Some(id)) => {
                txn.open_table(SNAPSHOTS).map_err(|e| self.err(e))?.insert(&id, value).map_err(|e| self.err(e))?;
            }
            (Aux::Meta, Some(id)) => {
                txn.open_table(META).map_err(|e| self.err(e))?.insert(&id, value).map_err(|e| self.err(e))?;
            }
            (Aux::Revoked, _) => {
                txn.open_table(REVOKED).map_err(|e| self.err(e))?.insert(key, 0).map_err(|e| self.err(e))?;
            }
            (Aux::Kept, Some(id)) => {
                txn.open_table(KEPT).map_err(|e| self.err(e))?.insert(&id, value).map_err(|e| self.err(e))?;
            }
            (_, None) => return Err(corrupt("key", "worknode key is not 16 bytes")),
        }
        Ok(())
    }

    fn remove(&self, txn: &WriteTransaction, table: Aux, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        if !matches!(table, Aux::Kept) {
            return Err(corrupt("remove", "only kept signed changes are removed"));
        }
        let mut t = txn.open_table(KEPT).map_err(|e| self.err(e))?;
        for k in keys {
            let id: [u8; 16] = k.as_slice().try_into().map_err(|_| corrupt("key", "kept key is not 16 bytes"))?;
            t.remove(&id).map_err(|e| self.err(e))?;
        }
        Ok(())
    }
}

/// A store on a disk that tests can fill up.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::atomic::AtomicBool;

    use redb::StorageBackend;
    use redb::backends::InMemoryBackend;

    use super::*;

    /// Memory that can be made to fail every write, like a full disk; reopening shares it.
    #[derive(Debug)]
    struct Disk {
        bytes: Arc<InMemoryBackend>,
        full: Arc<AtomicBool>,
    }

    /// A store in memory, and the switch that makes its disk full.
    pub(crate) fn store() -> (EventStore, Arc<AtomicBool>) {
        let (bytes, full) = (Arc::new(InMemoryBackend::new()), Arc::new(AtomicBool::new(false)));
        let (b, f) = (bytes.clone(), full.clone());
        let open: Opener =
            Box::new(move || Ok(Database::builder().create_with_backend(Disk { bytes: b.clone(), full: f.clone() })?));
        (EventStore::open_with(Path::new("memory"), StoreConfig::default(), open).unwrap(), full)
    }

    impl Disk {
        fn check(&self) -> std::io::Result<()> {
            if self.full.load(Ordering::SeqCst) {
                return Err(std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device"));
            }
            Ok(())
        }
    }

    impl StorageBackend for Disk {
        fn len(&self) -> std::io::Result<u64> {
            self.bytes.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.bytes.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check()?;
            self.bytes.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.check()?;
            self.bytes.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.bytes.write(offset, data)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u8) -> Vec<NewEvent> {
        vec![NewEvent { id: [n; 16], body: vec![n; 64] }]
    }

    /// Kept signed changes are queued without waiting, within [`DETACHED_MAX_BYTES`]: what
    /// would go past it is not stored, and what was committed no longer counts.
    #[test]
    fn kept_changes_wait_for_the_writer_within_a_bound() {
        let (store, _) = testing::store();
        assert!(store.keep_detached([1; 16], vec![1; 1024]));
        assert!(!store.keep_detached([2; 16], vec![2; DETACHED_MAX_BYTES + 1]));
        store.put_revoked(b"barrier").unwrap();
        assert_eq!(store.detached.load(Ordering::Acquire), 0);
        assert!(store.keep_detached([3; 16], vec![3; DETACHED_MAX_BYTES]));
        // Removals share the bound: this one is not queued, the row stays.
        store.forget_detached(vec![[1; 16]]);
        store.put_revoked(b"barrier").unwrap();
        let keys = || store.kept().unwrap().into_iter().map(|(k, _)| k).collect::<Vec<[u8; 16]>>();
        assert_eq!(keys(), vec![[1; 16], [3; 16]]);
        store.forget_detached(vec![[1; 16]]);
        // Nothing to remove counts nothing.
        store.forget_detached(Vec::new());
        store.put_revoked(b"barrier").unwrap();
        assert_eq!(keys(), vec![[3; 16]]);
        assert_eq!(store.detached.load(Ordering::Acquire), 0);
    }

    /// Found attacking: after one ENOSPC every later write failed with "Previous I/O error"
    /// until the process restarted, even once space was free again.
    #[test]
    fn the_store_recovers_from_an_io_error_without_a_restart() {
        let (store, full) = testing::store();
        let s = WorknodeId::from_bytes([9; 16]);
        assert_eq!(store.append(s, Expected::Exact(0), event(1)).unwrap().version, 1);
        full.store(true, Ordering::SeqCst);
        assert!(store.append(s, Expected::Exact(1), event(2)).is_err(), "a full disk cannot be acknowledged");
        assert!(store.append(s, Expected::Exact(1), event(2)).is_err(), "still full");
        full.store(false, Ordering::SeqCst);
        // Space again: the next write reopens the file and succeeds; nothing refused was stored.
        let a = store.append(s, Expected::Exact(1), event(2)).unwrap();
        assert_eq!((a.seqs.as_slice(), a.version), (&[2][..], 2));
        let seqs: Vec<u64> = store.read(s, 1).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2]);
        assert_eq!(store.find(&[2; 16]).unwrap(), Some((s, 2)));
    }
}
