"""Polar Express eigenvalue counts vs exact ``eigvalsh`` counting; EigenTrack descriptor timing.

Part 1: for A = W^T W / m (W Gaussian, m = 2n: MP bulk on [0.09, 2.9]) plus 16 planted spikes
in [4, 12], count eigenvalues above (a) 1.05 * lambda+ (the spike count: a clear gap) and (b) the
bulk median (no gap: eigenvalues crowd the threshold), by

* exact: ``torch.linalg.eigvalsh`` (float64 and float32) and counting;
* Polar Express: ``count_above`` (16 steps, Schatten-8 scale) in float32 and in bf16.

Part 2: EigenTrack descriptors for a GPT-2-small-shaped probe (12 modules x 512 tokens x 768).

Usage::

    PYTHONPATH=client .venv/bin/python benchmarks/polar_express.py [--sizes 512 1024 2048]
        [--bf16-max 256] [--device cpu|cuda] [--repeat 1] [--threads 0]
        [--spike-only] [--skip-descriptors]
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import torch

from spectrawatch.spectral.activations import activation_spectra, activation_spectrum
from spectrawatch.spectral.polar import count_above

T = TypeVar("T")


def timed(fn: Callable[[], T], device: torch.device, repeat: int) -> tuple[T, float]:
    """Best wall time of ``repeat`` runs (seconds), synchronising CUDA."""
    best = math.inf
    out: T | None = None
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    assert out is not None
    return out, best


def spiked_wishart(n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = 2 * n
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    a = w.mT @ w / m
    q = torch.linalg.qr(torch.randn(n, 16, generator=g, dtype=torch.float64))[0]
    spikes = torch.linspace(4.0, 12.0, 16, dtype=torch.float64)
    a = a + (q * spikes) @ q.mT
    out: torch.Tensor = ((a + a.mT) / 2).to(device)
    return out


def bench_counts(
    sizes: list[int], bf16_max: int, device: torch.device, repeat: int, spike_only: bool
) -> None:
    print(
        "| n | threshold | exact | eigvalsh f64 s | eigvalsh f32 s | PE f32 est. (ambig.) | "
        "PE f32 s | PE bf16 est. (ambig.) | PE bf16 s | min gap / s8 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        a = spiked_wishart(n, device)
        ev64, t64 = timed(partial(torch.linalg.eigvalsh, a), device, repeat)
        a32 = a.float()
        _, t32 = timed(partial(torch.linalg.eigvalsh, a32), device, repeat)
        lam_plus = (1 + math.sqrt(0.5)) ** 2
        middle = float(ev64[n // 2 - 1 : n // 2 + 1].mean())
        thresholds = [("1.05 lambda+", 1.05 * lam_plus), ("bulk middle", middle)]
        for label, t in thresholds[:1] if spike_only else thresholds:
            exact = int((ev64 > t).sum())
            shifted = ev64 - t
            s8 = float((shifted**8).sum() ** 0.125)
            gap = float(shifted.abs().min()) / s8
            pe32, tp32 = timed(partial(count_above, a32, t), device, repeat)
            if n <= bf16_max:
                pebf, tpbf = timed(
                    partial(count_above, a32, t, dtype=torch.bfloat16), device, repeat
                )
                bf = f"{pebf.estimate:.3f} ({pebf.ambiguity:.3f}) | {tpbf:.2f}"
            else:
                bf = "- | -"
            print(
                f"| {n} | {label} ({t:.3f}) | {exact} | {t64:.2f} | {t32:.2f} | "
                f"{pe32.estimate:.3f} ({pe32.ambiguity:.3f}) | {tp32:.2f} | {bf} | {gap:.1e} |"
            )


def bench_descriptors(device: torch.device, repeat: int) -> None:
    g = torch.Generator().manual_seed(1)
    probe = torch.randn(12, 512, 768, generator=g).to(device)

    def one_by_one() -> list[float]:
        return [activation_spectrum(probe[i]).mp.ks for i in range(12)]

    def batched() -> list[float]:
        return [s.mp.ks for s in activation_spectra(probe)]

    for label, fn in (("one module at a time", one_by_one), ("batched", batched)):
        _, seconds = timed(fn, device, repeat)
        print(
            f"EigenTrack descriptors, 12 x 512 x 768 float32 probe, {label}: "
            f"{seconds * 1e3:.0f} ms ({seconds * 1e3 / 12:.0f} ms per module)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--bf16-max", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--spike-only", action="store_true", help="skip the bulk threshold")
    parser.add_argument("--skip-descriptors", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}"
    )
    bench_counts(args.sizes, args.bf16_max, device, args.repeat, args.spike_only)
    if not args.skip_descriptors:
        print()
        bench_descriptors(device, args.repeat)


if __name__ == "__main__":
    main()
