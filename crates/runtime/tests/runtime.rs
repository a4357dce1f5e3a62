//! The runtime against hostile muscles, with a stream of good calls that must never fail.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use referee_muscle::{Limits, MuscleSpec};
use referee_runtime::{
    AttestError, Fault, Policy, Priority, Runtime, RuntimeError, RuntimeOptions, Scheduler, SchedulerConfig, attest,
    verify_attestation,
};
use referee_trust::Home;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const FEANOR: &str = include_str!("../../../examples/feanor.wat");
const LINEAR: &str = include_str!("../../../examples/linear-trainable.wat");

/// ABI v1 boilerplate around a hostile `forward` body.
fn hostile(imports: &str, memory: &str, extra: &str, forward_body: &str) -> String {
    format!(
        r#"(module {imports}
            {memory}
            (func (export "input_ptr") (result i32) i32.const 0)
            (func (export "output_ptr") (result i32) i32.const 16)
            {extra}
            (func (export "forward") (param $in i32) (param $out i32) (result i32) {forward_body}))"#
    )
}

struct Fixture {
    _dir: tempfile::TempDir,
    home: Home,
}

impl Fixture {
    fn new() -> Result<Self, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let home = Home::new(dir.path().join("home"));
        home.keygen()?;
        Ok(Self { _dir: dir, home })
    }

    fn seal(
        &self,
        name: &str,
        version: u64,
        wat: &str,
        caps: &[&str],
        limits: Limits,
    ) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
        let mut spec = MuscleSpec::new(name, &[1, 4], &[1, 1]);
        spec.version = version;
        spec.capabilities = caps.iter().map(|c| (*c).to_owned()).collect();
        spec.limits = limits;
        self.seal_spec(&spec, wat)
    }

    fn seal_spec(&self, spec: &MuscleSpec, wat: &str) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
        let module = referee_compiler::compile(referee_compiler::SourceKind::Wat, wat.as_bytes())?;
        Ok(self.home.seal_for_self(spec, &module.bytes)?)
    }

    fn runtime(&self, policy: Policy) -> Result<Runtime, RuntimeError> {
        Runtime::open(&self.home, RuntimeOptions { policy })
    }
}

/// The reference Fëanor, computed natively.
fn feanor_native(x: [f32; 4]) -> f32 {
    (x[0] * 0.5 + x[1] * -0.25 + (x[2] * 0.125 + (x[3] * 1.0 + 0.1))).max(0.0)
}

fn limits(memory_bytes: u64, time_ms: u32) -> Limits {
    Limits { memory_bytes, time_ms, fuel: 0 }
}

fn expect_fault(result: Result<Vec<f32>, RuntimeError>, expected: &Fault) {
    let fault = match result {
        Err(RuntimeError::Fault { fault, .. }) => Some(fault),
        _ => None,
    };
    assert_eq!(fault.as_ref(), Some(expected), "expected fault {expected:?}");
}

