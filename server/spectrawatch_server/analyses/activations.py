"""EigenTrack descriptors and the quadratic-manifold curvature index on activation frames.

An activation frame holds, per hooked module, either ``X`` ``(tokens, hidden)`` or its Gram
``X^T X`` ``(hidden, hidden)`` when the module is listed in ``info["gram"]``. A Gram needs the
number of rows: ``info["tokens"]`` (an int, or a ``{module: int}`` map); it is taken as centred
when ``info["gram_centered"]`` is true, else analysed as an uncentred second moment. Modules whose
Gram lacks a token count are skipped (nothing can place the MP law without it).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from spectrawatch.spectral.activations import (
    CHANGE_SCORE,
    CHANGE_TRACKED,
    ActivationSpectrum,
    activation_spectra,
    activation_spectrum,
    activation_spectrum_from_gram,
    change_score,
    mp_density,
)
from spectrawatch.spectral.manifold import choose_rank, quadratic_manifold_fit
from spectrawatch.wire import FrameKind
from spectrawatch_server.analyses.norms import gram_is_finite
from spectrawatch_server.analyses.registry import (
    AnalysisContext,
    AnalysisResult,
    DecodedFrame,
    MetricValue,
    SpectrumRecord,
    register,
)

CHANGE_WINDOW = 20  # history points the change score compares against
CHANGE_MIN_HISTORY = 5
# The tracked descriptors live in [0, 1] (effective rank >= 1): a move of 1e-3 from a flat
# history (e.g. outlier mass stuck at 0) counts as one standard deviation.
CHANGE_ABS_FLOOR = 1e-3
HISTOGRAM_BINS = 64
MAX_LISTED_OUTLIERS = 64


MAX_TOKENS = 2**53  # largest row count of a Gram taken at its word (exact as a float)


def _gram_tokens(info: dict[str, Any], module: str) -> int | None:
    tokens = info.get("tokens")
    if isinstance(tokens, dict):
        tokens = tokens.get(module)
    if type(tokens) is int and 0 < tokens <= MAX_TOKENS:
        return tokens
    return None


def _gram_modules(info: dict[str, Any]) -> set[str]:
    """Modules sent as Grams (``info["gram"]``: a list of names; anything else means none)."""
    names = info.get("gram")
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()


def _spectra(frame: DecodedFrame) -> dict[str, ActivationSpectrum]:
    """Spectra of the frame's modules; same-shaped row matrices share one batched eigensolve.
    Degenerate modules (zero or non-finite activations, too few rows) are left out."""
    info = frame.header.info
    grams = _gram_modules(info)
    out: dict[str, ActivationSpectrum] = {}
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for module, tensor in sorted(frame.tensors.items()):
        if not gram_is_finite(tensor):
            continue  # NaN/Inf activations have no spectrum
        if module not in grams:
            by_shape.setdefault(tuple(tensor.shape), []).append(module)
            continue
        tokens = _gram_tokens(info, module)
        if tokens is None:
            continue
        try:
            out[module] = activation_spectrum_from_gram(
                tensor, tokens, centered=bool(info.get("gram_centered"))
            )
        except ValueError:
            continue
    for modules in by_shape.values():
        try:
            stacked = torch.stack([frame.tensors[m].to(torch.float64) for m in modules])
            out.update(zip(modules, activation_spectra(stacked), strict=True))
        except ValueError:  # one degenerate module: describe them one by one
            for module in modules:
                try:
                    out[module] = activation_spectrum(frame.tensors[module])
                except ValueError:
                    continue
    return dict(sorted(out.items()))


def _payload(spectrum: ActivationSpectrum, scores: dict[str, float]) -> dict[str, Any]:
    """Histogram of ``lambda / sigma^2`` with the MP density on the same bins, for drill-down."""
    mp = spectrum.mp
    scaled = spectrum.eigenvalues.numpy() / mp.sigma2
    bulk_top = mp.lambda_plus / mp.sigma2
    if mp.outliers < scaled.size:
        bulk_top = max(bulk_top, float(scaled[mp.outliers]))
    edges = np.linspace(0.0, 1.05 * bulk_top, HISTOGRAM_BINS + 1)
    counts, _ = np.histogram(scaled[scaled <= edges[-1]], bins=edges)
    centres = (edges[:-1] + edges[1:]) / 2
    return {
        "kind": "eigentrack",
        "tokens": spectrum.tokens,
        "hidden": spectrum.hidden,
        "units": "lambda / sigma2",
        "bin_edges": edges.tolist(),
        "counts": counts.tolist(),
        "mp_counts": (mp_density(centres, mp.ratio) * scaled.size * (edges[1] - edges[0])).tolist(),
        "mp": {
            "sigma2": mp.sigma2,
            "ratio": mp.ratio,
            "lambda_minus": mp.lambda_minus / mp.sigma2,
            "lambda_plus": mp.lambda_plus / mp.sigma2,
            "threshold": mp.threshold / mp.sigma2,
        },
        "outliers": scaled[: min(mp.outliers, MAX_LISTED_OUTLIERS)].tolist(),
        "change_z": scores,
    }


@register("eigentrack", [FrameKind.ACTIVATIONS])
def eigentrack(frame: DecodedFrame, context: AnalysisContext) -> AnalysisResult:
    """EigenTrack descriptors per module, and a change score: max |z| of the scale-free descriptors
    against the module's own last ``CHANGE_WINDOW`` values at earlier steps (so a re-run of the
    same frame sees the same history)."""
    result = AnalysisResult()
    for module, spectrum in _spectra(frame).items():
        values = spectrum.metrics()
        for name, value in values.items():
            if math.isfinite(value):
                result.metrics.append(MetricValue(module, name, value))
        scores: dict[str, float] = {}
        for name in CHANGE_TRACKED:
            series = context.metric_series(name, module, CHANGE_WINDOW + 1)
            history = [v for step, v in series if step < frame.step]
            if len(history) >= CHANGE_MIN_HISTORY:
                scores[name] = change_score(
                    history,
                    values[name],
                    window=CHANGE_WINDOW,
                    min_history=CHANGE_MIN_HISTORY,
                    abs_floor=CHANGE_ABS_FLOOR,
                )
        if scores:
            result.metrics.append(
                MetricValue(module, CHANGE_SCORE, max(abs(z) for z in scores.values()))
            )
        result.spectra.append(SpectrumRecord(module, _payload(spectrum, scores)))
    return result


@register("manifold", [FrameKind.ACTIVATIONS])
def manifold(frame: DecodedFrame, context: AnalysisContext) -> AnalysisResult:
    """Held-out R^2 of PCA and of the quadratic decoder at the largest rank the token count
    supports (``choose_rank``: >= 10 training rows per lifted feature); Gram modules are skipped
    (the fit needs the rows)."""
    del context  # stateless
    result = AnalysisResult()
    grams = _gram_modules(frame.header.info)
    for module, x in sorted(frame.tensors.items()):
        if module in grams or x.ndim != 2 or not gram_is_finite(x):
            continue
        ranks = tuple(r for r in (32, 16, 8, 4) if r < x.shape[1])
        rank = choose_rank(x.shape[0], candidates=ranks)
        if rank is None:
            continue
        try:
            fit = quadratic_manifold_fit(x, rank)
        except ValueError:  # rank-deficient activations: nothing to report for this module
            continue
        result.metrics.extend(
            MetricValue(module, name, value)
            for name, value in fit.metrics().items()
            if math.isfinite(value)
        )
    return result
