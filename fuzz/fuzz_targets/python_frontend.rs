//! Fuzzes the Python (NumPy subset) frontend: any source either compiles to a module that
//! validates, or is refused with a located error — never a panic, hang or runaway allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use referee_compiler::{CompileError, SourceKind, compile, validate};

fuzz_target!(|data: &[u8]| {
    match compile(SourceKind::Python, data) {
        Ok(module) => {
            validate(module.bytes).expect("the backend emitted a module the validator refuses");
        }
        Err(CompileError::Python { line, column, .. }) => assert!(line >= 1 && column >= 1),
        Err(_) => {}
    }
});
