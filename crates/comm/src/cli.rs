//! `referee comm ...`: the mesh from a shell. The binary wires [`CommCommand`] into its grammar and
//! calls [`run`]; this module builds its own tokio runtime. `anyhow` is used here only (CLI edge).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;

use crate::bench::{self, BenchOptions};
use crate::{Addr, AllowList, Config, ConnectOptions, Identity, Node, PeerId};

/// Where a message goes and who sends it (shared by `send` and `request`).
#[derive(Debug, clap::Args)]
pub struct Outgoing {
    /// Address of the peer.
    pub addr: String,
    /// Message text.
    pub message: String,
    /// The peer's id (required: we only talk to the node we expect).
    #[arg(long, value_name = "PEER_ID")]
    pub to: String,
    /// Identity file (default: a fresh ephemeral identity).
    #[arg(long, env = "REFEREE_COMM_IDENTITY")]
    pub identity: Option<PathBuf>,
}

impl Outgoing {
    /// Loads the identity, parses the peer id and connects.
    async fn connect(&self) -> anyhow::Result<(crate::Connection, PeerId)> {
        let id = load_or_ephemeral(self.identity.as_deref())?;
        let to = peer(&self.to)?;
        Ok((connect(id, &self.addr, to).await?, to))
    }
}

/// `referee comm` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CommCommand {
    /// Create a new node identity file (Ed25519 + Noise static key), owner-only; prints its id.
    Keygen {
        /// Where to write the identity (never overwritten).
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Print the id of an identity file.
    Id {
        /// Identity file.
        #[arg(long, env = "REFEREE_COMM_IDENTITY")]
        identity: PathBuf,
    },
    /// Listen on one or more addresses; print messages, echo requests back.
    Listen {
        /// tcp://HOST:PORT, unix:///PATH or quic://HOST:PORT (several allowed).
        #[arg(required = true)]
        addrs: Vec<String>,
        /// Identity file (default: a fresh ephemeral identity).
        #[arg(long, env = "REFEREE_COMM_IDENTITY")]
        identity: Option<PathBuf>,
        /// Peer id allowed to connect (repeat for several).
        #[arg(long = "allow", value_name = "PEER_ID")]
        allow: Vec<String>,
        /// Allow any peer that proves its identity (still encrypted and authenticated).
        #[arg(long)]
        allow_any: bool,
        /// Exit after this many messages/requests.
        #[arg(long)]
        max_messages: Option<u64>,
    },
    /// Send one-way messages to a peer.
    Send {
        /// Peer, message and identity.
        #[command(flatten)]
        target: Outgoing,
        /// Send the message this many times.
        #[arg(long, default_value_t = 1)]
        count: u64,
    },
    /// Send a request and print the reply.
    Request {
        /// Peer, message and identity.
        #[command(flatten)]
        target: Outgoing,
        /// Reply timeout in milliseconds.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Measure round-trip latency, one-way throughput and memory per idle connection.
    Bench {
        /// Sequential 64-byte request/reply round trips per transport.
        #[arg(long, default_value_t = 20_000)]
        rtt_samples: usize,
        /// One-way 64-byte messages per transport.
        #[arg(long, default_value_t = 2_000_000)]
        messages: u64,
        /// Idle connections held for the memory measurement (0 skips it).
        #[arg(long, default_value_t = 1000)]
        idle_connections: usize,
        /// Transports (unix, tcp, quic).
        #[arg(long, value_delimiter = ',', default_value = "unix,tcp")]
        transports: Vec<String>,
        /// Run both ends on a single-threaded runtime (no cross-thread wake-ups).
        #[arg(long)]
        current_thread: bool,
    },
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")
}

fn load_or_ephemeral(path: Option<&Path>) -> anyhow::Result<Identity> {
    match path {
        Some(p) => Identity::load(p).with_context(|| format!("loading identity {}", p.display())),
        None => Ok(Identity::generate()?),
    }
}

fn peer(s: &str) -> anyhow::Result<PeerId> {
    Ok(s.parse::<PeerId>()?)
}

fn print(json: bool, value: serde_json::Value, text: String) {
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

/// Runs one `referee comm` subcommand to completion.
pub fn run(cmd: CommCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        CommCommand::Keygen { out } => {
            let id = Identity::generate()?;
            id.save_new(&out)?;
            print(
                json,
                serde_json::json!({"id": id.id().to_string(), "path": out.display().to_string()}),
                format!("wrote {} (id {})", out.display(), id.id()),
            );
            Ok(())
        }
        CommCommand::Id { identity } => {
            let id = Identity::load(&identity)?;
            print(
                json,
                serde_json::json!({"id": id.id().to_string(), "noise_static": hex::encode(id.noise_public())}),
                id.id().to_string(),
            );
            Ok(())
        }
        CommCommand::Listen { addrs, identity, allow, allow_any, max_messages } => {
            let id = load_or_ephemeral(identity.as_deref())?;
            let allow = if allow_any {
                AllowList::allow_any()
            } else {
                anyhow::ensure!(!allow.is_empty(), "nobody may connect: pass --allow PEER_ID (or --allow-any)");
                AllowList::new(allow.iter().map(|s| peer(s)).collect::<anyhow::Result<Vec<_>>>()?)
            };
            runtime()?.block_on(listen(id, allow, &addrs, max_messages, json))
        }
        CommCommand::Send { target, count } => runtime()?.block_on(async move {
            let (conn, to) = target.connect().await?;
            let payload = Bytes::from(target.message.into_bytes());
            for _ in 0..count {
                conn.send(payload.clone()).await?;
            }
            conn.close("done").await;
            print(json, serde_json::json!({"sent": count, "to": to.to_string()}), format!("sent {count} to {to}"));
            Ok(())
        }),
        CommCommand::Request { target, timeout_ms } => runtime()?.block_on(async move {
            let (conn, to) = target.connect().await?;
            let reply = conn.request(target.message.into_bytes(), Duration::from_millis(timeout_ms)).await?;
            let text = String::from_utf8_lossy(&reply).into_owned();
            print(json, serde_json::json!({"reply": text, "from": to.to_string()}), text.clone());
            conn.close("done").await;
            Ok(())
        }),
        CommCommand::Bench { rtt_samples, messages, idle_connections, transports, current_thread } => {
            let opts = BenchOptions { rtt_samples, messages, idle_connections, transports };
            let rt = if current_thread {
                tokio::runtime::Builder::new_current_thread().enable_all().build()?
            } else {
                runtime()?
            };
            let rows = rt.block_on(bench::run_all(&opts))?;
            if json {
                println!("{}", serde_json::to_string(&rows)?);
            } else {
                print!("{}", bench::table(&rows));
            }
            Ok(())
        }
    }
}

async fn connect(id: Identity, addr: &str, to: PeerId) -> anyhow::Result<crate::Connection> {
    let addr: Addr = addr.parse()?;
    let (node, _inbox) = Node::new(id, AllowList::new([to]), Config::default());
    Ok(node.connect_with(&addr, ConnectOptions::default().expect_peer(to)).await?)
}

/// Bytes of each message `comm listen` prints (the JSON form says the full length in `len`).
const PRINTED: usize = 4096;

async fn listen(id: Identity, allow: AllowList, addrs: &[String], max: Option<u64>, json: bool) -> anyhow::Result<()> {
    let me = id.id();
    let (node, mut inbox) = Node::new(id, allow, Config::default());
    let mut listeners = Vec::new();
    for a in addrs {
        let l = node.listen(&a.parse()?).await?;
        print(
            json,
            serde_json::json!({"listening": l.local_addr().to_string(), "id": me.to_string()}),
            format!("listening on {} as {me}", l.local_addr()),
        );
        listeners.push(l);
    }
    let mut seen = 0u64;
    let mut replies = tokio::task::JoinSet::new();
    while let Some(m) = inbox.recv().await {
        let kind = if m.is_request() { "request" } else { "message" };
        // At most PRINTED bytes are shown: a 16 MiB message is not copied twice to be printed.
        let len = m.payload().len();
        let shown = m.payload().get(..len.min(PRINTED)).unwrap_or_default();
        let text = String::from_utf8_lossy(shown).into_owned();
        let more = if len > PRINTED { format!(" … ({len} bytes)") } else { String::new() };
        print(
            json,
            serde_json::json!({"from": m.from().to_string(), "kind": kind, "payload": text, "len": len}),
            format!("{} {kind}: {text}{more}", m.from().short()),
        );
        // Replied from its own task: a peer that stops reading fills only its own queue (and is
        // disconnected after `Config::write_timeout`); the loop goes on serving everyone else.
        if m.is_request() {
            let p = m.payload().clone();
            replies.spawn(async move {
                let _ = m.reply(p).await;
            });
        }
        while replies.try_join_next().is_some() {}
        seen += 1;
        if max.is_some_and(|max| seen >= max) {
            break;
        }
    }
    // Queued replies go out before the close (each is bounded by `Config::write_timeout`).
    while replies.join_next().await.is_some() {}
    node.close_all("listener exiting").await;
    Ok(())
}
