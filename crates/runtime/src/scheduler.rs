//! The scheduler: a fixed pool of worker threads in front of the runtime.
//!
//! - Memory is bounded: each muscle has a queue of at most `queue_per_muscle` calls per
//!   priority; beyond that `submit` fails at once with [`RuntimeError::Busy`].
//! - Fairness: muscles with pending calls sit in a ring; a worker takes one call from the
//!   muscle at the front and moves it to the back, so a flood on one muscle cannot starve
//!   another. A muscle is skipped while its granted concurrency is used up, so workers never
//!   block on one muscle's cells.
//! - Priorities: `High` is served first, except that every 8th pick goes to `Normal` when
//!   it has work, so normal traffic is slowed, never starved.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::error::RuntimeError;
use crate::runtime::Runtime;

/// Call priority.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// Served first.
    High = 0,
    /// Served when no high-priority call waits, and on every 8th pick.
    Normal = 1,
}

/// Scheduler sizing.
#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Worker threads.
    pub workers: usize,
    /// Queued calls per muscle and priority.
    pub queue_per_muscle: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self { workers: std::thread::available_parallelism().map_or(2, |n| n.get()), queue_per_muscle: 256 }
    }
}

/// What a queued call does.
enum Work {
    Forward(Vec<f32>),
    Train { x: Vec<f32>, y: Vec<f32>, lr: f32 },
}

/// What a call returns.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// `forward`'s outputs.
    Values(Vec<f32>),
    /// `train`'s loss.
    Loss(f32),
}

struct Job {
    work: Work,
    reply: SyncSender<Result<Output, RuntimeError>>,
}

#[derive(Default)]
struct Level {
    queues: HashMap<String, VecDeque<Job>>,
    ring: VecDeque<String>,
}

#[derive(Default)]
struct Queues {
    levels: [Level; 2],
    running: HashMap<String, usize>,
    picks: u64,
    stopping: bool,
}

struct Shared {
    runtime: Arc<Runtime>,
    config: SchedulerConfig,
    queues: Mutex<Queues>,
    work: Condvar,
}

/// A pending call; [`Ticket::wait`] blocks until it ran.
#[derive(Debug)]
pub struct Ticket(Receiver<Result<Output, RuntimeError>>);

impl Ticket {
    /// Waits for the result.
    pub fn wait(self) -> Result<Output, RuntimeError> {
        self.0.recv().unwrap_or(Err(RuntimeError::ShuttingDown))
    }
}

/// The worker pool.
pub struct Scheduler {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").field("workers", &self.workers.len()).finish_non_exhaustive()
    }
}

