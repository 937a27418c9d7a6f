"""EigenTrack-style activation spectra: covariance eigenvalues, their descriptors, and a fitted
Marchenko-Pastur (MP) law with the distance of the empirical spectrum (ESD) to it.

EigenTrack (Ettori et al., arXiv 2509.15735, abstract; thesis arXiv 2602.22345) tracks covariance
spectrum statistics of hidden activations - entropy, variance, leading eigenvalues and gaps, and
the divergence from the MP law - over time. Its method section was not available
(``research/sed_eigentrack.md`` §3.4), so the conventions are written down here:

* ``X`` is ``(n, p)``: ``n`` tokens (rows) by ``p`` hidden units, centred over tokens; the
  covariance is ``C = Xc^T Xc / (n - 1)`` and the aspect ratio ``y = p / (n - 1)``; only the
  ``m = min(p, n - 1)`` nonzero eigenvalues enter the descriptors.
* MP law (Marchenko & Pastur 1967) for i.i.d. entries of variance ``sigma^2``: nonzero eigenvalues
  on ``[lambda-, lambda+] = sigma^2 (1 -+ sqrt(y))^2`` (RMT-KD convention, arXiv 2509.15724).
* ``sigma^2`` is fitted robustly: started from median matching, then the trace of ``C`` with the
  outliers removed, ``sigma^2 = sum(bulk) / (p - k)``, iterated until the outlier set is stable.
* Outliers are eigenvalues above ``lambda+ + margin * s_TW``, ``s_TW`` the Tracy-Widom scale of
  the largest eigenvalue (Johnstone 2001, Ann. Stat. 29(2)), so pure noise gives none while a
  spike beyond the BBP threshold (Baik, Ben Arous & Peche 2005) shows as exactly one outlier.
* KS and Wasserstein-1 distances compare the ESD of ``lambda / sigma^2`` with the unit MP law.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt
import torch

ENTROPY = "eigentrack.entropy"
EFFECTIVE_RANK = "eigentrack.effective_rank"
EIG_VARIANCE = "eigentrack.eig_variance"
TOP_K_SHARE = "eigentrack.top_k_share"
LAMBDA_MAX = "eigentrack.lambda_max"
SPECTRAL_GAP = "eigentrack.spectral_gap"
MP_SIGMA2 = "eigentrack.mp_sigma2"
MP_RATIO = "eigentrack.mp_ratio"
MP_KS = "eigentrack.mp_ks"
MP_WASSERSTEIN = "eigentrack.mp_wasserstein"
OUTLIERS = "eigentrack.outliers"
OUTLIER_MASS = "eigentrack.outlier_mass"
CHANGE_SCORE = "eigentrack.change_score"

# Descriptors whose jumps the change score watches (scale-free ones only).
CHANGE_TRACKED = (ENTROPY, EFFECTIVE_RANK, TOP_K_SHARE, MP_KS, OUTLIER_MASS)

FloatArray = npt.NDArray[np.float64]
_GRID = 4096  # cells of the MP CDF table


@dataclass(frozen=True)
class MarchenkoPasturFit:
    """MP law fitted to one covariance spectrum, in the covariance's own units.

    ``ratio`` is ``y = p / n_eff``; ``threshold`` the outlier cut above ``lambda_plus``;
    ``outlier_mass`` the outliers' share of the trace; ``ks`` the KS distance of the ESD of
    ``lambda / sigma2`` to the unit-variance MP law; ``wasserstein`` the W1 distance of the ESD
    rescaled to the unit law's mean (``max(1, y)``, that of its nonzero part) to that law: 0 for
    noise, at most ``2 max(1, y)`` whatever the outliers' scale.
    """

    sigma2: float
    ratio: float
    lambda_minus: float
    lambda_plus: float
    threshold: float
    outliers: int
    outlier_mass: float
    ks: float
    wasserstein: float


@dataclass(frozen=True)
class ActivationSpectrum:
    """EigenTrack descriptors of one activation matrix.

    ``eigenvalues`` ``(m,)`` float64 descending, the nonzero covariance eigenvalues;
    ``entropy`` the spectral entropy of ``p_i = lambda_i / sum(lambda)`` divided by ``log m``
    (in [0, 1]); ``effective_rank`` its exponential (Roy & Vetterli 2007); ``eig_variance`` the
    variance of ``lambda / mean(lambda)``; ``top_k_share`` the share of the ``top_k`` largest;
    ``lambda_max`` the largest eigenvalue over ``sigma^2`` of the MP fit; ``spectral_gap``
    ``lambda_1 / lambda_2``.
    """

    tokens: int
    hidden: int
    eigenvalues: torch.Tensor
    entropy: float
    effective_rank: float
    eig_variance: float
    top_k: int
    top_k_share: float
    lambda_max: float
    spectral_gap: float
    mp: MarchenkoPasturFit

    def metrics(self) -> dict[str, float]:
        """The scalar descriptors keyed by their metric names."""
        return {
            ENTROPY: self.entropy,
            EFFECTIVE_RANK: self.effective_rank,
            EIG_VARIANCE: self.eig_variance,
            TOP_K_SHARE: self.top_k_share,
            LAMBDA_MAX: self.lambda_max,
            SPECTRAL_GAP: self.spectral_gap,
            MP_SIGMA2: self.mp.sigma2,
            MP_RATIO: self.mp.ratio,
            MP_KS: self.mp.ks,
            MP_WASSERSTEIN: self.mp.wasserstein,
            OUTLIERS: float(self.mp.outliers),
            OUTLIER_MASS: self.mp.outlier_mass,
        }


def mp_edges(ratio: float, sigma2: float = 1.0) -> tuple[float, float]:
    """MP support ``sigma2 * (1 -+ sqrt(ratio))^2`` of the nonzero eigenvalues."""
    if ratio <= 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    root = math.sqrt(ratio)
    return sigma2 * (1 - root) ** 2, sigma2 * (1 + root) ** 2


def mp_density(x: FloatArray, ratio: float) -> FloatArray:
    """Density of the *nonzero* eigenvalues of the unit-variance MP law with ratio ``y``.

    ``sqrt((b - x)(x - a)) / (2 pi x min(y, 1))`` on ``[a, b]`` (for ``y > 1`` the atom of mass
    ``1 - 1/y`` at zero is removed and the rest renormalised).
    """
    a, b = mp_edges(ratio)
    x = np.asarray(x, dtype=np.float64)
    inside = (x > a) & (x < b)
    out = np.zeros_like(x)
    xi = x[inside]
    out[inside] = np.sqrt((b - xi) * (xi - a)) / (2 * math.pi * xi * min(ratio, 1.0))
    return out


@lru_cache(maxsize=64)
def _mp_table(ratio: float) -> tuple[FloatArray, FloatArray]:
    """``(x, F(x))`` on a grid of the nonzero MP law; substitution ``x = a + (b - a)(1 - cos t)/2``
    removes the square-root edges, so a midpoint rule in ``t`` is accurate to ~1e-7."""
    a, b = mp_edges(ratio)
    t_mid = (np.arange(_GRID) + 0.5) * math.pi / _GRID
    x_mid = a + (b - a) * (1 - np.cos(t_mid)) / 2
    weights = (b - a) ** 2 / 4 * np.sin(t_mid) ** 2 / (2 * math.pi * x_mid * min(ratio, 1.0))
    cdf = np.concatenate([[0.0], np.cumsum(weights)])
    cdf /= cdf[-1]
    t_edge = np.arange(_GRID + 1) * math.pi / _GRID
    x_edge = a + (b - a) * (1 - np.cos(t_edge)) / 2
    return x_edge, cdf


def mp_cdf(x: FloatArray, ratio: float) -> FloatArray:
    """CDF of the nonzero unit-variance MP law at ``x``."""
    grid, cdf = _mp_table(float(ratio))
    return np.interp(np.asarray(x, dtype=np.float64), grid, cdf)


def mp_quantile(u: FloatArray, ratio: float) -> FloatArray:
    """Quantile function (inverse CDF) of the nonzero unit-variance MP law at ``u`` in [0, 1]."""
    grid, cdf = _mp_table(float(ratio))
    return np.interp(np.asarray(u, dtype=np.float64), cdf, grid)


def tracy_widom_scale(tokens_eff: int, hidden: int) -> float:
    """Fluctuation scale of the largest eigenvalue of ``X^T X / n`` for unit-variance noise.

    Johnstone (2001), Thm 1: ``(sqrt(n) + sqrt(p)) (1/sqrt(n) + 1/sqrt(p))^(1/3) / n``.
    """
    rn, rp = math.sqrt(tokens_eff), math.sqrt(hidden)
    return float((rn + rp) * (1 / rn + 1 / rp) ** (1 / 3) / tokens_eff)


def ks_distance(sample: FloatArray, ratio: float) -> float:
    """Kolmogorov-Smirnov distance ``sup |F_n - F_MP|`` of ``sample`` to the unit MP law."""
    x = np.sort(np.asarray(sample, dtype=np.float64))
    m = x.size
    cdf = mp_cdf(x, ratio)
    upper = np.arange(1, m + 1) / m - cdf
    lower = cdf - np.arange(m) / m
    return float(max(upper.max(), lower.max()))


def wasserstein_distance(sample: FloatArray, ratio: float, sub: int = 32) -> float:
    """Wasserstein-1 distance ``int_0^1 |Q_n(u) - Q_MP(u)| du`` of ``sample`` to the unit MP law.

    The empirical quantile is constant on each of the ``m`` cells; the MP quantile is integrated
    with ``sub`` midpoints per cell.
    """
    x = np.sort(np.asarray(sample, dtype=np.float64))
    m = x.size
    u = (np.arange(m)[:, None] + (np.arange(sub)[None, :] + 0.5) / sub) / m
    return float(np.abs(x[:, None] - mp_quantile(u, ratio)).mean())


def fit_marchenko_pastur(
    eigenvalues: FloatArray,
    tokens_eff: int,
    hidden: int,
    margin: float = 3.0,
    max_iter: int = 100,
) -> MarchenkoPasturFit:
    """Fit the MP law to the nonzero eigenvalues of ``C = X^T X / tokens_eff`` (``X`` ``(n, p)``).

    ``eigenvalues`` ``(m,)`` holds the ``m = min(hidden, tokens_eff)`` nonzero eigenvalues;
    ``margin`` is the outlier cut above ``lambda+`` in Tracy-Widom units. Raises ``ValueError``
    when the spectrum is all zero or too short.
    """
    lam = np.sort(np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None))[::-1]
    m = lam.size
    if m < 2 or lam[0] <= 0:
        raise ValueError("need at least two eigenvalues and a nonzero spectrum")
    ratio = hidden / tokens_eff
    unit_minus, unit_plus = mp_edges(ratio)
    tw = tracy_widom_scale(tokens_eff, hidden)
    median_unit = float(mp_quantile(np.array([0.5]), ratio)[0])
    sigma2 = float(np.median(lam)) / median_unit
    total = float(lam.sum())
    if sigma2 <= 0:
        sigma2 = total / hidden
    k = -1
    for _ in range(max_iter):
        new_k = int((lam > sigma2 * (unit_plus + margin * tw)).sum())
        # the bulk keeps at least half of the spectrum: a spectrum with no noise bulk (a
        # trained, fast-decaying representation) would otherwise shed eigenvalue after
        # eigenvalue until sigma2 was its smallest one's (5e-11 of the top on exp(-i/5))
        new_k = min(new_k, m // 2)
        if new_k == k:
            break
        k = new_k
        sigma2 = float(lam[k:].sum()) / (hidden - k)
    threshold = sigma2 * (unit_plus + margin * tw)
    outliers = int((lam > threshold).sum())
    scaled = lam / sigma2
    return MarchenkoPasturFit(
        sigma2=sigma2,
        ratio=ratio,
        lambda_minus=sigma2 * unit_minus,
        lambda_plus=sigma2 * unit_plus,
        threshold=threshold,
        outliers=outliers,
        outlier_mass=float(lam[:outliers].sum()) / total,
        ks=ks_distance(scaled, ratio),
        # the shape's distance: lambda at the unit law's mean (1, or y when y > 1: the nonzero
        # part's), so outliers far above a small bulk cannot make it 1e6 (it is at most 2 max(1, y))
        wasserstein=wasserstein_distance(lam * (max(1.0, ratio) / float(lam.mean())), ratio),
    )


def _describe(
    eigenvalues: FloatArray, tokens: int, tokens_eff: int, hidden: int, top_k: int, margin: float
) -> ActivationSpectrum:
    m = min(hidden, tokens_eff)
    lam = np.clip(np.sort(eigenvalues)[::-1][:m], 0.0, None)
    if m < 2 or lam[0] <= 0:
        raise ValueError("activation covariance is zero or has fewer than two eigenvalues")
    p = lam / lam.sum()
    nz = p[p > 0]
    h = float(-(nz * np.log(nz)).sum())
    k = min(top_k, m)
    # Dead directions (e.g. ReLU units that never fire) give exact zeros; the MP law is fitted to
    # the live subspace, with the hidden size reduced by the number of dead directions.
    rank = int((lam > lam[0] * 1e-12).sum())
    if rank < 2:
        raise ValueError("activation covariance has fewer than two nonzero eigenvalues")
    mp = fit_marchenko_pastur(lam[:rank], tokens_eff, hidden - (m - rank), margin=margin)
    if not mp.sigma2 > 0:
        raise ValueError("activation covariance has no noise bulk to fit")
    return ActivationSpectrum(
        tokens=tokens,
        hidden=hidden,
        eigenvalues=torch.from_numpy(lam.copy()),
        entropy=h / math.log(m),
        effective_rank=math.exp(h),
        eig_variance=float(np.var(lam / lam.mean())),
        top_k=k,
        top_k_share=float(lam[:k].sum() / lam.sum()),
        lambda_max=float(lam[0]) / mp.sigma2,
        spectral_gap=float(lam[0] / lam[1]) if lam[1] > 0 else math.inf,
        mp=mp,
    )


def _covariance_eigenvalues(cov: torch.Tensor) -> FloatArray:
    """Ascending eigenvalues of a float64 covariance ``(..., p, p)`` on the host; ``ValueError``
    when it is not finite (NaN/Inf activations, or squares past float64): LAPACK would fail to
    converge on it with an ``_LinAlgError`` that says "ill-conditioned"."""
    if not bool(torch.isfinite(cov).all()):
        raise ValueError("activation covariance is not finite (NaN/Inf activations or overflow)")
    eig: FloatArray = torch.linalg.eigvalsh(cov).cpu().numpy()
    return eig


def activation_spectrum(
    x: torch.Tensor, top_k: int = 10, margin: float = 3.0
) -> ActivationSpectrum:
    """EigenTrack descriptors of activations ``x`` ``(tokens, hidden)`` (any float dtype/device).

    Centres over tokens, forms the smaller of the two Grams (``p x p`` or ``n x n``) in float64
    and takes ``eigvalsh``; ``margin`` is the outlier cut in Tracy-Widom units. Raises
    ``ValueError`` for activations without a spectrum to fit: too few rows, all constant, or not
    finite (NaN/Inf).
    """
    if x.ndim != 2:
        raise ValueError(f"expected (tokens, hidden), got shape {tuple(x.shape)}")
    n, p = x.shape
    if n < 3 or p < 2:
        raise ValueError(f"need at least 3 tokens and 2 hidden units, got {tuple(x.shape)}")
    xc = x.to(torch.float64)
    xc = xc - xc.mean(dim=0, keepdim=True)
    gram = xc.mT @ xc if p <= n else xc @ xc.mT
    eig = _covariance_eigenvalues(gram / (n - 1))
    return _describe(eig, n, n - 1, p, top_k, margin)


def activation_spectra(
    x: torch.Tensor, top_k: int = 10, margin: float = 3.0
) -> list[ActivationSpectrum]:
    """:func:`activation_spectrum` of a stack ``(L, tokens, hidden)`` of same-shaped modules.

    One batched float64 Gram and one batched ``eigvalsh`` on ``x``'s device (the GPU worker's
    path for a probe of many layers); the descriptors are then computed per module.
    """
    if x.ndim != 3:
        raise ValueError(f"expected (modules, tokens, hidden), got shape {tuple(x.shape)}")
    _, n, p = x.shape
    if n < 3 or p < 2:
        raise ValueError(f"need at least 3 tokens and 2 hidden units, got {tuple(x.shape[1:])}")
    xc = x.to(torch.float64)
    xc = xc - xc.mean(dim=1, keepdim=True)
    gram = xc.mT @ xc if p <= n else xc @ xc.mT
    eig = _covariance_eigenvalues(gram / (n - 1))
    return [_describe(e, n, n - 1, p, top_k, margin) for e in eig]


def activation_spectrum_from_gram(
    gram: torch.Tensor,
    tokens: int,
    column_sum: torch.Tensor | None = None,
    centered: bool = False,
    top_k: int = 10,
    margin: float = 3.0,
) -> ActivationSpectrum:
    """EigenTrack descriptors from a Gram ``X^T X`` ``(hidden, hidden)`` of ``tokens`` rows.

    With ``column_sum`` (``X^T 1``, ``(hidden,)``) the Gram is centred exactly; with
    ``centered=True`` it is taken as already centred (``Xc^T Xc``). Otherwise the uncentred second
    moment ``X^T X / tokens`` is analysed (the mean direction then shows as one extra outlier).
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"expected a square Gram, got shape {tuple(gram.shape)}")
    p = gram.shape[0]
    g = gram.to(torch.float64)
    g = (g + g.mT) / 2
    if column_sum is not None:
        s = column_sum.to(torch.float64).reshape(-1)
        g = g - torch.outer(s, s) / tokens
        centered = True
    n_eff = tokens - 1 if centered else tokens
    if n_eff < 2 or p < 2:
        raise ValueError(f"need at least 3 tokens and 2 hidden units, got {tokens} x {p}")
    eig = _covariance_eigenvalues(g / n_eff)
    return _describe(eig, tokens, n_eff, p, top_k, margin)


def change_score(
    history: Sequence[float],
    value: float,
    window: int = 20,
    min_history: int = 5,
    rel_floor: float = 1e-3,
    abs_floor: float = 1e-12,
) -> float:
    """z-score of ``value`` against the last ``window`` points of ``history`` (oldest first).

    ``(value - mean) / max(std, rel_floor * |mean|, abs_floor)`` with the sample std (ddof 1);
    the floors keep a constant history from producing infinities (``abs_floor`` is the smallest
    change worth one unit of z for a series that sits at 0). Raises ``ValueError`` when fewer
    than ``min_history`` finite points are available.
    """
    if min_history < 2:
        raise ValueError("min_history must be at least 2")
    recent = np.asarray([h for h in history if math.isfinite(h)][-window:], dtype=np.float64)
    if recent.size < min_history:
        raise ValueError(f"need {min_history} finite history points, got {recent.size}")
    mean = float(recent.mean())
    std = float(recent.std(ddof=1))
    return (value - mean) / max(std, rel_floor * abs(mean), abs_floor)
