"""GPU time of one all-parameter theta sketch, torch ops vs the Triton kernel (issue 4).

Every GPT-2-124M-shaped parameter (148 tensors, 124.4 M coordinates), d = 640, on one CUDA
device, float32 and bfloat16 parameters: ``FusedCountSketch`` (torch ops; its private-bucket
block size varied) beside ``TritonCountSketch`` (tile size varied). Median of ``--repeat``
CUDA-event-timed calls after 3 warm-ups; each result is compared with the float64 torch path.

    PYTHONPATH=client python benchmarks/sketch_gpu.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from sketch_launches import gpt2_shapes

from spectrawatch._sketch_triton import TritonCountSketch, available
from spectrawatch.sketch import FusedCountSketch, signed_buckets


def timed(fn: Callable[[], torch.Tensor], repeat: int, device: torch.device) -> float:
    """Median milliseconds of ``fn`` (CUDA events off the CPU, wall clock on it)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--blocks", type=int, default=12, help="transformer blocks (12 = GPT-2 small)")
    args = ap.parse_args()
    device = torch.device(args.device)
    dim = 640
    torch.manual_seed(0)
    shapes = gpt2_shapes(blocks=args.blocks)
    index = torch.cat(
        [signed_buckets(int(torch.Size(s).numel()), i, dim) for i, s in enumerate(shapes)]
    )
    index = index.to(device)
    numels = [int(torch.Size(s).numel()) for s in shapes]
    print(f"{len(shapes)} tensors, {sum(numels):,} coordinates, d = {dim}, device {device}")
    if device.type == "cuda":
        print(torch.cuda.get_device_name(device), "torch", torch.__version__)
    variants: list[tuple[str, Callable[[], Callable[..., torch.Tensor]]]] = [
        ("torch, private 2^16 (default)", lambda: FusedCountSketch(numels, dim, device)),
        ("torch, private 2^14", lambda: FusedCountSketch(numels, dim, device, private=1 << 14)),
        ("torch, private 2^18", lambda: FusedCountSketch(numels, dim, device, private=1 << 18)),
    ]
    if available(device):
        for log2, unfold in (
            (16, False),
            (14, False),
            (14, True),
            (13, True),
            (12, True),
            (15, True),
        ):
            variants.append(
                (
                    f"triton, tile 2^{log2}, {'d' if unfold else '2d'} buckets per tile",
                    lambda t=1 << log2, u=unfold: TritonCountSketch(
                        numels, dim, device, tile=t, unfold=u
                    ),
                )
            )
    print("| parameters | sketcher | ms per sketch | max rel. diff vs torch default |")
    print("|---|---|---|---|")
    best: tuple[float, int, bool] | None = None
    for dtype in (torch.float32, torch.bfloat16):
        xs = [torch.randn(s, device=device).mul_(0.02).to(dtype) for s in shapes]
        reference: torch.Tensor | None = None
        for name, make in variants:
            try:
                sketcher = make()
                result = sketcher(xs, index)
                if reference is None:
                    reference = result
                diff = float((result - reference).abs().max() / reference.abs().max())
                ms = timed(lambda s=sketcher, x=xs: s(x, index), args.repeat, device)
                print(f"| {str(dtype)[6:]} | {name} | {ms:.2f} | {diff:.1e} |", flush=True)
                fastest = best is None or ms < best[0]
                if isinstance(sketcher, TritonCountSketch) and dtype == torch.float32 and fastest:
                    best = (ms, sketcher.tile, sketcher.unfold)
            except Exception as exc:  # one failing variant must not hide the others
                print(f"| {str(dtype)[6:]} | {name} | failed: {type(exc).__name__}: {exc} | |")
        del xs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if best is not None:  # for gpu_suite.sh: the client runs that follow use the fastest
        print(f"BEST SPECTRAWATCH_TRITON_TILE={best[1]} SPECTRAWATCH_TRITON_UNFOLD={int(best[2])}")


if __name__ == "__main__":
    main()
