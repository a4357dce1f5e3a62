//! The authenticated plaintext header (see `docs/muscle-format.md` §2).
//!
//! The header has exactly one valid encoding: lists are sorted and unique, reserved bits are
//! zero and the declared length matches the contents. `decode(encode(h)) == h` for every valid
//! header and `encode(decode(b)) == b` for every accepted byte string.

use std::fmt;

use crate::error::FormatError;
use crate::limits::{
    MAX_ABI_LEN, MAX_BINDING, MAX_CAPABILITIES, MAX_CAPABILITY_LEN, MAX_DIMS, MAX_EXTENSION_LEN, MAX_EXTENSIONS,
    MAX_HEADER_LEN, MAX_NAME_LEN, MAX_PAYLOAD_LEN, MAX_TENSOR_ELEMENTS, MAX_TENSOR_NAME_LEN, MAX_TENSORS,
};
use crate::wire::{Reader, Writer};

/// A 32-byte key fingerprint (SHA-256 of the public key material with a domain label).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub [u8; 32]);

impl KeyId {
    /// The first 8 bytes in hex: enough to tell keys apart in messages.
    pub fn short(&self) -> String {
        hex::encode(self.0.get(..8).unwrap_or_default())
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, FormatError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|_| FormatError::BadText {
            field: "key id",
            value: s.to_owned(),
            rule: "expected 64 hexadecimal digits",
        })?;
        Ok(Self(out))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.short())
    }
}

/// A 16-byte muscle identifier, stable across the versions of one muscle.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct MuscleId(pub [u8; 16]);

impl MuscleId {
    /// Parses 32 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, FormatError> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|_| FormatError::BadText {
            field: "muscle id",
            value: s.to_owned(),
            rule: "expected 32 hexadecimal digits",
        })?;
        Ok(Self(out))
    }
}

impl fmt::Display for MuscleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident : $field:literal { $($(#[$vmeta:meta])* $variant:ident = $value:literal => $label:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value),+
        }

        impl $name {
            /// Every value, in wire order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The wire byte.
            pub fn to_byte(self) -> u8 {
                self as u8
            }

            /// The stable text label used in the CLI and JSON output.
            pub fn label(self) -> &'static str {
                match self { $(Self::$variant => $label),+ }
            }

            /// Parses a label as printed by [`Self::label`].
            pub fn from_label(label: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.label() == label)
            }

            fn read(r: &mut Reader<'_>) -> Result<Self, FormatError> {
                let offset = r.position();
                match r.u8($field)? {
                    $($value => Ok(Self::$variant),)+
                    other => Err(FormatError::Unsupported { field: $field, offset, value: u64::from(other) }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.label())
            }
        }
    };
}

wire_enum! {
    /// The AEAD used for the payload and the master-key wrap.
    Suite: "suite" {
        /// AES-256-GCM (default; hardware-accelerated on x86-64 and ARMv8).
        Aes256Gcm = 1 => "aes-256-gcm",
        /// ChaCha20-Poly1305 (constant-time without AES hardware).
        ChaCha20Poly1305 = 2 => "chacha20-poly1305",
    }
}

wire_enum! {
    /// How the content key reaches the referee.
    KeyMode: "key mode" {
        /// Wrapped under a key derived from the referee's 32-byte master key.
        MasterKey = 1 => "master-key",
        /// Sealed with HPKE to one or more referee X25519 public keys.
        Recipients = 2 => "recipients",
    }
}

wire_enum! {
    /// Which signatures follow the ciphertext.
    SignatureScheme: "signature scheme" {
        /// Ed25519 only.
        Ed25519 = 1 => "ed25519",
        /// Ed25519 and ML-DSA-65; both must verify.
        Ed25519MlDsa65 = 2 => "ed25519+ml-dsa-65",
    }
}

wire_enum! {
    /// Element type of a tensor.
    DType: "dtype" {
        /// 32-bit IEEE-754 float.
        F32 = 1 => "f32",
    }
}

/// Which referees may load the muscle.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Binding {
    /// Any referee that can unwrap the content key.
    Any,
    /// Only these referees (key ids, sorted and unique).
    Referees(Vec<KeyId>),
}

impl Binding {
    /// Whether a referee with this key id may load the muscle.
    pub fn allows(&self, referee: &KeyId) -> bool {
        match self {
            Self::Any => true,
            Self::Referees(ids) => ids.binary_search(referee).is_ok(),
        }
    }
}

