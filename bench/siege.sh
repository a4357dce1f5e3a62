#!/usr/bin/env bash
# The gateway under attack (release build): `/health` latency from a bystander while 8 clients
# send fresh, genuinely signed expensive tokens, and while SLOW_CLIENTS connections trickle
# headers (crates/gateway/examples/siege.rs says what each phase does).
#   bench/siege.sh [SECONDS] [SLOW_CLIENTS]   (defaults 15 and 2000; PROFILE=dev to skip release)
# Goal (issue 20): p99 <= 50 ms in both attack phases.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-15}"
SLOW="${2:-2000}"
TARGET="${CARGO_TARGET_DIR:-target}"
PROFILE="${PROFILE:-release}"
DIR="$PROFILE"; [ "$PROFILE" = dev ] && DIR=debug
cargo build -q --locked --profile "$PROFILE" -p referee --bin referee
cargo build -q --locked --profile "$PROFILE" -p referee-gateway --example siege
BIN="$TARGET/$DIR/referee"
SIEGE="$TARGET/$DIR/examples/siege"
# 2,000 slow clients and their server ends need descriptors on both sides.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

WORK="$(mktemp -d)"
cleanup() { [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
mkdir -p "$WORK/root"
"$BIN" --home "$WORK/home" serve --listen 127.0.0.1:0 --root "$WORK/root" --no-examples --json \
  >"$WORK/out" 2>/dev/null &
PID=$!
for _ in $(seq 1 600); do [ -s "$WORK/out" ] && break; sleep 0.2; done
READY="$(head -n1 "$WORK/out")"
ADDR="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["tcp"])' "$READY")"
TOKEN="$("$BIN" --home "$WORK/home" --json token create --tool fs_read --path "$WORK/root" --ttl 1h \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')"
echo "# machine: $(nproc) cores, $(uname -sr), profile $PROFILE, open files $(ulimit -n), load average $(cut -d" " -f1-3 /proc/loadavg)"
"$SIEGE" "$ADDR" "$TOKEN" "$SECS" "$SLOW"
echo "# server: $(ps -o rss=,nlwp= -p "$PID" | awk '{print $1/1024 " MiB RSS, " $2 " threads"}')"
