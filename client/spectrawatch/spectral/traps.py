"""Correlation traps: what shuffling a weight's entries leaves in its ESD (WeightWatcher's
``analyze(randomize=True)``; Martin & Mahoney, JMLR 22(165), 2021, and the WeightWatcher docs'
"correlation traps").

Reproduces WeightWatcher 0.7.7's ``apply_random_esd`` / ``random_eigenvalues`` (element-wise
shuffles of each matrix, five pooled when M < 100: :func:`shuffled_matrices`),
``apply_mp_fit(random=True)`` (the shuffled ESD's MP fit, by
:func:`~spectrawatch.spectral.marchenko_pastur.fit_marchenko_pastur`) and
``RMT_Util.jensen_shannon_distance``. The shuffles' ESDs are computed with the layer's own, in
:func:`spectrawatch.spectral.htsr.analyze_weights`; the trap keys below are ``htsr.*`` keys,
defined here once and re-exported by :mod:`~spectrawatch.spectral.htsr`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from spectrawatch.spectral.errors import SpectralError
from spectrawatch.spectral.esd import WeightMatrices
from spectrawatch.spectral.histograms import log_histogram
from spectrawatch.spectral.marchenko_pastur import MarchenkoPasturFit, fit_marchenko_pastur

# --- metric keys (dotted, defined once) -------------------------------------------------------
# correlation traps (WeightWatcher's ``randomize=True``): the ESD of the element-shuffled weight
NUM_TRAPS = "htsr.num_traps"  # spikes of the shuffled ESD above its fitted MP edge
RAND_LAMBDA_MAX = "htsr.rand_lambda_max"  # largest eigenvalue of the shuffled ESD
RAND_SOFTRANK = "htsr.rand_softrank"  # rand_lambda_max / lambda_max (WW's ww_softrank)
RAND_DISTANCE = "htsr.rand_distance"  # Jensen-Shannon distance between the ESD and the shuffled
NUM_TRAPPED_LAYERS = "htsr.num_trapped_layers"  # model level: layers with num_traps > 0
#: Correlation-trap keys, present when the traps were computed (not on the FARMS ESD).
TRAP_KEYS: tuple[str, ...] = (NUM_TRAPS, RAND_LAMBDA_MAX, RAND_SOFTRANK, RAND_DISTANCE)

# WeightWatcher constants (weightwatcher/constants.py, 0.7.7)
TRAP_REPLICAS_BELOW = 100  # layers with M below this pool 5 shuffles (apply_random_esd)
TRAP_SMALL_REPLICAS = 5
_F64 = torch.float64


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


def layer_generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """The shuffles' generator of layer ``name``: seeded from ``seed`` and the name alone, so a
    layer's trap values depend on its weights only, never on which layers share the call or in
    what order (a weights frame's tensor order varies from frame to frame)."""
    layer_seed = (seed * 0x9E3779B1 + zlib.crc32(name.encode("utf-8"))) % 2**63
    return torch.Generator(device=device).manual_seed(layer_seed)


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
