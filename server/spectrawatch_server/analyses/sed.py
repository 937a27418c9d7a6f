"""Spectral Edge Dynamics on sketch frames, and the grokking early-warning score.

``sed`` runs on ``update_sketch`` frames (per-step updates; windows 16/32/64 by default, or
``info["sed"]["windows"]``) and on ``param_sketch`` frames (theta sketches, differenced into the
SED paper's checkpoint-interval displacements; W = 10, keys ``sed.interval.*``; a displacement
across a restart of a row's θ chain, ``info["chain_break"]`` or theta rows that differ from the
previous theta frame's (a run resumed with another trained set), is left out). The trailing
window is assembled from earlier frames of the same kind (``context.recent_frames``), in step
order whatever order frames arrived in; a window with missing steps is computed on the rows
present and flagged with ``sed.incomplete.w<W> = 1``. Per layer and for the whole model
(tensor ``__model__`` when the client sends one, else the concatenation of the layers' sketches,
itself a count-sketch of the concatenated update), at every ``info["sed"]["stride"]``-th row:
``sed.{gap_ratio,edge,margin,signal_rank,incomplete,phase}.w<W>``. Per-layer series of update
frames are kept at every ``layer_stride``-th of those rows: ``info["sed"]["layer_stride"]``, else
1 for up to :data:`LAYER_POINTS_PER_STEP` layers and the smallest power of two that keeps the
layers' points per step at or under it (16 for GPT-2's 149 tensors: ~2.7k instead of ~43k metric
rows per 16-step frame; every window is still computed on all its rows, only the evaluation steps
thin out). Rows are one every ``info["update_every"]`` steps (the client's cadence, which its
``overhead_budget`` may raise during a run): a window spans that many steps per row, and where
older rows are denser (before the cadence rose) it holds the last W of them. ``__model__`` is
evaluated at every row. All layers sharing the same steps, every window size and every new step
go through one :func:`sed.batched_sed` call, on float64 Grams of the assembled rows that the
previous update frame kept (:func:`_stream_grams`: only the new rows' products are computed), and
the stored gap series that phase detection continues are read in one ``metric_tails`` call (their
incomplete windows' flags as flagged steps only: :func:`_partial_steps`).

The grokking detector (``spectrawatch.spectral.grokking``) is evaluated for ``__model__`` on each
frame from the commutator-defect scalars and the per-layer Frobenius norms and effective ranks
stored from weight frames (plus, only when no defect is reported, the collapse of the
checkpoint-interval SED gap); it writes ``grok.warning_score`` and ``grok.imminent`` (0/1) at
the frame's last step. Validation scalars are never read.
``grok_rank`` stores each weight matrix's effective rank (``grok.effective_rank``) for it.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping, Sequence
from functools import partial
from operator import itemgetter
from typing import NamedTuple

import numpy as np
import torch

from spectrawatch.spectral import grokking, sed
from spectrawatch.spectral.norms import FROBENIUS_NORM
from spectrawatch.wire import FrameKind
from spectrawatch_server.analyses.norms import has_spectrum, weight_singular_values
from spectrawatch_server.analyses.registry import (
    MODEL_LAYER,
    AnalysisContext,
    AnalysisResult,
    DecodedFrame,
    MetricValue,
    SpectrumRecord,
    register,
)

MAX_HISTORY_FRAMES = 256
LAYER_POINTS_PER_STEP = 16  # default budget of per-layer SED evaluations per training step
PHASE_HISTORY = 1024  # gap-series points read back for phase detection
DETECTOR_HISTORY = 4096  # points of each detector input series


def _settings(frame: DecodedFrame) -> tuple[tuple[int, ...], int, int, int]:
    """``(windows, stride, layer_stride, every)`` from ``info["sed"]``, the frame's layer count
    and, for update frames, the client's cadence ``info["update_every"]`` (1 when absent).
    ``stride`` and ``layer_stride`` count rows (steps // every), not steps."""
    every = frame.header.info.get("update_every")
    every = every if isinstance(every, int) and every >= 1 else 1
    if frame.header.kind == FrameKind.PARAM_SKETCH:
        every = 1
    cfg = frame.header.info.get("sed")
    cfg = cfg if isinstance(cfg, dict) else {}
    default = (
        (sed.INTERVAL_WINDOW,)
        if frame.header.kind == FrameKind.PARAM_SKETCH
        else sed.DEFAULT_WINDOWS
    )
    windows = cfg.get("windows", default)
    if not isinstance(windows, list | tuple) or not all(
        isinstance(w, int) and sed.MIN_ROWS <= w <= sed.MAX_WINDOW for w in windows
    ):
        windows = default
    stride = cfg.get("stride", 1)
    stride = stride if isinstance(stride, int) and stride >= 1 else 1
    layer_stride = cfg.get("layer_stride")
    if frame.header.kind == FrameKind.PARAM_SKETCH:
        layer_stride = 1  # interval frames are already ~100 steps apart
    elif not (isinstance(layer_stride, int) and layer_stride >= 1):
        layers = sum(1 for n in frame.tensors if n != MODEL_LAYER)
        layer_stride = default_layer_stride(layers, every)
    return tuple(sorted(set(windows))), stride, layer_stride, every


def evaluation_steps(frame: DecodedFrame) -> tuple[list[int], list[int]]:
    """``(model steps, layer steps)``: the steps of a sketch frame's rows at which values are
    kept for the whole model and for each layer (``info["sed"]`` ``stride`` and
    ``layer_stride``, else :func:`default_layer_stride`)."""
    _, stride, layer_stride, every = _settings(frame)
    targets = [s for s in frame.row_steps if (s // every) % stride == 0]
    return targets, [s for s in targets if (s // every) % layer_stride == 0]


def default_layer_stride(layers: int, every: int = 1) -> int:
    """In rows (one every ``every`` steps): 1 while ``layers / every`` is at most
    :data:`LAYER_POINTS_PER_STEP`, else the smallest power of two ``k`` with
    ``layers / (k * every) <= LAYER_POINTS_PER_STEP``."""
    if layers <= LAYER_POINTS_PER_STEP * every:
        return 1
    return 1 << math.ceil(math.log2(layers / (LAYER_POINTS_PER_STEP * every)))


def _joined_rows(frame: DecodedFrame) -> torch.Tensor:
    """The model row of a frame without one: its layers' rows side by side, float64."""
    names = sorted(n for n in frame.tensors if n != MODEL_LAYER)
    return torch.cat([frame.tensors[n].to(torch.float64) for n in names], dim=1)


def _finite_rows(rows: torch.Tensor) -> torch.Tensor:
    """Which rows are finite in float64, squares included (Gram products cannot overflow)."""
    return torch.isfinite(rows.to(torch.float64).square().sum(dim=1))


def _layer_rows(
    frames: Sequence[DecodedFrame], layer: str
) -> tuple[list[int], torch.Tensor, tuple[int, ...]] | None:
    """Rows of ``layer`` over ``frames`` in step order, with the id of the frame each row came
    from; ``None`` when none is usable.

    Rows of another width or projection (a client that changed its sketch dimension, seed or
    hash recipe, e.g. a run resumed by a newer client: ``info["sketch"]``) than the newest
    frame's are left out, and so are rows that are not finite in float64 (NaN/Inf entries, or
    squares that overflow): the frame's ``nonfinite`` count and alert report those, and leaving
    them out keeps one bad step from failing the windows of the clean frames after it (such
    windows are computed on the rows present and flagged incomplete).
    """
    device = frames[-1].device
    chunks = []
    for f in frames:
        if layer in f.tensors:
            rows = f.tensors[layer]
        elif layer == MODEL_LAYER:  # a client that sent no model row: its layers' rows joined
            rows = f.memoised(("joined_rows", layer), partial(_joined_rows, f))
        else:
            continue
        rows, steps = rows.to(device), f.row_steps
        # a frame is history for several frames: its rows are checked once
        finite = f.memoised(("finite_rows", layer), partial(_finite_rows, rows))
        if not bool(finite.all()):
            steps = [s for s, ok in zip(steps, finite.tolist(), strict=True) if ok]
            rows = rows[finite]
        chunks.append((_projection(f), steps, rows, f.frame_id))
    newest, width = chunks[-1][0], chunks[-1][2].shape[1]
    usable = [(s, r, i) for p, s, r, i in chunks if p == newest and r.shape[1] == width and s]
    if not usable:
        return None
    owner = {step: i for s, _, i in usable for step in s}  # a later chunk's row wins
    steps, rows = sed.assemble_rows((s, r) for s, r, _ in usable)
    return steps, rows, tuple(owner[step] for step in steps)


def _projection(frame: DecodedFrame) -> tuple[str, ...]:
    """The sketch projection a frame's rows were made with: comparable only within one."""
    sketch = frame.header.info.get("sketch")
    if not isinstance(sketch, dict):
        return ()
    return tuple(str(sketch.get(k)) for k in ("hash", "seed", "dim", "layer_seed"))


def _off_cadence(frame: DecodedFrame) -> bool:
    """A theta frame the client sent off its ``theta_every`` grid (a session's first step, for
    ``norm.update_ratio``): not a checkpoint of interval SED, whose window is the grid's."""
    return frame.header.info.get("off_cadence") is True


def _chain_breaks(frames: Sequence[DecodedFrame]) -> dict[str, list[int]]:
    """Steps where each row's θ chain restarts, by row name: the first row of each theta frame
    whose ``info["chain_break"]`` names it (the client's trained parameters changed before it:
    its rows are not differenced with earlier ones), or whose rows differ from the previous
    theta frame's (:func:`_changed_rows`: a run resumed with another trained set, a change no
    client process saw)."""
    out: dict[str, list[int]] = {}
    for f in frames:
        if isinstance(names := f.header.info.get("chain_break"), list):
            for name in names:
                out.setdefault(str(name), []).append(f.row_steps[0])
    ordered = sorted(frames, key=lambda f: f.row_steps[0])
    for before, after in itertools.pairwise(ordered):
        for name in _changed_rows(before, after):
            out.setdefault(name, []).append(after.row_steps[0])
    return out


def _changed_rows(before: DecodedFrame, after: DecodedFrame) -> set[str]:
    """Rows of theta frame ``after`` that sum over other parameters than in ``before``, the
    previous one: a row new to the rows or whose ``info["layers"]`` entry (numel, shape, a
    group's tensor count) differs, and ``__model__`` when any row was added, dropped or changed
    (a row that disappears has no displacement to leave out)."""
    old, new = before.tensors.keys() - {MODEL_LAYER}, after.tensors.keys() - {MODEL_LAYER}
    changed = {name for name in new if name not in old or not _same_entry(before, after, name)}
    return (changed | {MODEL_LAYER}) if changed or old != new else set()


def _same_entry(before: DecodedFrame, after: DecodedFrame, row: str) -> bool:
    """Whether two frames' ``info["layers"]`` entries for ``row`` agree; a frame without one
    (an older client's) agrees with any."""
    entries = [f.header.info.get("layers") for f in (before, after)]
    a, b = (e.get(row) if isinstance(e, dict) else None for e in entries)
    return a is None or b is None or a == b


@register("sed", [FrameKind.UPDATE_SKETCH, FrameKind.PARAM_SKETCH])
def spectral_edge_dynamics(frame: DecodedFrame, context: AnalysisContext) -> AnalysisResult:
    """SED metrics for the steps of this frame, per layer and ``__model__``, every window."""
    kind = frame.header.kind
    interval = kind == FrameKind.PARAM_SKETCH
    if interval and _off_cadence(frame):
        return AnalysisResult()
    windows, _, _, every = _settings(frame)
    need = max(windows) + (1 if interval else 0)
    limit = min(MAX_HISTORY_FRAMES, math.ceil(need / len(frame.row_steps)) + 1)
    history = [
        f
        for f in context.recent_frames(kind, limit)
        if f.frame_id != frame.frame_id and not (interval and _off_cadence(f))
    ]
    frames = [*history, frame]
    targets, layer_targets = evaluation_steps(frame)
    layers = sorted(frame.tensors)
    if MODEL_LAYER not in layers:
        layers.append(MODEL_LAYER)
    result = AnalysisResult()
    if not targets:
        return result
    breaks = _chain_breaks(frames) if interval else {}
    by_steps: dict[_Group, list[tuple[str, torch.Tensor]]] = {}
    for layer in layers:
        if layer != MODEL_LAYER and not layer_targets:
            continue
        assembled = _layer_rows(frames, layer)
        if assembled is None:
            continue
        all_steps, rows, owners = assembled
        if interval:
            if len(all_steps) < 2:
                continue
            rows, ends = sed.interval_deltas(rows, all_steps, breaks.get(layer, ()))
            if not ends:
                continue
            key = _Group(layer == MODEL_LAYER, sed.min_step_gap(all_steps), tuple(ends), ())
        else:  # rows every `every` steps; denser older rows (a raised cadence): the last W
            key = _Group(layer == MODEL_LAYER, every if every > 1 else 0, tuple(all_steps), owners)
        by_steps.setdefault(key, []).append((layer, rows))
    found: list[tuple[str, dict[int, list[sed.WindowSED]]]] = []
    for group, members in by_steps.items():
        grams = None if interval else _stream_grams(frames, group, members)
        batch = sed.batched_sed(
            [rows for _, rows in members],
            group.steps,
            windows,
            at=targets if group.model else layer_targets,
            step_interval=group.delta or None,
            grams=grams,
        )
        found.extend((layer, f) for (layer, _), f in zip(members, batch, strict=True))
    past = context.metric_tails(
        {(_key(sed.GAP_RATIO, w, interval), layer): PHASE_HISTORY for layer, f in found for w in f}
    )
    partial = _partial_steps(context, found, past, interval)
    series = []
    for layer, by_window in found:
        for w, windows_found in by_window.items():
            if windows_found:
                gap = (_key(sed.GAP_RATIO, w, interval), layer)
                series.append(_phase_series(windows_found, past.get(gap, []), partial.get(gap)))
    codes = iter(sed.phase_codes_batch([v for v, _ in series], [cut for _, cut in series]))
    for layer, by_window in found:
        phases = {w: next(codes) for w, windows_found in by_window.items() if windows_found}
        _layer_result(result, layer, by_window, interval, phases)
    result.metrics.extend(_grokking_metrics(frame, context, result.metrics, layers))
    return result


class _Group(NamedTuple):
    """Tensors whose SED goes through one :func:`sed.batched_sed` call: the model row or
    layers, the step interval (0: the smallest present), the row steps and, for update frames,
    the id of the frame each row came from."""

    model: bool
    delta: int
    steps: tuple[int, ...]
    owners: tuple[int, ...]


_GRAM = "sed.grams"  # frame.memo: Grams of the rows its update-frame SED assembled, per group
_GRAM_ROWS = "sed.gram_rows"  # ... and the (frame id, step) of each of their rows


def _stream_grams(
    frames: Sequence[DecodedFrame], group: _Group, members: Sequence[tuple[str, torch.Tensor]]
) -> torch.Tensor:
    """float64 Grams ``(L, N, N)`` of the group's assembled rows, kept on the newest frame.

    The previous frame kept the Grams of its own assembled rows (:data:`_GRAM`): when this
    frame's rows are a suffix of those followed by rows of this frame, their trailing block is
    reused and only the new rows' products are computed (:func:`sed.extend_grams`); the
    previous frame's copy is dropped then (the next frame reads this one's), so a stream keeps
    one. Otherwise (the first frame, frames analysed out of order, a replay, another worker's
    history) every product is computed as :func:`sed.layer_grams` would.
    """
    newest = frames[-1]
    name = ("\n" if group.model else "") + "\n".join(layer for layer, _ in members)
    ident = torch.tensor([group.owners, group.steps], dtype=torch.int64)
    new = sum(1 for owner in group.owners if owner == newest.frame_id)
    keep = len(group.steps) - new
    rows = [r for _, r in members]
    grams = None
    if (
        keep > 0
        and new
        and len(frames) > 1
        and all(o == newest.frame_id for o in group.owners[keep:])
    ):
        previous = frames[-2]
        before = previous.memo.get((_GRAM, name))
        seen = previous.memo.get((_GRAM_ROWS, name))
        if (
            isinstance(before, torch.Tensor)
            and isinstance(seen, torch.Tensor)
            and seen.shape[1] >= keep
            and torch.equal(seen[:, seen.shape[1] - keep :], ident[:, :keep])
            and before.device == rows[0].device
        ):
            last = before.shape[-1]
            grams = sed.extend_grams(
                before[:, last - keep :, last - keep :],
                [r[:keep] for r in rows],
                [r[keep:] for r in rows],
            )
            previous.memo.pop((_GRAM, name), None)
            previous.memo.pop((_GRAM_ROWS, name), None)
    if grams is None:
        grams = sed.layer_grams(rows)
    newest.memo[(_GRAM, name)] = grams
    newest.memo[(_GRAM_ROWS, name)] = ident
    return grams


def _partial_steps(
    context: AnalysisContext,
    found: Sequence[tuple[str, Mapping[int, object]]],
    past: Mapping[tuple[str, str], list[tuple[int, float]]],
    interval: bool,
) -> dict[tuple[str, str], set[int]]:
    """Steps of incomplete windows among the stored gap series ``past``, by ``(gap key,
    layer)``: per window size, the ``sed.incomplete`` flags from the oldest step of its gap
    tails on. The flag and gap series are written together, so these are the flags of those
    tails' points; read as flagged steps only (one index range returning a few rows), not as
    the 1,024-point flag series per layer and window, which doubled the SED history read."""
    since: dict[int, int] = {}
    for layer, by_window in found:
        for w in by_window:
            gaps = past.get((_key(sed.GAP_RATIO, w, interval), layer))
            if gaps:
                since[w] = min(since.get(w, gaps[0][0]), gaps[0][0])
    out: dict[tuple[str, str], set[int]] = {}
    for w, first in since.items():
        flagged = context.flagged_steps(_key(sed.INCOMPLETE, w, interval), first)
        out.update(((_key(sed.GAP_RATIO, w, interval), lay), s) for lay, s in flagged.items())
    return out


def _phase_series(
    found: list[sed.WindowSED], gaps: list[tuple[int, float]], partial: set[int] | None
) -> tuple[np.ndarray, int]:
    """The gap series that phase detection runs on for one layer and window size, and the index
    of its first new point: the stored points of complete windows (``gaps`` less the steps in
    ``partial``) before the first new window, then the new complete windows' gaps. Phases are
    detected on complete windows only: a window of a few rows has a large, meaningless gap,
    which made its peak and every later point a "collapse"."""
    # (filtering every stored point cost ~1/4 of a GPT-2-sized frame's analysis)
    stored = [(s, v) for s, v in gaps if s not in partial] if partial else gaps
    cut = bisect.bisect_left(stored, found[0].step, key=lambda p: p[0])
    old = np.fromiter(map(itemgetter(1), itertools.islice(stored, cut)), np.float64, cut)
    new = np.fromiter((w.gap_ratio for w in found if w.complete), np.float64)
    return np.concatenate([old, new]), cut


def _layer_result(
    result: AnalysisResult,
    layer: str,
    found_by_window: dict[int, list[sed.WindowSED]],
    interval: bool,
    phases: Mapping[int, list[sed.Phase]],
) -> None:
    """Append one layer's metrics and its spectrum record (latest window of each size);
    ``phases`` holds the phase of each complete new window, per window size."""
    payload: dict[str, object] = {"analysis": "sed", "interval": interval, "windows": {}}
    for w, found in found_by_window.items():
        if not found:
            continue
        result.metrics.extend(_window_metrics(found, layer, w, interval, phases[w]))
        last = found[-1]
        payload["windows"][str(w)] = {  # type: ignore[index]
            "step": last.step,
            "n_rows": last.n_rows,
            "singular_values": list(last.singular_values),
            "normalized": list(last.normalized),
            "edge": last.edge,
        }
    if payload["windows"]:
        result.spectra.append(SpectrumRecord(layer, payload))


def _key(name: str, window: int, interval: bool) -> str:
    return sed.interval_key(name, window) if interval else sed.windowed_key(name, window)


_WINDOW_NAMES = (sed.GAP_RATIO, sed.EDGE, sed.MARGIN, sed.SIGNAL_RANK, sed.INCOMPLETE, sed.PHASE)


def _window_metrics(
    found: list[sed.WindowSED],
    layer: str,
    window: int,
    interval: bool,
    phases: list[sed.Phase],
) -> list[MetricValue]:
    """Metrics of one layer's windows; ``phases`` are those of its complete windows
    (:func:`_phase_series`); an incomplete window's phase is UNKNOWN."""
    keys = [_key(name, window, interval) for name in _WINDOW_NAMES]
    codes = iter(phases)
    out: list[MetricValue] = []
    for w in found:
        phase = next(codes) if w.complete else sed.Phase.UNKNOWN
        numbers = (
            w.gap_ratio,
            float(w.edge),
            w.margin,
            float(w.signal_rank),
            0.0 if w.complete else 1.0,
            float(phase),
        )
        out.extend(
            MetricValue(layer, k, v, step=w.step) for k, v in zip(keys, numbers, strict=True)
        )
    return out


def _total_norm(context: AnalysisContext, layers: Sequence[str]) -> list[tuple[int, float]]:
    """Total Frobenius norm of the weight matrices, on steps where every matrix was seen."""
    sums: dict[int, tuple[float, int]] = {}
    seen = 0
    tails = context.metric_tails({(FROBENIUS_NORM, layer): DETECTOR_HISTORY for layer in layers})
    for layer in layers:
        series = tails.get((FROBENIUS_NORM, layer))
        if not series:
            continue
        seen += 1
        for s, v in series:
            total, count = sums.get(s, (0.0, 0))
            sums[s] = (total + v * v, count + 1)
    return [(s, math.sqrt(t)) for s, (t, c) in sorted(sums.items()) if c == seen and seen]


def _probe_size(positions: Sequence[tuple[int, float]]) -> int | None:
    """The client's latest ``probe.prediction_positions``, if it is a usable count."""
    if not positions:
        return None
    value = positions[-1][1]
    return int(value) if math.isfinite(value) and 1 <= value <= 2**53 else None


def _grokking_metrics(
    frame: DecodedFrame,
    context: AnalysisContext,
    new: Sequence[MetricValue],
    layers: Sequence[str],
) -> list[MetricValue]:
    matrices = [layer for layer in layers if layer != MODEL_LAYER]
    defect = context.scalar_series(grokking.COMMUTATOR_DEFECT, DETECTOR_HISTORY)
    agreement = context.scalar_series(grokking.PREDICTION_AGREEMENT, DETECTOR_HISTORY)
    positions = context.scalar_series(grokking.PREDICTION_POSITIONS, 1) if agreement else []
    confidence = context.scalar_series(grokking.PREDICTION_CONFIDENCE, DETECTOR_HISTORY)
    per_matrix = (grokking.EFFECTIVE_RANK, grokking.HTSR_ALPHA)
    wanted = {(name, layer): DETECTOR_HISTORY for name in per_matrix for layer in matrices}
    wanted[grokking.OUTPUT_RANK, MODEL_LAYER] = DETECTOR_HISTORY
    tails = context.metric_tails(wanted)
    output_rank = tails.get((grokking.OUTPUT_RANK, MODEL_LAYER))
    rank, alpha = (
        {layer: series for layer in matrices if (series := tails.get((name, layer)))}
        for name in per_matrix
    )
    gap_key = sed.interval_key(sed.GAP_RATIO)
    gap = dict(context.metric_series(gap_key, MODEL_LAYER, PHASE_HISTORY))
    gap.update(
        {
            m.step: m.value
            for m in new
            if m.layer == MODEL_LAYER and m.name == gap_key and m.step is not None
        }
    )
    collapse = None
    if gap and not defect:
        # measured (benchmarks/results/sed.md): with the defect, adding the SED collapse gained
        # 400 steps of lead but raised a false alarm on a non-grokking a^3+ab run; without the
        # probe it is the only second piece of evidence besides the weights.
        steps = sorted(gap)
        collapse = sed.detect_phases(steps, [gap[s] for s in steps]).collapse_start
    warning = grokking.detect_grokking(
        defect=defect or None,
        weight_norm=_total_norm(context, matrices) or None,
        effective_rank=rank or None,
        sed_collapse_step=collapse,
        alpha=alpha or None,
        agreement=agreement or None,
        probe_size=_probe_size(positions),
        confidence=confidence or None,
        output_rank=output_rank or None,
    )
    last = frame.row_steps[-1]
    score = [v for s, v in warning.score if s <= last]
    out = [
        MetricValue(MODEL_LAYER, grokking.WARNING_SCORE, score[-1] if score else 0.0, step=last),
        MetricValue(
            MODEL_LAYER,
            grokking.IMMINENT,
            1.0 if warning.step is not None and warning.step <= last else 0.0,
            step=last,
        ),
    ]
    # the evidence behind the score (the grokking_imminent alert quotes it): per piece present,
    # the step at which it appeared
    out.extend(
        MetricValue(MODEL_LAYER, grokking.EVIDENCE_PREFIX + piece, float(at), step=last)
        for piece, at in warning.evidence.steps().items()
        if at <= last
    )
    return out


@register("grok_rank", [FrameKind.WEIGHTS])
def weight_effective_rank(frame: DecodedFrame, context: AnalysisContext) -> AnalysisResult:
    """Effective rank exp(H) of every weight matrix (an input of the grokking detector), from
    the frame's singular values shared with the ``norms`` analysis."""
    result = AnalysisResult()
    head = frame.header.info.get("output_layer")  # named by the client in the part holding it
    for layer, weights in frame.tensors.items():
        if weights.ndim == 2 and min(weights.shape) > 1 and has_spectrum(frame, layer):
            value = grokking.effective_rank_of(weight_singular_values(frame, layer))
            result.metrics.append(MetricValue(layer, grokking.EFFECTIVE_RANK, value))
            if layer == head:  # the detector reads it as one run-level series
                result.metrics.append(MetricValue(MODEL_LAYER, grokking.OUTPUT_RANK, value))
    return result
