"""Analysis results and scalars written: metric and spectrum rows replaced per frame and
analysis, per-series point counts, scalar upserts.

Callers own the transaction, as in :mod:`~spectrawatch_server.storage.repository`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Table,
    delete,
    func,
    insert,
    literal,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased

from spectrawatch.wire import SYSTEM_SCALAR_PREFIX
from spectrawatch_server.db.models import Frame, Metric, MetricSeries, Scalar, Spectrum
from spectrawatch_server.storage.dashboard_reads import series_names
from spectrawatch_server.storage.repository import insert_frame, touch_run


@dataclass(frozen=True)
class MetricRow:
    layer: str
    name: str
    step: int
    value: float


@dataclass(frozen=True)
class SpectrumRow:
    layer: str
    payload: dict[str, Any]


def layer_values_at(
    session: Session, run_id: int, step: int, analysis: str, model_layer: str
) -> dict[str, dict[str, float]]:
    """``{layer: {name: value}}`` an analysis stored at ``step`` for every layer of the run
    but ``model_layer`` (all frames; the latest row wins where a step was analysed twice):
    :func:`layer_values_by_analysis_at` of that one analysis."""
    by_analysis = layer_values_by_analysis_at(session, run_id, step, [analysis], model_layer)
    return {layer: values[analysis] for layer, values in by_analysis.items()}


def layer_values_by_analysis_at(
    session: Session, run_id: int, step: int, analyses: Collection[str], model_layer: str
) -> dict[str, dict[str, dict[str, float]]]:
    """``{layer: {analysis: {name: value}}}`` of ``analyses`` stored at ``step`` for every layer
    of the run but ``model_layer`` (all frames; the latest row wins where a step was analysed
    twice; a weight snapshot's values carried forward to a later one read several at once).

    By a seek per metric name of the run (``ix_metric_run_name_step``): filtered on step and
    analysis alone the read walked every metric row of the run, once per weight frame (0.42
    -> 0.01 s on a run of 4.5 M rows)."""
    rows = session.execute(
        select(Metric.layer, Metric.analysis, Metric.name, Metric.value)
        .where(
            Metric.run_id == run_id,
            Metric.name.in_(series_names(session, run_id)),
            Metric.step == step,
            Metric.analysis.in_(analyses),
            Metric.layer != model_layer,
            Metric.value.is_not(None),
        )
        .order_by(Metric.id)
    ).all()
    out: dict[str, dict[str, dict[str, float]]] = {}
    for layer, analysis, name, value in rows:
        if value is not None:
            out.setdefault(layer, {}).setdefault(analysis, {})[name] = float(value)
    return out


def replace_model_values(
    session: Session,
    run_id: int,
    frame_id: int,
    step: int,
    analysis: str,
    model_layer: str,
    values: Mapping[str, float],
) -> None:
    """Make ``values`` the only ``model_layer`` rows of ``analysis`` at ``step`` (owned by
    ``frame_id``), whichever frame wrote the earlier ones.

    The delete seeks each of the run's metric names (``ix_metric_run_name_step``): filtered on
    step, analysis and layer alone it walked every metric row of the run, once per weight
    frame (10 ms on a 90,000-row run, growing with the run)."""
    gone = _delete_metrics(
        session,
        Metric.run_id == run_id,
        Metric.name.in_(series_names(session, run_id)),
        Metric.step == step,
        Metric.analysis == analysis,
        Metric.layer == model_layer,
    )
    rows = [
        {
            "run_id": run_id,
            "frame_id": frame_id,
            "analysis": analysis,
            "layer": model_layer,
            "name": name,
            "step": step,
            "value": finite_or_none(value),
        }
        for name, value in values.items()
    ]
    if rows:
        session.execute(insert(cast(Table, Metric.__table__)), rows)
    _count_points(session, run_id, _series_counts(rows), gone)


def replace_results(
    session: Session,
    run_id: int,
    frame_id: int,
    step: int,
    analysis: str,
    metrics: Iterable[MetricRow],
    spectra: Iterable[SpectrumRow],
) -> None:
    """Store an analysis' output for a frame, replacing any earlier output (idempotent).

    A series keeps one point per step: where other frames of the run hold rows at these
    ``(name, layer, step)``, the latest frame's row stays (:func:`_drop_overlaps`)."""
    gone = _delete_metrics(session, Metric.frame_id == frame_id, Metric.analysis == analysis)
    session.execute(
        delete(Spectrum).where(Spectrum.frame_id == frame_id, Spectrum.analysis == analysis),
        execution_options={"synchronize_session": False},
    )
    rows = [
        {
            "run_id": run_id,
            "frame_id": frame_id,
            "analysis": analysis,
            "layer": m.layer,
            "name": m.name,
            "step": m.step,
            "value": finite_or_none(m.value),
        }
        for m in metrics
    ]
    if rows:
        # Core insert of the table: one executemany, without the ORM's per-row bulk bookkeeping
        # (~7 us a row: 0.3 s for the 44k rows of a GPT-2-sized frame at per-step SED)
        session.execute(insert(cast(Table, Metric.__table__)), rows)
        _count_stored_points(session, run_id, frame_id, analysis)
        gone += _drop_overlaps(session, run_id, frame_id, analysis)
    _count_points(session, run_id, Counter(), gone)
    spectrum_rows = [
        {
            "run_id": run_id,
            "frame_id": frame_id,
            "analysis": analysis,
            "layer": s.layer,
            "step": step,
            "payload": s.payload,
        }
        for s in spectra
    ]
    if spectrum_rows:
        session.execute(insert(Spectrum), spectrum_rows)


SeriesCounts = Counter[tuple[str, str]]  # (name, layer) -> metric rows


def _drop_overlaps(session: Session, run_id: int, frame_id: int, analysis: str) -> SeriesCounts:
    """Keep one row per ``(name, layer, step)`` where the rows ``analysis`` just stored for
    ``frame_id`` meet other frames' rows of the run: the latest frame's, by ``(seq, id)``.

    A run resumed from a checkpoint re-sends the steps after it in a newer session, under
    higher seqs (imported batches, seq -1, go by id). Frames may be analysed out of seq order,
    so this deletes the earlier frames' rows and this frame's rows a later frame holds; returns
    what went, by series."""
    met = _overlapping_rows(session, run_id, frame_id, analysis)
    if not met:
        return Counter()
    new, old = aliased(Metric), aliased(Metric)
    this = (session.execute(select(Frame.seq).where(Frame.id == frame_id)).scalar_one(), frame_id)
    doomed: set[int] = set()
    for start in range(0, len(met), 1000):
        pairs = session.execute(
            select(new.id, old.id, Frame.seq, Frame.id)
            .join(
                old,
                (old.run_id == new.run_id)
                & (old.name == new.name)
                & (old.layer == new.layer)
                & (old.step == new.step),
            )
            .join(Frame, Frame.id == old.frame_id)
            .where(new.id.in_(met[start : start + 1000]), old.frame_id != frame_id)
        )
        doomed.update(new_id if (seq, fid) > this else old_id for new_id, old_id, seq, fid in pairs)
    ids = sorted(doomed)
    gone: SeriesCounts = Counter()
    for start in range(0, len(ids), 1000):
        gone += _delete_metrics(session, Metric.id.in_(ids[start : start + 1000]))
    return gone


def _overlapping_rows(session: Session, run_id: int, frame_id: int, analysis: str) -> list[int]:
    """Ids of the rows ``analysis`` stored for ``frame_id`` whose ``(name, layer, step)`` another
    row of the run holds too (of another frame, or of this frame's other analyses).

    A seek of ``ix_metric_run_name_layer_step`` per row, from the frame's rows read in their
    unique index; where frames share no step it finds the row itself alone (2-6 us a row: 14 ms
    on SQLite, 28 ms on PostgreSQL for a 4,470-row weight frame whose store takes 80 / 340 ms).
    A correlated subquery with ``LIMIT 1``, run per row whatever the statistics say: as a join
    (SQLite) or a semi-join (PostgreSQL, on a young table) the planner could scan the run's
    rows instead."""
    old = aliased(Metric)
    other = (
        select(old.id)
        .where(
            old.run_id == run_id,
            old.name == Metric.name,
            old.layer == Metric.layer,
            old.step == Metric.step,
            old.id != Metric.id,
        )
        .limit(1)
        .scalar_subquery()
    )
    stmt = select(Metric.id).where(
        Metric.frame_id == frame_id, Metric.analysis == analysis, other.is_not(None)
    )
    return [int(i) for i in session.scalars(stmt)]


def _series_counts(rows: Iterable[Mapping[str, Any]]) -> SeriesCounts:
    return Counter((str(r["name"]), str(r["layer"])) for r in rows)


def _delete_metrics(session: Session, *where: ColumnElement[bool]) -> SeriesCounts:
    """Delete the metric rows matching ``where``; how many of each series went (``RETURNING``:
    the rows this transaction deleted, not ones a concurrent one took first)."""
    # No session synchronisation: metric rows are never loaded as objects, and evaluating the
    # criteria against the identity map cost more than the delete (~3 ms per call)
    result = session.execute(
        delete(Metric).where(*where).returning(Metric.name, Metric.layer),
        execution_options={"synchronize_session": False},
    )
    return Counter((str(n), str(la)) for n, la in result)


def _count_points(
    session: Session, run_id: int, added: SeriesCounts, removed: SeriesCounts
) -> None:
    """Add ``added`` minus ``removed`` rows to each series' ``metric_series.points``: an
    upsert incrementing the stored count, so concurrent writers' changes add up in any order
    (a series whose rows all went keeps a row with 0 points)."""
    delta = Counter(added)
    delta.subtract(removed)
    values = [
        {"run_id": run_id, "name": n, "layer": la, "points": d}
        for (n, la), d in sorted(delta.items(), key=lambda kv: (kv[0][1], kv[0][0]))
        if d
    ]
    if not values:
        return
    dialect = session.get_bind().dialect.name
    insert_fn = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert_fn(cast(Table, MetricSeries.__table__))  # Core: no ORM bulk bookkeeping
    stmt = stmt.on_conflict_do_update(
        index_elements=["run_id", "name", "layer"],
        set_={"points": MetricSeries.points + stmt.excluded.points},
    )
    session.connection().execute(stmt, values)


def _count_stored_points(session: Session, run_id: int, frame_id: int, analysis: str) -> None:
    """Add the metric rows ``analysis`` stored for ``frame_id`` to their series' counts, counted
    in the database (one ``INSERT ... SELECT ... GROUP BY`` over the frame's rows, by its
    unique index): a row-by-row upsert from Python doubled the time to store a weights frame
    (one row a series: 15 -> 28 ms for 1,500 rows)."""
    dialect = session.get_bind().dialect.name
    insert_fn = postgresql.insert if dialect == "postgresql" else sqlite.insert
    counted = (
        select(literal(run_id, BigInteger), Metric.name, Metric.layer, func.count())
        .where(Metric.frame_id == frame_id, Metric.analysis == analysis)
        # in the unique index's (layer, name) order, as _count_points writes series: no sort,
        # and two writers of one series lock their rows in one order (PostgreSQL)
        .group_by(Metric.layer, Metric.name)
        .order_by(Metric.layer, Metric.name)
    )
    table = cast(Table, MetricSeries.__table__)
    stmt = insert_fn(table).from_select(["run_id", "name", "layer", "points"], counted)
    stmt = stmt.on_conflict_do_update(
        index_elements=["run_id", "name", "layer"],
        set_={"points": MetricSeries.points + stmt.excluded.points},
    )
    session.execute(stmt)


CLEAR_CHUNK = 500  # frame ids of one delete


def clear_frame_results(session: Session, run_id: int, frame_ids: Sequence[int]) -> None:
    """Delete every metric and spectrum row the frames ``frame_ids`` of run ``run_id`` own
    (whole-model summaries included), then count the run's series anew from the rows left
    (:func:`rebuild_metric_series`: counts that drifted are repaired too). Before a
    re-analysis: its analyses then read as history only what earlier frames stored, as when
    the run was first analysed."""
    for start in range(0, len(frame_ids), CLEAR_CHUNK):
        chunk = list(frame_ids[start : start + CLEAR_CHUNK])
        for table in (Metric, Spectrum):
            session.execute(
                delete(table).where(table.frame_id.in_(chunk)),
                execution_options={"synchronize_session": False},
            )
    rebuild_metric_series(session, run_id)


def rebuild_metric_series(session: Session, run_id: int) -> None:
    """Count every series of a run anew from its metric rows: for rows written around this
    module (a benchmark's bulk seed through the DB-API)."""
    session.execute(delete(MetricSeries).where(MetricSeries.run_id == run_id))
    counted = (
        select(Metric.run_id, Metric.name, Metric.layer, func.count())
        .where(Metric.run_id == run_id)
        .group_by(Metric.run_id, Metric.name, Metric.layer)
    )
    session.execute(
        insert(MetricSeries).from_select(["run_id", "name", "layer", "points"], counted)
    )


def insert_metric_batch(
    session: Session,
    run_id: int,
    key: str,
    source: str,
    metrics: Sequence[MetricRow],
    *,
    digest: str | None = None,
) -> Frame:
    """Store externally computed metrics under one blob-less frame of kind ``source``.

    The frame row (idempotency ``key``) makes a replayed batch a no-op; it has no job, so the
    values are never re-analysed. ``digest`` (of the request body) is kept in its ``info`` so a
    reused key with another body can be told from a replay.
    """
    last = max(m.step for m in metrics)
    frame = Frame(
        run_id=run_id,
        kind=source,
        step=last,
        seq=-1,
        idempotency_key=key,
        blob_key="",
        bytes=0,
        info={"imported_metrics": len(metrics), **({"digest": digest} if digest else {})},
        layers=sorted({m.layer for m in metrics}),
        nonfinite={},
        status="done",
    )
    insert_frame(session, frame)
    replace_results(session, run_id, frame.id, last, source, metrics, [])
    return frame


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


# --- scalars ---------------------------------------------------------------------------


def upsert_scalars(session: Session, run_id: int, rows: Sequence[tuple[int, str, float]]) -> int:
    """Insert ``(step, name, value)`` scalars; a repeated (name, step) overwrites the value (a
    batch holding one twice: the later one, the rows go in order).

    One single-row upsert compiled once and executed for every row (executemany: the driver
    batches it, so no statement nears a bound-parameter limit). Multi-row ``VALUES`` of 5,000
    rows each cost SQLAlchemy ~0.5 s apiece to compile, inside the write transaction: 100,000
    scalars held SQLite's write lock for 11 s and other runs' writes answered 503."""
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    insert_fn = postgresql.insert if dialect == "postgresql" else sqlite.insert
    values = [
        {"run_id": run_id, "step": step, "name": name, "value": finite_or_none(value)}
        for step, name, value in rows
    ]
    stmt = insert_fn(cast(Table, Scalar.__table__))  # Core: no ORM bulk bookkeeping
    stmt = stmt.on_conflict_do_update(
        index_elements=["run_id", "name", "step"], set_={"value": stmt.excluded.value}
    )
    session.connection().execute(stmt, values)
    # a batch of the client's system sampler alone (it goes on while training hangs) is no
    # activity for run_silent
    training = any(not name.startswith(SYSTEM_SCALAR_PREFIX) for _, name, _ in rows)
    touch_run(session, run_id, max(step for step, _, _ in rows), seen=training)
    return len(rows)
