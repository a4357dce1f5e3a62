//! A deterministic simulation of eventual replication: three replicas (real `System`s with real
//! event stores) and a seeded in-process network that delays, reorders, duplicates and drops
//! messages, cuts random partitions, and restarts replicas from their stores. Replicas create
//! the same paths on both sides of partitions, and a hostile peer equivocates (gives two
//! replicas one update with different contents). After every run the network heals and the test
//! checks that the replicas converged to the same state, with no acknowledged update lost.
//! A second run puts the replicas in a line, whose ends never talk: what one end makes reaches
//! the other only through the middle, passed on or kept and sent later (store and forward).
//!
//! The messages are the real [`Wire`] values, merged with [`Wire::merge_into`], the code path of
//! `Replicator`; what this leaves out is referee-comm itself (tested on its own).
//! `WN_SIM_SEEDS` (default 24) and `WN_SIM_STEPS` (default 150) size a run; a failure names its
//! seed, and `WN_SIM_SEED=N` replays that one.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use referee_comm::Identity;
use referee_worknode::replication::{Have, Relay, Spans, Wire, replica_of};
use referee_worknode::{Authority, Consistency, EventStore, Op, Shipment, StoreConfig, System, SystemConfig, WnPath};

const N: usize = 3;
const PATHS: [&str; 4] = ["/a", "/a/b", "/c", "/a/b/d"];
const IDLE: Duration = Duration::from_secs(30);

/// splitmix64: small, seedable, good enough to pick actions.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

struct Replica {
    dir: tempfile::TempDir,
    identity: Identity,
    incarnation: u64,
    replica: u64,
    sys: Option<System>,
    /// What it passed on and keeps to pass on (kept in its store, like `Replicator`'s).
    relay: Relay,
    outbox: Arc<Mutex<Vec<Shipment>>>,
}

/// A deterministic identity (the run must replay from its seed): only its signing key is used.
fn identity(seed: u64, n: u64) -> Identity {
    let mut rng = Rng(seed ^ n.wrapping_mul(0xA076_1D64_78BD_642F));
    let mut raw = [0u8; 96];
    for chunk in raw[..32].chunks_mut(8) {
        chunk.copy_from_slice(&rng.next().to_le_bytes());
    }
    Identity::from_text(&format!("referee-comm-identity-v1\n{}\n", hex::encode(raw))).unwrap()
}

impl Replica {
    fn new(dir: tempfile::TempDir, identity: Identity) -> Replica {
        // The incarnation: one per store (these stores live as long as the run).
        let incarnation = identity.id().as_bytes()[0].into();
        let (replica, relay) = (replica_of(&identity.id(), incarnation), Relay::new(identity.id()));
        let mut r = Replica { dir, identity, incarnation, replica, sys: None, relay, outbox: Arc::default() };
        r.start();
        r
    }

    /// Starts (again) from its store, as `Replicator::start` does: loads the kept signed
    /// changes and signs what it made as its state.
    fn start(&mut self) {
        // The old relay holds the store open.
        self.relay = Relay::new(self.identity.id());
        let store = EventStore::open(&self.dir.path().join("worknodes.redb"), StoreConfig::default()).unwrap();
        let cfg = SystemConfig { replica: self.replica, workers: 1, ..SystemConfig::default() };
        let sys = System::start(cfg, Some(Arc::new(store)), None).unwrap();
        let outbox = self.outbox.clone();
        sys.set_replication_sink(move |s| outbox.lock().unwrap().push(s));
        self.relay = Relay::new(self.identity.id()).stored(sys.store().cloned());
        self.relay.load(&sys).unwrap();
        assert!(sys.wait_idle(IDLE));
        self.relay.own_state(&sys, self.incarnation, |d, m| self.identity.sign(d, m));
        self.sys = Some(sys);
    }

    fn sys(&self) -> &System {
        self.sys.as_ref().unwrap()
    }
}

