"""Re-analysis of a run's stored frames: which frames go back to the queue, and marking them.

Callers own the transaction, as in :mod:`~spectrawatch_server.storage.repository`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from spectrawatch_server.db.base import utcnow
from spectrawatch_server.db.models import Frame

MARK_CHUNK = 500  # frame ids of one update


@dataclass(frozen=True)
class ReanalysisPlan:
    """The frames a re-analysis queues (``frame_ids``, in seq order) and those it cannot:
    ``pruned`` (their blobs were released) and ``imported`` (metric batches: no tensors)."""

    frame_ids: list[int]
    pruned: int
    imported: int


def plan_reanalysis(session: Session, run_id: int, from_step: int | None) -> ReanalysisPlan:
    """The run's frames from the first one (in seq order) at ``from_step`` or later to the
    last (every frame when ``from_step`` is None), by ``(seq, id)``.

    From a frame on, not the frames at ``from_step`` or later only: every frame after it read
    its results as history (a resumed run's later seqs re-send earlier steps). Imported batches
    (seq -1) are counted when their last step is at ``from_step`` or later."""
    rows = session.execute(
        select(Frame.id, Frame.seq, Frame.step, Frame.blob_key != "")
        .where(Frame.run_id == run_id)
        .order_by(Frame.seq, Frame.id)
    ).all()
    start = -1 if from_step is None else from_step
    imported = sum(1 for _, seq, step, _ in rows if seq < 0 and step >= start)
    sent = [(int(i), int(step), bool(blob)) for i, seq, step, blob in rows if seq >= 0]
    first = next((n for n, (_, step, _) in enumerate(sent) if step >= start), len(sent))
    queued = [i for i, _, blob in sent[first:] if blob]
    return ReanalysisPlan(queued, len(sent) - first - len(queued), imported)


def mark_requeued(session: Session, frame_ids: Sequence[int]) -> None:
    """The frames wait for analysis again (``pending``, no error), queued by a re-analysis
    (``requeued_at``: the worker leaves their alerts as their first analysis made them)."""
    now = utcnow()
    for start in range(0, len(frame_ids), MARK_CHUNK):
        chunk = list(frame_ids[start : start + MARK_CHUNK])
        session.execute(
            update(Frame)
            .where(Frame.id.in_(chunk))
            .values(status="pending", error=None, requeued_at=now),
            execution_options={"synchronize_session": False},
        )
