//! An established connection: a reader task and a writer task sharing one Noise transport state.
//!
//! Threading: [`Connection`] is a cheap `Clone` handle (`Arc`); all methods take `&self` and may be
//! called from any task. The writer batches queued envelopes into records, seals them, coalesces
//! frames into one socket write, and rekeys its direction on schedule. The reader decrypts,
//! applies the peer's rekey markers, reassembles fragments and dispatches envelopes. Any
//! decryption failure (tampered, replayed, reordered frame) closes the connection.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use crate::budget::{Budget, Charge, MESSAGE_COST};
use crate::config::Config;
use crate::error::{ConnectionError, FrameError, RequestError, SendError};
use crate::frame::{self, Envelope, FrameDecoder, Kind, LEN_PREFIX, MAX_RECORD, Record, TAG_LEN};
use crate::handshake::PeerInfo;
use crate::identity::PeerId;

pub(crate) type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of our locks cannot leave the data half-updated in a way that
    // matters more than losing the connection, so recover the guard.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

enum Out {
    /// An envelope and the bytes it holds against the peer's outgoing budget until sealed.
    Env(Box<Envelope>, Charge),
    Close(String),
}

type ReplySlot = oneshot::Sender<Result<Bytes, String>>;

/// Counters of one connection (monotonic).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnStats {
    /// Frames sealed and written.
    pub frames_sent: u64,
    /// Frames read and authenticated.
    pub frames_received: u64,
    /// Envelopes queued by this side.
    pub messages_sent: u64,
    /// Envelopes received from the peer.
    pub messages_received: u64,
    /// Outgoing rekeys performed.
    pub rekeys_sent: u64,
    /// Incoming rekeys applied.
    pub rekeys_received: u64,
}

#[derive(Default)]
struct Counters {
    frames_sent: AtomicU64,
    frames_received: AtomicU64,
    messages_sent: AtomicU64,
    messages_received: AtomicU64,
    rekeys_sent: AtomicU64,
    rekeys_received: AtomicU64,
}

struct Inner {
    peer: PeerInfo,
    remote: String,
    cfg: Arc<Config>,
    out: mpsc::Sender<Out>,
    pending: Mutex<HashMap<u64, ReplySlot>>,
    subs: Mutex<HashMap<String, mpsc::Sender<(Bytes, Charge)>>>,
    peer_topics: Mutex<HashSet<String>>,
    next_id: AtomicU64,
    closed: watch::Sender<Option<Arc<ConnectionError>>>,
    counters: Counters,
    /// Bytes queued to this peer (shared by its connections, and node-wide).
    out_budget: Budget,
}

impl Inner {
    /// Records the first close reason and fails everything waiting on this connection.
    fn shut(&self, reason: ConnectionError) {
        let reason = Arc::new(reason);
        self.closed.send_if_modified(|slot| {
            if slot.is_none() {
                *slot = Some(reason);
                true
            } else {
                false
            }
        });
        lock(&self.pending).clear();
        lock(&self.subs).clear();
    }

    /// Largest record plaintext this side writes (our own `max_frame_len` minus the tag).
    fn record_limit(&self) -> usize {
        self.cfg.max_frame_len.min(frame::MAX_NOISE_MESSAGE) - TAG_LEN
    }

    fn close_reason(&self) -> Arc<ConnectionError> {
        self.closed.borrow().clone().unwrap_or_else(|| Arc::new(ConnectionError::ClosedLocally))
    }
}

/// A message or request delivered to the application through [`crate::Inbox`].
#[derive(Debug)]
pub struct Incoming {
    conn: Connection,
    payload: Bytes,
    request: Option<u64>,
    /// Held against the sender's incoming budget until the application consumes the message.
    _charge: Charge,
}

impl Incoming {
    /// The sender's verified identity.
    pub fn from(&self) -> PeerId {
        self.conn.peer().id
    }
    /// The connection it came on (reply or send on it).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
    /// The message bytes.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }
    /// Takes the message bytes.
    pub fn into_payload(self) -> Bytes {
        self.payload
    }
    /// Whether the sender awaits a reply.
    pub fn is_request(&self) -> bool {
        self.request.is_some()
    }
    /// Replies to a request (no-op for one-way messages).
    pub async fn reply(self, payload: impl Into<Bytes>) -> Result<(), SendError> {
        match self.request {
            Some(id) => self.conn.enqueue(Kind::Reply, id, None, payload.into()).await,
            None => Ok(()),
        }
    }
    /// Answers a request with an error the requester receives as [`RequestError::Remote`].
    pub async fn reply_error(self, reason: &str) -> Result<(), SendError> {
        match self.request {
            Some(id) => self.conn.enqueue(Kind::Error, id, None, Bytes::copy_from_slice(reason.as_bytes())).await,
            None => Ok(()),
        }
    }
}

/// Publications on one topic from one peer. Ends when the connection closes.
#[derive(Debug)]
pub struct Subscription {
    topic: String,
    rx: mpsc::Receiver<(Bytes, Charge)>,
    conn: Connection,
}

impl Subscription {
    /// The next publication, or `None` once the connection closed.
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.rx.recv().await.map(|(payload, _charge)| payload)
    }
    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// Tells the peer to stop forwarding this topic.
    pub async fn unsubscribe(self) -> Result<(), SendError> {
        lock(&self.conn.inner.subs).remove(&self.topic);
        self.conn.enqueue(Kind::Unsubscribe, 0, Some(self.topic.clone()), Bytes::new()).await
    }
}

