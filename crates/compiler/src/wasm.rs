//! The WebAssembly backend: IR → a module following `docs/muscle-abi.md` (ABI v1).
//!
//! Memory layout (every region 16-byte aligned): input | target | output | state (trainable
//! parameters, contiguous) | folded constants | one scratch buffer per live intermediate.
//! Constants and initial parameters are active data segments. Element-wise kernels loop over
//! the innermost axis with `f32x4` (operands either contiguous or splatted), matrix products
//! vectorise across four output columns at a time (`f32x4.splat(a[i,p]) * b[p, j..j+4]`),
//! `np.maximum(x, c)` with a constant is `f32x4.pmax`. `exp`, `log` and `tanh` are emitted
//! functions that compute in f64 and round once to f32 (see `docs/python-subset.md`).

#![allow(clippy::indexing_slicing, reason = "node ids and axes are validated by the IR builders")]

use wasm_encoder::{
    BlockType, CodeSection, ConstExpr, DataSection, ExportKind, ExportSection, Function, FunctionSection,
    Instruction as I, MemArg, MemorySection, MemoryType, Module, TypeSection, ValType,
};

use crate::CompileError;
use crate::ir::{Binary, Graph, Model, NodeId, Op, Reduce, Unary, numel, reduce_dims};

/// Largest linear memory a compiled model may need (the runtime caps cells at 256 MiB).
const MAX_MEMORY: u64 = 256 << 20;

const F_EXP64: u32 = 0;
const F_EXP32: u32 = 1;
const F_LOG32: u32 = 2;
const F_TANH32: u32 = 3;

// Locals of `forward`/`train` after their parameters.
const I0: u32 = 0;
const I1: u32 = 1;
const I2: u32 = 2;
const J: u32 = 3;
const P: u32 = 4;
const PA: u32 = 5;
const PB: u32 = 6;
const PO: u32 = 7;
const ACC: u32 = 8;
const VACC: u32 = 9;
/// Four vector accumulators (`VACC + 1 ..= VACC + 4`) and a splat register for blocked matmul.
const VBLOCK: u32 = 10;
const VSPLAT: u32 = 14;

/// Matrix products with an inner dimension up to this are fully unrolled.
const UNROLL_K: usize = 64;

/// In an unrolled product, the running sums are stored every this many steps (and overwritten
/// by the final store). Cranelift keeps loads in program order but places pure arithmetic at
/// its first side-effecting use, so without these stores every load of the whole unrolled
/// sequence would run before the first multiply and the loaded values would spill to the stack.
const FLUSH_EVERY: u64 = 2;

/// One step `p` of a matrix product's inner loop: constant byte offsets when unrolled
/// (`a_offset` is `None` inside a loop, where `P` indexes `a` and `PB` has advanced).
#[derive(Clone, Copy)]
struct KStep {
    a_offset: Option<u64>,
    b_offset: u64,
    /// Store the running sums after this step (see [`FLUSH_EVERY`]).
    flush: bool,
}

/// Sizes the lead prints in the summary.
pub(crate) struct Emitted {
    pub(crate) bytes: Vec<u8>,
}

fn mem(offset: u64, align: u32) -> MemArg {
    MemArg { offset, align, memory_index: 0 }
}

fn i32c(v: u64) -> Result<i32, CompileError> {
    i32::try_from(v).map_err(|_| CompileError::TooLarge(format!("offset {v} does not fit a 32-bit memory")))
}

struct Layout {
    loc: Vec<u64>,
    input: u64,
    target: u64,
    output: u64,
    state: u64,
    state_len: u64,
    /// 64 bytes that kernels store running sums into (see [`FLUSH_EVERY`]); nothing reads them.
    scratch: u64,
    total: u64,
}

fn align16(v: u64) -> u64 {
    v.div_ceil(16) * 16
}

fn bytes_of(g: &Graph, id: NodeId) -> u64 {
    numel(g.shape(id)) as u64 * 4
}

fn plan(model: &Model, live: &[bool], data: &mut DataSection) -> Result<Layout, CompileError> {
    let g = &model.graph;
    let mut at = 16u64;
    let mut take = |len: u64| {
        let here = at;
        at = align16(at + len.max(4));
        here
    };
    let input = take(bytes_of(g, model.input));
    let target = model.training.as_ref().map_or(0, |t| take(bytes_of(g, t.target)));
    let output = take(bytes_of(g, model.output));
    let scratch = take(64);
    let mut loc = vec![0u64; g.nodes.len()];
    let state = take(0);
    let mut state_end = state;
    if model.training.is_some() {
        for p in &g.params {
            loc[p.node] = state_end;
            let bytes: Vec<u8> = p.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            data.active(0, &ConstExpr::i32_const(i32c(state_end)?), bytes);
            state_end = align16(state_end + bytes_of(g, p.node).max(4));
        }
    }
    let state_len = state_end - state;
    let mut at2 = state_end.max(align16(state + 4));
    for (id, node) in g.nodes.iter().enumerate() {
        if !live[id] {
            continue;
        }
        loc[id] = match &node.op {
            Op::Input => input,
            Op::Target => target,
            Op::Param(_) => loc[id],
            Op::Reshape(a) => loc[*a],
            Op::Const(values) => {
                let here = at2;
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                data.active(0, &ConstExpr::i32_const(i32c(here)?), bytes);
                at2 = align16(at2 + bytes_of(g, id).max(4));
                here
            }
            _ => {
                let here = at2;
                at2 = align16(at2 + bytes_of(g, id).max(4));
                here
            }
        };
    }
    if at2 > MAX_MEMORY {
        return Err(CompileError::TooLarge(format!(
            "the model needs {at2} bytes of memory; the limit is {MAX_MEMORY}"
        )));
    }
    Ok(Layout { loc, input, target, output, state, state_len, scratch, total: at2 })
}

