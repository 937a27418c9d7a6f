"""Tokens: hashed at rest, scoped to one project, required when the server requires auth."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import spectrawatch
from spectrawatch._spool import spooled_run_dirs
from spectrawatch.cli import main
from tests.factories import make_run, post_frame, weight_frame
from tests.servers import ServerProcess, create_token, db_rows, wait_until
from tests.training import Loop, client_settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str, str]]:
    data_dir = tmp_path_factory.mktemp("secure")
    token_a = create_token(data_dir, "alpha")
    token_b = create_token(data_dir, "beta")
    proc = ServerProcess(data_dir, args=["--require-auth"]).start()
    yield proc, token_a, token_b
    proc.stop()


def client(proc: ServerProcess, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=f"{proc.url}/api/v1", headers=headers, timeout=30)


def test_tokens_are_stored_hashed(secured: tuple[ServerProcess, str, str]) -> None:
    proc, token_a, _ = secured
    assert token_a.startswith("sw_")
    assert len(token_a) > 30
    stored = [row[0] for row in db_rows(proc.data_dir, "SELECT secret_hash FROM token")]
    assert len(stored) == 2
    assert token_a not in stored
    import hashlib

    assert hashlib.sha256(token_a.encode()).hexdigest() in stored


def test_missing_and_bad_tokens_are_rejected(secured: tuple[ServerProcess, str, str]) -> None:
    proc, _, _ = secured
    with client(proc, None) as anon:
        response = anon.post("/runs", json={"project": "alpha", "name": "r"})
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
    with client(proc, "sw_not-a-real-token") as bad:
        assert bad.get("/runs").status_code == 401
    with httpx.Client(
        base_url=f"{proc.url}/api/v1", headers={"Authorization": "Basic abc"}
    ) as basic:
        assert basic.get("/runs").status_code == 401


def test_health_shows_queue_and_workers_to_a_token_only(
    secured: tuple[ServerProcess, str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``/health`` answered anyone the job counts and the workers (devices, how many): a load
    balancer's liveness check needs neither. Without a valid token it now says only that the
    server and its database are up (200, as ``/ready``); any token's role sees the rest, and
    ``doctor`` sends its token to read them."""
    proc, _, _ = secured
    reader = create_token(proc.data_dir, "alpha", role="read")
    for token in (None, "sw_not-a-real-token"):
        with client(proc, token) as anon:
            health = anon.get("/health")
            assert health.status_code == 200
            assert health.json()["status"] == "ok"
            assert health.json()["auth_required"] is True
            assert "queue" not in health.json()
            assert "worker" not in health.json()
            assert anon.get("/ready").json()["ready"] is True
    with client(proc, reader) as read:
        details = read.get("/health").json()
    assert details["queue"]["jobs"]["pending"] >= 0
    assert details["worker"]["running"] is True
    monkeypatch.setenv("SPECTRAWATCH_SPOOL_DIR", str(tmp_path / "spool"))
    assert main(["doctor", "--url", proc.url, "--token", reader, "--json"]) == 0
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert "jobs {" in checks["database"]["detail"]
    assert checks["worker"]["detail"].startswith("running on cpu")
    main(["doctor", "--url", proc.url, "--json"])
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert "shown to a valid token only" in checks["database"]["detail"]
    assert checks["worker"]["status"] == "info"


def test_token_is_scoped_to_its_project(secured: tuple[ServerProcess, str, str]) -> None:
    proc, token_a, token_b = secured
    with client(proc, token_a) as a, client(proc, token_b) as b:
        run = a.post("/runs", json={"project": "alpha", "name": "scoped"})
        assert run.status_code == 201
        run_id = run.json()["id"]
        assert post_frame(a, run_id, weight_frame(1, 0), seq=0).status_code == 202
        # the other project's token cannot read or write this run, nor create runs in alpha
        assert b.get(f"/runs/{run_id}").status_code == 404
        assert post_frame(b, run_id, weight_frame(2, 1), seq=1).status_code == 404
        assert b.post(f"/runs/{run_id}/scalars", json=[]).status_code == 404
        assert b.post("/runs", json={"project": "alpha", "name": "intruder"}).status_code == 403
        assert b.post("/projects", json={"name": "gamma"}).status_code == 403
        assert [r["id"] for r in b.get("/runs").json()] == []
        assert [r["id"] for r in a.get("/runs").json()] == [run_id]
        assert [p["name"] for p in a.get("/projects").json()] == ["alpha"]