/// Resource limits requested by the publisher. Zero means "use the referee's policy default".
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Limits {
    /// Maximum linear memory in bytes.
    pub memory_bytes: u64,
    /// Wall-clock budget per call in milliseconds.
    pub time_ms: u32,
    /// Fuel (instruction budget) per call.
    pub fuel: u64,
}

/// A named, shaped tensor in the muscle's interface.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct TensorSpec {
    /// Name, possibly empty; `[a-z0-9_]`, at most 32 bytes.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions, outermost first; at most 8, each at least 1.
    pub dims: Vec<u32>,
}

impl TensorSpec {
    /// Number of elements (product of the dimensions; 1 for a scalar).
    pub fn elements(&self) -> u64 {
        self.dims.iter().map(|d| u64::from(*d)).product()
    }
}

/// An opaque header extension: the version-evolution mechanism of format v1.
///
/// Tags with the high bit set are *critical*: a reader that does not understand one refuses
/// the muscle. Others are ignored by readers that do not know them.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Extension {
    /// Tag; bit 15 marks the extension critical.
    pub tag: u16,
    /// Contents, at most [`MAX_EXTENSION_LEN`] bytes.
    pub data: Vec<u8>,
}

impl Extension {
    /// Non-critical, empty: the publisher declares that the payload never lets a NaN's sign or
    /// payload bits reach anything observable (outputs, the loss, the state region), so a
    /// referee may run it without canonicalising the NaN of every float instruction and
    /// canonicalise its outputs instead. `referee compile` writes it for Python and ONNX models,
    /// whose code only ever moves NaNs through arithmetic. See docs/muscle-format.md §9.
    pub const NAN_BLIND: u16 = 0x0001;

    /// The [`Self::NAN_BLIND`] declaration.
    pub fn nan_blind() -> Self {
        Self { tag: Self::NAN_BLIND, data: Vec::new() }
    }

    /// Whether a reader must understand this extension to accept the muscle.
    pub fn is_critical(&self) -> bool {
        self.tag & 0x8000 != 0
    }
}

/// The authenticated plaintext header of a muscle.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Header {
    /// Payload cipher.
    pub suite: Suite,
    /// Key delivery mode.
    pub key_mode: KeyMode,
    /// Signature scheme.
    pub signature_scheme: SignatureScheme,
    /// Fingerprint of the publisher's public key.
    pub publisher: KeyId,
    /// Stable identifier of the muscle across versions.
    pub muscle_id: MuscleId,
    /// Human-readable name, `[a-z0-9][a-z0-9._-]*`, at most 64 bytes.
    pub name: String,
    /// Monotonic version; anti-rollback compares it.
    pub version: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
    /// Referees allowed to load the muscle.
    pub binding: Binding,
    /// ABI identifier the payload targets, e.g. `referee.abi.v1`.
    pub abi: String,
    /// Requested host capabilities, sorted and unique.
    pub capabilities: Vec<String>,
    /// Requested resource limits.
    pub limits: Limits,
    /// Input tensors.
    pub inputs: Vec<TensorSpec>,
    /// Output tensors.
    pub outputs: Vec<TensorSpec>,
    /// SHA-256 of the plaintext payload.
    pub code_hash: [u8; 32],
    /// Plaintext payload length in bytes.
    pub payload_len: u64,
    /// Extensions, sorted by tag, unique.
    pub extensions: Vec<Extension>,
}

impl Header {
    /// Whether the publisher declared the payload NaN-blind ([`Extension::NAN_BLIND`]).
    pub fn declares_nan_blind(&self) -> bool {
        self.extensions.iter().any(|e| e.tag == Extension::NAN_BLIND)
    }
}

fn check_text(field: &'static str, value: &str, rule: &'static str, ok: bool) -> Result<(), FormatError> {
    if ok { Ok(()) } else { Err(FormatError::BadText { field, value: value.to_owned(), rule }) }
}

/// `[a-z0-9][a-z0-9._-]*`: safe in file names, URLs and tool names.
pub(crate) fn check_name(field: &'static str, value: &str, max: usize) -> Result<(), FormatError> {
    let rule = if max == MAX_ABI_LEN {
        "use 1-32 characters from a-z, 0-9, '.', '_' and '-', starting with a letter or digit"
    } else {
        "use 1-64 characters from a-z, 0-9, '.', '_' and '-', starting with a letter or digit"
    };
    let mut chars = value.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    check_text(field, value, rule, first_ok && rest_ok && value.len() <= max)
}

