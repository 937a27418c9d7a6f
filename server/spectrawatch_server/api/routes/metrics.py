"""Analysis results: metric series (downsampled server-side), catalog, spectra."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from spectrawatch_server.api.deps import RunDep, SessionDep
from spectrawatch_server.downsample import downsample
from spectrawatch_server.schemas import MetricInfo, MetricSeries, Series, SpectrumPublic
from spectrawatch_server.storage import repository as repo

router = APIRouter(tags=["metrics"])


@router.get("/runs/{run_id}/metrics", response_model=MetricSeries)
def read_metrics(
    run: RunDep,
    session: SessionDep,
    name: Annotated[str, Query(min_length=1, max_length=200)],
    layer: str | None = None,
    start: Annotated[int | None, Query(alias="from", ge=0)] = None,
    end: Annotated[int | None, Query(alias="to", ge=0)] = None,
    max_points: Annotated[int | None, Query(ge=3, le=100_000)] = None,
) -> MetricSeries:
    """One metric, one series per layer, each LTTB-downsampled to ``max_points``."""
    grouped: dict[str, tuple[list[int], list[float | None]]] = {}
    for lname, step, value in repo.metric_points(session, run.id, name, layer, start, end):
        steps, values = grouped.setdefault(lname, ([], []))
        steps.append(step)
        values.append(value)
    series = []
    for lname, (steps, values) in grouped.items():
        ds, dv = downsample(steps, values, max_points)
        series.append(Series(layer=lname, steps=ds, values=dv, points=len(steps)))
    return MetricSeries(name=name, series=series)


@router.get("/runs/{run_id}/metrics/catalog", response_model=list[MetricInfo])
def read_metric_catalog(run: RunDep, session: SessionDep) -> list[MetricInfo]:
    """Every (metric, layer) series the run has, with point counts and step range."""
    return [
        MetricInfo(name=n, layer=la, points=p, first_step=a, last_step=b)
        for n, la, p, a, b in repo.metric_catalog(session, run.id)
    ]


@router.get("/runs/{run_id}/spectra", response_model=list[SpectrumPublic])
def read_spectra(
    run: RunDep,
    session: SessionDep,
    layer: str | None = None,
    frame: int | None = None,
    analysis: str | None = None,
) -> list[SpectrumPublic]:
    rows = repo.spectra_for(session, run.id, layer, frame, analysis)
    return [SpectrumPublic.model_validate(r) for r in rows]


@router.get("/runs/{run_id}/spectra/{frame_id}", response_model=list[SpectrumPublic])
def read_frame_spectra(run: RunDep, session: SessionDep, frame_id: int) -> list[SpectrumPublic]:
    rows = repo.spectra_for(session, run.id, None, frame_id, None)
    return [SpectrumPublic.model_validate(r) for r in rows]
