//! The worknode system: supervision, backpressure, bounds, capabilities, snapshots and replay.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use referee_worknode::{
    Authority, Behaviour, BehaviourError, Body, CapError, Capabilities, Completion, Consistency, CreateError, Ctx,
    Envelope, EventStore, Issuer, Op, QueryError, Right, SendError, Signal, StoreConfig, System, SystemConfig, WnPath,
    WriteError, attenuate, revocation_ids,
};

const WAIT: Duration = Duration::from_secs(20);

fn p(s: &str) -> WnPath {
    s.parse().unwrap()
}

fn counter(sys: &System, id: referee_worknode::WorknodeId, field: &str) -> serde_json::Value {
    sys.query(&Authority::System, id, Consistency::Local).unwrap().state.to_json()[field].clone()
}

/// Counts `inc`, fails on `err`, panics on `boom`.
struct Flaky;

impl Behaviour for Flaky {
    fn handle(&self, ctx: &mut Ctx<'_>, msg: &Envelope) -> Result<(), BehaviourError> {
        match &msg.body {
            Body::Data(d) if &d[..] == b"inc" => ctx.update("n", Op::Add(1)),
            Body::Data(d) if &d[..] == b"err" => {
                ctx.update("n", Op::Add(1000));
                return Err(BehaviourError("asked to fail".into()));
            }
            Body::Data(d) if &d[..] == b"boom" => panic!("asked to panic"),
            _ => {}
        }
        Ok(())
    }
}

/// Records supervision signals in its state.
struct Supervisor;

impl Behaviour for Supervisor {
    fn handle(&self, ctx: &mut Ctx<'_>, msg: &Envelope) -> Result<(), BehaviourError> {
        match &msg.body {
            Body::Signal(Signal::ChildRestarted { reason, .. }) => {
                ctx.update("restarted", Op::Add(1));
                ctx.update("reasons", Op::Insert(reason.clone()));
            }
            Body::Signal(Signal::ChildStopped { .. }) => ctx.update("stopped", Op::Add(1)),
            _ => {}
        }
        Ok(())
    }
}

fn system_with_store(dir: &tempfile::TempDir, cfg: SystemConfig) -> System {
    let store = EventStore::open(&dir.path().join("worknodes.redb"), StoreConfig::default()).unwrap();
    System::builder(cfg)
        .store(Arc::new(store))
        .behaviour("flaky", Arc::new(Flaky))
        .behaviour("sup", Arc::new(Supervisor))
        .start()
        .unwrap()
}

#[test]
fn failing_behaviour_restarts_from_its_log_and_parent_is_told() {
    let dir = tempfile::tempdir().unwrap();
    let sys = system_with_store(&dir, SystemConfig::default());
    let sup = sys.create(&Authority::System, &WnPath::root(), "sup", "sup", Consistency::Local).unwrap();
    let child = sys.create(&Authority::System, &p("/sup"), "worker", "flaky", Consistency::Local).unwrap();
    let sent: Vec<Completion> = ["inc", "inc", "boom", "inc", "err", "inc"]
        .iter()
        .map(|m| sys.send(&Authority::System, child, Bytes::from_static(m.as_bytes())).unwrap())
        .collect();
    // Each sender learns its own message's fate: stored at the next version, or the failure.
    let outcomes: Vec<_> = sent.into_iter().map(Completion::wait).collect();
    let seqs: Vec<Option<u64>> = outcomes.iter().map(|o| o.as_ref().ok().and_then(|c| c.seq)).collect();
    assert_eq!(seqs, [Some(1), Some(2), None, Some(3), None, Some(4)], "{outcomes:?}");
    for failed in [&outcomes[2], &outcomes[4]] {
        assert!(matches!(failed, Err(WriteError::Behaviour { id, .. }) if *id == child), "{failed:?}");
    }
    assert!(sys.wait_idle(WAIT));
    // The failed messages' updates (+1000) were never applied; the four increments were.
    assert_eq!(counter(&sys, child, "n"), 4);
    assert_eq!(counter(&sys, sup, "restarted"), 2);
    let reasons = counter(&sys, sup, "reasons");
    assert_eq!(reasons, serde_json::json!(["asked to fail", "panicked: asked to panic"]));
    assert_eq!(sys.stats().restarts, 2);
    let view = sys.query(&Authority::System, child, Consistency::Local).unwrap();
    assert_eq!((view.version, view.restarts), (4, 2));
    drop(sys);
    // What the restarts replayed is what is durable: a fresh system replays the same state.
    let sys = system_with_store(&dir, SystemConfig::default());
    assert_eq!(counter(&sys, child, "n"), 4);
    assert_eq!(sys.resolve(&p("/sup/worker")), Some(child));
}