fn check_capability(value: &str) -> Result<(), FormatError> {
    let mut chars = value.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    check_text(
        "capability",
        value,
        "use 1-32 characters from a-z, 0-9 and '_', starting with a letter",
        first_ok && rest_ok && value.len() <= MAX_CAPABILITY_LEN,
    )
}

fn check_tensor(spec: &TensorSpec) -> Result<(), FormatError> {
    check_text(
        "tensor name",
        &spec.name,
        "use at most 32 characters from a-z, 0-9 and '_'",
        spec.name.len() <= MAX_TENSOR_NAME_LEN
            && spec.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
    )?;
    if spec.dims.len() > MAX_DIMS {
        return Err(FormatError::BadLength {
            field: "tensor rank",
            offset: 0,
            len: spec.dims.len() as u64,
            max: MAX_DIMS as u64,
        });
    }
    let mut elements: u64 = 1;
    for dim in &spec.dims {
        if *dim == 0 {
            return Err(FormatError::NonCanonical { field: "tensor dims", why: "every dimension must be at least 1" });
        }
        elements = elements.saturating_mul(u64::from(*dim));
    }
    if elements > MAX_TENSOR_ELEMENTS {
        return Err(FormatError::BadLength {
            field: "tensor elements",
            offset: 0,
            len: elements,
            max: MAX_TENSOR_ELEMENTS,
        });
    }
    Ok(())
}

fn check_sorted_unique<T: Ord>(field: &'static str, items: &[T]) -> Result<(), FormatError> {
    if items.windows(2).all(|w| matches!(w, [a, b] if a < b)) {
        Ok(())
    } else {
        Err(FormatError::NonCanonical { field, why: "entries must be sorted and unique" })
    }
}

fn check_count(field: &'static str, len: usize, max: usize) -> Result<(), FormatError> {
    if len > max { Err(FormatError::BadLength { field, offset: 0, len: len as u64, max: max as u64 }) } else { Ok(()) }
}

impl Header {
    /// Checks a muscle name against the format's alphabet and length.
    pub fn validate_name(name: &str) -> Result<(), FormatError> {
        check_name("name", name, MAX_NAME_LEN)
    }

    /// Checks every rule the decoder enforces, so that a header that validates encodes to
    /// bytes that decode back to it.
    pub fn validate(&self) -> Result<(), FormatError> {
        check_name("name", &self.name, MAX_NAME_LEN)?;
        check_name("abi", &self.abi, MAX_ABI_LEN)?;
        if let Binding::Referees(ids) = &self.binding {
            if ids.is_empty() {
                return Err(FormatError::NonCanonical {
                    field: "binding",
                    why: "a referee list must name at least one referee (or use `any`)",
                });
            }
            check_count("binding", ids.len(), MAX_BINDING)?;
            check_sorted_unique("binding", ids)?;
        }
        check_count("capabilities", self.capabilities.len(), MAX_CAPABILITIES)?;
        self.capabilities.iter().try_for_each(|c| check_capability(c))?;
        check_sorted_unique("capabilities", &self.capabilities)?;
        check_count("inputs", self.inputs.len(), MAX_TENSORS)?;
        check_count("outputs", self.outputs.len(), MAX_TENSORS)?;
        self.inputs.iter().chain(&self.outputs).try_for_each(check_tensor)?;
        if self.payload_len > MAX_PAYLOAD_LEN {
            return Err(FormatError::BadLength {
                field: "payload length",
                offset: 0,
                len: self.payload_len,
                max: MAX_PAYLOAD_LEN,
            });
        }
        check_count("extensions", self.extensions.len(), MAX_EXTENSIONS)?;
        let tags: Vec<u16> = self.extensions.iter().map(|e| e.tag).collect();
        check_sorted_unique("extensions", &tags)?;
        for ext in &self.extensions {
            check_count("extension", ext.data.len(), MAX_EXTENSION_LEN)?;
            if ext.is_critical() {
                return Err(FormatError::NonCanonical {
                    field: "extensions",
                    why: "format v1 defines no critical extensions, so none may be written",
                });
            }
        }
        Ok(())
    }

