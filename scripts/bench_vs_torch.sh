#!/usr/bin/env bash
# Side by side, in one command: dynrobust's attack iterations vs a PyTorch-eager script of the
# same attacks on the same safetensors weights and batches (scripts/torch_reference.py).
#   scripts/bench_vs_torch.sh [REPS]
set -euo pipefail
cd "$(dirname "$0")/.."
reps="${1:-3}"
bin="${CARGO_TARGET_DIR:-target}/release/dynrobust"
.venv/bin/python -c 'import safetensors, numpy' 2>/dev/null || .venv/bin/pip install -q safetensors numpy
out=$(mktemp -d)
"$bin" bench attacks --reps "$reps" > "$out/rust.jsonl"
.venv/bin/python scripts/torch_reference.py --reps "$reps" > "$out/torch.jsonl" 2>/dev/null
python3 - "$out" <<'PY'
import json, sys, os
out = sys.argv[1]
rust = {(r["attack"], r["model"], r["batch"]): r for r in map(json.loads, open(os.path.join(out, "rust.jsonl")))}
print("| attack | model | batch | dynrobust ms/it | PyTorch eager ms/it | speed-up | PyTorch, BN folded by hand, ms/it | speed-up vs folded |")
print("|---|---|---|---|---|---|---|---|")
for line in open(os.path.join(out, "torch.jsonl")):
    t = json.loads(line)
    if "check" in t:
        print(f"<!-- check: {t['check']} final-head accuracy on the first 1000 test images (PyTorch) = {t['final_head_accuracy_first_1000']:.4f}; folded vs plain max logit difference {t['folded_max_logit_diff']:.2e} -->")
        continue
    r = rust[(t["attack"], t["model"], t["batch"])]
    ours, plain, folded = r["attack_ms_per_iteration"], t["torch_ms_per_iteration"], t["torch_folded_ms_per_iteration"]
    print(f"| {t['attack']} | {t['model']} | {t['batch']} | {ours:.3f} | {plain:.3f} | {plain / ours:.2f}× | {folded:.3f} | {folded / ours:.2f}× |")
PY
