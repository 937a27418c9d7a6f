"""The analysis worker's I/O loop for one frame: load blob -> spectral analyses -> store -> rules.

Analyses are pure functions (``spectrawatch_server.analyses``); this module is the only place
that feeds them tensors and stores what they return. Results replace earlier results of the
same (frame, analysis), so a redelivered job duplicates nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker

from spectrawatch.wire import FrameKind, FrameLimits, decode_frame, decompress
from spectrawatch_server.analyses import AnalysisResult, DecodedFrame, analyses_for
from spectrawatch_server.analyses.registry import MODEL_LAYER, Analysis, SummarizeFn
from spectrawatch_server.db.models import Frame
from spectrawatch_server.storage import repository as repo
from spectrawatch_server.storage import series
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


class FrameLoader:
    """Reads and decodes frame blobs onto the worker device."""

    def __init__(self, blobs: BlobStore, device: torch.device, limits: FrameLimits, max_bytes: int):
        self.blobs = blobs
        self.device = device
        self.limits = limits
        self.max_bytes = max_bytes

    def load(self, frame: Frame) -> DecodedFrame:
        data = self.blobs.read(frame.blob_key)
        if frame.encoding == "zstd":
            data = decompress(data, self.max_bytes)
        header, tensors = decode_frame(data, self.limits)
        on_device = {name: t.to(self.device, non_blocking=True) for name, t in tensors.items()}
        return DecodedFrame(frame.run_id, frame.id, header, on_device, self.device)


class RunHistory:
    """:class:`AnalysisContext` over the database and blob store, for one frame's run."""

    def __init__(self, session: Session, loader: FrameLoader, frame: Frame) -> None:
        self.session = session
        self.loader = loader
        self.frame = frame
        self._cache: dict[int, DecodedFrame] = {}

    def recent_frames(self, kind: FrameKind, limit: int) -> list[DecodedFrame]:
        rows = repo.recent_frames(
            self.session, self.frame.run_id, kind.value, self.frame.seq, limit
        )
        out = []
        for row in rows:
            if row.id not in self._cache:
                self._cache[row.id] = self.loader.load(row)
            out.append(self._cache[row.id])
        return out

    def metric_series(self, name: str, layer: str, limit: int) -> list[tuple[int, float]]:
        return repo.metric_tail(self.session, self.frame.run_id, name, layer, limit)

    def metric_tails(
        self, wanted: Mapping[tuple[str, str], int]
    ) -> dict[tuple[str, str], list[tuple[int, float]]]:
        return series.metric_tails(self.session, self.frame.run_id, wanted)

    def scalar_series(self, name: str, limit: int) -> list[tuple[int, float]]:
        return repo.scalar_tail(self.session, self.frame.run_id, name, limit)


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
            for analysis in analyses_for(decoded.header.kind):
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
                for analysis, result in outputs:
                    self._store(session, frame, analysis.name, result)
                    if analysis.summarize is not None:
                        self._summarize(session, frame, analysis.name, analysis.summarize)
                error = "; ".join(errors) or None
                repo.finish_frame(session, frame.id, "failed" if errors else "done", error)
                for hook in self.hooks:
                    hook(session, frame)

    @staticmethod
    def _summarize(session: Session, frame: Frame, analysis: str, fn: SummarizeFn) -> None:
        """The step's whole-model values from every layer stored for it (all parts of a
        weight snapshot), replacing the summary an earlier part wrote."""
        layers = repo.layer_values_at(session, frame.run_id, frame.step, analysis, MODEL_LAYER)
        values = fn(layers) if layers else {}
        repo.replace_model_values(
            session, frame.run_id, frame.id, frame.step, analysis, MODEL_LAYER, values
        )

    @staticmethod
    def _store(session: Session, frame: Frame, analysis: str, result: AnalysisResult) -> None:
        metrics = [
            repo.MetricRow(
                m.layer, m.name, frame.step if m.step is None else m.step, float(m.value)
            )
            for m in result.metrics
        ]
        spectra = [repo.SpectrumRow(s.layer, _jsonable(s.payload)) for s in result.spectra]
        repo.replace_results(
            session, frame.run_id, frame.id, frame.step, analysis, metrics, spectra
        )
        model = {(m.name, m.step) for m in metrics if m.layer == MODEL_LAYER}
        if model:
            repo.drop_other_model_values(
                session, frame.run_id, frame.id, analysis, MODEL_LAYER, model
            )


def _jsonable(value: Any) -> Any:
    """Turn tensors/numpy values and non-finite floats into plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    if isinstance(value, float):
        return repo.finite_or_none(value)
    return value
