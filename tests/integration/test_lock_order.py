"""Deletions take their locks in the order of the transactions they meet, so PostgreSQL finds
no deadlock (it answered 503 ``database_unavailable``); on SQLite, which serialises writers,
the same interleavings must work too (see :mod:`tests.races`).

- The worker's results transaction locks its run, then the project's row (the alert engine's
  rule lock). A project's deletion took the project's row first: half the runs of
  ``test_delete_project_while_a_client_streams`` deadlocked in the PostgreSQL topology
  (session 26; stop 39's CI failed on it).
- A sender recording a 410 disables the endpoint (its row, then its pending deliveries); it
  locked its delivery first, while a deletion of the endpoint locks the endpoint, then its
  deliveries, and a deletion of a run (or of its project) unlinks its alerts' deliveries.
  Now whatever touches an endpoint and its deliveries locks the endpoint first.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from spectrawatch_server.db.base import utcnow
from spectrawatch_server.db.models import Delivery, Frame, Run, Webhook
from spectrawatch_server.storage import alert_store
from spectrawatch_server.storage import repository as repo
from spectrawatch_server.webhooks.deliver import Deliverer, DeliveryPolicy
from spectrawatch_server.webhooks.signing import generate_secret
from tests.races import (
    DATABASES,
    Held,
    app_client,
    beside,
    evaluate,
    nan_weights,
    seeded_nan_run,
)

pytestmark = pytest.mark.integration

API = "/api/v1"


@pytest.mark.parametrize("database", DATABASES)
def test_a_project_deleted_during_an_evaluation_waits_for_it(
    tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deletion waits for the evaluation (held between its run lock and the project's),
    then deletes the run with what the evaluation stored."""
    with app_client(tmp_path, database) as client:
        run_id, frame_id = seeded_nan_run(client)
        held = Held(monkeypatch, alert_store, "lock_rules")
        held.start(lambda: evaluate(client, run_id, frame_id))
        answer = beside(held, client, lambda: client.delete(f"{API}/projects/p"))
        assert answer.status_code == 200, answer.text
        assert answer.json()["runs"] == 1
        assert client.get(f"{API}/projects").json() == []
        assert client.get(f"{API}/runs/{run_id}/alerts").status_code == 404


def pending_deliveries(client: TestClient) -> tuple[int, list[int]]:
    """An endpoint of project ``p`` and two pending deliveries of run ``p/r``'s alerts: the
    ``alert.opened`` of the NaN incident a weights frame raised (one episode for both layers)
    and a second event of it queued beside (a copy under a new message id): the run's id and
    the deliveries' ids."""
    run_id, frame_id = seeded_nan_run(client, layers=("fc1.weight", "fc2.weight"))
    sessions = client.app.state.spectrawatch.sessions  # type: ignore[attr-defined]
    with sessions.begin() as session:
        project_id = session.get_one(Run, run_id).project_id
        url = "https://hooks.example/in"
        session.add(Webhook(project_id=project_id, url=url, secret=generate_secret()))
    evaluate(client, run_id, frame_id)
    with sessions.begin() as session:
        (opened,) = session.scalars(select(Delivery)).all()
        session.add(
            Delivery(
                webhook_id=opened.webhook_id,
                alert_id=opened.alert_id,
                message_id=f"{opened.message_id}-2",
                event=opened.event,
                payload=opened.payload,
            )
        )
    with sessions() as session:
        pending = select(Delivery.id).where(Delivery.status == "pending").order_by(Delivery.id)
        ids = [int(i) for i in session.scalars(pending)]
    assert len(ids) == 2, ids
    return run_id, ids


