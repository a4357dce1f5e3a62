//! The worknode system: an arena of worknodes, a pool of worker threads running their turns,
//! supervision, persistence through the event store and the hooks replication uses.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::hash::BuildHasher;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::sync::oneshot;

use crate::caps::{Authority, Capabilities, Right};
use crate::crdt::ReplicaId;
use crate::error::{CapError, CreateError, QueryError, SendError, StateError, StoreError, Unsupported, WriteError};
use crate::id::{WnPath, WorknodeId};
use crate::sched::{Core, Lock as _, PushError, StdSync};
use crate::state::{Delta, Op, State};
use crate::store::{EventId, EventStore, Expected, NewEvent};

/// Consistency level of a worknode, fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Consistency {
    /// State lives on this node only.
    Local,
    /// State is a CRDT replicated to peer nodes; replicas converge once they can talk.
    Eventual,
    /// Linearizable (Raft): reserved for the cluster issue; refused with [`Unsupported`] today.
    Strong,
}

/// Limits and tuning.
#[derive(Debug, Clone)]
pub struct SystemConfig {
    /// Worker threads running turns.
    pub workers: usize,
    /// Most messages a worknode handles per turn before others get a turn.
    pub max_per_turn: usize,
    /// Mailbox bound; a full mailbox refuses with [`SendError::Full`].
    pub mailbox_capacity: u32,
    /// Deepest allowed path (segments).
    pub max_depth: usize,
    /// Most children per worknode.
    pub max_children: usize,
    /// Most worknodes on this node.
    pub max_worknodes: usize,
    /// Snapshot a worknode's state every this many events.
    pub snapshot_every: u64,
    /// Restarts after which a failing worknode is stopped.
    pub max_restarts: u32,
    /// Largest change (one field's delta, encoded) a local operation may make or a peer may
    /// send; larger ones are refused ([`StateError::TooLarge`], audited `quota` when replicated).
    pub max_delta_bytes: usize,
    /// Largest state (encoded) one field may reach through local operations: one that would
    /// take it further is refused ([`StateError::FieldFull`]). Peers' changes are held to
    /// `max_merged_field_bytes` instead (replicas writing concurrently may together pass this
    /// one; refusing their changes would split them).
    pub max_field_bytes: usize,
    /// Largest state (encoded) one field may reach through peers' changes: one that would take
    /// it further is refused (`quota`), so a peer cannot grow a field past what anti-entropy
    /// sends in one message (referee-comm's limit: 16 MiB). The default leaves room for three
    /// replicas filling a field (`max_field_bytes`) at once; more replicas doing so during one
    /// partition would be split on that field until some of it is removed.
    pub max_merged_field_bytes: usize,
    /// This node's replica id (CRDT dots); must differ between replicas.
    pub replica: ReplicaId,
}

impl Default for SystemConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            max_per_turn: 64,
            mailbox_capacity: 1024,
            max_depth: 32,
            max_children: 100_000,
            max_worknodes: 4 << 20,
            snapshot_every: 100,
            max_restarts: 10,
            max_delta_bytes: 2 << 20,
            max_field_bytes: 4 << 20,
            max_merged_field_bytes: 14 << 20,
            replica: u64::from_le_bytes(uuid::Uuid::now_v7().as_bytes()[8..].try_into().unwrap_or([1; 8])),
        }
    }
}

/// What a supervisor is told about its children.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Signal {
    /// A child's behaviour failed; the child was restarted from its event log.
    ChildRestarted {
        /// The child.
        child: WorknodeId,
        /// The error or panic message.
        reason: String,
        /// Restarts so far.
        restarts: u32,
    },
    /// A child failed more than `max_restarts` times and was stopped.
    ChildStopped {
        /// The child.
        child: WorknodeId,
        /// The last error.
        reason: String,
    },
}

/// An event received from a peer: its origin id (so redelivery is a no-op) and delta.
pub type Replicated = (EventId, Delta);

/// A message body.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Body {
    /// Application data for the behaviour.
    Data(Bytes),
    /// State operations applied by the system (no behaviour involved).
    Update(Vec<(String, Op)>),
    /// Supervision notice for the behaviour.
    Signal(Signal),
    /// Changes from a peer replica.
    Merge {
        /// The peer's replica id: it speaks for its own updates only (see
        /// [`crate::crdt::Authored`]).
        author: ReplicaId,
        /// `false`: the author's own new changes, which must hold nothing another replica made
        /// (refused `author` otherwise). `true`: its full state, from which what other replicas
        /// made is left out.
        full: bool,
        /// The changes.
        events: Vec<Replicated>,
    },
}

/// A message and the authority of whoever sent it.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The sender's authority.
    pub from: Authority,
    /// What it says.
    pub body: Body,
}

/// What an acknowledged write reports once it is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Committed {
    /// Sequence number of the last event the message caused (`None`: it changed nothing).
    pub seq: Option<u64>,
    /// Events the message caused (0 for a duplicate).
    pub events: usize,
    /// The worknode's version (its last sequence number) right after the commit.
    pub version: u64,
    /// An update with the same idempotency key was already stored: nothing new was applied,
    /// and `seq` is the original's.
    pub duplicate: bool,
}

type Reply = oneshot::Sender<Result<Committed, WriteError>>;

/// The answer to an acknowledged write ([`System::update`], [`System::send`]): resolves once the
/// events the message caused are durable (after the event store's group commit), or with the
/// [`WriteError`] that kept them from it. Await it in async code, or [`Completion::wait`].
#[must_use = "a Completion resolves when the write is durable: wait for it, or use the *_detached form"]
#[derive(Debug)]
pub struct Completion {
    id: WorknodeId,
    rx: oneshot::Receiver<Result<Committed, WriteError>>,
}

impl Completion {
    /// The worknode written to.
    pub fn id(&self) -> WorknodeId {
        self.id
    }

    /// Blocks the thread until the write is durable or failed. Not from inside an async runtime
    /// (it panics there): `.await` the completion instead.
    pub fn wait(self) -> Result<Committed, WriteError> {
        let id = self.id;
        self.rx.blocking_recv().unwrap_or(Err(WriteError::Stopped(id)))
    }
}

impl Future for Completion {
    type Output = Result<Committed, WriteError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let id = self.id;
        // The reply is dropped unanswered only when the message was dropped: the worknode
        // stopped, or the system shut down, before its turn.
        Pin::new(&mut self.rx).poll(cx).map(|r| r.unwrap_or(Err(WriteError::Stopped(id))))
    }
}

/// Longest idempotency key [`System::update_idempotent`] takes, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;

/// The event ids of an idempotent update: one per operation, derived from the worknode and the
/// caller's key, so the same key on another worknode is another update.
fn idempotent_ids(stream: WorknodeId, key: &[u8], ops: usize) -> Box<[EventId]> {
    (0..ops as u64)
        .map(|i| {
            let mut h = Sha256::new();
            h.update(b"referee-worknode-idempotency-v1\0");
            h.update(stream.to_bytes());
            h.update((key.len() as u64).to_be_bytes());
            h.update(key);
            h.update(i.to_be_bytes());
            let digest: [u8; 32] = h.finalize().into();
            digest.first_chunk::<16>().copied().unwrap_or_default()
        })
        .collect()
}

/// A queued message: the envelope, and for an acknowledged write whom to tell when it is durable.
pub(crate) struct Msg {
    env: Envelope,
    ack: Option<Ack>,
    /// Replicated bytes this message holds, counted in [`System::merging_bytes`] until it is
    /// handled (or dropped).
    _merging: Option<Merging>,
}

/// What one replicated event costs in memory beyond its encoded bytes (decoded, in the turn's
/// log, in the commit batch), as [`System::merging_bytes`] counts it: a flood of tiny events is
/// mostly this.
const EVENT_OVERHEAD: usize = 512;

/// Bytes of replicated changes waiting in mailboxes; given back on drop.
struct Merging {
    counter: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for Merging {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

struct Ack {
    reply: Reply,
    /// The event ids of an idempotent update (one per operation).
    ids: Option<Box<[EventId]>>,
}

impl Msg {
    fn plain(env: Envelope) -> Self {
        Self { env, ack: None, _merging: None }
    }
}

/// What handling one message produced, for its acknowledgement.
enum Handled {
    /// Its events are `TurnLog::events[range]` (empty: it changed nothing).
    Applied(Range<usize>),
    /// A duplicate of an idempotent update already durable at this sequence number.
    Stored(u64),
    /// A duplicate of an idempotent update earlier in this turn (its last event's index).
    Queued(usize),
    /// Refused before anything was applied.
    Refused(WriteError),
}

/// A turn's events not yet committed, and the acknowledgements waiting for them.
#[derive(Default)]
struct TurnLog {
    /// `(event id, delta, local)`: local events are shipped to replicas, merged ones are not.
    events: Vec<(EventId, Delta, bool)>,
    acks: Vec<(Reply, Handled)>,
    /// Index in `events` of each merged event id (a duplicate in one turn is found in O(1)).
    merged: HashMap<EventId, usize>,
}

/// A behaviour failure; the worknode restarts from its event log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BehaviourError(pub String);

/// A worknode's code: a Rust handler, or a muscle (`MuscleBehaviour`, feature `muscle`). Shared by
/// every worknode of a kind, so it holds no per-worknode data: that is in the CRDT state.
pub trait Behaviour: Send + Sync + 'static {
    /// Handles one message. State changes requested through `ctx` are applied (and become events)
    /// only if this returns `Ok`; an `Err` or a panic restarts the worknode.
    fn handle(&self, ctx: &mut Ctx<'_>, msg: &Envelope) -> Result<(), BehaviourError>;
}

/// The no-op behaviour of the built-in `data` kind: a worknode that is only state.
#[derive(Debug, Clone, Copy, Default)]
pub struct DataBehaviour;

impl Behaviour for DataBehaviour {
    fn handle(&self, _: &mut Ctx<'_>, _: &Envelope) -> Result<(), BehaviourError> {
        Ok(())
    }
}

/// What a behaviour sees and can do during one message.
pub struct Ctx<'a> {
    sys: &'a Inner,
    id: WorknodeId,
    parent: u32,
    state: &'a State,
    ops: Vec<(String, Op)>,
}

impl Ctx<'_> {
    /// This worknode.
    pub fn id(&self) -> WorknodeId {
        self.id
    }