#[test]
fn worknode_failing_past_the_limit_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let sys = system_with_store(&dir, SystemConfig { max_restarts: 1, ..SystemConfig::default() });
    let sup = sys.create(&Authority::System, &WnPath::root(), "sup", "sup", Consistency::Local).unwrap();
    let child = sys.create(&Authority::System, &p("/sup"), "w", "flaky", Consistency::Local).unwrap();
    for m in ["err", "err"] {
        sys.send_detached(&Authority::System, child, Bytes::from_static(m.as_bytes())).unwrap();
    }
    assert!(sys.wait_idle(WAIT));
    assert_eq!(counter(&sys, sup, "restarted"), 1);
    assert_eq!(counter(&sys, sup, "stopped"), 1);
    assert_eq!(
        sys.send_detached(&Authority::System, child, Bytes::from_static(b"inc")),
        Err(SendError::Stopped(child))
    );
    assert!(matches!(sys.send(&Authority::System, child, Bytes::new()), Err(SendError::Stopped(c)) if c == child));
}

/// Blocks in its first message until released, so the test controls when the mailbox drains.
struct Gate {
    started: Mutex<Sender<()>>,
    release: Mutex<Receiver<()>>,
}

impl Behaviour for Gate {
    fn handle(&self, _: &mut Ctx<'_>, _: &Envelope) -> Result<(), BehaviourError> {
        self.started.lock().unwrap().send(()).unwrap();
        self.release.lock().unwrap().recv().unwrap();
        Ok(())
    }
}

#[test]
fn full_mailbox_refuses_with_backpressure() {
    let sys =
        System::start(SystemConfig { mailbox_capacity: 4, max_per_turn: 1, ..SystemConfig::default() }, None, None)
            .unwrap();
    let (started_tx, started) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    sys.register("gate", Arc::new(Gate { started: Mutex::new(started_tx), release: Mutex::new(release_rx) }));
    let id = sys.create(&Authority::System, &WnPath::root(), "g", "gate", Consistency::Local).unwrap();
    sys.send_detached(&Authority::System, id, Bytes::new()).unwrap();
    started.recv_timeout(WAIT).unwrap(); // the worker holds message 1; the mailbox is empty
    for _ in 0..4 {
        sys.send_detached(&Authority::System, id, Bytes::new()).unwrap();
    }
    assert_eq!(sys.send_detached(&Authority::System, id, Bytes::new()), Err(SendError::Full { id, capacity: 4 }));
    assert!(matches!(sys.send(&Authority::System, id, Bytes::new()), Err(SendError::Full { .. })));
    for _ in 0..5 {
        release.send(()).unwrap();
    }
    assert!(sys.wait_idle(WAIT));
    assert_eq!(sys.stats().handled, 5);
    // Drained: accepted again.
    sys.send_detached(&Authority::System, id, Bytes::new()).unwrap();
    release.send(()).unwrap();
    assert!(sys.wait_idle(WAIT));
}

#[test]
fn settle_waits_for_one_worknodes_mail_not_for_a_busy_system() {
    let sys = System::start(SystemConfig::default(), None, None).unwrap();
    let (started_tx, started) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    sys.register("gate", Arc::new(Gate { started: Mutex::new(started_tx), release: Mutex::new(release_rx) }));
    let gate = sys.create(&Authority::System, &WnPath::root(), "g", "gate", Consistency::Local).unwrap();
    let data = sys.create(&Authority::System, &WnPath::root(), "d", "data", Consistency::Local).unwrap();
    sys.send_detached(&Authority::System, gate, Bytes::new()).unwrap();
    started.recv_timeout(WAIT).unwrap(); // one worker is held inside the gate: the system is busy
    for n in 1..=50 {
        sys.update_detached(&Authority::System, data, vec![("n".into(), Op::Add(n))]).unwrap();
    }
    assert!(sys.settle(data, WAIT), "the other worker drains `d` while the gate is held");
    assert_eq!(counter(&sys, data, "n"), 50 * 51 / 2, "settle returned before every update landed");
    assert!(!sys.wait_idle(Duration::from_millis(50)), "the gate still holds a message");
    assert!(!sys.settle(gate, Duration::from_millis(50)), "the gate's own message is not done");
    release.send(()).unwrap();
    assert!(sys.settle(gate, WAIT));
    assert!(sys.wait_idle(WAIT));
}

