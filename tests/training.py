"""A small real training loop and client settings shared by the client integration tests."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import torch
from torch import nn

import spectrawatch


def client_settings(
    tmp_path: Path, url: str, run: str, project: str = "tests", **kw: Any
) -> dict[str, Any]:
    """Small cadences so a few hundred steps make a few hundred frames; short backoff."""
    return {
        "url": url,
        "project": project,
        "run": run,
        "spool_dir": str(tmp_path / "spool"),
        "backoff_s": 0.05,
        "backoff_max_s": 0.5,
        "retries": 1,
        "timeout_s": 5.0,
        "frame_steps": 4,
        "theta_every": 10,
        "weights_every": 10,
        "activations_every": 10,
        "stats_every_s": 0.5,
        **kw,
    }


class Loop:
    """A tiny real training loop (MLP, AdamW); records the wall time of every step."""

    def __init__(self, m: spectrawatch.Monitor | None) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 8))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.1)
        self.x = torch.randn(128, 16)
        self.m = m
        self.step = 0
        self.times: list[float] = []
        if m is not None:
            assert m.attach(self.model, self.opt, probe=self.x[:32]) is not None

    def run(self, steps: int, pause: float = 0.0) -> None:
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = self.model(self.x).pow(2).mean()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.step += 1
            if self.m is not None:
                self.m.log({"loss": loss}, step=self.step)
            self.times.append(time.perf_counter() - t0)
            if pause:
                time.sleep(pause)

    def run_for(self, seconds: float, pause: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.run(1, pause)


def frames_of(url: str, run_id: int) -> list[dict[str, Any]]:
    with httpx.Client(base_url=f"{url}/api/v1", timeout=30) as c:
        resp = c.get(f"/runs/{run_id}/frames", params={"limit": 10_000})
        resp.raise_for_status()
        out: list[dict[str, Any]] = resp.json()
        return out


def all_analysed(url: str, run_id: int) -> bool:
    """Whether every frame of the run is analysed (``done``)."""
    return all(f["status"] == "done" for f in frames_of(url, run_id))


def tiny_gpt2(transformers: Any) -> Any:
    """A 1-layer, 32-wide GPT-2 (``transformers.GPT2LMHeadModel``), seeded, for adapter tests."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)
