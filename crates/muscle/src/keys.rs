//! Publisher keys, referee identities and master keys; their fingerprints and text encodings.
//!
//! Key files are two lines: a tag naming the key kind and version, then the key bytes in
//! hex. Secret material lives in [`Zeroizing`] buffers or in key types that zeroize on drop,
//! and no `Debug` impl here prints secret bytes.

use std::fmt;

use ed25519_dalek::{SigningKey as EdSigningKey, VerifyingKey as EdVerifyingKey};
use hkdf::Hkdf;
use hpke::{Deserializable, Kem as _, Serializable, kem::X25519HkdfSha256};
use ml_dsa::{B32, EncodedVerifyingKey, ExpandedSigningKey, MlDsa65, VerifyingKey as MlVerifyingKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::{FormatError, SealError};
use crate::header::KeyId;

/// The HPKE KEM used in recipient mode (RFC 9180 DHKEM(X25519, HKDF-SHA256)).
pub(crate) type Kem = X25519HkdfSha256;
type X25519Secret = <Kem as hpke::Kem>::PrivateKey;
type X25519Public = <Kem as hpke::Kem>::PublicKey;

const ED25519_LEN: usize = 32;
/// Encoded ML-DSA-65 verifying key length (FIPS 204).
pub(crate) const ML_DSA_65_PUBLIC_LEN: usize = 1952;
const X25519_LEN: usize = 32;

const PUBLISHER_SECRET_TAG: &str = "referee-publisher-secret-v1";
const PUBLISHER_PUBLIC_TAG: &str = "referee-publisher-public-v1";
const REFEREE_SECRET_TAG: &str = "referee-identity-secret-v1";
const REFEREE_PUBLIC_TAG: &str = "referee-identity-public-v1";
const MASTER_KEY_TAG: &str = "referee-master-key-v1";

/// Fills `buf` from the operating system's CSPRNG.
pub(crate) fn random_bytes<const N: usize>() -> Result<Zeroizing<[u8; N]>, SealError> {
    let mut buf = Zeroizing::new([0u8; N]);
    getrandom::fill(buf.as_mut_slice()).map_err(|e| SealError::Randomness(e.to_string()))?;
    Ok(buf)
}

fn fingerprint(label: &[u8], parts: &[&[u8]]) -> KeyId {
    let mut h = Sha256::new();
    h.update(label);
    parts.iter().for_each(|p| h.update(p));
    KeyId(h.finalize().into())
}

fn encode_file(tag: &str, bytes: &[u8]) -> Zeroizing<String> {
    Zeroizing::new(format!("{tag}\n{}\n", hex::encode(bytes)))
}

fn decode_file(tag: &'static str, text: &str) -> Result<Zeroizing<Vec<u8>>, FormatError> {
    let mut lines = text.lines();
    if lines.next().map(str::trim) != Some(tag) {
        return Err(FormatError::WrongKeyKind { expected: tag });
    }
    let body = lines.next().map(str::trim).unwrap_or_default();
    if lines.any(|l| !l.trim().is_empty()) {
        return Err(FormatError::InvalidKey { what: tag, why: "unexpected lines after the key" });
    }
    let bytes =
        hex::decode(body).map_err(|_| FormatError::InvalidKey { what: tag, why: "the second line is not hex" })?;
    Ok(Zeroizing::new(bytes))
}

fn split_exact<'a>(bytes: &'a [u8], lens: &[usize], what: &'static str) -> Result<Vec<&'a [u8]>, FormatError> {
    if bytes.len() != lens.iter().sum::<usize>() {
        return Err(FormatError::InvalidKey { what, why: "wrong length" });
    }
    let mut rest = bytes;
    Ok(lens
        .iter()
        .map(|len| {
            let (head, tail) = rest.split_at(*len);
            rest = tail;
            head
        })
        .collect())
}

fn ed_public(bytes: &[u8], what: &'static str) -> Result<EdVerifyingKey, FormatError> {
    let arr: [u8; ED25519_LEN] = bytes.try_into().map_err(|_| FormatError::InvalidKey { what, why: "wrong length" })?;
    let key =
        EdVerifyingKey::from_bytes(&arr).map_err(|_| FormatError::InvalidKey { what, why: "not an Ed25519 point" })?;
    if key.is_weak() {
        return Err(FormatError::InvalidKey { what, why: "weak (small-order) Ed25519 key" });
    }
    Ok(key)
}

fn ed_secret(bytes: &[u8], what: &'static str) -> Result<EdSigningKey, FormatError> {
    let arr: Zeroizing<[u8; ED25519_LEN]> =
        Zeroizing::new(bytes.try_into().map_err(|_| FormatError::InvalidKey { what, why: "wrong length" })?);
    Ok(EdSigningKey::from_bytes(&arr))
}

/// The public half of a publisher key: Ed25519 plus ML-DSA-65 for hybrid signatures.
#[derive(Clone)]
pub struct PublisherPublicKey {
    pub(crate) ed25519: EdVerifyingKey,
    pub(crate) ml_dsa: MlVerifyingKey<MlDsa65>,
    encoded_ml_dsa: Box<[u8]>,
    /// Computed once: every open compares it, and hashing ~2 KB each time shows in benchmarks.
    key_id: KeyId,
}

impl PartialEq for PublisherPublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.ed25519 == other.ed25519 && self.encoded_ml_dsa == other.encoded_ml_dsa
    }
}

