//! wasmtime engines and the epoch ticker that enforces per-call deadlines.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig};

use crate::error::RuntimeError;

/// Epoch tick: the granularity of deadlines.
pub(crate) const TICK: Duration = Duration::from_millis(1);
/// Largest linear memory any cell may have, whatever the policy says.
pub const MAX_CELL_MEMORY: u64 = 256 << 20;
/// Largest table any cell may have.
pub(crate) const MAX_TABLE_ELEMENTS: usize = 100_000;
/// Cells (instances) each engine's pool can hold at once.
const POOL_SLOTS: u32 = 128;

/// What distinguishes the engines: compiled code is specific to one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct EngineKind {
    /// Fuel metering (only for muscles with a fuel budget: it costs speed).
    pub(crate) fueled: bool,
    /// NaN canonicalisation after every float instruction (off only for `nan-blind` muscles,
    /// whose outputs are canonicalised at the host boundary instead).
    pub(crate) canonical_nans: bool,
}

fn config(kind: EngineKind) -> Config {
    let mut pool = PoolingAllocationConfig::new();
    pool.total_core_instances(POOL_SLOTS)
        .total_memories(POOL_SLOTS)
        .total_tables(POOL_SLOTS)
        .max_memories_per_module(1)
        .max_tables_per_module(1)
        .max_memory_size(MAX_CELL_MEMORY as usize)
        .table_elements(MAX_TABLE_ELEMENTS);
    let mut c = Config::new();
    c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .memory_init_cow(true)
        .cranelift_opt_level(OptLevel::Speed)
        .cranelift_nan_canonicalization(kind.canonical_nans)
        .wasm_simd(true)
        .wasm_relaxed_simd(false)
        .wasm_memory64(false)
        .wasm_multi_memory(false)
        .max_wasm_stack(512 * 1024)
        .epoch_interruption(true)
        .consume_fuel(kind.fueled);
    c
}

/// One engine per [`EngineKind`]: fuel metering and per-instruction NaN canonicalisation both
/// cost speed, so only the muscles that need them pay for them.
pub(crate) struct Engines {
    /// Indexed `[canonical_nans][fueled]`.
    engines: [[Engine; 2]; 2],
    stop: Arc<AtomicBool>,
    ticker: Option<JoinHandle<()>>,
}

impl Engines {
    pub(crate) fn new() -> Result<Self, RuntimeError> {
        let make = |canonical_nans, fueled| {
            Engine::new(&config(EngineKind { fueled, canonical_nans }))
                .map_err(|e| RuntimeError::Compile { muscle: "-".into(), why: e.to_string() })
        };
        let engines = [[make(false, false)?, make(false, true)?], [make(true, false)?, make(true, true)?]];
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let (engines, stop) = (engines.clone(), stop.clone());
            std::thread::Builder::new()
                .name("referee-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(TICK);
                        engines.iter().flatten().for_each(Engine::increment_epoch);
                    }
                })
                .map_err(|e| RuntimeError::Store(format!("cannot start the epoch thread: {e}")))?
        };
        Ok(Self { engines, stop, ticker: Some(ticker) })
    }

    pub(crate) fn get(&self, kind: EngineKind) -> &Engine {
        let [[blind, blind_fueled], [canonical, canonical_fueled]] = &self.engines;
        match (kind.canonical_nans, kind.fueled) {
            (false, false) => blind,
            (false, true) => blind_fueled,
            (true, false) => canonical,
            (true, true) => canonical_fueled,
        }
    }
}

impl Drop for Engines {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
    }
}
