//! The scheduler core: an arena of slots (mailbox + worknode data) and a run queue of slot indices
//! that have messages. Generic over its synchronisation primitives so that the exact same code is
//! model-checked with shuttle (see the tests) and run with `std::sync` in production.
//!
//! Invariant (the handoff): a slot's `scheduled` flag is true iff its index is in the run queue or
//! a worker is running its turn. Only the push that flips the flag from false to true enqueues,
//! and only the worker that owns the turn clears it (when it found the mailbox empty), so a slot is
//! never run by two workers at once and a message is never left without a scheduled turn.

use std::collections::VecDeque;
use std::sync::OnceLock;

/// Slots per arena chunk; chunks are allocated on first use so an empty arena costs a pointer per chunk.
const CHUNK: usize = 4096;

/// A mutex with a closure API (no guard types, so it can wrap std or shuttle primitives alike).
pub(crate) trait Lock<T>: Send + Sync {
    fn new(v: T) -> Self;
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R;
}

/// A mutex plus condition variable.
pub(crate) trait Monitor<T>: Lock<T> {
    /// Waits until `f` returns `Some`, holding the lock while `f` runs.
    fn wait_for<R>(&self, f: impl FnMut(&mut T) -> Option<R>) -> R;
    fn notify_one(&self);
    fn notify_all(&self);
}

/// A family of primitives.
pub(crate) trait SyncFamily: 'static {
    type Lock<T: Send>: Lock<T>;
    type Monitor<T: Send>: Monitor<T>;
}

/// `std::sync` primitives; a poisoned lock is recovered (a behaviour's panic is caught well before
/// it could poison one, and the protected data stays consistent under every early return).
pub(crate) struct StdSync;

pub(crate) struct StdLock<T>(std::sync::Mutex<T>);
pub(crate) struct StdMonitor<T>(std::sync::Mutex<T>, std::sync::Condvar);

impl<T: Send> Lock<T> for StdLock<T> {
    fn new(v: T) -> Self {
        Self(std::sync::Mutex::new(v))
    }
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

impl<T: Send> Lock<T> for StdMonitor<T> {
    fn new(v: T) -> Self {
        Self(std::sync::Mutex::new(v), std::sync::Condvar::new())
    }
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

impl<T: Send> Monitor<T> for StdMonitor<T> {
    fn wait_for<R>(&self, mut f: impl FnMut(&mut T) -> Option<R>) -> R {
        let mut g = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if let Some(r) = f(&mut g) {
                return r;
            }
            g = self.1.wait(g).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
    fn notify_one(&self) {
        self.1.notify_one();
    }
    fn notify_all(&self) {
        self.1.notify_all();
    }
}

impl SyncFamily for StdSync {
    type Lock<T: Send> = StdLock<T>;
    type Monitor<T: Send> = StdMonitor<T>;
}

/// A mailbox: allocated only while non-empty, so an idle worknode costs 16 bytes here.
pub(crate) struct Mail<M> {
    // Boxed on purpose: 8 bytes when idle instead of a 32-byte empty VecDeque per worknode.
    #[allow(clippy::box_collection)]
    queue: Option<Box<VecDeque<M>>>,
    scheduled: bool,
    closed: bool,
    /// Messages ever queued here, and how many of them are done (handled or dropped): a
    /// reader waits for `done` to reach the `accepted` it saw, not for the whole system.
    accepted: u64,
    done: u64,
}

/// Why a push failed; the message is handed back.
#[derive(Debug)]
pub(crate) enum PushError<M> {
    Full(M),
    Closed(M),
    NoSlot(M),
}

/// One arena slot: immutable info (readable without a lock), the mailbox, and mutable data
/// (locked by the worker for the whole turn).
pub(crate) struct Slot<S: SyncFamily, M: Send, D: Send, I> {
    pub(crate) info: OnceLock<I>,
    mail: S::Lock<Mail<M>>,
    pub(crate) data: S::Lock<Option<D>>,
}

struct RunQueue {
    ready: VecDeque<u32>,
    shutdown: bool,
}

/// One lazily allocated chunk of slots.
type Chunk<S, M, D, I> = OnceLock<Box<[Slot<S, M, D, I>]>>;

/// The arena plus run queue.
pub(crate) struct Core<S: SyncFamily, M: Send, D: Send, I> {
    chunks: Box<[Chunk<S, M, D, I>]>,
    len: S::Lock<u32>,
    runq: S::Monitor<RunQueue>,
}

impl<S: SyncFamily, M: Send, D: Send, I> Core<S, M, D, I> {
    /// An arena for up to `capacity` slots (rounded up to whole chunks).
    pub(crate) fn new(capacity: usize) -> Self {
        let chunks = capacity.div_ceil(CHUNK).max(1);
        Self {
            chunks: (0..chunks).map(|_| OnceLock::new()).collect(),
            len: S::Lock::new(0),
            runq: S::Monitor::new(RunQueue { ready: VecDeque::new(), shutdown: false }),
        }
    }