    /// The canonical encoding of the header body (without the envelope prefix).
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        self.validate()?;
        let mut w = Writer::default();
        self.encode_body(&mut w);
        check_header_len(w.len())?;
        Ok(w.into_bytes())
    }

    /// Decodes a header body produced by [`Self::encode`]; refuses any other encoding.
    pub fn decode(body: &[u8]) -> Result<Self, FormatError> {
        Self::decode_body(body, 0)
    }

    /// Appends the header body (without the envelope prefix) to `w`.
    pub(crate) fn encode_body(&self, w: &mut Writer) {
        w.u8(self.suite.to_byte());
        w.u8(self.key_mode.to_byte());
        w.u8(self.signature_scheme.to_byte());
        w.u8(0);
        w.put(&self.publisher.0);
        w.put(&self.muscle_id.0);
        w.u64(self.version);
        w.u64(self.created_at);
        w.short_str(&self.name);
        w.short_str(&self.abi);
        match &self.binding {
            Binding::Any => {
                w.u8(0);
                w.u8(0);
            }
            Binding::Referees(ids) => {
                w.u8(1);
                w.u8(u8::try_from(ids.len()).unwrap_or(u8::MAX));
                ids.iter().for_each(|id| w.put(&id.0));
            }
        }
        w.u8(u8::try_from(self.capabilities.len()).unwrap_or(u8::MAX));
        self.capabilities.iter().for_each(|c| w.short_str(c));
        w.u64(self.limits.memory_bytes);
        w.u32(self.limits.time_ms);
        w.u64(self.limits.fuel);
        for tensors in [&self.inputs, &self.outputs] {
            w.u8(u8::try_from(tensors.len()).unwrap_or(u8::MAX));
            for t in tensors {
                w.short_str(&t.name);
                w.u8(t.dtype.to_byte());
                w.u8(u8::try_from(t.dims.len()).unwrap_or(u8::MAX));
                t.dims.iter().for_each(|d| w.u32(*d));
            }
        }
        w.put(&self.code_hash);
        w.u64(self.payload_len);
        w.u8(u8::try_from(self.extensions.len()).unwrap_or(u8::MAX));
        for ext in &self.extensions {
            w.u16(ext.tag);
            w.u16(u16::try_from(ext.data.len()).unwrap_or(u16::MAX));
            w.put(&ext.data);
        }
    }

    /// Reads a header body from exactly `body`; trailing bytes are an error.
    pub(crate) fn decode_body(body: &[u8], base_offset: usize) -> Result<Self, FormatError> {
        check_header_len(body.len())?;
        let mut r = Reader::new(body);
        let header = Self::read(&mut r).map_err(|e| shift_offset(e, base_offset))?;
        if r.remaining() != 0 {
            return Err(FormatError::NonCanonical {
                field: "header length",
                why: "the declared header length is longer than its contents",
            });
        }
        header.validate()?;
        Ok(header)
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, FormatError> {
        let suite = Suite::read(r)?;
        let key_mode = KeyMode::read(r)?;
        let signature_scheme = SignatureScheme::read(r)?;
        if r.u8("reserved")? != 0 {
            return Err(FormatError::NonCanonical { field: "reserved", why: "must be zero in format v1" });
        }
        let publisher = KeyId(r.array("publisher key id")?);
        let muscle_id = MuscleId(r.array("muscle id")?);
        let version = r.u64("version")?;
        let created_at = r.u64("created at")?;
        let name = r.short_str("name", MAX_NAME_LEN, false)?.to_owned();
        let abi = r.short_str("abi", MAX_ABI_LEN, false)?.to_owned();
        let binding = read_binding(r)?;
        let capabilities = read_list(r, "capabilities", MAX_CAPABILITIES, |r| {
            Ok(r.short_str("capability", MAX_CAPABILITY_LEN, false)?.to_owned())
        })?;
        let limits =
            Limits { memory_bytes: r.u64("memory limit")?, time_ms: r.u32("time limit")?, fuel: r.u64("fuel limit")? };
        let inputs = read_list(r, "inputs", MAX_TENSORS, read_tensor)?;
        let outputs = read_list(r, "outputs", MAX_TENSORS, read_tensor)?;
        let code_hash = r.array("code hash")?;
        let payload_len = r.u64("payload length")?;
        let extensions = read_list(r, "extensions", MAX_EXTENSIONS, |r| {
            let tag = r.u16("extension tag")?;
            let offset = r.position();
            let len = usize::from(r.u16("extension length")?);
            if len > MAX_EXTENSION_LEN {
                return Err(FormatError::BadLength {
                    field: "extension length",
                    offset,
                    len: len as u64,
                    max: MAX_EXTENSION_LEN as u64,
                });
            }
            let ext = Extension { tag, data: r.take(len, "extension data")?.to_vec() };
            if ext.is_critical() {
                return Err(FormatError::UnknownCriticalExtension { tag });
            }
            Ok(ext)
        })?;
        Ok(Self {
            suite,
            key_mode,
            signature_scheme,
            publisher,
            muscle_id,
            name,
            version,
            created_at,
            binding,
            abi,
            capabilities,
            limits,
            inputs,
            outputs,
            code_hash,
            payload_len,
            extensions,
        })
    }
}