/// What a new connection is plugged into: the node's configuration, its inbox, and the peer's
/// (incoming, outgoing) byte budgets.
pub(crate) struct Wiring {
    pub(crate) cfg: Arc<Config>,
    pub(crate) inbox: mpsc::Sender<Incoming>,
    pub(crate) budgets: (Budget, Budget),
}

/// A live, authenticated, encrypted connection to one peer. Clone it to share it.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("peer", &self.inner.peer.id).field("remote", &self.inner.remote).finish()
    }
}

fn check_topic(topic: &str) -> Result<(), SendError> {
    if topic.is_empty() || topic.len() > 255 { Err(SendError::BadTopic(topic.len())) } else { Ok(()) }
}

impl Connection {
    /// Builds the connection and calls `register` with it *before* starting its reader and writer
    /// (and so before the responder's ACCEPT preface goes out).
    pub(crate) fn spawn(
        read: BoxRead,
        write: BoxWrite,
        est: crate::handshake::Established,
        remote: String,
        wiring: Wiring,
        register: impl FnOnce(&Connection),
    ) -> Connection {
        let Wiring { cfg, inbox, budgets: (in_budget, out_budget) } = wiring;
        let (out_tx, out_rx) = mpsc::channel(cfg.send_queue);
        let (closed, _) = watch::channel(None);
        let inner = Arc::new(Inner {
            peer: est.peer,
            remote,
            cfg,
            out: out_tx,
            pending: Mutex::new(HashMap::new()),
            subs: Mutex::new(HashMap::new()),
            peer_topics: Mutex::new(HashSet::new()),
            next_id: AtomicU64::new(1),
            closed,
            counters: Counters::default(),
            out_budget,
        });
        let noise = Arc::new(Mutex::new(est.transport));
        let conn = Connection { inner };
        register(&conn);
        tokio::spawn(writer(conn.inner.clone(), out_rx, write, noise.clone(), est.preface));
        tokio::spawn(reader(conn.clone(), read, est.decoder, noise, inbox, in_budget));
        conn
    }

    /// The verified peer.
    pub fn peer(&self) -> &PeerInfo {
        &self.inner.peer
    }
    /// The remote address as given or accepted.
    pub fn remote_addr(&self) -> &str {
        &self.inner.remote
    }
    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.borrow().is_some()
    }
    /// Waits until the connection closes and returns why.
    pub async fn closed(&self) -> Arc<ConnectionError> {
        let mut rx = self.inner.closed.subscribe();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                return self.inner.close_reason();
            }
        }
    }
    /// Counters.
    pub fn stats(&self) -> ConnStats {
        let c = &self.inner.counters;
        ConnStats {
            frames_sent: c.frames_sent.load(Ordering::Relaxed),
            frames_received: c.frames_received.load(Ordering::Relaxed),
            messages_sent: c.messages_sent.load(Ordering::Relaxed),
            messages_received: c.messages_received.load(Ordering::Relaxed),
            rekeys_sent: c.rekeys_sent.load(Ordering::Relaxed),
            rekeys_received: c.rekeys_received.load(Ordering::Relaxed),
        }
    }

    async fn enqueue(
        &self,
        kind: Kind,
        correlation: u64,
        topic: Option<String>,
        payload: Bytes,
    ) -> Result<(), SendError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.enqueue_with_id(kind, id, correlation, topic, payload).await
    }

    async fn enqueue_with_id(
        &self,
        kind: Kind,
        id: u64,
        correlation: u64,
        topic: Option<String>,
        payload: Bytes,
    ) -> Result<(), SendError> {
        let max = self.inner.cfg.max_message_len;
        if payload.len() > max {
            return Err(SendError::TooLarge { len: payload.len(), max });
        }
        let env = Envelope { version: self.inner.peer.version, kind, id, correlation, topic, payload };
        let closed = || SendError::Closed(self.inner.close_reason());
        let mut watch = self.inner.closed.subscribe();
        // Wait for room in the peer's outgoing budget, unless the connection closes meanwhile.
        let charge = tokio::select! {
            c = self.inner.out_budget.charge(env.encoded_len_hint() + MESSAGE_COST) => c,
            _ = watch.wait_for(Option::is_some) => return Err(closed()),
        };
        self.inner.out.send(Out::Env(Box::new(env), charge)).await.map_err(|_| closed())?;
        self.inner.counters.messages_sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Sends a one-way message. Waits while the send queue is full (backpressure).
    pub async fn send(&self, payload: impl Into<Bytes>) -> Result<(), SendError> {
        self.enqueue(Kind::Message, 0, None, payload.into()).await
    }

    /// Sends a request and waits up to `timeout` for the correlated reply.
    pub async fn request(&self, payload: impl Into<Bytes>, timeout: Duration) -> Result<Bytes, RequestError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&self.inner.pending);
            if pending.len() >= self.inner.cfg.max_pending_requests {
                return Err(RequestError::Remote(format!(
                    "{} requests already await replies on this connection; wait for some (Config::max_pending_requests)",
                    pending.len()
                )));
            }
            pending.insert(id, tx);
        }
        if self.is_closed() {
            lock(&self.inner.pending).remove(&id);
            return Err(RequestError::Closed(self.inner.close_reason()));
        }
        let sent = self.enqueue_with_id(Kind::Request, id, 0, None, payload.into()).await;
        if let Err(e) = sent {
            lock(&self.inner.pending).remove(&id);
            return Err(e.into());
        }
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => {
                lock(&self.inner.pending).remove(&id);
                Err(RequestError::Timeout(timeout))
            }
            Ok(Err(_)) => Err(RequestError::Closed(self.inner.close_reason())),
            Ok(Ok(Ok(b))) => Ok(b),
            Ok(Ok(Err(reason))) => Err(RequestError::Remote(reason)),
        }
    }

    /// Publishes on `topic` to this peer if it subscribed to it; returns whether it was sent.
    pub async fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<bool, SendError> {
        check_topic(topic)?;
        if !lock(&self.inner.peer_topics).contains(topic) {
            return Ok(false);
        }
        self.enqueue(Kind::Publish, 0, Some(topic.to_owned()), payload.into()).await?;
        Ok(true)
    }

    /// Whether the peer subscribed to `topic` on this connection.
    pub fn peer_subscribed(&self, topic: &str) -> bool {
        lock(&self.inner.peer_topics).contains(topic)
    }

    /// Asks the peer to forward its publications on `topic`.
    pub async fn subscribe(&self, topic: &str) -> Result<Subscription, SendError> {
        check_topic(topic)?;
        let (tx, rx) = mpsc::channel(self.inner.cfg.subscription_capacity);
        lock(&self.inner.subs).insert(topic.to_owned(), tx);
        self.enqueue(Kind::Subscribe, 0, Some(topic.to_owned()), Bytes::new()).await?;
        Ok(Subscription { topic: topic.to_owned(), rx, conn: self.clone() })
    }

    /// Closes in order: messages queued before this call are sent, then a CLOSE record. Returns
    /// once all of that has been written to the socket (or the connection failed). If the peer
    /// stopped reading, this waits with it; wrap it in a timeout or use [`Connection::abort`].
    pub async fn close(&self, reason: &str) {
        if self.inner.out.send(Out::Close(reason.to_owned())).await.is_err() {
            self.inner.shut(ConnectionError::ClosedLocally);
        }
        self.closed().await;
    }

    /// Closes immediately, dropping queued messages.
    pub fn abort(&self) {
        self.inner.shut(ConnectionError::ClosedLocally);
    }
}

