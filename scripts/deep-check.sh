#!/usr/bin/env bash
# Deeper checks than CI affords, for before a release or after a change to
# the codecs, the stores or the reliable-delivery window:
#   - the model tests at many more cases than the suite runs
#     (PROPTEST_CASES: tests/reliable_model.rs, and the memory, disk and
#     Redis stores against their model in src/store/tests.rs; the Redis
#     one only when redis-server is installed);
#   - the crash loops of tests/reliable_crash.rs (servers SIGKILLed, or
#     now and then drained, under load and restarted; disk store and
#     Redis store) for CRASH_ROUNDS restarts each instead of the suite's 3;
#   - each fuzz target in fuzz/ for FUZZ_S seconds (installs cargo-fuzz
#     when missing; uses the nightly toolchain when there is one, else
#     stable with RUSTC_BOOTSTRAP=1, as fuzz/README.md says).
# Usage: scripts/deep-check.sh [--no-fuzz] [--no-models] [--no-crash]
# Environment: FUZZ_S (default 300), MODEL_SCALE (default 1: multiplies
# every case count below), CRASH_ROUNDS (default 100, about 4 minutes a
# loop on a 2-vCPU host). Exits non-zero at the first failure; a fuzz
# crash leaves its input under fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."

fuzz=1
models=1
crash=1
for arg in "$@"; do
  case "$arg" in
    --no-fuzz) fuzz=0 ;;
    --no-models) models=0 ;;
    --no-crash) crash=0 ;;
    *) echo "usage: $0 [--no-fuzz] [--no-models] [--no-crash]" >&2; exit 2 ;;
  esac
done
FUZZ_S="${FUZZ_S:-300}"
SCALE="${MODEL_SCALE:-1}"

if [ "$models" = 1 ]; then
  # Case counts that take about a minute each on a 2-vCPU host.
  run_model() { # CASES CARGO-TEST-ARGS...
    local cases=$(($1 * SCALE))
    shift
    echo "deep-check: $* at $cases cases" >&2
    PROPTEST_CASES="$cases" cargo test --quiet "$@"
  }
  run_model 200000 --test reliable_model
  run_model 200000 --lib -- store::tests::memory_store_behaves_as_the_model
  run_model 1000 --lib -- store::tests::disk_store --test-threads 1
  if command -v redis-server >/dev/null; then
    run_model 200 --lib -- store::tests::redis_store_behaves_as_the_model
  else
    echo "deep-check: no redis-server: the Redis store's model test skipped" >&2
  fi
fi

if [ "$crash" = 1 ]; then
  rounds="${CRASH_ROUNDS:-100}"
  echo "deep-check: the crash loops, $rounds restarts each" >&2
  log="$(mktemp)"
  # The test binary's watchdog (600 s by default) raised to fit the rounds.
  if ! SWITCHBOARD_CRASH_ROUNDS="$rounds" SWITCHBOARD_TEST_DEADLINE_S=$((600 + rounds * 10)) \
    cargo test --quiet --test reliable_crash -- --test-threads 1 --nocapture killed_again_and_again >"$log" 2>&1; then
    grep -E -A2 '^crash loop|panicked' "$log" >&2 || true
    echo "deep-check: a crash loop failed; its whole output: $log" >&2
    exit 1
  fi
  grep -E '^crash loop' "$log" >&2
  rm -f "$log"
fi

if [ "$fuzz" = 1 ]; then
  command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
  if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    fuzz_cmd=(cargo +nightly fuzz run)
  else
    export RUSTC_BOOTSTRAP=1
    fuzz_cmd=(cargo fuzz run)
  fi
  for target in decode websocket reliable conn; do
    extra=()
    [ "$target" = reliable ] && extra=(-dict=fuzz/reliable.dict)
    echo "deep-check: fuzzing $target for $FUZZ_S s" >&2
    "${fuzz_cmd[@]}" "$target" -- -max_total_time="$FUZZ_S" "${extra[@]}"
  done
fi
echo "deep-check: all passed" >&2
