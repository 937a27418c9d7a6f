"""Analysis results and scalars written: metric and spectrum rows replaced per frame and
analysis, per-series point counts, scalar upserts.

Callers own the transaction, as in :mod:`~spectrawatch_server.storage.repository`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
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
    tuple_,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

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
    but ``model_layer`` (all frames; the latest row wins where a step was analysed twice).

    By a seek per metric name of the run (``ix_metric_run_name_step``): filtered on step and
    analysis alone the read walked every metric row of the run, once per weight frame (0.42
    -> 0.01 s on a run of 4.5 M rows)."""
    rows = session.execute(
        select(Metric.layer, Metric.name, Metric.value)
        .where(
            Metric.run_id == run_id,
            Metric.name.in_(series_names(session, run_id)),
            Metric.step == step,
            Metric.analysis == analysis,
            Metric.layer != model_layer,
            Metric.value.is_not(None),
        )
        .order_by(Metric.id)
    ).all()
    out: dict[str, dict[str, float]] = {}
    for layer, name, value in rows:
        if value is not None:
            out.setdefault(layer, {})[name] = float(value)
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


def drop_other_model_values(
    session: Session,
    run_id: int,
    frame_id: int,
    analysis: str,
    model_layer: str,
    keys: Iterable[tuple[str, int]],
) -> None:
    """Delete the ``model_layer`` values of ``(name, step)`` ``keys`` other frames of the run
    wrote for ``analysis``: a whole-model value has one point per step, the latest (the SED
    analysis of an update-sketch frame and of a theta-sketch frame ending at the same step
    both evaluate the grokking detector there).

    The names and steps are also given on their own, so that the delete seeks them in
    ``ix_metric_run_name_step``: with the ``(name, step)`` pairs alone it walked every metric
    row of the run, once per SED frame (17 ms on a 90,000-row run, growing with the run)."""
    wanted = sorted(set(keys))
    gone: Counter[tuple[str, str]] = Counter()
    for start in range(0, len(wanted), 200):
        chunk = wanted[start : start + 200]
        gone += _delete_metrics(
            session,
            Metric.run_id == run_id,
            Metric.name.in_(sorted({name for name, _ in chunk})),
            Metric.step.in_(sorted({step for _, step in chunk})),
            Metric.analysis == analysis,
            Metric.layer == model_layer,
            Metric.frame_id != frame_id,
            tuple_(Metric.name, Metric.step).in_(chunk),
        )
    _count_points(session, run_id, Counter(), gone)


def replace_results(
    session: Session,
    run_id: int,
    frame_id: int,
    step: int,
    analysis: str,
    metrics: Iterable[MetricRow],
    spectra: Iterable[SpectrumRow],
) -> None:
    """Store an analysis' output for a frame, replacing any earlier output (idempotent)."""
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


SCALAR_CHUNK = 5000  # rows of one multi-row INSERT: 4 bound values each, under PostgreSQL's
# 65,535 and SQLite's 250,000 parameters a statement (a batch of 16,384 rows failed on the first)


def upsert_scalars(session: Session, run_id: int, rows: Sequence[tuple[int, str, float]]) -> int:
    """Insert ``(step, name, value)`` scalars; a repeated (name, step) overwrites the value (a
    batch holding one twice: the later one, the rows go in order)."""
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    insert_fn = postgresql.insert if dialect == "postgresql" else sqlite.insert
    values = [
        {"run_id": run_id, "step": step, "name": name, "value": finite_or_none(value)}
        for step, name, value in rows
    ]
    for start in range(0, len(values), SCALAR_CHUNK):
        stmt = insert_fn(Scalar).values(values[start : start + SCALAR_CHUNK])
        stmt = stmt.on_conflict_do_update(
            index_elements=["run_id", "name", "step"], set_={"value": stmt.excluded.value}
        )
        session.execute(stmt)
    touch_run(session, run_id, max(step for step, _, _ in rows))
    return len(rows)