// ----------------------------------------------------------------------------------------------
// Writer

struct Sealer {
    noise: Arc<Mutex<snow::TransportState>>,
    wbuf: Vec<u8>,
    frames_since_rekey: u64,
    keyed_at: Instant,
}

impl Sealer {
    /// Seals one record into the write buffer, then rekeys if the schedule says so.
    fn seal(&mut self, inner: &Inner, plain: &[u8]) -> Result<(), ConnectionError> {
        self.seal_one(plain)?;
        inner.counters.frames_sent.fetch_add(1, Ordering::Relaxed);
        self.frames_since_rekey += 1;
        if self.frames_since_rekey >= inner.cfg.rekey_after_frames || self.keyed_at.elapsed() >= inner.cfg.rekey_after {
            self.seal_one(&[frame::REC_REKEY])?;
            lock(&self.noise).rekey_outgoing();
            inner.counters.frames_sent.fetch_add(1, Ordering::Relaxed);
            inner.counters.rekeys_sent.fetch_add(1, Ordering::Relaxed);
            self.frames_since_rekey = 0;
            self.keyed_at = Instant::now();
        }
        Ok(())
    }

    fn seal_one(&mut self, plain: &[u8]) -> Result<(), ConnectionError> {
        let start = self.wbuf.len();
        let body = plain.len() + TAG_LEN;
        self.wbuf.resize(start + LEN_PREFIX + body, 0);
        let n = {
            let dst = self.wbuf.get_mut(start + LEN_PREFIX..).unwrap_or_default();
            lock(&self.noise).write_message(plain, dst)
        }
        .map_err(|e| ConnectionError::Io(std::io::Error::other(format!("noise encryption failed: {e}"))))?;
        let len = u16::try_from(n).map_err(|_| FrameError::TooLarge { len: n, max: frame::MAX_NOISE_MESSAGE })?;
        if let Some(prefix) = self.wbuf.get_mut(start..start + LEN_PREFIX) {
            prefix.copy_from_slice(&len.to_be_bytes());
        }
        self.wbuf.truncate(start + LEN_PREFIX + n);
        Ok(())
    }
}

async fn writer(
    inner: Arc<Inner>,
    mut rx: mpsc::Receiver<Out>,
    mut w: BoxWrite,
    noise: Arc<Mutex<snow::TransportState>>,
    preface: Vec<u8>,
) {
    let mut closed = inner.closed.subscribe();
    let mut sealer = Sealer { noise, wbuf: Vec::new(), frames_since_rekey: 0, keyed_at: Instant::now() };
    let work = async {
        if !preface.is_empty() {
            put(&mut w, &preface, inner.cfg.write_timeout).await?;
        }
        writer_loop(&inner, &mut rx, &mut w, &mut sealer).await
    };
    let result = tokio::select! {
        r = work => r,
        _ = closed.wait_for(Option::is_some) => Ok(()),
    };
    if let Err(e) = result {
        inner.shut(e);
    }
    let _ = w.shutdown().await;
}