def test_a_read_token_cannot_post_frames_and_a_write_token_streams_a_run(
    secured: tuple[ServerProcess, str, str], tmp_path: Path
) -> None:
    """Roles through the real server: the training client with a ``write`` token streams its
    run (nothing rejected); a ``read`` token reads the run but its frame gets 403
    ``insufficient_role`` every time (the ingest auth cache keeps the role, not a pass)."""
    proc = secured[0]
    writer = create_token(proc.data_dir, "alpha", role="write")
    reader = create_token(proc.data_dir, "alpha", role="read")
    m = spectrawatch.Monitor()
    m.init(**client_settings(tmp_path, proc.url, "roles", project="alpha", token=writer))
    Loop(m).run(20)
    assert m.finish(timeout=60)
    assert isinstance(m.run_id, int)
    assert m.stats.get("rejected_frames") == 0
    assert m.stats.get("sent_frames") > 0
    with client(proc, reader) as r:
        run = r.get(f"/runs/{m.run_id}")
        assert run.status_code == 200
        assert run.json()["status"] == "finished"
        assert sum(run.json()["frames"].values()) == m.stats.get("sent_frames")
        for seq in range(2):  # the second one after the writer's success is cached
            refused = post_frame(r, m.run_id, weight_frame(100 + seq, seq), seq=1000 + seq)
            assert refused.status_code == 403
            error = refused.json()["error"]
            assert error["code"] == "insufficient_role"
            assert "'write'" in error["message"]
            assert "'read'" in error["message"]
        assert sum(r.get(f"/runs/{m.run_id}").json()["frames"].values()) == m.stats.get(
            "sent_frames"
        )
        assert r.delete(f"/runs/{m.run_id}").status_code == 403


def test_api_whoami_names_the_tokens_project_and_role(
    secured: tuple[ServerProcess, str, str],
) -> None:
    proc, token_a, _ = secured
    reader = create_token(proc.data_dir, "alpha", role="read")
    with spectrawatch.Api(proc.url, reader) as sw:
        me = sw.whoami()
    assert (me["project"], me["role"], me["anonymous"]) == ("alpha", "read", False)
    assert reader.startswith(me["token"]["prefix"])
    with spectrawatch.Api(proc.url, token_a) as sw:
        assert sw.whoami()["role"] == "admin"  # create_token's default here
    with (
        spectrawatch.Api(proc.url, "sw_not-a-real-token") as sw,
        pytest.raises(spectrawatch.api.ApiError, match="HTTP 401"),
    ):
        sw.whoami()