/// What every replica must end up holding: per path, the sum of acknowledged adds and the
/// acknowledged set inserts.
#[derive(Default)]
struct Acked {
    sums: BTreeMap<String, i64>,
    inserts: BTreeMap<String, BTreeSet<String>>,
}

struct Sim {
    rng: Rng,
    seed: u64,
    reps: Vec<Replica>,
    /// Partition group per replica: messages pass only within a group.
    group: [u8; N],
    /// Which replicas ever talk to each other (a line leaves the two ends apart: what one end
    /// makes reaches the other only through the middle, passed on or kept and sent later).
    links: [[bool; N]; N],
    /// In flight: (deliver at, from, to, message).
    net: VecDeque<(u64, usize, usize, Wire)>,
    now: u64,
    acked: Acked,
    /// Forged messages each replica got.
    forged: [u64; N],
    log: Vec<String>,
}

impl Sim {
    fn new(seed: u64, line: bool) -> Sim {
        let base = std::path::Path::new("/dev/shm");
        let reps = (0..N)
            .map(|i| {
                let dir = if base.is_dir() { tempfile::tempdir_in(base) } else { tempfile::tempdir() }.unwrap();
                Replica::new(dir, identity(seed, i as u64))
            })
            .collect();
        Sim {
            rng: Rng(seed),
            seed,
            reps,
            group: [0; N],
            links: std::array::from_fn(|a| std::array::from_fn(|b| !line || a.abs_diff(b) == 1)),
            net: VecDeque::new(),
            now: 0,
            acked: Acked::default(),
            forged: [0; N],
            log: Vec::new(),
        }
    }

    fn connected(&self, a: usize, b: usize) -> bool {
        a != b
            && self.links[a][b]
            && self.group[a] == self.group[b]
            && self.reps[a].sys.is_some()
            && self.reps[b].sys.is_some()
    }

    /// A message on the wire: delayed (so reordered), sometimes duplicated.
    fn post(&mut self, from: usize, to: usize, w: Wire) {
        let at = self.now + self.rng.below(6);
        if self.rng.chance(10) {
            let again = self.now + self.rng.below(12);
            self.net.push_back((again, from, to, w.clone()));
        }
        self.net.push_back((at, from, to, w));
    }

    /// A (re)connection: both sides send their full state and what they have seen of signed
    /// changes, as `Replicator` does.
    fn connect(&mut self, a: usize, b: usize) {
        let (ra, rb) = (&self.reps[a], &self.reps[b]);
        let (wa, wb) = (Wire::sync(ra.sys(), ra.incarnation), Wire::sync(rb.sys(), rb.incarnation));
        let (ha, hb) = (ra.relay.have(), rb.relay.have());
        self.post(a, b, wa);
        self.post(b, a, wb);
        self.post(a, b, Wire::Have { authors: ha, done: true });
        self.post(b, a, Wire::Have { authors: hb, done: true });
    }

    /// Ships every replica's committed local events to the peers it is connected to.
    fn ship(&mut self) {
        for from in 0..N {
            let out: Vec<Shipment> = std::mem::take(&mut *self.reps[from].outbox.lock().unwrap());
            for s in out {
                let deltas = Wire::Deltas { chain: s.chain, events: s.events };
                let (me, relay) = (&self.reps[from].identity, &self.reps[from].relay);
                let w =
                    Wire::from_bytes(&relay.own(self.reps[from].incarnation, &deltas, |d, m| me.sign(d, m))).unwrap();
                for to in 0..N {
                    if self.connected(from, to) {
                        self.post(from, to, w.clone());
                    }
                }
            }
        }
    }

