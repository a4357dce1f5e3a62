//! The tools the gateway exposes: native tools plus every loaded muscle, all behind
//! [`referee_tools::Tool`].
//!
//! Muscles appear as `muscle.<name>` (forward pass) and, when trainable, `train.<name>` (one
//! SGD step). Native tool names never contain a dot, so the namespaces cannot collide.

use std::collections::BTreeMap;
use std::sync::Arc;

use referee_muscle::TensorSpec;
use referee_runtime::{MuscleInfo, Runtime, RuntimeError};
use referee_tools::{CallScope, SharedTool, Tool, ToolAnnotations, ToolError, ToolOutput, ToolSpec};
use serde_json::{Value, json};

/// Prefix of muscle forward tools.
pub const MUSCLE_PREFIX: &str = "muscle.";
/// Prefix of muscle training tools.
pub const TRAIN_PREFIX: &str = "train.";
/// Cost class of sandboxed execution (see [`ToolSpec::torsion`]).
const SANDBOXED: f64 = 0.1;
/// Learning rate when a train call names none.
const DEFAULT_LR: f64 = 0.01;

/// Which kind of tool a name refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A native tool.
    Native(String),
    /// A muscle's forward pass.
    Invoke(String),
    /// A muscle's training step.
    Train(String),
}

impl Target {
    /// Classifies a tool name.
    pub fn parse(name: &str) -> Self {
        if let Some(m) = name.strip_prefix(MUSCLE_PREFIX) {
            Self::Invoke(m.to_owned())
        } else if let Some(m) = name.strip_prefix(TRAIN_PREFIX) {
            Self::Train(m.to_owned())
        } else {
            Self::Native(name.to_owned())
        }
    }

    /// The muscle this targets, if any.
    pub fn muscle(&self) -> Option<&str> {
        match self {
            Self::Native(_) => None,
            Self::Invoke(m) | Self::Train(m) => Some(m),
        }
    }
}

/// Native tools by name, plus the runtime whose muscles are tools too.
pub struct Registry {
    native: BTreeMap<String, SharedTool>,
    runtime: Arc<Runtime>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("native", &self.native.keys().collect::<Vec<_>>()).finish_non_exhaustive()
    }
}

fn total(specs: &[TensorSpec]) -> usize {
    specs.iter().map(|t| t.elements()).sum::<u64>() as usize
}

fn vector(len: usize, what: &str) -> Value {
    json!({
        "type": "array",
        "items": { "type": "number" },
        "minItems": len,
        "maxItems": len,
        "description": what,
    })
}

/// A muscle entry point seen as a tool.
struct MuscleTool {
    runtime: Arc<Runtime>,
    name: String,
    train: bool,
    inputs: usize,
    outputs: usize,
    spec: ToolSpec,
}

impl MuscleTool {
    fn new(runtime: Arc<Runtime>, info: &MuscleInfo, train: bool) -> Self {
        let h = &info.header;
        let (inputs, outputs) = (total(&h.inputs), total(&h.outputs));
        let shape = |t: &[TensorSpec]| t.iter().map(|t| format!("{:?}", t.dims)).collect::<Vec<_>>().join(", ");
        let input_desc = format!("{inputs} numbers: the input tensor {} flattened row-major", shape(&h.inputs));
        let (name, description, input_schema, output_schema, annotations) = if train {
            (
                format!("{TRAIN_PREFIX}{}", h.name),
                format!(
                    "One training step of muscle `{}` v{}; returns the loss. Parameters persist.",
                    h.name, h.version
                ),
                json!({
                    "type": "object",
                    "properties": {
                        "input": vector(inputs, &input_desc),
                        "target": vector(outputs, "the expected output, flattened"),
                        "lr": { "type": "number", "exclusiveMinimum": 0, "maximum": 10, "default": DEFAULT_LR },
                    },
                    "required": ["input", "target"],
                    "additionalProperties": false,
                }),
                json!({ "type": "object", "properties": { "loss": { "type": "number" } }, "required": ["loss"] }),
                ToolAnnotations { read_only: false, destructive: true, idempotent: false, open_world: false },
            )
        } else {
            (
                format!("{MUSCLE_PREFIX}{}", h.name),
                format!(
                    "Run muscle `{}` v{} (sealed, sandboxed): {inputs} inputs {} → {outputs} outputs {}.",
                    h.name,
                    h.version,
                    shape(&h.inputs),
                    shape(&h.outputs)
                ),
                json!({
                    "type": "object",
                    "properties": { "input": vector(inputs, &input_desc) },
                    "required": ["input"],
                    "additionalProperties": false,
                }),
                json!({
                    "type": "object",
                    "properties": { "output": vector(outputs, "the output tensor, flattened") },
                    "required": ["output"],
                }),
                // A trainable muscle's forward pass changes nothing, but its answer changes as
                // it trains, so only stateless muscles are idempotent.
                ToolAnnotations { read_only: true, destructive: false, idempotent: !info.trainable, open_world: false },
            )
        };
        let spec = ToolSpec { name, description, input_schema, output_schema, annotations, torsion: SANDBOXED };
        Self { runtime, name: h.name.clone(), train, inputs, outputs, spec }
    }
}

