//! Helpers shared by the tools: parameter parsing, specs and outputs.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{CallScope, ToolAnnotations, ToolError, ToolOutput, ToolSpec};

/// Cost class of tools that run in-process.
pub(crate) const NATIVE: f64 = 0.0;
/// Cost class of tools that run inside the sandbox.
pub(crate) const SANDBOXED: f64 = 0.1;

/// Deserializes a call's `params` into the tool's parameter struct.
pub(crate) fn params<T: DeserializeOwned>(params: Value) -> Result<T, ToolError> {
    serde_json::from_value(params).map_err(|e| ToolError::InvalidParams(e.to_string()))
}

/// A successful result (every touched path passed the reality check).
pub(crate) fn output(data: Value, torsion: f64) -> ToolOutput {
    ToolOutput { data, reality_index: 1.0, torsion }
}

/// Builds a spec.
pub(crate) fn spec(
    name: &str,
    description: &str,
    input_schema: Value,
    output_schema: Value,
    annotations: ToolAnnotations,
    torsion: f64,
) -> ToolSpec {
    ToolSpec {
        name: name.to_owned(),
        description: description.to_owned(),
        input_schema,
        output_schema,
        annotations,
        torsion,
    }
}

/// Annotations of a tool that only reads local state.
pub(crate) const READ_ONLY: ToolAnnotations =
    ToolAnnotations { read_only: true, destructive: false, idempotent: true, open_world: false };

/// Fails with [`ToolError::Timeout`] once the call's deadline has passed.
pub(crate) fn check_deadline(scope: &CallScope, what: &str) -> Result<(), ToolError> {
    match scope.deadline {
        Some(deadline) if std::time::Instant::now() >= deadline => {
            Err(ToolError::Timeout(format!("{what}: the call's deadline passed")))
        }
        _ => Ok(()),
    }
}

/// Serializes a tool's result struct.
pub(crate) fn to_value<T: serde::Serialize>(value: &T) -> Result<Value, ToolError> {
    serde_json::to_value(value).map_err(|e| ToolError::Failed(format!("serializing the result: {e}")))
}
