"""Token roles: ``read`` (GET), ``write`` (a training client), ``admin`` (deletions and
configuration); the route table declares a role for every write route."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import update

from spectrawatch.cli import main
from spectrawatch_server.api.deps import ROLE_ATTRIBUTE
from spectrawatch_server.api.routes import dashboard_figures
from spectrawatch_server.app import API_PREFIX, API_ROUTERS, create_app
from spectrawatch_server.config import ServerSettings
from spectrawatch_server.db.models import Alert, Delivery
from spectrawatch_server.storage import alert_store
from spectrawatch_server.storage import repository as repo

# the documented table (docs/deployment.md, "Token roles") of every route that is not a GET
WRITE_ROUTES = {
    ("POST", "/projects"): "write",
    ("DELETE", "/projects/{name}"): "admin",
    ("POST", "/runs"): "write",
    ("PATCH", "/runs/{run_id}"): "write",
    ("POST", "/runs/{run_id}/client-stats"): "write",
    ("POST", "/runs/{run_id}/frames"): "write",
    ("POST", "/runs/{run_id}/metrics"): "write",
    ("POST", "/runs/{run_id}/scalars"): "write",
    ("PATCH", "/alerts/{alert_id}"): "write",
    ("DELETE", "/runs/{run_id}"): "admin",
    ("POST", "/runs/{run_id}/reanalyze"): "admin",
    ("POST", "/runs/bulk-delete"): "admin",
    ("POST", "/blobs/prune"): "admin",
    ("PATCH", "/projects/{project}/alert-rules/{rule}"): "admin",
    ("DELETE", "/projects/{project}/alert-rules/{rule}"): "admin",
    ("POST", "/webhooks"): "admin",
    ("PATCH", "/webhooks/{webhook_id}"): "admin",
    ("DELETE", "/webhooks/{webhook_id}"): "admin",
    ("POST", "/webhooks/{webhook_id}/test"): "admin",
    ("POST", "/deliveries/{delivery_id}/redeliver"): "admin",
}
# the GETs that need more than ``read``: a webhook's URL is often a credential
ADMIN_READS = {
    ("GET", "/webhooks"): "admin",
    ("GET", "/webhooks/{webhook_id}"): "admin",
    ("GET", "/webhooks/{webhook_id}/deliveries"): "admin",
    ("GET", "/deliveries/{delivery_id}"): "admin",
}


def _declared_roles(route: APIRoute) -> list[str]:
    """The roles a route requires: its role dependencies, or its endpoint's own mark."""
    found: list[str] = []

    def walk(dependant: Dependant) -> None:
        role = getattr(dependant.call, ROLE_ATTRIBUTE, None)
        if role is not None:
            found.append(role)
        for sub in dependant.dependencies:
            walk(sub)

    walk(route.dependant)
    return found


def test_every_write_route_declares_its_role_and_reads_need_at_most_read(tmp_path: Path) -> None:
    """Every API route: a non-GET declares exactly one role (``require_role`` or, for frame
    ingest, ``checks_role_inside``) and it is the documented one; a GET at most ``read``. The
    routers walked are those the app serves under /api/v1 (its OpenAPI schema): a router
    added to the app but not to ``API_ROUTERS`` fails here too."""
    declared: dict[tuple[str, str], str] = {}
    seen: set[tuple[str, str]] = set()
    for router in (*API_ROUTERS, dashboard_figures.api_router):
        for route in router.routes:
            assert isinstance(route, APIRoute)
            roles = _declared_roles(route)
            for method in route.methods - {"HEAD"}:
                seen.add((method, route.path))
                if method == "GET" and (method, route.path) not in ADMIN_READS:
                    assert set(roles) <= {"read"}, (route.path, roles)
                else:
                    assert len(roles) == 1, f"{method} {route.path}: no require_role"
                    declared[(method, route.path)] = roles[0]
    assert declared == WRITE_ROUTES | ADMIN_READS
    app = create_app(ServerSettings(data_dir=tmp_path, run_worker=False, run_webhooks=False))
    served = {
        (method.upper(), path.removeprefix(API_PREFIX))
        for path, operations in app.openapi()["paths"].items()
        if path.startswith(API_PREFIX)
        for method in operations
    }
    assert served == seen
    assert len({s for s in seen if s[0] == "GET"}) > 15
    assert ("GET", "/token") in seen  # whoami: any token may ask what it may do


