//! The compiler end to end: Python models compiled by `referee-compiler`, sealed, run in the real
//! `referee-runtime`, and compared with NumPy evaluating the very same `.py` files
//! (`tests/numpy_ref.py`). Needs `python3` with `numpy` (`pip install numpy==2.4.6`).

// The helpers below run only inside tests: as clippy.toml says for #[test] code, a failed
// unwrap, index or panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing, reason = "test helpers")]

mod common;

use std::path::Path;
use std::process::Command;

use common::{Harness, NUMPY_PIN, Rng, TestResult, close, examples, floats, numpy, reference};
use referee_compiler::{CompileError, compile_path};
use referee_muscle::{Delivery, MuscleSpec, SealOptions, seal};
use serde_json::{Value, json};

/// Compiles `path`, runs `n` random inputs through the runtime and NumPy, compares.
fn check_against_numpy(h: &Harness, name: &str, path: &Path, n: usize, scale: f32, tol: f64) -> TestResult {
    let module = compile_path(path)?;
    h.load(name, &module)?;
    let shape = module.input_shape.clone().ok_or("shape")?;
    let len: u32 = shape.iter().product();
    let mut rng = Rng(name.len() as u64 * 7919);
    let inputs: Vec<Vec<f32>> = (0..n).map(|_| rng.vec(len as usize, scale)).collect();
    let want = numpy(&json!([{ "model": path, "shape": shape, "inputs": inputs }]));
    for (x, want) in inputs.iter().zip(&want[0]) {
        let got = h.runtime.invoke(name, x)?;
        let want = floats(want);
        assert_eq!(got.len(), want.len(), "{name}: output length");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(close(*g, *w, tol), "{name}: output {i} for input {x:?}: wasm {g} vs numpy {w}");
        }
    }
    Ok(())
}

#[test]
fn bundled_examples_match_numpy() -> TestResult {
    let h = Harness::new()?;
    check_against_numpy(&h, "feanor", &examples().join("feanor.py"), 32, 4.0, 1e-5)?;
    check_against_numpy(&h, "mlp", &examples().join("mlp.py"), 32, 2.0, 1e-5)?;
    // Fëanor in Python and in hand-written WAT agree bit for bit.
    let wat = referee_compiler::compile(
        referee_compiler::SourceKind::Wat,
        std::fs::read_to_string(examples().join("feanor.wat"))?.as_bytes(),
    )?;
    let spec_shape = vec![1, 4];
    let blob = seal(
        &MuscleSpec::new("feanor-wat", &spec_shape, &[1, 1]),
        &wat.bytes,
        &h.home.publisher_secret()?,
        Delivery::MasterKey(&h.home.master_key()?),
        SealOptions::default(),
    )?;
    h.runtime.load(&blob)?;
    for x in [[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.25, -3.0], [0.0; 4]] {
        assert_eq!(h.runtime.invoke("feanor", &x)?, h.runtime.invoke("feanor-wat", &x)?);
    }
    Ok(())
}

