//! Every size limit of format v1 (documented in `docs/muscle-format.md` §6).
//!
//! Limits are part of the format: a reader refuses anything beyond them before allocating.

/// Largest plaintext payload: 64 MiB.
pub const MAX_PAYLOAD_LEN: u64 = 64 * 1024 * 1024;
/// Largest header body: 64 KiB.
pub const MAX_HEADER_LEN: u32 = 64 * 1024;
/// Largest muscle file accepted by `open`: the payload limit plus 1 MiB for everything else.
pub const MAX_MUSCLE_LEN: usize = 65 * 1024 * 1024;
/// Smallest possible muscle file: minimal header, one recipient record, empty payload,
/// Ed25519 signature only.
pub const MIN_MUSCLE_LEN: usize = crate::envelope::PREFIX_LEN
    + crate::envelope::MIN_HEADER_LEN
    + 1
    + crate::envelope::RECIPIENT_RECORD_LEN
    + crate::envelope::NONCE_LEN
    + crate::envelope::TAG_LEN
    + crate::envelope::ED25519_SIG_LEN;
/// Longest muscle name.
pub const MAX_NAME_LEN: usize = 64;
/// Longest ABI id.
pub const MAX_ABI_LEN: usize = 32;
/// Most referees in a binding list.
pub const MAX_BINDING: usize = 16;
/// Most recipients in recipient mode.
pub const MAX_RECIPIENTS: usize = 16;
/// Most requested capabilities.
pub const MAX_CAPABILITIES: usize = 32;
/// Longest capability name.
pub const MAX_CAPABILITY_LEN: usize = 32;
/// Most input (and, separately, output) tensors.
pub const MAX_TENSORS: usize = 16;
/// Longest tensor name.
pub const MAX_TENSOR_NAME_LEN: usize = 32;
/// Highest tensor rank.
pub const MAX_DIMS: usize = 8;
/// Most elements in one tensor (2^28, i.e. 1 GiB of f32).
pub const MAX_TENSOR_ELEMENTS: u64 = 1 << 28;
/// Most header extensions.
pub const MAX_EXTENSIONS: usize = 16;
/// Largest header extension.
pub const MAX_EXTENSION_LEN: usize = 4096;