    /// Its parent (`None` for the root).
    pub fn parent(&self) -> Option<WorknodeId> {
        (self.parent != NO_PARENT).then(|| self.sys.info(self.parent).map(|p| p.id)).flatten()
    }

    /// The state before this message's own updates.
    pub fn state(&self) -> &State {
        self.state
    }

    /// Requests a state change (applied when the handler returns `Ok`).
    pub fn update(&mut self, field: &str, op: Op) {
        self.ops.push((field.to_owned(), op));
    }

    /// Sends data to another worknode of this system (as the system: behaviours act inside the
    /// authority that reached them).
    pub fn send(&self, to: WorknodeId, data: Bytes) -> Result<(), SendError> {
        let idx = self.sys.index(to).ok_or_else(|| SendError::NotFound(to.to_string()))?;
        self.sys.push(idx, Some(to), Msg::plain(Envelope { from: Authority::System, body: Body::Data(data) }), true)
    }

    /// Sends to a worknode by arena handle (the fast path: no id lookup).
    pub fn send_to(&self, to: Handle, data: Bytes) -> Result<(), SendError> {
        self.sys.push(to.0, None, Msg::plain(Envelope { from: Authority::System, body: Body::Data(data) }), true)
    }
}

/// An arena handle: the fast path for sending without an id lookup. Valid for the life of the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Handle(u32);

/// Persisted description of a worknode (everything but its state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Id.
    pub id: WorknodeId,
    /// Parent id (the root's is itself).
    pub parent: WorknodeId,
    /// Last path segment.
    pub name: String,
    /// Behaviour kind.
    pub kind: String,
    /// Consistency level.
    pub consistency: Consistency,
}

/// The state digests [`System::eventual_digests`] computed, by worknode and version.
#[derive(Debug, Default)]
pub struct DigestCache(HashMap<WorknodeId, (u64, [u8; 16])>);

/// The kind of the root worknode `/`: reserved, neither created locally nor replicated.
pub const ROOT_KIND: &str = "root";

/// The id of every system's root worknode `/` (the nil UUID, the same on every replica).
pub const ROOT_ID: WorknodeId = WorknodeId::nil();

/// What never changes about a worknode: readable without waiting for its turn (paths, sends).
struct Info {
    id: WorknodeId,
    parent: u32,
    kind: u16,
    consistency: Consistency,
    name: Box<str>,
    /// Its own short lock, so creating a child never waits for the parent's turn.
    children: Mutex<Vec<u32>>,
}

impl Info {
    fn children(&self) -> Vec<u32> {
        self.children.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// What a worknode's turn changes (locked by the worker for the turn). Kept small: idle
/// worknodes are plain data.
struct Node {
    stopped: bool,
    restarts: u32,
    /// Allocated on the first change.
    state: Option<Box<State>>,
    /// Last event sequence number.
    version: u64,
    /// A commit failed and the log could not be read back: the state may hold what was never
    /// stored, so it is reloaded before anything reads or changes it.
    stale: bool,
}

const NO_PARENT: u32 = u32::MAX;

static EMPTY_STATE: State = State::EMPTY;

/// One worknode's view for queries.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    /// Id.
    pub id: WorknodeId,
    /// Path.
    pub path: WnPath,
    /// Behaviour kind.
    pub kind: String,
    /// Consistency level.
    pub consistency: Consistency,
    /// Last event sequence number.
    pub version: u64,
    /// Messages waiting.
    pub queued: usize,
    /// Number of children.
    pub children: usize,
    /// Stopped after repeated failures.
    pub stopped: bool,
    /// Restarts so far.
    pub restarts: u32,
    /// The CRDT state.
    pub state: State,
}

/// An entry of a tree listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    /// Id.
    pub id: WorknodeId,
    /// Path.
    pub path: WnPath,
    /// Behaviour kind.
    pub kind: String,
    /// Consistency level.
    pub consistency: Consistency,
    /// Number of children.
    pub children: usize,
}

/// Committed local events of an Eventual worknode, for replication: the worknode's chain of
/// metadata from the root's child down to itself, and the events.
#[derive(Debug, Clone, PartialEq)]
pub struct Shipment {
    /// Ancestors then the worknode itself (the root excluded).
    pub chain: Vec<Meta>,
    /// The events, in order.
    pub events: Vec<Replicated>,
}

type Sink = Box<dyn Fn(Shipment) + Send + Sync>;

/// A replicated change this node refused: it broke a rule a local change would have broken too
/// (a name, a depth, a kind, a consistency class, a quota, a counter's range), or it contradicts
/// what is here. Counted per `code` ([`System::refusals`]) and handed to the audit sink
/// ([`System::set_audit_sink`]); the peer keeps its copy, nothing of it is applied here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Stable reason code: `malformed` (not a replication message), `chain` (malformed or too
    /// deep), `name`, `kind`, `consistency`, `conflict` (the path holds a worknode of another
    /// kind or consistency), `quota`, `store`, `type`, `equivocation` (audited, not refused: an
    /// event id already stored with other contents, or one update with two values; both are
    /// merged and the larger value wins everywhere), `clock` (a write stamped more than
    /// [`MAX_CLOCK_AHEAD_MS`] ahead), `author` (a peer's own change holding updates other
    /// replicas made, or a peer speaking as this replica), `unseen` (a claim that updates of
    /// other replicas were seen which this replica has not seen: the claim is left out, the
    /// rest merged; an honest peer that saw them first makes this too).
    pub code: &'static str,
    /// The path concerned (as far as it could be read).
    pub path: String,
    /// What was wrong.
    pub detail: String,
}

impl Refused {
    /// A refusal; `path` and `detail` are clipped to 256 bytes each (they may quote what a peer
    /// sent, which is not bounded by anything here).
    pub fn new(code: &'static str, path: impl Into<String>, detail: impl Into<String>) -> Self {
        fn clip(mut s: String) -> String {
            if s.len() > 256 {
                let mut end = 256;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                s.truncate(end);
                s.push('…');
            }
            s
        }
        Self { code, path: clip(path.into()), detail: clip(detail.into()) }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "replicated change refused ({}) at {}: {}", self.code, self.path, self.detail)
    }
}

impl std::error::Error for Refused {}

type AuditSink = Box<dyn Fn(&Refused, u64) + Send + Sync>;

type Kinds = Vec<(String, Arc<dyn Behaviour>)>;

/// A worker's copy of the kind table (avoids a shared lock per message).
struct KindCache {
    generation: u64,
    kinds: Arc<Kinds>,
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages handled.
    pub handled: u64,
    /// Restarts performed.
    pub restarts: u64,
    /// Operations refused at apply time (a field of another CRDT kind).
    pub rejected: u64,
}

pub(crate) struct Inner {
    core: Core<StdSync, Msg, Node, Info>,
    ids: RwLock<HashMap<WorknodeId, u32>>,
    names: RwLock<HashMap<(u32, u64), u32>>,
    hasher: std::collections::hash_map::RandomState,
    /// Registered kinds (index = `Node::kind`); workers keep a copy, refreshed when `kinds_gen` moves.
    kinds: RwLock<Arc<Kinds>>,
    kinds_gen: AtomicU64,
    store: Option<Arc<EventStore>>,
    caps: Option<Arc<Capabilities>>,
    cfg: SystemConfig,
    sink: OnceLock<Sink>,
    in_flight: AtomicU64,
    idle: (Mutex<()>, Condvar),
    /// Threads in [`System::settle`]; turns notify `settled` only while there are any.
    settle_waiters: AtomicU64,
    settled: (Mutex<()>, Condvar),
    handled: AtomicU64,
    restarts: AtomicU64,
    rejected: AtomicU64,
    /// Replicated changes refused, per [`Refused::code`].
    refused: Mutex<BTreeMap<&'static str, u64>>,
    /// Encoded bytes of replicated changes waiting in mailboxes ([`System::merging_bytes`]).
    merging: Arc<AtomicUsize>,
    audit: OnceLock<AuditSink>,
}

/// Assembles a [`System`] (see [`System::builder`]).
pub struct SystemBuilder {
    cfg: SystemConfig,
    store: Option<Arc<EventStore>>,
    caps: Option<Arc<Capabilities>>,
    kinds: Kinds,
}

impl std::fmt::Debug for SystemBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemBuilder").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl SystemBuilder {
    /// Persist to (and replay from) `store`.
    pub fn store(mut self, store: Arc<EventStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Verify tokens with `caps`.
    pub fn capabilities(mut self, caps: Arc<Capabilities>) -> Self {
        self.caps = Some(caps);
        self
    }

    /// Registers the behaviour of `kind`.
    pub fn behaviour(mut self, kind: &str, behaviour: Arc<dyn Behaviour>) -> Self {
        self.kinds.push((kind.to_owned(), behaviour));
        self
    }

    /// Replays the store and starts the workers.
    pub fn start(self) -> Result<System, StoreError> {
        System::start_with(self)
    }
}