/// One generated model per listed operation, with random weights and shapes.
fn op_family(rng: &mut Rng) -> Vec<(&'static str, String)> {
    let mut models = Vec::new();
    for round in 0..3 {
        let (m, k, n) = (1 + round, 3 + 2 * round, 5 + 7 * round);
        let w = rng.literal(&[k, n]);
        let b = rng.literal(&[n]);
        let col = rng.literal(&[m, 1]);
        let head = format!(
            "import numpy as np\nINPUT_SHAPE = ({m}, {k})\nW = np.array({w}, dtype=np.float32)\nB = np.array({b})\nC = np.array({col})\n"
        );
        let bodies: [(&'static str, String); 12] = [
            ("matmul", "    return x @ W + B".to_owned()),
            ("dot", "    return np.dot(x, W) - B".to_owned()),
            ("matmul-fn", "    return np.matmul(x, W) * C / 2.0".to_owned()),
            ("transpose", "    h = (x @ W).T\n    return np.transpose(h) + h.T * 0.5".to_owned()),
            ("reshape", "    h = x @ W\n    return h.reshape(-1) + np.reshape(h, (1, -1)).reshape(1, -1)".to_owned()),
            ("maxmin", "    h = x @ W\n    return np.minimum(np.maximum(h, B), 0.5) + np.maximum(-h, 0.0) - np.minimum(h, C)".to_owned()),
            ("clip", "    return np.clip(x @ W, -0.3, 0.4)".to_owned()),
            ("transcendental", "    h = x @ W\n    return np.tanh(h) + np.exp(h) * 0.1 + np.log(np.abs(h) + 0.5) - np.sqrt(np.abs(h))".to_owned()),
            ("reduce-axis", "    h = x @ W\n    return np.sum(h, axis=1, keepdims=True) + np.mean(h, axis=0) + np.max(h, axis=-1, keepdims=True)".to_owned()),
            ("reduce-all", "    h = x @ W\n    return h - np.mean(h) + np.max(h) * np.sum(h, keepdims=True)".to_owned()),
            ("helpers", "    return -layer(x, 2.0)\ndef layer(v, s):\n    t = v @ W\n    return s * t + 1".to_owned()),
            ("softmax", "    z = x @ W + B\n    e = np.exp(z - np.max(z, axis=-1, keepdims=True))\n    return e / np.sum(e, axis=-1, keepdims=True)".to_owned()),
        ];
        for (name, body) in bodies {
            models.push((name, format!("{head}\ndef forward(x):\n{body}\n")));
        }
    }
    models
}

#[test]
fn every_operation_matches_numpy_on_generated_models() -> TestResult {
    let h = Harness::new()?;
    let mut rng = Rng(42);
    let mut jobs = Vec::new();
    let mut compiled = Vec::new();
    for (i, (op, source)) in op_family(&mut rng).into_iter().enumerate() {
        let path = h.write(&format!("m{i}.py"), &source)?;
        let module = compile_path(&path).map_err(|e| format!("{op}: {e}\n{source}"))?;
        let name = format!("m{i}");
        h.load(&name, &module)?;
        let shape = module.input_shape.clone().ok_or("shape")?;
        let len: u32 = shape.iter().product();
        let inputs: Vec<Vec<f32>> = (0..6).map(|_| rng.vec(len as usize, 2.0)).collect();
        jobs.push(json!({ "model": path, "shape": shape, "inputs": inputs }));
        compiled.push((op, name, inputs, source));
    }
    let want = numpy(&Value::Array(jobs));
    for ((op, name, inputs, source), want) in compiled.iter().zip(&want) {
        for (x, w) in inputs.iter().zip(want) {
            let got = h.runtime.invoke(name, x)?;
            let w: Vec<f64> = w.as_array().unwrap().iter().map(|v| v.as_f64().unwrap_or(f64::NAN)).collect();
            assert_eq!(got.len(), w.len(), "{op}: output length\n{source}");
            for (g, w) in got.iter().zip(&w) {
                assert!(close(*g, *w, 1e-5), "{op}: wasm {g} vs numpy {w}\n{source}");
            }
        }
    }
    Ok(())
}

#[test]
fn transcendentals_are_within_one_part_per_million_of_numpy() -> TestResult {
    let h = Harness::new()?;
    for (name, body, scale) in [
        ("exp", "np.exp(x)", 80.0),
        ("tanh", "np.tanh(x)", 12.0),
        ("tanh-small", "np.tanh(x)", 0.01),
        ("log", "np.log(np.abs(x) + 0.000001)", 1000.0),
        ("sqrt", "np.sqrt(np.abs(x))", 1000.0),
    ] {
        let path = h.write(
            &format!("{name}.py"),
            &format!("import numpy as np\nINPUT_SHAPE = (4, 64)\ndef forward(x):\n    return {body}\n"),
        )?;
        check_against_numpy(&h, name, &path, 8, scale, 1e-6)?;
    }
    Ok(())
}

#[test]
fn np_load_reads_files_numpy_wrote() -> TestResult {
    let h = Harness::new()?;
    let dir = h.dir.path().display().to_string();
    let status = Command::new("python3")
        .args(["-c", &format!(
            "import numpy as np; rng = np.random.default_rng(1); np.save('{dir}/w.npy', rng.normal(size=(6, 3))); np.save('{dir}/b.npy', rng.normal(size=3).astype(np.float32))"
        )])
        .status()?;
    assert!(status.success(), "numpy could not write the .npy files: pip install {NUMPY_PIN}");
    let path = h.write("loaded.py", "import numpy as np\nW = np.load(\"w.npy\")\nB = np.load(\"b.npy\")\ndef forward(x):\n    return np.tanh(x @ W + B)\n")?;
    check_against_numpy(&h, "loaded", &path, 8, 1.0, 1e-5)?;
    // A missing file is an error at the np.load call.
    let bad =
        h.write("bad.py", "import numpy as np\nW = np.load(\"nope.npy\")\ndef forward(x):\n    return x @ W\n")?;
    let err = compile_path(&bad).unwrap_err().to_string();
    assert!(err.contains("bad.py:2:5:") && err.contains("nope.npy"), "{err}");
    assert!(matches!(compile_path(&h.dir.path().join("absent.py")), Err(CompileError::Io { .. })));
    Ok(())
}

#[test]
fn compiled_modules_are_deterministic_and_described() -> TestResult {
    let mlp = compile_path(&examples().join("mlp.py"))?;
    assert_eq!(mlp.bytes, compile_path(&examples().join("mlp.py"))?.bytes, "same source, same bytes");
    assert_eq!(mlp.input_shape, Some(vec![1, 16]));
    assert_eq!(mlp.output_shape, Some(vec![1, 4]));
    let summary = mlp.summary.clone().ok_or("summary")?;
    assert_eq!(summary.trainable_parameters, 16 * 64 + 64 + 64 * 64 + 64 + 64 * 4 + 4);
    assert_eq!(summary.entry_points, vec!["forward".to_owned(), "train".to_owned()]);
    for export in ["memory", "input_ptr", "output_ptr", "forward", "target_ptr", "state_ptr", "state_len", "train"] {
        assert!(mlp.exports.iter().any(|e| e == export), "missing export {export}");
    }
    assert!(mlp.imports.is_empty());
    // SIMD: matrix products in f32x4, ReLU as pmax.
    let mut ops = std::collections::BTreeSet::new();
    for payload in wasmparser::Parser::new(0).parse_all(&mlp.bytes) {
        if let wasmparser::Payload::CodeSectionEntry(body) = payload? {
            let mut reader = body.get_operators_reader()?;
            while !reader.eof() {
                ops.insert(format!("{:?}", reader.read()?).split([' ', '{', '(']).next().unwrap_or("").to_owned());
            }
        }
    }
    for op in ["F32x4PMax", "F32x4Mul", "F32x4Add", "V128Load", "V128Store"] {
        assert!(ops.contains(op), "{op} not emitted: {ops:?}");
    }
    let feanor = compile_path(&examples().join("feanor.py"))?;
    assert_eq!(feanor.summary.ok_or("summary")?.entry_points, vec!["forward".to_owned()]);
    assert!(!feanor.exports.iter().any(|e| e == "train"));
    assert_eq!((feanor.input_shape, feanor.output_shape), (Some(vec![1, 4]), Some(vec![1, 1])));
    Ok(())
}

fn one_hot(class: usize) -> Vec<f32> {
    (0..4).map(|i| if i == class { 1.0 } else { 0.0 }).collect()
}

#[test]
fn mlp_training_loss_matches_numpy_and_decreases() -> TestResult {
    let h = Harness::new()?;
    let path = examples().join("mlp.py");
    let module = compile_path(&path)?;
    h.load("mlp", &module)?;
    let mut rng = Rng(7);
    // Task: the class is the argmax of the first four inputs.
    let samples: Vec<(Vec<f32>, Vec<f32>)> = (0..32)
        .map(|_| {
            let x = rng.vec(16, 1.0);
            let class = (0..4).max_by(|&a, &b| x[a].total_cmp(&x[b])).unwrap_or(0);
            (x, one_hot(class))
        })
        .collect();
    // train() returns the loss before its step: with untouched weights it must equal NumPy's.
    let want = numpy(&json!([{
        "model": path, "shape": [1, 16], "loss": "cross_entropy",
        "inputs": samples.iter().map(|s| &s.0).collect::<Vec<_>>(),
        "targets": samples.iter().map(|s| &s.1).collect::<Vec<_>>(),
    }]));
    let first = h.runtime.train("mlp", &samples[0].0, &samples[0].1, 0.0)?;
    assert!(close(first, want[0][0].as_f64().unwrap(), 1e-5), "loss {first} vs numpy {}", want[0][0]);
    for (s, w) in samples.iter().zip(&want[0]).skip(1).take(5) {
        let got = h.runtime.train("mlp", &s.0, &s.1, 0.0)?;
        assert!(close(got, w.as_f64().unwrap(), 1e-5), "loss {got} vs numpy {w}");
    }
    let epoch = |lr: f32| -> Result<f32, Box<dyn std::error::Error>> {
        let mut total = 0.0;
        for (x, y) in &samples {
            total += h.runtime.train("mlp", x, y, lr)?;
        }
        Ok(total / samples.len() as f32)
    };
    let before = epoch(0.0)?;
    for _ in 0..30 {
        epoch(0.05)?;
    }
    let after = epoch(0.0)?;
    assert!(after < before * 0.5, "cross-entropy {before} -> {after}");
    let p = h.runtime.invoke("mlp", &samples[0].0)?;
    assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5, "softmax output {p:?}");
    Ok(())
}

