#!/usr/bin/env bash
# Side by side, in one command: dynrobust's attack iterations vs a PyTorch-eager script of the
# same attacks on the same safetensors weights and batches (scripts/torch_reference.py).
# The two alternate ROUNDS times (dynrobust, PyTorch, dynrobust, PyTorch, …) so drift of a
# shared machine hits both; each figure is the median over the rounds of per-round medians.
#   scripts/bench_vs_torch.sh [REPS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
reps="${1:-3}"
rounds="${2:-3}"
bin="${CARGO_TARGET_DIR:-target}/release/dynrobust"
.venv/bin/python -c 'import safetensors, numpy' 2>/dev/null || .venv/bin/pip install -q safetensors numpy
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for r in $(seq 1 "$rounds"); do
  "$bin" bench attacks --reps "$reps" > "$out/rust-$r.jsonl" 2>/dev/null
  .venv/bin/python scripts/torch_reference.py --reps "$reps" > "$out/torch-$r.jsonl" 2>/dev/null
done
python3 - "$out" "$rounds" <<'PY'
import json, sys, os, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
def rows(prefix):
    return [list(map(json.loads, open(os.path.join(out, f"{prefix}-{r}.jsonl")))) for r in range(1, rounds + 1)]
rust, torch = rows("rust"), rows("torch")
def med(values):
    return statistics.median(values)
ours = {}
for run in rust:
    for r in run:
        ours.setdefault((r["attack"], r["model"], r["batch"]), []).append(r["attack_ms_per_iteration"])
print(f"dynrobust and PyTorch alternated {rounds} times; medians over the rounds")
print()
print("| attack | model | batch | dynrobust ms/it | PyTorch eager ms/it | speed-up | PyTorch, BN folded by hand, ms/it | speed-up vs folded |")
print("|---|---|---|---|---|---|---|---|")
keyed = {}
for run in torch:
    for t in run:
        if "check" in t:
            keyed.setdefault(("check", t["check"]), t)
            continue
        k = (t["attack"], t["model"], t["batch"])
        keyed.setdefault(k, {"plain": [], "folded": []})
        keyed[k]["plain"].append(t["torch_ms_per_iteration"])
        keyed[k]["folded"].append(t["torch_folded_ms_per_iteration"])
for k, v in keyed.items():
    if k[0] == "check":
        print(f"<!-- check: {v['check']} final-head accuracy on the first 1000 test images (PyTorch) = {v['final_head_accuracy_first_1000']:.4f}; folded vs plain max logit difference {v['folded_max_logit_diff']:.2e} -->")
        continue
    o, p, f = med(ours[k]), med(v["plain"]), med(v["folded"])
    print(f"| {k[0]} | {k[1]} | {k[2]} | {o:.3f} | {p:.3f} | {p / o:.2f}× | {f:.3f} | {f / o:.2f}× |")
PY
