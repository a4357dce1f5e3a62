//! Sealing: payload + description + publisher key → `.muscle` bytes.

use sha2::{Digest, Sha256};

use crate::crypto::{ML_DSA_CONTEXT, aead_seal, hpke_wrap, master_wrap_key};
use crate::envelope::{KeyDelivery, MasterKeyWrap, RecipientWrap, WRAPPED_KEY_LEN, encode_delivery, encode_header};
use crate::error::SealError;
use crate::header::{
    Binding, DType, Extension, Header, KeyId, KeyMode, Limits, MuscleId, SignatureScheme, Suite, TensorSpec,
};
use crate::keys::{MasterKey, PublisherSecretKey, RefereePublicKey, random_bytes};
use crate::limits::MAX_RECIPIENTS;

/// What the publisher declares about a muscle. Lists may be given in any order; sealing
/// sorts and de-duplicates them into the canonical encoding.
#[derive(Clone, Debug)]
pub struct MuscleSpec {
    /// Name, `[a-z0-9][a-z0-9._-]*`.
    pub name: String,
    /// Stable id; by default derived from the publisher key and the name, so every version
    /// of a muscle shares it.
    pub muscle_id: Option<MuscleId>,
    /// Monotonic version.
    pub version: u64,
    /// Creation time (seconds since the Unix epoch).
    pub created_at: u64,
    /// Referees allowed to load it. In recipient mode, `None` binds it to the recipients; in
    /// master-key mode, `None` means any referee holding the master key.
    pub binding: Option<Binding>,
    /// ABI id of the payload.
    pub abi: String,
    /// Requested capabilities.
    pub capabilities: Vec<String>,
    /// Requested limits.
    pub limits: Limits,
    /// Input tensors.
    pub inputs: Vec<TensorSpec>,
    /// Output tensors.
    pub outputs: Vec<TensorSpec>,
    /// Non-critical header extensions.
    pub extensions: Vec<Extension>,
}

impl MuscleSpec {
    /// A spec with ABI v1, version 1, no capabilities, referee-default limits and the given
    /// f32 input and output shapes; set the other fields as needed.
    pub fn new(name: impl Into<String>, input_dims: &[u32], output_dims: &[u32]) -> Self {
        let tensor =
            |name: &str, dims: &[u32]| TensorSpec { name: name.into(), dtype: DType::F32, dims: dims.to_vec() };
        Self {
            name: name.into(),
            muscle_id: None,
            version: 1,
            created_at: 0,
            binding: None,
            abi: crate::ABI_V1.into(),
            capabilities: Vec::new(),
            limits: Limits::default(),
            inputs: vec![tensor("x", input_dims)],
            outputs: vec![tensor("y", output_dims)],
            extensions: Vec::new(),
        }
    }

    /// Declares the payload NaN-blind ([`Extension::NAN_BLIND`]), or withdraws the declaration.
    pub fn declare_nan_blind(&mut self, declared: bool) {
        self.extensions.retain(|e| e.tag != Extension::NAN_BLIND);
        if declared {
            self.extensions.push(Extension::nan_blind());
        }
    }
}

