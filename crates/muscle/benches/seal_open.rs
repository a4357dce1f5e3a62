//! Benchmarks `seal` / `open` of `.muscle` against bare primitives: `cargo bench -p referee-muscle --bench seal_open`.
//!
//! - `seal/…` and `open/…`: the whole envelope for a payload of the given size (master-key
//!   mode with AES-256-GCM at 1 KiB – 4 MiB; ChaCha20-Poly1305, recipient mode (HPKE) and the
//!   hybrid Ed25519 + ML-DSA-65 signature at 10 KiB and 4 MiB).
//! - `baseline/…`: the primitives `open` cannot avoid, on the same payload: one AES-256-GCM
//!   decrypt (into a fresh `Vec`, as `open` does), one SHA-256 (the code hash), both together,
//!   and one Ed25519 `verify_strict` over a message of the payload's size (the signature
//!   covers the whole blob).
//! - `open-fixed/…`, `seal-fixed/…`: size-independent steps inside `open` and `seal` (key
//!   derivations), to account for the overhead over the baselines.
//!
//! Keys and sealed blobs are made once, outside the timed loops. `open` results are dropped
//! inside the loop, so the zeroization of the plaintext on drop is part of its time.
//! Throughput is payload bytes per second.

// Benchmark setup (key generation, sealing fixed inputs) is not reachable from untrusted
// input; a failure there is a broken benchmark and should stop it loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::hint::black_box;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use ed25519_dalek::{Signer, SigningKey};
use referee_muscle::{
    ABI_V1, DType, Delivery, Limits, MasterKey, MemoryTrust, MuscleSpec, PublisherSecretKey, RefereeKeys,
    RefereeSecretKey, SealOptions, Suite, TensorSpec, open, seal,
};
use sha2::{Digest, Sha256};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
/// Sizes for the default configuration (master key, AES-256-GCM).
const ALL_SIZES: [usize; 4] = [KIB, 10 * KIB, 64 * KIB, 4 * MIB];
/// Sizes for the variants and the baselines.
const VARIANT_SIZES: [usize; 2] = [10 * KIB, 4 * MIB];

/// Everything a publisher and one referee need, generated once.
struct Fixture {
    publisher: PublisherSecretKey,
    referee: RefereeKeys,
    trust: MemoryTrust,
}

impl Fixture {
    fn new() -> Self {
        let publisher = PublisherSecretKey::generate().expect("publisher key generation");
        let referee = RefereeKeys {
            identity: RefereeSecretKey::generate().expect("referee key generation"),
            master: Some(MasterKey::generate().expect("master key generation")),
        };
        let mut trust = MemoryTrust::default();
        trust.trust(publisher.public_key());
        Self { publisher, referee, trust }
    }

    fn master(&self) -> &MasterKey {
        self.referee.master.as_ref().expect("the fixture always has a master key")
    }

    fn seal(&self, payload: &[u8], recipients: bool, options: SealOptions) -> Vec<u8> {
        let identity = [self.referee.identity.public_key()];
        let delivery = if recipients { Delivery::Recipients(&identity) } else { Delivery::MasterKey(self.master()) };
        seal(&spec(), payload, &self.publisher, delivery, options).expect("sealing the benchmark payload")
    }
}

/// A realistic small header: one capability, one input and one output tensor.
fn spec() -> MuscleSpec {
    let tensor = |name: &str| TensorSpec { name: name.into(), dtype: DType::F32, dims: vec![1, 64] };
    MuscleSpec {
        name: "bench".into(),
        muscle_id: None,
        version: 1,
        created_at: 1_700_000_000,
        binding: None,
        abi: ABI_V1.into(),
        capabilities: vec!["log".into()],
        limits: Limits::default(),
        inputs: vec![tensor("x")],
        outputs: vec![tensor("y")],
        extensions: vec![],
    }
}

/// Incompressible-looking, deterministic payload bytes.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect()
}

fn label(len: usize) -> String {
    if len >= MIB { format!("{}MiB", len / MIB) } else { format!("{}KiB", len / KIB) }
}

/// Per-benchmark settings: byte throughput, and flat sampling for multi-millisecond runs
/// (linear sampling would need thousands of iterations of a 4 MiB open).
fn configure(group: &mut BenchmarkGroup<'_, WallTime>, len: usize) {
    group.throughput(Throughput::Bytes(len as u64));
    group.sampling_mode(if len >= MIB { SamplingMode::Flat } else { SamplingMode::Auto });
}

