"""Heavy-tailed self-regularisation (HT-SR) metrics of weight matrices, WeightWatcher-compatible.

The empirical spectral density (ESD) of a weight matrix ``W`` (``N x M``, ``N >= M``) is the set of
eigenvalues of ``W^T W``, i.e. the squared singular values, **without** a ``1/N`` factor
(WeightWatcher >= 0.6.5 convention). Heavy-tailed self-regularisation (Martin & Mahoney,
"Implicit self-regularization in deep neural networks", JMLR 22(165), 2021, §5; Martin, Peng &
Mahoney, "Predicting trends in the quality of state-of-the-art neural networks without access to
training or testing data", Nat. Commun. 12:4122, 2021, §"Methods") reads training quality from
the power-law exponent ``alpha`` of the ESD tail: 2 <= alpha <= 6 for well-trained layers,
alpha < 2 "over-trained", alpha > 6 "under-trained" (WeightWatcher ``constants.py``).

Definitions follow WeightWatcher 0.7.7 (``weightwatcher.py``: ``combined_eigenvalues``,
``fit_powerlaw``, ``apply_norm_metrics``, ``mp_fit``; ``WW_powerlaw.WWFit``; ``RMT_Util``); each
function below names the one it reproduces. Everything is torch on any device; fits run in
float64; the power-law fit scores every xmin candidate with tensor ops (no loop over candidates).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
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
from spectrawatch.spectral.farms import FarmsConfig, applies, sample_windows, window_views

# --- metric keys (dotted, defined once) -------------------------------------------------------
ALPHA = "htsr.alpha"
ALPHA_WEIGHTED = "htsr.alpha_weighted"
ALPHA_HILL = "htsr.alpha_hill"
XMIN = "htsr.xmin"
KS_DISTANCE = "htsr.ks_distance"
NUM_PL_SPIKES = "htsr.num_pl_spikes"
LAMBDA_MAX = "htsr.lambda_max"
LOG_SPECTRAL_NORM = "htsr.log_spectral_norm"
LOG_NORM = "htsr.log_norm"
LOG_ALPHA_NORM = "htsr.log_alpha_norm"
STABLE_RANK = "htsr.stable_rank"
MP_SOFTRANK = "htsr.mp_softrank"
NUM_SPIKES = "htsr.num_spikes"
ENTROPY = "htsr.entropy"
UNDER_TRAINED = "htsr.under_trained"  # 1.0 when alpha > 6, else 0.0
OVER_TRAINED = "htsr.over_trained"  # 1.0 when alpha < 2, else 0.0
NUM_UNDER_TRAINED = "htsr.num_under_trained"  # model level
NUM_OVER_TRAINED = "htsr.num_over_trained"  # model level
NUM_LAYERS = "htsr.num_layers"  # model level
# correlation traps (WeightWatcher's ``randomize=True``): the ESD of the element-shuffled weight
NUM_TRAPS = "htsr.num_traps"  # spikes of the shuffled ESD above its fitted MP edge
RAND_LAMBDA_MAX = "htsr.rand_lambda_max"  # largest eigenvalue of the shuffled ESD
RAND_SOFTRANK = "htsr.rand_softrank"  # rand_lambda_max / lambda_max (WW's ww_softrank)
RAND_DISTANCE = "htsr.rand_distance"  # Jensen-Shannon distance between the ESD and the shuffled
NUM_TRAPPED_LAYERS = "htsr.num_trapped_layers"  # model level: layers with num_traps > 0

# relative eigenvalue spread under which an ESD has no tail to fit: an orthogonal float32 matrix
# (every eigenvalue 1 up to round-off) got alpha ~ 1e6 under 1e-6
FLAT_SPREAD = 1e-4
FARMS_PREFIX = "farms."  # FARMS values use the same names with this prefix: "farms.alpha", ...

#: Per-ESD metric keys, in the order they are reported.
LAYER_KEYS: tuple[str, ...] = (
    ALPHA,
    ALPHA_WEIGHTED,
    ALPHA_HILL,
    XMIN,
    KS_DISTANCE,
    NUM_PL_SPIKES,
    LAMBDA_MAX,
    LOG_SPECTRAL_NORM,
    LOG_NORM,
    LOG_ALPHA_NORM,
    STABLE_RANK,
    MP_SOFTRANK,
    NUM_SPIKES,
    ENTROPY,
    UNDER_TRAINED,
    OVER_TRAINED,
)
#: Correlation-trap keys, present when the traps were computed (not on the FARMS ESD).
TRAP_KEYS: tuple[str, ...] = (NUM_TRAPS, RAND_LAMBDA_MAX, RAND_SOFTRANK, RAND_DISTANCE)


def farms_key(key: str) -> str:
    """The FARMS twin of an HT-SR key: ``"htsr.alpha"`` -> ``"farms.alpha"``."""
    return FARMS_PREFIX + key.split(".", 1)[1]


# --- WeightWatcher constants (weightwatcher/constants.py, 0.7.7) -------------------------------
EVALS_THRESH = 1e-5  # eigenvalues at or below are dropped before the power-law fit
OVER_TRAINED_THRESH = 2.0
UNDER_TRAINED_THRESH = 6.0
MIN_EVALS = 8  # layers with fewer eigenvalues (M * rf) are skipped
MAX_EVALS = 15000  # ... or more
MAX_N = 50000  # ... or a larger dimension above this (e.g. GPT-2's 50257 x 768 token embedding)
SMALL_N = 20  # below this many fitted eigenvalues WWFit switches to its small-n estimator
TRAP_REPLICAS_BELOW = 100  # layers with M below this pool 5 shuffles (apply_random_esd)
TRAP_SMALL_REPLICAS = 5
CONV2D_SCALE = math.sqrt(0.5)  # pooled Conv2d slices are scaled by sqrt(conv2d_count / 2)
OVER_TRAINED_WARNING = "over-trained"
UNDER_TRAINED_WARNING = "under-trained"

_DIRECT_KS_MAX_N = 256  # exact O(n^2) KS up to this; bound-pruned exact search above
_KS_CHUNK_ELEMENTS = 1 << 22  # candidates x points per chunk of the direct KS
_EIG_CHUNK_BYTES = 1 << 27  # at most ~128 MB of stacked float64 matrices per batched call
_SVD_CHUNK_BYTES = 1 << 24  # ... and 16 MB per batched SVD of mid-sized CUDA matrices
_SVD_LARGE_CHUNK_BYTES = 1 << 28  # ... and 256 MB of matrices wider than HOST_MAX (a GPT-2
# shape's whole stack: 4 such calls on 4 streams peaked at 4.4 GiB on an H200)
_F64 = torch.float64


class SpectralError(ValueError):
    """An ESD that cannot be analysed (too few positive eigenvalues, non-finite weights...)."""


# --- results ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PowerLawFit:
    """Continuous power law ``p(x) ~ x^-alpha`` for ``x >= xmin`` (Clauset, Shalizi & Newman,
    "Power-law distributions in empirical data", SIAM Rev. 51(4), 2009, §3.1 MLE and §3.3 KS
    choice of xmin), as ``WW_powerlaw.WWFit``.

    ``ks_distance`` is the KS distance D at the chosen xmin, ``sigma = (alpha - 1) / sqrt(n_tail)``
    the MLE standard error, ``num_tail`` the number of eigenvalues ``>= xmin`` (WeightWatcher's
    ``num_pl_spikes``), ``num_fitted`` the eigenvalues above the 1e-5 threshold, ``xmax`` the
    largest eigenvalue (no truncation).
    """

    alpha: float
    xmin: float
    xmax: float
    ks_distance: float
    sigma: float
    num_tail: int
    num_fitted: int


@dataclass(frozen=True)
class MarchenkoPasturFit:
    """Marchenko-Pastur bulk fitted to a rescaled ESD, as WeightWatcher's ``mp_fit``.

    The ESD is rescaled by ``w_scale**2`` (mean eigenvalue 1). ``sigma`` is the fitted MP scale,
    ``bulk_max``/``bulk_min`` the MP edges ``(sigma (1 +- 1/sqrt(Q)))^2`` (rescaled units),
    ``num_spikes`` the eigenvalues above ``bulk_max + sqrt(TW)`` with the Tracy-Widom pad
    ``TW = Q^-1/2 bulk_max^(2/3) M^(-2/3)``, ``softrank = bulk_max / lambda_max`` (Martin &
    Mahoney JMLR 2021 §4.2 "MP soft rank").
    """

    sigma: float
    w_scale: float
    bulk_max: float
    bulk_min: float
    num_spikes: int
    softrank: float
    q: float


@dataclass(frozen=True)
class SpectralMetrics:
    """All HT-SR metrics of one ESD (``apply_norm_metrics`` + ``fit_powerlaw`` + ``mp_fit``).

    Norm-type values use every eigenvalue: ``log_norm = log10 sum(lambda)`` (squared Frobenius
    norm), ``log_spectral_norm = log10 lambda_max``, ``stable_rank = sum / max``,
    ``log_alpha_norm = log10 sum(lambda^alpha)``, ``alpha_weighted = alpha * log10 lambda_max``,
    ``entropy`` = Shannon entropy of ``lambda / sum`` over ``ln(numerical rank)``.
    ``alpha_hill`` is the Hill estimator with xmin at the median eigenvalue (the ``xmin_mid``
    fit of TempBalance / FARMS). ``n_rows``/``n_cols`` are N >= M of the matrices behind the ESD.
    """

    num_evals: int
    n_rows: int
    n_cols: int
    lambda_max: float
    log_norm: float
    log_spectral_norm: float
    stable_rank: float
    matrix_rank: int
    entropy: float
    fit: PowerLawFit
    alpha_hill: float
    alpha_weighted: float
    log_alpha_norm: float
    mp: MarchenkoPasturFit | None

    @property
    def alpha(self) -> float:
        return self.fit.alpha

    @property
    def warning(self) -> str:
        """``"over-trained"`` (alpha < 2), ``"under-trained"`` (alpha > 6) or ``""``."""
        return training_warning(self.fit.alpha)

    def values(self) -> dict[str, float]:
        """The metrics as ``{htsr key: value}`` (MP keys absent when no MP fit was made)."""
        out = {
            ALPHA: self.fit.alpha,
            ALPHA_WEIGHTED: self.alpha_weighted,
            ALPHA_HILL: self.alpha_hill,
            XMIN: self.fit.xmin,
            KS_DISTANCE: self.fit.ks_distance,
            NUM_PL_SPIKES: float(self.fit.num_tail),
            LAMBDA_MAX: self.lambda_max,
            LOG_SPECTRAL_NORM: self.log_spectral_norm,
            LOG_NORM: self.log_norm,
            LOG_ALPHA_NORM: self.log_alpha_norm,
            STABLE_RANK: self.stable_rank,
            ENTROPY: self.entropy,
            UNDER_TRAINED: float(self.fit.alpha > UNDER_TRAINED_THRESH),
            OVER_TRAINED: float(self.fit.alpha < OVER_TRAINED_THRESH),
        }
        if self.mp is not None:
            out[MP_SOFTRANK] = self.mp.softrank
            out[NUM_SPIKES] = float(self.mp.num_spikes)
        return out


def training_warning(alpha: float) -> str:
    """WeightWatcher's per-layer warning for a power-law exponent."""
    if alpha < OVER_TRAINED_THRESH:
        return OVER_TRAINED_WARNING
    if alpha > UNDER_TRAINED_THRESH:
        return UNDER_TRAINED_WARNING
    return ""


