//! `referee bench`: the runtime's costs on this machine, beside native Rust.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use referee_muscle::MuscleSpec;
use referee_runtime::{Priority, Runtime, RuntimeOptions, Scheduler, SchedulerConfig};
use referee_trust::Home;
use serde_json::json;

const FEANOR: &str = include_str!("../../../../examples/feanor.wat");

/// The same computation as examples/feanor.wat, in Rust.
fn feanor_native(x: &[f32; 4]) -> f32 {
    (x[0] * 0.5 + x[1] * -0.25 + (x[2] * 0.125 + (x[3] * 1.0 + 0.1))).max(0.0)
}

/// Feanor plus a data segment, so the sealed muscle is about `size` bytes.
fn padded_feanor(size: usize) -> String {
    let pad: String = (0..size).map(|i| format!("\\{:02x}", (i * 7 % 251) as u8)).collect();
    FEANOR.replacen(
        "(memory (export \"memory\") 1)",
        &format!("(memory (export \"memory\") 1) (data (i32.const 1024) \"{pad}\")"),
        1,
    )
}

fn sealed(home: &Home, name: &str, wat: &str) -> Result<Vec<u8>> {
    let module = referee_compiler::compile(referee_compiler::SourceKind::Wat, wat.as_bytes())?;
    let spec = MuscleSpec::new(name, &[1, 4], &[1, 1]);
    Ok(home.seal_for_self(&spec, &module.bytes)?)
}

/// Mean nanoseconds per iteration of `f` over `n` iterations.
fn per_call(n: u64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    for _ in 0..n {
        f()?;
    }
    Ok(start.elapsed().as_nanos() as f64 / n.max(1) as f64)
}

fn throughput(threads: usize, duration: Duration, call: impl Fn() -> Result<()> + Sync) -> Result<f64> {
    let deadline = Instant::now() + duration;
    let total: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<u64> {
                    let mut n = 0;
                    while Instant::now() < deadline {
                        call()?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("bench thread panicked"))?)
            .sum::<Result<u64>>()
    })?;
    Ok(total as f64 / duration.as_secs_f64())
}

pub(crate) fn bench(calls: u64, json_out: bool) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("referee-bench-{}", std::process::id()));
    let home = Home::new(&dir);
    let result = run(&home, calls, json_out);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(home: &Home, calls: u64, json_out: bool) -> Result<()> {
    home.keygen().context("bench home")?;
    let runtime = Arc::new(Runtime::open(home, RuntimeOptions::default())?);
    let small = sealed(home, "feanor", FEANOR)?;
    let ten_kb = sealed(home, "feanor-10k", &padded_feanor(10 * 1024))?;
    runtime.load(&small)?;

    let x = [1.0f32, 2.0, 3.0, 4.0];
    let native = per_call(calls, || {
        black_box(feanor_native(black_box(&x)));
        Ok(())
    })?;
    let invoke = per_call(calls, || {
        black_box(runtime.invoke("feanor", black_box(&x))?);
        Ok(())
    })?;
    let cold = per_call(20, || {
        runtime.forget_compiled();
        runtime.load(&ten_kb)?;
        Ok(())
    })?;
    let warm = per_call(200, || {
        runtime.load(&ten_kb)?;
        Ok(())
    })?;
    let instantiate = per_call(2000, || Ok(runtime.instantiate_cell("feanor")?))?;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let direct = throughput(cores, Duration::from_secs(1), || Ok(runtime.invoke("feanor", &x).map(drop)?))?;
    let scheduler = Scheduler::new(runtime.clone(), SchedulerConfig { workers: cores, queue_per_muscle: 1024 })?;
    let scheduled = throughput(cores, Duration::from_secs(1), || {
        Ok(scheduler.invoke("feanor", Priority::Normal, x.to_vec()).map(drop)?)
    })?;

    let ns = |d: f64| d;
    let value = json!({
        "calls": calls,
        "cores": cores,
        "native_ns": ns(native),
        "invoke_ns": ns(invoke),
        "invoke_overhead_ns": ns(invoke) - ns(native),
        "invoke_ratio": ns(invoke) / ns(native).max(0.01),
        "sealed_10k_bytes": ten_kb.len(),
        "cold_load_us": ns(cold) / 1e3,
        "warm_load_us": ns(warm) / 1e3,
        "instantiate_us": ns(instantiate) / 1e3,
        "throughput_direct_per_s": direct,
        "throughput_scheduler_per_s": scheduled,
    });
    super::print(json_out, &value, || {
        [
            format!("{:<44} {:>14}", "measurement", "result"),
            format!("{:<44} {:>11.1} ns", "native Rust feanor (baseline)", ns(native)),
            format!("{:<44} {:>11.1} ns", "Runtime::invoke feanor (full API)", ns(invoke)),
            format!("{:<44} {:>11.1} ns", "  overhead over native", ns(invoke) - ns(native)),
            format!("{:<44} {:>13.1}x", "  ratio to native", ns(invoke) / ns(native).max(0.01)),
            format!(
                "{:<44} {:>11.1} µs",
                format!("cold load, {} B muscle (verify+decrypt+compile)", ten_kb.len()),
                ns(cold) / 1e3
            ),
            format!("{:<44} {:>11.1} µs", "warm load (compiled code cached)", ns(warm) / 1e3),
            format!("{:<44} {:>11.1} µs", "instantiate a cell from the pool", ns(instantiate) / 1e3),
            format!("{:<44} {:>10.0} /s", format!("throughput, {cores} threads, direct"), direct),
            format!("{:<44} {:>10.0} /s", format!("throughput, {cores} workers, scheduler"), scheduled),
        ]
        .join("\n")
    });
    Ok(())
}