/// Emits the module.
/// `progress(done, total)` is called after each node's code is emitted.
pub(crate) fn emit(model: &Model, progress: &dyn Fn(u64, u64)) -> Result<Emitted, CompileError> {
    let g = &model.graph;
    let roots = model.roots();
    let mut live = vec![false; g.nodes.len()];
    for id in g.live(&roots) {
        live[id] = true;
    }
    let mut data = DataSection::new();
    let layout = plan(model, &live, &mut data)?;

    let mut types = TypeSection::new();
    types.ty().function([], [ValType::I32]); // 0: () -> i32
    types.ty().function([ValType::I32, ValType::I32], [ValType::I32]); // 1: forward
    types.ty().function([ValType::I32, ValType::I32, ValType::F32], [ValType::F32]); // 2: train
    types.ty().function([ValType::F32], [ValType::F32]); // 3: f32 -> f32
    types.ty().function([ValType::F64], [ValType::F64]); // 4: f64 -> f64

    let mut funcs = FunctionSection::new();
    let mut code = CodeSection::new();
    let mut exports = ExportSection::new();
    let mut index = 0u32;
    let mut add = |funcs: &mut FunctionSection, code: &mut CodeSection, ty: u32, f: Function| {
        funcs.function(ty);
        code.function(&f);
        index += 1;
        index - 1
    };
    add(&mut funcs, &mut code, 4, exp64());
    add(&mut funcs, &mut code, 3, exp32());
    add(&mut funcs, &mut code, 3, log32());
    add(&mut funcs, &mut code, 3, tanh32());
    let konst = |v: u64| -> Result<Function, CompileError> {
        let mut f = Function::new([]);
        f.instruction(&I::I32Const(i32c(v)?));
        f.instruction(&I::End);
        Ok(f)
    };
    let i = add(&mut funcs, &mut code, 0, konst(layout.input)?);
    exports.export("input_ptr", ExportKind::Func, i);
    let i = add(&mut funcs, &mut code, 0, konst(layout.output)?);
    exports.export("output_ptr", ExportKind::Func, i);

    // forward(in, out)
    let out_len = bytes_of(g, model.output);
    let mut e = Emitter::new(g, &layout, 2);
    e.copy(e.param(0), layout.input, bytes_of(g, model.input), true)?;
    let fwd_live = g.live(&[model.output]);
    let train_live = match &model.training {
        Some(t) => {
            let mut train_roots = vec![t.loss];
            train_roots.extend(&t.grads);
            g.live(&train_roots)
        }
        None => Vec::new(),
    };
    let total = (fwd_live.len() + train_live.len()) as u64;
    let mut done = 0u64;
    for &id in &fwd_live {
        e.node(id)?;
        done += 1;
        progress(done, total);
    }
    e.copy(e.param(1), layout.loc[model.output], out_len, false)?;
    e.push(I::I32Const(0));
    let i = add(&mut funcs, &mut code, 1, e.finish());
    exports.export("forward", ExportKind::Func, i);

    if let Some(t) = &model.training {
        let i = add(&mut funcs, &mut code, 0, konst(layout.target)?);
        exports.export("target_ptr", ExportKind::Func, i);
        let i = add(&mut funcs, &mut code, 0, konst(layout.state)?);
        exports.export("state_ptr", ExportKind::Func, i);
        let i = add(&mut funcs, &mut code, 0, konst(layout.state_len)?);
        exports.export("state_len", ExportKind::Func, i);
        let mut e = Emitter::new(g, &layout, 3);
        e.copy(e.param(0), layout.input, bytes_of(g, model.input), true)?;
        e.copy(e.param(1), layout.target, bytes_of(g, t.target), true)?;
        for &id in &train_live {
            e.node(id)?;
            done += 1;
            progress(done, total);
        }
        for (p, &grad) in g.params.iter().zip(&t.grads) {
            e.sgd(layout.loc[p.node], layout.loc[grad], numel(g.shape(p.node)))?;
        }
        e.push(I::I32Const(i32c(layout.loc[t.loss])?));
        e.push(I::F32Load(mem(0, 2)));
        let i = add(&mut funcs, &mut code, 2, e.finish());
        exports.export("train", ExportKind::Func, i);
    }

    let mut memories = MemorySection::new();
    let pages = layout.total.div_ceil(65536).max(1);
    memories.memory(MemoryType { minimum: pages, maximum: None, memory64: false, shared: false, page_size_log2: None });
    exports.export("memory", ExportKind::Memory, 0);

    let mut module = Module::new();
    module.section(&types);
    module.section(&funcs);
    module.section(&memories);
    module.section(&exports);
    module.section(&code);
    module.section(&data);
    Ok(Emitted { bytes: module.finish() })
}

/// Code emission for one entry point.
struct Emitter<'g> {
    g: &'g Graph,
    layout: &'g Layout,
    params: u32,
    code: Vec<I<'static>>,
}

impl<'g> Emitter<'g> {
    fn new(g: &'g Graph, layout: &'g Layout, params: u32) -> Self {
        Self { g, layout, params, code: Vec::new() }
    }

    fn param(&self, i: u32) -> u32 {
        i
    }