#[test]
fn hostile_muscles_are_contained_while_good_calls_keep_succeeding() -> TestResult {
    let f = Fixture::new()?;
    let mut policy = Policy::permissive_default();
    policy.defaults.kv_quota_bytes = Some(4096);
    let runtime = Arc::new(f.runtime(policy)?);
    runtime.load(&f.seal("feanor", 1, FEANOR, &[], Limits::default())?)?;

    // A stream of good calls on another thread, checked against the native computation.
    let stop = Arc::new(AtomicBool::new(false));
    let good = Arc::new(AtomicU64::new(0));
    let stream = {
        let (runtime, stop, good) = (runtime.clone(), stop.clone(), good.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let x = [i as f32, 1.5, -2.0, (i % 7) as f32];
                let y = runtime.invoke("feanor", &x).map_err(|e| format!("good call {i} failed: {e}"))?;
                if y != vec![feanor_native(x)] {
                    return Err(format!("good call {i}: {y:?} != {}", feanor_native(x)));
                }
                good.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            Ok(())
        })
    };

    let cases: Vec<(&str, String, &[&str], Limits, Fault)> = vec![
        (
            "infinite-loop",
            hostile("", "(memory (export \"memory\") 1)", "", "(loop $l (br $l)) i32.const 0"),
            &[],
            limits(0, 30),
            Fault::Deadline,
        ),
        (
            "grow-bomb",
            hostile(
                "",
                "(memory (export \"memory\") 1)",
                "",
                "(loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) i32.const 0",
            ),
            &[],
            limits(1 << 20, 1000),
            Fault::MemoryLimit,
        ),
        (
            "recursion",
            hostile(
                "",
                "(memory (export \"memory\") 1)",
                "(func $r (param i32) (result i32) (call $r (i32.add (local.get 0) (i32.const 1))))",
                "(call $r (i32.const 0))",
            ),
            &[],
            Limits::default(),
            Fault::StackOverflow,
        ),
        (
            "oob-store",
            hostile(
                "",
                "(memory (export \"memory\") 1)",
                "",
                "(i32.store (i32.const 70000) (i32.const 1)) i32.const 0",
            ),
            &[],
            Limits::default(),
            Fault::OutOfBounds,
        ),
        (
            "table-bomb",
            hostile(
                "",
                "(memory (export \"memory\") 1) (table 1 funcref)",
                "",
                "(loop $l (br_if $l (i32.ne (table.grow (ref.null func) (i32.const 10000)) (i32.const -1)))) i32.const 0",
            ),
            &[],
            Limits::default(),
            Fault::TableLimit,
        ),
        (
            "divide",
            hostile(
                "",
                "(memory (export \"memory\") 1)",
                "",
                "(i32.div_s (i32.const 1) (i32.trunc_f32_s (f32.load (i32.const 0))))",
            ),
            &[],
            Limits::default(),
            Fault::DivideByZero,
        ),
        (
            "unreachable",
            hostile("", "(memory (export \"memory\") 1)", "", "unreachable"),
            &[],
            Limits::default(),
            Fault::Unreachable,
        ),
    ];
    for (name, wat, caps, lim, fault) in &cases {
        runtime.load(&f.seal(name, 1, wat, caps, *lim)?)?;
        expect_fault(runtime.invoke(name, &[0.0; 4]), fault);
        // The cell was replaced: the muscle is callable again and faults the same way.
        expect_fault(runtime.invoke(name, &[0.0; 4]), fault);
    }

    // kv quota abuse: a loop of distinct 1 KiB puts against a 4 KiB quota.
    let kv_bomb = hostile(
        "(import \"referee\" \"kv_put\" (func $put (param i32 i32 i32 i32) (result i32)))",
        "(memory (export \"memory\") 1)",
        "",
        "(local $i i32) (loop $l (i32.store (i32.const 100) (local.get $i)) (drop (call $put (i32.const 100) (i32.const 4) (i32.const 1000) (i32.const 1024))) (local.set $i (i32.add (local.get $i) (i32.const 1))) (br $l)) i32.const 0",
    );
    runtime.load(&f.seal("kv-bomb", 1, &kv_bomb, &["kv_put"], Limits::default())?)?;
    match runtime.invoke("kv-bomb", &[0.0; 4]) {
        Err(RuntimeError::Fault { fault: Fault::Capability(msg), .. }) => assert!(msg.contains("kv quota"), "{msg}"),
        other => panic!("kv bomb: {other:?}"),
    }

    // Log flood: the call succeeds, lines beyond the rate are dropped.
    let log_flood = hostile(
        "(import \"referee\" \"log\" (func $log (param i32 i32)))",
        "(memory (export \"memory\") 1) (data (i32.const 100) \"spam\")",
        "",
        "(local $i i32) (loop $l (call $log (i32.const 100) (i32.const 4)) (local.set $i (i32.add (local.get $i) (i32.const 1))) (br_if $l (i32.lt_u (local.get $i) (i32.const 100000)))) i32.const 0",
    );
    runtime.load(&f.seal("log-flood", 1, &log_flood, &["log"], Limits::default())?)?;
    runtime.invoke("log-flood", &[0.0; 4])?;
    let lines = runtime.drain_logs();
    assert!(!lines.is_empty() && lines.len() <= 100, "{} lines kept", lines.len());

    // Refused at load: ungranted / unrequested capability, memory beyond the limit, a data
    // segment outside memory.
    let needs_kv = hostile(
        "(import \"referee\" \"kv_get\" (func (param i32 i32 i32 i32) (result i32)))",
        "(memory (export \"memory\") 1)",
        "",
        "i32.const 0",
    );
    let err = runtime.load(&f.seal("unrequested", 1, &needs_kv, &[], Limits::default())?).err();
    assert!(
        matches!(&err, Some(RuntimeError::CapabilityDenied { capability, reason, .. }) if capability == "referee.kv_get" && reason.contains("not requested")),
        "{err:?}"
    );
    let strict = f.strict_runtime()?;
    let err = strict.load(&f.seal("ungranted", 1, &needs_kv, &["kv_get"], Limits::default())?).err();
    assert!(
        matches!(&err, Some(RuntimeError::CapabilityDenied { reason, .. }) if reason.contains("not granted")),
        "{err:?}"
    );
    let big_memory = hostile("", "(memory (export \"memory\") 64)", "", "i32.const 0");
    let err = runtime.load(&f.seal("big-memory", 1, &big_memory, &[], limits(1 << 20, 0))?).err();
    assert!(matches!(err, Some(RuntimeError::Fault { fault: Fault::MemoryLimit, .. })), "{err:?}");
    let bad_segment =
        hostile("", "(memory (export \"memory\") 1) (data (i32.const 65530) \"0123456789\")", "", "i32.const 0");
    let err = runtime.load(&f.seal("bad-segment", 1, &bad_segment, &[], Limits::default())?).err();
    assert!(matches!(err, Some(RuntimeError::Fault { fault: Fault::OutOfBounds, .. })), "{err:?}");

    stop.store(true, Ordering::Relaxed);
    stream.join().map_err(|_| "good stream panicked")??;
    assert!(good.load(Ordering::Relaxed) > 0);

    let head = runtime.audit().verify()?.map_err(|v| v.to_string())?;
    let kinds: Vec<String> = runtime
        .audit()
        .tail(head.records as usize)?
        .iter()
        .filter_map(|r| r.event["kind"].as_str().map(str::to_owned))
        .collect();
    for kind in ["load", "load_refused", "fault", "kv_quota_exceeded", "log_rate_limited"] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in audit: {kinds:?}");
    }
    Ok(())
}

