"""Encoding cost of the client's frames: the safetensors layout written by ``wire.encode_frame``
against ``safetensors.torch.save`` of the same tensors, side by side in one process.

An update-sketch frame of GPT-2 small (148 tensors + the model row, 16 steps, d = 640, float32)
is built both ways the client has built it: one clone per row name then ``save`` (before
session 18), and views of one ``(rows, steps, d)`` host tensor then ``encode_frame`` (now). A
weights part (32 MB of float32 matrices) is encoded by both encoders from the same tensors.
Both outputs are checked to load to the same tensors.

    PYTHONPATH=client:server python benchmarks/frame_encode.py [--repeat 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from safetensors.torch import load, save

from spectrawatch import wire

ROWS, STEPS, DIM = 149, 16, 640


def best_median(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3, statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = [f"layer{i}.weight" for i in range(ROWS)]
    meta = {"spectrawatch": wire.WIRE_VERSION, "kind": "update_sketch", "step": "1", "seq": "1"}
    by_step = torch.randn(STEPS, ROWS, DIM)  # the old host layout: (steps, rows, d)
    by_row = by_step.transpose(0, 1).contiguous()  # the new one: (rows, steps, d)

    def old_update() -> bytes:
        return save({n: by_step[:, i].clone() for i, n in enumerate(names)}, metadata=meta)

    def new_update() -> bytes:
        views = dict(zip(names, by_row.unbind(0), strict=True))
        return wire.encode_frame("update_sketch", 1, 1, views, {"steps": list(range(STEPS))})

    gen = torch.Generator().manual_seed(0)
    weights = {f"h.{i}.w": torch.randn(768, 768, generator=gen) for i in range(14)}  # 33 MB

    def old_weights() -> bytes:
        return save(weights, metadata={**meta, "kind": "weights"})

    def new_weights() -> bytes:
        return wire.encode_frame("weights", 1, 1, weights)

    a, b = load(old_update()), load(new_update())
    assert all(torch.equal(a[n], b[n]) for n in names)
    a, b = load(old_weights()), load(new_weights())
    assert all(torch.equal(a[n], b[n]) for n in weights)

    print(f"torch {torch.__version__}, 1 thread, best / median of {args.repeat}, ms")
    print("| frame | MB | safetensors.save (old path) | wire.encode_frame (new path) | ratio |")
    print("|---|---|---|---|---|")
    for label, old, new, mb in (
        ("update sketch, 149 rows x 16 steps x 640", old_update, new_update, ROWS * STEPS * DIM),
        ("weights part, 14 x 768 x 768", old_weights, new_weights, 14 * 768 * 768),
    ):
        ob, om = best_median(old, args.repeat)
        nb, nm = best_median(new, args.repeat)
        print(
            f"| {label} | {mb * 4 / 2**20:.1f} | {ob:.2f} / {om:.2f} | {nb:.2f} / {nm:.2f} "
            f"| {om / nm:.1f}x |"
        )


if __name__ == "__main__":
    main()
