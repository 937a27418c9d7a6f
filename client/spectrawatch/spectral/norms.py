"""Matrix norms of weight matrices, and update sizes read from count-sketch rows.

A count-sketch ``S`` (:mod:`spectrawatch.sketch`: each coordinate to one of ``d`` buckets with a
random sign) preserves squared norms in expectation, ``E ||S x||^2 = ||x||^2``, with variance
``(2/d) (||x||^4 - sum x_i^4)``: the relative standard deviation of ``||S x||^2`` is at most
``sqrt(2/d)`` (5.6 % at the default d = 640, so about 2.8 % on ``||S x||``; 0 for a single
coordinate), though a sparse vector's rare collision of two large coordinates moves it further
(up to 16 % in ``tests/unit/test_update_norms.py``; Charikar, Chen & Farach-Colton 2002; Thorup
& Zhang 2012).
:func:`row_norms` of update- and theta-sketch rows therefore estimates ``||delta theta||`` per
step and ``||theta||`` per layer without the client computing a norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spectrawatch.spectral.eigen import svdvals
from spectrawatch.spectral.errors import SpectralError

FROBENIUS_NORM = "norm.frobenius"
SPECTRAL_NORM = "norm.spectral"
UPDATE_NORM = "norm.update"  # ||delta theta|| of one optimizer step, from its sketch row
PARAM_NORM = "norm.param"  # ||theta||, from a theta sketch row
UPDATE_RATIO = "norm.update_ratio"  # norm.update / the latest norm.param before it


@dataclass(frozen=True)
class MatrixNorms:
    """Frobenius norm ``||W||_F`` and spectral norm ``sigma_1(W)`` of one matrix."""

    frobenius: float
    spectral: float


def matrix_norms(weights: torch.Tensor) -> MatrixNorms:
    """Norms of a 2-D matrix ``(m, n)``, computed in float64 for a stable reference value (the
    spectral norm as the largest of :func:`~spectrawatch.spectral.eigen.svdvals`); a matrix
    with a NaN/Inf entry has no spectral norm (:class:`SpectralError`)."""
    if weights.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(weights.shape)}")
    if not bool(torch.isfinite(weights).all()):
        raise SpectralError("the weight has NaN/Inf entries: no norms")
    w = weights.to(torch.float64)
    return MatrixNorms(
        frobenius=float(torch.linalg.matrix_norm(w, ord="fro")),
        spectral=float(svdvals(w)[0]),
    )


def row_norms(rows: torch.Tensor) -> list[float]:
    """The float64 Euclidean norm of each row of a ``(steps, d)`` sketch (NaN/Inf kept: the
    caller skips rows that are not finite)."""
    if rows.ndim != 2:
        raise ValueError(f"expected (steps, d) rows, got shape {tuple(rows.shape)}")
    norms: list[float] = torch.linalg.vector_norm(rows.to(torch.float64), dim=1).tolist()
    return norms