/// The worknode runtime of one node. Dropping it stops the workers.
pub struct System {
    inner: Arc<Inner>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for System {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("System").field("worknodes", &self.inner.core.len()).finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing our own plain data types to a Vec cannot fail.
    rmp_serde::to_vec(v).unwrap_or_default()
}

/// Most dots one field may hold out of order (seen before the dots that precede them); a
/// replicated change that would add some past it, or past [`MAX_GAPS_PER_AUTHOR`] of its
/// author's, is refused (`quota`). Honest replicas leave a few, briefly, when deltas overtake
/// each other.
pub const MAX_GAPS: usize = 1 << 16;

/// Most dots of one replica one field may hold out of order (see [`MAX_GAPS`]).
pub const MAX_GAPS_PER_AUTHOR: usize = 1 << 12;

/// How far ahead of this replica's clock a replicated write may be stamped (24 h): a write
/// stamped further ahead would win over every later write for that long, so it is refused
/// (`clock`). A replica's own writes run ahead of its clock only by 1 ms per write beyond one
/// write per millisecond to one register.
pub const MAX_CLOCK_AHEAD_MS: u64 = 24 * 3600 * 1000;

/// The id a replicated change with origin id `origin` is stored under in worknode `local`.
fn local_event_id(origin: &EventId, local: WorknodeId) -> EventId {
    digest_id(&[b"referee-worknode-merged\0", origin, &local.to_bytes()])
}

/// The id a replicated change is stored under when only part of it was merged: derived from
/// the origin's id and the part, so the same part is stored once.
fn cut_id(origin: &EventId, part: &Delta) -> EventId {
    digest_id(&[b"referee-worknode-cut\0", origin, &encode(part)])
}

/// An event id derived from `parts`: the first 16 bytes of their SHA-256.
pub(crate) fn digest_id(parts: &[&[u8]]) -> EventId {
    let digest: [u8; 32] = parts.iter().fold(Sha256::new(), |h, p| h.chain_update(p)).finalize().into();
    digest.first_chunk::<16>().copied().unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|e| StoreError::Corrupt { what: what.to_owned(), reason: e.to_string() })
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".to_owned())
}

impl Inner {
    fn kind_cache(&self) -> KindCache {
        let generation = self.kinds_gen.load(Ordering::Acquire);
        KindCache { generation, kinds: self.kinds.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone() }
    }

    fn index(&self, id: WorknodeId) -> Option<u32> {
        self.ids.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(&id).copied()
    }

    fn info(&self, idx: u32) -> Option<&Info> {
        self.core.slot(idx)?.info.get()
    }

    fn with_node<R>(&self, idx: u32, f: impl FnOnce(&mut Node) -> R) -> Option<R> {
        self.core.slot(idx)?.data.with(|d| d.as_mut().map(f))
    }

