"""Cost of the client's system-metrics sampler (``spectrawatch._system``).

1. One sample on the sampler's thread: ``SystemSampler.sample_and_emit`` (CPU time, RSS from
   /proc, CUDA when initialised; rows appended to a list) timed ``--samples`` times.
2. The training thread: a small CPU training loop (MLP 256-1024-256, AdamW, batch 64) timed in
   ABBA blocks in one process, with no sampler and with a sampler thread running every
   ``--every`` seconds (default 0.01 s: 1,000x the default 10 s, so that any cost shows).
   The training thread never calls the sampler; what it may pay is the GIL while a sample runs.

    PYTHONPATH=client:server python benchmarks/system_sampler_cost.py [--samples 2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch
from torch import nn

from spectrawatch._sender import ClientStats, ErrorLog
from spectrawatch._system import SystemSampler


def per_sample(samples: int) -> tuple[float, float]:
    """Median and 99th percentile of one sample's time (microseconds)."""
    rows: list[dict[str, Any]] = []
    sampler = SystemSampler(10.0, lambda: 0, rows.extend, ErrorLog(ClientStats()))
    times = []
    for _ in range(samples):
        t = time.perf_counter()
        sampler.sample_and_emit()
        times.append(time.perf_counter() - t)
    times.sort()
    return statistics.median(times) * 1e6, times[int(0.99 * len(times))] * 1e6


def steps(seconds: float) -> float:
    """Median step time (ms) of a small CPU training loop run for about ``seconds``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(64, 256)
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def paired(pairs: int, seconds: float, every: float) -> list[tuple[float, float, int]]:
    """ABBA blocks: (median step ms without, with a sampler thread, samples taken)."""
    out = []
    for i in range(pairs):
        rows: list[dict[str, Any]] = []
        sampler = SystemSampler(every, lambda: 0, rows.extend, ErrorLog(ClientStats()))

        def with_sampler(sampler: SystemSampler = sampler) -> float:
            sampler.start()
            try:
                return steps(seconds)
            finally:
                sampler.stop()

        if i % 2 == 0:
            off, on = steps(seconds), with_sampler()
        else:
            on, off = with_sampler(), steps(seconds)
        out.append((off, on, len(rows) // 2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=3.0, help="per block")
    ap.add_argument("--every", type=float, default=0.01, help="sampler interval in the blocks")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    med, p99 = per_sample(args.samples)
    print(f"one sample: median {med:.1f} us, p99 {p99:.1f} us ({args.samples} samples)")
    print(f"at the default 10 s interval: {med / 10e6 * 100:.5f} % of one core")
    diffs = []
    for off, on, n in paired(args.pairs, args.seconds, args.every):
        diffs.append((on - off) / off * 100)
        print(
            f"step without {off:.3f} ms, with a sampler every {args.every} s {on:.3f} ms "
            f"({diffs[-1]:+.2f} %, {n} samples)"
        )
    print(
        f"paired step-time difference: median {statistics.median(diffs):+.2f} %, "
        f"range {min(diffs):+.2f} .. {max(diffs):+.2f} %"
    )


if __name__ == "__main__":
    main()
