//! Admission before authentication: the pool of handshakes not yet authenticated.
//!
//! A stranger can open sockets for free, so an unauthenticated handshake must never hold a place
//! an allowed peer needs. The pool has `Config::max_handshakes` places node-wide (TCP, Unix and
//! QUIC together) and `Config::max_handshakes_per_source` per source address. A new connection
//! always gets a place: when the pool (or its source's share) is full, it evicts the handshake
//! that has been waiting longest, preferring one still *silent* (no complete first message yet).
//! An allowed peer sends its first message with the preamble and answers each step within a round
//! trip, so sockets that connect and stall are evicted first; and while the pool is full, a source
//! holding its share or more only ever evicts its own handshakes, never another source's. The handshake deadline (`Config::first_message_timeout` for the first message,
//! `Config::handshake_timeout` for the whole) frees the rest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::oneshot;

struct Entry {
    source: String,
    since: Instant,
    silent: bool,
    /// Dropping it tells the handshake task it was evicted.
    _evict: oneshot::Sender<()>,
}

#[derive(Default)]
struct Pool {
    next: u64,
    entries: HashMap<u64, Entry>,
    evicted: u64,
}

/// The node's pool of unauthenticated handshakes.
pub(crate) struct Admission {
    total: usize,
    per_source: usize,
    pool: Mutex<Pool>,
}

/// A place in the pool; given back when dropped (handshake finished, failed or evicted).
pub(crate) struct Ticket {
    adm: Arc<Admission>,
    key: u64,
}

impl Admission {
    pub(crate) fn new(total: usize, per_source: usize) -> Self {
        Self { total: total.max(1), per_source: per_source.clamp(1, total.max(1)), pool: Mutex::default() }
    }

    fn lock(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admits a handshake from `source`, evicting another if the pool or the source's share is
    /// full. The receiver resolves when this handshake is itself evicted.
    pub(crate) fn admit(self: &Arc<Self>, source: &str) -> (Ticket, oneshot::Receiver<()>) {
        let mut pool = self.lock();
        if pool.entries.len() >= self.total {
            let from_source = pool.entries.values().filter(|e| e.source == source).count();
            if from_source >= self.per_source {
                evict(&mut pool, |e| e.source == source);
            } else {
                evict(&mut pool, |_| true);
            }
        }
        let (tx, rx) = oneshot::channel();
        let key = pool.next;
        pool.next += 1;
        pool.entries.insert(key, Entry { source: source.to_owned(), since: Instant::now(), silent: true, _evict: tx });
        (Ticket { adm: self.clone(), key }, rx)
    }

    /// Whether the pool is at least half full (QUIC then asks for address validation first).
    pub(crate) fn under_load(&self) -> bool {
        self.lock().entries.len() * 2 >= self.total
    }

    /// Handshakes evicted so far.
    #[cfg(test)]
    pub(crate) fn evicted(&self) -> u64 {
        self.lock().evicted
    }
}

/// Evicts, among the entries matching `which`, the oldest silent one, else the oldest.
fn evict(pool: &mut Pool, which: impl Fn(&Entry) -> bool) {
    let victim =
        pool.entries.iter().filter(|(_, e)| which(e)).min_by_key(|(_, e)| (!e.silent, e.since)).map(|(k, _)| *k);
    if let Some(k) = victim {
        pool.entries.remove(&k);
        pool.evicted += 1;
    }
}

impl Ticket {
    /// The handshake's first message arrived and was valid: it is no longer silent.
    pub(crate) fn progressed(&self) {
        if let Some(e) = self.adm.lock().entries.get_mut(&self.key) {
            e.silent = false;
            e.since = Instant::now();
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.adm.lock().entries.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_pool_evicts_the_oldest_silent_handshake_and_a_flooding_source_only_its_own() {
        use oneshot::error::TryRecvError::{Closed, Empty};
        let adm = Arc::new(Admission::new(4, 2));
        let (a, mut a_rx) = adm.admit("10.0.0.1");
        a.progressed();
        let (_b, mut b_rx) = adm.admit("10.0.0.1");
        let (_c, mut c_rx) = adm.admit("10.0.0.2");
        let (_d, mut d_rx) = adm.admit("10.0.0.2");
        // Pool full; 10.0.0.2 holds its share: its own oldest silent handshake (c) goes.
        let (_e, mut e_rx) = adm.admit("10.0.0.2");
        assert!(c_rx.try_recv().is_err_and(|e| e == Closed));
        assert!(b_rx.try_recv().is_err_and(|e| e == Empty), "another source's handshake stays");
        // 10.0.0.3 holds nothing: the oldest silent handshake anywhere (b) goes, not a (progressed).
        let (_f, _) = adm.admit("10.0.0.3");
        assert!(b_rx.try_recv().is_err_and(|e| e == Closed));
        for rx in [&mut a_rx, &mut d_rx, &mut e_rx] {
            assert!(rx.try_recv().is_err_and(|e| e == Empty));
        }
        assert_eq!(adm.evicted(), 2);
        drop(a);
        assert_eq!(adm.lock().entries.len(), 3);
    }
}