    fn push(&self, idx: u32, id: Option<WorknodeId>, msg: Msg, bounded: bool) -> Result<(), SendError> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let r = self.core.push(idx, msg, self.cfg.mailbox_capacity, bounded);
        if let Err(e) = r {
            self.done(1);
            let id = id.or_else(|| self.info(idx).map(|i| i.id)).unwrap_or(ROOT_ID);
            return Err(match e {
                PushError::Full(_) => SendError::Full { id, capacity: self.cfg.mailbox_capacity },
                PushError::Closed(_) => SendError::Stopped(id),
                PushError::NoSlot(_) => SendError::NotFound(id.to_string()),
            });
        }
        Ok(())
    }

    fn done(&self, n: u64) {
        if n > 0 && self.in_flight.fetch_sub(n, Ordering::AcqRel) == n {
            let _g = self.idle.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            self.idle.1.notify_all();
        }
    }

    /// Refuses a change larger than `max_delta_bytes` (encoded, as it would be stored and sent).
    fn fits(&self, d: Delta) -> Result<Delta, StateError> {
        let bytes = encode(&d).len();
        let max = self.cfg.max_delta_bytes;
        if bytes > max {
            return Err(StateError::TooLarge { field: d.field, bytes, max });
        }
        Ok(d)
    }

    /// Counts and audits a refused replicated change.
    fn refused(&self, r: &Refused) {
        let n = {
            let mut counts = self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = counts.entry(r.code).or_insert(0);
            *n += 1;
            *n
        };
        if let Some(sink) = self.audit.get() {
            sink(r, n);
        }
    }

    /// A replicated delta refused inside a turn.
    fn refuse(&self, info: &Info, e: &StateError) {
        let code = match e {
            StateError::Overflow { .. } => "overflow",
            StateError::TooLarge { .. } | StateError::FieldFull { .. } => "quota",
            _ => "type",
        };
        self.refused(&Refused::new(code, self.path_of_info(info), e.to_string()));
    }

    fn path_of_info(&self, info: &Info) -> String {
        match self.info(info.parent) {
            Some(_) => {
                self.path_of(info.parent).child(&info.name).map_or_else(|_| info.name.to_string(), |p| p.to_string())
            }
            None => "/".to_owned(),
        }
    }

    fn name_key(&self, parent: u32, name: &str) -> (u32, u64) {
        (parent, self.hasher.hash_one((parent, name)))
    }

    fn child_named(&self, parent: u32, name: &str) -> Option<u32> {
        let idx =
            *self.names.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(&self.name_key(parent, name))?;
        // The map is keyed by a hash: confirm the name.
        (&*self.info(idx)?.name == name).then_some(idx)
    }

    fn resolve(&self, path: &WnPath) -> Option<u32> {
        let mut cur = 0u32;
        for seg in path.segments() {
            cur = self.child_named(cur, seg)?;
        }
        Some(cur)
    }

    fn path_of(&self, mut idx: u32) -> WnPath {
        let mut names = Vec::new();
        while let Some(info) = self.info(idx) {
            if info.parent == NO_PARENT {
                break;
            }
            names.push(&*info.name);
            idx = info.parent;
        }
        let text = format!("/{}", names.iter().rev().copied().collect::<Vec<_>>().join("/"));
        text.parse().unwrap_or_else(|_| WnPath::root())
    }

    fn kind_name(&self, kind: u16) -> String {
        self.kinds
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(usize::from(kind))
            .map_or_else(String::new, |k| k.0.clone())
    }

    fn meta_of(&self, info: &Info) -> Meta {
        let parent = if info.parent == NO_PARENT { info.id } else { self.info(info.parent).map_or(ROOT_ID, |p| p.id) };
        Meta {
            id: info.id,
            parent,
            name: info.name.to_string(),
            kind: self.kind_name(info.kind),
            consistency: info.consistency,
        }
    }

    fn check(&self, auth: &Authority, path: &WnPath, right: Right) -> Result<(), CapError> {
        match &self.caps {
            Some(caps) => caps.check(auth, path, right),
            // Without a verifier only the system itself may act.
            None => match auth {
                Authority::System | Authority::Subtrees(_) if auth.subtrees_hold(path) => Ok(()),
                Authority::System | Authority::Subtrees(_) => {
                    Err(CapError::Denied { path: path.clone(), op: right.as_str() })
                }
                Authority::Token(_) => {
                    Err(CapError::Invalid("this system has no capability verifier configured".into()))
                }
            },
        }
    }

    /// Loads a worknode's state from its snapshot and the events after it.
    fn replay(&self, id: WorknodeId) -> Result<(State, u64), StoreError> {
        let Some(store) = &self.store else { return Ok((State::default(), 0)) };
        let (mut state, from) = match store.snapshot(id)? {
            Some((seq, bytes)) => (decode::<State>(&format!("snapshot of {id}"), &bytes)?, seq),
            None => (State::default(), 0),
        };
        let mut version = from;
        for ev in store.read(id, from + 1)? {
            let delta: Delta = decode(&format!("event {id}/{}", ev.seq), &ev.body)?;
            // A kind mismatch was refused before it was logged, so it cannot occur here.
            let _ = state.apply(&delta);
            version = ev.seq;
        }
        Ok((state, version))
    }

    /// Replaces a stale node's state with what its log holds; whether it is current.
    fn reload(&self, id: WorknodeId, node: &mut Node) -> bool {
        if !node.stale {
            return true;
        }
        // A first failure may be what tells the store to reopen its file: try twice.
        match self.replay(id).or_else(|_| self.replay(id)) {
            Ok((state, version)) => {
                node.state = (!state.is_empty()).then(|| Box::new(state));
                node.version = version;
                node.stale = false;
                true
            }
            Err(_) => false,
        }
    }

    /// Runs one turn of slot `idx` (the caller owns it).
    fn turn(&self, idx: u32, buf: &mut Vec<Msg>, kinds: &Kinds) {
        self.core.take(idx, self.cfg.max_per_turn, buf);
        let n = buf.len() as u64;
        let mut notices = Vec::new();
        let mut shipment = None;
        let Some(info) = self.info(idx) else { return };
        self.with_node(idx, |node| {
            if !self.reload(info.id, node) {
                // Nothing can be applied on top of a state that may not be the stored one.
                for Msg { ack, .. } in buf.drain(..) {
                    if let Some(a) = ack {
                        let reason = "the worknode's event log cannot be read back after a failed commit".to_owned();
                        let e = StoreError::Database { path: String::new(), reason };
                        let _ = a.reply.send(Err(WriteError::Store(e)));
                    }
                }
                return;
            }
            let mut log = TurnLog::default();
            let mut msgs = buf.drain(..);
            for Msg { env, ack, _merging } in msgs.by_ref() {
                if node.stopped {
                    // Dropped unanswered: its completion reports the stop.
                    break;
                }
                let ids = ack.as_ref().and_then(|a| a.ids.as_deref());
                match self.handle(info, node, &env, ids, &mut log, kinds) {
                    Ok(Handled::Refused(e)) => {
                        if let Some(a) = ack {
                            let _ = a.reply.send(Err(e));
                        }
                    }
                    Ok(handled) => {
                        if let Some(a) = ack {
                            log.acks.push((a.reply, handled));
                        }
                    }
                    Err(reason) => {
                        self.commit(info, node, &mut log, &mut shipment);
                        if let Some(a) = ack {
                            let _ = a.reply.send(Err(WriteError::Behaviour { id: info.id, reason: reason.clone() }));
                        }
                        self.restart(idx, info, node, reason, &mut notices);
                    }
                }
            }
            // Anything left was queued behind a stop: dropped with the mailbox.
            msgs.for_each(drop);
            self.commit(info, node, &mut log, &mut shipment);
        });
        self.handled.fetch_add(n, Ordering::Relaxed);
        self.core.finish(idx, n);
        // A waiter registers before it reads the mark under the mailbox lock that `finish`
        // also takes, so either it sees this turn's messages done or this load sees it.
        if self.settle_waiters.load(Ordering::Acquire) > 0 {
            let _g = self.settled.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            self.settled.1.notify_all();
        }
        for (parent, signal) in notices {
            let signal = Msg::plain(Envelope { from: Authority::System, body: Body::Signal(signal) });
            let _ = self.push(parent, None, signal, false);
        }
        if let (Some(s), Some(sink)) = (shipment, self.sink.get()) {
            sink(s);
        }
        self.done(n);
    }

    /// Handles one message; `Err` is a behaviour failure. `ids` are the event ids of an
    /// idempotent update.
    fn handle(
        &self,
        info: &Info,
        node: &mut Node,
        env: &Envelope,
        ids: Option<&[EventId]>,
        log: &mut TurnLog,
        kinds: &Kinds,
    ) -> Result<Handled, String> {
        let start = log.events.len();
        let ops = match &env.body {
            Body::Update(ops) => return Ok(self.update_state(node, ops, ids, log)),
            Body::Merge { author, full, events } => {
                // What a peer sent must never take the worker down: a panic here (a bug, met
                // through a peer's data) fails the worknode's turn, which restarts it from its
                // log, like a behaviour's panic.
                let merged = catch_unwind(AssertUnwindSafe(|| {
                    let state = node.state.get_or_insert_with(Box::default);
                    // Checked as a local change is (kinds); one that changes nothing (seen before, or
                    // empty) is not stored. An id already stored (or earlier in this turn) with other
                    // contents is equivocation: refused and audited (the store would keep the first
                    // and drop the second, so state and log would disagree).
                    let stored = |log: &TurnLog, eid: &EventId, delta: &Delta| match log
                        .merged
                        .get(eid)
                        .and_then(|i| log.events.get(*i))
                    {
                        Some(e) => Some(e.1 == *delta),
                        None => self
                            .store
                            .as_ref()
                            .and_then(|s| s.event(eid).ok().flatten())
                            .map(|(_, _, body)| body == encode(delta)),
                    };
                    for (eid, delta) in events {
                        // Stored under an id of this worknode: the origin's id names the change
                        // wherever it is merged, and a peer could plant a change under the id of one
                        // meant for another worknode, so that it would be skipped there as a repeat.
                        let mut eid = local_event_id(eid, info.id);
                        match stored(log, &eid, delta) {
                            Some(true) => continue,
                            Some(false) => {
                                // Its author gave one change two contents (equivocation). Both are
                                // merged, wherever they arrive first, so replicas agree (the larger
                                // value of an update wins); the second is stored under an id of its own.
                                let detail = format!(
                                    "event {} is stored with other contents (both merged: the larger value of an update wins)",
                                    hex::encode(eid)
                                );
                                self.refused(&Refused::new("equivocation", self.path_of_info(info), detail));
                                eid = cut_id(&eid, delta);
                                if stored(log, &eid, delta).is_some() {
                                    continue;
                                }
                            }
                            None => {}
                        }
                        // Authorship: the peer speaks for its own updates only.
                        let admitted = state.admit(*author, delta);
                        if admitted.foreign && !*full {
                            let detail = format!("field {:?}: a change holding other replicas' updates", delta.field);
                            self.refused(&Refused::new("author", self.path_of_info(info), detail));
                            continue;
                        }
                        if admitted.unseen {
                            let detail = format!(
                                "field {:?}: claims other replicas' updates this replica has not seen were seen (left out)",
                                delta.field
                            );
                            self.refused(&Refused::new("unseen", self.path_of_info(info), detail));
                        }
                        // What is stored is what was merged: a change cut down here is stored under an id
                        // of its own (the origin's id names the whole change, which is not what this
                        // replica applied, and may be admitted in full later).
                        let (eid, delta) = if admitted.value == *delta {
                            (eid, delta.clone())
                        } else {
                            (cut_id(&eid, &admitted.value), admitted.value)
                        };
                        let latest = State::latest(&delta);
                        if latest > now_ms().saturating_add(MAX_CLOCK_AHEAD_MS) {
                            let detail = format!(
                                "field {:?}: a write stamped {latest}, more than {MAX_CLOCK_AHEAD_MS} ms ahead of this replica's clock",
                                delta.field
                            );
                            self.refused(&Refused::new("clock", self.path_of_info(info), detail));
                            continue;
                        }
                        // Gaps: refused only when this change adds some, past the author's share or
                        // the field's total; a change that adds none always goes (so one peer's gaps
                        // block only that peer).
                        let (total, before, after) = state.gaps(*author, &delta);
                        if after > before
                            && (after > MAX_GAPS_PER_AUTHOR
                                || total.saturating_sub(before).saturating_add(after) > MAX_GAPS)
                        {
                            let detail = format!(
                                "field {:?}: {after} of its author's dots out of order (at most {MAX_GAPS_PER_AUTHOR}, and \
                             {MAX_GAPS} in all): gapped dots cost every later change",
                                delta.field
                            );
                            self.refused(&Refused::new("quota", self.path_of_info(info), detail));
                            continue;
                        }
                        if state.equivocates(&delta) {
                            // Resolved the same way everywhere (the larger value wins); audited.
                            let detail =
                                format!("field {:?}: one update with two values (the larger kept)", delta.field);
                            self.refused(&Refused::new("equivocation", self.path_of_info(info), detail));
                        }
                        // Held to a larger limit than a local change (replicas writing concurrently
                        // may together pass the local one), but one anti-entropy still carries.
                        match state.absorb_within(&delta, self.cfg.max_merged_field_bytes) {
                            Ok(true) => {
                                log.merged.insert(eid, log.events.len());
                                log.events.push((eid, delta, false));
                            }
                            Ok(false) => {}
                            Err(e) => self.refuse(info, &e),
                        }
                    }
                }));
                return match merged {
                    Ok(()) => Ok(Handled::Applied(start..log.events.len())),
                    Err(p) => Err(format!("merging a peer's change panicked: {}", panic_text(&*p))),
                };
            }
            Body::Data(_) | Body::Signal(_) => {
                let Some((_, behaviour)) = kinds.get(usize::from(info.kind)) else {
                    return Err(format!("kind #{} has no behaviour", info.kind));
                };
                let state = node.state.as_deref().unwrap_or(&EMPTY_STATE);
                let mut ctx = Ctx { sys: self, id: info.id, parent: info.parent, state, ops: Vec::new() };
                match catch_unwind(AssertUnwindSafe(|| behaviour.handle(&mut ctx, env))) {
                    Ok(Ok(())) => ctx.ops,
                    Ok(Err(e)) => return Err(e.0),
                    Err(p) => return Err(format!("panicked: {}", panic_text(&*p))),
                }
            }
        };
        if ops.is_empty() {
            return Ok(Handled::Applied(start..start));
        }
        // State is allocated on the first change only: idle worknodes carry none. A behaviour's
        // operation that does not fit its field is dropped and counted; the others apply.
        let state = node.state.get_or_insert_with(Box::default);
        for (field, op) in &ops {
            let max = self.cfg.max_field_bytes;
            match state.prepare(self.cfg.replica, now_ms(), field, op).and_then(|d| self.fits(d)) {
                Ok(delta) => match state.apply_within(&delta, max) {
                    // An operation that changes nothing (grow 0, removing what is absent) is not stored.
                    Ok(true) => log.events.push((*uuid::Uuid::now_v7().as_bytes(), delta, true)),
                    Ok(false) => {}
                    Err(_) => drop(self.rejected.fetch_add(1, Ordering::Relaxed)),
                },
                Err(_) => drop(self.rejected.fetch_add(1, Ordering::Relaxed)),
            }
        }
        Ok(Handled::Applied(start..log.events.len()))
    }

    /// Applies an update's operations, all or none: one that does not fit its field refuses the
    /// whole update. An idempotent update already stored (or earlier in this turn) is a duplicate.
    fn update_state(
        &self,
        node: &mut Node,
        ops: &[(String, Op)],
        ids: Option<&[EventId]>,
        log: &mut TurnLog,
    ) -> Handled {
        let start = log.events.len();
        if let Some(last) = ids.and_then(<[EventId]>::last) {
            // This worknode's events are appended only by its own turns, so the log and this
            // turn's pending events are all there is to look at.
            if let Some(j) = log.events.iter().rposition(|e| e.0 == *last) {
                return Handled::Queued(j);
            }
            if let Some(store) = &self.store {
                match store.find(last) {
                    Ok(Some((_, seq))) => return Handled::Stored(seq),
                    Ok(None) => {}
                    Err(e) => return Handled::Refused(WriteError::Store(e)),
                }
            }
        }
        if ops.is_empty() {
            return Handled::Applied(start..start);
        }
        let state = node.state.get_or_insert_with(Box::default);
        // Several operations run on a copy first, so a refusal leaves nothing half applied; a
        // single one is refused by `prepare` before it changes anything.
        let mut scratch = (ops.len() > 1).then(|| state.as_ref().clone());
        let target = scratch.as_mut().unwrap_or(state);
        let now = now_ms();
        for (i, (field, op)) in ops.iter().enumerate() {
            let max = self.cfg.max_field_bytes;
            let applied = target
                .prepare(self.cfg.replica, now, field, op)
                .and_then(|d| self.fits(d))
                .and_then(|d| target.apply_within(&d, max).map(|changed| (d, changed)));
            match applied {
                Ok((delta, changed)) => {
                    // An operation that changes nothing (grow 0, removing what is absent) is not
                    // stored, unless it is part of an idempotent update: its ids are what tells a
                    // retry the update was applied.
                    if changed || ids.is_some() {
                        let id =
                            ids.and_then(|ids| ids.get(i).copied()).unwrap_or_else(|| *uuid::Uuid::now_v7().as_bytes());
                        log.events.push((id, delta, true));
                    }
                }
                Err(reason) => {
                    self.rejected.fetch_add(1, Ordering::Relaxed);
                    log.events.truncate(start);
                    return Handled::Refused(WriteError::Rejected { field: field.clone(), reason });
                }
            }
        }
        if let Some(next) = scratch {
            **state = next;
        }
        Handled::Applied(start..log.events.len())
    }

    /// Makes the turn's changes durable (one group-committed append), snapshots when due, answers
    /// the acknowledged writes, and prepares the replication shipment. A failed append reloads
    /// the state from the log.
    fn commit(&self, info: &Info, node: &mut Node, log: &mut TurnLog, shipment: &mut Option<Shipment>) {
        let acks = std::mem::take(&mut log.acks);
        let events = std::mem::take(&mut log.events);
        if events.is_empty() {
            answer(acks, Ok(&[]), node.version);
            return;
        }
        if let Some(store) = &self.store {
            let batch = events.iter().map(|(id, d, _)| NewEvent { id: *id, body: encode(d) }).collect();
            match store.append(info.id, Expected::Exact(node.version), batch) {
                Ok(a) => {
                    let every = self.cfg.snapshot_every.max(1);
                    if a.version / every != node.version / every
                        && let Some(state) = &node.state
                    {
                        // A failed snapshot only makes the next replay longer.
                        let _ = store.save_snapshot(info.id, a.version, &encode(state));
                    }
                    node.version = a.version;
                    answer(acks, Ok(&a.seqs), node.version);
                }
                Err(e) => {
                    // The in-memory state is ahead of the log: fall back to what is durable, now
                    // or (if the log cannot be read either) before the next read or turn.
                    node.stale = true;
                    self.reload(info.id, node);
                    answer(acks, Err(&e), node.version);
                    return;
                }
            }
        } else {
            let seqs: Vec<u64> = (node.version + 1..=node.version + events.len() as u64).collect();
            node.version += events.len() as u64;
            answer(acks, Ok(&seqs), node.version);
        }
        if info.consistency == Consistency::Eventual && self.sink.get().is_some() {
            let local: Vec<Replicated> = events.into_iter().filter(|e| e.2).map(|(id, d, _)| (id, d)).collect();
            if !local.is_empty() {
                let s = shipment.get_or_insert_with(|| Shipment { chain: self.chain(info), events: Vec::new() });
                s.events.extend(local);
            }
        }
    }

    fn chain(&self, info: &Info) -> Vec<Meta> {
        let mut chain = vec![self.meta_of(info)];
        let mut cur = self.info(info.parent);
        while let Some(i) = cur.filter(|i| i.parent != NO_PARENT) {
            chain.push(self.meta_of(i));
            cur = self.info(i.parent);
        }
        chain.reverse();
        chain
    }

    /// Supervision: restart from the event log, or stop after too many failures; tell the parent.
    fn restart(&self, idx: u32, info: &Info, node: &mut Node, reason: String, notices: &mut Vec<(u32, Signal)>) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
        node.restarts += 1;
        // Without a store the in-memory state is exactly what a replay would give (a failed
        // message's updates are never applied), so it is kept.
        let replayed = match &self.store {
            Some(_) => self.replay(info.id).map(Some),
            None => Ok(None),
        };
        let signal = match replayed {
            Ok(fresh) if node.restarts <= self.cfg.max_restarts => {
                if let Some((state, version)) = fresh {
                    node.state = Some(Box::new(state));
                    node.version = version;
                }
                Signal::ChildRestarted { child: info.id, reason, restarts: node.restarts }
            }
            other => {
                let reason = match other {
                    Err(e) => format!("{reason}; replay failed: {e}"),
                    Ok(_) => reason,
                };
                node.stopped = true;
                let dropped = self.core.close(idx).len() as u64;
                self.done(dropped);
                Signal::ChildStopped { child: info.id, reason }
            }
        };
        if info.parent != NO_PARENT {
            notices.push((info.parent, signal));
        }
    }
}