    /// How many slots can exist.
    pub(crate) fn capacity(&self) -> usize {
        self.chunks.len() * CHUNK
    }

    /// Number of allocated slots.
    pub(crate) fn len(&self) -> u32 {
        self.len.with(|n| *n)
    }

    pub(crate) fn slot(&self, idx: u32) -> Option<&Slot<S, M, D, I>> {
        let idx = idx as usize;
        self.chunks.get(idx / CHUNK)?.get()?.get(idx % CHUNK)
    }

    /// Allocates a slot holding `info` and `data`; `None` when the arena is full.
    pub(crate) fn alloc(&self, info: I, data: D) -> Option<u32> {
        let idx = self.len.with(|n| {
            let idx = *n;
            ((idx as usize) < self.capacity()).then(|| {
                *n += 1;
                idx
            })
        })?;
        let chunk = self.chunks.get(idx as usize / CHUNK)?.get_or_init(|| {
            (0..CHUNK)
                .map(|_| Slot {
                    info: OnceLock::new(),
                    mail: S::Lock::new(Mail { queue: None, scheduled: false, closed: false, accepted: 0, done: 0 }),
                    data: S::Lock::new(None),
                })
                .collect()
        });
        let slot = chunk.get(idx as usize % CHUNK)?;
        // A fresh index: nobody else can have set it.
        let _ = slot.info.set(info);
        slot.data.with(|d| *d = Some(data));
        Some(idx)
    }

    /// Queues `msg` for slot `idx`. `bounded` applies the `capacity` limit (system signals skip
    /// it so supervision notices are never lost). Schedules the slot if it was idle.
    pub(crate) fn push(&self, idx: u32, msg: M, capacity: u32, bounded: bool) -> Result<(), PushError<M>> {
        let Some(slot) = self.slot(idx) else { return Err(PushError::NoSlot(msg)) };
        let wake = slot.mail.with(|mail| {
            if mail.closed {
                return Err(PushError::Closed(msg));
            }
            let q = mail.queue.get_or_insert_with(Box::default);
            if bounded && q.len() >= capacity as usize {
                return Err(PushError::Full(msg));
            }
            q.push_back(msg);
            mail.accepted += 1;
            Ok(!std::mem::replace(&mut mail.scheduled, true))
        })?;
        if wake {
            self.enqueue(idx);
        }
        Ok(())
    }

    fn enqueue(&self, idx: u32) {
        self.runq.with(|q| q.ready.push_back(idx));
        self.runq.notify_one();
    }

    /// Blocks until a slot is ready (its turn now belongs to the caller) or shutdown.
    pub(crate) fn next(&self) -> Option<u32> {
        self.runq.wait_for(|q| if q.shutdown { Some(None) } else { q.ready.pop_front().map(Some) })
    }

    /// Moves up to `max` messages of the caller's slot into `buf`.
    pub(crate) fn take(&self, idx: u32, max: usize, buf: &mut Vec<M>) {
        if let Some(slot) = self.slot(idx) {
            slot.mail.with(|mail| {
                if let Some(q) = mail.queue.as_mut() {
                    let n = q.len().min(max);
                    buf.extend(q.drain(..n));
                }
            });
        }
    }

