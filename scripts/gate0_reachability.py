"""Why GradMDM cannot reach 90 % recovery on the committed `gated` model at ε = 0.1.

Attacks only the first AIG gate of `gated` (the gate of block 0, whose residual branch holds
35.6 % of the static MACs): PGD-L∞ on gate 0's on-minus-off logit margin, 200 steps of ε/40,
best of 3 starts (clean + 2 random), on the first 1,000 Fashion-MNIST test images. Images whose
gate 0 stays shut under this dedicated attack bound the recovery any energy attack can reach:
even with every other gate open they miss block 0's MACs.

Run with the project's venv: .venv/bin/python scripts/gate0_reachability.py
"""
import sys, os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch, torch.nn.functional as F
import torch_reference as R

STATIC_MACS = 5_074_368
BLOCK0_RESIDUAL_MACS = 2 * 9 * 8 * 8 * 28 * 28


def main():
    torch.manual_seed(0)
    x, _ = R.load_test_images(1000)
    net = R.Net("gated")
    p = net.p

    def margin(xa):
        h = F.relu(net.conv_bn("stem", (xa - R.MEAN) / R.STD, 1, 1))
        z = F.linear(h.mean((2, 3)), p["gates.0.fc1.weight"])
        z = F.batch_norm(z, p["gates.0.bn.running_mean"], p["gates.0.bn.running_var"], p["gates.0.bn.weight"], p["gates.0.bn.bias"], False, 0.0, 1e-5)
        w = F.linear(F.relu(z), p["gates.0.fc2.weight"], p["gates.0.fc2.bias"])
        return w[:, 1] - w[:, 0]  # > 0 iff softmax(w)[on] > 0.5

    with torch.no_grad():
        print(f"clean: gate 0 open for {(margin(x) > 0).float().mean().item():.3f} of {len(x)} images")
    share = BLOCK0_RESIDUAL_MACS / STATIC_MACS
    for eps in (8 / 255, 0.1, 0.2):
        with torch.no_grad():
            best = margin(x)
        for start in range(3):
            xa = (x + (torch.rand_like(x) * 2 - 1) * eps * (start > 0)).clamp(0, 1)
            for _ in range(200):
                xa.requires_grad_(True)
                (g,) = torch.autograd.grad(margin(xa).sum(), xa)
                with torch.no_grad():
                    xa = torch.min(torch.max(xa + eps / 40 * g.sign(), x - eps), x + eps).clamp(0, 1)
            with torch.no_grad():
                best = torch.max(best, margin(xa))
        shut = (best <= 0).float().mean().item()
        print(f"eps {eps:.4f}: gate 0 stays shut for {shut:.3f}; block 0 is {share:.3f} of the static MACs, "
              f"so the attacked mean cost is at most {1 - shut * share:.3f} (gate MACs aside)")


if __name__ == "__main__":
    main()
