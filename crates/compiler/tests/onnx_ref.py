"""onnx_ref.py: the independent reference for the ONNX frontend's equivalence tests.

Usage:
  python3 onnx_ref.py family OUT_DIR SEED ROUNDS
      Builds a family of ONNX models with the `onnx` package — every supported operator, random
      shapes and weights from SEED — writes them to OUT_DIR, and prints a JSON list of
      {"model": path, "ops": [...], "shape": input shape, "inputs": [...], "outputs": [...]}
      where the outputs come from ONNX Runtime.
  python3 onnx_ref.py run < jobs.json
      Each job {"model": path, "shape": [...], "inputs": [[...], ...]} -> ONNX Runtime outputs.
Needs: pip install onnx==1.19.1 onnxruntime==1.23.2 numpy==2.4.6
"""
import json
import os
import sys

try:
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
except ImportError as e:
    sys.stderr.write("%s: pip install onnx==1.19.1 onnxruntime==1.23.2 numpy==2.4.6\n" % e)
    sys.exit(3)


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def evaluate(path, shape, inputs):
    s = session(path)
    name = s.get_inputs()[0].name
    return [
        s.run(None, {name: np.array(flat, dtype=np.float32).reshape(shape)})[0].astype(np.float64).ravel().tolist()
        for flat in inputs
    ]


class Builder:
    """One model: nodes, initializers, a float input [1, ...] with a dynamic batch axis."""

    def __init__(self, rng, shape):
        self.rng, self.shape, self.nodes, self.inits, self.n = rng, shape, [], [], 0

    def name(self, prefix):
        self.n += 1
        return "%s%d" % (prefix, self.n)

    def weight(self, shape, scale=0.5):
        name = self.name("w")
        self.inits.append(numpy_helper.from_array((self.rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def ints(self, values):
        name = self.name("i")
        self.inits.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    def op(self, op_type, inputs, **attrs):
        out = self.name("t")
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type.lower() + "_"), **attrs))
        return out

    def save(self, path, out):
        dims = ["batch"] + list(self.shape[1:])
        graph = helper.make_graph(
            self.nodes,
            "family",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
            initializer=self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        # The output's shape is whatever the operators make of the random input: let ONNX's
        # own shape inference fill it in, then hold the model to the checker.
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
        out_type = model.graph.output[0].type.tensor_type
        if not out_type.HasField("shape"):
            # Data-dependent shapes (Reshape of a computed target): learn the rank from ONNX
            # Runtime and declare symbolic dimensions.
            onnx.save(model, path)
            y = session(path).run(None, {"x": np.zeros(self.shape, dtype=np.float32)})[0]
            out_type.shape.dim.extend([onnx.TensorShapeProto.Dimension(dim_param="d%d" % i) for i in range(y.ndim)])
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, path)


def dim(rng, lo=1, hi=9):
    return int(rng.integers(lo, hi))


def gemm_relu(b, rng):
    k, n = b.shape[1], dim(rng, 1, 20)
    y = b.op("Gemm", ["x", b.weight((n, k)), b.weight((n,))], transB=1, alpha=float(rng.uniform(0.5, 1.5)), beta=0.75)
    return b.op("Relu", [y])


def gemm_trans_a(b, rng):
    # x [1, k] -> transpose to [k, 1]; Gemm(transA=1) computes x @ W for W [k, n].
    k, n = b.shape[1], dim(rng)
    t = b.op("Transpose", ["x"], perm=[1, 0])
    return b.op("Gemm", [t, b.weight((k, n))], transA=1)


def matmul_bias_leaky(b, rng):
    k, n = b.shape[1], dim(rng, 1, 20)
    m = b.op("MatMul", ["x", b.weight((k, n))])
    a = b.op("Add", [m, b.weight((n,))])
    return b.op("LeakyRelu", [a], alpha=float(rng.uniform(0.01, 0.3)))


def arithmetic(b, rng):
    k = b.shape[1]
    s = b.op("Sub", ["x", b.weight((k,))])
    m = b.op("Mul", [s, b.weight((1, k))])
    d = b.op("Div", [m, b.op("Add", [b.op("Abs", [b.weight((k,))]), b.op("Constant", [], value_float=0.5)])])
    return b.op("Neg", [d])


def transcendental(b, rng):
    t = b.op("Tanh", [b.op("Sigmoid", ["x"])])
    e = b.op("Exp", [b.op("Neg", [b.op("Abs", ["x"])])])
    l = b.op("Log", [b.op("Add", [b.op("Sqrt", [b.op("Abs", ["x"])]), b.op("Constant", [], value_float=1.0)])])
    return b.op("Add", [b.op("Add", [t, e]), l])


def softmaxes(b, rng):
    y = b.op("Softmax", ["x"], axis=-1)
    z = b.op("LogSoftmax", ["x"], axis=int(rng.choice([-1, len(b.shape) - 1])))
    return b.op("Add", [y, z])


