//! The muscle compiler: source file → validated WebAssembly module (ABI v1, `docs/muscle-abi.md`).
//!
//! - `.wasm` is validated as is, `.wat` is assembled then validated.
//! - `.py` (the NumPy subset of `docs/python-subset.md`) is parsed in Rust (no Python needed),
//!   lowered to a typed f32 tensor IR (shape inference, constant folding, dead-code
//!   elimination), differentiated when the model declares a `LOSS`, and emitted as SIMD
//!   WebAssembly with the weights in data segments: [`compile_path`] or [`compile`].
//! - `.onnx` (default domain, opset 13+; the operators of `docs/onnx.md`) is decoded with
//!   prost, its initializers and shape plumbing folded, and lowered to the same IR.
//!
//! Compilation is deterministic (same source → same bytes) and never panics on bad input:
//! Python errors carry `file:line:column` and name the construct.
//!
//! Validation uses the WebAssembly 2.0 feature set (SIMD included) without threads, relaxed
//! SIMD, memory64 or GC: the deterministic subset the runtime executes.
//!
//! ```
//! let module = referee_compiler::compile(
//!     referee_compiler::SourceKind::Wat,
//!     br#"(module (import "referee" "log" (func (param i32 i32))) (memory (export "memory") 1))"#,
//! )?;
//! assert_eq!(module.capabilities(), vec!["log".to_owned()]);
//! # Ok::<(), referee_compiler::CompileError>(())
//! ```

use std::path::Path;

use wasmparser::{Parser, Payload, TypeRef, Validator, WasmFeatures};

mod grad;
mod ir;
mod npy;
mod onnx;
mod python;
mod wasm;

/// The import module under which host capabilities live.
pub const CAPABILITY_MODULE: &str = "referee";

/// Which frontend reads a source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// A binary WebAssembly module.
    Wasm,
    /// WebAssembly text format.
    Wat,
    /// A NumPy-subset Python model.
    Python,
    /// An ONNX model.
    Onnx,
}

impl SourceKind {
    /// Picks the frontend from a file extension.
    pub fn from_path(path: &Path) -> Result<Self, CompileError> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("wasm") => Ok(Self::Wasm),
            Some("wat") => Ok(Self::Wat),
            Some("py") => Ok(Self::Python),
            Some("onnx") => Ok(Self::Onnx),
            other => Err(CompileError::UnknownExtension(other.unwrap_or("").to_owned())),
        }
    }
}

/// Errors of the compiler frontends.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompileError {
    /// The input's extension names no frontend.
    #[error("cannot tell the input kind from extension {0:?}; use .py, .onnx, .wasm or .wat")]
    UnknownExtension(String),
    /// The WAT text does not assemble.
    #[error("invalid WAT: {0}")]
    Wat(String),
    /// The Python source is outside the supported subset or does not type-check.
    #[error("{file}:{line}:{column}: {message}")]
    Python {
        /// The source file (as given).
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column (in characters).
        column: usize,
        /// What is wrong, naming the construct.
        message: String,
    },
    /// The ONNX model is unreadable, outside the supported operator set, or ill-typed.
    #[error("ONNX {location}: {message}")]
    Onnx {
        /// Where: `file`, `model`, `graph`, `input 'x'`, `initializer 'w'` or `node 3 'fc1' (Gemm)`.
        location: String,
        /// What is wrong.
        message: String,
    },
    /// The source file cannot be read.
    #[error("cannot read {path}: {message}")]
    Io {
        /// The path.
        path: String,
        /// The OS error.
        message: String,
    },
    /// The model exceeds a size limit.
    #[error("model too large: {0}")]
    TooLarge(String),
    /// The model uses something the backend cannot emit.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The module is not valid WebAssembly for the runtime's feature set.
    #[error("invalid WebAssembly: {0}")]
    Invalid(String),
    /// The module imports something other than a host capability function.
    #[error(
        "import `{module}.{name}` is not allowed: muscles may only import functions from module `referee` (host capabilities)"
    )]
    ForeignImport {
        /// Import module.
        module: String,
        /// Import name.
        name: String,
    },
}

