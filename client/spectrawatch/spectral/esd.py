"""Weight tensors as WeightWatcher's matrices, and their empirical spectral densities.

The ESD of a weight matrix ``W`` (``N x M``, ``N >= M``) is the set of eigenvalues of
``W^T W``, i.e. the squared singular values, **without** a ``1/N`` factor (WeightWatcher >= 0.6.5
convention). Reproduces WeightWatcher 0.7.7's ``conv2D_Wmats`` + ``apply_normalize_Wmats``
(:func:`weight_matrices`), ``layer_supported`` (:func:`is_supported`) and
``combined_eigenvalues`` (:func:`pooled_eigenvalues`); the eigenvalues come from batched
solvers on any device (:mod:`spectrawatch.spectral.eigen`). The metrics of an ESD are in
:mod:`spectrawatch.spectral.htsr`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from spectrawatch.spectral.eigen import (
    HOST_MAX,
    batched_eigvalsh,
    cuda_streams,
    gram,
    grams,
    on_streams,
    squared_svdvals,
    svd_route,
)
from spectrawatch.spectral.errors import SpectralError

# WeightWatcher constants (weightwatcher/constants.py, 0.7.7)
MIN_EVALS = 8  # layers with fewer eigenvalues (M * rf) are skipped
MAX_EVALS = 15000  # ... or more
MAX_N = 50000  # ... or a larger dimension above this (e.g. GPT-2's 50257 x 768 token embedding)
CONV2D_SCALE = math.sqrt(0.5)  # pooled Conv2d slices are scaled by sqrt(conv2d_count / 2)

_EIG_CHUNK_BYTES = 1 << 27  # at most ~128 MB of stacked float64 matrices per batched call
_SVD_CHUNK_BYTES = 1 << 24  # ... and 16 MB per batched SVD of mid-sized CUDA matrices
_SVD_LARGE_CHUNK_BYTES = 1 << 28  # ... and 256 MB of matrices wider than HOST_MAX (a GPT-2
# shape's whole stack: 4 such calls on 4 streams peaked at 4.4 GiB on an H200)
_F64 = torch.float64


@dataclass(frozen=True)
class WeightMatrices:
    """The 2-D matrices WeightWatcher analyses for one weight tensor, before any SVD.

    ``matrices``: one ``(N, M)`` matrix for a dense weight, ``kh*kw`` slices for a Conv2d kernel
    (scaled by sqrt(1/2), ``conv2D_Wmats`` + ``apply_normalize_Wmats``); ``rf`` = receptive field.
    """

    matrices: tuple[torch.Tensor, ...]
    n_rows: int
    n_cols: int
    rf: int

    @property
    def num_evals(self) -> int:
        return self.n_cols * self.rf


def weight_matrices(weight: torch.Tensor) -> WeightMatrices:
    """Split a weight tensor into WeightWatcher's matrices.

    2-D ``(out, in)`` (Linear, HF Conv1D, Embedding): itself. 4-D Conv2d ``(out, in, kh, kw)``
    (channels last in WW's naming: ``out + in >= kh + kw``) or Keras ``(kh, kw, in, out)``: one
    ``(max, min)`` matrix per kernel position, scaled by ``sqrt(1/2)`` so pooled conv
    eigenvalues are halved exactly as in WeightWatcher. Other ranks raise :class:`SpectralError`.
    """
    if weight.ndim == 2:
        n, m = max(weight.shape), min(weight.shape)
        return WeightMatrices((weight,), n, m, 1)
    if weight.ndim == 4:
        s0, s1, s2, s3 = weight.shape
        if s0 + s1 >= s2 + s3:
            slices = weight.permute(2, 3, 0, 1).reshape(s2 * s3, s0, s1)
        else:
            slices = weight.reshape(s0 * s1, s2, s3)
        n, m = max(slices.shape[1:]), min(slices.shape[1:])
        mats = tuple(slices * CONV2D_SCALE)
        return WeightMatrices(mats, n, m, int(slices.shape[0]))
    raise SpectralError(f"expected a 2-D or 4-D weight, got shape {tuple(weight.shape)}")


def is_supported(mats: WeightMatrices) -> bool:
    """WeightWatcher's size filter (``layer_supported``, pooled mode): 8 <= M*rf <= 15000 and
    N <= 50000."""
    return MIN_EVALS <= mats.num_evals <= MAX_EVALS and mats.n_rows <= MAX_N


def eigenvalues(
    matrices: Sequence[torch.Tensor], *, dtype: torch.dtype = _F64
) -> list[torch.Tensor]:
    """Ascending eigenvalues of ``W^T W`` (squared singular values, no 1/N) of each matrix.

    Matrices of equal shape are stacked (up to ~128 MB per call) and decomposed in batched
    calls: the Gram matrix on the smaller side ``(B, M, M)`` in ``dtype`` (float64 by default:
    the Gram squares the condition number, so float32 loses eigenvalues below ~1e-7 lambda_max
    and shifts alpha by ~1e-4 on GPT-2-shaped layers), then a batched ``eigvalsh``
    (:mod:`spectrawatch.spectral.eigen` picks the solver: numpy's LAPACK for wide CPU matrices,
    the host's for mid-sized CUDA stacks); round-off negatives are clamped to 0. On CUDA,
    matrices up to :data:`~spectrawatch.spectral.eigen.SVD_MAX` wide (FARMS windows, GPT-2's
    weights) take cuSOLVER's batched SVD of the matrices themselves
    (:func:`~spectrawatch.spectral.eigen.squared_svdvals`), and the stacks are solved on several
    streams at once (:func:`~spectrawatch.spectral.eigen.on_streams`; wider matrices' Grams one
    by one). Each result is
    ``(M,)`` ``dtype`` on the matrices' device, in input order; a matrix with NaN/Inf entries
    gets an all-NaN result (its metrics then raise :class:`SpectralError`) without spoiling its
    batch.
    """
    out: list[torch.Tensor | None] = [None] * len(matrices)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, w in enumerate(matrices):
        if w.ndim != 2 or 0 in w.shape:
            raise SpectralError(f"expected a non-empty 2-D matrix, got shape {tuple(w.shape)}")
        groups.setdefault(tuple(w.shape), []).append(i)
    device = matrices[0].device if matrices else torch.device("cpu")
    streams = cuda_streams() if device.type == "cuda" else 1
    chunks: list[list[int]] = []
    for (rows, cols), group in groups.items():
        n = min(rows, cols)
        svd = svd_route(n, len(group), device)  # batched gesvda: its workspace is ~15x the
        # input for small matrices (peak 6.8 GiB for FARMS' 3,969 windows in 128 MB chunks)
        if streams > 1 and n > HOST_MAX and not svd:
            # syevd of Grams this large: cuSOLVER solves a stack one matrix after another
            # anyway, so one matrix per task on the streams
            chunks += [[i] for i in group]
            continue
        cap = _EIG_CHUNK_BYTES
        if svd:
            cap = _SVD_LARGE_CHUNK_BYTES if n > HOST_MAX else _SVD_CHUNK_BYTES
        per_chunk = max(2 if svd else 1, cap // (rows * cols * 8))
        chunks += [group[start : start + per_chunk] for start in range(0, len(group), per_chunk)]

    def solve(idx: list[int]) -> torch.Tensor:
        return _batched_eigenvalues([matrices[i] for i in idx], dtype)

    if streams > 1 and chunks:  # the chunks on CUDA streams at once
        results = on_streams([functools.partial(solve, c) for c in chunks], device, streams)
    else:
        results = [solve(c) for c in chunks]
    for idx, evals in zip(chunks, results, strict=True):
        for i, ev in zip(idx, evals, strict=True):
            out[i] = ev
    return [e for e in out if e is not None]


def _batched_eigenvalues(mats: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Eigenvalues of ``W^T W`` for equal-shape ``mats``: ``(B, min(rows, cols))``."""
    solve: Callable[[torch.Tensor], torch.Tensor]
    if mats[0].device.type == "cpu" and dtype in (torch.float32, torch.float64):
        data, solve = grams(mats, dtype), batched_eigvalsh  # no stacked copy
    else:
        stack = torch.stack(mats).to(dtype)  # one kernel, not one per matrix
        if svd_route(min(stack.shape[-2:]), len(mats), stack.device):  # FARMS windows, weights
            data, solve = stack, squared_svdvals
        else:
            data, solve = gram(stack), batched_eigvalsh
            del stack
    if solve is squared_svdvals:
        finite = torch.isfinite(data).flatten(1).all(dim=1)
    else:
        # A NaN/Inf entry makes its row's or column's diagonal Gram entry NaN/Inf (as does a
        # finite matrix whose squares overflow): the diagonal finds them without a full pass.
        finite = torch.isfinite(torch.diagonal(data, dim1=-2, dim2=-1)).all(dim=-1)
    if not bool(finite.all()):  # decompose zeros instead; those ESDs become NaN below
        data = torch.where(finite[:, None, None], data, 0.0)
    evals: torch.Tensor = solve(data).clamp_min_(0.0)
    bad = ~(finite & torch.isfinite(evals).all(dim=-1))  # squares overflowing in the SVD route
    evals[bad] = math.nan
    return evals


def pooled_eigenvalues(mats: WeightMatrices, *, dtype: torch.dtype = _F64) -> torch.Tensor:
    """One sorted ESD for a layer: eigenvalues of all its matrices (``combined_eigenvalues``)."""
    return torch.sort(torch.cat(eigenvalues(mats.matrices, dtype=dtype))).values
