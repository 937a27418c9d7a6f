"""GPU time of one all-parameter theta sketch, torch ops vs the Triton kernel (issue 4).

Every GPT-2-124M-shaped parameter (148 tensors, 124.4 M coordinates), d = 640, on one CUDA
device, float32 and bfloat16 parameters: ``FusedCountSketch`` (torch ops; its private-bucket
block size varied) beside ``TritonCountSketch`` (the rotated-rows kernel; rows per program,
rows and buckets per inner iteration varied). Median of ``--repeat`` CUDA-event-timed calls
after 3 warm-ups; each result is compared with the float64 torch path. The floor: one read of
all coordinates (``sum`` of one flat tensor of them).

    PYTHONPATH=client python benchmarks/sketch_gpu.py --device cuda

With ``--device cpu`` the same table on the CPU (``--threads``: torch's intra-op threads, which
are also the CPU sketch's pool of workers), where the default is one block per tensor piece.
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
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dim = 640
    torch.manual_seed(0)
    shapes = gpt2_shapes(blocks=args.blocks)
    seeds = list(range(len(shapes)))
    index = torch.cat(
        [signed_buckets(int(torch.Size(s).numel()), seed, dim) for seed, s in enumerate(shapes)]
    )
    index = index.to(device)
    numels = [int(torch.Size(s).numel()) for s in shapes]
    print(f"{len(shapes)} tensors, {sum(numels):,} coordinates, d = {dim}, device {device}")
    if device.type == "cuda":
        print(torch.cuda.get_device_name(device), "torch", torch.__version__)
    else:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    default = "private 2^16" if device.type != "cpu" else "one block per piece"
    variants: list[tuple[str, Callable[[], Callable[..., torch.Tensor]]]] = [
        (f"torch, {default} (default)", lambda: FusedCountSketch(numels, dim, device)),
        ("torch, private 2^14", lambda: FusedCountSketch(numels, dim, device, private=1 << 14)),
        ("torch, private 2^18", lambda: FusedCountSketch(numels, dim, device, private=1 << 18)),
    ]
    if available(device):
        for rows, row_block, buckets in (
            (16, 8, 128),
            (16, 16, 128),
            (32, 8, 128),
            (64, 16, 128),
            (16, 8, 256),
            (16, 16, 64),
        ):
            variants.append(
                (
                    f"triton, {rows} rows, {row_block} x {buckets} per iteration",
                    lambda r=rows, rb=row_block, bb=buckets: TritonCountSketch(
                        numels, dim, device, seeds=seeds, rows=r, row_block=rb, buckets=bb
                    ),
                )
            )
    print("| parameters | sketcher | ms per sketch | max rel. diff vs torch default |")
    print("|---|---|---|---|")
    best: tuple[float, int, int, int] | None = None
    for dtype in (torch.float32, torch.bfloat16):
        xs = [torch.randn(s, device=device).mul_(0.02).to(dtype) for s in shapes]
        reference: torch.Tensor | None = None
        flat = torch.cat([x.reshape(-1) for x in xs])
        floor = timed(flat.sum, args.repeat, device)
        print(f"| {str(dtype)[6:]} | floor: one read of all coordinates (sum) | {floor:.2f} | |")
        del flat
        for name, make in variants:
            try:
                sketcher = make()
                sk = sketcher  # FusedCountSketch reads the index, the Triton path none
                run = (
                    (lambda x, s=sk: s(x))
                    if isinstance(sk, TritonCountSketch)
                    else (lambda x, s=sk: s(x, index))
                )
                result = run(xs)
                if reference is None:
                    reference = result
                diff = float((result - reference).abs().max() / reference.abs().max())
                ms = timed(lambda r=run, x=xs: r(x), args.repeat, device)
                print(f"| {str(dtype)[6:]} | {name} | {ms:.2f} | {diff:.1e} |", flush=True)
                fastest = best is None or ms < best[0]
                if isinstance(sketcher, TritonCountSketch) and dtype == torch.float32 and fastest:
                    best = (ms, sketcher.rows, sketcher.row_block, sketcher.buckets)
            except Exception as exc:  # one failing variant must not hide the others
                print(f"| {str(dtype)[6:]} | {name} | failed: {type(exc).__name__}: {exc} | |")
        del xs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if best is not None:  # for gpu_suite.sh: the client runs that follow use the fastest
        print(
            f"BEST SPECTRAWATCH_TRITON_ROWS={best[1]} SPECTRAWATCH_TRITON_ROW_BLOCK={best[2]}"
            f" SPECTRAWATCH_TRITON_BUCKETS={best[3]}"
        )


if __name__ == "__main__":
    main()