/// An import of the module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Import {
    /// Import module.
    pub module: String,
    /// Import name.
    pub name: String,
}

/// A validated WebAssembly module, ready to be sealed.
#[derive(Clone, Debug)]
pub struct WasmModule {
    /// The binary module.
    pub bytes: Vec<u8>,
    /// Its imports, in order.
    pub imports: Vec<Import>,
    /// Its export names, in order.
    pub exports: Vec<String>,
    /// The model's input shape (Python/ONNX models; `None` for raw wasm/wat).
    pub input_shape: Option<Vec<u32>>,
    /// The model's output shape (Python/ONNX models; `None` for raw wasm/wat).
    pub output_shape: Option<Vec<u32>>,
    /// What the compiler built (Python/ONNX models; `None` for raw wasm/wat).
    pub summary: Option<Summary>,
    /// Whether the code provably never lets a NaN's sign or payload bits reach an output, the
    /// loss or the state region: true for compiled models, whose code never reinterprets a
    /// float's bits and canonicalises the parameters `train` stores. Seal it as the header's
    /// `nan-blind` extension so the runtime can skip per-instruction NaN canonicalisation.
    pub nan_blind: bool,
}

/// A compiled model's vital statistics, for `referee compile` to print.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Number of f32 weights (parameters and folded constants the code reads).
    pub parameters: u64,
    /// Number of trainable parameters (the `state_ptr`/`state_len` region); 0 without `LOSS`.
    pub trainable_parameters: u64,
    /// Entry points besides the `*_ptr` functions: `forward`, and `train` when trainable.
    pub entry_points: Vec<String>,
    /// Size of the WebAssembly code in bytes.
    pub code_bytes: u64,
}

impl WasmModule {
    /// The capabilities the module needs: its `referee.*` imports, sorted and unique.
    pub fn capabilities(&self) -> Vec<String> {
        let mut caps: Vec<String> = self.imports.iter().map(|i| i.name.clone()).collect();
        caps.sort();
        caps.dedup();
        caps
    }
}

/// What the compiler is doing, for progress displays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Parsing the source and building the IR (shape inference, constant folding, gradients).
    Lowering,
    /// Fusing and emitting WebAssembly, one IR node at a time.
    Emitting,
    /// Validating the emitted module.
    Validating,
}

/// A progress report: `done` of `total` units of `stage` (IR nodes while emitting; 0 of 1 at the
/// start of the other stages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// The current stage.
    pub stage: Stage,
    /// Units done.
    pub done: u64,
    /// Units in the stage.
    pub total: u64,
}

/// A progress callback; it runs on the compiler's thread.
pub type ProgressFn<'a> = &'a (dyn Fn(Progress) + Sync);

/// The WebAssembly features muscles may use.
pub fn features() -> WasmFeatures {
    WasmFeatures::WASM2
}

/// Runs the frontend for `kind` over `source`.
pub fn compile(kind: SourceKind, source: &[u8]) -> Result<WasmModule, CompileError> {
    compile_source(kind, "<input>", source, None, &|_| {})
}

/// Reads `path`, picks the frontend from its extension and compiles it. Python `np.load("x.npy")`
/// paths are resolved relative to the source file's directory.
pub fn compile_path(path: &Path) -> Result<WasmModule, CompileError> {
    compile_path_with_progress(path, &|_| {})
}

/// [`compile_path`], reporting progress to `progress` (for large models).
pub fn compile_path_with_progress(path: &Path, progress: ProgressFn<'_>) -> Result<WasmModule, CompileError> {
    let kind = SourceKind::from_path(path)?;
    let source = std::fs::read(path)
        .map_err(|e| CompileError::Io { path: path.display().to_string(), message: e.to_string() })?;
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    let base = if base.as_os_str().is_empty() { Path::new(".") } else { base };
    compile_source(kind, &path.display().to_string(), &source, Some(base), progress)
}