    fn deliver_due(&mut self, all: bool) {
        let (due, later): (VecDeque<_>, VecDeque<_>) =
            std::mem::take(&mut self.net).into_iter().partition(|m| all || m.0 <= self.now);
        self.net = later;
        for (_, from, to, w) in due {
            // A message across a partition, or to or from a replica that is down, is lost with
            // its connection.
            if self.connected(from, to) {
                let (sender, rep) = (self.reps[from].identity.id(), &self.reps[to]);
                // A peer's summary: answered with the kept changes it has not seen.
                if let Wire::Have { authors, .. } = &w {
                    let have = Have {
                        authors: authors.iter().map(|(a, spans)| (*a, Spans::from_spans(spans))).collect(),
                        complete: true,
                    };
                    let kept: Vec<Wire> = rep
                        .relay
                        .missing(&sender, &have)
                        .into_iter()
                        .filter_map(|key| Wire::from_bytes(&rep.relay.kept_message(key)?))
                        .collect();
                    for k in kept {
                        self.post(to, from, k);
                    }
                    continue;
                }
                // As `Replicator` does: a signed message seen for the first time is passed on to
                // every other connected peer but its author.
                if let Some(author) = rep.relay.receive(rep.sys(), &sender, &w.to_bytes()) {
                    for next in 0..N {
                        if next != from && self.reps[next].identity.id() != author && self.connected(to, next) {
                            self.post(to, next, w.clone());
                        }
                    }
                }
            }
        }
        for r in &self.reps {
            if let Some(sys) = &r.sys {
                assert!(sys.wait_idle(IDLE), "seed {}: replica {} never idle", self.seed, r.replica);
            }
        }
    }

    /// Creates what is missing of `path` on replica `r` (Eventual, kind data).
    fn ensure(&mut self, r: usize, path: &WnPath) {
        let sys = self.reps[r].sys();
        let mut cur = WnPath::root();
        for seg in path.segments() {
            let next = cur.child(seg).unwrap();
            if sys.resolve(&next).is_none() {
                sys.create(&Authority::System, &cur, seg, "data", Consistency::Eventual).unwrap();
                self.log.push(format!("t{} r{r} create {next}", self.now));
            }
            cur = next;
        }
    }

    fn update(&mut self, r: usize) {
        let path: WnPath = PATHS[self.rng.below(PATHS.len() as u64) as usize].parse().unwrap();
        self.ensure(r, &path);
        let sys = self.reps[r].sys();
        let id = sys.resolve(&path).unwrap();
        let (field, op, note) = match self.rng.below(3) {
            0 => {
                let n = self.rng.below(21) as i64 - 10;
                ("n", Op::Add(n), format!("add {n}"))
            }
            1 => {
                let e = format!("e{}", self.rng.below(1000));
                ("s", Op::Insert(e.clone()), format!("insert {e}"))
            }
            _ => ("v", Op::Set(format!("v{}", self.rng.below(100))), "set".into()),
        };
        let done = sys.update(&Authority::System, id, vec![(field.into(), op.clone())]).unwrap().wait();
        if done.is_ok() {
            match op {
                Op::Add(n) => *self.acked.sums.entry(path.to_string()).or_default() += n,
                Op::Insert(e) => {
                    self.acked.inserts.entry(path.to_string()).or_default().insert(e);
                }
                _ => {}
            }
        }
        self.log.push(format!("t{} r{r} {path} {note}: {}", self.now, if done.is_ok() { "acked" } else { "refused" }));
    }

