"""Histograms of an ESD for its plots: log-binned (the log-log ESD and power-law plots, the
shuffled ESD of the correlation traps) and linear (the MP fit's plot, as WeightWatcher's
``plt.hist(evals, bins=100)``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from spectrawatch.spectral.errors import SpectralError
from spectrawatch.spectral.power_law import EVALS_THRESH

_F64 = torch.float64


def log_histogram(evals: torch.Tensor, bins: int = 100) -> dict[str, list[float] | list[int]]:
    """``edges`` (``bins + 1``, log-spaced over the eigenvalues > 1e-5), ``counts`` and
    ``density`` (counts / (all eigenvalues * bin width)) of an ESD, for log-log plots."""
    ev = evals.detach().to(_F64).flatten()
    pos = ev[ev > EVALS_THRESH]  # numerically zero eigenvalues would stretch the log axis
    if pos.numel() == 0:
        raise SpectralError(f"no eigenvalue above {EVALS_THRESH}")
    lo, hi = math.log10(float(pos.min())), math.log10(float(pos.max()))
    if hi <= lo:
        hi = lo + 1e-6
    edges = torch.logspace(lo, hi, bins + 1, dtype=_F64, device=ev.device)
    counts = torch.histc(torch.log10(pos), bins=bins, min=lo, max=hi)
    density = counts / (ev.numel() * (edges[1:] - edges[:-1]))
    return {
        "edges": edges.tolist(),
        "counts": [int(c) for c in counts.tolist()],
        "density": density.tolist(),
    }


def linear_histogram(evals: torch.Tensor, bins: int = 100) -> dict[str, Any]:
    """``counts`` of an ESD in ``bins`` equal bins over ``[lo, hi] = [0, lambda_max]`` (every
    eigenvalue, zeros included), for plots on linear axes such as the MP fit's (as
    WeightWatcher's ``plt.hist(evals, bins=100)``): log-spaced bins there give the smallest
    eigenvalues' narrow bins densities thousands of times the bulk's."""
    ev = evals.detach().to(device="cpu", dtype=_F64).flatten()
    hi = float(ev.max()) if ev.numel() else 0.0
    if not hi > 0.0:
        raise SpectralError("all eigenvalues are zero")
    counts = torch.histc(ev.clamp(0.0, hi), bins=bins, min=0.0, max=hi)
    return {"lo": 0.0, "hi": hi, "counts": [int(c) for c in counts.tolist()]}