fn compile_source(
    kind: SourceKind,
    file: &str,
    source: &[u8],
    base_dir: Option<&Path>,
    progress: ProgressFn<'_>,
) -> Result<WasmModule, CompileError> {
    let bytes = match kind {
        SourceKind::Wasm => source.to_vec(),
        SourceKind::Wat => wat::parse_bytes(source).map_err(|e| CompileError::Wat(e.to_string()))?.into_owned(),
        SourceKind::Python => {
            let text = std::str::from_utf8(source).map_err(|e| CompileError::Python {
                file: file.to_owned(),
                line: 1,
                column: 1,
                message: format!("the source is not UTF-8: {e}"),
            })?;
            return compile_model(|| python::lower(file, text, base_dir), progress);
        }
        SourceKind::Onnx => return compile_model(|| onnx::lower(source), progress),
    };
    progress(Progress { stage: Stage::Validating, done: 0, total: 1 });
    validate(bytes)
}

/// Stack reserved for a frontend's thread.
const COMPILER_STACK: usize = 256 << 20;

/// Lowers a model with `lower`, optimises it, emits it and describes the result.
fn compile_model(
    lower: impl FnOnce() -> Result<ir::Model, CompileError> + Send,
    progress: ProgressFn<'_>,
) -> Result<WasmModule, CompileError> {
    // Frontends recurse over syntax trees: give them a deep stack of their own (reserved, not
    // committed) so a pathological source is an error, never a stack overflow.
    let (model, emitted) = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("referee-compile".to_owned())
            .stack_size(COMPILER_STACK)
            .spawn_scoped(scope, || {
                progress(Progress { stage: Stage::Lowering, done: 0, total: 1 });
                let mut model = lower()?;
                let roots = model.roots();
                model.graph.fuse(&roots);
                let emitted =
                    wasm::emit(&model, &|done, total| progress(Progress { stage: Stage::Emitting, done, total }))?;
                Ok::<_, CompileError>((model, emitted))
            })
            .map_err(|e| CompileError::Unsupported(format!("cannot start the compiler thread: {e}")))?
            .join()
            .map_err(|_| {
                CompileError::Unsupported("internal compiler error (the compiler thread panicked)".to_owned())
            })?
    })?;
    let dims = |s: &[usize]| -> Result<Vec<u32>, CompileError> {
        let mut v = s
            .iter()
            .map(|&d| u32::try_from(d).map_err(|_| CompileError::TooLarge(format!("dimension {d}"))))
            .collect::<Result<Vec<u32>, _>>()?;
        if v.is_empty() {
            v.push(1);
        }
        Ok(v)
    };
    let trainable: u64 = model.graph.params.iter().map(|p| p.data.len() as u64).sum();
    let folded: u64 = model
        .graph
        .live(&[model.output])
        .into_iter()
        .filter_map(|id| match &model.graph.nodes.get(id)?.op {
            ir::Op::Const(d) if d.len() > 1 => Some(d.len() as u64),
            _ => None,
        })
        .sum();
    let code_bytes = emitted.bytes.len() as u64;
    progress(Progress { stage: Stage::Validating, done: 0, total: 1 });
    let mut module = validate(emitted.bytes)?;
    module.input_shape = Some(dims(&model.input_shape)?);
    module.output_shape = Some(dims(&model.output_shape)?);
    let mut entry_points = vec!["forward".to_owned()];
    if model.training.is_some() {
        entry_points.push("train".to_owned());
    }
    module.summary =
        Some(Summary { parameters: trainable + folded, trainable_parameters: trainable, entry_points, code_bytes });
    module.nan_blind = true;
    Ok(module)
}

