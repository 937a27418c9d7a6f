"""In-memory stand-ins for what the worker hands an analysis: a decoded frame and run history."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch

from spectrawatch.wire import FrameHeader, FrameKind
from spectrawatch_server.analyses.registry import DecodedFrame


class StubHistory:
    """An :class:`AnalysisContext` over given earlier frames (oldest first), metric and scalar
    series; ``step``: the analysed frame's, which :meth:`frames_holding` stays below."""

    def __init__(
        self,
        frames: list[DecodedFrame] | None = None,
        series: dict[tuple[str, str], list[tuple[int, float]]] | None = None,
        scalars: dict[str, list[tuple[int, float]]] | None = None,
        step: int | None = None,
    ) -> None:
        self.frames = frames or []
        self.series = series or {}
        self.scalars = scalars or {}
        self.step = step

    def recent_frames(self, kind: FrameKind, limit: int) -> list[DecodedFrame]:
        return [f for f in self.frames if f.header.kind == kind][-limit:]

    def frames_holding(self, kind: FrameKind, layers: Collection[str]) -> dict[str, DecodedFrame]:
        out: dict[str, DecodedFrame] = {}
        for f in self.frames:  # oldest first: the newest holding a layer stays
            if f.header.kind == kind and (self.step is None or f.step < self.step):
                out.update({layer: f for layer in layers if layer in f.tensors})
        return out

    def metric_series(self, name: str, layer: str, limit: int) -> list[tuple[int, float]]:
        return self.series.get((name, layer), [])[-limit:]

    def metric_tails(
        self, wanted: Mapping[tuple[str, str], int]
    ) -> dict[tuple[str, str], list[tuple[int, float]]]:
        return {k: self.metric_series(*k, n) for k, n in wanted.items()}

    def flagged_steps(self, name: str, since: int) -> dict[str, set[int]]:
        out: dict[str, set[int]] = {}
        for (n, layer), points in self.series.items():
            flagged = {s for s, v in points if n == name and s >= since and v != 0}
            if flagged:
                out[layer] = flagged
        return out

    def scalar_series(self, name: str, limit: int) -> list[tuple[int, float]]:
        return self.scalars.get(name, [])[-limit:]


def decoded_frame(
    kind: FrameKind,
    step: int,
    tensors: dict[str, torch.Tensor],
    info: dict[str, Any] | None = None,
    *,
    frame_id: int = 1,
    seq: int | None = None,
) -> DecodedFrame:
    """A CPU :class:`DecodedFrame` of run 1 (``seq`` defaults to ``step``)."""
    header = FrameHeader(kind, step, step if seq is None else seq, info or {}, (), 0)
    return DecodedFrame(1, frame_id, header, tensors, torch.device("cpu"))
