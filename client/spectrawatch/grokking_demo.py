"""Grokking on modular addition, watched by spectrawatch.

(a + b) mod p with p = 97, half of all p^2 pairs for training, a 1-layer transformer trained
full-batch with AdamW (lr 1e-3, betas (0.9, 0.98), weight decay 1.0), as in Power et al. 2022 /
Nanda et al. 2023. Train accuracy reaches 100 % early; validation accuracy jumps to ~100 % much
later (val_acc >= 0.9 at step 4,100 with seed 0; minutes on a laptop CPU). With --wd 0 it does
not grok in the same budget (the control run).

    spectrawatch server &                          # the embedded server on 127.0.0.1:8765
    python -m spectrawatch.grokking_demo --steps 6000
    python -m spectrawatch.grokking_demo --steps 6000 --wd 0

Each execution is a new run, named ``p97-wd1-s0-<date>-<time>-<hex>``; ``--run NAME`` names it
(a run of that name that exists is joined, with a warning; ``SPECTRAWATCH_RESUME=never`` makes
``NAME-2`` instead).

(``examples/grokking.py`` is the same script; ``spectrawatch demo`` runs it against a server it
starts itself.)

If no server is running, training proceeds normally and the frames are spooled to disk.
"""

from __future__ import annotations

import argparse
import math
import secrets
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from spectrawatch import monitor


class ModAddTransformer(nn.Module):
    """1-layer transformer (Nanda et al. 2023: no LayerNorm, ReLU MLP): [a, b, '='] -> a+b mod p.

    Only the logits at the '=' position are used, so the query, the attention output and the MLP
    are computed for that position alone (keys/values for all three): the same function as the
    full model read at '=', at about a third of the cost.
    """

    def __init__(self, p: int, d_model: int = 128, n_heads: int = 4, d_mlp: int = 512) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.embed = nn.Embedding(p + 1, d_model)
        self.pos = nn.Parameter(torch.randn(3, d_model) / math.sqrt(d_model))
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp), nn.ReLU(), nn.Linear(d_mlp, d_model))
        self.unembed = nn.Linear(d_model, p, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens (batch, 3)`` int64 -> logits ``(batch, p)``."""
        x = self.embed(tokens) + self.pos  # (B, 3, d)
        bsz, _, d = x.shape
        h, dh = self.n_heads, d // self.n_heads
        q = self.q(x[:, -1]).view(bsz, h, 1, dh)
        k = self.k(x).view(bsz, 3, h, dh).transpose(1, 2)
        v = self.v(x).view(bsz, 3, h, dh).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)  # (B, h, 1, 3)
        resid = x[:, -1] + self.o((att @ v).reshape(bsz, d))
        resid = resid + self.mlp(resid)
        logits: torch.Tensor = self.unembed(resid)
        return logits


def make_data(
    p: int,
    train_frac: float,
    seed: int,
    op: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """``x_train (n, 3), y_train (n,), x_val, y_val`` for ``op(a, b, p)`` (default (a + b) mod p)
    over all p^2 pairs, split at random (``seed``) with ``train_frac`` for training."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    x = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    y = (a + b) % p if op is None else op(a, b, p)
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = int(train_frac * p * p)
    tr, va = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[va], y[va]


def default_run_name(p: int, wd: float, seed: int) -> str:
    """A new run name per execution, ``p97-wd1-s0-YYYYmmdd-HHMMSS-<4 hex>``: running the script
    again makes another run, not a second session of the first (a fixed default merged them)."""
    return f"p{p}-wd{wd:g}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--p", type=int, default=97)
    ap.add_argument("--train-frac", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--url", default=None, help="server URL (default: SPECTRAWATCH_URL or local)")
    ap.add_argument("--project", default="grokking")
    ap.add_argument(
        "--run",
        default=None,
        help="run name (default: a new one per execution, p{p}-wd{wd}-s{seed}-<time>-<hex>)",
    )
    ap.add_argument(
        "--defect",
        action="store_true",
        help="also run the commutator-defect probe (4 extra backward passes x 5)",
    )
    ap.add_argument("--no-monitor", action="store_true", help="train without spectrawatch")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument(
        "--stop-at",
        type=float,
        default=0.0,
        help="stop once val_acc has stayed >= this for 500 steps (0: never)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_tr, y_tr, x_va, y_va = make_data(args.p, args.train_frac, args.seed)
    model = ModAddTransformer(args.p)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd, betas=(0.9, 0.98))
    loss_f = nn.CrossEntropyLoss()
    run = args.run or default_run_name(args.p, args.wd, args.seed)
    if not args.no_monitor:
        config = {k: v for k, v in vars(args).items() if k not in ("url", "no_monitor")}
        monitor.init(
            url=args.url,
            project=args.project,
            run=run,
            config=config,
            tags=["grokking", "modular-addition"],
        )
        defect: dict[str, Any] = {}
        if args.defect:
            gen = torch.Generator().manual_seed(args.seed + 1)

            def sample_batch() -> tuple[torch.Tensor, torch.Tensor]:
                idx = torch.randint(0, len(x_tr), (512,), generator=gen)
                return x_tr[idx], y_tr[idx]

            def defect_loss(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
                loss: torch.Tensor = loss_f(m(batch[0]), batch[1])
                return loss

            defect = {"loss_fn": defect_loss, "sample_batch": sample_batch}
        # probe: 256 held-out inputs (their labels are never read), so the probe.* prediction
        # scalars say how settled the answers off the training set are
        monitor.attach(model, opt, probe=x_va[:256], **defect)

    t0 = time.perf_counter()
    grok_step = None
    held = 0
    result: dict[str, Any] = {}
    for step in range(1, args.steps + 1):
        model.train()
        loss = loss_f(model(x_tr), y_tr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step in (1, args.steps):  # the last: the final figures
            model.eval()
            with torch.no_grad():
                train_acc = (model(x_tr).argmax(-1) == y_tr).float().mean().item()
                val_logits = model(x_va)
                val_loss = loss_f(val_logits, y_va).item()
                val_acc = (val_logits.argmax(-1) == y_va).float().mean().item()
            result = {
                "loss": loss.item(),
                "train_acc": train_acc,
                "val_loss": val_loss,
                "val_acc": val_acc,
            }
            if not args.no_monitor:
                monitor.log(result, step=step)
            if grok_step is None and val_acc >= 0.9:
                grok_step = step
            held = held + args.eval_every if args.stop_at and val_acc >= args.stop_at else 0
            if step % (10 * args.eval_every) == 0 or step == 1:
                print(
                    f"step {step:6d}  loss {loss.item():.4f}  train_acc {train_acc:.3f}  "
                    f"val_acc {val_acc:.3f}  ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
            if args.stop_at and held >= 500:
                break
    run_id = None
    if not args.no_monitor:
        run_id = monitor.run_id
        monitor.finish()
    result.update(grok_step=grok_step, steps=step, seconds=time.perf_counter() - t0, run_id=run_id)
    print(f"done: grok step (val_acc >= 0.9) = {grok_step}; {result['seconds']:.0f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