/// Takes one SGD step on (x, y) and checks the update of every parameter slot `pick` selects
/// against a central finite difference of the loss; returns how many slots it checked.
fn check_gradients(
    h: &Harness,
    name: &str,
    x: &[f32],
    y: &[f32],
    pick: &mut dyn FnMut(usize) -> bool,
) -> Result<usize, Box<dyn std::error::Error>> {
    let floats =
        |b: &[u8]| -> Vec<f32> { b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect() };
    let p0 = floats(&h.runtime.snapshot(name)?);
    let lr = 0.01f32;
    h.runtime.train(name, x, y, lr)?;
    let p1 = floats(&h.runtime.snapshot(name)?);
    let eps = 1e-2f32;
    let mut checked = 0;
    for i in (0..p0.len()).filter(|&i| pick(i)) {
        let grad = (p0[i] - p1[i]) / lr;
        let loss_at = |delta: f32| -> Result<f32, Box<dyn std::error::Error>> {
            let mut p = p0.clone();
            p[i] += delta;
            let bytes: Vec<u8> = p.iter().flat_map(|v| v.to_le_bytes()).collect();
            h.runtime.restore(name, &bytes)?;
            Ok(h.runtime.train(name, x, y, 0.0)?)
        };
        let fd = (loss_at(eps)? - loss_at(-eps)?) / (2.0 * eps);
        assert!(
            (grad - fd).abs() <= 2e-3 + 2e-2 * fd.abs(),
            "{name}, parameter slot {i}: gradient {grad} vs finite difference {fd}"
        );
        checked += 1;
    }
    Ok(checked)
}

