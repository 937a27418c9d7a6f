"""Reads of stored series: metric points, layers, tails and catalog, scalars, spectra.

Callers own the session, as in :mod:`~spectrawatch_server.storage.repository`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, bindparam, select, text, tuple_
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from spectrawatch_server.db.models import Frame, Metric, Scalar, Spectrum


def _in_range(step_col: Any, start: int | None, end: int | None) -> list[ColumnElement[bool]]:
    """WHERE clauses restricting ``step_col`` to ``[start, end]`` (either bound optional)."""
    clauses: list[ColumnElement[bool]] = []
    if start is not None:
        clauses.append(step_col >= start)
    if end is not None:
        clauses.append(step_col <= end)
    return clauses


def metric_points(
    session: Session,
    run_id: int,
    name: str,
    layer: str | None,
    start: int | None,
    end: int | None,
) -> Sequence[tuple[str, int, float | None]]:
    """``(layer, step, value)`` rows of one metric, ordered by layer then step."""
    stmt = select(Metric.layer, Metric.step, Metric.value).where(
        Metric.run_id == run_id, Metric.name == name
    )
    if layer is not None:
        stmt = stmt.where(Metric.layer == layer)
    stmt = stmt.where(*_in_range(Metric.step, start, end)).order_by(Metric.layer, Metric.step)
    return [(r[0], r[1], r[2]) for r in session.execute(stmt).all()]


def metric_layers(session: Session, run_id: int, name: str) -> list[str]:
    """The layers of metric ``name`` in a run, sorted, by a recursive skip-scan of
    ``ix_metric_run_name_layer_step``: one index seek per layer, not a read of every point."""
    rows = session.execute(
        text(
            "WITH RECURSIVE l(layer) AS ("
            " SELECT min(layer) FROM metric WHERE run_id = :r AND name = :n"
            " UNION ALL"
            " SELECT (SELECT min(m.layer) FROM metric m"
            "  WHERE m.run_id = :r AND m.name = :n AND m.layer > l.layer)"
            " FROM l WHERE l.layer IS NOT NULL"
            ") SELECT layer FROM l WHERE layer IS NOT NULL"
        ),
        {"r": run_id, "n": name},
    ).all()
    return [str(r[0]) for r in rows]


def raw_rows(conn: Connection, statement: Any, params: Mapping[str, Any]) -> list[Any]:
    """The rows of ``statement`` as the DB-API's own tuples: SQLAlchemy builds a ``Row`` object a
    row, which cost 3-4x the read itself on long series (one per point)."""
    result = conn.execute(statement, params)
    try:
        return list(result.cursor.fetchall()) if result.cursor is not None else []
    finally:
        result.close()


def metric_series(
    session: Session,
    run_id: int,
    name: str,
    layer: str | None,
    start: int | None,
    end: int | None,
    *,
    at_steps: Sequence[int] | None = None,
) -> dict[str, tuple[list[int], list[float | None]]]:
    """``{layer: (steps, values)}`` of one metric (one layer if given), layers sorted, steps
    ascending: what :func:`metric_points` returns, split by layer (only the points at
    ``at_steps`` when given: a bounded read of a long series).

    A search of the covering ``ix_metric_run_name_layer_step`` per layer (the layers by
    :func:`metric_layers`), returning steps and values only as the DB-API's tuples: one read
    of every layer through the ORM built a row object per point (150 layers x 5,000 steps:
    ~3 s). Up to :data:`LAYER_CHUNK` layers share a statement, a ``VALUES`` list joined to
    their searches: one statement a layer made the activations figure of a 150-module run
    1,853 statements. With ``at_steps``, one index seek per layer and step (``step IN`` of
    literal integers, :data:`IN_CHUNK` a statement: SQLAlchemy's expanding parameters took
    longer to render than the seeks)."""
    where = ""
    params: dict[str, Any] = {"r": run_id, "n": name}
    lo, hi = (-1 if start is None else start), (INT64_MAX if end is None else end)
    for op, key, bound in ((">=", "lo", start), ("<=", "hi", end)):
        if bound is not None:
            where += f" AND m.step {op} :{key}"
            params[key] = bound
    steps_in = [""]
    if at_steps is not None:
        wanted = sorted({int(t) for t in at_steps if lo <= int(t) <= hi})  # ints: no injection
        steps_in = [
            f" AND m.step IN ({','.join(map(str, wanted[i : i + IN_CHUNK]))})"
            for i in range(0, len(wanted), IN_CHUNK)
        ]
    layers = metric_layers(session, run_id, name) if layer is None else [layer]
    conn = session.connection()
    read: dict[str, tuple[list[int], list[float | None]]] = {la: ([], []) for la in layers}
    for i in range(0, len(layers), LAYER_CHUNK):
        chunk = layers[i : i + LAYER_CHUNK]
        names = {f"l{j}": la for j, la in enumerate(chunk)}
        listed = ", ".join(f"(:{key})" for key in names)
        for step_in in steps_in:  # ascending chunks of steps: each layer's points stay in order
            sql = (
                f"WITH l(layer) AS (VALUES {listed}) SELECT m.layer, m.step, m.value"
                " FROM l JOIN metric m ON m.run_id = :r AND m.name = :n AND m.layer = l.layer"
                f"{where}{step_in}"
            )
            for lname, step, value in raw_rows(conn, text(sql), {**params, **names}):
                steps, values = read[lname]
                steps.append(step)
                values.append(value)
    return {la: _ascending(*read[la]) for la in layers if read[la][0]}


def _ascending(
    steps: list[int], values: list[float | None]
) -> tuple[list[int], list[float | None]]:
    """One layer's points in step order (as its index search returns them; sorted if not)."""
    if all(a < b for a, b in itertools.pairwise(steps)):
        return steps, values
    ordered = sorted(zip(steps, values, strict=True))
    return [t for t, _ in ordered], [v for _, v in ordered]


