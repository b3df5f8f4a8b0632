#!/usr/bin/env bash
# Runs each fuzz target (fuzz/) for a bounded time with cargo fuzz and
# libFuzzer; prints how many inputs each executed. Usage:
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 30)
# cargo fuzz needs unstable compiler flags; RUSTC_BOOTSTRAP=1 lets the
# stable toolchain accept them, so no nightly toolchain is needed. The
# targets are built without a sanitizer (-s none): HCP forbids unsafe code,
# so what the fuzzer looks for is panics and broken bounds, which the
# targets assert.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-30}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "[fuzz] installing cargo-fuzz from crates.io"
  cargo install cargo-fuzz --locked --version 0.13.2
fi
export RUSTC_BOOTSTRAP=1
cd fuzz
cargo fuzz build -s none --release
total=0
for target in rest_transcode bearer_token; do
  # The committed seeds stay as they are; new finds go to a scratch corpus.
  work="$(mktemp -d)"
  log="$work/log"
  if ! cargo fuzz run -s none --release "$target" "$work" "corpus/$target" -- \
      -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048 -timeout=10 >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "[fuzz] $target found a failing input (see above; cargo fuzz keeps it in fuzz/artifacts/$target)" >&2
    rm -rf "$work"
    exit 1
  fi
  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
  echo "[fuzz] $target: ${runs:-?} executions in ${secs}s, no failure"
  total=$((total + ${runs:-0}))
  rm -rf "$work"
done
echo "[fuzz] ${total} executions in all"
