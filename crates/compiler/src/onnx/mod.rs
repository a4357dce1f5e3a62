//! The ONNX frontend: a `.onnx` file (default domain, opset 13 or later) → IR.
//!
//! Initializers become folded constants, so shape plumbing (`Shape` → `Gather` → `Concat` →
//! `Reshape`) is evaluated here at compile time and only tensor arithmetic reaches the
//! backend. The one graph input may have a dynamic first (batch) axis, which is fixed to 1.
//! Every operator outside [`SUPPORTED`] is an error naming it and the node.

#![allow(clippy::indexing_slicing, reason = "indexes are checked against shapes the IR builders validated")]

mod proto;

use std::collections::BTreeMap;

use prost::Message;

use crate::CompileError;
use crate::ir::{self, Binary, Graph, Model, NodeId, Reduce, Shape, Unary, numel};
use proto::{AttributeProto, NodeProto, TensorProto, ValueInfoProto, data_type};

/// Largest `.onnx` file the frontend reads (the runtime caps a cell's memory at 256 MiB).
pub(crate) const MAX_ONNX_BYTES: usize = 256 << 20;
/// The oldest default-domain opset whose operator semantics the frontend implements.
pub(crate) const MIN_OPSET: i64 = 13;

/// Operators the frontend lowers. The first block is the documented contract; `Neg` to
/// `Abs` come free with the IR, and `Shape`, `Gather`, `Cast`, `Dropout` appear in exported
/// graphs as shape plumbing or inference no-ops.
pub(crate) const SUPPORTED: &[&str] = &[
    "Gemm",
    "MatMul",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "Softmax",
    "LogSoftmax",
    "Clip",
    "Flatten",
    "Reshape",
    "Transpose",
    "Identity",
    "Constant",
    "Squeeze",
    "Unsqueeze",
    "Concat",
    "Neg",
    "Exp",
    "Log",
    "Sqrt",
    "Abs",
    "Shape",
    "Gather",
    "Cast",
    "Dropout",
];

/// A value flowing through the ONNX graph: a float tensor in the IR, or a constant integer
/// tensor (shapes, axes, indices) that only exists at compile time.
#[derive(Clone, Debug)]
enum Value {
    Float(NodeId),
    Int(IntTensor),
}

#[derive(Clone, Debug)]
struct IntTensor {
    data: Vec<i64>,
    shape: Shape,
}

impl IntTensor {
    fn vector(data: Vec<i64>) -> Self {
        let n = data.len();
        Self { data, shape: vec![n] }
    }
}

/// Decodes and lowers an ONNX model.
pub(crate) fn lower(source: &[u8]) -> Result<Model, CompileError> {
    if source.len() > MAX_ONNX_BYTES {
        return Err(CompileError::TooLarge(format!(
            "the ONNX file has {} bytes; the limit is {MAX_ONNX_BYTES}",
            source.len()
        )));
    }
    let model = proto::ModelProto::decode(source)
        .map_err(|e| onnx_err("file", format!("not a readable ONNX model (protobuf: {e})")))?;
    let opset = model
        .opset_import
        .iter()
        .filter(|o| matches!(o.domain.as_deref(), None | Some("" | "ai.onnx")))
        .filter_map(|o| o.version)
        .max()
        .ok_or_else(|| onnx_err("model", "declares no default-domain (ai.onnx) opset"))?;
    if opset < MIN_OPSET {
        return Err(onnx_err(
            "model",
            format!(
                "uses opset {opset}; the compiler supports opset {MIN_OPSET} and later \
                 (convert with onnx.version_converter.convert_version(model, {MIN_OPSET}))"
            ),
        ));
    }
    let graph = model.graph.ok_or_else(|| onnx_err("model", "has no graph"))?;
    let mut cx = Lowering { graph: Graph::default(), values: BTreeMap::new() };
    for t in &graph.initializer {
        let name = t.name.clone().unwrap_or_default();
        let value = cx.tensor(t, &format!("initializer '{name}'"))?;
        cx.values.insert(name, value);
    }
    let inputs: Vec<&ValueInfoProto> =
        graph.input.iter().filter(|i| !cx.values.contains_key(i.name.as_deref().unwrap_or(""))).collect();
    let [input] = inputs.as_slice() else {
        let names: Vec<&str> = inputs.iter().map(|i| i.name.as_deref().unwrap_or("")).collect();
        return Err(onnx_err("graph", format!("has inputs {names:?}; a muscle takes exactly one input tensor")));
    };
    let input_name = input.name.clone().unwrap_or_default();
    let input_shape = input_shape(input, &input_name)?;
    let x = cx.graph.input(input_shape.clone());
    cx.values.insert(input_name, Value::Float(x));
    for (index, node) in graph.node.iter().enumerate() {
        let op = node.op_type.as_deref().unwrap_or("");
        let at = format!("node {index} '{}' ({op})", node.name.as_deref().unwrap_or(""));
        if !matches!(node.domain.as_deref(), None | Some("" | "ai.onnx")) {
            return Err(onnx_err(
                &at,
                format!("operator domain {:?} is not supported (only the default ai.onnx domain)", node.domain),
            ));
        }
        let outputs = cx.node(node, op).map_err(|message| onnx_err(&at, message))?;
        for (i, name) in node.output.iter().enumerate() {
            if name.is_empty() {
                continue;
            }
            let value = outputs.get(i).cloned().ok_or_else(|| {
                onnx_err(&at, format!("output {i} ('{name}') is not supported; only the first output is produced"))
            })?;
            cx.values.insert(name.clone(), value);
        }
    }
    let [output] = graph.output.as_slice() else {
        return Err(onnx_err(
            "graph",
            format!("has {} outputs; a muscle produces exactly one output tensor", graph.output.len()),
        ));
    };
    let output_name = output.name.as_deref().unwrap_or("");
    let output = match cx.values.get(output_name) {
        Some(Value::Float(id)) => *id,
        Some(Value::Int(_)) => {
            return Err(onnx_err("graph", format!("output '{output_name}' is an integer tensor; muscles output f32")));
        }
        None => return Err(onnx_err("graph", format!("output '{output_name}' is never computed"))),
    };
    let output_shape = cx.graph.shape(output).clone();
    Ok(Model { graph: cx.graph, input: x, output, input_shape, output_shape, training: None })
}

