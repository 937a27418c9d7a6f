"""The client's public surface: pinned ``__all__``, lazy imports, settings from env."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

import spectrawatch
from spectrawatch.config import ClientSettings, SettingsError


def test_public_api_is_pinned() -> None:
    assert spectrawatch.__all__ == [
        "Api",
        "ClientSettings",
        "Handle",
        "Monitor",
        "SettingsError",
        "__version__",
        "monitor",
    ]
    for name in spectrawatch.__all__:
        assert getattr(spectrawatch, name) is not None
    assert isinstance(spectrawatch.monitor, spectrawatch.Monitor)


def test_monitor_name_is_the_default_instance_even_after_submodule_import() -> None:
    import importlib

    module = importlib.import_module("spectrawatch.monitor")  # the submodule, via sys.modules
    from spectrawatch import monitor

    assert isinstance(monitor, module.Monitor)
    assert spectrawatch.monitor is monitor


def test_defaults_follow_design() -> None:
    s = ClientSettings.from_env({})
    assert s.url == "http://127.0.0.1:8765"
    assert s.window == 32
    assert s.dim == 640  # d = 20 W (DESIGN §3)
    assert s.update_every == 1
    assert s.weights_every == 500
    assert s.activations_every == 250
    assert s.defect_every == 100
    assert s.run is None


def test_env_then_overrides() -> None:
    env = {
        "SPECTRAWATCH_URL": "http://x:1",
        "SPECTRAWATCH_PROJECT": "p",
        "SPECTRAWATCH_RUN": "r",
        "SPECTRAWATCH_TOKEN": "tok",
        "SPECTRAWATCH_WINDOW": "64",
        "SPECTRAWATCH_EXACT": "yes",
        "SPECTRAWATCH_BACKOFF_S": "0.5",
        "SPECTRAWATCH_SPOOL_DIR": "/tmp/sp",
    }
    s = ClientSettings.from_env(env, project="q", run=None)
    assert (s.url, s.project, s.run, s.token) == ("http://x:1", "q", "r", "tok")
    assert s.dim == 1280
    assert s.exact is True
    assert s.backoff_s == 0.5
    assert s.spool_dir == "/tmp/sp"


def test_the_token_is_not_in_the_settings_repr() -> None:
    """A repr reaches notebooks' saved outputs, logs and error reports with local variables."""
    s = ClientSettings.from_env({}, token="sw_not-for-logs")
    assert s.token == "sw_not-for-logs"
    assert "sw_not-for-logs" not in repr(s)
    assert "sw_not-for-logs" not in str(s)


def test_bad_values_name_the_variable() -> None:
    with pytest.raises(SettingsError, match="SPECTRAWATCH_WINDOW"):
        ClientSettings.from_env({"SPECTRAWATCH_WINDOW": "many"})
    with pytest.raises(SettingsError, match="update_every"):
        ClientSettings.from_env({}, update_every=-1)
    with pytest.raises(SettingsError, match="unknown setting"):
        ClientSettings.from_env({}, windw=3)
    with pytest.raises(SettingsError, match="weights_dtype"):
        ClientSettings.from_env({}, weights_dtype="int8")


@pytest.mark.parametrize("url", ["http://[::1", "localhost:8765", "ftp://h/", "http://"])
def test_a_url_httpx_cannot_use_is_a_settings_error(url: str) -> None:
    with pytest.raises(SettingsError, match="url"):
        ClientSettings.from_env({}, url=url)
    with pytest.raises(SettingsError, match="url"):
        ClientSettings.from_env({"SPECTRAWATCH_URL": url})


@pytest.mark.parametrize(
    "argv",
    [
        ["runs", "list"],
        ["export", "1"],
        ["alerts", "list"],
        ["doctor"],
    ],
)
def test_cli_refuses_a_malformed_url_in_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from spectrawatch.cli import main

    assert main([*argv, "--url", "http://[::1"]) == 1
    out = capsys.readouterr()
    assert "not a valid URL" in out.out + out.err
    assert "Traceback" not in out.out + out.err


