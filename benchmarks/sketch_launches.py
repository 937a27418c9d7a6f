"""Operators dispatched by one all-parameter update sketch: per tensor vs fused (issue 4).

A GPU training step pays for the client's sketch mostly in kernel launches (149 tensors x ~10
small ops for GPT-2 small), not in memory traffic. This counts the top-level ATen operators of
one sketch of every GPT-2-124M-shaped parameter (148 tensors, 124.4 M coordinates, d = 640) with
the GPU's settings (2^24-coordinate chunks, private buckets per 2^16 coordinates) forced on the
CPU, split into views (no kernel) and the rest (at least one kernel each on a GPU), and checks that
both give the same sketch. CPU times here say nothing about a GPU.

    PYTHONPATH=client python benchmarks/sketch_launches.py
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from spectrawatch.sketch import FusedCountSketch, count_sketch_signed, signed_buckets

VIEWS = {"aten::slice", "aten::reshape", "aten::view", "aten::select", "aten::empty"}
GPU_SETTINGS = {"chunk": 1 << 24, "private": 1 << 16}


def gpt2_shapes(d: int = 768, vocab: int = 50257, blocks: int = 12) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, d), (1024, d)]
    for _ in range(blocks):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,)]
        shapes += [(d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return [*shapes, (d,), (d,)]


def top_level_ops(fn: Callable[[], torch.Tensor]) -> Counter[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(
        e.name for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None
    )


def main() -> None:
    torch.set_num_threads(1)
    dim = 640
    xs = [torch.randn(s) for s in gpt2_shapes()]
    index = [signed_buckets(x.numel(), i, dim) for i, x in enumerate(xs)]
    flat = torch.cat(index)
    fused = FusedCountSketch([x.numel() for x in xs], dim, "cpu", **GPU_SETTINGS)

    def per_tensor() -> torch.Tensor:
        pairs = zip(xs, index, strict=True)
        return torch.stack([count_sketch_signed(x, i, dim, **GPU_SETTINGS) for x, i in pairs])

    diff = float((per_tensor() - fused(xs, flat)).abs().max())
    print(f"{len(xs)} tensors, {sum(x.numel() for x in xs):,} coordinates; max |diff| {diff:.1e}")
    for name, fn in (("per tensor", per_tensor), ("fused", lambda: fused(xs, flat))):
        ops = top_level_ops(fn)
        kernels = sum(n for op, n in ops.items() if op not in VIEWS)
        print(f"{name:>10}: {sum(ops.values())} top-level ops, {kernels} not views: {dict(ops)}")


if __name__ == "__main__":
    main()
