//! Invoke latency of a small muscle through the full API, beside the same computation in
//! native Rust, and cell instantiation from the pool.
//! Run: `cargo bench -p referee-runtime --bench invoke`
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing, missing_docs)] // benchmark setup, not reachable from input

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use referee_muscle::MuscleSpec;
use referee_runtime::{Runtime, RuntimeOptions};
use referee_trust::Home;

const FEANOR: &str = include_str!("../../../examples/feanor.wat");

fn feanor_native(x: &[f32; 4]) -> f32 {
    (x[0] * 0.5 + x[1] * -0.25 + (x[2] * 0.125 + (x[3] * 1.0 + 0.1))).max(0.0)
}

fn setup() -> (tempfile::TempDir, Runtime) {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = Home::new(dir.path());
    home.keygen().expect("keygen");
    let module = referee_compiler::compile(referee_compiler::SourceKind::Wat, FEANOR.as_bytes()).expect("feanor.wat");
    let spec = MuscleSpec::new("feanor", &[1, 4], &[1, 1]);
    let blob = home.seal_for_self(&spec, &module.bytes).unwrap();
    let runtime = Runtime::open(&home, RuntimeOptions::default()).expect("runtime");
    runtime.load(&blob).expect("load");
    (dir, runtime)
}

fn invoke(c: &mut Criterion) {
    let (_dir, runtime) = setup();
    let x = [1.0f32, 2.0, 3.0, 4.0];
    let mut group = c.benchmark_group("feanor");
    group.bench_function("native_rust", |b| b.iter(|| feanor_native(black_box(&x))));
    group.bench_function("runtime_invoke", |b| b.iter(|| runtime.invoke("feanor", black_box(&x)).unwrap()));
    let handle = runtime.handle("feanor").unwrap();
    let mut out = [0.0f32; 1];
    group.bench_function("runtime_invoke_into_handle", |b| {
        b.iter(|| runtime.invoke_into(&handle, black_box(&x), &mut out).unwrap())
    });
    // The floor: the same module called through a bare wasmtime TypedFunc (no pool, no
    // limits, no bounds checks), to separate wasmtime's entry cost from the runtime's own.
    let engine = wasmtime::Engine::default();
    let wasm = referee_compiler::compile(referee_compiler::SourceKind::Wat, FEANOR.as_bytes()).unwrap().bytes;
    let module = wasmtime::Module::new(&engine, &wasm).unwrap();
    let mut store = wasmtime::Store::new(&engine, ());
    let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
    let memory = instance.get_memory(&mut store, "memory").unwrap();
    let forward = instance.get_typed_func::<(i32, i32), i32>(&mut store, "forward").unwrap();
    group.bench_function("bare_wasmtime_call", |b| {
        b.iter(|| {
            for (i, v) in x.iter().enumerate() {
                memory.data_mut(&mut store)[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
            }
            forward.call(&mut store, (0, 16)).unwrap();
            let y = &memory.data(&store)[16..20];
            black_box(f32::from_le_bytes([y[0], y[1], y[2], y[3]]))
        })
    });
    group.bench_function("instantiate_cell", |b| b.iter(|| runtime.instantiate_cell("feanor").unwrap()));
    group.finish();
}

criterion_group!(benches, invoke);
criterion_main!(benches);