LAYER_CHUNK = 200  # layers of one metric_series statement (one bound value each)
IN_CHUNK = 1000  # steps of one ``IN`` list
INT64_MAX = 2**63 - 1


def metric_tail(
    session: Session, run_id: int, name: str, layer: str, limit: int, until: int | None = None
) -> list[tuple[int, float]]:
    """The last ``limit`` finite points of a metric (at steps up to ``until`` when given),
    oldest first."""
    last = INT64_MAX if until is None else until
    args = {"run": run_id, "name": name, "layer": layer, "limit": limit, "until": last}
    rows = session.connection().execute(_METRIC_TAIL, args).all()
    return [(int(s), float(v)) for s, v in reversed(rows) if v is not None]


# The worker's history reads, built once and run with bound values (a frame reads dozens of
# tails: building each statement anew cost more than its index seek)
_METRIC_TAIL = (
    select(Metric.step, Metric.value)
    .where(
        Metric.run_id == bindparam("run"),
        Metric.name == bindparam("name"),
        Metric.layer == bindparam("layer"),
        Metric.value.is_not(None),
        Metric.step <= bindparam("until"),
    )
    .order_by(Metric.step.desc())
    .limit(bindparam("limit"))
)
_SCALAR_TAIL = (
    select(Scalar.step, Scalar.value)
    .where(
        Scalar.run_id == bindparam("run"),
        Scalar.name == bindparam("name"),
        Scalar.value.is_not(None),
        Scalar.step <= bindparam("until"),
    )
    .order_by(Scalar.step.desc())
    .limit(bindparam("limit"))
)


def metric_catalog(session: Session, run_id: int) -> Sequence[tuple[str, str, int, int, int]]:
    """``(name, layer, points, first_step, last_step)`` for every metric series of a run, by
    name then layer.

    The series and their point counts from ``metric_series`` (kept by every metric write), the
    first and last step by a seek each in ``ix_metric_run_name_layer_step``: one ``GROUP BY
    name, layer`` over every metric row took 0.5-0.6 s on 2.3 M rows in SQLite and 0.4 s in
    PostgreSQL."""
    series = "FROM metric m WHERE m.run_id = s.run_id AND m.name = s.name AND m.layer = s.layer"
    rows = session.execute(
        text(
            f"SELECT s.name, s.layer, s.points, (SELECT min(m.step) {series}),"
            f" (SELECT max(m.step) {series})"
            " FROM metric_series s WHERE s.run_id = :r AND s.points > 0"
            " ORDER BY s.name, s.layer"
        ),
        {"r": run_id},
    )
    return [(str(n), str(la), int(p), int(a), int(b)) for n, la, p, a, b in rows]


