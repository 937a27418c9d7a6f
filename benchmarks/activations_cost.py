"""Worker cost of one GPT-2-small-shaped activation frame: EigenTrack descriptors and the
quadratic-manifold fit, on the CPU or a GPU.

The frame holds what the client sends for a probe batch of ``--tokens`` tokens through 12 blocks
hooked at ``attn`` (768 wide), ``mlp.c_fc`` (3072) and ``mlp`` (768): 36 modules, each the
``(tokens, hidden)`` rows (the client sends rows while tokens < hidden, the Gram otherwise).
Activations are synthetic: a rank-16 signal with 4 planted spikes plus isotropic noise. Each
registered analysis (``eigentrack``, ``manifold``) runs on the frame with an in-memory context
that returns a 20-point history per descriptor (so change scores are computed); best of
``--repeat`` synchronised runs after one warm-up.

    PYTHONPATH=client:server python benchmarks/activations_cost.py [--device cuda] [--tokens 512]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectrawatch.wire import FrameHeader, FrameKind
from spectrawatch_server.analyses.registry import DecodedFrame, analyses_for

WIDTHS = {"attn": 768, "mlp.c_fc": 3072, "mlp": 768}


class _Context:
    """A 20-point history for every (metric, layer); nothing else."""

    def metric_series(self, name: str, layer: str, limit: int) -> list[tuple[int, float]]:
        return [(s, 0.5 + 0.01 * (s % 3)) for s in range(20)][-limit:]

    def metric_tails(
        self, wanted: dict[tuple[str, str], int]
    ) -> dict[tuple[str, str], list[tuple[int, float]]]:
        return {k: self.metric_series(*k, n) for k, n in wanted.items()}

    def recent_frames(self, kind: FrameKind, limit: int) -> list[DecodedFrame]:
        return []

    def frames_holding(self, kind: FrameKind, layers: object) -> dict[str, DecodedFrame]:
        return {}

    def scalar_series(self, name: str, limit: int) -> list[tuple[int, float]]:
        return []


def activations(tokens: int, hidden: int, g: torch.Generator) -> torch.Tensor:
    signal = torch.randn(tokens, 16, generator=g) @ torch.randn(16, hidden, generator=g)
    spikes = torch.randn(tokens, 4, generator=g) @ (8 * torch.randn(4, hidden, generator=g))
    return signal * 0.3 + spikes + torch.randn(tokens, hidden, generator=g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"h.{b}.{m}": activations(args.tokens, w, g).to(device)
        for b in range(12)
        for m, w in WIDTHS.items()
    }
    header = FrameHeader(FrameKind.ACTIVATIONS, 500, 0, {}, (), 0)
    frame = DecodedFrame(1, 0, header, tensors, device)
    context = _Context()
    print(f"{len(tensors)} modules, {args.tokens} tokens, device {device}")
    for analysis in analyses_for(FrameKind.ACTIVATIONS):
        times = []
        for _ in range(args.repeat + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            result = analysis.fn(frame, context)  # type: ignore[arg-type]
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        print(
            f"{analysis.name:12s} {min(times[1:]) * 1e3:8.1f} ms best, "
            f"first {times[0] * 1e3:.1f} ms ({len(result.metrics)} metrics)",
            flush=True,
        )


if __name__ == "__main__":
    main()