impl System {
    /// Starts a system: registers the built-in kinds (`root`, `data`), loads every worknode from
    /// `store` (replaying its snapshot and events) and starts the workers.
    pub fn start(
        cfg: SystemConfig,
        store: Option<Arc<EventStore>>,
        caps: Option<Arc<Capabilities>>,
    ) -> Result<Self, StoreError> {
        SystemBuilder { cfg, store, caps, kinds: Vec::new() }.start()
    }

    /// A builder, for registering behaviours before the store is replayed (a stored worknode
    /// whose kind is not registered refuses to load).
    pub fn builder(cfg: SystemConfig) -> SystemBuilder {
        SystemBuilder { cfg, store: None, caps: None, kinds: Vec::new() }
    }

    fn start_with(b: SystemBuilder) -> Result<Self, StoreError> {
        let SystemBuilder { cfg, store, caps, kinds: extra } = b;
        let mut kinds: Kinds =
            vec![(ROOT_KIND.into(), Arc::new(DataBehaviour)), ("data".into(), Arc::new(DataBehaviour))];
        for (name, behaviour) in extra {
            match kinds.iter_mut().find(|k| k.0 == name) {
                Some(k) => k.1 = behaviour,
                None => kinds.push((name, behaviour)),
            }
        }
        let inner = Arc::new(Inner {
            core: Core::new(cfg.max_worknodes.saturating_add(1)),
            ids: RwLock::new(HashMap::new()),
            names: RwLock::new(HashMap::new()),
            hasher: std::collections::hash_map::RandomState::new(),
            kinds: RwLock::new(Arc::new(kinds)),
            kinds_gen: AtomicU64::new(0),
            store,
            caps,
            cfg,
            sink: OnceLock::new(),
            in_flight: AtomicU64::new(0),
            idle: (Mutex::new(()), Condvar::new()),
            settle_waiters: AtomicU64::new(0),
            settled: (Mutex::new(()), Condvar::new()),
            handled: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            refused: Mutex::new(BTreeMap::new()),
            merging: Arc::new(AtomicUsize::new(0)),
            audit: OnceLock::new(),
        });
        let root = Info {
            id: ROOT_ID,
            parent: NO_PARENT,
            kind: 0,
            consistency: Consistency::Local,
            name: "".into(),
            children: Mutex::new(Vec::new()),
        };
        let root_idx =
            inner.core.alloc(root, Node { stopped: false, restarts: 0, state: None, version: 0, stale: false });
        debug_assert_eq!(root_idx, Some(0));
        inner.ids.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(ROOT_ID, 0);
        let mut sys = System { inner, workers: Vec::new() };
        if let (Some(store), Some(caps)) = (&sys.inner.store, &sys.inner.caps) {
            for id in store.revoked()? {
                caps.revoke(&id);
            }
        }
        sys.load()?;
        let workers = sys.inner.cfg.workers.max(1);
        for i in 0..workers {
            let inner = sys.inner.clone();
            let h = std::thread::Builder::new()
                .name(format!("wn-worker-{i}"))
                .spawn(move || {
                    let mut buf = Vec::new();
                    let mut cache = inner.kind_cache();
                    while let Some(idx) = inner.core.next() {
                        if cache.generation != inner.kinds_gen.load(Ordering::Acquire) {
                            cache = inner.kind_cache();
                        }
                        inner.turn(idx, &mut buf, &cache.kinds);
                    }
                })
                .map_err(|e| StoreError::Database {
                    path: String::new(),
                    reason: format!("cannot start worker thread: {e}"),
                })?;
            sys.workers.push(h);
        }
        Ok(sys)
    }

    fn load(&mut self) -> Result<(), StoreError> {
        let Some(store) = self.inner.store.clone() else { return Ok(()) };
        let mut metas: VecDeque<Meta> =
            store.metas()?.iter().map(|(id, b)| decode(&format!("meta of {id}"), b)).collect::<Result<_, _>>()?;
        // Parents before children: retry a meta whose parent is not loaded yet after the others.
        let mut stalled = 0;
        while let Some(meta) = metas.pop_front() {
            if self.inner.index(meta.parent).is_none() {
                metas.push_back(meta);
                stalled += 1;
                if stalled > metas.len() {
                    return Err(StoreError::Corrupt {
                        what: "worknode metadata".into(),
                        reason: format!("{} worknodes have no parent", metas.len()),
                    });
                }
                continue;
            }
            stalled = 0;
            let (state, version) = self.inner.replay(meta.id)?;
            self.insert(&meta, state, version)
                .map_err(|e| StoreError::Corrupt { what: format!("meta of {}", meta.id), reason: e.to_string() })?;
        }
        Ok(())
    }

    /// Registers (or replaces) the behaviour of `kind`.
    pub fn register(&self, kind: &str, behaviour: Arc<dyn Behaviour>) {
        let mut kinds = self.inner.kinds.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next: Kinds = kinds.as_ref().clone();
        match next.iter_mut().find(|k| k.0 == kind) {
            Some(k) => k.1 = behaviour,
            None => next.push((kind.to_owned(), behaviour)),
        }
        *kinds = Arc::new(next);
        self.inner.kinds_gen.fetch_add(1, Ordering::Release);
    }

    /// Revokes a token block (see [`crate::revocation_ids`]): refused from now on, and after a
    /// restart too (the id is stored durably before this returns).
    pub fn revoke(&self, revocation_id: &[u8]) -> Result<(), StoreError> {
        if let Some(store) = &self.inner.store {
            store.put_revoked(revocation_id)?;
        }
        if let Some(caps) = &self.inner.caps {
            caps.revoke(revocation_id);
        }
        Ok(())
    }

    /// Calls `f` with every batch of committed local events of Eventual worknodes (set once).
    pub fn set_replication_sink(&self, f: impl Fn(Shipment) + Send + Sync + 'static) {
        let _ = self.inner.sink.set(Box::new(f));
    }

    /// Sets the audit sink: called with every refused replicated change and how many of its
    /// [`Refused::code`] this system has refused so far (so a sink can log the 1st, 2nd, 4th,
    /// 8th… of a flood). Set once; later calls are ignored.
    pub fn set_audit_sink(&self, f: impl Fn(&Refused, u64) + Send + Sync + 'static) {
        let _ = self.inner.audit.set(Box::new(f));
    }

    /// Counts and audits a refusal the replication layer made itself (a message it could not
    /// decode).
    pub fn refuse_replicated(&self, r: &Refused) {
        self.inner.refused(r);
    }

    /// Replicated changes refused so far, per [`Refused::code`].
    pub fn refusals(&self) -> BTreeMap<&'static str, u64> {
        self.inner.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// This node's replica id.
    pub fn replica(&self) -> ReplicaId {
        self.inner.cfg.replica
    }

    /// The event store, if any.
    pub fn store(&self) -> Option<&Arc<EventStore>> {
        self.inner.store.as_ref()
    }

    /// The capability verifier, if any.
    pub fn capabilities(&self) -> Option<&Arc<Capabilities>> {
        self.inner.caps.as_ref()
    }

