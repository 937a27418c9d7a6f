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

from pathlib import Path

import pytest

from spectrawatch_server.storage import alert_store
from tests.races import DATABASES, Held, app_client, beside, evaluate, seeded_nan_run

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("database", DATABASES)
def test_a_rule_disabled_during_an_evaluation_leaves_no_alert_open(
    tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with app_client(tmp_path, database) as client:
        api = "/api/v1"
        run_id, frame_id = seeded_nan_run(client)
        held = Held(monkeypatch, alert_store, "stored_rules", after=True)
        held.start(lambda: evaluate(client, run_id, frame_id))
        answer = beside(
            held,
            client,
            lambda: client.patch(
                f"{api}/projects/p/alert-rules/nonfinite", json={"enabled": False}
            ),
        )
        assert answer.status_code == 200, answer.text

        alerts = client.get(f"{api}/runs/{run_id}/alerts").json()
        assert [a["status"] for a in alerts if a["rule"] == "nonfinite"] == ["resolved"], alerts
        (alert,) = alerts
        assert alert["values"]["resolved_reason"] == "rule disabled"
