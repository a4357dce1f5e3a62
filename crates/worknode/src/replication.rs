//! EVENTUAL consistency: CRDT deltas shipped between nodes over referee-comm.
//!
//! - Every committed batch of *local* events of an Eventual worknode is sent to every connected
//!   peer as [`Wire::Deltas`] (with the worknode's metadata chain, so a peer creates it on first
//!   sight), signed by this replica ([`Wire::Signed`]). Events keep their origin ids, so a
//!   redelivered delta is a no-op in the peer's store.
//! - A peer speaks only for itself ([`crate::crdt::Authored`]); a replica's signed changes are
//!   taken as that replica's from anyone, and each replica passes a signed message on to its
//!   other peers the first time it sees it ([`Relay`]), so changes reach replicas their author
//!   is not connected to.
//! - On every (re)connection both sides run a round of anti-entropy: each sends a digest of the
//!   state of every Eventual worknode ([`Wire::Digests`]), asks for the states whose digests
//!   differ or that it lacks ([`Wire::Want`]), and is sent each of those once ([`Wire::Sync`]),
//!   all in messages of [`SYNC_CHUNK`] at most (a large worknode split between its fields).
//!   Replicas that agree exchange digests only. Merge is a join, so replicas converge after a
//!   partition heals no matter which deltas were lost while it lasted.
//! - Each peer has its own queue and sender task (at most [`PEER_QUEUE_BYTES`] waiting), so a
//!   peer that stops reading delays nobody else: once its queue is full it is disconnected, and
//!   it gets the full state again when it reconnects.
//! - Peers are dialled with retry; a replica can be [`Replicator::isolate`]d (all connections
//!   closed and refused, shipments dropped) and [`Replicator::heal`]ed, which is how the partition
//!   tests cut the network.
//!
//! Payloads are MessagePack (`rmp-serde`) inside referee-comm's authenticated, encrypted messages.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use referee_comm::{Addr, AllowList, ConnectOptions, Event, Inbox, Node, PeerId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use crate::WnPath;
use crate::crdt::ReplicaId;
use crate::error::StoreError;
use crate::state::{Delta, State};
use crate::store::EventStore;
use crate::system::{DigestCache, Meta, Refused, Replicated, Shipment, System, digest_id};

/// What replicas say to each other.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Wire {
    /// New local events of one worknode.
    Deltas {
        /// Metadata from the root's child down to the worknode.
        chain: Vec<Meta>,
        /// Events with their origin ids.
        events: Vec<Replicated>,
    },
    /// Full states of Eventual worknodes (anti-entropy: the answer to a [`Wire::Want`]). A
    /// worknode larger than one message comes in several, each with some of its fields.
    Sync {
        /// The sender's store incarnation (its replica id is [`replica_of`] its identity and this).
        incarnation: u64,
        /// `(chain, state)` per worknode.
        nodes: Vec<(Vec<Meta>, State)>,
        /// The paths (as asked for) whose states this message completes: a state in parts is
        /// settled ([`SETTLED_FOR`]) only once its last part came.
        #[serde(default)]
        whole: Vec<String>,
    },
    /// Anti-entropy, first step: a digest of the state of each Eventual worknode of the sender,
    /// by path ([`System::eventual_digests`]), in messages of [`SYNC_CHUNK`] at most.
    Digests {
        /// `(path, digest)` per worknode.
        nodes: Vec<(String, [u8; 16])>,
    },
    /// Anti-entropy, second step: the worknodes (by path) of those a peer's [`Wire::Digests`]
    /// named whose state differs here or that this replica lacks. Each is answered with its
    /// state ([`Wire::Sync`]) once per round (a connection).
    Want {
        /// Paths.
        paths: Vec<String>,
    },
    /// A replica's new changes (`body`: a [`Wire::Deltas`] encoding), signed by it, so any
    /// replica can pass them on: a replica merges them as their author's whoever brought them,
    /// and passes them on to its other peers the first time it sees them.
    Signed {
        /// The author's referee-comm identity (its Ed25519 public key, 32 bytes).
        #[serde(with = "serde_bytes")]
        author: Vec<u8>,
        /// The author's store incarnation (signed too).
        incarnation: u64,
        /// The author's signature of the incarnation, `seq` and `prev` (8 bytes each,
        /// little-endian) then `body` ([`DELTAS_DOMAIN`], 64 bytes).
        #[serde(with = "serde_bytes")]
        sig: Vec<u8>,
        /// The changes.
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
        /// Its place in its author's sequence ([`Stamp::seq`]).
        #[serde(default)]
        seq: u64,
        /// The author's previous message ([`Stamp::prev`]).
        #[serde(default)]
        prev: u64,
    },
    /// Store-and-forward, the summary: per author replica, the sequence numbers of the signed
    /// changes the sender has seen ([`Spans`]). Answered with the signed changes the peer keeps
    /// and the sender has not seen ([`Relay::missing`]). In messages of [`SYNC_CHUNK`] at most,
    /// the last one `done`.
    Have {
        /// `(author replica, spans of seen sequence numbers)`.
        authors: Vec<(ReplicaId, Vec<(u64, u64)>)>,
        /// Whether this is the summary's last message.
        done: bool,
    },
}

/// The signature domain of [`Wire::Signed`] bodies.
pub const DELTAS_DOMAIN: &str = "referee-worknode/v2 deltas";

/// A signed change's place in its author's sequence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stamp {
    /// Strictly increasing per author replica: microseconds since the Unix epoch, or the
    /// author's last plus one (so a restarted author does not reuse its numbers, unless its
    /// clock went back).
    pub seq: u64,
    /// The author's previous `seq` since it started (0 for its first): a replica that has seen
    /// both knows no message of that author came between them.
    pub prev: u64,
}

impl Stamp {
    /// A stamp after `last` (0: none yet), from the clock.
    pub fn after(last: u64) -> Stamp {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        Stamp { seq: now.max(last.saturating_add(1)), prev: last }
    }
}

/// How many signed messages a replica remembers having passed on (a message seen again after
/// that many newer ones is merged again, a no-op, and passed on again).
pub const RELAY_MEMORY: usize = 1 << 16;

/// Checks a [`Wire::Signed`]: its author and the [`Wire::Deltas`] it holds, if the signature
/// holds.
fn open(
    author: &[u8],
    incarnation: u64,
    stamp: Stamp,
    sig: &[u8],
    body: &[u8],
) -> Result<(PeerId, ReplicaId, Wire), String> {
    let (Ok(author), Ok(sig)) = (<[u8; 32]>::try_from(author), <[u8; 64]>::try_from(sig)) else {
        return Err("a signed message with a malformed key or signature".into());
    };
    let author = PeerId::from_bytes(author);
    if stamp.prev >= stamp.seq && stamp.prev != 0 {
        return Err(format!("a message signed by {author} that names a later message as its previous one"));
    }
    if !author.verify(DELTAS_DOMAIN, &signed_bytes(incarnation, stamp, body), &sig) {
        return Err(format!("a message signed as {author} whose signature does not hold"));
    }
    match Wire::from_bytes(body) {
        Some(w @ Wire::Deltas { .. }) => Ok((author, replica_of(&author, incarnation), w)),
        // Its own state, signed after a restart (`Relay::own_state`).
        Some(w @ Wire::Sync { incarnation: i, .. }) if i == incarnation => {
            Ok((author, replica_of(&author, incarnation), w))
        }
        _ => Err(format!("a message signed by {author} that holds no changes")),
    }
}