def scalar_points(
    session: Session, run_id: int, name: str | None, start: int | None, end: int | None
) -> Sequence[tuple[str, int, float | None]]:
    """``(name, step, value)`` scalar rows, ordered by name then step."""
    stmt = select(Scalar.name, Scalar.step, Scalar.value).where(Scalar.run_id == run_id)
    if name is not None:
        stmt = stmt.where(Scalar.name == name)
    stmt = stmt.where(*_in_range(Scalar.step, start, end)).order_by(Scalar.name, Scalar.step)
    return [(r[0], r[1], r[2]) for r in session.execute(stmt).all()]


def scalar_tail(
    session: Session, run_id: int, name: str, limit: int, until: int | None = None
) -> list[tuple[int, float]]:
    """The last ``limit`` finite points of a scalar (at steps up to ``until`` when given),
    oldest first."""
    last = INT64_MAX if until is None else until
    args = {"run": run_id, "name": name, "limit": limit, "until": last}
    rows = session.connection().execute(_SCALAR_TAIL, args).all()
    return [(int(s), float(v)) for s, v in reversed(rows) if v is not None]


def spectrum_steps(
    session: Session, run_id: int, layer: str, analysis: str
) -> list[tuple[int, int]]:
    """``(step, id)`` of one layer's spectra of one analysis, by step: the keys alone (a
    layer's drill-down lists its steps and loads one payload, not every one of the run). One a
    step: the latest frame's, by ``(seq, id)``, as for metric rows (a resumed run's frames
    re-send steps, each with its spectra)."""
    stmt = (
        select(Spectrum.step, Spectrum.id)
        .join(Frame, Frame.id == Spectrum.frame_id)
        .where(Spectrum.run_id == run_id, Spectrum.layer == layer, Spectrum.analysis == analysis)
        .order_by(Spectrum.step, Frame.seq, Frame.id)
    )
    latest = {int(step): int(sid) for step, sid in session.execute(stmt)}
    return list(latest.items())


SpectrumKey = tuple[int, str, str, int]  # (step, layer, analysis, id): the page order


def spectra_for(
    session: Session,
    run_id: int,
    layer: str | None,
    frame_id: int | None,
    analysis: str | None,
    *,
    start: int | None = None,
    end: int | None = None,
    limit: int | None = None,
    offset: int = 0,
    after: SpectrumKey | None = None,
) -> Sequence[Spectrum]:
    """Spectra of a run (of one layer, frame, analysis and step range where given) by step,
    layer, analysis and id: ``limit`` of them (all when None) after the key ``after`` (the
    previous page's last: keyset pagination), from the ``offset``-th of those.

    A page is chosen on the rows' keys, in ``ix_spectrum_run_step_layer``'s order (0008: a page
    after a key is an index range that stops after ``limit`` entries; with ``ix_spectrum_run_id``
    alone every page read and sorted the keys of all of the run's spectra), then only its rows
    are loaded: ordering whole rows would carry every payload of the run (a histogram and fits,
    ~10 KB each) through the sorter."""
    order = (Spectrum.step, Spectrum.layer, Spectrum.analysis, Spectrum.id)
    stmt = select(Spectrum.id).where(Spectrum.run_id == run_id)
    if layer is not None:
        stmt = stmt.where(Spectrum.layer == layer)
    if frame_id is not None:
        stmt = stmt.where(Spectrum.frame_id == frame_id)
    if analysis is not None:
        stmt = stmt.where(Spectrum.analysis == analysis)
    if after is not None:
        stmt = stmt.where(tuple_(*order) > tuple_(*after))
    stmt = stmt.where(*_in_range(Spectrum.step, start, end)).order_by(*order)
    stmt = stmt.limit(limit).offset(offset)
    ids = session.scalars(stmt).all()
    rows: dict[int, Spectrum] = {}
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        rows.update(
            (r.id, r) for r in session.scalars(select(Spectrum).where(Spectrum.id.in_(chunk)))
        )
    return [rows[i] for i in ids]