#[test]
fn bounds_and_reserved_consistency_are_enforced() {
    let sys =
        System::start(SystemConfig { max_depth: 2, max_children: 2, ..SystemConfig::default() }, None, None).unwrap();
    let sys_auth = Authority::System;
    sys.create(&sys_auth, &WnPath::root(), "a", "data", Consistency::Local).unwrap();
    sys.create(&sys_auth, &p("/a"), "b", "data", Consistency::Local).unwrap();
    assert!(matches!(
        sys.create(&sys_auth, &p("/a/b"), "c", "data", Consistency::Local),
        Err(CreateError::TooDeep { depth: 3, max: 2, .. })
    ));
    assert_eq!(sys.create(&sys_auth, &p("/a"), "b", "data", Consistency::Local), Err(CreateError::Exists(p("/a/b"))));
    sys.create(&sys_auth, &p("/a"), "b2", "data", Consistency::Local).unwrap();
    assert!(matches!(
        sys.create(&sys_auth, &p("/a"), "b3", "data", Consistency::Local),
        Err(CreateError::TooManyChildren { max: 2, .. })
    ));
    assert!(matches!(
        sys.create(&sys_auth, &p("/a"), "s", "data", Consistency::Strong),
        Err(CreateError::Unsupported(_))
    ));
    assert!(matches!(
        sys.create(&sys_auth, &p("/nope"), "x", "data", Consistency::Local),
        Err(CreateError::NoParent(_))
    ));
    assert!(matches!(
        sys.create(&sys_auth, &p("/a"), "k", "no-such-kind", Consistency::Local),
        Err(CreateError::UnknownKind(_))
    ));
    // The root kind belongs to / alone (a peer cannot create it either).
    assert_eq!(sys.create(&sys_auth, &p("/a"), "r", "root", Consistency::Local), Err(CreateError::ReservedKind));
    let a = sys.resolve(&p("/a")).unwrap();
    // A change larger than max_delta_bytes is refused whole; one that changes nothing is not stored.
    let big = "x".repeat(SystemConfig::default().max_delta_bytes + 1);
    let refused = sys.update(&sys_auth, a, vec![("n".into(), Op::Add(1)), ("t".into(), Op::Set(big))]).unwrap().wait();
    assert!(
        matches!(&refused, Err(WriteError::Rejected { reason: referee_worknode::StateError::TooLarge { .. }, .. })),
        "{refused:?}"
    );
    let noop = sys.update(&sys_auth, a, vec![("g".into(), Op::Grow(0))]).unwrap().wait().unwrap();
    assert_eq!((noop.seq, noop.events, noop.version), (None, 0, 0));
    assert_eq!(counter(&sys, a, "n"), serde_json::Value::Null);
    assert!(matches!(sys.query(&sys_auth, a, Consistency::Strong), Err(QueryError::Unsupported(_))));
    let tree: Vec<String> =
        sys.tree(&sys_auth, &WnPath::root(), 100).unwrap().into_iter().map(|e| e.path.to_string()).collect();
    assert_eq!(tree, vec!["/", "/a", "/a/b", "/a/b2"]);
}

#[test]
fn tokens_confine_create_send_and_query_to_their_subtree() {
    let issuer = Issuer::generate();
    let caps = Arc::new(Capabilities::new(issuer.public_key(), []));
    let sys = System::start(SystemConfig::default(), None, Some(caps.clone())).unwrap();
    for (parent, name) in [("/", "acme"), ("/acme", "research"), ("/acme", "sales"), ("/acme", "research2")] {
        sys.create(&Authority::System, &p(parent), name, "data", Consistency::Local).unwrap();
    }
    let token = issuer.issue(&p("/acme/research"), &Right::ALL).unwrap();
    let auth = caps.verify(&token).unwrap();
    let mine = sys.create(&auth, &p("/acme/research"), "t1", "data", Consistency::Local).unwrap();
    sys.update(&auth, mine, vec![("n".into(), Op::Add(2))]).unwrap().wait().unwrap();
    assert_eq!(sys.query(&auth, mine, Consistency::Local).unwrap().state.to_json()["n"], 2);
    assert!(matches!(
        sys.create(&auth, &p("/acme/sales"), "t", "data", Consistency::Local),
        Err(CreateError::Denied(CapError::Denied { .. }))
    ));
    assert!(matches!(
        sys.create(&auth, &p("/acme/research2"), "t", "data", Consistency::Local),
        Err(CreateError::Denied(_))
    ));
    let sales = sys.resolve(&p("/acme/sales")).unwrap();
    assert!(matches!(sys.send(&auth, sales, Bytes::new()), Err(SendError::Denied(_))));
    assert!(matches!(sys.query(&auth, sales, Consistency::Local), Err(QueryError::Denied(_))));
    assert!(sys.tree(&auth, &p("/acme"), 10).is_err());

    // A read-only attenuation cannot write, even inside the subtree.
    let ro = caps.verify(&attenuate(&token, None, Some(&[Right::Read])).unwrap()).unwrap();
    sys.query(&ro, mine, Consistency::Local).unwrap();
    assert!(matches!(sys.update(&ro, mine, vec![("n".into(), Op::Add(1))]), Err(SendError::Denied(_))));

    // Revocation takes effect on the authority already in hand.
    caps.revoke(&hex::decode(&revocation_ids(&token).unwrap()[0]).unwrap());
    assert!(matches!(
        sys.update(&auth, mine, vec![("n".into(), Op::Add(1))]),
        Err(SendError::Denied(CapError::Revoked(_)))
    ));
}

