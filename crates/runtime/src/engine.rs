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

fn config(fuel: bool) -> Config {
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
        .cranelift_nan_canonicalization(true)
        .wasm_simd(true)
        .wasm_relaxed_simd(false)
        .wasm_memory64(false)
        .wasm_multi_memory(false)
        .max_wasm_stack(512 * 1024)
        .epoch_interruption(true)
        .consume_fuel(fuel);
    c
}

/// Two engines: fuel metering costs speed, so only muscles with a fuel budget pay for it.
pub(crate) struct Engines {
    pub(crate) plain: Engine,
    pub(crate) fueled: Engine,
    stop: Arc<AtomicBool>,
    ticker: Option<JoinHandle<()>>,
}

impl Engines {
    pub(crate) fn new() -> Result<Self, RuntimeError> {
        let make = |fuel| {
            Engine::new(&config(fuel)).map_err(|e| RuntimeError::Compile { muscle: "-".into(), why: e.to_string() })
        };
        let plain = make(false)?;
        let fueled = make(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let (plain, fueled, stop) = (plain.clone(), fueled.clone(), stop.clone());
            std::thread::Builder::new()
                .name("referee-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(TICK);
                        plain.increment_epoch();
                        fueled.increment_epoch();
                    }
                })
                .map_err(|e| RuntimeError::Store(format!("cannot start the epoch thread: {e}")))?
        };
        Ok(Self { plain, fueled, stop, ticker: Some(ticker) })
    }

    pub(crate) fn get(&self, fueled: bool) -> &Engine {
        if fueled { &self.fueled } else { &self.plain }
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
