//! `fs_read` of a small file through the `Tool` trait (reality check, two `openat2`, `fstat`,
//! JSON in and out) against the baseline `std::fs::read` of the same file.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs, reason = "benchmark setup")]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use referee_tools::{CallScope, ToolsConfig, builtin_tools};
use serde_json::json;

fn fs_read(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let file = root.join("small.txt");
    std::fs::write(&file, "x".repeat(1024)).unwrap();
    let config = ToolsConfig { roots: vec![root], ..ToolsConfig::default() };
    let tools = builtin_tools(&config).unwrap();
    let read = tools.iter().find(|t| t.spec().name == "fs_read").unwrap().clone();
    let scope = CallScope::default();

    let mut group = c.benchmark_group("fs_read_1KiB");
    group.bench_function("tool", |b| b.iter(|| black_box(read.call(json!({ "path": "small.txt" }), &scope).unwrap())));
    group.bench_function("std_fs_read", |b| b.iter(|| black_box(std::fs::read(&file).unwrap())));
    group.finish();
}

criterion_group!(benches, fs_read);
criterion_main!(benches);