    fn local(&self, l: u32) -> u32 {
        self.params + l
    }

    fn push(&mut self, i: I<'static>) {
        self.code.push(i);
    }

    fn get(&mut self, l: u32) {
        let l = self.local(l);
        self.push(I::LocalGet(l));
    }

    fn set(&mut self, l: u32) {
        let l = self.local(l);
        self.push(I::LocalSet(l));
    }

    fn finish(mut self) -> Function {
        self.push(I::End);
        let mut f = Function::new([(8, ValType::I32), (1, ValType::F32), (6, ValType::V128)]);
        for i in &self.code {
            f.instruction(i);
        }
        f
    }

    /// `memory.copy` between a parameter pointer and a fixed region.
    fn copy(&mut self, param: u32, fixed: u64, len: u64, into_fixed: bool) -> Result<(), CompileError> {
        if into_fixed {
            self.push(I::I32Const(i32c(fixed)?));
            self.push(I::LocalGet(param));
        } else {
            self.push(I::LocalGet(param));
            self.push(I::I32Const(i32c(fixed)?));
        }
        self.push(I::I32Const(i32c(len)?));
        self.push(I::MemoryCopy { src_mem: 0, dst_mem: 0 });
        Ok(())
    }

    /// `for l in 0..n { body }` (nothing for n = 0, no loop for n = 1).
    fn for_range(
        &mut self,
        l: u32,
        n: usize,
        body: &mut dyn FnMut(&mut Self) -> Result<(), CompileError>,
    ) -> Result<(), CompileError> {
        if n == 0 {
            return Ok(());
        }
        self.push(I::I32Const(0));
        self.set(l);
        if n == 1 {
            return body(self);
        }
        self.push(I::Loop(BlockType::Empty));
        body(self)?;
        self.get(l);
        self.push(I::I32Const(1));
        self.push(I::I32Add);
        let ll = self.local(l);
        self.push(I::LocalTee(ll));
        self.push(I::I32Const(i32c(n as u64)?));
        self.push(I::I32LtU);
        self.push(I::BrIf(0));
        self.push(I::End);
        Ok(())
    }

    /// Pushes `base + Σ local_k * scale_k` (scales in bytes).
    fn addr(&mut self, base: u64, terms: &[(u32, u64)]) -> Result<(), CompileError> {
        self.push(I::I32Const(i32c(base)?));
        for &(l, scale) in terms {
            if scale == 0 {
                continue;
            }
            self.get(l);
            if scale != 1 {
                self.push(I::I32Const(i32c(scale)?));
                self.push(I::I32Mul);
            }
            self.push(I::I32Add);
        }
        Ok(())
    }

    fn node(&mut self, id: NodeId) -> Result<(), CompileError> {
        match &self.g.nodes[id].op {
            Op::Input | Op::Target | Op::Param(_) | Op::Const(_) | Op::Reshape(_) => Ok(()),
            Op::Unary(..) | Op::Binary(..) | Op::Transpose(..) => self.map(id),
            Op::MatMul(a, b) => self.matmul(*a, *b, None, id),
            Op::Dense(a, b, bias, relu) => self.matmul(*a, *b, Some((*bias, *relu)), id),
            Op::MatMulBt(a, b) => self.matmul_bt(*a, *b, id),
            Op::Concat(parts, axis) => self.concat(parts, *axis, id),
            Op::Reduce(kind, a, axis) => self.reduce(*kind, *a, *axis, id),
        }
    }

    fn map(&mut self, id: NodeId) -> Result<(), CompileError> {
        let g = self.g;
        let node = &g.nodes[id];
        let views = crate::ir::map_views(g, id);
        let rank = node.shape.len();
        if rank > 4 {
            return Err(CompileError::Unsupported(format!("tensors of rank {rank} (at most 4)")));
        }
        let pad = 4 - rank;
        let mut dims = vec![1usize; pad];
        dims.extend(&node.shape);
        let padded: Vec<(u64, Vec<u64>)> = views
            .iter()
            .map(|(a, st)| {
                let mut s = vec![0u64; pad];
                s.extend(st.iter().map(|&v| v as u64));
                (self.layout.loc[*a], s)
            })
            .collect();
        let kind = match &node.op {
            Op::Unary(u, _) => Kernel::Unary(*u),
            Op::Binary(b, _, y) => {
                let const_rhs = matches!(g.nodes[*y].op, Op::Const(ref d) if d.len() == 1);
                Kernel::Binary(*b, const_rhs)
            }
            _ => Kernel::Unary(Unary::Copy),
        };
        let out = self.layout.loc[id];
        let n = dims[3];
        let vectorise = kind.vectorises() && n >= 4 && padded.iter().all(|(_, s)| s[3] <= 1);
        let (d0, d1, d2) = (dims[0], dims[1], dims[2]);
        let out_st = [(d1 * d2 * n) as u64 * 4, (d2 * n) as u64 * 4, n as u64 * 4];
        self.for_range(I0, d0, &mut |e| {
            e.for_range(I1, d1, &mut |e| {
                e.for_range(I2, d2, &mut |e| {
                    e.addr(out, &[(I0, out_st[0]), (I1, out_st[1]), (I2, out_st[2])])?;
                    e.set(PO);
                    for (k, (base, s)) in padded.iter().enumerate() {
                        e.addr(*base, &[(I0, s[0] * 4), (I1, s[1] * 4), (I2, s[2] * 4)])?;
                        e.set(if k == 0 { PA } else { PB });
                    }
                    let inner: Vec<u64> = padded.iter().map(|(_, s)| s[3]).collect();
                    if vectorise {
                        let chunks = n / 4;
                        e.for_range(J, chunks, &mut |e| {
                            e.addr(0, &[(PO, 1), (J, 16)])?;
                            for (k, s) in inner.iter().enumerate() {
                                let p = if k == 0 { PA } else { PB };
                                if *s == 1 {
                                    e.addr(0, &[(p, 1), (J, 16)])?;
                                    e.push(I::V128Load(mem(0, 2)));
                                } else {
                                    e.get(p);
                                    e.push(I::F32Load(mem(0, 2)));
                                    e.push(I::F32x4Splat);
                                }
                            }
                            kind.vector(e);
                            e.push(I::V128Store(mem(0, 2)));
                            Ok(())
                        })?;
                        for t in chunks * 4..n {
                            e.get(PO);
                            for (k, s) in inner.iter().enumerate() {
                                e.get(if k == 0 { PA } else { PB });
                                e.push(I::F32Load(mem(t as u64 * 4 * s, 2)));
                            }
                            kind.scalar(e);
                            e.push(I::F32Store(mem(t as u64 * 4, 2)));
                        }
                        Ok(())
                    } else {
                        e.for_range(J, n, &mut |e| {
                            e.addr(0, &[(PO, 1), (J, 4)])?;
                            for (k, s) in inner.iter().enumerate() {
                                e.addr(0, &[(if k == 0 { PA } else { PB }, 1), (J, 4 * s)])?;
                                e.push(I::F32Load(mem(0, 2)));
                            }
                            kind.scalar(e);
                            e.push(I::F32Store(mem(0, 2)));
                            Ok(())
                        })
                    }
                })
            })
        })
    }

