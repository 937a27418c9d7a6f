"""Tails of many metric series of a run, read in a few queries (the worker's history reads)."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from spectrawatch_server.analyses.registry import MODEL_LAYER
from spectrawatch_server.db.models import Metric
from spectrawatch_server.storage.dashboard_reads import series_names
from spectrawatch_server.storage.metric_reads import INT64_MAX, metric_tail

Series = dict[tuple[str, str], list[tuple[int, float]]]


# Built once, run with bound values: building the expressions anew for every name of every
# frame cost more than the index seeks they ran (~2 s of a 440-frame backlog's 100 s)
_FINITE = (
    Metric.run_id == bindparam("run"),
    Metric.name == bindparam("name"),
    Metric.value.is_not(None),
    Metric.step <= bindparam("until"),
)
_SINCE = (
    select(Metric.step)
    .where(*_FINITE, Metric.layer == bindparam("layer"))
    .order_by(Metric.step.desc())
    .offset(bindparam("skip"))
    .limit(1)
)
_POINTS = select(Metric.layer, Metric.step, Metric.value).where(*_FINITE).order_by(Metric.step)
_POINTS_SINCE = (
    select(Metric.layer, Metric.step, Metric.value)
    .where(*_FINITE, Metric.step >= bindparam("since"))
    .order_by(Metric.step)
)


def metric_tails(
    session: Session,
    run_id: int,
    wanted: Mapping[tuple[str, str], int],
    until: int | None = None,
) -> Series:
    """The last ``wanted[(name, layer)]`` finite ``(step, value)`` points of each series (at
    steps up to ``until`` when given), oldest first (what :func:`metric_reads.metric_tail`
    returns for one series), in two queries per metric name instead of one per series.

    Per name, with k the most points any of its series needs: the step of the k-th latest point
    of one such series (an index seek, :func:`_probes`), then every finite point of the name
    from that step on; a series with enough points there has its tail. When no probed series
    has k points, every point of the name is read instead (a young run). A series with fewer
    points than it needs after the bounded read (a layer missing from some frames) gets its own
    query.
    """
    out: Series = {}
    conn = session.connection()  # Core rows: no ORM row processing for thousands of points
    most: dict[str, int] = {}
    for (name, _), limit in wanted.items():
        most[name] = max(most.get(name, 0), limit)
    last = INT64_MAX if until is None else until
    for name, k in sorted(most.items()):
        args = {"run": run_id, "name": name, "until": last}
        since = None
        for probe in _probes(name, k, wanted):
            since = conn.scalar(_SINCE, {**args, "layer": probe, "skip": k - 1})
            if since is not None:
                break
        if since is None:
            rows = conn.execute(_POINTS, args)
        else:
            rows = conn.execute(_POINTS_SINCE, {**args, "since": since})
        points: Series = {}
        for layer, step, value in rows:
            if value is not None:
                points.setdefault((name, layer), []).append((int(step), float(value)))
        for key, limit in wanted.items():
            if key[0] != name:
                continue
            found = points.get(key, [])
            if len(found) >= limit or since is None:
                out[key] = found[-limit:]
            else:
                out[key] = metric_tail(session, run_id, name, key[1], limit, until)
    return out


def _probes(name: str, k: int, wanted: Mapping[tuple[str, str], int]) -> list[str]:
    """The series of ``name`` whose k-th latest point bounds the range read, in the order to
    try: up to 3 layers needing ``k`` points, then the whole model's. A layer first: SED keeps
    the model's value at every row and a layer's every ``layer_stride`` rows, so probed on the
    model every layer was short in the range and got its own query (149 of a GPT-2's, a frame,
    once the run was past the tail). More than one: a layer may be young or never finite (a
    frozen one's gap), and no probe reads every point of the name, growing with the run."""
    layers = sorted(la for (n, la), limit in wanted.items() if n == name and limit == k)
    model = [MODEL_LAYER] if MODEL_LAYER in layers else []
    return [la for la in layers if la != MODEL_LAYER][:3] + model


_FLAGGED = (
    select(Metric.layer, Metric.step)
    .where(
        Metric.run_id == bindparam("run"),
        Metric.name == bindparam("name"),
        Metric.step >= bindparam("since"),
        Metric.step <= bindparam("until"),
        Metric.value != 0,
    )
    .order_by(Metric.step)
)


def flagged_steps(
    session: Session, run_id: int, name: str, since: int, until: int | None = None
) -> dict[str, set[int]]:
    """Per layer, the steps from ``since`` on (up to ``until`` when given) where metric ``name``
    is stored non-zero (NULL and 0 left out): one index range over the name's points, returning
    only the flagged ones (the SED phase history's ``sed.incomplete`` flags, instead of 1,024
    points per series)."""
    out: dict[str, set[int]] = {}
    args = {"run": run_id, "name": name, "since": since}
    rows = session.connection().execute(
        _FLAGGED, {**args, "until": INT64_MAX if until is None else until}
    )
    for layer, step in rows:
        out.setdefault(layer, set()).add(int(step))
    return out


def metrics_at(
    session: Session, run_id: int, layer: str, prefix: str, step: int
) -> dict[str, float]:
    """``{name: value}`` of a run's metrics named ``prefix*`` in ``layer`` at ``step``.

    The names come from the run's distinct names (one index seek each) and the values by a
    seek per name: ``name LIKE 'prefix%'`` uses no index, so it read every metric row of the
    run (0.4 s for 4.5M rows; the overview's early-warning evidence, the alert engine)."""
    names = [n for n in series_names(session, run_id) if n.startswith(prefix)]
    if not names:
        return {}
    rows = session.execute(
        select(Metric.name, Metric.value).where(
            Metric.run_id == run_id,
            Metric.name.in_(names),
            Metric.layer == layer,
            Metric.step == step,
        )
    ).all()
    return {r[0]: r[1] for r in rows if r[1] is not None}
