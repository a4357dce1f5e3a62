//! The wire format below and above encryption, as pure functions (no I/O, fuzzed).
//!
//! ```text
//! frame    = len:u16be  ciphertext[len]          16 <= len <= max_frame_len (<= 65535)
//! record   = decrypt(ciphertext) = kind:u8 body   (at most 65519 bytes)
//!   0x01 BATCH      body = 1*( elen:u16be envelope[elen] )
//!   0x02 FRAG_FIRST body = total:u32be chunk      (an envelope too large for one record)
//!   0x03 FRAG_MORE  body = chunk                  (until `total` bytes are collected)
//!   0x10 REKEY      body = empty                  (sender rekeys its outgoing key right after)
//!   0x11 CLOSE      body = utf-8 reason
//!   0x12 ACCEPT     body = version:u8             (first record from the responder)
//! envelope = MessagePack array [v, type, id, correlation, topic|nil, payload:bin]
//! ```
//! See `docs/comm.md` for the full specification.

use bytes::{Buf, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::error::FrameError;

/// Bytes of the frame length prefix.
pub const LEN_PREFIX: usize = 2;
/// Largest Noise message (and so largest frame body).
pub const MAX_NOISE_MESSAGE: usize = 65535;
/// Poly1305 tag length.
pub const TAG_LEN: usize = 16;
/// Largest record plaintext.
pub const MAX_RECORD: usize = MAX_NOISE_MESSAGE - TAG_LEN;
/// Bytes of a batch entry's length prefix.
pub const ENTRY_PREFIX: usize = 2;
/// Largest envelope that fits a batch entry (bigger ones are fragmented).
pub const MAX_ENTRY: usize = MAX_RECORD - 1 - ENTRY_PREFIX;

/// Record kind: batch of envelopes.
pub const REC_BATCH: u8 = 0x01;
/// Record kind: first fragment of a large envelope.
pub const REC_FRAG_FIRST: u8 = 0x02;
/// Record kind: continuation fragment.
pub const REC_FRAG_MORE: u8 = 0x03;
/// Record kind: rekey marker.
pub const REC_REKEY: u8 = 0x10;
/// Record kind: orderly close.
pub const REC_CLOSE: u8 = 0x11;
/// Record kind: responder accepted the handshake.
pub const REC_ACCEPT: u8 = 0x12;

/// Protocol versions this build speaks (inclusive range).
pub const VERSIONS: (u8, u8) = (1, 1);

/// Incremental splitter of a byte stream into frames; refuses oversized frames before buffering
/// their bodies.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_frame_len: usize,
}

impl FrameDecoder {
    /// A decoder refusing frames longer than `max_frame_len` (clamped to 65535).
    pub fn new(max_frame_len: usize) -> Self {
        Self { buf: BytesMut::new(), max_frame_len: max_frame_len.min(MAX_NOISE_MESSAGE) }
    }

    /// Appends received bytes (tests and fuzzing; the connection reads into [`Self::read_buf`]).
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The buffer to read more bytes into; reserves room for the frame in progress only.
    pub fn read_buf(&mut self) -> &mut BytesMut {
        let want = match self.pending_len() {
            Some(len) => (LEN_PREFIX + len).saturating_sub(self.buf.len()).max(4096),
            None => 16 * 1024,
        };
        self.buf.reserve(want);
        &mut self.buf
    }

    fn pending_len(&self) -> Option<usize> {
        match self.buf.get(..LEN_PREFIX) {
            Some([a, b]) => Some(usize::from(u16::from_be_bytes([*a, *b]))),
            _ => None,
        }
    }

    /// Bytes still missing from the frame in progress (its length prefix included).
    pub fn frame_remaining(&self) -> usize {
        let whole = self.pending_len().map_or(LEN_PREFIX, |len| LEN_PREFIX + len);
        whole.saturating_sub(self.buf.len())
    }

    /// Drops the buffer's allocation when it is empty (idle connections hold no heap).
    pub fn release(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame body (ciphertext), if buffered.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        let Some(len) = self.pending_len() else { return Ok(None) };
        if len > self.max_frame_len {
            return Err(FrameError::TooLarge { len, max: self.max_frame_len });
        }
        if len < TAG_LEN {
            return Err(FrameError::TooShort { len });
        }
        if self.buf.len() < LEN_PREFIX + len {
            return Ok(None);
        }
        self.buf.advance(LEN_PREFIX);
        Ok(Some(self.buf.split_to(len).freeze()))
    }
}