/// What a [`Wire::Signed`] signature covers: the incarnation and stamp, then the body.
fn signed_bytes(incarnation: u64, stamp: Stamp, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + body.len());
    out.extend_from_slice(&incarnation.to_le_bytes());
    out.extend_from_slice(&stamp.seq.to_le_bytes());
    out.extend_from_slice(&stamp.prev.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Largest signed message a replica passes on (its body); a larger one is merged here but not
/// passed on. A replica ships its changes in messages of half this at most (a change of one
/// field is at most `max_delta_bytes`, 2 MiB), so its own always travel.
pub const RELAY_MAX_BYTES: usize = 4 << 20;

/// A shipment as [`Wire::Deltas`] messages whose events add up to about `chunk` bytes at most
/// (one event each at least), in order.
fn split_shipment(s: Shipment, chunk: usize) -> Vec<Wire> {
    let sizes = |e: &Replicated| rmp_serde::to_vec(e).map_or(0, |b| b.len());
    let mut out: Vec<Wire> = chunks(s.events, chunk, sizes)
        .into_iter()
        .map(|events| Wire::Deltas { chain: s.chain.clone(), events })
        .collect();
    // A shipment without events (a new worknode) is its chain alone.
    if out.is_empty() {
        out.push(Wire::Deltas { chain: s.chain, events: Vec::new() });
    }
    out
}

/// `items` in groups whose `size`s add up to about `limit` at most (one item each at least), in
/// order.
fn chunks<T>(items: Vec<T>, limit: usize, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let (mut group, mut total) = (Vec::new(), 0usize);
    for item in items {
        let bytes = size(&item);
        if !group.is_empty() && total.saturating_add(bytes) > limit {
            out.push(std::mem::take(&mut group));
            total = 0;
        }
        total = total.saturating_add(bytes);
        group.push(item);
    }
    if !group.is_empty() {
        out.push(group);
    }
    out
}

/// Most bytes of signed changes a replica keeps to pass on ([`Relay`]), all authors together.
pub const KEEP_BYTES: usize = 64 << 20;

/// Most bytes of signed changes kept per author identity (all its incarnations): a peer that
/// floods pushes out its own changes only.
pub const KEEP_IDENTITY_BYTES: usize = 16 << 20;

/// Most signed changes kept, all authors together.
pub const KEEP_MESSAGES: usize = 1 << 16;

/// Most author replicas whose changes are tracked (what was seen and what is kept), and most per
/// identity: an author beyond them replaces the one heard from least recently (whose changes
/// then may be sent here again, a no-op).
pub const KEEP_AUTHORS: usize = 4096;
/// See [`KEEP_AUTHORS`].
pub const KEEP_INCARNATIONS: usize = 16;

/// Most author replicas of identities the node's allow list does not name (strangers, authors
/// of changes passed on by members) per peer that brought them: they share one identity's part
/// of what is kept, so keys a peer mints push out only strangers that peer brought, never a
/// member's nor those another peer brought.
pub const KEEP_STRANGERS: usize = 256;

/// Most spans of seen sequence numbers per author ([`Spans`]): beyond it the two closest are
/// joined (what only that author's messages between them would have filled).
pub const SPANS_MAX: usize = 1024;

/// Most spans of all authors together (an honest author has one per restart in the kept
/// window): beyond it the author with the most has half of its joined, so authors that split
/// their numbers cannot make summaries large.
pub const SPANS_TOTAL: usize = 1 << 16;

/// Sets of sequence numbers as disjoint, non-adjacent inclusive spans.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spans(std::collections::BTreeMap<u64, u64>);

impl Spans {
    /// Adds `lo..=hi`.
    pub fn insert(&mut self, lo: u64, hi: u64) {
        let (mut lo, mut hi) = (lo.min(hi), hi.max(lo));
        if let Some((&l, &h)) = self.0.range(..=lo).next_back()
            && h.saturating_add(1) >= lo
        {
            lo = l;
            hi = hi.max(h);
        }
        let touching: Vec<u64> = self.0.range(lo..=hi.saturating_add(1)).map(|(l, _)| *l).collect();
        for l in touching {
            if let Some(h) = self.0.remove(&l) {
                hi = hi.max(h);
            }
        }
        self.0.insert(lo, hi);
    }

    /// Whether `seq` is in the set.
    pub fn covers(&self, seq: u64) -> bool {
        self.0.range(..=seq).next_back().is_some_and(|(_, hi)| *hi >= seq)
    }

    /// How many spans.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The spans, lowest first.
    pub fn spans(&self) -> Vec<(u64, u64)> {
        self.0.iter().map(|(l, h)| (*l, *h)).collect()
    }

    /// The set of `spans` (as [`Spans::spans`] gives them; at most [`SPANS_MAX`] are taken).
    pub fn from_spans(spans: &[(u64, u64)]) -> Spans {
        let mut out = Spans::default();
        for &(lo, hi) in spans.iter().take(SPANS_MAX) {
            out.insert(lo, hi);
        }
        out
    }

    /// Joins the two closest spans until at most `max` are left.
    fn cap(&mut self, max: usize) {
        while self.0.len() > max.max(1) {
            let spans = self.spans();
            let closest = spans.windows(2).filter_map(|w| w.first().zip(w.get(1))).min_by_key(|(a, b)| b.0 - a.1);
            let Some((a, b)) = closest.map(|(a, b)| (*a, *b)) else { return };
            self.0.remove(&b.0);
            self.0.insert(a.0, b.1);
        }
    }
}

/// One author replica's signed changes, as a [`Relay`] knows them.
#[derive(Debug)]
struct Author {
    identity: PeerId,
    /// Whose share of what is kept it counts in.
    share: Owner,
    /// Sequence numbers seen (kept or not).
    seen: Spans,
    /// What is kept to pass on (encoded [`Wire::Signed`]), by sequence number.
    kept: std::collections::BTreeMap<u64, Bytes>,
    bytes: usize,
    /// When it was last heard from ([`Kept::tick`]).
    used: u64,
}

/// The signed changes a [`Relay`] keeps to pass on, with their bounds ([`KEEP_BYTES`] …).
#[derive(Debug, Default)]
struct Kept {
    authors: HashMap<ReplicaId, Author>,
    /// Per share: its author replicas and what they keep.
    identities: HashMap<Owner, Share>,
    bytes: usize,
    count: usize,
    /// Spans of all authors' `seen`.
    spans: usize,
    tick: u64,
    /// Messages dropped to stay within the bounds.
    evicted: u64,
    /// Where kept changes are written ([`Relay::stored`]; `None`: memory only).
    store: Option<Arc<EventStore>>,
}

/// The key of a kept change in the store: its author replica and sequence number (big-endian).
fn kept_key(replica: ReplicaId, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&replica.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// How a kept change is stored: its share (a tag, 0 a member's own, 1 strangers' a peer
/// brought, and that identity), then its encoding.
fn kept_value(share: Owner, bytes: &[u8]) -> Vec<u8> {
    let (tag, id) = match share {
        Owner::Member(id) => (0u8, id),
        Owner::Via(id) => (1u8, id),
    };
    let mut out = Vec::with_capacity(33 + bytes.len());
    out.push(tag);
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(bytes);
    out
}

/// Whose share of what a [`Relay`] keeps an author's changes count in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Owner {
    /// An identity the node's allow list names: its own.
    Member(PeerId),
    /// Identities it does not name (strangers), by the peer that first brought a change of
    /// theirs: one share per peer, so the keys one peer mints push out only strangers it brought.
    Via(PeerId),
}

/// One identity's share of what a [`Relay`] keeps.
#[derive(Debug, Default)]
struct Share {
    authors: Vec<ReplicaId>,
    bytes: usize,
    count: usize,
}

impl Kept {
    /// Notes a signed change of `replica` (identity `identity`) stamped `stamp` as seen, and
    /// keeps `bytes` (its encoding) to pass on, unless one with that number is kept already.
    fn keep(&mut self, identity: PeerId, replica: ReplicaId, stamp: Stamp, bytes: Bytes) {
        self.keep_in(Owner::Member(identity), identity, replica, stamp, bytes);
    }

    /// [`Kept::keep`], counted in `share` (for an author new here), and written to the store.
    fn keep_in(&mut self, share: Owner, identity: PeerId, replica: ReplicaId, stamp: Stamp, bytes: Bytes) {
        self.keep_as(share, identity, replica, stamp, bytes, true);
    }

    /// [`Kept::keep_in`]; written to the store if `write` (not when loaded from it).
    fn keep_as(&mut self, share: Owner, identity: PeerId, replica: ReplicaId, stamp: Stamp, bytes: Bytes, write: bool) {
        self.tick += 1;
        if !self.authors.contains_key(&replica) {
            self.make_room_for_author(share);
            self.authors.insert(
                replica,
                Author { identity, share, seen: Spans::default(), kept: Default::default(), bytes: 0, used: 0 },
            );
            self.identities.entry(share).or_default().authors.push(replica);
        }
        let share = self.authors.get(&replica).map_or(share, |a| a.share);
        let Some(a) = self.authors.get_mut(&replica) else { return };
        a.used = self.tick;
        let lo = if stamp.prev == 0 { stamp.seq } else { stamp.prev.saturating_add(1) };
        let before = a.seen.len();
        a.seen.insert(lo, stamp.seq);
        a.seen.cap(SPANS_MAX);
        self.spans = (self.spans + a.seen.len()).saturating_sub(before);
        while self.spans > SPANS_TOTAL {
            let Some(most) = self.authors.values_mut().max_by_key(|a| a.seen.len()) else { break };
            let before = most.seen.len();
            most.seen.cap(before / 2);
            self.spans -= before - most.seen.len();
            if before < 2 {
                break;
            }
        }
        let Some(a) = self.authors.get_mut(&replica) else { return };
        if a.kept.contains_key(&stamp.seq) {
            return;
        }
        let len = bytes.len();
        if let (Some(store), true) = (&self.store, write) {
            store.keep_detached(kept_key(replica, stamp.seq), kept_value(a.share, &bytes));
        }
        a.kept.insert(stamp.seq, bytes);
        a.bytes += len;
        self.bytes += len;
        self.count += 1;
        if let Some(i) = self.identities.get_mut(&share) {
            i.bytes += len;
            i.count += 1;
        }
        while self.identities.get(&share).is_some_and(|i| i.bytes > KEEP_IDENTITY_BYTES) {
            if !self.evict_from(share, false) {
                break;
            }
        }
        // Over the count, the identity keeping the most changes gives one up; over the bytes,
        // the one keeping the most bytes.
        while self.bytes > KEEP_BYTES || self.count > KEEP_MESSAGES {
            let by_count = self.count > KEEP_MESSAGES;
            let share = |i: &Share| if by_count { i.count } else { i.bytes };
            let Some(largest) = self.identities.iter().max_by_key(|(_, i)| share(i)).map(|(id, _)| *id) else { break };
            if !self.evict_from(largest, by_count) {
                break;
            }
        }
    }

    /// Drops the oldest kept change of `identity`'s largest author (by count or by bytes);
    /// `false` if it keeps none.
    fn evict_from(&mut self, identity: Owner, by_count: bool) -> bool {
        let Some(share) = self.identities.get(&identity) else { return false };
        let size = |a: &Author| if by_count { a.kept.len() } else { a.bytes };
        let largest = share.authors.iter().copied().max_by_key(|r| self.authors.get(r).map_or(0, size));
        let Some(replica) = largest else {
            return false;
        };
        let Some(a) = self.authors.get_mut(&replica) else { return false };
        let Some((seq, m)) = a.kept.pop_first() else { return false };
        if let Some(store) = &self.store {
            store.forget_detached(vec![kept_key(replica, seq)]);
        }
        let len = m.len();
        a.bytes -= len;
        self.bytes -= len;
        self.count -= 1;
        self.evicted += 1;
        if let Some(i) = self.identities.get_mut(&identity) {
            i.bytes -= len;
            i.count -= 1;
        }
        true
    }

    /// Drops the kept changes of `replica` numbered below `seq` (not what was seen).
    fn drop_below(&mut self, replica: ReplicaId, seq: u64) {
        let Some(a) = self.authors.get_mut(&replica) else { return };
        let newer = a.kept.split_off(&seq);
        let old = std::mem::replace(&mut a.kept, newer);
        let (count, bytes) = (old.len(), old.values().map(Bytes::len).sum::<usize>());
        a.bytes -= bytes;
        if let Some(store) = &self.store {
            store.forget_detached(old.keys().map(|s| kept_key(replica, *s)).collect());
        }
        self.bytes -= bytes;
        self.count -= count;
        if let Some(i) = self.identities.get_mut(&a.share) {
            i.bytes -= bytes;
            i.count -= count;
        }
    }

    /// Before tracking a new author in share `identity`: drops the author heard from least
    /// recently of that share if it has [`KEEP_INCARNATIONS`] (strangers a peer brought:
    /// [`KEEP_STRANGERS`]); if there are [`KEEP_AUTHORS`], of the share with the most authors.
    fn make_room_for_author(&mut self, identity: Owner) {
        let oldest = |authors: &[ReplicaId], map: &HashMap<ReplicaId, Author>| {
            authors.iter().filter_map(|r| map.get(r).map(|a| (a.used, *r))).min().map(|(_, r)| r)
        };
        let mine = self.identities.get(&identity).map(|i| i.authors.clone()).unwrap_or_default();
        let cap = if matches!(identity, Owner::Via(_)) { KEEP_STRANGERS } else { KEEP_INCARNATIONS };
        let drop = if mine.len() >= cap {
            oldest(&mine, &self.authors)
        } else if self.authors.len() >= KEEP_AUTHORS {
            // Among the identities with the most authors, the one heard from least recently.
            let most = self.identities.values().map(|i| i.authors.len()).max().unwrap_or(0);
            let candidates: Vec<ReplicaId> =
                self.identities.values().filter(|i| i.authors.len() == most).flat_map(|i| i.authors.clone()).collect();
            oldest(&candidates, &self.authors)
        } else {
            None
        };
        if let Some(r) = drop
            && let Some(a) = self.authors.remove(&r)
        {
            if let Some(store) = &self.store {
                store.forget_detached(a.kept.keys().map(|seq| kept_key(r, *seq)).collect());
            }
            self.bytes -= a.bytes;
            self.count -= a.kept.len();
            self.spans -= a.seen.len();
            self.evicted += a.kept.len() as u64;
            if let Some(i) = self.identities.get_mut(&a.share) {
                i.authors.retain(|x| *x != r);
                i.bytes -= a.bytes;
                i.count -= a.kept.len();
                if i.authors.is_empty() {
                    self.identities.remove(&a.share);
                }
            }
        }
    }
}

/// What a [`Relay`] keeps (see [`Relay::kept_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KeptStats {
    /// Signed changes kept to pass on.
    pub messages: usize,
    /// Their bytes.
    pub bytes: usize,
    /// Author replicas tracked.
    pub authors: usize,
    /// Kept changes dropped to stay within the bounds ([`KEEP_BYTES`] …).
    pub evicted: u64,
}