#[test]
fn snapshots_are_taken_every_n_events_and_replay_uses_them() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SystemConfig { snapshot_every: 3, ..SystemConfig::default() };
    let sys = system_with_store(&dir, cfg.clone());
    let id = sys.create(&Authority::System, &WnPath::root(), "c", "data", Consistency::Local).unwrap();
    for i in 1..=10 {
        // One event per turn (each waits for the last to be durable), so snapshot points are
        // deterministic.
        sys.update(&Authority::System, id, vec![("n".into(), Op::Add(i))]).unwrap().wait().unwrap();
    }
    let store = sys.store().unwrap().clone();
    let (seq, _) = store.snapshot(id).unwrap().unwrap();
    assert_eq!(seq, 9);
    drop(sys);
    drop(store);
    let sys = system_with_store(&dir, cfg);
    assert_eq!(counter(&sys, id, "n"), (1..=10).sum::<i64>());
    assert_eq!(sys.query(&Authority::System, id, Consistency::Local).unwrap().version, 10);
}

/// Forwards each message to the next worknode of a ring until the hop budget is spent.
struct Relay {
    next: Mutex<Vec<referee_worknode::Handle>>,
}

impl Behaviour for Relay {
    fn handle(&self, ctx: &mut Ctx<'_>, msg: &Envelope) -> Result<(), BehaviourError> {
        let Body::Data(d) = &msg.body else { return Ok(()) };
        let hops = u32::from_le_bytes(d[..4].try_into().unwrap());
        if hops > 0 {
            let me = d[4] as usize;
            let next = self.next.lock().unwrap()[me];
            let mut out = (hops - 1).to_le_bytes().to_vec();
            out.push(((me + 1) % 8) as u8);
            ctx.send_to(next, Bytes::from(out)).map_err(|e| BehaviourError(e.to_string()))?;
        }
        Ok(())
    }
}

#[test]
fn messages_relayed_between_worknodes_are_all_handled() {
    let sys = System::start(SystemConfig::default(), None, None).unwrap();
    let relay = Arc::new(Relay { next: Mutex::new(Vec::new()) });
    sys.register("relay", relay.clone());
    let handles: Vec<_> = (0..8)
        .map(|i| {
            sys.create_handle(&Authority::System, &WnPath::root(), &format!("r{i}"), "relay", Consistency::Local)
                .unwrap()
                .1
        })
        .collect();
    *relay.next.lock().unwrap() = handles.iter().cycle().skip(1).take(8).copied().collect();
    for (i, h) in handles.iter().enumerate() {
        let mut m = 100u32.to_le_bytes().to_vec();
        m.push(i as u8);
        sys.send_handle(*h, Bytes::from(m)).unwrap();
    }
    assert!(sys.wait_idle(WAIT));
    assert_eq!(sys.stats().handled, 8 * 101);
}

#[test]
fn revocations_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = Issuer::generate();
    let start = || {
        let store = EventStore::open(&dir.path().join("worknodes.redb"), StoreConfig::default()).unwrap();
        let caps = Arc::new(Capabilities::new(issuer.public_key(), []));
        (
            System::builder(SystemConfig::default()).store(Arc::new(store)).capabilities(caps.clone()).start().unwrap(),
            caps,
        )
    };
    let token = issuer.issue(&p("/a"), &Right::ALL).unwrap();
    {
        let (sys, caps) = start();
        sys.create(&caps.verify(&token).unwrap(), &WnPath::root(), "x", "data", Consistency::Local).unwrap_err();
        sys.create(&Authority::System, &WnPath::root(), "a", "data", Consistency::Local).unwrap();
        sys.create(&caps.verify(&token).unwrap(), &p("/a"), "b", "data", Consistency::Local).unwrap();
        sys.revoke(&hex::decode(&revocation_ids(&token).unwrap()[0]).unwrap()).unwrap();
    }
    let (sys, caps) = start();
    assert!(matches!(caps.verify(&token), Err(CapError::Revoked(_))));
    assert!(sys.resolve(&p("/a/b")).is_some());
}

