"""`spectrawatch server` flags that are checked before anything starts."""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx
import pytest

from spectrawatch.cli import main
from tests.servers import free_port


def test_several_api_processes_need_the_postgresql_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPECTRAWATCH_QUEUE", "embedded")
    assert main(["server", "--workers", "2", "--data-dir", str(tmp_path)]) == 2
    assert "--workers > 1 needs the PostgreSQL queue" in capsys.readouterr().err
    assert not (tmp_path / "spectrawatch.db").exists()  # refused before touching the database


def no_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test instead of serving if a refusal did not happen."""
    import uvicorn

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("uvicorn started")

    monkeypatch.setattr(uvicorn, "run", refuse)


@pytest.mark.parametrize(
    ("argv", "env", "label"),
    [
        (["--port", "83766"], {}, "--port"),
        ([], {"SPECTRAWATCH_PORT": "0"}, "SPECTRAWATCH_PORT"),
        ([], {"SPECTRAWATCH_WORKER_POLL_SECONDS": "0"}, "SPECTRAWATCH_WORKER_POLL_SECONDS"),
        ([], {"SPECTRAWATCH_JOB_MAX_ATTEMPTS": "0"}, "SPECTRAWATCH_JOB_MAX_ATTEMPTS"),
        ([], {"SPECTRAWATCH_MAX_BODY_BYTES": "-1"}, "SPECTRAWATCH_MAX_BODY_BYTES"),
        ([], {"SPECTRAWATCH_DEVICE": "gpu"}, "SPECTRAWATCH_DEVICE"),
        (["--device", "cuda:99"], {}, "--device"),
        ([], {"SPECTRAWATCH_PUBLIC_URL": "example.com"}, "SPECTRAWATCH_PUBLIC_URL"),
        ([], {"SPECTRAWATCH_DATABASE_URL": "mysql://u:pw@h/db"}, "SPECTRAWATCH_DATABASE_URL"),
        ([], {"SPECTRAWATCH_BLOB_URL": "/srv/blobs"}, "SPECTRAWATCH_BLOB_URL"),
        (
            [],
            {"SPECTRAWATCH_WEBHOOK_RETRY_SCHEDULE": "soon"},
            "SPECTRAWATCH_WEBHOOK_RETRY_SCHEDULE",
        ),
        (["--workers", "0"], {}, "--workers"),
        ([], {"SPECTRAWATCH_LOG_LEVEL": "verbose"}, "SPECTRAWATCH_LOG_LEVEL: must be one of"),
        (["--log-level", "loud"], {}, "--log-level: must be one of"),
        (
            [],
            {"SPECTRAWATCH_WEBHOOK_ALLOWED_HOSTS": "10.0.0.0/8, http://hooks.internal"},
            "SPECTRAWATCH_WEBHOOK_ALLOWED_HOSTS",
        ),
        ([], {"SPECTRAWATCH_WEBHOOK_ALLOWED_HOSTS": "10.0.0.0/33"}, "SPECTRAWATCH_WEBHOOK_ALLOWED"),
        ([], {"SPECTRAWATCH_WEBHOOK_ALLOWED_HOSTS": "*.internal"}, "SPECTRAWATCH_WEBHOOK_ALLOWED"),
        (
            [],
            {"SPECTRAWATCH_DATABASE_URL": "postgresql+psycopg://u:pw@127.0.0.1:18599/db"},
            "cannot open the database postgresql+psycopg://u:***@127.0.0.1:18599/db",
        ),
    ],
)
def test_invalid_setting_is_one_line_before_serving(
    argv: list[str],
    env: dict[str, str],
    label: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    no_serving(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["server", "--data-dir", str(tmp_path), *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing printed as "serving on ..."
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: {label}")
    assert not (tmp_path / "spectrawatch.db").exists()


def test_data_dir_that_is_a_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    no_serving(monkeypatch)
    (tmp_path / "file").write_text("x")
    assert main(["server", "--data-dir", str(tmp_path / "file")]) == 2
    assert (
        capsys.readouterr().err
        == f"error: --data-dir: {tmp_path / 'file'} exists and is not a directory\n"
    )
    assert main(["token", "create", "--project", "p", "--data-dir", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.startswith("error: --data-dir: ")


def test_worker_settings_are_checked_like_the_server_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPECTRAWATCH_WORKER_POLL_SECONDS", "0")
    assert main(["worker", "--device", "cpu", "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "error: SPECTRAWATCH_WORKER_POLL_SECONDS: Input should be greater than 0\n"
    )


def test_worker_log_level_is_checked_and_an_empty_one_is_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPECTRAWATCH_LOG_LEVEL", "verbose")
    assert main(["worker", "--device", "cpu", "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "error: SPECTRAWATCH_LOG_LEVEL: must be one of critical, error, warning, info, debug, "
        "trace, got 'verbose'\n"
    )
    import uvicorn

    served: dict[str, object] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(kwargs))
    monkeypatch.setenv("SPECTRAWATCH_LOG_LEVEL", "")  # empty: unset
    port = str(free_port())  # the server checks that it can listen before uvicorn.run
    assert main(["server", "--data-dir", str(tmp_path), "--port", port]) == 0
    assert served["log_level"] == "info"


@pytest.mark.parametrize("project", ["", "   ", "a/b?c"])
def test_token_create_applies_the_project_name_rule(
    project: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "create", "--project", project, "--data-dir", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err.startswith("error: --project: ")
    assert not (tmp_path / "d").exists()


def test_token_create_refuses_a_new_dot_project_but_serves_a_stored_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """New projects cannot be named "." or ".."; a project stored so before (readable
    through the API) can still have a token."""
    from spectrawatch_server.db.session import make_engine, make_session_factory
    from spectrawatch_server.storage import repository as repo

    data = str(tmp_path / "d")
    assert main(["token", "create", "--project", ".", "--data-dir", data]) == 2
    assert not (tmp_path / "d").exists()
    assert main(["token", "create", "--project", "p", "--data-dir", data]) == 0
    assert main(["token", "create", "--project", "..", "--data-dir", data]) == 2
    assert "not '.' or '..'" in capsys.readouterr().err
    engine = make_engine(f"sqlite:///{tmp_path / 'd' / 'spectrawatch.db'}")
    with make_session_factory(engine).begin() as session:
        repo.get_or_create_project(session, "..")
    engine.dispose()
    assert main(["token", "create", "--project", "..", "--data-dir", data]) == 0


def test_token_list_and_revoke_never_create_a_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "typo"
    assert main(["token", "list", "--data-dir", str(typo)]) == 2
    assert main(["token", "revoke", "1", "--data-dir", str(typo)]) == 2
    assert capsys.readouterr().err.count("error: no spectrawatch database at ") == 2
    assert not typo.exists()
    # `token create` bootstraps a new data directory; then list finds the token
    assert main(["token", "create", "--project", "p", "--data-dir", str(typo)]) == 0
    capsys.readouterr()
    assert main(["token", "list", "--data-dir", str(typo)]) == 0
    assert "\tp\t" in capsys.readouterr().out


@pytest.mark.parametrize("token_id", ["0", str(2**63), "99999999999999999999999"])
def test_token_revoke_of_an_id_out_of_range_is_one_line(
    token_id: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = str(tmp_path / "d")
    assert main(["token", "create", "--project", "p", "--data-dir", data]) == 0
    capsys.readouterr()
    assert main(["token", "revoke", token_id, "--data-dir", data]) == 1
    assert capsys.readouterr().err == f"error: no active token with id {token_id}\n"


def test_runs_show_says_why_a_frame_failed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``runs show`` counted failed frames without a reason; it now names the first one's."""
    from typing import Any

    from spectrawatch import _cli_runs

    run = {"id": 7, "project": "p", "name": "r", "status": "running", "created_at": "t"}
    run["frames"] = {"done": 3, "failed": 2}  # type: ignore[assignment]
    answers: dict[str, Any] = {
        "/runs/7": run,
        "/runs/7/alerts": [],
        "/runs/7/metrics/catalog": [],
        "/runs/7/frames": [{"id": 12, "kind": "weights", "error": "OSError('gone')"}],
    }
    asked: list[tuple[str, Any]] = []

    def call(args: Any, method: str, path: str, **kwargs: Any) -> Any:
        asked.append((path, kwargs.get("params")))
        return answers[path]

    monkeypatch.setattr(_cli_runs, "call", call)
    monkeypatch.setattr("spectrawatch._export.call", call)
    assert main(["runs", "show", "7"]) == 0
    out = capsys.readouterr().out
    assert "frames: 3 analysed, 0 queued, 2 failed" in out
    assert "first failure: frame 12 (weights): OSError('gone')" in out
    assert ("/runs/7/frames", {"status": "failed", "limit": 1}) in asked


