"""Weight conditioning: condition number, GMCN, and a PC-layer what-if (seed 001).

GMCN, the "modified condition number" of PC Layer (Wang et al., arXiv 2606.06470;
`Empath-aln/PC-layer` ``visualize/metrics_plotter.py::compute_modified_condition_number``), is
``sigma_1 / mean(bottom ceil(10 %) singular values)``: a condition number that one tiny singular
value cannot blow up. The PC layer reparameterises ``W`` as ``sigma_hat * p_k(W / sigma_hat)`` with
a fixed odd polynomial ``p_k`` (``pc_layer.py``, ``pc_level = k``), mapping every singular value
``sigma -> sigma_hat * p_k(sigma / sigma_hat)``; small ones gain up to ``p_k'(0)`` (1.5-3.6), so
GMCN drops. :func:`pc_preview` reports what that would do to a given weight
(``research/matrix_methods.md`` §2.2, §2.5 item 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from spectrawatch.spectral.eigen import svdvals
from spectrawatch.spectral.errors import SpectralError

SIGMA_MAX = "conditioning.sigma_max"
SIGMA_MIN = "conditioning.sigma_min"
CONDITION_NUMBER = "conditioning.condition_number"
GMCN = "conditioning.gmcn"
MP_SPIKES = "conditioning.mp_spikes"
# GMCN a PC layer would leave, and its ratio to the raw GMCN, at the levels of the PC-layer runs
# (pc_level 2 with Muon, 4 with AdamW; research/matrix_methods.md §2.3).
PC2_GMCN = "conditioning.pc2_gmcn"
PC2_GMCN_RATIO = "conditioning.pc2_gmcn_ratio"
PC4_GMCN = "conditioning.pc4_gmcn"
PC4_GMCN_RATIO = "conditioning.pc4_gmcn_ratio"
PC_PREVIEW_KEYS: dict[int, tuple[str, str]] = {
    2: (PC2_GMCN, PC2_GMCN_RATIO),
    4: (PC4_GMCN, PC4_GMCN_RATIO),
}

# Coefficients (c0, c1, ...) of p_k(x) = c0 x + c1 x^3 + c2 x^5 + ... hard-coded in
# Empath-aln/PC-layer torchtitan/pc_layer/pc_layer.py (pc_level 1..4); p_k(1) = 1 for all.
PC_COEFFICIENTS: dict[int, tuple[float, ...]] = {
    1: (1.507, -0.507),
    2: (2.083, -1.643, 0.560),
    3: (2.909, -4.649, 4.023, -1.283),
    4: (3.625, -9.261, 14.097, -10.351, 2.890),
}

FloatArray = npt.NDArray[np.float64]


def singular_values(weights: torch.Tensor) -> torch.Tensor:
    """Singular values ``(min(m, n),)`` descending of a 2-D ``weights``, float64 on CPU and
    float32 on CUDA (:func:`~spectrawatch.spectral.eigen.svdvals`)."""
    if weights.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(weights.shape)}")
    dtype = torch.float32 if weights.is_cuda else torch.float64
    return svdvals(weights.to(dtype))


def gmcn(sv: torch.Tensor | FloatArray, fraction: float = 0.1) -> float:
    """``sigma_1 / mean of the ceil(fraction * k)`` smallest of the ``k`` singular values ``sv``.

    Returns ``inf`` when those are all zero (a rank-deficient matrix).
    """
    s = np.sort(np.asarray(torch.as_tensor(sv).detach().cpu(), dtype=np.float64))
    if s.size == 0:
        raise ValueError("no singular values")
    if not np.isfinite(s).all():
        raise SpectralError("non-finite singular values")
    bottom = float(s[: max(1, math.ceil(fraction * s.size))].mean())
    return float(s[-1]) / bottom if bottom > 0 else math.inf


@dataclass(frozen=True)
class Conditioning:
    """Per-matrix conditioning: ``sigma_max``, ``sigma_min``, ``condition_number``
    (``sigma_max / sigma_min``, ``inf`` if singular), ``gmcn``, and ``mp_spikes``: singular
    values with ``sigma^2 / m`` above ``(1 + delta)`` times the MP edge
    ``sigma_hat^2 (1 + sqrt(n / m))^2``, ``sigma_hat^2 = ||W||_F^2 / (m n)`` (notes §1.8 item 2)."""

    sigma_max: float
    sigma_min: float
    condition_number: float
    gmcn: float
    mp_spikes: int


def mp_spike_threshold(shape: tuple[int, int], frobenius_sq: float, delta: float = 0.05) -> float:
    """Threshold on the eigenvalues of ``W^T W / m`` (``W`` ``(m, n)``, ``m >= n`` after transposing
    a wide matrix) above which an eigenvalue counts as a spike: ``(1 + delta) lambda+``."""
    m, n = max(shape), min(shape)
    sigma2 = frobenius_sq / (m * n)
    return (1 + delta) * sigma2 * (1 + math.sqrt(n / m)) ** 2


def conditioning(weights: torch.Tensor, delta: float = 0.05) -> Conditioning:
    """Conditioning of one weight matrix ``(m, n)`` from its exact singular values; a matrix
    with a NaN/Inf entry has none (:class:`SpectralError`, where LAPACK would fail or answer
    NaN)."""
    if not bool(torch.isfinite(weights).all()):
        raise SpectralError("the weight has NaN/Inf entries: no singular values")
    return conditioning_from_singular_values(
        singular_values(weights), (weights.shape[0], weights.shape[1]), delta
    )


def conditioning_from_singular_values(
    sv: torch.Tensor | FloatArray, shape: tuple[int, int], delta: float = 0.05
) -> Conditioning:
    """:func:`conditioning` from the singular values ``sv`` of a matrix of ``shape``."""
    s = np.asarray(torch.as_tensor(sv).detach().cpu(), dtype=np.float64)
    if s.size == 0:
        raise ValueError("no singular values")
    if not np.isfinite(s).all():
        raise SpectralError("non-finite singular values")
    threshold = mp_spike_threshold(shape, float((s**2).sum()), delta)
    smax, smin = float(s.max()), float(s.min())
    return Conditioning(
        sigma_max=smax,
        sigma_min=smin,
        condition_number=smax / smin if smin > 0 else math.inf,
        gmcn=gmcn(s),
        mp_spikes=int((s**2 / max(shape) > threshold).sum()),
    )


def pc_polynomial(x: torch.Tensor | FloatArray, level: int) -> FloatArray:
    """``p_k(x) = sum_j c_j x^(2j+1)`` elementwise for PC level ``k`` (1..4)."""
    coeffs = PC_COEFFICIENTS.get(level)
    if coeffs is None:
        raise ValueError(f"PC level must be one of {sorted(PC_COEFFICIENTS)}, got {level}")
    x = np.asarray(torch.as_tensor(x).detach().cpu(), dtype=np.float64)
    return sum((c * x ** (2 * j + 1) for j, c in enumerate(coeffs)), np.zeros_like(x))


def pc_precondition(
    weights: torch.Tensor, level: int, sigma_hat: float | None = None
) -> torch.Tensor:
    """``sigma_hat * p_k(W / sigma_hat)`` as the PC layer forms it (Horner in the short-side Gram).

    ``W`` ``(m, n)``; tall: ``Wn h_k(Wn^T Wn)``, wide: ``h_k(Wn Wn^T) Wn`` with
    ``p_k(x) = x h_k(x^2)``, ``Wn = W / sigma_hat``. ``sigma_hat`` defaults to the exact spectral
    norm (the PC layer's warm power iteration approximates it). Computed in float32 or wider;
    returns ``W``'s shape.
    """
    coeffs = PC_COEFFICIENTS.get(level)
    if coeffs is None:
        raise ValueError(f"PC level must be one of {sorted(PC_COEFFICIENTS)}, got {level}")
    if weights.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(weights.shape)}")
    w = weights.to(torch.promote_types(weights.dtype, torch.float32))
    scale = float(torch.linalg.matrix_norm(w, ord=2)) if sigma_hat is None else sigma_hat
    if scale <= 0:
        raise ValueError("sigma_hat must be positive")
    wn = w / scale
    tall = wn.shape[0] >= wn.shape[1]
    gram = wn.mT @ wn if tall else wn @ wn.mT
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    h = coeffs[-1] * eye
    for c in reversed(coeffs[:-1]):
        h = c * eye + gram @ h
    return scale * (wn @ h if tall else h @ wn)


@dataclass(frozen=True)
class PCPreview:
    """GMCN and condition number before and after the PC map of ``level`` (``gmcn_ratio`` =
    after / before; below 1 means the PC layer would improve conditioning)."""

    level: int
    gmcn_before: float
    gmcn_after: float
    gmcn_ratio: float
    condition_before: float
    condition_after: float


def pc_preview(
    sv: torch.Tensor | FloatArray, level: int, sigma_hat: float | None = None
) -> PCPreview:
    """What a PC layer of ``level`` would do to a matrix with singular values ``sv``.

    Maps ``sigma_i -> sigma_hat * |p_k(sigma_i / sigma_hat)|`` (``sigma_hat`` defaults to
    ``max(sv)``) at no extra SVD cost; equals the singular values of :func:`pc_precondition`.
    """
    s = np.asarray(torch.as_tensor(sv).detach().cpu(), dtype=np.float64)
    scale = float(s.max()) if sigma_hat is None else sigma_hat
    after = scale * np.abs(pc_polynomial(s / scale, level))
    before_g, after_g = gmcn(s), gmcn(after)
    smin_b, smin_a = float(s.min()), float(after.min())
    return PCPreview(
        level=level,
        gmcn_before=before_g,
        gmcn_after=after_g,
        gmcn_ratio=after_g / before_g if math.isfinite(before_g) else math.nan,
        condition_before=float(s.max()) / smin_b if smin_b > 0 else math.inf,
        condition_after=float(after.max()) / smin_a if smin_a > 0 else math.inf,
    )


def conditioning_metrics(sv: torch.Tensor, shape: tuple[int, int]) -> dict[str, float]:
    """Every conditioning metric of one weight, keyed by its dotted name, from its singular values
    ``sv`` ``(min(m, n),)`` and ``shape`` ``(m, n)``: sigma_max/min, condition number, GMCN, MP
    spikes and the PC-layer GMCN previews (what the worker and ``spectrawatch analyze`` report)."""
    cond = conditioning_from_singular_values(sv, shape)
    values = {
        SIGMA_MAX: cond.sigma_max,
        SIGMA_MIN: cond.sigma_min,
        CONDITION_NUMBER: cond.condition_number,
        GMCN: cond.gmcn,
        MP_SPIKES: float(cond.mp_spikes),
    }
    if cond.sigma_max > 0:
        for level, (gmcn_key, ratio_key) in PC_PREVIEW_KEYS.items():
            preview = pc_preview(sv, level)
            values[gmcn_key] = preview.gmcn_after
            values[ratio_key] = preview.gmcn_ratio
    return values
