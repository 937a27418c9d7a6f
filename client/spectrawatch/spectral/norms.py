"""Matrix norms of weight matrices; the smallest analysis, proving the ingest-to-metric path."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spectrawatch.spectral.eigen import svdvals

FROBENIUS_NORM = "norm.frobenius"
SPECTRAL_NORM = "norm.spectral"


@dataclass(frozen=True)
class MatrixNorms:
    """Frobenius norm ``||W||_F`` and spectral norm ``sigma_1(W)`` of one matrix."""

    frobenius: float
    spectral: float


def matrix_norms(weights: torch.Tensor) -> MatrixNorms:
    """Norms of a 2-D matrix ``(m, n)``, computed in float64 for a stable reference value (the
    spectral norm as the largest of :func:`~spectrawatch.spectral.eigen.svdvals`)."""
    if weights.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(weights.shape)}")
    w = weights.to(torch.float64)
    return MatrixNorms(
        frobenius=float(torch.linalg.matrix_norm(w, ord="fro")),
        spectral=float(svdvals(w)[0]),
    )
