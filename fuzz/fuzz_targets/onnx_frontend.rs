//! Fuzzes the ONNX frontend (prost decoding, constant folding, lowering, emission): any bytes
//! either compile to a module that validates or are refused with an error — never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use referee_compiler::{SourceKind, compile, validate};

fuzz_target!(|data: &[u8]| {
    if let Ok(module) = compile(SourceKind::Onnx, data) {
        validate(module.bytes).expect("the backend emitted a module the validator refuses");
    }
});