fn numbers(params: &Value, key: &str, len: usize) -> Result<Vec<f32>, ToolError> {
    let items = params
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| ToolError::InvalidParams(format!("`{key}` must be an array of {len} numbers")))?;
    if items.len() != len {
        return Err(ToolError::InvalidParams(format!("`{key}` has {} numbers; the muscle takes {len}", items.len())));
    }
    items
        .iter()
        .map(|v| v.as_f64().map(|f| f as f32).filter(|f| f.is_finite()))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| ToolError::InvalidParams(format!("`{key}` must contain only finite numbers")))
}

fn check_keys(params: &Value, allowed: &[&str]) -> Result<(), ToolError> {
    let object = params.as_object().ok_or_else(|| ToolError::InvalidParams("params must be an object".into()))?;
    match object.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ToolError::InvalidParams(format!("unknown parameter `{k}`; expected {allowed:?}"))),
        None => Ok(()),
    }
}

/// Runtime errors as tool errors (the gateway maps both to HTTP the same way).
pub fn runtime_to_tool(e: RuntimeError) -> ToolError {
    match e {
        RuntimeError::NotLoaded(_) => ToolError::NotFound(e.to_string()),
        RuntimeError::BadInput { .. } => ToolError::InvalidParams(e.to_string()),
        RuntimeError::Busy { .. } | RuntimeError::Quarantined { .. } | RuntimeError::ShuttingDown => {
            ToolError::Unavailable(e.to_string())
        }
        RuntimeError::NoEntry { .. } => ToolError::NotFound(e.to_string()),
        RuntimeError::Fault { fault: referee_runtime::Fault::Deadline, .. } => ToolError::Timeout(e.to_string()),
        _ => ToolError::Failed(e.to_string()),
    }
}

impl Tool for MuscleTool {
    fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    fn call(&self, params: Value, _scope: &CallScope) -> Result<ToolOutput, ToolError> {
        let data = if self.train {
            check_keys(&params, &["input", "target", "lr"])?;
            let x = numbers(&params, "input", self.inputs)?;
            let y = numbers(&params, "target", self.outputs)?;
            let lr = match params.get("lr") {
                None | Some(Value::Null) => DEFAULT_LR,
                Some(v) => v
                    .as_f64()
                    .filter(|lr| *lr > 0.0 && *lr <= 10.0)
                    .ok_or_else(|| ToolError::InvalidParams("`lr` must be a number in (0, 10]".into()))?,
            };
            let loss = self.runtime.train(&self.name, &x, &y, lr as f32).map_err(runtime_to_tool)?;
            json!({ "loss": loss })
        } else {
            check_keys(&params, &["input"])?;
            let x = numbers(&params, "input", self.inputs)?;
            let y = self.runtime.invoke(&self.name, &x).map_err(runtime_to_tool)?;
            json!({ "output": y })
        };
        Ok(ToolOutput { data, reality_index: 1.0, torsion: SANDBOXED })
    }
}

impl Registry {
    /// Native tools (names must be unique and dot-free) plus the runtime's muscles.
    pub fn new(native: Vec<SharedTool>, runtime: Arc<Runtime>) -> Self {
        let native = native.into_iter().map(|t| (t.spec().name.clone(), t)).collect();
        Self { native, runtime }
    }

    /// The runtime.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Resolves a tool name to a tool (muscle tools are built from the current load state).
    pub fn get(&self, name: &str) -> Option<SharedTool> {
        match Target::parse(name) {
            Target::Native(n) => self.native.get(&n).cloned(),
            Target::Invoke(m) => {
                self.runtime.info(&m).ok().map(|i| Arc::new(MuscleTool::new(self.runtime.clone(), &i, false)) as _)
            }
            Target::Train(m) => self
                .runtime
                .info(&m)
                .ok()
                .filter(|i| i.trainable)
                .map(|i| Arc::new(MuscleTool::new(self.runtime.clone(), &i, true)) as _),
        }
    }

    /// Every tool: native first (by name), then muscles (by name).
    pub fn all(&self) -> Vec<SharedTool> {
        let mut out: Vec<SharedTool> = self.native.values().cloned().collect();
        for info in self.runtime.list() {
            out.push(Arc::new(MuscleTool::new(self.runtime.clone(), &info, false)));
            if info.trainable {
                out.push(Arc::new(MuscleTool::new(self.runtime.clone(), &info, true)));
            }
        }
        out
    }
}
