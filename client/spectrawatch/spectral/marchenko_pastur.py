"""Marchenko-Pastur (MP) fits of an ESD's bulk, as WeightWatcher's ``mp_fit``.

The MP law is the limiting ESD of ``W^T W / N`` for an ``N x M`` matrix of i.i.d. entries
(``RMT_Util.marchenko_pastur_fun``: :func:`marchenko_pastur_density`).
:func:`fit_marchenko_pastur` fits its scale to a rescaled ESD as WeightWatcher 0.7.7's
``mp_fit`` / ``fit_density_with_range`` do: a linear-kernel KDE (:func:`linear_kde`, as
sklearn's ``KernelDensity(kernel="linear")``), the residual ``resid_mp`` minimised over a grid
and polished by Nelder-Mead (``scipy.optimize.brute(finish=fmin)``), then the spikes above the
bulk edge plus the Tracy-Widom pad and the MP soft rank (Martin & Mahoney, "Implicit
self-regularization in deep neural networks", JMLR 22(165), 2021, §4.2). On the host, in
float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spectrawatch.spectral.errors import SpectralError

_MP_BANDWIDTH = 0.1
_MP_GRID = 1000
_MP_DENSITY_FLOOR = 0.01
_MP_PENALTY = 1000.0
_F64 = torch.float64


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
