"""Polar Express: matmul-only polar factor / matrix sign, eigenvalue counting, Muon-update audit.

Polar Express (Amsel, Persson, Musco & Gower, arXiv 2505.16932, Algorithm 1) applies a
composition of odd quintics ``p_t(x) = a_t x + b_t x^3 + c_t x^5`` whose coefficients are chosen
greedily (minimax, §4.1-4.2) so that every singular value in ``[l, 1]`` (``l = 1e-3``) is driven to
1 as fast as possible. Each step costs three GEMMs: ``A = X X^T``, ``B = b A + c A A``,
``X = a X + B X``. For a symmetric matrix the polar factor is the matrix sign function.

Uses here:

* :func:`polar_express` - polar factor ``U V^T`` of ``M = U S V^T`` and its orthogonality error.
* :func:`count_above` - eigenvalue count ``N(> t) = (n + tr sign(A - tI)) / 2`` of a symmetric
  matrix (trace of the spectral projector; Di Napoli, Polizzi & Saad), with an ambiguity flag;
  :func:`count_singular_values_above` for singular values of a rectangular matrix.
* :func:`muon_audit` - how far an optimizer update is from a scaled orthogonal matrix (what Muon's
  Newton-Schulz step aims to produce).

Finite-precision handling follows the paper §4.4 / App. G: the per-step safety factor 1.01 on
every step but the last row, input divided by ``1.01 * norm + 1e-7``, the shift and the scale done
in fp32 before any bf16 cast, and for bf16 counting a trace divided by ``mu = ||X||_F / sqrt(n)``
after ``refine_steps`` fp32 Newton-Schulz quintic steps (``research/matrix_methods.md`` §1.7).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

POLAR_ORTHOGONALITY_ERROR = "polar.orthogonality_error"
POLAR_MP_SPIKES = "polar.mp_spikes"
POLAR_MP_SPIKES_AMBIGUITY = "polar.mp_spikes_ambiguity"
MUON_POLAR_DISTANCE = "muon.polar_distance"
MUON_SCALE = "muon.scale"

# Table A of research/matrix_methods.md §1.4: `optimal_composition(l=1e-3, num_iters=10,
# cushion=0.02407...)` of NoahAmsel/PolarExpress `basic.py` (the paper's Algorithm 1 list), before
# the safety factor. Steps beyond the table repeat the last row, the Newton-Schulz quintic
# (15/8, -10/8, 3/8) whose fixed point is 1.
POLAR_EXPRESS_RAW: tuple[tuple[float, float, float], ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
NEWTON_SCHULZ_QUINTIC = (1.875, -1.25, 0.375)
SAFETY = 1.01
NORM_EPS = 1e-7


def polar_express_coefficients(steps: int) -> list[tuple[float, float, float]]:
    """The applied per-step ``(a, b, c)`` for ``steps`` iterations (paper Algorithm 1).

    Rows 1-7 are ``p_t(x / 1.01)``, i.e. ``(a / 1.01, b / 1.01^3, c / 1.01^5)``, so round-off cannot
    push a singular value above the design interval (§4.4); row 8 and later are the unscaled
    Newton-Schulz quintic, whose limit is exactly 1.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    table = [(a / SAFETY, b / SAFETY**3, c / SAFETY**5) for a, b, c in POLAR_EXPRESS_RAW[:-1]] + [
        POLAR_EXPRESS_RAW[-1]
    ]
    return (table + [NEWTON_SCHULZ_QUINTIC] * max(0, steps - len(table)))[:steps]


def _iterate(x: torch.Tensor, coeffs: Sequence[tuple[float, float, float]]) -> torch.Tensor:
    """Apply the odd quintics to a wide ``(..., m, n)`` (m <= n) ``x``: 3 GEMMs per step."""
    for a, b, c in coeffs:
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    return x


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float64, torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be float64, float32 or bfloat16, got {dtype}")


