#!/usr/bin/env bash
# Bounded fuzzing of every parser of untrusted bytes (targets in fuzz/fuzz_targets/).
# Fails if any target finds a crash, a panic, a timeout or an out-of-memory input.
#
# Environment:
#   FUZZ_SECONDS    fuzzing time per target, in seconds (default 30)
#   FUZZ_SANITIZER  none | address (default none: the crate forbids unsafe code, libFuzzer
#                   catches panics without a sanitizer, and AddressSanitizer costs ~2-7x in
#                   executions per second and needs its own full build)
#   FUZZ_TARGETS    space-separated targets (default: every target in fuzz/)
#
# Crash inputs are kept in fuzz/artifacts/<target>/; reproduce one with
#   cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -s none <target> artifacts/<target>/<file>
set -euo pipefail

CARGO_FUZZ_VERSION=0.13.2
seconds="${FUZZ_SECONDS:-30}"
sanitizer="${FUZZ_SANITIZER:-none}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# cargo-fuzz passes nightly-only flags for sanitizers (-Zsanitizer=address); Rust stable
# accepts them with RUSTC_BOOTSTRAP=1. Set it for every build, even with no sanitizer:
# changing it between builds makes cargo rebuild everything.
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version 2>/dev/null | grep -qx "cargo-fuzz ${CARGO_FUZZ_VERSION}"; then
    cargo install cargo-fuzz --locked --version "${CARGO_FUZZ_VERSION}"
fi

cd "${root}/fuzz"
# fuzz/ is its own workspace; start from the main lock file so it builds the same
# dependency versions (cargo drops the entries it does not need).
if [[ ! -f Cargo.lock ]]; then
    cp ../Cargo.lock Cargo.lock
fi

start=${SECONDS}
cargo fuzz build -s "${sanitizer}"
echo "fuzz: built targets in $((SECONDS - start)) s (sanitizer: ${sanitizer})"

read -r -a targets <<< "${FUZZ_TARGETS:-$(cargo fuzz list | tr '\n' ' ')}"
failed=()
# Not under target/: with CARGO_TARGET_DIR set (as .ci/run does) fuzz/target never exists.
log_dir="${root}/fuzz/artifacts/logs"
mkdir -p "${log_dir}"
# The frontends start from the bundled examples, the token target from fuzz/seeds/token
# (valid inputs reach deeper code faster).
seed() {
    mkdir -p "corpus/$1"
    shift
    cp "$@" "corpus/${target}/" 2>/dev/null || true
}
for target in "${targets[@]}"; do
    case "${target}" in
        python_frontend) seed "${target}" ../examples/*.py ;;
        onnx_frontend) seed "${target}" ../examples/*.onnx ;;
        token) seed "${target}" seeds/token/* ;;
    esac
    log="${log_dir}/${target}.log"
    echo "fuzz: running ${target} for ${seconds} s"
    if cargo fuzz run -s "${sanitizer}" "${target}" -- \
        -max_total_time="${seconds}" -timeout=10 -print_final_stats=1 > "${log}" 2>&1; then
        grep -E '^(Done|stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb))' "${log}" || true
    else
        failed+=("${target}")
        echo "fuzz: ${target} FAILED; last lines of ${log}:" >&2
        tail -n 60 "${log}" >&2
        ls -1 "artifacts/${target}" >&2 2>/dev/null || true
    fi
done

echo "fuzz: total $((SECONDS - start)) s"
if ((${#failed[@]} > 0)); then
    echo "fuzz: crashes in: ${failed[*]} (inputs in ${root}/fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz: no crashes"
