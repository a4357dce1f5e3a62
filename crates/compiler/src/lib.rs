//! The muscle compiler's frontends: source file → validated WebAssembly module.
//!
//! Today: `.wasm` (validated as is) and `.wat` (assembled, then validated). The Python
//! (NumPy subset) and ONNX frontends target the same output and arrive with the compiler
//! issue; until then they are refused with a message saying so.
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
    /// The frontend is not part of this build yet.
    #[error("the {0} frontend is not available in this build yet; compile to .wasm or .wat for now")]
    FrontendUnavailable(&'static str),
    /// The WAT text does not assemble.
    #[error("invalid WAT: {0}")]
    Wat(String),
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

/// The WebAssembly features muscles may use.
pub fn features() -> WasmFeatures {
    WasmFeatures::WASM2
}

/// Runs the frontend for `kind` over `source`.
pub fn compile(kind: SourceKind, source: &[u8]) -> Result<WasmModule, CompileError> {
    let bytes = match kind {
        SourceKind::Wasm => source.to_vec(),
        SourceKind::Wat => wat::parse_bytes(source).map_err(|e| CompileError::Wat(e.to_string()))?.into_owned(),
        SourceKind::Python => return Err(CompileError::FrontendUnavailable("Python")),
        SourceKind::Onnx => return Err(CompileError::FrontendUnavailable("ONNX")),
    };
    validate(bytes)
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
    Ok(WasmModule { bytes, imports, exports })
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
    fn extensions_pick_the_frontend() {
        assert_eq!(SourceKind::from_path(Path::new("m.wat")).ok(), Some(SourceKind::Wat));
        assert_eq!(SourceKind::from_path(Path::new("m.py")).ok(), Some(SourceKind::Python));
        assert!(matches!(SourceKind::from_path(Path::new("m.txt")), Err(CompileError::UnknownExtension(_))));
    }
}