#[test]
fn gradients_match_finite_differences() -> TestResult {
    let h = Harness::new()?;
    let mut rng = Rng(99);
    let source = format!(
        "import numpy as np\nLOSS = \"mse\"\nINPUT_SHAPE = (2, 3)\nW1 = np.array({})\nB1 = np.array({})\nW2 = np.array({})\nS = np.array([0.3])\n\
         def forward(x):\n    h = np.tanh(x @ W1 + B1)\n    g = np.maximum(h, -0.2) * W2 + np.exp(S) / np.sqrt(np.abs(B1) + 1.0)\n    \
         return np.sum(g, axis=1, keepdims=True) - np.mean(np.log(np.abs(h) + 1.0), axis=1, keepdims=True)\n",
        rng.literal(&[3, 4]),
        rng.literal(&[4]),
        rng.literal(&[1, 4]),
    );
    let path = h.write("fd.py", &source)?;
    let module = compile_path(&path)?;
    h.load("fd", &module)?;
    let x = rng.vec(6, 1.0);
    let y = vec![0.25, -0.5];
    let checked = check_gradients(&h, "fd", &x, &y, &mut |_| true)?;
    assert!(checked > 3 * 4 + 4 + 4);
    Ok(())
}

/// Compiled models run without per-instruction NaN canonicalisation (`nan-blind`): a NaN with a
/// payload fed into `train` must still leave only canonical NaNs in the loss, the stored
/// parameters and later outputs.
#[test]
fn a_nan_with_a_payload_leaves_only_canonical_nans_behind() -> TestResult {
    let h = Harness::new()?;
    let module = compile_path(&examples().join("mlp.py"))?;
    assert!(module.nan_blind);
    h.load("mlp", &module)?;
    assert!(!h.runtime.info("mlp")?.grant.canonicalize_every_nan, "the fast engine runs compiled models");
    let canonical = f32::NAN.to_bits();
    let mut x = Rng(3).vec(16, 1.0);
    x[0] = f32::from_bits(0x7fc0_1234);
    let loss = h.runtime.train("mlp", &x, &one_hot(2), 0.1)?;
    assert_eq!(loss.to_bits(), canonical);
    let state = h.runtime.snapshot("mlp")?;
    let words: Vec<u32> = state.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect();
    let nans: Vec<u32> = words.iter().copied().filter(|w| f32::from_bits(*w).is_nan()).collect();
    assert!(!nans.is_empty(), "the NaN reached the parameters");
    assert!(nans.iter().all(|&w| w == canonical), "non-canonical NaNs stored: {:x?}", &nans[..nans.len().min(8)]);
    let y = h.runtime.invoke("mlp", &Rng(4).vec(16, 1.0))?;
    assert!(y.iter().all(|v| v.to_bits() == canonical), "outputs {y:?}");
    Ok(())
}