fn bench_seal(c: &mut Criterion) {
    let fx = Fixture::new();
    let mut group = c.benchmark_group("seal");
    for len in ALL_SIZES {
        let data = payload(len);
        configure(&mut group, len);
        group.bench_function(BenchmarkId::new("master-aes-256-gcm", label(len)), |b| {
            b.iter(|| {
                seal(&spec(), black_box(&data), &fx.publisher, Delivery::MasterKey(fx.master()), SealOptions::default())
                    .expect("seal")
            });
        });
    }
    group.finish();
}

fn bench_open(c: &mut Criterion) {
    let fx = Fixture::new();
    let mut group = c.benchmark_group("open");
    let variants: [(&str, &[usize], bool, SealOptions); 4] = [
        ("master-aes-256-gcm", &ALL_SIZES, false, SealOptions::default()),
        (
            "master-chacha20-poly1305",
            &VARIANT_SIZES,
            false,
            SealOptions { suite: Suite::ChaCha20Poly1305, post_quantum: false },
        ),
        ("recipients-hpke-aes-256-gcm", &VARIANT_SIZES, true, SealOptions::default()),
        (
            "master-aes-256-gcm-ml-dsa-65",
            &VARIANT_SIZES,
            false,
            SealOptions { suite: Suite::Aes256Gcm, post_quantum: true },
        ),
    ];
    for (name, sizes, recipients, options) in variants {
        for &len in sizes {
            let data = payload(len);
            let blob = fx.seal(&data, recipients, options);
            let opened = open(&blob, &fx.referee, &fx.trust).expect("the benchmark blob opens");
            assert_eq!(opened.payload.as_slice(), data.as_slice(), "round trip");
            configure(&mut group, len);
            group.bench_function(BenchmarkId::new(name, label(len)), |b| {
                b.iter(|| open(black_box(&blob), &fx.referee, &fx.trust).expect("open"));
            });
        }
    }
    group.finish();
}

fn bench_baseline(c: &mut Criterion) {
    let key = [0x42u8; 32];
    let nonce = Nonce::from([0x24u8; 12]);
    let aad = [0x11u8; 256];
    let cipher = Aes256Gcm::new(&key.into());
    let signer = SigningKey::from_bytes(&[0x07u8; 32]);
    let verifier = signer.verifying_key();
    let mut group = c.benchmark_group("baseline");
    for len in VARIANT_SIZES {
        let data = payload(len);
        let ciphertext = cipher.encrypt(&nonce, Payload { msg: &data, aad: &aad }).expect("AES-GCM encrypt");
        let signature = signer.sign(&data);
        configure(&mut group, len);
        group.bench_function(BenchmarkId::new("aes-256-gcm-decrypt", label(len)), |b| {
            b.iter(|| cipher.decrypt(&nonce, Payload { msg: black_box(&ciphertext), aad: &aad }).expect("decrypt"));
        });
        group.bench_function(BenchmarkId::new("sha-256", label(len)), |b| {
            b.iter(|| Sha256::digest(black_box(&data)));
        });
        group.bench_function(BenchmarkId::new("aes-256-gcm-decrypt+sha-256", label(len)), |b| {
            b.iter(|| {
                let plain =
                    cipher.decrypt(&nonce, Payload { msg: black_box(&ciphertext), aad: &aad }).expect("decrypt");
                Sha256::digest(&plain)
            });
        });
        group.bench_function(BenchmarkId::new("ed25519-verify", label(len)), |b| {
            b.iter(|| verifier.verify_strict(black_box(&data), &signature).expect("verify"));
        });
    }
    group.finish();
}

/// Size-independent work inside every `open`, to account for its overhead over the baselines.
fn bench_fixed_costs(c: &mut Criterion) {
    let fx = Fixture::new();
    let publisher = fx.publisher.public_key();
    let mut group = c.benchmark_group("open-fixed");
    // `open` derives the referee's key id (X25519 public key from the secret, then SHA-256)
    // to check the binding and find its recipient record.
    group.bench_function("referee-key-id", |b| b.iter(|| black_box(&fx.referee.identity).key_id()));
    // `MemoryTrust::facts` and `open` compare the trusted publisher's key id; it is computed
    // once per key (SHA-256 over 1,984 bytes of public keys), so this should stay at ~1 ns.
    group.bench_function("publisher-key-id", |b| b.iter(|| black_box(&publisher).key_id()));
    group.finish();
    // `seal` starts from the secret key and derives the public key (ML-DSA-65 included) to
    // name the publisher in the header.
    let mut group = c.benchmark_group("seal-fixed");
    group.bench_function("publisher-public-key", |b| b.iter(|| black_box(&fx.publisher).public_key()));
    group.finish();
}

criterion_group!(benches, bench_seal, bench_open, bench_baseline, bench_fixed_costs);
criterion_main!(benches);