impl Fixture {
    /// A second referee (its own home: one runtime per state database) that trusts the same
    /// publisher, shares the master key, and whose policy grants only `log`.
    fn strict_runtime(&self) -> Result<Runtime, Box<dyn std::error::Error>> {
        let other = Home::new(self.home.root().with_extension("strict"));
        other.keygen()?;
        std::fs::copy(self.home.master_key_path(), other.master_key_path())?;
        other.trust_store()?.add_publisher(&self.home.publisher_secret()?.public_key(), "test", false)?;
        Ok(Runtime::open(
            &other,
            RuntimeOptions { policy: Policy::from_toml("[defaults]\ncapabilities = [\"log\"]\n")? },
        )?)
    }
}

#[test]
fn repeated_faults_quarantine_until_released() -> TestResult {
    let f = Fixture::new()?;
    let policy = Policy::from_toml("[defaults]\nfaults_before_quarantine = 3\nfault_window_secs = 3600\n")?;
    let runtime = f.runtime(policy)?;
    runtime.load(&f.seal(
        "crash",
        1,
        &hostile("", "(memory (export \"memory\") 1)", "", "unreachable"),
        &[],
        Limits::default(),
    )?)?;
    for _ in 0..3 {
        expect_fault(runtime.invoke("crash", &[0.0; 4]), &Fault::Unreachable);
    }
    assert!(matches!(runtime.invoke("crash", &[0.0; 4]), Err(RuntimeError::Quarantined { .. })));
    runtime.release("crash")?;
    expect_fault(runtime.invoke("crash", &[0.0; 4]), &Fault::Unreachable);
    Ok(())
}

