//! The sealed `.muscle` format, v1: encoding, sealing and opening.
//!
//! A muscle is a WebAssembly payload (code and folded weights) in an envelope that is
//! encrypted, signed, version-stamped and bound to the referees allowed to run it. The byte
//! layout is specified in `docs/muscle-format.md`.
//!
//! This crate does no I/O and knows nothing of wasmtime, redb or the CLI; the trust store is
//! reached through the [`TrustView`] trait.
//!
//! ```
//! use referee_muscle::*;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let publisher = PublisherSecretKey::generate()?;
//! let referee = RefereeKeys { identity: RefereeSecretKey::generate()?, master: None };
//! let spec = MuscleSpec {
//!     name: "feanor".into(),
//!     muscle_id: None,
//!     version: 1,
//!     created_at: 1_700_000_000,
//!     binding: None,
//!     abi: "referee.abi.v1".into(),
//!     capabilities: vec!["log".into()],
//!     limits: Limits::default(),
//!     inputs: vec![],
//!     outputs: vec![],
//!     extensions: vec![],
//! };
//! let recipients = [referee.identity.public_key()];
//! let blob = seal(&spec, b"\0asm\x01\0\0\0", &publisher, Delivery::Recipients(&recipients), SealOptions::default())?;
//!
//! let mut trust = MemoryTrust::default();
//! trust.trust(publisher.public_key());
//! let opened = open(&blob, &referee, &trust)?;
//! assert_eq!(opened.payload.as_slice(), b"\0asm\x01\0\0\0");
//! # Ok(()) }
//! ```
//!
//! Core types:
//! - [`Header`]: the authenticated plaintext header; canonical encoding, cheap to clone.
//! - [`SealedMuscle`]: a parsed, unverified envelope borrowing its bytes (for `inspect`).
//! - [`seal`] / [`open`]: the publisher's and the referee's side. Opening costs one SHA-512
//!   pass over the blob (Ed25519), one SHAKE-256 pass if ML-DSA is present, one AEAD pass and
//!   one SHA-256 pass (code hash) over the payload.
//! - [`PublisherSecretKey`], [`RefereeSecretKey`], [`MasterKey`]: secrets, zeroized on drop,
//!   never printed by `Debug`.

mod crypto;
mod envelope;
mod error;
mod header;
mod keys;
pub mod limits;
mod open;
mod seal;
mod wire;

pub use envelope::{FORMAT_VERSION, KeyDelivery, MAGIC, MasterKeyWrap, RecipientWrap, SealedMuscle};
pub use error::{FormatError, OpenError, SealError, SignatureKind};
pub use header::{
    Binding, DType, Extension, Header, KeyId, KeyMode, Limits, MuscleId, SignatureScheme, Suite, TensorSpec,
};
pub use keys::{MasterKey, PublisherPublicKey, PublisherSecretKey, RefereeKeys, RefereePublicKey, RefereeSecretKey};
pub use open::{OpenedMuscle, TrustFacts, TrustView, TrustedPublisher, open};
pub use seal::{Delivery, MuscleSpec, SealOptions, default_muscle_id, seal};

/// The ABI id of WebAssembly muscles targeting ABI v1.
pub const ABI_V1: &str = "referee.abi.v1";

/// An in-memory [`TrustView`]: for tests, benchmarks, fuzzing and embedding without a store.
#[derive(Debug, Default, Clone)]
pub struct MemoryTrust {
    publishers: Vec<TrustedPublisher>,
    revoked_publishers: Vec<KeyId>,
    revoked_muscles: Vec<(MuscleId, Option<u64>)>,
    accepted: Vec<(KeyId, String, u64)>,
}

impl MemoryTrust {
    /// Trusts a publisher.
    pub fn trust(&mut self, key: PublisherPublicKey) {
        self.publishers.push(TrustedPublisher { key, require_post_quantum: false });
    }

    /// Trusts a publisher, requiring hybrid post-quantum signatures from it.
    pub fn trust_post_quantum_only(&mut self, key: PublisherPublicKey) {
        self.publishers.push(TrustedPublisher { key, require_post_quantum: true });
    }

    /// Revokes a publisher.
    pub fn revoke_publisher(&mut self, id: KeyId) {
        self.revoked_publishers.push(id);
    }

    /// Revokes a muscle id (`None`: all versions) or one version of it.
    pub fn revoke_muscle(&mut self, id: MuscleId, version: Option<u64>) {
        self.revoked_muscles.push((id, version));
    }

    /// Records an accepted version (raises the anti-rollback mark).
    pub fn accept(&mut self, header: &Header) {
        self.accepted.push((header.publisher, header.name.clone(), header.version));
    }
}

impl TrustView for MemoryTrust {
    fn facts(&self, header: &Header) -> Result<TrustFacts, String> {
        Ok(TrustFacts {
            publisher: self.publishers.iter().find(|p| p.key.key_id() == header.publisher).cloned(),
            publisher_revoked: self.revoked_publishers.contains(&header.publisher),
            muscle_revoked: self.revoked_muscles.contains(&(header.muscle_id, None)),
            version_revoked: self.revoked_muscles.contains(&(header.muscle_id, Some(header.version))),
            highest_accepted: self
                .accepted
                .iter()
                .filter(|(p, n, _)| *p == header.publisher && *n == header.name)
                .map(|(_, _, v)| *v)
                .max(),
        })
    }
}
