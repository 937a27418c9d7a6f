"""Correlation traps along a real training run: the demo's modular-addition transformer.

Trains ``spectrawatch.grokking_demo.ModAddTransformer`` (p = 97, train fraction 0.5, full-batch
AdamW, weight decay 1.0, betas (0.9, 0.98)) at one learning rate and prints, every ``--every``
steps, the validation accuracy and each 2-D weight's ``htsr.num_traps`` and
``htsr.rand_softrank`` (``analyze_weights(traps=True)``, the server's computation).

    PYTHONPATH=client:server python benchmarks/traps_training.py --lr 1e-2 --steps 3000
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from spectrawatch.grokking_demo import ModAddTransformer, make_data
from spectrawatch.spectral.htsr import analyze_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    x_tr, y_tr, x_va, y_va = make_data(97, 0.5, args.seed)
    model = ModAddTransformer(97)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1.0, betas=(0.9, 0.98))
    loss_f = nn.CrossEntropyLoss()
    for step in range(args.steps + 1):
        if step % args.every == 0:
            with torch.no_grad():
                val = float((model(x_va).argmax(-1) == y_va).float().mean())
            weights = {n: p.detach() for n, p in model.named_parameters() if p.ndim == 2}
            weights.pop("pos", None)  # the (3, d) position table: below the size filter
            report = analyze_weights(weights, traps=True)
            cells = [
                f"{r.layer.removesuffix('.weight')}={r.traps.num_traps}/{r.traps.softrank:.2f}"
                for r in report.layers
                if r.traps is not None
            ]
            print(f"lr={args.lr:g} step={step} val_acc={val:.3f} traps/softrank: {' '.join(cells)}")
        opt.zero_grad()
        loss = loss_f(model(x_tr), y_tr)
        loss.backward()
        opt.step()


if __name__ == "__main__":
    main()