#[test]
fn outputs_are_bit_identical_across_runs_and_restarts() -> TestResult {
    let f = Fixture::new()?;
    let blob = f.seal("feanor", 1, FEANOR, &[], Limits::default())?;
    let inputs: Vec<[f32; 4]> =
        (0..50).map(|i| [i as f32 * 0.37, -1.25 * i as f32, 3.5, f32::EPSILON * i as f32]).collect();
    let run = || -> Result<Vec<Vec<u32>>, Box<dyn std::error::Error>> {
        let runtime = f.runtime(Policy::permissive_default())?;
        runtime.load(&blob)?;
        let first: Vec<Vec<u32>> = inputs
            .iter()
            .map(|x| runtime.invoke("feanor", x).map(|y| y.iter().map(|v| v.to_bits()).collect()))
            .collect::<Result<_, _>>()?;
        for _ in 0..1000 {
            for (x, expected) in inputs.iter().zip(&first) {
                let y: Vec<u32> = runtime.invoke("feanor", x)?.iter().map(|v| v.to_bits()).collect();
                assert_eq!(&y, expected);
            }
        }
        Ok(first)
    };
    let before_restart = run()?;
    let after_restart = run()?;
    assert_eq!(before_restart, after_restart);
    Ok(())
}

/// Output 0: the sign bit of the NaN `0/0` makes inside the module (observable only to a module
/// that reinterprets float bits, which a `nan-blind` one promises not to do); output 1: a raw
/// non-canonical NaN written with an integer store; outputs 2–3: `0/0` itself and the input.
const NAN_PROBE: &str = r#"(module
    (memory (export "memory") 1)
    (func (export "input_ptr") (result i32) i32.const 0)
    (func (export "output_ptr") (result i32) i32.const 16)
    (func (export "forward") (param $in i32) (param $out i32) (result i32)
        (local $nan f32)
        (local.set $nan (f32.div (f32.load (local.get $in)) (f32.load (local.get $in))))
        (f32.store (local.get $out)
            (f32.convert_i32_u (i32.shr_u (i32.reinterpret_f32 (local.get $nan)) (i32.const 31))))
        (i32.store offset=4 (local.get $out) (i32.const 0xffc00001))
        (f32.store offset=8 (local.get $out) (local.get $nan))
        (f32.store offset=12 (local.get $out) (f32.load offset=4 (local.get $in)))
        (i32.const 0)))"#;

#[test]
fn nan_blind_muscles_skip_per_instruction_canonicalisation_and_get_canonical_outputs() -> TestResult {
    let f = Fixture::new()?;
    let seal = |name: &str, blind: bool| -> Result<Vec<u8>, Box<dyn std::error::Error>> {
        let mut spec = MuscleSpec::new(name, &[1, 4], &[1, 4]);
        spec.declare_nan_blind(blind);
        f.seal_spec(&spec, NAN_PROBE)
    };
    let input = [0.0, f32::from_bits(0xffc0_0002), 0.0, 0.0];
    let bits = |runtime: &Runtime, name: &str| -> Result<Vec<u32>, RuntimeError> {
        Ok(runtime.invoke(name, &input)?.iter().map(|v| v.to_bits()).collect())
    };
    let canonical = f32::NAN.to_bits();
    assert_eq!(canonical, 0x7fc0_0000, "wasm's canonical NaN is Rust's f32::NAN");

    let runtime = f.runtime(Policy::permissive_default())?;
    runtime.load(&seal("plain", false)?)?;
    runtime.load(&seal("blind", true)?)?;
    assert!(runtime.info("plain")?.grant.canonicalize_every_nan);
    assert!(!runtime.info("blind")?.grant.canonicalize_every_nan);

    // Per-instruction canonicalisation: float results are canonical, so the module sees a
    // positive NaN; bits written by integer stores (and the input, moved by f32 load/store)
    // are passed through as they are, which is deterministic too.
    assert_eq!(bits(&runtime, "plain")?, vec![0, 0xffc0_0001, canonical, 0xffc0_0002]);
    // Boundary canonicalisation: every NaN the host hands back is canonical.
    let blind = bits(&runtime, "blind")?;
    assert_eq!(blind[1..], [canonical, canonical, canonical]);
    // x86's default NaN is negative: proof that the fast engine really runs without it.
    #[cfg(target_arch = "x86_64")]
    assert_eq!(blind[0], 1.0f32.to_bits(), "the nan-blind muscle ran in the canonicalising engine");
    drop(runtime);

    let strict = f.runtime(Policy::from_toml("[defaults]\ncanonicalize_every_nan = true\n")?)?;
    strict.load(&seal("blind", true)?)?;
    assert!(strict.info("blind")?.grant.canonicalize_every_nan);
    assert_eq!(bits(&strict, "blind")?, vec![0, 0xffc0_0001, canonical, 0xffc0_0002]);
    Ok(())
}

