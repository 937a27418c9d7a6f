"""A rule disabled while a worker evaluates a run never leaves an alert open under it, on SQLite
and, with ``SPECTRAWATCH_TEST_POSTGRES_URL`` set (``eval "$(.ci/postgres.sh)"``), on PostgreSQL.

In-process: the app (no worker of its own) takes the ``PATCH``; the worker's results
transaction is replayed in a thread (run lock, frame done, the alert engine), held right after
the engine has read the project's rules. The ``PATCH`` then runs; once it has answered or is
waiting for a lock, the evaluation goes on and commits. Without the project's rule lock on
PostgreSQL the ``PATCH`` resolved the alerts it could see and answered, and the evaluation then
opened one for the disabled rule, open for good. With it, the ``PATCH`` waits for the
evaluation and resolves what it opened. SQLite serialises the two writers anyway (the
evaluation holds the write lock from its first write).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from spectrawatch_server.alerts.engine import AlertEngine
from spectrawatch_server.db.base import utcnow
from spectrawatch_server.db.models import Run
from spectrawatch_server.storage import alert_store, result_store
from spectrawatch_server.storage import repository as repo
from tests.races import DATABASES, Held, app_client, beside, evaluate, seeded_nan_run

pytestmark = pytest.mark.integration


def disable_beside(held: Held, client: TestClient, rule: str) -> None:
    """``PATCH`` project ``p``'s ``rule`` off while ``held`` is stopped (:func:`beside`)."""
    url = f"/api/v1/projects/p/alert-rules/{rule}"
    answer = beside(held, client, lambda: client.patch(url, json={"enabled": False}))
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("database", DATABASES)
def test_a_rule_disabled_during_an_evaluation_leaves_no_alert_open(
    tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with app_client(tmp_path, database) as client:
        api = "/api/v1"
        run_id, frame_id = seeded_nan_run(client)
        held = Held(monkeypatch, alert_store, "stored_rules", after=True)
        held.start(lambda: evaluate(client, run_id, frame_id))
        disable_beside(held, client, "nonfinite")

        alerts = client.get(f"{api}/runs/{run_id}/alerts").json()
        assert [a["status"] for a in alerts if a["rule"] == "nonfinite"] == ["resolved"], alerts
        (alert,) = alerts
        assert alert["values"]["resolved_reason"] == "rule disabled"


@pytest.mark.parametrize("database", DATABASES)
def test_a_rule_disabled_during_the_silence_sweep_leaves_no_alert_open(
    tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The periodic sweep of silent runs reads a project's rules, then opens ``run_silent``
    episodes. On SQLite its rule lock did nothing and the driver ran the reads outside the
    transaction, so a ``PATCH`` disabling the rule between the two resolved nothing and the
    sweep then opened an episode under the disabled rule, which no sweep resolves. The rule
    lock now takes SQLite's write lock: the ``PATCH`` waits and resolves the episode."""
    with app_client(tmp_path, database) as client:
        api = "/api/v1"
        run_id = client.post(f"{api}/runs", json={"project": "p", "name": "quiet"}).json()["id"]
        sessions = client.app.state.spectrawatch.sessions  # type: ignore[attr-defined]
        with sessions.begin() as session:
            session.get_one(Run, run_id).last_seen_at = utcnow() - timedelta(hours=2)

        def sweep() -> None:
            with sessions.begin() as session:
                assert AlertEngine().sweep_silent(session) == 1

        held = Held(monkeypatch, alert_store, "stored_rules", after=True)
        held.start(sweep)
        disable_beside(held, client, "run_silent")
        alerts = client.get(f"{api}/runs/{run_id}/alerts").json()
        assert [(a["rule"], a["status"]) for a in alerts] == [("run_silent", "resolved")], alerts


@pytest.mark.parametrize("held_at", ["stored_rules", "lock_rules"])
@pytest.mark.parametrize("database", DATABASES)
def test_a_scalar_rule_disabled_during_a_scalar_batch_leaves_no_alert_open(
    tmp_path: Path, database: str, held_at: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scalar batch reads the project's rules unlocked (is any scalar rule watching?), then
    takes the rule lock and reads them again. On PostgreSQL a ``PATCH`` disabling the rule
    after the first read commits first (the batch then finds it off); one after the lock
    waits for the batch, then resolves the alert it opened. On SQLite the batch holds the
    write lock from its first write: the ``PATCH`` waits either way."""
    with app_client(tmp_path, database) as client:
        api = "/api/v1"
        run_id = client.post(f"{api}/runs", json={"project": "p", "name": "r"}).json()["id"]
        params = {"kind": "threshold", "scalar": "loss", "above": 1.0}
        r = client.patch(f"{api}/projects/p/alert-rules/loss_high", json={"params": params})
        assert r.status_code == 200, r.text
        sessions = client.app.state.spectrawatch.sessions  # type: ignore[attr-defined]

        def scalar_batch() -> None:  # what POST /runs/{id}/scalars does
            with sessions.begin() as session:
                (run,) = [session.get_one(Run, i) for i in repo.live_runs(session, [run_id])]
                result_store.upsert_scalars(session, run_id, [(5, "loss", 3.0)])
                AlertEngine().evaluate_scalars(session, run, {"loss"})

        held = Held(monkeypatch, alert_store, held_at, after=True)
        held.start(scalar_batch)
        disable_beside(held, client, "loss_high")
        alerts = client.get(f"{api}/runs/{run_id}/alerts").json()
        if database == "postgresql" and held_at == "stored_rules":
            assert alerts == []
        else:
            (alert,) = alerts
            assert (alert["rule"], alert["status"]) == ("loss_high", "resolved")
            assert alert["values"]["resolved_reason"] == "rule disabled"
