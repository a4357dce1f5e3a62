//! The node: identity + allow-list + configuration, listeners, outgoing connections (reused,
//! retried with backoff, IK when the peer's static key is known), publish fan-out and events.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

use crate::admission::Admission;
use crate::budget::Budgets;
use crate::config::Config;
use crate::conn::{BoxRead, BoxWrite, Connection, Incoming, Wiring};
use crate::error::{ConnectError, HandshakeError};
use crate::handshake::{self, Expect, ReplayGuard};
use crate::identity::{AllowList, Identity, PeerId};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where to listen or connect: `tcp://HOST:PORT`, `unix:///PATH` or `quic://HOST:PORT`.
/// A bare `HOST:PORT` means TCP and a bare `/PATH` a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Addr {
    /// TCP `host:port`.
    Tcp(String),
    /// Unix domain socket path.
    Unix(PathBuf),
    /// QUIC over UDP `host:port`.
    Quic(String),
}

impl FromStr for Addr {
    type Err = ConnectError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConnectError::BadAddress(s.to_owned());
        if let Some(rest) = s.strip_prefix("tcp://") {
            (!rest.is_empty()).then(|| Addr::Tcp(rest.to_owned())).ok_or_else(bad)
        } else if let Some(rest) = s.strip_prefix("unix://") {
            (!rest.is_empty()).then(|| Addr::Unix(PathBuf::from(rest))).ok_or_else(bad)
        } else if let Some(rest) = s.strip_prefix("quic://") {
            (!rest.is_empty()).then(|| Addr::Quic(rest.to_owned())).ok_or_else(bad)
        } else if s.starts_with('/') || s.starts_with("./") {
            Ok(Addr::Unix(PathBuf::from(s)))
        } else if s.contains(':') && !s.contains("://") {
            Ok(Addr::Tcp(s.to_owned()))
        } else {
            Err(bad())
        }
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Tcp(a) => write!(f, "tcp://{a}"),
            Addr::Unix(p) => write!(f, "unix://{}", p.display()),
            Addr::Quic(a) => write!(f, "quic://{a}"),
        }
    }
}

/// Something that happened on the node (for logs, metrics and tests). Delivered on a bounded
/// broadcast channel: a slow observer misses old events rather than slowing the node.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A handshake succeeded.
    Connected {
        /// The verified peer.
        peer: PeerId,
        /// Remote address.
        remote: String,
        /// Whether the peer connected to us.
        inbound: bool,
    },
    /// An inbound connection was refused (bad preamble, unknown peer, MITM, timeout, limits).
    Refused {
        /// Remote address.
        remote: String,
        /// Why.
        reason: String,
    },
    /// An outgoing connection attempt failed with an I/O error and will be retried.
    Retrying {
        /// Address being dialled.
        remote: String,
        /// Attempt that failed (1-based).
        attempt: u32,
        /// Why it failed.
        reason: String,
    },
    /// An established connection closed.
    Closed {
        /// The peer.
        peer: PeerId,
        /// Remote address.
        remote: String,
        /// Why.
        reason: String,
    },
}

/// Options for [`Node::connect_with`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// Refuse any responder but this identity.
    pub expect_peer: Option<PeerId>,
    /// The responder's Noise static key: use IK and do not fall back to XX.
    pub remote_static: Option<[u8; 32]>,
    /// Return an existing live connection to the same address (default true).
    pub reuse: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self { expect_peer: None, remote_static: None, reuse: true }
    }
}

impl ConnectOptions {
    /// Expect this responder identity.
    pub fn expect_peer(mut self, id: PeerId) -> Self {
        self.expect_peer = Some(id);
        self
    }
    /// Use IK with this responder static key.
    pub fn remote_static(mut self, key: [u8; 32]) -> Self {
        self.remote_static = Some(key);
        self
    }
    /// Whether to reuse an existing connection.
    pub fn reuse(mut self, reuse: bool) -> Self {
        self.reuse = reuse;
        self
    }
}

