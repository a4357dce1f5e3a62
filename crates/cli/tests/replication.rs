//! Replication under hostile peers (issue 21, slice 2): the real `referee node serve`, fed forged
//! replication messages by an allowed peer (a referee-comm node in this test, speaking the same
//! `Wire` format), and two real replicas that create the same path on both sides of a partition.
//! Each test is one finding of the attack on the release build; each failed before the fix.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, reason = "test helpers")]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use referee_comm::{AllowList, Config, ConnectOptions, Identity, Node};
use referee_worknode::crdt::{GCounter, LwwRegister, OrSet, PnCounter};
use referee_worknode::replication::{Wire, replica_of};
use referee_worknode::{Consistency, Crdt, Delta, Meta, ROOT_ID, WorknodeId};
use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const WAIT: Duration = Duration::from_secs(30);

/// `referee node serve` on a free TCP port (any authenticated peer allowed), driven over stdin.
struct Replica {
    child: Child,
    stdin: ChildStdin,
    out: mpsc::Receiver<String>,
    err: mpsc::Receiver<String>,
    addr: String,
    id: String,
    replica: u64,
    incarnation: u64,
    dir: tempfile::TempDir,
    /// The `serve` arguments after `--dir`.
    args: Vec<String>,
}

fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

impl Replica {
    fn start() -> Result<Replica, Box<dyn std::error::Error>> {
        Self::start_with(&[])
    }

    /// [`Replica::start`] with more `serve` arguments.
    fn start_with(extra: &[&str]) -> Result<Replica, Box<dyn std::error::Error>> {
        Self::spawn(&[&["--allow-any"], extra].concat())
    }

    /// `serve` with these arguments (none allowing peers: add `--allow-any` or `--allow`).
    fn spawn(extra: &[&str]) -> Result<Replica, Box<dyn std::error::Error>> {
        Self::spawn_in(tempfile::tempdir()?, extra.iter().map(|a| (*a).to_owned()).collect())
    }

    /// `serve` on store directory `dir`.
    fn spawn_in(dir: tempfile::TempDir, extra: Vec<String>) -> Result<Replica, Box<dyn std::error::Error>> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_referee"))
            .env_remove("REFEREE_HOME")
            .env_remove("REFEREE_COMM_IDENTITY")
            .args(["--json", "node", "serve", "--listen", "tcp://127.0.0.1:0", "--dir"])
            .arg(dir.path())
            .args(&extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let out = lines(child.stdout.take().ok_or("stdout")?);
        let err = lines(child.stderr.take().ok_or("stderr")?);
        let stdin = child.stdin.take().ok_or("stdin")?;
        let hello: Value = serde_json::from_str(&out.recv_timeout(WAIT)?)?;
        Ok(Replica {
            addr: hello["listening"].as_str().ok_or("listening")?.to_owned(),
            id: hello["id"].as_str().ok_or("id")?.to_owned(),
            replica: hello["replica"].as_u64().ok_or("replica")?,
            incarnation: hello["incarnation"].as_u64().ok_or("incarnation")?,
            child,
            stdin,
            out,
            err,
            dir,
            args: extra,
        })
    }

    /// Kills the process (a crash) and serves its store again, with the same arguments; its
    /// address changes (its peers do not dial it again: it dials them).
    fn restart(mut self) -> Result<Replica, Box<dyn std::error::Error>> {
        let (dir, args) = (std::mem::replace(&mut self.dir, tempfile::tempdir()?), std::mem::take(&mut self.args));
        // Killed and waited for.
        drop(self);
        Self::spawn_in(dir, args)
    }

    fn ask(&mut self, line: &str) -> Result<Value, Box<dyn std::error::Error>> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        Ok(serde_json::from_str(&self.out.recv_timeout(WAIT)?)?)
    }

    fn ok(&mut self, line: &str) -> Result<Value, Box<dyn std::error::Error>> {
        let reply = self.ask(line)?;
        match reply.get("ok") {
            Some(v) => Ok(v.clone()),
            None => Err(format!("{line:?} failed: {reply}").into()),
        }
    }

    /// Refusals so far, per reason.
    fn refused(&mut self) -> Result<Value, Box<dyn std::error::Error>> {
        Ok(self.ok("stats")?["refused"].clone())
    }

    /// Polls until `what` (a `get` or `stats` reply) satisfies `pred`.
    fn wait(&mut self, line: &str, pred: impl Fn(&Value) -> bool) -> Result<Value, Box<dyn std::error::Error>> {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.ask(line)?;
            if pred(&v) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                return Err(format!("timed out on {line:?}: last {v}").into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The audit lines printed on stderr so far.
    fn audit(&self) -> Vec<Value> {
        self.err
            .try_iter()
            .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
            .filter(|v| v["audit"].is_string())
            .collect()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An allowed peer that is not a replica: it connects to `r`, collects what `r` sends it for a
/// moment (the full state of every Eventual worknode, which it asks for on connection) and
/// sends `forged`.
fn hostile(r: &Replica, forged: Vec<Wire>) -> Result<Vec<Wire>, Box<dyn std::error::Error>> {
    hostile_bytes(r, forged.iter().map(Wire::to_bytes).collect())
}

/// The hostile peer's identity: one per test process, so its replica id ([`hr`]) is known.
fn hostile_identity() -> Identity {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let text = TEXT.get_or_init(|| Identity::generate().unwrap().to_text().to_string());
    Identity::from_text(text).unwrap()
}

/// The hostile peer's replica id: what it may write as.
fn hr() -> u64 {
    replica_of(&hostile_identity().id(), 0)
}

/// [`hostile`] with raw payloads.
fn hostile_bytes(r: &Replica, forged: Vec<Vec<u8>>) -> Result<Vec<Wire>, Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async {
        let (node, mut inbox) = Node::new(hostile_identity(), AllowList::allow_any(), Config::default());
        let conn = node.connect_with(&r.addr.parse()?, ConnectOptions::default().expect_peer(r.id.parse()?)).await?;
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, inbox.recv()).await {
            // Asks for the state of every worknode the replica names (anti-entropy).
            if let Some(Wire::Digests { nodes }) = Wire::from_bytes(msg.payload()) {
                let paths = nodes.into_iter().map(|(p, _)| p).collect();
                conn.send(Wire::Want { paths }.to_bytes()).await?;
            }
            seen.extend(Wire::from_bytes(msg.payload()));
        }
        for payload in forged {
            conn.send(payload).await?;
        }
        // Give the replica the messages before the connection closes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(seen)
    })
}

/// An OR-set with exactly these live dots and causal context (what the API never builds: dot 0,
/// other replicas' dots, gaps), through its MessagePack layout.
fn dots(live: &[((u64, u64), &str)], vv: &[(u64, u64)], cloud: &[(u64, u64)]) -> OrSet<String> {
    #[derive(serde::Serialize)]
    struct Ctx {
        vv: std::collections::BTreeMap<u64, u64>,
        cloud: std::collections::BTreeSet<(u64, u64)>,
    }
    #[derive(serde::Serialize)]
    struct Dots {
        live: std::collections::BTreeMap<(u64, u64), String>,
        ctx: Ctx,
    }
    let raw = Dots {
        live: live.iter().map(|(d, v)| (*d, (*v).to_owned())).collect(),
        ctx: Ctx { vv: vv.iter().copied().collect(), cloud: cloud.iter().copied().collect() },
    };
    rmp_serde::from_slice(&rmp_serde::to_vec(&raw).unwrap()).unwrap()
}

fn meta(parent: WorknodeId, name: &str, kind: &str, consistency: Consistency) -> Meta {
    Meta { id: WorknodeId::new(), parent, name: name.to_owned(), kind: kind.to_owned(), consistency }
}

fn delta(field: &str, delta: Crdt) -> Delta {
    Delta { field: field.to_owned(), delta }
}

fn grow(replica: u64, n: u64) -> Crdt {
    Crdt::GCounter(GCounter::default().inc(replica, n))
}

fn deltas(chain: Vec<Meta>, d: Vec<Delta>) -> Wire {
    let events = d.into_iter().map(|d| (WorknodeId::new().to_bytes(), d));
    Wire::Deltas { chain, events: events.collect() }
}