@pytest.mark.parametrize("database", DATABASES)
@pytest.mark.parametrize("deleted", ["webhook", "project", "run"])
@pytest.mark.parametrize("code", [410, 500])
def test_an_endpoint_deleted_while_a_sender_records_an_answer(
    tmp_path: Path, database: str, deleted: str, code: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deletion (of the endpoint, its project, or the run whose alerts' deliveries it
    unlinks) waits for the sender, held between its locks and recording the receiver's answer
    (a 410 disables the endpoint and fails its other pending delivery too), then goes on. On
    SQLite the sender read its delivery outside any transaction: a deletion in between failed
    its attempt's insert (a foreign-key error in the sender's loop)."""
    with app_client(tmp_path, database) as client:
        run_id, (first, second) = pending_deliveries(client)
        sessions = client.app.state.spectrawatch.sessions  # type: ignore[attr-defined]
        deliverer = Deliverer(
            sessions,
            DeliveryPolicy(schedule=(0, 5), jitter=0.0),
            resolve=lambda host, port: ["93.184.215.14"],
            transport=httpx.MockTransport(lambda request: httpx.Response(code)),
        )
        (hook,) = client.get(f"{API}/webhooks").json()
        path = {
            "webhook": f"{API}/webhooks/{hook['id']}",
            "project": f"{API}/projects/p",
            "run": f"{API}/runs/{run_id}",
        }[deleted]
        outcomes = []
        held = Held(monkeypatch, alert_store, "record_attempt")
        held.start(lambda: outcomes.append(deliverer.attempt(second)))
        answer = beside(held, client, lambda: client.delete(path))
        deliverer.close()
        assert answer.status_code in (200, 204), answer.text
        status = "failed" if code == 410 else "pending"
        assert [(o.status, o.status_code) for o in outcomes] == [(status, code)]
        with sessions() as session:
            rows = session.execute(select(Delivery.id, Delivery.status, Delivery.alert_id))
            left = sorted((int(i), status, alert) for i, status, alert in rows)
        if deleted == "run":  # the endpoint stays; its deliveries stay, unlinked
            (hook,) = client.get(f"{API}/webhooks").json()
            reason = "receiver answered 410 Gone" if code == 410 else None
            assert (hook["enabled"], hook["disabled_reason"]) == (code != 410, reason)
            assert left == [(first, status, None), (second, status, None)]
        else:
            assert client.get(f"{API}/webhooks").json() == []
            assert left == []


@pytest.mark.parametrize("database", DATABASES)
def test_a_run_deleted_while_its_frame_is_stored_keeps_no_frame(
    tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ingest checks that the run is live, then stores the frame; a deletion between the two
    left a frame (and its blob and analysis) under the tombstone on SQLite, whose driver ran
    the check outside the transaction. Now the check takes the write lock (as PostgreSQL's
    row lock): the deletion waits, then deletes the frame too."""
    with app_client(tmp_path, database) as client:
        run_id = client.post(f"{API}/runs", json={"project": "p", "name": "r"}).json()["id"]
        held = Held(monkeypatch, repo, "live_runs", after=True, anywhere=True)
        answers = []
        held.start(
            lambda: answers.append(
                client.post(f"{API}/runs/{run_id}/frames", content=nan_weights(10, 1))
            )
        )
        deleted = beside(held, client, lambda: client.delete(f"{API}/runs/{run_id}"))
        assert [a.status_code for a in answers] == [202], [a.text for a in answers]
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["frames"] == 1  # the frame stored first, deleted with the run
        sessions = client.app.state.spectrawatch.sessions  # type: ignore[attr-defined]
        with sessions() as session:
            assert session.scalars(select(Frame.id)).all() == []


@pytest.mark.parametrize("database", DATABASES)
@pytest.mark.parametrize("deleted", ["run", "project"])
def test_a_run_finished_while_it_is_deleted_stays_deleted(
    tmp_path: Path, database: str, deleted: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client finishing its run (``PATCH status``) checks that the run is live, then writes
    the status; on SQLite a deletion between the two was overwritten: the tombstone came back
    as a live ``finished`` run (in a deleted project; 2 such runs in a 90 s soak). Now the
    deletion waits for the status, then deletes the run."""
    with app_client(tmp_path, database) as client:
        run_id = client.post(f"{API}/runs", json={"project": "p", "name": "r"}).json()["id"]
        held = Held(monkeypatch, repo, "live_runs", after=True, anywhere=True)
        finished = []
        path = f"{API}/runs/{run_id}"
        held.start(lambda: finished.append(client.patch(path, json={"status": "finished"})))
        gone = f"{API}/projects/p" if deleted == "project" else path
        answer = beside(held, client, lambda: client.delete(gone))
        assert [f.status_code for f in finished] == [200], [f.text for f in finished]
        assert answer.status_code == 200, answer.text
        sessions = client.app.state.spectrawatch.sessions  # type: ignore[attr-defined]
        with sessions() as session:
            assert session.get_one(Run, run_id).status == repo.DELETED


@pytest.mark.parametrize("database", DATABASES)
def test_a_run_resumed_while_retention_deletes_it_is_created_afresh(
    tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention (``POST /runs/bulk-delete``) re-checks that each run is still stale, then
    deletes it. On SQLite the re-check ran outside the transaction: a client resuming the run
    in between got 200, then lost the run to the deletion (404 ``run_deleted``: monitoring
    stopped). Now the resume waits, finds the tombstone and creates the run afresh."""
    with app_client(tmp_path, database) as client:
        body = {"project": "p", "name": "r", "resume": True}
        old = client.post(f"{API}/runs", json=body).json()["id"]
        client.patch(f"{API}/runs/{old}", json={"status": "finished"}).raise_for_status()
        sessions = client.app.state.spectrawatch.sessions  # type: ignore[attr-defined]
        with sessions.begin() as session:  # inactive for two days
            run = session.get_one(Run, old)
            run.updated_at = run.last_seen_at = utcnow() - timedelta(days=2)
        held = Held(monkeypatch, repo, "is_stale", after=True, anywhere=True)
        retired = []
        retention = {"older_than_days": 1, "project": "p"}
        held.start(lambda: retired.append(client.post(f"{API}/runs/bulk-delete", json=retention)))
        resumed = beside(held, client, lambda: client.post(f"{API}/runs", json=body))
        assert [r.status_code for r in retired] == [200], [r.text for r in retired]
        assert resumed.status_code == 201, resumed.text  # created afresh, not resumed
        assert resumed.json()["id"] != old
        run = client.get(f"{API}/runs/{resumed.json()['id']}").json()
        assert run["status"] == "running"