fn onnx_err(location: &str, message: impl Into<String>) -> CompileError {
    CompileError::Onnx { location: location.to_owned(), message: message.into() }
}

/// The input's static shape; a dynamic first axis is the batch and becomes 1.
fn input_shape(input: &ValueInfoProto, name: &str) -> Result<Shape, CompileError> {
    let at = format!("input '{name}'");
    let tensor =
        input.r#type.as_ref().and_then(|t| t.tensor_type.as_ref()).ok_or_else(|| onnx_err(&at, "is not a tensor"))?;
    if tensor.elem_type != Some(data_type::FLOAT) {
        return Err(onnx_err(&at, format!("has element type {:?}; muscles take float32 input", tensor.elem_type)));
    }
    let shape = tensor.shape.as_ref().ok_or_else(|| {
        onnx_err(&at, "has no shape; export the model with a fixed input shape (a dynamic batch axis is fine)")
    })?;
    let mut out = Vec::with_capacity(shape.dim.len());
    for (axis, d) in shape.dim.iter().enumerate() {
        match d.dim_value {
            Some(v) if v > 0 => out.push(usize::try_from(v).map_err(|_| onnx_err(&at, "dimension too large"))?),
            _ if axis == 0 => out.push(1),
            _ => {
                return Err(onnx_err(
                    &at,
                    format!("axis {axis} is dynamic ({:?}); only the first (batch) axis may be", d.dim_param),
                ));
            }
        }
    }
    if numel(&out) > ir::MAX_ELEMENTS {
        return Err(onnx_err(&at, format!("shape {out:?} is larger than {} elements", ir::MAX_ELEMENTS)));
    }
    Ok(out)
}

/// Attribute lookup for one node.
struct Attrs<'a>(&'a [AttributeProto]);

impl<'a> Attrs<'a> {
    fn get(&self, name: &str) -> Result<Option<&'a AttributeProto>, String> {
        match self.0.iter().find(|a| a.name.as_deref() == Some(name)) {
            Some(a) if a.ref_attr_name.is_some() => Err(format!("attribute {name} refers to a function attribute")),
            other => Ok(other),
        }
    }

    fn int(&self, name: &str, default: i64) -> Result<i64, String> {
        Ok(self.get(name)?.and_then(|a| a.i).unwrap_or(default))
    }

    fn float(&self, name: &str, default: f32) -> Result<f32, String> {
        Ok(self.get(name)?.and_then(|a| a.f).unwrap_or(default))
    }

    fn ints(&self, name: &str) -> Result<Option<Vec<i64>>, String> {
        Ok(self.get(name)?.map(|a| a.ints.clone()))
    }
}

/// Normalises a possibly negative axis against `rank`.
fn axis(a: i64, rank: usize) -> Result<usize, String> {
    let r = rank as i64;
    let v = if a < 0 { a + r } else { a };
    if (0..r).contains(&v) { Ok(v as usize) } else { Err(format!("axis {a} is out of range for rank {rank}")) }
}

struct Lowering {
    graph: Graph,
    values: BTreeMap<String, Value>,
}

