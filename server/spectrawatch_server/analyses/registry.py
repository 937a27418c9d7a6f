"""The analysis registry: pure functions registered per frame kind, run by the worker.

An analysis receives one decoded frame (tensors already on the worker's device) and an
:class:`AnalysisContext` for read-only access to the run's history; it returns metric values
and optional spectrum records. It does no I/O of its own: the worker stores the result, upserted
on ``(frame, analysis, layer, name)``, so running a job twice duplicates nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

import torch

from spectrawatch.wire import MODEL_LAYER as MODEL_LAYER  # layer name for whole-model metrics
from spectrawatch.wire import FrameHeader, FrameKind

_Memo = TypeVar("_Memo", torch.Tensor, bool)


@dataclass(frozen=True)
class MetricValue:
    """One number: ``name`` (dotted key) of ``layer`` at ``step`` (defaults to the frame's)."""

    layer: str
    name: str
    value: float
    step: int | None = None


@dataclass(frozen=True)
class SpectrumRecord:
    """A JSON-able spectrum summary for one layer (histogram, fit...), for drill-down plots."""

    layer: str
    payload: dict[str, Any]


@dataclass
class AnalysisResult:
    """What an analysis returns; empty lists are a valid answer."""

    metrics: list[MetricValue] = field(default_factory=list)
    spectra: list[SpectrumRecord] = field(default_factory=list)


@dataclass(frozen=True)
class DecodedFrame:
    """A frame as analyses see it: validated header and tensors on ``device``."""

    run_id: int
    frame_id: int
    header: FrameHeader
    tensors: dict[str, torch.Tensor]
    device: torch.device
    memo: dict[tuple[str, str], torch.Tensor | bool] = field(
        default_factory=dict, repr=False, compare=False
    )
    """Per-frame results shared between analyses, keyed ``(what, layer)`` (see
    :func:`spectrawatch_server.analyses.norms.weight_singular_values`)."""

    def memoised(self, key: tuple[str, str], compute: Callable[[], _Memo]) -> _Memo:
        """``compute()`` once per frame and ``key``: a frame is read by several analyses and,
        as history, by the analyses of later frames."""
        if key not in self.memo:
            self.memo[key] = compute()
        return cast(_Memo, self.memo[key])

    @property
    def step(self) -> int:
        return self.header.step

    @property
    def row_steps(self) -> list[int]:
        """The steps of a sketch frame's rows (``info["steps"]``), else ``[step]``."""
        steps = self.header.info.get("steps")
        if isinstance(steps, list) and steps:
            return [int(s) for s in steps]
        return [self.step]


class AnalysisContext(Protocol):
    """Read-only history of the run the frame belongs to (supplied by the worker): earlier
    frames, and metric and scalar points at steps up to the frame's last (a sketch frame's last
    row), so a frame analysed again with later frames' results stored reads what it read the
    first time."""

    def recent_frames(self, kind: FrameKind, limit: int) -> list[DecodedFrame]:
        """Up to ``limit`` earlier frames of ``kind`` of this run (lower seq), oldest first."""
        ...

    def frames_holding(self, kind: FrameKind, layers: Collection[str]) -> dict[str, DecodedFrame]:
        """For each of ``layers``, the newest earlier frame of ``kind`` of this run (lower seq,
        lower step) holding it; layers none holds are absent. A weight snapshot comes in parts:
        this finds each layer's previous snapshot, decoding only the frames it returns."""
        ...

    def metric_series(self, name: str, layer: str, limit: int) -> list[tuple[int, float]]:
        """The last ``limit`` stored ``(step, value)`` points of a metric, oldest first."""
        ...

    def metric_tails(
        self, wanted: Mapping[tuple[str, str], int]
    ) -> dict[tuple[str, str], list[tuple[int, float]]]:
        """:meth:`metric_series` of many ``(name, layer): limit`` series at once (a few queries
        instead of one per series); series with no points may be absent."""
        ...

    def flagged_steps(self, name: str, since: int) -> dict[str, set[int]]:
        """Per layer, the steps from ``since`` on where metric ``name`` (a 0/1 flag such as
        ``sed.incomplete.w16``) is stored non-zero: the few flagged points of a flag series,
        not its every point; layers with none may be absent."""
        ...

    def scalar_series(self, name: str, limit: int) -> list[tuple[int, float]]:
        """The last ``limit`` client-logged ``(step, value)`` scalars, oldest first."""
        ...


AnalysisFn = Callable[[DecodedFrame, AnalysisContext], AnalysisResult]


SummarizeFn = Callable[[Mapping[str, Mapping[str, float]]], dict[str, float]]
"""Whole-model values of one step from ``{layer: {metric name: value}}`` of that step."""

CarryFn = Callable[[Mapping[str, Mapping[str, float]]], dict[str, float]]
"""An analysis's values at a weight snapshot for a layer it left out as unchanged (a frozen
weight the client named in ``info["unchanged"]``), from what every analysis stored for the layer
at the snapshot that last held it, ``{analysis: {metric name: value}}``; what the summary of
the later snapshot reads for that layer ({}: none)."""


def same_values(analysis: str) -> CarryFn:
    """:data:`CarryFn` of an ``analysis`` whose values are a function of the weight alone: an
    unchanged weight has the values it had."""

    def carry(stored: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        return dict(stored.get(analysis, {}))

    return carry


@dataclass(frozen=True)
class Analysis:
    """A registered analysis: a stable ``name``, the frame ``kinds`` it runs on, and optionally
    how its per-layer values of a step make the :data:`MODEL_LAYER` values (``summarize``) and
    what a weight left out of a snapshot as unchanged adds to them (``carry``)."""

    name: str
    kinds: frozenset[FrameKind]
    fn: AnalysisFn
    summarize: SummarizeFn | None = None
    carry: CarryFn | None = None


_REGISTRY: dict[str, Analysis] = {}


def register(
    name: str,
    kinds: Sequence[FrameKind],
    summarize: SummarizeFn | None = None,
    carry: CarryFn | None = None,
) -> Callable[[AnalysisFn], AnalysisFn]:
    """Decorator: register ``fn`` as analysis ``name`` for frames of ``kinds``.

    ``summarize``: the analysis leaves :data:`MODEL_LAYER` out of its results; after storing a
    frame's results the worker hands it every layer's values stored for the step (a weight
    snapshot arrives in several frames) and stores what it returns as the step's only
    whole-model values, under the run's lock, so parts analysed in any order or by several
    workers end with one summary of the whole snapshot. ``carry``: with ``summarize``, the
    values a weight the snapshot left out as unchanged (:data:`CarryFn`) adds to the layers
    handed to it, so whole-model values stay comparable across snapshots (None: it adds none).
    """

    def wrap(fn: AnalysisFn) -> AnalysisFn:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"analysis {name!r} is registered twice")
        _REGISTRY[name] = Analysis(name, frozenset(kinds), fn, summarize, carry)
        return fn

    return wrap


def analyses_for(kind: FrameKind) -> list[Analysis]:
    """Registered analyses for a frame kind, in name order (deterministic)."""
    from spectrawatch_server.analyses import load_all

    load_all()
    return sorted((a for a in _REGISTRY.values() if kind in a.kinds), key=lambda a: a.name)
