"""Per-layer Frobenius and spectral norms of weight frames, and the frame's shared SVDs."""

from __future__ import annotations

import torch

from spectrawatch.spectral.eigen import svdvals
from spectrawatch.spectral.norms import FROBENIUS_NORM, SPECTRAL_NORM
from spectrawatch.wire import FrameKind
from spectrawatch_server.analyses.registry import (
    AnalysisContext,
    AnalysisResult,
    DecodedFrame,
    MetricValue,
    register,
)

_SVD = "svdvals"  # frame.memo key of a layer's shared singular values


def gram_is_finite(x: torch.Tensor) -> bool:
    """Every entry of ``x`` finite and its float64 squared Frobenius norm too, so the float64
    Gram ``x^T x`` (whose entries that norm bounds) cannot overflow."""
    return bool(torch.isfinite(x.to(torch.float64).square().sum()))


def has_spectrum(frame: DecodedFrame, layer: str) -> bool:
    """Whether the weight ``layer`` of a frame is a 2-D matrix with a computable spectrum: every
    entry finite and its float64 squared Frobenius norm too (so Gram products cannot overflow).
    Analyses skip the others; the frame's ``nonfinite`` count and the NaN alert report them.
    Computed once per frame and layer (``frame.memo``)."""
    weights = frame.tensors[layer]
    return frame.memoised(
        ("has_spectrum", layer), lambda: weights.ndim == 2 and gram_is_finite(weights)
    )


def weight_singular_values(frame: DecodedFrame, layer: str) -> torch.Tensor:
    """Singular values ``(min(m, n),)``, descending, float64, of the 2-D weight ``layer`` of a
    frame; LAPACK runs once per frame and layer, the analyses that need them (``norms``,
    ``grok_rank``) share the result through ``frame.memo``."""

    def compute() -> torch.Tensor:
        weights = frame.tensors[layer]
        if weights.ndim != 2:
            raise ValueError(f"expected a 2-D matrix, got shape {tuple(weights.shape)}")
        return svdvals(weights.detach().to(torch.float64))

    return frame.memoised((_SVD, layer), compute)


def shared_singular_values(frame: DecodedFrame, layer: str) -> torch.Tensor | None:
    """The singular values of ``layer`` if an analysis of this frame has computed them already."""
    s = frame.memo.get((_SVD, layer))
    return s if isinstance(s, torch.Tensor) else None


@register("norms", [FrameKind.WEIGHTS])
def weight_norms(frame: DecodedFrame, context: AnalysisContext) -> AnalysisResult:
    """Frobenius and spectral norm of every weight matrix in the frame (float64; the spectral
    norm is the largest shared singular value, what ``matrix_norm(ord=2)`` computes)."""
    result = AnalysisResult()
    for layer, weights in frame.tensors.items():
        if not has_spectrum(frame, layer):
            continue
        spectral = float(weight_singular_values(frame, layer)[0])
        frobenius = float(torch.linalg.matrix_norm(weights.to(torch.float64), ord="fro"))
        result.metrics.append(MetricValue(layer, FROBENIUS_NORM, frobenius))
        result.metrics.append(MetricValue(layer, SPECTRAL_NORM, spectral))
    return result
