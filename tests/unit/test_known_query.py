"""Every ``/api/v1`` route refuses a query parameter it does not declare (422 naming it and the
ones it takes), and takes every parameter the client, the CLI and the dashboards' script send."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from spectrawatch_server.api.known_query import query_names, repeatable_names
from spectrawatch_server.api.routes import dashboard_figures
from spectrawatch_server.app import API_PREFIX, API_ROUTERS, create_app
from spectrawatch_server.config import ServerSettings
from spectrawatch_server.storage import result_store
from spectrawatch_server.storage.result_store import MetricRow
from tests.dashboard_seed import done_frame, migrated, new_run
from tests.unit.test_read_bounds import api_over

ROOT = Path(__file__).parents[2]
PATH_VALUES = {"run_id": "1", "frame_id": "1", "webhook_id": "1", "delivery_id": "1"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    engine, sessions = migrated(tmp_path)
    with sessions.begin() as s:
        run_id = new_run(s, "p", "r")
        frame = done_frame(s, run_id, 0, 0)
        rows = [MetricRow(layer, "htsr.alpha", 0, 3.0) for layer in ("0.weight", "__model__")]
        result_store.replace_results(s, run_id, frame.id, 0, "htsr", rows, [])
    engine.dispose()
    settings = ServerSettings(data_dir=tmp_path, run_worker=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:
        yield c


def api_routes() -> list[APIRoute]:
    routers = (*API_ROUTERS, dashboard_figures.api_router)
    return [r for router in routers for r in router.routes if isinstance(r, APIRoute)]


def test_every_api_route_refuses_an_unknown_query_parameter(client: TestClient) -> None:
    """Before, ``GET /runs?status=running`` listed finished runs too and ``/metrics?layr=``
    every layer: the parameter was ignored. Refused before the route runs (nothing deleted)."""
    checked = 0
    for route in api_routes():
        path = re.sub(r"\{(\w+)(:\w+)?\}", lambda m: PATH_VALUES.get(m[1], "p"), route.path)
        for method in route.methods - {"HEAD"}:
            resp = client.request(method, f"{API_PREFIX}{path}?bogus=1&layr=0.weight")
            assert resp.status_code == 422, (method, path, resp.text)
            problems = resp.json()["error"]["problems"]
            assert [p["field"] for p in problems] == ["query.bogus", "query.layr"], problems
            takes = ", ".join(sorted(query_names(route.dependant))) or "no query parameters"
            assert problems[0]["message"].endswith(f"takes: {takes}"), problems
            checked += 1
    assert checked > 40
    assert client.get(f"{API_PREFIX}/runs/1").status_code == 200  # DELETE?bogus did not run
    metrics = client.get(f"{API_PREFIX}/runs/1/metrics?name=htsr.alpha&layr=0.weight")
    assert "GET /api/v1/runs/1/metrics takes: from, layer, max_points, name, to" in metrics.text


def test_a_single_valued_parameter_given_twice_is_refused_naming_it(client: TestClient) -> None:
    """Before, the last value counted alone: ``/alerts?status=open&status=resolved`` listed the
    resolved alerts only, ``/frames?kind=weights&kind=activations`` the activation frames. Every
    route's parameters that take one value answer 422 naming them; the list ones repeat."""
    checked = 0
    for route in api_routes():
        path = re.sub(r"\{(\w+)(:\w+)?\}", lambda m: PATH_VALUES.get(m[1], "p"), route.path)
        lists = repeatable_names(route.dependant)
        for name in sorted(query_names(route.dependant) - lists):
            for method in route.methods - {"HEAD"}:
                resp = client.request(method, f"{API_PREFIX}{path}?{name}=1&{name}=2")
                assert resp.status_code == 422, (method, path, name, resp.text)
                (problem,) = resp.json()["error"]["problems"]
                assert problem == {
                    "field": f"query.{name}",
                    "message": "given 2 times; it takes one value",
                }
                checked += 1
    assert checked > 50
    assert client.get(f"{API_PREFIX}/runs/1").status_code == 200  # DELETE?x&x did not run
    runs = next(r for r in api_routes() if r.path == "/runs" and "GET" in r.methods)
    assert repeatable_names(runs.dependant) == {"status", "tag"}
    both = client.get(f"{API_PREFIX}/runs?status=running&status=finished&tag=a&tag=b")
    assert both.status_code == 200, both.text
    alerts = client.get(f"{API_PREFIX}/alerts?status=open&status=resolved")
    assert alerts.json()["error"]["message"] == "query.status: given 2 times; it takes one value"


def test_the_parameters_the_client_cli_and_dashboards_send_are_taken(
    client: TestClient, capsys: pytest.CaptureFixture[str]
) -> None:
    api = api_over(client)
    (run,) = api.runs("p")
    assert run.alerts(status="open") == []
    assert run.spectra(layer="0.weight", analysis="htsr") == []
    assert list(run.metric("htsr.alpha")) == ["0.weight", "__model__"]
    assert list(run.metric("htsr.alpha", layer="0.weight", max_points=10)) == ["0.weight"]
    assert api.run("r", project="p").id == run.id
    # the figure requests of the pages' script: its state keys, max_points, the layer page's layer
    script = (ROOT / "dashboards" / "static" / "spectrawatch.js").read_text()
    state = re.search(r"STATE_KEYS = (\{.*?\});", script, re.S)
    assert state is not None
    keys = {
        page: re.findall(r'"(\w+)"', names)
        for page, names in re.findall(r"(\w+): \[([^\]]*)\]", state[1])
    }
    paths = {route.path: route for route in dashboard_figures.api_router.routes}
    for page, names in keys.items():
        path = "/dashboards/compare" if page == "compare" else f"/dashboards/runs/{{run_id}}/{page}"
        sent = {*names, "layer"} if page == "layer" else set(names)
        if page not in ("layers", "alerts"):
            sent.add("max_points")
        route = paths[path]
        assert isinstance(route, APIRoute)
        assert sent <= query_names(route.dependant), page
