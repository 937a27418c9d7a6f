"""Where the GPU HT-SR time of GPT-2-124M goes, and what other solvers would cost (issue 6).

On the weights of ``htsr_gpu.py`` (49 matrices, all with 768 x 768 Grams), each best of
``--repeat`` synchronised calls:

1. ESDs: :func:`spectrawatch.spectral.esd.eigenvalues` of all 49 (on CUDA: batched ``gesvda``);
2. the ``eigvalsh`` of the 49 float64 Grams alone, by solver: cuSOLVER (torch's default), the
   same split over 2-16 CUDA streams (:func:`~spectrawatch.spectral.eigen.streams_eigvalsh`),
   and with ``--all-solvers`` MAGMA (``torch.backends.cuda.preferred_linalg_library``), the
   host's LAPACK through numpy one matrix after another, and the same from a pool of
   ``--threads`` threads;
3. the per-layer fits (:func:`spectral_metrics`, with and without the MP fit) on the GPU ESDs, on
   host copies of the same ESDs, and on host copies from a pool of 4 threads;
4. FARMS: the ESDs of all windows (:func:`eigenvalues`: on CUDA cuSOLVER's batched ``gesvda``),
   the same by LAPACK on the host (one call, and from a pool), the largest error of ``gesvda``
   against LAPACK relative to each window's largest eigenvalue, and the fits of the pooled
   FARMS ESDs.

    PYTHONPATH=client python benchmarks/htsr_breakdown.py --device cuda
    PYTHONPATH=client python benchmarks/htsr_breakdown.py --device cpu --fits-only
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from htsr_vs_weightwatcher import gpt2_weights

from spectrawatch.spectral.eigen import gram, squared_svdvals, streams_eigvalsh
from spectrawatch.spectral.farms import FARMS_CV
from spectrawatch.spectral.htsr import (
    eigenvalues,
    farms_windows,
    spectral_metrics,
    weight_matrices,
)


def best(fn: Callable[[], Any], repeat: int, device: torch.device) -> float:
    """Best synchronised wall time of ``fn`` in seconds (one untimed warm-up call first)."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return min(times)