def test_the_openapi_schema_names_each_operations_role(tmp_path: Path) -> None:
    """Each operation's description ends with the role the table above gives it (``read`` for
    the other GETs; health and readiness need no token), once, however often it is built."""
    app = create_app(ServerSettings(data_dir=tmp_path, run_worker=False, run_webhooks=False))
    app.openapi()
    with TestClient(app, base_url="http://127.0.0.1") as client:
        paths = client.get("/openapi.json").json()["paths"]  # as served, built again
    table = WRITE_ROUTES | ADMIN_READS
    checked = 0
    for path, operations in paths.items():
        if not path.startswith(API_PREFIX):
            continue
        for method, operation in operations.items():
            key = (method.upper(), path.removeprefix(API_PREFIX))
            last = operation["description"].splitlines()[-1]
            if key[1] in ("/health", "/ready"):
                assert last == "No token needed.", key
                continue
            role = table.get(key, "read")
            above = "" if role == "admin" else " or above"
            assert last.startswith(f"Requires a token with role `{role}`{above} on a "), key
            assert operation["description"].count("Requires a token") == 1, key
            checked += 1
    assert checked == sum(len(ops) for ops in paths.values()) - 2 > 40
    assert (
        "`write` or above" in paths[f"{API_PREFIX}/runs/{{run_id}}/frames"]["post"]["description"]
    )


