"""Health (``/health``: the process answers, the database is reachable; queue depth and workers
for token holders) and readiness (``/ready``: 503 until the whole pipeline can do its job)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from spectrawatch._version import __version__
from spectrawatch_server.api.deps import StateDep, authenticate
from spectrawatch_server.api.errors import ApiError
from spectrawatch_server.api.state import AppState

router = APIRouter(tags=["health"])


def worker_health(state: AppState) -> dict[str, Any]:
    """``running``, ``live`` (workers heartbeating) and ``device``; ``external`` is true when
    jobs run in ``spectrawatch worker`` processes, whose devices are listed (``devices``) and
    joined into ``device`` (``"none"`` while no worker is connected)."""
    live_workers = getattr(state.queue, "live_workers", None)
    if live_workers is None:  # embedded: the worker thread of this process
        running = bool(getattr(state.queue, "alive", False))
        device = str(state.worker.device)
        return {"device": device, "running": running, "live": int(running), "external": False}
    live, devices = live_workers()
    return {
        "device": ",".join(devices) or "none",
        "devices": devices,
        "running": live > 0,
        "live": live,
        "external": True,
    }


@router.get("/health")
def read_health(request: Request, state: StateDep) -> dict[str, Any]:
    """Liveness and status, without a token (load balancers, the compose health check):
    ``status``, ``version``, ``database`` and ``auth_required``. The job counts (``queue``) and
    the workers (``worker``) are operational data: on a server that requires auth they come
    only with a valid token (``Authorization: Bearer``, any role; a missing or bad one leaves
    them out, still 200)."""
    # One connection at a time: the check's session is closed before the queue and worker
    # queries open theirs, so health checks never hold one connection while waiting for another
    # (as many concurrent checks as the pool has connections would otherwise wait on each other).
    with state.sessions() as session:
        session.execute(text("SELECT 1"))
        details = _may_see_details(session, state, request.headers.get("authorization"))
    body: dict[str, Any] = {
        "status": "ok",
        "version": __version__,
        "database": state.engine.dialect.name,
        "auth_required": state.settings.require_auth,
    }
    if details:
        body["queue"] = {"engine": state.settings.queue, "jobs": state.queue.counts()}
        body["worker"] = worker_health(state)
    return body


def _may_see_details(session: Session, state: AppState, header: str | None) -> bool:
    """Whether ``/health`` shows queue counts and workers: to anyone on a server without auth
    (anonymous callers may do everything there), else to a valid token of any role."""
    if not state.settings.require_auth:
        return True
    try:
        authenticate(session, True, header)
    except ApiError:  # missing, malformed, unknown or revoked
        return False
    return True


def _database_check(state: AppState) -> str:
    try:
        with state.sessions() as session:
            session.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:  # down, restarting, no pooled connection free
        return f"unavailable ({type(exc).__name__})"
    return "ok"


def _worker_check(state: AppState) -> str:
    live_workers = getattr(state.queue, "live_workers", None)
    if live_workers is None:  # embedded: this process's thread, unless it was turned off
        if not state.settings.run_worker:
            return "ok (not run by this process: SPECTRAWATCH_RUN_WORKER=false)"
        return "ok" if getattr(state.queue, "alive", False) else "the worker thread is not running"
    if live_workers()[0] > 0:
        return "ok"
    window = state.settings.worker_stalled_seconds
    return f"no worker heartbeat in the last {window:g} s: start `spectrawatch worker`"


@router.get(
    "/ready",
    responses={503: {"description": "not ready: the database is unreachable or no worker runs"}},
)
def read_ready(state: StateDep) -> JSONResponse:
    """Readiness: 200 when the database answers and a worker runs (a ``spectrawatch worker``
    heartbeat within ``WORKER_STALLED_SECONDS`` in scale-out mode, the worker thread when
    embedded); else 503 with ``Retry-After`` and the failing check. ``/health`` is the status
    report, 200 while the process and its database answer, with or without a worker."""
    checks = {"database": _database_check(state)}
    if checks["database"] == "ok":
        checks["worker"] = _worker_check(state)
    ready = all(value.startswith("ok") for value in checks.values())
    return JSONResponse(
        {"ready": ready, "checks": checks},
        status_code=200 if ready else 503,
        headers=None if ready else {"Retry-After": "5"},
    )