/// How the content key is delivered to referees.
#[derive(Clone, Copy, Debug)]
pub enum Delivery<'a> {
    /// Wrap under a key derived from this master key.
    MasterKey(&'a MasterKey),
    /// Seal with HPKE to each of these referees.
    Recipients(&'a [RefereePublicKey]),
}

/// Cipher and signature choices.
#[derive(Clone, Copy, Debug)]
pub struct SealOptions {
    /// Payload cipher.
    pub suite: Suite,
    /// Add an ML-DSA-65 signature next to the Ed25519 one.
    pub post_quantum: bool,
}

impl Default for SealOptions {
    fn default() -> Self {
        Self { suite: Suite::Aes256Gcm, post_quantum: false }
    }
}

/// The default muscle id: stable for one publisher and name across versions.
pub fn default_muscle_id(publisher: &KeyId, name: &str) -> MuscleId {
    let digest = Sha256::new()
        .chain_update(b"referee/muscle-id/v1")
        .chain_update(publisher.0)
        .chain_update(name.as_bytes())
        .finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(digest.get(..16).unwrap_or(&[0u8; 16]));
    MuscleId(id)
}

/// Seals `payload` into a `.muscle`.
///
/// A fresh random content key and nonce are drawn for every call, so sealing the same
/// inputs twice yields different bytes that open to the same payload.
pub fn seal(
    spec: &MuscleSpec,
    payload: &[u8],
    publisher: &PublisherSecretKey,
    delivery: Delivery<'_>,
    options: SealOptions,
) -> Result<Vec<u8>, SealError> {
    let publisher_id = publisher.public_key().key_id();
    let mut recipients: Vec<(KeyId, &RefereePublicKey)> = match delivery {
        Delivery::MasterKey(_) => Vec::new(),
        Delivery::Recipients(list) => list.iter().map(|r| (r.key_id(), r)).collect(),
    };
    recipients.sort_by_key(|r| r.0);
    recipients.dedup_by(|a, b| a.0 == b.0);
    if matches!(delivery, Delivery::Recipients(_)) && recipients.is_empty() {
        return Err(SealError::NoRecipients);
    }
    if recipients.len() > MAX_RECIPIENTS {
        return Err(SealError::InvalidHeader(crate::FormatError::BadLength {
            field: "recipients",
            offset: 0,
            len: recipients.len() as u64,
            max: MAX_RECIPIENTS as u64,
        }));
    }
    let binding = match (&spec.binding, delivery) {
        (Some(Binding::Referees(ids)), _) => {
            let mut ids = ids.clone();
            ids.sort();
            ids.dedup();
            Binding::Referees(ids)
        }
        (Some(Binding::Any), _) | (None, Delivery::MasterKey(_)) => Binding::Any,
        (None, Delivery::Recipients(_)) => Binding::Referees(recipients.iter().map(|r| r.0).collect()),
    };
    let mut capabilities = spec.capabilities.clone();
    capabilities.sort();
    capabilities.dedup();
    let mut extensions = spec.extensions.clone();
    extensions.sort_by_key(|e| e.tag);

    let header = Header {
        suite: options.suite,
        key_mode: match delivery {
            Delivery::MasterKey(_) => KeyMode::MasterKey,
            Delivery::Recipients(_) => KeyMode::Recipients,
        },
        signature_scheme: if options.post_quantum { SignatureScheme::Ed25519MlDsa65 } else { SignatureScheme::Ed25519 },
        publisher: publisher_id,
        muscle_id: spec.muscle_id.unwrap_or_else(|| default_muscle_id(&publisher_id, &spec.name)),
        name: spec.name.clone(),
        version: spec.version,
        created_at: spec.created_at,
        binding,
        abi: spec.abi.clone(),
        capabilities,
        limits: spec.limits,
        inputs: spec.inputs.clone(),
        outputs: spec.outputs.clone(),
        code_hash: Sha256::digest(payload).into(),
        payload_len: payload.len() as u64,
        extensions,
    };

    let mut w = encode_header(&header)?;
    let header_len = w.len();
    let content_key = random_bytes::<32>()?;
    let delivery_record = match delivery {
        Delivery::MasterKey(master) => {
            let salt = random_bytes::<32>()?;
            let nonce = random_bytes::<12>()?;
            let kek = master_wrap_key(master.secret(), &salt, &header.muscle_id, header.version, header.suite);
            let mut encrypted_key = content_key.clone();
            let tag = aead_seal(header.suite, &kek, &nonce, w.as_slice(), encrypted_key.as_mut_slice())
                .map_err(|_| SealError::Crypto("master-key wrap"))?;
            let wrapped_key: [u8; WRAPPED_KEY_LEN] = [encrypted_key.as_slice(), &tag]
                .concat()
                .try_into()
                .map_err(|_| SealError::Crypto("master-key wrap"))?;
            KeyDelivery::MasterKey(MasterKeyWrap {
                master_key_id: master.key_id(),
                salt: *salt,
                nonce: *nonce,
                wrapped_key,
            })
        }
        Delivery::Recipients(_) => {
            let mut records = Vec::with_capacity(recipients.len());
            for (id, key) in &recipients {
                let public = key.hpke_public()?;
                let aad = [w.as_slice(), &id.0].concat();
                let (encapped_key, wrapped_key) =
                    hpke_wrap(header.suite, &public, &aad, &content_key).map_err(|_| SealError::Crypto("HPKE seal"))?;
                records.push(RecipientWrap { referee: *id, encapped_key, wrapped_key });
            }
            KeyDelivery::Recipients(records)
        }
    };
    encode_delivery(&mut w, &delivery_record);

    let nonce = random_bytes::<12>()?;
    w.put(nonce.as_slice());
    let payload_start = w.len();
    w.put(payload);
    let aad = w.as_slice().get(..header_len).map(<[u8]>::to_vec).unwrap_or_default();
    let tag = aead_seal(header.suite, &content_key, &nonce, &aad, w.tail_mut(payload_start))
        .map_err(|_| SealError::Crypto("payload encryption"))?;
    w.put(&tag);

    let ed_sig = ed25519_dalek::Signer::sign(&publisher.ed25519, w.as_slice());
    let ml_sig = if options.post_quantum {
        Some(
            publisher
                .ml_dsa
                .sign_deterministic(w.as_slice(), ML_DSA_CONTEXT)
                .map_err(|_| SealError::Crypto("ML-DSA-65 signing"))?,
        )
    } else {
        None
    };
    w.put(&ed_sig.to_bytes());
    if let Some(sig) = ml_sig {
        w.put(sig.encode().as_slice());
    }
    Ok(w.into_bytes())
}