/// A muscle that remembers: each call increments a global and returns it (and leaves the
/// caller's first input in memory, returning the previous caller's).
#[test]
fn fresh_cells_keep_one_callers_leftovers_from_the_next() -> TestResult {
    let f = Fixture::new()?;
    let wat = hostile(
        "",
        r#"(memory (export "memory") 1)"#,
        "(global $calls (mut i32) (i32.const 0))",
        "(global.set $calls (i32.add (global.get $calls) (i32.const 1)))
         (f32.store (local.get $out) (f32.convert_i32_u (global.get $calls)))
         (f32.store offset=4 (local.get $out) (f32.load (i32.const 64)))
         (f32.store (i32.const 64) (f32.load (local.get $in)))
         (i32.const 0)",
    );
    let blob = f.seal_spec(&MuscleSpec::new("memo", &[1, 4], &[1, 2]), &wat)?;
    let calls = |runtime: &Runtime| -> Result<Vec<Vec<f32>>, RuntimeError> {
        (1..=3).map(|i| runtime.invoke("memo", &[i as f32 * 10.0, 0.0, 0.0, 0.0])).collect()
    };

    let mut policy = Policy::permissive_default();
    policy.muscles.insert("memo".into(), referee_runtime::PolicyRule { concurrency: Some(1), ..Default::default() });
    let reused = f.runtime(policy.clone())?;
    reused.load(&blob)?;
    assert!(!reused.info("memo")?.grant.fresh_cells);
    // Warm cells are reused by default: the second caller sees the first caller's input.
    assert_eq!(calls(&reused)?, vec![vec![1.0, 0.0], vec![2.0, 10.0], vec![3.0, 20.0]]);
    drop(reused);

    policy.defaults.fresh_cells = Some(true);
    let fresh = f.runtime(policy)?;
    fresh.load(&blob)?;
    assert!(fresh.info("memo")?.grant.fresh_cells);
    assert_eq!(calls(&fresh)?, vec![vec![1.0, 0.0]; 3], "every call starts from the image");
    Ok(())
}

#[test]
fn trainable_muscle_learns_and_keeps_its_parameters() -> TestResult {
    let f = Fixture::new()?;
    let runtime = f.runtime(Policy::permissive_default())?;
    let info = runtime.load(&f.seal("linear", 1, LINEAR, &[], Limits::default())?)?;
    assert!(info.trainable);
    // Target: y = 2 x0 - x1 + 0.5 x2 + 1.
    let truth = |x: [f32; 4]| 2.0 * x[0] - x[1] + 0.5 * x[2] + 1.0;
    let samples: Vec<[f32; 4]> =
        (0..16).map(|i| [(i % 4) as f32 * 0.5, (i / 4) as f32 * 0.5, ((i * 3) % 5) as f32 * 0.2, 0.0]).collect();
    let mut first_epoch = 0.0;
    let mut last_epoch = 0.0;
    for epoch in 0..200 {
        let mut total = 0.0;
        for x in &samples {
            total += runtime.train("linear", x, &[truth(*x)], 0.05)?;
        }
        if epoch == 0 {
            first_epoch = total;
        }
        last_epoch = total;
    }
    assert!(last_epoch < first_epoch / 100.0, "loss {first_epoch} -> {last_epoch}");
    let y = runtime.invoke("linear", &[1.0, 1.0, 1.0, 0.0])?;
    let expected = truth([1.0, 1.0, 1.0, 0.0]);
    assert!((y.first().copied().unwrap_or(f32::NAN) - expected).abs() < 0.05, "{y:?} vs {expected}");
    let trained = runtime.snapshot("linear")?;
    assert_eq!(trained.len(), 20);
    // Restoring zeroed parameters makes the model predict 0; restoring the snapshot brings it back.
    runtime.restore("linear", &[0u8; 20])?;
    assert_eq!(runtime.invoke("linear", &[1.0, 1.0, 1.0, 0.0])?, vec![0.0]);
    runtime.restore("linear", &trained)?;
    assert_eq!(runtime.invoke("linear", &[1.0, 1.0, 1.0, 0.0])?, y);
    assert!(matches!(runtime.restore("linear", &[0u8; 3]), Err(RuntimeError::BadInput { .. })));
    assert!(matches!(runtime.train("feanor-missing", &[0.0; 4], &[0.0], 0.1), Err(RuntimeError::NotLoaded(_))));
    Ok(())
}

