#!/usr/bin/env bash
# The whole test suite, with the independent reference implementations the tests compare
# against — NumPy and ONNX Runtime (muscle compiler), the Python `noiseprotocol` package
# (neural-comm interop), the official Python MCP client (gateway) — and bubblewrap, the
# sandbox of the gateway's `exec` tool.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check \
    numpy==2.4.6 noiseprotocol==0.3.1 onnx==1.19.1 onnxruntime==1.23.2 mcp==2.3.0
if ! command -v bwrap >/dev/null; then
    apt-get update -qq && apt-get install -y -qq bubblewrap
fi
# The neural-comm tests hold 1,000 connections (2 fds each) in one process.
ulimit -n 4096 2>/dev/null || true
cargo test --workspace --locked "$@"