def softmax_inner_axis(b, rng):
    return b.op("Softmax", ["x"], axis=1)


def clip(b, rng):
    lo, hi = sorted(rng.uniform(-1, 1, 2).astype(np.float32))
    lo_n = b.name("lo")
    b.inits.append(numpy_helper.from_array(np.array(lo, dtype=np.float32), lo_n))
    hi_n = b.name("hi")
    b.inits.append(numpy_helper.from_array(np.array(hi, dtype=np.float32), hi_n))
    one_sided = b.op("Clip", ["x", "", hi_n])
    return b.op("Add", [b.op("Clip", ["x", lo_n, hi_n]), one_sided])


def flatten_gemm(b, rng):
    f = b.op("Flatten", ["x"], axis=1)
    n, k = dim(rng), int(np.prod(b.shape[1:]))
    return b.op("Gemm", [f, b.weight((k, n)), b.weight((1, n))])


def shape_plumbing_reshape(b, rng):
    # The exporter's flatten: Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])).
    s = b.op("Shape", ["x"])
    first = b.op("Gather", [s, b.ints(0)], axis=0)
    u = b.op("Unsqueeze", [first, b.ints([0])])
    target = b.op("Concat", [u, b.ints([-1])], axis=0)
    r = b.op("Reshape", ["x", target])
    return b.op("Identity", [r])


def transpose_reshape(b, rng):
    t = b.op("Transpose", ["x"], perm=[0] + list(reversed(range(1, len(b.shape)))))
    return b.op("Reshape", [t, b.ints([1, -1])])


def squeeze_unsqueeze(b, rng):
    u = b.op("Unsqueeze", ["x", b.ints([1, -1])])
    s = b.op("Squeeze", [u, b.ints([1])])
    return b.op("Squeeze", [b.op("Relu", [s]), b.ints([-1])])


def concat(b, rng):
    axis = int(rng.integers(1, len(b.shape)))
    other = list(b.shape)
    other[axis] = dim(rng)
    return b.op("Concat", ["x", b.op("Tanh", ["x"]), b.weight(other)], axis=axis)


def matmul_3d(b, rng):
    k, n = b.shape[-1], dim(rng)
    return b.op("MatMul", ["x", b.weight((1, k, n))])


def constant_tensor(b, rng):
    k = b.shape[1]
    value = numpy_helper.from_array((rng.standard_normal(k)).astype(np.float32), "v")
    c = b.op("Constant", [], value=value)
    return b.op("Mul", ["x", c])


def cast_shape_arithmetic(b, rng):
    # Integer shape arithmetic folded at compile time, then a Cast to float used as a scale.
    s = b.op("Shape", ["x"])
    k = b.op("Gather", [s, b.ints([1])], axis=0)
    twice = b.op("Mul", [k, b.ints([2])])
    scale = b.op("Cast", [b.op("Sub", [twice, k])], to=TensorProto.FLOAT)
    return b.op("Div", ["x", scale])


# (name, rank of x (2 or 3), builder)
FAMILY = [
    ("gemm_relu", 2, gemm_relu),
    ("gemm_trans_a", 2, gemm_trans_a),
    ("matmul_bias_leaky", 2, matmul_bias_leaky),
    ("arithmetic", 2, arithmetic),
    ("transcendental", 3, transcendental),
    ("softmaxes", 3, softmaxes),
    ("softmax_inner_axis", 3, softmax_inner_axis),
    ("clip", 2, clip),
    ("flatten_gemm", 3, flatten_gemm),
    ("shape_plumbing_reshape", 3, shape_plumbing_reshape),
    ("transpose_reshape", 3, transpose_reshape),
    ("squeeze_unsqueeze", 2, squeeze_unsqueeze),
    ("concat", 3, concat),
    ("matmul_3d", 3, matmul_3d),
    ("constant_tensor", 2, constant_tensor),
    ("cast_shape_arithmetic", 2, cast_shape_arithmetic),
]


def family(out_dir, seed, rounds):
    rng = np.random.default_rng(seed)
    jobs = []
    for r in range(rounds):
        for name, rank, build in FAMILY:
            shape = [1] + [dim(rng) for _ in range(rank - 1)]
            b = Builder(rng, shape)
            out = build(b, rng)
            path = os.path.join(out_dir, "%s_%d.onnx" % (name, r))
            b.save(path, out)
            inputs = [(rng.standard_normal(int(np.prod(shape))) * 2).astype(np.float32).tolist() for _ in range(4)]
            ops = sorted({n.op_type for n in b.nodes})
            jobs.append({"model": path, "ops": ops, "shape": shape, "inputs": inputs, "outputs": evaluate(path, shape, inputs)})
    return jobs


if __name__ == "__main__":
    if sys.argv[1] == "family":
        print(json.dumps(family(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    else:
        print(json.dumps([evaluate(j["model"], j["shape"], j["inputs"]) for j in json.load(sys.stdin)]))