#[test]
fn bad_inputs_and_unknown_muscles_are_refused() -> TestResult {
    let f = Fixture::new()?;
    let runtime = f.runtime(Policy::permissive_default())?;
    runtime.load(&f.seal("feanor", 1, FEANOR, &[], Limits::default())?)?;
    assert!(matches!(runtime.invoke("feanor", &[1.0, 2.0]), Err(RuntimeError::BadInput { .. })));
    assert!(matches!(runtime.invoke("nope", &[1.0; 4]), Err(RuntimeError::NotLoaded(_))));
    assert!(matches!(runtime.train("feanor", &[1.0; 4], &[1.0], 0.1), Err(RuntimeError::NoEntry { .. })));
    runtime.unload("feanor")?;
    assert!(matches!(runtime.invoke("feanor", &[1.0; 4]), Err(RuntimeError::NotLoaded(_))));
    Ok(())
}

#[test]
fn attestation_verifies_and_forgeries_are_refused() -> TestResult {
    let f = Fixture::new()?;
    let runtime = f.runtime(Policy::permissive_default())?;
    runtime.load(&f.seal("feanor", 1, FEANOR, &[], Limits::default())?)?;
    let nonce = "00112233445566778899aabbccddeeff";
    let signed = attest(&runtime, nonce, [7; 32], serde_json::json!([]))?;
    let public = runtime.keys().identity.public_key();
    let report = verify_attestation(&signed, &public, nonce, 300)?;
    assert_eq!(report["muscles"][0]["name"], "feanor");

    let mut changed = signed.clone();
    changed["report"]["muscles"][0]["version"] = serde_json::json!(2);
    assert_eq!(verify_attestation(&changed, &public, nonce, 300).err(), Some(AttestError::BadSignature));

    let other = referee_muscle::RefereeSecretKey::generate()?.public_key();
    assert!(matches!(verify_attestation(&signed, &other, nonce, 300), Err(AttestError::WrongReferee { .. })));

    let replay = verify_attestation(&signed, &public, "ffeeddccbbaa99887766554433221100", 300);
    assert!(matches!(replay, Err(AttestError::NonceMismatch { .. })));
    Ok(())
}

#[test]
fn scheduler_bounds_its_queues_and_serves_everything_it_accepted() -> TestResult {
    let f = Fixture::new()?;
    let runtime = Arc::new(f.runtime(Policy::permissive_default())?);
    let slow = hostile("", "(memory (export \"memory\") 1)", "", "(loop $l (br $l)) i32.const 0");
    runtime.load(&f.seal("slow", 1, &slow, &[], limits(0, 20))?)?;
    runtime.load(&f.seal("feanor", 1, FEANOR, &[], Limits::default())?)?;
    let scheduler = Scheduler::new(runtime.clone(), SchedulerConfig { workers: 1, queue_per_muscle: 2 })?;

    let mut tickets = Vec::new();
    let mut busy = 0;
    for _ in 0..50 {
        match scheduler.submit_forward("slow", Priority::Normal, vec![0.0; 4]) {
            Ok(t) => tickets.push(t),
            Err(RuntimeError::Busy { .. }) => busy += 1,
            Err(e) => return Err(e.into()),
        }
    }
    // Each accepted call runs for 20 ms; submitting 50 takes microseconds.
    assert!(busy >= 40, "only {busy} of 50 refused as busy");
    // A high-priority call to another muscle is still served.
    assert_eq!(
        scheduler.invoke("feanor", Priority::High, vec![1.0, 2.0, 3.0, 4.0])?,
        vec![feanor_native([1.0, 2.0, 3.0, 4.0])]
    );
    for t in tickets {
        assert!(matches!(t.wait(), Err(RuntimeError::Fault { fault: Fault::Deadline, .. })));
    }
    Ok(())
}

