"""``spectrawatch.Api`` against a real server: what a run streamed comes back in Python equal to
the HTTP API's own answers, by id and by name, with scalars, alerts and a pandas history."""

from __future__ import annotations

import http.server
import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import spectrawatch
from spectrawatch import Api
from spectrawatch import _cli_http as cli_http
from spectrawatch.api import MODEL_LAYER, ApiError
from spectrawatch.cli import main
from spectrawatch.spectral.keys import is_stored_key
from tests.servers import ServerProcess, database_url, db_rows, wait_until
from tests.training import Loop, all_analysed, client_settings, frames_of

pytestmark = pytest.mark.integration


def test_results_read_back_in_python(
    server: ServerProcess,
    api: httpx.Client,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    m = spectrawatch.Monitor()
    m.init(**client_settings(tmp_path, server.url, "queried", project="notebook"))
    Loop(m).run(30)
    assert m.finish(timeout=60)
    run_id = m.run_id
    assert isinstance(run_id, int)
    wait_until(lambda: all_analysed(server.url, run_id), 180)

    with Api(server.url) as sw:
        run = sw.run("queried", project="notebook")
        assert (run.id, run.status) == (run_id, "finished")
        assert sw.run(run_id).name == "queried"
        assert sw.run(str(run_id)).name == "queried"  # digits without a project: an id
        with pytest.raises(ApiError, match=f"no run is named '{run_id}' in project 'notebook'"):
            sw.run(str(run_id), project="notebook")  # with one: always a name, as in the CLI
        assert [r.id for r in sw.runs("notebook")] == [run_id]
        keys = run.metric_keys()
        catalog = api.get(f"/runs/{run_id}/metrics/catalog").json()
        assert keys == [(c["name"], c["layer"]) for c in catalog]
        # every key the worker stored is one the client knows: a typo is told from a key that
        # an early run has no rows of yet (empty)
        assert [n for n, _ in keys if not is_stored_key(n)] == []
        with pytest.raises(ApiError, match=r"no metric 'htsr\.aplha'; closest: 'htsr\.alpha'"):
            run.metric("htsr.aplha")
        # the counts the worker's writes kept (metric_series) are the metric rows' own
        grouped = db_rows(
            server.data_dir,
            "SELECT name, layer, count(*), min(step), max(step) FROM metric WHERE run_id = :r"
            " GROUP BY name, layer ORDER BY name, layer",
            r=run_id,
        )
        assert [
            (c["name"], c["layer"], c["points"], c["first_step"], c["last_step"]) for c in catalog
        ] == [tuple(g) for g in grouped]
        name, layer = next(k for k in keys if k[1] == MODEL_LAYER)
        series = run.metric(name)[layer]
        raw = api.get(f"/runs/{run_id}/metrics", params={"name": name, "layer": layer}).json()
        (expected,) = raw["series"]
        assert series.steps == expected["steps"]
        assert [None if math.isnan(v) else v for v in series.values] == expected["values"]
        loss = run.scalars("loss")["loss"]
        assert loss.steps == list(range(1, 31))
        assert run.alerts() == api.get(f"/runs/{run_id}/alerts").json()
        frame = run.history([name], scalars=["loss"])
        assert list(frame.columns) == [name, "loss"]
        assert frame.index.name == "step"
        assert frame["loss"].dropna().index.tolist() == loss.steps
        assert frame[name].dropna().tolist() == [v for v in series.values if not math.isnan(v)]
        lag = run.sed_lag(scalar="loss", max_lag=3)  # SED gap series vs the logged loss
        http = api.get(f"/runs/{run_id}/sed/lag", params={"scalar": "loss", "max_lag": 3})
        assert lag == http.json()["series"]
        w16 = next(s for s in lag if s["metric"] == "sed.gap_ratio.w16")
        assert (w16["step_unit"], w16["points"]) == (
            1,
            len(run.metric("sed.gap_ratio.w16")[MODEL_LAYER].steps),
        )
        assert {p["lag"] for p in w16["lags"]} == set(range(-3, 4))
        with pytest.raises(ApiError, match="no finite scalar 'absent'"):
            run.sed_lag(scalar="absent")
    cli = ["runs", "lag", "queried", "--project", "notebook", "--scalar", "loss", "--max-lag", "3"]
    assert main([*cli, "--json", "--url", server.url]) == 0
    assert json.loads(capsys.readouterr().out)["series"] == lag
    assert main([*cli, "--url", server.url]) == 0
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if "sed.gap_ratio.w16" in x)
    assert f"{w16['points']:>6} shared steps  strongest r = {w16['best']['r']:+.2f}" in line
    assert main(["runs", "lag", str(run_id), "--scalar", "absent", "--url", server.url]) == 1
    capsys.readouterr()
    # runs show: the run's state, the client's own report (as the real client sent it)
    stored = api.get(f"/runs/{run_id}").json()
    stats = stored["client_stats"]
    assert stats["sent_frames"] > 0
    assert stats["update_every"] == 1
    assert main(["runs", "show", "queried", "--project", "notebook", "--url", server.url]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"run {run_id}: notebook/queried (finished)")
    assert f"frames: {len(frames_of(server.url, run_id))} analysed, 0 queued, 0 failed" in text
    assert f"client: {stats['sent_frames']} frames sent, update sketch every step\n" in text
    assert f"metrics: {len({n for n, _ in keys})} kinds, {len(keys)} series" in text
    assert main(["runs", "show", str(run_id), "--json", "--url", server.url]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["client_stats"] == stats
    assert shown["metrics"] == catalog
    assert shown["open_alerts"] == len(api.get(f"/runs/{run_id}/alerts?status=open").json())
    assert main(["runs", "show", "nope", "--url", server.url]) == 1
    assert "no run named 'nope'" in capsys.readouterr().err
    with Api(server.url) as sw:
        with pytest.raises(ApiError, match="no run is named 'absent'"):
            sw.run("absent")
        with pytest.raises(ApiError) as missing:
            sw.run(10**9)
        assert missing.value.status == 404


# --- paging behind a reverse proxy ---------------------------------------------------------------

SPECTRA_LAYERS = ("l0", "l1", "l2")
SPECTRA_STEPS = 30  # x 3 layers = 90 spectra: pages of 16 from the client


class _Proxy:
    """A reverse proxy in a thread, as ``proxy_pass http://127.0.0.1:PORT/`` without forwarding
    headers: the upstream sees its own address as ``Host``; ``prefix`` is stripped from the
    path (a server published under a sub-path). Records each request's path and the ``Link``
    header of each response."""

    def __init__(self, upstream: str, prefix: str = "") -> None:
        self.upstream, self.prefix = upstream, prefix
        self.paths: list[str] = []
        self.links: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy.paths.append(self.path)
                if not self.path.startswith(proxy.prefix + "/"):
                    self.send_error(404)
                    return
                token = self.headers.get("Authorization")
                headers = {"Authorization": token} if token else {}
                resp = httpx.get(
                    proxy.upstream + self.path[len(proxy.prefix) :], headers=headers, timeout=30
                )
                if "link" in resp.headers:
                    proxy.links.append(resp.headers["link"])
                self.send_response(resp.status_code)
                for name in ("content-type", "link", "x-next-offset"):
                    if name in resp.headers:
                        self.send_header(name, resp.headers[name])
                self.send_header("content-length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

            def log_message(self, *_: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{prefix}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _seed_spectra(data_dir: Path) -> int:
    """A run with :data:`SPECTRA_STEPS` x :data:`SPECTRA_LAYERS` spectra in the database of a
    server on ``data_dir`` (either mode); its id."""
    from spectrawatch_server.db import migrate
    from spectrawatch_server.db.session import make_engine, make_session_factory
    from spectrawatch_server.storage import result_store
    from tests.dashboard_seed import done_frame, new_run

    data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(database_url(data_dir))
    try:
        migrate.upgrade(engine)
        with make_session_factory(engine).begin() as s:
            run_id = new_run(s, "proxied", "r")
            for step in range(SPECTRA_STEPS):
                frame = done_frame(s, run_id, step, step)
                rows = [result_store.SpectrumRow(la, {"at": [step, la]}) for la in SPECTRA_LAYERS]
                result_store.replace_results(s, run_id, frame.id, step, "htsr", [], rows)
    finally:
        engine.dispose()
    return run_id


@pytest.mark.parametrize(
    ("public", "prefix"), [(False, ""), (True, "/sw")], ids=["relative", "public-url"]
)
def test_spectra_pages_are_followed_through_a_proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, public: bool, prefix: str
) -> None:
    """The next-page ``Link`` named the host the request reached: behind a proxy that sends no
    forwarded headers, the internal address, which a client outside cannot reach. It is now a
    relative reference (resolved against the request's URL), or a URL under
    ``SPECTRAWATCH_PUBLIC_URL`` (a server published under a sub-path), and ``Run.spectra()``
    follows it through the proxy to the last page."""
    data_dir = tmp_path / "server"
    run_id = _seed_spectra(data_dir)
    server = ServerProcess(data_dir)
    proxy = _Proxy(server.url, prefix)
    if public:
        server.env["SPECTRAWATCH_PUBLIC_URL"] = proxy.url
    server.start()
    try:
        monkeypatch.setattr(spectrawatch.api, "_PAGE", 16)
        got = Api(proxy.url).run(run_id).spectra()
        links = list(proxy.links)
        paths = list(proxy.paths)
    finally:
        server.stop()
        proxy.close()
    want = [[t, la] for t in range(SPECTRA_STEPS) for la in SPECTRA_LAYERS]
    assert [s["payload"]["at"] for s in got] == want
    assert len(links) == -(-len(want) // 16) - 1  # a link on every page but the last
    for link in links:
        assert f":{server.port}" not in link, link  # never the internal address
        target = link.split(">")[0].lstrip("<")
        if public:
            assert target.startswith(f"{proxy.url}/api/v1/runs/{run_id}/spectra?"), link
        else:
            assert target.startswith(f"/api/v1/runs/{run_id}/spectra?"), link
    followed = [p for p in paths if "cursor=" in p]
    assert len(followed) == len(links)  # the client followed each link through the proxy
    assert all(p.startswith(f"{prefix}/api/v1/runs/{run_id}/spectra?") for p in followed)


# --- listing runs while runs are created or deleted ---------------------------------------------


def _between_pages(sw: Api, action: Callable[[], object]) -> list[str]:
    """Make ``sw`` run ``action`` once, after its first request answered (a training started,
    or a retention ran, between two pages); the URLs it requests are appended to the list."""
    send = sw._send
    sent: list[str] = []

    def between(method: str, path: str | httpx.URL, **kwargs: Any) -> httpx.Response:
        resp = send(method, path, **kwargs)
        sent.append(str(resp.request.url))
        if len(sent) == 1:
            action()
        return resp

    sw._send = between  # type: ignore[method-assign]
    return sent


def _new_run(api: httpx.Client, project: str) -> int:
    """A run created in ``project`` with a fresh name: its id."""
    name = f"new{len(api.get('/runs', params={'project': project, 'limit': 1000}).json())}"
    created = api.post("/runs", json={"project": project, "name": name})
    assert created.status_code == 201, created.text
    run_id: int = created.json()["id"]
    return run_id


def test_runs_listed_once_each_while_runs_are_created_and_deleted(
    server: ServerProcess, api: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Api.runs()`` paged by offset: a run created between two pages listed the boundary run
    twice, and ``Api.run(name, project=)`` of that run then said two runs had its name; a run
    deleted between pages hid a live one. Pages now follow the server's ``Link`` (by id) and a
    name is looked up by ``name=``."""
    monkeypatch.setattr(spectrawatch.api, "_PAGE", 4)
    ids = [
        api.post("/runs", json={"project": "paged", "name": f"p{i}"}).json()["id"]
        for i in range(10)
    ]
    with Api(server.url) as sw:
        sent = _between_pages(sw, lambda: _new_run(api, "paged"))
        assert [r.id for r in sw.runs("paged")] == ids[::-1]  # each once; the new run is newer
        assert len(sent) == 3
        assert all("before_id=" in url for url in sent[1:])
    with Api(server.url) as sw:
        sent = _between_pages(sw, lambda: _new_run(api, "paged"))
        assert sw.run("p6", project="paged").id == ids[6]  # the first page's last, before
        assert len(sent) == 1  # by name: one request, no paging
    with Api(server.url) as sw:
        newest = api.get("/runs", params={"project": "paged", "limit": 1}).json()[0]["id"]
        _between_pages(sw, lambda: api.delete(f"/runs/{newest}").raise_for_status())
        listed = [r.id for r in sw.runs("paged")]
        live = [r["id"] for r in api.get("/runs", params={"project": "paged"}).json()]
        assert listed == [newest, *live]  # read before its deletion; no live run missed


def _cli_requests(monkeypatch: pytest.MonkeyPatch, api: httpx.Client, project: str) -> list[str]:
    """The URLs the CLI requests from now on, a run created in ``project`` after the first."""
    request = cli_http.request
    sent: list[str] = []

    def between(*args: Any, **kwargs: Any) -> httpx.Response:
        resp = request(*args, **kwargs)
        sent.append(str(resp.request.url))
        if len(sent) == 1:
            _new_run(api, project)
        return resp

    monkeypatch.setattr(cli_http, "request", between)
    return sent


def test_cli_resolves_a_run_name_by_one_request(
    server: ServerProcess,
    api: httpx.Client,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``runs show|delete NAME --project P`` read every run by offset to find one name (a run
    created meanwhile could list a run twice: "exists in several projects"); ``name=`` now
    finds it in one request."""
    ids = [
        api.post("/runs", json={"project": "named", "name": f"n{i}"}).json()["id"] for i in range(8)
    ]
    api.post("/runs", json={"project": "other", "name": "n3"}).raise_for_status()
    monkeypatch.setattr(cli_http, "PAGE_MAX", 3)
    sent = _cli_requests(monkeypatch, api, "named")
    url = ["--url", server.url]
    assert main(["runs", "show", "n3", "--project", "named", "--json", *url]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == ids[3]
    assert sum("/runs?" in u for u in sent) == 1  # by name=, not page by page
    assert "name=n3" in sent[0]
    assert main(["runs", "show", "n3", *url]) == 1  # in two projects: still refused
    assert "exists in several projects (named, other)" in capsys.readouterr().err


def test_cli_lists_runs_past_a_page_while_runs_are_created(
    server: ServerProcess,
    api: httpx.Client,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``runs list --limit`` above the server's page (1,000) failed with its 422 and nothing
    listed older runs: ``--limit`` now reads page after page, ``--all`` every run; a run created
    between pages is not listed twice."""
    ids = [
        api.post("/runs", json={"project": "many", "name": f"m{i}"}).json()["id"] for i in range(8)
    ]
    url = ["--url", server.url]

    def listed(*argv: str) -> list[int]:
        assert main(["runs", "list", "--project", "many", "--json", *argv, *url]) == 0
        return [r["id"] for r in json.loads(capsys.readouterr().out)]

    assert listed("--limit", "5000") == ids[::-1]
    monkeypatch.setattr(cli_http, "PAGE_MAX", 3)
    sent = _cli_requests(monkeypatch, api, "many")
    assert listed("--limit", "7") == ids[:0:-1]
    assert len(sent) == 3  # pages of 3, 3 and 1
    sent.clear()
    _newer, *rest = listed("--all")
    assert rest == ids[::-1]  # each once (the run created before this listing first)
    assert len(sent) == 3
    assert main(["runs", "list", "--limit", "0", *url]) == 1
    assert "--limit must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["runs", "list", "--limit", "3", "--all", *url])


def test_runs_filtered_by_status_and_tag_in_pages(
    server: ServerProcess,
    api: httpx.Client,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``GET /runs?status=running`` listed finished runs too and ``?tag=`` every run (ignored);
    the runs can be filtered by status (repeated or comma-separated: any) and tags (every one),
    page by page through ``Link``, from ``Api.runs`` and ``runs list``."""
    statuses = ("running", "finished", "crashed")
    runs: list[tuple[int, str, list[str]]] = []
    for i in range(12):
        tags = ["baseline"] * (i % 2 == 0) + ["a,b"] * (i % 3 == 0)
        body = {"project": "tagged", "name": f"t{i}", "tags": tags}
        run_id = api.post("/runs", json=body).json()["id"]
        if statuses[i % 3] != "running":
            api.patch(f"/runs/{run_id}", json={"status": statuses[i % 3]}).raise_for_status()
        runs.append((run_id, statuses[i % 3], tags))
    api.post("/runs", json={"project": "other", "name": "o", "tags": ["baseline"]})

    def expected(status: set[str], tags: set[str]) -> list[int]:
        return [i for i, s, t in runs[::-1] if (not status or s in status) and tags <= set(t)]

    def listed(query: str) -> list[int]:
        pages, url = [], f"/runs?project=tagged&limit=2&{query}"
        while url:
            resp = api.get(url)
            assert resp.status_code == 200, resp.text
            pages += [r["id"] for r in resp.json()]
            link = resp.links.get("next", {}).get("url", "")
            kept = set(httpx.URL(link).params.multi_items())
            assert not link or set(httpx.QueryParams(query).multi_items()) <= kept  # the filters
            url = str(resp.url.join(link)) if link else ""
        return pages

    assert listed("status=running") == expected({"running"}, set())
    assert listed("status=finished,crashed") == expected({"finished", "crashed"}, set())
    assert listed("status=finished&status=crashed") == expected({"finished", "crashed"}, set())
    assert listed("tag=baseline") == expected(set(), {"baseline"})
    assert listed("tag=baseline&tag=a%2Cb") == expected(set(), {"baseline", "a,b"})
    assert listed("tag=a") == []  # a tag is matched whole
    assert listed("status=crashed&tag=baseline") == expected({"crashed"}, {"baseline"})
    wrong = api.get("/runs", params={"status": "running,opne"})
    assert wrong.status_code == 422
    assert "query.status: run statuses are running, finished, crashed, not 'opne'" in wrong.text
    monkeypatch.setattr(spectrawatch.api, "_PAGE", 2)
    with Api(server.url) as sw:
        assert [r.id for r in sw.runs("tagged", status="running")] == expected({"running"}, set())
        got = [r.id for r in sw.runs("tagged", status=["finished", "crashed"], tags="baseline")]
        assert got == expected({"finished", "crashed"}, {"baseline"})
        assert [r.id for r in sw.runs(tags=["baseline", "a,b"])] == expected(
            set(), {"a,b"} | {"baseline"}
        )
    monkeypatch.setattr(cli_http, "PAGE_MAX", 2)
    argv = ["runs", "list", "--project", "tagged", "--json", "--url", server.url, "--all"]
    assert main([*argv, "--status", "finished,crashed", "--tag", "baseline"]) == 0
    got = [r["id"] for r in json.loads(capsys.readouterr().out)]
    assert got == expected({"finished", "crashed"}, {"baseline"})
    assert main([*argv, "--status", "running", "--status", "crashed", "--tag", "a,b"]) == 0
    got = [r["id"] for r in json.loads(capsys.readouterr().out)]
    assert got == expected({"running", "crashed"}, {"a,b"})
