#!/usr/bin/env bash
# `make demo`: the quick study on the committed checkpoints (experiments/quick.toml), ending
# with a report (runs/quick/report.md + plots). Rerunning skips finished cells.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${CARGO_TARGET_DIR:-target}/release/dynrobust"
out="${DEMO_OUT:-runs/quick}"
"$bin" run experiments/quick.toml --out "$out"
echo "[demo] report: $out/report.md" >&2
