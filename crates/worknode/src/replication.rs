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
//! - On every (re)connection both sides send [`Wire::Sync`]: the full state of every Eventual
//!   worknode (anti-entropy). Merge is a join, so replicas converge after a partition heals no
//!   matter which deltas were lost while it lasted.
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

use referee_comm::{Addr, ConnectOptions, Event, Inbox, Node, PeerId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use crate::crdt::ReplicaId;
use crate::state::{Delta, State};
use crate::system::{Meta, Refused, Replicated, Shipment, System, digest_id};

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
    /// Full states of every Eventual worknode (anti-entropy).
    Sync {
        /// The sender's store incarnation (its replica id is [`replica_of`] its identity and this).
        incarnation: u64,
        /// `(chain, state)` per worknode.
        nodes: Vec<(Vec<Meta>, State)>,
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
        /// The author's signature of the incarnation (8 bytes, little-endian) then `body`
        /// ([`DELTAS_DOMAIN`], 64 bytes).
        #[serde(with = "serde_bytes")]
        sig: Vec<u8>,
        /// The changes.
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    },
}

/// The signature domain of [`Wire::Signed`] bodies.
pub const DELTAS_DOMAIN: &str = "referee-worknode/v1 deltas";

/// How many signed messages a replica remembers having passed on (a message seen again after
/// that many newer ones is merged again, a no-op, and passed on again).
pub const RELAY_MEMORY: usize = 1 << 16;

/// Checks a [`Wire::Signed`]: its author and the [`Wire::Deltas`] it holds, if the signature
/// holds.
fn open(author: &[u8], incarnation: u64, sig: &[u8], body: &[u8]) -> Result<(PeerId, ReplicaId, Wire), String> {
    let (Ok(author), Ok(sig)) = (<[u8; 32]>::try_from(author), <[u8; 64]>::try_from(sig)) else {
        return Err("a signed message with a malformed key or signature".into());
    };
    let author = PeerId::from_bytes(author);
    if !author.verify(DELTAS_DOMAIN, &signed_bytes(incarnation, body), &sig) {
        return Err(format!("a message signed as {author} whose signature does not hold"));
    }
    match Wire::from_bytes(body) {
        Some(w @ Wire::Deltas { .. }) => Ok((author, replica_of(&author, incarnation), w)),
        _ => Err(format!("a message signed by {author} that holds no changes")),
    }
}

/// What a [`Wire::Signed`] signature covers: the incarnation, then the body.
fn signed_bytes(incarnation: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(&incarnation.to_le_bytes());
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
    let mut out = Vec::new();
    let (mut events, mut size) = (Vec::new(), 0usize);
    for e in s.events {
        let bytes = rmp_serde::to_vec(&e).map_or(0, |b| b.len());
        if !events.is_empty() && size.saturating_add(bytes) > chunk {
            out.push(Wire::Deltas { chain: s.chain.clone(), events: std::mem::take(&mut events) });
            size = 0;
        }
        size = size.saturating_add(bytes);
        events.push(e);
    }
    if !events.is_empty() {
        out.push(Wire::Deltas { chain: s.chain, events });
    }
    out
}