/// Bodies longer than [`MAX_HEADER_LEN`] are refused in both directions.
pub(crate) fn check_header_len(len: usize) -> Result<u32, FormatError> {
    u32::try_from(len).ok().filter(|l| *l <= MAX_HEADER_LEN).ok_or(FormatError::BadLength {
        field: "header length",
        offset: 10,
        len: len as u64,
        max: u64::from(MAX_HEADER_LEN),
    })
}

fn read_binding(r: &mut Reader<'_>) -> Result<Binding, FormatError> {
    let offset = r.position();
    let kind = r.u8("binding kind")?;
    let count_offset = r.position();
    let count = usize::from(r.u8("binding count")?);
    match kind {
        0 if count == 0 => Ok(Binding::Any),
        0 => Err(FormatError::NonCanonical { field: "binding", why: "`any` binding must list no referees" }),
        1 if (1..=MAX_BINDING).contains(&count) => {
            let ids = (0..count).map(|_| Ok(KeyId(r.array("binding referee id")?))).collect::<Result<Vec<_>, _>>()?;
            Ok(Binding::Referees(ids))
        }
        1 => Err(FormatError::BadLength {
            field: "binding count",
            offset: count_offset,
            len: count as u64,
            max: MAX_BINDING as u64,
        }),
        other => Err(FormatError::Unsupported { field: "binding kind", offset, value: u64::from(other) }),
    }
}

fn read_tensor(r: &mut Reader<'_>) -> Result<TensorSpec, FormatError> {
    let name = r.short_str("tensor name", MAX_TENSOR_NAME_LEN, true)?.to_owned();
    let dtype = DType::read(r)?;
    let dims = read_list(r, "tensor rank", MAX_DIMS, |r| r.u32("tensor dimension"))?;
    Ok(TensorSpec { name, dtype, dims })
}

