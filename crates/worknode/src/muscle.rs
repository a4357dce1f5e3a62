//! A behaviour hosted in a referee cell: each data message is a little-endian `f32` vector fed to a
//! sealed muscle through [`referee_runtime::Runtime::invoke`]; the output lands in a register field.

use std::sync::Arc;

use referee_runtime::Runtime;

use crate::state::Op;
use crate::system::{Behaviour, BehaviourError, Body, Ctx, Envelope};

/// Runs muscle `muscle` (already loaded into `runtime`) on every [`Body::Data`] message and stores
/// the output, as a JSON array, in the LWW register `field`. A runtime error (bad input, trap,
/// limit) is a behaviour failure: the worknode restarts and its parent is told.
pub struct MuscleBehaviour {
    runtime: Arc<Runtime>,
    muscle: String,
    field: String,
}

impl std::fmt::Debug for MuscleBehaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuscleBehaviour")
            .field("muscle", &self.muscle)
            .field("field", &self.field)
            .finish_non_exhaustive()
    }
}

impl MuscleBehaviour {
    /// A behaviour invoking `muscle` and writing its output to `field`.
    pub fn new(runtime: Arc<Runtime>, muscle: &str, field: &str) -> Self {
        Self { runtime, muscle: muscle.to_owned(), field: field.to_owned() }
    }
}

/// Decodes a little-endian `f32` vector.
pub fn decode_f32s(bytes: &[u8]) -> Result<Vec<f32>, BehaviourError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(BehaviourError(format!(
            "muscle input is {} bytes, not a whole number of little-endian f32 values",
            bytes.len()
        )));
    }
    Ok(bytes.chunks_exact(4).filter_map(|c| <[u8; 4]>::try_from(c).ok()).map(f32::from_le_bytes).collect())
}

impl Behaviour for MuscleBehaviour {
    fn handle(&self, ctx: &mut Ctx<'_>, msg: &Envelope) -> Result<(), BehaviourError> {
        let Body::Data(data) = &msg.body else { return Ok(()) };
        let input = decode_f32s(data)?;
        let out = self.runtime.invoke(&self.muscle, &input).map_err(|e| BehaviourError(e.to_string()))?;
        ctx.update(&self.field, Op::Set(serde_json::json!(out).to_string()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_vectors_decode_and_ragged_input_is_refused() {
        let bytes: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(decode_f32s(&bytes).unwrap(), vec![1.5, -2.0]);
        assert!(decode_f32s(&bytes[..5]).is_err());
    }
}
