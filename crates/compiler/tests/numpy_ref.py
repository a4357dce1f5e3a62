"""numpy_ref.py: the independent reference for the compiler's equivalence tests.

Reads a JSON list of jobs on stdin and prints a JSON list of results. Each job:
  {"model": "/path/model.py", "shape": [1, 4], "inputs": [[...], ...]}            -> forward outputs
  {"model": ..., "shape": ..., "inputs": [...], "targets": [...], "loss": "mse"}  -> losses
The model file is imported as a module with its directory as the working directory (so
np.load("x.npy") resolves like the compiler's), and evaluated by NumPy itself.
"""
import importlib.util
import json
import os
import sys

try:
    import numpy as np
except ImportError:
    sys.stderr.write("numpy is missing: pip install numpy==2.4.6\n")
    sys.exit(3)


def load(path, cache={}):
    if path not in cache:
        here = os.getcwd()
        os.chdir(os.path.dirname(path))
        try:
            spec = importlib.util.spec_from_file_location("model_%d" % len(cache), path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            os.chdir(here)
        cache[path] = module
    return cache[path]


def run(job):
    m = load(job["model"])
    shape = job["shape"]
    out = []
    for i, flat in enumerate(job["inputs"]):
        x = np.array(flat, dtype=np.float32).reshape(shape)
        if "loss" not in job:
            out.append(np.asarray(m.forward(x), dtype=np.float64).ravel().tolist())
            continue
        y = np.array(job["targets"][i], dtype=np.float64)
        if job["loss"] == "mse":
            pred = np.asarray(m.forward(x), dtype=np.float64).ravel()
            out.append(float(np.mean((pred - y) ** 2)))
        else:
            z = np.asarray((m.logits if hasattr(m, "logits") else m.forward)(x), dtype=np.float64)
            y = y.reshape(z.shape)
            zs = z - z.max(axis=-1, keepdims=True)
            logp = zs - np.log(np.exp(zs).sum(axis=-1, keepdims=True))
            rows = z.size // z.shape[-1]
            out.append(float(-(y * logp).sum() / rows))
    return out


print(json.dumps([run(job) for job in json.load(sys.stdin)]))
