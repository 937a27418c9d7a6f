"""SED sketch fidelity on a real update stream, and the grokking detector on small runs.

Three sub-commands (CPU, one thread, a few minutes per run on a shared 2-core box):

``train``     trains the grokking papers' modular-arithmetic transformer (2-layer pre-norm,
              d_model 128, 4 heads, d_ff 256, GELU; AdamW (0.9, 0.98), lr 1e-3, batch 512,
              clip 1.0; research note ``sed_eigentrack.md`` §2.4) and records per step the
              count-sketch of Δθ (d = 640), every 100 steps val/train accuracy, the commutator
              defect (K = 5), total weight norm, per-matrix effective rank and a float64
              count-sketch of θ (d = 200), and every 50 steps exact vs count-sketched window
              singular values of the last 16/32/64 exact updates (d = 10·W and 20·W).
``fidelity``  sketch-vs-exact gap-ratio error from recorded runs.
``grok``      warning step, step where val_acc first reaches 0.9, lead and false alarms.

Example::

    PYTHONPATH=client:server .venv/bin/python benchmarks/sed_sketch_fidelity.py train \
        --op add --wd 1.0 --seed 0 --out /tmp/sed_runs/add_wd1_s0.npz
    PYTHONPATH=client:server .venv/bin/python benchmarks/sed_sketch_fidelity.py \
        fidelity /tmp/sed_runs/*.npz
    PYTHONPATH=client:server .venv/bin/python benchmarks/sed_sketch_fidelity.py \
        grok /tmp/sed_runs/*.npz
"""

from __future__ import annotations

import argparse
import ast
import math
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spectrawatch.sketch import count_sketch, hash_coordinates
from spectrawatch.spectral import grokking as gk
from spectrawatch.spectral import sed