impl Eq for PublisherPublicKey {}

impl fmt::Debug for PublisherPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublisherPublicKey({})", self.key_id().short())
    }
}

impl PublisherPublicKey {
    /// The fingerprint that names this publisher in headers and the trust store.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    fn new(ed25519: EdVerifyingKey, ml_dsa: MlVerifyingKey<MlDsa65>, encoded_ml_dsa: Box<[u8]>) -> Self {
        let key_id = fingerprint(b"referee/publisher-key-id/v1", &[ed25519.as_bytes(), &encoded_ml_dsa]);
        Self { ed25519, ml_dsa, encoded_ml_dsa, key_id }
    }

    /// Raw bytes: Ed25519 public key (32) then ML-DSA-65 public key (1952).
    pub fn to_bytes(&self) -> Vec<u8> {
        [self.ed25519.as_bytes().as_slice(), &self.encoded_ml_dsa].concat()
    }

    /// Parses [`Self::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "publisher public key";
        let parts = split_exact(bytes, &[ED25519_LEN, ML_DSA_65_PUBLIC_LEN], WHAT)?;
        let [ed, ml] = parts.as_slice() else {
            return Err(FormatError::InvalidKey { what: WHAT, why: "wrong length" });
        };
        let encoded = EncodedVerifyingKey::<MlDsa65>::try_from(*ml)
            .map_err(|_| FormatError::InvalidKey { what: WHAT, why: "wrong ML-DSA-65 key length" })?;
        Ok(Self::new(ed_public(ed, WHAT)?, MlVerifyingKey::decode(&encoded), (*ml).into()))
    }

    /// The text key-file form (`publisher.pub`).
    pub fn to_file(&self) -> String {
        encode_file(PUBLISHER_PUBLIC_TAG, &self.to_bytes()).to_string()
    }

    /// Parses the text key-file form.
    pub fn from_file(text: &str) -> Result<Self, FormatError> {
        Self::from_bytes(&decode_file(PUBLISHER_PUBLIC_TAG, text)?)
    }
}

/// A publisher's signing key: an Ed25519 key and an ML-DSA-65 key, both from 32-byte seeds.
pub struct PublisherSecretKey {
    pub(crate) ed25519: EdSigningKey,
    pub(crate) ml_dsa: Box<ExpandedSigningKey<MlDsa65>>,
    ml_dsa_seed: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for PublisherSecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublisherSecretKey({}, secret redacted)", self.public_key().key_id().short())
    }
}

impl PublisherSecretKey {
    /// Generates a fresh key from the OS CSPRNG.
    pub fn generate() -> Result<Self, SealError> {
        let ed = random_bytes::<32>()?;
        let ml = random_bytes::<32>()?;
        Ok(Self::from_seeds(&ed, &ml))
    }

    fn from_seeds(ed_seed: &[u8; 32], ml_seed: &[u8; 32]) -> Self {
        let seed = Zeroizing::new(B32::from(*ml_seed));
        Self {
            ed25519: EdSigningKey::from_bytes(ed_seed),
            ml_dsa: Box::new(ExpandedSigningKey::from_seed(&seed)),
            ml_dsa_seed: Zeroizing::new(*ml_seed),
        }
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublisherPublicKey {
        let ml_dsa = self.ml_dsa.verifying_key();
        let encoded_ml_dsa: Box<[u8]> = ml_dsa.encode().as_slice().into();
        PublisherPublicKey::new(self.ed25519.verifying_key(), ml_dsa, encoded_ml_dsa)
    }

    /// The text key-file form (`publisher.key`): both 32-byte seeds.
    pub fn to_file(&self) -> Zeroizing<String> {
        let bytes = Zeroizing::new([self.ed25519.as_bytes().as_slice(), self.ml_dsa_seed.as_slice()].concat());
        encode_file(PUBLISHER_SECRET_TAG, &bytes)
    }

    /// Parses the text key-file form.
    pub fn from_file(text: &str) -> Result<Self, FormatError> {
        let bytes = decode_file(PUBLISHER_SECRET_TAG, text)?;
        let parts = split_exact(&bytes, &[32, 32], PUBLISHER_SECRET_TAG)?;
        let [ed, ml] = parts.as_slice() else {
            return Err(FormatError::InvalidKey { what: PUBLISHER_SECRET_TAG, why: "wrong length" });
        };
        let invalid = |_| FormatError::InvalidKey { what: PUBLISHER_SECRET_TAG, why: "wrong length" };
        let ed: Zeroizing<[u8; 32]> = Zeroizing::new((*ed).try_into().map_err(invalid)?);
        let ml: Zeroizing<[u8; 32]> = Zeroizing::new((*ml).try_into().map_err(invalid)?);
        Ok(Self::from_seeds(&ed, &ml))
    }
}

/// A referee's public identity: Ed25519 (signs reports) and X25519 (receives sealed keys).
#[derive(Clone, PartialEq, Eq)]
pub struct RefereePublicKey {
    pub(crate) ed25519: EdVerifyingKey,
    pub(crate) x25519: [u8; X25519_LEN],
}

impl fmt::Debug for RefereePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RefereePublicKey({})", self.key_id().short())
    }
}

