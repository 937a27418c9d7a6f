"""Top-subspace drift of every 2-D weight between a weight frame and the run's previous one.

Per layer present in both frames with the same shape: ``subspace.drift`` (0 = the spike subspace
above the MP bulk stayed put, 1 = it turned orthogonal; :mod:`spectrawatch.spectral.subspace`) and
``subspace.rank`` (spikes now); under :data:`MODEL_LAYER` the mean drift. On a CUDA worker,
matrices whose short side is at least ``POLAR_MIN_DIM`` use GEMM-only Polar Express projectors,
elsewhere exact ``eigh``. Layers without a spike in either snapshot have no drift and are skipped.
"""

from __future__ import annotations

from spectrawatch.spectral.subspace import SUBSPACE_DRIFT, SUBSPACE_RANK, weight_subspace_drift
from spectrawatch.wire import FrameKind
from spectrawatch_server.analyses.conditioning import POLAR_MIN_DIM
from spectrawatch_server.analyses.norms import has_spectrum
from spectrawatch_server.analyses.registry import (
    MODEL_LAYER,
    AnalysisContext,
    AnalysisResult,
    DecodedFrame,
    MetricValue,
    register,
)


@register("subspace", [FrameKind.WEIGHTS])
def weight_subspace(frame: DecodedFrame, context: AnalysisContext) -> AnalysisResult:
    """Drift of each layer's spike subspace since the previous weight frame of the run."""
    result = AnalysisResult()
    previous = context.recent_frames(FrameKind.WEIGHTS, 1)
    if not previous:
        return result
    prior = previous[-1]
    drifts: list[float] = []
    for layer, after in sorted(frame.tensors.items()):
        before = prior.tensors.get(layer)
        if (
            before is None
            or before.shape != after.shape
            or min(after.shape) < 2
            or not (has_spectrum(prior, layer) and has_spectrum(frame, layer))
        ):
            continue
        polar = after.is_cuda and min(after.shape) >= POLAR_MIN_DIM
        try:
            drift = weight_subspace_drift(before.to(after.device), after, polar=polar)
        except ValueError:  # no spike in either snapshot: nothing to follow
            continue
        result.metrics.append(MetricValue(layer, SUBSPACE_DRIFT, drift.drift))
        result.metrics.append(MetricValue(layer, SUBSPACE_RANK, float(drift.rank_after)))
        drifts.append(drift.drift)
    if drifts:
        result.metrics.append(MetricValue(MODEL_LAYER, SUBSPACE_DRIFT, sum(drifts) / len(drifts)))
    return result
