"""Liveness and readiness: database reachable, queue depth, worker device."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import text

from spectrawatch._version import __version__
from spectrawatch_server.api.deps import SessionDep, StateDep

router = APIRouter(tags=["health"])


@router.get("/health")
def read_health(state: StateDep, session: SessionDep) -> dict[str, Any]:
    session.execute(text("SELECT 1"))
    return {
        "status": "ok",
        "version": __version__,
        "database": state.engine.dialect.name,
        "queue": {"engine": state.settings.queue, "jobs": state.queue.counts()},
        "worker": {
            "device": str(state.worker.device),
            "running": bool(getattr(state.queue, "alive", False)),
        },
        "auth_required": state.settings.require_auth,
    }
