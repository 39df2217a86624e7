"""PyTorch-eager reference for dynrobust's performance comparison.

Rebuilds the committed `static` and `sdn` ResNet-14n checkpoints in plain PyTorch from their
safetensors weights (same names as the Rust VarStore), checks they classify the Fashion-MNIST
test images like dynrobust does, and times PGD-L∞ and DeepSloth L∞ iterations at batch 1, 8
and 128 — the same attacks, weights and batches as `dynrobust bench attacks`.

Run with the project's venv: .venv/bin/python scripts/torch_reference.py [--reps 3]
Prints one JSON object per (attack, model, batch) on stdout.
"""
import argparse, gzip, json, os, struct, time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN, STD = 0.2860, 0.3530


def load_test_images(n):
    for d in ("data/fashion-mnist", "/usr/share/datasets/fashion-mnist"):
        base = os.path.join(ROOT, d) if not d.startswith("/") else d
        path = os.path.join(base, "t10k-images-idx3-ubyte.gz")
        if os.path.exists(path):
            with gzip.open(path) as f:
                _, count, h, w = struct.unpack(">IIII", f.read(16))
                x = np.frombuffer(f.read(), dtype=np.uint8).reshape(count, 1, h, w)[:n]
            with gzip.open(os.path.join(base, "t10k-labels-idx1-ubyte.gz")) as f:
                f.read(8)
                y = np.frombuffer(f.read(), dtype=np.uint8)[:n]
            return torch.from_numpy(x.astype(np.float32) / 255.0), torch.from_numpy(y.astype(np.int64))
    raise SystemExit("Fashion-MNIST not found: run `make data`")


class Net:
    """ResNet-14n (+ SDN internal classifiers), dense pass, eval-mode BN (eps 1e-5)."""

    def __init__(self, name):
        self.p = load_file(os.path.join(ROOT, "models", "checkpoints", name, "model.safetensors"))
        self.exits = any(k.startswith("exits.") for k in self.p)

    def conv_bn(self, prefix, x, stride, pad):
        p = self.p
        x = F.conv2d(x, p[prefix + ".conv.weight"], stride=stride, padding=pad)
        return F.batch_norm(x, p[prefix + ".bn.running_mean"], p[prefix + ".bn.running_var"],
                            p[prefix + ".bn.weight"], p[prefix + ".bn.bias"], False, 0.0, 1e-5)

    def ic(self, i, h):
        s = h.shape[-1]
        k = min(max(s // 4, 2), s)
        hc = h.contiguous(memory_format=torch.channels_last)
        a = self.p[f"exits.{i}.alpha"]
        mixed = a * F.max_pool2d(hc, k, k) + (1 - a) * F.avg_pool2d(hc, k, k)
        return F.linear(mixed.flatten(1), self.p[f"exits.{i}.linear.weight"], self.p[f"exits.{i}.linear.bias"])

    def forward(self, x):
        h = F.relu(self.conv_bn("stem", (x - MEAN) / STD, 1, 1))
        exit_logits = []
        for b in range(6):
            stride = 2 if b in (2, 4) else 1
            pre = f"blocks.{b}"
            s = self.conv_bn(pre + ".shortcut", h, stride, 0) if pre + ".shortcut.conv.weight" in self.p else h
            f = self.conv_bn(pre + ".conv2", F.relu(self.conv_bn(pre + ".conv1", h, stride, 1)), 1, 1)
            h = F.relu(s + f)
            if self.exits:
                exit_logits.append(self.ic(b, h))
        logits = F.linear(h.mean((2, 3)), self.p["head.weight"], self.p["head.bias"])
        return logits, exit_logits


def pgd_linf(net, x, y, eps, steps, alpha):
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        logits, _ = net.forward(x_adv)
        loss = F.cross_entropy(logits, y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            x_adv = torch.min(torch.max(x_adv + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv


def deepsloth(net, x, eps, steps, alpha):
    x_adv = (x + torch.empty_like(x).uniform_(-alpha, alpha)).clamp(0, 1)
    x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        _, exits = net.forward(x_adv)
        k = exits[0].shape[1]
        loss = sum((-(F.softmax(z, 1) + 1e-9).log().sum(1) / k).mean() for z in exits) * x.shape[0]
        (g,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            x_adv = torch.min(torch.max(x_adv - alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv


def median_secs(reps, f):
    f()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    x, y = load_test_images(1000)
    with torch.no_grad():
        for name in ("static", "sdn"):
            logits, _ = Net(name).forward(x)
            acc = (logits.argmax(1) == y).float().mean().item()
            print(json.dumps({"check": name, "final_head_accuracy_first_1000": acc}))
    iters = 10
    for attack, model in (("pgd-linf", "static"), ("pgd-linf", "sdn"), ("deepsloth", "sdn")):
        net = Net(model)
        for batch in (1, 8, 128):
            xb, yb = x[:batch], y[:batch]
            if attack == "pgd-linf":
                run = lambda: pgd_linf(net, xb, yb, 8 / 255, iters, 2.5 * (8 / 255) / iters)
            else:
                run = lambda: deepsloth(net, xb, 0.03125, iters, 0.002)
            t = median_secs(min(args.reps, 3), run) / iters
            print(json.dumps({"attack": attack, "model": model, "batch": batch, "torch_ms_per_iteration": t * 1e3}))


if __name__ == "__main__":
    main()
