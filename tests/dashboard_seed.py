"""Seeding helpers shared by the dashboard tests and ``benchmarks/dashboard_load.py``: a migrated
SQLite database and analysed frames to hang metric rows on (rows go in through
``storage.repository``, or bulk through the DB-API where a benchmark needs millions)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from spectrawatch_server.db import migrate
from spectrawatch_server.db.models import Frame
from spectrawatch_server.db.session import make_engine, make_session_factory
from spectrawatch_server.storage import repository as repo


def migrated(data_dir: Path) -> tuple[Engine, sessionmaker[Session]]:
    """The server's SQLite database under ``data_dir`` (created if needed) at the newest
    schema, with a session factory."""
    data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(f"sqlite:///{data_dir / 'spectrawatch.db'}")
    migrate.upgrade(engine)
    return engine, make_session_factory(engine)


def done_frame(
    s: Session,
    run_id: int,
    step: int,
    seq: int,
    kind: str = "weights",
    layers: Sequence[str] = (),
) -> Frame:
    """Insert an already analysed (``done``) frame of ``run_id`` at ``step``, no blob behind it."""
    frame = Frame(
        run_id=run_id,
        kind=kind,
        step=step,
        seq=seq,
        idempotency_key=f"{run_id}:{kind}:{seq}",
        blob_key=f"x/{run_id}/{kind}/{seq}",
        bytes=0,
        info={},
        layers=list(layers),
        nonfinite={},
        status="done",
    )
    repo.insert_frame(s, frame)
    return frame


def new_run(s: Session, project: str, name: str, status: str = "finished") -> int:
    """Create (or get) run ``project/name`` with ``status``; returns its id."""
    proj, _ = repo.get_or_create_project(s, project)
    run, _ = repo.get_or_create_run(s, proj, name, {}, [])
    run.status = status
    s.flush()
    return run.id
