#!/usr/bin/env bash
# The README's run command: builds the referee and runs `referee serve` with its embedded
# defaults — data directory $REFEREE_HOME (default ~/.referee) with keys and an embedded store,
# the bundled example muscles, 127.0.0.1:8080 and a Unix socket in the data directory. It
# prints an admin token and example calls. Extra arguments go to `referee serve`
# (`--listen ADDR`, `--root DIR`, `--config FILE`, ...; see `referee serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."

# The dev profile optimises every dependency (wasmtime, crypto, the HTTP stack) and shares
# its build with `cargo test`.
cargo build --locked -q -p referee
exec "${CARGO_TARGET_DIR:-target}/debug/referee" serve "$@"