async fn writer_loop(
    inner: &Inner,
    rx: &mut mpsc::Receiver<Out>,
    w: &mut BoxWrite,
    sealer: &mut Sealer,
) -> Result<(), ConnectionError> {
    let coalesce = inner.cfg.write_coalesce_bytes.max(MAX_RECORD);
    let limit = inner.record_limit();
    let max_entry = limit - 1 - frame::ENTRY_PREFIX;
    let mut plain: Vec<u8> = Vec::new();
    loop {
        let Some(mut next) = rx.recv().await else { return Ok(()) };
        plain.reserve(limit);
        loop {
            match next {
                Out::Env(env, _charge) => {
                    let hint = env.encoded_len_hint();
                    if hint > max_entry {
                        flush_batch(inner, sealer, &mut plain)?;
                        write_fragments(inner, sealer, w, &env).await?;
                    } else {
                        if !plain.is_empty() && plain.len() + frame::ENTRY_PREFIX + hint > limit {
                            flush_batch(inner, sealer, &mut plain)?;
                        }
                        if plain.is_empty() {
                            plain.push(frame::REC_BATCH);
                        }
                        let at = plain.len();
                        plain.extend_from_slice(&[0, 0]);
                        env.encode_into(&mut plain)?;
                        let elen = u16::try_from(plain.len() - at - frame::ENTRY_PREFIX)
                            .map_err(|_| FrameError::Malformed("envelope larger than its size hint"))?;
                        if let Some(p) = plain.get_mut(at..at + 2) {
                            p.copy_from_slice(&elen.to_be_bytes());
                        }
                    }
                }
                Out::Close(reason) => {
                    flush_batch(inner, sealer, &mut plain)?;
                    let mut rec = vec![frame::REC_CLOSE];
                    rec.extend_from_slice(reason.as_bytes());
                    rec.truncate(1024);
                    sealer.seal_one(&rec)?;
                    put(w, &sealer.wbuf, inner.cfg.write_timeout).await?;
                    inner.shut(ConnectionError::ClosedLocally);
                    return Ok(());
                }
            }
            if sealer.wbuf.len() >= coalesce {
                break;
            }
            match rx.try_recv() {
                Ok(o) => next = o,
                Err(_) => break,
            }
        }
        flush_batch(inner, sealer, &mut plain)?;
        put(w, &sealer.wbuf, inner.cfg.write_timeout).await?;
        sealer.wbuf.clear();
        // Idle connections keep no large buffers.
        if rx.is_empty() {
            sealer.wbuf = Vec::new();
            plain = Vec::new();
        }
    }
}

/// Writes and flushes `buf`, failing with [`ConnectionError::WriteStalled`] if the peer accepts no
/// bytes for `stall` (a peer that stopped reading is disconnected, not waited for).
async fn put(w: &mut BoxWrite, mut buf: &[u8], stall: Duration) -> Result<(), ConnectionError> {
    let stalled = |_| ConnectionError::WriteStalled(stall);
    while !buf.is_empty() {
        let n = tokio::time::timeout(stall, w.write(buf)).await.map_err(stalled)??;
        if n == 0 {
            return Err(ConnectionError::Io(std::io::ErrorKind::WriteZero.into()));
        }
        buf = buf.get(n..).unwrap_or_default();
    }
    tokio::time::timeout(stall, w.flush()).await.map_err(stalled)??;
    Ok(())
}

fn flush_batch(inner: &Inner, sealer: &mut Sealer, plain: &mut Vec<u8>) -> Result<(), ConnectionError> {
    if !plain.is_empty() {
        sealer.seal(inner, plain)?;
        plain.clear();
    }
    Ok(())
}

async fn write_fragments(
    inner: &Inner,
    sealer: &mut Sealer,
    w: &mut BoxWrite,
    env: &Envelope,
) -> Result<(), ConnectionError> {
    use bytes::Buf as _;
    // The payload is sent from where it lies (no 16 MiB copy): head, then payload slices.
    let mut head = Vec::with_capacity(frame::ENVELOPE_OVERHEAD + env.topic.as_ref().map_or(0, String::len) + 2);
    env.encode_head_into(&mut head)?;
    let len = head.len() + env.payload.len();
    let total = u32::try_from(len)
        .map_err(|_| FrameError::MessageTooLarge { len: len as u64, max: inner.cfg.max_message_len })?;
    let mut src = bytes::Buf::chain(head.as_slice(), env.payload.as_ref());
    let limit = inner.record_limit();
    let mut rec = Vec::with_capacity(limit);
    rec.push(frame::REC_FRAG_FIRST);
    rec.extend_from_slice(&total.to_be_bytes());
    loop {
        let mut room = limit - rec.len();
        while room > 0 && src.has_remaining() {
            let chunk = src.chunk();
            let k = chunk.len().min(room);
            rec.extend_from_slice(chunk.get(..k).unwrap_or_default());
            src.advance(k);
            room -= k;
        }
        sealer.seal(inner, &rec)?;
        if sealer.wbuf.len() >= inner.cfg.write_coalesce_bytes {
            put(w, &sealer.wbuf, inner.cfg.write_timeout).await?;
            sealer.wbuf.clear();
        }
        if !src.has_remaining() {
            return Ok(());
        }
        rec.clear();
        rec.push(frame::REC_FRAG_MORE);
    }
}