    /// Inserts a worknode described by `meta` (checks bounds and uniqueness, not authority).
    fn insert(&self, meta: &Meta, state: State, version: u64) -> Result<u32, CreateError> {
        let inner = &self.inner;
        let parent = inner.index(meta.parent).ok_or_else(|| CreateError::NoParent(meta.parent.to_string()))?;
        let kind = {
            let kinds = inner.kinds.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            kinds.iter().position(|k| k.0 == meta.kind).ok_or_else(|| CreateError::UnknownKind(meta.kind.clone()))?
        };
        let kind = u16::try_from(kind).map_err(|_| CreateError::UnknownKind(meta.kind.clone()))?;
        let key = inner.name_key(parent, &meta.name);
        {
            // Reserve the name first so two concurrent creates cannot both succeed.
            let mut names = inner.names.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            if names.contains_key(&key) {
                let path = inner.path_of(parent).child(&meta.name)?;
                return Err(CreateError::Exists(path));
            }
            names.insert(key, u32::MAX);
        }
        let unreserve = || {
            inner.names.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&key);
        };
        let Some(parent_info) = inner.info(parent) else {
            unreserve();
            return Err(CreateError::NoParent(meta.parent.to_string()));
        };
        let info = Info {
            id: meta.id,
            parent,
            kind,
            consistency: meta.consistency,
            name: meta.name.as_str().into(),
            children: Mutex::new(Vec::new()),
        };
        let node = Node {
            stopped: false,
            restarts: 0,
            state: (!state.is_empty()).then(|| Box::new(state)),
            version,
            stale: false,
        };
        // Check and add under the parent's children lock so the bound holds under concurrency.
        let added = {
            let mut children = parent_info.children.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if children.len() >= inner.cfg.max_children {
                Err(CreateError::TooManyChildren { parent: inner.path_of(parent), max: inner.cfg.max_children })
            } else {
                let idx = inner.core.alloc(info, node).ok_or(CreateError::Capacity(inner.cfg.max_worknodes))?;
                children.push(idx);
                Ok(idx)
            }
        };
        let idx = match added {
            Ok(idx) => idx,
            Err(e) => {
                unreserve();
                return Err(e);
            }
        };
        inner.names.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(key, idx);
        inner.ids.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(meta.id, idx);
        Ok(idx)
    }

    /// Creates worknode `parent/name` of `kind`. Needs the `create` right on the new path.
    pub fn create(
        &self,
        auth: &Authority,
        parent: &WnPath,
        name: &str,
        kind: &str,
        consistency: Consistency,
    ) -> Result<WorknodeId, CreateError> {
        self.create_with_id(auth, parent, name, kind, consistency, WorknodeId::new()).map(|(id, _)| id)
    }

    /// Like [`System::create`], returning the arena handle too.
    pub fn create_handle(
        &self,
        auth: &Authority,
        parent: &WnPath,
        name: &str,
        kind: &str,
        consistency: Consistency,
    ) -> Result<(WorknodeId, Handle), CreateError> {
        self.create_with_id(auth, parent, name, kind, consistency, WorknodeId::new())
    }

    fn create_with_id(
        &self,
        auth: &Authority,
        parent: &WnPath,
        name: &str,
        kind: &str,
        consistency: Consistency,
        id: WorknodeId,
    ) -> Result<(WorknodeId, Handle), CreateError> {
        if consistency == Consistency::Strong {
            return Err(Unsupported("Consistency::Strong").into());
        }
        if kind == ROOT_KIND {
            return Err(CreateError::ReservedKind);
        }
        let path = parent.child(name)?;
        if path.depth() > self.inner.cfg.max_depth {
            return Err(CreateError::TooDeep { depth: path.depth(), path, max: self.inner.cfg.max_depth });
        }
        self.inner.check(auth, &path, Right::Create)?;
        let pidx = self.inner.resolve(parent).ok_or_else(|| CreateError::NoParent(parent.to_string()))?;
        let pid = self.inner.info(pidx).map(|p| p.id).ok_or_else(|| CreateError::NoParent(parent.to_string()))?;
        let meta = Meta { id, parent: pid, name: name.to_owned(), kind: kind.to_owned(), consistency };
        let idx = self.insert(&meta, State::default(), 0)?;
        if let Some(store) = &self.inner.store {
            // Durable before the caller learns the id. On failure it is forgotten again: a
            // worknode that exists only in memory would vanish on restart while a retry was
            // told it "already exists".
            if let Err(e) = store.put_meta(id, &encode(&meta)) {
                self.forget(idx, pidx, &meta);
                return Err(e.into());
            }
        }
        // Peers learn of a new Eventual worknode at once (its chain, no events), not only
        // when a write ships or a connection's anti-entropy names it.
        if consistency == Consistency::Eventual
            && let (Some(info), Some(sink)) = (self.inner.info(idx), self.inner.sink.get())
        {
            sink(Shipment { chain: self.inner.chain(info), events: Vec::new() });
        }
        Ok((id, Handle(idx)))
    }

    /// Merges replicated events into the worknode a peer's `chain` names (the replication
    /// layer's entry point). The chain is held to the rules a local create is held to, all of it
    /// before anything is created: every name is a valid segment, the chain is no deeper than
    /// `max_depth` and its links join, it creates no `root` kind, no unknown kind and nothing
    /// `Strong`, and its last worknode (the one the events go to) is `Eventual`; quotas
    /// (`max_children`, `max_worknodes`) hold as for a local create.
    ///
    /// The chain is resolved by **path**; ids are only what the origin calls its worknodes. A
    /// path that holds a worknode here already (created concurrently on two replicas, under
    /// another id) is the same worknode if kind and consistency agree, so the states merge, and a
    /// `conflict` if not. A missing worknode is created with the origin's id when that id is
    /// free here and a fresh one when it is not.
    ///
    /// A refusal is counted and audited (see [`Refused`]) and applies nothing. Deltas that do not
    /// fit their field (another CRDT kind) are refused one by one inside the worknode's turn.
    /// Returns how many events went on to the worknode (those within `max_delta_bytes`).
    pub fn merge_replicated(
        &self,
        author: ReplicaId,
        chain: &[Meta],
        mut events: Vec<Replicated>,
    ) -> Result<usize, Refused> {
        let max = self.inner.cfg.max_delta_bytes;
        let name = chain.last().map_or("", |m| m.name.as_str());
        let mut total = 0usize;
        events.retain(|(_, d)| {
            let bytes = encode(d).len();
            if bytes > max {
                let detail = format!("a change of {bytes} bytes to field {:?} (limit {max})", d.field);
                self.inner.refused(&Refused::new("quota", format!("…/{name}"), detail));
                return false;
            }
            total = total.saturating_add(bytes + EVENT_OVERHEAD);
            true
        });
        let n = events.len();
        self.merge_events(author, false, chain, events, total).map(|()| n)
    }

    /// Merges full field states from a peer's anti-entropy message (`Wire::Sync`): the same
    /// checks as [`System::merge_replicated`] but for `max_delta_bytes`, since a whole field may
    /// be larger than one change (the peer's message size still bounds it).
    pub fn merge_replicated_state(
        &self,
        author: ReplicaId,
        chain: &[Meta],
        events: Vec<Replicated>,
    ) -> Result<(), Refused> {
        let total = events.iter().map(|(_, d)| encode(d).len() + EVENT_OVERHEAD).fold(0usize, usize::saturating_add);
        self.merge_events(author, true, chain, events, total)
    }

    /// Bytes of replicated changes accepted and not yet handled (encoded, plus a fixed cost per
    /// event). The replication layer
    /// stops reading from peers while this is high, so a peer faster than the worknodes is held
    /// back by its connection, not buffered here.
    pub fn merging_bytes(&self) -> usize {
        self.inner.merging.load(Ordering::Acquire)
    }

    fn merge_events(
        &self,
        author: ReplicaId,
        full: bool,
        chain: &[Meta],
        events: Vec<Replicated>,
        bytes: usize,
    ) -> Result<(), Refused> {
        if author == self.inner.cfg.replica {
            let detail = format!("a peer speaking as this replica ({author})");
            let r = Refused::new("author", "/", detail);
            self.inner.refused(&r);
            return Err(r);
        }
        let r = self.adopt_chain(chain).and_then(|(idx, path)| {
            let id = self.inner.info(idx).map(|i| i.id);
            self.inner.merging.fetch_add(bytes, Ordering::AcqRel);
            let merging = Some(Merging { counter: self.inner.merging.clone(), bytes });
            let merge = Msg {
                env: Envelope { from: Authority::System, body: Body::Merge { author, full, events } },
                ack: None,
                _merging: merging,
            };
            self.inner.push(idx, id, merge, false).map_err(|e| Refused::new("store", path.to_string(), e.to_string()))
        });
        if let Err(e) = &r {
            self.inner.refused(e);
        }
        r
    }

    /// Resolves (creating what is missing) a replicated chain: see [`System::merge_replicated`].
    fn adopt_chain(&self, chain: &[Meta]) -> Result<(u32, WnPath), Refused> {
        let inner = &self.inner;
        let refuse = |code, path: &WnPath, detail: String| Refused::new(code, path.to_string(), detail);
        let max = inner.cfg.max_depth;
        if chain.is_empty() || chain.len() > max {
            return Err(refuse("chain", &WnPath::root(), format!("a chain of {} worknodes (1 to {max})", chain.len())));
        }
        // The whole chain is checked before anything of it is created.
        let (mut path, mut parent_id) = (WnPath::root(), ROOT_ID);
        let mut paths = Vec::with_capacity(chain.len());
        for meta in chain {
            let Ok(next) = path.child(&meta.name) else {
                return Err(refuse("name", &path, format!("{:?} is not a worknode name", meta.name)));
            };
            path = next;
            if meta.parent != parent_id {
                return Err(refuse(
                    "chain",
                    &path,
                    format!("its parent is {}, not the chain's {parent_id}", meta.parent),
                ));
            }
            if meta.consistency == Consistency::Strong {
                return Err(refuse("consistency", &path, "Strong worknodes are not replicated".into()));
            }
            if meta.kind == ROOT_KIND {
                return Err(refuse("kind", &path, "the root kind is reserved for /".into()));
            }
            parent_id = meta.id;
            paths.push(path.clone());
        }
        let Some(last) = chain.last() else {
            return Err(refuse("chain", &path, "an empty chain".into()));
        };
        if last.consistency != Consistency::Eventual {
            return Err(refuse("consistency", &path, "only Eventual worknodes take replicated changes".into()));
        }
        // Resolved by path, never by id: an id is only what the origin calls the worknode (a peer
        // could plant a known id elsewhere). What exists is found without changing anything.
        let mut idx = 0u32;
        let mut missing = chain.len();
        for (i, meta) in chain.iter().enumerate() {
            match inner.child_named(idx, &meta.name) {
                Some(c) => idx = c,
                None => {
                    missing = i;
                    break;
                }
            }
        }
        if missing == chain.len() {
            // The same path created on another replica (perhaps under another id) is this
            // worknode if kind and consistency agree.
            let info = inner.info(idx).ok_or_else(|| refuse("conflict", &path, "a forgotten worknode".into()))?;
            let (kind, meta) = (inner.kind_name(info.kind), last);
            if kind != meta.kind || info.consistency != meta.consistency {
                let detail =
                    format!("it is {kind} {:?} here, {} {:?} there", info.consistency, meta.kind, meta.consistency);
                return Err(refuse("conflict", &path, detail));
            }
            return Ok((idx, path));
        }
        {
            let kinds = inner.kinds.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((meta, p)) =
                chain.iter().zip(&paths).skip(missing).find(|(m, _)| !kinds.iter().any(|k| k.0 == m.kind))
            {
                return Err(refuse("kind", p, format!("no behaviour for kind {:?} here", meta.kind)));
            }
        }
        for (meta, p) in chain.iter().zip(&paths).skip(missing) {
            // The origin's id when it is free here, a fresh one when it is not.
            let id = if inner.index(meta.id).is_none() { meta.id } else { WorknodeId::new() };
            let here_parent = inner.info(idx).map_or(ROOT_ID, |i| i.id);
            // A peer never creates a Local worknode here: an ancestor that is Local at its origin
            // (its state never leaves it) is an Eventual container here, so the same path
            // created Eventual on another replica merges with it.
            let local = Meta { id, parent: here_parent, consistency: Consistency::Eventual, ..meta.clone() };
            let created = self.insert(&local, State::default(), 0).map_err(|e| {
                let code = match e {
                    CreateError::UnknownKind(_) => "kind",
                    CreateError::TooManyChildren { .. } | CreateError::Capacity(_) => "quota",
                    _ => "conflict",
                };
                refuse(code, p, e.to_string())
            })?;
            if let Some(store) = &inner.store
                && let Err(e) = store.put_meta(local.id, &encode(&local))
            {
                self.forget(created, idx, &local);
                return Err(refuse("store", p, e.to_string()));
            }
            idx = created;
        }
        Ok((idx, path))
    }

    /// Undoes [`System::insert`] of a worknode whose record could not be stored: its name and id
    /// resolve to nothing again and its mailbox is closed (the arena slot stays, unreachable).
    fn forget(&self, idx: u32, parent: u32, meta: &Meta) {
        let inner = &self.inner;
        inner
            .names
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&inner.name_key(parent, &meta.name));
        inner.ids.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&meta.id);
        if let Some(p) = inner.info(parent) {
            p.children.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|c| *c != idx);
        }
        let dropped = inner.core.close(idx).len() as u64;
        inner.done(dropped);
    }

    fn target(&self, id: WorknodeId) -> Result<(u32, WnPath), SendError> {
        let idx = self.inner.index(id).ok_or_else(|| SendError::NotFound(id.to_string()))?;
        Ok((idx, self.inner.path_of(idx)))
    }

    /// The arena index of worknode `id`, once `auth` is checked to hold `write` on its path.
    fn writable(&self, auth: &Authority, id: WorknodeId) -> Result<u32, SendError> {
        let (idx, path) = self.target(id)?;
        self.inner.check(auth, &path, Right::Write)?;
        Ok(idx)
    }

    /// Queues `body` for `id` with a completion (`ids`: the event ids of an idempotent update).
    fn acked(
        &self,
        auth: &Authority,
        id: WorknodeId,
        body: Body,
        ids: Option<Box<[EventId]>>,
    ) -> Result<Completion, SendError> {
        let idx = self.writable(auth, id)?;
        let (reply, rx) = oneshot::channel();
        let msg = Msg { env: Envelope { from: auth.clone(), body }, ack: Some(Ack { reply, ids }), _merging: None };
        self.inner.push(idx, Some(id), msg, true)?;
        Ok(Completion { id, rx })
    }

    /// Queues `body` for `id`, answering nobody.
    fn detached(&self, auth: &Authority, id: WorknodeId, body: Body) -> Result<(), SendError> {
        let idx = self.writable(auth, id)?;
        self.inner.push(idx, Some(id), Msg::plain(Envelope { from: auth.clone(), body }), true)
    }

    /// Sends application data to worknode `id`. Needs the `write` right on its path. The
    /// completion resolves when the state changes the behaviour made for it are durable (or the
    /// behaviour failed, or the worknode stopped).
    pub fn send(&self, auth: &Authority, id: WorknodeId, data: Bytes) -> Result<Completion, SendError> {
        self.acked(auth, id, Body::Data(data), None)
    }

    /// Fire and forget: like [`System::send`] without waiting for durability (in-process fan-out).
    pub fn send_detached(&self, auth: &Authority, id: WorknodeId, data: Bytes) -> Result<(), SendError> {
        self.detached(auth, id, Body::Data(data))
    }

    /// Applies state operations to worknode `id` in its turn, all or none. Needs `write`. The
    /// completion resolves once the resulting events are durable: many waiting writers share one
    /// commit (the store's group commit, and up to `max_per_turn` messages per turn).
    pub fn update(&self, auth: &Authority, id: WorknodeId, ops: Vec<(String, Op)>) -> Result<Completion, SendError> {
        self.acked(auth, id, Body::Update(ops), None)
    }

    /// Like [`System::update`] with an idempotency key (1 to [`MAX_IDEMPOTENCY_KEY`] bytes; a
    /// UUID is a good one): an update whose key this worknode already stored is not applied
    /// again, and its completion reports the original ([`Committed::duplicate`]). A client that
    /// lost an answer retries with the same key. Keys are per worknode and need an event store.
    pub fn update_idempotent(
        &self,
        auth: &Authority,
        id: WorknodeId,
        ops: Vec<(String, Op)>,
        key: &[u8],
    ) -> Result<Completion, WriteError> {
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
            return Err(WriteError::BadKey { len: key.len(), max: MAX_IDEMPOTENCY_KEY });
        }
        let ids = idempotent_ids(id, key, ops.len());
        Ok(self.acked(auth, id, Body::Update(ops), Some(ids))?)
    }

    /// Fire and forget: like [`System::update`] without waiting for durability (in-process
    /// fan-out; an operation that does not fit its field is dropped silently).
    pub fn update_detached(&self, auth: &Authority, id: WorknodeId, ops: Vec<(String, Op)>) -> Result<(), SendError> {
        self.detached(auth, id, Body::Update(ops))
    }

    /// Sends data by handle: the fast path (no lookup, no capability check: the system's own sends).
    pub fn send_handle(&self, to: Handle, data: Bytes) -> Result<(), SendError> {
        self.inner.push(to.0, None, Msg::plain(Envelope { from: Authority::System, body: Body::Data(data) }), true)
    }

    /// The id for a path.
    pub fn resolve(&self, path: &WnPath) -> Option<WorknodeId> {
        let idx = self.inner.resolve(path)?;
        self.inner.info(idx).map(|n| n.id)
    }

    /// The consistency of the worknode at `path`, if there is one.
    pub fn consistency_of(&self, path: &WnPath) -> Option<Consistency> {
        let idx = self.inner.resolve(path)?;
        self.inner.info(idx).map(|i| i.consistency)
    }

    /// The arena handle of worknode `id`.
    pub fn handle(&self, id: WorknodeId) -> Option<Handle> {
        self.inner.index(id).map(Handle)
    }

    /// Reads worknode `id`. Needs `read`. `Strong` is reserved ([`Unsupported`]); `Local` and
    /// `Eventual` both read this replica's state.
    pub fn query(&self, auth: &Authority, id: WorknodeId, consistency: Consistency) -> Result<NodeView, QueryError> {
        if consistency == Consistency::Strong {
            return Err(Unsupported("Consistency::Strong reads").into());
        }
        let idx = self.inner.index(id).ok_or_else(|| QueryError::NotFound(id.to_string()))?;
        let path = self.inner.path_of(idx);
        self.inner.check(auth, &path, Right::Read)?;
        let queued = self.inner.core.queued(idx);
        let info = self.inner.info(idx).ok_or_else(|| QueryError::NotFound(id.to_string()))?;
        let view = self.inner.with_node(idx, |n| {
            // A read never shows what was not stored.
            self.inner
                .reload(id, n)
                .then(|| (n.version, n.stopped, n.restarts, n.state.as_deref().cloned().unwrap_or_default()))
        });
        let (version, stopped, restarts, state) = view
            .ok_or_else(|| QueryError::NotFound(id.to_string()))?
            .ok_or_else(|| QueryError::Unavailable(format!("worknode {id}: its event log cannot be read right now")))?;
        Ok(NodeView {
            id,
            path,
            kind: self.inner.kind_name(info.kind),
            consistency: info.consistency,
            version,
            queued,
            children: info.children().len(),
            stopped,
            restarts,
            state,
        })
    }

    /// Lists the subtree at `path` (itself first, then breadth-first), at most `limit` entries.
    /// Needs `read` on `path`.
    pub fn tree(&self, auth: &Authority, path: &WnPath, limit: usize) -> Result<Vec<TreeEntry>, QueryError> {
        self.inner.check(auth, path, Right::Read)?;
        let start = self.inner.resolve(path).ok_or_else(|| QueryError::NotFound(path.to_string()))?;
        let mut out = Vec::new();
        let mut queue = VecDeque::from([(start, path.clone())]);
        while let Some((idx, p)) = queue.pop_front() {
            if out.len() >= limit {
                break;
            }
            let Some(info) = self.inner.info(idx) else { continue };
            let children = info.children();
            for c in &children {
                if let Some(child) = self.inner.info(*c)
                    && let Ok(cp) = p.child(&child.name)
                {
                    queue.push_back((*c, cp));
                }
            }
            out.push(TreeEntry {
                id: info.id,
                path: p,
                kind: self.inner.kind_name(info.kind),
                consistency: info.consistency,
                children: children.len(),
            });
        }
        Ok(out)
    }

    /// Every Eventual worknode: its metadata chain and full state (for anti-entropy).
    pub fn eventual_states(&self) -> Vec<(Vec<Meta>, State)> {
        let n = self.inner.core.len();
        (0..n)
            .filter_map(|idx| self.eventual_at(idx, |info, _, state| (self.inner.chain(info), state.clone())))
            .collect()
    }

    /// A digest of the state of every Eventual worknode, by path: replicas compare them to learn
    /// which states differ (anti-entropy), one state in memory at a time. `cache` holds the
    /// digests of earlier calls by worknode and version, so a state that has not changed since
    /// is not encoded again (a round costs the worknodes, not their states).
    pub fn eventual_digests(&self, cache: &mut DigestCache) -> Vec<(String, [u8; 16])> {
        let n = self.inner.core.len();
        let mut seen = HashMap::new();
        let out = (0..n)
            .filter_map(|idx| {
                let info = self.inner.info(idx)?;
                let digest = self.eventual_digest_at(idx, cache)?;
                seen.insert(info.id, digest);
                Some((self.inner.path_of_info(info), digest.1))
            })
            .collect();
        cache.0 = seen;
        out
    }

    /// Part of the state of the Eventual worknode at `path` (see [`State::part_after`]): its
    /// metadata chain, the fields after `after` up to about `chunk` bytes, and the field the
    /// next part starts after, if any. Anti-entropy reads a large state one part at a time.
    pub fn eventual_part(
        &self,
        path: &WnPath,
        after: Option<&str>,
        chunk: usize,
    ) -> Option<(Vec<Meta>, State, Option<String>)> {
        let idx = self.inner.resolve(path)?;
        self.eventual_at(idx, |info, _, state| {
            let (part, next) = state.part_after(after, chunk);
            (self.inner.chain(info), part, next)
        })
    }

    /// The version and digest of the Eventual worknode in slot `idx`, if it is one: from `cache`
    /// while its version is the same, else from its state (which keeps its fields' digests).
    fn eventual_digest_at(&self, idx: u32, cache: &DigestCache) -> Option<(u64, [u8; 16])> {
        let info = self.inner.info(idx).filter(|i| i.consistency == Consistency::Eventual)?;
        if self.inner.index(info.id) != Some(idx) {
            return None;
        }
        self.inner.with_node(idx, |node| {
            if !self.inner.reload(info.id, node) {
                return None;
            }
            Some(match (cache.0.get(&info.id), node.state.as_deref_mut()) {
                (Some((v, d)), _) if *v == node.version => (node.version, *d),
                (_, Some(state)) => (node.version, state.digest()),
                (_, None) => (node.version, State::default().digest()),
            })
        })?
    }

    /// `f` of the Eventual worknode in slot `idx` (its version and state, loaded), if it is one.
    fn eventual_at<T>(&self, idx: u32, f: impl FnOnce(&Info, u64, &State) -> T) -> Option<T> {
        let info = self.inner.info(idx).filter(|i| i.consistency == Consistency::Eventual)?;
        // A forgotten slot (its record could not be stored) is no worknode.
        if self.inner.index(info.id) != Some(idx) {
            return None;
        }
        self.inner.with_node(idx, |node| {
            self.inner
                .reload(info.id, node)
                .then(|| f(info, node.version, node.state.as_deref().unwrap_or(&EMPTY_STATE)))
        })?
    }

    /// Number of worknodes, the root included.
    pub fn len(&self) -> usize {
        self.inner.core.len() as usize
    }

    /// Whether only the root exists.
    pub fn is_empty(&self) -> bool {
        self.len() <= 1
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        Stats {
            handled: self.inner.handled.load(Ordering::Relaxed),
            restarts: self.inner.restarts.load(Ordering::Relaxed),
            rejected: self.inner.rejected.load(Ordering::Relaxed),
        }
    }

    /// Waits until every message worknode `id` accepted before this call has been handled
    /// (or dropped by a stop), or `timeout`; returns whether it got there. Unlike
    /// [`System::wait_idle`], traffic to other worknodes, or to `id` after the call, does not
    /// delay it: this is read-your-writes for one worknode.
    pub fn settle(&self, id: WorknodeId, timeout: Duration) -> bool {
        let Some(idx) = self.inner.index(id) else { return true };
        let inner = &self.inner;
        let mark = inner.core.accepted(idx);
        if inner.core.reached(idx, mark) {
            return true;
        }
        inner.settle_waiters.fetch_add(1, Ordering::AcqRel);
        let reached = wait_until(&inner.settled, timeout, || inner.core.reached(idx, mark));
        inner.settle_waiters.fetch_sub(1, Ordering::AcqRel);
        reached
    }

    /// Waits until every accepted message has been handled, or `timeout`; returns whether idle.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        wait_until(&self.inner.idle, timeout, || self.inner.in_flight.load(Ordering::Acquire) == 0)
    }
}

