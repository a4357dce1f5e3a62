//! The connection preamble and the Noise XX / IK handshakes with identity checks.
//!
//! ```text
//! initiator -> responder : "RFCM" 0x01 pattern        (6 bytes, also the Noise prologue)
//! XX:  -> e                    <- e, ee, s, es, Hello(resp)     -> s, se, Hello(init)
//! IK:  -> e, es, s, ss, Hello(init) ‖ timestamp     <- e, ee, se, Hello(resp)
//! responder -> initiator : transport record ACCEPT(version) or CLOSE(reason)
//! IK only: initiator -> responder : transport record ACCEPT(version), proving it holds the keys
//! ```
//!
//! An IK first message is the only handshake message that does not depend on anything fresh from
//! the responder, so a recorded one could be replayed. Its timestamp must be newer than the last
//! one seen from that identity and within [`Config::ik_replay_window`] of the responder's clock
//! ([`ReplayGuard`]), and the connection counts as the initiator's identity only once the
//! initiator's first transport record (its ACCEPT echo) decrypts: a replayer without the keys
//! never gets there.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::Config;
use crate::error::{FrameError, HandshakeError};
use crate::frame::{self, FrameDecoder, LEN_PREFIX, MAX_NOISE_MESSAGE, Record};
use crate::identity::{AllowList, HELLO_LEN, Hello, Identity, PeerId};
use crate::noise::{Pattern, builder};

/// Connection preamble magic.
pub const PREAMBLE_MAGIC: &[u8; 4] = b"RFCM";
/// Preamble (wire) format version.
pub const PREAMBLE_VERSION: u8 = 1;

/// Bytes of the timestamp after the initiator's Hello in an IK first message: nanoseconds since
/// the Unix epoch, big-endian.
pub const IK_TIMESTAMP_LEN: usize = 8;

fn now_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A timestamp for the next IK first message: the clock, but always above the last one this
/// process issued (two handshakes in the same nanosecond, or a clock stepping back).
fn next_timestamp() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = now_nanos();
    let prev = LAST.fetch_max(now, Ordering::Relaxed);
    if prev >= now { LAST.fetch_add(1, Ordering::Relaxed) + 1 } else { now }
}

/// Remembers the newest IK timestamp accepted per identity. Entries older than the window are
/// forgotten (a message that old is refused by the window itself), so it stays bounded by the
/// identities that handshook within the window.
pub(crate) struct ReplayGuard {
    window: Duration,
    seen: Mutex<HashMap<PeerId, u64>>,
}

/// Identities remembered at most; beyond this (only with `AllowList::allow_any` and a flood of
/// fresh identities) new IK handshakes are refused until entries age out (XX still works).
const MAX_REPLAY_ENTRIES: usize = 1 << 20;

impl ReplayGuard {
    pub(crate) fn new(window: Duration) -> Self {
        Self { window, seen: Mutex::new(HashMap::new()) }
    }

    /// Accepts `ts` from `peer` if it is within the window of `now` and newer than the last one.
    fn check(&self, peer: PeerId, ts: u64, now: u64) -> Result<(), HandshakeError> {
        let window = u64::try_from(self.window.as_nanos()).unwrap_or(u64::MAX);
        let refuse = |why: String| Err(HandshakeError::Replay { peer, why });
        if ts < now.saturating_sub(window) {
            return refuse(format!(
                "its timestamp is {:.1} s old, outside the {:?} replay window (replayed, or the clocks differ)",
                (now - ts) as f64 / 1e9,
                self.window
            ));
        }
        if ts > now.saturating_add(window) {
            return refuse(format!(
                "its timestamp is {:.1} s in the future, outside the {:?} replay window (the clocks differ)",
                (ts - now) as f64 / 1e9,
                self.window
            ));
        }
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(&last) = seen.get(&peer)
            && ts <= last
        {
            return refuse("its timestamp is not newer than the last one seen from that identity (replayed)".into());
        }
        if seen.len() >= MAX_REPLAY_ENTRIES && !seen.contains_key(&peer) {
            seen.retain(|_, last| last.saturating_add(window) >= now);
            if seen.len() >= MAX_REPLAY_ENTRIES {
                return refuse("too many identities handshook within the replay window; retry later".into());
            }
        }
        seen.insert(peer, ts);
        Ok(())
    }
}