impl RefereePublicKey {
    /// The fingerprint naming this referee in bindings and recipient records.
    pub fn key_id(&self) -> KeyId {
        fingerprint(b"referee/referee-key-id/v1", &[self.ed25519.as_bytes(), &self.x25519])
    }

    /// The Ed25519 key that signs this referee's reports.
    pub fn signing_public_key(&self) -> &EdVerifyingKey {
        &self.ed25519
    }

    pub(crate) fn hpke_public(&self) -> Result<X25519Public, FormatError> {
        X25519Public::from_bytes(&self.x25519)
            .map_err(|_| FormatError::InvalidKey { what: "referee X25519 key", why: "not a valid X25519 public key" })
    }

    /// Raw bytes: Ed25519 public key (32) then X25519 public key (32).
    pub fn to_bytes(&self) -> Vec<u8> {
        [self.ed25519.as_bytes().as_slice(), &self.x25519].concat()
    }

    /// Parses [`Self::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "referee public key";
        let parts = split_exact(bytes, &[ED25519_LEN, X25519_LEN], WHAT)?;
        let [ed, x] = parts.as_slice() else {
            return Err(FormatError::InvalidKey { what: WHAT, why: "wrong length" });
        };
        let x25519: [u8; X25519_LEN] =
            (*x).try_into().map_err(|_| FormatError::InvalidKey { what: WHAT, why: "wrong length" })?;
        let key = Self { ed25519: ed_public(ed, WHAT)?, x25519 };
        key.hpke_public()?;
        Ok(key)
    }

    /// The text key-file form (`referee.pub`).
    pub fn to_file(&self) -> String {
        encode_file(REFEREE_PUBLIC_TAG, &self.to_bytes()).to_string()
    }

    /// Parses the text key-file form.
    pub fn from_file(text: &str) -> Result<Self, FormatError> {
        Self::from_bytes(&decode_file(REFEREE_PUBLIC_TAG, text)?)
    }
}

/// A referee's secret identity.
pub struct RefereeSecretKey {
    pub(crate) ed25519: EdSigningKey,
    pub(crate) x25519: X25519Secret,
    /// Derived once: every open needs the key id, and deriving it costs a scalar multiplication.
    public: RefereePublicKey,
    key_id: KeyId,
}

impl fmt::Debug for RefereeSecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RefereeSecretKey({}, secret redacted)", self.public_key().key_id().short())
    }
}

impl RefereeSecretKey {
    /// Generates a fresh identity from the OS CSPRNG.
    pub fn generate() -> Result<Self, SealError> {
        let ed = random_bytes::<32>()?;
        let x = random_bytes::<32>()?;
        Self::from_parts(ed.as_slice(), x.as_slice()).map_err(|_| SealError::Crypto("X25519 key generation"))
    }

    fn from_parts(ed: &[u8], x: &[u8]) -> Result<Self, FormatError> {
        let x25519 = X25519Secret::from_bytes(x)
            .map_err(|_| FormatError::InvalidKey { what: REFEREE_SECRET_TAG, why: "not a valid X25519 secret" })?;
        let ed25519 = ed_secret(ed, REFEREE_SECRET_TAG)?;
        let x = Kem::sk_to_pk(&x25519).to_bytes();
        let mut x_public = [0u8; X25519_LEN];
        x_public.copy_from_slice(x.as_slice());
        let public = RefereePublicKey { ed25519: ed25519.verifying_key(), x25519: x_public };
        let key_id = public.key_id();
        Ok(Self { ed25519, x25519, public, key_id })
    }

    /// The matching public identity.
    pub fn public_key(&self) -> RefereePublicKey {
        self.public.clone()
    }

