#!/usr/bin/env bash
# Side-by-side latency of the bundled examples: muscles (compiled from .py and from .onnx, run in
# the real runtime), the plain-Rust floor, tract, NumPy and ONNX Runtime, in one run.
# Prints a markdown table for BENCHMARKS.md. Needs python3 with numpy, onnx and onnxruntime:
#   pip install numpy==2.4.6 onnx==1.19.1 onnxruntime==1.23.2
# Environment: MEASUREMENT_SECONDS (criterion measurement time per benchmark, default 3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CARGO_TARGET_DIR:-${root}/bench/compiler/target}"
seconds="${MEASUREMENT_SECONDS:-3}"

(cd "${root}/bench/compiler" && CARGO_TARGET_DIR="${target}" cargo bench --locked --bench forward -- \
    --warm-up-time 1 --measurement-time "${seconds}" >&2)
python_json="$(python3 "${root}/bench/compiler_python.py")"

CRITERION="${target}/criterion" PYTHON_JSON="${python_json}" python3 - <<'PY'
import json, os

crit = os.environ["CRITERION"]
results = json.loads(os.environ["PYTHON_JSON"])
for group in ("forward", "train"):
    for entry in sorted(os.listdir(os.path.join(crit, group))):
        path = os.path.join(crit, group, entry, "new", "estimates.json")
        if os.path.exists(path):
            with open(path) as f:
                results["%s/%s" % (group, entry.replace("_", "/", 1))] = json.load(f)["median"]["point_estimate"]

def fmt(ns):
    return "%.0f ns" % ns if ns < 1000 else "%.2f µs" % (ns / 1000)

impls = ["muscle-py", "muscle-onnx", "native", "tract", "numpy", "onnxruntime", "muscle-canonical"]
print("| benchmark | " + " | ".join(impls) + " | muscle / native | tract / muscle |")
print("|---|" + "---|" * (len(impls) + 2))
for bench in ("forward/feanor", "forward/mlp", "train/mlp"):
    row = [results.get("%s/%s" % (bench, i)) for i in impls]
    muscle, native, tract = row[0], row[2], row[3]
    ratio = lambda a, b: "%.2f×" % (a / b) if a and b else "—"
    print("| %s | %s | %s | %s |" % (bench, " | ".join(fmt(v) if v else "—" for v in row), ratio(muscle, native), ratio(tract, muscle)))
PY
