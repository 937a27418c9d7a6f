"""Deletions take their locks in the order of the transactions they meet, so PostgreSQL finds
no deadlock (it answered 503 ``database_unavailable``); on SQLite, which serialises writers,
the same interleavings must work too (see :mod:`tests.races`).

- The worker's results transaction locks its run, then the project's row (the alert engine's
  rule lock). A project's deletion took the project's row first: half the runs of
  ``test_delete_project_while_a_client_streams`` deadlocked in the PostgreSQL topology
  (session 26; stop 39's CI failed on it).
- A sender recording a 410 disables the endpoint (its row, then its pending deliveries); it
  locked its delivery first, while a deletion of the endpoint (or of its project) locks the
  endpoint, then its deliveries.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from spectrawatch_server.db.models import Delivery, Run, Webhook
from spectrawatch_server.storage import alert_store
from spectrawatch_server.webhooks.deliver import Deliverer, DeliveryPolicy
from spectrawatch_server.webhooks.signing import generate_secret
from tests.races import DATABASES, Held, app_client, beside, evaluate, seeded_nan_run

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


def pending_delivery(client: TestClient) -> int:
    """An endpoint of project ``p`` and the pending delivery of the ``alert.opened`` event a
    NaN weights frame raised: the delivery's id."""
    run_id, frame_id = seeded_nan_run(client)
    sessions = client.app.state.spectrawatch.sessions  # type: ignore[attr-defined]
    with sessions.begin() as session:
        project_id = session.get_one(Run, run_id).project_id
        url = "https://hooks.example/in"
        session.add(Webhook(project_id=project_id, url=url, secret=generate_secret()))
    evaluate(client, run_id, frame_id)
    with sessions() as session:
        (delivery_id,) = session.scalars(
            select(Delivery.id).where(Delivery.status == "pending")
        ).all()
    return int(delivery_id)


@pytest.mark.parametrize("database", DATABASES)
@pytest.mark.parametrize("deleted", ["webhook", "project"])
def test_an_endpoint_deleted_while_a_sender_records_its_410(
    tmp_path: Path, database: str, deleted: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deletion waits for the sender (held between its locks and the endpoint's
    disabling), then deletes the endpoint and its deliveries."""
    with app_client(tmp_path, database) as client:
        delivery_id = pending_delivery(client)
        sessions = client.app.state.spectrawatch.sessions  # type: ignore[attr-defined]
        deliverer = Deliverer(
            sessions,
            DeliveryPolicy(schedule=(0, 5), jitter=0.0),
            resolve=lambda host, port: ["93.184.215.14"],
            transport=httpx.MockTransport(lambda request: httpx.Response(410)),
        )
        (hook,) = client.get(f"{API}/webhooks").json()
        outcomes = []
        held = Held(monkeypatch, alert_store, "disable_webhook")
        held.start(lambda: outcomes.append(deliverer.attempt(delivery_id)))
        path = f"{API}/webhooks/{hook['id']}" if deleted == "webhook" else f"{API}/projects/p"
        answer = beside(held, client, lambda: client.delete(path))
        deliverer.close()
        assert answer.status_code in (200, 204), answer.text
        assert [(o.status, o.status_code) for o in outcomes] == [("failed", 410)]
        assert client.get(f"{API}/webhooks").json() == []
        with sessions() as session:
            assert session.scalars(select(Delivery.id)).all() == []
