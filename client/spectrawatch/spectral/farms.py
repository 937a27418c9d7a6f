"""FARMS: eigenspectrum analysis without aspect-ratio bias (Fixed-Aspect-Ratio Matrix Subsampling).

Hu, Goel, Killiakov & Yang, "Eigenspectrum Analysis of Neural Networks without Aspect Ratio
Bias", ICML 2025 (PMLR 267:24290-24313, arXiv 2506.06280). The ESD of an i.i.d. ``N x M`` matrix
is Marchenko-Pastur with a shape set by ``Q = N/M``, so a heavy-tail exponent fitted to the full
ESD moves with the aspect ratio, not only with training quality. FARMS instead measures the
heavy tail of the *average ESD of submatrices of one fixed aspect ratio* sampled from each weight.

Sampling follows the authors' code (HUST-AI-HYZ/FARMS, ``LLM_Pruning/lib/sampling.py``,
``fixed_sampling``; the paper body was not available here, so the released code is the
specification):

- window ``r x c`` with ``r = min(window_rows, rows, cols)`` and ``c = int(r * aspect_ratio)``,
  taken from ``W`` as stored (``(out, in)``), no transpose, no ``1/N``;
- a deterministic, overlapping ``n_r x n_c`` grid of windows, at most ``windows_per_dim`` per
  axis: ``row_step = max(1, (rows - r) // (windows_per_dim - 1))``,
  ``n_r = min(windows_per_dim, max(1, (rows - r) // row_step + 1))``, row start
  ``min(i * row_step, rows - r)`` (columns alike);
- the eigenvalues (squared singular values) of all windows are pooled into one sample. Every
  window contributes the same number of eigenvalues, so the pooled empirical distribution *is*
  the equal-weight average ESD of the windows.

Open choices, documented here:

- Window size and count: the authors ship two settings, 100 x 100 windows, 9 per axis, Q = 1
  for CNNs (``Image_Classification/bash_scripts/config/farms_imagecls_main.txt``; our default,
  :data:`FARMS_CV`), and 2000 x 2000 clipped to the smaller dimension, 10 (or 15) per axis, Q = 1
  for LLaMA pruning (:data:`FARMS_LLM`). The default is the small-window setting because it costs
  ~81 eigendecompositions of 100 x 100 per layer instead of up to 100 of ``min(dim)^2``.
- ``c > cols`` (aspect ratio > 1 on a short matrix): the authors' slicing silently truncates the
  window; we clip ``c`` to ``cols`` and report the actual window shape.
- The ``r`` clip to ``min(rows, cols)`` exists only in the LLM code; we apply it everywhere so a
  layer narrower than the window still has full windows, down to :data:`MIN_WINDOW` rows:
  below that (a 10-class head, a 16 x 64 position table) a window has a handful of
  eigenvalues, their pooled ESD has no tail to fit (FARMS alpha 16-18 where the plain one is
  3.2-3.4, measured), and the layer gets no FARMS metrics (:func:`applies`).
- Conv2d: the authors' image code takes one block per kernel slice; we apply the same window grid
  to each ``kh*kw`` slice (WeightWatcher slicing, scaled by sqrt(1/2)) and pool all windows.
- Which fit: the authors use WeightWatcher's KS fit with ``xmin_peak`` (LLM pruning) or the Hill
  estimator with xmin at the median (CNNs); :mod:`spectrawatch.spectral.htsr` computes the plain
  Clauset/KS fit and the median Hill estimator on the pooled FARMS ESD, like on the full ESD.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from spectrawatch.spectral.eigen import gram_eigvalsh


@dataclass(frozen=True)
class FarmsConfig:
    """Window height ``window_rows``, width/height ``aspect_ratio``, max windows per axis."""

    window_rows: int = 100
    aspect_ratio: float = 1.0
    windows_per_dim: int = 9

    def __post_init__(self) -> None:
        if self.window_rows < 1 or self.aspect_ratio <= 0 or self.windows_per_dim < 1:
            raise ValueError(f"invalid FARMS configuration {self}")


MIN_WINDOW = 32  # smallest window (rows) FARMS is computed on; smaller layers get none


def applies(rows: int, cols: int, config: FarmsConfig) -> bool:
    """Whether a ``rows x cols`` matrix is large enough for FARMS windows (:data:`MIN_WINDOW`)."""
    return min(window_shape(rows, cols, config)) >= min(MIN_WINDOW, config.window_rows)


FARMS_CV = FarmsConfig(window_rows=100, aspect_ratio=1.0, windows_per_dim=9)
FARMS_LLM = FarmsConfig(window_rows=2000, aspect_ratio=1.0, windows_per_dim=10)


def window_shape(rows: int, cols: int, config: FarmsConfig) -> tuple[int, int]:
    """The ``(r, c)`` window taken from a ``rows x cols`` matrix (see module docstring)."""
    r = min(config.window_rows, rows, cols)
    c = min(max(1, int(r * config.aspect_ratio)), cols)
    return r, c


def _starts(length: int, size: int, per_dim: int) -> torch.Tensor:
    """Window starts along one axis, exactly as ``fixed_sampling``."""
    step = max(1, (length - size) // (per_dim - 1)) if per_dim > 1 else max(1, length - size)
    count = min(per_dim, max(1, (length - size) // step + 1))
    return torch.clamp(torch.arange(count) * step, max=length - size)


def window_starts(rows: int, cols: int, config: FarmsConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column start offsets of the window grid ``(n_r,)``, ``(n_c,)`` (int64, CPU)."""
    r, c = window_shape(rows, cols, config)
    return _starts(rows, r, config.windows_per_dim), _starts(cols, c, config.windows_per_dim)


