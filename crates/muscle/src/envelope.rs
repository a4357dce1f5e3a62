//! The whole `.muscle` envelope: prefix, header, key delivery, encrypted payload, signatures.
//!
//! [`SealedMuscle::parse`] only checks structure; it needs no keys and trusts nothing. The
//! cryptographic checks live in [`crate::open`].

use crate::error::FormatError;
use crate::header::{Header, KeyId, KeyMode, SignatureScheme};
use crate::limits::{MAX_HEADER_LEN, MAX_RECIPIENTS};
use crate::wire::{Reader, Writer};

/// The eight magic bytes. The high first byte and the trailing newline catch 7-bit and
/// line-ending mangling, as in PNG.
pub const MAGIC: [u8; 8] = [0x89, b'M', b'U', b'S', b'C', b'L', b'E', b'\n'];
/// The envelope format version this build reads and writes.
pub const FORMAT_VERSION: u16 = 1;

/// Magic (8) + format version (2) + header length (4).
pub(crate) const PREFIX_LEN: usize = 8 + 2 + 4;
/// Smallest possible header body: fixed fields and empty lists with one-byte name and ABI.
pub(crate) const MIN_HEADER_LEN: usize = 4 + 32 + 16 + 8 + 8 + 2 + 2 + 2 + 1 + 20 + 2 + 32 + 8 + 1;
/// Payload nonce length (both suites).
pub(crate) const NONCE_LEN: usize = 12;
/// AEAD tag length (both suites).
pub(crate) const TAG_LEN: usize = 16;
/// A wrapped 32-byte content key: ciphertext plus tag.
pub(crate) const WRAPPED_KEY_LEN: usize = 32 + TAG_LEN;
/// One recipient record: referee id, encapsulated key, wrapped key.
pub(crate) const RECIPIENT_RECORD_LEN: usize = 32 + 32 + WRAPPED_KEY_LEN;
/// Ed25519 signature length.
pub(crate) const ED25519_SIG_LEN: usize = 64;
/// ML-DSA-65 signature length (FIPS 204).
pub(crate) const ML_DSA_65_SIG_LEN: usize = 3309;

/// The content key wrapped under a key derived from the referee's master key.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct MasterKeyWrap {
    /// Which master key (its [`crate::MasterKey::key_id`]).
    pub master_key_id: KeyId,
    /// HKDF salt, fresh per muscle.
    pub salt: [u8; 32],
    /// Nonce of the wrapping AEAD.
    pub nonce: [u8; NONCE_LEN],
    /// Encrypted content key and tag.
    pub wrapped_key: [u8; WRAPPED_KEY_LEN],
}

/// The content key sealed with HPKE to one referee.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct RecipientWrap {
    /// The recipient referee's key id.
    pub referee: KeyId,
    /// HPKE encapsulated key (X25519 ephemeral public key).
    pub encapped_key: [u8; 32],
    /// HPKE ciphertext of the content key, with tag.
    pub wrapped_key: [u8; WRAPPED_KEY_LEN],
}

/// How the content key is delivered.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum KeyDelivery {
    /// Master-key mode.
    MasterKey(MasterKeyWrap),
    /// Recipient mode: one record per referee, sorted by key id, unique.
    Recipients(Vec<RecipientWrap>),
}

impl KeyDelivery {
    fn encode(&self, w: &mut Writer) {
        match self {
            Self::MasterKey(m) => {
                w.put(&m.master_key_id.0);
                w.put(&m.salt);
                w.put(&m.nonce);
                w.put(&m.wrapped_key);
            }
            Self::Recipients(list) => {
                w.u8(u8::try_from(list.len()).unwrap_or(u8::MAX));
                for r in list {
                    w.put(&r.referee.0);
                    w.put(&r.encapped_key);
                    w.put(&r.wrapped_key);
                }
            }
        }
    }

