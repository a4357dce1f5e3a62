//! `referee node ...`: worknodes from a shell. The binary wires [`NodeCommand`] into its grammar
//! and calls [`run`]. `anyhow` is used here only (CLI edge).
//!
//! `serve` runs a replica and takes commands on standard input, one per line, answering each with
//! one JSON line (`{"ok": ...}` or `{"error": "..."}`), in the order of the commands. A `send` is
//! answered only once its update is durable (`{"ok": {"durable": true, "seq": N, "version": V}}`);
//! sends are pipelined, so a stream of them shares commits, and any other command first waits
//! for the sends before it:
//!
//! | command | effect |
//! |---|---|
//! | `create PATH KIND local\|eventual` | create a worknode |
//! | `send PATH OP FIELD [VALUE [VALUE]]` | durable state operation: `grow`, `add`, `set`, `write`, `insert`, `remove`, `put KEY VALUE`, `delete KEY` |
//! | `send-key KEY PATH OP FIELD [VALUE [VALUE]]` | the same, idempotent: a second send with the same KEY on the worknode is not applied again |
//! | `get PATH` | the worknode's state and version |
//! | `peer ADDR PEER_ID` | keep a connection to a peer replica |
//! | `isolate` / `heal` | cut this replica off the network / reconnect (anti-entropy runs) |
//! | `idle` | wait until every accepted message is handled |
//! | `stats` | messages handled, restarts, operations rejected, replicated changes refused per reason |
//!
//! A refused replicated change is also audited on standard error as a JSON line
//! (`{"audit": "replication_refused", "code", "path", "detail", "count"}`) for the 1st, 2nd,
//! 4th, 8th… refusal of each reason.