/// Messages and requests addressed to this node, from all its connections (bounded; when full,
/// connections stop reading and their peers feel backpressure).
#[derive(Debug)]
pub struct Inbox {
    rx: mpsc::Receiver<Incoming>,
}

impl Inbox {
    /// The next message or request; `None` once the node is dropped.
    pub async fn recv(&mut self) -> Option<Incoming> {
        self.rx.recv().await
    }
}

pub(crate) struct NodeInner {
    pub(crate) identity: Identity,
    pub(crate) allow: AllowList,
    pub(crate) cfg: Arc<Config>,
    inbox: mpsc::Sender<Incoming>,
    events: broadcast::Sender<Event>,
    conns: Mutex<HashMap<u64, Connection>>,
    by_addr: Mutex<HashMap<Addr, Connection>>,
    statics: Mutex<HashMap<Addr, (PeerId, [u8; 32])>>,
    next_conn: AtomicU64,
    /// Connections per authenticated peer (for `Config::max_connections_per_peer`).
    per_peer: Mutex<HashMap<PeerId, usize>>,
    pub(crate) admission: Arc<Admission>,
    replay: ReplayGuard,
    budgets: Budgets,
    pub(crate) quic: Mutex<Option<quinn::Endpoint>>,
}

/// Attempts in all for a handshake the responder cut off without a reason.
const HANDSHAKE_RETRIES: u32 = 4;

/// A mesh node. Cheap to clone; all clones share connections.
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<NodeInner>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node").field("id", &self.inner.identity.id()).finish_non_exhaustive()
    }
}

/// A bound listener; dropping it stops accepting (established connections stay up).
#[derive(Debug)]
pub struct Listener {
    local: Addr,
    task: JoinHandle<()>,
    unix_path: Option<PathBuf>,
}

impl Listener {
    /// The bound address (with the real port when you asked for port 0).
    pub fn local_addr(&self) -> &Addr {
        &self.local
    }
}

