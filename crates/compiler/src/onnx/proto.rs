//! The subset of the ONNX protobuf schema (`onnx.proto`, proto2 syntax) the frontend reads,
//! as prost messages. Field numbers follow the ONNX specification; fields we do not read
//! (subgraphs, sparse tensors, training info, metadata) are left out, so prost skips them as
//! unknown fields — which also means a decoded model can never nest graphs recursively.

/// `ModelProto`: the file's top-level message.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ModelProto {
    /// The IR version the file was written with.
    #[prost(int64, optional, tag = "1")]
    pub(crate) ir_version: Option<i64>,
    /// Operator sets the graph uses.
    #[prost(message, repeated, tag = "8")]
    pub(crate) opset_import: Vec<OperatorSetIdProto>,
    /// The tool that wrote the file.
    #[prost(string, optional, tag = "2")]
    pub(crate) producer_name: Option<String>,
    /// The model's computation.
    #[prost(message, optional, tag = "7")]
    pub(crate) graph: Option<GraphProto>,
}

/// `OperatorSetIdProto`: a domain and its version.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct OperatorSetIdProto {
    /// `""` or `"ai.onnx"` for the default domain.
    #[prost(string, optional, tag = "1")]
    pub(crate) domain: Option<String>,
    /// The opset version.
    #[prost(int64, optional, tag = "2")]
    pub(crate) version: Option<i64>,
}

/// `GraphProto`: nodes in topological order, initializers, inputs and outputs.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct GraphProto {
    /// The nodes.
    #[prost(message, repeated, tag = "1")]
    pub(crate) node: Vec<NodeProto>,
    /// The graph's name.
    #[prost(string, optional, tag = "2")]
    pub(crate) name: Option<String>,
    /// Constant tensors (weights).
    #[prost(message, repeated, tag = "5")]
    pub(crate) initializer: Vec<TensorProto>,
    /// Inputs (may also list initializers, in older files).
    #[prost(message, repeated, tag = "11")]
    pub(crate) input: Vec<ValueInfoProto>,
    /// Outputs.
    #[prost(message, repeated, tag = "12")]
    pub(crate) output: Vec<ValueInfoProto>,
}

/// `NodeProto`: one operator application.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct NodeProto {
    /// Input tensor names (`""` = an omitted optional input).
    #[prost(string, repeated, tag = "1")]
    pub(crate) input: Vec<String>,
    /// Output tensor names.
    #[prost(string, repeated, tag = "2")]
    pub(crate) output: Vec<String>,
    /// The node's name (for messages).
    #[prost(string, optional, tag = "3")]
    pub(crate) name: Option<String>,
    /// The operator.
    #[prost(string, optional, tag = "4")]
    pub(crate) op_type: Option<String>,
    /// The operator's domain.
    #[prost(string, optional, tag = "7")]
    pub(crate) domain: Option<String>,
    /// Attributes.
    #[prost(message, repeated, tag = "5")]
    pub(crate) attribute: Vec<AttributeProto>,
}

/// `AttributeProto`: a named attribute value (graph-valued attributes are not read).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct AttributeProto {
    /// The attribute's name.
    #[prost(string, optional, tag = "1")]
    pub(crate) name: Option<String>,
    /// Set when the attribute refers to a function's attribute (unsupported).
    #[prost(string, optional, tag = "21")]
    pub(crate) ref_attr_name: Option<String>,
    /// `AttributeType` discriminator.
    #[prost(int32, optional, tag = "20")]
    pub(crate) r#type: Option<i32>,
    /// FLOAT.
    #[prost(float, optional, tag = "2")]
    pub(crate) f: Option<f32>,
    /// INT.
    #[prost(int64, optional, tag = "3")]
    pub(crate) i: Option<i64>,
    /// STRING.
    #[prost(bytes = "vec", optional, tag = "4")]
    pub(crate) s: Option<Vec<u8>>,
    /// TENSOR.
    #[prost(message, optional, tag = "5")]
    pub(crate) t: Option<TensorProto>,
    /// FLOATS.
    #[prost(float, repeated, tag = "7")]
    pub(crate) floats: Vec<f32>,
    /// INTS.
    #[prost(int64, repeated, tag = "8")]
    pub(crate) ints: Vec<i64>,
}

/// `TensorProto`: a constant tensor.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct TensorProto {
    /// Shape.
    #[prost(int64, repeated, tag = "1")]
    pub(crate) dims: Vec<i64>,
    /// `DataType` (1 = FLOAT, 6 = INT32, 7 = INT64, 11 = DOUBLE).
    #[prost(int32, optional, tag = "2")]
    pub(crate) data_type: Option<i32>,
    /// FLOAT values (when `raw_data` is absent).
    #[prost(float, repeated, tag = "4")]
    pub(crate) float_data: Vec<f32>,
    /// INT32 values (when `raw_data` is absent).
    #[prost(int32, repeated, tag = "5")]
    pub(crate) int32_data: Vec<i32>,
    /// INT64 values (when `raw_data` is absent).
    #[prost(int64, repeated, tag = "7")]
    pub(crate) int64_data: Vec<i64>,
    /// The tensor's name.
    #[prost(string, optional, tag = "8")]
    pub(crate) name: Option<String>,
    /// Little-endian packed values.
    #[prost(bytes = "vec", optional, tag = "9")]
    pub(crate) raw_data: Option<Vec<u8>>,
    /// DOUBLE values (when `raw_data` is absent).
    #[prost(double, repeated, tag = "10")]
    pub(crate) double_data: Vec<f64>,
    /// 1 = EXTERNAL (data in another file: unsupported).
    #[prost(int32, optional, tag = "14")]
    pub(crate) data_location: Option<i32>,
}

/// `ValueInfoProto`: a graph input or output.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ValueInfoProto {
    /// The tensor's name.
    #[prost(string, optional, tag = "1")]
    pub(crate) name: Option<String>,
    /// Its type.
    #[prost(message, optional, tag = "2")]
    pub(crate) r#type: Option<TypeProto>,
}

/// `TypeProto`; only the `tensor_type` alternative of its oneof is read.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct TypeProto {
    /// A dense tensor type.
    #[prost(message, optional, tag = "1")]
    pub(crate) tensor_type: Option<TensorTypeProto>,
}

/// `TypeProto.Tensor`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct TensorTypeProto {
    /// `DataType` of the elements.
    #[prost(int32, optional, tag = "1")]
    pub(crate) elem_type: Option<i32>,
    /// Shape, when known.
    #[prost(message, optional, tag = "2")]
    pub(crate) shape: Option<TensorShapeProto>,
}

/// `TensorShapeProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct TensorShapeProto {
    /// One entry per axis.
    #[prost(message, repeated, tag = "1")]
    pub(crate) dim: Vec<Dimension>,
}

/// `TensorShapeProto.Dimension`: a fixed size or a symbolic name.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Dimension {
    /// A fixed size.
    #[prost(int64, optional, tag = "1")]
    pub(crate) dim_value: Option<i64>,
    /// A symbolic (dynamic) size such as `"batch"`.
    #[prost(string, optional, tag = "2")]
    pub(crate) dim_param: Option<String>,
}

/// `TensorProto.DataType` values the frontend reads.
pub(crate) mod data_type {
    /// 32-bit float.
    pub(crate) const FLOAT: i32 = 1;
    /// 32-bit signed integer.
    pub(crate) const INT32: i32 = 6;
    /// 64-bit signed integer.
    pub(crate) const INT64: i32 = 7;
    /// 64-bit float.
    pub(crate) const DOUBLE: i32 = 11;
}