impl Scheduler {
    /// Starts `config.workers` threads serving `runtime`.
    pub fn new(runtime: Arc<Runtime>, config: SchedulerConfig) -> Result<Self, RuntimeError> {
        let shared = Arc::new(Shared { runtime, config, queues: Mutex::new(Queues::default()), work: Condvar::new() });
        let workers = (0..config.workers.max(1))
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("referee-worker-{i}"))
                    .spawn(move || worker(&shared))
                    .map_err(|e| RuntimeError::Store(format!("cannot start worker thread: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { shared, workers })
    }

    fn submit(&self, name: &str, priority: Priority, work: Work) -> Result<Ticket, RuntimeError> {
        let (reply, rx) = sync_channel(1);
        let mut q = self.shared.queues.lock().map_err(|_| RuntimeError::ShuttingDown)?;
        if q.stopping {
            return Err(RuntimeError::ShuttingDown);
        }
        let limit = self.shared.config.queue_per_muscle;
        let Some(level) = q.levels.get_mut(priority as usize) else {
            return Err(RuntimeError::ShuttingDown);
        };
        let queue = level.queues.entry(name.to_owned()).or_default();
        if queue.len() >= limit {
            return Err(RuntimeError::Busy { name: name.into(), queued: queue.len() });
        }
        let was_empty = queue.is_empty();
        queue.push_back(Job { work, reply });
        if was_empty {
            level.ring.push_back(name.to_owned());
        }
        drop(q);
        self.shared.work.notify_one();
        Ok(Ticket(rx))
    }

    /// Queues a `forward` call.
    pub fn submit_forward(&self, name: &str, priority: Priority, input: Vec<f32>) -> Result<Ticket, RuntimeError> {
        self.submit(name, priority, Work::Forward(input))
    }

    /// Queues a `train` step.
    pub fn submit_train(
        &self,
        name: &str,
        priority: Priority,
        x: Vec<f32>,
        y: Vec<f32>,
        lr: f32,
    ) -> Result<Ticket, RuntimeError> {
        self.submit(name, priority, Work::Train { x, y, lr })
    }

    /// Queues a `forward` call and waits for it.
    pub fn invoke(&self, name: &str, priority: Priority, input: Vec<f32>) -> Result<Vec<f32>, RuntimeError> {
        match self.submit_forward(name, priority, input)?.wait()? {
            Output::Values(v) => Ok(v),
            Output::Loss(l) => Ok(vec![l]),
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        if let Ok(mut q) = self.shared.queues.lock() {
            q.stopping = true;
            // Pending callers get ShuttingDown when their reply sender is dropped.
            for level in &mut q.levels {
                level.queues.clear();
                level.ring.clear();
            }
        }
        self.shared.work.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn concurrency(runtime: &Runtime, name: &str) -> usize {
    runtime.info(name).map_or(1, |i| if i.trainable { 1 } else { i.grant.concurrency.max(1) })
}

/// Picks the next runnable job: priority order with the every-8th rule, round-robin within;
/// `limit` gives each muscle's concurrency.
fn pick(q: &mut Queues, limit: impl Fn(&str) -> usize) -> Option<(String, Job)> {
    q.picks += 1;
    let order: [usize; 2] = if q.picks.is_multiple_of(8) { [1, 0] } else { [0, 1] };
    for level_index in order {
        let Some(level) = q.levels.get_mut(level_index) else { continue };
        for _ in 0..level.ring.len() {
            let Some(name) = level.ring.pop_front() else { break };
            let running = q.running.get(&name).copied().unwrap_or(0);
            if running >= limit(&name) {
                level.ring.push_back(name);
                continue;
            }
            let Some(queue) = level.queues.get_mut(&name) else { continue };
            let Some(job) = queue.pop_front() else { continue };
            if queue.is_empty() {
                level.queues.remove(&name);
            } else {
                level.ring.push_back(name.clone());
            }
            *q.running.entry(name.clone()).or_default() += 1;
            return Some((name, job));
        }
    }
    None
}

fn worker(shared: &Shared) {
    loop {
        let (name, job) = {
            let Ok(mut q) = shared.queues.lock() else { return };
            loop {
                if q.stopping {
                    return;
                }
                if let Some(found) = pick(&mut q, |name| concurrency(&shared.runtime, name)) {
                    break found;
                }
                q = match shared.work.wait(q) {
                    Ok(q) => q,
                    Err(_) => return,
                };
            }
        };
        let result = match job.work {
            Work::Forward(input) => shared.runtime.invoke(&name, &input).map(Output::Values),
            Work::Train { x, y, lr } => shared.runtime.train(&name, &x, &y, lr).map(Output::Loss),
        };
        // The caller may have given up; that is not the worker's problem.
        let _ = job.reply.send(result);
        if let Ok(mut q) = shared.queues.lock()
            && let Some(n) = q.running.get_mut(&name)
        {
            *n = n.saturating_sub(1);
        }
        // A slot freed: a muscle skipped for concurrency may now run.
        shared.work.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(q: &mut Queues, priority: Priority, name: &str, tag: f32) -> Receiver<Result<Output, RuntimeError>> {
        let (reply, rx) = sync_channel(1);
        let level = &mut q.levels[priority as usize];
        let jobs = level.queues.entry(name.to_owned()).or_default();
        if jobs.is_empty() {
            level.ring.push_back(name.to_owned());
        }
        jobs.push_back(Job { work: Work::Forward(vec![tag]), reply });
        rx
    }

    fn order(q: &mut Queues, limit: usize, n: usize) -> Vec<(String, f32)> {
        (0..n)
            .filter_map(|_| pick(q, |_| limit))
            .map(|(name, job)| {
                let tag = match job.work {
                    Work::Forward(v) => v[0],
                    Work::Train { lr, .. } => lr,
                };
                (name, tag)
            })
            .collect()
    }

    #[test]
    fn a_flood_on_one_muscle_does_not_starve_another() {
        let mut q = Queues::default();
        let _rx: Vec<_> = (0..5).map(|i| queue(&mut q, Priority::Normal, "flood", i as f32)).collect();
        let _b = queue(&mut q, Priority::Normal, "quiet", 100.0);
        let picked = order(&mut q, usize::MAX, 6);
        let names: Vec<&str> = picked.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["flood", "quiet", "flood", "flood", "flood", "flood"]);
        // Within one muscle, calls keep their order.
        let floods: Vec<f32> = picked.iter().filter(|(n, _)| n == "flood").map(|(_, t)| *t).collect();
        assert_eq!(floods, [0.0, 1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn high_priority_goes_first_but_normal_gets_every_eighth_pick() {
        let mut q = Queues::default();
        let _n: Vec<_> = (0..3).map(|i| queue(&mut q, Priority::Normal, "normal", i as f32)).collect();
        let _h: Vec<_> = (0..20).map(|i| queue(&mut q, Priority::High, "high", i as f32)).collect();
        let names: Vec<String> = order(&mut q, usize::MAX, 16).into_iter().map(|(n, _)| n).collect();
        let normal_at: Vec<usize> = names.iter().enumerate().filter(|(_, n)| *n == "normal").map(|(i, _)| i).collect();
        assert_eq!(normal_at, [7, 15], "{names:?}");
    }

    #[test]
    fn a_muscle_at_its_concurrency_is_skipped_not_waited_on() {
        let mut q = Queues::default();
        let _a = queue(&mut q, Priority::Normal, "busy", 1.0);
        let _b = queue(&mut q, Priority::Normal, "free", 2.0);
        q.running.insert("busy".into(), 1);
        let picked = order(&mut q, 1, 2);
        assert_eq!(picked, [("free".to_owned(), 2.0)]);
    }
}
