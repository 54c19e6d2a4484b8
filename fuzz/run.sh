#!/usr/bin/env bash
# Bounded cargo-fuzz (libFuzzer, AddressSanitizer) runs of the fuzz targets; `scripts/test fuzz` runs it.
#
#   fuzz/run.sh [TARGET...]     every target by default: command_parser config_mapping pgoutput
#
# FUZZ_SECS (default 45) is each target's run time. The corpus of a run is fuzz/corpus/<target>/ (the
# committed seeds, never written) plus fuzz/work/<target>/ (what runs find: kept between runs, not
# committed; minimized with `cargo fuzz cmin` once it holds over 10000 inputs). A crash, a panic, an allocation over 512 MiB, an RSS over 2 GiB or an input taking more
# than 10 s fails the target; libFuzzer saves the input in fuzz/artifacts/<target>/ and this script
# prints the command that reproduces it. Logs: artifacts/fuzz/<target>.log. The last line is
# `fuzz: N passed, N failed`; the exit status is 0 only when nothing failed.
#
# Needs rustup (the nightly toolchain is installed when missing) and installs cargo-fuzz when missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
FUZZ_SECS=${FUZZ_SECS:-45}
TARGETS=("$@")
if [[ ${#TARGETS[@]} -eq 0 ]]; then
    TARGETS=(command_parser config_mapping pgoutput)
fi
LOGS=../artifacts/fuzz
mkdir -p "$LOGS"

max_len() {
    case "$1" in
        command_parser) echo 4096 ;;   # frames are up to 64 KiB, but 4 KiB holds every command shape
        config_mapping) echo 8192 ;;   # the shipped configuration files are ~1.5 KiB
        pgoutput) echo 4096 ;;         # a message of a few columns; longer ones repeat the same shapes
        *) echo 4096 ;;
    esac
}

if ! command -v rustup >/dev/null 2>&1; then
    echo "fuzz: rustup not found (the fuzz targets need the nightly toolchain)" >&2
    echo "fuzz: 0 passed, ${#TARGETS[@]} failed"
    exit 1
fi
if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz: installing the nightly toolchain (rustup toolchain install nightly --profile minimal)"
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    cargo install cargo-fuzz --locked
fi

echo "fuzz: building the targets (cargo +nightly fuzz build; the first build takes several minutes)"
if ! cargo +nightly fuzz build >"$LOGS/build.log" 2>&1; then
    tail -n 40 "$LOGS/build.log"
    echo "fuzz: the build failed (log: artifacts/fuzz/build.log)"
    echo "fuzz: 0 passed, ${#TARGETS[@]} failed"
    exit 1
fi

passed=0
failed=0
for t in "${TARGETS[@]}"; do
    mkdir -p "work/$t" "artifacts/$t" "corpus/$t"
    if [[ $(find "work/$t" -type f | wc -l) -gt 10000 ]]; then
        echo "fuzz: $t: minimizing the kept corpus (cargo fuzz cmin)"
        cargo +nightly fuzz cmin "$t" "work/$t" >"$LOGS/$t-cmin.log" 2>&1 || echo "fuzz: $t: cmin failed (log: artifacts/fuzz/$t-cmin.log); going on"
    fi
    before=$(find "artifacts/$t" -type f | sort)
    log="$LOGS/$t.log"
    seeds=$(find "corpus/$t" -type f | wc -l)
    echo "fuzz: $t for ${FUZZ_SECS}s (max_len $(max_len "$t"), $seeds seeds, $(find "work/$t" -type f | wc -l) inputs kept from earlier runs)"
    set +e
    cargo +nightly fuzz run "$t" "work/$t" "corpus/$t" -- \
        -max_total_time="$FUZZ_SECS" -max_len="$(max_len "$t")" -rss_limit_mb=2048 -malloc_limit_mb=512 \
        -timeout=10 -print_final_stats=1 >"$log" 2>&1
    status=$?
    set -e
    new=$(comm -13 <(echo "$before") <(find "artifacts/$t" -type f | sort) | sed '/^$/d')
    runs=$(grep -oE '^Done [0-9]+ runs in [0-9]+ second' "$log" | tail -n 1 | grep -oE '[0-9]+ runs in [0-9]+' || true)
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -n 1 || true)
    if [[ $status -eq 0 && -z $new ]]; then
        passed=$((passed + 1))
        echo "fuzz: PASS $t: ${runs:-?} s, ${cov:-cov ?}, corpus $(find "work/$t" -type f | wc -l) inputs, no finding"
    else
        failed=$((failed + 1))
        echo "fuzz: FAIL $t (exit status $status; log: artifacts/fuzz/$t.log)"
        if ! grep -q "INFO: Seed:" "$log"; then
            # libFuzzer never started: the (re)build or the launch failed.
            tail -n 15 "$log" | sed 's/^/    /'
        fi
        grep -m 1 -A 10 "panicked at" "$log" | sed 's/^/    /' || true
        grep -m 6 -E "==ERROR|SUMMARY|out-of-memory|malloc limit|timeout after" "$log" | sed 's/^/    /' || true
        for a in $new; do
            echo "    input saved: fuzz/$a"
            echo "    reproduce:   (cd fuzz && cargo +nightly fuzz run $t $a)"
        done
    fi
done
echo "fuzz: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
