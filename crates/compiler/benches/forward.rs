//! Forward and train latency of the compiled examples as muscles in the real runtime, beside
//! the same networks written in plain Rust (the floor). `cargo bench -p referee-compiler`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs, reason = "benchmark")]

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use referee_muscle::MuscleSpec;
use referee_runtime::{Policy, Runtime, RuntimeOptions};
use referee_trust::Home;

fn dense(x: &[f32], w: &[f32], b: &[f32], n: usize, relu: bool) -> Vec<f32> {
    let mut out = b.to_vec();
    for (p, xv) in x.iter().enumerate() {
        for j in 0..n {
            out[j] += xv * w[p * n + j];
        }
    }
    if relu {
        out.iter_mut().for_each(|v| *v = v.max(0.0));
    }
    out
}

fn weights(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 * 0.618 + seed).fract() - 0.5) * 0.2).collect()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::new(dir.path().join("home"));
    home.keygen().unwrap();
    let runtime = Runtime::open(&home, RuntimeOptions { policy: Policy::permissive_default() }).unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    for name in ["feanor", "mlp"] {
        let module = referee_compiler::compile_path(&examples.join(format!("{name}.py"))).unwrap();
        let spec = MuscleSpec::new(name, &module.input_shape.unwrap(), &module.output_shape.unwrap());
        let blob = home.seal_for_self(&spec, &module.bytes).unwrap();
        runtime.load(&blob).unwrap();
    }
    let x4 = [1.0f32, 2.0, 3.0, 4.0];
    let x16: Vec<f32> = (0..16).map(|i| i as f32 / 16.0 - 0.5).collect();
    let y4 = [0.0f32, 0.0, 1.0, 0.0];
    let (fw, fb) = (vec![0.5f32, -0.25, 0.125, 1.0], vec![0.1f32]);
    let (w1, b1, w2, b2, w3, b3) = (
        weights(16 * 64, 0.1),
        weights(64, 0.2),
        weights(64 * 64, 0.3),
        weights(64, 0.4),
        weights(64 * 4, 0.5),
        weights(4, 0.6),
    );

    let mut g = c.benchmark_group("forward");
    g.bench_function("feanor/muscle", |b| b.iter(|| runtime.invoke("feanor", black_box(&x4)).unwrap()));
    g.bench_function("feanor/native", |b| b.iter(|| dense(black_box(&x4), &fw, &fb, 1, true)));
    g.bench_function("mlp/muscle", |b| b.iter(|| runtime.invoke("mlp", black_box(&x16)).unwrap()));
    g.bench_function("mlp/native", |b| {
        b.iter(|| {
            let h = dense(black_box(&x16), &w1, &b1, 64, true);
            let h = dense(&h, &w2, &b2, 64, true);
            let z = dense(&h, &w3, &b3, 4, false);
            let m = z.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            let e: Vec<f32> = z.iter().map(|v| (v - m).exp()).collect();
            let s: f32 = e.iter().sum();
            e.into_iter().map(|v| v / s).collect::<Vec<f32>>()
        })
    });
    g.finish();
    let mut g = c.benchmark_group("train");
    g.bench_function("mlp/muscle", |b| b.iter(|| runtime.train("mlp", black_box(&x16), &y4, 0.0).unwrap()));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
