//! Crash safety: a child process appends events as fast as it can and prints every acknowledged
//! event; the test SIGKILLs it at varying points, many times, then checks that every acknowledged
//! event is in the store, sequences are contiguous and the database opens cleanly.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use referee_worknode::{EventStore, Expected, NewEvent, StoreConfig, WorknodeId};

use crate::util::ChildProc;

const WRITERS: u8 = 4;

fn stream(i: u8) -> WorknodeId {
    WorknodeId::from_bytes([i + 1; 16])
}

/// Child role: `args[0]` is the database path. Runs until killed.
pub(crate) fn writer(args: &[String]) {
    let store = Arc::new(EventStore::open(std::path::Path::new(&args[0]), StoreConfig::default()).unwrap());
    println!("READY");
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            std::thread::spawn(move || {
                let s = stream(w);
                let mut version = store.version(s).unwrap();
                loop {
                    let batch: Vec<NewEvent> =
                        (0..(version % 3 + 1)).map(|i| NewEvent::new([[w; 32], [i as u8; 32]].concat())).collect();
                    let ids: Vec<String> = batch.iter().map(|e| hex::encode(e.id)).collect();
                    let a = store.append(s, Expected::Exact(version), batch).unwrap();
                    for (seq, id) in a.seqs.iter().zip(ids) {
                        println!("ACK {w} {seq} {id}");
                    }
                    version = a.version;
                }
            })
        })
        .collect();
    // The writers never return: the process ends by SIGKILL.
    threads.into_iter().for_each(|t| drop(t.join()));
}

#[test]
fn acknowledged_events_survive_sigkill_during_heavy_writes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crash.redb");
    let mut acked: HashMap<(u8, u64), String> = HashMap::new();
    let started = Instant::now();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let iterations = 20;
    for iteration in 0..iterations {
        let child = ChildProc::spawn("writer", &[db.display().to_string()]);
        let mut child = child;
        child.next_with("READY", Duration::from_secs(30)).expect("writer did not start");
        // Kill after a varying number of acknowledgements (xorshift: deterministic sequence).
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let kill_after = 20 + rng % 300;
        for _ in 0..kill_after {
            if child.next_with("ACK ", Duration::from_secs(30)).map(|l| record(&mut acked, &l)).is_none() {
                panic!("iteration {iteration}: writer stopped acknowledging");
            }
        }
        let _ = child.child.kill(); // SIGKILL
        let _ = child.child.wait();
        // Lines printed before death were acknowledged too.
        for l in child.drain_with("ACK ") {
            record(&mut acked, &l);
        }
        verify(&db, &acked, iteration);
    }
    assert!(acked.len() > iterations * 20, "only {} acknowledged events", acked.len());
    assert!(started.elapsed() < Duration::from_secs(120), "crash test too slow: {:?}", started.elapsed());
}

fn record(acked: &mut HashMap<(u8, u64), String>, line: &str) {
    let mut w = line.split_whitespace().skip(1);
    let (Some(writer), Some(seq), Some(id)) = (w.next(), w.next(), w.next()) else { panic!("bad ack line {line:?}") };
    let prev = acked.insert((writer.parse().unwrap(), seq.parse().unwrap()), id.to_owned());
    assert!(prev.is_none_or(|p| p == id), "sequence {seq} of writer {writer} acknowledged twice with different events");
}

fn verify(db: &std::path::Path, acked: &HashMap<(u8, u64), String>, iteration: usize) {
    let store = EventStore::open(db, StoreConfig::default())
        .unwrap_or_else(|e| panic!("iteration {iteration}: store does not open: {e}"));
    for w in 0..WRITERS {
        let s = stream(w);
        let events = store.read(s, 1).unwrap();
        let version = store.version(s).unwrap();
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=version).collect::<Vec<_>>(), "iteration {iteration}: writer {w} has gaps");
        let by_seq: HashMap<u64, String> = events.iter().map(|e| (e.seq, hex::encode(e.id))).collect();
        for ((aw, seq), id) in acked.iter().filter(|((aw, _), _)| *aw == w) {
            assert_eq!(by_seq.get(seq), Some(id), "iteration {iteration}: acknowledged event {aw}/{seq} lost");
        }
        for e in &events {
            let ok = e.body.len() == 64
                && e.body[..32].iter().all(|b| *b == w)
                && e.body[32..].iter().all(|b| *b == e.body[32]);
            assert!(ok, "iteration {iteration}: event {w}/{} has a corrupt body", e.seq);
        }
    }
}