# --- weight matrices and ESDs -----------------------------------------------------------------
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


# --- power-law fit ----------------------------------------------------------------------------
def fit_power_law(evals: torch.Tensor, *, thresh: float = EVALS_THRESH) -> PowerLawFit:
    """Clauset-style power-law fit of an ESD, reproducing WeightWatcher's ``WWFit``.

    Data ``x`` = sorted eigenvalues ``> thresh`` (float64). Every value but the largest is an
    xmin candidate (duplicates kept). For candidate ``i`` with ``n_i = n - i`` tail points,
    ``alpha_i = 1 + n_i / sum_{j>=i} ln(x_j / x_i)`` and
    ``D_i = max_{j>=i} |1 - (x_j/x_i)^(1-alpha_i) - (j-i)/n_i|`` (``D_i = 1`` if alpha_i <= 1);
    the fit is the first ``argmin D``. All candidates are scored at once: suffix sums give every
    ``alpha_i``; D is exact, by chunked ``(candidates, points)`` tensors for n <= 256 and by a
    bound-and-prune search above 256 points (same answer, see :func:`_ks_distances_pruned`).
    With fewer than 20 points WWFit's small-n variant is used (bias-corrected
    ``alpha = 1 + (n_i - 1) / sum ln``, tails of >= 8 points).
    """
    x = torch.sort(evals.detach().to(_F64).flatten()).values
    x = x[x > thresh]
    n = int(x.numel())
    if n < 2:
        raise SpectralError(f"need at least 2 eigenvalues above {thresh}, got {n}")
    logx = torch.log(x)
    suffix = torch.flip(torch.cumsum(torch.flip(logx, (0,)), 0), (0,))  # sum_{j>=i} ln x_j
    idx = torch.arange(n - 1, device=x.device)
    n_i = (n - idx).to(_F64)
    log_sum = suffix[:-1] - n_i * logx[:-1]  # sum_{j>=i} ln(x_j / x_i)
    if n < SMALL_N:
        return _fit_small_n(x, logx, n_i, log_sum)
    alphas = 1.0 + n_i / log_sum
    if n <= _DIRECT_KS_MAX_N:
        ks = _ks_distances(logx, alphas, idx)
    else:
        ks = _ks_distances_pruned(logx, alphas)
    best = int(torch.argmin(ks))
    alpha = float(alphas[best])
    return PowerLawFit(
        alpha=alpha,
        xmin=float(x[best]),
        xmax=float(x[-1]),
        ks_distance=float(ks[best]),
        sigma=(alpha - 1.0) / math.sqrt(n - best),
        num_tail=int((x >= x[best]).sum()),
        num_fitted=n,
    )


