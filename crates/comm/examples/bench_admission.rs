//! An allowed peer's handshake latency against a running `referee comm listen`, alone and while
//! hostile sockets connect and stall (issue 21). Used by `bench/comm-hostile.sh`.
//!
//!   bench_admission HOST:PORT SERVER_ID [SAMPLES] [HOSTILE]
//!
//! Prints one JSON line per (phase, pattern): p50/p99/max in microseconds and failures. During
//! the `flood` phase, HOSTILE sockets (default 2,000) are held open: half say nothing, half send
//! the preamble and stop; any the node closes are reopened at once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, reason = "benchmark tool")]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use referee_comm::{Addr, AllowList, Config, ConnectOptions, Identity, Node, PeerId};

fn percentile(sorted: &[u128], p: f64) -> u128 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(0)
}

async fn measure(addr: &Addr, server: PeerId, samples: usize, ik: bool) -> (Vec<u128>, usize) {
    let opts = ConnectOptions::default().expect_peer(server).reuse(false);
    let cached = Node::new(Identity::generate().unwrap(), AllowList::new([server]), Config::default()).0;
    if ik {
        // Learn the listener's static key over XX once; every later connect uses IK.
        cached.connect_with(addr, opts.clone()).await.unwrap().abort();
    }
    let (mut times, mut failed) = (Vec::with_capacity(samples), 0);
    for _ in 0..samples {
        let node = if ik {
            cached.clone()
        } else {
            Node::new(Identity::generate().unwrap(), AllowList::new([server]), Config::default()).0
        };
        let start = Instant::now();
        match node.connect_with(addr, opts.clone()).await {
            Ok(conn) => {
                times.push(start.elapsed().as_micros());
                assert_eq!(conn.peer().ik, ik);
                conn.abort();
            }
            Err(e) => {
                failed += 1;
                eprintln!("handshake failed: {e}");
            }
        }
    }
    times.sort_unstable();
    (times, failed)
}

/// Holds `n` hostile sockets until `stop`, reopening any the node closes.
fn flood(addr: String, n: usize, stop: Arc<AtomicBool>, held: Arc<AtomicUsize>, reopened: Arc<AtomicUsize>) {
    let open = |i: usize| -> Option<TcpStream> {
        let mut s = TcpStream::connect(&addr).ok()?;
        if i % 2 == 1 {
            s.write_all(b"RFCM\x01\x00").ok()?;
        }
        s.set_nonblocking(true).ok()?;
        Some(s)
    };
    let mut socks: Vec<Option<TcpStream>> = (0..n).map(open).collect();
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        let mut live = 0;
        for (i, slot) in socks.iter_mut().enumerate() {
            let closed = match slot {
                Some(s) => match s.read(&mut buf) {
                    Ok(n) => n == 0,
                    Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                },
                None => true,
            };
            if closed {
                *slot = open(i);
                reopened.fetch_add(1, Ordering::Relaxed);
            }
            live += usize::from(slot.is_some());
        }
        held.store(live, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn report(phase: &str, ik: bool, (times, failed): &(Vec<u128>, usize), extra: &str) {
    println!(
        "{{\"phase\":\"{phase}\",\"pattern\":\"{}\",\"samples\":{},\"failed\":{failed},\"p50_us\":{},\"p99_us\":{},\"max_us\":{}{extra}}}",
        if ik { "ik" } else { "xx" },
        times.len(),
        percentile(times, 0.5),
        percentile(times, 0.99),
        times.last().copied().unwrap_or(0)
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (host, server) = (&args[1], args[2].parse::<PeerId>().unwrap());
    let samples = args.get(3).map_or(500, |s| s.parse().unwrap());
    let hostile = args.get(4).map_or(2000, |s| s.parse().unwrap());
    let addr: Addr = format!("tcp://{host}").parse().unwrap();
    for ik in [false, true] {
        report("alone", ik, &measure(&addr, server, samples, ik).await, "");
    }
    let (stop, held, reopened) = (Arc::default(), Arc::default(), Arc::default());
    let t = {
        let (stop, held, reopened, host) = (Arc::clone(&stop), Arc::clone(&held), Arc::clone(&reopened), host.clone());
        std::thread::spawn(move || flood(host, hostile, stop, held, reopened))
    };
    while held.load(Ordering::Relaxed) < hostile * 9 / 10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for ik in [false, true] {
        let r = measure(&addr, server, samples, ik).await;
        let extra = format!(
            ",\"hostile_held\":{},\"hostile_reopened\":{}",
            held.load(Ordering::Relaxed),
            reopened.load(Ordering::Relaxed)
        );
        report("flood", ik, &r, &extra);
    }
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
}
