//! Durable worknode writes, in process: what waiting for the commit costs.
//!
//! For 1, 16 and 256 concurrent writers (threads, each in a closed loop on one shared worknode):
//! - **durable**: `System::update(..).wait()`: answered after the group commit's fsync;
//! - **fire and forget**: `System::update_detached` (queued only), with the same store, measured
//!   until every queued update is committed (so it is the rate the store sustains, not the rate
//!   a queue accepts);
//! - **redb floor**: one redb write transaction per event with `Durability::Immediate`, one thread,
//!   on the same disk: the rate without group commit.
//!
//! Run: `cargo run --release -p referee-worknode --no-default-features --example bench_durable`
//! (`--seconds N`, default 3; `--dir PATH` for the store, default a temporary directory under
//! the current one, so it measures the disk the repository is on).

#![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "benchmark setup, not reachable from input")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use referee_worknode::{Authority, Consistency, EventStore, Op, StoreConfig, System, SystemConfig, WnPath, WorknodeId};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_owned())
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn system(dir: &std::path::Path) -> (Arc<System>, WorknodeId) {
    let store = EventStore::open(&dir.join("worknodes.redb"), StoreConfig::default()).unwrap();
    let sys = Arc::new(System::start(SystemConfig::default(), Some(Arc::new(store)), None).unwrap());
    let id = sys.create(&Authority::System, &WnPath::root(), "bench", "data", Consistency::Local).unwrap();
    (sys, id)
}

/// Closed-loop durable writers: (updates/s, p50 µs, p99 µs).
fn durable(dir: &std::path::Path, writers: usize, seconds: f64) -> (f64, u32, u32) {
    let (sys, id) = system(dir);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|_| {
            let (sys, stop) = (sys.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    sys.update(&Authority::System, id, vec![("hits".into(), Op::Grow(1))]).unwrap().wait().unwrap();
                    lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                }
                lat
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    let mut lat: Vec<u32> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    (lat.len() as f64 / elapsed, percentile(&lat, 0.5), percentile(&lat, 0.99))
}

/// Writers that only queue (backing off on a full mailbox), timed until the store has all.
fn detached(dir: &std::path::Path, writers: usize, seconds: f64) -> f64 {
    let (sys, id) = system(dir);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|_| {
            let (sys, stop, sent) = (sys.clone(), stop.clone(), sent.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match sys.update_detached(&Authority::System, id, vec![("hits".into(), Op::Grow(1))]) {
                        Ok(()) => drop(sent.fetch_add(1, Ordering::Relaxed)),
                        Err(_) => std::thread::yield_now(),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    threads.into_iter().for_each(|t| t.join().unwrap());
    assert!(sys.wait_idle(Duration::from_secs(120)));
    let elapsed = start.elapsed().as_secs_f64();
    let stored = sys.query(&Authority::System, id, Consistency::Local).unwrap().version;
    assert_eq!(stored, sent.load(Ordering::Relaxed));
    stored as f64 / elapsed
}

/// One redb commit (fsync) per event, sequential: commits/s.
fn redb_floor(dir: &std::path::Path, seconds: f64) -> f64 {
    const T: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("floor");
    let db = redb::Database::create(dir.join("floor.redb")).unwrap();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        let mut txn = db.begin_write().unwrap();
        txn.set_durability(redb::Durability::Immediate).unwrap();
        txn.open_table(T).unwrap().insert(n, [7u8; 64].as_slice()).unwrap();
        txn.commit().unwrap();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let seconds: f64 = arg("--seconds", "3").parse().unwrap();
    let base = arg("--dir", ".");
    let fresh = || tempfile::tempdir_in(&base).unwrap();
    let floor = redb_floor(fresh().path(), seconds);
    println!("redb floor (one fsync'd commit per event, 1 thread): {floor:.0} commits/s");
    println!("| writers | durable updates/s | p50 | p99 | fire and forget (to the store) | durable / f&f |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for writers in [1usize, 16, 256] {
        let (rate, p50, p99) = durable(fresh().path(), writers, seconds);
        let ff = detached(fresh().path(), writers, seconds);
        println!("| {writers} | {rate:.0} | {p50} µs | {p99} µs | {ff:.0} | {:.0} % |", 100.0 * rate / ff.max(1.0));
    }
}