class Api:
    """A ``--require-auth`` app and one token per (project, role)."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.sessions = client.app.state.spectrawatch.sessions  # type: ignore[attr-defined]
        self.tokens: dict[tuple[str, str], str] = {}
        self.runs: dict[str, int] = {}
        with self.sessions.begin() as session:
            for name in ("mine", "theirs"):
                project, _ = repo.get_or_create_project(session, name)
                for role in ("read", "write", "admin"):
                    self.tokens[(name, role)] = repo.create_token(session, project, role=role)[1]
                self.runs[name] = repo.get_or_create_run(session, project, "r", {}, [])[0].id

    def call(self, role: str, method: str, path: str, project: str = "mine", **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.tokens[(project, role)]}"}
        return self.client.request(method, API_PREFIX + path, headers=headers, **kw)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    settings = ServerSettings(
        data_dir=tmp_path, run_worker=False, run_webhooks=False, require_auth=True
    )
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        yield Api(client)


def _refused(response: Any, needed: str, role: str) -> None:
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["code"] == "insufficient_role"
    assert f"role {needed!r}" in error["message"]
    assert f"token's role is {role!r}" in error["message"]


def test_a_refusal_names_the_token_create_command_with_its_project(api: Api) -> None:
    """``--project`` is required by ``token create``: the hint names it, with the project."""
    fix = "(spectrawatch token create --project mine --role write)"
    run = api.runs["mine"]
    body = {"project": "mine", "name": "x"}
    for response in (
        api.call("read", "POST", "/runs", json=body),
        api.call("read", "POST", f"/runs/{run}/scalars", json=[]),
        api.call("read", "POST", f"/runs/{run}/frames", content=b"x"),  # the auth cache's check
    ):
        _refused(response, "write", "read")
        assert response.json()["error"]["message"].endswith(fix), response.text
    with api.sessions.begin() as session:
        everywhere = repo.create_token(session, None, role="read")[1]
    headers = {"Authorization": f"Bearer {everywhere}"}
    for method, path, project in (
        ("POST", f"/runs/{run}/scalars", "mine"),  # the run's project
        ("POST", "/runs", "<project>"),  # named in the body only: not known here
    ):
        response = api.client.request(method, API_PREFIX + path, headers=headers, json=body)
        _refused(response, "write", "read")
        message = response.json()["error"]["message"]
        assert message.endswith(f"(spectrawatch token create --project {project} --role write)")


def test_a_read_token_reads_everything_and_writes_nothing(api: Api) -> None:
    run = api.runs["mine"]
    for path in (
        "/projects",
        "/runs",
        f"/runs/{run}",
        f"/runs/{run}/metrics/catalog",
        f"/runs/{run}/frames",
        f"/runs/{run}/alerts",
        "/projects/mine/alert-rules",
        f"/dashboards/runs/{run}/overview",
        f"/dashboards/runs/{run}/alerts",
        "/dashboards/projects/mine/alert-rules",
    ):
        assert api.call("read", "GET", path).status_code == 200, path
    headers = {"Authorization": f"Bearer {api.tokens[('mine', 'read')]}"}
    for page in ("/", "/projects/mine", f"/runs/{run}", "/projects/mine/alert-rules"):
        assert api.client.get(page, headers=headers).status_code == 200, page
    _refused(
        api.call("read", "POST", "/runs", json={"project": "mine", "name": "x"}), "write", "read"
    )
    _refused(
        api.call("read", "PATCH", f"/runs/{run}", json={"status": "finished"}), "write", "read"
    )
    body = {"step": 1, "values": {"loss": 0.5}}
    _refused(api.call("read", "POST", f"/runs/{run}/scalars", json=body), "write", "read")
    _refused(api.call("read", "POST", "/projects", json={"name": "mine"}), "write", "read")
    # a webhook's URL is often a credential (a Slack URL): not for a dashboard's token
    hook = {"project": "mine", "url": "https://93.184.216.34/h?token=s3cret"}
    hook_id = api.call("admin", "POST", "/webhooks", json=hook).json()["id"]
    for path in ("/webhooks", f"/webhooks/{hook_id}", f"/webhooks/{hook_id}/deliveries"):
        for role in ("read", "write"):
            response = api.call(role, "GET", path)
            _refused(response, "admin", role)
            assert "s3cret" not in response.text
        assert api.call("admin", "GET", path).status_code == 200, path


def test_the_alerts_page_shows_webhook_urls_and_errors_in_full_to_admins_only(api: Api) -> None:
    """The alerts page's deliveries table is read with a ``read`` token too: below ``admin``
    a URL is its scheme and host, an error its words before the receiver's answer."""
    hook = {"project": "mine", "url": "https://93.184.216.34:8443/h?token=s3cret"}
    hook_id = api.call("admin", "POST", "/webhooks", json=hook).json()["id"]
    assert api.call("admin", "POST", f"/webhooks/{hook_id}/test").status_code < 300
    with api.sessions.begin() as session:
        session.execute(
            update(Delivery).values(last_error="HTTP 500: no such hook /h?token=s3cret")
        )
    path = f"/dashboards/runs/{api.runs['mine']}/alerts"
    for role in ("read", "write", "admin"):
        response = api.call(role, "GET", path)
        table = next(t for t in response.json()["tables"] if t["id"] == "deliveries")
        row = dict(zip(table["columns"], table["rows"][0], strict=True))
        if role == "admin":
            assert row["url"] == hook["url"]
            assert row["last_error"] == "HTTP 500: no such hook /h?token=s3cret"
            assert not table["help"]
        else:
            assert "s3cret" not in response.text, role
            assert row["url"] == "https://93.184.216.34:8443/…"
            assert row["last_error"] == "HTTP 500: …"
            assert "admin token" in table["help"]