/// What we know about the peer once the handshake succeeded.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its verified Ed25519 identity.
    pub id: PeerId,
    /// Its Noise static key (usable for a later IK handshake).
    pub noise_static: [u8; 32],
    /// The negotiated protocol version.
    pub version: u8,
    /// Whether the handshake was IK (else XX).
    pub ik: bool,
}

impl fmt::Debug for PeerInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerInfo").field("id", &self.id).field("version", &self.version).field("ik", &self.ik).finish()
    }
}

/// A finished handshake: cipher state, peer facts, and bytes already read past the handshake.
pub(crate) struct Established {
    pub(crate) transport: snow::TransportState,
    pub(crate) peer: PeerInfo,
    pub(crate) decoder: FrameDecoder,
    /// A sealed frame the writer must send before anything else (the responder's ACCEPT), so
    /// the responder can register the connection before the initiator learns it is accepted.
    pub(crate) preface: Vec<u8>,
}

/// What the initiator wants from the responder.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Expect {
    /// Its Noise static key: use IK (else XX).
    pub(crate) remote_static: Option<[u8; 32]>,
    /// Its identity: refuse anyone else.
    pub(crate) peer: Option<PeerId>,
}

fn noise_err(e: snow::Error) -> HandshakeError {
    HandshakeError::Noise(e)
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, dec: &mut FrameDecoder) -> Result<Bytes, HandshakeError> {
    loop {
        if let Some(f) = dec.next_frame()? {
            return Ok(f);
        }
        if r.read_buf(dec.read_buf()).await? == 0 {
            return Err(HandshakeError::PeerClosed);
        }
    }
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8]) -> Result<(), HandshakeError> {
    let len =
        u16::try_from(body.len()).map_err(|_| FrameError::TooLarge { len: body.len(), max: MAX_NOISE_MESSAGE })?;
    let mut out = Vec::with_capacity(LEN_PREFIX + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    w.write_all(&out).await?;
    Ok(())
}

fn negotiate(hello: &Hello) -> Result<u8, HandshakeError> {
    let (ours_min, ours_max) = frame::VERSIONS;
    let v = ours_max.min(hello.version_max);
    if v < ours_min.max(hello.version_min) {
        return Err(HandshakeError::NoCommonVersion {
            ours_min,
            ours_max,
            theirs_min: hello.version_min,
            theirs_max: hello.version_max,
        });
    }
    Ok(v)
}

fn preamble(pattern: Pattern) -> [u8; 6] {
    let [a, b, c, d] = *PREAMBLE_MAGIC;
    [a, b, c, d, PREAMBLE_VERSION, pattern.byte()]
}

fn seal_record(ts: &mut snow::TransportState, plain: &[u8]) -> Result<Vec<u8>, HandshakeError> {
    let mut buf = vec![0u8; plain.len() + frame::TAG_LEN];
    let n = ts.write_message(plain, &mut buf).map_err(noise_err)?;
    buf.truncate(n);
    Ok(buf)
}

/// Runs the initiator side on a connected stream.
pub(crate) async fn initiate<S>(
    io: &mut S,
    me: &Identity,
    allow: &AllowList,
    expect: Expect,
    cfg: &Config,
) -> Result<Established, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let pattern = if expect.remote_static.is_some() { Pattern::Ik } else { Pattern::Xx };
    let pre = preamble(pattern);
    let mut dec = FrameDecoder::new(cfg.max_frame_len);
    let b = builder(pattern).local_private_key(me.noise_private()).and_then(|b| b.prologue(&pre));
    let b = match (&expect.remote_static, b) {
        (Some(rs), Ok(b)) => b.remote_public_key(rs),
        (None, b) => b,
        (_, Err(e)) => Err(e),
    };
    let mut hs = b.and_then(|b| b.build_initiator()).map_err(noise_err)?;
    let hello = me.hello(frame::VERSIONS);
    let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
    io.write_all(&pre).await?;
    let peer_hello = match pattern {
        Pattern::Xx => {
            let n = hs.write_message(&[], &mut buf).map_err(noise_err)?;
            write_frame(io, buf.get(..n).unwrap_or_default()).await?;
            let m2 = read_frame(io, &mut dec).await?;
            let n = hs.read_message(&m2, &mut buf).map_err(noise_err)?;
            let peer_hello = Hello::decode(buf.get(..n).unwrap_or_default())?;
            // Verify the responder before revealing our identity in message 3.
            verify_responder(&hs, &peer_hello, allow, expect)?;
            let n = hs.write_message(&hello, &mut buf).map_err(noise_err)?;
            write_frame(io, buf.get(..n).unwrap_or_default()).await?;
            peer_hello
        }
        Pattern::Ik => {
            let mut payload = hello.to_vec();
            payload.extend_from_slice(&next_timestamp().to_be_bytes());
            let n = hs.write_message(&payload, &mut buf).map_err(noise_err)?;
            write_frame(io, buf.get(..n).unwrap_or_default()).await?;
            let m2 = read_frame(io, &mut dec).await?;
            let n = hs.read_message(&m2, &mut buf).map_err(noise_err)?;
            let peer_hello = Hello::decode(buf.get(..n).unwrap_or_default())?;
            verify_responder(&hs, &peer_hello, allow, expect)?;
            peer_hello
        }
    };
    let version = negotiate(&peer_hello)?;
    let noise_static = remote_static(&hs)?;
    let mut transport = hs.into_transport_mode().map_err(noise_err)?;
    // The responder's verdict is the first transport record.
    let first = read_frame(io, &mut dec).await?;
    let mut plain = vec![0u8; first.len()];
    let n = transport.read_message(&first, &mut plain).map_err(noise_err)?;
    match frame::parse_record(plain.get(..n).unwrap_or_default())? {
        Record::Accept(v) if v == version => {}
        Record::Accept(_) => return Err(HandshakeError::BadHello("responder accepted a different version")),
        Record::Close(reason) => return Err(HandshakeError::Refused(reason.to_owned())),
        _ => return Err(HandshakeError::BadHello("responder did not send ACCEPT first")),
    }
    if pattern == Pattern::Ik {
        // Key confirmation: our first transport record proves we hold the keys of message 1.
        let rec = seal_record(&mut transport, &[frame::REC_ACCEPT, version])?;
        write_frame(io, &rec).await?;
        io.flush().await?;
    }
    Ok(Established {
        transport,
        peer: PeerInfo { id: peer_hello.id, noise_static, version, ik: pattern == Pattern::Ik },
        decoder: dec,
        preface: Vec::new(),
    })
}

