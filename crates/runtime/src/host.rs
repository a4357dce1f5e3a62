//! Host capabilities (import module `referee`) and the per-cell state they use.
//!
//! Every pointer a muscle passes is bounds-checked against its own memory; a bad pointer or
//! an abuse (kv quota) aborts the call with a [`Fault::Capability`], never the referee.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sha2::{Digest, Sha256};
use wasmtime::{Caller, Engine, Extern, Linker, ResourceLimiter};

use crate::audit::AuditLog;
use crate::error::{Fault, RuntimeError};
use crate::kv::{Kv, MAX_KEY_LEN, MAX_VALUE_LEN, Namespace, Put};
use crate::policy::Grant;

/// Longest log message kept; longer ones are truncated.
const MAX_LOG_LEN: usize = 1024;
/// Largest `random_fill` request.
const MAX_RANDOM_LEN: usize = 64 * 1024;
/// Log lines kept in memory for readers (`Runtime::logs`).
const LOG_RING: usize = 1024;

/// A line a muscle logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// The muscle.
    pub muscle: String,
    /// The message (lossy UTF-8, at most 1 KiB).
    pub message: String,
}

/// Recent muscle log lines, bounded.
#[derive(Default)]
pub(crate) struct LogRing(Mutex<VecDeque<LogLine>>);

impl LogRing {
    fn push(&self, line: LogLine) {
        if let Ok(mut ring) = self.0.lock() {
            if ring.len() == LOG_RING {
                ring.pop_front();
            }
            ring.push_back(line);
        }
    }

    pub(crate) fn drain(&self) -> Vec<LogLine> {
        self.0.lock().map(|mut r| r.drain(..).collect()).unwrap_or_default()
    }
}

/// What the capabilities of one muscle share across its cells.
pub(crate) struct MuscleContext {
    pub(crate) name: String,
    pub(crate) grant: Grant,
    pub(crate) namespace: Namespace,
    pub(crate) code_hash: [u8; 32],
    pub(crate) kv: Kv,
    pub(crate) audit: AuditLog,
    pub(crate) logs: Arc<LogRing>,
    pub(crate) started: Instant,
}

impl MuscleContext {
    fn audit(&self, kind: &str, detail: serde_json::Value) {
        // The audit log is best effort from inside a call; a failing store must not turn a
        // muscle's log line into a referee failure. Load and fault events are audited by the
        // runtime, which reports store errors.
        let _ = self.audit.append(&json!({ "kind": kind, "muscle": self.name, "detail": detail }));
    }
}

/// The limiter: memory and table growth beyond the grant aborts the call with a fault.
pub(crate) struct CellLimiter {
    memory_max: usize,
}

impl ResourceLimiter for CellLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_max {
            return Err(wasmtime::Error::new(Fault::MemoryLimit));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        if desired > crate::engine::MAX_TABLE_ELEMENTS {
            return Err(wasmtime::Error::new(Fault::TableLimit));
        }
        Ok(true)
    }
}

/// Per-cell state: the store's data.
pub(crate) struct CellState {
    pub(crate) limiter: CellLimiter,
    ctx: Arc<MuscleContext>,
    log_window: Instant,
    log_count: u32,
    log_dropped: u64,
    random_counter: u64,
    clock_calls: u64,
}

impl CellState {
    pub(crate) fn new(ctx: Arc<MuscleContext>) -> Self {
        let memory_max = usize::try_from(ctx.grant.memory_bytes).unwrap_or(usize::MAX);
        Self {
            limiter: CellLimiter { memory_max },
            ctx,
            log_window: Instant::now(),
            log_count: 0,
            log_dropped: 0,
            random_counter: 0,
            clock_calls: 0,
        }
    }
}

fn abort(what: String) -> wasmtime::Error {
    wasmtime::Error::new(Fault::Capability(what))
}

fn memory(caller: &mut Caller<'_, CellState>) -> wasmtime::Result<wasmtime::Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => Err(abort("the muscle exports no `memory`".into())),
    }
}

fn range(ptr: i32, len: i32, max: usize, what: &str) -> wasmtime::Result<std::ops::Range<usize>> {
    let start = u32::try_from(ptr).map_err(|_| abort(format!("{what}: negative pointer")))? as usize;
    let len = u32::try_from(len).map_err(|_| abort(format!("{what}: negative length")))? as usize;
    if len > max {
        return Err(abort(format!("{what}: length {len} exceeds {max}")));
    }
    Ok(start..start + len)
}

fn read(caller: &mut Caller<'_, CellState>, ptr: i32, len: i32, max: usize, what: &str) -> wasmtime::Result<Vec<u8>> {
    let r = range(ptr, len, max, what)?;
    let mem = memory(caller)?;
    mem.data(&caller).get(r).map(<[u8]>::to_vec).ok_or_else(|| abort(format!("{what}: pointer out of bounds")))
}

fn write(caller: &mut Caller<'_, CellState>, ptr: i32, bytes: &[u8], what: &str) -> wasmtime::Result<()> {
    let r = range(ptr, i32::try_from(bytes.len()).unwrap_or(i32::MAX), usize::MAX, what)?;
    let mem = memory(caller)?;
    mem.data_mut(caller)
        .get_mut(r)
        .ok_or_else(|| abort(format!("{what}: pointer out of bounds")))?
        .copy_from_slice(bytes);
    Ok(())
}

fn store_err(e: RuntimeError) -> wasmtime::Error {
    abort(format!("state store failed: {e}"))
}

