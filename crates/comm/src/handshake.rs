//! The connection preamble and the Noise XX / IK handshakes with identity checks.
//!
//! ```text
//! initiator -> responder : "RFCM" 0x01 pattern        (6 bytes, also the Noise prologue)
//! XX:  -> e                    <- e, ee, s, es, Hello(resp)     -> s, se, Hello(init)
//! IK:  -> e, es, s, ss, Hello(init)                 <- e, ee, se, Hello(resp)
//! responder -> initiator : transport record ACCEPT(version) or CLOSE(reason)
//! ```

use std::fmt;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::Config;
use crate::error::{FrameError, HandshakeError};
use crate::frame::{self, FrameDecoder, LEN_PREFIX, MAX_NOISE_MESSAGE, Record};
use crate::identity::{AllowList, Hello, Identity, PeerId};
use crate::noise::{Pattern, builder};

/// Connection preamble magic.
pub const PREAMBLE_MAGIC: &[u8; 4] = b"RFCM";
/// Preamble (wire) format version.
pub const PREAMBLE_VERSION: u8 = 1;

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
            let n = hs.write_message(&hello, &mut buf).map_err(noise_err)?;
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

/// Runs the responder side on an accepted stream.
pub(crate) async fn respond<S>(
    io: &mut S,
    me: &Identity,
    allow: &AllowList,
    cfg: &Config,
) -> Result<Established, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
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
    let mut dec = FrameDecoder::new(cfg.max_frame_len);
    let mut hs = builder(pattern)
        .local_private_key(me.noise_private())
        .and_then(|b| b.prologue(&pre))
        .and_then(|b| b.build_responder())
        .map_err(noise_err)?;
    let hello = me.hello(frame::VERSIONS);
    let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
    let peer_hello = match pattern {
        Pattern::Xx => {
            let m1 = read_frame(io, &mut dec).await?;
            hs.read_message(&m1, &mut buf).map_err(noise_err)?;
            let n = hs.write_message(&hello, &mut buf).map_err(noise_err)?;
            write_frame(io, buf.get(..n).unwrap_or_default()).await?;
            let m3 = read_frame(io, &mut dec).await?;
            let n = hs.read_message(&m3, &mut buf).map_err(noise_err)?;
            Hello::decode(buf.get(..n).unwrap_or_default())?
        }
        Pattern::Ik => {
            let m1 = read_frame(io, &mut dec).await?;
            let n = hs.read_message(&m1, &mut buf).map_err(noise_err)?;
            let peer_hello = Hello::decode(buf.get(..n).unwrap_or_default())?;
            // Refuse unknown initiators before revealing anything in message 2.
            peer_hello.verify(&remote_static(&hs)?, allow)?;
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
        let (client, responder) = tokio::join!(
            initiate(&mut a, &forged, &allow_server, Expect::default(), &cfg),
            respond(&mut b, &server, &allow_victim, &cfg),
        );
        assert!(matches!(responder, Err(HandshakeError::BadBinding(id)) if id == victim.id()), "{:?}", responder.err());
        assert!(matches!(client, Err(HandshakeError::Refused(ref r)) if r.contains("man in the middle")));
        Ok(())
    }

    #[tokio::test]
    async fn ik_and_xx_both_succeed_over_an_in_memory_stream() -> R {
        let (c, s) = (Identity::generate()?, Identity::generate()?);
        let cfg = Config::default();
        for expect in [Expect::default(), Expect { remote_static: Some(*s.noise_public()), peer: Some(s.id()) }] {
            let (mut a, mut b) = tokio::io::duplex(1 << 16);
            let allow_c = AllowList::new([c.id()]);
            let allow_s = AllowList::new([s.id()]);
            let respond_and_accept = async {
                let est = respond(&mut b, &s, &allow_c, &cfg).await?;
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
}
