"""The analysis worker's I/O loop for one frame: load blob -> spectral analyses -> store -> rules.

Analyses are pure functions (``spectrawatch_server.analyses``); this module is the only place
that feeds them tensors and stores what they return. Results replace earlier results of the
same (frame, analysis), so a redelivered job duplicates nothing. Alert rules run on a frame's
first analysis only: a re-analysis (``requeued_at`` set) recomputes results, never episodes.

A weight snapshot's whole-model values (each analysis's ``summarize``) cover the layers stored
at its step and the frozen weights the client left out as unchanged (``info["unchanged"]``,
``{layer: step last sent}``), whose values of that step each analysis carries forward
(``carry``): a LoRA run's ``__model__`` means covered its adapters alone from the second
snapshot on. Carried values are those stored when the later snapshot is analysed.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker

from spectrawatch.wire import (
    SKETCH_KINDS,
    FrameKind,
    FrameLimits,
    decode_frame,
    decompress,
    row_steps,
)
from spectrawatch_server.analyses import AnalysisResult, DecodedFrame, analyses_for
from spectrawatch_server.analyses.registry import MODEL_LAYER, Analysis
from spectrawatch_server.db.models import Frame
from spectrawatch_server.storage import job_store, metric_reads, result_store, series
from spectrawatch_server.storage import repository as repo
from spectrawatch_server.storage.blobs import BlobStore

log = logging.getLogger(__name__)

ResultHook = Callable[[Session, Frame], None]
"""Called inside the results transaction after a frame's analyses are stored (alert rules)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; explicit names are honoured."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


class MissingBlob(FileNotFoundError):
    """A frame's blob is not in the blob store (deleted by hand, a lost file, a bucket's
    lifecycle rule): the frame cannot be analysed, and later frames read history without it."""

    def __init__(self, frame: Frame) -> None:
        super().__init__(
            f"frame {frame.id} (run {frame.run_id}, {frame.kind}, step {frame.step}): "
            f"blob {frame.blob_key!r} is missing from the blob store"
        )
        self.frame_id = frame.id


MISSING_REPORTED = 4096  # frame ids whose missing blob the loader remembers having logged


class FrameLoader:
    """Reads and decodes frame blobs onto the worker device.

    Sketch frames are kept, decoded, in a small LRU cache (``cache_bytes`` of tensors): each
    frame's SED reads the frames before it as its windows' history (a GPT-2-sized update frame:
    ~3 ms to read and decode, 5 history frames for W = 64), so without it every frame is decoded
    up to ``1 + W / rows`` times. Keyed by the frame's id, blob, creation time and size (a
    database may reuse a deleted run's ids); analyses never write into a frame's tensors.
    """

    def __init__(
        self,
        blobs: BlobStore,
        device: torch.device,
        limits: FrameLimits,
        max_bytes: int,
        cache_bytes: int,
    ):
        self.blobs = blobs
        self.device = device
        self.limits = limits
        self.max_bytes = max_bytes
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple[object, ...], tuple[DecodedFrame, int]] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()
        self.hits = 0
        self._reported: set[int] = set()

    def load(self, frame: Frame) -> DecodedFrame:
        if frame.kind not in SKETCH_KINDS or self.cache_bytes <= 0:
            return self._load(frame)
        key = (frame.id, frame.blob_key, frame.created_at, frame.bytes)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit[0]
        decoded = self._load(frame)
        size = sum(t.numel() * t.element_size() for t in decoded.tensors.values())
        with self._lock:
            if key not in self._cache and size <= self.cache_bytes:
                self._cache[key] = (decoded, size)
                self._cached += size
                while self._cached > self.cache_bytes:
                    _, (_, gone) = self._cache.popitem(last=False)
                    self._cached -= gone
        return decoded

    def report_missing(self, missing: MissingBlob, reader: Frame) -> None:
        """Log, once per frame and process, that a history frame's blob is gone: every later
        frame whose history covers it would say so again."""
        with self._lock:
            if missing.frame_id in self._reported:
                return
            if len(self._reported) >= MISSING_REPORTED:
                self._reported.clear()
            self._reported.add(missing.frame_id)
        log.warning(
            "%s; frame %d and later frames are analysed without it (a gap in their history)",
            missing,
            reader.id,
        )

    def _load(self, frame: Frame) -> DecodedFrame:
        try:
            data = self.blobs.read(frame.blob_key)
        except FileNotFoundError as exc:
            raise MissingBlob(frame) from exc
        if frame.encoding == "zstd":
            data = decompress(data, self.max_bytes)
        header, tensors = decode_frame(data, self.limits)
        on_device = {name: t.to(self.device, non_blocking=True) for name, t in tensors.items()}
        return DecodedFrame(frame.run_id, frame.id, header, on_device, self.device)


