#!/usr/bin/env bash
# CI check of the README's run command: `scripts/serve.sh` in a fresh data directory on an
# ephemeral port; waits for the ready line, calls /health and a bundled muscle over TCP and
# the Unix socket with the printed admin token, then stops it with SIGTERM (graceful drain).
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'kill "${pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
REFEREE_HOME="$work/home" bash scripts/serve.sh --listen 127.0.0.1:0 >"$work/out" 2>"$work/log" &
pid=$!
for _ in $(seq 1 900); do
    [ -s "$work/out" ] && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/log" >&2; exit 1; }
    sleep 0.2
done
ready="$(head -n1 "$work/out")"
field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$ready" "$1"; }
base="http://$(field tcp)"
token="$(field admin_token)"
socket="$(field unix)"
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
kill -TERM "$pid"
wait "$pid"
echo "serve: ready, answered over TCP and the Unix socket, stopped cleanly"
