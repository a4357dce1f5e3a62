//! Fuzzes `open`, the referee's side: it must never panic, and it may only succeed on a
//! payload whose SHA-256 is the header's code hash (and, for an edited template, only when it
//! opens to the template's own header and payload). Whatever `SealedMuscle::parse` accepts
//! must also re-encode to the same header bytes, as in the `parse` target.
//!
//! The first input byte picks what is opened, so the fuzzer reaches the deep checks without
//! a committed corpus:
//! - bits 0-1: `0` opens the remaining bytes as they are; `1..=3` takes a valid muscle
//!   (master key + AES-256-GCM; two recipients + ChaCha20-Poly1305 + extension; master key +
//!   hybrid ML-DSA-65 signature), sealed once with the fixed keys below, and applies the
//!   remaining bytes to it as edits of 4 bytes each: `[p0, p1, p2 | op << 6, v]`, position
//!   `p % len`, op 0 xor `v` (never a no-op), 1 overwrite with `v`, 2 insert `v`, 3 remove
//!   `v % 8 + 1` bytes;
//! - bit 2: after editing, re-sign the blob with the publisher's Ed25519 key, so edits get past
//!   the signature check and reach binding, rollback, key unwrap, decryption and the code hash
//!   (for the hybrid template only the Ed25519 signature is redone, so the ML-DSA-65 check must
//!   then refuse it: instrumented ML-DSA signing costs ~20 ms per run, and the checks after the
//!   signatures are the same code for every template);
//! - bits 3-4: trust store: `0`/`1` trusts the publisher, `2` requires post-quantum
//!   signatures from it, `3` has already accepted version 2 (anti-rollback);
//! - bit 5: the referee has no master key.
//!
//! Keys are fixed text constants in the crate's key-file format (`to_file()`), so a crash
//! found in raw mode reproduces anywhere. The templates themselves are sealed with a fresh
//! content key, salt and nonces per process (`seal` draws them from the OS), so a template-mode
//! crash that depends on those bytes may need the template re-made to reproduce; the edits
//! and the layout (all lengths) are the same in every process.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use referee_muscle::{
    Binding, DType, Delivery, Extension, Header, Limits, MasterKey, MemoryTrust, MuscleSpec, PublisherSecretKey,
    RefereeKeys, RefereeSecretKey, SealOptions, SealedMuscle, Suite, TensorSpec, open, seal,
};
use sha2::{Digest, Sha256};

const PUBLISHER: &str = "referee-publisher-secret-v1\n9bd7cab5dd6b03cb5fc887797eac7dbe649b5053a0cb2600dba7d13434dad5c86148f2fbec8966c8dab80fe445827026c571c2b7e914a58ccd5ce93d3316df37\n";
const REFEREE: &str = "referee-identity-secret-v1\n16a94a1dccad3c7380d109d63bb65ae5b8b20702c60172815b3f5464c51146156810d476386629ba2fa0525dec8466bbf4845f5475675f99553b1b32d7f4b368\n";
const OTHER_REFEREE: &str = "referee-identity-secret-v1\n7dd86d459869270139e2295b952400e881311a8694819c8690ad21d808a31cb34809f578b31a0c00f37a8db5fecac445faf1fce638fc9a52515a9273e1e3e97e\n";
const MASTER: &str = "referee-master-key-v1\n5414d2a1e61d0cd80859aea1d4a89ab6f857662c2a36fc04630addefc00f0c6f\n";

const ED25519_SIG_LEN: usize = 64;
const ML_DSA_65_SIG_LEN: usize = 3309;

struct Template {
    blob: Vec<u8>,
    header: Header,
    payload: Vec<u8>,
    post_quantum: bool,
}

struct Fixture {
    keys: RefereeKeys,
    keys_without_master: RefereeKeys,
    trust: [MemoryTrust; 3],
    templates: [Template; 3],
    ed25519: ed25519_dalek::SigningKey,
}