OPS = {
    "add": lambda a, b, p: (a + b) % p,
    "sub": lambda a, b, p: (a - b) % p,
    "sq": lambda a, b, p: (a * a + b * b) % p,
    "cube": lambda a, b, p: (a * a * a + a * b) % p,  # does not grok (papers)
}
FID_WINDOWS = (16, 32, 64)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ff)
        self.fc2 = nn.Linear(ff, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Net(nn.Module):
    def __init__(self, p: int, dim: int = 128, heads: int = 4, ff: int = 256, layers: int = 2):
        super().__init__()
        self.tok = nn.Embedding(p + 1, dim)
        self.pos = nn.Embedding(3, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, ff) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos.weight[None]
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln(h[:, -1]))


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    p = args.p
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    x = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    y = OPS[args.op](a, b, p)
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(args.seed))
    n_train = int(args.frac * p * p)
    tr, va = perm[:n_train], perm[n_train:]
    model = Net(p)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=args.wd)
    params = list(model.parameters())
    mats = [(n, q) for n, q in model.named_parameters() if q.ndim == 2]
    n_par = sum(q.numel() for q in params)
    data_gen = torch.Generator().manual_seed(1000 + args.seed)
    probe_gen = torch.Generator().manual_seed(2000 + args.seed)

    def sample_batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = tr[torch.randint(n_train, (args.batch,), generator=probe_gen)]
        return x[idx], y[idx]

    hashes = {d: hash_coordinates(n_par, 7919 + args.seed, d) for d in (160, 200, 320, 640, 1280)}

    def flat() -> torch.Tensor:
        return torch.cat([q.detach().reshape(-1) for q in params])

    prev = flat()
    ring: deque[torch.Tensor] = deque(maxlen=max(FID_WINDOWS))
    upd = np.zeros((args.steps, 640), dtype=np.float32)
    rec: dict[str, list[Any]] = {
        k: []
        for k in (
            "eval_step",
            "val_acc",
            "val_loss",
            "train_acc",
            "defect",
            "wnorm",
            "erank",
            "theta_sk",
        )
    }
    fid: dict[str, list[Any]] = {"step": []}
    t0 = time.time()

    def save(n: int) -> None:  # also every 500 steps, so a stopped run leaves its prefix
        np.savez_compressed(
            args.out,
            upd=upd[:n],
            n_params=n_par,
            mats=np.array([n for n, _ in mats]),
            config=np.array(repr(vars(args))),
            **{k: np.array(v) for k, v in rec.items()},
            **{f"fid_{k}": np.array(v) for k, v in fid.items()},
        )

    grok_at = None
    last = args.steps
    for step in range(args.steps + 1):
        if step % 100 == 0:
            model.eval()
            with torch.no_grad():
                out = model(x[va])
                val_acc = float((out.argmax(-1) == y[va]).float().mean())
                val_loss = float(F.cross_entropy(out, y[va]))
                tr_acc = float((model(x[tr]).argmax(-1) == y[tr]).float().mean())
            model.train()
            defect = gk.median_commutator_defect(model, loss_fn, sample_batch, pairs=5)
            th = flat()
            rec["eval_step"].append(step)
            rec["val_acc"].append(val_acc)
            rec["val_loss"].append(val_loss)
            rec["train_acc"].append(tr_acc)
            rec["defect"].append(defect)
            rec["wnorm"].append(float(th.double().norm()))
            rec["erank"].append([gk.effective_rank(q) for _, q in mats])
            b200, s200 = hashes[200]
            rec["theta_sk"].append(count_sketch(th, b200, s200, 200, torch.float64).numpy())
            if step % 500 == 0:
                save(step)
                print(
                    f"step {step} val_acc {val_acc:.3f} train_acc {tr_acc:.3f} "
                    f"defect {defect:.1f} |θ| {rec['wnorm'][-1]:.1f} ({time.time() - t0:.0f}s)",
                    flush=True,
                )
            if grok_at is None and val_acc >= 0.9:
                grok_at = step
            if grok_at is not None and step >= grok_at + args.after:
                last = step
                break
        if step == args.steps:
            break
        idx = tr[torch.randint(n_train, (args.batch,), generator=data_gen)]
        loss = loss_fn(model, (x[idx], y[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        now = flat()
        delta = now - prev
        prev = now
        b640, s640 = hashes[640]
        upd[step] = count_sketch(delta, b640, s640, 640).numpy()
        ring.append(delta)
        if len(ring) == ring.maxlen and (step + 1) % args.fid_every == 0:
            _fidelity_point(step + 1, torch.stack(list(ring)), hashes, fid)
    save(last)
    print(f"saved {args.out}: {last} steps, grok(val>=0.9) at {grok_at}, {time.time() - t0:.0f}s")


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


def _first(steps: np.ndarray, values: np.ndarray, thr: float) -> int | None:
    hit = np.nonzero(values >= thr)[0]
    return int(steps[hit[0]]) if len(hit) else None


def run_series(z: Any) -> dict[str, Any]:
    """Detector inputs recorded in a run (training-side only) plus SED series."""
    steps = [int(s) for s in z["eval_step"]]
    defect = list(zip(steps, map(float, z["defect"]), strict=True))
    wnorm = list(zip(steps, map(float, z["wnorm"]), strict=True))
    er = z["erank"]
    rank = {
        str(n): list(zip(steps, map(float, er[:, i]), strict=True))
        for i, n in enumerate(z["mats"])
        if "tok" not in str(n) and "pos" not in str(n)
    }
    # checkpoint-interval SED from differenced theta sketches (W = 10, interval 100)
    iv = sed.interval_sed(torch.from_numpy(z["theta_sk"]), steps, window=10)
    interval = [(r.step, r.gap_ratio, r.edge) for r in iv]
    # the SED paper's rule on s2/s3 (collapse below 1.2 after its peak), read causally: first
    # window with s2/s3 < 1.2 once the running maximum has exceeded 1.5
    paper_rule, top = None, 0.0
    for r in iv:
        r23 = r.singular_values[1] / r.singular_values[2]
        top = max(top, r23)
        if top > 1.5 and r23 < 1.2:
            paper_rule = r.step
            break
    ph = sed.detect_phases([s for s, _, _ in interval], [v for _, v, _ in interval])
    first_collapse = _causal_collapse([(s, v) for s, v, _ in interval])
    upd = torch.from_numpy(z["upd"])
    per_step = {}
    for w in (16, 32, 64):
        at = [s for s in steps if w <= s <= len(upd)]
        res = sed.rolling_sed(upd, list(range(1, len(upd) + 1)), w, at=at)
        per_step[w] = [(r.step, r.gap_ratio, r.edge) for r in res]
    ph32 = sed.detect_phases([s for s, _, _ in per_step[32]], [v for _, v, _ in per_step[32]])
    collapse32 = _causal_collapse([(s, v) for s, v, _ in per_step[32]])
    return {
        "defect": defect,
        "weight_norm": wnorm,
        "effective_rank": rank,
        "sed_collapse_step": first_collapse,
        "interval": interval,
        "phases": ph,
        "per_step": per_step,
        "phases32": ph32,
        "collapse32": collapse32,
        "paper_sed": paper_rule,
    }


def _causal_collapse(series: list[tuple[int, float]]) -> int | None:
    """First step at which phase detection on the series *so far* reports a collapse (what the
    worker sees live), not the collapse of the whole run's segmentation."""
    for i in range(len(series)):
        ph = sed.detect_phases([s for s, _ in series[: i + 1]], [v for _, v in series[: i + 1]])
        if ph.collapse_start is not None:
            return series[i][0]
    return None


def _cfg(args: argparse.Namespace) -> gk.DetectorConfig:
    return gk.DetectorConfig(
        **{
            k: v
            for k, v in vars(args).items()
            if k in gk.DetectorConfig.__dataclass_fields__ and v is not None
        }
    )


def grok(args: argparse.Namespace) -> None:
    cfg = _cfg(args)
    print(f"config: {cfg}")
    print(
        "| run | val>=0.9 | detector: defect+norm+rank (lead) | + SED | "
        "no probe: norm+rank+SED | "
        "papers defect rule | 10x rule | norm turn | rank turn | interval-SED collapse | "
        "per-step SED collapse | SED paper s2/s3 rule |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for path in args.runs:
        z = np.load(path)
        g = _first(z["eval_step"], z["val_acc"], 0.9)
        s = run_series(z)
        inputs = {
            "defect": s["defect"],
            "weight_norm": s["weight_norm"],
            "effective_rank": s["effective_rank"],
        }
        full = gk.detect_grokking(**inputs, config=cfg)
        with_sed = gk.detect_grokking(
            **inputs, sed_collapse_step=s["sed_collapse_step"], config=cfg
        )
        nop = gk.detect_grokking(
            weight_norm=s["weight_norm"],
            effective_rank=s["effective_rank"],
            sed_collapse_step=s["sed_collapse_step"],
            config=cfg,
        )

        done = int(z["eval_step"][-1]) >= ast.literal_eval(str(z["config"]))["steps"]
        verdict = "false alarm" if done else f"no grok yet at {int(z['eval_step'][-1])}"

        def cell(w: int | None, g: int | None = g, verdict: str = verdict) -> str:
            if w is None:
                return "silent"
            return f"{w} ({g - w})" if g is not None else f"{w} ({verdict})"

        ev = full.evidence
        spike = gk.defect_spike(s["defect"])
        print(
            f"| {Path(path).stem} | {g if g is not None else 'never'} | {cell(full.step)} | "
            f"{cell(with_sed.step)} | {cell(nop.step)} | {cell(ev.defect)} | {cell(spike)} | "
            f"{cell(ev.norm_turn)} | {cell(ev.rank_turn)} | {cell(s['sed_collapse_step'])} | "
            f"{cell(s['collapse32'])} | {cell(s['paper_sed'])} |"
        )


def series(args: argparse.Namespace) -> None:
    """Trajectories every ``--every`` steps, and the lag of each per-step gap vs val loss."""
    for path in args.runs:
        z = np.load(path)
        s = run_series(z)
        print(f"## {Path(path).stem}: interval phases {s['phases']}; per-step W32 {s['phases32']}")
        print(
            "| step | val_acc | val_loss | defect | weight norm | median erank | "
            "interval s_k*/s_k*+1 (k*) | per-step W32 gap (k*) |"
        )
        print("|---|---|---|---|---|---|---|---|")
        iv = {st: (v, k) for st, v, k in s["interval"]}
        ps = {st: (v, k) for st, v, k in s["per_step"][32]}
        er = np.median(z["erank"], axis=1)
        for i, st in enumerate(z["eval_step"]):
            if st % args.every:
                continue
            a, b = iv.get(int(st)), ps.get(int(st))
            ta = f"{a[0]:.2f} ({a[1]})" if a else "-"
            tb = f"{b[0]:.2f} ({b[1]})" if b else "-"
            print(
                f"| {st} | {z['val_acc'][i]:.3f} | {z['val_loss'][i]:.2f} | {z['defect'][i]:.1f} "
                f"| {z['wnorm'][i]:.1f} | {er[i]:.1f} | {ta} | {tb} |"
            )
        steps = [int(v) for v in z["eval_step"]]
        for w, rows in s["per_step"].items():
            lags = sed.lagged_correlation(
                [r[0] for r in rows],
                [r[1] for r in rows],
                steps,
                [float(v) for v in z["val_loss"]],
                max_lag=10,
            )
            best = max((x for x in lags if not math.isnan(x[1])), key=lambda x: abs(x[1]))
            print(
                f"lag (W={w}): strongest r = {best[1]:+.2f} at lag {best[0] * 100:+d} steps "
                f"(positive: the gap leads val loss)"
            )
        print()


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
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch", type=int, default=512)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=6000)
    t.add_argument("--after", type=int, default=1000, help="stop this many steps after grokking")
    t.add_argument("--fid-every", type=int, default=50)
    t.add_argument("--out", required=True)
    for name in ("fidelity", "grok", "series"):
        s = sub.add_parser(name)
        s.add_argument("runs", nargs="+")
        if name == "series":
            s.add_argument("--every", type=int, default=500)
        if name == "grok":
            for field, spec in gk.DetectorConfig.__dataclass_fields__.items():
                flag = f"--{field.replace('_', '-')}"
                s.add_argument(flag, type=type(spec.default), default=None)
    c = sub.add_parser("cost")
    c.add_argument("--rows", type=int, default=1)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--repeat", type=int, default=3)
    c.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    {"train": train, "fidelity": fidelity, "grok": grok, "series": series, "cost": cost}[args.cmd](
        args
    )


if __name__ == "__main__":
    main(sys.argv[1:])