def test_url_origin_keeps_scheme_host_and_port_only() -> None:
    origin = dashboard_figures.url_origin
    assert origin("https://hooks.slack.com/services/T0/B0/XYZ") == "https://hooks.slack.com/…"
    assert origin("https://user:pw@example.com") == "https://example.com/…"
    assert origin("http://[::1]:8080/x") == "http://[::1]:8080/…"
    assert origin("http://example.com/") == "http://example.com"
    assert origin("not a url") == origin("http://h:99999/") == "…"
    assert dashboard_figures.error_gist("webhook deleted") == "webhook deleted"


def test_a_write_token_runs_training_but_deletes_and_configures_nothing(api: Api) -> None:
    run = api.runs["mine"]
    created = api.call("write", "POST", "/runs", json={"project": "mine", "name": "x"})
    assert created.status_code == 201
    finished = api.call("write", "PATCH", f"/runs/{run}", json={"status": "finished"})
    assert finished.status_code == 200
    _refused(api.call("write", "DELETE", f"/runs/{run}"), "admin", "write")
    _refused(api.call("write", "DELETE", "/projects/mine"), "admin", "write")
    bulk = {"older_than_days": 0, "project": "mine"}
    _refused(api.call("write", "POST", "/runs/bulk-delete", json=bulk), "admin", "write")
    rule = "/projects/mine/alert-rules/nonfinite"
    _refused(api.call("write", "PATCH", rule, json={"enabled": False}), "admin", "write")
    _refused(api.call("write", "DELETE", rule), "admin", "write")
    hook = {"project": "mine", "url": "https://93.184.216.34/h"}
    _refused(api.call("write", "POST", "/webhooks", json=hook), "admin", "write")
    _refused(
        api.call("write", "POST", "/blobs/prune", json={"older_than_days": 0}), "admin", "write"
    )
    _refused(api.call("write", "POST", f"/runs/{run}/reanalyze"), "admin", "write")
    with api.sessions() as session:
        assert repo.get_run(session, run) is not None  # nothing was deleted


def test_acknowledging_an_alert_needs_write_and_names_who(api: Api) -> None:
    """``PATCH /alerts/{id}``: a ``read`` token is refused (403), another project's alert or
    none is 404 whatever the role; a ``write`` token acknowledges (its name kept, or
    ``token <id>``) and takes it back; an unknown field is 422."""
    with api.sessions.begin() as session:
        alerts = {
            name: alert_store.insert_alert(
                session, Alert(run_id=api.runs[name], rule="nonfinite", step=1, status="open")
            ).id
            for name in ("mine", "theirs")
        }
    mine, theirs = alerts["mine"], alerts["theirs"]
    _refused(
        api.call("read", "PATCH", f"/alerts/{mine}", json={"acknowledged": True}), "write", "read"
    )
    for role in ("read", "write"):
        for alert_id in (theirs, 999_999):
            response = api.call(role, "PATCH", f"/alerts/{alert_id}", json={"acknowledged": True})
            assert response.status_code == 404, response.text
            assert response.json()["error"]["code"] == "alert_not_found"
    bad = api.call("write", "PATCH", f"/alerts/{mine}", json={"status": "resolved"})
    assert bad.status_code == 422, bad.text
    loose = api.call("write", "PATCH", f"/alerts/{mine}", json={"acknowledged": "yes"})
    assert loose.status_code == 422, loose.text  # not read as true
    acked = api.call("write", "PATCH", f"/alerts/{mine}", json={"acknowledged": True}).json()
    assert acked["acknowledged_by"].startswith("token ")
    assert acked["acknowledged_at"] is not None
    assert acked["status"] == "open"
    listed = api.call("read", "GET", "/alerts", params={"acknowledged": "true"}).json()
    assert [a["id"] for a in listed] == [mine]
    undone = api.call("write", "PATCH", f"/alerts/{mine}", json={"acknowledged": False}).json()
    assert (undone["acknowledged_at"], undone["acknowledged_by"]) == (None, None)


