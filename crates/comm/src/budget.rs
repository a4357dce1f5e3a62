//! Byte budgets. Every byte a peer makes this node hold (a partial fragmented message, a message
//! waiting in the inbox or a subscription, a message queued to it) is charged to that peer's
//! budget and to the node's, per direction. A charge waits while either is spent, so a greedy
//! peer is paused (TCP backpressure) instead of growing memory, and other peers keep their share.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Config;
use crate::identity::PeerId;

/// Largest configurable budget (well below the semaphore's own limit).
pub(crate) const MAX_BUDGET: usize = 1 << 40;

/// Bytes charged per queued message on top of its payload: envelope, queue slot, and whatever the
/// application holds per message while it works on it (a task per request, say).
pub(crate) const MESSAGE_COST: usize = 1024;

/// One direction's budget for one peer: its own share and the node's.
#[derive(Clone)]
pub(crate) struct Budget {
    peer: Arc<Semaphore>,
    node: Arc<Semaphore>,
    /// The peer share's size; no single charge may exceed it (it would wait forever).
    cap: usize,
}

/// Bytes held against a [`Budget`]; given back when dropped.
pub(crate) struct Charge {
    _peer: Option<OwnedSemaphorePermit>,
    _node: Option<OwnedSemaphorePermit>,
}

impl fmt::Debug for Charge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self._peer.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
        write!(f, "Charge({n} bytes)")
    }
}

impl Charge {
    /// Nothing held (messages that are consumed at once).
    pub(crate) fn none() -> Self {
        Self { _peer: None, _node: None }
    }

    /// Takes `n` bytes out of this charge, if it holds that many of both the peer's and the
    /// node's budget (a frame's charge handed on to the messages it carries, without waiting).
    pub(crate) fn split(&mut self, n: usize) -> Option<Charge> {
        let held = |p: &Option<OwnedSemaphorePermit>| p.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
        if held(&self._peer) < n || held(&self._node) < n {
            return None;
        }
        let peer = self._peer.as_mut().and_then(|p| p.split(n));
        let node = self._node.as_mut().and_then(|p| p.split(n));
        Some(Charge { _peer: peer, _node: node })
    }

    /// Adds what `other` holds to this charge.
    pub(crate) fn merge(&mut self, other: Charge) {
        fn join(a: &mut Option<OwnedSemaphorePermit>, b: Option<OwnedSemaphorePermit>) {
            match (a.as_mut(), b) {
                (Some(a), Some(b)) => a.merge(b),
                (None, b) => *a = b,
                (Some(_), None) => {}
            }
        }
        join(&mut self._peer, other._peer);
        join(&mut self._node, other._node);
    }
}

impl Budget {
    /// Charges `n` bytes, waiting while the peer's or the node's budget is spent.
    pub(crate) async fn charge(&self, n: usize) -> Charge {
        let n = u32::try_from(n.min(self.cap)).unwrap_or(u32::MAX);
        // Peer first, so a peer over its own share never holds node-wide bytes while it waits.
        let peer = self.peer.clone().acquire_many_owned(n).await.ok();
        let node = self.node.clone().acquire_many_owned(n).await.ok();
        Charge { _peer: peer, _node: node }
    }

    /// Charges `n` bytes to the peer's share only (a reservation for bytes still to come; the
    /// node's budget is charged as they arrive, so announcing a size costs the node nothing).
    pub(crate) async fn charge_peer(&self, n: usize) -> Charge {
        let n = u32::try_from(n.min(self.cap)).unwrap_or(u32::MAX);
        Charge { _peer: self.peer.clone().acquire_many_owned(n).await.ok(), _node: None }
    }

    /// Charges `n` bytes that have arrived to the node's budget only.
    pub(crate) async fn charge_node(&self, n: usize) -> Charge {
        let n = u32::try_from(n.min(self.cap)).unwrap_or(u32::MAX);
        Charge { _peer: None, _node: self.node.clone().acquire_many_owned(n).await.ok() }
    }

    /// Bytes currently available to this peer (for tests and stats).
    #[cfg(test)]
    pub(crate) fn available(&self) -> usize {
        self.peer.available_permits().min(self.node.available_permits())
    }
}

/// One peer's (incoming, outgoing) semaphores, alive while any of its connections is.
type PeerShares = (Weak<Semaphore>, Weak<Semaphore>);

/// The node's budgets: one node-wide semaphore per direction, and one per peer and direction
/// shared by all that peer's connections (it lives while any of them does).
pub(crate) struct Budgets {
    peer_bytes: usize,
    node_in: Arc<Semaphore>,
    node_out: Arc<Semaphore>,
    peers: Mutex<HashMap<PeerId, PeerShares>>,
}

impl Budgets {
    pub(crate) fn new(cfg: &Config) -> Self {
        Self {
            peer_bytes: cfg.peer_buffer_bytes,
            node_in: Arc::new(Semaphore::new(cfg.node_buffer_bytes)),
            node_out: Arc::new(Semaphore::new(cfg.node_buffer_bytes)),
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// The (incoming, outgoing) budgets of `peer`.
    pub(crate) fn for_peer(&self, peer: PeerId) -> (Budget, Budget) {
        let mut peers = self.peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let live = peers.get(&peer).and_then(|(i, o)| Some((i.upgrade()?, o.upgrade()?)));
        let (inb, outb) = live.unwrap_or_else(|| {
            let pair = (Arc::new(Semaphore::new(self.peer_bytes)), Arc::new(Semaphore::new(self.peer_bytes)));
            // Forget peers with no connection left, amortised (each prune at least halves the map).
            if peers.len() >= 64 && peers.len().is_power_of_two() {
                peers.retain(|_, (i, _)| i.strong_count() > 0);
            }
            peers.insert(peer, (Arc::downgrade(&pair.0), Arc::downgrade(&pair.1)));
            pair
        });
        let cap = self.peer_bytes;
        (Budget { peer: inb, node: self.node_in.clone(), cap }, Budget { peer: outb, node: self.node_out.clone(), cap })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_over_its_share_waits_and_others_keep_theirs() {
        let cfg = Config { peer_buffer_bytes: 100, node_buffer_bytes: 150, max_message_len: 10, ..Config::default() };
        let b = Budgets::new(&cfg);
        let (a, _) = b.for_peer(PeerId::from_bytes([1; 32]));
        let (c, _) = b.for_peer(PeerId::from_bytes([2; 32]));
        let held = a.charge(100).await;
        assert!(tokio::time::timeout(std::time::Duration::from_millis(20), a.charge(1)).await.is_err());
        let other = tokio::time::timeout(std::time::Duration::from_millis(20), c.charge(50)).await;
        assert!(other.is_ok(), "another peer still has the node's remaining 50 bytes");
        drop(held);
        assert_eq!(a.available(), 100);
        // Two connections of one peer share one budget.
        let (a2, _) = b.for_peer(PeerId::from_bytes([1; 32]));
        let _h = a2.charge(60).await;
        assert_eq!(a.available(), 40);
    }
}