def solvers(
    flat: list[torch.Tensor],
    add: Callable[[str, Callable[[], Any]], None],
    dev: torch.device,
    args: argparse.Namespace,
) -> None:
    """Parts 1 and 2: the ESDs of all layers, and the Grams' ``eigvalsh`` by solver."""
    f64 = torch.float64
    add("ESDs: eigenvalues() of all (the default route)", lambda: eigenvalues(flat, dtype=f64))
    grams = torch.stack([gram(m.to(f64)) for m in flat])
    add("  Grams alone", lambda: [gram(m.to(f64)) for m in flat])
    add("  eigvalsh, cuSOLVER (default)", lambda: torch.linalg.eigvalsh(grams))
    if dev.type == "cuda":
        for k in (2, 4, 8, 16):
            add(f"  eigvalsh, cuSOLVER on {k} streams", lambda k=k: streams_eigvalsh(grams, k))
    if dev.type == "cuda":  # the FARMS windows' route, tried on the whole matrices
        groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
        for m in flat:
            groups.setdefault(tuple(m.shape), []).append(m)
        stacks = [torch.stack(g).to(f64) for g in groups.values()]
        label = f"  squared singular values of the matrices, gesvda ({len(stacks)} stacks)"
        add(label, lambda: [squared_svdvals(st) for st in stacks])
        err = 0.0
        for st in stacks:
            exact = torch.linalg.eigvalsh(gram(st))
            diff = (squared_svdvals(st) - exact).abs().amax(-1) / exact[:, -1]
            err = max(err, float(diff.max()))
        print(f"    gesvda of the matrices: max error / lambda_max {err:.1e}")
    if dev.type == "cuda" and args.all_solvers:
        try:
            torch.backends.cuda.preferred_linalg_library("magma")
            add("  eigvalsh, MAGMA", lambda: torch.linalg.eigvalsh(grams))
        finally:
            torch.backends.cuda.preferred_linalg_library("default")
    host = [g.cpu().numpy() for g in grams]
    if args.all_solvers or dev.type != "cuda":
        add(
            "  eigvalsh, host numpy one by one (+ copies)",
            lambda: [np.linalg.eigvalsh(g) for g in [t.cpu().numpy() for t in grams]],
        )
        with ThreadPoolExecutor(args.threads) as pool:
            add(
                f"  eigvalsh, host numpy, {args.threads} threads (copies excluded)",
                lambda: list(pool.map(np.linalg.eigvalsh, host)),
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--all-solvers", action="store_true", help="also MAGMA and the host's LAPACK")
    ap.add_argument("--fits-only", action="store_true", help="only part 3 (e.g. on a CPU)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    weights = {k: v.to(dev) for k, v in gpt2_weights(args.blocks, embeddings=True).items()}
    mats = [weight_matrices(w) for w in weights.values()]
    mats = [m for m in mats if max(m.n_rows, m.n_cols) <= 50_000]  # wte: outside the filter
    flat = [m.matrices[0] for m in mats]
    f64 = torch.float64
    print(f"{len(flat)} matrices on {dev}; repeat {args.repeat}; pool of {args.threads} threads")
    rows: list[tuple[str, float]] = []

    def add(label: str, fn: Callable[[], Any]) -> None:
        try:
            rows.append((label, best(fn, args.repeat, dev)))
        except Exception as exc:  # one failing variant must not hide the others
            print(f"{label}: failed: {type(exc).__name__}: {exc}")
            return
        print(f"| {label} | {rows[-1][1] * 1e3:.1f} |", flush=True)

    print("| part | ms |\n|---|---|")
    if not args.fits_only:
        solvers(flat, add, dev, args)
    esds = [torch.sort(e).values for e in eigenvalues(flat, dtype=f64)]
    esds_host = [e.cpu() for e in esds]
    shape = [(m.n_rows, m.n_cols) for m in mats]
    eps = torch.finfo(f64).eps
    for mp in (False, True):
        for where, evs in (("GPU", esds), ("host", esds_host)):
            add(
                f"fits of all layers on the {where} ESDs, mp_fit={mp}",
                lambda evs=evs, mp=mp: [
                    spectral_metrics(e, r, c, mp_fit=mp, eps=eps)
                    for e, (r, c) in zip(evs, shape, strict=True)
                ],
            )
        with ThreadPoolExecutor(4) as pool:
            add(
                f"fits of all layers on the host ESDs, 4 threads, mp_fit={mp}",
                lambda mp=mp: list(
                    pool.map(
                        lambda er: spectral_metrics(er[0], *er[1], mp_fit=mp, eps=eps),
                        zip(esds_host, shape, strict=True),
                    )
                ),
            )
    if args.fits_only:
        return
    windows = [w for m in mats for w in farms_windows(m, FARMS_CV)]
    add(f"FARMS: eigenvalues() of {len(windows)} windows", lambda: eigenvalues(windows, dtype=f64))
    if windows:
        wgrams = [gram(w.to(f64).unsqueeze(0)).cpu().numpy() for w in windows]
        stack = np.concatenate(wgrams)
        chunks = np.array_split(stack, args.threads)
        with ThreadPoolExecutor(args.threads) as pool:
            add(
                f"  window eigvalsh on the host, {args.threads} threads (copies excluded)",
                lambda: list(pool.map(np.linalg.eigvalsh, chunks)),
            )
        add(
            "  window eigvalsh on the host, one call (copies excluded)",
            lambda: np.linalg.eigvalsh(stack),
        )
        if dev.type == "cuda":
            wins = torch.stack(windows).to(f64)
            exact = torch.from_numpy(np.linalg.eigvalsh(stack))
            add("  window squared singular values, gesvda", lambda: squared_svdvals(wins))
            err = (squared_svdvals(wins).cpu() - exact).abs().amax(-1) / exact[:, -1]
            print(f"    gesvda: max error / lambda_max {float(err.max()):.1e}")
        farms_esds = []
        pos = 0
        wev = eigenvalues(windows, dtype=f64)
        for m in mats:
            count = len(farms_windows(m, FARMS_CV))
            if count:
                farms_esds.append(torch.sort(torch.cat(wev[pos : pos + count]).cpu()).values)
            pos += count
        for mp in (False, True):
            add(
                f"fits of the {len(farms_esds)} FARMS ESDs on the host, mp_fit={mp}",
                lambda mp=mp: [
                    spectral_metrics(e, 100, 100, mp_fit=mp, eps=eps) for e in farms_esds
                ],
            )


if __name__ == "__main__":
    main()
