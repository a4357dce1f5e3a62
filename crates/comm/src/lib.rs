//! neural-comm: Noise-encrypted, mutually authenticated messaging between referee nodes over TCP,
//! Unix domain sockets and QUIC, with rekeying, replay protection, request/reply and pub/sub.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use referee_comm::{Addr, AllowList, Config, Identity, Node};
//!
//! let (server_id, client_id) = (Identity::generate()?, Identity::generate()?);
//! let (server, mut inbox) = Node::new(server_id.clone(), AllowList::new([client_id.id()]), Config::default());
//! let listener = server.listen(&"tcp://127.0.0.1:0".parse()?).await?;
//! tokio::spawn(async move {
//!     while let Some(msg) = inbox.recv().await {
//!         let echo = msg.payload().clone();
//!         let _ = msg.reply(echo).await;
//!     }
//! });
//! let (client, _inbox) = Node::new(client_id, AllowList::new([server_id.id()]), Config::default());
//! let conn = client.connect(listener.local_addr()).await?;
//! let reply = conn.request(&b"ping"[..], Duration::from_secs(1)).await?;
//! assert_eq!(&reply[..], b"ping");
//! # Ok(()) }
//! ```
//!
//! Core concepts, one per type:
//! - [`Identity`]: an Ed25519 key bound (by signature) to a Noise X25519 static key. Secret;
//!   saved as an owner-only file. [`PeerId`] is its public half, printed as 64 hex digits.
//! - [`AllowList`]: the identities that may complete a handshake with a node. Checked on both
//!   sides during the handshake (and against the TLS certificate on QUIC).
//! - [`Node`]: one identity + allow-list + [`Config`]; cheap to clone, `Send + Sync`. Listens
//!   ([`Node::listen`]) and connects ([`Node::connect`], reused, retried with backoff, IK when the
//!   peer's static key is known). Messages and requests for the node arrive on its [`Inbox`].
//! - [`Connection`]: one authenticated encrypted channel; cheap clone. `send`, `request` with a
//!   timeout, `subscribe`, `publish`. Two tasks per connection; bounded queues give backpressure.
//! - [`frame`]: the pure wire format (frames, records, envelopes), fuzzed. `docs/comm.md` is the
//!   specification.
//!
//! Errors are typed per operation ([`HandshakeError`], [`ConnectionError`], [`SendError`],
//! [`RequestError`], [`ConnectError`]). No input from the network can panic the node.

#![deny(missing_docs)]

mod admission;
pub mod bench;
mod budget;
pub mod cli;
mod config;
mod conn;
mod error;
pub mod frame;
mod handshake;
mod identity;
mod node;
mod noise;
mod quic;

pub use config::{Backoff, Config};
pub use conn::{ConnStats, Connection, Incoming, Subscription};
pub use error::{ConnectError, ConnectionError, FrameError, HandshakeError, IdentityError, RequestError, SendError};
pub use handshake::{IK_TIMESTAMP_LEN, PREAMBLE_MAGIC, PREAMBLE_VERSION, PeerInfo};
pub use identity::{AllowList, BINDING_LABEL, HELLO_LEN, HELLO_MAGIC, Identity, PeerId};
pub use node::{Addr, ConnectOptions, Event, Inbox, Listener, Node};
