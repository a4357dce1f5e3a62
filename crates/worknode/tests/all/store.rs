//! Event store: conflicts, idempotency, replay order, snapshots, group commit.

use std::sync::Arc;

use referee_worknode::{EventStore, Expected, NewEvent, StoreConfig, StoreError, WorknodeId};

fn open(dir: &tempfile::TempDir) -> EventStore {
    EventStore::open(&dir.path().join("worknodes.redb"), StoreConfig::default()).unwrap()
}

fn ev(body: &str) -> NewEvent {
    NewEvent::new(body.as_bytes().to_vec())
}

#[test]
fn sequences_start_at_one_and_read_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let s = WorknodeId::new();
    let a = store.append(s, Expected::Exact(0), vec![ev("a"), ev("b")]).unwrap();
    assert_eq!(a.seqs, vec![1, 2]);
    store.append(s, Expected::Any, vec![ev("c")]).unwrap();
    let bodies: Vec<_> = store.read(s, 1).unwrap().into_iter().map(|e| (e.seq, e.body)).collect();
    assert_eq!(bodies, vec![(1, b"a".to_vec()), (2, b"b".to_vec()), (3, b"c".to_vec())]);
    assert_eq!(store.read(s, 3).unwrap().len(), 1);
    // Another stream is independent.
    assert_eq!(store.version(WorknodeId::new()).unwrap(), 0);
}

#[test]
fn expected_version_mismatch_is_a_typed_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let s = WorknodeId::new();
    store.append(s, Expected::Exact(0), vec![ev("a")]).unwrap();
    let err = store.append(s, Expected::Exact(0), vec![ev("b")]).unwrap_err();
    assert_eq!(err, StoreError::Conflict { stream: s, expected: 0, actual: 1 });
    assert_eq!(store.version(s).unwrap(), 1, "a refused append must not write");
    store.append(s, Expected::Exact(1), vec![ev("b")]).unwrap();
}

#[test]
fn reappending_an_event_id_returns_the_original_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let s = WorknodeId::new();
    let first = ev("once");
    store.append(s, Expected::Exact(0), vec![first.clone(), ev("two")]).unwrap();
    // A retry with a stale expected version still succeeds: the id decides.
    let again = store.append(s, Expected::Exact(0), vec![first.clone()]).unwrap();
    assert_eq!(again.seqs, vec![1]);
    assert_eq!(store.version(s).unwrap(), 2);
    // Mixed: the duplicate is skipped, the new one appended.
    let mixed = store.append(s, Expected::Exact(2), vec![first, ev("three")]).unwrap();
    assert_eq!(mixed.seqs, vec![1, 3]);
    assert_eq!(store.read(s, 1).unwrap().len(), 3);
}

#[test]
fn events_snapshots_and_metadata_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let s = WorknodeId::new();
    {
        let store = open(&dir);
        store.append(s, Expected::Exact(0), vec![ev("a"), ev("b"), ev("c")]).unwrap();
        store.save_snapshot(s, 2, b"state-at-2").unwrap();
        store.put_meta(s, b"meta").unwrap();
        store.put_revoked(b"rid").unwrap();
    }
    let store = open(&dir);
    assert_eq!(store.version(s).unwrap(), 3);
    assert_eq!(store.snapshot(s).unwrap(), Some((2, b"state-at-2".to_vec())));
    assert_eq!(store.read(s, 3).unwrap()[0].body, b"c".to_vec());
    assert_eq!(store.metas().unwrap(), vec![(s, b"meta".to_vec())]);
    assert_eq!(store.revoked().unwrap(), vec![b"rid".to_vec()]);
}

#[test]
fn concurrent_appends_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir));
    let (threads, per) = (8, 40);
    let barrier = Arc::new(std::sync::Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (store, barrier) = (store.clone(), barrier.clone());
            std::thread::spawn(move || {
                let s = WorknodeId::new();
                barrier.wait();
                for i in 0..per {
                    store.append(s, Expected::Exact(i), vec![ev("x")]).unwrap();
                }
                s
            })
        })
        .collect();
    for h in handles {
        let s = h.join().unwrap();
        assert_eq!(store.version(s).unwrap(), per);
    }
    let stats = store.stats();
    assert_eq!(stats.requests, threads as u64 * per);
    // Eight writers each waiting for its ack: commits must be shared, or there is no group commit.
    assert!(stats.commits < stats.requests, "{stats:?}: no group commit");
}
