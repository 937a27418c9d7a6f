"""Two transactions in a chosen interleaving, on SQLite and (with
``SPECTRAWATCH_TEST_POSTGRES_URL`` set, ``eval "$(.ci/postgres.sh)"``) on PostgreSQL.

A :class:`Held` call stops one thread's transaction at a chosen point; a request of an
in-process app then runs beside it (:func:`beside`) until it waits for a lock (PostgreSQL
shows the wait in ``pg_stat_activity``; SQLite's busy wait shows nowhere, so there it gets
3 s), and the held transaction goes on. Lock-order bugs (deadlocks) and lost updates show as a
failed transaction or a wrong answer.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
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
from spectrawatch_server.storage import job_store
from spectrawatch_server.storage import repository as repo
from tests.servers import fresh_database

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
def app_client(tmp_path: Path, database: str, prefix: str = "sw_race") -> Iterator[TestClient]:
    """A client of an in-process app without a worker or a webhook sender, on SQLite or a
    fresh PostgreSQL database."""
    with contextlib.ExitStack() as stack:
        url = None
        if database == "postgresql":
            assert POSTGRES_URL is not None
            url = stack.enter_context(fresh_database(POSTGRES_URL, prefix))
        # the requests wait for the held transaction's lock as long as the test holds it (up to
        # 3 s on SQLite, its default lock timeout): this is about the order, not the timeouts
        settings = ServerSettings(
            data_dir=tmp_path,
            database_url=url,
            run_worker=False,
            run_webhooks=False,
            db_lock_timeout_seconds=30,
        )
        yield stack.enter_context(TestClient(create_app(settings), base_url="http://127.0.0.1"))


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


class Held:
    """Stops the call of ``owner.name`` made by :meth:`start`'s thread (before the call, or
    after it with ``after=True``) until :meth:`release`; other threads' calls pass. With
    ``anywhere=True`` the first call of any thread but the test's stops (a request that
    :meth:`start`'s thread sent, served by the app's threads)."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        owner: Any,
        name: str,
        *,
        after: bool = False,
        anywhere: bool = False,
    ) -> None:
        self.reached, self.go_on = threading.Event(), threading.Event()
        self.failures: list[BaseException] = []
        self._thread: threading.Thread | None = None
        test_thread, claim, taken = threading.current_thread(), threading.Lock(), [False]
        original = getattr(owner, name)

        def chosen() -> bool:
            if not anywhere:
                return threading.current_thread() is self._thread
            if threading.current_thread() is test_thread:
                return False
            with claim:  # the first call only
                first, taken[0] = not taken[0], True
            return first

        def held(*args: Any, **kwargs: Any) -> Any:
            mine = chosen()
            if mine and not after:
                self._stop()
            result = original(*args, **kwargs)
            if mine and after:
                self._stop()
            return result

        monkeypatch.setattr(owner, name, held)

    def _stop(self) -> None:
        self.reached.set()
        assert self.go_on.wait(30)

    def start(self, transaction: Callable[[], object]) -> None:
        """Run ``transaction`` in a thread until it reaches the held call."""

        def run() -> None:
            try:
                transaction()
            except BaseException as exc:
                self.failures.append(exc)

        self._thread = threading.Thread(target=run)
        self._thread.start()
        assert self.reached.wait(30), self.failures

    def release(self) -> None:
        """Let the held transaction go on and finish; its exceptions fail the test."""
        assert self._thread is not None
        self.go_on.set()
        self._thread.join(30)
        assert not self._thread.is_alive()
        assert not self.failures, self.failures


def beside(held: Held, client: TestClient, request: Callable[[], Any]) -> Any:
    """``request()`` while ``held`` is stopped; once it waits for a lock (or after 3 s, the
    only sign on SQLite) ``held`` goes on. Returns what the request returned."""
    answers: list[Any] = []
    thread = threading.Thread(target=lambda: answers.append(request()))
    thread.start()
    deadline = time.monotonic() + 3
    while thread.is_alive() and not waiting_on_lock(client) and time.monotonic() < deadline:
        time.sleep(0.05)
    held.release()
    thread.join(30)
    assert answers, "the request did not answer"
    return answers[0]


# --- the worker's results transaction ----------------------------------------------------


def nan_weights(step: int, seq: int, layers: Sequence[str] = ("fc.weight",)) -> bytes:
    """A weights frame whose ``layers`` each hold a NaN."""
    tensors = {}
    for i, layer in enumerate(layers):
        w = torch.randn(24, 12, generator=torch.Generator().manual_seed(seq + i))
        w[3, 4] = float("nan")
        tensors[layer] = w
    return encode_frame(FrameKind.WEIGHTS, step, seq, tensors)


def seeded_nan_run(client: TestClient, layers: Sequence[str] = ("fc.weight",)) -> tuple[int, int]:
    """Run ``p/r`` with one stored (not yet analysed) weights frame holding a NaN in each of
    ``layers``: its run and frame ids."""
    run_id = client.post("/api/v1/runs", json={"project": "p", "name": "r"}).json()["id"]
    r = client.post(f"/api/v1/runs/{run_id}/frames", content=nan_weights(10, 1, layers))
    assert r.status_code == 202, r.text
    sessions = client.app.state.spectrawatch.sessions  # type: ignore[attr-defined]
    with sessions() as session:
        (frame_id,) = session.scalars(select(Frame.id).where(Frame.run_id == run_id)).all()
    return run_id, frame_id


def evaluate(client: TestClient, run_id: int, frame_id: int) -> None:
    """The worker's results transaction (``worker.Worker.process``): the run's lock, the frame
    done, the alert engine."""
    sessions = client.app.state.spectrawatch.sessions  # type: ignore[attr-defined]
    with sessions.begin() as session:
        assert repo.live_runs(session, [run_id]) == {run_id}
        frame = session.get_one(Frame, frame_id)
        job_store.finish_frame(session, frame.id, "done", None)
        AlertEngine().evaluate(session, frame)