fn remote_static(hs: &snow::HandshakeState) -> Result<[u8; 32], HandshakeError> {
    hs.get_remote_static()
        .and_then(|s| <[u8; 32]>::try_from(s).ok())
        .ok_or(HandshakeError::BadHello("peer static key missing"))
}

fn verify_responder(
    hs: &snow::HandshakeState,
    hello: &Hello,
    allow: &AllowList,
    expect: Expect,
) -> Result<(), HandshakeError> {
    let rs = remote_static(hs)?;
    // An expected peer is allowed even if not on the general allow-list: the caller named it.
    let id = match expect.peer {
        Some(want) if want == hello.id => hello.verify(&rs, &AllowList::new([want]))?,
        Some(want) => return Err(HandshakeError::WrongPeer { expected: want, got: hello.id }),
        None => hello.verify(&rs, allow)?,
    };
    debug_assert_eq!(id, hello.id);
    Ok(())
}

/// Reads the preamble and the first handshake message (the part a stranger controls entirely).
async fn first_message<S>(io: &mut S, dec: &mut FrameDecoder) -> Result<([u8; 6], Pattern, Bytes), HandshakeError>
where
    S: AsyncRead + Unpin,
{
    let mut pre = [0u8; 6];
    io.read_exact(&mut pre).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => HandshakeError::PeerClosed,
        _ => HandshakeError::Io(e),
    })?;
    let pattern = match pre {
        [b'R', b'F', b'C', b'M', PREAMBLE_VERSION, p] => {
            Pattern::from_byte(p).ok_or_else(|| HandshakeError::BadPreamble(hex::encode(pre)))?
        }
        _ => return Err(HandshakeError::BadPreamble(hex::encode(pre))),
    };
    let m1 = read_frame(io, dec).await?;
    Ok((pre, pattern, m1))
}

