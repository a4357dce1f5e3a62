//! Thin adapters over RustCrypto and `hpke`: the suite switch, key wrapping, HKDF.
//!
//! Nothing here implements a primitive; it only chooses parameters and domain labels.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce as AesNonce, Tag as AesTag};
use chacha20poly1305::{ChaCha20Poly1305, Nonce as ChaNonce, Tag as ChaTag};
use hkdf::Hkdf;
use hpke::{Deserializable, OpModeR, OpModeS, Serializable, aead as hpke_aead, kdf::HkdfSha256};
use rand_core::UnwrapErr;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::envelope::{NONCE_LEN, TAG_LEN, WRAPPED_KEY_LEN};
use crate::header::{MuscleId, Suite};
use crate::keys::Kem;

/// A 256-bit content key.
pub(crate) type ContentKey = Zeroizing<[u8; 32]>;

/// The AEAD failed: wrong key, or the data or associated data was modified.
#[derive(Debug)]
pub(crate) struct AeadFailure;

/// Encrypts `buf` in place and returns the tag.
pub(crate) fn aead_seal(
    suite: Suite,
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
) -> Result<[u8; TAG_LEN], AeadFailure> {
    let tag = match suite {
        Suite::Aes256Gcm => {
            let cipher = Aes256Gcm::new_from_slice(key).map_err(|_| AeadFailure)?;
            let tag =
                cipher.encrypt_inout_detached(&AesNonce::from(*nonce), aad, buf.into()).map_err(|_| AeadFailure)?;
            tag.into()
        }
        Suite::ChaCha20Poly1305 => {
            let cipher = ChaCha20Poly1305::new_from_slice(key).map_err(|_| AeadFailure)?;
            let tag =
                cipher.encrypt_inout_detached(&ChaNonce::from(*nonce), aad, buf.into()).map_err(|_| AeadFailure)?;
            tag.into()
        }
    };
    Ok(tag)
}

/// Decrypts `buf` in place after checking `tag`; on failure `buf` is zeroed.
pub(crate) fn aead_open(
    suite: Suite,
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; TAG_LEN],
) -> Result<(), AeadFailure> {
    let result = match suite {
        Suite::Aes256Gcm => Aes256Gcm::new_from_slice(key).map_err(|_| AeadFailure)?.decrypt_inout_detached(
            &AesNonce::from(*nonce),
            aad,
            (&mut *buf).into(),
            &AesTag::from(*tag),
        ),
        Suite::ChaCha20Poly1305 => ChaCha20Poly1305::new_from_slice(key)
            .map_err(|_| AeadFailure)?
            .decrypt_inout_detached(&ChaNonce::from(*nonce), aad, (&mut *buf).into(), &ChaTag::from(*tag)),
    };
    result.map_err(|_| {
        buf.fill(0);
        AeadFailure
    })
}

/// The key-encryption key for master-key mode: HKDF-SHA256 over the master key, salted per
/// muscle and bound to the muscle id, version and suite.
pub(crate) fn master_wrap_key(
    master: &[u8; 32],
    salt: &[u8; 32],
    muscle_id: &MuscleId,
    version: u64,
    suite: Suite,
) -> Zeroizing<[u8; 32]> {
    let mut info = Vec::with_capacity(64);
    info.extend_from_slice(b"referee/muscle-key-wrap/v1");
    info.extend_from_slice(&muscle_id.0);
    info.extend_from_slice(&version.to_le_bytes());
    info.push(suite.to_byte());
    let mut out = Zeroizing::new([0u8; 32]);
    // A 32-byte output is always within HKDF-SHA256's limit of 8160 bytes.
    let _ = Hkdf::<Sha256>::new(Some(salt), master).expand(&info, out.as_mut_slice());
    out
}

/// HPKE `info` for recipient mode.
pub(crate) const HPKE_INFO: &[u8] = b"referee/muscle-content-key/v1";

/// Seals the content key to one referee's X25519 key (HPKE base mode, single shot).
pub(crate) fn hpke_wrap(
    suite: Suite,
    recipient: &<Kem as hpke::Kem>::PublicKey,
    aad: &[u8],
    content_key: &[u8; 32],
) -> Result<([u8; 32], [u8; WRAPPED_KEY_LEN]), AeadFailure> {
    fn seal<A: hpke_aead::Aead>(
        recipient: &<Kem as hpke::Kem>::PublicKey,
        aad: &[u8],
        content_key: &[u8; 32],
    ) -> Result<([u8; 32], [u8; WRAPPED_KEY_LEN]), AeadFailure> {
        // The OS RNG does not fail on Linux once booted; UnwrapErr is the hpke crate's own idiom.
        let mut rng = UnwrapErr(getrandom::SysRng);
        let (encapped, ciphertext) = hpke::single_shot_seal_with_rng::<A, HkdfSha256, Kem>(
            &OpModeS::Base,
            recipient,
            HPKE_INFO,
            content_key,
            aad,
            &mut rng,
        )
        .map_err(|_| AeadFailure)?;
        let enc: [u8; 32] = encapped.to_bytes().as_slice().try_into().map_err(|_| AeadFailure)?;
        let wrapped: [u8; WRAPPED_KEY_LEN] = ciphertext.as_slice().try_into().map_err(|_| AeadFailure)?;
        Ok((enc, wrapped))
    }
    match suite {
        Suite::Aes256Gcm => seal::<hpke_aead::AesGcm256>(recipient, aad, content_key),
        Suite::ChaCha20Poly1305 => seal::<hpke_aead::ChaCha20Poly1305>(recipient, aad, content_key),
    }
}

/// Opens a content key sealed by [`hpke_wrap`].
pub(crate) fn hpke_unwrap(
    suite: Suite,
    secret: &<Kem as hpke::Kem>::PrivateKey,
    encapped_key: &[u8; 32],
    aad: &[u8],
    wrapped: &[u8; WRAPPED_KEY_LEN],
) -> Result<ContentKey, AeadFailure> {
    fn open<A: hpke_aead::Aead>(
        secret: &<Kem as hpke::Kem>::PrivateKey,
        encapped_key: &[u8; 32],
        aad: &[u8],
        wrapped: &[u8; WRAPPED_KEY_LEN],
    ) -> Result<ContentKey, AeadFailure> {
        let encapped = <Kem as hpke::Kem>::EncappedKey::from_bytes(encapped_key).map_err(|_| AeadFailure)?;
        let plain = Zeroizing::new(
            hpke::single_shot_open::<A, HkdfSha256, Kem>(&OpModeR::Base, secret, &encapped, HPKE_INFO, wrapped, aad)
                .map_err(|_| AeadFailure)?,
        );
        let key: [u8; 32] = plain.as_slice().try_into().map_err(|_| AeadFailure)?;
        Ok(Zeroizing::new(key))
    }
    match suite {
        Suite::Aes256Gcm => open::<hpke_aead::AesGcm256>(secret, encapped_key, aad, wrapped),
        Suite::ChaCha20Poly1305 => open::<hpke_aead::ChaCha20Poly1305>(secret, encapped_key, aad, wrapped),
    }
}

/// The ML-DSA context string: domain-separates muscle signatures from any other use of the key.
pub(crate) const ML_DSA_CONTEXT: &[u8] = b"referee.muscle.v1";