/// A peer's [`Wire::Have`]: per author replica, the sequence numbers it has seen.
#[derive(Debug, Clone, Default)]
pub struct Have {
    /// Seen spans by author replica.
    pub authors: HashMap<ReplicaId, Spans>,
    /// Whether the summary names every author the peer has seen (not cut short): an author it
    /// does not name is one it has seen nothing of.
    pub complete: bool,
}

/// Signed changes: opening, merging, passing on, and keeping to pass on later (store and
/// forward), used by [`Replicator`] and by tests that drive replicas without a network.
///
/// A replica keeps the signed changes it merged (its own too), within [`KEEP_BYTES`] and the
/// bounds beside it, and notes the sequence numbers it has seen per author ([`Spans`]). On each
/// connection both sides send what they have seen ([`Wire::Have`]) and are sent the kept changes
/// they lack: a change reaches every replica connected to the network through replicas that
/// were connected at some time, not only those connected to its author or online when it was
/// made.
#[derive(Debug)]
pub struct Relay {
    me: PeerId,
    /// The identities whose kept changes count in their own share (`None`: every identity's);
    /// the others' share one ([`KEEP_STRANGERS`]).
    members: Option<AllowList>,
    seen: Mutex<Seen>,
    kept: Mutex<Kept>,
    /// The last sequence number this replica stamped its own changes with since it started
    /// (0: none yet), and the last it finds kept from before ([`Relay::load`]): its numbers stay
    /// above, though its first change names no previous one (what it signed before may have been
    /// lost in a crash before it was stored).
    last: Mutex<(u64, u64)>,
}

/// The signed messages a [`Relay`] passed on, newest last.
#[derive(Debug, Default)]
struct Seen {
    keys: HashSet<[u8; 32]>,
    order: std::collections::VecDeque<[u8; 32]>,
}

impl Relay {
    /// The relay of the replica whose identity is `me`.
    pub fn new(me: PeerId) -> Self {
        Self { me, members: None, seen: Mutex::new(Seen::default()), kept: Mutex::default(), last: Mutex::default() }
    }

    /// Writes what it keeps to `store` (with the next group commit, without waiting) and
    /// removes what it drops, so kept changes outlive a restart ([`Relay::load`]).
    #[must_use]
    pub fn stored(self, store: Option<Arc<EventStore>>) -> Self {
        self.kept().store = store;
        self
    }

