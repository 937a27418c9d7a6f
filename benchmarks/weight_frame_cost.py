"""Worker time per analysis for one GPT-2-124M-shaped weight frame (the worker's weights work).

48 block matrices (c_attn 768x2304, attn.c_proj 768x768, c_fc 768x3072, mlp.c_proj 3072x768)
plus ``wpe`` 1024x768, random (0.02-scaled, as GPT-2's init), and a previous snapshot of the
same shapes for ``subspace``. Every analysis registered for weight frames runs on the frame,
in registry order, with an in-memory context (no database, no blob store); ``conditioning``
runs first and pays for the SVD it shares with ``norms`` and ``grok_rank``. ``htsr`` includes
the correlation traps unless ``--no-traps``.

"Before" numbers come from the same script run against an older tree, e.g.::

    git worktree add /tmp/before 05a4312
    PYTHONPATH=/tmp/before/client:/tmp/before/server \
        .venv/bin/python benchmarks/weight_frame_cost.py
    PYTHONPATH=client:server .venv/bin/python benchmarks/weight_frame_cost.py  # this tree
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable

import torch

import spectrawatch_server.analyses  # noqa: F401  (registers the analyses)
from spectrawatch.wire import FrameHeader, FrameKind
from spectrawatch_server.analyses.registry import DecodedFrame, analyses_for

SHAPES = {
    "attn.c_attn": (768, 2304),
    "attn.c_proj": (768, 768),
    "mlp.c_fc": (768, 3072),
    "mlp.c_proj": (3072, 768),
}


class Previous:
    """The analysis context: one earlier weight frame, nothing stored."""

    def __init__(self, frame: DecodedFrame) -> None:
        self.frame = frame

    def recent_frames(self, kind: FrameKind, limit: int) -> list[DecodedFrame]:
        return [self.frame] if kind == FrameKind.WEIGHTS and limit > 0 else []

    def frames_holding(self, kind: FrameKind, layers: Iterable[str]) -> dict[str, DecodedFrame]:
        if kind != FrameKind.WEIGHTS:
            return {}
        return {layer: self.frame for layer in layers if layer in self.frame.tensors}

    def metric_series(self, name: str, layer: str, limit: int) -> list[tuple[int, float]]:
        return []

    def metric_tails(self, wanted: object) -> dict[tuple[str, str], list[tuple[int, float]]]:
        return {}

    def scalar_series(self, name: str, limit: int) -> list[tuple[int, float]]:
        return []


def frame(
    tensors: dict[str, torch.Tensor], step: int, frame_id: int, traps: bool = True
) -> DecodedFrame:
    header = FrameHeader(FrameKind.WEIGHTS, step, step, {"traps": traps}, (), 0)
    return DecodedFrame(1, frame_id, header, tensors, torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--no-traps", action="store_true", help="as a run with weights_traps=False sends it"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    weights = {
        f"h.{b}.{name}.weight": torch.randn(*shape, generator=g) * 0.02
        for b in range(args.blocks)
        for name, shape in SHAPES.items()
    }
    weights["wpe.weight"] = torch.randn(1024, 768, generator=g) * 0.02
    before = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in weights.items()}
    context = Previous(frame(before, 0, 1))
    current = frame(weights, 500, 2, traps=not args.no_traps)
    total = 0.0
    print(f"{len(weights)} matrices, {args.threads} thread(s)")
    for analysis in analyses_for(FrameKind.WEIGHTS):
        t0 = time.perf_counter()
        result = analysis.fn(current, context)  # type: ignore[arg-type]
        dt = time.perf_counter() - t0
        total += dt
        print(f"{analysis.name:14s} {dt:7.2f} s  {len(result.metrics)} metrics")
    print(f"{'total':14s} {total:7.2f} s")


if __name__ == "__main__":
    main()
