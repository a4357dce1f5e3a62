# Sourced by scripts that need a running `referee serve` (scripts/serve-check.sh,
# scripts/schemathesis.sh). `start_serve DIR [serve args...]` starts scripts/serve.sh with its
# data directory under DIR in the background, waits for the JSON ready line and sets
# `serve_pid` and `serve_ready`; `ready_field NAME` reads a field of the ready line.
start_serve() {
    local dir="$1"
    shift
    # Build first, in the foreground: the wait below times the server's start, not a build.
    cargo build --locked -q -p referee
    REFEREE_HOME="$dir/home" bash scripts/serve.sh "$@" >"$dir/out" 2>"$dir/log" &
    serve_pid=$!
    for _ in $(seq 1 900); do
        [ -s "$dir/out" ] && break
        kill -0 "$serve_pid" 2>/dev/null || { cat "$dir/log" >&2; return 1; }
        sleep 0.2
    done
    serve_ready="$(head -n1 "$dir/out")"
}

ready_field() {
    python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$serve_ready" "$1"
}
