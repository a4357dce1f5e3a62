#!/usr/bin/env bash
# The mesh under hostile peers (issue 21), against the release `referee comm listen`:
#   1. an allowed peer's handshake latency (XX and IK), p50/p99, alone and while 2,000 hostile
#      sockets connect and stall (examples/bench_admission);
#   2. the listener's peak RSS under each flood of the attack (crates/comm/tests/interop/
#      hostile.py), against the budget one peer may pin (2 x Config::peer_buffer_bytes = 80 MiB)
#      plus the issue's 32 MiB allowance.
#   bench/comm-hostile.sh [SAMPLES] [HOSTILE]   (defaults 500 and 2000)
set -euo pipefail
cd "$(dirname "$0")/.."
SAMPLES="${1:-500}"
HOSTILE="${2:-2000}"
TARGET="${CARGO_TARGET_DIR:-target}"
cargo build -q --release -p referee
cargo build -q --release -p referee-comm --example bench_admission
BIN="$TARGET/release/referee"
HOSTILE_PY="crates/comm/tests/interop/hostile.py"

WORK="$(mktemp -d)"
cleanup() { [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null; [ -n "${APID:-}" ] && kill "$APID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
ulimit -n 20000 2>/dev/null || true
echo "# machine: $(nproc) cores, $(uname -sr), load average $(cut -d" " -f1-3 /proc/loadavg)"

"$BIN" --json comm keygen --out "$WORK/server.key" > /dev/null
ID="$("$BIN" --json comm id --identity "$WORK/server.key" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')"
listen() {
    "$BIN" --json comm listen tcp://127.0.0.1:0 --allow-any --identity "$WORK/server.key" > "$WORK/listen" &
    PID=$!
    for _ in $(seq 1 100); do [ -s "$WORK/listen" ] && break; sleep 0.1; done
    ADDR="$(head -n 1 "$WORK/listen" | python3 -c 'import json,sys; print(json.load(sys.stdin)["listening"][6:])')"
}
rss_mib() { awk '/VmRSS/ {print int($2 / 1024)}' "/proc/$1/status"; }

echo "## handshake latency of an allowed peer"
listen
"$TARGET/release/examples/bench_admission" "$ADDR" "$ID" "$SAMPLES" "$HOSTILE"
echo "listener RSS after the flood: $(rss_mib "$PID") MiB"
kill "$PID"; wait "$PID" 2>/dev/null || true; PID=

echo "## listener memory under each flood (one allowed peer; budget 80 MiB + 32 MiB allowance)"
for flood in "frag-hold 48" "big-requests 40" "slow-reader 3000"; do
    listen
    sleep 0.3
    base="$(rss_mib "$PID")"
    # shellcheck disable=SC2086
    HOSTILE_HOLD=3600 python3 "$HOSTILE_PY" ${flood%% *} "$ADDR" "$ID" ${flood##* } < /dev/null > "$WORK/attack" &
    APID=$!
    peak="$base"
    for _ in $(seq 1 150); do
        r="$(rss_mib "$PID")"; [ "$r" -gt "$peak" ] && peak="$r"
        grep -q holding "$WORK/attack" 2>/dev/null && break
        sleep 0.1
    done
    for _ in $(seq 1 20); do r="$(rss_mib "$PID")"; [ "$r" -gt "$peak" ] && peak="$r"; sleep 0.1; done
    echo "$flood: $(grep holding "$WORK/attack" || echo 'still sending'); listener base $base MiB, peak $peak MiB, growth $((peak - base)) MiB (limit 112)"
    kill "$APID" 2>/dev/null || true; wait "$APID" 2>/dev/null || true; APID=
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
done
