#!/usr/bin/env bash
# Worknodes benchmark: worknodes and a tokio-task-per-actor baseline (one Rust run), then Erlang,
# with the same sizes. Needs Debian's erlang-base (`apt-get install -y erlang-base`).
set -euo pipefail
cd "$(dirname "$0")/.."
ACTORS=${ACTORS:-1000000} RING=${RING:-1000} TOKENS=${TOKENS:-1000} HOPS=${HOPS:-5000}
command -v escript >/dev/null || { echo "escript not found: apt-get install -y erlang-base" >&2; exit 1; }
cargo run --release -q -p referee-worknode --no-default-features --example bench_worknodes -- \
    --actors "$ACTORS" --ring "$RING" --tokens "$TOKENS" --hops "$HOPS" --workers 2
escript bench/worknodes.erl "$ACTORS" "$RING" "$TOKENS" "$HOPS"
