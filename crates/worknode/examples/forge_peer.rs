//! A hostile replication peer for attack tests: connects to a `referee node serve` replica as an
//! allowed peer (a fresh identity), prints every message the replica sends as one JSON line
//! `{"recv": "<hex of the MessagePack Wire>"}`, and sends every stdin line (hex of a MessagePack
//! payload, normally a `Wire`) as one message. Ends when stdin closes (after a short linger).
//!
//! ```text
//! cargo run --release -p referee-worknode --example forge_peer -- tcp://127.0.0.1:7400 <PEER_ID>
//! ```
//!
//! `FORGE_IDENTITY=PATH` uses (or creates) that identity file instead of a fresh identity, so
//! the peer keeps one replica id across runs; the first stderr line is
//! `{"id": "<PEER_ID>", "replica": N}`: a replica takes from this peer's plain `Deltas` only
//! updates made as `N` (incarnation 0; a `Sync` or `Signed` names its own incarnation).
//!
//! The MessagePack layout is `rmp-serde`'s default (structs as arrays, enums as
//! `{variant: value}`). On connection the replica sends `Digests` (`{"Digests": [[[path,
//! [16 digest bytes]], …]]}`); send `{"Want": [[path, …]]}` to be sent those states (`Sync`),
//! and decode one to see the layout.
//!
//! A line `sign INCARNATION SEQ PREV HEX` sends the `Deltas` encoding `HEX` (or a `Sync`, as a
//! replica signs its own state when it starts) signed by this peer (`Wire::Signed`, with that
//! incarnation and stamp, whatever they are), as a replica signs its own changes; a replica keeps those it merged and sends them on to peers whose `Have` lacks
//! them (`{"Have": [[[author replica, [[lo, hi], …]], …], done]]}`).

use std::io::BufRead as _;
use std::time::Duration;

use anyhow::Context as _;
use referee_comm::{AllowList, Config, ConnectOptions, Identity, Node};
use referee_worknode::replication::{Stamp, Wire};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().context("usage: forge_peer ADDR PEER_ID")?;
    let peer = args.next().context("usage: forge_peer ADDR PEER_ID")?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let identity = match std::env::var_os("FORGE_IDENTITY") {
            Some(path) => referee_worknode::cli::identity_file(std::path::Path::new(&path))?,
            None => Identity::generate()?,
        };
        let id = identity.id();
        eprintln!(
            "{}",
            serde_json::json!({ "id": id.to_string(), "replica": referee_worknode::replication::replica_of(&id, 0) })
        );
        let signer = identity.clone();
        let (node, mut inbox) = Node::new(identity, AllowList::allow_any(), Config::default());
        let conn = node.connect_with(&addr.parse()?, ConnectOptions::default().expect_peer(peer.parse()?)).await?;
        tokio::spawn(async move {
            while let Some(msg) = inbox.recv().await {
                println!("{}", serde_json::json!({ "recv": hex::encode(msg.payload()) }));
            }
        });
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                let line = match signed(&signer, &line) {
                    Ok(Some(bytes)) => hex::encode(bytes),
                    Ok(None) => line,
                    Err(e) => {
                        eprintln!("bad sign line: {e}");
                        continue;
                    }
                };
                match hex::decode(line.trim()) {
                    Ok(bytes) => {
                        if tx.blocking_send(bytes).is_err() {
                            break;
                        }
                    }
                    Err(e) => eprintln!("not hex: {e}"),
                }
            }
        });
        let mut sent = 0u64;
        while let Some(bytes) = rx.recv().await {
            conn.send(bytes).await?;
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        eprintln!("{}", serde_json::json!({ "sent": sent }));
        anyhow::Ok(())
    })
}

/// `sign INCARNATION SEQ PREV HEX`: the signed message; `None` for any other line.
fn signed(identity: &Identity, line: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let mut words = line.split_whitespace();
    if words.next() != Some("sign") {
        return Ok(None);
    }
    let mut num = || -> anyhow::Result<u64> { Ok(words.next().context("missing number")?.parse()?) };
    let (incarnation, seq, prev) = (num()?, num()?, num()?);
    let body = hex::decode(words.next().context("missing HEX")?)?;
    let deltas = Wire::from_bytes(&body).context("HEX is not a Wire")?;
    let stamp = Stamp { seq, prev };
    Ok(Some(Wire::signed_at(identity.id(), incarnation, stamp, &deltas, |d, m| identity.sign(d, m)).to_bytes()))
}
