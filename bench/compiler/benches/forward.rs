//! Forward and train latency of the bundled examples as muscles, in the same run as the same
//! networks in plain Rust (the floor) and in tract (a Rust ONNX runtime).
//! `bash bench/compiler.sh`, or `cargo bench --bench forward` in bench/compiler.
//!
//! Every implementation computes the very same network: `examples/make_onnx.py` wrote the
//! `.onnx` files from the `.py` files' weights, the Rust floor takes its weights from the
//! `.onnx` initializers (read through tract), and the outputs are checked to agree before
//! anything is timed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs, reason = "benchmark")]

use std::hint::black_box;
use std::path::{Path, PathBuf};

use criterion::{Criterion, criterion_group, criterion_main};
use referee_muscle::MuscleSpec;
use referee_runtime::{Policy, Runtime, RuntimeOptions};
use referee_trust::Home;
use tract_onnx::prelude::*;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

/// `out = relu?(x @ w + b)` with `w` stored `[k, n]` row-major.
fn dense(x: &[f32], w: &[f32], b: &[f32], n: usize, relu: bool) -> Vec<f32> {
    let mut out = b.to_vec();
    for (p, xv) in x.iter().enumerate() {
        for (o, wv) in out.iter_mut().zip(&w[p * n..(p + 1) * n]) {
            *o += xv * wv;
        }
    }
    if relu {
        out.iter_mut().for_each(|v| *v = v.max(0.0));
    }
    out
}

fn softmax(z: &[f32]) -> Vec<f32> {
    let m = z.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    let e: Vec<f32> = z.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// The mlp's parameters, `[k, n]` row-major like the `.py` file.
struct Mlp {
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: Vec<f32>,
    w3: Vec<f32>,
    b3: Vec<f32>,
}

impl Mlp {
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let h1 = dense(x, &self.w1, &self.b1, 64, true);
        let h2 = dense(&h1, &self.w2, &self.b2, 64, true);
        softmax(&dense(&h2, &self.w3, &self.b3, 4, false))
    }

    /// One SGD step on softmax cross-entropy; returns the loss before the step.
    fn train(&mut self, x: &[f32], y: &[f32], lr: f32) -> f32 {
        let h1 = dense(x, &self.w1, &self.b1, 64, true);
        let h2 = dense(&h1, &self.w2, &self.b2, 64, true);
        let p = softmax(&dense(&h2, &self.w3, &self.b3, 4, false));
        let loss = -y.iter().zip(&p).map(|(t, q)| t * q.ln()).sum::<f32>();
        let ysum: f32 = y.iter().sum();
        let g3: Vec<f32> = p.iter().zip(y).map(|(q, t)| q * ysum - t).collect();
        let back = |g: &[f32], w: &[f32], h: &[f32], n: usize| -> Vec<f32> {
            h.iter()
                .enumerate()
                .map(|(i, &hv)| if hv > 0.0 { (0..n).map(|j| g[j] * w[i * n + j]).sum() } else { 0.0 })
                .collect()
        };
        let g2 = back(&g3, &self.w3, &h2, 4);
        let g1 = back(&g2, &self.w2, &h1, 64);
        let step = |w: &mut [f32], b: &mut [f32], input: &[f32], g: &[f32]| {
            let n = g.len();
            for (i, &iv) in input.iter().enumerate() {
                for (wv, gv) in w[i * n..(i + 1) * n].iter_mut().zip(g) {
                    *wv -= lr * iv * gv;
                }
            }
            b.iter_mut().zip(g).for_each(|(bv, gv)| *bv -= lr * gv);
        };
        step(&mut self.w3, &mut self.b3, &h2, &g3);
        step(&mut self.w2, &mut self.b2, &h1, &g2);
        step(&mut self.w1, &mut self.b1, x, &g1);
        loss
    }
}

/// Reads an initializer of an ONNX file through tract (so the floor uses the same numbers).
fn initializer(model: &InferenceModel, name: &str) -> Vec<f32> {
    let node = model.node_by_name(name).unwrap_or_else(|_| panic!("initializer {name}"));
    let konst = node.op_as::<tract_onnx::tract_hir::ops::konst::Const>().expect("a constant");
    konst.val().to_plain_array_view::<f32>().unwrap().iter().copied().collect()
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols).flat_map(|c| (0..rows).map(move |r| (r, c))).map(|(r, c)| w[r * cols + c]).collect()
}

type Plan = std::sync::Arc<TypedRunnableModel>;

fn tract_plan(name: &str, inputs: usize) -> Plan {
    tract_onnx::onnx()
        .model_for_path(examples().join(format!("{name}.onnx")))
        .unwrap()
        .with_input_fact(0, f32::fact([1, inputs]).into())
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap()
}

