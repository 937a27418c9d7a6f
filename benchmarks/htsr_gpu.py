"""HT-SR (+ FARMS) of GPT-2-124M-shaped weights on a GPU, beside WeightWatcher on its CPU.

The weights are those of ``htsr_vs_weightwatcher.py`` (12 blocks + ``wpe``; ``wte`` is generated
too and skipped by both tools: N > 50000). Per configuration: the first call (CUDA and cuSOLVER
start-up included), then the best and median of ``--repeat`` warm calls, each synchronised, with
the weights already on the GPU and, separately, copied from host memory inside the timed call;
peak GPU memory of the call (``torch.cuda.max_memory_allocated``); max |Δalpha| against the
float64 CPU result. Then WeightWatcher ``analyze()`` on the first ``--ww-blocks`` blocks on the
CPU (``--ww-threads`` threads) beside spectrawatch on the GPU on the same layers.

    PYTHONPATH=client:server python benchmarks/htsr_gpu.py [--repeat 5] [--ww-blocks 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from htsr_vs_weightwatcher import gpt2_weights, spawn

from spectrawatch.spectral.farms import FARMS_CV
from spectrawatch.spectral.htsr import ModelReport, analyze_weights

CONFIGS: dict[str, dict[str, Any]] = {
    "f64, no MP fit": {"mp_fit": False, "dtype": torch.float64},
    "f32, no MP fit": {"mp_fit": False, "dtype": torch.float32},
    "f64 + MP fit": {"mp_fit": True, "dtype": torch.float64},
    "f64 + MP fit + FARMS": {"mp_fit": True, "dtype": torch.float64, "farms": FARMS_CV},
}


def timed(fn: Callable[[], ModelReport], device: torch.device) -> tuple[ModelReport, float, int]:
    """``fn()``, its synchronised wall time and peak GPU memory (0 on the CPU)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t, torch.cuda.max_memory_allocated(device) if cuda else 0


def alphas(report: ModelReport) -> list[float]:
    return [r.plain.alpha for r in report.layers]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--ww-blocks", type=int, default=2)
    ap.add_argument("--ww-threads", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=12, help="GPT-2 blocks (12: the whole model)")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to check the script")
    ap.add_argument("--only", nargs="*", default=[], help="configuration labels to run")
    args = ap.parse_args()
    only = set(args.only)
    dev = torch.device(args.device)
    host = gpt2_weights(args.blocks, embeddings=True)
    resident = {k: v.to(dev) for k, v in host.items()}
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {args.blocks} blocks + embeddings")
    reference = alphas(analyze_weights(host, mp_fit=False))  # float64 on the CPU
    print(
        "| configuration | layers | first call s | warm best s | warm median s | "
        "from host, best s | peak GPU MiB | max abs d-alpha vs CPU f64 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, kw in CONFIGS.items():
        if only and label not in only:
            continue

        def run_resident(kw: dict[str, Any] = kw) -> ModelReport:
            return analyze_weights(resident, device=dev, **kw)

        def run_host(kw: dict[str, Any] = kw) -> ModelReport:
            return analyze_weights(host, device=dev, **kw)

        report, first, _ = timed(run_resident, dev)
        warm = [timed(run_resident, dev) for _ in range(args.repeat)]
        from_host = min(timed(run_host, dev)[1] for _ in range(args.repeat))
        secs = [w[1] for w in warm]
        peak = max(w[2] for w in warm) / 2**20
        d_alpha = max(abs(a - b) for a, b in zip(alphas(report), reference, strict=True))
        print(
            f"| {label} | {len(report.layers)} | {first:.3f} | {min(secs):.3f} | "
            f"{statistics.median(secs):.3f} | {from_host:.3f} | {peak:.0f} | {d_alpha:.1e} |",
            flush=True,
        )

    if args.ww_blocks < 1:
        return
    # WeightWatcher on this machine's CPU vs spectrawatch on its GPU, same layers
    # the weights WeightWatcher's subprocess generates (same seed, no embeddings drawn first)
    sub = {k: v.to(dev) for k, v in gpt2_weights(args.ww_blocks, embeddings=False).items()}
    for ww_config, kw in (("ww", CONFIGS["f64, no MP fit"]), ("ww_mp", CONFIGS["f64 + MP fit"])):
        ww = spawn(ww_config, args.ww_blocks, False, 1, args.ww_threads)

        def run_sub(kw: dict[str, Any] = kw) -> ModelReport:
            return analyze_weights(sub, device=dev, **kw)

        report = run_sub()  # warm-up
        mine = min(timed(run_sub, dev)[1] for _ in range(args.repeat))
        d_alpha = max(abs(a - b) for a, b in zip(alphas(report), ww["alpha"], strict=True))
        print(
            f"WeightWatcher analyze(mp_fit={ww_config == 'ww_mp'}) on {ww['layers']} layers, CPU "
            f"{args.ww_threads} threads: {ww['seconds']:.2f} s; spectrawatch on the GPU: "
            f"{mine:.3f} s -> {ww['seconds'] / mine:.0f}x (max |d alpha| {d_alpha:.1e})",
            flush=True,
        )


if __name__ == "__main__":
    main()
