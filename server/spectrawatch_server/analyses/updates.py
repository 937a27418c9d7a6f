"""Update sizes per layer and for the whole model, read from the sketch frames.

``norm.update`` is ``||delta theta||`` of one optimizer step (the norm of its update-sketch row),
``norm.param`` is ``||theta||`` (the norm of a theta-sketch row), and ``norm.update_ratio`` the
first over the second from the run's latest theta frame sent before the update frame (the
client sends one at its first sketched step and every ``theta_every`` steps, 100 by default;
the updates sent before the run's first theta frame get their ratio when it arrives, against
that first ``||theta||``, from up to :data:`BACKFILL_FRAMES` update frames): the
update-to-weight ratio that training guides watch, often quoted near 1e-3 for a well-set
learning rate, far above it when the rate is too high for a layer. Norms of count-sketch rows
estimate the true norms within a few per cent (:mod:`spectrawatch.spectral.norms`); exact-mode
frames carry the updates themselves and give exact norms (they have no theta frames, so no
ratio).

Update frames: the whole model at every row, each layer (or row group) at the steps where SED
keeps its per-layer values (:func:`~spectrawatch_server.analyses.sed.evaluation_steps`), so
the series of a 150-tensor model stay as thin as its SED series. Theta frames: every row.
Rows that are not finite are left out (the frame's ``nonfinite`` count and alert report them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from spectrawatch.spectral.norms import PARAM_NORM, UPDATE_NORM, UPDATE_RATIO, row_norms
from spectrawatch.wire import FrameKind
from spectrawatch_server.analyses.registry import (
    MODEL_LAYER,
    AnalysisContext,
    AnalysisResult,
    DecodedFrame,
    MetricValue,
    register,
)
from spectrawatch_server.analyses.sed import evaluation_steps


def _points(frame: DecodedFrame, layer: str, keep: Sequence[int] | None) -> list[tuple[int, float]]:
    """``(step, norm)`` of ``layer``'s finite rows, at the steps in ``keep`` (all when None)."""
    steps = frame.row_steps
    rows = frame.tensors[layer]
    if rows.ndim != 2 or rows.shape[0] != len(steps):
        return []
    wanted = None if keep is None else set(keep)
    return [
        (step, norm)
        for step, norm in zip(steps, row_norms(rows), strict=True)
        if math.isfinite(norm) and (wanted is None or step in wanted)
    ]


def _latest_param_norms(context: AnalysisContext) -> dict[str, float]:
    """``{layer: ||theta||}`` from the last row of the run's latest earlier theta frame."""
    previous = context.recent_frames(FrameKind.PARAM_SKETCH, 1)
    if not previous:
        return {}
    frame = previous[-1]
    out = {}
    for layer in frame.tensors:
        points = _points(frame, layer, None)
        if points and points[-1][1] > 0.0:
            out[layer] = points[-1][1]
    return out


# update frames before the run's first theta frame given their ratio when it arrives: 256 steps
# of 16-step frames (theta_every is 100 by default); each is decoded once for it
BACKFILL_FRAMES = 16


@register("update_norms", [FrameKind.UPDATE_SKETCH, FrameKind.PARAM_SKETCH])
def update_norms(frame: DecodedFrame, context: AnalysisContext) -> AnalysisResult:
    """``norm.param`` of theta frames; ``norm.update`` and ``norm.update_ratio`` of update
    frames, per layer (row group) and ``__model__``. The run's first theta frame also gives the
    ratios of the update frames sent before it."""
    result = AnalysisResult()
    if frame.header.kind == FrameKind.PARAM_SKETCH:
        first: dict[str, float] = {}
        for layer in sorted(frame.tensors):
            points = _points(frame, layer, None)
            for step, norm in points:
                result.metrics.append(MetricValue(layer, PARAM_NORM, norm, step))
            if points and points[0][1] > 0.0:
                first[layer] = points[0][1]
        if first and not context.recent_frames(FrameKind.PARAM_SKETCH, 1):
            # the later frame's value where two share a step (a resumed run's steps restart):
            # one result holds a (layer, name, step) once, as the results' unique index wants
            backfill = {
                (m.layer, m.name, m.step): m
                for earlier in context.recent_frames(FrameKind.UPDATE_SKETCH, BACKFILL_FRAMES)
                for m in _update_values(earlier, first, norms=False)
            }
            result.metrics += backfill.values()
        return result
    result.metrics += _update_values(frame, _latest_param_norms(context), norms=True)
    return result


def _update_values(
    frame: DecodedFrame, params: dict[str, float], *, norms: bool
) -> list[MetricValue]:
    """``norm.update`` (when ``norms``) and ``norm.update_ratio`` against ``params``
    (``{layer: ||theta||}``) of an update frame's rows, at SED's evaluation steps."""
    out = []
    model_steps, layer_steps = evaluation_steps(frame)
    for layer in sorted(frame.tensors):
        keep = model_steps if layer == MODEL_LAYER else layer_steps
        base = params.get(layer)
        if base is None and not norms:
            continue
        for step, norm in _points(frame, layer, keep):
            if norms:
                out.append(MetricValue(layer, UPDATE_NORM, norm, step))
            if base is not None:
                out.append(MetricValue(layer, UPDATE_RATIO, norm / base, step))
    return out
