"""Scalars logged by the client (loss, accuracies...): batch ingest and downsampled queries."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query

from spectrawatch_server.alerts.engine import engine_for
from spectrawatch_server.api.deps import (
    RunDep,
    SessionDep,
    StateDep,
    get_live_run,
    require_role,
)
from spectrawatch_server.api.errors import ApiError
from spectrawatch_server.api.openapi import error
from spectrawatch_server.downsample import downsample_many
from spectrawatch_server.schemas import ScalarIn, ScalarSeries
from spectrawatch_server.storage import metric_reads, result_store

router = APIRouter(tags=["scalars"])


@router.post(
    "/runs/{run_id}/scalars",
    status_code=202,
    dependencies=[require_role("write")],
    responses={413: error("`too_many_scalars` (over `max_scalars_per_batch`), `too_large`")},
)
def ingest_scalars(
    body: Annotated[list[ScalarIn], Body()], run: RunDep, session: SessionDep, state: StateDep
) -> dict[str, Any]:
    """Store a batch ``[{step, name, value}]``; NaN/Inf values are kept as null and counted.

    The write lock (:func:`get_live_run`) is taken once the body is validated, for the writes
    alone: as a dependency it was held while FastAPI validated the body (100,000 rows: ~0.5 s).
    The project's alert rules on logged scalars (``params.scalar``) that watch a name of the
    batch are evaluated in the same transaction, after the run's lock: an alert commits with
    the scalars it rests on, its webhook deliveries in the outbox."""
    if len(body) > state.settings.max_scalars_per_batch:
        raise ApiError(
            413,
            "too_many_scalars",
            f"{len(body)} scalars exceed {state.settings.max_scalars_per_batch}",
        )
    rows = {(s.name, s.step): s.value for s in body}  # last value wins within a batch
    get_live_run(run, session)
    accepted = result_store.upsert_scalars(
        session, run.id, [(st, n, v) for (n, st), v in rows.items()]
    )
    engine_for(state.settings).evaluate_scalars(session, run, {n for n, _ in rows})
    session.commit()
    nonfinite = sum(1 for v in rows.values() if result_store.finite_or_none(v) is None)
    return {"accepted": accepted, "nonfinite": nonfinite}


@router.get("/runs/{run_id}/scalars", response_model=list[ScalarSeries])
def read_scalars(
    run: RunDep,
    session: SessionDep,
    name: str | None = None,
    start: Annotated[int | None, Query(alias="from", ge=0)] = None,
    end: Annotated[int | None, Query(alias="to", ge=0)] = None,
    max_points: Annotated[int | None, Query(ge=3, le=100_000)] = None,
) -> list[ScalarSeries]:
    grouped: dict[str, tuple[list[int], list[float | None]]] = {}
    for sname, step, value in metric_reads.scalar_points(session, run.id, name, start, end):
        steps, values = grouped.setdefault(sname, ([], []))
        steps.append(step)
        values.append(value)
    kept = downsample_many(list(grouped.values()), max_points)
    return [
        ScalarSeries(name=sname, steps=ds, values=dv, points=len(full[0]))
        for (sname, full), (ds, dv) in zip(grouped.items(), kept, strict=True)
    ]
