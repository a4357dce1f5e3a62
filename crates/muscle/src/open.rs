//! Opening: the referee's side. Checks run in a fixed order and the first failure wins:
//! size → parse → publisher trusted → not revoked → signature(s) → binding → anti-rollback →
//! key unwrap → decrypt → code hash.

use ml_dsa::{MlDsa65, Signature as MlSignature};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::crypto::{ML_DSA_CONTEXT, aead_open, hpke_unwrap, master_wrap_key};
use crate::envelope::{KeyDelivery, SealedMuscle, TAG_LEN};
use crate::error::{OpenError, SignatureKind};
use crate::header::{Binding, Header, KeyId, SignatureScheme};
use crate::keys::{PublisherPublicKey, RefereeKeys};
use crate::limits::{MAX_MUSCLE_LEN, MIN_MUSCLE_LEN};

/// A publisher as the trust store knows it.
#[derive(Clone, Debug)]
pub struct TrustedPublisher {
    /// Its public key.
    pub key: PublisherPublicKey,
    /// Refuse its muscles unless they also carry an ML-DSA-65 signature.
    pub require_post_quantum: bool,
}

/// What the trust store says about one muscle's header.
#[derive(Clone, Debug, Default)]
pub struct TrustFacts {
    /// The publisher, if trusted.
    pub publisher: Option<TrustedPublisher>,
    /// The publisher key is revoked.
    pub publisher_revoked: bool,
    /// Every version of this muscle id is revoked.
    pub muscle_revoked: bool,
    /// This exact muscle id and version is revoked.
    pub version_revoked: bool,
    /// Highest version of (publisher, name) accepted so far.
    pub highest_accepted: Option<u64>,
}

/// Source of trust decisions (the redb trust store, or a fixed set in tests).
pub trait TrustView {
    /// Looks up everything the open pipeline needs about `header`.
    fn facts(&self, header: &Header) -> Result<TrustFacts, String>;
}

/// A verified, decrypted muscle.
pub struct OpenedMuscle {
    /// The authenticated header.
    pub header: Header,
    /// The plaintext payload (code and weights); zeroized on drop.
    pub payload: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for OpenedMuscle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedMuscle")
            .field("name", &self.header.name)
            .field("version", &self.header.version)
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

fn short_list<'a>(ids: impl Iterator<Item = &'a KeyId>) -> String {
    ids.map(KeyId::short).collect::<Vec<_>>().join(", ")
}

/// Verifies and decrypts a muscle for the referee holding `keys`.
///
/// Nothing is recorded: accepting the version (raising the anti-rollback mark) is the
/// caller's decision once the muscle is actually loaded.
pub fn open(bytes: &[u8], keys: &RefereeKeys, trust: &impl TrustView) -> Result<OpenedMuscle, OpenError> {
    if !(MIN_MUSCLE_LEN..=MAX_MUSCLE_LEN).contains(&bytes.len()) {
        return Err(OpenError::Size { len: bytes.len(), min: MIN_MUSCLE_LEN, max: MAX_MUSCLE_LEN });
    }
    let sealed = SealedMuscle::parse(bytes)?;
    let header = &sealed.header;
    let facts = trust.facts(header).map_err(OpenError::TrustStore)?;

    let publisher = facts
        .publisher
        .filter(|p| p.key.key_id() == header.publisher)
        .ok_or(OpenError::UntrustedPublisher { publisher: header.publisher })?;
    if facts.publisher_revoked {
        return Err(OpenError::PublisherRevoked { publisher: header.publisher });
    }
    if facts.muscle_revoked {
        return Err(OpenError::MuscleRevoked { muscle_id: header.muscle_id });
    }
    if facts.version_revoked {
        return Err(OpenError::VersionRevoked { muscle_id: header.muscle_id, version: header.version });
    }

    verify_signatures(&sealed, &publisher)?;

    let referee = keys.identity.key_id();
    if !header.binding.allows(&referee) {
        let allowed = match &header.binding {
            Binding::Referees(ids) => short_list(ids.iter()),
            Binding::Any => String::new(),
        };
        return Err(OpenError::NotBoundHere { referee, allowed });
    }
    if let Some(highest) = facts.highest_accepted.filter(|h| header.version < *h) {
        return Err(OpenError::Rollback {
            name: header.name.clone(),
            version: header.version,
            highest,
            publisher: header.publisher,
        });
    }

    let content_key = unwrap_content_key(&sealed, keys, &referee)?;

    let body_len = sealed.ciphertext.len().saturating_sub(TAG_LEN);
    let (body, tag) = sealed.ciphertext.split_at(body_len);
    let tag: &[u8; TAG_LEN] = tag.try_into().map_err(|_| OpenError::Decrypt)?;
    let mut payload = Zeroizing::new(body.to_vec());
    aead_open(header.suite, &content_key, &sealed.nonce, sealed.header_bytes, &mut payload, tag)
        .map_err(|_| OpenError::Decrypt)?;

    if Sha256::digest(payload.as_slice()).as_slice() != header.code_hash {
        return Err(OpenError::CodeHash);
    }
    Ok(OpenedMuscle { header: sealed.header, payload })
}