use std::collections::VecDeque;
use std::io::{BufRead as _, Read as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use referee_comm::{Addr, AllowList, Config, Identity, Node, PeerId};

use crate::replication::{Replicator, replica_of};
use crate::{
    Authority, Committed, Completion, Consistency, EventStore, Op, StoreConfig, System, SystemConfig, WnPath,
    WorknodeId,
};

/// Most `serve` sends waiting for durability at once (below the default mailbox bound, 1024).
const MAX_PENDING: usize = 512;
/// Longest `serve` command line, in bytes (a longer one is skipped and answered with an error).
const MAX_LINE: usize = 64 * 1024;

/// `referee node` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum NodeCommand {
    /// Run a replica: listen for peers, replicate Eventual worknodes, take commands on stdin.
    Serve {
        /// Store directory (holds worknodes.redb, the replica id and, by default, the identity).
        #[arg(long, env = "REFEREE_NODE_DIR", default_value = "worknodes")]
        dir: PathBuf,
        /// Address to listen on (tcp://HOST:PORT, unix:///PATH, quic://HOST:PORT).
        #[arg(long)]
        listen: String,
        /// Identity file (default: `identity` in the store directory, made on first use). The
        /// replica id is derived from it, and a store keeps the replica id it was first served
        /// with.
        #[arg(long, env = "REFEREE_COMM_IDENTITY")]
        identity: Option<PathBuf>,
        /// Peer replica as ADDR@PEER_ID (repeatable).
        #[arg(long = "peer", value_name = "ADDR@PEER_ID")]
        peers: Vec<String>,
        /// Peer id allowed to connect (repeatable).
        #[arg(long = "allow", value_name = "PEER_ID")]
        allow: Vec<String>,
        /// Allow any peer that proves its identity (still encrypted and authenticated).
        #[arg(long)]
        allow_any: bool,
    },
    /// Create a worknode in the local store.
    Create {
        /// Store directory.
        #[arg(long, env = "REFEREE_NODE_DIR", default_value = "worknodes")]
        dir: PathBuf,
        /// Path of the new worknode, e.g. /acme/research.
        path: String,
        /// Behaviour kind.
        #[arg(long, default_value = "data")]
        kind: String,
        /// local or eventual.
        #[arg(long, default_value = "local")]
        consistency: String,
    },
    /// Apply a state operation: OP is grow, add, set, write, insert, remove, put (KEY VALUE) or delete (KEY).
    Send {
        /// Store directory.
        #[arg(long, env = "REFEREE_NODE_DIR", default_value = "worknodes")]
        dir: PathBuf,
        /// The worknode.
        path: String,
        /// Operation.
        op: String,
        /// Field name.
        field: String,
        /// Operation arguments.
        args: Vec<String>,
        /// Idempotency key (a UUID, say): a send whose key the worknode already stored is not
        /// applied again, so a send retried after a lost answer counts once.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Show a worknode's state.
    Get {
        /// Store directory.
        #[arg(long, env = "REFEREE_NODE_DIR", default_value = "worknodes")]
        dir: PathBuf,
        /// The worknode.
        path: String,
    },
    /// List a subtree.
    Tree {
        /// Store directory.
        #[arg(long, env = "REFEREE_NODE_DIR", default_value = "worknodes")]
        dir: PathBuf,
        /// Subtree root.
        #[arg(default_value = "/")]
        path: String,
    },
}

/// Opens the system stored in `dir` (creating it), as the replica recorded in its `replica-id`
/// file (on first use: the replica of the store's own identity, see [`dir_identity`]).
pub fn open(dir: &Path) -> anyhow::Result<System> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let id_file = dir.join("replica-id");
    let replica = match std::fs::read_to_string(&id_file) {
        Ok(text) => text.trim().parse::<u64>().with_context(|| format!("{} is not a replica id", id_file.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => replica_of(&dir_identity(dir)?.id(), incarnation(dir)?),
        Err(e) => return Err(e).with_context(|| format!("reading {}", id_file.display())),
    };
    open_as(dir, replica)
}

/// Opens the system stored in `dir` as `replica`, which must be the replica the store was
/// first written by (recorded in its `replica-id` file): peers take a replica's changes only
/// from the identity it is derived from ([`replica_of`]), so a store served under another
/// identity could never replicate what it holds.
fn open_as(dir: &Path, replica: u64) -> anyhow::Result<System> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let id_file = dir.join("replica-id");
    match std::fs::read_to_string(&id_file) {
        Ok(text) => {
            let was =
                text.trim().parse::<u64>().with_context(|| format!("{} is not a replica id", id_file.display()))?;
            anyhow::ensure!(
                was == replica,
                "{} belongs to replica {was}, and this identity is replica {replica}: serve it with the identity it \
                 was first served with (peers take a replica's changes only from that identity)",
                dir.display()
            );
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_synced(&id_file, replica.to_string().as_bytes())
                .with_context(|| format!("writing {}", id_file.display()))?;
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", id_file.display())),
    }
    let store = EventStore::open(&dir.join("worknodes.redb"), StoreConfig::default())?;
    Ok(System::start(SystemConfig { replica, ..SystemConfig::default() }, Some(Arc::new(store)), None)?)
}

/// The store's incarnation, `<dir>/incarnation`: a random number picked when the store is
/// made, part of its replica id ([`replica_of`]), so a new store served under an identity that
/// served another never reuses that store's dots (peers that saw them would take new updates for
/// old ones).
pub fn incarnation(dir: &Path) -> anyhow::Result<u64> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("incarnation");
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u64>().with_context(|| format!("{} is not an incarnation", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let fresh = u64::from_le_bytes(uuid::Uuid::now_v7().as_bytes()[8..].try_into().unwrap_or([7; 8]));
            write_synced(&path, fresh.to_string().as_bytes()).with_context(|| format!("writing {}", path.display()))?;
            Ok(fresh)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The store's own identity, `<dir>/identity` (owner-only), made on first use.
pub fn dir_identity(dir: &Path) -> anyhow::Result<Identity> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    identity_file(&dir.join("identity"))
}

/// The identity in the file at `path`, made (owner-only) on first use.
pub fn identity_file(path: &Path) -> anyhow::Result<Identity> {
    if !path.exists() {
        let fresh = Identity::generate()?;
        match fresh.save_new(path) {
            Ok(()) => return Ok(fresh),
            // Made by a concurrent first use: load that one.
            Err(_) if path.exists() => {}
            Err(e) => return Err(e).with_context(|| format!("writing {}", path.display())),
        }
    }
    Identity::load(path).with_context(|| format!("loading identity {}", path.display()))
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

fn consistency(s: &str) -> anyhow::Result<Consistency> {
    Ok(match s {
        "local" => Consistency::Local,
        "eventual" => Consistency::Eventual,
        "strong" => Consistency::Strong,
        other => bail!("consistency {other:?} is not local, eventual or strong"),
    })
}

/// Parses `OP FIELD ARGS...` into a state operation.
pub fn parse_op(op: &str, args: &[String]) -> anyhow::Result<Op> {
    let arg = |i: usize| args.get(i).cloned().with_context(|| format!("operation {op} needs {} argument(s)", i + 1));
    let takes = if matches!(op, "put") { 2 } else { 1 };
    if args.len() > takes {
        bail!("operation {op} takes {takes} argument(s), not {}", args.len());
    }
    Ok(match op {
        "grow" => Op::Grow(arg(0)?.parse().context("grow takes a non-negative integer")?),
        "add" => Op::Add(arg(0)?.parse().context("add takes an integer")?),
        "set" => Op::Set(arg(0)?),
        "write" => Op::Write(arg(0)?),
        "insert" => Op::Insert(arg(0)?),
        "remove" => Op::Remove(arg(0)?),
        "put" => Op::Put(arg(0)?, arg(1)?),
        "delete" => Op::Delete(arg(0)?),
        other => bail!("unknown operation {other:?}: use grow, add, set, write, insert, remove, put or delete"),
    })
}

fn create(sys: &System, path: &str, kind: &str, cons: &str) -> anyhow::Result<WorknodeId> {
    let path: WnPath = path.parse()?;
    let (parent, name) = path.split_last().context("cannot create the root")?;
    Ok(sys.create(&Authority::System, &parent, name, kind, consistency(cons)?)?)
}

fn lookup(sys: &System, path: &str) -> anyhow::Result<WorknodeId> {
    let p: WnPath = path.parse()?;
    sys.resolve(&p).with_context(|| format!("no worknode at {p}"))
}

/// Starts a durable update: the completion resolves once it is committed.
fn send(
    sys: &System,
    key: Option<&str>,
    path: &str,
    op: &str,
    field: &str,
    args: &[String],
) -> anyhow::Result<Completion> {
    let id = lookup(sys, path)?;
    let ops = vec![(field.to_owned(), parse_op(op, args)?)];
    Ok(match key {
        Some(key) => sys.update_idempotent(&Authority::System, id, ops, key.as_bytes())?,
        None => sys.update(&Authority::System, id, ops)?,
    })
}

/// What a durable update reports.
fn committed(c: &Committed) -> serde_json::Value {
    serde_json::json!({ "durable": true, "seq": c.seq, "version": c.version, "duplicate": c.duplicate })
}

fn get(sys: &System, path: &str) -> anyhow::Result<serde_json::Value> {
    let id = lookup(sys, path)?;
    let v = sys.query(&Authority::System, id, Consistency::Local)?;
    Ok(serde_json::json!({
        "id": v.id.to_string(), "path": v.path.to_string(), "kind": v.kind, "version": v.version,
        "children": v.children, "consistency": format!("{:?}", v.consistency).to_lowercase(), "state": v.state.to_json(),
    }))
}

fn idle(sys: &System) -> anyhow::Result<()> {
    if !sys.wait_idle(Duration::from_secs(30)) {
        bail!("worknodes still busy after 30 s");
    }
    Ok(())
}

fn print(json: bool, value: &serde_json::Value) {
    if json {
        println!("{value}");
    } else {
        println!("{value:#}");
    }
}

/// Runs one `referee node` command.
pub fn run(cmd: NodeCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        NodeCommand::Serve { dir, listen, identity, peers, allow, allow_any } => {
            serve(&dir, &listen, identity.as_deref(), &peers, &allow, allow_any)
        }
        NodeCommand::Create { dir, path, kind, consistency } => {
            let sys = open(&dir)?;
            let id = create(&sys, &path, &kind, &consistency)?;
            print(json, &serde_json::json!({ "id": id.to_string(), "path": path }));
            Ok(())
        }
        NodeCommand::Send { dir, path, op, field, args, idempotency_key } => {
            let sys = open(&dir)?;
            let done = send(&sys, idempotency_key.as_deref(), &path, &op, &field, &args)?.wait()?;
            let mut view = get(&sys, &path)?;
            if let (Some(view), serde_json::Value::Object(commit)) = (view.as_object_mut(), committed(&done)) {
                view.extend(commit);
            }
            print(json, &view);
            Ok(())
        }
        NodeCommand::Get { dir, path } => {
            let sys = open(&dir)?;
            print(json, &get(&sys, &path)?);
            Ok(())
        }
        NodeCommand::Tree { dir, path } => {
            let sys = open(&dir)?;
            let entries = sys.tree(&Authority::System, &path.parse()?, usize::MAX)?;
            if json {
                let list: Vec<_> = entries
                    .iter()
                    .map(|e| serde_json::json!({ "id": e.id.to_string(), "path": e.path.to_string(), "kind": e.kind, "children": e.children }))
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                for e in entries {
                    println!("{}  {}  {} ({} children)", e.id, e.path, e.kind, e.children);
                }
            }
            Ok(())
        }
    }
}

fn parse_peer(s: &str) -> anyhow::Result<(Addr, PeerId)> {
    let (addr, id) = s.rsplit_once('@').with_context(|| format!("peer {s:?} is not ADDR@PEER_ID"))?;
    Ok((addr.parse()?, id.parse()?))
}

fn serve(
    dir: &Path,
    listen: &str,
    identity: Option<&Path>,
    peers: &[String],
    allow: &[String],
    allow_any: bool,
) -> anyhow::Result<()> {
    let identity = match identity {
        Some(p) => Identity::load(p).with_context(|| format!("loading identity {}", p.display()))?,
        None => dir_identity(dir)?,
    };
    let incarnation = incarnation(dir)?;
    let sys = Arc::new(open_as(dir, replica_of(&identity.id(), incarnation))?);
    // Audit: one line on stderr for the 1st, 2nd, 4th, 8th… refusal of each reason, so a flood
    // of forged changes cannot flood the log; `stats` answers the exact counts.
    sys.set_audit_sink(|r, n| {
        if n.is_power_of_two() {
            let line = serde_json::json!({
                "audit": "replication_refused", "code": r.code, "path": r.path, "detail": r.detail, "count": n,
            });
            eprintln!("{line}");
        }
    });
    let mut allowed = if allow_any { AllowList::allow_any() } else { AllowList::new([]) };
    for a in allow {
        allowed.insert(a.parse()?);
    }
    let mut dial = peers.iter().map(|p| parse_peer(p)).collect::<anyhow::Result<Vec<_>>>()?;
    for (_, id) in &dial {
        allowed.insert(*id);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let (node, inbox) = Node::new(identity, allowed, Config::default());
        let listener = node.listen(&listen.parse()?).await?;
        let repl = Replicator::start(sys.clone(), node.clone(), inbox, incarnation)?;
        for (addr, id) in dial.drain(..) {
            repl.add_peer(addr, id);
        }
        println!("{}", serde_json::json!({ "listening": listener.local_addr().to_string(), "id": node.id().to_string(), "replica": sys.replica(), "incarnation": incarnation }));
        // Bounded: while sends wait for durability the loop stops taking lines, this channel
        // fills, the reader blocks and the writer on the other end of the pipe with it.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(64);
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = Vec::new();
            loop {
                buf.clear();
                // A line is at most MAX_LINE bytes: the rest of a longer one is skipped, not held.
                match (&mut stdin).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = if buf.len() > MAX_LINE && !buf.ends_with(b"\n") {
                    let mut skipped = buf.len();
                    loop {
                        let chunk = match stdin.fill_buf() {
                            Ok([]) | Err(_) => break,
                            Ok(chunk) => chunk,
                        };
                        let (n, end) = chunk.iter().position(|b| *b == b'\n').map_or((chunk.len(), false), |i| (i + 1, true));
                        stdin.consume(n);
                        skipped += n;
                        if end {
                            break;
                        }
                    }
                    format!("too-long {skipped}")
                } else {
                    String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']).to_owned()
                };
                if tx.blocking_send(line).is_err() {
                    break;
                }
            }
        });
        // Sends waiting for durability, answered in order as they complete.
        let mut pending: VecDeque<Completion> = VecDeque::new();
        loop {
            tokio::select! {
                biased;
                done = async {
                    match pending.front_mut() {
                        Some(first) => first.await,
                        None => std::future::pending().await,
                    }
                }, if !pending.is_empty() => {
                    pending.pop_front();
                    answer_send(done);
                }
                line = rx.recv(), if pending.len() < MAX_PENDING => {
                    let Some(line) = line else { break };
                    let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
                    let started = match words.first().map(String::as_str) {
                        Some("send") => Some(start_send(&sys, None, words.get(1..).unwrap_or_default())),
                        Some("send-key") => {
                            let key = words.get(1).map(String::as_str).context("missing argument");
                            Some(key.and_then(|k| start_send(&sys, Some(k), words.get(2..).unwrap_or_default())))
                        }
                        _ => None,
                    };
                    match started {
                        Some(Ok(c)) => pending.push_back(c),
                        Some(Err(e)) => {
                            drain(&mut pending).await;
                            answer(Err(e));
                        }
                        None => {
                            // Answers stay in order, and a read sees every earlier write.
                            drain(&mut pending).await;
                            answer(control(&sys, &repl, &words).await);
                        }
                    }
                }
            }
        }
        drain(&mut pending).await;
        anyhow::Ok(())
    })
}