def _unit_scaled(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``x / c`` and ``c``: the power of two nearest above ``max |x|`` (exact in binary floating
    point, so results in ordinary ranges do not change), or 1 for a zero matrix; keeps the
    Frobenius norms and Grams of huge (or tiny) inputs in range. ``ValueError`` if not finite."""
    peak = float(x.abs().amax()) if x.numel() else 0.0
    if not math.isfinite(peak):
        raise ValueError("matrix is not finite (NaN/Inf entries)")
    if peak == 0.0:
        return x, 1.0
    scale = math.ldexp(1.0, math.frexp(peak)[1])
    return x / scale, scale


def orthogonality_error(q: torch.Tensor) -> float:
    """``||Q Q^T - I||_F / sqrt(k)`` for ``q`` ``(m, n)``, on its short side ``k = min(m, n)``.

    The RMS deviation of ``Q``'s squared singular values from 1 (zero iff ``Q`` has orthonormal
    rows or columns); one GEMM, computed in float32 or wider.
    """
    if q.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(q.shape)}")
    x = q.mT if q.shape[0] > q.shape[1] else q
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    k = x.shape[0]
    eye = torch.eye(k, dtype=x.dtype, device=x.device)
    return float(torch.linalg.matrix_norm(x @ x.mT - eye) / math.sqrt(k))


@dataclass(frozen=True)
class PolarFactor:
    """Approximate polar factor ``factor`` (same shape as the input, float32 or float64).

    ``orthogonality_error`` is :func:`orthogonality_error` of ``factor``; it is only small when
    the input has full rank and its smallest singular value is within the design range
    (``sigma_min / (1.01 ||M||_F) >~ 1e-3`` for the table's 8 steps; more steps reach further).
    """

    factor: torch.Tensor
    orthogonality_error: float
    steps: int
    dtype: torch.dtype


def polar_express(
    matrix: torch.Tensor,
    steps: int = 8,
    dtype: torch.dtype = torch.float32,
    refine_steps: int | None = None,
) -> PolarFactor:
    """Polar factor ``U V^T`` of ``matrix`` ``(m, n)`` by Polar Express (arXiv 2505.16932, Alg. 1).

    The GEMMs run in ``dtype`` (``torch.bfloat16`` for the tensor-core path); the Frobenius
    normalisation is done in fp32 before the cast. ``refine_steps`` fp32 Newton-Schulz quintic
    steps follow a bf16 run (default 2 for bf16, 0 otherwise) to lift the bf16 floor (~2^-8).
    """
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    _check_dtype(dtype)
    if refine_steps is None:
        refine_steps = 2 if dtype == torch.bfloat16 else 0
    work = torch.promote_types(dtype, torch.float32)
    tall = matrix.shape[0] > matrix.shape[1]
    x, _ = _unit_scaled((matrix.mT if tall else matrix).to(work))  # polar(cA) = polar(A)
    x = x / (SAFETY * torch.linalg.matrix_norm(x) + NORM_EPS)
    x = _iterate(x.to(dtype), polar_express_coefficients(steps)).to(work)
    x = _iterate(x, [NEWTON_SCHULZ_QUINTIC] * refine_steps)
    factor = x.mT if tall else x
    return PolarFactor(factor, orthogonality_error(factor), steps + refine_steps, dtype)


def schatten8_norm(sym: torch.Tensor) -> torch.Tensor:
    """``(tr S^8)^(1/8) = ||S^4||_F^(1/4)`` of a symmetric ``(n, n)`` matrix (2 GEMMs): an upper
    bound on ``||S||_2`` at most ``n^(1/8)`` too large. For ``S = W^T W`` this is the
    `modified_F` norm ``||(W^T W)^2||_F^(1/4)`` of PC-Layer-torchtitan applied to ``W``; note that
    ``||S^2||_F^(1/4)`` (as written in research/matrix_methods.md §1.7) is only ``(tr S^4)^(1/8)``,
    which can be smaller than ``||S||_2``.

    ``S`` is divided by its largest entry first: ``S^4`` of a float32 Gram with entries ~1e5
    would otherwise overflow the squares of its Frobenius norm to inf (and the count to n/2).
    """
    scale = sym.abs().amax().clamp_min(torch.finfo(sym.dtype).tiny)
    unit = sym / scale
    square = unit @ unit
    norm: torch.Tensor = torch.linalg.matrix_norm(square @ square)
    return scale * norm.sqrt().sqrt()


def shifted_sign(
    sym: torch.Tensor, threshold: float, steps: int, dtype: torch.dtype, refine_steps: int
) -> torch.Tensor:
    """``sign(A - tI)`` ``(n, n)`` of a symmetric ``sym`` by Polar Express, in float32 or wider.

    The shift and the Schatten-8 scale are done in float32/float64 before any bf16 cast
    (``research/matrix_methods.md`` §1.7); ``refine_steps`` fp32 Newton-Schulz steps follow.
    """
    if sym.ndim != 2 or sym.shape[0] != sym.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(sym.shape)}")
    _check_dtype(dtype)
    n = sym.shape[0]
    work = torch.promote_types(torch.promote_types(sym.dtype, dtype), torch.float32)
    shifted = sym.to(work)
    shifted = (shifted + shifted.mT) / 2 - threshold * torch.eye(n, dtype=work, device=sym.device)
    x = shifted / (SAFETY * schatten8_norm(shifted) + NORM_EPS)
    x = _iterate(x.to(dtype), polar_express_coefficients(steps)).to(work)
    return _iterate(x, [NEWTON_SCHULZ_QUINTIC] * refine_steps)


def spectral_projector(
    sym: torch.Tensor, threshold: float, steps: int = 16, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Projector ``(I + sign(A - tI)) / 2`` ``(n, n)`` onto the eigenvectors of a symmetric
    ``sym`` with eigenvalue above ``threshold``, GEMM-only (research notes §1.8 item 4); its trace
    is the count of :func:`count_above`. bf16 runs get one fp32 refinement step."""
    refine = 1 if dtype == torch.bfloat16 else 0
    x = shifted_sign(sym, threshold, steps, dtype, refine)
    eye = torch.eye(sym.shape[0], dtype=x.dtype, device=x.device)
    return (eye + x) / 2


@dataclass(frozen=True)
class EigenCount:
    """Eigenvalue count above a threshold from ``(n + tr sign(A - tI)) / 2``.

    ``estimate`` is the (soft) trace value, ``count`` its nearest integer and ``ambiguity`` the
    distance between them: it stays near 0 when no eigenvalue lies within about
    ``l * s8`` of ``t`` (``l`` the smallest relative gap the steps resolve, ``s8`` the Schatten-8
    norm of ``A - tI``) and grows toward 0.5 when some do.
    """

    estimate: float
    count: int
    ambiguity: float
    threshold: float
    steps: int


def count_above(
    sym: torch.Tensor,
    threshold: float,
    steps: int = 16,
    dtype: torch.dtype = torch.float32,
    refine_steps: int | None = None,
) -> EigenCount:
    """Number of eigenvalues of a symmetric ``sym`` ``(n, n)`` above ``threshold`` (same units).

    ``sign(A - tI)`` by Polar Express with the Schatten-8 normalisation (tighter than Frobenius,
    so the effective ``l`` is larger: ``research/matrix_methods.md`` §1.7); the shift and the
    scale are done in float64/float32 before a bf16 cast. The default 16 steps resolve eigenvalues
    down to ~1e-5 of the scale from ``t``. bf16 runs are followed by ``refine_steps`` (default 1)
    fp32 Newton-Schulz quintic steps and the trace is divided by ``mu = ||X||_F / sqrt(n)``, which
    removes the systematic ~1e-3 shrinkage of bf16's converged values (§1.7, measured there).
    """
    if refine_steps is None:
        refine_steps = 1 if dtype == torch.bfloat16 else 0
    x = shifted_sign(sym, threshold, steps, dtype, refine_steps)
    n = sym.shape[0]
    trace = torch.diagonal(x).sum()
    if dtype == torch.bfloat16:
        mu = torch.linalg.matrix_norm(x) / math.sqrt(n)
        trace = trace / mu
    estimate = float((n + trace) / 2)
    count = round(estimate)
    return EigenCount(
        estimate, count, abs(estimate - count), float(threshold), steps + refine_steps
    )


def count_singular_values_above(
    matrix: torch.Tensor, threshold: float, steps: int = 16, dtype: torch.dtype = torch.float32
) -> EigenCount:
    """Number of singular values of ``matrix`` ``(m, n)`` above ``threshold`` (``> 0``).

    Counts eigenvalues of the short-side Gram (``min(m, n)`` square) above ``threshold^2``; the
    returned ``threshold`` is the squared one.
    """
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    if threshold <= 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    work = torch.promote_types(matrix.dtype, torch.float32)
    x, scale = _unit_scaled(matrix.to(work))  # sigma(A / c) > t / c: the same count
    gram = x.mT @ x if x.shape[0] >= x.shape[1] else x @ x.mT
    count = count_above(gram, (threshold / scale) ** 2, steps=steps, dtype=dtype)
    return replace(count, threshold=threshold * threshold)


def exact_count_above(sym: torch.Tensor, threshold: float) -> int:
    """Reference count: eigenvalues of symmetric ``sym`` above ``threshold`` by LAPACK/cuSOLVER
    ``eigvalsh`` in float64."""
    eig = torch.linalg.eigvalsh(sym.to(torch.float64))
    return int((eig > threshold).sum())


@dataclass(frozen=True)
class MuonAudit:
    """Distance of an update ``U`` from the nearest scaled orthogonal matrix.

    ``polar_distance = min_s ||U - s P||_F / ||U||_F`` with ``P = polar(U)`` from Polar Express and
    ``scale`` the minimising ``s``. With exact ``P`` this equals
    ``sqrt(var(sigma) / mean(sigma^2))`` over the ``min(m, n)`` singular values of ``U``: 0 for an
    exactly orthogonalised (Muon) update,
    ~0.1-0.2 for Muon's 5-step Newton-Schulz variants (singular values left in ~[0.7, 1.1], research
    notes §1.8), and ~0.5 for an Adam-like update of a Gaussian-like gradient.
    """

    polar_distance: float
    scale: float
    orthogonality_error: float


def muon_audit(
    update: torch.Tensor, steps: int = 12, dtype: torch.dtype = torch.float32
) -> MuonAudit:
    """Audit one 2-D update matrix ``(m, n)`` (research notes §1.8 item 5)."""
    if update.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(update.shape)}")
    work = torch.promote_types(update.dtype, torch.float32)
    try:
        u, unit = _unit_scaled(update.to(work))  # the distance is scale-free; the scale is not
    except ValueError:
        raise ValueError("update must be finite and non-zero") from None
    norm = torch.linalg.matrix_norm(u)
    if float(norm) == 0.0:
        raise ValueError("update must be finite and non-zero")
    polar = polar_express(u, steps=steps, dtype=dtype)
    p = polar.factor.to(work)
    scale = (p * u).sum() / (p * p).sum()
    distance = torch.linalg.matrix_norm(u - scale * p) / norm
    return MuonAudit(float(distance), float(scale) * unit, polar.orthogonality_error)