impl Lowering {
    /// A constant tensor (initializer or `Constant` attribute).
    fn tensor(&mut self, t: &TensorProto, at: &str) -> Result<Value, CompileError> {
        if t.data_location == Some(1) {
            return Err(onnx_err(
                at,
                "keeps its data in an external file; save the model with save_as_external_data=False",
            ));
        }
        let mut shape = Vec::with_capacity(t.dims.len());
        for &d in &t.dims {
            shape.push(usize::try_from(d).map_err(|_| onnx_err(at, format!("has a negative dimension {d}")))?);
        }
        let n = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= ir::MAX_ELEMENTS)
            .ok_or_else(|| onnx_err(at, format!("shape {shape:?} is larger than {} elements", ir::MAX_ELEMENTS)))?;
        let raw = t.raw_data.as_deref();
        let count = |len: usize| {
            if len == n {
                Ok(())
            } else {
                Err(onnx_err(at, format!("holds {len} values for shape {shape:?} ({n} expected)")))
            }
        };
        let chunks = |raw: &[u8], width: usize| -> Result<Vec<[u8; 8]>, CompileError> {
            if raw.len() != n * width {
                return Err(onnx_err(at, format!("has {} raw bytes for {n} values of {width} bytes", raw.len())));
            }
            Ok(raw
                .chunks_exact(width)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b[..width].copy_from_slice(c);
                    b
                })
                .collect())
        };
        match t.data_type {
            Some(data_type::FLOAT | data_type::DOUBLE) => {
                let data: Vec<f32> = match (t.data_type, raw) {
                    (Some(data_type::FLOAT), Some(raw)) => {
                        chunks(raw, 4)?.iter().map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
                    }
                    (Some(data_type::FLOAT), None) => {
                        count(t.float_data.len())?;
                        t.float_data.clone()
                    }
                    (_, Some(raw)) => chunks(raw, 8)?.iter().map(|b| f64::from_le_bytes(*b) as f32).collect(),
                    (_, None) => {
                        count(t.double_data.len())?;
                        t.double_data.iter().map(|&v| v as f32).collect()
                    }
                };
                if n == 0 {
                    return Err(onnx_err(at, "is an empty float tensor"));
                }
                Ok(Value::Float(self.graph.constant(data, shape)))
            }
            Some(data_type::INT64 | data_type::INT32) => {
                let data: Vec<i64> = match (t.data_type, raw) {
                    (Some(data_type::INT64), Some(raw)) => {
                        chunks(raw, 8)?.iter().map(|b| i64::from_le_bytes(*b)).collect()
                    }
                    (Some(data_type::INT64), None) => {
                        count(t.int64_data.len())?;
                        t.int64_data.clone()
                    }
                    (_, Some(raw)) => chunks(raw, 4)?
                        .iter()
                        .map(|b| i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                        .collect(),
                    (_, None) => {
                        count(t.int32_data.len())?;
                        t.int32_data.iter().map(|&v| i64::from(v)).collect()
                    }
                };
                Ok(Value::Int(IntTensor { data, shape }))
            }
            other => Err(onnx_err(
                at,
                format!("has data type {other:?}; supported: float32, float64 (converted), int32, int64"),
            )),
        }
    }

    fn input(&self, node: &NodeProto, i: usize) -> Result<Option<Value>, String> {
        match node.input.get(i).map(String::as_str) {
            None | Some("") => Ok(None),
            Some(name) => self.values.get(name).cloned().map(Some).ok_or_else(|| {
                format!("reads tensor '{name}', which no earlier node, graph input or initializer defines")
            }),
        }
    }

    fn req(&self, node: &NodeProto, i: usize) -> Result<Value, String> {
        self.input(node, i)?.ok_or_else(|| format!("input {i} is required"))
    }

    fn float(&self, node: &NodeProto, i: usize) -> Result<NodeId, String> {
        match self.req(node, i)? {
            Value::Float(id) => Ok(id),
            Value::Int(_) => Err(format!("input {i} must be a float tensor, not an integer one")),
        }
    }

    fn ints(&self, node: &NodeProto, i: usize) -> Result<Option<Vec<i64>>, String> {
        match self.input(node, i)? {
            None => Ok(None),
            Some(Value::Int(t)) => Ok(Some(t.data)),
            Some(Value::Float(_)) => Err(format!("input {i} must be a constant integer tensor")),
        }
    }

    fn shape_of(&self, v: &Value) -> Shape {
        match v {
            Value::Float(id) => self.graph.shape(*id).clone(),
            Value::Int(t) => t.shape.clone(),
        }
    }

    /// Gives `v` a new shape with the same elements.
    fn reshaped(&mut self, v: Value, shape: Shape) -> Result<Value, String> {
        match v {
            Value::Float(id) => Ok(Value::Float(self.graph.reshape(id, shape)?)),
            Value::Int(t) if t.data.len() == numel(&shape) => Ok(Value::Int(IntTensor { data: t.data, shape })),
            Value::Int(t) => Err(format!("cannot reshape {:?} into {shape:?}", t.shape)),
        }
    }

    fn scalar(&mut self, v: f32) -> NodeId {
        self.graph.scalar(v)
    }

    /// Lowers one node; returns its outputs in order.
    fn node(&mut self, node: &NodeProto, op: &str) -> Result<Vec<Value>, String> {
        let attrs = Attrs(&node.attribute);
        let one = |v: NodeId| Ok(vec![Value::Float(v)]);
        match op {
            "Identity" | "Dropout" => Ok(vec![self.req(node, 0)?]),
            "Relu" => {
                let x = self.float(node, 0)?;
                let zero = self.scalar(0.0);
                one(self.graph.binary(Binary::Max, x, zero)?)
            }
            "LeakyRelu" => {
                // max(x, 0) + alpha * min(x, 0): exactly x or alpha * x, for any alpha.
                let x = self.float(node, 0)?;
                let alpha = self.scalar(attrs.float("alpha", 0.01)?);
                let zero = self.scalar(0.0);
                let g = &mut self.graph;
                let pos = g.binary(Binary::Max, x, zero)?;
                let neg = g.binary(Binary::Min, x, zero)?;
                let scaled = g.binary(Binary::Mul, alpha, neg)?;
                one(g.binary(Binary::Add, pos, scaled)?)
            }
            "Sigmoid" => {
                let x = self.float(node, 0)?;
                let one_c = self.scalar(1.0);
                let g = &mut self.graph;
                let n = g.unary(Unary::Neg, x);
                let e = g.unary(Unary::Exp, n);
                let d = g.binary(Binary::Add, one_c, e)?;
                one(g.binary(Binary::Div, one_c, d)?)
            }
            "Tanh" | "Neg" | "Exp" | "Log" | "Sqrt" | "Abs" => {
                let u = match op {
                    "Tanh" => Unary::Tanh,
                    "Neg" => Unary::Neg,
                    "Exp" => Unary::Exp,
                    "Log" => Unary::Log,
                    "Sqrt" => Unary::Sqrt,
                    _ => Unary::Abs,
                };
                let x = self.float(node, 0)?;
                one(self.graph.unary(u, x))
            }
            "Add" | "Sub" | "Mul" | "Div" => {
                let b = match op {
                    "Add" => Binary::Add,
                    "Sub" => Binary::Sub,
                    "Mul" => Binary::Mul,
                    _ => Binary::Div,
                };
                match (self.req(node, 0)?, self.req(node, 1)?) {
                    (Value::Float(x), Value::Float(y)) => one(self.graph.binary(b, x, y)?),
                    (Value::Int(x), Value::Int(y)) => Ok(vec![Value::Int(int_binary(b, &x, &y)?)]),
                    _ => Err("mixes float and integer operands".to_owned()),
                }
            }
            "Gemm" => {
                let (a, b) = (self.float(node, 0)?, self.float(node, 1)?);
                let c = match self.input(node, 2)? {
                    None => None,
                    Some(Value::Float(c)) => Some(c),
                    Some(Value::Int(_)) => return Err("input 2 (C) must be a float tensor".to_owned()),
                };
                let (alpha, beta) = (attrs.float("alpha", 1.0)?, attrs.float("beta", 1.0)?);
                let (ta, tb) = (attrs.int("transA", 0)?, attrs.int("transB", 0)?);
                let g = &mut self.graph;
                if g.shape(a).len() != 2 || g.shape(b).len() != 2 {
                    return Err(format!("A {:?} and B {:?} must be matrices", g.shape(a), g.shape(b)));
                }
                let a = if ta != 0 { g.transpose(a, None)? } else { a };
                let b = if tb != 0 { g.transpose(b, None)? } else { b };
                let mut y = g.matmul(a, b)?;
                let out = g.shape(y).clone();
                if alpha != 1.0 {
                    let s = g.scalar(alpha);
                    y = g.binary(Binary::Mul, y, s)?;
                }
                if let Some(mut c) = c {
                    if beta != 1.0 {
                        let s = g.scalar(beta);
                        c = g.binary(Binary::Mul, c, s)?;
                    }
                    y = g.binary(Binary::Add, y, c)?;
                }
                if g.shape(y) != &out {
                    return Err(format!("C of shape {:?} does not broadcast to {out:?}", g.shape(y)));
                }
                one(y)
            }
            "MatMul" => {
                let (a, b) = (self.float(node, 0)?, self.float(node, 1)?);
                one(batched_matmul(&mut self.graph, a, b)?)
            }
            "Softmax" | "LogSoftmax" => {
                let x = self.float(node, 0)?;
                let ax = attrs.int("axis", -1)?;
                let g = &mut self.graph;
                let m = g.reduce(Reduce::Max, x, Some(ax), true)?;
                let z = g.binary(Binary::Sub, x, m)?;
                let e = g.unary(Unary::Exp, z);
                let s = g.reduce(Reduce::Sum, e, Some(ax), true)?;
                if op == "Softmax" {
                    one(g.binary(Binary::Div, e, s)?)
                } else {
                    let l = g.unary(Unary::Log, s);
                    one(g.binary(Binary::Sub, z, l)?)
                }
            }
            "Clip" => {
                let mut y = self.float(node, 0)?;
                for (i, b) in [(1, Binary::Max), (2, Binary::Min)] {
                    match self.input(node, i)? {
                        None => {}
                        Some(Value::Float(bound)) if numel(self.graph.shape(bound)) == 1 => {
                            y = self.graph.binary(b, y, bound)?;
                        }
                        Some(_) => return Err(format!("input {i} (a bound) must be a float scalar")),
                    }
                }
                one(y)
            }
            "Flatten" => {
                let x = self.req(node, 0)?;
                let shape = self.shape_of(&x);
                let a = attrs.int("axis", 1)?;
                let r = shape.len() as i64;
                let a = if a < 0 { a + r } else { a };
                if !(0..=r).contains(&a) {
                    return Err(format!("axis {a} is out of range for rank {r}"));
                }
                let a = a as usize;
                let target = vec![numel(&shape[..a]), numel(&shape[a..])];
                Ok(vec![self.reshaped(x, target)?])
            }
            "Reshape" => {
                let x = self.req(node, 0)?;
                let spec = self.ints(node, 1)?.ok_or("input 1 (shape) is required")?;
                let target = reshape_target(&self.shape_of(&x), &spec, attrs.int("allowzero", 0)? != 0)?;
                Ok(vec![self.reshaped(x, target)?])
            }
            "Transpose" => {
                let x = self.float(node, 0)?;
                let perm = match attrs.ints("perm")? {
                    None => None,
                    Some(p) => Some(
                        p.iter()
                            .map(|&v| usize::try_from(v).map_err(|_| format!("perm {p:?} has a negative axis")))
                            .collect::<Result<Vec<_>, _>>()?,
                    ),
                };
                one(self.graph.transpose(x, perm)?)
            }
            "Constant" => {
                if let Some(t) = attrs.get("value")?.and_then(|a| a.t.as_ref()) {
                    return Ok(vec![self.tensor(t, "value").map_err(|e| e.to_string())?]);
                }
                if let Some(a) = attrs.get("value_float")? {
                    return one(self.scalar(a.f.unwrap_or(0.0)));
                }
                if let Some(a) = attrs.get("value_floats")? {
                    if a.floats.is_empty() {
                        return Err("value_floats is empty".to_owned());
                    }
                    let n = a.floats.len();
                    return one(self.graph.constant(a.floats.clone(), vec![n]));
                }
                if let Some(a) = attrs.get("value_int")? {
                    return Ok(vec![Value::Int(IntTensor { data: vec![a.i.unwrap_or(0)], shape: Vec::new() })]);
                }
                if let Some(a) = attrs.get("value_ints")? {
                    return Ok(vec![Value::Int(IntTensor::vector(a.ints.clone()))]);
                }
                Err("needs a value, value_float(s) or value_int(s) attribute (strings and sparse values are not supported)"
                    .to_owned())
            }
            "Squeeze" => {
                let x = self.req(node, 0)?;
                let shape = self.shape_of(&x);
                let target = match self.ints(node, 1)? {
                    None => shape.iter().copied().filter(|&d| d != 1).collect(),
                    Some(axes) => {
                        let axes = axes.iter().map(|&a| axis(a, shape.len())).collect::<Result<Vec<_>, _>>()?;
                        if let Some(&a) = axes.iter().find(|&&a| shape[a] != 1) {
                            return Err(format!("cannot squeeze axis {a} of size {}", shape[a]));
                        }
                        shape.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect()
                    }
                };
                Ok(vec![self.reshaped(x, target)?])
            }
            "Unsqueeze" => {
                let x = self.req(node, 0)?;
                let shape = self.shape_of(&x);
                let axes = self.ints(node, 1)?.ok_or("input 1 (axes) is required")?;
                let rank = shape.len() + axes.len();
                let mut axes = axes.iter().map(|&a| axis(a, rank)).collect::<Result<Vec<_>, _>>()?;
                axes.sort_unstable();
                if axes.windows(2).any(|w| w[0] == w[1]) {
                    return Err(format!("axes {axes:?} repeat"));
                }
                let mut rest = shape.iter();
                let target =
                    (0..rank).map(|i| if axes.contains(&i) { 1 } else { rest.next().copied().unwrap_or(1) }).collect();
                Ok(vec![self.reshaped(x, target)?])
            }
            "Concat" => {
                let ax = attrs.get("axis")?.and_then(|a| a.i).ok_or("attribute axis is required")?;
                let parts = (0..node.input.len()).map(|i| self.req(node, i)).collect::<Result<Vec<_>, _>>()?;
                if parts.iter().all(|p| matches!(p, Value::Float(_))) {
                    let ids: Vec<NodeId> =
                        parts.iter().filter_map(|p| if let Value::Float(id) = p { Some(*id) } else { None }).collect();
                    one(self.graph.concat(&ids, ax)?)
                } else {
                    let ints: Vec<IntTensor> = parts
                        .into_iter()
                        .map(|p| match p {
                            Value::Int(t) => Ok(t),
                            Value::Float(_) => Err("mixes float and integer operands".to_owned()),
                        })
                        .collect::<Result<_, _>>()?;
                    Ok(vec![Value::Int(int_concat(&ints, ax)?)])
                }
            }
            "Shape" => {
                let shape = self.shape_of(&self.req(node, 0)?);
                let r = shape.len() as i64;
                let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
                let (start, end) = (clamp(attrs.int("start", 0)?), clamp(attrs.int("end", r)?));
                let dims = shape.get(start..end.max(start)).unwrap_or(&[]);
                Ok(vec![Value::Int(IntTensor::vector(dims.iter().map(|&d| d as i64).collect()))])
            }
            "Gather" => {
                let data = match self.req(node, 0)? {
                    Value::Int(t) if t.shape.len() == 1 => t,
                    _ => return Err("only gathers from constant 1-D integer tensors (shape plumbing)".to_owned()),
                };
                let Some(Value::Int(idx)) = self.input(node, 1)? else {
                    return Err("input 1 (indices) must be a constant integer tensor".to_owned());
                };
                if attrs.int("axis", 0)? != 0 {
                    return Err("only axis 0 is supported".to_owned());
                }
                let len = data.data.len() as i64;
                let picked = idx
                    .data
                    .iter()
                    .map(|&i| {
                        let j = if i < 0 { i + len } else { i };
                        data.data
                            .get(usize::try_from(j).unwrap_or(usize::MAX))
                            .copied()
                            .ok_or_else(|| format!("index {i} is out of range for {len} elements"))
                    })
                    .collect::<Result<Vec<i64>, _>>()?;
                Ok(vec![Value::Int(IntTensor { data: picked, shape: idx.shape })])
            }
            "Cast" => {
                let to = attrs.int("to", 0)?;
                let x = self.req(node, 0)?;
                match (x, i32::try_from(to).unwrap_or(0)) {
                    (x @ Value::Float(_), data_type::FLOAT)
                    | (x @ Value::Int(_), data_type::INT64 | data_type::INT32) => Ok(vec![x]),
                    (Value::Int(t), data_type::FLOAT) => {
                        let data = t.data.iter().map(|&v| v as f32).collect();
                        one(self.graph.constant(data, t.shape))
                    }
                    _ => Err(format!("cast to data type {to} is not supported")),
                }
            }
            other => Err(format!("unsupported ONNX operator `{other}`; supported: {}", SUPPORTED.join(", "))),
        }
    }
}