/// A decrypted record, borrowing from the plaintext.
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// Envelopes (iterate with [`BatchEntries`]).
    Batch(BatchEntries<'a>),
    /// First fragment of an envelope of `total` bytes.
    FragFirst {
        /// Total envelope length.
        total: u32,
        /// This fragment's bytes.
        chunk: &'a [u8],
    },
    /// Continuation fragment.
    FragMore(&'a [u8]),
    /// Rekey marker.
    Rekey,
    /// Orderly close with a reason.
    Close(&'a str),
    /// Handshake accepted at this protocol version.
    Accept(u8),
}

/// Parses a decrypted record.
pub fn parse_record(plain: &[u8]) -> Result<Record<'_>, FrameError> {
    let (&kind, body) = plain.split_first().ok_or(FrameError::Malformed("empty record"))?;
    match kind {
        REC_BATCH => {
            if body.is_empty() {
                return Err(FrameError::Malformed("empty batch"));
            }
            Ok(Record::Batch(BatchEntries { rest: body }))
        }
        REC_FRAG_FIRST => match body.split_first_chunk::<4>() {
            Some((total, chunk)) if !chunk.is_empty() => {
                Ok(Record::FragFirst { total: u32::from_be_bytes(*total), chunk })
            }
            _ => Err(FrameError::Malformed("truncated first fragment")),
        },
        REC_FRAG_MORE if !body.is_empty() => Ok(Record::FragMore(body)),
        REC_FRAG_MORE => Err(FrameError::Malformed("empty fragment")),
        REC_REKEY if body.is_empty() => Ok(Record::Rekey),
        REC_REKEY => Err(FrameError::Malformed("rekey marker with a body")),
        REC_CLOSE => Ok(Record::Close(std::str::from_utf8(body).unwrap_or("(reason not utf-8)"))),
        REC_ACCEPT => match body {
            [v] => Ok(Record::Accept(*v)),
            _ => Err(FrameError::Malformed("accept record must hold one version byte")),
        },
        other => Err(FrameError::UnknownRecord(other)),
    }
}

/// Iterator over the envelopes of a batch record.
#[derive(Debug, PartialEq, Eq)]
pub struct BatchEntries<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for BatchEntries<'a> {
    type Item = Result<&'a [u8], FrameError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let Some((len, rest)) = self.rest.split_first_chunk::<2>() else {
            self.rest = &[];
            return Some(Err(FrameError::Malformed("truncated batch entry length")));
        };
        let len = usize::from(u16::from_be_bytes(*len));
        match (rest.get(..len), rest.get(len..)) {
            (Some(entry), Some(after)) if len > 0 => {
                self.rest = after;
                Some(Ok(entry))
            }
            _ => {
                self.rest = &[];
                Some(Err(FrameError::Malformed("batch entry overruns the record")))
            }
        }
    }
}

/// What an envelope carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// One-way message.
    Message = 1,
    /// Request expecting a [`Kind::Reply`] or [`Kind::Error`] with `correlation = id`.
    Request = 2,
    /// Successful reply.
    Reply = 3,
    /// Error reply (payload: utf-8 reason).
    Error = 4,
    /// Publication on `topic`.
    Publish = 5,
    /// Ask the peer to forward publications on `topic`.
    Subscribe = 6,
    /// Stop forwarding `topic`.
    Unsubscribe = 7,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Kind::Message,
            2 => Kind::Request,
            3 => Kind::Reply,
            4 => Kind::Error,
            5 => Kind::Publish,
            6 => Kind::Subscribe,
            7 => Kind::Unsubscribe,
            _ => return None,
        })
    }
}

/// The message envelope (wire form in `docs/comm.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Protocol version (the negotiated one).
    pub version: u8,
    /// Message type.
    pub kind: Kind,
    /// Sender-chosen id (unique per connection and direction for requests).
    pub id: u64,
    /// For replies: the request's id; otherwise 0.
    pub correlation: u64,
    /// Topic for publish/subscribe.
    pub topic: Option<String>,
    /// Application bytes (shares the decrypted record's buffer; no copy).
    pub payload: Bytes,
}