/// The chains of the full state `seen` holds.
fn chains(seen: &[Wire]) -> Vec<Vec<Meta>> {
    seen.iter()
        .filter_map(|w| match w {
            Wire::Sync { nodes, .. } => Some(nodes.iter().map(|(c, _)| c.clone()).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// Finding 8: a peer wrote into a Local worknode, created Strong ones, chains deeper than the
/// limit, kind `root`, and names such as `../etc`, `a/b` and `""`.
#[test]
fn remote_changes_obey_the_local_rules() -> TestResult {
    let mut r = Replica::start()?;
    r.ok("create /loc data local")?;
    r.ok("create /loc/ev data eventual")?;
    r.ok("send /loc add n 1")?;
    // The peer learns the Local parent's id from the chain of its Eventual child.
    let seen = hostile(&r, vec![])?;
    let chain = chains(&seen).into_iter().find(|c| c.len() == 2).ok_or("no chain of /loc/ev")?;
    let local = chain[0].clone();
    assert_eq!(local.consistency, Consistency::Local);

    let d = || vec![delta("n", Crdt::PnCounter(PnCounter::default().add(hr(), 1000)))];
    let mut forged = vec![
        // Into the Local worknode, by its id and by its path under a fresh id.
        deltas(vec![local.clone()], d()),
        deltas(vec![meta(ROOT_ID, "loc", "data", Consistency::Local)], d()),
        deltas(vec![meta(ROOT_ID, "strong", "data", Consistency::Strong)], d()),
        deltas(vec![meta(ROOT_ID, "kroot", "root", Consistency::Eventual)], d()),
        deltas(vec![meta(ROOT_ID, "unknown", "no-such-kind", Consistency::Eventual)], d()),
        // Found re-attacking: a refused Local target was still created, and so were the
        // ancestors of a target refused for its kind.
        deltas(vec![meta(ROOT_ID, "futl", "data", Consistency::Local)], d()),
        {
            let pa = meta(ROOT_ID, "pa1", "data", Consistency::Eventual);
            let bad = meta(pa.id, "bad", "zzz", Consistency::Eventual);
            deltas(vec![pa, bad], d())
        },
        // Same path as the Eventual /loc/ev but another kind (a concurrent create that cannot merge).
        deltas(vec![local.clone(), meta(local.id, "ev", "root2", Consistency::Eventual)], d()),
    ];
    for name in ["../etc", "a/b", "", ".", "x".repeat(65).as_str()] {
        forged.push(deltas(vec![meta(ROOT_ID, name, "data", Consistency::Eventual)], d()));
    }
    // A chain whose links do not join, and one deeper than max_depth (32).
    forged.push(deltas(
        vec![
            meta(ROOT_ID, "a", "data", Consistency::Eventual),
            meta(WorknodeId::new(), "b", "data", Consistency::Eventual),
        ],
        d(),
    ));
    let mut deep = Vec::new();
    let mut parent = ROOT_ID;
    for i in 0..40 {
        let m = meta(parent, &format!("d{i}"), "data", Consistency::Eventual);
        parent = m.id;
        deep.push(m);
    }
    forged.push(deltas(deep, d()));
    let mut bytes: Vec<Vec<u8>> = forged.iter().map(Wire::to_bytes).collect();
    // Found re-attacking: what is not a replication message was dropped without a trace.
    bytes.push(b"not messagepack".to_vec());
    let n = bytes.len() as u64;
    hostile_bytes(&r, bytes)?;

    let stats = r.wait("stats", |v| {
        v["ok"]["refused"].as_object().is_some_and(|m| m.values().filter_map(Value::as_u64).sum::<u64>() >= n)
    })?;
    let refused = &stats["ok"]["refused"];
    assert_eq!(refused["consistency"], 4, "{refused}");
    assert_eq!(refused["kind"], 3, "{refused}");
    assert_eq!(refused["malformed"], 1, "{refused}");
    assert_eq!(refused["conflict"], 1, "{refused}");
    assert_eq!(refused["name"], 5, "{refused}");
    assert_eq!(refused["chain"], 2, "{refused}");
    // Nothing was created or written: / still has one child, /loc its one child and its count.
    assert_eq!(r.ok("get /")?["children"], 1);
    let loc = r.ok("get /loc")?;
    assert_eq!((loc["children"].clone(), loc["state"]["n"].clone()), (1.into(), 1.into()), "{loc}");
    assert_eq!(r.ok("get /loc/ev")?["kind"], "data");
    let audit = r.audit();
    assert!(audit.iter().any(|a| a["code"] == "name" && a["audit"] == "replication_refused"), "{audit:?}");
    Ok(())
}

/// Finding 8: no-op updates bloated the database (1M updates → 272 MB).
#[test]
fn a_no_op_update_is_not_stored() -> TestResult {
    let mut r = Replica::start()?;
    r.ok("create /ev data eventual")?;
    let v = r.ok("send /ev grow g 5")?["version"].as_u64().ok_or("version")?;
    // Local no-ops: nothing to store.
    let noop = r.ok("send /ev grow g 0")?;
    assert_eq!((noop["version"].as_u64(), noop["seq"].clone()), (Some(v), Value::Null), "{noop}");
    let noop = r.ok("send /ev remove s absent")?;
    assert_eq!(noop["version"].as_u64(), Some(v), "{noop}");
    // Remote: one change, then 2,000 repeats of it under fresh event ids.
    let seen = hostile(&r, vec![])?;
    let chain = chains(&seen).into_iter().next().ok_or("no chain")?;
    let mut forged = vec![deltas(chain.clone(), vec![delta("h", grow(hr(), 3))])];
    for _ in 0..2000 {
        forged.push(deltas(chain.clone(), vec![delta("h", grow(hr(), 3)), delta("g", grow(hr(), 0))]));
    }
    // A last, real change marks the end (one connection's messages are merged in order).
    forged.push(deltas(chain, vec![delta("end", grow(hr(), 1))]));
    hostile(&r, forged)?;
    r.wait("get /ev", |g| g["ok"]["state"]["end"] == 1)?;
    r.ok("idle")?;
    let got = r.ok("get /ev")?;
    assert_eq!(got["state"]["h"], 3, "{got}");
    assert_eq!(got["version"].as_u64(), Some(v + 2), "only the two real remote changes are stored: {got}");
    Ok(())
}

/// Finding 8: a 2.7 MB replicated update made each later local insert take 100 ms. A change is
/// held to the size a local one may have (`max_delta_bytes`, 2 MiB).
#[test]
fn a_replicated_change_above_the_size_limit_is_refused() -> TestResult {
    let mut r = Replica::start()?;
    r.ok("create /ev data eventual")?;
    let seen = hostile(&r, vec![])?;
    let chain = chains(&seen).into_iter().next().ok_or("no chain")?;
    let big = "x".repeat(3 << 20);
    let set = OrSet::default().add(hr(), big.clone());
    let reg = LwwRegister::default().set(hr(), 1, big);
    let forged = vec![deltas(
        chain,
        vec![delta("s", Crdt::Set(set)), delta("t", Crdt::Lww(reg)), delta("small", grow(hr(), 1))],
    )];
    hostile(&r, forged)?;
    r.wait("stats", |v| v["ok"]["refused"]["quota"] == 2)?;
    let state = r.wait("get /ev", |g| g["ok"]["state"]["small"] == 1)?["ok"]["state"].clone();
    assert_eq!((state["s"].clone(), state["t"].clone()), (Value::Null, Value::Null), "{state}");
    r.ok("send /ev insert s local")?;
    Ok(())
}

/// Finding 5 (counters): a forged count froze a counter; with merges range-checked, it split two
/// honest replicas (found re-attacking: one refused the other's increments for good). A merge is
/// never refused for its values now, so replicas agree; a counter pushed past its range reads as
/// its limit, and a PN counter whose sides are huge still takes changes that keep it in range.
#[test]
fn forged_counters_neither_split_replicas_nor_lock_a_pn_counter() -> TestResult {
    let (mut a, mut b) = (Replica::start()?, Replica::start()?);
    a.ok(&format!("peer {} {}", b.addr, b.id))?;
    a.ok("create /k data eventual")?;
    a.ok("send /k grow g 5")?;
    b.wait("get /k", |g| g["ok"]["state"]["g"] == 5)?;
    let seen = hostile(&a, vec![])?;
    let chain = chains(&seen).into_iter().next().ok_or("no chain")?;
    let mut q = PnCounter::default();
    for n in [i64::MAX, i64::MAX, -i64::MAX, -i64::MAX] {
        q.add(hr(), n);
    }
    // An allowed peer's own counts, however large: it tells both replicas (no replica relays
    // another's updates), with the same event ids.
    let forged = deltas(chain, vec![delta("g", grow(hr(), u64::MAX - 5)), delta("q", Crdt::PnCounter(q))]);
    b.ok("send /k grow g 3")?;
    hostile(&a, vec![forged.clone()])?;
    hostile(&b, vec![forged])?;
    a.wait("get /k", |g| g["ok"]["state"]["g"] == u64::MAX)?;
    a.ok("send /k add q 20")?;
    a.ok("send /k add q -15")?;
    // A full G-counter refuses a local increment rather than clamping it.
    assert!(a.ask("send /k grow g 1")?["error"].as_str().is_some_and(|e| e.contains("overflow")));
    // Reconnect, so each side sends the other its full state.
    a.ok("isolate")?;
    a.ok("heal")?;
    let want = serde_json::json!({"g": u64::MAX, "q": 5});
    for r in [&mut a, &mut b] {
        r.wait("get /k", |g| g["ok"]["state"] == want)?;
    }
    assert_eq!(a.refused()?, serde_json::json!({}));
    Ok(())
}

/// Found re-attacking slice 2: a peer planted replica B's id for `/q` at `/poison` on replica A,
/// and A then refused every change B made to `/q`: the replicas diverged for good. Chains are
/// resolved by path, so a planted id changes nothing.
#[test]
fn a_planted_id_does_not_split_replicas() -> TestResult {
    let (mut a, mut b) = (Replica::start()?, Replica::start()?);
    a.ok("create /q data eventual")?;
    b.ok("create /q data eventual")?;
    let seen = hostile(&b, vec![])?;
    let qb = chains(&seen).into_iter().find(|c| c[0].name == "q").ok_or("no /q")?[0].clone();
    let planted = Meta { name: "poison".into(), ..qb };
    hostile(&a, vec![deltas(vec![planted], vec![delta("p", grow(hr(), 1))])])?;
    a.wait("get /poison", |g| g["ok"]["state"]["p"] == 1)?;
    a.ok(&format!("peer {} {}", b.addr, b.id))?;
    b.ok("send /q grow c 10")?;
    a.ok("send /q grow c 100")?;
    for r in [&mut a, &mut b] {
        r.wait("get /q", |g| g["ok"]["state"]["c"] == 110)?;
    }
    assert_eq!(a.refused()?, serde_json::json!({}));
    assert_eq!(b.refused()?, serde_json::json!({}));
    Ok(())
}

/// Finding 5 (markers): forged "already seen" markers for the replicas' ids (`u64::MAX` of
/// each, in a change and in a full state) made every later insert by the honest replicas vanish,
/// on every replica. A peer's claim to have seen other replicas' updates is taken only for
/// updates seen here, so later inserts survive everywhere. (Found re-attacking slice 2: markers
/// for the replica's own id made its later inserts answer `ok` and store nothing.)
#[test]
fn forged_seen_markers_do_not_swallow_later_inserts() -> TestResult {
    let (mut a, mut b) = (Replica::start()?, Replica::start()?);
    assert_eq!(a.replica, replica_of(&a.id.parse()?, a.incarnation), "the replica id is bound to the identity");
    a.ok(&format!("peer {} {}", b.addr, b.id))?;
    a.ok("create /ev data eventual")?;
    b.wait("get /ev", |g| g["ok"]["version"] == 0)?;
    let seen = hostile(&a, vec![])?;
    let chain = chains(&seen).into_iter().next().ok_or("no chain")?;
    let ctx =
        serde_json::json!({ "vv": { a.replica.to_string(): u64::MAX, b.replica.to_string(): u64::MAX }, "cloud": [] });
    let markers: OrSet<String> = serde_json::from_value(serde_json::json!({ "live": {}, "ctx": ctx }))?;
    let mut state = referee_worknode::State::default();
    state.apply(&delta("s", Crdt::Set(markers.clone())))?;
    let forged = vec![
        deltas(chain.clone(), vec![delta("s", Crdt::Set(markers))]),
        Wire::Sync { incarnation: 0, nodes: vec![(chain, state)], whole: vec![] },
    ];
    hostile(&a, forged.clone())?;
    hostile(&b, forged)?;
    for r in [&mut a, &mut b] {
        r.wait("stats", |v| v["ok"]["refused"]["unseen"] == 2)?;
    }
    a.ok("send /ev insert s from-a")?;
    b.ok("send /ev insert s from-b")?;
    let both = serde_json::json!(["from-a", "from-b"]);
    for r in [&mut a, &mut b] {
        r.wait("get /ev", |g| g["ok"]["state"]["s"] == both)?;
    }
    assert!(a.audit().iter().any(|l| l["code"] == "unseen"));
    Ok(())
}

/// Finding 5 (authorship): a peer could write in other replicas' names (a count, a write, a set
/// entry), so a forged update looked like an honest replica's everywhere. A peer's own change
/// holding another replica's update is refused `author`; of its full state, what others made is
/// left out. And no peer may speak as the replica itself.
#[test]
fn a_peer_speaks_only_for_itself() -> TestResult {
    let mut r = Replica::start()?;
    r.ok("create /ev data eventual")?;
    r.ok("send /ev grow g 1")?;
    let seen = hostile(&r, vec![])?;
    let chain = chains(&seen).into_iter().next().ok_or("no chain")?;
    let me = r.replica;
    let other = hr().wrapping_add(1);
    let mut state = referee_worknode::State::default();
    state.apply(&delta("g", grow(other, 1000)))?;
    state.apply(&delta("own", grow(hr(), 7)))?;
    let forged = vec![
        deltas(chain.clone(), vec![delta("g", grow(me, 1000))]),
        deltas(chain.clone(), vec![delta("g", grow(other, 1000))]),
        deltas(chain.clone(), vec![delta("t", Crdt::Lww(LwwRegister::default().set(other, 1, "forged".into())))]),
        deltas(chain.clone(), vec![delta("s", Crdt::Set(OrSet::default().add(other, "forged".to_owned())))]),
        // One change of its own and one in another's name, in one message: only the latter goes.
        deltas(chain.clone(), vec![delta("mine", grow(hr(), 2)), delta("g", grow(other, 5))]),
        Wire::Sync { incarnation: 0, nodes: vec![(chain, state)], whole: vec![] },
    ];
    hostile(&r, forged)?;
    let got = r.wait("get /ev", |g| g["ok"]["state"]["own"] == 7)?;
    assert_eq!(got["ok"]["state"], serde_json::json!({"g": 1, "mine": 2, "own": 7}), "{got}");
    assert_eq!(r.refused()?, serde_json::json!({"author": 5}));
    Ok(())
}

/// A store keeps the replica id it was first served with, derived from the identity in it (or
/// given with `--identity`): served under another identity its changes would be refused by
/// every peer, so `serve` refuses to start.
#[test]
fn a_store_is_served_only_under_its_own_identity() -> TestResult {
    let dir = tempfile::tempdir()?;
    let serve = |extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_referee"));
        cmd.env_remove("REFEREE_HOME").env_remove("REFEREE_COMM_IDENTITY");
        cmd.args(["--json", "node", "serve", "--listen", "tcp://127.0.0.1:0", "--dir"]).arg(dir.path()).args(extra);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    };
    let hello = |cmd: &mut Command| -> Result<Value, Box<dyn std::error::Error>> {
        let mut child = cmd.spawn()?;
        let out = lines(child.stdout.take().ok_or("stdout")?);
        let line = out.recv_timeout(WAIT)?;
        let _ = child.kill();
        let _ = child.wait();
        Ok(serde_json::from_str(&line)?)
    };
    let first = hello(&mut serve(&[]))?;
    let again = hello(&mut serve(&[]))?;
    assert_eq!((first["id"].clone(), first["replica"].clone()), (again["id"].clone(), again["replica"].clone()));
    let other = dir.path().join("other-identity");
    Identity::generate()?.save_new(&other)?;
    let out = serve(&["--identity", other.to_str().ok_or("path")?]).output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("belongs to replica"), "{err}");
    Ok(())
}

/// Finding 6: during a partition both sides ran `create /dup data eventual`; after the heal each
/// side refused the other's worknode for good and the counters stayed at 11 and 22.
#[test]
fn the_same_path_created_on_both_sides_of_a_partition_merges() -> TestResult {
    let (mut a, mut b) = (Replica::start()?, Replica::start()?);
    let (b_addr, b_id) = (b.addr.clone(), b.id.clone());
    a.ok(&format!("peer {b_addr} {b_id}"))?;
    a.ok("isolate")?;
    b.ok("isolate")?;
    a.ok("create /dup data eventual")?;
    a.ok("create /dup/x data eventual")?;
    b.ok("create /dup data eventual")?;
    a.ok("send /dup add n 11")?;
    b.ok("send /dup add n 22")?;
    a.ok("send /dup/x insert s from-a")?;
    a.ok("heal")?;
    b.ok("heal")?;
    for r in [&mut a, &mut b] {
        r.wait("get /dup", |g| g["ok"]["state"]["n"] == 33)?;
        r.wait("get /dup/x", |g| g["ok"]["state"]["s"] == serde_json::json!(["from-a"]))?;
    }
    // Both keep merging after the heal, whichever id they know the worknode by.
    b.ok("send /dup add n 100")?;
    a.wait("get /dup", |g| g["ok"]["state"]["n"] == 133)?;
    assert_eq!(a.refused()?, serde_json::json!({}));
    assert_eq!(b.refused()?, serde_json::json!({}));
    Ok(())
}

/// Finding 4 (replication): a peer that stopped reading froze delivery to every other peer (the
/// replica waited on each peer in turn). Each peer has its own queue and sender now.
#[test]
fn a_peer_that_does_not_read_delays_no_other_peer() -> TestResult {
    let (mut a, mut b) = (Replica::start()?, Replica::start()?);
    a.ok("create /ev data eventual")?;
    // An allowed peer (the independent Python implementation) that connects and never reads.
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../comm/tests/interop/hostile.py");
    let mut silent = Command::new("python3")
        .arg(script)
        .args(["slow-reader", a.addr.trim_start_matches("tcp://"), &a.id, "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let held = lines(silent.stdout.take().ok_or("stdout")?);
    while !held.recv_timeout(WAIT)?.contains("holding") {}
    a.ok(&format!("peer {} {}", b.addr, b.id))?;
    b.wait("get /ev", |g| g["ok"]["version"] == 0)?;
    // 60 MB of changes: more than the silent peer's socket buffers and its outgoing budget
    // (40 MiB) hold.
    let (n, value) = (1000, "v".repeat(60_000));
    for i in 0..n {
        writeln!(a.stdin, "send /ev set big {i}{value}")?;
    }
    a.stdin.flush()?;
    for _ in 0..n {
        let reply: Value = serde_json::from_str(&a.out.recv_timeout(WAIT)?)?;
        assert!(reply.get("ok").is_some(), "{reply}");
    }
    let sent = Instant::now();
    b.wait("get /ev", |g| g["ok"]["state"]["big"].as_str().is_some_and(|v| v.starts_with(&format!("{}v", n - 1))))?;
    let took = sent.elapsed();
    // Before, B waited for the silent peer's write timeout (30 s) at least once.
    assert!(took < Duration::from_secs(15), "B got the last change {took:?} after it was acknowledged");
    // The replica still answers promptly, isolation included.
    let start = Instant::now();
    a.ok("isolate")?;
    assert!(start.elapsed() < Duration::from_secs(5), "isolate took {:?}", start.elapsed());
    let _ = silent.kill();
    let _ = silent.wait();
    Ok(())
}

/// Finding 6: a peer that gave one update different contents on two replicas left them different
/// for good (the same dot with two values: each kept its own). Its changes are signed now, and a
/// replica passes signed changes on to its other peers, so the versions meet: the larger wins on
/// both, and the meeting is audited. An event id already stored with other contents is refused
/// (the store would keep one, the state the other). Unsigned, the peer's changes are its own word
/// to each replica and are not passed on, so each keeps what it was told.
#[test]
fn equivocation_is_audited_and_resolved_the_same_way_everywhere() -> TestResult {
    let (mut a, mut b) = (Replica::start()?, Replica::start()?);
    a.ok(&format!("peer {} {}", b.addr, b.id))?;
    a.ok("create /ev data eventual")?;
    b.wait("get /ev", |g| g["ok"]["version"] == 0)?;
    let seen = hostile(&a, vec![])?;
    let chain = chains(&seen).into_iter().next().ok_or("no chain")?;
    let me = hostile_identity();
    let one = |field: &str, v: &str, id: [u8; 16], signed: bool| {
        let set = OrSet::default().add(hr(), v.to_owned());
        let deltas = Wire::Deltas { chain: chain.clone(), events: vec![(id, delta(field, Crdt::Set(set)))] };
        if signed { Wire::signed(me.id(), 0, &deltas, |d, m| me.sign(d, m)) } else { deltas }
    };
    let (signed_id, plain_id) = (WorknodeId::new().to_bytes(), WorknodeId::new().to_bytes());
    hostile(&a, vec![one("s", "a", signed_id, true), one("u", "a", plain_id, false)])?;
    hostile(&b, vec![one("s", "b", signed_id, true), one("u", "b", plain_id, false)])?;
    for r in [&mut a, &mut b] {
        r.wait("get /ev", |g| g["ok"]["state"]["s"] == serde_json::json!(["b"]))?;
        r.wait("stats", |v| v["ok"]["refused"]["equivocation"].as_u64() >= Some(1))?;
    }
    assert!(a.audit().iter().any(|l| l["code"] == "equivocation"));
    // The unsigned version: each keeps its own, also after a reconnection (full states carry
    // only their sender's own updates).
    a.ok("isolate")?;
    a.ok("heal")?;
    a.ok("send /ev insert s by-a")?;
    b.wait("get /ev", |g| g["ok"]["state"]["s"] == serde_json::json!(["b", "by-a"]))?;
    assert_eq!(a.ok("get /ev")?["state"]["u"], serde_json::json!(["a"]));
    assert_eq!(b.ok("get /ev")?["state"]["u"], serde_json::json!(["b"]));
    Ok(())
}

/// Signed changes travel: with A linked to B and C linked to B only, what A writes reaches C and
/// what C writes reaches A (before, only with B's next full state, and unverified).
#[test]
fn signed_changes_reach_replicas_their_author_is_not_linked_to() -> TestResult {
    let (mut a, mut b, mut c) = (Replica::start()?, Replica::start()?, Replica::start()?);
    a.ok(&format!("peer {} {}", b.addr, b.id))?;
    c.ok(&format!("peer {} {}", b.addr, b.id))?;
    b.ok("create /ev data eventual")?;
    b.ok("send /ev add n 1")?;
    for r in [&mut a, &mut c] {
        r.wait("get /ev", |g| g["ok"]["state"]["n"] == 1)?;
    }
    a.ok("send /ev insert s from-a")?;
    c.ok("send /ev insert s from-c")?;
    a.ok("send /ev add n 2")?;
    c.ok("send /ev add n 3")?;
    let want = serde_json::json!({"n": 6, "s": ["from-a", "from-c"]});
    for r in [&mut a, &mut b, &mut c] {
        r.wait("get /ev", |g| g["ok"]["state"] == want)?;
    }
    for r in [&mut a, &mut b, &mut c] {
        assert_eq!(r.refused()?, serde_json::json!({}));
    }
    Ok(())
}

/// Two replicas, B dialling A, and `/ev` (Eventual) made on A and seen on B.
fn pair() -> Result<(Replica, Replica), Box<dyn std::error::Error>> {
    let (mut a, mut b) = (Replica::start()?, Replica::start()?);
    b.ok(&format!("peer {} {}", a.addr, a.id))?;
    a.ok("create /ev data eventual")?;
    b.wait("get /ev", |g| g.get("ok").is_some())?;
    Ok((a, b))
}

/// Three replicas in a line, a—b—c (a and c dial b; a and c never talk), and `/ev` (Eventual,
/// created on b) on all three.
fn line() -> Result<(Replica, Replica, Replica), Box<dyn std::error::Error>> {
    let (mut a, mut b, mut c) = (Replica::start()?, Replica::start()?, Replica::start()?);
    a.ok(&format!("peer {} {}", b.addr, b.id))?;
    c.ok(&format!("peer {} {}", b.addr, b.id))?;
    b.ok("create /ev data eventual")?;
    for r in [&mut a, &mut c] {
        r.wait("get /ev", |g| g.get("ok").is_some())?;
    }
    Ok((a, b, c))
}

/// Store and forward (slice 3b): a change made while the far end of a line was cut off reaches
/// it through the middle replica, which kept the signed change and sends it when the far end
/// reconnects. Before, the middle's full state carried only its own updates, and the far end
/// never got the change (its author never talks to it).
#[test]
fn a_change_made_while_the_far_end_was_cut_off_reaches_it_through_the_middle() -> TestResult {
    let (mut a, mut b, mut c) = line()?;
    c.ok("isolate")?;
    a.ok("send /ev add n 5")?;
    a.ok("send /ev insert s from-a")?;
    b.wait("get /ev", |g| g["ok"]["state"]["n"] == 5)?;
    // A's changes reach the middle only: a new worknode of A's too.
    a.ok("create /new data eventual")?;
    a.ok("send /new add n 1")?;
    b.wait("get /new", |g| g["ok"]["state"]["n"] == 1)?;
    c.ok("heal")?;
    let want = serde_json::json!({"n": 5, "s": ["from-a"]});
    c.wait("get /ev", |g| g["ok"]["state"] == want)?;
    c.wait("get /new", |g| g["ok"]["state"]["n"] == 1)?;
    let kept = sync(&mut b)?;
    assert!(kept["kept_sent"].as_u64().unwrap() >= 3, "{kept}");
    assert!(kept["kept"]["messages"].as_u64().unwrap() >= 3, "{kept}");
    for r in [&mut a, &mut b, &mut c] {
        assert_eq!(r.refused()?, serde_json::json!({}));
    }
    Ok(())
}

/// Slice 3c: kept changes outlive a restart. In a line A—B—C, C is cut off while A writes; A
/// then leaves for good and B crashes. Restarted from its store, B still passes A's changes on
/// when C comes back (before, what B kept lived in memory, and its state carries only its own
/// updates).
#[test]
fn kept_changes_outlive_a_restart_of_the_middle() -> TestResult {
    let (mut a, mut b, mut c) = (Replica::start()?, Replica::start()?, Replica::start()?);
    let c_peer = format!("peer {} {}", c.addr, c.id);
    b.ok(&format!("peer {} {}", a.addr, a.id))?;
    b.ok(&c_peer)?;
    b.ok("create /ev data eventual")?;
    for r in [&mut a, &mut c] {
        r.wait("get /ev", |g| g.get("ok").is_some())?;
    }
    c.ok("isolate")?;
    a.ok("send /ev add n 5")?;
    a.ok("send /ev insert s from-a")?;
    b.wait("get /ev", |g| g["ok"]["state"]["n"] == 5 && g["ok"]["state"]["s"] == serde_json::json!(["from-a"]))?;
    // What B kept is queued for the store before what it merged: once that is stored, so is it.
    b.ok("idle")?;
    drop(a);
    let mut b = b.restart()?;
    let s = sync(&mut b)?;
    assert!(s["kept"]["messages"].as_u64() >= Some(2), "{s}");
    b.ok(&c_peer)?;
    c.ok("heal")?;
    c.wait("get /ev", |g| g["ok"]["state"] == serde_json::json!({"n": 5, "s": ["from-a"]}))?;
    for r in [&mut b, &mut c] {
        assert_eq!(r.refused()?, serde_json::json!({}));
    }
    Ok(())
}

/// Store and forward, found attacking it: a change its author made while cut off was never
/// signed (shipments were dropped while isolated), so it reached the author's peers by their
/// full state only, and the far end of a line never.
#[test]
fn a_change_made_while_its_author_was_cut_off_reaches_the_far_end() -> TestResult {
    let (mut a, mut b, mut c) = line()?;
    c.ok("isolate")?;
    c.ok("send /ev insert s from-c")?;
    c.ok("heal")?;
    for r in [&mut b, &mut a] {
        r.wait("get /ev", |g| g["ok"]["state"]["s"] == serde_json::json!(["from-c"]))?;
    }
    Ok(())
}

/// Store and forward, found attacking it: an allowed peer signed changes with 4,096 keys it
/// minted, and the replica, keeping them all, dropped an honest author's kept changes, which the
/// far end of a line then never got. Changes of identities the allow list does not name
/// (strangers) now share one small part of what is kept. They are still merged and passed on:
/// found re-attacking, refusing them cut off the far end of a line whose replicas allow only
/// their neighbours.
#[test]
fn keys_a_peer_mints_push_out_no_members_kept_changes() -> TestResult {
    let keys = tempfile::tempdir()?;
    let mut ids = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let key = Identity::generate()?;
        key.save_new(&keys.path().join(name))?;
        ids.push(key.id().to_string());
    }
    let key = |n: &str| keys.path().join(n).display().to_string();
    let me = hostile_identity();
    let me_id = me.id().to_string();
    // A line a—b—c—d whose replicas allow only their neighbours (and c the hostile peer): at c,
    // a is a stranger that b brings; at d, a and b are.
    let mut a = Replica::spawn(&["--identity", &key("a"), "--allow", &ids[1]])?;
    let mut b = Replica::spawn(&["--identity", &key("b"), "--allow", &ids[0], "--allow", &ids[2]])?;
    let mut c = Replica::spawn(&["--identity", &key("c"), "--allow", &ids[1], "--allow", &ids[3], "--allow", &me_id])?;
    let mut d = Replica::spawn(&["--identity", &key("d"), "--allow", &ids[2]])?;
    a.ok(&format!("peer {} {}", b.addr, b.id))?;
    b.ok(&format!("peer {} {}", c.addr, c.id))?;
    d.ok(&format!("peer {} {}", c.addr, c.id))?;
    b.ok("create /ev data eventual")?;
    for r in [&mut a, &mut c, &mut d] {
        r.wait("get /ev", |g| g.get("ok").is_some())?;
    }
    d.ok("isolate")?;
    for i in 0..20 {
        a.ok(&format!("send /ev insert s a{i}"))?;
    }
    c.wait("get /ev", |g| g["ok"]["state"]["s"].as_array().map(Vec::len) == Some(20))?;
    let chain = chains(&hostile(&c, vec![])?).into_iter().next().ok_or("no chain")?;
    let minted: Vec<Wire> = (0..4200)
        .map(|_| {
            let key = Identity::generate().unwrap();
            Wire::signed(key.id(), 0, &deltas(chain.clone(), vec![]), |d, m| key.sign(d, m))
        })
        .collect();
    let own = Wire::signed(me.id(), 0, &deltas(chain, vec![delta("h", grow(hr(), 4))]), |d, m| me.sign(d, m));
    hostile(&c, [minted, vec![own]].concat())?;
    c.wait("get /ev", |g| g["ok"]["state"]["h"] == 4)?;
    let kept =
        c.wait("stats", |v| v["ok"]["sync"]["kept"]["authors"].as_u64() >= Some(200))?["ok"]["sync"]["kept"].clone();
    // b, c, d, the peer; a (which b brought); 256 strangers the peer brought at most.
    assert!(kept["authors"].as_u64().unwrap() <= 5 + 256, "{kept}");
    d.ok("heal")?;
    d.wait("get /ev", |g| g["ok"]["state"]["s"].as_array().map(Vec::len) == Some(20) && g["ok"]["state"]["h"] == 4)?;
    for r in [&mut a, &mut b, &mut c, &mut d] {
        // A claim on an update not seen yet (`unseen`) is the race between two links the docs
        // describe (a state that came before the change it has seen); nothing else is refused.
        let mut refused = r.refused()?;
        refused.as_object_mut().ok_or("refused")?.remove("unseen");
        assert_eq!(refused, serde_json::json!({}));
    }
    Ok(())
}

/// Store and forward: a peer's summary is answered once per connection. A peer repeating a
/// summary of nothing (a few bytes) would otherwise be sent every kept change again each time.
#[test]
fn a_summary_is_answered_once_per_connection() -> TestResult {
    let mut a = Replica::start()?;
    a.ok("create /ev data eventual")?;
    for i in 0..20 {
        a.ok(&format!("send /ev add n {}", i + 1))?;
    }
    // Own changes are signed and kept by the replicator after the write is answered.
    let kept = a.wait("stats", |v| v["ok"]["sync"]["kept"]["messages"].as_u64() >= Some(21))?["ok"]["sync"]["kept"]
        ["messages"]
        .as_u64()
        .unwrap();
    let nothing = Wire::Have { authors: vec![], done: true };
    hostile(&a, vec![nothing; 5])?;
    let stats = a.wait("stats", |v| v["ok"]["sync"]["haves_ignored"] == 4)?;
    assert_eq!(stats["ok"]["sync"]["kept_sent"], kept, "{stats}");
    Ok(())
}

/// Found attacking slice 3c: bytes after a message were ignored, so a signed change with
/// megabytes after it was merged, and passed on whole to every other peer, past the 4 MiB a
/// relay carries. A message is its encoding and nothing after it.
#[test]
fn bytes_after_a_message_make_it_malformed() -> TestResult {
    let (mut a, mut b) = pair()?;
    let chain = chains(&hostile(&a, vec![])?).into_iter().next().ok_or("no chain")?;
    let me = hostile_identity();
    let signed = |n: u64| {
        let change = deltas(chain.clone(), vec![delta("g", grow(replica_of(&me.id(), 0), n))]);
        Wire::signed(me.id(), 0, &change, |d, m| me.sign(d, m)).to_bytes()
    };
    let padded = [signed(1), vec![0xc0; 8 << 20]].concat();
    let plain = [Wire::Want { paths: vec![] }.to_bytes(), vec![0]].concat();
    hostile_bytes(&a, vec![padded, plain, signed(2)])?;
    b.wait("get /ev", |g| g["ok"]["state"]["g"] == 2)?;
    assert_eq!(a.refused()?, serde_json::json!({"malformed": 2}));
    assert_eq!(b.refused()?, serde_json::json!({}));
    assert!(sync(&mut b)?["kept"]["bytes"].as_u64() < Some(1 << 20));
    Ok(())
}

/// Found re-attacking slice 3c: a signed change with a field no one reads (12 MiB of padding),
/// or its body as an array of integers, was kept and passed on as it came, past the 4 MiB a
/// relay carries. What is kept and passed on is its encoding again, as long as its content.
#[test]
fn a_padded_signed_change_is_kept_and_passed_on_as_long_as_its_content() -> TestResult {
    #[derive(serde::Serialize)]
    enum Padded {
        Signed { author: Vec<u8>, incarnation: u64, sig: Vec<u8>, body: Vec<u8>, seq: u64, prev: u64, pad: Vec<u8> },
    }
    let (mut a, mut b) = pair()?;
    let chain = chains(&hostile(&a, vec![])?).into_iter().next().ok_or("no chain")?;
    let me = hostile_identity();
    let change = deltas(chain, vec![delta("g", grow(replica_of(&me.id(), 0), 3))]);
    let Wire::Signed { author, incarnation, sig, body, seq, prev } =
        Wire::signed(me.id(), 0, &change, |d, m| me.sign(d, m))
    else {
        unreachable!()
    };
    let padded = Padded::Signed { author, incarnation, sig, body, seq, prev, pad: vec![0; 12 << 20] };
    hostile_bytes(&a, vec![rmp_serde::to_vec_named(&padded)?])?;
    b.wait("get /ev", |g| g["ok"]["state"]["g"] == 3)?;
    for r in [&mut a, &mut b] {
        let kept = sync(r)?["kept"]["bytes"].as_u64().unwrap_or(u64::MAX);
        assert!(kept < 1 << 20, "{kept}");
        assert_eq!(r.refused()?, serde_json::json!({}));
    }
    Ok(())
}

/// Found attacking slice 3c: a signed state whose worknodes were all refused (Strong chains)
/// was kept, stored, passed on to every replica (each refusing it), and refused again at each
/// start. It is refused where it arrives, and neither kept nor passed on.
#[test]
fn a_signed_state_refused_here_is_neither_kept_nor_passed_on() -> TestResult {
    let (mut a, mut b) = pair()?;
    let kept = |r: &mut Replica| -> Result<Value, Box<dyn std::error::Error>> { Ok(sync(r)?["kept"].clone()) };
    let before = kept(&mut a)?;
    let me = hostile_identity();
    let strong = |i: usize| (vec![meta(ROOT_ID, &format!("s{i}"), "data", Consistency::Strong)], Default::default());
    let state = Wire::Sync { incarnation: 9, nodes: (0..50).map(strong).collect(), whole: vec![] };
    hostile(&a, vec![Wire::signed(me.id(), 9, &state, |d, m| me.sign(d, m))])?;
    a.wait("stats", |v| v["ok"]["refused"]["consistency"] == 50)?;
    // A change after it, passed on in order: once B has it, B had the state if it was sent.
    a.ok("send /ev add n 1")?;
    b.wait("get /ev", |g| g["ok"]["state"]["n"] == 1)?;
    assert_eq!(b.refused()?, serde_json::json!({}));
    assert_eq!(kept(&mut a)?["authors"], before["authors"]);
    Ok(())
}

/// A signed change is taken as its signer's only if the signature holds for that key over those
/// bytes: a peer cannot pass its changes (or anything) off as another replica's.
#[test]
fn forged_signatures_are_refused() -> TestResult {
    let (mut a, b) = (Replica::start()?, Replica::start()?);
    a.ok("create /ev data eventual")?;
    let seen = hostile(&a, vec![])?;
    let chain = chains(&seen).into_iter().next().ok_or("no chain")?;
    let me = hostile_identity();
    let victim: referee_comm::PeerId = b.id.parse()?;
    let deltas = deltas(chain.clone(), vec![delta("g", grow(replica_of(&victim, b.incarnation), 1000))]);
    let Wire::Signed { sig, body, seq, prev, .. } = Wire::signed(me.id(), 0, &deltas, |d, m| me.sign(d, m)) else {
        unreachable!()
    };
    let signed = |author: Vec<u8>, incarnation: u64, sig: &[u8], body: &[u8], seq: u64, prev: u64| Wire::Signed {
        author,
        incarnation,
        sig: sig.to_vec(),
        body: body.to_vec(),
        seq,
        prev,
    };
    let mine = me.id().as_bytes().to_vec();
    let mut flipped = body.clone();
    if let Some(last) = flipped.last_mut() {
        *last ^= 1;
    }
    let forged = vec![
        // B's key, the peer's own signature.
        signed(victim.as_bytes().to_vec(), 0, &sig, &body, seq, prev),
        // Its own signature, another incarnation (the incarnation is signed).
        signed(mine.clone(), 1, &sig, &body, seq, prev),
        // Its own signature, another place in its sequence (the stamp is signed).
        signed(mine.clone(), 0, &sig, &body, seq + 1, prev),
        signed(mine.clone(), 0, &sig, &body, seq, seq - 1),
        // A previous message later than itself.
        signed(mine.clone(), 0, &sig, &body, seq, seq + 1),
        // Its own key, but bytes other than those signed.
        signed(mine.clone(), 0, &sig, &flipped, seq, prev),
        // Truncated key and signature.
        signed(vec![1; 31], 0, &sig[..63], &body, seq, prev),
        // A valid signature over something that is not a change.
        Wire::signed(me.id(), 0, &Wire::Digests { nodes: vec![] }, |d, m| me.sign(d, m)),
        // A state signed as another incarnation's than it names (a signed state is its own).
        Wire::signed(me.id(), 0, &Wire::Sync { incarnation: 1, nodes: vec![], whole: vec![] }, |d, m| me.sign(d, m)),
        // Its own valid signature over a change in B's name: refused as any change of its own.
        signed(mine, 0, &sig, &body, seq, prev),
    ];
    hostile(&a, forged)?;
    let refused = a.wait("stats", |v| v["ok"]["refused"]["author"] == 1)?["ok"]["refused"].clone();
    assert_eq!(refused, serde_json::json!({"author": 1, "malformed": 9}));
    assert_eq!(a.ok("get /ev")?["state"], serde_json::json!({}));
    Ok(())
}

/// Found re-attacking slice 2: a peer created `/fut` on A as a Local ancestor (of an Eventual
/// child), and A then refused B's Eventual `/fut` for good (`conflict`). A peer never creates a
/// Local worknode: a missing ancestor is an Eventual container.
#[test]
fn a_peer_cannot_create_a_local_worknode_to_split_replicas() -> TestResult {
    let (mut a, mut b) = (Replica::start()?, Replica::start()?);
    let fut = meta(ROOT_ID, "fut", "data", Consistency::Local);
    let kid = meta(fut.id, "kid", "data", Consistency::Eventual);
    hostile(&a, vec![deltas(vec![fut, kid], vec![delta("c", grow(hr(), 1))])])?;
    a.wait("get /fut/kid", |g| g["ok"]["state"]["c"] == 1)?;
    assert_eq!(a.ok("get /fut")?["consistency"], "eventual");
    b.ok("create /fut data eventual")?;
    b.ok("send /fut grow c 9")?;
    a.ok(&format!("peer {} {}", b.addr, b.id))?;
    a.wait("get /fut", |g| g["ok"]["state"]["c"] == 9)?;
    // B learns of /fut/kid from A's full state; its count is the peer's, which A does not relay.
    b.wait("get /fut/kid", |g| g["ok"]["version"] == 0)?;
    assert_eq!(a.refused()?, serde_json::json!({}));
    Ok(())
}

/// Found re-attacking slice 2: the events of one message cost quadratic time (a duplicate check
/// scanned the turn's events): 100,000 tiny events held the replica for 24 s, `get` and
/// `isolate` with it.
#[test]
fn many_events_in_one_message_cost_linear_time() -> TestResult {
    let mut r = Replica::start()?;
    r.ok("create /b data eventual")?;
    let seen = hostile(&r, vec![])?;
    let chain = chains(&seen).into_iter().next().ok_or("no chain")?;
    let n = 100_000u64;
    let events = (1..=n).map(|i| delta("g", grow(hr(), i))).collect();
    let start = Instant::now();
    hostile(&r, vec![deltas(chain, events)])?;
    r.wait("get /b", |g| g["ok"]["state"]["g"] == n)?;
    let took = start.elapsed();
    assert!(took < Duration::from_secs(15), "{n} events took {took:?}");
    Ok(())
}

/// Finding 9: one invalid UTF-8 line made `node serve` exit 0, as if stdin had closed, and a
/// 300 MiB line was read whole. Each is answered with an error line, and the next command is
/// served.
#[test]
fn the_stdin_protocol_answers_bad_lines_and_keeps_going() -> TestResult {
    let mut r = Replica::start()?;
    r.stdin.write_all(b"get /\xff\xfe\n")?;
    r.stdin.flush()?;
    let reply: Value = serde_json::from_str(&r.out.recv_timeout(WAIT)?)?;
    assert!(reply["error"].is_string(), "{reply}");
    // 8 MiB on one line (the limit is 64 KiB): skipped as it streams, not held.
    let long = vec![b'x'; 8 << 20];
    r.stdin.write_all(b"send /a set f ")?;
    r.stdin.write_all(&long)?;
    r.stdin.write_all(b"\n")?;
    r.stdin.flush()?;
    let reply: Value = serde_json::from_str(&r.out.recv_timeout(WAIT)?)?;
    assert!(reply["error"].as_str().is_some_and(|e| e.contains("longer than the limit")), "{reply}");
    assert_eq!(r.ok("get /")?["path"], "/");
    assert!(r.child.try_wait()?.is_none(), "serve exited");
    Ok(())
}

/// Found attacking authorship: a peer's own live dot 0 could never be removed (no causal context
/// holds dot 0), so it pinned set entries and map keys for good; and a write of its own stamped
/// `u64::MAX` won over every later write, which then answered `ok` and was lost. Dot 0 is
/// nobody's (refused `author`), a write stamped more than a day ahead is refused (`clock`), and
/// a local write that could not win is refused, never lost.
#[test]
fn dot_zero_and_far_future_writes_are_refused() -> TestResult {
    let mut r = Replica::start()?;
    r.ok("create /ev data eventual")?;
    r.ok("send /ev set t honest")?;
    let seen = hostile(&r, vec![])?;
    let chain = chains(&seen).into_iter().next().ok_or("no chain")?;
    let pinned = dots(&[((hr(), 0), "pinned")], &[], &[]);
    let mut future = LwwRegister::default();
    future.set(hr(), u64::MAX, "owned".to_owned());
    let mut soon = LwwRegister::default();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
    soon.set(hr(), now + 2 * 86_400_000, "owned".to_owned());
    let forged = vec![
        deltas(chain.clone(), vec![delta("s", Crdt::Set(pinned))]),
        deltas(chain.clone(), vec![delta("t", Crdt::Lww(future))]),
        deltas(chain.clone(), vec![delta("t", Crdt::Lww(soon))]),
        deltas(chain, vec![delta("end", grow(hr(), 1))]),
    ];
    hostile(&r, forged)?;
    r.wait("get /ev", |g| g["ok"]["state"]["end"] == 1)?;
    let refused = r.refused()?;
    assert_eq!((refused["author"].clone(), refused["clock"].clone()), (1.into(), 2.into()), "{refused}");
    r.ok("send /ev set t later")?;
    assert_eq!(r.ok("get /ev")?["state"]["t"], "later");
    Ok(())
}

/// Found attacking authorship: a full state naming the replica's own live dots (with empty
/// values) plus one new dot of the peer's was admitted with the replica's own values copied in
/// and stored whole each time: 1.39 MB sent grew the store by 197 MB. What is admitted holds
/// only what the peer made, so the store grows by about what the peer sends.
#[test]
fn a_full_state_cannot_make_the_store_copy_the_replicas_own_values() -> TestResult {
    let mut r = Replica::start()?;
    r.ok("create /ev data eventual")?;
    let value = "v".repeat(1000);
    for i in 0..300 {
        writeln!(r.stdin, "send /ev insert s {i}{value}")?;
    }
    r.stdin.flush()?;
    for _ in 0..300 {
        let reply: Value = serde_json::from_str(&r.out.recv_timeout(WAIT)?)?;
        assert!(reply.get("ok").is_some(), "{reply}");
    }
    let db = r.dir.path().join("worknodes.redb");
    let before = std::fs::metadata(&db)?.len();
    let me = r.replica;
    let mut sent = 0usize;
    let mut forged = Vec::new();
    let chain = chains(&hostile(&r, vec![])?).into_iter().next().ok_or("no chain")?;
    for k in 1..=50u64 {
        // The replica's 300 dots with empty values, and one new dot of the peer's own.
        let mine = format!("p{k}");
        let mut live: Vec<((u64, u64), &str)> = (1..=300u64).map(|n| ((me, n), "")).collect();
        live.push(((hr(), k), mine.as_str()));
        let set = dots(&live, &[(me, 300), (hr(), k)], &[]);
        let mut state = referee_worknode::State::default();
        state.apply(&delta("s", Crdt::Set(set)))?;
        let w = Wire::Sync { incarnation: 0, nodes: vec![(chain.clone(), state)], whole: vec![] };
        sent += w.to_bytes().len();
        forged.push(w);
    }
    hostile(&r, forged)?;
    // Each state replaces the peer's previous element: 300 of the replica's, and "p50".
    let deadline = Instant::now() + WAIT;
    while r.ok("get /ev")?["version"] != 350 {
        assert!(Instant::now() < deadline, "the 50 states were not all merged");
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = r.ok("get /ev")?["state"]["s"].clone();
    assert!(s.as_array().is_some_and(|s| s.len() == 301 && s.contains(&Value::from("p50"))));
    r.ok("idle")?;
    let grew = std::fs::metadata(&db)?.len().saturating_sub(before);
    assert!(grew < (sent as u64) * 4 + (4 << 20), "sent {sent} bytes, the store grew by {grew}");
    Ok(())
}

/// Found attacking authorship: a peer's gapped dots of its own (2M in one field) made every later
/// change of that field slow (a local insert took 0.68 s) and held the replica's memory. A field
/// holds at most `MAX_GAPS` dots out of order; past it, a change is refused (`quota`).
#[test]
fn a_field_takes_a_bounded_number_of_dots_out_of_order() -> TestResult {
    let mut r = Replica::start()?;
    r.ok("create /ev data eventual")?;
    let seen = hostile(&r, vec![])?;
    let chain = chains(&seen).into_iter().next().ok_or("no chain")?;
    let cloud: Vec<(u64, u64)> = (0..70_000u64).map(|i| (hr(), 2 + 2 * i)).collect();
    let gapped = dots(&[], &[], &cloud);
    hostile(
        &r,
        vec![
            deltas(chain.clone(), vec![delta("s", Crdt::Set(gapped))]),
            deltas(chain, vec![delta("end", grow(hr(), 1))]),
        ],
    )?;
    r.wait("get /ev", |g| g["ok"]["state"]["end"] == 1)?;
    assert_eq!(r.refused()?["quota"], 1);
    let start = Instant::now();
    r.ok("send /ev insert s quick")?;
    assert!(start.elapsed() < Duration::from_secs(1), "{:?}", start.elapsed());
    Ok(())
}

/// Found attacking authorship: all Eventual worknodes went in one anti-entropy message, so one
/// state over referee-comm's 16 MiB limit kept every worknode from every peer (a change missed
/// in a partition was never repaired). The full state goes in chunks of one worknode at least
/// (of one field, since slice 3).
#[test]
fn one_large_worknode_does_not_keep_the_others_from_a_peer() -> TestResult {
    let (mut a, mut b) = (Replica::start()?, Replica::start()?);
    a.ok("create /big data eventual")?;
    a.ok("create /small data eventual")?;
    a.ok("send /small grow g 7")?;
    let value = "b".repeat(60_000);
    for i in 0..300 {
        writeln!(a.stdin, "send /big insert s {i}{value}")?;
    }
    a.stdin.flush()?;
    let mut taken = 0;
    for _ in 0..300 {
        let reply: Value = serde_json::from_str(&a.out.recv_timeout(WAIT)?)?;
        taken += usize::from(reply.get("ok").is_some());
    }
    // /big as large as a field may be, and /small. B connects only now.
    b.ok(&format!("peer {} {}", a.addr, a.id))?;
    b.wait("get /small", |g| g["ok"]["state"]["g"] == 7)?;
    b.wait("get /big", |g| g["ok"]["state"]["s"].as_array().map(Vec::len) == Some(taken))?;
    Ok(())
}

/// Found attacking authorship: a new store served under an identity that had served another
/// (`--identity`, a lost store) numbered its updates from 1 again, so peers that had seen the old
/// ones took the new ones for old: a new insert vanished where the old one had been removed, and
/// a new count stayed hidden behind the old one. A store's replica id includes an incarnation the
/// store picks when it is made.
#[test]
fn a_new_store_under_an_old_identity_does_not_reuse_its_dots() -> TestResult {
    let keys = tempfile::tempdir()?;
    let id_file = keys.path().join("identity");
    Identity::generate()?.save_new(&id_file)?;
    let id = id_file.to_str().ok_or("path")?;
    let mut b = Replica::start()?;
    let mut a = Replica::start_with(&["--identity", id])?;
    a.ok(&format!("peer {} {}", b.addr, b.id))?;
    a.ok("create /ev data eventual")?;
    a.ok("send /ev insert s x1")?;
    a.ok("send /ev grow c 5")?;
    b.wait("get /ev", |g| g["ok"]["state"] == serde_json::json!({"c": 5, "s": ["x1"]}))?;
    b.ok("send /ev remove s x1")?;
    let old = a.replica;
    drop(a);
    // The store is lost; the identity is served again from a new one.
    let mut a = Replica::start_with(&["--identity", id])?;
    assert_ne!(a.replica, old);
    a.ok(&format!("peer {} {}", b.addr, b.id))?;
    a.wait("get /ev", |g| g["ok"]["version"].is_u64())?;
    a.ok("send /ev insert s y1")?;
    a.ok("send /ev grow c 2")?;
    b.wait("get /ev", |g| g["ok"]["state"] == serde_json::json!({"c": 7, "s": ["y1"]}))?;
    assert_eq!(a.ok("get /ev")?["state"]["s"], serde_json::json!(["y1"]));
    Ok(())
}

/// Found attacking the signed relay: one message of a peer's own gapped dots (65,536, its share
/// then) filled a field's gap budget, and since an honest change after a replica's first carries
/// its dot out of order, every honest change of that field was then refused, network-wide. Gaps
/// are counted per author and only a change that adds some is refused, so one peer's gaps
/// block only that peer, however many incarnations it claims.
#[test]
fn a_peers_gaps_block_only_that_peer() -> TestResult {
    let (mut a, mut b) = (Replica::start()?, Replica::start()?);
    a.ok(&format!("peer {} {}", b.addr, b.id))?;
    a.ok("create /n data eventual")?;
    a.ok("send /n insert s x0")?;
    b.wait("get /n", |g| g["ok"]["state"]["s"] == serde_json::json!(["x0"]))?;
    let chain = chains(&hostile(&b, vec![])?).into_iter().find(|c| c[0].name == "n").ok_or("no chain")?;
    let me = hostile_identity().id();
    let mut forged = Vec::new();
    for inc in 1..=17u64 {
        let cloud: Vec<(u64, u64)> = (0..4000u64).map(|i| (replica_of(&me, inc), 2 + 2 * i)).collect();
        let mut state = referee_worknode::State::default();
        state.apply(&delta("s", Crdt::Set(dots(&[], &[], &cloud))))?;
        forged.push(Wire::Sync { incarnation: inc, nodes: vec![(chain.clone(), state)], whole: vec![] });
    }
    hostile(&b, forged)?;
    b.wait("stats", |v| v["ok"]["refused"]["quota"] == 1)?;
    for i in 1..=3 {
        a.ok(&format!("send /n insert s x{i}"))?;
    }
    b.wait("get /n", |g| g["ok"]["state"]["s"] == serde_json::json!(["x0", "x1", "x2", "x3"]))?;
    assert_eq!(b.refused()?["quota"], 1);
    Ok(())
}

/// Found attacking the signed relay: a full state for one path, sent under the id of another
/// worknode, was stored under an event id the other worknode's next identical state would have,
/// so that state was skipped as a repeat on every reconnection: two honest replicas stayed
/// split. A merged change is stored under an id of the worknode it was merged into.
#[test]
fn a_state_planted_under_another_worknodes_id_does_not_split_replicas() -> TestResult {
    let (mut a, mut b) = (Replica::start()?, Replica::start()?);
    a.ok(&format!("peer {} {}", b.addr, b.id))?;
    for w in ["w1", "w2"] {
        b.ok(&format!("create /{w} data eventual"))?;
        b.ok(&format!("send /{w} insert s x"))?;
        a.wait(&format!("get /{w}"), |g| g["ok"]["state"]["s"] == serde_json::json!(["x"]))?;
    }
    let seen = hostile(&a, vec![])?;
    let all = chains(&seen);
    let w1 = all.iter().find(|c| c[0].name == "w1").ok_or("no /w1")?;
    let w2 = all.iter().find(|c| c[0].name == "w2").ok_or("no /w2")?;
    // B's state of /w2 once it removes x, under /w2's id, at the path /w1.
    let mut state = referee_worknode::State::default();
    state.apply(&delta("s", Crdt::Set(dots(&[], &[(b.replica, 1)], &[]))))?;
    let planted = vec![Meta { name: "w1".into(), ..w2[0].clone() }];
    assert_ne!(planted[0].id, w1[0].id);
    hostile(&a, vec![Wire::Sync { incarnation: 0, nodes: vec![(planted, state)], whole: vec![] }])?;
    a.wait("get /w1", |g| g["ok"]["state"]["s"] == serde_json::json!([]))?;
    a.ok("isolate")?;
    b.ok("send /w2 remove s x")?;
    a.ok("heal")?;
    a.wait("get /w2", |g| g["ok"]["state"]["s"] == serde_json::json!([]))?;
    Ok(())
}

/// Found attacking the signed relay: a replica passed on every signed message, refused or not,
/// and merged each copy it got: one 12 MiB change over the size limit crossed a five-replica
/// mesh 17 times. A change refused here (or larger than a relay carries) is not passed on, and
/// a repeat is not merged again.
#[test]
fn a_refused_signed_change_is_not_passed_on() -> TestResult {
    let (mut a, mut b, mut c) = (Replica::start()?, Replica::start()?, Replica::start()?);
    a.ok(&format!("peer {} {}", b.addr, b.id))?;
    c.ok(&format!("peer {} {}", b.addr, b.id))?;
    b.ok("create /ev data eventual")?;
    b.ok("send /ev grow g 1")?;
    for r in [&mut a, &mut c] {
        r.wait("get /ev", |g| g["ok"]["state"]["g"] == 1)?;
    }
    let chain = chains(&hostile(&b, vec![])?).into_iter().next().ok_or("no chain")?;
    let me = hostile_identity();
    let big = Crdt::Set(OrSet::default().add(hr(), "x".repeat(3 << 20)));
    let too_big = Wire::signed(me.id(), 0, &deltas(chain.clone(), vec![delta("s", big)]), |d, m| me.sign(d, m));
    let fine = Wire::signed(me.id(), 0, &deltas(chain, vec![delta("h", grow(hr(), 4))]), |d, m| me.sign(d, m));
    hostile(&b, vec![too_big, fine.clone(), fine])?;
    // The change that was taken travels; the refused one does not.
    for r in [&mut a, &mut c] {
        r.wait("get /ev", |g| g["ok"]["state"]["h"] == 4)?;
    }
    assert_eq!(b.refused()?, serde_json::json!({"quota": 1}));
    for r in [&mut a, &mut c] {
        assert_eq!(r.refused()?, serde_json::json!({}));
    }
    Ok(())
}

/// Found reviewing the admission code: a peer's causal context with a zero entry (`{X: 0}`, which
/// no replica makes) made the merge ask a map for the range `1..=0`, which panics: the worker
/// died and the worknode was never scheduled again, on every replica the change reached. A zero
/// entry names no dot.
#[test]
fn a_zero_entry_in_a_peers_context_is_harmless() -> TestResult {
    let mut r = Replica::start()?;
    r.ok("create /ev data eventual")?;
    r.ok("send /ev insert s a")?;
    let chain = chains(&hostile(&r, vec![])?).into_iter().next().ok_or("no chain")?;
    let zero = dots(&[], &[(hr(), 0), (r.replica, 0)], &[]);
    let mut state = referee_worknode::State::default();
    state.apply(&delta("s", Crdt::Set(zero.clone())))?;
    let me = hostile_identity();
    let signed = Wire::signed(me.id(), 0, &deltas(chain.clone(), vec![delta("s", Crdt::Set(zero.clone()))]), |d, m| {
        me.sign(d, m)
    });
    let forged = vec![
        deltas(chain.clone(), vec![delta("s", Crdt::Set(zero))]),
        Wire::Sync { incarnation: 0, nodes: vec![(chain.clone(), state)], whole: vec![] },
        signed,
        deltas(chain, vec![delta("end", grow(hr(), 1))]),
    ];
    hostile(&r, forged)?;
    r.wait("get /ev", |g| g["ok"]["state"]["end"] == 1)?;
    r.ok("send /ev insert s b")?;
    assert_eq!(r.ok("get /ev")?["state"]["s"], serde_json::json!(["a", "b"]));
    Ok(())
}

/// Anti-entropy counters of a replica (`stats` → `sync`).
fn sync(r: &mut Replica) -> Result<Value, Box<dyn std::error::Error>> {
    Ok(r.ok("stats")?["sync"].clone())
}

/// Waits until both replicas have finished a round of anti-entropy past `a0` and `b0` (their
/// counters before), each having received the other's `n` digests.
fn rounds_done(a: &mut Replica, b: &mut Replica, a0: &Value, b0: &Value, n: u64) -> TestResult {
    let past = |before: &Value, got: &Value| {
        got["rounds"].as_u64() > before["rounds"].as_u64()
            && got["digests_received"].as_u64().unwrap_or(0) >= before["digests_received"].as_u64().unwrap_or(0) + n
    };
    a.wait("stats", |s| past(a0, &s["ok"]["sync"]))?;
    b.wait("stats", |s| past(b0, &s["ok"]["sync"]))?;
    // The states asked for (if any) have time to go.
    std::thread::sleep(Duration::from_millis(500));
    Ok(())
}

/// Slice 3: on every connection each replica sent the other its full state, however little
/// differed (19 MB to a peer that reconnected with everything). Replicas exchange digests first
/// and send only the states that differ.
#[test]
fn agreeing_replicas_exchange_digests_not_states() -> TestResult {
    let (mut a, mut b) = (Replica::start()?, Replica::start()?);
    for i in 0..40 {
        a.ok(&format!("create /n{i} data eventual"))?;
        a.ok(&format!("send /n{i} grow g {}", i + 1))?;
        a.ok(&format!("send /n{i} insert s e{i}"))?;
        a.ok(&format!("send /n{i} put m k{i} v{i}"))?;
    }
    let (a0, b0) = (sync(&mut a)?, sync(&mut b)?);
    b.ok(&format!("peer {} {}", a.addr, a.id))?;
    b.wait("get /n39", |g| g["ok"]["state"]["g"] == 40)?;
    rounds_done(&mut a, &mut b, &a0, &b0, 0)?;
    let (a1, b1) = (sync(&mut a)?, sync(&mut b)?);
    assert_eq!(a1["states_sent"].as_u64().unwrap() - a0["states_sent"].as_u64().unwrap(), 40, "{a1}");

    // B reconnects holding everything: digests, no state, either way.
    b.ok("isolate")?;
    b.ok("heal")?;
    rounds_done(&mut a, &mut b, &a1, &b1, 40)?;
    let (a2, b2) = (sync(&mut a)?, sync(&mut b)?);
    assert_eq!(a2["states_sent"], a1["states_sent"], "{a2}");
    assert_eq!(b2["states_sent"], b1["states_sent"], "{b2}");
    assert_eq!(b2["wanted"], b1["wanted"], "{b2}");

    // A change missed in a partition comes back as that worknode's state alone.
    b.ok("isolate")?;
    a.ok("send /n7 grow g 100")?;
    b.ok("heal")?;
    b.wait("get /n7", |g| g["ok"]["state"]["g"] == 108)?;
    rounds_done(&mut a, &mut b, &a2, &b2, 40)?;
    let (a3, b3) = (sync(&mut a)?, sync(&mut b)?);
    assert_eq!(a3["states_sent"].as_u64().unwrap() - a2["states_sent"].as_u64().unwrap(), 1, "{a3}");
    assert_eq!(b3["wanted"].as_u64().unwrap() - b2["wanted"].as_u64().unwrap(), 1, "{b3}");
    Ok(())
}

/// Finding 7, the rest: a worknode whose state is over referee-comm's 16 MiB message limit went
/// in one anti-entropy message, so what it missed in a partition was never repaired. Its state
/// goes in parts of whole fields.
#[test]
fn a_worknode_over_the_message_limit_is_repaired_after_a_partition() -> TestResult {
    let (mut a, mut b) = (Replica::start()?, Replica::start()?);
    a.ok("create /wide data eventual")?;
    b.ok(&format!("peer {} {}", a.addr, a.id))?;
    b.wait("get /wide", |g| g.get("ok").is_some())?;
    b.ok("isolate")?;
    // 300 fields of 60 kB: 18 MB.
    let value = "w".repeat(60_000);
    for i in 0..300 {
        writeln!(a.stdin, "send /wide set f{i} {i}{value}")?;
    }
    a.stdin.flush()?;
    for _ in 0..300 {
        let reply: Value = serde_json::from_str(&a.out.recv_timeout(WAIT)?)?;
        assert!(reply.get("ok").is_some(), "{reply}");
    }
    b.ok("heal")?;
    let fields = |g: &Value| g["ok"]["state"].as_object().map_or(0, serde_json::Map::len);
    let got = b.wait("get /wide", |g| fields(g) == 300)?;
    assert_eq!(got["ok"]["state"]["f299"].as_str().map(str::len), Some(60_003));
    assert!(sync(&mut a)?["states_sent"].as_u64().unwrap() > 1);
    Ok(())
}

/// Slice 3 (amplification): a peer that asks for a state again and again, or for one it was not
/// offered, is sent each state once per connection; a Local worknode is neither offered nor sent.
#[test]
fn a_state_is_sent_once_per_connection_however_often_it_is_asked_for() -> TestResult {
    let mut r = Replica::start()?;
    r.ok("create /x data eventual")?;
    r.ok("send /x set v hello")?;
    r.ok("create /secret data local")?;
    r.ok("send /secret set v local-only")?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let states = rt.block_on(async {
        let (node, mut inbox) = Node::new(hostile_identity(), AllowList::allow_any(), Config::default());
        let conn = node.connect_with(&r.addr.parse()?, ConnectOptions::default().expect_peer(r.id.parse()?)).await?;
        let mut states = 0;
        let mut asked = false;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, inbox.recv()).await {
            match Wire::from_bytes(msg.payload()) {
                Some(Wire::Digests { nodes }) if !asked => {
                    asked = true;
                    assert!(nodes.iter().any(|(p, _)| p == "/x"), "{nodes:?}");
                    assert!(!nodes.iter().any(|(p, _)| p == "/secret"), "a Local worknode is never offered: {nodes:?}");
                    for _ in 0..50 {
                        let paths = ["/x", "/x", "/nope", "/", "/secret"].map(str::to_owned).to_vec();
                        conn.send(Wire::Want { paths }.to_bytes()).await?;
                    }
                }
                Some(Wire::Sync { nodes, .. }) => states += nodes.len(),
                _ => {}
            }
        }
        Ok::<_, Box<dyn std::error::Error>>(states)
    })?;
    assert_eq!(states, 1);
    assert!(sync(&mut r)?["wants_ignored"].as_u64().unwrap() >= 249);
    Ok(())
}

/// Finding 7, the last of it: one field over referee-comm's 16 MiB message limit (a set of many
/// inserts) could never be sent whole, so a peer that missed it never got it. A field stops
/// growing at `max_field_bytes` (4 MiB; a removal still goes), so anti-entropy carries it.
#[test]
fn a_field_stops_growing_below_the_message_limit_and_always_replicates() -> TestResult {
    let (mut a, mut b) = (Replica::start()?, Replica::start()?);
    a.ok("create /big data eventual")?;
    b.ok(&format!("peer {} {}", a.addr, a.id))?;
    b.wait("get /big", |g| g.get("ok").is_some())?;
    b.ok("isolate")?;
    let value = "b".repeat(60_000);
    for i in 0..200 {
        writeln!(a.stdin, "send /big insert s {i:03}{value}")?;
    }
    a.stdin.flush()?;
    let (mut taken, mut full) = (0, 0);
    for _ in 0..200 {
        let reply: Value = serde_json::from_str(&a.out.recv_timeout(WAIT)?)?;
        if reply.get("ok").is_some() {
            taken += 1;
        } else {
            assert!(reply.to_string().contains("above the limit"), "{reply}");
            full += 1;
        }
    }
    assert!((50..80).contains(&taken) && full > 0, "{taken} taken, {full} refused");
    // At the limit, a removal still goes, and then an insert again.
    a.ok(&format!("send /big remove s 000{value}"))?;
    a.ok(&format!("send /big insert s new{value}"))?;
    b.ok("heal")?;
    let got = b.wait("get /big", |g| g["ok"]["state"]["s"].as_array().map(Vec::len) == Some(taken))?;
    let set = got["ok"]["state"]["s"].as_array().unwrap();
    assert!(set.iter().any(|e| e.as_str().is_some_and(|e| e.starts_with("new"))));
    assert!(!set.iter().any(|e| e.as_str().is_some_and(|e| e.starts_with("000"))));
    Ok(())
}

/// Found attacking the field limit: two partitioned replicas each filled one set to 7 MiB, under
/// the local limit of the time (8 MiB), and then each refused the other's whole field (`quota`,
/// a peer's change being held to 12 MiB): they never converged, and every reconnection sent
/// both states again. A peer's change is never refused for a field's size.
#[test]
fn replicas_filling_one_field_at_once_converge() -> TestResult {
    let (mut a, mut b) = (Replica::start()?, Replica::start()?);
    a.ok("create /big data eventual")?;
    b.ok(&format!("peer {} {}", a.addr, a.id))?;
    b.wait("get /big", |g| g.get("ok").is_some())?;
    b.ok("isolate")?;
    let value = "c".repeat(60_000);
    let mut taken = 0;
    for (name, r) in [("a", &mut a), ("b", &mut b)] {
        // Each fills the field to the local limit.
        for i in 0..160 {
            writeln!(r.stdin, "send /big insert s {name}{i:03}{value}")?;
        }
        r.stdin.flush()?;
        for _ in 0..160 {
            let reply: Value = serde_json::from_str(&r.out.recv_timeout(WAIT)?)?;
            taken += usize::from(reply.get("ok").is_some());
        }
    }
    assert!(taken > 100, "{taken}");
    b.ok("heal")?;
    let len = |g: &Value| g["ok"]["state"]["s"].as_array().map(Vec::len);
    a.wait("get /big", |g| len(g) == Some(taken))?;
    b.wait("get /big", |g| len(g) == Some(taken))?;
    assert_eq!(a.refused()?.get("quota"), None);
    Ok(())
}

/// Found attacking anti-entropy: a peer's change taken by one replica only (a plain `Deltas` to
/// A, which is not passed on) left A's and B's digests different for good, so every
/// reconnection sent that 4 MB state both ways, and neither took anything from it (each takes
/// only its sender's own updates). A state that arrived is not asked for again while neither
/// digest changes.
#[test]
fn a_state_that_brought_nothing_is_not_asked_for_again() -> TestResult {
    let (mut a, mut b) = (Replica::start()?, Replica::start()?);
    a.ok("create /w data eventual")?;
    a.ok("send /w grow g 1")?;
    b.ok(&format!("peer {} {}", a.addr, a.id))?;
    b.wait("get /w", |g| g["ok"]["state"]["g"] == 1)?;
    let seen = hostile(&a, vec![])?;
    let chain = chains(&seen).into_iter().next().ok_or("no chain")?;
    hostile(&a, vec![deltas(chain, vec![delta("h", grow(hr(), 5))])])?;
    a.wait("get /w", |g| g["ok"]["state"]["h"] == 5)?;
    // Each reconnection: the first sends /w both ways (the digests differ), the next ones none.
    let mut sent = Vec::new();
    for _ in 0..3 {
        let (a0, b0) = (sync(&mut a)?, sync(&mut b)?);
        b.ok("isolate")?;
        b.ok("heal")?;
        rounds_done(&mut a, &mut b, &a0, &b0, 1)?;
        let (a1, b1) = (sync(&mut a)?, sync(&mut b)?);
        let n = |x: &Value, y: &Value| x["states_sent"].as_u64().unwrap() - y["states_sent"].as_u64().unwrap();
        sent.push((n(&a1, &a0), n(&b1, &b0)));
    }
    assert_eq!(sent[0], (1, 1), "{sent:?}");
    assert_eq!(sent[1..], [(0, 0), (0, 0)], "{sent:?}");
    assert!(sync(&mut b)?["settled"].as_u64().unwrap() >= 2);
    // A change on either side is asked for again at once.
    b.ok("isolate")?;
    a.ok("send /w grow g 1")?;
    b.ok("heal")?;
    b.wait("get /w", |g| g["ok"]["state"]["g"] == 2)?;
    Ok(())
}

/// One connection of the hostile peer to `r` that names `/w` in its digests (with a digest `r`
/// cannot hold), asks for `r`'s `/w`, and sends back its chain with an empty state, as the part
/// that completes the state (`whole`) or not. Returns whether `r` asked for `/w`.
fn digest_session(r: &Replica, whole: bool) -> Result<bool, Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async {
        let (node, mut inbox) = Node::new(hostile_identity(), AllowList::allow_any(), Config::default());
        let conn = node.connect_with(&r.addr.parse()?, ConnectOptions::default().expect_peer(r.id.parse()?)).await?;
        let mut asked = false;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, inbox.recv()).await {
            match Wire::from_bytes(msg.payload()) {
                Some(Wire::Digests { .. }) => {
                    conn.send(Wire::Digests { nodes: vec![("/w".to_owned(), [7; 16])] }.to_bytes()).await?;
                    conn.send(Wire::Want { paths: vec!["/w".to_owned()] }.to_bytes()).await?;
                }
                Some(Wire::Want { paths }) => asked |= paths.iter().any(|p| p == "/w"),
                Some(Wire::Sync { mut nodes, .. }) => {
                    let (chain, _) = nodes.pop().ok_or("no state")?;
                    let whole = if whole { vec!["/w".to_owned()] } else { vec![] };
                    let part = Wire::Sync { incarnation: 0, nodes: vec![(chain, Default::default())], whole };
                    conn.send(part.to_bytes()).await?;
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(asked)
    })
}

/// Found reviewing the fix above: a state settled on its first part, so a state in parts whose
/// first part changed nothing and whose next ones were cut off (a partition) was not asked for
/// again for 10 minutes. A state settles only once its last part came.
#[test]
fn a_state_settles_only_once_its_last_part_came() -> TestResult {
    let mut r = Replica::start()?;
    r.ok("create /w data eventual")?;
    r.ok("send /w grow g 1")?;
    assert!(digest_session(&r, false)?, "asked at first");
    assert!(digest_session(&r, false)?, "asked again: the state came only in part");
    assert!(digest_session(&r, true)?, "asked again: the state came only in part");
    assert!(!digest_session(&r, true)?, "not asked: it came whole, and neither side changed");
    assert_eq!(sync(&mut r)?["settled"], 1);
    r.ok("send /w grow g 1")?;
    assert!(digest_session(&r, true)?, "asked: this side changed");
    Ok(())
}

/// Found attacking the fix above: with a peer's changes never refused for a field's size, one
/// peer grew a field past referee-comm's 16 MiB message limit in changes of 1.9 MiB. The
/// replica's own writes to it were refused for good, anti-entropy dropped the part holding it
/// (or, past 32 MiB, disconnected the peer it was for, every round), and the state was marked
/// whole anyway. A peer's changes are held to `max_merged_field_bytes` (14 MiB), and a part too
/// large to send is left out without marking its state whole.
#[test]
fn a_peer_cannot_grow_a_field_past_what_anti_entropy_carries() -> TestResult {
    let (mut a, mut b) = (Replica::start()?, Replica::start()?);
    a.ok("create /x data eventual")?;
    a.ok("send /x insert s mine")?;
    b.ok(&format!("peer {} {}", a.addr, a.id))?;
    b.wait("get /x", |g| g["ok"]["state"]["s"].as_array().map(Vec::len) == Some(1))?;
    b.ok("isolate")?;
    let seen = hostile(&a, vec![])?;
    let chain = chains(&seen).into_iter().next().ok_or("no chain")?;
    let mut set = OrSet::default();
    let forged: Vec<Wire> = (0..18)
        .map(|i| {
            let add = set.add(hr(), format!("{i}{}", "h".repeat(1_900_000)));
            deltas(chain.clone(), vec![delta("s", Crdt::Set(add))])
        })
        .collect();
    hostile(&a, forged)?;
    a.wait("stats", |s| s["ok"]["refused"]["quota"].as_u64() >= Some(1))?;
    a.ok("idle")?;
    let len = |g: &Value| g["ok"]["state"]["s"].as_array().map_or(0, Vec::len);
    let held = len(&a.ok("get /x").map(|v| serde_json::json!({ "ok": v }))?);
    assert!((5..10).contains(&held), "{held}");
    a.ok("send /x grow t 5")?;
    b.ok("heal")?;
    // B gets A's updates (not the peer's, which A does not pass on: a plain `Deltas`).
    b.wait("get /x", |g| g["ok"]["state"]["t"] == 5)?;
    assert_eq!(sync(&mut a)?["parts_too_large"], 0);
    Ok(())
}

/// Found by the three-replica test, 1 run in 75 under load: a peer's connection closing dropped
/// every other peer's finished anti-entropy round too, so their wants were ignored; a replica
/// restarted while a third was cut off (its connections closing every 200 ms) never got what it
/// missed. A closing connection ends its own peer's round only.
#[test]
fn another_peer_leaving_does_not_cancel_a_round() -> TestResult {
    let mut r = Replica::start()?;
    r.ok("create /x data eventual")?;
    r.ok("send /x set v hello")?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let got = rt.block_on(async {
        let (addr, id) = (r.addr.parse()?, r.id.parse()?);
        let (node, mut inbox) = Node::new(hostile_identity(), AllowList::allow_any(), Config::default());
        let conn = node.connect_with(&addr, ConnectOptions::default().expect_peer(id)).await?;
        let msg = tokio::time::timeout(WAIT, inbox.recv()).await?.ok_or("closed")?;
        assert!(matches!(Wire::from_bytes(msg.payload()), Some(Wire::Digests { .. })));
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Another peer comes and goes.
        let (other, _inbox) = Node::new(Identity::generate()?, AllowList::allow_any(), Config::default());
        let passing = other.connect_with(&addr, ConnectOptions::default().expect_peer(id)).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        passing.abort();
        tokio::time::sleep(Duration::from_millis(300)).await;
        conn.send(Wire::Want { paths: vec!["/x".to_owned()] }.to_bytes()).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, inbox.recv()).await {
            if let Some(Wire::Sync { nodes, .. }) = Wire::from_bytes(msg.payload()) {
                return Ok::<_, Box<dyn std::error::Error>>(nodes.len());
            }
        }
        Ok(0)
    })?;
    assert_eq!(got, 1, "the state asked for was sent");
    Ok(())
}

/// Found reading the three-replica test's output: a Local worknode is an Eventual container at
/// the peers its children reach, so they named it in their digests and the origin asked for it
/// at every connection, only to refuse it (`conflict`, audited each time). A path that is not
/// Eventual here is not asked for.
#[test]
fn a_local_ancestor_is_not_asked_for_again_and_again() -> TestResult {
    let (mut a, mut b) = (Replica::start()?, Replica::start()?);
    a.ok("create /acme data local")?;
    a.ok("create /acme/c data eventual")?;
    a.ok("send /acme/c grow g 3")?;
    b.ok(&format!("peer {} {}", a.addr, a.id))?;
    b.wait("get /acme/c", |g| g["ok"]["state"]["g"] == 3)?;
    for _ in 0..2 {
        let (a0, b0) = (sync(&mut a)?, sync(&mut b)?);
        b.ok("isolate")?;
        b.ok("heal")?;
        rounds_done(&mut a, &mut b, &a0, &b0, 1)?;
    }
    assert_eq!(a.refused()?.get("conflict"), None);
    assert_eq!(a.ok("get /acme")?["consistency"], "local");
    Ok(())
}

/// Found by CI (a race in `forged_seen_markers_do_not_swallow_later_inserts`): a new Eventual
/// worknode with no write yet reached a connected peer only through the anti-entropy of a
/// connection, so one made just after the round's digests were taken stayed unknown to the peer
/// until the next connection. Its creation ships (its chain, no events).
#[test]
fn a_new_worknode_reaches_a_connected_peer_at_once() -> TestResult {
    let (mut a, mut b) = (Replica::start()?, Replica::start()?);
    let (a0, b0) = (sync(&mut a)?, sync(&mut b)?);
    a.ok(&format!("peer {} {}", b.addr, b.id))?;
    rounds_done(&mut a, &mut b, &a0, &b0, 0)?;
    a.ok("create /new data eventual")?;
    b.wait("get /new", |g| g["ok"]["version"] == 0)?;
    Ok(())
}