def test_doctor_reports_the_tokens_role_and_warns_a_read_token_cannot_stream(
    secured: tuple[ServerProcess, str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proc = secured[0]
    monkeypatch.setenv("SPECTRAWATCH_SPOOL_DIR", str(tmp_path / "spool"))
    reader = create_token(proc.data_dir, "alpha", role="read")
    writer = create_token(proc.data_dir, "alpha", role="write")
    assert main(["doctor", "--url", proc.url, "--token", reader, "--json"]) == 0  # a warning
    auth = {c["name"]: c for c in json.loads(capsys.readouterr().out)}["auth"]
    assert auth["status"] == "warn"
    assert "role read, project 'alpha'" in auth["detail"]
    assert reader[:10] in auth["detail"]
    assert (
        "a read token cannot stream a run: create one with "
        "`spectrawatch token create --project alpha --role write`" in auth["detail"]
    )
    assert main(["doctor", "--url", proc.url, "--token", writer]) == 0
    out = capsys.readouterr().out
    assert "[ok  ] auth          token (" in out
    assert "accepted: role write, project 'alpha'" in out
    assert main(["doctor", "--url", proc.url]) == 1
    assert "the server requires a token (HTTP 401)" in capsys.readouterr().out


def test_a_training_run_with_a_read_token_turns_monitoring_off_once_and_trains_on(
    secured: tuple[ServerProcess, str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A dashboard's ``read`` token in a training script: one warning naming the role and the
    way to a ``write`` token, then nothing more is tried, spooled or captured; the loop runs
    to the end and ``finish`` returns at once."""
    proc = secured[0]
    reader = create_token(proc.data_dir, "alpha", role="read")
    m = spectrawatch.Monitor()
    with caplog.at_level(logging.WARNING, logger="spectrawatch"):
        m.init(**client_settings(tmp_path, proc.url, "read-only", project="alpha", token=reader))
        loop = Loop(m)
        wait_until(lambda: m.stats.off_reason is not None, 30)
        captures = m.stats.get("captures")
        loop.run_for(2.0, pause=0.01)  # four times backoff_max_s: a retry would show
        t0 = time.monotonic()
        assert m.finish(timeout=30)
        assert time.monotonic() - t0 < 5
    assert loop.step > 20
    off = [r.getMessage() for r in caplog.records if "monitoring is off" in r.getMessage()]
    assert len(off) == 1, off
    for said in (
        "insufficient_role",
        "this token's role is 'read'",
        "spectrawatch token create --project alpha --role write",
        "read-only",
    ):
        assert said in off[0]
    assert m.stats.off_reason is not None
    assert "this token's role is 'read'" in m.stats.snapshot()["monitoring_off"]
    assert m.run_id is None
    assert m.stats.get("errors") == 1  # the one refusal: no retry loop
    assert m.stats.get("captures") == captures  # the hooks stopped sketching
    for counter in ("sent_frames", "spooled_frames", "spooled_scalars", "queued_frames"):
        assert m.stats.get(counter) == 0, counter
    assert spooled_run_dirs(tmp_path / "spool") == []
    assert not list((tmp_path / "spool").rglob("*.sw"))
    rows = db_rows(proc.data_dir, "SELECT count(*) FROM run WHERE name = 'read-only'")
    assert rows[0][0] == 0


def test_sync_with_a_read_token_says_so_and_keeps_the_spool_for_a_write_token(
    secured: tuple[ServerProcess, str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proc = secured[0]
    monkeypatch.setenv("SPECTRAWATCH_URL", proc.url)  # a token goes only to this server
    m = spectrawatch.Monitor()
    m.init(**client_settings(tmp_path, proc.url, "synced", project="alpha", mode="offline"))
    Loop(m).run(10)
    assert m.finish()
    spool = tmp_path / "spool"
    entries = len(list(spool.rglob("*.sw")))
    assert entries > 0
    reader = create_token(proc.data_dir, "alpha", role="read")
    assert main(["sync", "--spool-dir", str(spool), "--token", reader]) == 1
    out = capsys.readouterr().out
    assert "0 of" in out
    assert "this token's role is 'read'" in out
    assert "--role write" in out
    assert "server unreachable" not in out
    assert len(list(spool.rglob("*.sw"))) == entries  # nothing dropped as refused
    # no token, another project's token: refused, said so (not "unreachable"), nothing dropped
    for token in ([], ["--token", secured[2]]):
        assert main(["sync", "--spool-dir", str(spool), *token]) == 1
        out = capsys.readouterr().out
        assert "the server refused the run" in out
        assert ("401" if not token else "403") in out
        assert "server unreachable" not in out
    assert len(list(spool.rglob("*.sw"))) == entries
    writer = create_token(proc.data_dir, "alpha", role="write")
    assert main(["sync", "--spool-dir", str(spool), "--token", writer]) == 0
    assert f"{entries} of {entries} entries delivered" in capsys.readouterr().out


def test_an_anonymous_server_refuses_other_sites_pages(
    server: ServerProcess, api: httpx.Client
) -> None:
    """Without auth a web page of another site could write to the local server with a
    "simple" no-cors POST (a frame body is read whatever its content type), and a DNS-
    rebinding page (its own host name resolved to 127.0.0.1) could read and write all of it."""
    run_id = make_run(api, project="local", name="r")
    evil_page = {
        "Origin": "https://evil.example",
        "Content-Type": "text/plain",
        "Sec-Fetch-Site": "cross-site",
    }
    r = api.post(f"/runs/{run_id}/frames", content=weight_frame(1, 0), headers=evil_page)
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "cross_origin"
    assert api.delete(f"/runs/{run_id}", headers={"Origin": "null"}).status_code == 403
    rebound = {"Host": f"evil.example:{server.port}"}
    r = api.get("/runs", headers=rebound)
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "host_not_allowed"
    assert "local" not in r.text
    assert httpx.get(f"{server.url}/runs/{run_id}", headers=rebound).status_code == 403
    assert api.get("/runs").json()[0]["frames"] == {}  # nothing was stored
    # its own pages, local clients and loopback names are served
    own = {"Origin": server.url}
    assert post_frame(api, run_id, weight_frame(1, 0), seq=0, **own).status_code == 202
    assert api.get("/runs", headers={"Host": f"localhost:{server.port}"}).status_code == 200
    assert api.get("/runs", headers={"Host": f"[::1]:{server.port}"}).status_code == 200
    assert api.get("/health").status_code == 200


def test_runs_list_with_auth_lists_the_tokens_project_only(
    secured: tuple[ServerProcess, str, str],
) -> None:
    """The runs page comes without rows or project names; its table (the fragment its script
    asks for with the browser's token) holds the token's project's runs, 401 without one."""
    proc, token_a, token_b = secured
    with client(proc, token_a) as a, client(proc, token_b) as b:
        a.post("/runs", json={"project": "alpha", "name": "listed-alpha"}).raise_for_status()
        b.post("/runs", json={"project": "beta", "name": "listed-beta"}).raise_for_status()
    html = {"Accept": "text/html"}
    with httpx.Client(base_url=proc.url, timeout=30, headers=html) as web:
        page = web.get("/")
        assert page.status_code == 200
        assert 'data-locked="1"' in page.text
        assert "listed-" not in page.text
        assert "beta" not in page.text  # no project names either
        assert "alpha" not in page.text
        assert web.get("/", params={"fragment": "true"}).status_code == 401
        bad = {"Authorization": "Bearer sw_nope"}
        assert web.get("/", params={"fragment": "true"}, headers=bad).status_code == 401
        table = web.get(
            "/", params={"fragment": "true"}, headers={"Authorization": f"Bearer {token_a}"}
        )
        assert "listed-alpha" in table.text
        assert "listed-beta" not in table.text
        other = web.get(
            "/projects/beta",
            params={"fragment": "true"},
            headers={"Authorization": f"Bearer {token_a}"},
        )
        assert other.status_code == 404
        assert "listed-beta" not in other.text