    /// A hostile peer (replica 66) forges: a claim that honest replicas' next updates of field
    /// `s` were seen (which, merged, would make their later inserts vanish everywhere),
    /// and, as a change of its own, a count in another replica's name. Neither may take hold.
    fn forge(&mut self) {
        let r = self.pick();
        let path: WnPath = PATHS[self.rng.below(PATHS.len() as u64) as usize].parse().unwrap();
        let Some(chain) = chain_of(self.reps[r].sys(), &path) else { return };
        // Dots past any a replica has made yet (one per step at most): they come later.
        let cloud: Vec<(u64, u64)> =
            self.reps.iter().flat_map(|rep| (self.now + 1..=self.now + 64).map(|n| (rep.replica, n))).collect();
        let claim: referee_worknode::crdt::OrSet<String> =
            serde_json::from_value(serde_json::json!({ "live": {}, "ctx": { "vv": {}, "cloud": cloud } })).unwrap();
        let claim = referee_worknode::Delta { field: "s".into(), delta: referee_worknode::Crdt::Set(claim) };
        let count = referee_worknode::crdt::PnCounter::default().add(self.reps[(r + 1) % N].replica, 1 << 40);
        let count = referee_worknode::Delta { field: "n".into(), delta: referee_worknode::Crdt::PnCounter(count) };
        let forger = identity(self.seed, 66).id();
        let sync = Wire::Sync {
            incarnation: 0,
            nodes: vec![(
                chain.clone(),
                serde_json::from_value(serde_json::json!({ "fields": { "s": claim.delta } })).unwrap(),
            )],
            whole: Vec::new(),
        };
        sync.merge_into(self.reps[r].sys(), &forger);
        let id = uuid_bytes(self.seed ^ 0x66, self.now);
        Wire::Deltas { chain, events: vec![(id, claim), (uuid_bytes(self.seed ^ 0x67, self.now), count)] }
            .merge_into(self.reps[r].sys(), &forger);
        self.forged[r] += 1;
        self.log.push(format!("t{} forge {path} r{r}", self.now));
    }

    /// A hostile peer gives two replicas one update (the same dot, the same event id) with
    /// different contents, signed, as if from outside the simulated network. It goes to field
    /// `e`, which only it writes. Replicas pass its signed changes on when they first see them,
    /// so where both versions meet the larger wins; one cut off at that moment keeps its version
    /// (full states carry only their sender's own updates), so `e` is left out of convergence.
    fn equivocate(&mut self) {
        let (r1, r2) = (self.pick(), self.pick());
        let path: WnPath = PATHS[self.rng.below(PATHS.len() as u64) as usize].parse().unwrap();
        let k = self.rng.below(1000);
        let id = uuid_bytes(self.seed, self.now);
        for (r, v) in [(r1, format!("x{k}")), (r2, format!("y{k}"))] {
            let Some(chain) = chain_of(self.reps[r].sys(), &path) else { continue };
            let liar = identity(self.seed, 77);
            let set = referee_worknode::crdt::OrSet::default().add(replica_of(&liar.id(), 1), v);
            let delta = referee_worknode::Delta { field: "e".into(), delta: referee_worknode::Crdt::Set(set) };
            let deltas = Wire::Deltas { chain, events: vec![(id, delta)] };
            let w = Wire::signed(liar.id(), 1, &deltas, |d, m| liar.sign(d, m));
            // Straight to `r`, which passes it on like any signed change.
            if self.reps[r].relay.receive(self.reps[r].sys(), &liar.id(), &w.to_bytes()).is_some() {
                for next in 0..N {
                    if next != r && self.connected(r, next) {
                        self.post(r, next, w.clone());
                    }
                }
            }
        }
        self.log.push(format!("t{} equivocate {path} r{r1} r{r2}", self.now));
    }

    fn repartition(&mut self) {
        let before = self.group;
        for g in &mut self.group {
            *g = self.rng.below(2) as u8;
        }
        if self.rng.chance(30) {
            self.group = [0; N];
        }
        self.log.push(format!("t{} groups {:?}", self.now, self.group));
        // A cut closes its connections: what was in flight on them is lost.
        let group = self.group;
        self.net.retain(|m| group[m.1] == group[m.2]);
        self.reconnect(before);
    }

    fn reconnect(&mut self, before: [u8; N]) {
        for a in 0..N {
            for b in a + 1..N {
                if self.connected(a, b) && before[a] != before[b] {
                    self.connect(a, b);
                }
            }
        }
    }

