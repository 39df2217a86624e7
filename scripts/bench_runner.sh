#!/usr/bin/env bash
# Grid throughput: a study (STUDY, default experiments/bench-runner.toml) run sequentially
# (1 worker × all libtorch threads) and in parallel (one worker per core, 1 libtorch thread
# each), alternating REPS times into fresh directories. Prints wall times and the speed-up;
# see BENCHMARKS.md.   REPS=3 STUDY=experiments/quick.toml scripts/bench_runner.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${CARGO_TARGET_DIR:-target}/release/dynrobust"
reps="${REPS:-2}"
study="${STUDY:-experiments/bench-runner.toml}"
cores="$(nproc)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
time_run() { # workers
  local out="$tmp/w$1-$RANDOM" start end
  start=$(date +%s.%N)
  "$bin" run "$study" --out "$out" --workers "$1" --no-report 2>/dev/null
  end=$(date +%s.%N)
  awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }'
}
"$bin" run "$study" --dry-run 2>&1 | tail -1
for r in $(seq 1 "$reps"); do
  seq_s=$(time_run 1)
  par_s=$(time_run "$cores")
  echo "rep $r: sequential (1 worker × $cores threads) ${seq_s} s, parallel ($cores workers × 1 thread) ${par_s} s, speed-up $(awk -v a="$seq_s" -v b="$par_s" 'BEGIN { printf "%.2f", a / b }')×"
done