fn read_list<T>(
    r: &mut Reader<'_>,
    field: &'static str,
    max: usize,
    mut item: impl FnMut(&mut Reader<'_>) -> Result<T, FormatError>,
) -> Result<Vec<T>, FormatError> {
    let offset = r.position();
    let count = usize::from(r.u8(field)?);
    if count > max {
        return Err(FormatError::BadLength { field, offset, len: count as u64, max: max as u64 });
    }
    (0..count).map(|_| item(r)).collect()
}

/// Header offsets are relative to the body; report them relative to the file.
fn shift_offset(err: FormatError, base: usize) -> FormatError {
    match err {
        FormatError::Truncated { field, offset } => FormatError::Truncated { field, offset: offset + base },
        FormatError::Unsupported { field, offset, value } => {
            FormatError::Unsupported { field, offset: offset + base, value }
        }
        FormatError::BadLength { field, offset, len, max } => {
            FormatError::BadLength { field, offset: offset + base, len, max }
        }
        FormatError::NotUtf8 { field, offset } => FormatError::NotUtf8 { field, offset: offset + base },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn tensor_strategy() -> impl Strategy<Value = TensorSpec> {
        ("[a-z0-9_]{0,32}", proptest::collection::vec(1u32..=8, 0..=MAX_DIMS)).prop_map(|(name, dims)| TensorSpec {
            name,
            dtype: DType::F32,
            dims,
        })
    }

    fn header_strategy() -> impl Strategy<Value = Header> {
        let ids = proptest::collection::btree_set(any::<[u8; 32]>().prop_map(KeyId), 1..=MAX_BINDING);
        let binding = prop_oneof![Just(Binding::Any), ids.prop_map(|s| Binding::Referees(s.into_iter().collect()))];
        let caps = proptest::collection::btree_set("[a-z][a-z0-9_]{0,31}", 0..=MAX_CAPABILITIES);
        let exts = proptest::collection::btree_map(0u16..0x8000, proptest::collection::vec(any::<u8>(), 0..64), 0..4);
        (
            (
                prop::sample::select(Suite::ALL),
                prop::sample::select(KeyMode::ALL),
                prop::sample::select(SignatureScheme::ALL),
            ),
            (any::<[u8; 32]>(), any::<[u8; 16]>(), any::<u64>(), any::<u64>()),
            ("[a-z0-9][a-z0-9._-]{0,63}", "[a-z0-9][a-z0-9._-]{0,31}", binding, caps),
            (any::<u64>(), any::<u32>(), any::<u64>()),
            (proptest::collection::vec(tensor_strategy(), 0..4), proptest::collection::vec(tensor_strategy(), 0..4)),
            (any::<[u8; 32]>(), 0..=MAX_PAYLOAD_LEN, exts),
        )
            .prop_map(
                |(
                    (suite, key_mode, signature_scheme),
                    (publisher, muscle_id, version, created_at),
                    (name, abi, binding, caps),
                    (memory_bytes, time_ms, fuel),
                    (inputs, outputs),
                    (code_hash, payload_len, exts),
                )| Header {
                    suite,
                    key_mode,
                    signature_scheme,
                    publisher: KeyId(publisher),
                    muscle_id: MuscleId(muscle_id),
                    name,
                    version,
                    created_at,
                    binding,
                    abi,
                    capabilities: caps.into_iter().collect(),
                    limits: Limits { memory_bytes, time_ms, fuel },
                    inputs,
                    outputs,
                    code_hash,
                    payload_len,
                    extensions: exts.into_iter().map(|(tag, data)| Extension { tag, data }).collect(),
                },
            )
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_identity(header in header_strategy()) {
            let bytes = header.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let decoded = Header::decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&decoded, &header);
        }

        #[test]
        fn accepted_bytes_reencode_identically(header in header_strategy(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
            // Mutate one byte of a valid encoding: whatever still decodes must be canonical.
            let mut bytes = header.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let i = pos.index(bytes.len());
            if let Some(b) = bytes.get_mut(i) { *b = byte; }
            if let Ok(decoded) = Header::decode(&bytes) {
                prop_assert_eq!(decoded.encode().map_err(|e| TestCaseError::fail(e.to_string()))?, bytes);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Header::decode(&bytes);
        }

        #[test]
        fn every_proper_prefix_is_refused(header in header_strategy(), cut in any::<prop::sample::Index>()) {
            let bytes = header.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let cut = cut.index(bytes.len());
            prop_assert!(Header::decode(bytes.get(..cut).unwrap_or_default()).is_err());
        }
    }

    #[test]
    fn unsorted_capabilities_are_not_canonical() {
        let mut header = sample();
        header.capabilities = vec!["log".into(), "clock".into()];
        assert!(matches!(header.encode(), Err(FormatError::NonCanonical { field: "capabilities", .. })));
    }

    #[test]
    fn critical_extensions_are_refused() {
        let mut header = sample();
        header.extensions = vec![Extension { tag: 0x8001, data: vec![1] }];
        assert!(matches!(header.encode(), Err(FormatError::NonCanonical { field: "extensions", .. })));
        // A reader that meets one refuses it as not understood.
        header.extensions.clear();
        let mut bytes = header.encode().unwrap_or_default();
        bytes.pop();
        bytes.extend_from_slice(&[1, 0x01, 0x80, 1, 0, 7]);
        assert!(matches!(Header::decode(&bytes), Err(FormatError::UnknownCriticalExtension { tag: 0x8001 })));
    }

    #[test]
    fn names_outside_the_alphabet_are_refused() {
        for bad in ["", "Feanor", "-x", "a b", "a/b", "é"] {
            let mut header = sample();
            header.name = bad.into();
            assert!(header.encode().is_err(), "{bad:?} accepted");
        }
    }

    fn sample() -> Header {
        Header {
            suite: Suite::Aes256Gcm,
            key_mode: KeyMode::MasterKey,
            signature_scheme: SignatureScheme::Ed25519,
            publisher: KeyId([1; 32]),
            muscle_id: MuscleId([2; 16]),
            name: "feanor".into(),
            version: 1,
            created_at: 0,
            binding: Binding::Any,
            abi: "referee.abi.v1".into(),
            capabilities: vec![],
            limits: Limits::default(),
            inputs: vec![],
            outputs: vec![],
            code_hash: [0; 32],
            payload_len: 0,
            extensions: vec![],
        }
    }
}
