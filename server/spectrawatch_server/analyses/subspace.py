"""Top-subspace drift of every 2-D weight since its previous snapshot in the run.

Per layer, against the newest earlier weight frame of the run at a lower step that holds it (a
snapshot larger than ``max_frame_bytes`` arrives in parts, each holding other layers), when the
shapes agree: ``subspace.drift`` (0 = the spike subspace above the MP bulk stayed put, 1 = it
turned orthogonal; :mod:`spectrawatch.spectral.subspace`) and ``subspace.rank`` (spikes now);
under :data:`MODEL_LAYER` the mean drift over the step's layers, all parts (``summarize``). On a
CUDA worker, matrices whose short side is at least ``POLAR_MIN_DIM`` use GEMM-only Polar Express
projectors, elsewhere exact ``eigh``. Layers without a spike in either snapshot have no drift
and are skipped. A frozen weight a snapshot leaves out as unchanged did not move: its drift in
the model mean is 0 where it has spikes (``conditioning.mp_spikes`` of its last snapshot, the
same MP threshold), not the drift it had when last sent (``carry``).
"""

from __future__ import annotations

from collections.abc import Mapping

from spectrawatch.spectral.conditioning import MP_SPIKES
from spectrawatch.spectral.subspace import SUBSPACE_DRIFT, SUBSPACE_RANK, weight_subspace_drift
from spectrawatch.wire import FrameKind
from spectrawatch_server.analyses.conditioning import POLAR_MIN_DIM
from spectrawatch_server.analyses.norms import has_spectrum
from spectrawatch_server.analyses.registry import (
    AnalysisContext,
    AnalysisResult,
    DecodedFrame,
    MetricValue,
    register,
)


def _mean_drift(layers: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The whole-model drift of a step: the mean of its layers' drifts."""
    drifts = [v[SUBSPACE_DRIFT] for v in layers.values() if SUBSPACE_DRIFT in v]
    return {SUBSPACE_DRIFT: sum(drifts) / len(drifts)} if drifts else {}


def _unmoved(stored: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """An unchanged weight's drift: 0 where it has a spike subspace to follow (counted by
    ``conditioning`` with the same MP threshold), none otherwise (as for a spike-free one)."""
    return {SUBSPACE_DRIFT: 0.0} if stored.get("conditioning", {}).get(MP_SPIKES, 0.0) > 0 else {}


@register("subspace", [FrameKind.WEIGHTS], summarize=_mean_drift, carry=_unmoved)
def weight_subspace(frame: DecodedFrame, context: AnalysisContext) -> AnalysisResult:
    """Drift of each layer's spike subspace since the layer's previous snapshot."""
    result = AnalysisResult()
    layers = [
        layer
        for layer, w in frame.tensors.items()
        if w.ndim == 2 and min(w.shape) >= 2 and has_spectrum(frame, layer)
    ]
    priors = context.frames_holding(FrameKind.WEIGHTS, layers) if layers else {}
    for layer, prior in sorted(priors.items()):
        after, before = frame.tensors[layer], prior.tensors.get(layer)
        if before is None or before.shape != after.shape or not has_spectrum(prior, layer):
            continue
        polar = after.is_cuda and min(after.shape) >= POLAR_MIN_DIM
        try:
            drift = weight_subspace_drift(before.to(after.device), after, polar=polar)
        except ValueError:  # no spike in either snapshot: nothing to follow
            continue
        result.metrics.append(MetricValue(layer, SUBSPACE_DRIFT, drift.drift))
        result.metrics.append(MetricValue(layer, SUBSPACE_RANK, float(drift.rank_after)))
    return result
