"""Re-analysis of a run's stored frames: which frames go back to the queue, and marking them.

Callers own the transaction, as in :mod:`~spectrawatch_server.storage.repository`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from spectrawatch_server.db.base import utcnow
from spectrawatch_server.db.models import Frame

MARK_CHUNK = 500  # frame ids of one update


@dataclass(frozen=True)
class ReanalysisPlan:
    """The frames a re-analysis queues (``frame_ids``, in seq order) and those it cannot:
    ``pruned`` (their blobs were released), ``missing`` (a blob the store no longer has: the
    caller refuses, rather than delete results for an analysis that would fail) and
    ``imported`` (metric batches: no tensors). ``first_time``: queued frames never analysed
    (failed for good), whose alerts the worker evaluates as on a first analysis."""

    frame_ids: list[int]
    pruned: int
    imported: int
    missing: int = 0
    first_time: frozenset[int] = frozenset()


def plan_reanalysis(
    session: Session, run_id: int, from_step: int | None, exists: Callable[[str], bool]
) -> ReanalysisPlan:
    """The run's frames from the first one (in seq order) at ``from_step`` or later to the
    last (every frame when ``from_step`` is None), by ``(seq, id)``, whose blob ``exists``.

    From a frame on, not the frames at ``from_step`` or later only: every frame after it read
    its results as history (a resumed run's later seqs re-send earlier steps). Imported batches
    (seq -1) are counted when their last step is at ``from_step`` or later."""
    rows = session.execute(
        select(Frame.id, Frame.seq, Frame.step, Frame.blob_key, Frame.status)
        .where(Frame.run_id == run_id)
        .order_by(Frame.seq, Frame.id)
    ).all()
    start = -1 if from_step is None else from_step
    imported = sum(1 for _, seq, step, _, _ in rows if seq < 0 and step >= start)
    sent = [(int(i), int(step), str(key), status) for i, seq, step, key, status in rows if seq >= 0]
    first = next((n for n, (_, step, _, _) in enumerate(sent) if step >= start), len(sent))
    stored = [(i, key, status) for i, _, key, status in sent[first:] if key]
    queued = [(i, status) for i, key, status in stored if exists(key)]
    return ReanalysisPlan(
        [i for i, _ in queued],
        pruned=len(sent) - first - len(stored),
        imported=imported,
        missing=len(stored) - len(queued),
        first_time=frozenset(i for i, status in queued if status == "failed"),
    )


def mark_requeued(session: Session, plan: ReanalysisPlan) -> None:
    """The frames wait for analysis again (``pending``, no error), queued by a re-analysis
    (``requeued_at``: the worker leaves their alerts as their first analysis made them). A
    frame whose first analysis failed never evaluated its alerts: it gets no ``requeued_at``,
    so the worker evaluates them now."""
    now = utcnow()
    for first_time, when in ((False, now), (True, None)):
        ids = [i for i in plan.frame_ids if (i in plan.first_time) is first_time]
        for start in range(0, len(ids), MARK_CHUNK):
            session.execute(
                update(Frame)
                .where(Frame.id.in_(ids[start : start + MARK_CHUNK]))
                .values(status="pending", error=None, requeued_at=when),
                execution_options={"synchronize_session": False},
            )