/// NumPy-style `MatMul`; batch axes must all be 1 (the batch axis is fixed to 1).
fn batched_matmul(g: &mut Graph, a: NodeId, b: NodeId) -> Result<NodeId, String> {
    let (sa, sb) = (g.shape(a).clone(), g.shape(b).clone());
    if sa.len() <= 2 && sb.len() <= 2 {
        return g.matmul(a, b);
    }
    if sa.len() < 2 || sb.len() < 2 {
        return Err(format!("MatMul of {sa:?} and {sb:?}: a vector operand with a batch is not supported"));
    }
    let (ba, bb) = (&sa[..sa.len() - 2], &sb[..sb.len() - 2]);
    if numel(ba) != 1 || numel(bb) != 1 {
        return Err(format!("MatMul of {sa:?} and {sb:?}: batches of more than one matrix are not supported"));
    }
    let batch = ir::broadcast(ba, bb)?;
    let a2 = g.reshape(a, sa[sa.len() - 2..].to_vec())?;
    let b2 = g.reshape(b, sb[sb.len() - 2..].to_vec())?;
    let m = g.matmul(a2, b2)?;
    let mut out = batch;
    out.extend(g.shape(m).clone());
    g.reshape(m, out)
}

/// `Reshape`'s target: `0` copies the input's axis (unless `allowzero`), `-1` is inferred.
fn reshape_target(input: &[usize], spec: &[i64], allowzero: bool) -> Result<Shape, String> {
    let mut out = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &d) in spec.iter().enumerate() {
        match d {
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            0 if !allowzero => {
                out.push(*input.get(i).ok_or_else(|| format!("shape {spec:?} copies a missing axis {i}"))?)
            }
            d if d >= 0 => out.push(usize::try_from(d).map_err(|_| format!("dimension {d} is too large"))?),
            _ => return Err(format!("shape {spec:?} is not a valid reshape target")),
        }
    }
    let total = numel(input);
    if let Some(i) = infer {
        let known = numel(&out);
        if known == 0 || !total.is_multiple_of(known) {
            return Err(format!("cannot infer -1 in {spec:?} for {total} elements"));
        }
        out[i] = total / known;
    }
    if numel(&out) != total {
        return Err(format!("cannot reshape {input:?} into {spec:?}"));
    }
    Ok(out)
}