    /// Stops replica `r`, like a crash: what was not yet shipped is lost (anti-entropy repairs
    /// it, and the state the replica signs when it starts).
    fn stop(&mut self, r: usize) {
        self.log.push(format!("t{} r{r} stop", self.now));
        self.reps[r].sys = None;
        self.reps[r].relay = Relay::new(self.reps[r].identity.id());
        self.forged[r] = 0;
        self.reps[r].outbox.lock().unwrap().clear();
        self.net.retain(|m| m.1 != r && m.2 != r);
    }

    /// Starts the stopped replica `r` from its store and connects it.
    fn up(&mut self, r: usize) {
        self.log.push(format!("t{} r{r} up", self.now));
        self.reps[r].start();
        for b in 0..N {
            if self.connected(r, b) {
                self.connect(r, b);
            }
        }
    }

    /// A random replica that is running (one at most is stopped).
    fn pick(&mut self) -> usize {
        let up: Vec<usize> = (0..N).filter(|r| self.reps[*r].sys.is_some()).collect();
        up[self.rng.below(up.len() as u64) as usize]
    }

    fn step(&mut self) {
        self.now += 1;
        match self.rng.below(100) {
            0..=54 => {
                let r = self.pick();
                self.update(r);
            }
            55..=64 => self.repartition(),
            // Restarts, and a replica down for a while: kept changes outlive a restart (a
            // middle replica restarted while both ends are away still passes on what one made),
            // and what an author had not shipped when it stopped is signed again, as its state.
            65..=69 => match (0..N).find(|r| self.reps[*r].sys.is_none()) {
                Some(down) => self.up(down),
                None => {
                    let r = self.rng.below(N as u64) as usize;
                    self.stop(r);
                    if self.rng.chance(50) {
                        self.up(r);
                    }
                }
            },
            70..=74 => self.equivocate(),
            75..=77 => self.forge(),
            _ => {}
        }
        self.ship();
        self.deliver_due(false);
    }

    /// Heals everything and lets the network drain until nothing moves.
    fn settle(&mut self) {
        if let Some(down) = (0..N).find(|r| self.reps[*r].sys.is_none()) {
            self.up(down);
        }
        let before = self.group;
        self.group = [0; N];
        self.reconnect(before);
        for _ in 0..2 {
            for a in 0..N {
                for b in a + 1..N {
                    if self.links[a][b] {
                        self.connect(a, b);
                    }
                }
            }
            while !self.net.is_empty() {
                self.now += 1;
                self.ship();
                self.deliver_due(true);
            }
        }
    }

    fn snapshot(&self, r: usize) -> BTreeMap<String, serde_json::Value> {
        let sys = self.reps[r].sys();
        PATHS
            .iter()
            .filter_map(|p| {
                let id = sys.resolve(&p.parse().unwrap())?;
                let view = sys.query(&Authority::System, id, Consistency::Local).unwrap();
                Some(((*p).to_owned(), view.state.to_json()))
            })
            .collect()
    }