def test_an_alert_a_project_and_a_rule_are_each_read_alone(api: Api) -> None:
    """``/alerts/{id}``, ``/projects/{name}`` and ``/projects/{p}/alert-rules/{rule}`` could be
    changed (PATCH/DELETE) but not read (405): a webhook receiver could not fetch the alert an
    event named. A ``read`` token reads its own project's; another project's, or none, is 404
    with the error code the PATCH answers with."""
    with api.sessions.begin() as session:
        alerts = {
            name: alert_store.insert_alert(
                session, Alert(run_id=api.runs[name], rule="nonfinite", step=3, status="open")
            ).id
            for name in ("mine", "theirs")
        }
    alert = api.call("read", "GET", f"/alerts/{alerts['mine']}")
    assert alert.status_code == 200, alert.text
    assert alert.json() == api.call("read", "GET", "/alerts").json()[0]
    project = api.call("read", "GET", "/projects/mine")
    assert project.status_code == 200, project.text
    assert project.json() == api.call("read", "GET", "/projects").json()[0]
    rules = api.call("read", "GET", "/projects/mine/alert-rules").json()
    for listed in rules:
        rule = api.call("read", "GET", f"/projects/mine/alert-rules/{listed['name']}")
        assert (rule.status_code, rule.json()) == (200, listed)
    for path, code in (
        (f"/alerts/{alerts['theirs']}", "alert_not_found"),
        ("/alerts/999999", "alert_not_found"),
        ("/projects/theirs", "project_not_found"),
        ("/projects/nowhere", "project_not_found"),
        ("/projects/theirs/alert-rules/nonfinite", "project_not_found"),
        ("/projects/mine/alert-rules/no_such_rule", "rule_not_found"),
    ):
        response = api.call("read", "GET", path)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"]["code"] == code, path


def test_a_refused_role_still_answers_404_for_what_it_may_not_see(api: Api) -> None:
    """403 tells a caller only about its own project's objects: another project's run,
    project, webhook, or one that does not exist, stays a 404."""
    theirs = api.runs["theirs"]
    hook = api.call(
        "admin",
        "POST",
        "/webhooks",
        "theirs",
        json={"project": "theirs", "url": "https://93.184.216.34/h"},
    )
    assert hook.status_code == 201
    hook_id = hook.json()["id"]
    for method, path in (
        ("DELETE", f"/runs/{theirs}"),
        ("DELETE", "/runs/999999"),
        ("DELETE", "/projects/theirs"),
        ("DELETE", "/projects/nowhere"),
        ("PATCH", "/projects/theirs/alert-rules/nonfinite"),
        ("DELETE", f"/webhooks/{hook_id}"),
        ("POST", f"/webhooks/{hook_id}/test"),
        ("POST", "/deliveries/999999/redeliver"),
    ):
        response = api.call("write", method, path, json={"enabled": False})
        assert response.status_code == 404, (method, path, response.text)
    response = api.call("read", "PATCH", f"/runs/{theirs}", json={"status": "finished"})
    assert response.status_code == 404


def test_an_admin_token_deletes_and_configures(api: Api) -> None:
    rule = "/projects/mine/alert-rules/nonfinite"
    assert api.call("admin", "PATCH", rule, json={"enabled": False}).status_code == 200
    hook = {"project": "mine", "url": "https://93.184.216.34/h"}
    assert api.call("admin", "POST", "/webhooks", json=hook).status_code == 201
    assert api.call("admin", "DELETE", f"/runs/{api.runs['mine']}").status_code == 200
    deleted = api.call("admin", "DELETE", "/projects/mine")
    assert deleted.status_code == 200
    assert deleted.json()["tokens_revoked"] == 3