class RunHistory:
    """:class:`AnalysisContext` over the database and blob store, for one frame's run.

    History is what the run held up to this frame: earlier frames (lower seq), and metric and
    scalar points at steps up to the frame's last (:attr:`until`). A frame analysed again while
    later frames' results are stored, one of a resumed run re-sending earlier steps, or one
    analysed behind scalars logged far ahead, reads the series as they stood at its steps, not
    their newest points: "the last N points" of a series were the later frames' (EigenTrack's
    change score had no history left, SED's phases continued from points after the frame).

    An earlier frame whose blob is missing from the store is read as a pruned one: left out,
    and the query asked again without it, so the frames before it fill its place (SED windows
    over its steps come out incomplete). It failed the analysis of every later frame whose
    history covered it (SED: up to ``1 + W / rows`` frames)."""

    def __init__(self, session: Session, loader: FrameLoader, frame: Frame) -> None:
        self.session = session
        self.loader = loader
        self.frame = frame
        self.until = max([frame.step, *(row_steps(frame.kind, frame.info or {}) or [])])
        self._cache: dict[int, DecodedFrame] = {}
        self._missing: set[int] = set()  # ids of earlier frames whose blob is missing

    def recent_frames(self, kind: FrameKind, limit: int) -> list[DecodedFrame]:
        while True:  # each pass leaves out at least one more frame, or returns
            rows = repo.recent_frames(
                self.session, self.frame.run_id, kind.value, self.frame.seq, limit, self._missing
            )
            decoded = self._decoded_all(rows)
            if decoded is not None:
                return list(decoded.values())

    def frames_holding(self, kind: FrameKind, layers: Collection[str]) -> dict[str, DecodedFrame]:
        frame = self.frame
        while True:
            rows = repo.frames_holding(
                self.session, frame.run_id, kind.value, frame.seq, frame.step, layers, self._missing
            )
            decoded = self._decoded_all(list(rows.values()))
            if decoded is not None:
                return {layer: decoded[row.id] for layer, row in rows.items()}

    def _decoded_all(self, rows: Sequence[Frame]) -> dict[int, DecodedFrame] | None:
        """``rows`` decoded by id, in order; ``None`` when a blob was missing (its frame is
        noted in ``_missing`` and reported)."""
        out: dict[int, DecodedFrame] = {}
        for row in rows:
            if row.id in out or row.id in self._missing:  # a frame holding several layers
                continue
            try:
                out[row.id] = self._decoded(row)
            except MissingBlob as missing:
                self._missing.add(row.id)
                self.loader.report_missing(missing, self.frame)
        return None if any(row.id in self._missing for row in rows) else out

    def _decoded(self, row: Frame) -> DecodedFrame:
        """``row`` decoded, once per analysed frame (the loader caches sketch frames longer)."""
        if row.id not in self._cache:
            self._cache[row.id] = self.loader.load(row)
        return self._cache[row.id]

    def metric_series(self, name: str, layer: str, limit: int) -> list[tuple[int, float]]:
        run_id = self.frame.run_id
        return metric_reads.metric_tail(self.session, run_id, name, layer, limit, self.until)

    def metric_tails(
        self, wanted: Mapping[tuple[str, str], int]
    ) -> dict[tuple[str, str], list[tuple[int, float]]]:
        return series.metric_tails(self.session, self.frame.run_id, wanted, self.until)

    def flagged_steps(self, name: str, since: int) -> dict[str, set[int]]:
        return series.flagged_steps(self.session, self.frame.run_id, name, since, self.until)

    def scalar_series(self, name: str, limit: int) -> list[tuple[int, float]]:
        return metric_reads.scalar_tail(self.session, self.frame.run_id, name, limit, self.until)


