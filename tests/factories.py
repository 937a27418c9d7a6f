"""Plain factory functions for test data: frames, runs."""

from __future__ import annotations

from typing import Any

import httpx
import torch

from spectrawatch.wire import FrameKind, encode_frame


def make_run(api: httpx.Client, project: str = "proj", name: str = "run", **extra: Any) -> int:
    response = api.post("/runs", json={"project": project, "name": name, **extra})
    assert response.status_code in (200, 201), response.text
    run_id: int = response.json()["id"]
    return run_id


def weight_frame(step: int, seq: int, seed: int = 0, layers: int = 2, size: int = 24) -> bytes:
    gen = torch.Generator().manual_seed(seed * 1000 + seq)
    tensors = {
        f"layer{i}.weight": torch.randn(size, size // 2, generator=gen) for i in range(layers)
    }
    return encode_frame(FrameKind.WEIGHTS, step, seq, tensors, {"dtype": "float32"})


def post_frame(
    api: httpx.Client, run_id: int, body: bytes, seq: int | None = None, **headers: str
) -> httpx.Response:
    if seq is not None:
        headers.setdefault("Idempotency-Key", f"{run_id}:{seq}")
    return api.post(f"/runs/{run_id}/frames", content=body, headers=headers)
