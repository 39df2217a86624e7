"""TorchScript files that each break dynrobust's model protocol in exactly one way.

For the tests of dynrobust's TorchScript adapter and its error messages. Every file is a
tiny untrained gated ResNet (the GatedNet of make_models.py with widths 4/4/8/8) whose gates
are calibrated to be on for about half of the inputs; no training, no data needed, < 10 s.

  ok.pt            a valid gated model (the reference the others are broken from)
  missing_key.pt   forward / forward_sparse return no "executed" key
  wrong_shape.pt   "executed" is [B] (units run per sample) instead of [B,U]
  non_finite.pt    "logits" has NaN in column 0 for every sample
  no_unit_macs.pt  no exported unit_macs() method (unit_names / unit_kinds are there)
  traced.pt        the gate decisions were frozen by torch.jit.trace: the executed mask (and the
                   blocks actually run) is the same for every input, while gate_probs still
                   follow the input (see make_traced below)
  probe.safetensors  x: [16,1,28,28] synthetic images in [0,1] on which ok.pt's executed mask
                   varies between samples and traced.pt's does not

Run with the project's venv:
  .venv/bin/python examples/torchscript/protocol_violations.py --out /tmp/ts-violations

The script reloads every file and checks with a small Python mirror of the adapter's checks
(check_protocol) that each one shows its own problem and only that one.
"""
import argparse
import os
import sys
import time
import warnings
from typing import Dict, List, Tuple

# Idle OpenMP threads sleep instead of spinning: with 2 threads on a 2-core machine that is also
# running something else (a cargo build, a study), spinning threads wait a whole scheduler slice
# at every op and a training step takes ~20x longer. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_models import (GatedNet, as_float, calibrate_gates, check_agreement, default_data_dir,  # noqa: E402
                         load_split)

REQUIRED = ("logits", "exit_logits", "gate_probs", "executed", "macs")


# ----------------------------------------------------------------------------- wrappers