/// Runs the responder side on an accepted stream. The preamble and message 1 must arrive within
/// `cfg.first_message_timeout`; `on_first` is called once message 1 has been processed (the
/// admission pool then stops treating this handshake as silent).
pub(crate) async fn respond<S>(
    io: &mut S,
    me: &Identity,
    allow: &AllowList,
    cfg: &Config,
    guard: &ReplayGuard,
    on_first: &mut (dyn FnMut() + Send),
) -> Result<Established, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut dec = FrameDecoder::new(cfg.max_frame_len);
    let t = cfg.first_message_timeout;
    let (pre, pattern, m1) =
        tokio::time::timeout(t, first_message(io, &mut dec)).await.map_err(|_| HandshakeError::Timeout(t))??;
    let mut hs = builder(pattern)
        .local_private_key(me.noise_private())
        .and_then(|b| b.prologue(&pre))
        .and_then(|b| b.build_responder())
        .map_err(noise_err)?;
    let hello = me.hello(frame::VERSIONS);
    let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
    let peer_hello = match pattern {
        Pattern::Xx => {
            hs.read_message(&m1, &mut buf).map_err(noise_err)?;
            on_first();
            let n = hs.write_message(&hello, &mut buf).map_err(noise_err)?;
            write_frame(io, buf.get(..n).unwrap_or_default()).await?;
            let m3 = read_frame(io, &mut dec).await?;
            let n = hs.read_message(&m3, &mut buf).map_err(noise_err)?;
            Hello::decode(buf.get(..n).unwrap_or_default())?
        }
        Pattern::Ik => {
            let n = hs.read_message(&m1, &mut buf).map_err(noise_err)?;
            let payload = buf.get(..n).unwrap_or_default();
            let (hello_bytes, ts) = payload.split_at_checked(HELLO_LEN).unwrap_or((payload, &[]));
            let ts = <[u8; IK_TIMESTAMP_LEN]>::try_from(ts)
                .map_err(|_| HandshakeError::BadHello("IK message 1 must end with an 8-byte timestamp"))?;
            let peer_hello = Hello::decode(hello_bytes)?;
            // Refuse unknown initiators and replayed messages before revealing anything in message 2.
            let id = peer_hello.verify(&remote_static(&hs)?, allow)?;
            guard.check(id, u64::from_be_bytes(ts), now_nanos())?;
            on_first();
            let n = hs.write_message(&hello, &mut buf).map_err(noise_err)?;
            write_frame(io, buf.get(..n).unwrap_or_default()).await?;
            peer_hello
        }
    };
    let noise_static = remote_static(&hs)?;
    let mut transport = hs.into_transport_mode().map_err(noise_err)?;
    let verdict = peer_hello.verify(&noise_static, allow).and_then(|_| negotiate(&peer_hello));
    match verdict {
        Ok(version) => {
            let rec = seal_record(&mut transport, &[frame::REC_ACCEPT, version])?;
            let len = u16::try_from(rec.len()).map_err(|_| FrameError::Malformed("accept record too long"))?;
            let mut preface = len.to_be_bytes().to_vec();
            preface.extend_from_slice(&rec);
            if pattern == Pattern::Ik {
                // Message 1 may be a replay: wait for the initiator's ACCEPT echo, which only the
                // holder of its keys can seal, before the connection counts as its identity.
                io.write_all(&preface).await?;
                io.flush().await?;
                preface.clear();
                let confirm = read_frame(io, &mut dec).await?;
                let mut plain = vec![0u8; confirm.len()];
                let n = transport
                    .read_message(&confirm, &mut plain)
                    .map_err(|_| HandshakeError::BadHello("initiator's first record failed authentication"))?;
                match frame::parse_record(plain.get(..n).unwrap_or_default())? {
                    Record::Accept(v) if v == version => {}
                    _ => return Err(HandshakeError::BadHello("initiator's first record is not its ACCEPT echo")),
                }
            }
            Ok(Established {
                transport,
                peer: PeerInfo { id: peer_hello.id, noise_static, version, ik: pattern == Pattern::Ik },
                decoder: dec,
                preface,
            })
        }
        Err(e) => {
            // Tell the (authenticated) initiator why, then give up.
            let mut plain = vec![frame::REC_CLOSE];
            plain.extend_from_slice(e.to_string().as_bytes());
            plain.truncate(1024);
            if let Ok(rec) = seal_record(&mut transport, &plain) {
                let _ = write_frame(io, &rec).await;
                let _ = io.flush().await;
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::HandshakeError;

    type R = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn version_negotiation_picks_the_highest_common_version() -> R {
        let id = Identity::generate()?;
        let mut hello = Hello::decode(&id.hello((1, 1)))?;
        assert_eq!(negotiate(&hello)?, 1);
        hello.version_max = 9;
        assert_eq!(negotiate(&hello)?, frame::VERSIONS.1);
        hello.version_min = 2;
        assert!(matches!(negotiate(&hello), Err(HandshakeError::NoCommonVersion { theirs_min: 2, .. })));
        Ok(())
    }

    /// A man in the middle holding its own Noise key replays the victim's public identity hello
    /// (Ed25519 id + binding signature). Noise authenticates the attacker's static key, and the
    /// binding does not sign that key, so the responder refuses.
    #[tokio::test]
    async fn mitm_replaying_a_victims_identity_binding_is_refused() -> R {
        let victim = Identity::generate()?;
        let attacker_keys = Identity::generate()?;
        let forged = Identity::forged(&victim, &attacker_keys);
        let server = Identity::generate()?;
        let allow_victim = AllowList::new([victim.id()]);
        let allow_server = AllowList::new([server.id()]);
        let cfg = Config::default();
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let guard = ReplayGuard::new(cfg.ik_replay_window);
        let mut on_first = || {};
        let (client, responder) = tokio::join!(
            initiate(&mut a, &forged, &allow_server, Expect::default(), &cfg),
            respond(&mut b, &server, &allow_victim, &cfg, &guard, &mut on_first),
        );
        assert!(matches!(responder, Err(HandshakeError::BadBinding(id)) if id == victim.id()), "{:?}", responder.err());
        assert!(matches!(client, Err(HandshakeError::Refused(ref r)) if r.contains("man in the middle")));
        Ok(())
    }

    #[tokio::test]
    async fn ik_and_xx_both_succeed_over_an_in_memory_stream() -> R {
        let (c, s) = (Identity::generate()?, Identity::generate()?);
        let cfg = Config::default();
        let guard = ReplayGuard::new(cfg.ik_replay_window);
        for expect in [Expect::default(), Expect { remote_static: Some(*s.noise_public()), peer: Some(s.id()) }] {
            let (mut a, mut b) = tokio::io::duplex(1 << 16);
            let allow_c = AllowList::new([c.id()]);
            let allow_s = AllowList::new([s.id()]);
            let respond_and_accept = async {
                let mut on_first = || {};
                let est = respond(&mut b, &s, &allow_c, &cfg, &guard, &mut on_first).await?;
                b.write_all(&est.preface).await?;
                Ok::<_, HandshakeError>(est)
            };
            let (ci, si) = tokio::join!(initiate(&mut a, &c, &allow_s, expect, &cfg), respond_and_accept);
            let (ci, si) = (ci?, si?);
            assert_eq!(ci.peer.id, s.id());
            assert_eq!(si.peer.id, c.id());
            assert_eq!(ci.peer.ik, expect.remote_static.is_some());
            assert_eq!(&ci.peer.noise_static, s.noise_public());
        }
        Ok(())
    }

    /// A recorded IK first message (preamble + frame) from `c` to `s`, with timestamp `ts`.
    fn recorded_ik(c: &Identity, s: &Identity, ts: u64) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
        let pre = preamble(Pattern::Ik);
        let mut hs = builder(Pattern::Ik)
            .local_private_key(c.noise_private())?
            .prologue(&pre)?
            .remote_public_key(s.noise_public())?
            .build_initiator()?;
        let mut payload = c.hello(frame::VERSIONS).to_vec();
        payload.extend_from_slice(&ts.to_be_bytes());
        let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
        let n = hs.write_message(&payload, &mut buf)?;
        let mut out = pre.to_vec();
        out.extend_from_slice(&u16::try_from(n)?.to_be_bytes());
        out.extend_from_slice(buf.get(..n).unwrap_or_default());
        Ok(out)
    }

    /// Someone who recorded an IK first message but holds no keys: the first delivery (say the
    /// original never arrived) gets message 2 but can never confirm, so it never becomes a
    /// connection; a second delivery is refused before message 2.
    #[tokio::test]
    async fn replayed_or_unconfirmed_ik_first_messages_never_count_as_the_identity() -> R {
        let (c, s) = (Identity::generate()?, Identity::generate()?);
        let cfg = Config::default();
        let guard = ReplayGuard::new(cfg.ik_replay_window);
        let allow_c = AllowList::new([c.id()]);
        let recorded = recorded_ik(&c, &s, next_timestamp())?;

        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&recorded).await?;
        a.write_all(&[0, 40]).await?;
        a.write_all(&[0u8; 40]).await?; // not sealed with the session keys
        let mut on_first = || {};
        let r = respond(&mut b, &s, &allow_c, &cfg, &guard, &mut on_first).await;
        assert!(matches!(r, Err(HandshakeError::BadHello(m)) if m.contains("failed authentication")));

        // Without any confirmation it waits (the caller's handshake deadline ends it).
        let recorded2 = recorded_ik(&c, &s, next_timestamp())?;
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&recorded2).await?;
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(100),
            respond(&mut b, &s, &allow_c, &cfg, &guard, &mut on_first),
        );
        assert!(waiting.await.is_err(), "an unconfirmed IK handshake must not complete");

        for replay in [&recorded, &recorded2] {
            let (mut a, mut b) = tokio::io::duplex(1 << 16);
            a.write_all(replay).await?;
            let r = respond(&mut b, &s, &allow_c, &cfg, &guard, &mut on_first).await;
            assert!(
                matches!(r, Err(HandshakeError::Replay { ref why, .. }) if why.contains("not newer")),
                "{:?}",
                r.err()
            );
            drop(b);
            let mut answer = Vec::new();
            a.read_to_end(&mut answer).await?;
            assert!(answer.is_empty(), "a replay must get no message 2");
        }
        Ok(())
    }

    #[test]
    fn ik_timestamps_outside_the_window_are_refused() {
        let guard = ReplayGuard::new(Duration::from_secs(300));
        let id = PeerId::from_bytes([9; 32]);
        let now = 1_000_000 * 1_000_000_000u64;
        let s = 1_000_000_000;
        let stale = guard.check(id, now - 301 * s, now);
        assert!(matches!(stale, Err(HandshakeError::Replay { ref why, .. }) if why.contains("old")), "{stale:?}");
        let future = guard.check(id, now + 301 * s, now);
        assert!(matches!(future, Err(HandshakeError::Replay { ref why, .. }) if why.contains("future")));
        assert!(guard.check(id, now - 299 * s, now).is_ok());
        assert!(guard.check(id, now - 299 * s, now).is_err(), "the same timestamp twice");
        assert!(guard.check(id, now + 299 * s, now).is_ok());
        assert!(next_timestamp() < next_timestamp());
    }

    #[tokio::test]
    async fn a_silent_socket_is_dropped_at_the_first_message_deadline() -> R {
        let s = Identity::generate()?;
        let cfg = Config { first_message_timeout: Duration::from_millis(50), ..Config::default() };
        let guard = ReplayGuard::new(cfg.ik_replay_window);
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(b"RFCM\x01").await?; // a preamble that never ends
        let mut on_first = || {};
        let r = respond(&mut b, &s, &AllowList::allow_any(), &cfg, &guard, &mut on_first).await;
        assert!(matches!(r, Err(HandshakeError::Timeout(t)) if t == cfg.first_message_timeout), "{:?}", r.err());
        Ok(())
    }
}
