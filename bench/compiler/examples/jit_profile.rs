//! Profiles the code the muscle compiler generates, without the runtime around it: compiles a
//! model, runs `forward` in a bare wasmtime instance (same Cranelift settings as the runtime's
//! engines, optionally with its epoch checks and NaN canonicalisation) and writes a perf jitdump
//! so `perf annotate` can show the machine code.
//!
//! ```sh
//! cargo build --release --example jit_profile
//! perf record -k 1 -o perf.data target/release/examples/jit_profile ../../examples/mlp.onnx
//! perf inject --jit -i perf.data -o perf.jit.data
//! perf annotate -i perf.jit.data --stdio -s 'wasm[0]::function[6]'
//! ```
//!
//! Arguments: `MODEL [--train] [--canonical-nans] [--no-epoch] [--iterations N]` (`--train`
//! runs `train` with a zero learning rate instead of `forward`). Prints ns per call.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs, reason = "profiling tool")]

use std::path::Path;
use std::time::Instant;

use wasmtime::{Config, Engine, Instance, Module, OptLevel, ProfilingStrategy, Store};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args.first().expect("usage: jit_profile MODEL [--canonical-nans] [--no-epoch] [--iterations N]");
    let flag = |name: &str| args.iter().any(|a| a == name);
    let iterations: u64 = args
        .iter()
        .position(|a| a == "--iterations")
        .and_then(|i| args.get(i + 1))
        .map_or(2_000_000, |n| n.parse().expect("--iterations takes a number"));
    let epoch = !flag("--no-epoch");

    let compiled = referee_compiler::compile_path(Path::new(model)).expect("compile");
    let mut config = Config::new();
    config
        .cranelift_opt_level(OptLevel::Speed)
        .cranelift_nan_canonicalization(flag("--canonical-nans"))
        .epoch_interruption(epoch)
        .profiler(ProfilingStrategy::JitDump);
    let engine = Engine::new(&config).expect("engine");
    let module = Module::new(&engine, &compiled.bytes).expect("module");
    let mut store = Store::new(&engine, ());
    store.set_epoch_deadline(u64::MAX / 2);
    let instance = Instance::new(&mut store, &module, &[]).expect("instance");
    let pointer = |store: &mut Store<()>, name: &str| {
        instance.get_typed_func::<(), i32>(&mut *store, name).expect(name).call(&mut *store, ()).expect(name)
    };
    let (input, output) = (pointer(&mut store, "input_ptr"), pointer(&mut store, "output_ptr"));
    let start = if flag("--train") {
        let target = pointer(&mut store, "target_ptr");
        let train = instance.get_typed_func::<(i32, i32, f32), f32>(&mut store, "train").expect("train");
        let start = Instant::now();
        for _ in 0..iterations {
            train.call(&mut store, (input, target, 0.0)).expect("train");
        }
        start
    } else {
        let forward = instance.get_typed_func::<(i32, i32), i32>(&mut store, "forward").expect("forward");
        let start = Instant::now();
        for _ in 0..iterations {
            forward.call(&mut store, (input, output)).expect("forward");
        }
        start
    };
    println!("{:.1} ns/call", start.elapsed().as_nanos() as f64 / iterations as f64);
}