#[test]
fn fuel_budget_stops_a_loop_that_the_deadline_would_not() -> TestResult {
    let f = Fixture::new()?;
    let runtime = f.runtime(Policy::permissive_default())?;
    let spin = hostile("", "(memory (export \"memory\") 1)", "", "(loop $l (br $l)) i32.const 0");
    runtime.load(&f.seal("spin", 1, &spin, &[], Limits { memory_bytes: 0, time_ms: 0, fuel: 100_000 })?)?;
    expect_fault(runtime.invoke("spin", &[0.0; 4]), &Fault::OutOfFuel);
    // Fuel is per call: a well-behaved fueled muscle keeps working.
    runtime.load(&f.seal("feanor", 1, FEANOR, &[], Limits { memory_bytes: 0, time_ms: 0, fuel: 10_000 })?)?;
    assert_eq!(runtime.invoke("feanor", &[1.0, 2.0, 3.0, 4.0])?, vec![feanor_native([1.0, 2.0, 3.0, 4.0])]);
    assert_eq!(runtime.info("feanor")?.grant.fuel, Some(10_000));
    Ok(())
}

#[test]
fn concurrent_loads_and_unloads_lose_nothing_and_calls_see_a_muscle_or_not_loaded() -> TestResult {
    let f = Fixture::new()?;
    let runtime = Arc::new(f.runtime(Policy::permissive_default())?);
    let names: Vec<Vec<String>> = (0..2).map(|t| (0..8).map(|i| format!("m{t}-{i}")).collect()).collect();
    let blobs = names
        .iter()
        .map(|group| group.iter().map(|n| f.seal(n, 1, FEANOR, &[], Limits::default())).collect())
        .collect::<Result<Vec<Vec<Vec<u8>>>, _>>()?;
    runtime.load(&f.seal("churn", 1, FEANOR, &[], Limits::default())?)?;
    let churn = f.seal("churn", 1, FEANOR, &[], Limits::default())?;
    let stop = Arc::new(AtomicBool::new(false));
    let caller = {
        let (runtime, stop) = (runtime.clone(), stop.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let x = [1.0, 2.0, 3.0, 4.0];
            while !stop.load(Ordering::Relaxed) {
                match runtime.invoke("churn", &x) {
                    Ok(y) if y == vec![feanor_native(x)] => {}
                    Err(RuntimeError::NotLoaded(_)) => {}
                    other => return Err(format!("a call during load/unload got {other:?}")),
                }
            }
            Ok(())
        })
    };
    // Two threads load disjoint names while the main thread unloads and reloads `churn`.
    let loaders: Vec<_> = blobs
        .into_iter()
        .map(|group| {
            let runtime = runtime.clone();
            std::thread::spawn(move || group.iter().try_for_each(|blob| runtime.load(blob).map(drop)))
        })
        .collect();
    for _ in 0..8 {
        runtime.unload("churn")?;
        runtime.load(&churn)?;
    }
    for loader in loaders {
        loader.join().map_err(|_| "loader panicked")??;
    }
    stop.store(true, Ordering::Relaxed);
    caller.join().map_err(|_| "caller panicked")??;
    let listed: std::collections::BTreeSet<String> = runtime.list().into_iter().map(|m| m.header.name).collect();
    let expected: std::collections::BTreeSet<String> =
        names.into_iter().flatten().chain(std::iter::once("churn".to_owned())).collect();
    assert_eq!(listed, expected, "every load is in the table once, every unload was undone by its reload");
    Ok(())
}