def test_runs_show_escapes_control_characters_and_counts_replayed_frames(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config value holding ESC sequences cleared and recoloured the reader's terminal (any
    writer of the run chooses it); a run delivered by ``sync`` read "0 frames sent, 15
    spooled" as if nothing had arrived."""
    from typing import Any

    from spectrawatch import _cli_runs

    run: dict[str, Any] = {"id": 7, "project": "p", "name": "r", "status": "finished"}
    run |= {"created_at": "t", "config": {"lr": "\x1b[2J\x1b[31mALL CLEAR\x1b[0m\nfake: line"}}
    run["client_stats"] = {"sent_frames": 0, "spooled_frames": 15, "replayed_frames": 15}
    answers: dict[str, Any] = {"/runs/7": run, "/runs/7/alerts": [], "/runs/7/metrics/catalog": []}
    monkeypatch.setattr(_cli_runs, "call", lambda args, method, path, **kw: answers[path])
    monkeypatch.setattr("spectrawatch._export.call", lambda args, method, path, **kw: answers[path])
    assert main(["runs", "show", "7"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "config: lr=\\x1b[2J\\x1b[31mALL CLEAR\\x1b[0m\\nfake: line" in out
    assert "client: 0 frames sent, 15 spooled, 15 delivered from the spool" in out


def test_alerts_ack_says_what_it_acknowledged_before_a_failure(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``alerts ack 2 999 3`` acknowledged 2, stopped at 999 with only "error: HTTP 404" and
    left 3: nothing said that 2 had changed."""
    from typing import Any

    from spectrawatch import _cli_alerts
    from spectrawatch._cli_http import CliError

    def call(args: Any, method: str, path: str, **kwargs: Any) -> Any:
        if path.endswith("/999"):
            raise CliError("HTTP 404: alert 999 not found")
        return {"id": int(path.rsplit("/", 1)[1]), "message": "m"}

    monkeypatch.setattr(_cli_alerts, "call", call)
    assert main(["alerts", "ack", "2", "999", "3"]) == 1
    err = capsys.readouterr().err
    assert "alert 999: HTTP 404: alert 999 not found (acknowledged before it: 2)" in err


def test_alerts_set_and_rules_carry_after_step(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``alerts set --after-step 500`` sends ``params.after_step``; ``alerts rules`` shows it
    where it is set and leaves out the default 0."""
    from typing import Any

    from spectrawatch import _cli_alerts

    sent: list[tuple[str, str, Any]] = []
    rules = [
        {"name": "val_acc_low", "kind": "threshold", "enabled": True,
         "params": {"kind": "threshold", "scalar": "val_acc", "below": 0.6, "after_step": 500}},
        {"name": "nonfinite", "kind": "nonfinite", "enabled": True,
         "params": {"kind": "nonfinite", "after_step": 0}},
    ]  # fmt: skip

    def call(args: Any, method: str, path: str, **kwargs: Any) -> Any:
        sent.append((method, path, kwargs.get("json")))
        if method == "GET":
            return rules
        return {"name": "val_acc_low", "enabled": True, "params": kwargs["json"]["params"]}

    monkeypatch.setattr(_cli_alerts, "call", call)
    argv = ["alerts", "set", "val_acc_low", "--project", "p", "--kind", "threshold"]
    assert main([*argv, "--scalar", "val_acc", "--below", "0.6", "--after-step", "500"]) == 0
    assert sent[0][2] == {
        "params": {"kind": "threshold", "scalar": "val_acc", "below": 0.6, "after_step": 500}
    }
    capsys.readouterr()
    assert main(["alerts", "rules", "--project", "p"]) == 0
    val_acc, nonfinite = capsys.readouterr().out.splitlines()
    assert val_acc.endswith('{"scalar": "val_acc", "below": 0.6, "after_step": 500}')
    assert nonfinite.endswith("{}")


def test_the_command_line_reference_is_the_parsers() -> None:
    """docs/cli.md is rendered from the parser (`make docs`): a new command or option, or a
    changed default or help text, must be regenerated into it; and every argument has a help
    text, so that no row of the reference is blank."""
    from spectrawatch._cli_doc import render
    from spectrawatch.cli import build_parser

    page = (Path(__file__).parents[2] / "docs" / "cli.md").read_text()
    rendered = render(build_parser())
    assert page == rendered, "docs/cli.md is stale: run `make docs`"
    blank = [
        line for line in rendered.splitlines() if line.startswith("| `") and line.endswith("|  |")
    ]
    assert blank == []


def _busy_server(
    monkeypatch: pytest.MonkeyPatch, answers: list[tuple[int, str]], retry_after: str = "5"
) -> tuple[list[str], list[float]]:
    """The CLI's calls go to a server that answers ``answers`` in turn (status, error code),
    then 200; returns the methods it was sent and the CLI's sleeps (patched, not slept)."""
    from spectrawatch import _cli_http

    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        if len(seen) <= len(answers):
            status, code = answers[len(seen) - 1]
            body = {"error": {"code": code, "message": f"{code}; retry later"}}
            return httpx.Response(status, json=body, headers={"Retry-After": retry_after})
        return httpx.Response(200, json={"deleted": True})

    client = httpx.Client(base_url="http://sw.test/api/v1", transport=httpx.MockTransport(handle))
    waits: list[float] = []
    monkeypatch.setattr(_cli_http, "_client", lambda args: client)
    monkeypatch.setattr(_cli_http.time, "sleep", waits.append)
    return seen, waits


@pytest.mark.parametrize(
    ("answers", "attempts", "outcome"),
    [
        ([(503, "database_busy")] * 2, 3, None),  # retried after Retry-After, then done
        ([(503, "database_unavailable")], 2, None),
        ([(503, "database_busy")] * 9, 4, "HTTP 503: database_busy; retry later"),  # gives up
        ([(503, "overloaded")], 1, "HTTP 503: overloaded; retry later"),  # not a rolled-back one
        ([(409, "database_busy")], 1, "HTTP 409: database_busy; retry later"),
    ],
)
def test_cli_calls_retry_a_busy_database_after_retry_after(
    answers: list[tuple[int, str]],
    attempts: int,
    outcome: str | None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A 503 ``database_busy`` / ``database_unavailable`` (its transaction rolled back: e.g. a
    deletion waiting on a lock an analysis holds) is sent again after ``Retry-After`` (capped),
    at most three times; other errors are reported at once."""
    from spectrawatch import _cli_http

    seen, waits = _busy_server(monkeypatch, answers)
    args = argparse.Namespace(url=None, token=None)
    if outcome is None:
        assert _cli_http.call(args, "DELETE", "/projects/p") == {"deleted": True}
    else:
        with pytest.raises(_cli_http.CliError, match=outcome):
            _cli_http.call(args, "DELETE", "/projects/p")
    assert len(seen) == attempts
    assert waits == [5.0] * (attempts - 1)
    assert capsys.readouterr().err.count("server busy") == attempts - 1


@pytest.mark.parametrize(("header", "wait"), [("nan", 1.0), ("-3", 1.0), ("x", 1.0), ("600", 10.0)])
def test_cli_busy_retry_waits_a_sane_time_whatever_retry_after_says(
    header: str, wait: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spectrawatch import _cli_http

    _, waits = _busy_server(monkeypatch, [(503, "database_busy")], retry_after=header)
    _cli_http.call(argparse.Namespace(url=None, token=None), "GET", "/runs")
    assert waits == [wait]


@pytest.mark.parametrize("alerts", [0, 3000])  # in stdout's buffer at exit; written at once
def test_every_command_ends_quietly_when_its_reader_is_gone(alerts: int) -> None:
    """``spectrawatch alerts list --json | head -c 100`` (any command): a closed pipe is exit
    1 without a traceback, as for ``analyze`` (docs/integrations.md)."""
    import json
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    alert = {"status": "open", "severity": "warning", "run_id": 2, "step": 9, "message": "m"}
    body = json.dumps([{"id": i, **alert} for i in range(alerts)]).encode()

    class Alerts(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Alerts)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    cmd = [sys.executable, "-m", "spectrawatch", "alerts", "list", "--run", "2", "--json"]
    try:
        proc = subprocess.Popen(
            [*cmd, "--url", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdout.close()  # before the command has printed anything
        with proc.stderr:
            err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 1, err
    finally:
        server.shutdown()
        server.server_close()
    assert "Traceback" not in err
    assert "BrokenPipeError" not in err