def _ks_rows(logx: torch.Tensor, alphas: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Exact KS distance of candidates ``cand`` (indices into ``logx``): ``(len(cand),)``."""
    n = logx.numel()
    j = torch.arange(n, device=logx.device)
    a = alphas[cand].unsqueeze(1)
    ci = cand.unsqueeze(1)
    theory = _model_cdf(a, logx.unsqueeze(0) - logx[ci])
    empirical = (j.unsqueeze(0) - ci).to(_F64) / (n - ci).to(_F64)
    diff = torch.where(j.unsqueeze(0) >= ci, (theory - empirical).abs(), 0.0)
    d = torch.nan_to_num(diff.amax(dim=1), nan=1.0)
    return torch.where(alphas[cand] > 1.0, d, torch.ones_like(d))


def _model_cdf(alpha: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """Power-law CDF ``1 - (x/xmin)^(1-alpha)`` from ``ln(x/xmin)``; exactly 0 at ``x = xmin``
    even for an infinite alpha (ties at the top of the ESD), as numpy's ``1 ** -inf = 1``."""
    expo = torch.where(log_ratio == 0.0, 0.0, (1.0 - alpha) * log_ratio)
    return 1.0 - torch.exp(expo)


def _ks_distances(logx: torch.Tensor, alphas: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Exact KS distance of every candidate, in chunks of ~4M ``(candidate, point)`` pairs."""
    n = logx.numel()
    chunk = max(1, _KS_CHUNK_ELEMENTS // n)
    parts = [_ks_rows(logx, alphas, idx[s : s + chunk]) for s in range(0, idx.numel(), chunk)]
    return torch.cat(parts)


def _ks_distances_pruned(
    logx: torch.Tensor, alphas: torch.Tensor, levels: Iterable[int] = (4, 32, 256, 1024)
) -> torch.Tensor:
    """KS distances where only candidates that can still be the minimum are computed exactly.

    For candidate ``i`` the model CDF ``F`` and the empirical step ``E = (j-i)/n_i`` are both
    non-decreasing in ``j``. Sampling ``G + 1`` points evenly over the tail ``j = i..n-1``,
    ``|F - E|`` at the samples is a lower bound on ``D_i``, and ``max(F(b) - E(a), E(b) - F(a))``
    over consecutive samples ``a < b`` an upper bound (slack ~2/G). A candidate whose lower
    bound exceeds the smallest upper bound cannot be the (first) minimiser and is dropped; G
    grows per level and the survivors get exact distances. The smallest upper bound is tightened
    by the exact distance of the candidate that has it (one row of ``n`` points per level): any
    exact distance is at least the minimum. Dropped candidates get ``+inf``; the argmin, ties
    included, is that of the full computation. With that exact limit even G = 4 prunes all but
    a few hundred of ~8,000 FARMS candidates: levels (4, 32, 256, 1024) fit a FARMS ESD in
    4.2-4.6 ms, (16, 64, 256, 1024) in 5.3-5.6 ms (one core, same fits).
    """
    n = logx.numel()
    dev = logx.device
    cand = torch.nonzero(alphas > 1.0).flatten()
    if cand.numel() == 0:
        return torch.ones(n - 1, dtype=_F64, device=dev)
    for g in levels:
        if 4 * (g + 1) >= n:
            break  # bounds cost about as much as the exact pass
        chunk = max(1, _KS_CHUNK_ELEMENTS // (g + 1))
        bounds = [
            _ks_bounds(logx, alphas, cand[s : s + chunk], g) for s in range(0, cand.numel(), chunk)
        ]
        lower = torch.cat([lo for lo, _ in bounds])
        upper = torch.cat([up for _, up in bounds])
        seed = cand[int(torch.argmin(upper))].reshape(1)
        limit = torch.minimum(upper.min(), _ks_rows(logx, alphas, seed)[0])
        cand = cand[lower <= limit + 1e-12]
    ks = torch.full((n - 1,), math.inf, dtype=_F64, device=dev)
    ks[cand] = _ks_distances(logx, alphas, cand)
    return ks


def _ks_bounds(
    logx: torch.Tensor, alphas: torch.Tensor, cand: torch.Tensor, g: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds on the KS distance of ``cand`` from ``g + 1`` tail samples each."""
    n = logx.numel()
    ci = cand.unsqueeze(1)
    n_i = n - ci  # tail sizes (c, 1)
    k = torch.arange(g + 1, device=logx.device).unsqueeze(0)
    # 0 .. n_i - 1, non-decreasing: floor(k (n_i - 1) / g), exact in float64 (and faster on a
    # CPU than int64 floor division)
    offset = torch.floor((k * (n_i - 1)).to(_F64) / g).long()
    theory = _model_cdf(alphas[cand].unsqueeze(1), logx[ci + offset] - logx[ci])
    empirical = offset.to(_F64) / n_i.to(_F64)
    lower = (theory - empirical).abs().amax(dim=1)
    block = torch.maximum(theory[:, 1:] - empirical[:, :-1], empirical[:, 1:] - theory[:, :-1])
    return lower, block.amax(dim=1)


def _fit_small_n(
    x: torch.Tensor, logx: torch.Tensor, n_i: torch.Tensor, log_sum: torch.Tensor
) -> PowerLawFit:
    """WWFit's ``fit_powerlaw_smallN`` (n < 20), vectorised over candidates.

    Candidates with tails of >= 8 points get the bias-corrected ``alpha = 1 + (n_i - 1) / s``;
    the others keep ``D = 1``. WWFit ranks candidates by ``D - 0.868 / sqrt(n_i)`` internally,
    but its constructor then re-selects by ``argmin D``, which is what it reports; so do we.
    """
    n = x.numel()
    idx = torch.arange(n - 1, device=x.device)
    usable = (n_i >= 8) & (log_sum > 1e-12)
    alphas = torch.where(usable, 1.0 + (n_i - 1.0) / log_sum, torch.zeros_like(n_i))
    ks = torch.where(usable, _ks_distances(logx, alphas, idx), torch.ones_like(alphas))
    if not bool((usable & (alphas > 1.0)).any()) and float(log_sum[0]) > 1e-12:
        alphas[0] = 1.0 + (n - 1.0) / log_sum[0]  # WWFit's fallback: the whole sample as tail
        ks[0] = _ks_rows(logx, alphas, idx[:1])[0]
    best = int(torch.argmin(ks))
    alpha = float(alphas[best])
    return PowerLawFit(
        alpha=alpha,
        xmin=float(x[best]),
        xmax=float(x[-1]),
        ks_distance=float(ks[best]),
        sigma=(alpha - 1.0) / math.sqrt(n - best),
        num_tail=n - best,
        num_fitted=n,
    )


def hill_alpha(evals: torch.Tensor, *, thresh: float = EVALS_THRESH) -> float:
    """Hill estimator with xmin at the median eigenvalue (TempBalance / FARMS ``xmin_mid``).

    With ``x`` sorted ascending (``> thresh``), ``i = n // 2``, ``k = n - i``:
    ``alpha = 1 + k / sum_{j>=i} ln(x_j / x_i)`` (Hill, Ann. Stat. 3(5), 1975; as used by
    Zhou et al., "Temperature balancing, layer-wise weight analysis...", NeurIPS 2023, and by
    FARMS, ICML 2025, for image classification).
    """
    x = torch.sort(evals.detach().to(_F64).flatten()).values
    x = x[x > thresh]
    n = int(x.numel())
    if n < 2:
        raise SpectralError(f"need at least 2 eigenvalues above {thresh}, got {n}")
    i = n // 2
    tail = torch.log(x[i:])
    denom = float(tail.sum() - (n - i) * tail[0])
    return math.inf if denom <= 0.0 else 1.0 + (n - i) / denom


# --- Marchenko-Pastur fit ---------------------------------------------------------------------
_MP_BANDWIDTH = 0.1
_MP_GRID = 1000
_MP_DENSITY_FLOOR = 0.01
_MP_PENALTY = 1000.0


def linear_kde(samples: torch.Tensor, points: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Linear-kernel density estimate at ``points`` (as sklearn ``KernelDensity(kernel="linear")``).

    ``f(g) = 1/(n h) sum_i max(0, 1 - |g - x_i| / h)``, computed exactly in O((n + G) log n) from
    prefix sums of the sorted samples instead of an ``(n, G)`` kernel matrix (on the host).
    """
    x = samples.detach().to(device="cpu", dtype=_F64).flatten().numpy()
    g = points.detach().to(device="cpu", dtype=_F64).numpy()
    return torch.from_numpy(_linear_kde(np.sort(x), g, bandwidth)).to(points.device)


def _linear_kde(x: np.ndarray, g: np.ndarray, h: float) -> np.ndarray:
    """:func:`linear_kde` of sorted host samples ``x`` at ``g``."""
    prefix = np.concatenate([[0.0], np.cumsum(x)])
    lo = np.searchsorted(x, g - h, side="right")
    mid = np.searchsorted(x, g, side="right")
    hi = np.searchsorted(x, g + h, side="left")
    n_left = (mid - lo).astype(np.float64)
    s_left = prefix[mid] - prefix[lo]
    n_right = (hi - mid).astype(np.float64)
    s_right = prefix[hi] - prefix[mid]
    total = n_left - (n_left * g - s_left) / h + n_right - (s_right - n_right * g) / h
    out: np.ndarray = np.maximum(total, 0.0) / (x.size * h)
    return out


def marchenko_pastur_density(x: torch.Tensor, q: float, sigma: torch.Tensor) -> torch.Tensor:
    """MP density of the eigenvalues of ``W^T W / N`` for i.i.d. entries of variance sigma^2.

    ``rho(x) = sqrt((b - x)(x - a)) / (2 pi sigma^2 x / Q)`` on ``[a, b]``,
    ``a, b = (sigma (1 -+ 1/sqrt(Q)))^2``, 0 elsewhere (``RMT_Util.marchenko_pastur_fun``).
    ``sigma`` broadcasts against ``x``.
    """
    b = (sigma * (1.0 + math.sqrt(1.0 / q))) ** 2
    a = (sigma * (1.0 - math.sqrt(1.0 / q))) ** 2
    val = torch.sqrt((b - x) * (x - a)) / (2.0 * math.pi * sigma**2 * x / q)
    return torch.nan_to_num(val, nan=0.0, posinf=0.0, neginf=0.0)


class _MpObjective:
    """WeightWatcher's ``resid_mp``: the summed squared residual between the MP density of sigma
    (the quarter-circle law for Q = 1) and the KDE ``yg`` on the sorted host grid ``xg``, for a
    grid of sigmas (:meth:`grid`) or one (a call: the Nelder-Mead polish).

    Arranged so that an evaluation costs little: the density is 0 outside the bulk ``[a, b]``, so
    the points there add ``sum y^2`` (prefix sums), and penalised sigmas (bulk edge below the
    KDE's peak or past the grid, or bulk start past the peak) are not evaluated; for Q = 1 the
    law is ``c(x) / sigma^2``, so the residual is a quadratic in ``1 / sigma^2``.
    """

    def __init__(self, xg: np.ndarray, yg: np.ndarray, q: float) -> None:
        self.xg, self.yg, self.q = xg, yg, q
        self.peak = float(xg[int(np.argmax(yg))])
        self.xmax = float(xg.max())
        self.penalty = float(_MP_PENALTY**2 * yg.size)
        self.y2 = np.concatenate([[0.0], np.cumsum(yg * yg)])  # prefix sums of y^2
        self.r = math.sqrt(1.0 / q)
        c = np.sqrt(np.maximum(4.0 - xg**2, 0.0)) / math.pi  # quarter circle (Q = 1) at s = 1
        self.quad = (float(c @ c), float(c @ yg), float(self.y2[-1]))

    def _band(self, a: float, b: float) -> tuple[int, int]:
        """The grid points in ``[a, b]``, less a point at 0 (density 0 there: 0 / 0 below)."""
        lo = int(np.searchsorted(self.xg, a, side="left"))
        lo += int(lo < self.xg.size and self.xg[lo] == 0.0)
        return lo, int(np.searchsorted(self.xg, b, side="right"))

    def grid(self, sigmas: np.ndarray) -> np.ndarray:
        """The residual for each of ``sigmas``: ``(S,)``."""
        if self.q == 1.0:
            cc, cy, yy = self.quad
            k = 1.0 / sigmas**2
            return k * k * cc - 2.0 * k * cy + yy
        b = (sigmas * (1.0 + self.r)) ** 2
        a = (sigmas * (1.0 - self.r)) ** 2
        good = ~((b < self.peak) | (b > self.xmax) | (a > self.peak))
        out = np.full(sigmas.shape, self.penalty)
        if not good.any():
            return out
        lo, hi = self._band(a[good].min(), b[good].max())
        x, y = self.xg[lo:hi], self.yg[lo:hi]
        s, ag, bg = sigmas[good, None], a[good, None], b[good, None]
        # (b - x)(x - a) < 0 off each bulk: density 0 there (WeightWatcher's nan_to_num of nan)
        model = np.sqrt(np.maximum((bg - x) * (x - ag), 0.0)) / (2.0 * math.pi * s**2 * x / self.q)
        outside = self.y2[lo] + (self.y2[-1] - self.y2[hi])
        out[good] = ((model - y) ** 2).sum(axis=1) + outside
        return out

    def __call__(self, sigma: float) -> float:
        s2 = sigma * sigma
        if self.q == 1.0:
            cc, cy, yy = self.quad
            if s2 == 0.0:
                return yy if cc == 0.0 else math.inf
            k = 1.0 / s2
            return k * k * cc - 2.0 * k * cy + yy
        b = (sigma * (1.0 + self.r)) ** 2
        a = (sigma * (1.0 - self.r)) ** 2
        if b < self.peak or b > self.xmax or a > self.peak:
            return self.penalty
        lo, hi = self._band(a, b)
        x, y = self.xg[lo:hi], self.yg[lo:hi]
        # a <= x <= b: both factors >= 0 in floating point, x > 0
        model = np.sqrt((b - x) * (x - a)) / (2.0 * math.pi * s2 * x / self.q)
        return float(np.sum((model - y) ** 2) + self.y2[lo] + (self.y2[-1] - self.y2[hi]))


def _nelder_mead_1d(fun: Any, x0: float, *, xatol: float = 1e-4, fatol: float = 1e-4) -> float:
    """``scipy.optimize.fmin`` (Nelder-Mead, default settings) in one dimension.

    Used only to polish the grid optimum as ``scipy.optimize.brute(finish=fmin)`` does; each
    step evaluates the vectorised objective at one point, so this loop is over iterations.
    """
    sim = [x0, x0 * 1.05 if x0 != 0 else 0.00025]
    fsim = [fun(sim[0]), fun(sim[1])]
    calls = 2
    if fsim[1] < fsim[0]:
        sim.reverse()
        fsim.reverse()
    for _ in range(199):
        if calls >= 200 or (abs(sim[1] - sim[0]) <= xatol and abs(fsim[0] - fsim[1]) <= fatol):
            break
        xbar = sim[0]
        xr = 2.0 * xbar - sim[1]
        fxr = fun(xr)
        calls += 1
        if fxr < fsim[0]:
            xe = 3.0 * xbar - 2.0 * sim[1]
            fxe = fun(xe)
            calls += 1
            sim[1], fsim[1] = (xe, fxe) if fxe < fxr else (xr, fxr)
        elif fxr < fsim[1]:  # 1-D: fsim[-2] is fsim[0], so this is the contraction branch
            xc = 1.5 * xbar - 0.5 * sim[1]
            fxc = fun(xc)
            calls += 1
            if fxc <= fxr:
                sim[1], fsim[1] = xc, fxc
            else:
                sim[1] = sim[0] + 0.5 * (sim[1] - sim[0])
                fsim[1] = fun(sim[1])
                calls += 1
        else:
            xcc = 0.5 * xbar + 0.5 * sim[1]
            fxcc = fun(xcc)
            calls += 1
            if fxcc < fsim[1]:
                sim[1], fsim[1] = xcc, fxcc
            else:
                sim[1] = sim[0] + 0.5 * (sim[1] - sim[0])
                fsim[1] = fun(sim[1])
                calls += 1
        if fsim[1] < fsim[0]:
            sim.reverse()
            fsim.reverse()
    return sim[0]


def fit_marchenko_pastur(evals: torch.Tensor, n_rows: int, n_cols: int) -> MarchenkoPasturFit:
    """Fit the MP bulk to an ESD as WeightWatcher's ``mp_fit`` / ``fit_density_with_range``.

    Rescale to mean eigenvalue 1; estimate the density by a linear-kernel KDE (bandwidth 0.1)
    on 1000 points over ``[0, max + 0.5]``, dropping points of density <= 0.01; choose sigma
    minimising the squared residual to the MP density (Q = N/M != 1) or to WeightWatcher's
    quarter-circle law on the singular values (Q = 1) over the grid
    ``sigma0 * (0.05, 0.06, ..., <2)`` with ``sigma0 = sqrt(lambda_max) / (1 + Q^-1/2)``, then
    polish with Nelder-Mead (``scipy.optimize.brute(finish=fmin)``). On the host (the ESD is
    copied there): the grid is evaluated as one array op; the KDE is exact (prefix sums).
    """
    q = n_rows / n_cols
    x = evals.detach().to(device="cpu", dtype=_F64).flatten().numpy()  # <= a few 1000 values
    total = float(x.sum())
    if not total > 0.0:
        raise SpectralError("all eigenvalues are zero")
    w_scale = math.sqrt(x.size) / math.sqrt(total)
    x = x * w_scale**2
    lam_max = float(x.max())
    sigma0 = math.sqrt(lam_max / (1.0 + 1.0 / math.sqrt(q)) ** 2)
    to_fit = np.sqrt(x) if q == 1.0 else x
    grid = np.linspace(0.0, float(to_fit.max()) + 0.5, _MP_GRID)
    dens = _linear_kde(np.sort(to_fit), grid, _MP_BANDWIDTH)
    keep = dens > _MP_DENSITY_FLOOR
    xg, yg = grid[keep], dens[keep]
    if xg.size == 0:
        raise SpectralError("ESD density is nowhere above the MP-fit floor")
    start, stop, step = 0.05 * sigma0, 2.0 * sigma0, 0.01 * sigma0
    count = math.ceil((stop - start) / step)  # as numpy.mgrid[start:stop:step]
    sigmas = np.arange(count, dtype=np.float64) * step + start
    objective = _MpObjective(xg, yg, q)
    best = float(sigmas[int(np.argmin(objective.grid(sigmas)))])
    sigma = _nelder_mead_1d(objective, best)  # the polish is scalar
    bulk_max = (sigma * (1.0 + 1.0 / math.sqrt(q))) ** 2
    bulk_min = (sigma * (1.0 - 1.0 / math.sqrt(q))) ** 2
    tw = 1.0 / math.sqrt(q) * bulk_max ** (2.0 / 3.0) * n_cols ** (-2.0 / 3.0)
    spikes = int((x > bulk_max + math.sqrt(tw)).sum())
    return MarchenkoPasturFit(
        sigma=sigma,
        w_scale=w_scale,
        bulk_max=bulk_max,
        bulk_min=bulk_min,
        num_spikes=spikes,
        softrank=bulk_max / lam_max,
        q=q,
    )


# --- all metrics of one ESD -------------------------------------------------------------------
def spectral_metrics(
    evals: torch.Tensor,
    n_rows: int,
    n_cols: int,
    *,
    mp_fit: bool = True,
    eps: float = torch.finfo(_F64).eps,
) -> SpectralMetrics:
    """Every HT-SR metric of one ESD ``evals`` ``(k,)`` of matrices of shape ``(n_rows, n_cols)``.

    ``n_rows`` (N >= M) and ``eps`` (machine epsilon of the Gram the eigenvalues came from) set the
    numerical-rank tolerance of the entropy, ``n_rows / n_cols`` the MP fit. Raises
    :class:`SpectralError` when the ESD cannot be fitted.
    """
    ev = evals.detach().to(_F64).flatten()
    if ev.numel() == 0 or not bool(torch.isfinite(ev).all()):
        raise SpectralError("empty or non-finite ESD")
    n, m = max(n_rows, n_cols), min(n_rows, n_cols)
    total = float(ev.sum())
    lam_max = float(ev.max())
    if not lam_max > 0.0:
        raise SpectralError("all eigenvalues are zero")
    if float(ev.min()) >= lam_max * (1.0 - FLAT_SPREAD):
        # an orthogonal (or scaled orthogonal) matrix: a fit would return noise (alpha 1e6, inf)
        raise SpectralError(
            f"flat spectrum: every eigenvalue within {FLAT_SPREAD:g} of the largest"
        )
    fit = fit_power_law(ev)
    # Numerical rank of the Gram: its eigenvalues carry an absolute error ~ eps * lambda_max, so
    # WeightWatcher's SVD rule (sigma > n eps sigma_max) would count round-off here, and differently
    # on each device; eigenvalues above n eps lambda_max are resolved.
    rank = int((ev > lam_max * n * eps).sum())
    p = ev / total + 1e-10
    entropy = float(-(p * p.log()).sum()) / math.log(rank + 1e-10)
    positive = ev[ev > 0]
    log_alpha_norm = float(torch.logsumexp(fit.alpha * positive.log(), 0)) / math.log(10.0)
    return SpectralMetrics(
        num_evals=int(ev.numel()),
        n_rows=n,
        n_cols=m,
        lambda_max=lam_max,
        log_norm=math.log10(total),
        log_spectral_norm=math.log10(lam_max),
        stable_rank=total / lam_max,
        matrix_rank=rank,
        entropy=entropy,
        fit=fit,
        alpha_hill=hill_alpha(ev),
        alpha_weighted=fit.alpha * math.log10(lam_max),
        log_alpha_norm=log_alpha_norm,
        mp=fit_marchenko_pastur(ev, n, m) if mp_fit else None,
    )


# --- plot payload -----------------------------------------------------------------------------
def esd_payload(
    evals: torch.Tensor, metrics: SpectralMetrics, *, bins: int = 100
) -> dict[str, Any]:
    """JSON-able drill-down data for one ESD: log-binned histogram, power-law line, MP curve.

    ``hist.edges`` (``bins + 1`` eigenvalue edges, log-spaced over the eigenvalues > 1e-5),
    ``hist.counts`` and ``hist.density`` (counts / (k * bin width), a density in lambda for a
    log-log plot); ``linear_hist`` (:func:`linear_histogram`, for the MP plot); ``fit`` with
    the line ``pdf(x) = (n_tail/k) (alpha-1)/xmin (x/xmin)^-alpha`` on ``[xmin, xmax]`` (scaled
    by the tail fraction so it overlays the full-ESD density); ``mp`` with the fitted MP density
    mapped back to eigenvalue units.
    """
    ev = evals.detach().to(_F64).flatten()
    k = ev.numel()
    fit = metrics.fit
    line_x = torch.logspace(
        math.log10(fit.xmin), math.log10(fit.xmax), 20, dtype=_F64, device=ev.device
    )
    line_y = (fit.num_tail / k) * (fit.alpha - 1.0) / fit.xmin * (line_x / fit.xmin) ** (-fit.alpha)
    payload: dict[str, Any] = {
        "num_evals": k,
        "shape": [metrics.n_rows, metrics.n_cols],
        "lambda_max": metrics.lambda_max,
        "hist": log_histogram(ev, bins),
        "linear_hist": linear_histogram(ev, bins),
        "fit": {
            "alpha": fit.alpha,
            "xmin": fit.xmin,
            "xmax": fit.xmax,
            "ks_distance": fit.ks_distance,
            "num_tail": fit.num_tail,
            "x": line_x.tolist(),
            "pdf": line_y.tolist(),
        },
        "alpha_hill": metrics.alpha_hill,
        "warning": metrics.warning,
    }
    mp = metrics.mp
    if mp is not None:
        scale = mp.w_scale**2
        xs = torch.linspace(mp.bulk_min, mp.bulk_max, 100, dtype=_F64, device=ev.device)
        sig = torch.tensor(mp.sigma, dtype=_F64, device=ev.device)
        pdf = marchenko_pastur_density(xs.clamp_min(1e-12), mp.q, sig)
        payload["mp"] = {
            "sigma": mp.sigma,
            "bulk_min": mp.bulk_min / scale,
            "bulk_max": mp.bulk_max / scale,
            "num_spikes": mp.num_spikes,
            "softrank": mp.softrank,
            "x": (xs / scale).tolist(),
            "pdf": (pdf * scale).tolist(),
        }
    return payload


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


def traps_payload(
    rand_evals: torch.Tensor, traps: CorrelationTraps, *, bins: int = 100
) -> dict[str, Any]:
    """JSON-able drill-down data of the shuffled ESD (all replicas pooled): its log-binned
    histogram (:func:`log_histogram`), its fitted MP edge in eigenvalue units and the trap
    metrics, to draw over the layer's own ESD."""
    mp = traps.mp
    return {
        "hist": log_histogram(rand_evals, bins),
        "lambda_max": traps.rand_lambda_max,
        "bulk_max": mp.bulk_max / mp.w_scale**2,
        "num_traps": traps.num_traps,
        "softrank": traps.softrank,
        "distance": traps.distance,
    }


# --- correlation traps ------------------------------------------------------------------------
@dataclass(frozen=True)
class CorrelationTraps:
    """What shuffling a weight's entries leaves in its ESD (WeightWatcher's ``randomize=True``;
    Martin & Mahoney, JMLR 22(165), 2021, and the WeightWatcher docs' "correlation traps").

    A shuffle keeps the entries' distribution and destroys their correlations, so the shuffled
    ESD should be a Marchenko-Pastur bulk: its ``num_traps`` eigenvalues above the fitted MP edge
    (plus the Tracy-Widom pad, ``mp``) come from a few outsized entries, which training (e.g. a
    learning rate too large) has pushed out of the bulk. ``rand_lambda_max`` is the shuffled
    ESD's largest eigenvalue, ``softrank`` that over the layer's own ``lambda_max`` (near 1: the
    top direction is no more than the entries' scale; WW's ``ww_softrank``), ``distance`` the
    Jensen-Shannon distance between the sorted ESD and one shuffled ESD (0: the layer learned no
    correlation; WW's ``rand_distance``).
    """

    num_traps: int
    rand_lambda_max: float
    softrank: float
    distance: float
    mp: MarchenkoPasturFit

    def values(self) -> dict[str, float]:
        """The trap metrics as ``{htsr key: value}``."""
        return {
            NUM_TRAPS: float(self.num_traps),
            RAND_LAMBDA_MAX: self.rand_lambda_max,
            RAND_SOFTRANK: self.softrank,
            RAND_DISTANCE: self.distance,
        }


def trap_replicas(n_cols: int) -> int:
    """Shuffles pooled for a layer's trap ESD: 5 when ``M < 100`` (few eigenvalues), else 1."""
    return TRAP_SMALL_REPLICAS if n_cols < TRAP_REPLICAS_BELOW else 1


def shuffled_matrices(mats: WeightMatrices, generator: torch.Generator) -> list[torch.Tensor]:
    """:func:`trap_replicas` element-wise shuffles of each of ``mats``' matrices, replica by
    replica (``random_eigenvalues``: each matrix shuffled on its own), on their device.
    ``generator`` lives on that device."""
    out: list[torch.Tensor] = []
    for _ in range(trap_replicas(mats.n_cols)):
        for m in mats.matrices:
            flat = m.detach().reshape(-1)
            perm = torch.randperm(flat.numel(), generator=generator, device=flat.device)
            out.append(flat[perm].view(m.shape))
    return out


def jensen_shannon_distance(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon distance of two equal-length non-negative vectors, each read as a
    distribution (``RMT_Util.jensen_shannon_distance``: ``scipy.stats.entropy`` normalises ``p``,
    ``q`` and their mean to sum 1)."""
    a = p.detach().to(device="cpu", dtype=_F64).flatten()
    b = q.detach().to(device="cpu", dtype=_F64).flatten()
    if a.numel() != b.numel():
        raise SpectralError(f"vectors of {a.numel()} and {b.numel()} values")
    mid = (a + b) / 2.0

    def kl(x: torch.Tensor) -> float:
        xn, mn = x / x.sum(), mid / mid.sum()
        keep = xn > 0  # 0 log 0 = 0; mid > 0 wherever x > 0
        return float((xn[keep] * (xn[keep] / mn[keep]).log()).sum())

    return math.sqrt(max((kl(a) + kl(b)) / 2.0, 0.0))


def correlation_traps(
    evals: torch.Tensor, rand_evals: Sequence[torch.Tensor], n_rows: int, n_cols: int
) -> CorrelationTraps:
    """:class:`CorrelationTraps` of a layer's ESD ``evals`` given the ESDs of its shuffles
    (:func:`shuffled_matrices`; one tensor per replica, each pooled over the layer's matrices).

    The MP fit (:func:`fit_marchenko_pastur`) is of all replicas pooled, as ``apply_mp_fit``
    (``random=True``); the distance is to the first replica (WeightWatcher draws another shuffle
    for it: the same in distribution). Raises :class:`SpectralError` when nothing can be fitted.
    """
    if not rand_evals:
        raise SpectralError("no shuffled ESD")
    ev = evals.detach().to(device="cpu", dtype=_F64).flatten()
    first = torch.sort(rand_evals[0].detach().to(device="cpu", dtype=_F64).flatten()).values
    pooled = torch.cat([r.detach().to(device="cpu", dtype=_F64).flatten() for r in rand_evals])
    if not (bool(torch.isfinite(ev).all()) and bool(torch.isfinite(pooled).all())):
        raise SpectralError("non-finite ESD")
    lam_max = float(ev.max())
    if not lam_max > 0.0:
        raise SpectralError("all eigenvalues are zero")
    mp = fit_marchenko_pastur(pooled, max(n_rows, n_cols), min(n_rows, n_cols))
    rand_max = float(pooled.max())
    return CorrelationTraps(
        num_traps=mp.num_spikes,
        rand_lambda_max=rand_max,
        softrank=rand_max / lam_max,
        distance=jensen_shannon_distance(torch.sort(ev).values, first),
        mp=mp,
    )


# --- layers and models ------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerReport:
    """HT-SR (and optionally FARMS) metrics of one weight: ``shape`` as given, N x M (rf)."""

    layer: str
    shape: tuple[int, ...]
    n_rows: int
    n_cols: int
    rf: int
    plain: SpectralMetrics
    farms: SpectralMetrics | None
    evals: torch.Tensor = field(repr=False, compare=False)
    farms_evals: torch.Tensor | None = field(default=None, repr=False, compare=False)
    traps: CorrelationTraps | None = None
    rand_evals: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def values(self) -> dict[str, float]:
        """``{key: value}`` with plain ``htsr.*`` (correlation traps included when computed)
        and FARMS ``farms.*`` keys."""
        out = self.plain.values()
        if self.traps is not None:
            out.update(self.traps.values())
        if self.farms is not None:
            out.update({farms_key(k): v for k, v in self.farms.values().items()})
        return out

    def row(self) -> dict[str, Any]:
        """The ``spectrawatch analyze`` JSON object of this layer."""
        f = self.farms
        return {
            "layer": self.layer,
            "shape": list(self.shape),
            "alpha": self.plain.alpha,
            "alpha_weighted": self.plain.alpha_weighted,
            "xmin": self.plain.fit.xmin,
            "ks_distance": self.plain.fit.ks_distance,
            "log_spectral_norm": self.plain.log_spectral_norm,
            "log_norm": self.plain.log_norm,
            "stable_rank": self.plain.stable_rank,
            "mp_softrank": self.plain.mp.softrank if self.plain.mp else None,
            "num_spikes": self.plain.mp.num_spikes if self.plain.mp else None,
            "entropy": self.plain.entropy,
            "farms_alpha": f.alpha if f else None,
            "farms_alpha_weighted": f.alpha_weighted if f else None,
            "num_traps": self.traps.num_traps if self.traps else None,
            "rand_distance": self.traps.distance if self.traps else None,
            "warning": self.plain.warning,
        }


@dataclass(frozen=True)
class SkippedLayer:
    """A weight left out, with the reason (WeightWatcher's size filter or a failed fit)."""

    layer: str
    shape: tuple[int, ...]
    reason: str


@dataclass(frozen=True)
class ModelReport:
    """Per-layer reports, skipped layers, and model-level means (``get_summary``)."""

    layers: tuple[LayerReport, ...]
    skipped: tuple[SkippedLayer, ...]

    def summary(self) -> dict[str, float]:
        """Unweighted means over layers of every per-layer key (``htsr.*``: every layer, as
        WeightWatcher's ``get_summary``; ``farms.*``: the layers FARMS applies to), plus layer
        counts."""
        return summarize_layers([r.values() for r in self.layers])


def summarize_layers(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """:meth:`ModelReport.summary` of per-layer ``values()`` dicts (e.g. read back from storage)."""
    if not rows:
        return {NUM_LAYERS: 0.0}
    out: dict[str, float] = {}
    for k in dict.fromkeys(k for r in rows for k in r):
        have = [r[k] for r in rows if k in r]
        if len(have) == len(rows) or k.startswith(FARMS_PREFIX) or k in TRAP_KEYS:
            out[k] = sum(have) / len(have)
    out[NUM_LAYERS] = float(len(rows))
    out[NUM_UNDER_TRAINED] = sum(r.get(UNDER_TRAINED, 0.0) for r in rows)
    out[NUM_OVER_TRAINED] = sum(r.get(OVER_TRAINED, 0.0) for r in rows)
    trapped = [r[NUM_TRAPS] for r in rows if NUM_TRAPS in r]
    if trapped:  # the layers whose traps were computed (a failed shuffled fit has none)
        out[NUM_TRAPPED_LAYERS] = float(sum(t > 0 for t in trapped))
    for k in (UNDER_TRAINED, OVER_TRAINED, farms_key(UNDER_TRAINED), farms_key(OVER_TRAINED)):
        out.pop(k, None)
    return out


def analyze_weights(
    weights: Mapping[str, torch.Tensor],
    *,
    farms: FarmsConfig | None = None,
    mp_fit: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = _F64,
    esds: Mapping[str, torch.Tensor] | None = None,
    traps: bool = False,
    trap_seed: int = 0,
) -> ModelReport:
    """HT-SR metrics of every 2-D / 4-D weight in ``weights`` (name -> tensor).

    Every ESD of the model (all layers, all conv slices, all FARMS windows) is computed in
    batched eigendecompositions grouped by shape (:func:`eigenvalues`), then each layer is fitted.
    ``esds`` may hold the ESD of some 2-D layers already (eigenvalues of ``W^T W``, e.g. squared
    exact singular values, which the server has for other analyses): those layers skip their
    Gram and eigendecomposition. ``farms`` adds FARMS metrics
    (:mod:`spectrawatch.spectral.farms`). ``traps`` adds the correlation traps
    (:class:`CorrelationTraps`): the ESDs of each layer's element-wise shuffles, drawn from a
    generator seeded with ``trap_seed`` (the same weights give the same values), join the batched
    eigendecompositions; they hold one shuffled copy of every analysed weight (five of a layer
    with ``M < 100``) while they run. Layers outside WeightWatcher's size filter, of other ranks,
    or whose fit fails are listed as skipped; a layer whose shuffled ESD cannot be fitted keeps
    its other metrics, without trap values.
    """
    given = dict(esds or {})
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    layer_mats: list[WeightMatrices] = []
    skipped: list[SkippedLayer] = []
    for name, w in weights.items():
        shape = tuple(w.shape)
        if w.ndim not in (2, 4):
            skipped.append(SkippedLayer(name, shape, f"{w.ndim}-D tensor"))
            continue
        t = w.detach().to(device) if device is not None else w.detach()
        mats = weight_matrices(t)
        if not is_supported(mats):
            skipped.append(SkippedLayer(name, shape, "outside WeightWatcher's size filter"))
            continue
        names.append(name)
        shapes.append(shape)
        layer_mats.append(mats)

    known = [
        name in given and lm.rf == 1 and given[name].numel() == lm.n_cols
        for name, lm in zip(names, layer_mats, strict=True)
    ]
    flat = [m for k, lm in zip(known, layer_mats, strict=True) if not k for m in lm.matrices]
    windows: list[list[torch.Tensor]] = []
    if farms is not None:
        windows = [farms_windows(lm, farms) for lm in layer_mats]
    shuffles: list[list[torch.Tensor]] = []
    if traps and layer_mats:
        gen = torch.Generator(device=layer_mats[0].matrices[0].device).manual_seed(trap_seed)
        shuffles = [shuffled_matrices(lm, gen) for lm in layer_mats]
    all_evals = eigenvalues(
        flat + [w for ws in windows for w in ws] + [m for ms in shuffles for m in ms], dtype=dtype
    )
    plain_evals: list[torch.Tensor] = []
    pos = 0
    for name, k, lm in zip(names, known, layer_mats, strict=True):
        if k:
            ev = given[name].detach().to(device=lm.matrices[0].device, dtype=dtype)
            plain_evals.append(torch.sort(ev.flatten().clamp_min(0.0)).values)
            continue
        plain_evals.append(torch.sort(torch.cat(all_evals[pos : pos + len(lm.matrices)])).values)
        pos += len(lm.matrices)
    farms_evals: list[torch.Tensor | None] = [None] * len(layer_mats)
    for i, ws in enumerate(windows):
        if ws:
            farms_evals[i] = torch.sort(torch.cat(all_evals[pos : pos + len(ws)])).values
            pos += len(ws)
    rand_evals: list[torch.Tensor | None] = [None] * len(layer_mats)
    for i, ms in enumerate(shuffles):  # replica-major: one pooled, sorted ESD per replica
        per = len(layer_mats[i].matrices)
        reps = [torch.cat(all_evals[pos + r : pos + r + per]) for r in range(0, len(ms), per)]
        rand_evals[i] = torch.stack([torch.sort(r).values for r in reps])
        pos += len(ms)
    # the fits are many small steps: on host copies they took 126 vs 190 ms (223 vs 313 with the
    # MP fit) for GPT-2 small on an H100 (benchmarks/results/gpu_h100.md)
    n_plain, n_farms = len(plain_evals), len(farms_evals)
    host = _on_host([*plain_evals, *farms_evals, *rand_evals])  # one transfer for all
    plain_evals = [e for e in host[:n_plain] if e is not None]
    farms_evals = host[n_plain : n_plain + n_farms]
    rand_evals = host[n_plain + n_farms :]
    reports: list[LayerReport] = []
    eps = torch.finfo(dtype).eps  # the Grams' precision: sets the entropy's numerical rank
    for i, (name, shape, lm) in enumerate(zip(names, shapes, layer_mats, strict=True)):
        try:
            plain = spectral_metrics(plain_evals[i], lm.n_rows, lm.n_cols, mp_fit=mp_fit, eps=eps)
            fm: SpectralMetrics | None = None
            fe = farms_evals[i]
            if fe is not None:
                r, c = windows[i][0].shape
                fm = spectral_metrics(fe, max(r, c), min(r, c), mp_fit=mp_fit, eps=eps)
        except SpectralError as exc:
            skipped.append(SkippedLayer(name, shape, str(exc)))
            continue
        trap: CorrelationTraps | None = None
        re = rand_evals[i]
        if re is not None:
            try:
                trap = correlation_traps(plain_evals[i], list(re), lm.n_rows, lm.n_cols)
            except SpectralError:
                trap = None
        reports.append(
            LayerReport(
                name, shape, lm.n_rows, lm.n_cols, lm.rf, plain, fm, plain_evals[i], fe, trap, re
            )
        )
    return ModelReport(tuple(reports), tuple(skipped))


def _on_host(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """``tensors`` copied to the host in one transfer (CPU ones, and ``None``, as they are)."""
    moved = [t for t in tensors if t is not None and t.device.type != "cpu"]
    if not moved:
        return tensors
    parts = iter(
        torch.split(torch.cat([t.flatten() for t in moved]).cpu(), [t.numel() for t in moved])
    )
    return [
        next(parts).view(t.shape) if t is not None and t.device.type != "cpu" else t
        for t in tensors
    ]


def farms_windows(mats: WeightMatrices, config: FarmsConfig) -> list[torch.Tensor]:
    """The FARMS windows of a layer (every slice), as separate matrices for batched ESDs; none
    for a layer too small for FARMS (:func:`~spectrawatch.spectral.farms.applies`)."""
    if not applies(mats.n_rows, mats.n_cols, config):
        return []
    if mats.matrices[0].device.type == "cpu":  # views: the Grams convert them as they copy
        return [w for m in mats.matrices for w in window_views(m.detach(), config)]
    return [w for m in mats.matrices for w in sample_windows(m, config).unbind(0)]


def analyze_model(
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    *,
    farms: FarmsConfig | None = None,
    mp_fit: bool = True,
    device: torch.device | str | None = None,
    traps: bool = False,
) -> ModelReport:
    """WeightWatcher-style analysis of a model or state dict, offline.

    From a module: the 2-D or 4-D ``weight`` of every module except norm layers (Linear, HF
    Conv1D, Conv2d, Embedding, as WeightWatcher; also ConvTranspose2d, which WeightWatcher
    0.7.7 skips; a 3-D Conv1d kernel is skipped by both); from a state dict: every 2-D or 4-D
    tensor whose name does not contain ``norm`` (so also ``nn.MultiheadAttention``'s
    ``in_proj_weight``, which WeightWatcher does not see). See :func:`analyze_weights`.
    """
    if isinstance(model_or_state_dict, torch.nn.Module):
        weights: dict[str, torch.Tensor] = {}
        for name, module in model_or_state_dict.named_modules():
            w = getattr(module, "weight", None)
            if not isinstance(w, torch.Tensor) or "norm" in type(module).__name__.lower():
                continue
            weights[f"{name}.weight" if name else "weight"] = w
    else:
        weights = {k: v for k, v in model_or_state_dict.items() if "norm" not in k.lower()}
    return analyze_weights(weights, farms=farms, mp_fit=mp_fit, device=device, traps=traps)
