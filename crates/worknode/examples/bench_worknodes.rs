//! Worknodes vs a tokio-task-per-actor baseline, in one run: memory per idle actor with one
//! million actors, and in-process message throughput (a ring: tokens hop from actor to actor).
//!
//! Run (release, the machine's 2 cores): `cargo run --release -p referee-worknode --no-default-features --example bench_worknodes`
//! or `bench/worknodes.sh`, which also runs the Erlang baseline. Options: `--actors N` (default
//! 1000000), `--ring N` (1000), `--tokens N` (1000), `--hops N` (5000), `--workers N` (2).

#![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "benchmark setup, not reachable from input")]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use referee_worknode::{
    Authority, Behaviour, BehaviourError, Body, Consistency, Ctx, Envelope, Handle, System, SystemConfig, WnPath,
};

fn rss_bytes() -> u64 {
    // /proc/self/statm: size resident shared ... in pages.
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    pages * 4096
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Forwards a token (remaining hops, little-endian u32, then the sender's ring position) to the next actor.
struct Ring {
    next: Mutex<Vec<Handle>>,
    table: std::sync::OnceLock<Vec<Handle>>,
}

impl Behaviour for Ring {
    fn handle(&self, ctx: &mut Ctx<'_>, msg: &Envelope) -> Result<(), BehaviourError> {
        let Body::Data(d) = &msg.body else { return Ok(()) };
        let (Some(hops), Some(pos)) = (d.get(..4), d.get(4..8)) else { return Ok(()) };
        let hops = u32::from_le_bytes(hops.try_into().unwrap_or_default());
        let pos = u32::from_le_bytes(pos.try_into().unwrap_or_default()) as usize;
        if hops == 0 {
            return Ok(());
        }
        let table = self.table.get_or_init(|| self.next.lock().map(|v| v.clone()).unwrap_or_default());
        let next_pos = (pos + 1) % table.len().max(1);
        let Some(next) = table.get(next_pos) else { return Ok(()) };
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&(hops - 1).to_le_bytes());
        out[4..].copy_from_slice(&(next_pos as u32).to_le_bytes());
        ctx.send_to(*next, Bytes::copy_from_slice(&out)).map_err(|e| BehaviourError(e.to_string()))
    }
}

fn worknodes_memory(actors: u64) -> (f64, System) {
    let sys = System::start(
        SystemConfig { max_worknodes: actors as usize + 2000, max_children: 1_000_000, ..SystemConfig::default() },
        None,
        None,
    )
    .unwrap();
    let before = rss_bytes();
    let fanout = 1000u64;
    let mut made = 0u64;
    let root = WnPath::root();
    for g in 0..actors.div_ceil(fanout) {
        let gname = format!("g{g}");
        sys.create(&Authority::System, &root, &gname, "data", Consistency::Local).unwrap();
        let gp = root.child(&gname).unwrap();
        made += 1;
        for i in 0..fanout.min(actors - g * fanout) {
            sys.create(&Authority::System, &gp, &format!("w{i}"), "data", Consistency::Local).unwrap();
            made += 1;
        }
    }
    let after = rss_bytes();
    ((after - before) as f64 / made as f64, sys)
}

fn worknodes_throughput(workers: usize, ring: u64, tokens: u64, hops: u64) -> f64 {
    let sys = System::start(
        SystemConfig { workers, max_per_turn: 64, mailbox_capacity: 1 << 20, ..SystemConfig::default() },
        None,
        None,
    )
    .unwrap();
    let behaviour = Arc::new(Ring { next: Mutex::new(Vec::new()), table: std::sync::OnceLock::new() });
    sys.register("ring", behaviour.clone());
    let handles: Vec<Handle> = (0..ring)
        .map(|i| {
            sys.create_handle(&Authority::System, &WnPath::root(), &format!("r{i}"), "ring", Consistency::Local)
                .unwrap()
                .1
        })
        .collect();
    *behaviour.next.lock().unwrap() = handles.clone();
    let start = Instant::now();
    for t in 0..tokens {
        let pos = (t % ring) as usize;
        let mut m = [0u8; 8];
        m[..4].copy_from_slice(&(hops as u32).to_le_bytes());
        m[4..].copy_from_slice(&(pos as u32).to_le_bytes());
        sys.send_handle(handles[pos], Bytes::copy_from_slice(&m)).unwrap();
    }
    assert!(sys.wait_idle(Duration::from_secs(600)));
    let secs = start.elapsed().as_secs_f64();
    let handled = sys.stats().handled;
    assert_eq!(handled, tokens * (hops + 1));
    handled as f64 / secs
}

fn tokio_memory(rt: &tokio::runtime::Runtime, actors: u64) -> (f64, Vec<tokio::sync::mpsc::Sender<u64>>) {
    let before = rss_bytes();
    let senders: Vec<_> = rt.block_on(async {
        (0..actors)
            .map(|_| {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<u64>(16);
                tokio::spawn(async move { while rx.recv().await.is_some() {} });
                tx
            })
            .collect()
    });
    // Let every task reach its first await, as an idle actor would be.
    rt.block_on(async { tokio::task::yield_now().await });
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_bytes();
    ((after - before) as f64 / actors as f64, senders)
}

fn tokio_throughput(rt: &tokio::runtime::Runtime, ring: u64, tokens: u64, hops: u64) -> f64 {
    rt.block_on(async {
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut txs = Vec::new();
        let mut rxs = Vec::new();
        for _ in 0..ring {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
            txs.push(tx);
            rxs.push(rx);
        }
        let txs = Arc::new(txs);
        for (i, mut rx) in rxs.into_iter().enumerate() {
            let (txs, done) = (txs.clone(), done_tx.clone());
            tokio::spawn(async move {
                let next = (i + 1) % txs.len();
                while let Some(h) = rx.recv().await {
                    if h == 0 {
                        let _ = done.send(());
                    } else {
                        let _ = txs[next].send(h - 1);
                    }
                }
            });
        }
        let start = Instant::now();
        for t in 0..tokens {
            let _ = txs[(t % ring) as usize].send(hops);
        }
        for _ in 0..tokens {
            done_rx.recv().await;
        }
        (tokens * (hops + 1)) as f64 / start.elapsed().as_secs_f64()
    })
}

fn main() {
    let actors = arg("--actors", 1_000_000);
    let (ring, tokens, hops) = (arg("--ring", 1000), arg("--tokens", 1000), arg("--hops", 5000));
    let workers = arg("--workers", 2) as usize;
    println!(
        "cores: {}, actors: {actors}, ring: {ring} actors x {tokens} tokens x {hops} hops",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let (per, sys) = worknodes_memory(actors);
    println!("worknodes  idle memory: {per:8.0} bytes/actor ({} worknodes)", sys.len());
    drop(sys);
    let rate = worknodes_throughput(workers, ring, tokens, hops);
    println!("worknodes  throughput:  {:8.2} M msgs/s ({workers} workers)", rate / 1e6);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build().unwrap();
    let (per, senders) = tokio_memory(&rt, actors);
    println!("tokio      idle memory: {per:8.0} bytes/actor (task + bounded mpsc each)");
    drop(senders);
    let rate = tokio_throughput(&rt, ring, tokens, hops);
    println!("tokio      throughput:  {:8.2} M msgs/s ({workers} worker threads)", rate / 1e6);
}