    fn read(r: &mut Reader<'_>, mode: KeyMode) -> Result<Self, FormatError> {
        match mode {
            KeyMode::MasterKey => Ok(Self::MasterKey(MasterKeyWrap {
                master_key_id: KeyId(r.array("master key id")?),
                salt: r.array("key wrap salt")?,
                nonce: r.array("key wrap nonce")?,
                wrapped_key: r.array("wrapped content key")?,
            })),
            KeyMode::Recipients => {
                let offset = r.position();
                let count = usize::from(r.u8("recipient count")?);
                if !(1..=MAX_RECIPIENTS).contains(&count) {
                    return Err(FormatError::BadLength {
                        field: "recipient count",
                        offset,
                        len: count as u64,
                        max: MAX_RECIPIENTS as u64,
                    });
                }
                let list = (0..count)
                    .map(|_| {
                        Ok(RecipientWrap {
                            referee: KeyId(r.array("recipient id")?),
                            encapped_key: r.array("recipient encapsulated key")?,
                            wrapped_key: r.array("recipient wrapped key")?,
                        })
                    })
                    .collect::<Result<Vec<_>, FormatError>>()?;
                if !list.windows(2).all(|w| matches!(w, [a, b] if a.referee < b.referee)) {
                    return Err(FormatError::NonCanonical {
                        field: "recipients",
                        why: "entries must be sorted by referee id and unique",
                    });
                }
                Ok(Self::Recipients(list))
            }
        }
    }
}

/// A structurally valid muscle, borrowed from its bytes. Nothing in it is verified yet.
#[derive(Debug)]
pub struct SealedMuscle<'a> {
    /// The decoded header.
    pub header: Header,
    /// The key delivery record.
    pub delivery: KeyDelivery,
    /// Bytes from the magic to the end of the header: the AEAD associated data.
    pub(crate) header_bytes: &'a [u8],
    /// The payload nonce.
    pub(crate) nonce: [u8; NONCE_LEN],
    /// Encrypted payload followed by its tag.
    pub(crate) ciphertext: &'a [u8],
    /// Everything the signatures cover.
    pub(crate) signed: &'a [u8],
    pub(crate) ed25519_sig: [u8; ED25519_SIG_LEN],
    pub(crate) ml_dsa_sig: Option<&'a [u8]>,
}

impl<'a> SealedMuscle<'a> {
    /// Parses the envelope structure. Fails on anything that is not exactly one
    /// well-formed v1 muscle; never panics, never allocates more than the input's size.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, FormatError> {
        let mut r = Reader::new(bytes);
        if r.array::<8>("magic").map_err(|_| FormatError::BadMagic)? != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = r.u16("format version")?;
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion { found: version, supported: FORMAT_VERSION });
        }
        let len_offset = r.position();
        let header_len = r.u32("header length")?;
        if header_len > MAX_HEADER_LEN {
            return Err(FormatError::BadLength {
                field: "header length",
                offset: len_offset,
                len: u64::from(header_len),
                max: u64::from(MAX_HEADER_LEN),
            });
        }
        let body_offset = r.position();
        let body = r.take(header_len as usize, "header")?;
        let header = Header::decode_body(body, body_offset)?;
        let header_bytes = bytes.get(..r.position()).ok_or(FormatError::Truncated { field: "header", offset: 0 })?;

        let delivery = KeyDelivery::read(&mut r, header.key_mode)?;
        let nonce = r.array("payload nonce")?;
        // payload_len <= MAX_PAYLOAD_LEN was checked by the header, so this cannot overflow.
        let ciphertext_len = header.payload_len as usize + TAG_LEN;
        let ciphertext = r.take(ciphertext_len, "ciphertext")?;
        let signed = bytes.get(..r.position()).ok_or(FormatError::Truncated { field: "ciphertext", offset: 0 })?;
        let ed25519_sig = r.array("Ed25519 signature")?;
        let ml_dsa_sig = match header.signature_scheme {
            SignatureScheme::Ed25519 => None,
            SignatureScheme::Ed25519MlDsa65 => Some(r.take(ML_DSA_65_SIG_LEN, "ML-DSA-65 signature")?),
        };
        if r.remaining() != 0 {
            return Err(FormatError::TrailingBytes { extra: r.remaining() });
        }
        Ok(Self { header, delivery, header_bytes, nonce, ciphertext, signed, ed25519_sig, ml_dsa_sig })
    }
}

/// Writes the prefix and header; returns the bytes so far (they are the AEAD associated data).
pub(crate) fn encode_header(header: &Header) -> Result<Writer, FormatError> {
    header.validate()?;
    let mut body = Writer::default();
    header.encode_body(&mut body);
    let body_len = crate::header::check_header_len(body.len())?;
    let capacity = PREFIX_LEN + body.len() + 1024 + header.payload_len as usize + ML_DSA_65_SIG_LEN;
    let mut w = Writer::with_capacity(capacity);
    w.put(&MAGIC);
    w.u16(FORMAT_VERSION);
    w.u32(body_len);
    w.put(body.as_slice());
    Ok(w)
}

/// Appends the key delivery record.
pub(crate) fn encode_delivery(w: &mut Writer, delivery: &KeyDelivery) {
    delivery.encode(w);
}