    /// Ends the caller's turn, in which `handled` messages were taken: idle again if the
    /// mailbox is empty (freeing it), else re-queued behind the other ready slots (fairness:
    /// at most `max` messages per turn).
    pub(crate) fn finish(&self, idx: u32, handled: u64) {
        let Some(slot) = self.slot(idx) else { return };
        let again = slot.mail.with(|mail| {
            mail.done += handled;
            if mail.queue.as_ref().is_some_and(|q| !q.is_empty()) {
                true
            } else {
                mail.queue = None;
                mail.scheduled = false;
                false
            }
        });
        if again {
            self.enqueue(idx);
        }
    }

    /// Refuses further messages to `idx` and returns the ones still queued.
    pub(crate) fn close(&self, idx: u32) -> Vec<M> {
        self.slot(idx).map_or_else(Vec::new, |slot| {
            slot.mail.with(|mail| {
                mail.closed = true;
                let dropped: Vec<M> = mail.queue.take().map(|q| q.into_iter().collect()).unwrap_or_default();
                mail.done += dropped.len() as u64;
                dropped
            })
        })
    }

    /// How many messages `idx` has accepted so far: the mark [`Core::reached`] waits for.
    pub(crate) fn accepted(&self, idx: u32) -> u64 {
        self.slot(idx).map_or(0, |s| s.mail.with(|m| m.accepted))
    }

    /// Whether every message `idx` accepted up to `mark` is done (handled or dropped).
    pub(crate) fn reached(&self, idx: u32, mark: u64) -> bool {
        self.slot(idx).is_none_or(|s| s.mail.with(|m| m.done >= mark))
    }

    /// Queued messages of `idx`.
    pub(crate) fn queued(&self, idx: u32) -> usize {
        self.slot(idx).map_or(0, |s| s.mail.with(|m| m.queue.as_ref().map_or(0, |q| q.len())))
    }

    /// Wakes every worker and makes [`Core::next`] return `None`.
    pub(crate) fn shutdown(&self) {
        self.runq.with(|q| q.shutdown = true);
        self.runq.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    struct ShuttleSync;
    struct ShLock<T>(shuttle::sync::Mutex<T>);
    struct ShMonitor<T>(shuttle::sync::Mutex<T>, shuttle::sync::Condvar);

    impl<T: Send> Lock<T> for ShLock<T> {
        fn new(v: T) -> Self {
            Self(shuttle::sync::Mutex::new(v))
        }
        fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
            f(&mut self.0.lock().unwrap())
        }
    }
    impl<T: Send> Lock<T> for ShMonitor<T> {
        fn new(v: T) -> Self {
            Self(shuttle::sync::Mutex::new(v), shuttle::sync::Condvar::new())
        }
        fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
            f(&mut self.0.lock().unwrap())
        }
    }
    impl<T: Send> Monitor<T> for ShMonitor<T> {
        fn wait_for<R>(&self, mut f: impl FnMut(&mut T) -> Option<R>) -> R {
            let mut g = self.0.lock().unwrap();
            loop {
                if let Some(r) = f(&mut g) {
                    return r;
                }
                g = self.1.wait(g).unwrap();
            }
        }
        fn notify_one(&self) {
            self.1.notify_one();
        }
        fn notify_all(&self) {
            self.1.notify_all();
        }
    }
    impl SyncFamily for ShuttleSync {
        type Lock<T: Send> = ShLock<T>;
        type Monitor<T: Send> = ShMonitor<T>;
    }

    /// Per-slot record of what the model saw: messages handled, and whether a turn is running.
    #[derive(Default)]
    struct Seen {
        handled: Vec<(u32, u32)>,
        in_turn: bool,
    }

