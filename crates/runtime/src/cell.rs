//! A cell: one isolated instance of a muscle, with its ABI v1 entry points resolved.
//!
//! ABI v1 (docs/muscle-abi.md): exports `memory`, `input_ptr() -> i32`, `output_ptr() -> i32`,
//! `forward(in: i32, out: i32) -> i32` (status, 0 = ok); optionally `target_ptr() -> i32`
//! with `train(x: i32, y: i32, lr: f32) -> f32` (loss), and `state_ptr() -> i32` with
//! `state_len() -> i32` for snapshots of a stateful muscle's parameters.

use wasmtime::{InstancePre, Memory, Store, Trap, TypedFunc};

use crate::error::{Fault, RuntimeError};
use crate::host::CellState;

/// Classifies any error from a call into a typed fault.
pub(crate) fn classify(err: &wasmtime::Error) -> Fault {
    if let Some(fault) = err.downcast_ref::<Fault>() {
        return fault.clone();
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::StackOverflow) => Fault::StackOverflow,
        Some(Trap::MemoryOutOfBounds | Trap::TableOutOfBounds | Trap::HeapMisaligned) => Fault::OutOfBounds,
        Some(Trap::IntegerDivisionByZero) => Fault::DivideByZero,
        Some(Trap::IntegerOverflow | Trap::BadConversionToInteger) => Fault::IntegerOverflow,
        Some(Trap::IndirectCallToNull | Trap::BadSignature) => Fault::BadIndirectCall,
        Some(Trap::UnreachableCodeReached) => Fault::Unreachable,
        Some(Trap::Interrupt) => Fault::Deadline,
        Some(Trap::OutOfFuel) => Fault::OutOfFuel,
        _ => Fault::Other(err.to_string()),
    }
}

/// Where a muscle keeps its buffers (byte offsets into its memory).
#[derive(Clone, Copy, Debug)]
struct Layout {
    input: u32,
    output: u32,
    target: Option<u32>,
    state: Option<(u32, u32)>,
}

pub(crate) struct Cell {
    store: Store<CellState>,
    memory: Memory,
    forward: TypedFunc<(i32, i32), i32>,
    train: Option<TypedFunc<(i32, i32, f32), f32>>,
    layout: Layout,
}

fn abi(muscle: &str, why: impl Into<String>) -> RuntimeError {
    RuntimeError::Abi { muscle: muscle.into(), why: why.into() }
}

/// Limits for one call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CallBudget {
    /// Epoch ticks before the deadline trap.
    pub(crate) ticks: u64,
    /// Fuel, when metered.
    pub(crate) fuel: Option<u64>,
}