fn tract_run(plan: &Plan, x: &[f32]) -> Vec<f32> {
    let input = Tensor::from_shape(&[1, x.len()], x).unwrap();
    let out = plan.run(tvec!(input.into())).unwrap();
    out[0].to_plain_array_view::<f32>().unwrap().iter().copied().collect()
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 + 1e-5 * y.abs())
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::new(dir.path().join("home"));
    home.keygen().unwrap();
    let runtime = Runtime::open(&home, RuntimeOptions { policy: Policy::permissive_default() }).unwrap();
    // "mlp-canonical": the same muscle without the nan-blind declaration, so the engine
    // canonicalises the NaN of every float instruction (what undeclared wasm gets).
    for (name, file) in [
        ("feanor", "feanor.py"),
        ("mlp", "mlp.py"),
        ("feanor-onnx", "feanor.onnx"),
        ("mlp-onnx", "mlp.onnx"),
        ("mlp-canonical", "mlp.py"),
    ] {
        let module = referee_compiler::compile_path(&examples().join(file)).unwrap();
        let mut spec = MuscleSpec::new(name, &module.input_shape.unwrap(), &module.output_shape.unwrap());
        spec.declare_nan_blind(module.nan_blind && name != "mlp-canonical");
        runtime.load(&home.seal_for_self(&spec, &module.bytes).unwrap()).unwrap();
    }
    let onnx = |name: &str| tract_onnx::onnx().model_for_path(examples().join(format!("{name}.onnx"))).unwrap();
    let (feanor_model, mlp_model) = (onnx("feanor"), onnx("mlp"));
    let (fw, fb) = (initializer(&feanor_model, "W"), initializer(&feanor_model, "B"));
    let mut mlp = Mlp {
        w1: transpose(&initializer(&mlp_model, "W1t"), 64, 16),
        b1: initializer(&mlp_model, "B1"),
        w2: initializer(&mlp_model, "W2"),
        b2: initializer(&mlp_model, "B2"),
        w3: initializer(&mlp_model, "W3"),
        b3: initializer(&mlp_model, "B3"),
    };
    let (feanor_plan, mlp_plan) = (tract_plan("feanor", 4), tract_plan("mlp", 16));
    let x4 = [1.0f32, 2.0, 3.0, 4.0];
    let x16: Vec<f32> = (0..16).map(|i| i as f32 / 16.0 - 0.5).collect();
    let y4 = [0.0f32, 0.0, 1.0, 0.0];

    // Same network everywhere: check before timing anything.
    let reference = mlp.forward(&x16);
    for (who, got) in [
        ("muscle (.py)", runtime.invoke("mlp", &x16).unwrap()),
        ("muscle (.onnx)", runtime.invoke("mlp-onnx", &x16).unwrap()),
        ("tract", tract_run(&mlp_plan, &x16)),
    ] {
        assert!(close(&got, &reference), "{who} computes {got:?}, the Rust floor {reference:?}");
    }
    let feanor_ref = dense(&x4, &fw, &fb, 1, true);
    assert!(close(&runtime.invoke("feanor", &x4).unwrap(), &feanor_ref));
    assert!(close(&tract_run(&feanor_plan, &x4), &feanor_ref));

    let mut g = c.benchmark_group("forward");
    g.bench_function("feanor/muscle-py", |b| b.iter(|| runtime.invoke("feanor", black_box(&x4)).unwrap()));
    g.bench_function("feanor/muscle-onnx", |b| b.iter(|| runtime.invoke("feanor-onnx", black_box(&x4)).unwrap()));
    g.bench_function("feanor/native", |b| b.iter(|| dense(black_box(&x4), &fw, &fb, 1, true)));
    g.bench_function("feanor/tract", |b| b.iter(|| tract_run(&feanor_plan, black_box(&x4))));
    g.bench_function("mlp/muscle-py", |b| b.iter(|| runtime.invoke("mlp", black_box(&x16)).unwrap()));
    g.bench_function("mlp/muscle-onnx", |b| b.iter(|| runtime.invoke("mlp-onnx", black_box(&x16)).unwrap()));
    g.bench_function("mlp/muscle-canonical", |b| {
        b.iter(|| runtime.invoke("mlp-canonical", black_box(&x16)).unwrap())
    });
    g.bench_function("mlp/native", |b| b.iter(|| mlp.forward(black_box(&x16))));
    g.bench_function("mlp/tract", |b| b.iter(|| tract_run(&mlp_plan, black_box(&x16))));
    g.finish();
    // lr = 0 keeps the weights (and so every iteration's work) identical.
    let mut g = c.benchmark_group("train");
    g.bench_function("mlp/muscle-py", |b| b.iter(|| runtime.train("mlp", black_box(&x16), &y4, 0.0).unwrap()));
    g.bench_function("mlp/muscle-canonical", |b| {
        b.iter(|| runtime.train("mlp-canonical", black_box(&x16), &y4, 0.0).unwrap())
    });
    g.bench_function("mlp/native", |b| b.iter(|| mlp.train(black_box(&x16), &y4, 0.0)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
