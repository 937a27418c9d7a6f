"""Heavy-tailed self-regularisation (HT-SR) metrics of weight matrices, WeightWatcher-compatible.

The empirical spectral density (ESD) of a weight matrix ``W`` (``N x M``, ``N >= M``) is the set of
eigenvalues of ``W^T W``, i.e. the squared singular values, **without** a ``1/N`` factor
(WeightWatcher >= 0.6.5 convention). Heavy-tailed self-regularisation (Martin & Mahoney,
"Implicit self-regularization in deep neural networks", JMLR 22(165), 2021, §5; Martin, Peng &
Mahoney, "Predicting trends in the quality of state-of-the-art neural networks without access to
training or testing data", Nat. Commun. 12:4122, 2021, §"Methods") reads training quality from
the power-law exponent ``alpha`` of the ESD tail: 2 <= alpha <= 6 for well-trained layers,
alpha < 2 "over-trained", alpha > 6 "under-trained" (WeightWatcher ``constants.py``).

Definitions follow WeightWatcher 0.7.7 (``weightwatcher.py``: ``apply_norm_metrics``,
``get_summary``; ``RMT_Util``); each function names the one it reproduces. This module holds the
metric keys, the metrics of one ESD (:func:`spectral_metrics`, :func:`esd_payload`) and of a
model (:func:`analyze_weights`, :func:`analyze_model`). The rest is in its own modules,
re-exported here where callers use it: :mod:`~spectrawatch.spectral.esd` (weight matrices and
their ESDs, ``combined_eigenvalues``), :mod:`~spectrawatch.spectral.power_law`
(``fit_powerlaw``, ``WW_powerlaw.WWFit``, the Hill estimator),
:mod:`~spectrawatch.spectral.marchenko_pastur` (``mp_fit``), :mod:`~spectrawatch.spectral.traps`
(correlation traps, ``randomize=True``, and their keys), :mod:`~spectrawatch.spectral.histograms`
(plot histograms) and :mod:`~spectrawatch.spectral.errors` (:class:`SpectralError`). Everything
is torch on any device; fits run in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from spectrawatch.spectral.errors import SpectralError as SpectralError
from spectrawatch.spectral.esd import MAX_EVALS as MAX_EVALS
from spectrawatch.spectral.esd import MAX_N as MAX_N
from spectrawatch.spectral.esd import MIN_EVALS as MIN_EVALS
from spectrawatch.spectral.esd import WeightMatrices as WeightMatrices
from spectrawatch.spectral.esd import eigenvalues as eigenvalues
from spectrawatch.spectral.esd import is_supported as is_supported
from spectrawatch.spectral.esd import pooled_eigenvalues as pooled_eigenvalues
from spectrawatch.spectral.esd import weight_matrices as weight_matrices
from spectrawatch.spectral.farms import FarmsConfig, applies, sample_windows, window_views
from spectrawatch.spectral.histograms import linear_histogram
from spectrawatch.spectral.histograms import log_histogram as log_histogram
from spectrawatch.spectral.marchenko_pastur import MarchenkoPasturFit, fit_marchenko_pastur
from spectrawatch.spectral.marchenko_pastur import linear_kde as linear_kde
from spectrawatch.spectral.marchenko_pastur import (
    marchenko_pastur_density as marchenko_pastur_density,
)
from spectrawatch.spectral.power_law import EVALS_THRESH as EVALS_THRESH
from spectrawatch.spectral.power_law import PowerLawFit
from spectrawatch.spectral.power_law import fit_power_law as fit_power_law
from spectrawatch.spectral.power_law import hill_alpha as hill_alpha
from spectrawatch.spectral.traps import NUM_TRAPPED_LAYERS as NUM_TRAPPED_LAYERS
from spectrawatch.spectral.traps import NUM_TRAPS as NUM_TRAPS
from spectrawatch.spectral.traps import RAND_DISTANCE as RAND_DISTANCE
from spectrawatch.spectral.traps import RAND_LAMBDA_MAX as RAND_LAMBDA_MAX
from spectrawatch.spectral.traps import RAND_SOFTRANK as RAND_SOFTRANK
from spectrawatch.spectral.traps import TRAP_KEYS as TRAP_KEYS
from spectrawatch.spectral.traps import CorrelationTraps, layer_generator
from spectrawatch.spectral.traps import correlation_traps as correlation_traps
from spectrawatch.spectral.traps import jensen_shannon_distance as jensen_shannon_distance
from spectrawatch.spectral.traps import shuffled_matrices as shuffled_matrices
from spectrawatch.spectral.traps import trap_replicas as trap_replicas
from spectrawatch.spectral.traps import traps_payload as traps_payload

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
# correlation-trap keys (htsr.num_traps, htsr.rand_*, htsr.num_trapped_layers, TRAP_KEYS): in
# spectrawatch.spectral.traps, imported above

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


def farms_key(key: str) -> str:
    """The FARMS twin of an HT-SR key: ``"htsr.alpha"`` -> ``"farms.alpha"``."""
    return FARMS_PREFIX + key.split(".", 1)[1]


# --- WeightWatcher constants (weightwatcher/constants.py, 0.7.7) -------------------------------
OVER_TRAINED_THRESH = 2.0
UNDER_TRAINED_THRESH = 6.0
OVER_TRAINED_WARNING = "over-trained"
UNDER_TRAINED_WARNING = "under-trained"

_F64 = torch.float64


# --- results ----------------------------------------------------------------------------------
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
    generator seeded with ``trap_seed`` and the layer's name (:func:`layer_generator`: a layer's
    values depend on its weights alone, not on the other layers of the call), join the batched
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
        shuffles = [
            shuffled_matrices(lm, layer_generator(trap_seed, name, lm.matrices[0].device))
            for name, lm in zip(names, layer_mats, strict=True)
        ]
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