    /// Loads the kept changes its store holds (at start, before any other use): each is kept
    /// again, its sequence numbers seen, and merged into `system` again (a no-op for what the
    /// store holds already: a crash may have come between keeping a change and storing what it
    /// changed). Waits while `system` is behind merging. Returns how many were loaded; one that
    /// cannot be read is removed.
    pub fn load(&self, system: &System) -> Result<usize, StoreError> {
        let Some(store) = self.kept().store.clone() else { return Ok(0) };
        let (mut loaded, mut bad) = (0usize, Vec::new());
        for (key, value) in store.kept()? {
            if self.load_one(system, key, &value).is_none() {
                bad.push(key);
                continue;
            }
            loaded += 1;
            while system.merging_bytes() > MERGE_BACKLOG_BYTES {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        store.forget_detached(bad);
        Ok(loaded)
    }

    /// One stored kept change (see [`Relay::load`]): `None` if it cannot be read.
    fn load_one(&self, system: &System, key: [u8; 16], value: &[u8]) -> Option<()> {
        let (tag, rest) = value.split_first()?;
        let (by, message) = rest.split_at_checked(32)?;
        let by = PeerId::from_bytes(by.try_into().ok()?);
        let Some(Wire::Signed { author, incarnation, sig, body, seq, prev }) = Wire::from_bytes(message) else {
            return None;
        };
        let sight: [u8; 32] = Sha256::new().chain_update(&author).chain_update(&sig).finalize().into();
        let author = PeerId::from_bytes(author.as_slice().try_into().ok()?);
        let replica = replica_of(&author, incarnation);
        if key != kept_key(replica, seq) || (prev >= seq && prev != 0) {
            return None;
        }
        // The store is this node's own (owner-only): its signatures were checked when the
        // changes came.
        let changes = Wire::from_bytes(&body).filter(|w| matches!(w, Wire::Deltas { .. } | Wire::Sync { .. }))?;
        if author == self.me {
            let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            last.1 = last.1.max(seq);
        } else if replica != system.replica() {
            let _ = changes.merge_as(system, replica);
        }
        let member = self.members.as_ref().is_none_or(|m| m.allows(&author));
        let share = match (member, *tag) {
            (true, _) => Owner::Member(author),
            (false, 1) => Owner::Via(by),
            (false, _) => Owner::Via(author),
        };
        self.first_sight(sight);
        self.kept().keep_as(share, author, replica, Stamp { seq, prev }, Bytes::copy_from_slice(message), false);
        Some(())
    }

    /// Counts kept changes of identities `members` does not allow (strangers) in a part shared
    /// per peer that brought them ([`KEEP_STRANGERS`], [`KEEP_IDENTITY_BYTES`]): changes signed
    /// with keys an allowed peer minted, without number, cannot push out a member's kept
    /// changes, nor strangers' another peer brought. Strangers' changes
    /// are still merged and passed on (a member may pass on what a replica this node does not
    /// list made).
    #[must_use]
    pub fn members(mut self, members: AllowList) -> Self {
        self.members = Some(members);
        self
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Signs `deltas` (a [`Wire::Deltas`]) as this replica's, serving store `incarnation`, with
    /// the next stamp, and keeps it to pass on. Returns its encoding.
    pub fn own(&self, incarnation: u64, deltas: &Wire, sign: impl FnOnce(&str, &[u8]) -> [u8; 64]) -> Bytes {
        let stamp = {
            let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut stamp = Stamp::after(last.0);
            stamp.seq = stamp.seq.max(last.1.saturating_add(1));
            last.0 = stamp.seq;
            stamp
        };
        // Exactly its length: kept for long, and counted by length.
        let bytes =
            Bytes::from(Wire::signed_at(self.me, incarnation, stamp, deltas, sign).to_bytes().into_boxed_slice());
        if bytes.len() <= RELAY_MAX_BYTES {
            self.kept().keep(self.me, replica_of(&self.me, incarnation), stamp, bytes.clone());
        }
        bytes
    }

    /// Signs what this replica made of each Eventual worknode of `system` ([`State::own`]),
    /// serving store `incarnation`, as its changes ([`Wire::Sync`] bodies, in messages of half
    /// [`RELAY_MAX_BYTES`] at most), and keeps them to pass on: run at start, so what it made
    /// before a crash and had not signed yet reaches replicas it is not linked to. Its own
    /// changes kept from before are dropped: the state holds them. Returns how many messages.
    pub fn own_state(&self, system: &System, incarnation: u64, sign: impl Fn(&str, &[u8]) -> [u8; 64]) -> usize {
        let chunk = RELAY_MAX_BYTES / 2;
        let me = system.replica();
        // Dropped first, so the state pushes out nothing another author keeps (found attacking:
        // with the kept changes at their bound, each start dropped another author's oldest).
        self.kept().drop_below(replica_of(&self.me, incarnation), u64::MAX);
        let (mut nodes, mut size, mut signed) = (Vec::new(), 0usize, 0usize);
        let mut flush = |nodes: &mut Vec<(Vec<Meta>, State)>, size: &mut usize| {
            if !nodes.is_empty() {
                let sync = Wire::Sync { incarnation, nodes: std::mem::take(nodes), whole: Vec::new() };
                drop(self.own(incarnation, &sync, &sign));
                signed += 1;
            }
            *size = 0;
        };
        for (path, _) in system.eventual_digests(&mut DigestCache::default()) {
            let Ok(path) = path.parse::<WnPath>() else { continue };
            let mut after: Option<String> = None;
            while let Some((chain, part, next)) = system.eventual_part(&path, after.as_deref(), chunk) {
                let own = part.own(me);
                let bytes = rmp_serde::to_vec(&own).map_or(0, |b| b.len());
                if !own.is_empty() {
                    if size.saturating_add(bytes) > chunk {
                        flush(&mut nodes, &mut size);
                    }
                    nodes.push((chain, own));
                    size = size.saturating_add(bytes);
                }
                match next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
        }
        flush(&mut nodes, &mut size);
        signed
    }

    /// What this replica has seen, per author (a [`Wire::Have`]'s `authors`).
    pub fn have(&self) -> Vec<(ReplicaId, Vec<(u64, u64)>)> {
        let mut out: Vec<_> = self.kept().authors.iter().map(|(r, a)| (*r, a.seen.spans())).collect();
        out.sort_unstable_by_key(|(r, _)| *r);
        out
    }

    /// The kept changes `peer` has not seen, by its summary `have`, oldest first per author
    /// (none of its own): keys for [`Relay::kept_message`].
    pub fn missing(&self, peer: &PeerId, have: &Have) -> Vec<(ReplicaId, u64)> {
        let kept = self.kept();
        let mut out = Vec::new();
        let mut authors: Vec<_> = kept.authors.iter().filter(|(_, a)| a.identity != *peer).collect();
        authors.sort_unstable_by_key(|(r, _)| **r);
        for (replica, a) in authors {
            let spans = have.authors.get(replica);
            if spans.is_none() && !have.complete {
                continue;
            }
            out.extend(a.kept.keys().filter(|seq| !spans.is_some_and(|s| s.covers(**seq))).map(|seq| (*replica, *seq)));
        }
        out
    }

    /// The encoding of a kept change, if it is still kept.
    pub fn kept_message(&self, key: (ReplicaId, u64)) -> Option<Bytes> {
        self.kept().authors.get(&key.0)?.kept.get(&key.1).cloned()
    }

    /// What is kept.
    pub fn kept_stats(&self) -> KeptStats {
        let k = self.kept();
        KeptStats { messages: k.count, bytes: k.bytes, authors: k.authors.len(), evicted: k.evicted }
    }

    /// Whether this is the first sight of the signed message `key` (remembered, bounded).
    fn first_sight(&self, key: [u8; 32]) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !seen.keys.insert(key) {
            return false;
        }
        seen.order.push_back(key);
        if seen.order.len() > RELAY_MEMORY
            && let Some(old) = seen.order.pop_front()
        {
            seen.keys.remove(&old);
        }
        true
    }

    /// Handles `payload` from the peer `from`: merges it into `system` (a signed message as its
    /// author's, anything else as `from`'s own), and returns the message to pass on and its
    /// author (to every other peer but the author) when it is a signed one seen for the first
    /// time. Our own changes coming back are dropped; a bad signature is refused `malformed`.
    pub fn receive(&self, system: &System, from: &PeerId, payload: &[u8]) -> Option<PeerId> {
        if let Some(wire) = Wire::from_bytes(payload) {
            return self.receive_wire(system, from, wire).map(|(author, _)| author);
        }
        let detail = format!("{} bytes from {from} that are not a replication message", payload.len());
        system.refuse_replicated(&Refused::new("malformed", "/", detail));
        None
    }

    /// [`Relay::receive`] of a decoded message; a signed change to pass on comes with its
    /// encoding, which is what is kept too: encoded again, so it is as long as its content
    /// (found attacking: a signed change the peer padded, with a field of 15 MiB no one reads,
    /// or its body as an array of 9-byte integers, was kept and passed on as it came, four
    /// times [`RELAY_MAX_BYTES`]).
    pub fn receive_wire(&self, system: &System, from: &PeerId, wire: Wire) -> Option<(PeerId, Bytes)> {
        match wire {
            Wire::Signed { author, incarnation, sig, body, seq, prev } => {
                let stamp = Stamp { seq, prev };
                let (author_id, replica, deltas) = match open(&author, incarnation, stamp, &sig, &body) {
                    Ok(opened) => opened,
                    Err(why) => {
                        system.refuse_replicated(&Refused::new("malformed", "/", format!("from {from}: {why}")));
                        return None;
                    }
                };
                if author_id == self.me {
                    return None;
                }
                let key: [u8; 32] = Sha256::new().chain_update(&author).chain_update(&sig).finalize().into();
                // A repeat is neither merged again nor passed on; a change refused here (its
                // chain, its size) is not passed on either, nor one larger than a relay carries.
                if !self.first_sight(key) || replica == system.replica() {
                    return None;
                }
                if !deltas.merge_as(system, replica) || body.len() > RELAY_MAX_BYTES {
                    return None;
                }
                let bytes = Bytes::from(
                    Wire::Signed { author, incarnation, sig, body, seq, prev }.to_bytes().into_boxed_slice(),
                );
                let member = self.members.as_ref().is_none_or(|m| m.allows(&author_id));
                let share = if member { Owner::Member(author_id) } else { Owner::Via(*from) };
                self.kept().keep_in(share, author_id, replica, stamp, bytes.clone());
                Some((author_id, bytes))
            }
            wire => {
                wire.merge_into(system, from);
                None
            }
        }
    }
}

impl Wire {
    /// The MessagePack encoding sent between replicas.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes what [`Wire::to_bytes`] produced (`None` for anything else).
    /// Bytes after the message make it malformed (found attacking: a signed change with
    /// megabytes after it was merged, and passed on whole, past [`RELAY_MAX_BYTES`]).
    pub fn from_bytes(bytes: &[u8]) -> Option<Wire> {
        let mut rest = bytes;
        let wire = Wire::deserialize(&mut rmp_serde::Deserializer::new(&mut rest)).ok()?;
        rest.is_empty().then_some(wire)
    }

    /// `deltas` (a [`Wire::Deltas`]) signed by `author`, serving store `incarnation`, with
    /// `sign` (its [`referee_comm::Identity::sign`] or [`Node::sign`]).
    /// Stamped with the clock alone ([`Stamp::after`] 0): a replica numbers its own with
    /// [`Relay::own`].
    pub fn signed(author: PeerId, incarnation: u64, deltas: &Wire, sign: impl FnOnce(&str, &[u8]) -> [u8; 64]) -> Wire {
        Wire::signed_at(author, incarnation, Stamp::after(0), deltas, sign)
    }

    /// [`Wire::signed`] with `stamp`.
    pub fn signed_at(
        author: PeerId,
        incarnation: u64,
        stamp: Stamp,
        deltas: &Wire,
        sign: impl FnOnce(&str, &[u8]) -> [u8; 64],
    ) -> Wire {
        let body = deltas.to_bytes();
        let sig = sign(DELTAS_DOMAIN, &signed_bytes(incarnation, stamp, &body)).to_vec();
        Wire::Signed { author: author.as_bytes().to_vec(), incarnation, sig, body, seq: stamp.seq, prev: stamp.prev }
    }
}

/// The replica id of the store `incarnation` served by the node whose referee-comm identity is
/// `peer`: the first 8 bytes of a SHA-256 of its public key and the incarnation. Bound to the
/// key, so a peer's changes are checked against the identity its connection (or signature)
/// proved ([`crate::crdt::Authored`]): no peer can write in another replica's name. The
/// incarnation (a random number each store picks when it is made) keeps a new store served
/// under an identity that served another from reusing that store's dots. A peer that sends no
/// incarnation (a plain [`Wire::Deltas`]) is incarnation 0.
pub fn replica_of(peer: &PeerId, incarnation: u64) -> ReplicaId {
    let id = digest_id(&[b"referee-worknode-replica\0", peer.as_bytes(), &incarnation.to_le_bytes()]);
    u64::from_le_bytes(id.first_chunk::<8>().copied().unwrap_or_default())
}

/// How long to wait between dial attempts to a peer that is down.
const REDIAL: Duration = Duration::from_millis(200);

/// Most bytes waiting to go to one peer. A peer that falls this far behind (it does not read) is
/// disconnected and its queue dropped: it is sent the full state again when it reconnects, and
/// the other peers never wait for it.
pub const PEER_QUEUE_BYTES: usize = 32 << 20;

/// Most bytes waiting to go to all peers together before anti-entropy waits: states asked for
/// are read and queued only while the total is below half of this, or the peer has nothing
/// queued, so peers that ask and then do not read hold this much at most between them (plus one
/// part each, and what referee-comm buffers within its own budgets), and cannot hold back
/// another peer's first part.
pub const ALL_QUEUES_BYTES: usize = 128 << 20;

/// How long a peer's state that was sent here is not asked for again while neither its digest
/// nor this replica's changes: merging it again would change nothing (it differs by what this
/// replica does not take from that peer, such as a third replica's updates). Bounded in time in
/// case its parts did not all arrive.
pub const SETTLED_FOR: Duration = Duration::from_secs(600);

/// A peer and a worknode path.
type PeerPath = (PeerId, String);

/// A peer's digest of a state and this replica's.
type Digests2 = ([u8; 16], [u8; 16]);

/// Most (peer, worknode) pairs remembered as settled ([`SETTLED_FOR`]).
const SETTLED_MAX: usize = 1 << 20;

/// Largest part of a state anti-entropy sends (encoded): below referee-comm's 16 MiB message
/// limit. A field larger than this (which only a configuration above the defaults lets grow)
/// is left out, counted (`parts_too_large`), and its state not marked whole.
pub const SYNC_PART_MAX: usize = 15 << 20;

/// Most bytes of one anti-entropy message (about): digests, wants and states go in messages of
/// this size, a worknode's state split between fields (a single field over referee-comm's
/// 16 MiB message limit cannot be sent).
pub const SYNC_CHUNK: usize = 4 << 20;

/// Most bytes of a peer's digests (paths and digests) kept while this replica computes its own
/// for the round (more are dropped: those worknodes wait for the next round).
const EARLY_DIGEST_BYTES: usize = 16 << 20;

/// Most bytes of a peer's [`Wire::Have`] summary taken, as held until it is done (an honest
/// one holds at most about 1.2 MB: [`SPANS_TOTAL`] spans of [`KEEP_AUTHORS`] authors); beyond
/// it the summary is cut short.
const HAVE_BYTES: usize = 2 << 20;

/// Most bytes of unfinished summaries of all peers together: peers that start summaries and
/// never finish them hold this much at most.
const HAVE_ALL_BYTES: usize = 16 << 20;

/// Most replicated bytes (encoded) accepted and not yet merged by the worknodes; above it no
/// more messages are taken from peers until the worknodes catch up.
pub const MERGE_BACKLOG_BYTES: usize = 16 << 20;

/// What waits to go to one peer, sent by that peer's own task.
struct PeerQueue {
    tx: mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicUsize>,
}

/// Replication of one [`System`] over one referee-comm [`Node`].
pub struct Replicator {
    system: Arc<System>,
    node: Node,
    isolated: AtomicBool,
    /// Mirrors `isolated` for tasks that wait for the partition to heal.
    healed: watch::Sender<bool>,
    peers: Mutex<HashMap<PeerId, PeerQueue>>,
    /// Bytes waiting in every peer's queue.
    queued: Arc<AtomicUsize>,
    relay: Relay,
    /// This replica's store incarnation ([`replica_of`]).
    incarnation: u64,
    /// Anti-entropy with each peer.
    rounds: Mutex<HashMap<PeerId, Round>>,
    /// The state digests of the last round, so an unchanged state is not encoded again.
    digests: Arc<Mutex<crate::system::DigestCache>>,
    /// Per (peer, path): the digests (the peer's, ours) a state was asked for with, until it
    /// arrives; then the same, with when it came ([`SETTLED_FOR`]).
    asked: Mutex<HashMap<PeerPath, Digests2>>,
    settled: Mutex<HashMap<PeerPath, (Digests2, std::time::Instant)>>,
    /// Bytes of unfinished [`Wire::Have`] summaries of all peers ([`HAVE_ALL_BYTES`]).
    have_pending: AtomicUsize,
    stats: SyncCounters,
}

/// Anti-entropy with one peer. A round starts with each connection: both sides send digests of
/// their states, each asks for the states that differ, and each state asked for is sent once
/// a round. One task at a time computes digests for a peer, and one sends it states, so a peer
/// that reconnects in a loop or asks again and again costs one copy of the state at most.
#[derive(Debug, Default)]
struct Round {
    /// Bumped by each new connection of the peer: work for an older round stops.
    generation: u64,
    /// Whether a task is running this peer's rounds (computing and sending digests).
    running: bool,
    /// This replica's digests for the round, by path (`None` until computed).
    ours: Option<Arc<HashMap<String, [u8; 16]>>>,
    /// Paths the peer asked for this round (each is sent once a round).
    served: HashSet<String>,
    /// The peer's digests that came before ours were computed, and their size.
    early: Vec<(String, [u8; 16])>,
    early_bytes: usize,
    /// Paths asked for and not sent yet.
    wanted: std::collections::VecDeque<String>,
    /// Whether a task is sending `wanted`.
    serving: bool,
    /// The peer's [`Wire::Have`] so far, and its size.
    have: Vec<(ReplicaId, Vec<(u64, u64)>)>,
    have_bytes: usize,
    /// Whether some of it was left out ([`HAVE_BYTES`], [`HAVE_ALL_BYTES`]).
    have_cut: bool,
    /// Whether the peer's summary was answered this round (one is, per connection).
    have_answered: bool,
    /// Kept signed changes the peer has not seen, not sent yet.
    push: std::collections::VecDeque<(ReplicaId, u64)>,
    /// Whether a task is sending `push`.
    pushing: bool,
}

/// What anti-entropy has done (see [`Replicator::stats`]).
#[derive(Debug, Default)]
struct SyncCounters {
    rounds: std::sync::atomic::AtomicU64,
    digests_sent: std::sync::atomic::AtomicU64,
    digests_received: std::sync::atomic::AtomicU64,
    wanted: std::sync::atomic::AtomicU64,
    states_sent: std::sync::atomic::AtomicU64,
    state_bytes_sent: std::sync::atomic::AtomicU64,
    wants_ignored: std::sync::atomic::AtomicU64,
    settled: std::sync::atomic::AtomicU64,
    parts_too_large: std::sync::atomic::AtomicU64,
    kept_sent: std::sync::atomic::AtomicU64,
    kept_bytes_sent: std::sync::atomic::AtomicU64,
    haves_ignored: std::sync::atomic::AtomicU64,
}

/// What anti-entropy has done since the replicator started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SyncStats {
    /// Rounds whose digests were all sent.
    pub rounds: u64,
    /// Digests sent (one per worknode per round).
    pub digests_sent: u64,
    /// Digests received.
    pub digests_received: u64,
    /// Worknode states asked of peers (their digests differed or they were missing here).
    pub wanted: u64,
    /// Parts of worknode states sent (one per worknode, more for a worknode split by fields).
    pub states_sent: u64,
    /// Bytes of [`Wire::Sync`] messages sent.
    pub state_bytes_sent: u64,
    /// Paths peers asked for that this round had not offered or had sent already.
    pub wants_ignored: u64,
    /// States whose digests differed but that were not asked for: sent here before, and neither
    /// side changed since ([`SETTLED_FOR`]).
    pub settled: u64,
    /// Parts of states left out for being larger than [`SYNC_PART_MAX`].
    pub parts_too_large: u64,
    /// Kept signed changes sent to peers that had not seen them (store and forward).
    pub kept_sent: u64,
    /// Their bytes.
    pub kept_bytes_sent: u64,
    /// Summaries ([`Wire::Have`]) of peers that had one answered on that connection already.
    pub haves_ignored: u64,
    /// What is kept to pass on.
    pub kept: KeptStats,
}

impl std::fmt::Debug for Replicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator").field("node", &self.node.id()).finish_non_exhaustive()
    }
}

