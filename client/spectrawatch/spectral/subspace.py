"""Top-subspace drift of a weight matrix between two snapshots.

The learned structure of a weight ``W`` ``(m, n)`` sits in the eigenvectors of its short-side Gram
``A = X^T X / m`` (``X`` = ``W`` oriented tall) whose eigenvalues lie above the Marchenko-Pastur
bulk (the spikes of HT-SR, threshold ``(1 + delta) lambda+`` as in
:func:`spectrawatch.spectral.conditioning.mp_spike_threshold`). With ``P`` the orthogonal projector
onto that top subspace at one snapshot and ``P'`` at the next,

    drift = 1 - tr(P P') / k,   k = max(rank P, rank P')

(``research/matrix_methods.md`` §1.8 item 4): 0 when the spike subspace did not move, 1 when it
turned orthogonal, ``sin^2(theta) / k`` when one of ``k`` directions rotated by ``theta``; a
direction appearing or vanishing counts as ``1 / k`` of drift. When both ranks are equal it is the
mean squared sine of the principal angles between the subspaces.

Two ways to the same number: exact top-``k`` eigenvectors (``tr(P P') = ||U^T U'||_F^2``, LAPACK /
cuSOLVER ``eigh``) and, GEMM-only, the Polar Express projector ``(I + sign(A - tI)) / 2``
(:func:`spectrawatch.spectral.polar.spectral_projector`), for large matrices on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spectrawatch.spectral.conditioning import mp_spike_threshold
from spectrawatch.spectral.eigen import eigh_above, gram
from spectrawatch.spectral.polar import spectral_projector

SUBSPACE_DRIFT = "subspace.drift"
SUBSPACE_RANK = "subspace.rank"
MAX_RANK = 64  # spikes beyond this many are not tracked (a dense, not low-rank, structure)


@dataclass(frozen=True)
class SubspaceDrift:
    """``drift`` in ``[0, 1]`` between the top subspaces of rank ``rank_before``/``rank_after``."""

    drift: float
    rank_before: int
    rank_after: int


def _gram(weights: torch.Tensor) -> torch.Tensor:
    """Short-side Gram ``X^T X / m`` ``(n, n)`` of ``weights`` oriented tall, float32 or wider."""
    if weights.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(weights.shape)}")
    work = torch.float32 if weights.is_cuda else torch.float64
    return gram(weights.to(work)) / max(weights.shape)


def _threshold(weights: torch.Tensor, delta: float) -> float:
    frob_sq = float(torch.linalg.matrix_norm(weights.to(torch.float64)) ** 2)
    return mp_spike_threshold((weights.shape[0], weights.shape[1]), frob_sq, delta)


def top_subspace(
    weights: torch.Tensor, delta: float = 0.05, max_rank: int = MAX_RANK
) -> torch.Tensor:
    """Orthonormal basis ``(n, k)`` of the spike subspace of ``weights`` (exact eigenpairs);
    ``k`` = number of Gram eigenvalues above the MP threshold, at most ``max_rank``."""
    _, vec = eigh_above(_gram(weights), _threshold(weights, delta))  # ascending
    k = min(vec.shape[1], max_rank)
    basis: torch.Tensor = vec[:, vec.shape[1] - k :]
    return basis


def basis_drift(before: torch.Tensor, after: torch.Tensor) -> SubspaceDrift:
    """Drift between the subspaces spanned by orthonormal bases ``(n, k1)`` and ``(n, k2)``."""
    k1, k2 = before.shape[1], after.shape[1]
    k = max(k1, k2)
    if k == 0:
        raise ValueError("both subspaces are empty: no spikes above the MP bulk")
    overlap = float(torch.linalg.matrix_norm(before.mT @ after.to(before.dtype)) ** 2)
    return SubspaceDrift(min(max(1.0 - overlap / k, 0.0), 1.0), k1, k2)


def projector_drift(before: torch.Tensor, after: torch.Tensor) -> SubspaceDrift:
    """Drift between two (approximate) orthogonal projectors ``(n, n)``: ranks are their rounded
    traces and ``tr(P P') = sum(P * P')`` for symmetric projectors (one elementwise product)."""
    k1 = round(float(torch.diagonal(before).sum()))
    k2 = round(float(torch.diagonal(after).sum()))
    k = max(k1, k2)
    if k == 0:
        raise ValueError("both subspaces are empty: no spikes above the MP bulk")
    overlap = float((before * after.to(before.dtype)).sum())
    return SubspaceDrift(min(max(1.0 - overlap / k, 0.0), 1.0), k1, k2)


def weight_subspace_drift(
    before: torch.Tensor,
    after: torch.Tensor,
    *,
    delta: float = 0.05,
    max_rank: int = MAX_RANK,
    polar: bool = False,
    dtype: torch.dtype = torch.float32,
) -> SubspaceDrift:
    """Drift of the spike subspace of one weight matrix between two snapshots of equal shape.

    ``polar=True`` uses GEMM-only Polar Express projectors (in ``dtype``) instead of ``eigh``;
    ``max_rank`` does not apply there. Raises ``ValueError`` for mismatched shapes or when
    neither snapshot has a spike.
    """
    if before.shape != after.shape or before.ndim != 2:
        raise ValueError(
            f"shapes differ or are not 2-D: {tuple(before.shape)}, {tuple(after.shape)}"
        )
    if polar:
        return projector_drift(
            spectral_projector(_gram(before), _threshold(before, delta), dtype=dtype),
            spectral_projector(_gram(after), _threshold(after, delta), dtype=dtype),
        )
    return basis_drift(top_subspace(before, delta, max_rank), top_subspace(after, delta, max_rank))