impl Cell {
    /// Instantiates a fresh cell and resolves the ABI.
    pub(crate) fn new(
        muscle: &str,
        pre: &InstancePre<CellState>,
        state: CellState,
        budget: CallBudget,
    ) -> Result<Self, RuntimeError> {
        let mut store = Store::new(pre.module().engine(), state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        Self::arm(&mut store, budget);
        let instance = pre
            .instantiate(&mut store)
            .map_err(|e| RuntimeError::Fault { muscle: muscle.into(), fault: classify(&e) })?;
        let memory = instance.get_memory(&mut store, "memory").ok_or_else(|| abi(muscle, "no exported `memory`"))?;
        let mut pointer = |name: &str, required: bool| -> Result<Option<u32>, RuntimeError> {
            let Some(func) = instance.get_func(&mut store, name) else {
                return if required { Err(abi(muscle, format!("no exported `{name}`"))) } else { Ok(None) };
            };
            let typed =
                func.typed::<(), i32>(&store).map_err(|_| abi(muscle, format!("`{name}` must be () -> i32")))?;
            let value = typed
                .call(&mut store, ())
                .map_err(|e| RuntimeError::Fault { muscle: muscle.into(), fault: classify(&e) })?;
            u32::try_from(value).map(Some).map_err(|_| abi(muscle, format!("`{name}` returned a negative offset")))
        };
        let input = pointer("input_ptr", true)?.unwrap_or(0);
        let output = pointer("output_ptr", true)?.unwrap_or(0);
        let target = pointer("target_ptr", false)?;
        let state_ptr = pointer("state_ptr", false)?;
        let state_len = pointer("state_len", false)?;
        let forward = instance
            .get_typed_func::<(i32, i32), i32>(&mut store, "forward")
            .map_err(|_| abi(muscle, "`forward` must be exported as (i32, i32) -> i32"))?;
        let train = match instance.get_func(&mut store, "train") {
            None => None,
            Some(f) => Some(
                f.typed::<(i32, i32, f32), f32>(&store)
                    .map_err(|_| abi(muscle, "`train` must be (i32, i32, f32) -> f32"))?,
            ),
        };
        if train.is_some() && target.is_none() {
            return Err(abi(muscle, "a muscle exporting `train` must export `target_ptr`"));
        }
        let state = match (state_ptr, state_len) {
            (Some(p), Some(l)) => Some((p, l)),
            (None, None) => None,
            _ => return Err(abi(muscle, "`state_ptr` and `state_len` come together")),
        };
        Ok(Self { store, memory, forward, train, layout: Layout { input, output, target, state } })
    }

    fn arm(store: &mut Store<CellState>, budget: CallBudget) {
        store.set_epoch_deadline(budget.ticks);
        if let Some(fuel) = budget.fuel {
            // Fuel is only configured on the fueled engine, where this cannot fail.
            let _ = store.set_fuel(fuel);
        }
    }

    pub(crate) fn has_train(&self) -> bool {
        self.train.is_some()
    }

    fn write_f32(&mut self, offset: u32, values: &[f32]) -> Result<(), Fault> {
        let start = offset as usize;
        let bytes = self
            .memory
            .data_mut(&mut self.store)
            .get_mut(start..start + values.len() * 4)
            .ok_or_else(|| Fault::Capability("the muscle's input buffer lies outside its memory".into()))?;
        for (chunk, v) in bytes.chunks_exact_mut(4).zip(values) {
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        Ok(())
    }

    fn read_f32(&self, offset: u32, out: &mut [f32]) -> Result<(), Fault> {
        let start = offset as usize;
        let bytes = self
            .memory
            .data(&self.store)
            .get(start..start + out.len() * 4)
            .ok_or_else(|| Fault::Capability("the muscle's output buffer lies outside its memory".into()))?;
        for (v, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *v = <[u8; 4]>::try_from(c).map_or(f32::NAN, f32::from_le_bytes);
        }
        Ok(())
    }

    /// Runs `forward` on `input`, writing `out.len()` floats into `out`.
    pub(crate) fn forward(&mut self, input: &[f32], out: &mut [f32], budget: CallBudget) -> Result<(), Fault> {
        Self::arm(&mut self.store, budget);
        self.write_f32(self.layout.input, input)?;
        let (i, o) = (self.layout.input as i32, self.layout.output as i32);
        let status = self.forward.call(&mut self.store, (i, o)).map_err(|e| classify(&e))?;
        if status != 0 {
            return Err(Fault::Status(status));
        }
        self.read_f32(self.layout.output, out)
    }

    /// Runs one training step; returns the loss.
    pub(crate) fn train(&mut self, x: &[f32], y: &[f32], lr: f32, budget: CallBudget) -> Result<f32, Fault> {
        let (Some(train), Some(target)) = (self.train.clone(), self.layout.target) else {
            return Err(Fault::Other("no train entry".into()));
        };
        Self::arm(&mut self.store, budget);
        self.write_f32(self.layout.input, x)?;
        self.write_f32(target, y)?;
        train.call(&mut self.store, (self.layout.input as i32, target as i32, lr)).map_err(|e| classify(&e))
    }

    /// Copies the declared state region into `into`, reusing its allocation (left unchanged
    /// when there is no region).
    pub(crate) fn copy_state_into(&self, into: &mut Option<Vec<u8>>) {
        let Some((ptr, len)) = self.layout.state else { return };
        if let Some(region) = self.memory.data(&self.store).get(ptr as usize..ptr as usize + len as usize) {
            let buffer = into.get_or_insert_with(Vec::new);
            buffer.clear();
            buffer.extend_from_slice(region);
        }
    }

    /// Overwrites the declared state region; false if the sizes differ or there is none.
    pub(crate) fn set_state(&mut self, bytes: &[u8]) -> bool {
        let Some((ptr, len)) = self.layout.state else { return false };
        if bytes.len() != len as usize {
            return false;
        }
        match self.memory.data_mut(&mut self.store).get_mut(ptr as usize..ptr as usize + bytes.len()) {
            Some(region) => {
                region.copy_from_slice(bytes);
                true
            }
            None => false,
        }
    }
}
