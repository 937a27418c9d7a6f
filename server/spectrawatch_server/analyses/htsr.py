"""Heavy-tail (HT-SR) and FARMS metrics of weight frames, per layer and for the whole model.

Per layer: every ``htsr.*`` key of :mod:`spectrawatch.spectral.htsr` (alpha, alpha_weighted,
Hill alpha, xmin, KS distance, norms, stable rank, MP soft rank and spikes, entropy,
under/over-trained flags, correlation traps) and its ``farms.*`` twin on the FARMS average ESD
(no traps there); under :data:`MODEL_LAYER` the means over layers plus layer counts
(WeightWatcher's ``get_summary``). One :class:`SpectrumRecord` per layer carries the log-binned
ESD, the fitted power-law line and the MP curve, for plain and FARMS spectra, and the shuffled
ESD behind the traps, for the drill-down plots.

Conv kernels arrive flattened to 2-D; when ``info["shapes"][layer]`` gives the original 4-D
shape, the matrix is restored to it so that WeightWatcher's per-kernel-position slicing applies.
A frame whose ``info["traps"]`` is ``false`` (client setting ``weights_traps``) gets no
correlation traps. The weights the client left out of the snapshot (3-D and 5-D tensors, which
``spectrawatch analyze`` skips too), named in ``info["skipped"]`` as ``{layer: {"shape",
"reason"}}``, get a spectrum record that says why, as the layers skipped here do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from spectrawatch.spectral.farms import FARMS_CV
from spectrawatch.spectral.htsr import (
    analyze_weights,
    esd_payload,
    summarize_layers,
    traps_payload,
)
from spectrawatch.wire import LAYER_MAX, FrameKind
from spectrawatch_server.analyses.norms import shared_singular_values
from spectrawatch_server.analyses.registry import (
    AnalysisContext,
    AnalysisResult,
    DecodedFrame,
    MetricValue,
    SpectrumRecord,
    register,
    same_values,
)

SHAPES_INFO_KEY = "shapes"  # frame info: {layer: original shape} for reshaped conv kernels
TRAPS_INFO_KEY = "traps"  # frame info: false when the run turned correlation traps off
SKIPPED_INFO_KEY = "skipped"  # frame info: {layer: {"shape", "reason"}} the client did not send
_REASON_MAX = 200  # characters of a client's skip reason kept
_SHAPE_MAX = 16  # dimensions of a skipped weight's shape kept


def restore_shapes(tensors: Mapping[str, torch.Tensor], shapes: object) -> dict[str, torch.Tensor]:
    """Reshape flattened conv kernels back to their 4-D shape when the frame names it."""
    out = dict(tensors)
    if not isinstance(shapes, Mapping):
        return out
    for layer, shape in shapes.items():
        t = out.get(layer)
        if (
            t is not None
            and isinstance(shape, list)
            and len(shape) == 4
            and all(isinstance(s, int) and s > 0 for s in shape)
            and math.prod(shape) == t.numel()
        ):
            out[layer] = t.reshape(shape)
    return out


def client_skipped(frame: DecodedFrame) -> list[SpectrumRecord]:
    """Spectrum records for the weights the client left out of the snapshot and named in
    ``info["skipped"]``; malformed entries, and names of tensors the frame holds, are ignored."""
    skipped = frame.header.info.get(SKIPPED_INFO_KEY)
    if not isinstance(skipped, Mapping):
        return []
    records = []
    for layer, entry in skipped.items():
        if (
            not isinstance(layer, str)
            or not 0 < len(layer) <= LAYER_MAX
            or not layer.isprintable()
            or layer in frame.tensors
            or not isinstance(entry, Mapping)
        ):
            continue
        reason, shape = entry.get("reason"), entry.get("shape")
        if not isinstance(reason, str) or not reason.strip() or not reason.isprintable():
            continue
        if not (
            isinstance(shape, list)
            and len(shape) <= _SHAPE_MAX
            and all(isinstance(s, int) and 0 <= s < 2**63 for s in shape)
        ):
            shape = []
        payload = {"analysis": "htsr", "shape": shape, "skipped": reason[:_REASON_MAX]}
        records.append(SpectrumRecord(layer, payload))
    return records


def _summary(layers: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    values = summarize_layers(list(layers.values()))
    return {k: v for k, v in values.items() if math.isfinite(v)}


@register("htsr", [FrameKind.WEIGHTS], summarize=_summary, carry=same_values("htsr"))
def heavy_tail_metrics(frame: DecodedFrame, context: AnalysisContext) -> AnalysisResult:
    """HT-SR + FARMS metrics and ESD drill-down records of every weight in the frame.

    A 2-D layer whose exact singular values the frame already holds (``conditioning``, which
    runs first, computes them for itself, ``norms`` and ``grok_rank``) takes its ESD from their
    squares instead of a Gram eigendecomposition of its own."""
    weights = restore_shapes(frame.tensors, frame.header.info.get(SHAPES_INFO_KEY))
    esds = {
        layer: sv.square()
        for layer, w in weights.items()
        if w.ndim == 2 and (sv := shared_singular_values(frame, layer)) is not None
    }
    traps = frame.header.info.get(TRAPS_INFO_KEY) is not False  # on unless the client says no
    report = analyze_weights(weights, farms=FARMS_CV, device=frame.device, esds=esds, traps=traps)
    result = AnalysisResult()
    for layer in report.layers:
        for name, value in layer.values().items():
            if math.isfinite(value):
                result.metrics.append(MetricValue(layer.layer, name, value))
        payload: dict[str, Any] = {
            "analysis": "htsr",
            "shape": list(layer.shape),
            "n_rows": layer.n_rows,
            "n_cols": layer.n_cols,
            "rf": layer.rf,
            "plain": esd_payload(layer.evals, layer.plain),
        }
        if layer.traps is not None and layer.rand_evals is not None:
            payload["plain"]["traps"] = traps_payload(layer.rand_evals, layer.traps)
        if layer.farms is not None and layer.farms_evals is not None:
            payload["farms"] = esd_payload(layer.farms_evals, layer.farms)
            payload["farms_config"] = {
                "window_rows": FARMS_CV.window_rows,
                "aspect_ratio": FARMS_CV.aspect_ratio,
                "windows_per_dim": FARMS_CV.windows_per_dim,
            }
        result.spectra.append(SpectrumRecord(layer.layer, _finite(payload)))
    for skipped in report.skipped:
        result.spectra.append(
            SpectrumRecord(
                skipped.layer,
                {"analysis": "htsr", "shape": list(skipped.shape), "skipped": skipped.reason},
            )
        )
    result.spectra.extend(client_skipped(frame))
    return result  # the whole-model means come from _summary over every part of the snapshot


def _finite(value: Any) -> Any:
    """Replace non-finite floats by ``None`` so the payload is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
