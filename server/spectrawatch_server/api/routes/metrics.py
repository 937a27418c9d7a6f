"""Analysis results: metric series (downsampled server-side), catalog, spectra."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
import statistics
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from sqlalchemy.exc import IntegrityError

from spectrawatch.spectral import sed
from spectrawatch.wire import MODEL_LAYER, FrameKind
from spectrawatch_server.api.deps import (
    RunDep,
    SessionDep,
    StateDep,
    get_live_run,
    require_role,
)
from spectrawatch_server.api.errors import ApiError
from spectrawatch_server.api.links import next_link
from spectrawatch_server.api.openapi import error
from spectrawatch_server.db.models import Frame
from spectrawatch_server.downsample import downsample_many
from spectrawatch_server.schemas import (
    LagAnalysis,
    LagPoint,
    LagSeries,
    MetricBatch,
    MetricInfo,
    MetricSeries,
    Series,
    SpectrumPublic,
)
from spectrawatch_server.storage import metric_reads, result_store
from spectrawatch_server.storage import repository as repo
from spectrawatch_server.storage.dashboard_reads import series_names

router = APIRouter(tags=["metrics"])
FRAME_KINDS = frozenset(k.value for k in FrameKind)  # never a metric batch's source

# a step bound past the database's integers is refused up front: a read that runs no query
# (a metric without layers) would not reach the OverflowError that answers 422 otherwise
INT64_MAX = 2**63 - 1


SERIES_POINTS = 1000  # points per layer by default when no layer is named


@router.get("/runs/{run_id}/metrics", response_model=MetricSeries)
def read_metrics(
    run: RunDep,
    session: SessionDep,
    name: Annotated[str, Query(min_length=1, max_length=200)],
    layer: str | None = None,
    start: Annotated[int | None, Query(alias="from", ge=0, le=INT64_MAX)] = None,
    end: Annotated[int | None, Query(alias="to", ge=0, le=INT64_MAX)] = None,
    max_points: Annotated[int | None, Query(ge=3, le=100_000)] = None,
) -> MetricSeries:
    """One metric, one series per layer, each LTTB-downsampled to at most ``max_points``
    points (LTTB keeps the first and last point and each bucket's most prominent one, so peaks
    survive; and one point of each run of NaN/Inf values, so gaps do, even past ``max_points``
    in a series with more gaps than that). With ``layer``, every point unless ``max_points``
    is given; without it, every layer's series has at most 1000 points unless ``max_points``
    says otherwise (a metric of 150 layers x 5,000 steps is 750,000 points, 17 MB of JSON).
    Each series says how many points it has stored (``points``) and whether some were left out
    (``downsampled``); ask for one ``layer`` to read all of its points."""
    if max_points is None and layer is None:
        max_points = SERIES_POINTS
    stored = metric_reads.metric_series(session, run.id, name, layer, start, end)
    kept = downsample_many(list(stored.values()), max_points)
    return MetricSeries(
        name=name,
        series=[
            Series(
                layer=lname,
                steps=steps,
                values=values,
                points=len(full[0]),
                downsampled=len(steps) < len(full[0]),
            )
            for (lname, full), (steps, values) in zip(stored.items(), kept, strict=True)
        ],
    )


@router.post(
    "/runs/{run_id}/metrics",
    status_code=202,
    dependencies=[require_role("write")],
    responses={
        409: error("`idempotency_conflict`: the key was used for another batch or a frame"),
        413: error("`too_many_metrics` (over `max_metrics_per_batch`), `too_large`"),
    },
)
def ingest_metrics(
    body: MetricBatch,
    run: RunDep,
    session: SessionDep,
    state: StateDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=160)] = None,
) -> dict[str, Any]:
    """Store a batch of metrics computed elsewhere (``spectrawatch import``); replay-safe.

    All or nothing: the batch is one transaction, so at most ``max_metrics_per_batch`` rows
    (10,000 by default; more answer 413 ``too_many_metrics``) keep it from holding SQLite's
    write lock for seconds while other runs' writes wait. The lock (:func:`get_live_run`) is
    taken once the body is validated, hashed and deduplicated, for the writes alone."""
    limit = state.settings.max_metrics_per_batch
    if len(body.rows) > limit:
        raise ApiError(
            413,
            "too_many_metrics",
            f"body.rows: {len(body.rows)} rows exceed max_metrics_per_batch ({limit}); "
            "send them in smaller batches",
        )
    key = f"{run.id}/{idempotency_key or uuid.uuid4().hex}"
    digest = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    # a (layer, name, step) given twice: the last value wins, as for scalars
    latest = {(m.layer, m.name, m.step): m.value for m in body.rows}
    rows = [
        result_store.MetricRow(layer, name, step, math.nan if value is None else value)
        for (layer, name, step), value in latest.items()
    ]
    get_live_run(run, session)
    existing = repo.frame_by_key(session, key)
    if existing is not None:
        return _replayed(existing, digest)
    try:
        frame = result_store.insert_metric_batch(
            session, run.id, key, body.source, rows, digest=digest
        )
        session.commit()
    except IntegrityError:
        # the key was stored since the look-up above: the same batch sent again while its first
        # request was still being stored (a retry after a timeout) is a replay, not a conflict
        session.rollback()
        existing = repo.frame_by_key(session, key)
        if existing is None:  # another constraint failed (the run deleted meanwhile...)
            raise
        return _replayed(existing, digest)
    return {"accepted": len(rows), "frame_id": frame.id, "replayed": False}


def _replayed(stored: Frame, digest: str) -> dict[str, Any]:
    """The answer to a batch whose key is ``stored``'s: a replay if the bodies' ``digest``s
    agree, else 409 (also when the key is a streamed frame's: a batch's source is never a
    frame kind, and that frame's metrics are not this batch)."""
    if stored.kind in FRAME_KINDS:
        raise ApiError(
            409,
            "idempotency_conflict",
            f"Idempotency-Key was used for a {stored.kind} frame of this run (frame {stored.id})",
        )
    if stored.info.get("digest", digest) != digest:
        raise ApiError(
            409,
            "idempotency_conflict",
            f"Idempotency-Key was used for a different metric batch (frame {stored.id})",
        )
    return {"accepted": 0, "frame_id": stored.id, "replayed": True}


# per-step SED gap ratio (``sed.gap_ratio.w<W>``) and its checkpoint-interval variant
BEST_LAG_PAIRS = 10  # the fewest point pairs a lag needs to be reported as the strongest
_GAP_BASES = (sed.GAP_RATIO, sed.interval_key(sed.GAP_RATIO).rpartition(".w")[0])


def _is_gap_series(name: str) -> bool:
    base, sep, window = name.rpartition(".w")
    return bool(sep) and window.isdigit() and base in _GAP_BASES


def _finite_points(rows: Any) -> tuple[list[int], list[float]]:
    points = [
        (step, value) for _, step, value in rows if value is not None and math.isfinite(value)
    ]
    return [p[0] for p in points], [p[1] for p in points]


@router.get("/runs/{run_id}/sed/lag", response_model=LagAnalysis)
def read_sed_lag(
    run: RunDep,
    session: SessionDep,
    scalar: Annotated[str, Query(min_length=1, max_length=200)] = "val_loss",
    layer: Annotated[str, Query(min_length=1, max_length=500)] = MODEL_LAYER,
    max_lag: Annotated[int, Query(ge=1, le=500)] = 10,
) -> LagAnalysis:
    """SED lag analysis (the SED paper's §4): Pearson r(gap_t, scalar_{t+l}) of every gap-ratio
    series of ``layer`` (each window size, and the checkpoint-interval variant) with a logged
    scalar, for l = -max_lag..max_lag points of the steps both share. The strongest |r| at
    l > 0 says the gap leads the scalar by ``steps``; at l < 0 it lags behind it. ``best`` is
    chosen among lags over at least :data:`BEST_LAG_PAIRS` point pairs (each lag says its own).
    """
    y_steps, y = _finite_points(metric_reads.scalar_points(session, run.id, scalar, None, None))
    if not y_steps:
        raise ApiError(404, "unknown_scalar", f"run {run.id} has no finite scalar {scalar!r}")
    # the run's names by index seeks, not its catalog (a GROUP BY over every metric row)
    names = sorted(n for n in series_names(session, run.id) if _is_gap_series(n))
    out = []
    for name in names:
        rows = metric_reads.metric_points(session, run.id, name, layer, None, None)
        if not rows:  # a window only other layers have
            continue
        x_steps, x = _finite_points(rows)
        shared = sorted(set(x_steps) & set(y_steps))
        unit = (
            int(statistics.median(b - a for a, b in itertools.pairwise(shared)))
            if len(shared) > 1
            else None
        )
        lags = [
            LagPoint(
                lag=lag,
                steps=lag * (unit or 0),
                r=None if math.isnan(r) else r,
                pairs=len(shared) - abs(lag),
            )
            for lag, r in sed.lagged_correlation(x_steps, x, y_steps, y, max_lag)
        ]
        # r over a few pairs is large by chance (3 independent pairs: |r| > 0.9 in 29 % of cases)
        scored = [p for p in lags if p.r is not None and p.pairs >= BEST_LAG_PAIRS]
        best = max(scored, key=lambda p: abs(p.r or 0.0)) if scored else None
        out.append(
            LagSeries(
                metric=name, layer=layer, points=len(shared), step_unit=unit, lags=lags, best=best
            )
        )
    return LagAnalysis(scalar=scalar, max_lag=max_lag, series=out)


@router.get("/runs/{run_id}/metrics/catalog", response_model=list[MetricInfo])
def read_metric_catalog(run: RunDep, session: SessionDep) -> list[MetricInfo]:
    """Every (metric, layer) series the run has, with point counts and step range."""
    return [
        MetricInfo(name=n, layer=la, points=p, first_step=a, last_step=b)
        for n, la, p, a, b in metric_reads.metric_catalog(session, run.id)
    ]


SPECTRA_LIMIT = 100  # spectra per response by default (each a histogram and fits, ~10 KB)
SPECTRA_LIMIT_MAX = 1000


@router.get("/runs/{run_id}/spectra", response_model=list[SpectrumPublic])
def read_spectra(
    run: RunDep,
    session: SessionDep,
    state: StateDep,
    request: Request,
    response: Response,
    layer: str | None = None,
    frame: int | None = None,
    analysis: str | None = None,
    start: Annotated[int | None, Query(alias="from", ge=0, le=INT64_MAX)] = None,
    end: Annotated[int | None, Query(alias="to", ge=0, le=INT64_MAX)] = None,
    limit: Annotated[int, Query(ge=1, le=SPECTRA_LIMIT_MAX)] = SPECTRA_LIMIT,
    offset: Annotated[int, Query(ge=0)] = 0,
    cursor: Annotated[str | None, Query(max_length=2000)] = None,
) -> list[SpectrumPublic]:
    """Stored spectra (ESD histograms and fits, per layer and frame) of the run, optionally of
    one ``layer``, ``frame``, ``analysis`` and step range ``from``..``to``, ordered by step,
    layer and analysis; one page of at most ``limit`` (default 100, at most 1000). When more
    match, the response has a ``Link: <url>; rel="next"`` header with the next page's URL and
    ``X-Next-Offset`` (how many spectra come before the next page); a page shorter than
    ``limit`` is the last. The link is a reference relative to the request's URL (RFC 8288),
    or an absolute URL under ``SPECTRAWATCH_PUBLIC_URL`` when that is set; its ``cursor`` names
    the page's last spectrum, and the next page is read from the index from there, however
    deep. ``offset`` skips that many spectra (after the ``cursor``'s, if one is given).
    ``GET /runs/{id}/spectra/{frame_id}`` returns every spectrum of one frame."""
    position, after = (0, None) if cursor is None else _parse_cursor(cursor)
    rows = metric_reads.spectra_for(
        session,
        run.id,
        layer,
        frame,
        analysis,
        start=start,
        end=end,
        limit=limit + 1,
        offset=offset,
        after=after,
    )
    if len(rows) > limit:
        rows = rows[:limit]
        following = position + offset + limit
        last = rows[-1]
        token = _cursor(following, (last.step, last.layer, last.analysis, last.id))
        response.headers["Link"] = next_link(
            request, state.settings.public_url, drop=("offset",), cursor=token, limit=limit
        )
        response.headers["X-Next-Offset"] = str(following)
    return [SpectrumPublic.model_validate(r) for r in rows]


def _cursor(position: int, key: metric_reads.SpectrumKey) -> str:
    """A page cursor: the spectra before the next page and the last one's key, base64url."""
    raw = json.dumps([position, *key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _parse_cursor(cursor: str) -> tuple[int, metric_reads.SpectrumKey]:
    """``(position, key)`` of a cursor :func:`_cursor` made; 422 ``invalid_cursor`` otherwise."""
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        position, step, layer, analysis, sid = value
        ints = all(type(v) is int and 0 <= v <= INT64_MAX for v in (position, step, sid))
        if ints and isinstance(layer, str) and isinstance(analysis, str):
            return position, (step, layer, analysis, sid)
    except (ValueError, TypeError):  # not base64, not JSON, not 5 values
        pass
    raise ApiError(422, "invalid_cursor", "cursor: not a page cursor of GET /runs/{id}/spectra")


@router.get("/runs/{run_id}/spectra/{frame_id}", response_model=list[SpectrumPublic])
def read_frame_spectra(run: RunDep, session: SessionDep, frame_id: int) -> list[SpectrumPublic]:
    """Every spectrum of one frame of the run (404 for a frame the run does not have)."""
    frame = session.get(Frame, frame_id) if 0 < frame_id < 2**63 else None
    if frame is None or frame.run_id != run.id:
        raise ApiError(404, "frame_not_found", f"frame {frame_id} of run {run.id} does not exist")
    rows = metric_reads.spectra_for(session, run.id, None, frame_id, None)
    return [SpectrumPublic.model_validate(r) for r in rows]