#[derive(Serialize)]
struct WireOut<'a>(u8, u8, u64, u64, Option<&'a str>, #[serde(with = "serde_bytes")] &'a [u8]);

#[derive(Deserialize)]
struct WireIn<'a>(u8, u8, u64, u64, #[serde(borrow)] Option<&'a str>, #[serde(with = "serde_bytes", borrow)] &'a [u8]);

/// Fixed MessagePack overhead upper bound of an envelope besides topic and payload.
pub const ENVELOPE_OVERHEAD: usize = 1 + 2 + 2 + 9 + 9 + 2 + 5;

impl Envelope {
    /// Appends the MessagePack encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let wire =
            WireOut(self.version, self.kind as u8, self.id, self.correlation, self.topic.as_deref(), &self.payload);
        rmp_serde::encode::write(out, &wire).map_err(|e| FrameError::Envelope(e.to_string()))
    }

    /// Appends the encoding of everything before the payload bytes, ending with the payload's
    /// MessagePack `bin` header: `head ‖ payload` is exactly what [`Envelope::encode_into`]
    /// writes. Lets a large payload be sent in fragments without copying it.
    pub fn encode_head_into(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let start = out.len();
        let wire = WireOut(self.version, self.kind as u8, self.id, self.correlation, self.topic.as_deref(), &[]);
        rmp_serde::encode::write(out, &wire).map_err(|e| FrameError::Envelope(e.to_string()))?;
        // An empty payload encodes as `bin8` of length 0 (0xc4 0x00), the last two bytes.
        if out.len() < start + 2 || out.get(out.len() - 2..) != Some(&[0xc4, 0x00][..]) {
            return Err(FrameError::Envelope("unexpected encoding of an empty payload".into()));
        }
        out.truncate(out.len() - 2);
        let n = self.payload.len();
        if let Ok(n) = u8::try_from(n) {
            out.extend_from_slice(&[0xc4, n]);
        } else if let Ok(n) = u16::try_from(n) {
            out.push(0xc5);
            out.extend_from_slice(&n.to_be_bytes());
        } else {
            let n = u32::try_from(n).map_err(|_| FrameError::Envelope("payload above 4 GiB".into()))?;
            out.push(0xc6);
            out.extend_from_slice(&n.to_be_bytes());
        }
        Ok(())
    }

    /// Upper bound of the encoded size.
    pub fn encoded_len_hint(&self) -> usize {
        ENVELOPE_OVERHEAD + self.topic.as_ref().map_or(0, |t| t.len() + 2) + self.payload.len()
    }

    /// Decodes `entry`, which must lie inside `record` (the payload then shares `record`'s buffer).
    pub fn decode(record: &Bytes, entry: &[u8]) -> Result<Self, FrameError> {
        let wire: WireIn<'_> = rmp_serde::from_slice(entry).map_err(|e| FrameError::Envelope(e.to_string()))?;
        // The payload is the last field and borrows from `entry`: it must end exactly at its end.
        let end = (wire.5.as_ptr() as usize).wrapping_sub(entry.as_ptr() as usize).wrapping_add(wire.5.len());
        if end != entry.len() {
            return Err(FrameError::Envelope("trailing bytes after the envelope".into()));
        }
        let WireIn(version, kind, id, correlation, topic, payload) = wire;
        let kind = Kind::from_u8(kind).ok_or_else(|| FrameError::Envelope(format!("unknown message type {kind}")))?;
        Ok(Self { version, kind, id, correlation, topic: topic.map(str::to_owned), payload: share(record, payload) })
    }
}

