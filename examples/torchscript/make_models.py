"""Example "bring your own model" TorchScript files for dynrobust.

Defines two small dynamic networks for Fashion-MNIST (1x28x28, 10 classes), trains them
briefly on the CPU, scripts them with torch.jit.script and saves them in the format that
dynrobust's TorchScript adapter loads (the protocol is in README.md next to this file):

  DIR/gated.pt               SkipNet-style gated ResNet: stem, 4 BasicBlocks (8, 8, 16, 16
                             channels), a feed-forward gate in front of blocks 1-3 (block 0
                             always runs), final head
  DIR/sdn.pt                 SDN-style early-exit ResNet: same backbone, an internal classifier
                             after blocks 0-2, final head after block 3; exit at the first IC
                             whose max-softmax >= q
  DIR/reference.safetensors  a probe batch (the first 32 test images) and what the saved
                             modules' forward returns on it, for dynrobust's adapter tests
  DIR/models.json            accuracy, mean cost, execution rates, training settings, timings

Run from the repository root with the project's venv (after `make setup`):

  .venv/bin/python examples/torchscript/make_models.py --out examples/torchscript/out
  .venv/bin/python examples/torchscript/make_models.py --out /tmp/ts --train-steps 0   # untrained

The script reloads each saved file with torch.jit.load and asserts that forward (dense) and
forward_sparse (real skipping) agree on the probe batch and that macs == executed @ unit_macs.
`--reference-from DIR` trains nothing and only writes DIR's models' outputs on the probe batch.
About 70 s with the default 300 training steps per model on one free CPU core (it uses 2
threads; less with two idle cores). Results are deterministic for a given --seed on a given CPU
model (not across CPU models: the kernels' floating-point order differs).
"""
import argparse
import gzip
import json
import os
import struct
import sys
import time
from typing import Dict, List

# Idle OpenMP threads sleep instead of spinning: with 2 threads on a 2-core machine that is also
# running something else (a cargo build, a study), spinning threads wait a whole scheduler slice
# at every op and a training step takes ~20x longer. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MEAN, STD = 0.2860, 0.3530
WIDTHS = [8, 8, 16, 16]
STRIDES = [1, 1, 2, 1]
KINDS = ("stem", "shortcut", "block", "head", "gate", "exit")
BACKBONE = ("stem", "shortcut", "block", "head")


# ----------------------------------------------------------------------------- building blocks

