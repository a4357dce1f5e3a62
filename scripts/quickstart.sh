#!/usr/bin/env bash
# The end-to-end flow that works today: keys → compile + seal → verify → inspect → run → audit.
# Uses ./.referee-demo as the home (override with REFEREE_HOME); safe to run repeatedly:
# keys are kept, the muscle is re-sealed with the next version number.
set -euo pipefail
cd "$(dirname "$0")/.."

# The dev profile already optimises every dependency (wasmtime, crypto); it shares its build
# with `cargo test`, so the quickstart costs no second compile.
cargo build --locked -p referee
referee=target/debug/referee
if [ -n "${CARGO_TARGET_DIR:-}" ]; then referee="$CARGO_TARGET_DIR/debug/referee"; fi
export REFEREE_HOME="${REFEREE_HOME:-$PWD/.referee-demo}"

echo "== keys ($REFEREE_HOME)"
"$referee" keygen

# Next version = highest accepted + 1, so re-running never trips anti-rollback.
version=$(( $("$referee" trust list --json | python3 -c 'import json,sys; print(max([a["version"] for a in json.load(sys.stdin)["accepted"] if a["name"]=="feanor"] or [0]))') + 1 ))

echo "== compile and seal examples/feanor.wat (v$version, recipient mode, hybrid post-quantum)"
"$referee" compile examples/feanor.wat -o "$REFEREE_HOME/feanor.muscle" --version "$version" \
  --mode recipient --pq --input-shape 1,4 --output-shape 1,1

echo "== verify (signature, binding, anti-rollback, decrypt, code hash) and accept"
"$referee" verify "$REFEREE_HOME/feanor.muscle" --accept

echo "== inspect (header only, no keys needed)"
"$referee" inspect "$REFEREE_HOME/feanor.muscle"

echo "== run it in an isolated cell"
"$referee" run "$REFEREE_HOME/feanor.muscle" --input '[1, 2, 3, 4]'

echo "== the audit log (hash chain intact?)"
"$referee" audit verify