    /// Two producers send to two slots while two workers run turns of at most 2 messages; then
    /// every message must have been handled exactly once, in per-producer order, and no slot
    /// ever ran two turns at once.
    fn scenario() {
        const PER_PRODUCER: u32 = 3;
        let core: Arc<Core<ShuttleSync, (u32, u32), Seen, ()>> = Arc::new(Core::new(2));
        for _ in 0..2 {
            core.alloc((), Seen::default()).unwrap();
        }
        let handled_total = Arc::new(ShLock::new(0u32));
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let (core, total) = (core.clone(), handled_total.clone());
                shuttle::thread::spawn(move || {
                    let mut buf = Vec::new();
                    while let Some(idx) = core.next() {
                        let slot = core.slot(idx).unwrap();
                        slot.data.with(|d| {
                            let seen = d.as_mut().unwrap();
                            assert!(!seen.in_turn, "slot {idx} run by two workers at once");
                            seen.in_turn = true;
                        });
                        core.take(idx, 2, &mut buf);
                        let n = buf.len() as u32;
                        slot.data.with(|d| {
                            let seen = d.as_mut().unwrap();
                            seen.handled.append(&mut buf);
                            seen.in_turn = false;
                        });
                        core.finish(idx, u64::from(n));
                        let done = total.with(|t| {
                            *t += n;
                            *t == 2 * 2 * PER_PRODUCER
                        });
                        if done {
                            core.shutdown();
                        }
                    }
                })
            })
            .collect();
        let producers: Vec<_> = (0..2u32)
            .map(|p| {
                let core = core.clone();
                shuttle::thread::spawn(move || {
                    for i in 0..PER_PRODUCER {
                        for slot in 0..2 {
                            core.push(slot, (p, i), 16, true).unwrap();
                        }
                    }
                })
            })
            .collect();
        // A reader's mark: once reached, everything accepted before it has been handled.
        let checker = {
            let core = core.clone();
            shuttle::thread::spawn(move || {
                for _ in 0..PER_PRODUCER {
                    let mark = core.accepted(0);
                    if core.reached(0, mark) {
                        let handled = core.slot(0).unwrap().data.with(|d| d.as_ref().unwrap().handled.len());
                        assert!(handled as u64 >= mark, "mark {mark} reached with only {handled} handled");
                    }
                }
            })
        };
        for t in producers.into_iter().chain(workers).chain([checker]) {
            t.join().unwrap();
        }
        for idx in 0..2 {
            assert_eq!(core.accepted(idx), u64::from(2 * PER_PRODUCER));
            assert!(core.reached(idx, core.accepted(idx)), "every accepted message of {idx} is done");
            let slot = core.slot(idx).unwrap();
            slot.data.with(|d| {
                let seen = d.as_ref().unwrap();
                assert_eq!(seen.handled.len() as u32, 2 * PER_PRODUCER, "lost or duplicated messages");
                for p in 0..2 {
                    let mine: Vec<u32> = seen.handled.iter().filter(|m| m.0 == p).map(|m| m.1).collect();
                    assert_eq!(mine, (0..PER_PRODUCER).collect::<Vec<_>>(), "per-sender order broken");
                }
            });
            assert_eq!(core.queued(idx), 0);
        }
    }

    #[test]
    fn shuttle_random_schedules_keep_the_handoff_invariant() {
        shuttle::check_random(scenario, 2000);
    }

    #[test]
    fn shuttle_pct_schedules_keep_the_handoff_invariant() {
        shuttle::check_pct(scenario, 2000, 3);
    }

    #[test]
    fn bounded_push_reports_full_and_signals_bypass() {
        let core: Core<StdSync, u32, (), ()> = Core::new(1);
        let idx = core.alloc((), ()).unwrap();
        core.push(idx, 1, 1, true).unwrap();
        assert!(matches!(core.push(idx, 2, 1, true), Err(PushError::Full(2))));
        core.push(idx, 3, 1, false).unwrap();
        assert_eq!(core.close(idx), vec![1, 3]);
        assert!(matches!(core.push(idx, 4, 1, false), Err(PushError::Closed(4))));
    }
}