fn encode(w: &Wire) -> Vec<u8> {
    rmp_serde::to_vec(w).unwrap_or_default()
}

/// A content-derived event id for anti-entropy states: the same state sent twice is stored once.
fn content_id(id: &crate::WorknodeId, delta: &Delta) -> [u8; 16] {
    digest_id(&[&id.to_bytes(), &rmp_serde::to_vec(delta).unwrap_or_default()])
}

impl Replicator {
    /// Starts replicating `system` (whose replica id must be [`replica_of`] `node`'s identity
    /// and `incarnation`) over `node` (whose inbox is `inbox`). Must be called inside a tokio
    /// runtime; spawns the tasks that ship deltas, answer peers and run anti-entropy.
    ///
    /// First loads the signed changes its store keeps ([`Relay::load`]) and signs what this
    /// replica made as its state ([`Relay::own_state`]): a crash may have come before its last
    /// changes were signed. Fails if the store cannot be read.
    pub fn start(system: Arc<System>, node: Node, inbox: Inbox, incarnation: u64) -> Result<Arc<Self>, StoreError> {
        let relay = Relay::new(node.id()).members(node.allow_list().clone()).stored(system.store().cloned());
        relay.load(&system)?;
        relay.own_state(&system, incarnation, |d, m| node.sign(d, m));
        let me = Arc::new(Self {
            system,
            isolated: AtomicBool::new(false),
            healed: watch::Sender::new(true),
            peers: Mutex::new(HashMap::new()),
            queued: Arc::default(),
            relay,
            incarnation,
            rounds: Mutex::new(HashMap::new()),
            digests: Arc::default(),
            asked: Mutex::default(),
            settled: Mutex::default(),
            have_pending: AtomicUsize::new(0),
            stats: SyncCounters::default(),
            node,
        });
        let (tx, rx) = mpsc::unbounded_channel::<Shipment>();
        me.system.set_replication_sink(move |s| {
            let _ = tx.send(s);
        });
        tokio::spawn(me.clone().ship(rx));
        tokio::spawn(me.clone().receive(inbox));
        tokio::spawn(me.clone().on_connect());
        Ok(me)
    }

    /// The comm node (its id and listeners).
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Keeps a connection to the peer at `addr` (identity `peer`), redialling when it drops.
    pub fn add_peer(self: &Arc<Self>, addr: Addr, peer: PeerId) {
        let me = self.clone();
        let mut healed = self.healed.subscribe();
        tokio::spawn(async move {
            loop {
                if healed.wait_for(|h| *h).await.is_err() {
                    return;
                }
                // Pause after a drop too, so a peer that refuses us is not redialled in a loop.
                if let Ok(conn) = me.node.connect_with(&addr, ConnectOptions::default().expect_peer(peer)).await {
                    drop(conn.closed().await);
                }
                tokio::time::sleep(REDIAL).await;
            }
        });
    }

    /// Cuts this replica off: closes every connection, refuses new ones, drops outgoing deltas.
    pub async fn isolate(&self) {
        self.isolated.store(true, Ordering::Release);
        self.healed.send_replace(false);
        // A cut, not a goodbye: waiting for queued messages would wait on a peer that does not
        // read (what was queued is repaired by the full state sent on reconnection).
        for conn in self.node.connections() {
            conn.abort();
        }
    }

    /// Ends isolation: peers are dialled again and anti-entropy runs on reconnection.
    pub fn heal(&self) {
        self.isolated.store(false, Ordering::Release);
        self.healed.send_replace(true);
    }

    /// Hands every shipment to each connected peer's queue; never waits for a peer.
    async fn ship(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Shipment>) {
        while let Some(s) = rx.recv().await {
            // In messages a relay passes on (a change is at most `max_delta_bytes`, 2 MiB).
            for deltas in split_shipment(s, RELAY_MAX_BYTES / 2) {
                // Signed and kept even while cut off: peers get it on reconnection, and pass it
                // on (its state alone would reach the direct peers only).
                let bytes = self.relay.own(self.incarnation, &deltas, |d, m| self.node.sign(d, m));
                if self.isolated.load(Ordering::Acquire) {
                    continue;
                }
                let peers: HashSet<PeerId> = self.node.connections().iter().map(|c| c.peer().id).collect();
                for peer in peers {
                    self.enqueue(peer, bytes.clone()).await;
                }
            }
        }
    }