/// Answers a turn's acknowledged writes once its events are committed: `seqs` are the committed
/// events' sequence numbers (in turn order) or the store's failure.
fn answer(acks: Vec<(Reply, Handled)>, seqs: Result<&[u64], &StoreError>, version: u64) {
    for (reply, handled) in acks {
        let done = |seq, events, duplicate| Ok(Committed { seq, events, version, duplicate });
        let outcome = match (handled, seqs) {
            (Handled::Stored(seq), _) => done(Some(seq), 0, true),
            (Handled::Refused(e), _) => Err(e),
            (Handled::Applied(range), _) if range.is_empty() => done(None, 0, false),
            (Handled::Applied(range), Ok(seqs)) => done(seqs.get(range.end - 1).copied(), range.len(), false),
            (Handled::Queued(j), Ok(seqs)) => done(seqs.get(j).copied(), 0, true),
            (Handled::Applied(_) | Handled::Queued(_), Err(e)) => Err(WriteError::Store(e.clone())),
        };
        // The caller may have stopped waiting: nothing to tell.
        let _ = reply.send(outcome);
    }
}

/// Waits on `signal` until `done` holds (checked under its lock, so a notify after the
/// condition changed is never missed) or `timeout`; returns whether it holds.
fn wait_until(signal: &(Mutex<()>, Condvar), timeout: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut g = signal.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        if done() {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        g = signal.1.wait_timeout(g, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
    }
}

impl Drop for System {
    fn drop(&mut self) {
        self.inner.core.shutdown();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    /// Found attacking: with the disk full, a failed `node_create` left `/b` in memory only
    /// ("already exists" to a retry, gone after a restart); a failed update must not stay
    /// applied either.
    #[test]
    fn a_full_disk_leaves_no_unstored_worknode_or_update_behind() {
        let (store, full) = crate::store::testing::store();
        let sys = System::start(SystemConfig::default(), Some(Arc::new(store)), None).unwrap();
        let root = WnPath::root();
        let a = sys.create(&Authority::System, &root, "a", "data", Consistency::Local).unwrap();
        sys.update(&Authority::System, a, vec![("n".into(), Op::Grow(1))]).unwrap().wait().unwrap();
        full.store(true, Ordering::SeqCst);
        let refused = sys.create(&Authority::System, &root, "b", "data", Consistency::Eventual);
        assert!(matches!(refused, Err(CreateError::Store(_))), "{refused:?}");
        assert_eq!(sys.resolve(&"/b".parse().unwrap()), None, "a worknode that was never stored");
        assert!(sys.eventual_states().is_empty());
        let failed = sys.update(&Authority::System, a, vec![("n".into(), Op::Grow(5))]).unwrap().wait();
        assert!(matches!(failed, Err(WriteError::Store(_))), "{failed:?}");
        full.store(false, Ordering::SeqCst);
        // Space again: the stale worknode reloads on its own (no other write needed), the
        // refused update is not in its state, and the same name is free.
        let view = sys.query(&Authority::System, a, Consistency::Local).unwrap();
        sys.create(&Authority::System, &root, "b", "data", Consistency::Eventual).unwrap();
        assert_eq!((view.state.to_json()["n"].clone(), view.version), (serde_json::json!(1), 1));
        let done = sys.update(&Authority::System, a, vec![("n".into(), Op::Grow(2))]).unwrap().wait().unwrap();
        assert_eq!(done.seq, Some(2));
    }

    /// Anti-entropy's digests: cached by version, so a round does not encode unchanged states,
    /// and what a change makes is seen at once. Local worknodes have none.
    #[test]
    fn digests_follow_changes_through_the_cache() {
        let sys = System::start(SystemConfig::default(), None, None).unwrap();
        let root = WnPath::root();
        let a = sys.create(&Authority::System, &root, "a", "data", Consistency::Eventual).unwrap();
        sys.create(&Authority::System, &root, "b", "data", Consistency::Eventual).unwrap();
        sys.create(&Authority::System, &root, "l", "data", Consistency::Local).unwrap();
        let fresh = || sys.eventual_digests(&mut DigestCache::default());
        let mut cache = DigestCache::default();
        let first = sys.eventual_digests(&mut cache);
        assert_eq!(first.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(), ["/a", "/b"]);
        assert_eq!(first[0].1, first[1].1, "equal (empty) states, equal digests");
        sys.update(&Authority::System, a, vec![("n".into(), Op::Grow(1))]).unwrap().wait().unwrap();
        let second = sys.eventual_digests(&mut cache);
        assert_ne!(second[0].1, first[0].1);
        assert_eq!(second[1].1, first[1].1);
        assert_eq!(second, fresh());
        assert_eq!(sys.eventual_digests(&mut cache), second);
    }
}