def test_a_server_wide_token_sees_every_project_within_its_role(api: Api) -> None:
    with api.sessions.begin() as session:
        for role in ("read", "admin"):
            api.tokens[("*", role)] = repo.create_token(session, None, role=role)[1]
    projects = api.call("read", "GET", "/projects", "*").json()
    assert sorted(p["name"] for p in projects) == ["mine", "theirs"]
    runs = api.call("read", "GET", "/runs", "*").json()
    assert sorted(r["id"] for r in runs) == sorted(api.runs.values())
    theirs = api.runs["theirs"]
    _refused(api.call("read", "DELETE", f"/runs/{theirs}", "*"), "admin", "read")
    assert api.call("admin", "DELETE", f"/runs/{theirs}", "*").status_code == 200
    deleted = api.call("admin", "DELETE", "/projects/theirs", "*").json()
    assert deleted["tokens_revoked"] == 3  # the project's own; the server-wide one stays
    assert api.call("admin", "GET", "/projects", "*").status_code == 200


def test_whoami_answers_each_token_its_scope_and_role(api: Api) -> None:
    with api.sessions.begin() as session:
        api.tokens[("*", "read")] = repo.create_token(session, None, "dash", role="read")[1]
    for role in ("read", "write", "admin"):
        response = api.call(role, "GET", "/token")
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["project"], body["role"], body["anonymous"]) == ("mine", role, False)
        assert api.tokens[("mine", role)].startswith(body["token"]["prefix"])
        assert set(body["token"]) == {"id", "name", "prefix", "created_at"}
    everywhere = api.call("read", "GET", "/token", "*").json()
    assert (everywhere["project"], everywhere["role"]) == (None, "read")
    assert everywhere["token"]["name"] == "dash"
    assert api.client.get(f"{API_PREFIX}/token").status_code == 401
    with api.sessions.begin() as session:
        repo.revoke_token(session, everywhere["token"]["id"])
    assert api.call("read", "GET", "/token", "*").status_code == 401


def test_whoami_without_a_token_on_an_open_server_is_anonymous_admin(tmp_path: Path) -> None:
    settings = ServerSettings(data_dir=tmp_path, run_worker=False, run_webhooks=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        assert client.get(f"{API_PREFIX}/token").json() == {
            "project": None,
            "role": "admin",
            "token": None,
            "anonymous": True,
        }


def test_anonymous_local_use_still_does_everything(tmp_path: Path) -> None:
    settings = ServerSettings(data_dir=tmp_path, run_worker=False, run_webhooks=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        run = client.post(f"{API_PREFIX}/runs", json={"project": "p", "name": "r"}).json()
        assert client.delete(f"{API_PREFIX}/runs/{run['id']}").status_code == 200
        assert client.delete(f"{API_PREFIX}/projects/p").status_code == 200


def test_token_create_takes_a_role_defaults_to_write_and_list_shows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = str(tmp_path / "d")
    assert main(["token", "create", "--project", "p", "--data-dir", data]) == 0
    assert "(write)" in capsys.readouterr().err
    assert main(["token", "create", "--project", "p", "--role", "read", "--data-dir", data]) == 0
    assert main(["token", "create", "--project", "p", "--role", "admin", "--data-dir", data]) == 0
    capsys.readouterr()
    assert main(["token", "list", "--data-dir", data]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("1", "p", "write"),
        ("2", "p", "read"),
        ("3", "p", "admin"),
    ]
    with pytest.raises(SystemExit) as exit_:
        main(["token", "create", "--project", "p", "--role", "owner", "--data-dir", data])
    assert exit_.value.code == 2
    assert "invalid choice: 'owner'" in capsys.readouterr().err
    everywhere = ["token", "create", "--all-projects", "--role", "read", "--data-dir", data]
    assert main(everywhere) == 0
    assert "for every project" in capsys.readouterr().err
    assert main(["token", "list", "--data-dir", data]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split("\t")[:3] == ["4", "*", "read"]
    with pytest.raises(SystemExit) as exit_:
        main(["token", "create", "--project", "p", "--all-projects", "--data-dir", data])
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