    /// Emits `body` for every `p` in `0..k` of a matrix product: fully unrolled with constant
    /// load offsets when `k` is small, otherwise a loop that advances `PB` by one row of `b`
    /// (`b_row` bytes) per iteration.
    fn over_k(
        &mut self,
        k: usize,
        b_row: u64,
        body: &mut dyn FnMut(&mut Self, KStep) -> Result<(), CompileError>,
    ) -> Result<(), CompileError> {
        if k <= UNROLL_K {
            let k = k as u64;
            return (0..k).try_for_each(|p| {
                let flush = (p + 1) % FLUSH_EVERY == 0 && p + 1 < k;
                body(self, KStep { a_offset: Some(p * 4), b_offset: p * b_row, flush })
            });
        }
        self.for_range(P, k, &mut |e| {
            body(e, KStep { a_offset: None, b_offset: 0, flush: false })?;
            e.get(PB);
            e.push(I::I32Const(i32c(b_row)?));
            e.push(I::I32Add);
            e.set(PB);
            Ok(())
        })
    }

    /// Pushes `a[i, p]` (row pointer in `PA`).
    fn load_a(&mut self, step: KStep) -> Result<(), CompileError> {
        match step.a_offset {
            Some(offset) => {
                self.get(PA);
                self.push(I::F32Load(mem(offset, 2)));
            }
            None => {
                self.addr(0, &[(PA, 1), (P, 4)])?;
                self.push(I::F32Load(mem(0, 2)));
            }
        }
        Ok(())
    }

