"""The reads behind the dashboards (DESIGN §8): series names, step samples, bucketed series,
heatmap cells, alert and webhook-delivery rows. All dashboard SQL lives here.

Index-friendly for large runs (100 layers x 10k steps): names and step ranges by index seeks
over ``ix_metric_run_name_step`` / ``ix_scalar_run_name_step`` instead of ``GROUP BY`` over
every row, and one index-ordered read of steps and values for every plotted series, bucketed
in numpy (min and max per bucket, each at the step it was stored at).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import BindParameter, String, bindparam, cast, func, or_, select, text
from sqlalchemy.orm import Session

from spectrawatch_server.db.models import (
    Alert,
    AlertRule,
    Delivery,
    DeliveryAttempt,
    Frame,
    Metric,
    Run,
    Scalar,
    Webhook,
)
from spectrawatch_server.storage import alert_store, repository
from spectrawatch_server.storage.metric_reads import metric_series, raw_rows

Model = type[Metric] | type[Scalar]
Key = tuple[str, str]  # (series name, layer); scalars have layer ""
Points = tuple[list[int], list[float | None]]  # (steps, values), None = missing (NaN/Inf)
Series = dict[Key, Points]


def series_names(session: Session, run_id: int, model: Model = Metric) -> list[str]:
    """Distinct metric (or scalar) names of a run, sorted, by a recursive skip-scan: one index
    seek per name instead of a scan of every row."""
    table = model.__tablename__  # a fixed table name, not user input
    rows = session.execute(
        text(
            "WITH RECURSIVE n(name) AS ("
            f" SELECT min(name) FROM {table} WHERE run_id = :r"
            " UNION ALL"
            f" SELECT (SELECT min(m.name) FROM {table} m WHERE m.run_id = :r AND m.name > n.name)"
            " FROM n WHERE n.name IS NOT NULL"
            ") SELECT name FROM n WHERE name IS NOT NULL"
        ),
        {"r": run_id},
    ).all()
    return [str(r[0]) for r in rows]


def _where(
    model: Model,
    run_id: int,
    name: str | BindParameter[Any],
    layer: str | None,
    skip_layer: str | None = None,
) -> list[Any]:
    where = [model.run_id == run_id, model.name == name]
    if layer is not None and model is Metric:
        where.append(Metric.layer == layer)
    if skip_layer is not None and model is Metric:
        where.append(Metric.layer != skip_layer)
    return where


def step_range(
    session: Session,
    run_id: int,
    name: str,
    layer: str | None = None,
    model: Model = Metric,
    skip_layer: str | None = None,
) -> tuple[int, int] | None:
    """``(first, last)`` stored step of one series (of every layer if ``layer`` is None, of every
    layer but ``skip_layer`` if that is given), by two index seeks; None when it has no rows."""
    where = _where(model, run_id, name, layer, skip_layer)
    lo = session.scalar(select(func.min(model.step)).where(*where))
    hi = session.scalar(select(func.max(model.step)).where(*where))
    return None if lo is None or hi is None else (int(lo), int(hi))


def sampled_steps(
    session: Session, run_id: int, name: str, columns: int, skip_layer: str | None = None
) -> tuple[list[int], bool]:
    """Up to ``columns`` steps of metric ``name``: every stored step when it has no more
    (:func:`first_steps`), else :func:`spaced_steps`. Second value: whether stored steps were
    skipped (the sample is a decimation, not every step). Rows of ``skip_layer`` are not
    sampled while other layers have the metric: the heatmap's ``__model__`` row is left out,
    and its SED series has every step while the layers' have every ``layer_stride``-th.
    """
    rng = step_range(session, run_id, name, skip_layer=skip_layer)
    if rng is None and skip_layer is not None:
        return sampled_steps(session, run_id, name, columns)  # only that layer has the metric
    if rng is None:
        return [], False
    every = first_steps(session, run_id, name, columns + 1, skip_layer)
    if len(every) <= columns:
        return every, False
    return spaced_steps(session, run_id, name, columns, rng, skip_layer), True


def first_steps(
    session: Session, run_id: int, name: str, limit: int, skip_layer: str | None = None
) -> list[int]:
    """The first ``limit`` distinct stored steps of metric ``name`` (not counting rows of
    ``skip_layer``), ascending, by a recursive skip-scan: one index seek a step, however many
    layers store it."""
    skip = "" if skip_layer is None else " AND m.layer != :x"
    rows = session.execute(
        text(
            "WITH RECURSIVE s(step, i) AS ("
            f" SELECT min(m.step), 1 FROM metric m WHERE m.run_id = :r AND m.name = :n{skip}"
            " UNION ALL"
            " SELECT (SELECT min(m.step) FROM metric m"
            f"  WHERE m.run_id = :r AND m.name = :n AND m.step > s.step{skip}), s.i + 1"
            " FROM s WHERE s.step IS NOT NULL AND s.i < :k"
            ") SELECT step FROM s WHERE step IS NOT NULL"
        ),
        {"r": run_id, "n": name, "x": skip_layer, "k": limit},
    ).all()
    return [int(r[0]) for r in rows]


def step_count(session: Session, run_id: int, name: str, at_most: int) -> int:
    """Distinct stored steps of metric ``name``, counted up to ``at_most + 1``: one
    index-ordered scan of at most ``(at_most + 1) x layers`` entries (4 layers x 40,000 steps
    up to 30,001: ~0.03 s in SQLite and PostgreSQL, where :func:`first_steps`' seek a step
    took 0.07-0.3 s)."""
    steps = (
        select(Metric.step)
        .where(Metric.run_id == run_id, Metric.name == name)
        .distinct()
        .order_by(Metric.step)
        .limit(at_most + 1)
        .subquery()
    )
    return int(session.scalar(select(func.count()).select_from(steps)) or 0)


def spaced_steps(
    session: Session,
    run_id: int,
    name: str,
    columns: int,
    rng: tuple[int, int],
    skip_layer: str | None = None,
) -> list[int]:
    """Up to ``columns`` stored steps of metric ``name`` in ``rng``: the first stored step at
    or after each of equally spaced starts (one index seek each).

    The spacing is a multiple of the series' logging gap (:func:`logging_gap`), so a series
    logged every ``g`` steps is sampled at exactly equal intervals (which Plotly draws as a
    uniform heatmap, several times faster than one with uneven columns). Starts in a stretch
    without steps (a lone step 0, then dense logging from 10,000) all find its next step: the
    columns they leave are spent once more, on starts spaced closer (4 times at most)."""
    lo, hi = rng
    gap = logging_gap(session, _where(Metric, run_id, name, None, skip_layer), lo, hi)
    starts = _starts(lo, hi, gap, columns)
    steps = _first_at_or_after(session, run_id, name, starts, skip_layer)
    if len(steps) < len(starts):
        wider = min(4 * columns, columns * len(starts) // max(1, len(steps)))
        again = _first_at_or_after(session, run_id, name, _starts(lo, hi, gap, wider), skip_layer)
        if len(steps) < len(again) <= columns:
            steps = again
    return steps


def _starts(lo: int, hi: int, gap: int, columns: int) -> range:
    """Equally spaced starts over ``[lo, hi]``, at most ``columns``, a multiple of ``gap``
    apart."""
    return range(lo, hi + 1, gap * max(1, -(-(hi - lo + 1) // (columns * gap))))  # ceil


def logging_gap(session: Session, where: list[Any], lo: int, hi: int) -> int:
    """The series' (rows matching ``where``, steps ``lo`` to ``hi``) usual gap between stored
    steps: the middle one of the gaps after its first step, in the middle of its range and
    before its last, so that one outlying gap (a lone early step, a run resumed with another
    cadence) does not set it (by 4 index seeks)."""

    def seek(aggregate: Any, *condition: Any) -> int | None:
        found = session.scalar(select(aggregate(Metric.step)).where(*where, *condition))
        return None if found is None else int(found)

    middle = seek(func.min, Metric.step >= (lo + hi) // 2)
    middle = hi if middle is None else middle
    pairs = [
        (lo, seek(func.min, Metric.step > lo)),
        (middle, seek(func.min, Metric.step > middle)),
        (seek(func.max, Metric.step < hi), hi),
    ]
    gaps = sorted(b - a for a, b in pairs if a is not None and b is not None)
    return gaps[(len(gaps) - 1) // 2] if gaps else 1


def _first_at_or_after(
    session: Session, run_id: int, name: str, starts: Sequence[int], skip_layer: str | None
) -> list[int]:
    """The distinct first stored steps of metric ``name`` at or after each of ``starts``
    (one index seek each, 500 a statement), ascending."""
    skip = "" if skip_layer is None else " AND m.layer != :x"
    params: dict[str, Any] = {"r": run_id, "n": name, "x": skip_layer}
    found: list[int] = []
    for i in range(0, len(starts), 500):
        values = ",".join(f"({int(a)})" for a in starts[i : i + 500])  # ints only: no injection
        rows = session.execute(
            text(
                f"WITH starts(a) AS (VALUES {values}) "
                "SELECT (SELECT min(m.step) FROM metric m"
                f" WHERE m.run_id = :r AND m.name = :n AND m.step >= starts.a{skip}) FROM starts"
            ),
            params,
        ).all()
        found.extend(int(r[0]) for r in rows if r[0] is not None)
    return sorted(set(found))


def grid_cells(
    session: Session, run_id: int, name: str, steps: Sequence[int]
) -> list[tuple[str, int, float | None]]:
    """``(layer, step, value)`` of metric ``name`` at ``steps`` (heatmap cells), by one seek
    per step. SQLite is told the index: without statistics it prefers scanning every row of
    the metric in the covering ``ix_metric_run_name_layer_step`` (0.1 -> 0.2 s for 300 steps
    of 150 layers x 5,000)."""
    conn = session.connection()
    hint = " INDEXED BY ix_metric_run_name_step" if conn.dialect.name == "sqlite" else ""
    stmt = text(
        f"SELECT layer, step, value FROM metric{hint}"  # a fixed index name, not user input
        " WHERE run_id = :r AND name = :n AND step IN :steps"
    ).bindparams(bindparam("steps", expanding=True))
    rows = conn.execute(stmt, {"r": run_id, "n": name, "steps": [int(t) for t in steps]})
    return [(str(la), int(t), v) for la, t, v in rows]


def bucketed_series(
    session: Session,
    run_id: int,
    names: Sequence[str],
    buckets: int,
    *,
    layer: str | None = None,
    model: Model = Metric,
) -> Series:
    """Min and max per step bucket of each series of ``names`` (one layer if ``layer`` is given;
    scalars with ``model=Scalar``): ``{(name, layer): (steps, values)}``, at most
    ``3 * buckets`` points per series (min, max and a gap).

    The buckets split the common step range of ``names`` into equal parts, so every series of
    one plot shares its bucket edges; at one bucket per pixel column (or two) the plot looks
    like the full series (the M4 idea, Jugel et al., VLDB 2014). A bucket's min and max are
    points of the series, at the steps they were stored at, in step order, so a line through
    them keeps its shape and every point plotted, hovered or exported as CSV is a stored one. A
    bucket holding missing values (NaN/Inf stored as NULL) has a None point at the first of
    them so gaps stay visible. Exact when no bucket holds more than two steps.
    """
    ranges = [r for n in names if (r := step_range(session, run_id, n, layer, model))]
    if not ranges:
        return {}
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    span = hi - lo + 1
    n = max(1, min(buckets, span))
    if model is Metric and layer is None:
        return _bucketed_layers(session, run_id, names, lo, span, n)
    return _bucketed_sql(session, run_id, names, layer, model, lo, span, n)


def _bucketed_sql(
    session: Session,
    run_id: int,
    names: Sequence[str],
    layer: str | None,
    model: Model,
    lo: int,
    span: int,
    n: int,
) -> Series:
    """:func:`bucketed_series` of one layer's metrics or of scalars: each series' points by one
    index-ordered read of steps and values, bucketed by :func:`_bucket_points` (the steps of a
    bucket's min and max are the steps they were stored at; a ``GROUP BY`` gives their values
    only)."""
    name: BindParameter[str] = bindparam("name")
    stmt = select(model.step, model.value).where(*_where(model, run_id, name, layer))
    stmt = stmt.order_by(model.step)
    out: Series = {}
    conn = session.connection()
    for series_name in dict.fromkeys(names):
        rows = raw_rows(conn, stmt, {"name": series_name})
        if rows:
            steps = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            values = np.array([r[1] for r in rows], dtype=np.float64)  # None -> NaN
            out[(series_name, layer or "")] = _bucket_points(steps, values, lo, span, n)
    return out


def extreme_budget(read_points: int) -> int:
    """Of a decimated read of ``read_points`` a layer, the points kept for
    :func:`beyond_sample` (an eighth); the rest are evenly spaced steps."""
    return max(1, read_points // 8)


def bucketed_layers(
    session: Session, run_id: int, names: Sequence[str], buckets: int, read_points: int
) -> tuple[Series, list[str]]:
    """:func:`bucketed_series` of every layer of metrics ``names``, reading at most about
    ``read_points`` stored points of each layer's series (the activations figures: 150
    modules x 5,000 steps is 750,000 points a descriptor, 0.7 s to read in full in SQLite).

    A metric with at most ``read_points`` stored steps (:func:`step_count`) is bucketed
    exactly as by
    :func:`bucketed_series` (every point read). One with more is decimated first: its values at
    the first stored step at or after each of ``read_points - read_points // 8`` equally spaced
    starts over its step range (:func:`spaced_steps`, the heatmap's columns), and, in the
    eighth left, each layer's points beyond the range of those read and its non-finite ones
    (:func:`beyond_sample`): a one-step burst or a NaN between two sampled steps is drawn, where
    it is. Bucketed the same way. Second value: the names decimated so (to say so on the
    figure)."""
    ranges = {n: r for n in dict.fromkeys(names) if (r := step_range(session, run_id, n))}
    if not ranges:
        return {}, []
    lo, hi = min(r[0] for r in ranges.values()), max(r[1] for r in ranges.values())
    span = hi - lo + 1
    n = max(1, min(buckets, span))
    out: Series = {}
    decimated: list[str] = []
    extremes = extreme_budget(read_points)
    for name, rng in ranges.items():
        steps = None
        fits = rng[1] - rng[0] < read_points  # else count
        if not fits and step_count(session, run_id, name, read_points) > read_points:
            steps = spaced_steps(session, run_id, name, max(1, read_points - extremes), rng)
            decimated.append(name)
        out.update(_bucketed_layers(session, run_id, [name], lo, span, n, steps, extremes))
    return out, decimated


def _bucketed_layers(
    session: Session,
    run_id: int,
    names: Sequence[str],
    lo: int,
    span: int,
    n: int,
    at_steps: Sequence[int] | None = None,
    extremes: int = 0,
) -> Series:
    """:func:`bucketed_series` of every layer of metrics ``names`` (same buckets, same points):
    each layer's points by its own covering-index search (:func:`metric_reads.metric_series`;
    only those at ``at_steps`` when given, with up to ``extremes`` more of
    :func:`beyond_sample`), the buckets' min and max by numpy. SQLite's ``GROUP BY`` evaluated
    the bucket expression and four aggregates row by row: 1.8-2.8 s for 150 layers x 5,000
    steps, against ~1 s."""
    out: Series = {}
    for name in dict.fromkeys(names):
        read = metric_series(session, run_id, name, None, None, None, at_steps=at_steps)
        if at_steps is not None and extremes > 0:
            extra = beyond_sample(session, run_id, name, read, extremes)
            for layer, found in extra.items():
                merged = sorted({**dict(zip(*read[layer], strict=True)), **found}.items())
                read[layer] = ([t for t, _ in merged], [v for _, v in merged])
        for layer, (steps, values) in read.items():
            out[(name, layer)] = _bucket_points(steps, values, lo, span, n)
    return out


BEYOND_CHUNK = 200  # layers of one beyond_sample statement (3 bound values each)


def beyond_sample(
    session: Session,
    run_id: int,
    name: str,
    sampled: dict[str, tuple[list[int], list[float | None]]],
    limit: int,
) -> dict[str, dict[int, float | None]]:
    """``{layer: {step: value}}``: of each layer's stored points of metric ``name``, up to
    ``limit`` that its decimated read (``sampled``, :func:`metric_reads.metric_series`) hides and
    a figure must not lose: non-finite ones (stored as NULL) and those above the highest or
    below the lowest finite value read (a one-step eigenvalue burst between two sampled steps);
    non-finite first, then the farthest out. A layer whose read has no finite value is left as
    read.

    One statement for up to :data:`BEYOND_CHUNK` layers: each layer's range joined to its
    covering ``ix_metric_run_name_layer_step`` search (steps and values are in the index),
    only the rows outside it returned (150 layers x 5,000 steps: ~0.15 s scanned in SQLite, a
    few rows back; one statement a layer cost twice that in round trips)."""
    ranges = []
    for layer, (_, values) in sampled.items():
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if finite:
            ranges.append((layer, min(finite), max(finite)))
    found: dict[str, list[tuple[int, float | None]]] = {}
    conn = session.connection()
    for i in range(0, len(ranges), BEYOND_CHUNK):
        chunk = ranges[i : i + BEYOND_CHUNK]
        params: dict[str, Any] = {"r": run_id, "n": name}
        rows = []
        for j, (layer, low, high) in enumerate(chunk):
            params.update({f"l{j}": layer, f"a{j}": low, f"b{j}": high})
            rows.append(
                f"(:l{j}, CAST(:a{j} AS DOUBLE PRECISION), CAST(:b{j} AS DOUBLE PRECISION))"
            )
        stmt = text(
            f"WITH env(layer, low, high) AS (VALUES {', '.join(rows)}) "
            "SELECT m.layer, m.step, m.value FROM env JOIN metric m"
            " ON m.run_id = :r AND m.name = :n AND m.layer = env.layer"
            " WHERE m.value IS NULL OR m.value > env.high OR m.value < env.low"
        )
        for layer, step, value in raw_rows(conn, stmt, params):
            found.setdefault(str(layer), []).append(
                (int(step), None if value is None else float(value))
            )
    middle = {layer: (low + high) / 2 for layer, low, high in ranges}
    out: dict[str, dict[int, float | None]] = {}
    for layer, points in found.items():
        mid = middle[layer]
        points.sort(key=lambda p: (p[1] is not None, -abs((p[1] or 0.0) - mid)))
        out[layer] = dict(points[:limit])
    return out


def _bucket_points(
    steps: Sequence[int] | npt.NDArray[np.int64],
    values: Sequence[float | None] | npt.NDArray[np.float64],
    lo: int,
    span: int,
    n: int,
) -> Points:
    """One series (steps ascending) as :func:`bucketed_series` returns it: per bucket ``k =
    (step - lo) * n // span`` (:func:`bucket_index`), its min and its max at the steps they
    were stored at, in step order (one point when they are the same), and a None point at the
    bucket's first missing value (NaN/Inf stored as NULL), so a gap shows where it is."""
    s = np.asarray(steps, dtype=np.int64)
    v = np.array(values, dtype=np.float64)  # None -> NaN
    if not len(s):
        return [], []
    k = bucket_index(s, lo, span, n)
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    group = np.cumsum(np.r_[False, k[1:] != k[:-1]])  # each point's bucket, 0..len(starts)-1
    ok = ~np.isnan(v)
    with np.errstate(invalid="ignore"):
        vmin = np.fmin.reduceat(v, starts)  # NaN only where every value is missing
        vmax = np.fmax.reduceat(v, starts)
    picked = [
        _first_per_group(group, ok & (v == vmin[group])),  # each bucket's first min
        _first_per_group(group, ok & (v == vmax[group])),  # ... and first max
        _first_per_group(group, ~ok),  # ... and first missing value
    ]
    index = np.unique(np.concatenate(picked))  # sorted: step order
    out_values: list[float | None] = [None if math.isnan(x) else float(x) for x in v[index]]
    return s[index].tolist(), out_values


