"""A rule disabled while a worker evaluates a run never leaves an alert open under it, on SQLite
and, with ``SPECTRAWATCH_TEST_POSTGRES_URL`` set (``eval "$(.ci/postgres.sh)"``), on PostgreSQL.

In-process: the app (no worker of its own) takes the ``PATCH``; the worker's results
transaction is replayed in a thread (run lock, frame done, the alert engine), held by a hook
right after the engine has read the project's rules. The ``PATCH`` then runs; once it has
answered or is waiting for a lock, the evaluation goes on and commits. Without the project's
rule lock on PostgreSQL the ``PATCH`` resolved the alerts it could see and answered, and the
evaluation then opened one for the disabled rule, open for good. With it, the ``PATCH`` waits
for the evaluation and resolves what it opened. SQLite serialises the two writers anyway (the
evaluation holds the write lock from its first write).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select, text

from spectrawatch.wire import FrameKind, encode_frame
from spectrawatch_server.alerts.engine import AlertEngine
from spectrawatch_server.app import create_app
from spectrawatch_server.config import ServerSettings
from spectrawatch_server.db.models import Frame
from spectrawatch_server.storage import alert_store
from spectrawatch_server.storage import repository as repo
from tests.servers import fresh_database

pytestmark = pytest.mark.integration

POSTGRES_URL = os.environ.get("SPECTRAWATCH_TEST_POSTGRES_URL")
DATABASES = [
    "sqlite",
    pytest.param(
        "postgresql",
        marks=pytest.mark.skipif(
            not POSTGRES_URL,
            reason='SPECTRAWATCH_TEST_POSTGRES_URL is unset (eval "$(.ci/postgres.sh)")',
        ),
    ),
]


@contextlib.contextmanager
def app_client(tmp_path: Path, database: str) -> Iterator[TestClient]:
    """A client of an in-process app without a worker, on SQLite or a fresh PostgreSQL db."""
    with contextlib.ExitStack() as stack:
        url = None
        if database == "postgresql":
            assert POSTGRES_URL is not None
            url = stack.enter_context(fresh_database(POSTGRES_URL, "sw_rulerace"))
        # the requests wait for the evaluation's lock as long as the test holds it (up to 3 s
        # on SQLite, its default lock timeout): this is about the order, not the timeouts
        settings = ServerSettings(
            data_dir=tmp_path,
            database_url=url,
            run_worker=False,
            run_webhooks=False,
            db_lock_timeout_seconds=30,
        )
        yield stack.enter_context(TestClient(create_app(settings), base_url="http://127.0.0.1"))


def nan_weights(step: int, seq: int) -> bytes:
    w = torch.randn(24, 12, generator=torch.Generator().manual_seed(seq))
    w[3, 4] = float("nan")
    return encode_frame(FrameKind.WEIGHTS, step, seq, {"fc.weight": w})


def waiting_on_lock(client: TestClient) -> bool:
    """Whether a session of the app's PostgreSQL database waits for a lock (False on SQLite:
    its busy wait shows nowhere)."""
    engine = client.app.state.spectrawatch.engine  # type: ignore[attr-defined]
    if engine.dialect.name != "postgresql":
        return False
    with engine.connect() as conn:
        query = (
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return bool(conn.scalar(text(query)))


@pytest.mark.parametrize("database", DATABASES)
def test_a_rule_disabled_during_an_evaluation_leaves_no_alert_open(
    tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with app_client(tmp_path, database) as client:
        api = "/api/v1"
        run_id = client.post(f"{api}/runs", json={"project": "p", "name": "r"}).json()["id"]
        r = client.post(f"{api}/runs/{run_id}/frames", content=nan_weights(10, 1))
        assert r.status_code == 202, r.text
        sessions = client.app.state.spectrawatch.sessions  # type: ignore[attr-defined]
        with sessions() as session:
            (frame_id,) = session.scalars(select(Frame.id).where(Frame.run_id == run_id)).all()

        rules_read, go_on = threading.Event(), threading.Event()
        read_rules = alert_store.stored_rules
        evaluator: list[threading.Thread] = []

        def held_rules(*args: Any, **kwargs: Any) -> Any:
            rules = read_rules(*args, **kwargs)
            if threading.current_thread() in evaluator:
                rules_read.set()
                assert go_on.wait(30)
            return rules

        monkeypatch.setattr(alert_store, "stored_rules", held_rules)
        failures: list[BaseException] = []

        def evaluate() -> None:  # the worker's results transaction (worker.Worker._analyse)
            try:
                with sessions.begin() as session:
                    assert repo.live_runs(session, [run_id]) == {run_id}
                    frame = session.get_one(Frame, frame_id)
                    repo.finish_frame(session, frame.id, "done", None)
                    AlertEngine().evaluate(session, frame)
            except BaseException as exc:
                failures.append(exc)

        evaluator.append(threading.Thread(target=evaluate))
        evaluator[0].start()
        assert rules_read.wait(30), failures

        answers: list[Any] = []
        patch = threading.Thread(
            target=lambda: answers.append(
                client.patch(f"{api}/projects/p/alert-rules/nonfinite", json={"enabled": False})
            )
        )
        patch.start()
        deadline = time.monotonic() + 3  # SQLite: no sign of the wait but time
        while patch.is_alive() and not waiting_on_lock(client) and time.monotonic() < deadline:
            time.sleep(0.05)
        go_on.set()
        evaluator[0].join(30)
        patch.join(30)
        assert not failures, failures
        assert [a.status_code for a in answers] == [200], [a.text for a in answers]

        alerts = client.get(f"{api}/runs/{run_id}/alerts").json()
        assert [a["status"] for a in alerts if a["rule"] == "nonfinite"] == ["resolved"], alerts
        (alert,) = alerts
        assert alert["values"]["resolved_reason"] == "rule disabled"


@pytest.mark.parametrize("database", DATABASES)
def test_a_project_deleted_during_an_evaluation_waits_for_it_without_deadlock(
    tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's results transaction locks the run, then (alert engine) the project; a
    project deletion takes the same two locks. It used to take them the other way round (the
    project's rename first), so PostgreSQL found a deadlock and the ``DELETE`` answered 503
    (half the runs of ``test_delete_project_while_a_client_streams``, session 26). Now it waits
    for the evaluation, then deletes the run with what the evaluation stored."""
    with app_client(tmp_path, database) as client:
        api = "/api/v1"
        run_id = client.post(f"{api}/runs", json={"project": "p", "name": "r"}).json()["id"]
        r = client.post(f"{api}/runs/{run_id}/frames", content=nan_weights(10, 1))
        assert r.status_code == 202, r.text
        sessions = client.app.state.spectrawatch.sessions  # type: ignore[attr-defined]
        with sessions() as session:
            (frame_id,) = session.scalars(select(Frame.id).where(Frame.run_id == run_id)).all()

        run_locked, go_on = threading.Event(), threading.Event()
        lock_rules = alert_store.lock_rules
        evaluator: list[threading.Thread] = []

        def held_lock_rules(*args: Any, **kwargs: Any) -> None:
            if threading.current_thread() in evaluator:
                run_locked.set()
                assert go_on.wait(30)
            lock_rules(*args, **kwargs)

        monkeypatch.setattr(alert_store, "lock_rules", held_lock_rules)
        failures: list[BaseException] = []

        def evaluate() -> None:  # the worker's results transaction (worker.Worker.process)
            try:
                with sessions.begin() as session:
                    assert repo.live_runs(session, [run_id]) == {run_id}
                    frame = session.get_one(Frame, frame_id)
                    repo.finish_frame(session, frame.id, "done", None)
                    AlertEngine().evaluate(session, frame)
            except BaseException as exc:
                failures.append(exc)

        evaluator.append(threading.Thread(target=evaluate))
        evaluator[0].start()
        assert run_locked.wait(30), failures

        answers: list[Any] = []
        deletion = threading.Thread(
            target=lambda: answers.append(client.delete(f"{api}/projects/p"))
        )
        deletion.start()
        deadline = time.monotonic() + 3  # SQLite: no sign of the wait but time
        while deletion.is_alive() and not waiting_on_lock(client) and time.monotonic() < deadline:
            time.sleep(0.05)
        go_on.set()
        evaluator[0].join(30)
        deletion.join(30)
        assert not failures, failures
        assert [a.status_code for a in answers] == [200], [a.text for a in answers]
        assert answers[0].json()["runs"] == 1
        assert client.get(f"{api}/projects").json() == []
        assert client.get(f"{api}/runs/{run_id}/alerts").status_code == 404