def conv_macs(cin: int, cout: int, k: int, hout: int, wout: int, groups: int = 1) -> int:
    return cout * (cin // groups) * k * k * hout * wout


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm; `macs` for one sample at the input size given."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, hw_in: int):
        super().__init__()
        pad = k // 2
        self.conv = nn.Conv2d(cin, cout, k, stride, pad, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.hw_out = (hw_in + 2 * pad - k) // stride + 1
        self.macs = conv_macs(cin, cout, k, self.hw_out, self.hw_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class BasicBlock(nn.Module):
    """ResNet BasicBlock, post-activation: relu(shortcut(h) + residual(h)).

    `residual` (conv3x3-BN-ReLU-conv3x3-BN) is the skippable unit ("block"); the 1x1 projection
    shortcut (when stride or channels change) always runs ("shortcut")."""

    def __init__(self, cin: int, cout: int, stride: int, hw_in: int):
        super().__init__()
        self.conv1 = ConvBN(cin, cout, 3, stride, hw_in)
        self.conv2 = ConvBN(cout, cout, 3, 1, self.conv1.hw_out)
        self.has_proj = stride != 1 or cin != cout
        # an empty Sequential is the identity (keeps the attribute scriptable either way)
        self.proj = ConvBN(cin, cout, 1, stride, hw_in) if self.has_proj else nn.Sequential()
        self.residual_macs = self.conv1.macs + self.conv2.macs
        self.shortcut_macs = self.proj.macs if self.has_proj else 0
        self.cin, self.cout, self.hw_out = cin, cout, self.conv1.hw_out

    def shortcut(self, h: Tensor) -> Tensor:
        return self.proj(h)

    def residual(self, h: Tensor) -> Tensor:
        return self.conv2(F.relu(self.conv1(h)))

    def forward(self, h: Tensor) -> Tensor:
        return F.relu(self.shortcut(h) + self.residual(h))


class Gate(nn.Module):
    """Feed-forward gate (SkipNet's FFGate / ConvNet-AIG style): global average pool of the
    block input -> Linear(C, hidden) -> BN -> ReLU -> Linear(hidden, 1) -> sigmoid. Returns the
    soft execute-probability p [B]; the block runs iff p > 0.5. (The BN, as in ConvNet-AIG,
    standardises the small differences between the pooled features of different inputs, so
    the gate can make clear input-dependent decisions.)"""

    def __init__(self, c: int, hidden: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(c, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, 1)
        self.macs = c * hidden + hidden

    def logit(self, h: Tensor) -> Tensor:
        return self.fc2(F.relu(self.bn(self.fc1(h.mean((2, 3)))))).squeeze(1)

    def forward(self, h: Tensor) -> Tensor:
        return torch.sigmoid(self.logit(h))


class GatedStage(nn.Module):
    def __init__(self, block: BasicBlock, gate: Gate):
        super().__init__()
        self.block = block
        self.gate = gate


class IC(nn.Module):
    """SDN internal classifier: adaptive average pool to pool x pool, then Linear."""

    def __init__(self, c: int, classes: int, pool: int = 4):
        super().__init__()
        self.pool = pool
        self.linear = nn.Linear(c * pool * pool, classes)
        self.macs = c * pool * pool * classes

    def forward(self, h: Tensor) -> Tensor:
        return self.linear(F.adaptive_avg_pool2d(h, self.pool).flatten(1))


class ExitStage(nn.Module):
    def __init__(self, block: BasicBlock, ic: IC):
        super().__init__()
        self.block = block
        self.ic = ic


def make_blocks(in_ch: int, size: int, widths: List[int], strides: List[int]):
    stem = ConvBN(in_ch, widths[0], 3, 1, size)
    blocks, cin, hw = [], widths[0], stem.hw_out
    for w, s in zip(widths, strides):
        b = BasicBlock(cin, w, s, hw)
        blocks.append(b)
        cin, hw = w, b.hw_out
    return stem, blocks


def stack_cols(cols: List[Tensor]) -> Tensor:
    return torch.stack(cols, 1)


# ----------------------------------------------------------------------------- the gated model

class GatedNet(nn.Module):
    """SkipNet-style gated ResNet. Units in execution order:
    stem, block0.residual, gate1, block1.residual, gate2, block2.shortcut, block2.residual,
    gate3, block3.residual, head (projection shortcuts appear where channels/stride change)."""

    def __init__(self, widths=WIDTHS, strides=STRIDES, classes: int = 10, in_ch: int = 1, size: int = 28,
                 hidden: int = 16):
        super().__init__()
        self.mean, self.std = MEAN, STD
        stem, blocks = make_blocks(in_ch, size, list(widths), list(strides))
        self.stem = stem
        self.block0 = blocks[0]
        self.stages = nn.ModuleList([GatedStage(b, Gate(b.cin, hidden)) for b in blocks[1:]])
        self.head = nn.Linear(blocks[-1].cout, classes)
        names, kinds, macs = ["stem"], ["stem"], [stem.macs]
        for i, b in enumerate(blocks):
            if i > 0:
                names.append(f"gate{i}"); kinds.append("gate"); macs.append(self.stages[i - 1].gate.macs)
            if b.has_proj:
                names.append(f"block{i}.shortcut"); kinds.append("shortcut"); macs.append(b.shortcut_macs)
            names.append(f"block{i}.residual"); kinds.append("block"); macs.append(b.residual_macs)
        names.append("head"); kinds.append("head"); macs.append(blocks[-1].cout * classes)
        self._names: List[str] = names
        self._kinds: List[str] = kinds
        self._macs: List[int] = macs

    def _run(self, x: Tensor, sparse: bool) -> Dict[str, List[Tensor]]:
        batch = x.size(0)
        ones = torch.ones([batch], dtype=torch.float32, device=x.device)
        h = F.relu(self.stem((x - self.mean) / self.std))
        cols: List[Tensor] = [ones]  # stem
        if self.block0.has_proj:
            cols.append(ones)
        cols.append(ones)  # block 0 always runs
        h = self.block0(h)
        probs: List[Tensor] = []
        for st in self.stages:
            p = st.gate(h)
            on = p > 0.5
            hard = on.to(torch.float32)
            s = st.block.shortcut(h)
            if sparse:
                rows = on.nonzero().squeeze(1)
                n = rows.size(0)
                if n == batch:
                    h = F.relu(s + st.block.residual(h))
                elif n > 0:
                    f = st.block.residual(h.index_select(0, rows))
                    h = F.relu(s.index_copy(0, rows, s.index_select(0, rows) + f))
                else:
                    h = F.relu(s)
            else:
                # straight-through: the value is exactly `hard` (p - p.detach() == 0), the
                # gradient is dp; same as hard - p.detach() + p but bit-exact in the forward
                gate = hard + (p - p.detach())
                h = F.relu(s + gate.view(-1, 1, 1, 1) * st.block.residual(h))
            probs.append(p)
            cols.append(ones)  # the gate itself always runs
            if st.block.has_proj:
                cols.append(ones)
            cols.append(hard)
        logits = self.head(h.mean((2, 3)))
        cols.append(ones)  # head
        executed = stack_cols(cols)
        macs = executed.to(torch.float64) @ self.unit_macs().to(device=x.device, dtype=torch.float64)
        no_exits: List[Tensor] = []
        return {"logits": [logits], "exit_logits": no_exits, "gate_probs": probs,
                "executed": [executed], "macs": [macs], "final_logits": [logits]}

    def forward(self, x: Tensor) -> Dict[str, List[Tensor]]:
        return self._run(x, False)

    @torch.jit.export
    def forward_sparse(self, x: Tensor) -> Dict[str, List[Tensor]]:
        with torch.no_grad():
            out = self._run(x, True)
        return out

    @torch.jit.export
    def unit_macs(self) -> Tensor:
        return torch.tensor(self._macs, dtype=torch.int64)

    @torch.jit.export
    def unit_names(self) -> List[str]:
        return self._names

    @torch.jit.export
    def unit_kinds(self) -> List[str]:
        return self._kinds


# ----------------------------------------------------------------------------- the SDN model

def max_softmax(z: Tensor) -> Tensor:
    return torch.softmax(z, -1).amax(-1)


class ExitNet(nn.Module):
    """SDN-style early-exit ResNet. Units in execution order:
    stem, block0.residual, exit0, block1.residual, exit1, block2.shortcut, block2.residual,
    exit2, block3.residual, head. Exit i is the IC after block i; index 3 = the final head."""

    def __init__(self, widths=WIDTHS, strides=STRIDES, classes: int = 10, in_ch: int = 1, size: int = 28,
                 threshold: float = 0.9, pool: int = 4):
        super().__init__()
        self.mean, self.std = MEAN, STD
        self.threshold = float(threshold)
        self.classes = classes
        stem, blocks = make_blocks(in_ch, size, list(widths), list(strides))
        self.stem = stem
        self.stages = nn.ModuleList([ExitStage(b, IC(b.cout, classes, pool)) for b in blocks[:-1]])
        self.last = blocks[-1]
        self.head = nn.Linear(blocks[-1].cout, classes)
        self.n_exits = len(blocks) - 1
        names, kinds, macs = ["stem"], ["stem"], [stem.macs]
        # reach[u]: unit u runs iff the sample leaves at exit index >= reach[u]
        # (exit i = IC after block i, index n_exits = the final head)
        reach = [0]
        for i, b in enumerate(blocks):
            if b.has_proj:
                names.append(f"block{i}.shortcut"); kinds.append("shortcut"); macs.append(b.shortcut_macs); reach.append(i)
            names.append(f"block{i}.residual"); kinds.append("block"); macs.append(b.residual_macs); reach.append(i)
            if i < len(blocks) - 1:
                names.append(f"exit{i}"); kinds.append("exit"); macs.append(self.stages[i].ic.macs); reach.append(i)
        names.append("head"); kinds.append("head"); macs.append(blocks[-1].cout * classes); reach.append(self.n_exits)
        self._names: List[str] = names
        self._kinds: List[str] = kinds
        self._macs: List[int] = macs
        self._reach: List[int] = reach

    def _executed(self, exit_index: Tensor) -> Tensor:
        cols: List[Tensor] = []
        for r in self._reach:
            cols.append((exit_index >= r).to(torch.float32))
        return stack_cols(cols)

    def _finish(self, logits: Tensor, exit_logits: List[Tensor], final: Tensor, exit_index: Tensor) -> Dict[str, List[Tensor]]:
        executed = self._executed(exit_index)
        macs = executed.to(torch.float64) @ self.unit_macs().to(device=logits.device, dtype=torch.float64)
        no_gates: List[Tensor] = []
        return {"logits": [logits], "exit_logits": exit_logits, "gate_probs": no_gates, "executed": [executed],
                "macs": [macs], "final_logits": [final], "exit_index": [exit_index]}

    def forward(self, x: Tensor) -> Dict[str, List[Tensor]]:
        batch = x.size(0)
        h = F.relu(self.stem((x - self.mean) / self.std))
        exit_logits: List[Tensor] = []
        for st in self.stages:
            h = st.block(h)
            exit_logits.append(st.ic(h))
        final = self.head(self.last(h).mean((2, 3)))
        exit_index = torch.full([batch], self.n_exits, dtype=torch.int64, device=x.device)
        for i in range(self.n_exits - 1, -1, -1):  # first IC whose confidence reaches q wins
            fire = max_softmax(exit_logits[i]) >= self.threshold
            exit_index = torch.where(fire, torch.full_like(exit_index, i), exit_index)
        every = torch.stack(exit_logits + [final], 1)  # [B, E+1, K]
        logits = every.gather(1, exit_index.view(-1, 1, 1).expand(batch, 1, every.size(2))).squeeze(1)
        return self._finish(logits, exit_logits, final, exit_index)

    @torch.jit.export
    def forward_sparse(self, x: Tensor) -> Dict[str, List[Tensor]]:
        """Samples leave the batch at their exit. exit_logits is empty (an IC runs only on the
        samples that reach it); final_logits is NaN for the samples that left early."""
        with torch.no_grad():
            batch = x.size(0)
            h = F.relu(self.stem((x - self.mean) / self.std))
            rows = torch.arange(batch, device=x.device)
            logits = torch.zeros([batch, self.classes], dtype=x.dtype, device=x.device)
            exit_index = torch.full([batch], self.n_exits, dtype=torch.int64, device=x.device)
            i = 0
            for st in self.stages:
                if rows.size(0) > 0:
                    h = st.block(h)
                    z = st.ic(h)
                    fire = max_softmax(z) >= self.threshold
                    fired = fire.nonzero().squeeze(1)
                    if fired.size(0) > 0:
                        orig = rows.index_select(0, fired)
                        logits = logits.index_copy(0, orig, z.index_select(0, fired))
                        exit_index = exit_index.index_fill(0, orig, i)
                        keep = fire.logical_not().nonzero().squeeze(1)
                        h = h.index_select(0, keep)
                        rows = rows.index_select(0, keep)
                i += 1
            final = torch.full([batch, self.classes], float("nan"), dtype=x.dtype, device=x.device)
            if rows.size(0) > 0:
                f = self.head(self.last(h).mean((2, 3)))
                logits = logits.index_copy(0, rows, f)
                final = final.index_copy(0, rows, f)
            no_exits: List[Tensor] = []
            out = self._finish(logits, no_exits, final, exit_index)
        return out

    @torch.jit.export
    def exit_threshold(self) -> float:
        return self.threshold

    @torch.jit.export
    def unit_macs(self) -> Tensor:
        return torch.tensor(self._macs, dtype=torch.int64)

    @torch.jit.export
    def unit_names(self) -> List[str]:
        return self._names

    @torch.jit.export
    def unit_kinds(self) -> List[str]:
        return self._kinds


# ----------------------------------------------------------------------------- data

def default_data_dir():
    """The first of <repo>/data/fashion-mnist and /usr/share/datasets/fashion-mnist that holds
    the test labels (as scripts/setup.sh looks for them)."""
    for d in (os.path.join(ROOT, "data", "fashion-mnist"), "/usr/share/datasets/fashion-mnist"):
        if any(os.path.exists(os.path.join(d, f)) for f in ("t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte")):
            return d
    return None


def read_idx(data_dir: str, stem: str) -> np.ndarray:
    for name, opener in ((stem + ".gz", gzip.open), (stem, open)):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            with opener(path, "rb") as f:
                magic = struct.unpack(">I", f.read(4))[0]
                ndim = magic & 0xFF
                dims = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
                return np.frombuffer(f.read(), dtype=np.uint8).reshape(dims)
    raise SystemExit(f"{stem}(.gz) not found in {data_dir}: run `make data` or pass --data-dir")


def load_split(data_dir: str, split: str):
    x = read_idx(data_dir, f"{split}-images-idx3-ubyte")
    y = read_idx(data_dir, f"{split}-labels-idx1-ubyte")
    return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def as_float(x_u8: Tensor) -> Tensor:
    return x_u8.to(torch.float32) / 255.0


# ----------------------------------------------------------------------------- training

def train(model: nn.Module, kind: str, xtr: Tensor, ytr: Tensor, steps: int, seed: int, lr: float,
          target_rate: float, rate_weight: float, entropy_weight: float) -> dict:
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # linear decay to 0: most of the accuracy a short run can reach
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(steps, 1))
    model.train()
    t0 = time.perf_counter()
    last = {}
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(0, xtr.size(0), 64))
        x, y = as_float(xtr[idx]), ytr[idx]
        out = model(x)
        if kind == "gated":
            ce = F.cross_entropy(out["logits"][0], y)
            # target-rate penalty per gate on the straight-through hard decisions (ConvNet-AIG's
            # loss): each gate must run on about target_rate of each batch, which keeps the gates
            # input-dependent rather than all-on / all-off
            rates = [((p > 0.5).float() + p - p.detach()).mean() for p in out["gate_probs"]]
            rate_loss = sum((r - target_rate) ** 2 for r in rates) / len(rates)
            # mean binary entropy of the gate probabilities: decisions clearly on or off
            # (without it p stays close to 0.5 and any tiny perturbation flips a gate)
            p = torch.stack(out["gate_probs"], 1).clamp(1e-6, 1 - 1e-6)
            entropy = -(p * p.log() + (1 - p) * (1 - p).log()).mean()
            loss = ce + rate_weight * rate_loss + entropy_weight * entropy
            last = {"ce": round(ce.detach().item(), 3), "rate_loss": round(rate_loss.detach().item(), 4),
                    "entropy": round(entropy.detach().item(), 3), "rates": [round(r.detach().item(), 3) for r in rates]}
        else:
            ces = [F.cross_entropy(z, y) for z in out["exit_logits"] + out["final_logits"]]
            loss = sum(ces)
            last = {"ce": [round(c.detach().item(), 3) for c in ces]}
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if steps >= 4 and (step + 1) % max(steps // 4, 1) == 0:
            print(f"  [{kind}] step {step + 1}/{steps} loss {loss.detach().item():.3f} {last}", flush=True)
    if steps > 0:
        recalibrate_bn(model, xtr)
    model.eval()
    return {"steps": steps, "batch": 64, "optimizer": "Adam", "lr": lr, "schedule": "linear decay to 0",
            "bn": "running statistics recomputed on 2048 training images after training", "seconds": round(time.perf_counter() - t0, 2),
            "last": last}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, xtr: Tensor, n: int = 2048, bs: int = 256) -> None:
    """Recomputes the BatchNorm running statistics with the final weights (cumulative average
    over n training images): after a few hundred fast steps the momentum averages still lag."""
    bns = [mod for mod in model.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for i in range(0, n, bs):
        model(as_float(xtr[i:i + bs]))
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


@torch.no_grad()
def calibrate_gates(model: GatedNet, x: Tensor) -> None:
    """Sets each gate's output bias so that it is on for about half of `x` (sequentially: each
    gate sees the features the earlier gates' decisions produce). A good initialisation: gates
    start input-dependent instead of all-on or all-off."""
    model.eval()
    h = model.block0(F.relu(model.stem((x - model.mean) / model.std)))
    for st in model.stages:
        z = st.gate.logit(h)
        st.gate.fc2.bias -= z.median()
        on = (st.gate(h) > 0.5).float().view(-1, 1, 1, 1)
        h = F.relu(st.block.shortcut(h) + on * st.block.residual(h))


# ----------------------------------------------------------------------------- checks

def run_batches(m, x: Tensor, method: str = "forward", bs: int = 500) -> Dict[str, List[Tensor]]:
    outs = []
    with torch.no_grad():
        for i in range(0, x.size(0), bs):
            outs.append(getattr(m, method)(x[i:i + bs]))
    merged = {}
    for k in outs[0]:
        n = len(outs[0][k])
        merged[k] = [torch.cat([o[k][j] for o in outs]) for j in range(n)]
    return merged


def check_agreement(m, x: Tensor, name: str) -> None:
    """Asserts the protocol on x: dense vs sparse agreement and macs == executed @ unit_macs."""
    with torch.no_grad():
        d, s = m.forward(x), m.forward_sparse(x)
    um = m.unit_macs()
    assert um.dtype == torch.int64 and um.dim() == 1, um
    assert len(m.unit_names()) == len(m.unit_kinds()) == um.numel()
    assert all(k in KINDS for k in m.unit_kinds())
    for out, pass_ in ((d, "dense"), (s, "sparse")):
        ex, macs = out["executed"][0], out["macs"][0]
        assert ex.shape == (x.size(0), um.numel()) and ex.dtype == torch.float32, (pass_, ex.shape, ex.dtype)
        assert macs.dtype == torch.float64 and macs.shape == (x.size(0),)
        assert torch.equal(macs, ex.double() @ um.double()), f"{name} {pass_}: macs != executed @ unit_macs"
        assert torch.isfinite(out["logits"][0]).all()
    assert torch.equal(d["executed"][0], s["executed"][0]), f"{name}: executed differs between forward and forward_sparse"
    assert torch.equal(d["macs"][0], s["macs"][0]), f"{name}: macs differ"
    if "exit_index" in d:
        assert d["exit_index"][0].dtype == torch.int64
        assert torch.equal(d["exit_index"][0], s["exit_index"][0]), f"{name}: exit_index differs"
    diff = (d["logits"][0] - s["logits"][0]).abs().max().item()
    assert diff <= 1e-5, f"{name}: logits differ by {diff}"
    for i, (pd, ps) in enumerate(zip(d["gate_probs"], s["gate_probs"])):
        assert (pd - ps).abs().max().item() <= 1e-5, f"{name}: gate_probs[{i}] differ"


def summarise(m, kind: str, x: Tensor, y: Tensor) -> dict:
    um = m.unit_macs().double()
    kinds = m.unit_kinds()
    static = float(sum(um[i] for i, k in enumerate(kinds) if k in BACKBONE))
    d = run_batches(m, x, "forward")
    s = run_batches(m, x, "forward_sparse")
    ex = d["executed"][0]
    acc = (d["logits"][0].argmax(1) == y).float().mean().item()
    cost = (d["macs"][0] / static).mean().item()
    mism = int((d["executed"][0] != s["executed"][0]).any(1).sum())
    mism += int(((d["logits"][0] - s["logits"][0]).abs().amax(1) > 1e-5).sum())
    info = {"accuracy": round(acc, 4), "mean_cost": round(cost, 4), "static_macs": int(static),
            "test_images": x.size(0), "dense_sparse_disagreements": mism,
            "units": [{"name": n, "kind": k, "macs": int(v)} for n, k, v in zip(m.unit_names(), kinds, m.unit_macs())]}
    if kind == "gated":
        cols = [i for i, k in enumerate(kinds) if k == "block"][1:]  # blocks 1.. are gated
        gated = ex[:, cols]
        per_sample = gated.mean(1)
        patterns = len({tuple(r.tolist()) for r in gated})
        probs = torch.stack(d["gate_probs"], 1)
        info.update({
            "gated_block_rate": round(gated.mean().item(), 4),
            "per_gate_rate": [round(v, 4) for v in gated.mean(0).tolist()],
            "per_sample_rate_std": round(per_sample.std().item(), 4),
            "distinct_patterns": patterns,
            "gate_prob_mean": round(probs.mean().item(), 4),
            "gate_probs_within_0.05_of_half": round(((probs - 0.5).abs() < 0.05).float().mean().item(), 4),
            "gate_prob_margin_median": round((probs - 0.5).abs().median().item(), 4),
        })
    else:
        ei = d["exit_index"][0]
        n = len(d["exit_logits"])
        info.update({
            "threshold": m.exit_threshold(),
            "exit_distribution": [round((ei == i).float().mean().item(), 4) for i in range(n + 1)],
            "ic_accuracy": [round((z.argmax(1) == y).float().mean().item(), 4) for z in d["exit_logits"] + d["final_logits"]],
        })
    return info


# ----------------------------------------------------------------------------- main

def add_reference(reference: Dict[str, Tensor], kind: str, m, probe: Tensor) -> None:
    """What the saved module `m`'s forward returns on `probe`, under `kind.key[.i]` names."""
    with torch.no_grad():
        out = m.forward(probe)
    for key, ts in out.items():
        if key in ("gate_probs", "exit_logits"):
            for i, t in enumerate(ts):
                reference[f"{kind}.{key}.{i}"] = t.clone().contiguous()
        else:
            reference[f"{kind}.{key}"] = ts[0].clone().contiguous()
    reference[f"{kind}.unit_macs"] = m.unit_macs().contiguous()


def write_reference_only(models_dir: str, data_dir: str, out: str) -> None:
    """--reference-from: PyTorch's outputs of already saved gated.pt / sdn.pt on the probe batch,
    computed on this machine (float results of the same file differ slightly across CPU models)."""
    from safetensors.torch import save_file

    xte, _ = load_split(data_dir, "t10k")
    probe = as_float(xte[:32]).contiguous()
    reference = {"x": probe}
    for kind in ("gated", "sdn"):
        m = torch.jit.load(os.path.join(models_dir, f"{kind}.pt"))
        m.eval()
        add_reference(reference, kind, m, probe)
    save_file(reference, os.path.join(out, "reference.safetensors"), metadata={"format": "pt", "models": models_dir})
    print(f"wrote {out}/reference.safetensors from {models_dir}/gated.pt and sdn.pt")


def cpu_name() -> str:
    """The CPU's model name (a short CPU training run is reproducible on one CPU model, not across them)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--train-steps", type=int, default=300, help="Adam steps per model (0 = just initialise)")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX files (default: data/fashion-mnist, "
                                                     "then /usr/share/datasets/fashion-mnist)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=0.9, help="SDN exit threshold q (max-softmax)")
    ap.add_argument("--target-rate", type=float, default=0.6, help="gated: target execution rate per gate")
    ap.add_argument("--rate-weight", type=float, default=5.0, help="gated: weight of the target-rate penalty")
    ap.add_argument("--entropy-weight", type=float, default=0.1, help="gated: weight of the gate-entropy penalty")
    ap.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (decays linearly to 0)")
    ap.add_argument("--reference-from", default=None, metavar="DIR",
                    help="train nothing: write reference.safetensors for DIR's saved gated.pt and sdn.pt")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    torch.set_num_threads(2)
    data_dir = args.data_dir or default_data_dir()
    if data_dir is None:
        raise SystemExit("Fashion-MNIST not found in data/fashion-mnist or /usr/share/datasets/fashion-mnist: "
                         "run `make data` or pass --data-dir")
    os.makedirs(args.out, exist_ok=True)
    if args.reference_from:
        write_reference_only(args.reference_from, data_dir, args.out)
        return
    xtr, ytr = load_split(data_dir, "train")
    xte, yte = load_split(data_dir, "t10k")
    x_test, y_test = as_float(xte[:2000]), yte[:2000]
    probe = as_float(xte[:32]).contiguous()
    print(f"data: {data_dir} ({xtr.size(0)} train / {xte.size(0)} test images), "
          f"{time.perf_counter() - t_start:.1f} s", flush=True)

    from safetensors.torch import save_file

    reference = {"x": probe}
    report = {"data_dir": data_dir, "seed": args.seed, "torch": torch.__version__, "threads": 2, "cpu": cpu_name(),
              "models": {}}
    for kind in ("gated", "sdn"):
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        if kind == "gated":
            model = GatedNet()
            calibrate_gates(model, as_float(xtr[:512]))
            settings = {"loss": f"CE + {args.rate_weight} * mean_g (rate_g - {args.target_rate})^2 "
                                f"+ {args.entropy_weight} * mean binary entropy of p "
                                "(rate_g = batch mean of gate g's straight-through hard decision)",
                        "target_rate": args.target_rate, "rate_weight": args.rate_weight,
                        "entropy_weight": args.entropy_weight,
                        "gate": "GAP -> Linear(C,16) -> BN -> ReLU -> Linear(16,1) -> sigmoid; run iff p > 0.5; "
                                "output bias initialised to the median logit on 512 training images"}
        else:
            model = ExitNet(threshold=args.threshold)
            settings = {"loss": "sum of the cross-entropies of every IC and the final head",
                        "threshold": args.threshold, "ic": "adaptive avg pool 4x4 -> Linear"}
        settings.update(train(model, kind, xtr, ytr, args.train_steps, args.seed, args.lr,
                              args.target_rate, args.rate_weight, args.entropy_weight))
        model.eval()
        path = os.path.join(args.out, f"{kind}.pt")
        torch.jit.save(torch.jit.script(model), path)
        m = torch.jit.load(path)  # what dynrobust will load
        m.eval()
        check_agreement(m, probe, kind)
        info = summarise(m, kind, x_test, y_test)
        info["training"] = settings
        info["file"] = os.path.basename(path)
        add_reference(reference, kind, m, probe)
        info["seconds"] = round(time.perf_counter() - t0, 2)
        report["models"][kind] = info
        line = f"{kind}: accuracy {info['accuracy'] * 100:.2f} % on {x_test.size(0)} test images, " \
               f"mean cost {info['mean_cost']:.3f} (static {info['static_macs']:,} MACs)"
        if kind == "gated":
            line += f", gated-block execution rate {info['gated_block_rate']:.3f} (per gate {info['per_gate_rate']}, " \
                    f"per-sample std {info['per_sample_rate_std']:.3f}, {info['distinct_patterns']} distinct patterns, " \
                    f"median |p - 0.5| {info['gate_prob_margin_median']:.3f})"
        else:
            line += f", q = {info['threshold']}, exits {info['exit_distribution']}, IC accuracy {info['ic_accuracy']}"
        print(line + f"; {info['seconds']:.1f} s", flush=True)

    meta = {"format": "pt", "x": "first 32 Fashion-MNIST test images, float32 [32,1,28,28] in [0,1]",
            "gated.unit_names": json.dumps([u["name"] for u in report["models"]["gated"]["units"]]),
            "sdn.unit_names": json.dumps([u["name"] for u in report["models"]["sdn"]["units"]]),
            "sdn.exit_threshold": str(report["models"]["sdn"]["threshold"])}
    save_file(reference, os.path.join(args.out, "reference.safetensors"), metadata=meta)
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    with open(os.path.join(args.out, "models.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {', '.join(sorted(os.listdir(args.out)))} to {args.out}; total {report['seconds']:.1f} s")


if __name__ == "__main__":
    main()