    fn check(&self) {
        // Field `e` is the equivocator's alone: each replica holds at most what it was told.
        let snapshot = |r: usize| {
            let mut snap = self.snapshot(r);
            for state in snap.values_mut() {
                if let Some(e) = state.as_object_mut().and_then(|o| o.remove("e")) {
                    let n = e.as_array().map_or(0, Vec::len);
                    assert!(n <= 1, "seed {}: replica {r} took the equivocator's updates from another: {e}", self.seed);
                }
            }
            snap
        };
        let first = snapshot(0);
        let why = || format!("seed {} diverged; history:\n{}", self.seed, self.log.join("\n"));
        for r in 1..N {
            assert_eq!(snapshot(r), first, "replica {r} differs from replica 0: {}", why());
        }
        for (path, sum) in &self.acked.sums {
            assert_eq!(first[path]["n"].as_i64().unwrap_or(0), *sum, "{path}: acknowledged adds lost: {}", why());
        }
        for (path, inserts) in &self.acked.inserts {
            let have: BTreeSet<String> =
                serde_json::from_value(first[path]["s"].clone()).unwrap_or_else(|_| panic!("{path}: {}", why()));
            assert!(inserts.is_subset(&have), "{path}: acknowledged inserts lost: {}", why());
        }
        for (i, r) in self.reps.iter().enumerate() {
            let mut refused = r.sys().refusals();
            // The forger's count in another's name, and only that, is refused `author`.
            assert_eq!(refused.remove("author").unwrap_or(0), self.forged[i], "seed {}: replica {i}", self.seed);
            // Claims on unseen updates: the forger's, and honest peers' that saw an update first.
            refused.remove("unseen");
            refused.remove("equivocation");
            assert_eq!(refused, BTreeMap::new(), "seed {}: honest changes refused", self.seed);
        }
    }
}

/// The chain of `path` on `sys` (what its `Replicator` would ship), if it exists there.
fn chain_of(sys: &System, path: &WnPath) -> Option<Vec<referee_worknode::Meta>> {
    sys.eventual_states().into_iter().map(|(chain, _)| chain).find(|chain| {
        let names: Vec<&str> = chain.iter().map(|m| m.name.as_str()).collect();
        names == path.segments().collect::<Vec<_>>()
    })
}

/// A deterministic event id.
fn uuid_bytes(seed: u64, t: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&seed.to_le_bytes());
    out[8..].copy_from_slice(&t.to_le_bytes());
    out
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
fn honest_replicas_converge_under_partitions_delays_duplicates_and_restarts() {
    run(false);
}

/// The same in a line: the ends never talk, so what one makes reaches the other only through
/// the middle replica, which passes it on when it first sees it, and keeps it to send when the
/// other end reconnects.
#[test]
fn replicas_in_a_line_converge_through_the_middle() {
    run(true);
}

/// Slice 3c: what a replica made and never signed (it stopped between committing and signing)
/// reaches the replicas it is not linked to once it starts again, which signs its state: an
/// add, an insert, and the removal of an element another replica inserted.
#[test]
fn what_an_author_never_signed_reaches_the_far_end_when_it_starts_again() {
    let mut sim = Sim::new(7, true);
    let path: WnPath = "/a".parse().unwrap();
    sim.ensure(2, &path);
    let id2 = sim.reps[2].sys().resolve(&path).unwrap();
    sim.reps[2]
        .sys()
        .update(&Authority::System, id2, vec![("s".into(), Op::Insert("y".into()))])
        .unwrap()
        .wait()
        .unwrap();
    sim.settle();
    let id = sim.reps[0].sys().resolve(&path).unwrap();
    let ops =
        vec![("n".into(), Op::Add(7)), ("s".into(), Op::Insert("x".into())), ("s".into(), Op::Remove("y".into()))];
    sim.reps[0].sys().update(&Authority::System, id, ops).unwrap().wait().unwrap();
    sim.reps[0].sys().wait_idle(IDLE);
    // Committed, never signed: its shipment is lost with the process.
    sim.stop(0);
    sim.up(0);
    sim.settle();
    let want = serde_json::json!({"n": 7, "s": ["x"]});
    for r in 0..N {
        assert_eq!(sim.snapshot(r)["/a"], want, "replica {r}");
    }
}

fn run(line: bool) {
    let steps = env("WN_SIM_STEPS", 150);
    let seeds: Vec<u64> = match std::env::var("WN_SIM_SEED").ok().and_then(|v| v.parse().ok()) {
        Some(one) => vec![one],
        None => (1..=env("WN_SIM_SEEDS", 24)).collect(),
    };
    for seed in seeds {
        let mut sim = Sim::new(seed, line);
        for _ in 0..steps {
            sim.step();
        }
        sim.settle();
        sim.check();
    }
}