class MissingKey(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Dict[str, List[Tensor]]:
        out = self.inner.forward(x)
        out.pop("executed")
        return out

    @torch.jit.export
    def forward_sparse(self, x: Tensor) -> Dict[str, List[Tensor]]:
        out = self.inner.forward_sparse(x)
        out.pop("executed")
        return out

    @torch.jit.export
    def unit_macs(self) -> Tensor:
        return self.inner.unit_macs()

    @torch.jit.export
    def unit_names(self) -> List[str]:
        return self.inner.unit_names()

    @torch.jit.export
    def unit_kinds(self) -> List[str]:
        return self.inner.unit_kinds()


class WrongShape(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def _break(self, out: Dict[str, List[Tensor]]) -> Dict[str, List[Tensor]]:
        out["executed"] = [out["executed"][0].sum(1)]  # [B]: how many units ran, not which
        return out

    def forward(self, x: Tensor) -> Dict[str, List[Tensor]]:
        return self._break(self.inner.forward(x))

    @torch.jit.export
    def forward_sparse(self, x: Tensor) -> Dict[str, List[Tensor]]:
        return self._break(self.inner.forward_sparse(x))

    @torch.jit.export
    def unit_macs(self) -> Tensor:
        return self.inner.unit_macs()

    @torch.jit.export
    def unit_names(self) -> List[str]:
        return self.inner.unit_names()

    @torch.jit.export
    def unit_kinds(self) -> List[str]:
        return self.inner.unit_kinds()


class NonFinite(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def _break(self, out: Dict[str, List[Tensor]]) -> Dict[str, List[Tensor]]:
        logits = out["logits"][0].clone()
        logits[:, 0] = float("nan")
        out["logits"] = [logits]
        return out

    def forward(self, x: Tensor) -> Dict[str, List[Tensor]]:
        return self._break(self.inner.forward(x))

    @torch.jit.export
    def forward_sparse(self, x: Tensor) -> Dict[str, List[Tensor]]:
        return self._break(self.inner.forward_sparse(x))

    @torch.jit.export
    def unit_macs(self) -> Tensor:
        return self.inner.unit_macs()

    @torch.jit.export
    def unit_names(self) -> List[str]:
        return self.inner.unit_names()

    @torch.jit.export
    def unit_kinds(self) -> List[str]:
        return self.inner.unit_kinds()


class NoUnitMacs(nn.Module):
    """Everything but unit_macs. (The inner module's own unit_macs is compiled too, but it is
    a method of the submodule `inner`, not of the top-level module the adapter calls.)"""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Dict[str, List[Tensor]]:
        return self.inner.forward(x)

    @torch.jit.export
    def forward_sparse(self, x: Tensor) -> Dict[str, List[Tensor]]:
        return self.inner.forward_sparse(x)

    @torch.jit.export
    def unit_names(self) -> List[str]:
        return self.inner.unit_names()

    @torch.jit.export
    def unit_kinds(self) -> List[str]:
        return self.inner.unit_kinds()


# ----------------------------------------------------------------------------- the traced model

class FrozenCore(nn.Module):
    """Eager code a user might write for one image at a time: a Python `if` on the gate of the
    first sample decides whether the block runs. torch.jit.trace records only the branch taken
    on the example input, so the traced module runs the same blocks and reports the same
    executed mask for every input; the gate probabilities are ordinary tensor ops and still
    follow the input."""

    def __init__(self, net: GatedNet):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tuple[Tensor, List[Tensor], Tensor, Tensor]:
        net = self.net
        ones = torch.ones_like(x[:, 0, 0, 0])
        h = F.relu(net.stem((x - net.mean) / net.std))
        cols = [ones] + ([ones] if net.block0.has_proj else []) + [ones]
        h = net.block0(h)
        probs = []
        for st in net.stages:
            p = st.gate(h)
            probs.append(p)
            s = st.block.shortcut(h)
            if bool(p[0] > 0.5):  # Python control flow: frozen by the tracer
                h = F.relu(s + st.block.residual(h))
                ran = ones
            else:
                h = F.relu(s)
                ran = torch.zeros_like(ones)
            cols += [ones] + ([ones] if st.block.has_proj else []) + [ran]
        logits = net.head(h.mean((2, 3)))
        executed = torch.stack(cols + [ones], 1)
        macs = executed.double() @ torch.tensor(net._macs, dtype=torch.float64)
        return logits, probs, executed, macs


class TracedGated(nn.Module):
    """Scripted shell around the traced core. torch.jit.trace cannot produce the protocol's
    output itself: a traced function may not return a Dict[str, List[Tensor]] (only dicts of
    tensors or of equally-sized tuples) nor an empty list (exit_logits of a gated model), and
    string-returning methods cannot be traced. (Methods marked @torch.jit.export ARE carried
    into a traced module - they are scripted during tracing - but the dict output is not.) So
    the core is traced (frozen mask) and this shell, scripted, builds the dict and exports
    forward_sparse, unit_macs, unit_names and unit_kinds: the only protocol problem left is the
    frozen mask, as in a model whose forward was traced."""

    def __init__(self, core: torch.jit.ScriptModule, names: List[str], kinds: List[str], macs: List[int]):
        super().__init__()
        self.core = core
        self._names = names
        self._kinds = kinds
        self._macs = macs

    def forward(self, x: Tensor) -> Dict[str, List[Tensor]]:
        logits, probs, executed, macs = self.core(x)
        no_exits: List[Tensor] = []
        return {"logits": [logits], "exit_logits": no_exits, "gate_probs": probs, "executed": [executed],
                "macs": [macs], "final_logits": [logits]}

    @torch.jit.export
    def forward_sparse(self, x: Tensor) -> Dict[str, List[Tensor]]:
        with torch.no_grad():
            out = self.forward(x)
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


def make_traced(net: GatedNet, example: Tensor) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TracerWarning about bool(p[0] > 0.5) is the point
        core = torch.jit.trace(FrozenCore(net), example, strict=False, check_trace=False)
    return TracedGated(core, net._names, net._kinds, net._macs)


# ----------------------------------------------------------------------------- inputs and checks

def synthetic_images(n: int, seed: int) -> Tensor:
    """Blobs of varying brightness and size on a dark background, in [0,1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    cy, cx = 14 + 4 * torch.randn(n, 1, 1, generator=g), 14 + 4 * torch.randn(n, 1, 1, generator=g)
    r = 4 + 8 * torch.rand(n, 1, 1, generator=g)
    bright = 0.2 + 0.8 * torch.rand(n, 1, 1, generator=g)
    blob = bright * torch.sigmoid((r - ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()) * 1.5)
    noise = 0.1 * torch.rand(n, 28, 28, generator=g)
    return (blob + noise).clamp(0, 1).unsqueeze(1)


@torch.no_grad()
def sharpen_gates(net: GatedNet, x: Tensor, spread: float = 3.0) -> None:
    """Scales each gate's output layer so its logits have standard deviation `spread` on x:
    decisions are unchanged (same sign) but p is clearly away from 0.5 for most inputs."""
    h = net.block0(F.relu(net.stem((x - net.mean) / net.std)))
    for st in net.stages:
        z = st.gate.logit(h)
        k = spread / z.std().clamp_min(1e-6)
        st.gate.fc2.weight.mul_(k)
        st.gate.fc2.bias.mul_(k)
        on = (st.gate(h) > 0.5).float().view(-1, 1, 1, 1)
        h = F.relu(st.block.shortcut(h) + on * st.block.residual(h))


def check_protocol(m, x: Tensor) -> List[str]:
    """A Python mirror of the adapter's load-time checks; returns the problems found
    ("warning: ..." for the frozen-mask sign)."""
    problems: List[str] = []
    try:
        um = m.unit_macs()
    except Exception:
        return ["no unit_macs()"]
    units = um.numel()
    for method in ("forward", "forward_sparse"):
        with torch.no_grad():
            out = getattr(m, method)(x)
        missing = [k for k in REQUIRED if k not in out]
        if missing:
            problems.append(f"{method}: missing keys {missing}")
            continue
        b = x.size(0)
        if tuple(out["executed"][0].shape) != (b, units):
            problems.append(f"{method}: executed has shape {tuple(out['executed'][0].shape)}, expected {(b, units)}")
            continue
        if tuple(out["macs"][0].shape) != (b,) or tuple(out["logits"][0].shape)[:1] != (b,):
            problems.append(f"{method}: macs/logits shape")
            continue
        if not all(torch.isfinite(t).all() for k in ("logits", "executed", "macs") for t in out[k]):
            problems.append(f"{method}: non-finite values")
            continue
        ex = out["executed"][0]
        if not torch.equal(out["macs"][0], ex.double() @ um.double()):
            problems.append(f"{method}: macs != executed @ unit_macs")
        if method == "forward" and b > 1 and bool((ex == ex[:1]).all()):
            problems.append("warning: executed mask identical for every input (traced?)")
    return sorted(set(problems))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)

    net = GatedNet(widths=[4, 4, 8, 8], hidden=8)
    calib = synthetic_images(256, args.seed + 1)
    calibrate_gates(net, calib)
    sharpen_gates(net, calib)
    net.eval()
    probe = synthetic_images(16, args.seed + 2)

    # the example input for tracing: one image whose gates are some on, some off
    with torch.no_grad():
        ex = net(calib)["executed"][0]
    gated_cols = [i for i, k in enumerate(net._kinds) if k == "block"][1:]
    pattern = ex[:, gated_cols]
    mixed = ((pattern.sum(1) > 0) & (pattern.sum(1) < len(gated_cols))).nonzero().squeeze(1)
    assert mixed.numel() > 0, "no calibration image with a mixed gate pattern"
    example = calib[mixed[0]:mixed[0] + 1]

    modules = {
        "ok": net,
        "missing_key": MissingKey(net),
        "wrong_shape": WrongShape(net),
        "non_finite": NonFinite(net),
        "no_unit_macs": NoUnitMacs(net),
        "traced": make_traced(net, example),
    }
    expected = {
        "ok": [],
        "missing_key": ["forward: missing keys ['executed']", "forward_sparse: missing keys ['executed']"],
        "wrong_shape": [f"forward: executed has shape (16,), expected (16, {len(net._macs)})",
                        f"forward_sparse: executed has shape (16,), expected (16, {len(net._macs)})"],
        "non_finite": ["forward: non-finite values", "forward_sparse: non-finite values"],
        "no_unit_macs": ["no unit_macs()"],
        "traced": ["warning: executed mask identical for every input (traced?)"],
    }
    for name, module in modules.items():
        path = os.path.join(args.out, f"{name}.pt")
        torch.jit.save(torch.jit.script(module.eval()), path)
        m = torch.jit.load(path)
        found = check_protocol(m, probe)
        assert found == sorted(expected[name]), f"{name}.pt: expected {expected[name]}, found {found}"
        if name in ("ok", "traced"):  # dense and sparse passes agree exactly
            check_agreement(m, probe, name)
            check_agreement(m, calib[:64], name)
        print(f"{name}.pt: {found or 'valid'}")

    # the traced file's mask is frozen to the example's pattern; ok.pt's follows the input
    ok, traced = torch.jit.load(os.path.join(args.out, "ok.pt")), torch.jit.load(os.path.join(args.out, "traced.pt"))
    with torch.no_grad():
        ok_ex, tr_out = ok(probe)["executed"][0], traced(probe)
    frozen = tr_out["executed"][0][0, gated_cols].tolist()
    print(f"ok.pt gated-block patterns on the probe: {len({tuple(r) for r in ok_ex[:, gated_cols].tolist()})} distinct; "
          f"traced.pt: always {frozen} (its gate_probs still vary: "
          f"{[round(v, 2) for v in tr_out['gate_probs'][0][:4].tolist()]}...)")
    data_dir = default_data_dir()
    if data_dir is not None:  # informative: does ok.pt's mask also vary on real images?
        xte, _ = load_split(data_dir, "t10k")
        with torch.no_grad():
            real = ok(as_float(xte[:16]))["executed"][0][:, gated_cols]
        print(f"ok.pt on the first 16 Fashion-MNIST test images: {len({tuple(r) for r in real.tolist()})} distinct patterns")

    from safetensors.torch import save_file
    save_file({"x": probe.contiguous()}, os.path.join(args.out, "probe.safetensors"),
              metadata={"x": "16 synthetic 1x28x28 images in [0,1]; ok.pt's executed mask varies on them"})
    print(f"wrote {', '.join(sorted(os.listdir(args.out)))} to {args.out} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