/// Returns `sub` as a zero-copy slice of `whole` when it lies inside it, else a copy.
fn share(whole: &Bytes, sub: &[u8]) -> Bytes {
    let base = whole.as_ptr() as usize;
    let start = (sub.as_ptr() as usize).wrapping_sub(base);
    match start.checked_add(sub.len()) {
        Some(end) if start <= whole.len() && end <= whole.len() && !sub.is_empty() => whole.slice(start..end),
        _ => Bytes::copy_from_slice(sub),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(payload: &'static [u8]) -> Envelope {
        Envelope {
            version: 1,
            kind: Kind::Publish,
            id: u64::MAX,
            correlation: 7,
            topic: Some("t/1".into()),
            payload: Bytes::from_static(payload),
        }
    }

    #[test]
    fn envelope_round_trip_shares_the_record_buffer() -> Result<(), FrameError> {
        let e = env(b"hello");
        let mut out = Vec::new();
        e.encode_into(&mut out)?;
        assert!(out.len() <= e.encoded_len_hint());
        let record = Bytes::from(out);
        let d = Envelope::decode(&record, &record)?;
        assert_eq!(d, e);
        let (p0, r0) = (d.payload.as_ptr() as usize, record.as_ptr() as usize);
        assert!(p0 >= r0 && p0 < r0 + record.len(), "payload must not be copied");
        Ok(())
    }

    #[test]
    fn head_then_payload_is_the_whole_encoding() -> Result<(), FrameError> {
        for n in [0usize, 1, 255, 256, 65535, 65536, 1 << 20] {
            for topic in [None, Some("t/1".to_owned())] {
                let e = Envelope { payload: Bytes::from(vec![7u8; n]), topic, ..env(b"") };
                let (mut whole, mut head) = (Vec::new(), Vec::new());
                e.encode_into(&mut whole)?;
                e.encode_head_into(&mut head)?;
                head.extend_from_slice(&e.payload);
                assert!(head == whole, "payload of {n} bytes");
            }
        }
        Ok(())
    }

    #[test]
    fn envelope_with_trailing_bytes_or_unknown_type_is_refused() -> Result<(), FrameError> {
        let mut out = Vec::new();
        env(b"x").encode_into(&mut out)?;
        out.push(0);
        let rec = Bytes::from(out);
        assert!(matches!(Envelope::decode(&rec, &rec), Err(FrameError::Envelope(_))));
        let bad = WireOut(1, 99, 1, 0, None, b"");
        let rec = Bytes::from(rmp_serde::to_vec(&bad).map_err(|e| FrameError::Envelope(e.to_string()))?);
        assert!(matches!(Envelope::decode(&rec, &rec), Err(FrameError::Envelope(_))));
        Ok(())
    }

    #[test]
    fn decoder_refuses_oversized_frame_from_the_prefix_alone() {
        let mut d = FrameDecoder::new(1024);
        d.push(&[0x04, 0x01]);
        assert_eq!(d.next_frame(), Err(FrameError::TooLarge { len: 1025, max: 1024 }));
        let mut d = FrameDecoder::new(1024);
        d.push(&[0, 3, 1, 2, 3]);
        assert_eq!(d.next_frame(), Err(FrameError::TooShort { len: 3 }));
    }

    #[test]
    fn decoder_splits_frames_across_pushes() -> Result<(), FrameError> {
        let mut d = FrameDecoder::new(65535);
        let body = [7u8; 20];
        d.push(&[0, 20]);
        d.push(body.get(..5).unwrap_or_default());
        assert_eq!(d.next_frame()?, None);
        d.push(body.get(5..).unwrap_or_default());
        d.push(&[0]);
        assert_eq!(d.next_frame()?.as_deref(), Some(&body[..]));
        assert_eq!(d.next_frame()?, None);
        assert_eq!(d.buffered(), 1);
        Ok(())
    }

    #[test]
    fn records_parse_and_reject_malformed() {
        assert_eq!(parse_record(&[REC_REKEY]), Ok(Record::Rekey));
        assert_eq!(parse_record(&[REC_ACCEPT, 1]), Ok(Record::Accept(1)));
        assert!(parse_record(&[]).is_err());
        assert!(parse_record(&[REC_BATCH]).is_err());
        assert!(parse_record(&[REC_REKEY, 0]).is_err());
        assert_eq!(parse_record(&[0x7f]), Err(FrameError::UnknownRecord(0x7f)));
        let entries: Vec<_> = match parse_record(&[REC_BATCH, 0, 1, 9, 0, 2, 8]) {
            Ok(Record::Batch(b)) => b.collect(),
            other => vec![Err(FrameError::Malformed(if other.is_ok() { "not a batch" } else { "error" }))],
        };
        assert_eq!(entries, vec![Ok(&[9u8][..]), Err(FrameError::Malformed("batch entry overruns the record"))]);
    }
}