/// Prints one reply line.
fn answer(reply: anyhow::Result<serde_json::Value>) {
    let out = match reply {
        Ok(v) => serde_json::json!({ "ok": v }),
        Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
    };
    println!("{out}");
}

/// Prints the reply line of a send.
fn answer_send(done: Result<Committed, crate::WriteError>) {
    answer(done.map(|c| committed(&c)).map_err(anyhow::Error::from));
}

/// Waits for every pending send, answering each in order.
async fn drain(pending: &mut VecDeque<Completion>) {
    while let Some(c) = pending.pop_front() {
        answer_send(c.await);
    }
}

/// Starts `PATH OP FIELD [ARGS]` as a durable update.
fn start_send(sys: &System, key: Option<&str>, words: &[String]) -> anyhow::Result<Completion> {
    let w = |i: usize| words.get(i).map(String::as_str).context("missing argument");
    send(sys, key, w(0)?, w(1)?, w(2)?, words.get(3..).unwrap_or_default())
}

async fn control(sys: &Arc<System>, repl: &Arc<Replicator>, words: &[String]) -> anyhow::Result<serde_json::Value> {
    let w = |i: usize| words.get(i).map(String::as_str).context("missing argument");
    match w(0)? {
        "create" => Ok(serde_json::json!(create(sys, w(1)?, w(2)?, w(3)?)?.to_string())),
        "get" => get(sys, w(1)?),
        "peer" => {
            repl.add_peer(w(1)?.parse()?, w(2)?.parse()?);
            Ok(serde_json::json!(true))
        }
        "isolate" => {
            repl.isolate().await;
            Ok(serde_json::json!(true))
        }
        "heal" => {
            repl.heal();
            Ok(serde_json::json!(true))
        }
        "idle" => {
            let sys = sys.clone();
            tokio::task::spawn_blocking(move || idle(&sys)).await??;
            Ok(serde_json::json!(true))
        }
        "stats" => {
            let s = sys.stats();
            Ok(serde_json::json!({
                "handled": s.handled, "restarts": s.restarts, "rejected": s.rejected, "refused": sys.refusals(),
                "sync": repl.stats(),
            }))
        }
        "too-long" => bail!("a command line of {} bytes is longer than the limit, {MAX_LINE}: skipped", w(1)?),
        other => bail!("unknown command {other:?}: create, send, send-key, get, peer, isolate, heal, idle or stats"),
    }
}