    /// `out = a @ b`, or with `epilogue = Some((bias, relu))` the fused `relu?(a @ b + bias)`:
    /// accumulators start from the bias row and ReLU is applied in registers before the store.
    fn matmul(
        &mut self,
        a: NodeId,
        b: NodeId,
        epilogue: Option<(NodeId, bool)>,
        id: NodeId,
    ) -> Result<(), CompileError> {
        let (sa, sb) = (self.g.shape(a), self.g.shape(b));
        let (m, k, n) = (sa[0], sa[1], sb[1]);
        let (la, lb, lo) = (self.layout.loc[a], self.layout.loc[b], self.layout.loc[id]);
        let bias = epilogue.map(|(bias, _)| self.layout.loc[bias]);
        let relu = epilogue.is_some_and(|(_, relu)| relu);
        let (k4, n4) = (k as u64 * 4, n as u64 * 4);
        // Pushes the initial accumulator for output columns at byte offset `col` (+ J * 64).
        let init_vec = |e: &mut Self, col: u64, blocked: bool| -> Result<(), CompileError> {
            match bias {
                Some(lbias) => {
                    e.addr(lbias + col, if blocked { &[(J, 64)] } else { &[] })?;
                    e.push(I::V128Load(mem(0, 2)));
                }
                None => e.push(I::V128Const(0)),
            }
            Ok(())
        };
        let finish_vec = |e: &mut Self| {
            if relu {
                e.push(I::V128Const(0));
                e.push(I::F32x4PMax);
            }
        };
        self.for_range(I0, m, &mut |e| {
            e.addr(la, &[(I0, k4)])?;
            e.set(PA);
            e.addr(lo, &[(I0, n4)])?;
            e.set(PO);
            let chunks = n / 4;
            // Blocks of 16 output columns: one splat of a[i,p] feeds four vector accumulators.
            let blocks = chunks / 4;
            e.for_range(J, blocks, &mut |e| {
                for q in 0..4 {
                    init_vec(e, u64::from(q) * 16, true)?;
                    e.set(VBLOCK + q);
                }
                e.addr(lb, &[(J, 64)])?;
                e.set(PB);
                e.over_k(k, n4, &mut |e, step| {
                    e.load_a(step)?;
                    e.push(I::F32x4Splat);
                    e.set(VSPLAT);
                    for q in 0..4u32 {
                        e.get(VBLOCK + q);
                        e.get(VSPLAT);
                        e.get(PB);
                        e.push(I::V128Load(mem(step.b_offset + u64::from(q) * 16, 2)));
                        e.push(I::F32x4Mul);
                        e.push(I::F32x4Add);
                        e.set(VBLOCK + q);
                    }
                    if step.flush {
                        for q in 0..4u32 {
                            e.addr(0, &[(PO, 1), (J, 64)])?;
                            e.get(VBLOCK + q);
                            e.push(I::V128Store(mem(u64::from(q) * 16, 2)));
                        }
                    }
                    Ok(())
                })?;
                for q in 0..4u32 {
                    e.addr(0, &[(PO, 1), (J, 64)])?;
                    e.get(VBLOCK + q);
                    finish_vec(e);
                    e.push(I::V128Store(mem(u64::from(q) * 16, 2)));
                }
                Ok(())
            })?;
            // Remaining 4-column chunks, one accumulator each.
            for c in blocks * 4..chunks {
                init_vec(e, c as u64 * 16, false)?;
                e.set(VACC);
                e.push(I::I32Const(i32c(lb + c as u64 * 16)?));
                e.set(PB);
                e.over_k(k, n4, &mut |e, step| {
                    e.get(VACC);
                    e.load_a(step)?;
                    e.push(I::F32x4Splat);
                    e.get(PB);
                    e.push(I::V128Load(mem(step.b_offset, 2)));
                    e.push(I::F32x4Mul);
                    e.push(I::F32x4Add);
                    e.set(VACC);
                    if step.flush {
                        e.get(PO);
                        e.get(VACC);
                        e.push(I::V128Store(mem(c as u64 * 16, 2)));
                    }
                    Ok(())
                })?;
                e.get(PO);
                e.get(VACC);
                finish_vec(e);
                e.push(I::V128Store(mem(c as u64 * 16, 2)));
            }
            for t in chunks * 4..n {
                match bias {
                    Some(lbias) => {
                        e.push(I::I32Const(i32c(lbias + t as u64 * 4)?));
                        e.push(I::F32Load(mem(0, 2)));
                    }
                    None => e.push(I::F32Const(0.0f32.into())),
                }
                e.set(ACC);
                e.push(I::I32Const(i32c(lb + t as u64 * 4)?));
                e.set(PB);
                e.over_k(k, n4, &mut |e, step| {
                    e.get(ACC);
                    e.load_a(step)?;
                    e.get(PB);
                    e.push(I::F32Load(mem(step.b_offset, 2)));
                    e.push(I::F32Mul);
                    e.push(I::F32Add);
                    e.set(ACC);
                    if step.flush {
                        e.get(PO);
                        e.get(ACC);
                        e.push(I::F32Store(mem(t as u64 * 4, 2)));
                    }
                    Ok(())
                })?;
                e.get(PO);
                e.get(ACC);
                if relu {
                    e.push(I::F32Const(0.0f32.into()));
                    e.push(I::F32Max);
                }
                e.push(I::F32Store(mem(t as u64 * 4, 2)));
            }
            Ok(())
        })
    }

    /// `out = a @ bᵀ` with `b` stored `[n, k]` (rows of both operands contiguous). Four rows of
    /// `b` at a time: each accumulates a vector of partial sums over `k` in steps of four
    /// (sharing one load of `a`), then a transposing add folds the four vectors into four
    /// adjacent outputs, `(p0 + p2) + (p1 + p3)` per output.
    fn matmul_bt(&mut self, a: NodeId, b: NodeId, id: NodeId) -> Result<(), CompileError> {
        let (m, k, n) = (self.g.shape(a)[0], self.g.shape(a)[1], self.g.shape(b)[0]);
        let (la, lb, lo) = (self.layout.loc[a], self.layout.loc[b], self.layout.loc[id]);
        let (row, scratch) = (k as u64 * 4, self.layout.scratch);
        // Byte lanes of `i8x16.shuffle` picking f32 lanes (0-3 from the first operand, 4-7 from
        // the second).
        let lanes = |l: [u8; 4]| -> [u8; 16] { std::array::from_fn(|i| l[i / 4] * 4 + (i % 4) as u8) };
        // Pushes shuffle(x, l) + shuffle(x, h) of two vector locals.
        let pair_sum = |e: &mut Self, x: u32, y: u32, l: [u8; 4], h: [u8; 4]| {
            for pick in [l, h] {
                e.get(x);
                e.get(y);
                e.push(I::I8x16Shuffle(lanes(pick)));
            }
            e.push(I::F32x4Add);
        };
        self.for_range(I0, m, &mut |e| {
            e.addr(la, &[(I0, row)])?;
            e.set(PA);
            e.addr(lo, &[(I0, n as u64 * 4)])?;
            e.set(PO);
            e.for_range(J, n / 4, &mut |e| {
                for q in 0..4u32 {
                    e.push(I::V128Const(0));
                    e.set(VBLOCK + q);
                }
                e.addr(lb, &[(J, 4 * row)])?;
                e.set(PB);
                // Steps over chunks of four along k: `b_offset` is the chunk's byte offset in
                // both rows when unrolled; in a loop `PB` advances and `P` counts chunks.
                e.over_k(k / 4, 16, &mut |e, step| {
                    match step.a_offset {
                        Some(_) => {
                            e.get(PA);
                            e.push(I::V128Load(mem(step.b_offset, 2)));
                        }
                        None => {
                            e.addr(0, &[(PA, 1), (P, 16)])?;
                            e.push(I::V128Load(mem(0, 2)));
                        }
                    }
                    e.set(VSPLAT);
                    for q in 0..4u32 {
                        e.get(VBLOCK + q);
                        e.get(VSPLAT);
                        e.get(PB);
                        e.push(I::V128Load(mem(step.b_offset + u64::from(q) * row, 2)));
                        e.push(I::F32x4Mul);
                        e.push(I::F32x4Add);
                        e.set(VBLOCK + q);
                    }
                    if step.flush {
                        for q in 0..4u32 {
                            e.push(I::I32Const(i32c(scratch + u64::from(q) * 16)?));
                            e.get(VBLOCK + q);
                            e.push(I::V128Store(mem(0, 2)));
                        }
                    }
                    Ok(())
                })?;
                pair_sum(e, VBLOCK, VBLOCK + 1, [0, 1, 4, 5], [2, 3, 6, 7]);
                e.set(VSPLAT);
                pair_sum(e, VBLOCK + 2, VBLOCK + 3, [0, 1, 4, 5], [2, 3, 6, 7]);
                e.set(VACC);
                e.addr(0, &[(PO, 1), (J, 16)])?;
                pair_sum(e, VSPLAT, VACC, [0, 2, 4, 6], [1, 3, 5, 7]);
                e.push(I::V128Store(mem(0, 2)));
                Ok(())
            })
        })
    }

