"""Liveness and readiness: database reachable, queue depth, worker devices."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import text

from spectrawatch._version import __version__
from spectrawatch_server.api.deps import StateDep
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
def read_health(state: StateDep) -> dict[str, Any]:
    # One connection at a time: the check's session is closed before the queue and worker
    # queries open theirs, so health checks never hold one connection while waiting for another
    # (as many concurrent checks as the pool has connections would otherwise wait on each other).
    with state.sessions() as session:
        session.execute(text("SELECT 1"))
    return {
        "status": "ok",
        "version": __version__,
        "database": state.engine.dialect.name,
        "queue": {"engine": state.settings.queue, "jobs": state.queue.counts()},
        "worker": worker_health(state),
        "auth_required": state.settings.require_auth,
    }