#[test]
fn acknowledged_updates_are_durable_and_an_idempotency_key_counts_once() {
    let dir = tempfile::tempdir().unwrap();
    let sys = system_with_store(&dir, SystemConfig::default());
    let id = sys.create(&Authority::System, &WnPath::root(), "c", "data", Consistency::Local).unwrap();
    let grow = |n| vec![("n".to_owned(), Op::Grow(n))];
    let first = sys.update_idempotent(&Authority::System, id, grow(5), b"k1").unwrap().wait().unwrap();
    assert_eq!((first.seq, first.events, first.version, first.duplicate), (Some(1), 1, 1, false));
    // A retry after the answer: nothing applied, the original's sequence number.
    let again = sys.update_idempotent(&Authority::System, id, grow(5), b"k1").unwrap().wait().unwrap();
    assert_eq!((again.seq, again.events, again.duplicate), (Some(1), 0, true));
    // A retry racing the original (queued behind it, perhaps in the same turn): one applies.
    let racing: Vec<Completion> =
        (0..4).map(|_| sys.update_idempotent(&Authority::System, id, grow(7), b"k2").unwrap()).collect();
    let racing: Vec<_> = racing.into_iter().map(|c| c.wait().unwrap()).collect();
    assert_eq!(racing.iter().filter(|c| !c.duplicate).count(), 1, "{racing:?}");
    assert!(racing.iter().all(|c| c.seq == Some(2)), "{racing:?}");
    // The same key on another worknode is another update.
    let other = sys.create(&Authority::System, &WnPath::root(), "d", "data", Consistency::Local).unwrap();
    let there = sys.update_idempotent(&Authority::System, other, grow(1), b"k1").unwrap().wait().unwrap();
    assert!(!there.duplicate);
    // All or nothing: an operation that does not fit its field refuses the whole update.
    sys.update(&Authority::System, id, vec![("label".into(), Op::Set("x".into()))]).unwrap().wait().unwrap();
    let mixed = vec![("n".to_owned(), Op::Grow(100)), ("label".to_owned(), Op::Grow(1))];
    let refused = sys.update(&Authority::System, id, mixed).unwrap().wait();
    assert!(matches!(&refused, Err(WriteError::Rejected { field, .. }) if field == "label"), "{refused:?}");
    let single = sys.update(&Authority::System, id, vec![("label".into(), Op::Add(1))]).unwrap().wait();
    assert!(matches!(single, Err(WriteError::Rejected { .. })), "{single:?}");
    assert!(matches!(
        sys.update_idempotent(&Authority::System, id, grow(1), b""),
        Err(WriteError::BadKey { len: 0, .. })
    ));
    assert!(matches!(
        sys.update_idempotent(&Authority::System, id, grow(1), &[b'k'; 257]),
        Err(WriteError::BadKey { len: 257, .. })
    ));
    assert_eq!(counter(&sys, id, "n"), 12);
    let version = sys.query(&Authority::System, id, Consistency::Local).unwrap().version;
    assert_eq!(version, 3, "two updates and a set; nothing for duplicates or refusals");
    drop(sys);
    // What was acknowledged is what a restart replays, and a key stays spent across it.
    let sys = system_with_store(&dir, SystemConfig::default());
    assert_eq!(counter(&sys, id, "n"), 12);
    let after = sys.update_idempotent(&Authority::System, id, grow(5), b"k1").unwrap().wait().unwrap();
    assert_eq!((after.seq, after.duplicate, after.version), (Some(1), true, 3));
    assert_eq!(counter(&sys, id, "n"), 12);
}

#[test]
fn a_write_queued_behind_a_stop_reports_the_stop() {
    let dir = tempfile::tempdir().unwrap();
    let sys = system_with_store(&dir, SystemConfig { max_restarts: 0, ..SystemConfig::default() });
    let child = sys.create(&Authority::System, &WnPath::root(), "w", "flaky", Consistency::Local).unwrap();
    let failing = sys.send(&Authority::System, child, Bytes::from_static(b"err")).unwrap();
    let behind = sys.send(&Authority::System, child, Bytes::from_static(b"inc"));
    assert!(matches!(failing.wait(), Err(WriteError::Behaviour { .. })));
    // Queued before the stop: dropped with the mailbox; after it: refused at once.
    match behind {
        Ok(c) => assert_eq!(c.wait(), Err(WriteError::Stopped(child))),
        Err(e) => assert_eq!(e, SendError::Stopped(child)),
    }
}