// ----------------------------------------------------------------------------------------------
// Reader

async fn reader(
    conn: Connection,
    mut r: BoxRead,
    dec: FrameDecoder,
    noise: Arc<Mutex<snow::TransportState>>,
    inbox: mpsc::Sender<Incoming>,
    budget: Budget,
) {
    let mut closed = conn.inner.closed.subscribe();
    let result = tokio::select! {
        r = reader_loop(&conn, &mut r, dec, &noise, &inbox, &budget) => r,
        _ = closed.wait_for(Option::is_some) => Ok(()),
    };
    let reason = match result {
        Ok(()) => ConnectionError::ClosedLocally,
        Err(e) => e,
    };
    conn.inner.shut(reason);
}

/// Bytes read past the end of the frame in progress (uncharged until the next frame starts).
const READ_AHEAD: usize = 4096;

/// Bytes of the small read used while no frame is in progress (keeps idle connections small).
const IDLE_READ: usize = 512;

async fn reader_loop(
    conn: &Connection,
    r: &mut BoxRead,
    mut dec: FrameDecoder,
    noise: &Mutex<snow::TransportState>,
    inbox: &mpsc::Sender<Incoming>,
    budget: &Budget,
) -> Result<(), ConnectionError> {
    let inner = &conn.inner;
    let mut index: u64 = 0;
    let mut frag: Option<Partial> = None;
    let mut in_frame: Option<(Charge, tokio::time::Instant)> = None;
    let max_env = inner.cfg.max_message_len.saturating_add(frame::ENVELOPE_OVERHEAD + 512);
    // Every wait for budget is bounded: a reader never waits longer than `message_timeout`
    // (whatever it holds is then given back by closing), so readers can never wedge each other.
    let wait = inner.cfg.message_timeout;
    let starved = || ConnectionError::BudgetTimeout(wait);
    loop {
        while let Some(ct) = dec.next_frame()? {
            // The frame left the buffer: its charge is handed on to the messages it carries, and
            // what is left given back before anything else is charged (never wait for budget
            // while holding some).
            let mut frame_charge = in_frame.take().map(|(c, _)| c);
            let mut plain = BytesMut::zeroed(ct.len().saturating_sub(TAG_LEN));
            let n = lock(noise).read_message(&ct, &mut plain).map_err(|_| ConnectionError::Decrypt { index })?;
            plain.truncate(n);
            let plain = plain.freeze();
            index += 1;
            inner.counters.frames_received.fetch_add(1, Ordering::Relaxed);
            match frame::parse_record(&plain)? {
                Record::Batch(entries) => {
                    if frag.is_some() {
                        return Err(FrameError::Malformed("batch inside a fragmented message").into());
                    }
                    for entry in entries {
                        let mut env = Envelope::decode(&plain, entry?)?;
                        let charge = match env.kind {
                            Kind::Message | Kind::Request | Kind::Publish => {
                                // A small payload is copied out so it does not pin the whole
                                // record (up to 64 KiB) while it waits: what is charged is held.
                                if env.payload.len() < plain.len() / 2 {
                                    env.payload = Bytes::copy_from_slice(&env.payload);
                                }
                                let need = env.payload.len() + MESSAGE_COST;
                                match frame_charge.as_mut().and_then(|c| c.split(need)) {
                                    Some(c) => Some(c),
                                    None => {
                                        frame_charge = None;
                                        let charge = budget.charge(need);
                                        Some(tokio::time::timeout(wait, charge).await.map_err(|_| starved())?)
                                    }
                                }
                            }
                            _ => None,
                        };
                        dispatch(conn, env, inbox, charge).await?;
                    }
                }
                Record::FragFirst { total, chunk } => {
                    frame_charge = None;
                    let total = total as usize;
                    if frag.is_some() {
                        return Err(FrameError::Malformed("new fragmented message before the last one ended").into());
                    }
                    if total > max_env {
                        return Err(
                            FrameError::MessageTooLarge { len: total as u64, max: inner.cfg.max_message_len }.into()
                        );
                    }
                    if chunk.len() >= total {
                        return Err(FrameError::Malformed("fragmented message fits one record").into());
                    }
                    // The whole message is reserved from the peer's share before any of it is
                    // buffered (reading from this peer pauses while its share is spent); the node's
                    // budget is charged as the bytes arrive, so announcing 16 MiB costs others nothing.
                    let mut charge = tokio::time::timeout(wait, budget.charge_peer(total + MESSAGE_COST))
                        .await
                        .map_err(|_| starved())?;
                    let node = budget.charge_node(chunk.len() + MESSAGE_COST);
                    charge.merge(tokio::time::timeout(wait, node).await.map_err(|_| starved())?);
                    // Charged, so allocated at once at its exact size: growing it by doubling
                    // would briefly hold half as much again, outside the budget.
                    let mut buf = BytesMut::with_capacity(total);
                    buf.extend_from_slice(chunk);
                    let deadline = tokio::time::Instant::now() + inner.cfg.message_timeout;
                    frag = Some(Partial { total, buf, charge, deadline });
                }
                Record::FragMore(chunk) => {
                    let Some(mut part) = frag.take() else {
                        return Err(FrameError::Malformed("continuation fragment without a first fragment").into());
                    };
                    if part.buf.len() + chunk.len() > part.total {
                        return Err(FrameError::Malformed("fragments exceed the announced length").into());
                    }
                    match frame_charge.as_mut().and_then(|c| c.split(chunk.len())) {
                        Some(c) => part.charge.merge(c),
                        None => {
                            frame_charge = None;
                            let node = budget.charge_node(chunk.len());
                            part.charge.merge(tokio::time::timeout(wait, node).await.map_err(|_| starved())?);
                        }
                    }
                    part.buf.extend_from_slice(chunk);
                    if part.buf.len() == part.total {
                        let whole = part.buf.freeze();
                        let env = Envelope::decode(&whole, &whole)?;
                        dispatch(conn, env, inbox, Some(part.charge)).await?;
                    } else {
                        frag = Some(part);
                    }
                }
                Record::Rekey => {
                    lock(noise).rekey_incoming();
                    inner.counters.rekeys_received.fetch_add(1, Ordering::Relaxed);
                }
                Record::Close(reason) => return Err(ConnectionError::PeerClosed(reason.to_owned())),
                Record::Accept(_) => return Err(FrameError::Malformed("ACCEPT after the handshake").into()),
            }
        }
        if dec.buffered() == 0 || frag.is_some() {
            // No frame in progress, or its bytes belong to a message whose reservation already
            // covers them (and whose deadline applies): no separate charge. Never waiting for one
            // while holding a reservation keeps two connections of one peer from waiting on each
            // other (the semaphore is first come, first served).
            in_frame = None;
        } else if in_frame.is_none() {
            // A frame in progress holds a buffer up to `max_frame_len`: charged (to the peer and
            // the node) until it completes, and it must complete within `message_timeout`.
            let charge = budget.charge(inner.cfg.max_frame_len + LEN_PREFIX);
            let charge = tokio::time::timeout(wait, charge).await.map_err(|_| starved())?;
            in_frame = Some((charge, tokio::time::Instant::now() + inner.cfg.message_timeout));
        }
        // A fragmented message, or a frame, in progress must be complete by its deadline.
        let deadline = match (frag.as_ref().map(|p| p.deadline), in_frame.as_ref().map(|f| f.1)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let late = || ConnectionError::MessageTimeout(inner.cfg.message_timeout);
        let n = if dec.buffered() == 0 {
            // Nothing in flight: read a little into a stack buffer so idle connections hold no heap.
            dec.release();
            let mut small = [0u8; IDLE_READ];
            let n = match deadline {
                Some(d) => tokio::time::timeout_at(d, r.read(&mut small)).await.map_err(|_| late())??,
                None => r.read(&mut small).await?,
            };
            dec.push(small.get(..n).unwrap_or_default());
            n
        } else {
            // Read the frame in progress and at most a little more: bytes of the next frame are
            // not buffered before that frame is charged.
            let want = dec.frame_remaining() + READ_AHEAD;
            let mut buf = bytes::BufMut::limit(dec.read_buf(), want);
            match deadline {
                Some(d) => tokio::time::timeout_at(d, r.read_buf(&mut buf)).await.map_err(|_| late())??,
                None => r.read_buf(&mut buf).await?,
            }
        };
        if n == 0 {
            return Err(ConnectionError::Eof);
        }
    }
}

/// A fragmented message being reassembled, with the budget it holds and its deadline.
struct Partial {
    total: usize,
    buf: BytesMut,
    charge: Charge,
    deadline: tokio::time::Instant,
}

/// Delivers one envelope. `charge` is what its payload holds against the peer's incoming budget;
/// it travels with the payload to the inbox or subscription and is given back when consumed.
async fn dispatch(
    conn: &Connection,
    env: Envelope,
    inbox: &mpsc::Sender<Incoming>,
    charge: Option<Charge>,
) -> Result<(), ConnectionError> {
    let charge = charge.unwrap_or_else(Charge::none);
    let inner = &conn.inner;
    if env.version != inner.peer.version {
        return Err(ConnectionError::VersionMismatch { got: env.version, negotiated: inner.peer.version });
    }
    inner.counters.messages_received.fetch_add(1, Ordering::Relaxed);
    match env.kind {
        Kind::Message | Kind::Request => {
            let request = (env.kind == Kind::Request).then_some(env.id);
            // If the application dropped its inbox, messages are discarded (requests then time out).
            let incoming = Incoming { conn: conn.clone(), payload: env.payload, request, _charge: charge };
            let _ = inbox.send(incoming).await;
        }
        Kind::Reply | Kind::Error => {
            let slot = lock(&inner.pending).remove(&env.correlation);
            if let Some(tx) = slot {
                let value = if env.kind == Kind::Reply {
                    Ok(env.payload)
                } else {
                    Err(String::from_utf8_lossy(&env.payload).into_owned())
                };
                let _ = tx.send(value);
            }
            // A reply nobody waits for (timed out) is dropped.
        }
        Kind::Publish => {
            let topic = env.topic.ok_or(FrameError::Malformed("publish without a topic"))?;
            let tx = lock(&inner.subs).get(&topic).cloned();
            if let Some(tx) = tx
                && tx.send((env.payload, charge)).await.is_err()
            {
                lock(&inner.subs).remove(&topic);
            }
        }
        Kind::Subscribe => {
            let topic = env.topic.ok_or(FrameError::Malformed("subscribe without a topic"))?;
            let mut topics = lock(&inner.peer_topics);
            if !topics.contains(&topic) && topics.len() >= inner.cfg.max_topics_per_peer {
                return Err(ConnectionError::TooManyTopics(inner.cfg.max_topics_per_peer));
            }
            topics.insert(topic);
        }
        Kind::Unsubscribe => {
            if let Some(topic) = env.topic {
                lock(&inner.peer_topics).remove(&topic);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! An authenticated but malicious peer: valid encryption, invalid records. Each must close
    //! the connection with a clear reason and never panic.

    use super::*;
    use crate::handshake::{Expect, initiate, respond};
    use crate::identity::{AllowList, Identity};

    type R = Result<(), Box<dyn std::error::Error + Send + Sync>>;

    fn envelope(version: u8, kind: Kind, topic: Option<&str>) -> Result<Vec<u8>, FrameError> {
        let env =
            Envelope { version, kind, id: 1, correlation: 0, topic: topic.map(str::to_owned), payload: Bytes::new() };
        let mut out = Vec::new();
        env.encode_into(&mut out)?;
        Ok(out)
    }

    fn batch(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut rec = vec![frame::REC_BATCH];
        for e in entries {
            rec.extend_from_slice(&(e.len() as u16).to_be_bytes());
            rec.extend_from_slice(e);
        }
        rec
    }

    /// Connects an evil initiator to a real connection and sends `records` sealed correctly.
    async fn close_reason_after(
        records: Vec<Vec<u8>>,
        cfg: Config,
    ) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
        close_reason_after_raw(records, Vec::new(), cfg).await
    }

    /// An evil initiator (its stream end and transport) connected to a real connection on the
    /// other end, with the node budgets `cfg` gives, and that connection's inbox.
    async fn evil_connection(
        cfg: Config,
        duplex: usize,
    ) -> Result<
        (tokio::io::DuplexStream, crate::handshake::Established, Connection, mpsc::Receiver<Incoming>),
        Box<dyn std::error::Error + Send + Sync>,
    > {
        let cfg = Arc::new(cfg.normalized());
        let (evil, good) = (Identity::generate()?, Identity::generate()?);
        let (mut a, mut b) = tokio::io::duplex(duplex);
        let allow_good = AllowList::new([good.id()]);
        let evil_side = {
            let cfg = cfg.clone();
            tokio::spawn(async move {
                let est = initiate(&mut a, &evil, &allow_good, Expect::default(), &cfg).await?;
                Ok::<_, crate::error::HandshakeError>((a, est))
            })
        };
        let guard = crate::handshake::ReplayGuard::new(cfg.ik_replay_window);
        let mut on_first = || {};
        let est = respond(&mut b, &good, &AllowList::allow_any(), &cfg, &guard, &mut on_first).await?;
        let budgets = crate::budget::Budgets::new(&cfg).for_peer(est.peer.id);
        let (r, w) = tokio::io::split(b);
        let (inbox, inbox_rx) = mpsc::channel(16);
        let wiring = Wiring { cfg, inbox, budgets };
        let conn = Connection::spawn(Box::new(r), Box::new(w), est, "evil".into(), wiring, |_| {});
        let (a, est) = evil_side.await??;
        Ok((a, est, conn, inbox_rx))
    }

    /// [`close_reason_after`], then `tail` written as raw bytes.
    async fn close_reason_after_raw(
        records: Vec<Vec<u8>>,
        tail: Vec<u8>,
        cfg: Config,
    ) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
        let (mut a, mut est, conn, _inbox_rx) = evil_connection(cfg, 1 << 20).await?;
        for plain in records {
            let mut buf = vec![0u8; plain.len() + TAG_LEN];
            let n = est.transport.write_message(&plain, &mut buf)?;
            a.write_all(&(n as u16).to_be_bytes()).await?;
            a.write_all(buf.get(..n).unwrap_or_default()).await?;
        }
        a.write_all(&tail).await?;
        let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await?;
        Ok(reason.to_string())
    }

    #[tokio::test]
    async fn malformed_records_from_an_authenticated_peer_close_the_connection() -> R {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0x7f], "record kind 0x7f is unknown"),
            (vec![frame::REC_BATCH], "empty batch"),
            (vec![frame::REC_BATCH, 0, 9, 1], "batch entry overruns the record"),
            (batch(&[vec![0xc1, 0xc1]]), "malformed envelope"),
            (vec![frame::REC_FRAG_MORE, 1], "continuation fragment without a first fragment"),
            (vec![frame::REC_FRAG_FIRST, 0xff, 0xff, 0xff, 0xff, 1], "exceeds the maximum"),
            (vec![frame::REC_FRAG_FIRST, 0, 0, 0, 1, 1], "fits one record"),
            (vec![frame::REC_ACCEPT, 1], "ACCEPT after the handshake"),
            (vec![frame::REC_REKEY, 0], "rekey marker with a body"),
            (batch(&[envelope(2, Kind::Message, None)?]), "envelope has protocol version 2"),
            (batch(&[envelope(1, Kind::Publish, None)?]), "publish without a topic"),
            (vec![frame::REC_CLOSE, b'b', b'y', b'e'], "peer closed the connection (bye)"),
        ];
        for (record, expected) in cases {
            let reason = close_reason_after(vec![record.clone()], Config::default()).await?;
            assert!(reason.contains(expected), "record {record:02x?}: got `{reason}`, expected `{expected}`");
        }
        Ok(())
    }

    #[tokio::test]
    async fn fragments_interrupted_by_a_batch_or_overrunning_close_the_connection() -> R {
        let first = vec![frame::REC_FRAG_FIRST, 0, 0, 0, 3, 1];
        let reason =
            close_reason_after(vec![first.clone(), batch(&[envelope(1, Kind::Message, None)?])], Config::default())
                .await?;
        assert!(reason.contains("batch inside a fragmented message"), "{reason}");
        let reason =
            close_reason_after(vec![first.clone(), vec![frame::REC_FRAG_MORE, 1, 2, 3]], Config::default()).await?;
        assert!(reason.contains("fragments exceed the announced length"), "{reason}");
        let reason = close_reason_after(vec![first.clone(), first], Config::default()).await?;
        assert!(reason.contains("before the last one ended"), "{reason}");
        Ok(())
    }

    #[tokio::test]
    async fn a_peer_subscribing_to_too_many_topics_is_disconnected() -> R {
        let cfg = Config { max_topics_per_peer: 2, ..Config::default() };
        let subs =
            ["a", "b", "c"].iter().map(|t| envelope(1, Kind::Subscribe, Some(t))).collect::<Result<Vec<_>, _>>()?;
        let reason = close_reason_after(vec![batch(&subs)], cfg).await?;
        assert!(reason.contains("more than 2 topics"), "{reason}");
        Ok(())
    }

    #[tokio::test]
    async fn a_fragmented_message_that_never_completes_times_out() -> R {
        let cfg = Config { message_timeout: Duration::from_millis(100), ..Config::default() };
        let first = vec![frame::REC_FRAG_FIRST, 0, 0, 10, 0, 1];
        let reason = close_reason_after(vec![first], cfg).await?;
        assert!(reason.contains("incomplete after 100ms"), "{reason}");
        // Half a frame, never finished: the same deadline.
        let cfg = Config { message_timeout: Duration::from_millis(100), ..Config::default() };
        let reason = close_reason_after_raw(vec![], vec![0x03, 0xe8, 1, 2, 3], cfg).await?;
        assert!(reason.contains("incomplete after 100ms"), "{reason}");
        Ok(())
    }

    /// A peer that stops reading is disconnected after `write_timeout`, not waited for.
    #[tokio::test]
    async fn a_peer_that_stops_reading_is_disconnected() -> R {
        let cfg = Config { write_timeout: Duration::from_millis(200), ..Config::default() };
        // The evil end holds its stream open and never reads.
        let (_a, _est, conn, _inbox_rx) = evil_connection(cfg, 1 << 12).await?;
        let sender = tokio::spawn({
            let conn = conn.clone();
            async move { while conn.send(vec![0u8; 1 << 16]).await.is_ok() {} }
        });
        let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await?;
        assert!(reason.to_string().contains("read nothing for 200ms"), "{reason}");
        tokio::time::timeout(Duration::from_secs(10), sender).await??;
        Ok(())
    }

    /// Found re-attacking the budgets: a reader held its frame's charge while waiting for room
    /// for the message in that frame; with the budget full of such frames no reader could go on
    /// and the node stayed wedged after the attackers left. Here one frame's charge takes the
    /// whole budget, and the frame completes while the next one begins.
    #[tokio::test]
    async fn completing_a_frame_never_waits_on_its_own_charge() -> R {
        let cfg = Config {
            max_frame_len: 4096,
            max_message_len: 1024,
            peer_buffer_bytes: 4098,
            node_buffer_bytes: 4098,
            ..Config::default()
        };
        let (mut a, mut est, _conn, mut inbox_rx) = evil_connection(cfg, 1 << 16).await?;
        let env = Envelope {
            version: 1,
            kind: Kind::Message,
            id: 1,
            correlation: 0,
            topic: None,
            payload: Bytes::from(vec![7u8; 1000]),
        };
        let mut e = Vec::new();
        env.encode_into(&mut e)?;
        let mut buf = vec![0u8; 4096];
        let mut out = Vec::new();
        // The first 100 bytes of the frame, then (after the reader charged it) the rest of it
        // and the start of the next frame in one write.
        let n = est.transport.write_message(&batch(&[e]), &mut buf)?;
        out.extend_from_slice(&u16::try_from(n)?.to_be_bytes());
        out.extend_from_slice(buf.get(..n).unwrap_or_default());
        let (head, rest) = out.split_at(100);
        a.write_all(head).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        a.write_all(rest).await?;
        a.write_all(&[0x03, 0xe8, 1, 2, 3]).await?;
        let m = tokio::time::timeout(Duration::from_secs(5), inbox_rx.recv()).await?.ok_or("inbox closed")?;
        assert_eq!(m.payload().len(), 1000);
        Ok(())
    }
}