/// Validates a binary module and lists its imports and exports.
pub fn validate(bytes: Vec<u8>) -> Result<WasmModule, CompileError> {
    Validator::new_with_features(features()).validate_all(&bytes).map_err(|e| CompileError::Invalid(e.to_string()))?;
    let mut imports = Vec::new();
    let mut exports = Vec::new();
    for payload in Parser::new(0).parse_all(&bytes) {
        match payload.map_err(|e| CompileError::Invalid(e.to_string()))? {
            Payload::ImportSection(section) => {
                for import in section.into_imports() {
                    let import = import.map_err(|e| CompileError::Invalid(e.to_string()))?;
                    if import.module != CAPABILITY_MODULE || !matches!(import.ty, TypeRef::Func(_)) {
                        return Err(CompileError::ForeignImport {
                            module: import.module.to_owned(),
                            name: import.name.to_owned(),
                        });
                    }
                    imports.push(Import { module: import.module.to_owned(), name: import.name.to_owned() });
                }
            }
            Payload::ExportSection(section) => {
                for export in section {
                    exports.push(export.map_err(|e| CompileError::Invalid(e.to_string()))?.name.to_owned());
                }
            }
            _ => {}
        }
    }
    Ok(WasmModule { bytes, imports, exports, input_shape: None, output_shape: None, summary: None, nan_blind: false })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wat_assembles_and_lists_imports_and_exports() -> Result<(), CompileError> {
        let m = compile(
            SourceKind::Wat,
            br#"(module
                (import "referee" "log" (func (param i32 i32)))
                (import "referee" "clock_now" (func (result i64)))
                (memory (export "memory") 1)
                (func (export "forward") (param i32 i32) (result i32) i32.const 0))"#,
        )?;
        assert_eq!(m.capabilities(), vec!["clock_now".to_owned(), "log".to_owned()]);
        assert_eq!(m.exports, vec!["memory".to_owned(), "forward".to_owned()]);
        Ok(())
    }

    #[test]
    fn imports_outside_the_capability_module_are_refused() {
        let err = compile(SourceKind::Wat, br#"(module (import "wasi_snapshot_preview1" "fd_write" (func)))"#);
        assert!(
            matches!(err, Err(CompileError::ForeignImport { ref module, .. }) if module == "wasi_snapshot_preview1")
        );
    }

    #[test]
    fn threads_are_outside_the_feature_set() {
        let err = compile(SourceKind::Wat, b"(module (memory 1 1 shared))");
        assert!(matches!(err, Err(CompileError::Invalid(_))), "{err:?}");
    }

    #[test]
    fn garbage_is_invalid_not_a_panic() {
        assert!(matches!(compile(SourceKind::Wasm, b"\0asm\x01\0\0\0\xff"), Err(CompileError::Invalid(_))));
        assert!(matches!(compile(SourceKind::Wat, b"(module"), Err(CompileError::Wat(_))));
    }

    #[test]
    fn progress_walks_the_stages_and_counts_every_emitted_node() -> Result<(), CompileError> {
        let dir = std::env::temp_dir().join(format!("referee-progress-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| CompileError::Io { path: dir.display().to_string(), message: e.to_string() })?;
        let path = dir.join("m.py");
        let source = "import numpy as np\nLOSS = \"mse\"\nW = np.array([[1.0, 2.0], [3.0, 4.0]])\ndef forward(x):\n    return np.tanh(x @ W)\n";
        std::fs::write(&path, source)
            .map_err(|e| CompileError::Io { path: path.display().to_string(), message: e.to_string() })?;
        let seen = std::sync::Mutex::new(Vec::new());
        let result = compile_path_with_progress(&path, &|p| seen.lock().unwrap_or_else(|e| e.into_inner()).push(p));
        let _ = std::fs::remove_dir_all(&dir);
        result?;
        let seen = seen.into_inner().unwrap_or_else(|e| e.into_inner());
        let stages: Vec<Stage> = seen.iter().map(|p| p.stage).fold(Vec::new(), |mut v, s| {
            if v.last() != Some(&s) {
                v.push(s);
            }
            v
        });
        assert_eq!(stages, vec![Stage::Lowering, Stage::Emitting, Stage::Validating]);
        let emitting: Vec<&Progress> = seen.iter().filter(|p| p.stage == Stage::Emitting).collect();
        let last = emitting.last().copied().copied();
        assert!(matches!(last, Some(Progress { done, total, .. }) if done == total && total > 2), "{emitting:?}");
        assert!(emitting.windows(2).all(|w| w[1].done == w[0].done + 1));
        Ok(())
    }

    #[test]
    fn extensions_pick_the_frontend() {
        assert_eq!(SourceKind::from_path(Path::new("m.wat")).ok(), Some(SourceKind::Wat));
        assert_eq!(SourceKind::from_path(Path::new("m.py")).ok(), Some(SourceKind::Python));
        assert!(matches!(SourceKind::from_path(Path::new("m.txt")), Err(CompileError::UnknownExtension(_))));
    }
}