    /// `out = concat(parts, axis)`: per outer index, one `memory.copy` per part.
    fn concat(&mut self, parts: &[NodeId], axis: usize, id: NodeId) -> Result<(), CompileError> {
        let shape = self.g.shape(id);
        let outer = numel(&shape[..axis]);
        let out_row = numel(&shape[axis..]) as u64 * 4;
        let lo = self.layout.loc[id];
        let mut offset = 0u64;
        for &p in parts {
            let row = numel(&self.g.shape(p)[axis..]) as u64 * 4;
            let lp = self.layout.loc[p];
            self.for_range(I0, outer, &mut |e| {
                e.addr(lo + offset, &[(I0, out_row)])?;
                e.addr(lp, &[(I0, row)])?;
                e.push(I::I32Const(i32c(row)?));
                e.push(I::MemoryCopy { src_mem: 0, dst_mem: 0 });
                Ok(())
            })?;
            offset += row;
        }
        Ok(())
    }

    fn reduce(&mut self, kind: Reduce, a: NodeId, axis: usize, id: NodeId) -> Result<(), CompileError> {
        let (outer, r, inner) = reduce_dims(self.g.shape(a), axis);
        let (la, lo) = (self.layout.loc[a], self.layout.loc[id]);
        let inner4 = inner as u64 * 4;
        self.for_range(I0, outer, &mut |e| {
            e.for_range(I1, inner, &mut |e| {
                let init = if kind == Reduce::Max { f32::NEG_INFINITY } else { 0.0 };
                e.push(I::F32Const(init.into()));
                e.set(ACC);
                e.addr(la, &[(I0, r as u64 * inner4), (I1, 4)])?;
                e.set(PA);
                e.for_range(P, r, &mut |e| {
                    e.get(ACC);
                    e.addr(0, &[(PA, 1), (P, inner4)])?;
                    e.push(I::F32Load(mem(0, 2)));
                    e.push(if kind == Reduce::Max { I::F32Max } else { I::F32Add });
                    e.set(ACC);
                    Ok(())
                })?;
                e.addr(lo, &[(I0, inner4), (I1, 4)])?;
                e.get(ACC);
                if kind == Reduce::Mean {
                    e.push(I::F32Const((1.0 / r as f32).into()));
                    e.push(I::F32Mul);
                }
                e.push(I::F32Store(mem(0, 2)));
                Ok(())
            })
        })
    }