#[test]
fn ten_sgd_steps_match_a_numpy_implementation_of_the_same_steps() -> TestResult {
    let h = Harness::new()?;
    let path = examples().join("mlp.py");
    h.load("mlp", &compile_path(&path)?)?;
    let mut rng = Rng(10);
    let samples: Vec<(Vec<f32>, Vec<f32>)> = (0..10).map(|i| (rng.vec(16, 1.5), one_hot(i % 4))).collect();
    let probe = rng.vec(16, 1.0);
    let lr = 0.1f32;
    let want = reference(
        "numpy_ref.py",
        &[],
        &json!([{
            "model": path, "sgd_mlp": lr, "probe": probe,
            "inputs": samples.iter().map(|s| &s.0).collect::<Vec<_>>(),
            "targets": samples.iter().map(|s| &s.1).collect::<Vec<_>>(),
        }]),
        NUMPY_PIN,
    );
    let want = &want[0];
    for (step, ((x, y), w)) in samples.iter().zip(want["losses"].as_array().unwrap()).enumerate() {
        let got = h.runtime.train("mlp", x, y, lr)?;
        assert!(close(got, w.as_f64().unwrap(), 1e-5), "step {step}: loss {got} vs numpy {w}");
    }
    let got = h.runtime.invoke("mlp", &probe)?;
    for (i, (g, w)) in got.iter().zip(floats(&want["probe"])).enumerate() {
        assert!(close(*g, w, 1e-5), "after 10 steps, output {i}: {g} vs numpy {w}");
    }
    Ok(())
}

/// A batch of three through layers 8 → 16 → 260 → 4: the backward pass multiplies by `W3ᵀ`
/// (an unrolled transposed product) and by `W2ᵀ` (k = 260: the looped one), with m = 3 rows.
#[test]
fn gradients_through_transposed_products_match_finite_differences() -> TestResult {
    let h = Harness::new()?;
    let mut rng = Rng(260);
    let source = format!(
        "import numpy as np\nLOSS = \"mse\"\nINPUT_SHAPE = (3, 8)\nW1 = np.array({})\nW2 = np.array({})\nW3 = np.array({})\n\
         def forward(x):\n    h = np.tanh(x @ W1)\n    g = np.tanh(h @ W2)\n    return g @ W3\n",
        rng.literal(&[8, 16]),
        rng.literal(&[16, 260]),
        rng.literal(&[260, 4]),
    );
    let path = h.write("bt.py", &source)?;
    h.load("bt", &compile_path(&path)?)?;
    let x = rng.vec(24, 1.0);
    let y = rng.vec(12, 1.0);
    // Every W1 slot (its gradient flows through both transposed products) and a sample of the rest.
    let checked = check_gradients(&h, "bt", &x, &y, &mut |i| i < 8 * 16 || i % 97 == 0)?;
    assert!(checked > 8 * 16 + 40);
    Ok(())
}

#[test]
fn inner_dimensions_past_the_unroll_limit_match_numpy() -> TestResult {
    // k = 100 takes the looped matrix-product path; 37 columns exercise blocks, chunks and tail.
    let h = Harness::new()?;
    let mut rng = Rng(100);
    let source = format!(
        "import numpy as np\nW = np.array({})\nB = np.array({})\nV = np.array({})\n\
         def forward(x):\n    h = np.maximum(x @ W + B, 0.0)\n    return h @ V\n",
        rng.literal(&[100, 37]),
        rng.literal(&[37]),
        rng.literal(&[37, 70]),
    );
    let path = h.write("wide.py", &format!("INPUT_SHAPE = (1, 100)\n{source}"))?;
    check_against_numpy(&h, "wide", &path, 4, 1.0, 1e-5)
}
