#!/usr/bin/env bash
# The whole test suite, with the independent reference implementations the tests compare
# against: NumPy (muscle compiler) and the Python `noiseprotocol` package (neural-comm interop).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check numpy==2.4.6 noiseprotocol==0.3.1
# The neural-comm tests hold 1,000 connections (2 fds each) in one process.
ulimit -n 4096 2>/dev/null || true
cargo test --workspace --locked "$@"
