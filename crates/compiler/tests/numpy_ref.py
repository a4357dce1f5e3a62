"""numpy_ref.py: the independent reference for the compiler's equivalence tests.

Reads a JSON list of jobs on stdin and prints a JSON list of results. Each job:
  {"model": "/path/model.py", "shape": [1, 4], "inputs": [[...], ...]}            -> forward outputs
  {"model": ..., "shape": ..., "inputs": [...], "targets": [...], "loss": "mse"}  -> losses
  {"model": examples/mlp.py, "sgd_mlp": lr, "inputs": [...], "targets": [...], "probe": [...]}
      -> {"losses": [loss before each step], "probe": forward(probe) after the last step}:
         plain SGD on the mlp's W1..B3 with hand-written backpropagation (see sgd_mlp)
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


def mlp_layers(p, x):
    z1 = x @ p["W1"] + p["B1"]
    h1 = np.maximum(z1, np.float32(0))
    z2 = h1 @ p["W2"] + p["B2"]
    h2 = np.maximum(z2, np.float32(0))
    return z1, h1, z2, h2, h2 @ p["W3"] + p["B3"]


def mlp_step(p, x, y, lr):
    """One SGD step on examples/mlp.py's 16 -> 64 -> 64 -> 4 network (parameters `p`, float32),
    cross-entropy on the logits, gradients derived by hand (not by our compiler). Returns the
    loss before the step."""
    z1, h1, z2, h2, z3 = mlp_layers(p, x)
    zs = z3 - z3.max(axis=-1, keepdims=True)
    logp = zs - np.log(np.exp(zs).sum(axis=-1, keepdims=True))
    loss = float(-(y * logp).sum())
    # d(-sum(y * log softmax(z)))/dz = softmax(z) * sum(y) - y
    g3 = np.exp(logp) * y.sum(axis=-1, keepdims=True) - y
    g2 = (g3 @ p["W3"].T) * (z2 > 0)
    g1 = (g2 @ p["W2"].T) * (z1 > 0)
    grads = {"W3": h2.T @ g3, "B3": g3.sum(axis=0), "W2": h1.T @ g2, "B2": g2.sum(axis=0), "W1": x.T @ g1, "B1": g1.sum(axis=0)}
    for k, g in grads.items():
        p[k] = p[k] - lr * g.astype(np.float32)
    return loss


def mlp_params(m):
    return {k: np.array(getattr(m, k), dtype=np.float32) for k in ("W1", "B1", "W2", "B2", "W3", "B3")}


def sgd_mlp(m, job):
    """SGD, one step per (input, target) pair, then the probe's class probabilities."""
    p = mlp_params(m)
    lr = np.float32(job["sgd_mlp"])
    losses = [
        mlp_step(p, np.array(x, dtype=np.float32).reshape(1, 16), np.array(y, dtype=np.float32).reshape(1, 4), lr)
        for x, y in zip(job["inputs"], job["targets"])
    ]
    z3 = mlp_layers(p, np.array(job["probe"], dtype=np.float32).reshape(1, 16))[-1]
    e = np.exp(z3 - z3.max(axis=-1, keepdims=True))
    return {"losses": losses, "probe": (e / e.sum(axis=-1, keepdims=True)).astype(np.float64).ravel().tolist()}


def run(job):
    m = load(job["model"])
    if "sgd_mlp" in job:
        return sgd_mlp(m, job)
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


if __name__ == "__main__":
    print(json.dumps([run(job) for job in json.load(sys.stdin)]))