@pytest.mark.parametrize(
    "url", ["http://h:8765/api/v1", "http://h:8765/api/v1/", "http://h:8765/api/v1/runs"]
)
def test_a_url_naming_the_api_path_is_refused_with_the_root_to_use(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from spectrawatch import Api
    from spectrawatch.cli import main

    fix = "without /api/v1 (the client adds it): use http://h:8765"
    with pytest.raises(SettingsError, match=re.escape(fix)):
        ClientSettings.from_env({}, url=url)  # monitor.init, sync, doctor
    with pytest.raises(SettingsError, match=re.escape(fix)):
        Api(url)
    monkeypatch.setenv("SPECTRAWATCH_URL", url)
    with pytest.raises(SettingsError, match=re.escape(fix)):
        Api()
    for argv in (["runs", "list"], ["export", "1"], ["alerts", "list"], ["doctor"]):
        assert main(argv) in (1, 2)
        out = capsys.readouterr()
        assert fix in out.out + out.err
        assert "Traceback" not in out.out + out.err
    assert ClientSettings.from_env({}, url="http://h:8765/sw/api/v10").url.endswith("/api/v10")


def _settings_rows() -> dict[str, list[str]]:
    """docs/client-settings.md's table rows by setting: ``{name: [environment, default, ...]}``."""
    page = (Path(__file__).parents[2] / "docs" / "client-settings.md").read_text()
    rows: dict[str, list[str]] = {}
    for line in page.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 4:
            name = cells[0].strip("`")
            assert name not in rows, f"{name} documented twice"
            rows[name] = cells[1:]
    return rows


def _documented_default(field: dataclasses.Field[object]) -> str:
    """The default as the reference page writes it: the value, in backticks."""
    if field.default_factory is not dataclasses.MISSING:  # spool_dir: under the user's cache
        return "~/.cache/spectrawatch/spool"
    value = field.default
    return value if isinstance(value, str) else repr(value)


def test_every_client_setting_is_documented_with_its_variable_and_default() -> None:
    """The reference page lists each setting once, with its variable and its actual default,
    and nothing that is not a setting: a renamed field or a changed default fails here."""
    rows = _settings_rows()
    fields = {f.name: f for f in dataclasses.fields(ClientSettings)}
    assert sorted(rows) == sorted(fields)
    for name, (env, default, meaning) in rows.items():
        assert env == f"`SPECTRAWATCH_{name.upper()}`", name
        assert default.split(" ")[0] == f"`{_documented_default(fields[name])}`", name
        assert meaning, name


class DroppingServer:
    """An HTTP/1.1 server that answers the first request of each connection (keeping it
    alive, as it says nothing else) and resets the connection at the second, unanswered: a
    server that closed a kept-alive connection just as the client reused it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.requests: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # closed at the end of the test
            while True:
                conn, _ = self.sock.accept()
                self.connections += 1
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            for answered in (False, True):
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    head += chunk
                self.requests.append(head.split(b" ", 2)[0].decode())
                if answered:  # SO_LINGER 0: the close is a reset (errno 104 at the client)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                body = b'[{"name": "p"}]'
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def dropping_server() -> Iterator[DroppingServer]:
    server = DroppingServer()
    yield server
    server.close()


def test_a_read_on_a_connection_the_server_dropped_is_sent_again(
    dropping_server: DroppingServer,
) -> None:
    from spectrawatch.api import Api, ApiError

    with Api(dropping_server.url, timeout_s=5) as api:
        for _ in range(3):
            assert api.projects() == [{"name": "p"}]
        assert dropping_server.connections == 3  # each reused one failed, a new one answered
        with pytest.raises(ApiError, match="cannot reach"):  # may have run: not repeated
            api._call("DELETE", "/runs/1")
    assert dropping_server.requests == ["GET", "GET", "GET", "GET", "GET", "DELETE"]


def _old_server(runs: list[dict[str, object]], between: Callable[[], None]) -> httpx.MockTransport:
    """A server from before ``GET /runs`` had ``Link``, ``before_id`` and ``name=``: pages by
    ``offset`` only (newest first), the others ignored; ``between`` runs after the first page."""
    pages: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/runs"
        limit = int(request.url.params.get("limit", 100))
        offset = int(request.url.params.get("offset", 0))
        newest = sorted(runs, key=lambda r: -int(str(r["id"])))
        resp = httpx.Response(200, json=newest[offset : offset + limit])
        pages.append(str(request.url))
        if len(pages) == 1:
            between()
        return resp

    return httpx.MockTransport(handle)


def test_an_older_server_is_paged_by_offset_and_a_run_listed_twice_kept_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Against a server without ``Link``/``name=`` (offset paging), a run created between two
    pages shifts the boundary run into the next page: it is listed once, and found by name."""
    from spectrawatch import api as api_module

    monkeypatch.setattr(api_module, "_PAGE", 3)
    runs: list[dict[str, object]] = [
        {"id": i, "name": f"r{i}", "project": "p", "status": "running"} for i in range(1, 8)
    ]
    new = {"id": 8, "name": "r8", "project": "p", "status": "running"}
    with api_module.Api("http://old.test") as sw:
        sw._http.close()
        sw._http = httpx.Client(
            base_url="http://old.test/api/v1", transport=_old_server(runs, lambda: runs.append(new))
        )
        assert [r.id for r in sw.runs("p")] == [7, 6, 5, 4, 3, 2, 1]  # 5 came back twice
    runs.remove(new)
    with api_module.Api("http://old.test") as sw:
        sw._http.close()
        sw._http = httpx.Client(
            base_url="http://old.test/api/v1", transport=_old_server(runs, lambda: runs.append(new))
        )
        assert sw.run("r5", project="p").id == 5  # was: "2 runs are named 'r5'"


def _run_server(sent: list[str]) -> httpx.MockTransport:
    """Run 7's catalog, scalars and one SED series; ``sent`` gets each request's path and query."""
    catalog = [
        {"name": "htsr.alpha", "layer": "0.weight"},
        {"name": "htsr.alpha", "layer": "2.weight"},
        {"name": "sed.gap_ratio.w16", "layer": "__model__"},
        {"name": "sed.gap_ratio.w32", "layer": "__model__"},
    ]
    scalars = [{"name": n, "steps": [1, 2], "values": [0.5, 0.75]} for n in ("loss", "val_acc")]
    gap = {"layer": "__model__", "steps": [2, 3], "values": [0.1, None]}

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(f"{request.url.path}?{request.url.query.decode()}")
        path, params = request.url.path.removeprefix("/api/v1/runs/7"), request.url.params
        if path == "/metrics/catalog":
            return httpx.Response(200, json=catalog)
        if path == "/scalars":
            name = params.get("name")
            return httpx.Response(200, json=[s for s in scalars if name in (None, s["name"])])
        assert path == "/metrics"
        found = (params["name"], params.get("layer")) == ("sed.gap_ratio.w32", "__model__")
        return httpx.Response(200, json={"name": params["name"], "series": [gap] * found})

    return httpx.MockTransport(handle)


def test_history_of_unknown_keys_names_them_and_the_closest_known() -> None:
    """``history(["htsr.alpah", "sed.gap_ratio"], scalars=["val_accc"])`` returned an empty
    (0, 0) frame: a typo, an SED key without its window suffix and a scalar never logged were
    left out silently. Refused now, naming each and the keys the run has that are closest."""
    import math

    from spectrawatch.api import Api, ApiError, Run

    sent: list[str] = []
    with Api("http://run.test") as api:
        api._http.close()
        api._http = httpx.Client(base_url="http://run.test/api/v1", transport=_run_server(sent))
        run = Run(api, {"id": 7, "name": "r", "project": "p", "status": "finished"})
        with pytest.raises(ApiError) as refused:
            run.history(["htsr.alpah", "sed.gap_ratio"], scalars=["val_accc", "loss"])
        assert str(refused.value) == (
            "Run.history of run 7: no metric 'htsr.alpah'; closest: 'htsr.alpha'; "
            "no metric 'sed.gap_ratio'; closest: 'sed.gap_ratio.w16', 'sed.gap_ratio.w32' "
            "(SED keys end in their window: .w<W>); no scalar 'val_accc'; closest: 'val_acc'"
        )
        assert not any(u.startswith("/api/v1/runs/7/metrics?") for u in sent)  # no series read
        with pytest.raises(ApiError, match="no metric 'xyz'; closest: none alike"):
            run.history(["xyz"])
        at_model = "metric 'htsr.alpha' has no series at layer '__model__' (it has: 0.weight, "
        with pytest.raises(ApiError, match=re.escape(at_model + "2.weight)")):
            run.history(["htsr.alpha"])
        sent.clear()
        frame = run.history(["sed.gap_ratio.w32"], scalars=["val_acc"])
        # one key as a string is that key, not its letters ("no metric 'h'; ...")
        assert run.history("sed.gap_ratio.w32", scalars="val_acc").equals(frame)
        # the scalars asked for only: listing every scalar's name read all their points
        # (5.3 s against 0.5 s on 25 scalars x 40,000 steps), now only when one is missing
        assert not any("max_points=3" in u for u in sent)
    assert list(frame.columns) == ["sed.gap_ratio.w32", "val_acc"]
    assert frame.index.tolist() == [1, 2, 3]
    assert frame["sed.gap_ratio.w32"].tolist()[1] == 0.1
    assert math.isnan(frame["val_acc"].tolist()[2])


def test_a_misspelt_metric_or_scalar_is_refused_naming_the_closest() -> None:
    """``run.metric("htsr.aplha")`` and ``run.scalars("val_accc")`` returned ``{}``: an empty
    plot and no hint. Refused now, naming the closest names; a key the worker stores that the
    run has no rows of yet (early in a run) is still empty, with no request more than the read.
    """
    from spectrawatch.api import Api, ApiError, Run

    sent: list[str] = []
    with Api("http://run.test") as api:
        api._http.close()
        api._http = httpx.Client(base_url="http://run.test/api/v1", transport=_run_server(sent))
        run = Run(api, {"id": 7, "name": "r", "project": "p", "status": "running"})
        with pytest.raises(ApiError, match=r"^run 7: no metric 'htsr\.aplha'; closest: 'htsr\.al"):
            run.metric("htsr.aplha")
        with pytest.raises(ApiError, match=r"no metric 'sed\.gap_ratio'; closest: 'sed\.gap_ra"):
            run.metric("sed.gap_ratio", layer="__model__")  # an SED key needs its window
        with pytest.raises(ApiError, match=r"^run 7: no scalar 'val_accc'; closest: 'val_acc'$"):
            run.scalars("val_accc")
        sent.clear()
        assert run.metric("htsr.stable_rank") == {}  # stored by the worker: not analysed yet
        assert run.metric("sed.gap_ratio.w64", layer="__model__") == {}
        # the run's, at other layers: its names as read for the typo above, not read again
        assert run.metric("htsr.alpha", layer="__model__") == {}
        assert run.scalars("loss")["loss"].steps == [1, 2]
        paths = [u.split("?")[0].removeprefix("/api/v1/runs/7") for u in sent]
        assert paths == ["/metrics", "/metrics", "/metrics", "/scalars"]


def test_every_metric_key_alert_rules_accept_is_one_the_read_api_knows() -> None:
    """The read API tells a typo from a key not analysed yet by the stored keys: each one the
    server's alert rules accept (SED ones by base name) is among them, with its window."""
    from spectrawatch.spectral.keys import is_stored_key, stored_keys
    from spectrawatch_server.alerts.rules import known_metrics

    rule_keys = known_metrics()
    assert not [k for k in rule_keys if not (is_stored_key(k) or is_stored_key(f"{k}.w32"))]
    assert not [k for k in stored_keys() if not is_stored_key(k)]