/// Integer arithmetic on constant shape tensors (broadcasting like the float ops).
fn int_binary(b: Binary, x: &IntTensor, y: &IntTensor) -> Result<IntTensor, String> {
    let shape = ir::broadcast(&x.shape, &y.shape)?;
    let (sx, sy, so) =
        (ir::broadcast_strides(&x.shape, &shape), ir::broadcast_strides(&y.shape, &shape), ir::strides(&shape));
    let at =
        |st: &[usize], flat: usize| st.iter().zip(&so).zip(&shape).map(|((s, o), d)| (flat / o) % d * s).sum::<usize>();
    let data = (0..numel(&shape))
        .map(|flat| {
            let (p, q) = (x.data[at(&sx, flat)], y.data[at(&sy, flat)]);
            match b {
                Binary::Add => p.checked_add(q),
                Binary::Sub => p.checked_sub(q),
                Binary::Mul => p.checked_mul(q),
                _ => p.checked_div(q),
            }
            .ok_or_else(|| format!("integer arithmetic overflows or divides by zero ({p}, {q})"))
        })
        .collect::<Result<_, _>>()?;
    Ok(IntTensor { data, shape })
}

fn int_concat(parts: &[IntTensor], ax: i64) -> Result<IntTensor, String> {
    let first = parts.first().ok_or("concatenation of nothing")?;
    let a = axis(ax, first.shape.len())?;
    let mut shape = first.shape.clone();
    for p in &parts[1..] {
        if p.shape.len() != shape.len()
            || p.shape.iter().zip(&first.shape).enumerate().any(|(i, (x, y))| i != a && x != y)
        {
            return Err(format!("cannot concatenate shapes {:?} and {:?}", first.shape, p.shape));
        }
        shape[a] += p.shape[a];
    }
    let outer = numel(&shape[..a]);
    let mut data = Vec::with_capacity(numel(&shape));
    for o in 0..outer {
        for p in parts {
            let chunk = numel(&p.shape[a..]);
            data.extend_from_slice(&p.data[o * chunk..(o + 1) * chunk]);
        }
    }
    Ok(IntTensor { data, shape })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::proto::*;
    use super::*;

    fn tensor_type(dims: &[Dimension]) -> Option<TypeProto> {
        Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: Some(data_type::FLOAT),
                shape: Some(TensorShapeProto { dim: dims.to_vec() }),
            }),
        })
    }

    fn fixed(v: i64) -> Dimension {
        Dimension { dim_value: Some(v), dim_param: None }
    }

    fn dynamic(name: &str) -> Dimension {
        Dimension { dim_value: None, dim_param: Some(name.to_owned()) }
    }

    fn value(name: &str, dims: &[Dimension]) -> ValueInfoProto {
        ValueInfoProto { name: Some(name.to_owned()), r#type: tensor_type(dims) }
    }

    fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            input: inputs.iter().map(|s| (*s).to_owned()).collect(),
            output: vec![output.to_owned()],
            name: Some(format!("{op}_0")),
            op_type: Some(op.to_owned()),
            ..Default::default()
        }
    }

    fn floats(name: &str, dims: &[i64], data: Vec<f32>) -> TensorProto {
        TensorProto {
            dims: dims.to_vec(),
            data_type: Some(data_type::FLOAT),
            float_data: data,
            name: Some(name.to_owned()),
            ..Default::default()
        }
    }

    /// x [batch, 4] → node(s) → y.
    fn model(nodes: Vec<NodeProto>, initializer: Vec<TensorProto>, opset: i64) -> ModelProto {
        ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(opset) }],
            producer_name: None,
            graph: Some(GraphProto {
                node: nodes,
                name: Some("g".to_owned()),
                initializer,
                input: vec![value("x", &[dynamic("batch"), fixed(4)])],
                output: vec![value("y", &[])],
            }),
        }
    }

    fn error_of(m: &ModelProto) -> String {
        match lower(&m.encode_to_vec()) {
            Ok(_) => panic!("the model compiled"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn relu_model_lowers_with_the_batch_fixed_to_one() {
        let m = model(vec![node("Relu", &["x"], "y")], Vec::new(), 13);
        let lowered = lower(&m.encode_to_vec()).unwrap();
        assert_eq!(lowered.input_shape, vec![1, 4]);
        assert_eq!(lowered.output_shape, vec![1, 4]);
    }

    #[test]
    fn unsupported_constructs_are_named_with_their_location() {
        let mut two_inputs = model(vec![node("Add", &["x", "z"], "y")], Vec::new(), 13);
        if let Some(g) = two_inputs.graph.as_mut() {
            g.input.push(value("z", &[fixed(1), fixed(4)]));
        }
        let mut two_outputs = model(vec![node("Relu", &["x"], "y")], Vec::new(), 13);
        if let Some(g) = two_outputs.graph.as_mut() {
            g.output.push(value("x", &[]));
        }
        let mut dynamic_inner = model(vec![node("Relu", &["x"], "y")], Vec::new(), 13);
        if let Some(g) = dynamic_inner.graph.as_mut() {
            g.input = vec![value("x", &[fixed(1), dynamic("features")])];
        }
        let mut external = floats("w", &[4], Vec::new());
        external.data_location = Some(1);
        let mut custom_domain = node("Relu", &["x"], "y");
        custom_domain.domain = Some("com.microsoft".to_owned());
        let cases: Vec<(ModelProto, &str)> = vec![
            (
                model(vec![node("Conv", &["x", "x"], "y")], Vec::new(), 13),
                "node 0 'Conv_0' (Conv): unsupported ONNX operator `Conv`",
            ),
            (model(vec![node("Relu", &["x"], "y")], Vec::new(), 11), "uses opset 11"),
            (model(vec![node("Relu", &["nope"], "y")], Vec::new(), 13), "reads tensor 'nope'"),
            (model(vec![node("Relu", &["x"], "z")], Vec::new(), 13), "output 'y' is never computed"),
            (two_inputs, "exactly one input tensor"),
            (two_outputs, "exactly one output tensor"),
            (dynamic_inner, "axis 1 is dynamic"),
            (model(vec![node("Add", &["x", "w"], "y")], vec![external], 13), "external file"),
            (model(vec![node("Add", &["x", "w"], "y")], vec![floats("w", &[3], vec![1.0; 2])], 13), "holds 2 values"),
            (model(vec![node("Add", &["x", "w"], "y")], vec![floats("w", &[3], vec![1.0; 3])], 13), "do not broadcast"),
            (model(vec![custom_domain], Vec::new(), 13), "domain"),
            (model(vec![node("MatMul", &["x", "x"], "y")], Vec::new(), 13), "matmul of shapes [1, 4] and [1, 4]"),
            (model(vec![node("Concat", &["x", "x"], "y")], Vec::new(), 13), "attribute axis is required"),
            (model(vec![node("Gather", &["x", "x"], "y")], Vec::new(), 13), "only gathers from constant 1-D integer"),
            (
                model(
                    vec![node("Reshape", &["x", "s"], "y")],
                    vec![TensorProto {
                        dims: vec![2],
                        data_type: Some(data_type::INT64),
                        int64_data: vec![-1, -1],
                        name: Some("s".to_owned()),
                        ..Default::default()
                    }],
                    13,
                ),
                "not a valid reshape target",
            ),
            (
                model(vec![node("Add", &["x", "w"], "y")], vec![floats("w", &[1 << 40, 1 << 40], Vec::new())], 13),
                "larger than",
            ),
        ];
        for (m, want) in cases {
            let got = error_of(&m);
            assert!(got.contains(want), "expected {want:?} in {got:?}");
        }
    }

    #[test]
    fn shape_plumbing_folds_to_constants() {
        // y = Reshape(x, Concat(Shape(x)[0:1], [-1])) keeps [1, 4] and emits no integer code.
        let mut gather = node("Gather", &["s", "zero"], "first");
        gather.attribute = vec![AttributeProto { name: Some("axis".to_owned()), i: Some(0), ..Default::default() }];
        let mut unsq = node("Unsqueeze", &["first", "axes"], "first1");
        unsq.attribute.clear();
        let mut concat = node("Concat", &["first1", "minus1"], "target");
        concat.attribute = vec![AttributeProto { name: Some("axis".to_owned()), i: Some(0), ..Default::default() }];
        let ints = |name: &str, dims: Vec<i64>, v: Vec<i64>| TensorProto {
            dims,
            data_type: Some(data_type::INT64),
            int64_data: v,
            name: Some(name.to_owned()),
            ..Default::default()
        };
        let m = model(
            vec![node("Shape", &["x"], "s"), gather, unsq, concat, node("Reshape", &["x", "target"], "y")],
            vec![ints("zero", Vec::new(), vec![0]), ints("axes", vec![1], vec![0]), ints("minus1", vec![1], vec![-1])],
            13,
        );
        let lowered = lower(&m.encode_to_vec()).unwrap();
        assert_eq!(lowered.output_shape, vec![1, 4]);
        assert_eq!(lowered.graph.nodes.len(), 1, "only the input node: {:?}", lowered.graph.nodes);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = lower(&bytes);
        }

        #[test]
        fn mutated_models_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let m = model(
                vec![node("Gemm", &["x", "w", "b"], "h"), node("Softmax", &["h"], "y")],
                vec![floats("w", &[4, 3], vec![0.5; 12]), floats("b", &[3], vec![0.1; 3])],
                13,
            );
            let mut bytes = m.encode_to_vec();
            for (at, v) in flips {
                let n = bytes.len();
                bytes[at % n] ^= v;
            }
            let _ = lower(&bytes);
        }
    }
}
