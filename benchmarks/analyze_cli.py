"""Time ``spectrawatch analyze`` per layer on one GPT-2-small-shaped transformer block.

Writes a random (0.02-scaled, as GPT-2's init) block -- c_attn (768, 2304), c_proj (768, 768),
c_fc (768, 3072), mlp c_proj (3072, 768) -- to a safetensors file and times, per matrix, HT-SR
alone, HT-SR + FARMS, and the conditioning SVD, through the same code path as the command.

    python benchmarks/analyze_cli.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from spectrawatch import _analyze as an
from spectrawatch.spectral.farms import FARMS_CV
from spectrawatch.spectral.htsr import analyze_weights

SHAPES = {
    "h.0.attn.c_attn.weight": (768, 2304),
    "h.0.attn.c_proj.weight": (768, 768),
    "h.0.mlp.c_fc.weight": (768, 3072),
    "h.0.mlp.c_proj.weight": (3072, 768),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = an.resolve_device(args.device)
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "block.safetensors"
        save_file({k: torch.randn(*s, generator=g) * 0.02 for k, s in SHAPES.items()}, str(path))
        print(f"| layer | shape | HT-SR s | HT-SR + FARMS s | conditioning s |  ({device})")
        total = time.perf_counter()
        for ref in an.checkpoint_tensors(path):
            w = ref.load().to(device)
            row = []
            for farms in (None, FARMS_CV):
                t = time.perf_counter()
                analyze_weights({ref.name: w}, farms=farms, device=device)
                row.append(time.perf_counter() - t)
            t = time.perf_counter()
            an.conditioning_values(w)
            row.append(time.perf_counter() - t)
            cells = " | ".join(f"{x:.2f}" for x in row)
            print(f"| {ref.name} | {tuple(w.shape)} | {cells} |")
        t = time.perf_counter()
        an.analyze_checkpoint(path, device=args.device, progress=False)
        print(
            f"whole command path (HT-SR + FARMS + conditioning): {time.perf_counter() - t:.1f} s;"
            f" script total {time.perf_counter() - total:.1f} s"
        )


if __name__ == "__main__":
    main()
