//! Typed errors, one enum per operation. Every message says what was wrong and what to do.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::identity::PeerId;

/// A structural problem in bytes received from a peer (after or outside decryption).
///
/// Produced by the pure decoders in [`crate::frame`]; never by I/O.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix announces a frame larger than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes; refused before reading it")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The length prefix announces a frame too short to hold an authentication tag.
    #[error("frame of {len} bytes is shorter than the 16-byte authentication tag")]
    TooShort {
        /// Announced length.
        len: usize,
    },
    /// A decrypted record is empty or has an unknown kind byte.
    #[error("record kind {0:#04x} is unknown (peer speaks a different protocol?)")]
    UnknownRecord(u8),
    /// A record's body is truncated or inconsistent.
    #[error("malformed record: {0}")]
    Malformed(&'static str),
    /// A MessagePack envelope does not decode.
    #[error("malformed envelope: {0}")]
    Envelope(String),
    /// An envelope announces a message larger than the configured maximum.
    #[error("message of {len} bytes exceeds the maximum of {max} bytes")]
    MessageTooLarge {
        /// Announced length.
        len: u64,
        /// Configured maximum.
        max: usize,
    },
}

/// Why a handshake failed. The connection is closed; nothing was delivered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// Socket error during the handshake.
    #[error("i/o error during handshake: {0}")]
    Io(#[from] io::Error),
    /// The peer did not complete the handshake in time.
    #[error("handshake did not complete within {0:?}; is the peer a referee-comm node?")]
    Timeout(Duration),
    /// The first bytes are not a referee-comm preamble.
    #[error("peer is not speaking referee-comm (bad preamble {0}); check the address and port")]
    BadPreamble(String),
    /// A handshake frame was malformed or oversized.
    #[error("bad handshake frame: {0}")]
    Frame(#[from] FrameError),
    /// The Noise handshake itself failed (wrong static key, tampering, garbage).
    #[error(
        "noise handshake failed ({0}): the peer's static key is not the expected one, or the bytes were tampered with"
    )]
    Noise(snow::Error),
    /// The identity payload inside the handshake is malformed.
    #[error("peer's identity payload is malformed: {0}")]
    BadHello(&'static str),
    /// The peer's Ed25519 identity is not on our allow-list.
    #[error("peer {0} is not on the allow-list; add its identity to let it connect")]
    UnknownPeer(PeerId),
    /// The peer's Ed25519 signature does not bind its Noise static key (man in the middle?).
    #[error("peer claiming identity {0} presented a Noise static key that identity did not sign (man in the middle?)")]
    BadBinding(PeerId),
    /// We connected to a specific peer and someone else answered.
    #[error("expected peer {expected} but {got} answered; check the address")]
    WrongPeer {
        /// The identity we asked for.
        expected: PeerId,
        /// The identity that answered.
        got: PeerId,
    },
    /// The two nodes share no protocol version.
    #[error(
        "no common protocol version: we speak {ours_min}..={ours_max}, the peer speaks {theirs_min}..={theirs_max}; upgrade the older node"
    )]
    NoCommonVersion {
        /// Our lowest version.
        ours_min: u8,
        /// Our highest version.
        ours_max: u8,
        /// Peer's lowest version.
        theirs_min: u8,
        /// Peer's highest version.
        theirs_max: u8,
    },
    /// The responder refused us after the handshake (its reason is included).
    #[error("peer refused the connection: {0}")]
    Refused(String),

    /// An IK first message whose timestamp is not newer than the last one seen from that identity,
    /// or outside the replay window around the responder's clock.
    #[error("IK first message from {peer} refused: {why}")]
    Replay {
        /// The identity the message claims.
        peer: PeerId,
        /// Replayed, too old or too far in the future.
        why: String,
    },

    /// The pre-authentication pool was full and this handshake was the one idle longest.
    #[error("handshake evicted: too many unauthenticated handshakes in progress (Config::max_handshakes)")]
    Evicted,
    /// The peer closed the socket mid-handshake.
    #[error(
        "peer closed the connection during the handshake (it may not allow our identity, or the static key we expected for it is wrong)"
    )]
    PeerClosed,
}

