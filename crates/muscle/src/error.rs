//! Typed errors. Every message says what was wrong and, where the user can act, what to do.

use crate::header::{KeyId, MuscleId};

/// Why a byte string is not a well-formed `.muscle` (or key) encoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The input ended before a field was complete.
    #[error("truncated: `{field}` at byte {offset} runs past the end of the input")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Byte offset where it starts.
        offset: usize,
    },
    /// The first eight bytes are not the `.muscle` magic.
    #[error("not a .muscle file: wrong magic bytes (was it produced by `referee compile`?)")]
    BadMagic,
    /// The format version is not one this build understands.
    #[error("format version {found} is not supported by this referee (it reads version {supported}); upgrade referee")]
    UnsupportedVersion {
        /// Version found in the file.
        found: u16,
        /// Version this build reads.
        supported: u16,
    },
    /// An enumerated field holds a value this build does not know.
    #[error("unsupported value {value} for `{field}` at byte {offset}")]
    Unsupported {
        /// The field.
        field: &'static str,
        /// Byte offset of the field.
        offset: usize,
        /// The raw value found.
        value: u64,
    },
    /// A length or count is outside its documented limit.
    #[error("`{field}` at byte {offset} has length {len}, outside the allowed range (max {max})")]
    BadLength {
        /// The field.
        field: &'static str,
        /// Byte offset of the field.
        offset: usize,
        /// The length found.
        len: u64,
        /// The documented maximum.
        max: u64,
    },
    /// A text field is not valid UTF-8.
    #[error("`{field}` at byte {offset} is not valid UTF-8")]
    NotUtf8 {
        /// The field.
        field: &'static str,
        /// Byte offset of the field.
        offset: usize,
    },
    /// A text field has characters outside its documented alphabet.
    #[error("`{field}` value {value:?} is invalid: {rule}")]
    BadText {
        /// The field.
        field: &'static str,
        /// The offending value.
        value: String,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// A field that has exactly one valid encoding was encoded another way
    /// (unsorted or duplicate list entries, non-zero reserved bits, a header length that
    /// does not match its contents).
    #[error("non-canonical encoding of `{field}`: {why}")]
    NonCanonical {
        /// The field.
        field: &'static str,
        /// What was wrong.
        why: &'static str,
    },
    /// The header carries a critical extension this build does not understand.
    #[error("critical header extension {tag:#06x} is not understood by this referee; upgrade referee")]
    UnknownCriticalExtension {
        /// The extension tag.
        tag: u16,
    },
    /// Bytes follow the last signature.
    #[error("{extra} unexpected bytes after the signatures")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// A key file does not hold the expected kind of key.
    #[error("not a {expected} key file (expected a first line `{expected}`); check the path")]
    WrongKeyKind {
        /// The key-file tag that was expected.
        expected: &'static str,
    },
    /// A key's bytes are not a valid key of their type.
    #[error("invalid {what}: {why}")]
    InvalidKey {
        /// Which key.
        what: &'static str,
        /// Why.
        why: &'static str,
    },
}

/// Why sealing failed. Sealing only fails on invalid requests or an unavailable OS RNG.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The header that would be written is invalid.
    #[error("invalid muscle description: {0}")]
    InvalidHeader(#[from] FormatError),
    /// Recipient mode needs at least one recipient.
    #[error("recipient mode needs at least one referee public key (pass --recipient FILE)")]
    NoRecipients,
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator is unavailable: {0}")]
    Randomness(String),
    /// A cryptographic primitive refused its inputs (should not happen with valid keys).
    #[error("encryption failed: {0}")]
    Crypto(&'static str),
}

/// Which signature failed to verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureKind {
    /// The classical Ed25519 signature.
    Ed25519,
    /// The post-quantum ML-DSA-65 signature.
    MlDsa65,
}

impl std::fmt::Display for SignatureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ed25519 => "Ed25519",
            Self::MlDsa65 => "ML-DSA-65",
        })
    }
}