/// A linker defining exactly the granted capabilities.
pub(crate) fn linker(engine: &Engine, grant: &Grant) -> Result<Linker<CellState>, RuntimeError> {
    let mut linker = Linker::new(engine);
    let granted = |name: &str| grant.capabilities.iter().any(|c| c == name);
    let err = |e: wasmtime::Error| RuntimeError::Compile { muscle: "-".into(), why: e.to_string() };
    if granted("log") {
        linker
            .func_wrap("referee", "log", |mut caller: Caller<'_, CellState>, ptr: i32, len: i32| {
                let clipped = len.min(MAX_LOG_LEN as i32);
                let bytes = read(&mut caller, ptr, clipped, MAX_LOG_LEN, "log")?;
                let state = caller.data_mut();
                if state.log_window.elapsed() >= Duration::from_secs(1) {
                    state.log_window = Instant::now();
                    state.log_count = 0;
                }
                if state.log_count >= state.ctx.grant.log_per_second {
                    state.log_dropped += 1;
                    if state.log_dropped == 1 {
                        state.ctx.audit("log_rate_limited", json!({ "per_second": state.ctx.grant.log_per_second }));
                    }
                    return Ok(());
                }
                state.log_count += 1;
                let line =
                    LogLine { muscle: state.ctx.name.clone(), message: String::from_utf8_lossy(&bytes).into_owned() };
                state.ctx.logs.push(line);
                Ok(())
            })
            .map_err(err)?;
    }
    if granted("clock_now") {
        linker
            .func_wrap("referee", "clock_now", |mut caller: Caller<'_, CellState>| -> i64 {
                let state = caller.data_mut();
                let granularity = state.ctx.grant.clock_granularity_us.max(1) * 1000;
                state.clock_calls += 1;
                let nanos = if state.ctx.grant.deterministic {
                    state.clock_calls * granularity
                } else {
                    let n = u64::try_from(state.ctx.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    n - n % granularity
                };
                i64::try_from(nanos).unwrap_or(i64::MAX)
            })
            .map_err(err)?;
    }
    if granted("random_fill") {
        linker
            .func_wrap("referee", "random_fill", |mut caller: Caller<'_, CellState>, ptr: i32, len: i32| {
                let r = range(ptr, len, MAX_RANDOM_LEN, "random_fill")?;
                let mut buf = vec![0u8; r.len()];
                let state = caller.data_mut();
                if state.ctx.grant.deterministic {
                    // Reproducible stream for deterministic mode; not for secrets.
                    for chunk in buf.chunks_mut(32) {
                        state.random_counter += 1;
                        let block = Sha256::new()
                            .chain_update(b"referee/deterministic-random/v1")
                            .chain_update(state.ctx.code_hash)
                            .chain_update(state.random_counter.to_le_bytes())
                            .finalize();
                        chunk.copy_from_slice(block.get(..chunk.len()).unwrap_or_default());
                    }
                } else {
                    getrandom::fill(&mut buf).map_err(|e| abort(format!("random_fill: OS RNG failed: {e}")))?;
                }
                write(&mut caller, ptr, &buf, "random_fill")?;
                Ok(0i32)
            })
            .map_err(err)?;
    }
    if granted("kv_get") {
        linker
            .func_wrap(
                "referee",
                "kv_get",
                |mut caller: Caller<'_, CellState>, kptr: i32, klen: i32, vptr: i32, vcap: i32| {
                    let key = read(&mut caller, kptr, klen, MAX_KEY_LEN, "kv_get key")?;
                    let ctx = caller.data().ctx.clone();
                    let Some(value) = ctx.kv.get(&ctx.namespace, &key).map_err(store_err)? else {
                        return Ok(-1i32);
                    };
                    let cap = usize::try_from(vcap).unwrap_or(0);
                    if let Some(prefix) = value.get(..value.len().min(cap)) {
                        write(&mut caller, vptr, prefix, "kv_get value")?;
                    }
                    Ok(i32::try_from(value.len()).unwrap_or(i32::MAX))
                },
            )
            .map_err(err)?;
    }
    if granted("kv_put") {
        linker
            .func_wrap(
                "referee",
                "kv_put",
                |mut caller: Caller<'_, CellState>, kptr: i32, klen: i32, vptr: i32, vlen: i32| {
                    if !(1..=MAX_KEY_LEN as i32).contains(&klen) || !(0..=MAX_VALUE_LEN as i32).contains(&vlen) {
                        return Ok(-2i32);
                    }
                    let key = read(&mut caller, kptr, klen, MAX_KEY_LEN, "kv_put key")?;
                    let value = read(&mut caller, vptr, vlen, MAX_VALUE_LEN, "kv_put value")?;
                    let ctx = caller.data().ctx.clone();
                    match ctx.kv.put(&ctx.namespace, &key, &value, ctx.grant.kv_quota_bytes).map_err(store_err)? {
                        Put::Stored => Ok(0),
                        Put::OverQuota { used, quota } => {
                            ctx.audit("kv_quota_exceeded", json!({ "used": used, "quota": quota }));
                            Err(abort(format!("kv quota of {quota} bytes exceeded ({used} bytes used)")))
                        }
                    }
                },
            )
            .map_err(err)?;
    }
    if granted("kv_delete") {
        linker
            .func_wrap("referee", "kv_delete", |mut caller: Caller<'_, CellState>, kptr: i32, klen: i32| {
                let key = read(&mut caller, kptr, klen, MAX_KEY_LEN, "kv_delete key")?;
                let ctx = caller.data().ctx.clone();
                Ok(if ctx.kv.delete(&ctx.namespace, &key).map_err(store_err)? { 0i32 } else { -1 })
            })
            .map_err(err)?;
    }
    Ok(linker)
}