/// Why an established connection closed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionError {
    /// Socket error.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// A frame or record was structurally invalid.
    #[error("protocol violation: {0}")]
    Frame(#[from] FrameError),
    /// A frame failed authenticated decryption.
    #[error("frame {index} failed authentication: it was tampered with, replayed or reordered; connection closed")]
    Decrypt {
        /// Zero-based index of the failing frame since the handshake.
        index: u64,
    },
    /// The envelope's protocol version differs from the negotiated one.
    #[error("envelope has protocol version {got}, but version {negotiated} was negotiated")]
    VersionMismatch {
        /// Version in the envelope.
        got: u8,
        /// Version agreed at handshake.
        negotiated: u8,
    },
    /// The peer announced an orderly close.
    #[error("peer closed the connection ({0})")]
    PeerClosed(String),
    /// The peer closed the socket without an orderly close record.
    #[error("peer closed the socket without saying goodbye")]
    Eof,
    /// We closed the connection.
    #[error("connection closed locally")]
    ClosedLocally,
    /// The peer subscribed to more topics than allowed.
    #[error("peer subscribed to more than {0} topics; raise `Config::max_topics_per_peer` if that is legitimate")]
    TooManyTopics(usize),

    /// The peer accepted no bytes of a pending write within `Config::write_timeout`.
    #[error("peer read nothing for {0:?}; disconnected instead of waiting (Config::write_timeout)")]
    WriteStalled(Duration),

    /// No room in the byte budget (the peer's or the node's) within `Config::message_timeout`.
    #[error("no room in the byte budget for {0:?} (the peer's or the node's); disconnected (Config::message_timeout)")]
    BudgetTimeout(Duration),

    /// A fragmented message, or one frame, did not arrive in full within `Config::message_timeout`.
    #[error("message or frame incomplete after {0:?}; disconnected (Config::message_timeout)")]
    MessageTimeout(Duration),
}

/// Why a message could not be queued.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The connection is closed; the reason is included.
    #[error("connection closed: {0}")]
    Closed(Arc<ConnectionError>),
    /// The message exceeds `Config::max_message_len`.
    #[error("message of {len} bytes exceeds the maximum of {max} bytes; split it or raise `Config::max_message_len`")]
    TooLarge {
        /// Message length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The topic name is empty or longer than 255 bytes.
    #[error("topic must be 1..=255 bytes, got {0} bytes")]
    BadTopic(usize),
}

/// Why a request got no reply.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The request could not be sent.
    #[error(transparent)]
    Send(#[from] SendError),
    /// No reply within the timeout.
    #[error("no reply within {0:?}; the peer is slow or not answering requests")]
    Timeout(Duration),
    /// The connection closed before the reply arrived.
    #[error("connection closed before the reply arrived: {0}")]
    Closed(Arc<ConnectionError>),
    /// The peer answered with an error.
    #[error("peer answered with an error: {0}")]
    Remote(String),
}

/// Why connecting or binding failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// Socket error (after retries, if any).
    #[error("could not connect to {addr}: {source}")]
    Io {
        /// Address we tried.
        addr: String,
        /// Last error.
        source: io::Error,
    },
    /// Binding a listener failed.
    #[error(
        "could not listen on {addr}: {source} (another process may hold it, or a stale Unix socket file is in the way)"
    )]
    Bind {
        /// Address we tried.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The handshake failed; retrying will not help.
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        /// Address we tried.
        addr: String,
        /// Why.
        source: HandshakeError,
    },
    /// The address string does not parse.
    #[error("bad address `{0}`: use tcp://HOST:PORT, unix:///PATH or quic://HOST:PORT")]
    BadAddress(String),
    /// QUIC/TLS setup failed.
    #[error("QUIC setup failed: {0}")]
    Quic(String),
}

/// Why an identity could not be created, loaded or stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// File I/O failed.
    #[error("identity file {path}: {source}")]
    Io {
        /// File path.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The identity text is malformed.
    #[error("identity is malformed: {0}; regenerate it with `referee comm keygen`")]
    Malformed(&'static str),
    /// A peer id string is malformed.
    #[error("peer id `{0}` is not 64 hex characters of an Ed25519 public key")]
    BadPeerId(String),
    /// The OS random generator failed.
    #[error("random generator failed: {0}")]
    Random(String),
    /// The secret file is readable by group or others.
    #[error("identity file {0} is readable by group or others; run `chmod 600` on it")]
    Permissions(String),
}
