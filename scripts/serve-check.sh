#!/usr/bin/env bash
# CI check of the README's run command: `scripts/serve.sh` in a fresh data directory on an
# ephemeral port; waits for the ready line, calls /health and a bundled muscle over TCP and
# the Unix socket with the printed admin token, then stops it with SIGTERM (graceful drain).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/serve-bg.sh
work="$(mktemp -d)"
trap 'kill "${serve_pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
start_serve "$work" --listen 127.0.0.1:0
base="http://$(ready_field tcp)"
token="$(ready_field admin_token)"
socket="$(ready_field unix)"
curl -fsS "$base/health"
echo
call() { # call LABEL URL [curl options...]: invokes feanor and checks 1·0.5 - 2·0.25 + 3·0.125 + 4·1 + 0.1
    local label="$1" url="$2"
    shift 2
    out="$(curl -fsS "$@" -H "Authorization: Bearer $token" -H 'content-type: application/json' \
        -d '{"input": [1, 2, 3, 4]}' "$url/v1/muscles/feanor/invoke")"
    echo "feanor via $label: $out"
    python3 -c 'import json,sys; o=json.loads(sys.argv[1]); assert abs(o["data"]["output"][0]-4.475)<1e-5, o' "$out"
}
call tcp "$base"
call "unix socket" http://localhost --unix-socket "$socket"
kill -TERM "$serve_pid"
wait "$serve_pid"
echo "serve: ready, answered over TCP and the Unix socket, stopped cleanly"
