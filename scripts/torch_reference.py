"""PyTorch-eager reference for dynrobust's performance comparison.

Rebuilds the committed `static`, `sdn` and `skipnet` ResNet-14n checkpoints in plain PyTorch
from their safetensors weights (same names as the Rust VarStore), checks they classify the
Fashion-MNIST test images like dynrobust does, and times PGD-L∞, DeepSloth L∞ and ILFO
(faithful) iterations at batch 1, 8 and 128 — the same attacks, weights and batches as
`dynrobust bench attacks` — each on the plain network and on one with its batch norms folded
into the convolutions by hand (what dynrobust does on load).

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


class FoldedNet(Net):
    """The same network with every batch norm folded into its convolution by hand
    (w·γ/√(σ²+ε), β − μ·γ/√(σ²+ε)) — what dynrobust does on load; timed as a second reference
    so the comparison shows how much of dynrobust's lead is the folding."""

    def __init__(self, name):
        super().__init__(name)
        self.folded = {}
        for key in list(self.p):
            if key.endswith(".conv.weight"):
                pre = key[: -len(".conv.weight")]
                scale = self.p[pre + ".bn.weight"] / torch.sqrt(self.p[pre + ".bn.running_var"] + 1e-5)
                bias = self.p[pre + ".bn.bias"] - self.p[pre + ".bn.running_mean"] * scale
                self.folded[pre] = (self.p[key] * scale.view(-1, 1, 1, 1), bias)

    def conv_bn(self, prefix, x, stride, pad):
        w, b = self.folded[prefix]
        return F.conv2d(x, w, b, stride=stride, padding=pad)


class SkipNet(Net):
    """The committed `skipnet`: ResNet-14n with SkipNet's recurrent gate (per position GAP +
    linear embedding C→10, one shared LSTM cell, linear 10→1, sigmoid) before blocks 1–5;
    dense pass with straight-through hard gates, out = relu(S(h) + z·F(h))."""

    def gate_step(self, pos, h, state):
        p = self.p
        emb = F.linear(h.mean((2, 3)), p[f"rnn_gate.embed.{pos}.weight"], p[f"rnn_gate.embed.{pos}.bias"])
        gates = F.linear(emb, p["rnn_gate.lstm_ih.weight"], p["rnn_gate.lstm_ih.bias"])
        if state is None:
            gates = gates + p["rnn_gate.lstm_hh.bias"]
            c_prev = torch.zeros_like(emb)
        else:
            gates = gates + F.linear(state[0], p["rnn_gate.lstm_hh.weight"], p["rnn_gate.lstm_hh.bias"])
            c_prev = state[1]
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
        hid = torch.sigmoid(o) * torch.tanh(c)
        prob = torch.sigmoid(F.linear(hid, p["rnn_gate.proj.weight"], p["rnn_gate.proj.bias"])).squeeze(1)
        return prob, (hid, c)

    def forward(self, x):
        h = F.relu(self.conv_bn("stem", (x - MEAN) / STD, 1, 1))
        probs, state = [], None
        for b in range(6):
            stride = 2 if b in (2, 4) else 1
            pre = f"blocks.{b}"
            s = self.conv_bn(pre + ".shortcut", h, stride, 0) if pre + ".shortcut.conv.weight" in self.p else h
            f = self.conv_bn(pre + ".conv2", F.relu(self.conv_bn(pre + ".conv1", h, stride, 1)), 1, 1)
            if b == 0:
                h = F.relu(s + f)
                continue
            prob, state = self.gate_step(b - 1, h, state)
            z = (prob > 0.5).float() + (prob - prob.detach())
            probs.append(prob)
            h = F.relu(s + z.view(-1, 1, 1, 1) * f)
        logits = F.linear(h.mean((2, 3)), self.p["head.weight"], self.p["head.bias"])
        return logits, probs


class FoldedSkipNet(SkipNet, FoldedNet):
    pass


def ilfo_faithful(net, x, steps, lr=5e-4, c=1e5, lo=-2.22, hi=2.5):
    """ILFO as dynrobust's faithful mode: Adam on a tanh-space modifier w (w₀ = 0) in normalised
    units, x_adv_n = R(w + x_n), loss G·c·Σ relu(0.5 − p) + ||x_adv_n − x_n||², best iterate."""
    x_n = (x - MEAN) / STD
    w = torch.zeros_like(x)
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    best_loss = torch.full((x.shape[0],), float("inf"))
    best = x.clone()
    for t in range(1, steps + 1):
        w_leaf = w.detach().requires_grad_(True)
        x_adv_n = (torch.tanh(w_leaf + x_n) + 1) * (0.5 * (hi - lo)) + lo
        x_adv = (x_adv_n * STD + MEAN).clamp(0, 1)
        _, probs = net.forward(x_adv)
        gates = torch.stack(probs, 1)
        loss = F.relu(0.5 - gates).sum(1) * (c * gates.shape[1]) + (x_adv_n - x_n).square().flatten(1).sum(1)
        (g,) = torch.autograd.grad(loss.sum(), w_leaf)
        with torch.no_grad():
            better = loss < best_loss
            best_loss = torch.where(better, loss, best_loss)
            best = torch.where(better.view(-1, 1, 1, 1), x_adv, best)
            m = m * 0.9 + g * 0.1
            v = v * 0.999 + g.square() * 0.001
            w = w - (m / (1 - 0.9**t)) * lr / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
    return best


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
            folded, _ = FoldedNet(name).forward(x)
            acc = (logits.argmax(1) == y).float().mean().item()
            diff = (logits - folded).abs().max().item()
            print(json.dumps({"check": name, "final_head_accuracy_first_1000": acc, "folded_max_logit_diff": diff}))
        logits, probs = SkipNet("skipnet").forward(x)
        folded, _ = FoldedSkipNet("skipnet").forward(x)
        rate = (torch.stack(probs, 1) > 0.5).float().mean().item()
        print(json.dumps({"check": "skipnet", "final_head_accuracy_first_1000": (logits.argmax(1) == y).float().mean().item(),
                          "gate_rate_first_1000": rate, "folded_max_logit_diff": (logits - folded).abs().max().item()}))
    iters = 10
    nets = {"static": (Net, FoldedNet), "sdn": (Net, FoldedNet), "skipnet": (SkipNet, FoldedSkipNet)}
    for attack, model in (("pgd-linf", "static"), ("pgd-linf", "sdn"), ("deepsloth", "sdn"), ("ilfo", "skipnet")):
        for batch in (1, 8, 128):
            xb, yb = x[:batch], y[:batch]
            row = {"attack": attack, "model": model, "batch": batch}
            plain, folded = nets[model]
            for key, net in (("torch_ms_per_iteration", plain(model)), ("torch_folded_ms_per_iteration", folded(model))):
                if attack == "pgd-linf":
                    run = lambda: pgd_linf(net, xb, yb, 8 / 255, iters, 2.5 * (8 / 255) / iters)
                elif attack == "ilfo":
                    run = lambda: ilfo_faithful(net, xb, iters)
                else:
                    run = lambda: deepsloth(net, xb, 0.03125, iters, 0.002)
                # batch ≤ 8: five times the repetitions, as `dynrobust bench attacks` does
                reps = min(args.reps, 3) * (5 if batch <= 8 else 1)
                row[key] = median_secs(reps, run) / iters * 1e3
            print(json.dumps(row))


if __name__ == "__main__":
    main()
