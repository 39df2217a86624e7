#!/usr/bin/env bash
# `make demo`: a quick study on the committed checkpoints, ending with a report.
# (Until the experiment runner lands, the study is: evaluate every committed model and its
# static twin on the Fashion-MNIST test set and tabulate accuracy, cost and latency.)
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${CARGO_TARGET_DIR:-target}/release/dynrobust"
out=runs/quick
mkdir -p "$out"
n="${DEMO_N:-2000}"
: > "$out/eval.jsonl"
for model in static sdn gated skipnet; do
  echo "[demo] eval $model on $n test images" >&2
  "$bin" eval --model "$model" --n "$n" --json >> "$out/eval.jsonl"
  if [ "$model" != static ]; then
    "$bin" eval --model "$model" --n "$n" --twin --no-latency --json >> "$out/eval.jsonl"
  fi
done
: > "$out/attacks.jsonl"
an="${DEMO_ATTACK_N:-256}"
for spec in "static pgd-linf" "sdn pgd-linf" "sdn deepsloth" "gated gradmdm --mode fixed --eps 8/255" "skipnet gradmdm --mode fixed --eps 8/255" "skipnet ilfo --steps 300" "gated mechanism"; do
  set -- $spec
  model=$1; attack=$2; shift 2
  echo "[demo] attack $attack on $model ($an images)" >&2
  "$bin" attack --model "$model" --attack "$attack" --n "$an" --json "$@" >> "$out/attacks.jsonl"
done
python3 - "$out" <<'PY'
import json, sys, os
out = sys.argv[1]
rows = [json.loads(l) for l in open(os.path.join(out, "eval.jsonl"))]
lines = ["# dynrobust quick study", "", f"Fashion-MNIST test set, first {rows[0]['n']} images; sparse (deployed) pass.", "",
         "| model | accuracy % | mean cost | ms/image b1 | ms/image b128 | exits / gate rates |", "|---|---|---|---|---|---|"]
for r in rows:
    f = lambda v: "–" if v is None else f"{v:.3f}"
    mech = r.get("exit_histogram") or r.get("gate_rates") or ""
    if r.get("gate_rates"): mech = "[" + ", ".join(f"{g:.2f}" for g in r["gate_rates"]) + "]"
    lines.append(f"| {r['model']} | {100*r['accuracy']:.2f} | {r['mean_cost']:.3f} | {f(r['latency_ms_per_image_batch1'])} | {f(r['latency_ms_per_image_batch128'])} | {mech} |")
lines += ["", "## Attacks (first %s test images)" % os.environ.get("DEMO_ATTACK_N", "256"), "",
          "| model | attack | eps | clean acc % | adv acc % | clean cost | adv cost | recovery % | L∞ | MSE | s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
for l in open(os.path.join(out, "attacks.jsonl")):
    a = json.loads(l)
    eps = "–" if a["eps"] is None else f"{a['eps']:.4f}"
    lines.append(f"| {a['model']} | {a['attack']} | {eps} | {100*a['clean_acc']:.1f} | {100*a['adv_acc']:.1f} | {a['clean_cost']:.3f} | {a['adv_cost']:.3f} | {100*a['recovery']:.1f} | {a['linf_max']:.4f} | {a['mse']:.2e} | {a['seconds']:.1f} |")
open(os.path.join(out, "report.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "[demo] report: $out/report.md" >&2
