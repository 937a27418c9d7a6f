"""Per-layer Frobenius and spectral norms of weight frames."""

from __future__ import annotations

from spectrawatch.spectral.norms import FROBENIUS_NORM, SPECTRAL_NORM, matrix_norms
from spectrawatch.wire import FrameKind
from spectrawatch_server.analyses.registry import (
    AnalysisContext,
    AnalysisResult,
    DecodedFrame,
    MetricValue,
    register,
)


@register("norms", [FrameKind.WEIGHTS])
def weight_norms(frame: DecodedFrame, context: AnalysisContext) -> AnalysisResult:
    """Frobenius and spectral norm of every weight matrix in the frame."""
    result = AnalysisResult()
    for layer, weights in frame.tensors.items():
        norms = matrix_norms(weights)
        result.metrics.append(MetricValue(layer, FROBENIUS_NORM, norms.frobenius))
        result.metrics.append(MetricValue(layer, SPECTRAL_NORM, norms.spectral))
    return result
