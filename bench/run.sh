#!/usr/bin/env bash
# Gateway benchmarks (release build): fs_read of a small file and a muscle invoke over TCP
# keep-alive (wrk, and our closed-loop loader) and over the Unix socket (our loader; wrk
# cannot reach a socket); MCP tool calls over Streamable HTTP; MCP over stdio against the
# reference @modelcontextprotocol/server-filesystem, same client (examples/mcp_load, Rust,
# many requests in flight, so the client is not the bottleneck), same file, same run, and
# against examples/mcp_floor: the least an MCP answer over stdio costs here (no checks).
#   apt-get install -y wrk
#   npm install --prefix bench/node @modelcontextprotocol/server-filesystem@2026.8.31
#   pip install mcp==2.3.0
#   bench/run.sh [SECONDS]   (default 10; PROFILE=dev to skip the release build)
#   ONLY=mcp bench/run.sh    (only MCP over stdio with examples/mcp_load, ours and the
#                             reference in the same run; no wrk, no Python client)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-10}"
TARGET="${CARGO_TARGET_DIR:-target}"
REF="${REF_SERVER:-bench/node/node_modules/@modelcontextprotocol/server-filesystem/dist/index.js}"
ONLY="${ONLY:-all}"
[ "$ONLY" = mcp ] || command -v wrk >/dev/null || { echo "wrk missing: apt-get install -y wrk" >&2; exit 1; }
[ -f "$REF" ] || { echo "reference server missing: npm install --prefix bench/node @modelcontextprotocol/server-filesystem@2026.8.31" >&2; exit 1; }
PROFILE="${PROFILE:-release}"
DIR="$PROFILE"; [ "$PROFILE" = dev ] && DIR=debug
cargo build -q --profile "$PROFILE" -p referee
cargo build -q --profile "$PROFILE" -p referee-gateway --example load --example mcp_load --example mcp_floor
BIN="$TARGET/$DIR/referee"
LOAD="$TARGET/$DIR/examples/load"
MCP_LOAD="$TARGET/$DIR/examples/mcp_load"
FLOOR="$TARGET/$DIR/examples/mcp_floor"

WORK="$(mktemp -d)"
cleanup() { [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
mkdir -p "$WORK/root"
head -c 1024 /dev/zero | tr '\0' 'x' > "$WORK/root/small.txt"   # a 1 KiB text file
FILE="$(cd "$WORK/root" && pwd -P)/small.txt"

READ_BODY="{\"path\":\"$FILE\"}"
echo "# machine: $(nproc) cores, $(uname -sr), profile $PROFILE, load average $(cut -d" " -f1-3 /proc/loadavg)"
if [ "$ONLY" != mcp ]; then
"$BIN" --home "$WORK/home" serve --listen 127.0.0.1:0 --root "$WORK/root" --rate 0 --json \
  >"$WORK/out" 2>/dev/null &
PID=$!
for _ in $(seq 1 600); do [ -s "$WORK/out" ] && break; sleep 0.2; done
READY="$(head -n1 "$WORK/out")"
field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$READY" "$1"; }
ADDR="$(field tcp)"; SOCK="$(field unix)"; TOKEN="$(field admin_token)"

INVOKE_BODY='{"input":[1,2,3,4]}'
MCP_BODY="{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"fs_read\",\"arguments\":{\"path\":\"$FILE\"}}}"

wrk_post() { # path body
  cat > "$WORK/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '$2'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $TOKEN"
LUA
  echo "## wrk -t2 -c64 -d${SECS}s --latency POST $1"
  wrk -t2 -c64 -d"${SECS}s" --latency -s "$WORK/post.lua" "http://$ADDR$1" | grep -E "Requests/sec|Non-2xx|50%|99%|requests in"
}

wrk_post /v1/tools/fs_read "$READ_BODY"
wrk_post /v1/muscles/feanor/invoke "$INVOKE_BODY"
for kind in tcp unix; do
  target="$ADDR"; [ "$kind" = unix ] && target="$SOCK"
  echo "## load $kind 64 connections: fs_read";      "$LOAD" "$kind" "$target" 64 "$SECS" /v1/tools/fs_read "$TOKEN" "$READ_BODY"
  echo "## load $kind 64 connections: muscle invoke"; "$LOAD" "$kind" "$target" 64 "$SECS" /v1/muscles/feanor/invoke "$TOKEN" "$INVOKE_BODY"
  echo "## load $kind 1 connection: fs_read (latency)"; "$LOAD" "$kind" "$target" 1 "$SECS" /v1/tools/fs_read "$TOKEN" "$READ_BODY"
done
echo "## MCP Streamable HTTP tools/call fs_read, 64 connections"
"$LOAD" tcp "$ADDR" 64 "$SECS" /mcp "$TOKEN" "$MCP_BODY"
kill -TERM "$PID"; wait "$PID" || true; PID=
fi

echo "## MCP stdio, examples/mcp_load (Rust, newline-delimited JSON-RPC), same 1 KiB file"
OURS=(-- "$BIN" --home "$WORK/home" mcp --no-examples --root "$WORK/root")
THEIRS=(-- node "$REF" "$WORK/root")
for K in 1 32; do
  echo "# $K in flight"
  echo -n "referee mcp:        "; "$MCP_LOAD" $((K == 1 ? 20000 : 200000)) "$K" fs_read "$READ_BODY" "${OURS[@]}"
  echo -n "server-filesystem:  "; "$MCP_LOAD" $((K == 1 ? 5000 : 30000)) "$K" read_text_file "$READ_BODY" "${THEIRS[@]}"
  echo -n "floor (no checks):  "; "$MCP_LOAD" $((K == 1 ? 20000 : 200000)) "$K" fs_read "$READ_BODY" -- "$FLOOR"
done
N=1000
[ "$ONLY" = mcp ] && { echo "# load average after: $(cut -d" " -f1-3 /proc/loadavg)"; exit 0; }
echo "## MCP stdio, official Python SDK client, $N sequential reads"
echo -n "referee mcp:        "; python3 bench/mcp_stdio.py $N fs_read "$READ_BODY" "${OURS[@]}" 2>&1 | tail -n1
echo -n "server-filesystem:  "; python3 bench/mcp_stdio.py $N read_text_file "$READ_BODY" "${THEIRS[@]}" 2>&1 | tail -n1
echo "# load average after: $(cut -d" " -f1-3 /proc/loadavg)"