class Worker:
    """Runs every registered analysis on one frame and stores the results atomically."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        loader: FrameLoader,
        hooks: Sequence[ResultHook] = (),
    ) -> None:
        self.sessions = sessions
        self.loader = loader
        self.hooks = list(hooks)

    @property
    def device(self) -> torch.device:
        return self.loader.device

    def process(self, frame_id: int) -> None:
        """Analyse frame ``frame_id``; raises on I/O failure so the queue can retry."""
        with self.sessions() as session:
            frame = session.get(Frame, frame_id)
            if frame is None:  # its run was deleted (or a job outlived its frame)
                log.info("job for missing frame %d dropped", frame_id)
                return
            try:
                decoded = self.loader.load(frame)
            except Exception:
                session.rollback()
                if session.get(Frame, frame_id) is None:  # deleted with its run meanwhile
                    log.info("frame %d deleted before its analysis; job dropped", frame_id)
                    return
                raise
            history = RunHistory(session, self.loader, frame)
            outputs: list[tuple[Analysis, AnalysisResult]] = []
            errors: list[str] = []
            took: dict[str, float] = {}
            analyses = analyses_for(decoded.header.kind)
            for analysis in analyses:
                started = time.perf_counter()
                try:
                    outputs.append((analysis, analysis.fn(decoded, history)))
                except Exception as exc:  # one broken analysis must not block the others
                    log.exception("analysis %s failed on frame %d", analysis.name, frame_id)
                    errors.append(f"{analysis.name}: {exc!r}")
                took[analysis.name] = time.perf_counter() - started
            slowest = max(took, key=took.__getitem__, default="-")
            log.info(
                "frame %d (%s, step %d) analysed in %.2f s (slowest: %s %.2f s)",
                frame_id,
                decoded.header.kind.value,
                decoded.header.step,
                sum(took.values()),
                slowest,
                took.get(slowest, 0.0),
            )
            session.rollback()  # end the read transaction; SQLite cannot upgrade it safely
            with session.begin():
                # The run's row lock first, as ingest and deletion take it (PostgreSQL): a
                # deletion waits until these results are in and deletes them too, or has made
                # the run a tombstone; one lock order, so no deadlock with a deletion
                frame = session.get(Frame, frame_id, populate_existing=True)
                if frame is not None and not repo.live_runs(session, [frame.run_id]):
                    frame = None
                if frame is None:  # its run was deleted meanwhile
                    log.info("frame %d deleted during its analysis; results dropped", frame_id)
                    return
                carried: dict[str, dict[str, dict[str, float]]] | None = None
                for analysis, result in outputs:
                    self._store(session, frame, analysis.name, result)
                    if analysis.summarize is not None:
                        if carried is None:  # once per frame, for every summary
                            carried = self._carried(session, frame, [a.name for a in analyses])
                        self._summarize(session, frame, analysis, carried)
                error = "; ".join(errors) or None
                job_store.finish_frame(session, frame.id, "failed" if errors else "done", error)
                if frame.requeued_at is None:  # a re-analysis: its alerts were evaluated once
                    for hook in self.hooks:
                        hook(session, frame)

    @staticmethod
    def _carried(
        session: Session, frame: Frame, analyses: Sequence[str]
    ) -> dict[str, dict[str, dict[str, float]]]:
        """``{layer: {analysis: {name: value}}}`` of the frozen weights the snapshot at the
        frame's step left out as unchanged (:func:`~repo.unchanged_layers`), as ``analyses``
        stored them at the step each was last sent (a carry may read another's values)."""
        if frame.kind != FrameKind.WEIGHTS.value:
            return {}
        since = repo.unchanged_layers(session, frame.run_id, frame.step)
        by_step: dict[int, list[str]] = {}
        for layer, step in since.items():
            by_step.setdefault(step, []).append(layer)
        out: dict[str, dict[str, dict[str, float]]] = {}
        for step, layers in by_step.items():
            stored = result_store.layer_values_by_analysis_at(
                session, frame.run_id, step, analyses, MODEL_LAYER
            )
            out.update((layer, stored[layer]) for layer in layers if layer in stored)
        return out

    @staticmethod
    def _summarize(
        session: Session,
        frame: Frame,
        analysis: Analysis,
        carried: Mapping[str, Mapping[str, Mapping[str, float]]],
    ) -> None:
        """The step's whole-model values from every layer stored for it (all parts of a
        weight snapshot) and the ``carried`` values of the weights it left out as unchanged,
        replacing the summary an earlier part wrote."""
        assert analysis.summarize is not None
        layers = result_store.layer_values_at(
            session, frame.run_id, frame.step, analysis.name, MODEL_LAYER
        )
        if analysis.carry is not None:
            for layer, stored in carried.items():
                if layer not in layers and (values := analysis.carry(stored)):
                    layers[layer] = values
        values = analysis.summarize(layers) if layers else {}
        result_store.replace_model_values(
            session, frame.run_id, frame.id, frame.step, analysis.name, MODEL_LAYER, values
        )

    @staticmethod
    def _store(session: Session, frame: Frame, analysis: str, result: AnalysisResult) -> None:
        metrics = [
            result_store.MetricRow(
                m.layer, m.name, frame.step if m.step is None else m.step, float(m.value)
            )
            for m in result.metrics
        ]
        spectra = [result_store.SpectrumRow(s.layer, _jsonable(s.payload)) for s in result.spectra]
        result_store.replace_results(
            session, frame.run_id, frame.id, frame.step, analysis, metrics, spectra
        )


def _jsonable(value: Any) -> Any:
    """Turn tensors/numpy values and non-finite floats into plain JSON values."""
    if isinstance(value, float):  # numpy's float64 too: stored as a plain float
        return result_store.finite_or_none(float(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if all(type(v) is float for v in value):  # spectra: long lists of floats, no recursion
            return [v if math.isfinite(v) else None for v in value]
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    return value
