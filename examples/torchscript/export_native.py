"""Export dynrobust's own committed `static` and `sdn` checkpoints as TorchScript modules that
follow the dynrobust protocol (see README.md in this folder).

The same architecture and the same weights run twice in dynrobust: natively (`--model sdn`) and
through the TorchScript adapter (`--model DIR/sdn.pt`). That gives an exact cross-check of the
adapter (same predictions, executed masks and MACs) and the adapter's per-batch overhead
(`dynrobust bench torchscript`, recorded in BENCHMARKS.md).

Run with the project's venv:
    .venv/bin/python examples/torchscript/export_native.py --out /tmp/native-ts
"""
import argparse
import json
import os
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ConvBn(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5)

    def forward(self, x):
        return self.bn(self.conv(x))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = ConvBn(cin, cout, 3, stride)
        self.conv2 = ConvBn(cout, cout, 3, 1)
        self.has_shortcut = stride != 1 or cin != cout
        self.shortcut = ConvBn(cin, cout, 1, stride) if self.has_shortcut else nn.Identity()

    def forward(self, x):
        return F.relu(self.shortcut(x) + self.conv2(F.relu(self.conv1(x))))


class Exit(nn.Module):
    """SDN internal classifier: mixed max/avg pooling (learned alpha) + linear."""

    def __init__(self, channels: int, size: int, classes: int):
        super().__init__()
        self.kernel = min(max(size // 4, 2), size)
        out = size // self.kernel
        self.alpha = nn.Parameter(torch.full([1], 0.5))
        self.linear = nn.Linear(channels * out * out, classes)

    def forward(self, h):
        k = self.kernel
        mixed = self.alpha * F.max_pool2d(h, k, k) + (1 - self.alpha) * F.avg_pool2d(h, k, k)
        return self.linear(mixed.flatten(1))


class NativeResNet(nn.Module):
    """dynrobust's ResNet-14n (stem 1→8; stages 8/16/32 of 2 BasicBlocks) with optional SDN exits."""

    names: List[str]
    kinds: List[str]
    block_cols: List[List[int]]
    exit_cols: List[int]
    head_col: int
    threshold: float

    def __init__(self, arch: dict):
        super().__init__()
        widths, per_stage = arch["widths"], arch["blocks_per_stage"]
        self.register_buffer("mean", torch.tensor(arch["mean"]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(arch["std"]).view(1, -1, 1, 1))
        self.stem = ConvBn(arch["in_channels"], widths[0], 3, 1)
        blocks, exits = [], []
        cin, size = widths[0], arch["image_size"]
        names, kinds, macs = ["stem"], ["stem"], [9 * arch["in_channels"] * widths[0] * size * size]
        sdn = arch["mechanism"]["kind"] == "sdn"
        for stage, w in enumerate(widths):
            for j in range(per_stage):
                stride = 2 if stage > 0 and j == 0 else 1
                out = (size - 1) // stride + 1
                block = Block(cin, w, stride)
                b = len(blocks)
                if block.has_shortcut:
                    names.append(f"block{b}.shortcut"); kinds.append("shortcut"); macs.append(cin * w * out * out)
                names.append(f"block{b}.residual"); kinds.append("block"); macs.append(9 * (cin * w + w * w) * out * out)
                blocks.append(block)
                cin, size = w, out
                if sdn:
                    ic = Exit(w, size, arch["classes"])
                    exits.append(ic)
                    names.append(f"exit{b}"); kinds.append("exit"); macs.append(ic.linear.in_features * arch["classes"])
        names.append("head"); kinds.append("head"); macs.append(cin * arch["classes"])
        self.blocks = nn.ModuleList(blocks)
        self.exits = nn.ModuleList(exits)
        self.head = nn.Linear(cin, arch["classes"])
        self.threshold = float(arch["mechanism"].get("threshold", 2.0))
        self.names = names
        self.kinds = kinds
        self.register_buffer("macs_per_unit", torch.tensor(macs, dtype=torch.int64))
        # executed-mask column of each block's units, and of the exits / head
        self.block_cols = [[i for i, n in enumerate(names) if n.startswith(f"block{b}.")] for b in range(len(blocks))]
        self.exit_cols = [i for i, k in enumerate(kinds) if k == "exit"]
        self.head_col = names.index("head")

    @torch.jit.export
    def unit_macs(self) -> torch.Tensor:
        return self.macs_per_unit

    @torch.jit.export
    def unit_names(self) -> List[str]:
        return self.names

    @torch.jit.export
    def unit_kinds(self) -> List[str]:
        return self.kinds

    @torch.jit.export
    def exit_threshold(self) -> float:
        return self.threshold

    def forward(self, x: torch.Tensor) -> Dict[str, List[torch.Tensor]]:
        """Dense pass: every unit for every sample; the exit rule picks the returned logits."""
        h = F.relu(self.stem((x - self.mean) / self.std))
        exit_logits: List[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            h = block(h)
            if len(self.exits) > 0:
                for j, ic in enumerate(self.exits):
                    if j == i:
                        exit_logits.append(ic(h))
        final = self.head(h.mean((2, 3)))
        batch = x.shape[0]
        n_exits = len(exit_logits)
        if n_exits == 0:
            executed = torch.ones(batch, len(self.names), device=x.device)
            macs = executed.double() @ self.macs_per_unit.double()
            return {"logits": [final], "final_logits": [final], "exit_logits": exit_logits, "gate_probs": [],
                    "executed": [executed], "macs": [macs]}
        fires = torch.stack([F.softmax(z, -1).amax(-1) >= self.threshold for z in exit_logits], 1)
        first = fires.int().argmax(1)
        exit_index = torch.where(fires.any(1), first, torch.full_like(first, n_exits)).long()
        stacked = torch.stack(exit_logits + [final], 1)
        logits = stacked.gather(1, exit_index.view(-1, 1, 1).expand(-1, 1, stacked.shape[2])).squeeze(1)
        executed = self.executed_for(exit_index, len(self.names))
        macs = executed.double() @ self.macs_per_unit.double()
        return {"logits": [logits], "final_logits": [final], "exit_logits": exit_logits, "gate_probs": [],
                "executed": [executed], "macs": [macs], "exit_index": [exit_index]}

    def executed_for(self, exit_index: torch.Tensor, units: int) -> torch.Tensor:
        n_exits = len(self.exit_cols)
        executed = torch.zeros(exit_index.shape[0], units, device=exit_index.device)
        executed[:, 0] = 1.0
        # the block after which each sample leaves: exit j leaves after block j, the head after the last
        left_after = torch.where(exit_index == n_exits, torch.full_like(exit_index, len(self.blocks) - 1), exit_index)
        for b, cols in enumerate(self.block_cols):
            ran = (left_after >= b).float()
            for c in cols:
                executed[:, c] = ran
            executed[:, self.exit_cols[b]] = ran
        executed[:, self.head_col] = (exit_index == n_exits).float()
        return executed

    @torch.jit.export
    def forward_sparse(self, x: torch.Tensor) -> Dict[str, List[torch.Tensor]]:
        """Really-skipping pass: samples leave the batch at their exit."""
        if len(self.exits) == 0:
            return self.forward(x)
        batch = x.shape[0]
        h = F.relu(self.stem((x - self.mean) / self.std))
        rows = torch.arange(batch, device=x.device)
        logits = torch.zeros(batch, self.head.out_features, device=x.device)
        exit_index = torch.full([batch], len(self.exits), dtype=torch.long, device=x.device)
        for i, block in enumerate(self.blocks):
            if rows.numel() > 0:
                h = block(h)
                for j, ic in enumerate(self.exits):
                    if j == i:
                        z = ic(h)
                        leave = F.softmax(z, -1).amax(-1) >= self.threshold
                        if bool(leave.any()):
                            logits[rows[leave]] = z[leave]
                            exit_index[rows[leave]] = i
                            stay = ~leave
                            h, rows = h[stay], rows[stay]
        final_logits = torch.full([batch, self.head.out_features], float("nan"), device=x.device)
        if rows.numel() > 0:
            final = self.head(h.mean((2, 3)))
            logits[rows] = final
            final_logits[rows] = final
        executed = self.executed_for(exit_index, len(self.names))
        macs = executed.double() @ self.macs_per_unit.double()
        return {"logits": [logits], "final_logits": [final_logits], "exit_logits": [], "gate_probs": [],
                "executed": [executed], "macs": [macs], "exit_index": [exit_index]}


def export(name: str, out: str) -> str:
    ckpt = os.path.join(ROOT, "models", "checkpoints", name)
    with open(os.path.join(ckpt, "model.json")) as f:
        arch = json.load(f)["architecture"]
    model = NativeResNet(arch)
    weights = load_file(os.path.join(ckpt, "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked") and k not in ("mean", "std", "macs_per_unit")]
    assert not missing and not unexpected, (missing, unexpected)
    model.eval()
    scripted = torch.jit.script(model)
    path = os.path.join(out, f"{name}.pt")
    torch.jit.save(scripted, path)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="static,sdn")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name in args.models.split(","):
        print(export(name, args.out))


if __name__ == "__main__":
    main()
