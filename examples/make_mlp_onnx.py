"""make_mlp_onnx.py: writes examples/mlp.onnx with the `onnx` package (pip install onnx==1.19.1).

The same network as examples/mlp.py — 16 → 64 → 64 → 4, ReLU, softmax — laid out the way
PyTorch exports it: Gemm with transB=1 for the first layer, MatMul + Add for the second, Gemm +
Softmax for the last, and a dynamic batch axis. Weights come from a fixed seed, so the file is
reproducible: `python3 examples/make_mlp_onnx.py` rewrites the committed file byte for byte.
"""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

rng = np.random.default_rng(2026)


def weights(shape, fan_in):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


w1 = weights((64, 16), 16)  # stored [out, in]: Gemm transB=1, like torch.nn.Linear
b1 = (rng.standard_normal(64) * 0.1).astype(np.float32)
w2 = weights((64, 64), 64)  # stored [in, out]: MatMul
b2 = (rng.standard_normal(64) * 0.1).astype(np.float32)
w3 = weights((64, 4), 64)
b3 = (rng.standard_normal(4) * 0.1).astype(np.float32)

nodes = [
    helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1),
    helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
    helper.make_node("MatMul", ["a1", "w2"], ["m2"], name="fc2_matmul"),
    helper.make_node("Add", ["m2", "b2"], ["h2"], name="fc2_bias"),
    helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
    helper.make_node("Gemm", ["a2", "w3", "b3"], ["logits"], name="fc3"),
    helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
]
graph = helper.make_graph(
    nodes,
    "mlp",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
    [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 4])],
    initializer=[numpy_helper.from_array(a, n) for a, n in [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (w3, "w3"), (b3, "b3")]],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="referee-examples")
model.ir_version = 8
onnx.checker.check_model(model)
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mlp.onnx")
onnx.save(model, out)
print(out)