def bucket_index(steps: npt.NDArray[np.int64], lo: int, span: int, n: int) -> Any:
    """``(steps - lo) * n // span`` exactly, for steps in ``[lo, lo + span)``: each step's
    bucket of ``n`` equal parts of that range, by search among the buckets' first steps
    (``ceil(k * span / n)``, Python ints). The product itself overflows int64 for steps near
    ``MAX_STEP`` (2**62), which made bucket indices negative and out of order."""
    return np.searchsorted(_bucket_edges(span, n), steps - lo, side="right") - 1


@functools.lru_cache(maxsize=16)
def _bucket_edges(span: int, n: int) -> npt.NDArray[np.int64]:
    """First offset of each of ``n`` buckets of ``span`` steps, ``ceil(k * span / n)`` (each
    below ``span``); cached: every layer of a figure has the same buckets."""
    edges = np.array([-(-k * span // n) for k in range(n)], dtype=np.int64)
    edges.flags.writeable = False
    return edges


def _first_per_group(group: npt.NDArray[np.int64], mask: npt.NDArray[np.bool_]) -> Any:
    """Index of the first point of each group (ascending ``group``) where ``mask`` holds."""
    idx = np.flatnonzero(mask)
    if not len(idx):
        return idx
    first = np.r_[True, group[idx][1:] != group[idx][:-1]]
    return idx[first]


def first_step_at_least(
    session: Session,
    run_id: int,
    name: str,
    threshold: float,
    *,
    layer: str | None = None,
    model: Model = Metric,
) -> int | None:
    """First step whose value of series ``name`` is >= ``threshold`` (exact, not bucketed)."""
    where = _where(model, run_id, name, layer)
    step = session.scalar(select(func.min(model.step)).where(*where, model.value >= threshold))
    return None if step is None else int(step)


ORDER_PAGES = (1, 4, 16, 64)  # frames read per page of a weight snapshot's parts, then 64 each
SKETCH_KINDS = ("update_sketch", "param_sketch")  # the same rows: the trained tensors


def model_order(session: Session, run_id: int) -> list[str]:
    """The run's layer and module names in its model's order, as its client sent them: the
    weights of its first weight snapshot (every part; a frozen weight is in it, later ones leave
    it out), the trained tensors of its latest sketch frame (biases, norms) merged in where they
    fall among those (:func:`merge_order`), then the modules of its latest activations frame
    (forward order). A few index seeks on ``ix_frame_run_kind_seq``, no scan of the frames;
    ``[]`` for a run without any."""
    order = first_snapshot_layers(session, run_id)
    for kind in SKETCH_KINDS:  # update sketches off: the parameter sketches list the same rows
        sketch = latest_frame_layers(session, run_id, kind)
        if sketch:
            order = merge_order(order, sketch)
            break
    return merge_order(order, latest_frame_layers(session, run_id, "activations"))


def first_snapshot_layers(session: Session, run_id: int) -> list[str]:
    """The layer names of the run's first weight snapshot, its parts in ``seq`` order (the
    client walks ``named_parameters()`` and each frame lists its tensors in that order): its
    frames are read a growing page at a time up to the first of a later step."""
    names: list[str] = []
    first: int | None = None
    done = 0
    pages = itertools.chain(ORDER_PAGES, itertools.repeat(ORDER_PAGES[-1]))
    while True:
        limit = next(pages)
        rows = session.execute(
            select(Frame.step, Frame.layers)
            .where(Frame.run_id == run_id, Frame.kind == "weights")
            .order_by(Frame.seq, Frame.id)
            .offset(done)
            .limit(limit)
        ).all()
        for step, layers in rows:
            first = step if first is None else first
            if step != first:
                return names
            names += [la for la in layers or () if isinstance(la, str)]
        if len(rows) < limit:
            return names
        done += limit


def latest_frame_layers(session: Session, run_id: int, kind: str) -> list[str]:
    """The names the run's latest frame of ``kind`` lists, in its order (``[]``: none)."""
    layers = session.execute(
        select(Frame.layers)
        .where(Frame.run_id == run_id, Frame.kind == kind)
        .order_by(Frame.seq.desc(), Frame.id.desc())
        .limit(1)
    ).scalar()
    return [la for la in layers or () if isinstance(la, str)]


def merge_order(order: Sequence[str], other: Sequence[str]) -> list[str]:
    """``order`` with the names of ``other`` it lacks, each placed after the last name before it
    in ``other`` that ``order`` has (first where there is none): both are walks of one model,
    ``other`` with names ``order`` leaves out (a sketch's biases among a snapshot's matrices).
    Appended in their order where the two share no name (activations name modules, not
    parameters)."""
    place = {name: i for i, name in enumerate(dict.fromkeys(order))}
    if not any(name in place for name in other):
        return [*place, *(name for name in dict.fromkeys(other) if name not in place)]
    keys = {name: (i, 0) for name, i in place.items()}
    after = -1
    for j, name in enumerate(other):
        if name in place:
            after = place[name]
        else:
            keys.setdefault(name, (after, j + 1))
    return sorted(keys, key=keys.__getitem__)


def nonfinite_onsets(session: Session, run_id: int) -> dict[str, tuple[int, str]]:
    """Where a run's data first went NaN/Inf: ``{layer: (step, frame kind)}``, the earliest
    step of each layer over every frame carrying non-finite values (the row step of a sketch
    frame where ``nonfinite_steps`` has it, else the frame's step). The analyses skip such
    layers (HT-SR, SED, norms), so the dashboards say why their series stop there."""
    rows = session.execute(
        select(Frame.kind, Frame.step, Frame.nonfinite, Frame.nonfinite_steps).where(
            Frame.run_id == run_id, cast(Frame.nonfinite, String).not_in(["{}", "null"])
        )
    ).all()
    out: dict[str, tuple[int, str]] = {}
    for kind, step, counts, spans in rows:
        for layer, n in (counts or {}).items():
            if not n:
                continue
            span = (spans or {}).get(layer)
            first = int(span[0]) if span else int(step)
            if layer not in out or first < out[layer][0]:
                out[layer] = (first, str(kind))
    return out


def runs_page(
    session: Session,
    project_id: int | None,
    status: str | None,
    q: str | None,
    sort: str,
    desc: bool,
    limit: int,
) -> tuple[list[Run], int]:
    """The runs list (of project ``project_id``, or all): the first ``limit`` runs with
    ``status``, their name or one of their tags holding ``q`` (case-insensitive; ASCII only on
    SQLite), in the order of ``sort`` (a key of :data:`RUN_SORTS`, else ``id``; ties newest
    first), and how many match in all. Filtered and sorted in SQL: the list read the newest
    1,000 runs and filtered those, so an older run was never listed, even by its name."""
    where: list[Any] = [Run.status != repository.DELETED]
    if project_id is not None:
        where.append(Run.project_id == project_id)
    if status:
        where.append(Run.status == status)
    if q:
        needle = q.lower()
        in_tag = repository.tag_matches(
            session, lambda tag: func.lower(tag).contains(needle, autoescape=True)
        )
        where.append(or_(func.lower(Run.name).contains(needle, autoescape=True), in_tag))
    key = run_sort_key(sort)
    first = key.desc() if desc else key.asc()
    if sort.startswith(SUMMARY_SORT):  # runs without a finite last value last, either way
        first = first.nulls_last()
    order = [first, Run.id.desc()]
    runs = list(session.scalars(select(Run).where(*where).order_by(*order).limit(limit)).all())
    total = len(runs)
    if total == limit:
        total = session.scalar(select(func.count()).select_from(Run).where(*where)) or 0
    return runs, total


RUN_SORTS: dict[str, Any] = {  # the runs list's sort keys, as SQL
    "id": Run.id,
    "name": func.lower(Run.name),
    "step": func.coalesce(Run.last_step, -1),
    "age": Run.created_at,
    "alerts": select(func.count())  # open alerts nobody acknowledged (the column's count)
    .where(Alert.run_id == Run.id, Alert.status == "open", Alert.acknowledged_at.is_(None))
    .correlate(Run)
    .scalar_subquery(),
    "status": Run.status,
}


SUMMARY_SORT = "summary:"  # sort=summary:<scalar>: by the last value of a logged scalar


def run_sort_key(sort: str) -> Any:
    """The SQL the runs list orders by: a key of :data:`RUN_SORTS` (else ``id``), or
    ``summary:<scalar>``, the run's last stored value of that scalar (NULL when it has none or
    it was NaN/Inf): one index seek on ``ix_scalar_run_name_step`` a run."""
    if sort.startswith(SUMMARY_SORT):
        return (
            select(Scalar.value)
            .where(Scalar.run_id == Run.id, Scalar.name == sort.removeprefix(SUMMARY_SORT))
            .order_by(Scalar.step.desc())
            .limit(1)
            .correlate(Run)
            .scalar_subquery()
        )
    return RUN_SORTS.get(sort, RUN_SORTS["id"])


def _id_values(run_ids: Sequence[int]) -> str:
    """``VALUES (1), (2), ...`` of ``run_ids`` (ints only: nothing a user wrote)."""
    return "VALUES " + ", ".join(f"({int(i)})" for i in run_ids)


def scalar_names_of(session: Session, run_ids: Sequence[int]) -> list[str]:
    """The distinct scalar names of ``run_ids``, natural order not applied (sorted by the
    caller): one recursive skip-scan over every run, an index seek per (run, name), not a read
    of every stored point."""
    if not run_ids:
        return []
    rows = session.execute(
        text(
            f"WITH RECURSIVE r(id) AS ({_id_values(run_ids)}),"
            " n(run_id, name) AS ("
            " SELECT r.id, (SELECT min(s.name) FROM scalar s WHERE s.run_id = r.id) FROM r"
            " UNION ALL"
            " SELECT n.run_id, (SELECT min(s.name) FROM scalar s"
            "  WHERE s.run_id = n.run_id AND s.name > n.name)"
            " FROM n WHERE n.name IS NOT NULL"
            ") SELECT DISTINCT name FROM n WHERE name IS NOT NULL"
        )
    ).all()
    return [str(r[0]) for r in rows]


def last_scalars(
    session: Session, run_ids: Sequence[int], names: Sequence[str]
) -> dict[int, dict[str, tuple[int, float | None]]]:
    """``{run: {scalar: (step, value)}}``: the last stored point of each of ``names`` in each
    of ``run_ids`` (value None: NaN/Inf), by one statement: an index seek per (run, name) pair
    for its last step, then its row (runs without the scalar are absent)."""
    if not run_ids or not names:
        return {}
    params = {f"n{i}": name for i, name in enumerate(names)}
    wanted = ", ".join(f"(CAST(:n{i} AS VARCHAR(200)))" for i in range(len(names)))
    rows = session.execute(
        text(
            f"WITH r(id) AS ({_id_values(run_ids)}), n(name) AS (VALUES {wanted}),"
            " last(run_id, name, step) AS ("
            " SELECT r.id, n.name, (SELECT max(s.step) FROM scalar s"
            "  WHERE s.run_id = r.id AND s.name = n.name) FROM r CROSS JOIN n)"
            " SELECT s.run_id, s.name, s.step, s.value FROM last JOIN scalar s"
            " ON s.run_id = last.run_id AND s.name = last.name AND s.step = last.step"
        ),
        params,
    ).all()
    out: dict[int, dict[str, tuple[int, float | None]]] = {}
    for run_id, name, step, value in rows:
        out.setdefault(int(run_id), {})[str(name)] = (int(step), _finite(value))
    return out


def _finite(value: Any) -> float | None:
    """A stored value, None for NULL (NaN/Inf) and for a NaN PostgreSQL kept as such."""
    return None if value is None or not math.isfinite(float(value)) else float(value)


NONFINITE_RULE = "nonfinite"  # the default rule that opens an episode for NaN/Inf frames


def nonfinite_runs(session: Session, runs: Sequence[Run]) -> dict[int, int]:
    """``{run: first step}`` of the ``runs`` whose frames carried NaN/Inf values: the earliest
    step of an alert episode (open or resolved) of a ``nonfinite`` kind rule (the default
    :data:`NONFINITE_RULE` or a project's custom one). One grouped seek on
    ``ix_alert_run_rule_layer`` for the listed runs, where reading their frames' ``nonfinite``
    maps scanned every frame; a project that switched its NaN/Inf rule off has no episode."""
    if not runs:
        return {}
    projects = {r.project_id for r in runs}
    custom = session.execute(
        select(AlertRule.rule, AlertRule.params).where(AlertRule.project_id.in_(projects))
    ).all()
    rules = {NONFINITE_RULE} | {
        str(rule)
        for rule, params in custom
        if isinstance(params, dict) and params.get("kind") == "nonfinite"
    }
    rows = session.execute(
        select(Alert.run_id, func.min(Alert.step))
        .where(Alert.run_id.in_([r.id for r in runs]), Alert.rule.in_(sorted(rules)))
        .group_by(Alert.run_id)
    ).all()
    return {int(run_id): int(step) for run_id, step in rows}


def open_alert_counts(session: Session, run_ids: Sequence[int]) -> dict[int, int]:
    """Open alerts nobody acknowledged per run of ``run_ids`` (runs without any are absent)."""
    if not run_ids:
        return {}
    rows = session.execute(
        select(Alert.run_id, func.count())
        .where(
            Alert.run_id.in_(list(run_ids)),
            Alert.status == "open",
            Alert.acknowledged_at.is_(None),
        )
        .group_by(Alert.run_id)
    ).all()
    return {int(r): int(n) for r, n in rows}


def open_alerts_by_rule(session: Session, project_id: int) -> dict[str, int]:
    """Open alerts per rule name across the runs of a project (rules without any are absent)."""
    runs = select(Run.id).where(Run.project_id == project_id)
    rows = session.execute(
        select(Alert.rule, func.count())
        .where(Alert.run_id.in_(runs), Alert.status == "open")
        .group_by(Alert.rule)
    ).all()
    return {str(rule): int(n) for rule, n in rows}


def alert_rows(session: Session, run_id: int) -> list[dict[str, Any]]:
    """Every alert of a run as a JSON-ready dict, by step then id."""
    alerts = sorted(
        alert_store.list_alerts(session, run_id=run_id, limit=100_000), key=lambda a: (a.step, a.id)
    )
    return [
        {
            "id": a.id,
            "rule": a.rule,
            "layer": a.layer,
            "severity": a.severity,
            "status": a.status,
            "step": a.step,
            "resolved_step": a.resolved_step,
            "message": a.message,
            "values": a.values,
            "created_at": _iso(a.created_at),
            "resolved_at": _iso(a.resolved_at),
            "acknowledged_at": _iso(a.acknowledged_at),
            "acknowledged_by": a.acknowledged_by,
        }
        for a in alerts
    ]


def delivery_rows(session: Session, project_id: int, limit: int = 200) -> list[dict[str, Any]]:
    """The project's latest ``limit`` webhook deliveries (newest first) as JSON-ready dicts,
    with the latency of each one's last attempt (ms)."""
    rows = session.execute(
        select(Delivery, Webhook.url)
        .join(Webhook, Webhook.id == Delivery.webhook_id)
        .where(Webhook.project_id == project_id)
        .order_by(Delivery.id.desc())
        .limit(limit)
    ).all()
    ids = [d.id for d, _ in rows]
    attempts: dict[int, list[DeliveryAttempt]] = {}
    if ids:
        for att in session.scalars(
            select(DeliveryAttempt)
            .where(DeliveryAttempt.delivery_id.in_(ids))
            .order_by(DeliveryAttempt.id)
        ).all():
            attempts.setdefault(att.delivery_id, []).append(att)
    out = []
    for d, url in rows:
        tried = attempts.get(d.id, [])
        out.append(
            {
                "id": d.id,
                "event": d.event,
                "url": url,
                "status": d.status,
                "attempts": d.attempts,
                "alert_id": d.alert_id,
                "last_status_code": d.last_status_code,
                "last_error": d.last_error or "",
                "created_at": _iso(d.created_at),
                "delivered_at": _iso(d.delivered_at),
                "latency_ms": tried[-1].latency_ms if tried else None,
            }
        )
    return out


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()
