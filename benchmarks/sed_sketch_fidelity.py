"""SED sketch fidelity on a real update stream, and SED cost.

Sub-commands (CPU, one thread):

``train``     one run of ``grokking.py`` (the papers' 2-layer modular-arithmetic transformer, see
              its docstring) that also records, every ``--fid-every`` steps, exact vs
              count-sketched window singular values of the last 16/32/64 exact updates
              (d = 10·W and 20·W).
``fidelity``  sketch-vs-exact gap-ratio error from recorded runs.
``cost``      SED time per window update for GPT-2-small-shaped sketches.

The grokking early-warning evaluation lives in ``grokking.py``. Example::

    PYTHONPATH=client:server .venv/bin/python benchmarks/sed_sketch_fidelity.py train \
        --op add --wd 1.0 --seed 0 --out /tmp/sed_runs/add_wd1_s0.npz
    PYTHONPATH=client:server .venv/bin/python benchmarks/sed_sketch_fidelity.py \
        fidelity /tmp/sed_runs/*.npz
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
from grokking import OPS, RunSpec, train_run

from spectrawatch.sketch import count_sketch, hash_coordinates
from spectrawatch.spectral import sed

FID_WINDOWS = (16, 32, 64)


def train(args: argparse.Namespace) -> None:
    """One grokking.py run plus fidelity points every ``--fid-every`` steps."""
    spec = RunSpec("mb2", args.op, args.p, args.frac, args.wd, args.seed, args.steps, args.after)
    ring: deque[torch.Tensor] = deque(maxlen=max(FID_WINDOWS))
    fid: dict[str, list[Any]] = {"step": []}
    hashes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_update(step: int, delta: torch.Tensor) -> None:
        if not hashes:
            for d in (160, 320, 640, 1280):
                hashes[d] = hash_coordinates(delta.numel(), 7919 + args.seed, d)
        ring.append(delta)
        if len(ring) == ring.maxlen and step % args.fid_every == 0:
            _fidelity_point(step, torch.stack(list(ring)), hashes, fid)

    def extra() -> dict[str, np.ndarray]:
        return {f"fid_{k}": np.array(v) for k, v in fid.items()}

    train_run(spec, Path(args.out), on_update=on_update, extra=extra)


def _fidelity_point(
    step: int,
    ring: torch.Tensor,
    hashes: dict[int, tuple[torch.Tensor, torch.Tensor]],
    fid: dict[str, list[Any]],
) -> None:
    """Exact window singular values (float64 Gram sub-blocks) vs count-sketched ones."""
    n = ring.shape[0]
    gram = torch.zeros(n, n, dtype=torch.float64)
    for c in range(0, ring.shape[1], 1 << 15):
        blk = ring[:, c : c + (1 << 15)].double()
        gram += blk @ blk.T
    fid["step"].append(step)
    sketches = {d: count_sketch(ring, bk, sg, d, torch.float64) for d, (bk, sg) in hashes.items()}
    for w in FID_WINDOWS:
        sub = gram[-w:, -w:]
        ev = torch.linalg.eigvalsh(sub).clamp_min(0).flip(0).sqrt()
        fid.setdefault(f"exact_w{w}", []).append(ev.numpy())
        for mult in (10, 20):
            sk = sketches[mult * w][-w:]
            fid.setdefault(f"sk{mult}_w{w}", []).append(sed.window_singular_values(sk).numpy())


def fidelity(args: argparse.Namespace) -> None:
    print("| run | W | d | windows | median rel. err | p95 rel. err | k* agree (flat / clear) |")
    print("|---|---|---|---|---|---|---|")
    for path in args.runs:
        z = np.load(path)
        for w in FID_WINDOWS:
            exact = torch.from_numpy(z[f"fid_exact_w{w}"])
            ex = sed.spectral_edges(exact)
            for mult in (10, 20):
                sk = torch.from_numpy(z[f"fid_sk{mult}_w{w}"])
                k = ex.edge - 1
                at_k = sk.gather(1, k[:, None]).squeeze(1)
                ratio_sk = at_k / sk.gather(1, k[:, None] + 1).squeeze(1)
                err = ((ratio_sk - ex.gap_ratio).abs() / ex.gap_ratio).numpy()
                skx = sed.spectral_edges(sk)
                agree = (skx.edge == ex.edge).numpy()
                flat = (ex.margin < 1.05).numpy()
                fa = f"{agree[flat].mean():.0%} (n={flat.sum()})" if flat.any() else "-"
                ca = f"{agree[~flat].mean():.0%}" if (~flat).any() else "-"
                print(
                    f"| {Path(path).stem} | {w} | {mult * w} | {len(err)} | "
                    f"{np.median(err):.1%} | {np.percentile(err, 95):.1%} | {fa} / {ca} |"
                )


def cost(args: argparse.Namespace) -> None:
    """Time SED for GPT-2-small-shaped sketches: 149 tensors + model, windows 16/32/64, d = 640,
    one frame of ``--rows`` new steps on top of a 64-row history (what the worker does)."""
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    n = 64 + args.rows
    rows = torch.randn(150, n, 640, device=dev)
    steps = list(range(n))
    at = steps[-args.rows :]
    for method in ("gram", "svd"):
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            for layer in range(150):
                for w in (16, 32, 64):
                    sed.rolling_sed(rows[layer], steps, w, at=at, method=method)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        print(
            f"{method}: {min(times) * 1e3:.0f} ms per frame of {args.rows} steps "
            f"(150 tensors x 3 windows, {args.device}, {args.threads} thread(s), best of "
            f"{args.repeat})"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--op", choices=sorted(OPS), default="add")
    t.add_argument("--p", type=int, default=97)
    t.add_argument("--frac", type=float, default=0.3)
    t.add_argument("--wd", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=6000)
    t.add_argument("--after", type=int, default=1000, help="stop this many steps after grokking")
    t.add_argument("--fid-every", type=int, default=50)
    t.add_argument("--out", required=True)
    s = sub.add_parser("fidelity")
    s.add_argument("runs", nargs="+")
    c = sub.add_parser("cost")
    c.add_argument("--rows", type=int, default=1)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--repeat", type=int, default=3)
    c.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    {"train": train, "fidelity": fidelity, "cost": cost}[args.cmd](args)


if __name__ == "__main__":
    main(sys.argv[1:])
