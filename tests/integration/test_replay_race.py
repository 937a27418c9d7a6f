"""The same batch sent twice at once (a retry after a timeout while the first request is still
being stored) is answered as a replay, on SQLite and, with ``SPECTRAWATCH_TEST_POSTGRES_URL``
set (``eval "$(.ci/postgres.sh)"``), on PostgreSQL.

In-process (``TestClient``, :func:`tests.races.app_client`): a barrier holds both requests after
their look-up of the key, so both would miss it and both insert; a real server's timing would hit
that window only by chance. The run's lock (``get_live_run``: the row's on PostgreSQL, the
write lock on SQLite) already queues two writes to one run before that look-up: the barrier
times out there and the second request finds the first's batch (before session 26 SQLite took
the lock only at the insert: both missed the key, and the loser of its unique constraint
answered as a replay).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from spectrawatch_server.storage import repository as repo
from spectrawatch_server.storage import result_store
from tests.races import DATABASES, app_client

pytestmark = pytest.mark.integration


def hold(wrapped: Callable[..., Any], parties: int, *, after: bool = True) -> Callable[..., Any]:
    """``wrapped``, whose first ``parties`` calls wait for each other (up to 5 s: the later ones
    wait for the run's lock the first holds) after returning, or before."""
    barrier = threading.Barrier(parties)
    calls = iter(range(parties))

    def wait() -> None:
        if next(calls, None) is not None:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=5)

    def held(*args: Any, **kwargs: Any) -> Any:
        if not after:
            wait()
        result = wrapped(*args, **kwargs)
        if after:
            wait()
        return result

    return held


@pytest.mark.parametrize("database", DATABASES)
def test_a_metric_batch_sent_twice_at_once_is_a_replay(
    tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [{"step": s, "layer": "l0", "name": "htsr.alpha", "value": 2.0 + s} for s in range(3)]
    body = {"source": "import", "rows": rows}
    with app_client(tmp_path, database) as client:
        run_id = client.post("/api/v1/runs", json={"project": "p", "name": "race"}).json()["id"]
        url = f"/api/v1/runs/{run_id}/metrics"
        monkeypatch.setattr(repo, "frame_by_key", hold(repo.frame_by_key, 2))

        def post(key: str, batch: dict[str, Any]) -> Any:
            return client.post(url, json=batch, headers={"Idempotency-Key": key})

        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(post, ["b1", "b1"], [body, body]))
        assert [a.status_code for a in answers] == [202, 202], [a.text for a in answers]
        assert sorted(a.json()["replayed"] for a in answers) == [False, True]
        assert len({a.json()["frame_id"] for a in answers}) == 1

        # one key, two different batches at once: the loser is refused, as when sent in turn
        one = {"source": "import", "rows": [{**rows[0], "name": "x", "value": 8.0}]}
        other = {"source": "import", "rows": [{**rows[0], "name": "x", "value": 9.0}]}
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(post, ["b2", "b2"], [one, other]))
        assert sorted(a.status_code for a in answers) == [202, 409], [a.text for a in answers]
        conflict = next(a for a in answers if a.status_code == 409)
        assert conflict.json()["error"]["code"] == "idempotency_conflict"
        monkeypatch.undo()

        (series,) = client.get(url, params={"name": "htsr.alpha"}).json()["series"]
        assert series["values"] == [2.0, 3.0, 4.0]  # stored once
        (series,) = client.get(url, params={"name": "x"}).json()["series"]
        assert len(series["values"]) == 1
        frames = client.get(f"/api/v1/runs/{run_id}/frames").json()
        assert len(frames) == 2  # one per key


@pytest.mark.parametrize("database", DATABASES)
def test_a_scalar_batch_sent_twice_at_once_is_stored_once(
    tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scalars have no key: a batch is an upsert of (name, step), which two copies at once
    (held together just before it) leave as one copy would."""
    body = [{"step": s, "name": "loss", "value": 1.0 / (s + 1)} for s in range(50)]
    with app_client(tmp_path, database) as client:
        run_id = client.post("/api/v1/runs", json={"project": "p", "name": "race"}).json()["id"]
        url = f"/api/v1/runs/{run_id}/scalars"
        monkeypatch.setattr(
            result_store, "upsert_scalars", hold(result_store.upsert_scalars, 2, after=False)
        )
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: client.post(url, json=body), range(2)))
        assert [a.status_code for a in answers] == [202, 202], [a.text for a in answers]
        monkeypatch.undo()
        (series,) = client.get(url).json()
        assert series["steps"] == list(range(50))
        assert series["values"] == [1.0 / (s + 1) for s in range(50)]
