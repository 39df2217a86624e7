"""APGD-CE / APGD-DLR / APGD-T / FAB / FAB-T / Square agreement check: torchattacks' APGD, FAB and Square (a port of AutoAttack's `autopgd_base.py`) on the
committed `static` checkpoint rebuilt in PyTorch (scripts/torch_reference.py), first N test
images, against `dynrobust attack --attack apgd-ce` (or `apgd-dlr`, `--loss dlr`) on the same weights and images. The random
starts differ, so the robust accuracies agree up to sampling noise, not bit for bit.

    pip install --target DIR torchattacks==3.5.1 scipy   # not in the project's requirements
    PYTHONPATH=DIR .venv/bin/python scripts/apgd_reference.py [--n 1000] [--eps 8/255] [--norm Linf|L2] [--loss ce|dlr] [--targeted] [--fab] [--square QUERIES]
"""
import argparse, json, os, sys

import torch
import torchattacks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_reference import Net, load_test_images  # noqa: E402


class Logits(torch.nn.Module):
    def __init__(self, name):
        super().__init__()
        self.net = Net(name)

    def forward(self, x):
        return self.net.forward(x)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--eps", default="8/255")
    ap.add_argument("--norm", default="Linf")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--loss", default="ce", choices=["ce", "dlr"])
    ap.add_argument("--targeted", action="store_true", help="torchattacks' APGDT (targeted DLR, 9 target classes)")
    ap.add_argument("--fab", action="store_true", help="torchattacks' FAB (with --targeted: FAB-T over the 9 other classes, as AutoAttack's standard version)")
    ap.add_argument("--square", type=int, default=0, help="run torchattacks' Square (L∞, margin loss) with this many queries instead")
    args = ap.parse_args()
    num, _, den = args.eps.partition("/")
    eps = float(num) / float(den or 1)
    torch.set_num_threads(2)
    model = Logits("static").eval()
    x, y = load_test_images(args.n)
    if args.square:
        attack = torchattacks.Square(model, norm="Linf", eps=eps, n_queries=args.square, n_restarts=1, p_init=0.8, loss="margin", resc_schedule=True, seed=0)
    elif args.fab:
        attack = torchattacks.FAB(model, norm=args.norm, eps=eps, steps=args.steps, n_restarts=1, alpha_max=0.1, eta=1.05, beta=0.9, seed=0, multi_targeted=args.targeted, n_classes=10)
    elif args.targeted:
        attack = torchattacks.APGDT(model, norm=args.norm, eps=eps, steps=args.steps, n_restarts=1, n_classes=10, rho=0.75, seed=0)
    else:
        attack = torchattacks.APGD(model, norm=args.norm, eps=eps, steps=args.steps, n_restarts=1, loss=args.loss, rho=0.75, seed=0)
    clean = adv = 0
    for i in range(0, args.n, args.batch):
        xb, yb = x[i:i + args.batch], y[i:i + args.batch]
        with torch.no_grad():
            clean += (model(xb).argmax(1) == yb).sum().item()
        xa = attack(xb, yb)
        assert (xa - xb).abs().max().item() <= eps + 1e-6 or args.norm != "Linf"
        with torch.no_grad():
            adv += (model(xa).argmax(1) == yb).sum().item()
    name = "torchattacks." + ("Square" if args.square else ("FAB" + ("-T" if args.targeted else "") if args.fab else ("APGDT" if args.targeted else "APGD")))
    loss = "margin" if args.square else ("boundary" if args.fab else ("dlr-targeted" if args.targeted else args.loss))
    print(json.dumps({"attack": name, "queries": args.square or None, "loss": loss, "norm": args.norm, "eps": args.eps, "steps": args.steps, "n": args.n,
                      "clean_acc": clean / args.n, "adv_acc": adv / args.n}))


if __name__ == "__main__":
    main()