fn verify_signatures(sealed: &SealedMuscle<'_>, publisher: &TrustedPublisher) -> Result<(), OpenError> {
    let header = &sealed.header;
    let bad = |kind| OpenError::BadSignature { kind, publisher: header.publisher };
    if publisher.require_post_quantum && header.signature_scheme != SignatureScheme::Ed25519MlDsa65 {
        return Err(OpenError::PostQuantumRequired { publisher: header.publisher });
    }
    let ed_sig = ed25519_dalek::Signature::from_bytes(&sealed.ed25519_sig);
    publisher.key.ed25519.verify_strict(sealed.signed, &ed_sig).map_err(|_| bad(SignatureKind::Ed25519))?;
    if let Some(raw) = sealed.ml_dsa_sig {
        let sig = MlSignature::<MlDsa65>::try_from(raw).map_err(|_| bad(SignatureKind::MlDsa65))?;
        if !publisher.key.ml_dsa.verify_with_context(sealed.signed, ML_DSA_CONTEXT, &sig) {
            return Err(bad(SignatureKind::MlDsa65));
        }
    }
    Ok(())
}

fn unwrap_content_key(
    sealed: &SealedMuscle<'_>,
    keys: &RefereeKeys,
    referee: &KeyId,
) -> Result<Zeroizing<[u8; 32]>, OpenError> {
    let header = &sealed.header;
    match &sealed.delivery {
        KeyDelivery::MasterKey(wrap) => {
            let master = keys.master.as_ref().filter(|m| m.key_id() == wrap.master_key_id).ok_or_else(|| {
                OpenError::WrongMasterKey {
                    sealed_for: wrap.master_key_id,
                    ours: keys.master.as_ref().map_or_else(|| "none".to_owned(), |m| m.key_id().short()),
                }
            })?;
            let kek = master_wrap_key(master.secret(), &wrap.salt, &header.muscle_id, header.version, header.suite);
            let mut key = Zeroizing::new([0u8; 32]);
            let (ct, tag) = wrap.wrapped_key.split_at(32);
            key.copy_from_slice(ct);
            let tag: &[u8; TAG_LEN] = tag.try_into().map_err(|_| OpenError::KeyUnwrap)?;
            aead_open(header.suite, &kek, &wrap.nonce, sealed.header_bytes, key.as_mut_slice(), tag)
                .map_err(|_| OpenError::KeyUnwrap)?;
            Ok(key)
        }
        KeyDelivery::Recipients(list) => {
            let record = list.iter().find(|r| r.referee == *referee).ok_or_else(|| OpenError::NotARecipient {
                referee: *referee,
                recipients: short_list(list.iter().map(|r| &r.referee)),
            })?;
            let aad = [sealed.header_bytes, &referee.0].concat();
            hpke_unwrap(header.suite, &keys.identity.x25519, &record.encapped_key, &aad, &record.wrapped_key)
                .map_err(|_| OpenError::KeyUnwrap)
        }
    }
}