fn referee_keys(master: bool) -> RefereeKeys {
    RefereeKeys {
        identity: RefereeSecretKey::from_file(REFEREE).expect("REFEREE constant"),
        master: master.then(|| MasterKey::from_file(MASTER).expect("MASTER constant")),
    }
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let publisher = PublisherSecretKey::from_file(PUBLISHER).expect("PUBLISHER constant");
        let other = RefereeSecretKey::from_file(OTHER_REFEREE).expect("OTHER_REFEREE constant");
        let keys = referee_keys(true);
        let master = keys.master.as_ref().expect("master key");
        // The constants are exactly what `to_file()` writes.
        assert_eq!(publisher.to_file().as_str(), PUBLISHER);
        assert_eq!(keys.identity.to_file().as_str(), REFEREE);
        assert_eq!(other.to_file().as_str(), OTHER_REFEREE);
        assert_eq!(master.to_file().as_str(), MASTER);

        let seeds = hex::decode(PUBLISHER.lines().nth(1).expect("hex line")).expect("hex");
        let ed25519 = ed25519_dalek::SigningKey::from_bytes(&seeds[..32].try_into().expect("32 bytes"));

        let tensor = |name: &str, dims: Vec<u32>| TensorSpec { name: name.into(), dtype: DType::F32, dims };
        let spec = |binding| MuscleSpec {
            name: "fuzz".into(),
            muscle_id: None,
            version: 1,
            created_at: 1_700_000_000,
            binding,
            abi: referee_muscle::ABI_V1.into(),
            capabilities: vec!["log".into(), "clock".into()],
            limits: Limits { memory_bytes: 1 << 20, time_ms: 50, fuel: 1_000_000 },
            inputs: vec![tensor("x", vec![1, 4])],
            outputs: vec![tensor("", vec![2])],
            extensions: vec![Extension { tag: 7, data: b"note".to_vec() }],
        };
        let recipients = [keys.identity.public_key(), other.public_key()];
        let both = Binding::Referees(recipients.iter().map(|r| r.key_id()).collect());
        let make = |payload: &[u8], binding, delivery, options: SealOptions| {
            let blob = seal(&spec(binding), payload, &publisher, delivery, options).expect("seal template");
            let header = SealedMuscle::parse(&blob).expect("parse template").header;
            Template { blob, header, payload: payload.to_vec(), post_quantum: options.post_quantum }
        };
        let templates = [
            make(b"\0asm\x01\0\0\0 master", None, Delivery::MasterKey(master), SealOptions::default()),
            make(
                b"\0asm\x01\0\0\0 recipients",
                Some(both),
                Delivery::Recipients(&recipients),
                SealOptions { suite: Suite::ChaCha20Poly1305, post_quantum: false },
            ),
            make(
                b"\0asm\x01\0\0\0 hybrid",
                None,
                Delivery::MasterKey(master),
                SealOptions { suite: Suite::Aes256Gcm, post_quantum: true },
            ),
        ];

        let mut plain = MemoryTrust::default();
        plain.trust(publisher.public_key());
        let mut post_quantum_only = MemoryTrust::default();
        post_quantum_only.trust_post_quantum_only(publisher.public_key());
        let mut rollback = plain.clone();
        rollback.accept(&Header { version: 2, ..templates[0].header.clone() });

        // Every template opens untouched.
        for t in &templates {
            let opened = open(&t.blob, &keys, &plain).expect("template opens");
            assert_eq!(opened.payload.as_slice(), t.payload.as_slice());
        }
        Fixture {
            keys,
            keys_without_master: referee_keys(false),
            trust: [plain, post_quantum_only, rollback],
            templates,
            ed25519,
        }
    })
}

/// Applies the 4-byte edits in `ops` to `blob`.
fn edit(blob: &mut Vec<u8>, ops: &[u8]) {
    for op in ops.chunks_exact(4) {
        if blob.is_empty() {
            return;
        }
        let pos = u32::from_le_bytes([op[0], op[1], op[2] & 0x3f, 0]) as usize % blob.len();
        let value = op[3];
        match op[2] >> 6 {
            0 => blob[pos] ^= value.max(1),
            1 => blob[pos] = value,
            2 => blob.insert(pos, value),
            _ => {
                let end = (pos + usize::from(value % 8) + 1).min(blob.len());
                blob.drain(pos..end);
            }
        }
    }
}

/// Redoes the Ed25519 signature of `blob` in place, assuming the template's signature layout
/// at its end (an ML-DSA-65 signature, if any, is left as it was).
fn resign(fx: &Fixture, blob: &mut [u8], post_quantum: bool) {
    let sigs_len = ED25519_SIG_LEN + if post_quantum { ML_DSA_65_SIG_LEN } else { 0 };
    let Some(signed_len) = blob.len().checked_sub(sigs_len) else { return };
    let (signed, sigs) = blob.split_at_mut(signed_len);
    let ed = ed25519_dalek::Signer::sign(&fx.ed25519, signed);
    sigs[..ED25519_SIG_LEN].copy_from_slice(&ed.to_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let fx = fixture();
    let keys = if mode & 0x20 != 0 { &fx.keys_without_master } else { &fx.keys };
    let trust = &fx.trust[usize::from((mode >> 3) & 3).saturating_sub(1)];

    let template = match mode & 3 {
        0 => None,
        n => Some(&fx.templates[usize::from(n) - 1]),
    };
    let mut edited;
    let bytes: &[u8] = match template {
        None => rest,
        Some(t) => {
            edited = t.blob.clone();
            edit(&mut edited, rest);
            if mode & 4 != 0 {
                resign(fx, &mut edited, t.post_quantum);
            }
            &edited
        }
    };

    // The `parse` target's canonical-encoding check, on the edited templates that reach deeper
    // into the envelope than raw bytes do.
    if let Ok(sealed) = SealedMuscle::parse(bytes) {
        let header_len = u32::from_le_bytes(bytes[10..14].try_into().expect("4 bytes")) as usize;
        let encoded = sealed.header.encode().expect("a parsed header re-encodes");
        assert_eq!(encoded.as_slice(), &bytes[14..14 + header_len], "re-encoding the parsed header changed its bytes");
    }

    if let Ok(opened) = open(bytes, keys, trust) {
        let hash: [u8; 32] = Sha256::digest(opened.payload.as_slice()).into();
        assert_eq!(hash, opened.header.code_hash, "open returned a payload that does not match its code hash");
        // Success needs the publisher's signature and the content key: only an untouched
        // (possibly re-signed) template can get here, and it must open to the original.
        let t = template.expect("open accepted bytes that are not a sealed template");
        assert_eq!(opened.header, t.header);
        assert_eq!(opened.payload.as_slice(), t.payload.as_slice());
    }
});
