//! The ONNX frontend end to end: `.onnx` files written by the `onnx` Python package, compiled
//! by `referee-compiler`, sealed, run in the real `referee-runtime`, and compared with ONNX
//! Runtime running the very same files (`tests/onnx_ref.py`).
//! Needs `pip install onnx==1.19.1 onnxruntime==1.23.2 numpy==2.4.6`.

#![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing, reason = "test code")]

mod common;

use std::collections::BTreeSet;

use common::{Harness, Rng, TestResult, close, examples, floats, reference};
use referee_compiler::{CompileError, compile_path};
use serde_json::{Value, json};

const ONNX_PINS: &str = "onnx==1.19.1 onnxruntime==1.23.2 numpy==2.4.6";

/// Equivalence bound of the issue: 1e-5 absolute or relative.
const TOLERANCE: f64 = 1e-5;

fn assert_matches(name: &str, got: &[f32], want: &[f64], input: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: output length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(close(*g, *w, TOLERANCE), "{name}: output {i} for input {input:?}: wasm {g} vs onnxruntime {w}");
    }
}

#[test]
fn bundled_onnx_examples_match_onnx_runtime() -> TestResult {
    let h = Harness::new()?;
    for (name, inputs, outputs) in [("feanor", 4, 1), ("mlp", 16, 4)] {
        let path = examples().join(format!("{name}.onnx"));
        let module = compile_path(&path)?;
        assert_eq!(module.input_shape, Some(vec![1, inputs]), "the dynamic batch axis is fixed to 1");
        assert_eq!(module.output_shape, Some(vec![1, outputs]));
        h.load(name, &module)?;
        let mut rng = Rng(2026);
        let xs: Vec<Vec<f32>> = (0..16).map(|_| rng.vec(inputs as usize, 2.0)).collect();
        let job = json!([{ "model": path, "shape": [1, inputs], "inputs": xs }]);
        let want = reference("onnx_ref.py", &["run"], &job, ONNX_PINS);
        for (x, want) in xs.iter().zip(want[0].as_array().unwrap()) {
            assert_matches(&format!("{name}.onnx"), &h.runtime.invoke(name, x)?, &floats(want), x);
        }
    }
    Ok(())
}

/// The operators the issue lists; the generated family must exercise every one.
const LISTED: &[&str] = &[
    "Gemm",
    "MatMul",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "Softmax",
    "LogSoftmax",
    "Clip",
    "Flatten",
    "Reshape",
    "Transpose",
    "Identity",
    "Constant",
    "Squeeze",
    "Unsqueeze",
    "Concat",
];

#[test]
fn generated_model_family_matches_onnx_runtime() -> TestResult {
    let h = Harness::new()?;
    let dir = h.dir.path().join("family");
    std::fs::create_dir(&dir)?;
    let jobs = reference("onnx_ref.py", &["family", dir.to_str().unwrap(), "20261123", "3"], &Value::Null, ONNX_PINS);
    let jobs = jobs.as_array().unwrap();
    let mut covered = BTreeSet::new();
    for (n, job) in jobs.iter().enumerate() {
        let path = job["model"].as_str().unwrap();
        let module = compile_path(path.as_ref()).map_err(|e| format!("{path}: {e}"))?;
        let name = format!("family-{n}");
        h.load(&name, &module)?;
        let want = job["outputs"].as_array().unwrap();
        for (x, want) in job["inputs"].as_array().unwrap().iter().zip(want) {
            let x: Vec<f32> = floats(x).iter().map(|&v| v as f32).collect();
            assert_matches(path, &h.runtime.invoke(&name, &x)?, &floats(want), &x);
        }
        covered.extend(job["ops"].as_array().unwrap().iter().map(|o| o.as_str().unwrap().to_owned()));
    }
    let missing: Vec<&&str> = LISTED.iter().filter(|op| !covered.contains(**op)).collect();
    assert!(missing.is_empty(), "the family never exercises {missing:?}");
    assert!(jobs.len() >= 3 * 16, "{} models", jobs.len());
    Ok(())
}

#[test]
fn a_non_onnx_file_is_a_clear_error() -> TestResult {
    let h = Harness::new()?;
    let path = h.write("junk.onnx", "this is not protobuf")?;
    let err = compile_path(&path).unwrap_err();
    assert!(matches!(err, CompileError::Onnx { .. }), "{err:?}");
    assert!(err.to_string().contains("not a readable ONNX model"), "{err}");
    Ok(())
}
