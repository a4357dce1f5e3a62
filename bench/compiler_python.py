"""compiler_python.py: NumPy and ONNX Runtime latency for the bundled examples, for the
side-by-side table of BENCHMARKS.md (run by bench/compiler.sh).

Same networks as the muscles: examples/feanor.py and mlp.py under NumPy, examples/feanor.onnx
and mlp.onnx under ONNX Runtime (one intra-op thread, like a referee cell), the same inputs as
bench/compiler/benches/forward.rs. Prints one JSON object: {"<group>/<name>/<impl>": ns, ...}.
Needs: pip install numpy==2.4.6 onnx==1.19.1 onnxruntime==1.23.2
"""
import importlib.util
import json
import os
import sys
import timeit

import numpy as np
import onnxruntime as ort

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
EXAMPLES = os.path.join(ROOT, "examples")


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def per_call_ns(fn):
    """Median over 7 repeats of the mean time per call, in nanoseconds."""
    timer = timeit.Timer(fn)
    n, _ = timer.autorange()
    return sorted(t / n * 1e9 for t in timer.repeat(repeat=7, number=n))[3]


def main():
    x4 = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    x16 = (np.arange(16, dtype=np.float32) / 16.0 - 0.5).reshape(1, 16)
    y4 = [0.0, 0.0, 1.0, 0.0]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    results = {}
    for name, x in (("feanor", x4), ("mlp", x16)):
        module = load(os.path.join(EXAMPLES, name + ".py"), name)
        session = ort.InferenceSession(os.path.join(EXAMPLES, name + ".onnx"), opts, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x}
        assert np.allclose(session.run(None, feed)[0], module.forward(x), atol=1e-5), name
        results["forward/%s/numpy" % name] = per_call_ns(lambda: module.forward(x))
        results["forward/%s/onnxruntime" % name] = per_call_ns(lambda: session.run(None, feed))
    # The training step, written by hand in NumPy (the reference the tests compare against).
    ref = load(os.path.join(ROOT, "crates", "compiler", "tests", "numpy_ref.py"), "numpy_ref")
    mlp = load(os.path.join(EXAMPLES, "mlp.py"), "mlp")
    params, y = ref.mlp_params(mlp), np.array([y4], dtype=np.float32)
    results["train/mlp/numpy"] = per_call_ns(lambda: ref.mlp_step(params, x16, y, np.float32(0.0)))
    json.dump(results, sys.stdout)
    print()


if __name__ == "__main__":
    main()