    /// This referee's key id.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// The Ed25519 key that signs this referee's reports (attestation, audit).
    pub fn signing_key(&self) -> &EdSigningKey {
        &self.ed25519
    }

    /// The text key-file form (`referee.key`).
    pub fn to_file(&self) -> Zeroizing<String> {
        let x = Zeroizing::new(self.x25519.to_bytes());
        let bytes = Zeroizing::new([self.ed25519.as_bytes().as_slice(), x.as_slice()].concat());
        encode_file(REFEREE_SECRET_TAG, &bytes)
    }

    /// Parses the text key-file form.
    pub fn from_file(text: &str) -> Result<Self, FormatError> {
        let bytes = decode_file(REFEREE_SECRET_TAG, text)?;
        let parts = split_exact(&bytes, &[32, 32], REFEREE_SECRET_TAG)?;
        let [ed, x] = parts.as_slice() else {
            return Err(FormatError::InvalidKey { what: REFEREE_SECRET_TAG, why: "wrong length" });
        };
        Self::from_parts(ed, x)
    }
}

/// A referee's symmetric 32-byte master key (the seeds' "Chaos master key").
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({}, secret redacted)", self.key_id().short())
    }
}

impl MasterKey {
    /// Generates a fresh master key from the OS CSPRNG.
    pub fn generate() -> Result<Self, SealError> {
        Ok(Self(random_bytes::<32>()?))
    }

    /// Wraps existing key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// A one-way identifier of the key (HKDF output, not a hash of the secret alone), so
    /// headers can say which master key they need without revealing it.
    pub fn key_id(&self) -> KeyId {
        let mut out = [0u8; 32];
        // A 32-byte output is always within HKDF-SHA256's limit of 8160 bytes.
        let _ = Hkdf::<Sha256>::new(None, self.0.as_slice()).expand(b"referee/master-key-id/v1", &mut out);
        KeyId(out)
    }

    pub(crate) fn secret(&self) -> &[u8; 32] {
        &self.0
    }

    /// The text key-file form (`master.key`).
    pub fn to_file(&self) -> Zeroizing<String> {
        encode_file(MASTER_KEY_TAG, self.0.as_slice())
    }

    /// Parses the text key-file form.
    pub fn from_file(text: &str) -> Result<Self, FormatError> {
        let bytes = decode_file(MASTER_KEY_TAG, text)?;
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| FormatError::InvalidKey { what: MASTER_KEY_TAG, why: "wrong length" })?;
        Ok(Self::from_bytes(arr))
    }
}

/// The keys a referee opens muscles with.
#[derive(Debug)]
pub struct RefereeKeys {
    /// The referee's identity (binding, recipient mode).
    pub identity: RefereeSecretKey,
    /// The master key, if this referee has one (master-key mode).
    pub master: Option<MasterKey>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip_and_ids_are_stable() -> Result<(), Box<dyn std::error::Error>> {
        let publisher = PublisherSecretKey::generate()?;
        let reloaded = PublisherSecretKey::from_file(&publisher.to_file())?;
        assert_eq!(publisher.public_key(), reloaded.public_key());
        let public = PublisherPublicKey::from_file(&publisher.public_key().to_file())?;
        assert_eq!(public.key_id(), publisher.public_key().key_id());

        let referee = RefereeSecretKey::generate()?;
        let reloaded = RefereeSecretKey::from_file(&referee.to_file())?;
        assert_eq!(referee.public_key(), reloaded.public_key());
        assert_eq!(RefereePublicKey::from_file(&referee.public_key().to_file())?, referee.public_key());

        let master = MasterKey::generate()?;
        assert_eq!(MasterKey::from_file(&master.to_file())?.key_id(), master.key_id());
        Ok(())
    }

    #[test]
    fn key_files_of_the_wrong_kind_are_refused() -> Result<(), Box<dyn std::error::Error>> {
        let master = MasterKey::generate()?;
        let err = PublisherSecretKey::from_file(&master.to_file());
        assert!(matches!(err, Err(FormatError::WrongKeyKind { expected: PUBLISHER_SECRET_TAG })));
        let text = format!("{PUBLISHER_PUBLIC_TAG}\nzz\n");
        assert!(matches!(PublisherPublicKey::from_file(&text), Err(FormatError::InvalidKey { .. })));
        Ok(())
    }

    #[test]
    fn debug_output_never_contains_secret_hex() -> Result<(), Box<dyn std::error::Error>> {
        let master = MasterKey::generate()?;
        let secret_hex = hex::encode(master.secret());
        assert!(!format!("{master:?}").contains(&secret_hex));
        let publisher = PublisherSecretKey::generate()?;
        let seed_hex = hex::encode(publisher.ed25519.as_bytes());
        assert!(!format!("{publisher:?}").contains(&seed_hex));
        Ok(())
    }
}