/// Signed changes: opening, merging and passing on (used by [`Replicator`], and by tests that
/// drive replicas without a network).
#[derive(Debug)]
pub struct Relay {
    me: PeerId,
    seen: Mutex<Seen>,
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
        Self { me, seen: Mutex::new(Seen::default()) }
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
        match Wire::from_bytes(payload) {
            Some(Wire::Signed { author, incarnation, sig, body }) => {
                let (author, replica, deltas) = match open(&author, incarnation, &sig, &body) {
                    Ok(opened) => opened,
                    Err(why) => {
                        system.refuse_replicated(&Refused::new("malformed", "/", format!("from {from}: {why}")));
                        return None;
                    }
                };
                if author == self.me {
                    return None;
                }
                let key: [u8; 32] = Sha256::new().chain_update(author.as_bytes()).chain_update(&sig).finalize().into();
                // A repeat is neither merged again nor passed on; a change refused here (its
                // chain, its size) is not passed on either, nor one larger than a relay carries.
                if !self.first_sight(key) || replica == system.replica() {
                    return None;
                }
                let taken = deltas.merge_as(system, replica);
                (taken && body.len() <= RELAY_MAX_BYTES).then_some(author)
            }
            Some(wire) => {
                wire.merge_into(system, from);
                None
            }
            None => {
                let detail = format!("{} bytes from {from} that are not a replication message", payload.len());
                system.refuse_replicated(&Refused::new("malformed", "/", detail));
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
    pub fn from_bytes(bytes: &[u8]) -> Option<Wire> {
        rmp_serde::from_slice(bytes).ok()
    }

    /// `deltas` (a [`Wire::Deltas`]) signed by `author`, serving store `incarnation`, with
    /// `sign` (its [`referee_comm::Identity::sign`] or [`Node::sign`]).
    pub fn signed(author: PeerId, incarnation: u64, deltas: &Wire, sign: impl FnOnce(&str, &[u8]) -> [u8; 64]) -> Wire {
        let body = deltas.to_bytes();
        let sig = sign(DELTAS_DOMAIN, &signed_bytes(incarnation, &body)).to_vec();
        Wire::Signed { author: author.as_bytes().to_vec(), incarnation, sig, body }
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

/// Most bytes of one anti-entropy message: the full state goes in messages of about this size
/// (one worknode each at least; a worknode over referee-comm's 16 MiB message limit cannot be
/// sent whole until slice 3 splits worknodes).
pub const SYNC_CHUNK: usize = 4 << 20;

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
    relay: Relay,
    /// This replica's store incarnation ([`replica_of`]).
    incarnation: u64,
    /// Peers a full state is being sent to, with how many times one was asked for since (one
    /// at a time each: a peer that reconnects in a loop and reads slowly must not pin a copy of
    /// the state per connection; a new connection's request restarts it).
    syncing: Mutex<HashMap<PeerId, u64>>,
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
    pub fn start(system: Arc<System>, node: Node, inbox: Inbox, incarnation: u64) -> Arc<Self> {
        let me = Arc::new(Self {
            system,
            isolated: AtomicBool::new(false),
            healed: watch::Sender::new(true),
            peers: Mutex::new(HashMap::new()),
            relay: Relay::new(node.id()),
            incarnation,
            syncing: Mutex::new(HashMap::new()),
            node,
        });
        let (tx, rx) = mpsc::unbounded_channel::<Shipment>();
        me.system.set_replication_sink(move |s| {
            let _ = tx.send(s);
        });
        tokio::spawn(me.clone().ship(rx));
        tokio::spawn(me.clone().receive(inbox));
        tokio::spawn(me.clone().on_connect());
        me
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
            if self.isolated.load(Ordering::Acquire) {
                continue;
            }
            // In messages a relay passes on (a change is at most `max_delta_bytes`, 2 MiB).
            for deltas in split_shipment(s, RELAY_MAX_BYTES / 2) {
                let signed = Wire::signed(self.node.id(), self.incarnation, &deltas, |d, m| self.node.sign(d, m));
                let bytes = Bytes::from(signed.to_bytes());
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
                if q.tx.send(bytes).is_err() {
                    q.queued.fetch_sub(len, Ordering::AcqRel);
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
        }
    }

    /// Sends `peer` the full state in chunks of [`SYNC_CHUNK`], each queued only once the
    /// peer's queue has room, so a large state is paced by the peer rather than disconnecting it.
    async fn sync_to(self: Arc<Self>, peer: PeerId) {
        let lock = || self.syncing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        {
            let mut syncing = lock();
            if let Some(asked) = syncing.get_mut(&peer) {
                *asked += 1;
                return;
            }
            syncing.insert(peer, 0);
        }
        loop {
            let asked = lock().get(&peer).copied().unwrap_or(0);
            self.sync_chunks_to(peer, asked).await;
            let mut syncing = lock();
            if syncing.get(&peer).copied().unwrap_or(0) == asked {
                syncing.remove(&peer);
                return;
            }
        }
    }

    /// [`Replicator::sync_to`]'s chunks; stops early when another sync was asked for since
    /// `asked` (it restarts).
    async fn sync_chunks_to(self: &Arc<Self>, peer: PeerId, asked: u64) {
        let (system, incarnation) = (self.system.clone(), self.incarnation);
        let Ok(chunks) = tokio::task::spawn_blocking(move || Wire::sync_chunks(&system, incarnation, SYNC_CHUNK)).await
        else {
            return;
        };
        for chunk in chunks {
            loop {
                let queued = {
                    let peers = self.peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    peers.get(&peer).map(|q| q.queued.load(Ordering::Acquire))
                };
                if queued.is_none_or(|q| q <= PEER_QUEUE_BYTES / 2) {
                    break;
                }
                if !self.node.connections().iter().any(|c| c.peer().id == peer && !c.is_closed()) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let again =
                self.syncing.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&peer) != Some(&asked);
            if again || !self.node.connections().iter().any(|c| c.peer().id == peer && !c.is_closed()) {
                return;
            }
            self.enqueue(peer, Bytes::from(chunk)).await;
        }
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
                    tokio::spawn(self.clone().sync_to(peer));
                }
                // The last connection of a peer gone: its queue and task go too.
                Event::Closed { peer, .. }
                    if !self.node.connections().iter().any(|c| c.peer().id == peer && !c.is_closed()) =>
                {
                    self.peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&peer);
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
            if let Some(author) = self.relay.receive(&self.system, &from, msg.payload()) {
                // Passed on to every other peer (the author has it), through their own queues.
                let peers: HashSet<PeerId> = self.node.connections().iter().map(|c| c.peer().id).collect();
                for peer in peers.into_iter().filter(|p| *p != from && *p != author) {
                    self.enqueue(peer, msg.payload().clone()).await;
                }
            }
        }
    }
}

impl Wire {
    /// The anti-entropy message: the full state of every Eventual worknode of `system`, whose
    /// store is `incarnation`.
    pub fn sync(system: &System, incarnation: u64) -> Wire {
        Wire::Sync { incarnation, nodes: system.eventual_states() }
    }

    /// [`Wire::sync`] in messages of about `chunk` bytes at most (encoded): one worknode each
    /// at least, so a large worknode does not keep the others from a peer.
    pub fn sync_chunks(system: &System, incarnation: u64, chunk: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut nodes = Vec::new();
        let mut size = 0usize;
        for node in system.eventual_states() {
            let bytes = rmp_serde::to_vec(&node).map_or(0, |b| b.len());
            if !nodes.is_empty() && size.saturating_add(bytes) > chunk {
                out.push(Wire::Sync { incarnation, nodes: std::mem::take(&mut nodes) }.to_bytes());
                size = 0;
            }
            size = size.saturating_add(bytes);
            nodes.push(node);
        }
        if !nodes.is_empty() {
            out.push(Wire::Sync { incarnation, nodes }.to_bytes());
        }
        out
    }

    /// Merges what the peer `from` sent into `system`. A chain or delta that breaks a rule
    /// here is refused (counted and audited by the system); the peer keeps its copy. The peer
    /// speaks for its own updates only ([`replica_of`] its identity and the incarnation its
    /// message names, 0 for a plain [`Wire::Deltas`]): its changes must hold nothing another
    /// replica made, and of its [`Wire::Sync`] what other replicas made is left out (taken from
    /// them). A [`Wire::Signed`] is merged as its signer's, whoever `from` is.
    pub fn merge_into(self, system: &System, from: &PeerId) {
        match self {
            Wire::Signed { author, incarnation, sig, body } => match open(&author, incarnation, &sig, &body) {
                // This replica's own changes, come back: nothing to do.
                Ok((_, replica, _)) if replica == system.replica() => {}
                Ok((_, replica, deltas)) => drop(deltas.merge_as(system, replica)),
                Err(why) => system.refuse_replicated(&Refused::new("malformed", "/", why)),
            },
            Wire::Deltas { .. } => drop(self.merge_as(system, replica_of(from, 0))),
            Wire::Sync { incarnation, .. } => drop(self.merge_as(system, replica_of(from, incarnation))),
        }
    }

    /// [`Wire::merge_into`] for changes whose author is replica `author` (checked by the caller).
    /// Returns whether a change went on to a worknode (its chain and size were accepted).
    fn merge_as(self, system: &System, author: ReplicaId) -> bool {
        match self {
            Wire::Signed { .. } => false,
            Wire::Deltas { chain, events } => system.merge_replicated(author, &chain, events).is_ok_and(|n| n > 0),
            Wire::Sync { nodes, .. } => {
                for (chain, state) in nodes {
                    let Some(last) = chain.last() else { continue };
                    let events = state.into_deltas().into_iter().map(|d| (content_id(&last.id, &d), d)).collect();
                    drop(system.merge_replicated_state(author, &chain, events));
                }
                true
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
