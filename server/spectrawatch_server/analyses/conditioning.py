"""Weight conditioning (GMCN, condition number, PC-layer preview) and the Muon-update audit.

* ``conditioning`` on weight frames: exact singular values per 2-D weight (float64, computed once
  per frame and shared with ``norms`` and ``grok_rank``), then sigma_max,
  sigma_min, condition number, GMCN, the count of singular values above the MP edge and the GMCN a
  PC layer of level 2 / 4 would leave; plus the global GMCN (geometric mean over the frame's
  matrices, as PC Layer's ``metrics_plotter.py`` plots it) on the model layer. On a CUDA
  worker, for matrices whose short side is at least ``POLAR_MIN_DIM``, the same spike count is
  also computed GEMM-only by Polar Express (``polar.mp_spikes``, with its ambiguity) so the fast
  path is continuously checked against the exact one.
* ``muon_audit`` on update frames sent in exact mode (``info["exact"]`` true): the last row of each
  layer, reshaped to ``info["shapes"][layer]``, is audited for its distance from a scaled
  orthogonal matrix. Layers without a 2-D shape are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from spectrawatch.spectral.conditioning import (
    GMCN,
    SIGMA_MAX,
    conditioning_metrics,
    mp_spike_threshold,
)
from spectrawatch.spectral.polar import (
    MUON_POLAR_DISTANCE,
    MUON_SCALE,
    POLAR_MP_SPIKES,
    POLAR_MP_SPIKES_AMBIGUITY,
    count_singular_values_above,
    muon_audit,
)
from spectrawatch.wire import FrameKind
from spectrawatch_server.analyses.norms import has_spectrum, weight_singular_values
from spectrawatch_server.analyses.registry import (
    AnalysisContext,
    AnalysisResult,
    DecodedFrame,
    MetricValue,
    register,
    same_values,
)

POLAR_MIN_DIM = 512  # below this, exact SVD is as cheap as the GEMM-only count


def _finite(layer: str, values: dict[str, float]) -> list[MetricValue]:
    return [MetricValue(layer, name, v) for name, v in values.items() if math.isfinite(v)]


def _global_gmcn(layers: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """PC Layer's global GMCN: the geometric mean of the layers' GMCN at the step."""
    logs = [math.log(v[GMCN]) for v in layers.values() if 0 < v.get(GMCN, 0.0) < math.inf]
    return {GMCN: math.exp(sum(logs) / len(logs))} if logs else {}


@register(
    "conditioning", [FrameKind.WEIGHTS], summarize=_global_gmcn, carry=same_values("conditioning")
)
def weight_conditioning(frame: DecodedFrame, context: AnalysisContext) -> AnalysisResult:
    """Per-layer conditioning metrics of every 2-D weight in the frame."""
    del context  # stateless
    result = AnalysisResult()
    for layer, weights in sorted(frame.tensors.items()):
        if weights.ndim != 2 or min(weights.shape) < 2:
            continue
        if not has_spectrum(frame, layer):
            continue  # NaN/Inf weights have no spectrum; the NaN rule reports them
        shape = (weights.shape[0], weights.shape[1])
        sv = weight_singular_values(frame, layer)  # the SVD `norms` and `grok_rank` share
        values = conditioning_metrics(sv, shape)
        if weights.is_cuda and min(shape) >= POLAR_MIN_DIM and values[SIGMA_MAX] > 0:
            frob_sq = float((sv.to(torch.float64) ** 2).sum())
            threshold = mp_spike_threshold(shape, frob_sq)
            count = count_singular_values_above(weights, math.sqrt(threshold * max(shape)))
            values[POLAR_MP_SPIKES] = float(count.count)
            values[POLAR_MP_SPIKES_AMBIGUITY] = count.ambiguity
        result.metrics.extend(_finite(layer, values))
    return result  # the global GMCN comes from _global_gmcn over every part of the snapshot


def _shape(info: dict[str, Any], layer: str, size: int) -> tuple[int, int] | None:
    shapes = info.get("shapes")
    shape = shapes.get(layer) if isinstance(shapes, dict) else None
    if (
        isinstance(shape, list)
        and len(shape) == 2
        and all(isinstance(v, int) and v > 1 for v in shape)
        and shape[0] * shape[1] == size
    ):
        return shape[0], shape[1]
    return None


@register("muon_audit", [FrameKind.UPDATE_SKETCH])
def muon_update_audit(frame: DecodedFrame, context: AnalysisContext) -> AnalysisResult:
    """Distance of each exact 2-D layer update from a scaled orthogonal matrix (the last step of
    the frame); nothing for sketched frames, whose rows are projections, not matrices."""
    del context  # stateless
    info = frame.header.info
    result = AnalysisResult()
    if not info.get("exact"):
        return result
    steps = info.get("steps") or [frame.step]
    for layer, rows in sorted(frame.tensors.items()):
        shape = _shape(info, layer, rows.shape[-1])
        if shape is None:
            continue
        update = rows[-1].reshape(shape)
        try:
            audit = muon_audit(update)
        except ValueError:  # zero or non-finite update: nothing to audit
            continue
        step = int(steps[-1])
        result.metrics.append(MetricValue(layer, MUON_POLAR_DISTANCE, audit.polar_distance, step))
        result.metrics.append(MetricValue(layer, MUON_SCALE, audit.scale, step))
    return result