    /// `p -= lr * g` over `n` elements (`lr` is the third parameter of `train`). Stored
    /// parameters are NaN-canonicalised: they outlive the call (snapshots, restores), and the
    /// module may run without per-instruction canonicalisation (`nan-blind`).
    fn sgd(&mut self, p: u64, g: u64, n: usize) -> Result<(), CompileError> {
        // Four vectors per loop iteration (fewer loop and deadline checks), then the rest.
        let chunks = n / 4;
        let update = |e: &mut Self, terms: &[(u32, u64)], offset: u64| -> Result<(), CompileError> {
            e.addr(p, terms)?;
            e.addr(p, terms)?;
            e.push(I::V128Load(mem(offset, 2)));
            e.push(I::LocalGet(2));
            e.push(I::F32x4Splat);
            e.addr(g, terms)?;
            e.push(I::V128Load(mem(offset, 2)));
            e.push(I::F32x4Mul);
            e.push(I::F32x4Sub);
            e.set(VACC);
            e.get(VACC);
            e.push(I::V128Const(CANONICAL_NANS));
            e.get(VACC);
            e.get(VACC);
            e.push(I::F32x4Eq);
            // bitselect(a, b, mask) = (a & mask) | (b & !mask): the value where it equals itself.
            e.push(I::V128Bitselect);
            e.push(I::V128Store(mem(offset, 2)));
            Ok(())
        };
        self.for_range(J, chunks / 4, &mut |e| (0..4).try_for_each(|q| update(e, &[(J, 64)], q * 16)))?;
        for c in chunks / 4 * 4..chunks {
            update(self, &[], c as u64 * 16)?;
        }
        for t in chunks * 4..n {
            let (pt, gt) = (p + t as u64 * 4, g + t as u64 * 4);
            self.push(I::I32Const(i32c(pt)?));
            self.push(I::I32Const(i32c(pt)?));
            self.push(I::F32Load(mem(0, 2)));
            self.push(I::LocalGet(2));
            self.push(I::I32Const(i32c(gt)?));
            self.push(I::F32Load(mem(0, 2)));
            self.push(I::F32Mul);
            self.push(I::F32Sub);
            self.set(ACC);
            self.get(ACC);
            self.push(I::F32Const(f32::NAN.into()));
            self.get(ACC);
            self.get(ACC);
            self.push(I::F32Eq);
            self.push(I::Select);
            self.push(I::F32Store(mem(0, 2)));
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Kernel {
    Unary(Unary),
    /// The op, and whether the right operand is a scalar constant (`pmax`/`pmin` then).
    Binary(Binary, bool),
}

const ONES: i128 = 0x3f80_0000_3f80_0000_3f80_0000_3f80_0000;
/// Four canonical quiet NaNs (`f32::NAN`, the bits wasm engines canonicalise to).
const CANONICAL_NANS: i128 = 0x7fc0_0000_7fc0_0000_7fc0_0000_7fc0_0000;

impl Kernel {
    fn vectorises(self) -> bool {
        !matches!(self, Self::Unary(Unary::Exp | Unary::Log | Unary::Tanh))
    }

    fn scalar(self, e: &mut Emitter<'_>) {
        let flag = |e: &mut Emitter<'_>, cmp: I<'static>| {
            e.push(cmp);
            e.push(I::F32ConvertI32U);
        };
        match self {
            Self::Unary(u) => match u {
                Unary::Neg => e.push(I::F32Neg),
                Unary::Abs => e.push(I::F32Abs),
                Unary::Sqrt => e.push(I::F32Sqrt),
                Unary::Exp => e.push(I::Call(F_EXP32)),
                Unary::Log => e.push(I::Call(F_LOG32)),
                Unary::Tanh => e.push(I::Call(F_TANH32)),
                Unary::Copy => {}
            },
            Self::Binary(b, _) => match b {
                Binary::Add => e.push(I::F32Add),
                Binary::Sub => e.push(I::F32Sub),
                Binary::Mul => e.push(I::F32Mul),
                Binary::Div => e.push(I::F32Div),
                Binary::Max => e.push(I::F32Max),
                Binary::Min => e.push(I::F32Min),
                Binary::Ge => flag(e, I::F32Ge),
                Binary::Gt => flag(e, I::F32Gt),
                Binary::Eq => flag(e, I::F32Eq),
            },
        }
    }

    fn vector(self, e: &mut Emitter<'_>) {
        let flag = |e: &mut Emitter<'_>, cmp: I<'static>| {
            e.push(cmp);
            e.push(I::V128Const(ONES));
            e.push(I::V128And);
        };
        match self {
            Self::Unary(u) => match u {
                Unary::Neg => e.push(I::F32x4Neg),
                Unary::Abs => e.push(I::F32x4Abs),
                Unary::Sqrt => e.push(I::F32x4Sqrt),
                Unary::Copy | Unary::Exp | Unary::Log | Unary::Tanh => {}
            },
            Self::Binary(b, const_rhs) => match b {
                Binary::Add => e.push(I::F32x4Add),
                Binary::Sub => e.push(I::F32x4Sub),
                Binary::Mul => e.push(I::F32x4Mul),
                Binary::Div => e.push(I::F32x4Div),
                // pmax(a, c) = a < c ? c : a keeps a NaN `a`, like np.maximum.
                Binary::Max => e.push(if const_rhs { I::F32x4PMax } else { I::F32x4Max }),
                Binary::Min => e.push(if const_rhs { I::F32x4PMin } else { I::F32x4Min }),
                Binary::Ge => flag(e, I::F32x4Ge),
                Binary::Gt => flag(e, I::F32x4Gt),
                Binary::Eq => flag(e, I::F32x4Eq),
            },
        }
    }
}

fn func(locals: &[(u32, ValType)], body: &[I<'static>]) -> Function {
    let mut f = Function::new(locals.iter().copied());
    for i in body {
        f.instruction(i);
    }
    f.instruction(&I::End);
    f
}

fn f64c(v: f64) -> I<'static> {
    I::F64Const(v.into())
}

/// `exp` on f64 for |x| ≲ 745: x = k·ln2 + r, |r| ≤ ln2/2, degree-12 Taylor for e^r, scaled by 2^k.
fn exp64() -> Function {
    const INV_LN2: f64 = std::f64::consts::LOG2_E;
    const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000); // fdlibm ln2_hi
    const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76); // fdlibm ln2_lo
    let mut b = vec![
        I::LocalGet(0),
        f64c(INV_LN2),
        I::F64Mul,
        I::F64Nearest,
        I::LocalSet(1),
        I::LocalGet(0),
        I::LocalGet(1),
        f64c(LN2_HI),
        I::F64Mul,
        I::F64Sub,
        I::LocalGet(1),
        f64c(LN2_LO),
        I::F64Mul,
        I::F64Sub,
        I::LocalSet(2),
    ];
    let mut fact = [1.0f64; 13];
    for i in 1..13 {
        fact[i] = fact[i - 1] * i as f64;
    }
    b.push(f64c(1.0 / fact[12]));
    for i in (0..12).rev() {
        b.extend([I::LocalGet(2), I::F64Mul, f64c(1.0 / fact[i]), I::F64Add]);
    }
    b.extend([
        I::LocalGet(1),
        I::I64TruncF64S,
        I::I64Const(1023),
        I::I64Add,
        I::I64Const(52),
        I::I64Shl,
        I::F64ReinterpretI64,
        I::F64Mul,
    ]);
    func(&[(2, ValType::F64)], &b)
}

/// `exp` on f32: NaN passes through, the argument is clamped to [-104, 89] (results 0 and +inf
/// in f32 beyond), computed by `exp64` and rounded once.
fn exp32() -> Function {
    func(
        &[],
        &[
            I::Block(BlockType::Empty),
            I::LocalGet(0),
            I::LocalGet(0),
            I::F32Eq,
            I::BrIf(0),
            I::LocalGet(0),
            I::Return,
            I::End,
            I::LocalGet(0),
            I::F64PromoteF32,
            f64c(89.0),
            I::F64Min,
            f64c(-104.0),
            I::F64Max,
            I::Call(F_EXP64),
            I::F32DemoteF64,
        ],
    )
}

/// `log` on f32 via f64: x = m·2^e with m in [√½, √2), ln m = 2·atanh(s), s = (m-1)/(m+1),
/// series to s^19. log(0) = -inf, log(negative or NaN) = NaN, log(inf) = inf.
fn log32() -> Function {
    let mut b = vec![
        I::Block(BlockType::Empty),
        I::LocalGet(0),
        I::F32Const(0.0f32.into()),
        I::F32Gt,
        I::BrIf(0),
        I::LocalGet(0),
        I::F32Const(0.0f32.into()),
        I::F32Eq,
        I::If(BlockType::Result(ValType::F32)),
        I::F32Const(f32::NEG_INFINITY.into()),
        I::Else,
        I::F32Const(f32::NAN.into()),
        I::End,
        I::Return,
        I::End,
        I::Block(BlockType::Empty),
        I::LocalGet(0),
        I::F32Const(f32::INFINITY.into()),
        I::F32Ne,
        I::BrIf(0),
        I::LocalGet(0),
        I::Return,
        I::End,
        I::LocalGet(0),
        I::F64PromoteF32,
        I::I64ReinterpretF64,
        I::LocalSet(2),
        I::LocalGet(2),
        I::I64Const(52),
        I::I64ShrU,
        I::I64Const(1023),
        I::I64Sub,
        I::F64ConvertI64S,
        I::LocalSet(3),
        I::LocalGet(2),
        I::I64Const(0x000F_FFFF_FFFF_FFFF),
        I::I64And,
        I::I64Const(0x3FF0_0000_0000_0000),
        I::I64Or,
        I::F64ReinterpretI64,
        I::LocalSet(1),
        I::LocalGet(1),
        f64c(std::f64::consts::SQRT_2),
        I::F64Gt,
        I::If(BlockType::Empty),
        I::LocalGet(1),
        f64c(0.5),
        I::F64Mul,
        I::LocalSet(1),
        I::LocalGet(3),
        f64c(1.0),
        I::F64Add,
        I::LocalSet(3),
        I::End,
        I::LocalGet(1),
        f64c(1.0),
        I::F64Sub,
        I::LocalGet(1),
        f64c(1.0),
        I::F64Add,
        I::F64Div,
        I::LocalSet(4),
        I::LocalGet(4),
        I::LocalGet(4),
        I::F64Mul,
        I::LocalSet(5),
        f64c(1.0 / 19.0),
    ];
    for k in (0..9).rev() {
        b.extend([I::LocalGet(5), I::F64Mul, f64c(1.0 / (2 * k + 1) as f64), I::F64Add]);
    }
    b.extend([
        I::LocalGet(4),
        I::F64Mul,
        f64c(2.0),
        I::F64Mul,
        I::LocalGet(3),
        f64c(std::f64::consts::LN_2),
        I::F64Mul,
        I::F64Add,
        I::F32DemoteF64,
    ]);
    // locals: 1 m (f64), 2 bits (i64), 3 e, 4 s, 5 s² (f64)
    func(&[(1, ValType::F64), (1, ValType::I64), (3, ValType::F64)], &b)
}

/// `tanh` on f32 via f64: sign(x)·(1 - 2/(e^{2|x|} + 1)); ±1 for |x| ≥ 9.5; NaN passes through.
fn tanh32() -> Function {
    func(
        &[(1, ValType::F64)],
        &[
            I::Block(BlockType::Empty),
            I::LocalGet(0),
            I::LocalGet(0),
            I::F32Eq,
            I::BrIf(0),
            I::LocalGet(0),
            I::Return,
            I::End,
            I::LocalGet(0),
            I::F32Abs,
            I::F64PromoteF32,
            I::LocalSet(1),
            I::Block(BlockType::Empty),
            I::LocalGet(1),
            f64c(9.5),
            I::F64Lt,
            I::BrIf(0),
            I::F32Const(1.0f32.into()),
            I::LocalGet(0),
            I::F32Copysign,
            I::Return,
            I::End,
            f64c(1.0),
            f64c(2.0),
            I::LocalGet(1),
            f64c(2.0),
            I::F64Mul,
            I::Call(F_EXP64),
            f64c(1.0),
            I::F64Add,
            I::F64Div,
            I::F64Sub,
            I::F32DemoteF64,
            I::LocalGet(0),
            I::F32Copysign,
        ],
    )
}