/// Why a referee refuses to open a muscle. Variants are listed in the order the checks run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The blob is larger than any valid muscle, or smaller than the smallest.
    #[error("muscle is {len} bytes, outside the allowed range {min}..={max} bytes")]
    Size {
        /// Size of the blob.
        len: usize,
        /// Smallest possible muscle.
        min: usize,
        /// Largest accepted muscle.
        max: usize,
    },
    /// The blob is not a well-formed muscle.
    #[error("malformed muscle: {0}")]
    Malformed(#[from] FormatError),
    /// The trust store could not be read.
    #[error("trust store unavailable: {0}")]
    TrustStore(String),
    /// The publisher's key is not in the trust store.
    #[error(
        "publisher {publisher} is not trusted by this referee (add its public key with `referee trust add PUBLISHER.pub`)"
    )]
    UntrustedPublisher {
        /// The publisher key id from the header.
        publisher: KeyId,
    },
    /// The publisher's key has been revoked.
    #[error("publisher {publisher} has been revoked on this referee")]
    PublisherRevoked {
        /// The revoked publisher.
        publisher: KeyId,
    },
    /// This muscle id has been revoked (all versions).
    #[error("muscle id {muscle_id} has been revoked on this referee (all versions)")]
    MuscleRevoked {
        /// The revoked muscle id.
        muscle_id: MuscleId,
    },
    /// This version of the muscle has been revoked.
    #[error("muscle id {muscle_id} version {version} has been revoked on this referee; publish a newer version")]
    VersionRevoked {
        /// The muscle id.
        muscle_id: MuscleId,
        /// The revoked version.
        version: u64,
    },
    /// The trust store requires a post-quantum signature for this publisher and there is none.
    #[error(
        "publisher {publisher} must sign with ML-DSA-65 as well on this referee; re-seal with `referee compile --pq`"
    )]
    PostQuantumRequired {
        /// The publisher.
        publisher: KeyId,
    },
    /// A signature does not verify: the blob was modified or signed by another key.
    #[error(
        "{kind} signature does not verify: the muscle was modified after sealing or not signed by publisher {publisher}"
    )]
    BadSignature {
        /// Which signature failed.
        kind: SignatureKind,
        /// The publisher named in the header.
        publisher: KeyId,
    },
    /// The muscle is bound to other referees.
    #[error(
        "muscle is bound to other referees ({allowed}); this referee is {referee}. Ask the publisher to re-seal it for this referee"
    )]
    NotBoundHere {
        /// This referee's key id.
        referee: KeyId,
        /// The allowed referee ids, short form, comma separated.
        allowed: String,
    },
    /// A higher version of the muscle was already accepted.
    #[error(
        "muscle `{name}` v{version} is older than v{highest} already accepted from publisher {publisher}; refusing rollback (use `referee trust allow-rollback` to override)"
    )]
    Rollback {
        /// Muscle name.
        name: String,
        /// Version of the blob.
        version: u64,
        /// Highest version accepted so far.
        highest: u64,
        /// The publisher.
        publisher: KeyId,
    },
    /// Master-key mode, but this referee holds a different master key (or none).
    #[error(
        "muscle was sealed for master key {sealed_for}, but this referee's master key is {ours}; use the matching `--home` or re-seal"
    )]
    WrongMasterKey {
        /// Master key id in the blob.
        sealed_for: KeyId,
        /// This referee's master key id, or "none".
        ours: String,
    },
    /// Recipient mode, and this referee is not among the recipients.
    #[error(
        "muscle was sealed for other referees ({recipients}); this referee is {referee}. Ask the publisher to add it with --recipient"
    )]
    NotARecipient {
        /// This referee's key id.
        referee: KeyId,
        /// Recipient ids, short form, comma separated.
        recipients: String,
    },
    /// The wrapped content key does not decrypt under our key: wrong key or tampered blob.
    #[error(
        "cannot unwrap the content key with this referee's key (key mismatch or a faulty sealer); ask the publisher to re-seal for this referee"
    )]
    KeyUnwrap,
    /// The payload does not decrypt: tampered ciphertext or header.
    #[error(
        "payload does not decrypt under its content key: the muscle is inconsistent; ask the publisher to re-seal it"
    )]
    Decrypt,
    /// The decrypted payload does not hash to the header's code hash.
    #[error("code hash mismatch: the payload is not the code the publisher declared")]
    CodeHash,
}
