#!/usr/bin/env bash
# Durable worknode writes (issue 15): what answering only after the commit costs.
#   1. in process (examples/bench_durable): durable `System::update(..).wait()` vs fire and
#      forget (`update_detached`, timed until the store has every update) with 1, 16 and 256
#      writer threads on one worknode, and redb's raw rate (one fsync'd commit per event);
#   2. through the gateway: `node_update` over the Unix socket with 1, 16 and 256 keep-alive
#      connections (examples/load, closed loop), all on one worknode, against `node_get` of the
#      same worknode (the gateway's rate for a call that writes nothing).
#   bench/worknode-durable.sh [SECONDS]   (default 5; the store is on the disk of the current
#                                          directory's filesystem)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-5}"
TARGET="${CARGO_TARGET_DIR:-target}"
cargo build -q --release -p referee -p referee-gateway --example load
cargo build -q --release -p referee-worknode --no-default-features --example bench_durable
BIN="$TARGET/release/referee"
LOAD="$TARGET/release/examples/load"

WORK="$(mktemp -d -p "$PWD" .bench-durable.XXXXXX)"
cleanup() { [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
echo "# machine: $(nproc) cores, $(uname -sr), load average $(cut -d" " -f1-3 /proc/loadavg)"
echo "## in process"
"$TARGET/release/examples/bench_durable" --seconds "$SECS" --dir "$WORK"

echo "## gateway, Unix socket"
mkdir -p "$WORK/root"
"$BIN" --home "$WORK/home" serve --no-tcp --root "$WORK/root" --rate 0 > "$WORK/ready" 2>/dev/null &
PID=$!
for _ in $(seq 1 600); do [ -s "$WORK/ready" ] && break; sleep 0.1; done
READY="$(head -n 1 "$WORK/ready")"
SOCK="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["unix"])' "$READY")"
ADMIN="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["admin_token"])' "$READY")"
curl -s --unix-socket "$SOCK" -H "authorization: Bearer $ADMIN" -H 'content-type: application/json' \
    -d '{"path":"/bench"}' http://localhost/v1/tools/node_create > /dev/null
UPDATE='{"path":"/bench","field":"hits","op":"grow","args":["1"]}'
GET='{"path":"/bench"}'
for c in 1 16 256; do
    echo "node_update durable, $c connections: $("$LOAD" unix "$SOCK" "$c" "$SECS" /v1/tools/node_update "$ADMIN" "$UPDATE")"
    echo "node_get (no write), $c connections: $("$LOAD" unix "$SOCK" "$c" "$SECS" /v1/tools/node_get "$ADMIN" "$GET")"
done
echo "# load average after: $(cut -d" " -f1-3 /proc/loadavg)"