pub(crate) fn listener(local: Addr, task: JoinHandle<()>) -> Listener {
    Listener { local, task, unix_path: None }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Node {
    /// A node with this identity, allow-list and configuration, and its inbox.
    pub fn new(identity: Identity, allow: AllowList, cfg: Config) -> (Node, Inbox) {
        let cfg = Arc::new(cfg.normalized());
        let (tx, rx) = mpsc::channel(cfg.inbox_capacity);
        let (events, _) = broadcast::channel(1024);
        let inner = NodeInner {
            identity,
            allow,
            admission: Arc::new(Admission::new(cfg.max_handshakes, cfg.max_handshakes_per_source)),
            replay: ReplayGuard::new(cfg.ik_replay_window),
            budgets: Budgets::new(&cfg),
            per_peer: Mutex::new(HashMap::new()),
            cfg,
            inbox: tx,
            events,
            conns: Mutex::new(HashMap::new()),
            by_addr: Mutex::new(HashMap::new()),
            statics: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            quic: Mutex::new(None),
        };
        (Node { inner: Arc::new(inner) }, Inbox { rx })
    }

    /// This node's identity.
    pub fn id(&self) -> PeerId {
        self.inner.identity.id()
    }

    /// The identities that may connect to this node.
    pub fn allow_list(&self) -> &AllowList {
        &self.inner.allow
    }

    /// Signs `msg` for `domain` with this node's identity ([`Identity::sign`]).
    pub fn sign(&self, domain: &str, msg: &[u8]) -> [u8; 64] {
        self.inner.identity.sign(domain, msg)
    }

    /// Subscribes to node events (connections, refusals, closes).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Live connections.
    pub fn connections(&self) -> Vec<Connection> {
        lock(&self.inner.conns).values().cloned().collect()
    }

    /// Binds and starts accepting on `addr` (port 0 picks a free port).
    pub async fn listen(&self, addr: &Addr) -> Result<Listener, ConnectError> {
        let io_err = |source| ConnectError::Bind { addr: addr.to_string(), source };
        match addr {
            Addr::Tcp(a) => {
                let l = TcpListener::bind(a).await.map_err(io_err)?;
                let local = Addr::Tcp(l.local_addr().map_err(io_err)?.to_string());
                let weak = Arc::downgrade(&self.inner);
                let task = tokio::spawn(async move {
                    loop {
                        let Ok((s, remote)) = l.accept().await else {
                            // Out of descriptors or similar: pause accepting briefly instead of spinning.
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                            continue;
                        };
                        let _ = s.set_nodelay(true);
                        let Some(node) = weak.upgrade() else { return };
                        let source = remote.ip().to_string();
                        spawn_responder(node, s, remote.to_string(), source, |s: TcpStream| {
                            let (r, w) = s.into_split();
                            (Box::new(r) as BoxRead, Box::new(w) as BoxWrite)
                        });
                    }
                });
                Ok(Listener { local, task, unix_path: None })
            }
            Addr::Unix(path) => {
                let l = UnixListener::bind(path).map_err(io_err)?;
                let weak = Arc::downgrade(&self.inner);
                let shown = path.display().to_string();
                let task = tokio::spawn(async move {
                    loop {
                        let Ok((s, _)) = l.accept().await else {
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                            continue;
                        };
                        let Some(node) = weak.upgrade() else { return };
                        // Local peers are told apart by user id (a Unix socket has no address).
                        let source = s.peer_cred().map_or_else(|_| "unix".to_owned(), |c| format!("uid {}", c.uid()));
                        spawn_responder(node, s, shown.clone(), source, |s: UnixStream| {
                            let (r, w) = s.into_split();
                            (Box::new(r) as BoxRead, Box::new(w) as BoxWrite)
                        });
                    }
                });
                Ok(Listener { local: addr.clone(), task, unix_path: Some(path.clone()) })
            }
            Addr::Quic(a) => crate::quic::listen(self, a).await,
        }
    }

    /// Connects (or reuses a live connection) to `addr`, retrying I/O failures with backoff.
    pub async fn connect(&self, addr: &Addr) -> Result<Connection, ConnectError> {
        self.connect_with(addr, ConnectOptions::default()).await
    }

    /// [`Node::connect`] with options.
    pub async fn connect_with(&self, addr: &Addr, opts: ConnectOptions) -> Result<Connection, ConnectError> {
        if opts.reuse {
            let existing = lock(&self.inner.by_addr).get(addr).cloned();
            if let Some(c) = existing
                && !c.is_closed()
                && opts.expect_peer.is_none_or(|p| p == c.peer().id)
            {
                return Ok(c);
            }
        }
        let cached = lock(&self.inner.statics).get(addr).copied();
        let mut expect = Expect { remote_static: opts.remote_static, peer: opts.expect_peer };
        let mut from_cache = false;
        if expect.remote_static.is_none()
            && let Some((id, key)) = cached
            && expect.peer.is_none_or(|p| p == id)
        {
            expect.remote_static = Some(key);
            from_cache = true;
        }
        let backoff = self.inner.cfg.reconnect;
        let mut attempt = 1;
        loop {
            match self.dial(addr, expect).await {
                Ok(conn) => {
                    lock(&self.inner.statics).insert(addr.clone(), (conn.peer().id, conn.peer().noise_static));
                    lock(&self.inner.by_addr).insert(addr.clone(), conn.clone());
                    return Ok(conn);
                }
                Err(ConnectError::Handshake { .. }) if from_cache => {
                    // The peer's static key changed since we cached it: forget it, do a full XX.
                    lock(&self.inner.statics).remove(addr);
                    expect.remote_static = None;
                    from_cache = false;
                }
                Err(ConnectError::Io { addr: a, source }) => {
                    if attempt >= backoff.attempts {
                        return Err(ConnectError::Io { addr: a, source });
                    }
                    emit(&self.inner, Event::Retrying { remote: a, attempt, reason: source.to_string() });
                    tokio::time::sleep(backoff.delay(attempt)).await;
                    attempt += 1;
                }
                // Cut off mid-handshake without a reason (a busy responder evicts handshakes
                // under a flood): retried like a failed dial, a few times.
                Err(ConnectError::Handshake {
                    addr: a,
                    source: source @ (HandshakeError::Io(_) | HandshakeError::PeerClosed),
                }) => {
                    if attempt >= backoff.attempts.min(HANDSHAKE_RETRIES) {
                        return Err(ConnectError::Handshake { addr: a, source });
                    }
                    emit(&self.inner, Event::Retrying { remote: a, attempt, reason: source.to_string() });
                    tokio::time::sleep(backoff.delay(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn dial(&self, addr: &Addr, expect: Expect) -> Result<Connection, ConnectError> {
        let io_err = |source| ConnectError::Io { addr: addr.to_string(), source };
        match addr {
            Addr::Tcp(a) => {
                let s = TcpStream::connect(a).await.map_err(io_err)?;
                let _ = s.set_nodelay(true);
                self.initiate(s, addr, expect, |s: TcpStream| {
                    let (r, w) = s.into_split();
                    (Box::new(r) as BoxRead, Box::new(w) as BoxWrite)
                })
                .await
            }
            Addr::Unix(p) => {
                let s = UnixStream::connect(p).await.map_err(io_err)?;
                self.initiate(s, addr, expect, |s: UnixStream| {
                    let (r, w) = s.into_split();
                    (Box::new(r) as BoxRead, Box::new(w) as BoxWrite)
                })
                .await
            }
            Addr::Quic(a) => crate::quic::dial(self, a, addr, expect).await,
        }
    }

    pub(crate) async fn initiate<S>(
        &self,
        mut s: S,
        addr: &Addr,
        expect: Expect,
        split: impl FnOnce(S) -> (BoxRead, BoxWrite),
    ) -> Result<Connection, ConnectError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let inner = &self.inner;
        let hs_err = |source| ConnectError::Handshake { addr: addr.to_string(), source };
        let t = inner.cfg.handshake_timeout;
        let est =
            tokio::time::timeout(t, handshake::initiate(&mut s, &inner.identity, &inner.allow, expect, &inner.cfg))
                .await
                .map_err(|_| hs_err(HandshakeError::Timeout(t)))?
                .map_err(hs_err)?;
        let (r, w) = split(s);
        let wiring = wiring(inner, est.peer.id);
        let conn = Connection::spawn(r, w, est, addr.to_string(), wiring, |c| register(&self.inner, c.clone(), false));
        Ok(conn)
    }

    /// Publishes on `topic` to every connected peer that subscribed to it; returns how many.
    pub async fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> usize {
        let payload = payload.into();
        let targets: Vec<Connection> =
            lock(&self.inner.conns).values().filter(|c| c.peer_subscribed(topic)).cloned().collect();
        let mut n = 0;
        for c in targets {
            if matches!(c.publish(topic, payload.clone()).await, Ok(true)) {
                n += 1;
            }
        }
        n
    }

    /// Closes every connection in order (queued messages are sent first).
    pub async fn close_all(&self, reason: &str) {
        for c in self.connections() {
            c.close(reason).await;
        }
    }
}

pub(crate) fn emit(inner: &NodeInner, e: Event) {
    let _ = inner.events.send(e);
}

/// What a new connection to `peer` is plugged into.
fn wiring(inner: &NodeInner, peer: PeerId) -> Wiring {
    Wiring { cfg: inner.cfg.clone(), inbox: inner.inbox.clone(), budgets: inner.budgets.for_peer(peer) }
}

/// Lowers `peer`'s connection count by one.
fn forget_peer_conn(per_peer: &mut HashMap<PeerId, usize>, peer: PeerId) {
    match per_peer.get_mut(&peer) {
        Some(n) if *n > 1 => *n -= 1,
        _ => {
            per_peer.remove(&peer);
        }
    }
}

/// Registers a new connection and removes it again when it closes.
fn register(inner: &Arc<NodeInner>, conn: Connection, inbound: bool) {
    let key = inner.next_conn.fetch_add(1, Ordering::Relaxed);
    let peer = conn.peer().id;
    let mut evicted = None;
    let over = {
        let mut conns = lock(&inner.conns);
        let mut per_peer = lock(&inner.per_peer);
        let mine = per_peer.get(&peer).copied().unwrap_or(0);
        if conns.len() >= inner.cfg.max_connections {
            // Full: the peer holding the most connections gives up its oldest, so identities
            // that hoard connections cannot lock out one that holds few.
            let top = per_peer.iter().max_by_key(|(_, n)| **n).map(|(p, n)| (*p, *n));
            match top {
                Some((top, n)) if n > mine + 1 => {
                    let victim = conns.iter().filter(|(_, c)| c.peer().id == top).map(|(k, _)| *k).min();
                    if let Some(c) = victim.and_then(|k| conns.remove(&k)) {
                        forget_peer_conn(&mut per_peer, top);
                        evicted = Some(c);
                    }
                    conns.insert(key, conn.clone());
                    per_peer.insert(peer, mine + 1);
                    None
                }
                _ => Some(format!(
                    "node already holds {} connections (Config::max_connections)",
                    inner.cfg.max_connections
                )),
            }
        } else if mine >= inner.cfg.max_connections_per_peer {
            Some(format!("peer {peer} already holds {mine} connections (Config::max_connections_per_peer)"))
        } else {
            conns.insert(key, conn.clone());
            per_peer.insert(peer, mine + 1);
            None
        }
    };
    if let Some(victim) = evicted {
        victim.abort();
    }
    if let Some(reason) = over {
        emit(inner, Event::Refused { remote: conn.remote_addr().to_owned(), reason });
        conn.abort();
        return;
    }
    emit(inner, Event::Connected { peer: conn.peer().id, remote: conn.remote_addr().to_owned(), inbound });
    let weak: Weak<NodeInner> = Arc::downgrade(inner);
    tokio::spawn(async move {
        let reason = conn.closed().await;
        if let Some(inner) = weak.upgrade() {
            // An evicted connection was already taken out (and its peer's count lowered).
            if lock(&inner.conns).remove(&key).is_some() {
                forget_peer_conn(&mut lock(&inner.per_peer), conn.peer().id);
            }
            lock(&inner.by_addr).retain(|_, c| !c.is_closed());
            emit(
                &inner,
                Event::Closed {
                    peer: conn.peer().id,
                    remote: conn.remote_addr().to_owned(),
                    reason: reason.to_string(),
                },
            );
        }
    });
}

/// Runs the responder handshake for an accepted stream in its own task, holding a place in the
/// admission pool (see [`crate::admission`]) until it is authenticated, fails or is evicted.
pub(crate) fn spawn_responder<S>(
    inner: Arc<NodeInner>,
    mut s: S,
    remote: String,
    source: String,
    split: impl FnOnce(S) -> (BoxRead, BoxWrite) + Send + 'static,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (ticket, evicted) = inner.admission.admit(&source);
    tokio::spawn(async move {
        let t = inner.cfg.handshake_timeout;
        let res = {
            let mut on_first = || ticket.progressed();
            let hs =
                handshake::respond(&mut s, &inner.identity, &inner.allow, &inner.cfg, &inner.replay, &mut on_first);
            tokio::select! {
                r = tokio::time::timeout(t, hs) => r.unwrap_or(Err(HandshakeError::Timeout(t))),
                _ = evicted => Err(HandshakeError::Evicted),
            }
        };
        drop(ticket);
        match res {
            Ok(est) => {
                let (r, w) = split(s);
                let wiring = wiring(&inner, est.peer.id);
                let _ = Connection::spawn(r, w, est, remote, wiring, |c| register(&inner, c.clone(), true));
            }
            Err(e) => emit(&inner, Event::Refused { remote, reason: e.to_string() }),
        }
    });
}