    /// Queues `bytes` for `peer`, starting its sender task on first use. A peer whose queue is
    /// full is disconnected (a lost delta is repaired by the full state sent on reconnection).
    async fn enqueue(self: &Arc<Self>, peer: PeerId, bytes: Bytes) {
        let full = {
            let mut peers = self.peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let q = peers.entry(peer).or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                let queued = Arc::new(AtomicUsize::new(0));
                tokio::spawn(self.clone().send_to(peer, rx, queued.clone()));
                PeerQueue { tx, queued }
            });
            let len = bytes.len();
            if q.queued.load(Ordering::Acquire).saturating_add(len) > PEER_QUEUE_BYTES {
                // Dropping the sender ends the task once it has sent what it holds.
                peers.remove(&peer);
                true
            } else {
                q.queued.fetch_add(len, Ordering::AcqRel);
                self.queued.fetch_add(len, Ordering::AcqRel);
                if q.tx.send(bytes).is_err() {
                    q.queued.fetch_sub(len, Ordering::AcqRel);
                    self.queued.fetch_sub(len, Ordering::AcqRel);
                }
                false
            }
        };
        if full {
            for conn in self.node.connections().into_iter().filter(|c| c.peer().id == peer) {
                conn.abort();
            }
        }
    }

    /// One peer's sender: waits on that peer only (referee-comm disconnects a peer whose socket
    /// makes no progress for `write_timeout`).
    async fn send_to(self: Arc<Self>, peer: PeerId, mut rx: mpsc::UnboundedReceiver<Bytes>, queued: Arc<AtomicUsize>) {
        while let Some(bytes) = rx.recv().await {
            let len = bytes.len();
            let conn = self.node.connections().into_iter().find(|c| c.peer().id == peer && !c.is_closed());
            if let Some(conn) = conn {
                let _ = conn.send(bytes).await;
            }
            queued.fetch_sub(len, Ordering::AcqRel);
            self.queued.fetch_sub(len, Ordering::AcqRel);
        }
    }

    /// What anti-entropy has done.
    pub fn stats(&self) -> SyncStats {
        let c = &self.stats;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        SyncStats {
            rounds: get(&c.rounds),
            digests_sent: get(&c.digests_sent),
            digests_received: get(&c.digests_received),
            wanted: get(&c.wanted),
            states_sent: get(&c.states_sent),
            state_bytes_sent: get(&c.state_bytes_sent),
            wants_ignored: get(&c.wants_ignored),
            settled: get(&c.settled),
            parts_too_large: get(&c.parts_too_large),
            kept_sent: get(&c.kept_sent),
            kept_bytes_sent: get(&c.kept_bytes_sent),
            haves_ignored: get(&c.haves_ignored),
            kept: self.relay.kept_stats(),
        }
    }

    fn rounds(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Round>> {
        self.rounds.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn connected(&self, peer: &PeerId) -> bool {
        self.node.connections().iter().any(|c| c.peer().id == *peer && !c.is_closed())
    }

    /// Waits until `peer`'s queue has room for a large message (so a large state is paced by
    /// the peer rather than disconnecting it); `false` once the peer is gone.
    async fn room(&self, peer: &PeerId) -> bool {
        loop {
            let queued = {
                let peers = self.peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                peers.get(peer).map(|q| q.queued.load(Ordering::Acquire))
            };
            // A peer with nothing queued may always have one part: peers that stall cannot
            // hold back the others' anti-entropy, only their own.
            let (mine, all) = (queued.unwrap_or(0), self.queued.load(Ordering::Acquire));
            if mine == 0 || (mine <= PEER_QUEUE_BYTES / 2 && all <= ALL_QUEUES_BYTES / 2) {
                return self.connected(peer);
            }
            if !self.connected(peer) {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A new connection of `peer`: a new anti-entropy round (see [`Round`]).
    fn start_round(self: &Arc<Self>, peer: PeerId) {
        let mut rounds = self.rounds();
        let r = rounds.entry(peer).or_default();
        r.generation += 1;
        r.ours = None;
        r.served.clear();
        r.wanted.clear();
        r.have_answered = false;
        if !r.running {
            r.running = true;
            tokio::spawn(self.clone().run_rounds(peer));
        }
    }

    /// Runs `peer`'s rounds until none is pending: computes this replica's digests, answers the
    /// peer's that came early, and sends ours.
    async fn run_rounds(self: Arc<Self>, peer: PeerId) {
        loop {
            let generation = self.rounds().get(&peer).map_or(0, |r| r.generation);
            let (system, cache) = (self.system.clone(), self.digests.clone());
            let ours = tokio::task::spawn_blocking(move || {
                system.eventual_digests(&mut cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
            })
            .await
            .unwrap_or_default();
            let current = |me: &Self| me.rounds().get(&peer).map_or(0, |r| r.generation) == generation;
            let early = {
                let mut rounds = self.rounds();
                let Some(r) = rounds.get_mut(&peer).filter(|r| r.generation == generation) else { continue };
                r.ours = Some(Arc::new(ours.iter().cloned().collect()));
                r.early_bytes = 0;
                std::mem::take(&mut r.early)
            };
            self.compare(peer, early).await;
            let mut sent = true;
            for nodes in chunks(ours, SYNC_CHUNK, |(path, _)| path.len() + 24) {
                if !current(&self) || !self.room(&peer).await {
                    sent = false;
                    break;
                }
                let n = nodes.len() as u64;
                self.enqueue(peer, Bytes::from(Wire::Digests { nodes }.to_bytes())).await;
                self.stats.digests_sent.fetch_add(n, Ordering::Relaxed);
            }
            // What this replica has seen of signed changes: the peer sends the kept ones it lacks.
            if sent {
                let mut parts = chunks(self.relay.have(), SYNC_CHUNK, |(_, spans)| 12 + spans.len() * 18);
                if parts.is_empty() {
                    parts.push(Vec::new());
                }
                let last = parts.len() - 1;
                for (i, authors) in parts.into_iter().enumerate() {
                    if !current(&self) || !self.room(&peer).await {
                        sent = false;
                        break;
                    }
                    self.enqueue(peer, Bytes::from(Wire::Have { authors, done: i == last }.to_bytes())).await;
                }
            }
            let mut rounds = self.rounds();
            let Some(r) = rounds.get_mut(&peer) else { return };
            if r.generation == generation {
                if sent {
                    self.stats.rounds.fetch_add(1, Ordering::Relaxed);
                }
                r.running = false;
                return;
            }
        }
    }

    /// The peer's digests: asks for the states that differ here (or are missing), or keeps the
    /// digests until this round's own are computed.
    async fn on_digests(self: &Arc<Self>, peer: PeerId, nodes: Vec<(String, [u8; 16])>) {
        self.stats.digests_received.fetch_add(nodes.len() as u64, Ordering::Relaxed);
        {
            let mut rounds = self.rounds();
            let r = rounds.entry(peer).or_default();
            if r.ours.is_none() {
                for (path, digest) in nodes {
                    let bytes = path.len() + 40;
                    if r.early_bytes.saturating_add(bytes) > EARLY_DIGEST_BYTES {
                        break;
                    }
                    r.early_bytes += bytes;
                    r.early.push((path, digest));
                }
                return;
            }
        }
        self.compare(peer, nodes).await;
    }

    /// Asks `peer` for the states of `theirs` (its digests) that differ from this round's own.
    async fn compare(self: &Arc<Self>, peer: PeerId, theirs: Vec<(String, [u8; 16])>) {
        if theirs.is_empty() {
            return;
        }
        let Some(ours) = self.rounds().get(&peer).and_then(|r| r.ours.clone()) else { return };
        let mut want = Vec::new();
        {
            let settled = self.settled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut asked = self.asked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (path, theirs) in theirs {
                let mine = ours.get(&path).copied().unwrap_or_default();
                if ours.get(&path) == Some(&theirs) {
                    continue;
                }
                // Not Eventual here (a Local worknode is an Eventual container at its peers, so
                // they name it): what they would send is refused (`conflict`).
                if !ours.contains_key(&path)
                    && path
                        .parse::<crate::WnPath>()
                        .ok()
                        .and_then(|p| self.system.consistency_of(&p))
                        .is_some_and(|c| c != crate::Consistency::Eventual)
                {
                    continue;
                }
                // Sent here already, and neither side changed since: nothing to take from it.
                let key = (peer, path);
                if settled.get(&key).is_some_and(|(d, at)| *d == (theirs, mine) && at.elapsed() < SETTLED_FOR) {
                    self.stats.settled.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                // (States asked for of peers that left before sending them pile up: dropped
                // all at once, which only costs asking again.)
                if asked.len() >= SETTLED_MAX {
                    asked.clear();
                }
                asked.insert(key.clone(), (theirs, mine));
                want.push(key.1);
            }
        }
        for paths in chunks(want, SYNC_CHUNK, |p| p.len() + 8) {
            self.stats.wanted.fetch_add(paths.len() as u64, Ordering::Relaxed);
            self.enqueue(peer, Bytes::from(Wire::Want { paths }.to_bytes())).await;
        }
    }

    /// A state asked of `peer` arrived: remembered as settled with the digests it was asked with
    /// (see [`SETTLED_FOR`]).
    fn arrived(&self, peer: PeerId, sync: &Wire) {
        let Wire::Sync { whole, .. } = sync else { return };
        let mut asked = self.asked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut settled = self.settled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for path in whole {
            if let Some(digests) = asked.remove(&(peer, path.clone())) {
                if settled.len() >= SETTLED_MAX {
                    settled.retain(|_, (_, at)| at.elapsed() < SETTLED_FOR);
                    if settled.len() >= SETTLED_MAX {
                        settled.clear();
                    }
                }
                settled.insert((peer, path.clone()), (digests, std::time::Instant::now()));
            }
        }
    }

    /// The peer asks for states: each path this round offered, once.
    fn on_want(self: &Arc<Self>, peer: PeerId, paths: Vec<String>) {
        let mut rounds = self.rounds();
        let Some(r) = rounds.get_mut(&peer) else {
            self.stats.wants_ignored.fetch_add(paths.len() as u64, Ordering::Relaxed);
            return;
        };
        let ours = r.ours.clone().unwrap_or_default();
        for path in paths {
            if ours.contains_key(&path) && r.served.insert(path.clone()) {
                r.wanted.push_back(path);
            } else {
                self.stats.wants_ignored.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !r.serving && !r.wanted.is_empty() {
            r.serving = true;
            tokio::spawn(self.clone().serve(peer));
        }
    }

    /// Sends `peer` the states it asked for, in messages of about [`SYNC_CHUNK`] (a worknode
    /// split between fields when larger), each queued once the peer's queue has room.
    async fn serve(self: Arc<Self>, peer: PeerId) {
        let (mut nodes, mut whole) = (Vec::new(), Vec::new());
        let mut size = 0usize;
        loop {
            let next = {
                let mut rounds = self.rounds();
                let Some(r) = rounds.get_mut(&peer) else { return };
                let next = r.wanted.pop_front().map(|p| (p, r.generation));
                if next.is_none() && nodes.is_empty() {
                    r.serving = false;
                    return;
                }
                next
            };
            let Some((path, generation)) = next else {
                // Nothing more asked for: what is gathered goes.
                self.send_states(peer, std::mem::take(&mut nodes), std::mem::take(&mut whole)).await;
                size = 0;
                continue;
            };
            // One part of about a message at a time, read only once the queues have room: a
            // peer that asks and does not read holds one part here, not a copy of the state.
            let asked = path;
            let Ok(path) = asked.parse::<crate::WnPath>() else { continue };
            let mut after: Option<String> = None;
            let mut complete = true;
            loop {
                if !self.room(&peer).await || self.rounds().get(&peer).map(|r| r.generation) != Some(generation) {
                    break;
                }
                let (system, p, from) = (self.system.clone(), path.clone(), after.take());
                let part =
                    tokio::task::spawn_blocking(move || system.eventual_part(&p, from.as_deref(), SYNC_CHUNK)).await;
                let Ok(Some((chain, part, next))) = part else { break };
                let bytes = rmp_serde::to_vec(&part).map_or(0, |b| b.len());
                if bytes > SYNC_PART_MAX {
                    // Cannot be sent: left out, and the state is not whole (never settled).
                    self.stats.parts_too_large.fetch_add(1, Ordering::Relaxed);
                    complete = false;
                    match next {
                        Some(field) => {
                            after = Some(field);
                            continue;
                        }
                        None => break,
                    }
                }
                if !nodes.is_empty() && size.saturating_add(bytes) > SYNC_CHUNK {
                    self.send_states(peer, std::mem::take(&mut nodes), std::mem::take(&mut whole)).await;
                    size = 0;
                }
                size = size.saturating_add(bytes);
                nodes.push((chain, part));
                match next {
                    Some(field) => after = Some(field),
                    None => {
                        if complete {
                            whole.push(asked);
                        }
                        break;
                    }
                }
            }
        }
    }

    /// Part of the peer's [`Wire::Have`]; once it is `done`, the kept signed changes the peer has
    /// not seen are sent to it (in the background, each once its queue has room). A summary
    /// larger than [`HAVE_BYTES`] is cut short: then only changes of the authors it named are
    /// sent. One summary is answered per connection (more are ignored, `haves_ignored`).
    fn on_have(self: &Arc<Self>, peer: PeerId, authors: Vec<(ReplicaId, Vec<(u64, u64)>)>, done: bool) {
        let mut rounds = self.rounds();
        let r = rounds.entry(peer).or_default();
        if r.have_answered {
            self.stats.haves_ignored.fetch_add(1, Ordering::Relaxed);
            return;
        }
        for (author, mut spans) in authors {
            spans.truncate(SPANS_MAX);
            // What it holds here: the author, the vector, the spans.
            let bytes = 32 + spans.len() * 16;
            let all = self.have_pending.load(Ordering::Acquire);
            if r.have_bytes.saturating_add(bytes) > HAVE_BYTES || all.saturating_add(bytes) > HAVE_ALL_BYTES {
                r.have_cut = true;
                continue;
            }
            r.have_bytes += bytes;
            self.have_pending.fetch_add(bytes, Ordering::AcqRel);
            r.have.push((author, spans));
        }
        if !done {
            return;
        }
        let raw = std::mem::take(&mut r.have);
        self.have_pending.fetch_sub(r.have_bytes, Ordering::AcqRel);
        r.have_bytes = 0;
        let mut have = Have { authors: HashMap::new(), complete: !std::mem::take(&mut r.have_cut) };
        for (author, spans) in raw {
            let seen: &mut Spans = have.authors.entry(author).or_default();
            for (lo, hi) in spans {
                seen.insert(lo, hi);
            }
            seen.cap(SPANS_MAX);
        }
        r.have_answered = true;
        r.push = self.relay.missing(&peer, &have).into();
        if !r.pushing && !r.push.is_empty() {
            r.pushing = true;
            tokio::spawn(self.clone().push(peer));
        }
    }

    /// Sends `peer` the kept signed changes it has not seen, each once its queue has room.
    async fn push(self: Arc<Self>, peer: PeerId) {
        loop {
            let next = {
                let mut rounds = self.rounds();
                let Some(r) = rounds.get_mut(&peer) else { return };
                let next = r.push.pop_front();
                if next.is_none() {
                    r.pushing = false;
                    return;
                }
                next
            };
            let Some(key) = next else { continue };
            if !self.room(&peer).await {
                if let Some(r) = self.rounds().get_mut(&peer) {
                    r.push.clear();
                    r.pushing = false;
                }
                return;
            }
            // Dropped since (the bounds): the peer gets it elsewhere, or not at all.
            if let Some(bytes) = self.relay.kept_message(key) {
                self.stats.kept_sent.fetch_add(1, Ordering::Relaxed);
                self.stats.kept_bytes_sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                self.enqueue(peer, bytes).await;
            }
        }
    }

    /// One [`Wire::Sync`] of `nodes` to `peer`, once its queue has room.
    async fn send_states(self: &Arc<Self>, peer: PeerId, nodes: Vec<(Vec<Meta>, State)>, whole: Vec<String>) {
        if nodes.is_empty() || !self.room(&peer).await {
            return;
        }
        let n = nodes.len() as u64;
        let bytes = Bytes::from(Wire::Sync { incarnation: self.incarnation, nodes, whole }.to_bytes());
        self.stats.states_sent.fetch_add(n, Ordering::Relaxed);
        self.stats.state_bytes_sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.enqueue(peer, bytes).await;
    }

    async fn on_connect(self: Arc<Self>) {
        let mut events = self.node.events();
        loop {
            let ev = match events.recv().await {
                Ok(ev) => ev,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            match ev {
                Event::Connected { peer, .. } => {
                    if self.isolated.load(Ordering::Acquire) {
                        for conn in self.node.connections().into_iter().filter(|c| c.peer().id == peer) {
                            conn.abort();
                        }
                        continue;
                    }
                    self.start_round(peer);
                }
                // The last connection of a peer gone: its queue and task go too.
                Event::Closed { peer, .. }
                    if !self.node.connections().iter().any(|c| c.peer().id == peer && !c.is_closed()) =>
                {
                    self.peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&peer);
                    // Rounds end with the connection (a peer's next connection starts one).
                    let mut rounds = self.rounds();
                    if let Some(r) = rounds.get_mut(&peer) {
                        r.generation += 1;
                        r.ours = None;
                        r.served.clear();
                        r.wanted.clear();
                        r.early.clear();
                        r.early_bytes = 0;
                        r.have = Vec::new();
                        self.have_pending.fetch_sub(r.have_bytes, Ordering::AcqRel);
                        r.have_bytes = 0;
                        r.have_cut = false;
                        r.have_answered = false;
                        r.push.clear();
                    }
                    // This peer's only: another peer's finished round still answers its wants.
                    if rounds.get(&peer).is_some_and(|r| !r.running && !r.serving && !r.pushing) {
                        rounds.remove(&peer);
                    }
                }
                _ => {}
            }
        }
    }

    async fn receive(self: Arc<Self>, mut inbox: Inbox) {
        loop {
            // Backpressure: while the worknodes are behind, peers' messages wait in referee-comm
            // (whose byte budgets then stop reading their sockets), not decoded in mailboxes.
            while self.system.merging_bytes() > MERGE_BACKLOG_BYTES {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let Some(msg) = inbox.recv().await else { return };
            if self.isolated.load(Ordering::Acquire) {
                msg.connection().abort();
                continue;
            }
            let from = msg.from();
            let wire = match Wire::from_bytes(msg.payload()) {
                Some(Wire::Digests { nodes }) => {
                    self.on_digests(from, nodes).await;
                    continue;
                }
                Some(Wire::Want { paths }) => {
                    self.on_want(from, paths);
                    continue;
                }
                Some(Wire::Have { authors, done }) => {
                    self.on_have(from, authors, done);
                    continue;
                }
                Some(wire @ Wire::Sync { .. }) => {
                    self.arrived(from, &wire);
                    wire
                }
                Some(wire) => wire,
                None => {
                    let detail =
                        format!("{} bytes from {from} that are not a replication message", msg.payload().len());
                    self.system.refuse_replicated(&Refused::new("malformed", "/", detail));
                    continue;
                }
            };
            if let Some((author, bytes)) = self.relay.receive_wire(&self.system, &from, wire) {
                // Passed on to every other peer (the author has it), through their own queues.
                let peers: HashSet<PeerId> = self.node.connections().iter().map(|c| c.peer().id).collect();
                for peer in peers.into_iter().filter(|p| *p != from && *p != author) {
                    self.enqueue(peer, bytes.clone()).await;
                }
            }
        }
    }
}

impl Wire {
    /// The anti-entropy message: the full state of every Eventual worknode of `system`, whose
    /// store is `incarnation`.
    pub fn sync(system: &System, incarnation: u64) -> Wire {
        Wire::Sync { incarnation, nodes: system.eventual_states(), whole: Vec::new() }
    }

    /// Merges what the peer `from` sent into `system`. A chain or delta that breaks a rule
    /// here is refused (counted and audited by the system); the peer keeps its copy. The peer
    /// speaks for its own updates only ([`replica_of`] its identity and the incarnation its
    /// message names, 0 for a plain [`Wire::Deltas`]): its changes must hold nothing another
    /// replica made, and of its [`Wire::Sync`] what other replicas made is left out (taken from
    /// them). A [`Wire::Signed`] is merged as its signer's, whoever `from` is.
    pub fn merge_into(self, system: &System, from: &PeerId) {
        match self {
            Wire::Signed { author, incarnation, sig, body, seq, prev } => {
                match open(&author, incarnation, Stamp { seq, prev }, &sig, &body) {
                    // This replica's own changes, come back: nothing to do.
                    Ok((_, replica, _)) if replica == system.replica() => {}
                    Ok((_, replica, deltas)) => drop(deltas.merge_as(system, replica)),
                    Err(why) => system.refuse_replicated(&Refused::new("malformed", "/", why)),
                }
            }
            // Not changes: the replicator answers them.
            Wire::Digests { .. } | Wire::Want { .. } | Wire::Have { .. } => {}
            Wire::Deltas { .. } => drop(self.merge_as(system, replica_of(from, 0))),
            Wire::Sync { incarnation, .. } => drop(self.merge_as(system, replica_of(from, incarnation))),
        }
    }

    /// [`Wire::merge_into`] for changes whose author is replica `author` (checked by the caller).
    /// Returns whether a change went on to a worknode (its chain and size were accepted).
    fn merge_as(self, system: &System, author: ReplicaId) -> bool {
        match self {
            Wire::Signed { .. } | Wire::Digests { .. } | Wire::Want { .. } | Wire::Have { .. } => false,
            // A new worknode's chain comes without events.
            Wire::Deltas { chain, events } => {
                let empty = events.is_empty();
                system.merge_replicated(author, &chain, events).is_ok_and(|n| n > 0 || empty)
            }
            // Went on if a worknode took it (found attacking: a signed state whose chains were
            // all refused was kept, passed on to every replica, and refused again at each start).
            Wire::Sync { nodes, .. } => {
                let mut taken = false;
                for (chain, state) in nodes {
                    let Some(last) = chain.last() else { continue };
                    let events = state.into_deltas().into_iter().map(|d| (content_id(&last.id, &d), d)).collect();
                    taken |= system.merge_replicated_state(author, &chain, events).is_ok();
                }
                taken
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crdt::GCounter;
    use crate::state::Crdt;

    #[test]
    fn spans_join_cover_and_stay_bounded() {
        let mut s = Spans::default();
        s.insert(5, 5);
        s.insert(7, 9);
        assert_eq!(s.spans(), vec![(5, 5), (7, 9)]);
        assert!(s.covers(5) && !s.covers(6) && s.covers(8) && !s.covers(10) && !s.covers(4));
        s.insert(6, 6);
        assert_eq!(s.spans(), vec![(5, 9)]);
        s.insert(1, 20);
        s.insert(u64::MAX, u64::MAX);
        s.insert(22, 30);
        assert_eq!(s.spans(), vec![(1, 20), (22, 30), (u64::MAX, u64::MAX)]);
        s.cap(2);
        assert_eq!(s.spans(), vec![(1, 30), (u64::MAX, u64::MAX)]);
        let many: Vec<(u64, u64)> = (0..5000).map(|i| (i * 3, i * 3)).collect();
        assert_eq!(Spans::from_spans(&many).len(), SPANS_MAX);
    }

    fn peer(n: u8) -> PeerId {
        PeerId::from_bytes([n; 32])
    }

    #[test]
    fn a_flooding_author_pushes_out_only_its_own_kept_changes() {
        let mut k = Kept::default();
        let (honest, flood) = (peer(1), peer(2));
        k.keep(honest, 1, Stamp { seq: 10, prev: 0 }, Bytes::from(vec![0; 1000]));
        for seq in 1..=40u64 {
            k.keep(flood, 2, Stamp { seq, prev: seq - 1 }, Bytes::from(vec![0; 1 << 20]));
        }
        assert!(k.identities[&Owner::Member(flood)].bytes <= KEEP_IDENTITY_BYTES);
        assert_eq!(k.authors[&1].kept.len(), 1, "the honest author's change stays");
        // What was dropped was still seen: a peer does not send it again.
        assert_eq!(k.authors[&2].seen.spans(), vec![(1, 40)]);
        assert_eq!(k.authors[&2].kept.keys().next(), Some(&25));
        // Many incarnations of one identity replace each other, not other identities' authors.
        for r in 100..200u64 {
            k.keep(flood, r, Stamp { seq: 1, prev: 0 }, Bytes::from(vec![0; 10]));
        }
        assert_eq!(k.identities[&Owner::Member(flood)].authors.len(), KEEP_INCARNATIONS);
        assert!(k.authors.contains_key(&1));
        let total: usize = k.authors.values().map(|a| a.bytes).sum();
        assert_eq!(total, k.bytes);
        assert_eq!(k.authors.values().map(|a| a.kept.len()).sum::<usize>(), k.count);
    }

    #[test]
    fn over_the_count_the_identity_keeping_the_most_changes_gives_one_up() {
        let mut k = Kept::default();
        // An honest author keeps few changes of many bytes; two others many empty ones.
        for seq in 1..=41 {
            k.keep(peer(1), 1, Stamp { seq, prev: seq - 1 }, Bytes::from(vec![0; 4000]));
        }
        for n in [2u8, 3] {
            for seq in 1..=KEEP_MESSAGES as u64 / 2 + 100 {
                k.keep(peer(n), n.into(), Stamp { seq, prev: seq - 1 }, Bytes::new());
            }
        }
        assert_eq!(k.authors[&1].kept.len(), 41);
        assert_eq!(k.count, KEEP_MESSAGES);
    }

    #[test]
    fn a_full_author_table_gives_up_an_author_of_the_identity_with_the_most() {
        let mut k = Kept::default();
        k.keep(peer(1), 1, Stamp { seq: 1, prev: 0 }, Bytes::from(vec![1]));
        for i in 0..300u16 {
            let mut key = [7u8; 32];
            key[..2].copy_from_slice(&i.to_le_bytes());
            for inc in 0..KEEP_INCARNATIONS as u64 {
                let replica = (u64::from(i) << 8 | inc) + 1000;
                k.keep(PeerId::from_bytes(key), replica, Stamp { seq: 1, prev: 0 }, Bytes::new());
            }
        }
        assert_eq!(k.authors.len(), KEEP_AUTHORS);
        assert_eq!(k.authors[&1].kept.len(), 1, "the identity with one author keeps it");
    }

    #[test]
    fn strangers_share_one_part_per_peer_that_brought_them() {
        let mut k = Kept::default();
        let (honest, flood) = (Owner::Via(peer(40)), Owner::Via(peer(41)));
        for seq in 1..=20 {
            k.keep(peer(1), 1, Stamp { seq, prev: seq - 1 }, Bytes::from(vec![0; 1000]));
            k.keep_in(honest, peer(2), 2, Stamp { seq, prev: seq - 1 }, Bytes::from(vec![0; 1000]));
        }
        for i in 0..5000u64 {
            let mut key = [9u8; 32];
            key[..8].copy_from_slice(&i.to_le_bytes());
            let stamp = Stamp { seq: 1, prev: 0 };
            k.keep_in(flood, PeerId::from_bytes(key), i + 100, stamp, Bytes::from(vec![0; 8000]));
        }
        assert_eq!(k.authors[&1].kept.len(), 20, "a member's changes stay");
        assert_eq!(k.authors[&2].kept.len(), 20, "strangers another peer brought stay");
        assert_eq!(k.identities[&flood].authors.len(), KEEP_STRANGERS);
        assert!(k.identities[&flood].bytes <= KEEP_IDENTITY_BYTES);
    }

    #[test]
    fn authors_that_split_their_numbers_keep_summaries_small() {
        let mut k = Kept::default();
        for id in 0..20u8 {
            for r in 0..KEEP_INCARNATIONS as u64 {
                for seq in 0..400u64 {
                    k.keep(peer(id), u64::from(id) << 32 | r, Stamp { seq: seq * 2 + 1, prev: 0 }, Bytes::new());
                }
            }
        }
        let spans: usize = k.authors.values().map(|a| a.seen.len()).sum();
        assert_eq!(spans, k.spans);
        assert!(spans <= SPANS_TOTAL, "{spans}");
    }

    #[test]
    fn a_peer_is_sent_what_it_has_not_seen_and_never_its_own() {
        let relay = Relay::new(peer(9));
        {
            let mut k = relay.kept();
            for seq in 1..=5 {
                k.keep(peer(1), 1, Stamp { seq, prev: seq - 1 }, Bytes::from(vec![1]));
                k.keep(peer(2), 2, Stamp { seq, prev: seq - 1 }, Bytes::from(vec![2]));
            }
        }
        let have =
            |authors: Vec<(ReplicaId, Spans)>, complete| Have { authors: authors.into_iter().collect(), complete };
        // Peer 2 has seen 1..=3 of author 1: it gets 4 and 5, and none of its own.
        let seen = Spans::from_spans(&[(1, 3)]);
        assert_eq!(relay.missing(&peer(2), &have(vec![(1, seen.clone())], true)), vec![(1, 4), (1, 5)]);
        // A summary cut short: authors it does not name are not sent.
        let got = relay.missing(&peer(3), &have(vec![(1, seen)], false));
        assert_eq!(got, vec![(1, 4), (1, 5)]);
        assert_eq!(relay.missing(&peer(3), &have(vec![], true)).len(), 10);
        assert_eq!(relay.kept_message((2, 5)), Some(Bytes::from(vec![2])));
    }

    /// Slice 3c: what a relay keeps is in its store (and what it drops is not), and a relay
    /// started on that store keeps the same, in the same shares; its own numbers stay above
    /// what it signed before, its first naming no previous one. A row that cannot be read is
    /// removed.
    #[test]
    fn kept_changes_are_stored_loaded_again_and_removed_when_dropped() {
        let (store, _) = crate::store::testing::store();
        let store = Arc::new(store);
        let cfg = crate::SystemConfig { replica: replica_of(&peer(1), 1), workers: 1, ..Default::default() };
        let sys = System::start(cfg, Some(store.clone()), None).unwrap();
        let empty = Wire::Deltas { chain: Vec::new(), events: Vec::new() };
        let unsigned = |_: &str, _: &[u8]| [0u8; 64];
        let signed = |author: PeerId, seq: u64, len: usize| {
            let events = (len > 0)
                .then(|| ([0u8; 16], Delta { field: "x".repeat(len), delta: Crdt::GCounter(GCounter::default()) }));
            let deltas = Wire::Deltas { chain: Vec::new(), events: events.into_iter().collect() };
            Bytes::from(Wire::signed_at(author, 0, Stamp { seq, prev: 0 }, &deltas, unsigned).to_bytes())
        };
        let (me, stranger, bringer, flood) = (peer(1), peer(3), peer(5), peer(4));
        let relay = Relay::new(me).members(AllowList::new([flood])).stored(Some(store.clone()));
        let own: Vec<Stamp> = (0..2)
            .map(|_| match Wire::from_bytes(&relay.own(1, &empty, unsigned)) {
                Some(Wire::Signed { seq, prev, .. }) => Stamp { seq, prev },
                _ => unreachable!(),
            })
            .collect();
        relay.kept().keep_in(
            Owner::Via(bringer),
            stranger,
            replica_of(&stranger, 0),
            Stamp { seq: 10, prev: 0 },
            signed(stranger, 10, 0),
        );
        // A flood over its identity's bound: its oldest are dropped, here and in the store.
        for seq in 1..=20u64 {
            relay.kept().keep(flood, replica_of(&flood, 0), Stamp { seq, prev: seq - 1 }, signed(flood, seq, 1 << 20));
        }
        store.keep_detached([7; 16], b"not a kept change".to_vec());
        // The writer takes requests in order: once this is durable, so is what came before.
        store.put_revoked(b"barrier").unwrap();
        let before = relay.kept_stats();
        assert!(before.evicted > 0);
        assert_eq!(store.kept().unwrap().len(), before.messages + 1);

        let again = Relay::new(me).members(AllowList::new([flood])).stored(Some(store.clone()));
        assert_eq!(again.load(&sys).unwrap(), before.messages);
        let after = again.kept_stats();
        assert_eq!((after.messages, after.bytes, after.authors), (before.messages, before.bytes, before.authors));
        assert_eq!(again.kept().authors[&replica_of(&stranger, 0)].share, Owner::Via(bringer));
        let nothing = Have { authors: HashMap::new(), complete: true };
        assert_eq!(again.missing(&peer(9), &nothing), relay.missing(&peer(9), &nothing));
        let Some(Wire::Signed { seq, prev, .. }) = Wire::from_bytes(&again.own(1, &empty, unsigned)) else {
            unreachable!()
        };
        assert!(seq > own[1].seq && own[1].prev == own[0].seq && prev == 0, "{seq} {prev} {own:?}");
        store.put_revoked(b"barrier").unwrap();
        assert_eq!(store.kept().unwrap().len(), before.messages + 1, "the bad row is removed, the new own one stored");
        // Its state, signed at start, holds what it made: its older own changes are dropped.
        let ours = replica_of(&me, 1);
        sys.create(&crate::Authority::System, &crate::WnPath::root(), "x", "data", crate::Consistency::Eventual)
            .unwrap();
        let id = sys.resolve(&"/x".parse().unwrap()).unwrap();
        sys.update(&crate::Authority::System, id, vec![("n".into(), crate::Op::Add(3))]).unwrap().wait().unwrap();
        assert_eq!(again.kept().authors[&ours].kept.len(), 3);
        assert_eq!(again.own_state(&sys, 1, unsigned), 1);
        assert_eq!(again.kept().authors[&ours].kept.len(), 1);
        store.put_revoked(b"barrier").unwrap();
        assert_eq!(store.kept().unwrap().len(), before.messages - 2 + 1);
    }

    /// Found re-attacking slice 3c: with what is kept at its bound, the state a replica signs at
    /// start pushed out another author's oldest change before its own older ones were dropped.
    #[test]
    fn the_state_signed_at_start_pushes_out_no_other_authors_change() {
        let cfg = crate::SystemConfig { replica: replica_of(&peer(1), 1), workers: 1, ..Default::default() };
        let sys = System::start(cfg, None, None).unwrap();
        sys.create(&crate::Authority::System, &crate::WnPath::root(), "x", "data", crate::Consistency::Eventual)
            .unwrap();
        let id = sys.resolve(&"/x".parse().unwrap()).unwrap();
        sys.update(&crate::Authority::System, id, vec![("n".into(), crate::Op::Add(3))]).unwrap().wait().unwrap();
        let relay = Relay::new(peer(1));
        let empty = Wire::Deltas { chain: Vec::new(), events: Vec::new() };
        for _ in 0..2 {
            relay.own(1, &empty, |_, _| [0; 64]);
        }
        for seq in 1..=(KEEP_MESSAGES - 2) as u64 {
            relay.kept().keep(peer(2), 2, Stamp { seq, prev: seq - 1 }, Bytes::from_static(b"x"));
        }
        assert_eq!(relay.kept_stats().messages, KEEP_MESSAGES);
        assert_eq!(relay.own_state(&sys, 1, |_, _| [0; 64]), 1);
        let after = relay.kept_stats();
        assert_eq!((after.messages, after.evicted), (KEEP_MESSAGES - 1, 0));
    }

    #[test]
    fn stamps_increase_and_name_the_previous_one() {
        let a = Stamp::after(0);
        assert_eq!(a.prev, 0);
        let b = Stamp::after(a.seq);
        assert!(b.seq > a.seq && b.prev == a.seq);
        assert_eq!(Stamp::after(u64::MAX - 1).seq, u64::MAX);
    }

    #[test]
    fn shipments_split_in_order_into_messages_a_relay_passes_on() {
        let event = |i: u64, len: usize| {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&i.to_le_bytes());
            (id, Delta { field: "x".repeat(len), delta: Crdt::GCounter(GCounter::default().inc(1, i + 1)) })
        };
        let events: Vec<Replicated> = (0..10).map(|i| event(i, 300_000)).collect();
        let parts = split_shipment(Shipment { chain: Vec::new(), events: events.clone() }, 1 << 20);
        assert!(parts.len() > 1);
        let mut back = Vec::new();
        for p in parts {
            let bytes = p.to_bytes();
            assert!(bytes.len() <= (1 << 20) + 4096, "{} bytes", bytes.len());
            let Wire::Deltas { events, .. } = p else { panic!("not deltas") };
            back.extend(events);
        }
        assert_eq!(back, events);
        // One event larger than a chunk still goes, alone.
        let big = split_shipment(Shipment { chain: Vec::new(), events: vec![event(0, 2 << 20)] }, 1 << 20);
        assert_eq!(big.len(), 1);
    }
}
