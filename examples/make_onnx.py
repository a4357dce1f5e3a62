"""make_onnx.py: writes examples/feanor.onnx and examples/mlp.onnx with the `onnx` package
(pip install onnx==1.19.1 numpy==2.4.6).

Both carry exactly the weights of examples/feanor.py and examples/mlp.py, so the Python
frontend, the ONNX frontend, NumPy, ONNX Runtime, tract and the plain-Rust benchmark floor all
compute the same network. mlp is laid out the way PyTorch exports a Linear stack: Gemm with
transB=1 (weights stored [out, in]) for the first layer, MatMul + Add for the second, Gemm +
Softmax for the last, and a dynamic batch axis. The output is reproducible byte for byte:
`python3 examples/make_onnx.py` rewrites the committed files unchanged.
"""
import importlib.util
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save(name, nodes, inputs, outputs, weights):
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", outputs])],
        initializer=[numpy_helper.from_array(np.asarray(a, dtype=np.float32), n) for n, a in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="referee-examples")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = os.path.join(HERE, name + ".onnx")
    onnx.save(model, path)
    print(path)


feanor = load("feanor")
save(
    "feanor",
    [
        helper.make_node("Gemm", ["x", "W", "B"], ["z"], name="dense"),
        helper.make_node("Relu", ["z"], ["y"], name="relu"),
    ],
    4,
    1,
    {"W": feanor.W, "B": feanor.B},
)

mlp = load("mlp")
save(
    "mlp",
    [
        helper.make_node("Gemm", ["x", "W1t", "B1"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("MatMul", ["a1", "W2"], ["m2"], name="fc2_matmul"),
        helper.make_node("Add", ["m2", "B2"], ["h2"], name="fc2_bias"),
        helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
        helper.make_node("Gemm", ["a2", "W3", "B3"], ["logits"], name="fc3"),
        helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=-1),
    ],
    16,
    4,
    {"W1t": mlp.W1.T, "B1": mlp.B1, "W2": mlp.W2, "B2": mlp.B2, "W3": mlp.W3, "B3": mlp.B3},
)