def window_views(weight: torch.Tensor, config: FarmsConfig) -> list[torch.Tensor]:
    """The FARMS windows of a 2-D ``weight`` as views into it (no copy), in
    :func:`sample_windows`' order."""
    rows, cols = weight.shape
    r, c = window_shape(rows, cols, config)
    rs, cs = window_starts(rows, cols, config)
    return [weight[i : i + r, j : j + c] for i, j in itertools.product(rs.tolist(), cs.tolist())]


def sample_windows(weight: torch.Tensor, config: FarmsConfig) -> torch.Tensor:
    """All FARMS windows of a 2-D ``weight`` ``(rows, cols)`` as ``(n_r * n_c, r, c)``.

    Row-major over the grid (row window ``i``, column window ``j`` -> index ``i * n_c + j``),
    on ``weight``'s device and dtype; on CUDA one gather, not a loop over windows.
    """
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(weight.shape)}")
    if weight.device.type == "cpu":  # slice copies: ~10x faster than the gather on a CPU core
        return torch.stack(window_views(weight, config))
    rows, cols = weight.shape
    r, c = window_shape(rows, cols, config)
    rs, cs = window_starts(rows, cols, config)
    dev = weight.device
    row_idx = (rs.unsqueeze(1) + torch.arange(r)).to(dev)  # (n_r, r)
    col_idx = (cs.unsqueeze(1) + torch.arange(c)).to(dev)  # (n_c, c)
    win = weight[row_idx[:, None, :, None], col_idx[None, :, None, :]]  # (n_r, n_c, r, c)
    return win.reshape(-1, r, c)


def farms_esd(weight: torch.Tensor, config: FarmsConfig = FARMS_CV) -> torch.Tensor:
    """Pooled, ascending FARMS eigenvalues of a 2-D weight: ``(n_windows * min(r, c),)`` float64.

    Eigenvalues of each window's Gram ``(min(r,c), min(r,c))`` in float64 by one batched
    :func:`~spectrawatch.spectral.eigen.gram_eigvalsh` (on CUDA: the windows' squared singular
    values by one batched SVD), round-off negatives clamped to 0.
    """
    win = sample_windows(weight.detach(), config).to(torch.float64)
    evals = gram_eigvalsh(win).clamp_min_(0.0)
    return torch.sort(evals.flatten()).values
