"""The client against a real ``spectrawatch server`` process: exactly-once delivery, spool replay
across a kill -9 and restart, and training that completes when no server ever starts."""

from __future__ import annotations

import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

import spectrawatch
from spectrawatch_server.storage import repository as repo
from tests.servers import ServerProcess, database_url, embedded_only, free_port, wait_until
from tests.training import Loop, all_analysed, frames_of
from tests.training import client_settings as _client_settings

pytestmark = pytest.mark.integration


def client_settings(tmp_path: Path, url: str, run: str, **kw: Any) -> dict[str, Any]:
    return _client_settings(tmp_path, url, run, project="stream", **kw)


def test_every_frame_arrives_exactly_once(server: ServerProcess, tmp_path: Path) -> None:
    m = spectrawatch.Monitor()
    m.init(**client_settings(tmp_path, server.url, "once"))
    loop = Loop(m)
    loop.run(30)
    assert m.finish(timeout=60)
    assert isinstance(m.run_id, int)
    n = m._sender._seq_next if m._sender else 0
    frames = frames_of(server.url, m.run_id)
    assert sorted(f["seq"] for f in frames) == list(range(n))  # none lost, none duplicated
    kinds = {f["kind"] for f in frames}
    assert kinds == {"update_sketch", "param_sketch", "weights", "activations"}
    assert m.stats.get("errors") == 0
    wait_until(lambda: all_analysed(server.url, m.run_id), timeout=120)
    with httpx.Client(base_url=f"{server.url}/api/v1", timeout=30) as c:
        run = c.get(f"/runs/{m.run_id}").json()
    assert run["status"] == "finished"
    assert run["client_stats"]["dropped_frames"] == 0
    # SED phases come from complete windows only (a window of a few rows has a huge gap that
    # made every later point a "collapse"), and a clean run raises no gap-collapse alert
    with spectrawatch.Api(server.url) as api:
        stored = api.run(m.run_id)
        for w in (16, 32):
            phase = stored.metric(f"sed.phase.w{w}")
            incomplete = stored.metric(f"sed.incomplete.w{w}")
            assert phase.keys() == incomplete.keys()
            for layer, series in phase.items():
                flags = dict(zip(incomplete[layer].steps, incomplete[layer].values, strict=True))
                partial = [v for s, v in zip(series.steps, series.values, strict=True) if flags[s]]
                assert partial
                assert set(partial) == {0.0}, (w, layer)
        assert not [a for a in stored.alerts() if a["rule"] == "gap_collapse"]
        # the probe's predictions (32 inputs, 8 classes) at activations 10, 20, 30: churn from
        # the second probe on, agreement needs four
        probe = stored.scalars()
        assert probe["probe.prediction_churn"].steps == [20, 30]
        assert all(0.0 <= v <= 1.0 for v in probe["probe.prediction_churn"].values)
        assert probe["probe.prediction_positions"].values == [32.0, 32.0]
        assert "probe.prediction_agreement" not in probe
        assert probe["probe.prediction_confidence"].steps == [10, 20, 30]
        assert all(1 / 8 <= v <= 1.0 for v in probe["probe.prediction_confidence"].values)
        # one whole-model point per step: the update- and theta-sketch frames ending at the
        # last step both evaluated the grokking detector, and both points were kept
        for name in ("grok.imminent", "grok.warning_score"):
            steps = stored.metric(name, layer="__model__")["__model__"].steps
            assert steps == sorted(set(steps)), name


def test_kill_and_restart_replays_the_spool(tmp_path: Path) -> None:
    port = free_port()
    srv = ServerProcess(tmp_path / "server", port=port).start()
    try:
        m = spectrawatch.Monitor()
        m.init(**client_settings(tmp_path, srv.url, "restart"))
        loop = Loop(m)
        loop.run(12)
        assert m.wait_idle(30)
        before = list(loop.times)
        srv.kill()  # kill -9: no shutdown code runs
        loop.run(20, pause=0.01)
        outage = loop.times[len(before) :]
        assert m.wait_idle(30)
        assert m.stats.get("spooled_frames") > 0
        srv = ServerProcess(tmp_path / "server", port=port).start()
        loop.run(8)
        assert m.finish(timeout=90)
        assert isinstance(m.run_id, int)
        n = m._sender._seq_next if m._sender else 0
        frames = frames_of(srv.url, m.run_id)
        assert sorted(f["seq"] for f in frames) == list(range(n))
        assert m.stats.get("replayed_frames") == m.stats.get("spooled_frames")
        # the loop never stalled while the server was gone
        inflation = max(outage) / statistics.median(before)
        print(
            f"median step {statistics.median(before) * 1e3:.1f} ms, max before "
            f"{max(before) * 1e3:.1f} ms, max during outage {max(outage) * 1e3:.1f} ms "
            f"(x{inflation:.1f} the median; capture steps included)"
        )
        assert max(outage) < max(0.5, 20 * statistics.median(before))
    finally:
        srv.kill()


def test_a_server_on_a_fresh_database_gets_the_run_again_not_another_runs_frames(
    tmp_path: Path,
) -> None:
    # The server comes back on an empty data directory at the same URL, where another
    # project's run took id 1, the id the client holds: the client's writes must not land in
    # that run (they did, counted as sent), nor be thrown away as rejected; the client creates
    # its run again and delivers everything from the outage on into it.
    port = free_port()
    srv = ServerProcess(tmp_path / "server", port=port).start()
    try:
        m = spectrawatch.Monitor()
        m.init(**client_settings(tmp_path, srv.url, "replaced"))
        loop = Loop(m)
        loop.run(10)
        assert m.wait_idle(30)
        old_id, sent_before = m.run_id, (m._sender._seq_next if m._sender else 0)
        srv.kill()
        srv = ServerProcess(tmp_path / "fresh", port=port).start()
        with httpx.Client(base_url=f"{srv.url}/api/v1", timeout=30) as c:
            theirs = c.post("/runs", json={"project": "someone-else", "name": "theirs"}).json()
            assert theirs["id"] == old_id
            loop.run(14)
            assert m.finish(timeout=90)
            assert frames_of(srv.url, theirs["id"]) == []
            assert c.get(f"/runs/{theirs['id']}/scalars").json() == []
            assert c.get(f"/runs/{theirs['id']}").json()["status"] == "running"
            ours = c.get(f"/runs/{m.run_id}").json()
        assert m.run_id != old_id
        assert (ours["project"], ours["name"], ours["status"]) == ("stream", "replaced", "finished")
        n = m._sender._seq_next if m._sender else 0
        assert sorted(f["seq"] for f in frames_of(srv.url, m.run_id)) == list(range(sent_before, n))
        assert m.stats.get("rejected_frames") == 0
        assert m.stats.get("run_lost") >= 1
        assert ours["client_stats"]["run_lost"] >= 1
    finally:
        srv.kill()


def test_a_run_deleted_mid_training_is_not_recreated(server: ServerProcess, tmp_path: Path) -> None:
    m = spectrawatch.Monitor()
    m.init(**client_settings(tmp_path, server.url, "deleted-live"))
    loop = Loop(m)
    loop.run(10)
    assert m.wait_idle(30)
    run_id = m.run_id
    with httpx.Client(base_url=f"{server.url}/api/v1", timeout=30) as c:
        assert c.delete(f"/runs/{run_id}").status_code == 200
        loop.run(14)
        t0 = time.perf_counter()
        assert m.finish(timeout=60)
        assert time.perf_counter() - t0 < 10
        assert c.get("/runs", params={"project": "stream"}).json() == []  # not resurrected
        assert c.get(f"/runs/{run_id}").json()["error"]["code"] == "run_deleted"
    assert m.run_id == run_id
    assert m.stats.get("rejected_frames") > 0
    assert m.stats.get("run_lost") == 0
    assert not list((tmp_path / "spool").rglob("*.*"))  # refused, nothing left for `sync`


def test_server_never_started_training_completes(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    m = spectrawatch.Monitor()
    m.init(**client_settings(tmp_path, url, "never", flush_timeout_s=2.0))
    loop = Loop(m)
    t0 = time.perf_counter()
    loop.run(25)
    m.finish()
    assert time.perf_counter() - t0 < 60
    assert loop.step == 25
    assert m.stats.get("spooled_frames") > 0
    assert list((tmp_path / "spool" / "stream" / "never").glob("*.sw"))


def test_a_resumed_run_continues_after_its_last_step(server: ServerProcess, tmp_path: Path) -> None:
    """A second session of the same run name (training resumed) numbers its steps after the
    run's last step on the server, without ``start_step``: no step gets two points."""
    for _ in range(2):
        m = spectrawatch.Monitor()
        m.init(**client_settings(tmp_path, server.url, "resume-me"))
        loop = Loop(m)  # attach() without start_step
        for _ in range(10):
            loss = loop.model(loop.x).pow(2).mean()
            loop.opt.zero_grad()
            loss.backward()
            loop.opt.step()
            m.log({"loss": loss})  # at the attached model's step
        assert m.finish(timeout=60)
    assert isinstance(m.run_id, int)
    with httpx.Client(base_url=f"{server.url}/api/v1", timeout=30) as c:
        (loss,) = c.get(f"/runs/{m.run_id}/scalars", params={"name": "loss"}).json()
        assert loss["steps"] == list(range(1, 21))
        assert c.get(f"/runs/{m.run_id}").json()["last_step"] == 20
    steps = sorted(f["step"] for f in frames_of(server.url, m.run_id) if f["kind"] == "weights")
    assert steps == sorted(set(steps))  # one snapshot per step: the second session's are > 10
    assert steps[-1] == 20


def _one_session(tmp_path: Path, url: str, run: str, steps: int = 5, **kw: Any) -> str | None:
    """A short session of run ``run`` (attach, ``steps`` steps, log): the run's name it got."""
    m = spectrawatch.Monitor()
    m.init(**client_settings(tmp_path, url, run, **kw))
    loop = Loop(m)
    for _ in range(steps):
        loss = loop.model(loop.x).pow(2).mean()
        loop.opt.zero_grad()
        loss.backward()
        loop.opt.step()
        m.log({"loss": loss})
    assert m.finish(timeout=60)
    assert m.stats.get("errors") == 0
    return m.run_name


def _runs_by_name(url: str, project: str = "stream") -> dict[str, dict[str, Any]]:
    with httpx.Client(base_url=f"{url}/api/v1", timeout=30) as c:
        return {r["name"]: r for r in c.get("/runs", params={"project": project}).json()}


def test_resume_never_makes_a_numbered_new_run_instead_of_joining(
    server: ServerProcess,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A script run again under its run name with ``resume="never"`` (or
    ``SPECTRAWATCH_RESUME=never``) gets ``NAME-2``, then ``NAME-3``, each a run of its own with
    its own config and steps; the first session of a name keeps it, and says nothing."""
    with caplog.at_level(logging.WARNING, logger="spectrawatch"):
        assert _one_session(tmp_path, server.url, "again", config={"lr": 1}) == "again"
        assert not caplog.records
        assert _one_session(tmp_path, server.url, "again", config={"lr": 2}, resume="never") == (
            "again-2"
        )
        monkeypatch.setenv("SPECTRAWATCH_RESUME", "never")
        assert _one_session(tmp_path, server.url, "again", config={"lr": 3}) == "again-3"
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'again' already exists" in m and "'again-3'" in m for m in said)
    runs = _runs_by_name(server.url)
    assert {n: (r["config"], r["last_step"]) for n, r in runs.items()} == {
        "again": ({"lr": 1}, 5),
        "again-2": ({"lr": 2}, 5),
        "again-3": ({"lr": 3}, 5),
    }


def test_joining_an_existing_run_warns_with_its_step_status_and_config_changes(
    server: ServerProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same script run again under its run name (the default ``resume="allow"``) joins the
    run as before, but says so: a warning naming the run, the status and last step it had,
    how to get a new run instead, and the config keys this session changed (the stored config
    is kept)."""
    assert _one_session(tmp_path, server.url, "rerun", config={"lr": 0.001, "wd": 1}) == "rerun"
    with caplog.at_level(logging.WARNING, logger="spectrawatch"):
        _one_session(tmp_path, server.url, "rerun", config={"lr": 0.1, "wd": 1, "seed": 3})
    (said,) = [r.getMessage() for r in caplog.records if "exists" in r.getMessage()]
    assert said.startswith("spectrawatch: run 'rerun' of project 'stream' exists")
    assert "status finished, last step 5" in said
    assert "resume='never'" in said
    assert "lr (stored 0.001, now 0.1), seed (stored absent, now 3)" in said
    assert "wd (" not in said
    run = _runs_by_name(server.url)["rerun"]
    assert (run["config"], run["last_step"]) == ({"lr": 0.001, "wd": 1}, 10)


def test_a_run_says_once_where_to_see_it_unless_quiet(
    server: ServerProcess, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Reaching its run, the client prints the run's dashboard page once on stderr (W&B's
    "View run at"); ``quiet=True`` leaves it out, and the page is there."""
    _one_session(tmp_path, server.url, "where")
    run_id = _runs_by_name(server.url)["where"]["id"]
    line = f"spectrawatch: view run 'where' at {server.url}/runs/{run_id}\n"
    assert capfd.readouterr().err.count(line) == 1
    _one_session(tmp_path, server.url, "where", quiet=True)
    assert "view run" not in capfd.readouterr().err
    page = httpx.get(f"{server.url}/runs/{run_id}", timeout=30)
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]


def test_resume_must_without_the_run_goes_on_as_a_new_run_with_an_error(
    server: ServerProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``resume="must"`` naming no run: logged as an error, training goes on as a new run of
    that name (the client never raises into training); naming an existing one joins it."""
    with caplog.at_level(logging.WARNING, logger="spectrawatch"):
        assert _one_session(tmp_path, server.url, "missing", resume="must") == "missing"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "resume='must'" in errors[0]
    assert "'missing'" in errors[0]
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="spectrawatch"):
        assert _one_session(tmp_path, server.url, "missing", resume="must") == "missing"
    assert not caplog.records
    assert _runs_by_name(server.url)["missing"]["last_step"] == 10


def test_a_config_holding_infinity_or_nan_creates_its_run(
    server: ServerProcess, tmp_path: Path
) -> None:
    """``config={"max_steps": inf}``: httpx refused to encode the run's creation, and the run
    was never created (every frame stayed spooled). Non-finite numbers travel as the strings
    the server stores for them."""
    m = spectrawatch.Monitor()
    config = {"max_steps": math.inf, "sched": [1.0, math.nan], "floor": -math.inf, "lr": 0.1}
    m.init(**client_settings(tmp_path, server.url, "inf-config"), config=config)
    loop = Loop(m)
    for _ in range(3):
        loss = loop.model(loop.x).pow(2).mean()
        loop.opt.zero_grad()
        loss.backward()
        loop.opt.step()
        m.log({"loss": loss})
    assert m.finish(timeout=60)
    assert isinstance(m.run_id, int)
    with httpx.Client(base_url=f"{server.url}/api/v1", timeout=30) as c:
        run = c.get(f"/runs/{m.run_id}").json()
    want = {"max_steps": "Infinity", "sched": [1.0, "NaN"], "floor": "-Infinity", "lr": 0.1}
    assert run["config"] == want
    assert run["last_step"] == 3


def test_a_run_stored_under_dot_names_is_resumed_and_a_new_one_refused_quietly(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A project and run stored as ".." (before new ones were refused) resume from
    ``monitor.init`` as the server allows; a new run named "." is refused by the server (422),
    recorded in the client's errors, and training goes on."""
    engine = create_engine(database_url(server.data_dir))
    try:
        with Session(engine) as session, session.begin():
            project, _ = repo.get_or_create_project(session, "..")
            stored, _ = repo.get_or_create_run(session, project, "..", {}, [])
            stored_id = stored.id
    finally:
        engine.dispose()
    m = spectrawatch.Monitor()
    m.init(**_client_settings(tmp_path, server.url, "..", project=".."))
    for step in range(5):
        m.log({"loss": 1.0 / (step + 1)}, step=step)
    assert m.finish(timeout=60)
    assert m.run_id == stored_id
    assert m.stats.get("errors") == 0
    with httpx.Client(base_url=f"{server.url}/api/v1", timeout=30) as c:
        (loss,) = c.get(f"/runs/{stored_id}/scalars", params={"name": "loss"}).json()
        assert loss["steps"] == list(range(5))
        assert c.get(f"/runs/{stored_id}").json()["status"] == "finished"

    fresh = spectrawatch.Monitor()
    fresh.init(**_client_settings(tmp_path / "new", server.url, ".", project="new-dots"))
    started = time.monotonic()
    for step in range(5):
        fresh.log({"loss": 1.0}, step=step)
    fresh.finish(timeout=5)
    assert time.monotonic() - started < 30
    assert fresh.run_id is None
    assert fresh.stats.get("errors") >= 1


def test_sync_delivers_what_runs_left_in_the_spool(tmp_path: Path) -> None:
    """Two runs finish while no server is up; later ``spectrawatch sync`` delivers everything."""
    from spectrawatch._spool import Spool
    from spectrawatch.cli import main

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    names = ["later", "an odd name ü"]  # the second is not a safe directory name
    spooled: dict[str, list[int]] = {}
    for name in names:
        m = spectrawatch.Monitor()
        m.init(**client_settings(tmp_path, url, name, flush_timeout_s=2.0))
        Loop(m).run(15)
        assert m.finish()  # everything delivered or spooled
        run_dir = next(
            d
            for d in (tmp_path / "spool" / "stream").iterdir()
            if (Spool(d, 0).read_meta() or {}).get("run") == name
        )
        entries = [e.read()[0] for e in Spool(run_dir, 1 << 40).entries()]
        spooled[name] = sorted(e["seq"] for e in entries if e["type"] == "frame")
        assert spooled[name]
        assert any(e["type"] == "scalars" for e in entries)
    srv = ServerProcess(tmp_path / "server", port=port).start()
    try:
        spool_dir = str(tmp_path / "spool")
        assert main(["sync", "--spool-dir", spool_dir, "--dry-run"]) == 0
        assert main(["sync", "--spool-dir", spool_dir]) == 0  # url: the one each run used
        with httpx.Client(base_url=f"{url}/api/v1", timeout=30) as c:
            runs = {r["name"]: r for r in c.get("/runs", params={"project": "stream"}).json()}
            for name in names:
                run = runs[name]
                assert run["status"] == "finished"
                seqs = sorted(f["seq"] for f in frames_of(url, run["id"]))
                assert seqs == spooled[name]  # every spooled frame once, none twice
                (loss,) = c.get(f"/runs/{run['id']}/scalars", params={"name": "loss"}).json()
                assert loss["steps"] == list(range(1, 16))
        assert not list((tmp_path / "spool" / "stream").iterdir())  # spools removed
        assert main(["sync", "--spool-dir", spool_dir]) == 0  # nothing left: a no-op
    finally:
        srv.kill()


def test_a_final_status_the_server_missed_is_set_by_sync(
    server: ServerProcess, tmp_path: Path
) -> None:
    """Every frame reaches a real server but the final status does not (the server fails that
    one request): ``run.json`` alone stays in the spool and ``spectrawatch sync`` sets it."""
    from spectrawatch._spool import RUN_META
    from spectrawatch.cli import main

    real = httpx.Client(timeout=30)

    def forward(request: httpx.Request) -> httpx.Response:
        if request.method == "PATCH" and request.url.path.startswith("/api/v1/runs/"):
            return httpx.Response(503, json={"detail": "down for maintenance"})
        reply = real.request(
            request.method, request.url, headers=request.headers, content=request.read()
        )
        return httpx.Response(reply.status_code, headers=reply.headers, content=reply.content)

    try:
        m = spectrawatch.Monitor(transport=httpx.MockTransport(forward))
        m.init(**client_settings(tmp_path, server.url, "status-only", flush_timeout_s=3.0))
        Loop(m).run(10)
        m.finish(timeout=30)
    finally:
        real.close()
    run_id = m.run_id
    assert isinstance(run_id, int)
    (run_dir,) = (tmp_path / "spool" / "stream").iterdir()
    assert not list(run_dir.glob("*.sw"))  # every entry was delivered
    assert (run_dir / RUN_META).is_file()
    with httpx.Client(base_url=f"{server.url}/api/v1", timeout=30) as c:
        assert c.get(f"/runs/{run_id}").json()["status"] == "running"
        assert main(["sync", "--spool-dir", str(tmp_path / "spool")]) == 0
        assert c.get(f"/runs/{run_id}").json()["status"] == "finished"
    assert not list((tmp_path / "spool" / "stream").iterdir())  # run.json removed


def test_offline_mode_sends_nothing_until_sync(server: ServerProcess, tmp_path: Path) -> None:
    """``mode="offline"`` (e.g. compute nodes without network): spool only, then ``sync``."""
    from spectrawatch._spool import Spool
    from spectrawatch.cli import main

    m = spectrawatch.Monitor()
    m.init(**client_settings(tmp_path, server.url, "offline-run", mode="offline"))
    Loop(m).run(15)
    m.log({"loss": float("nan")}, step=16)  # the report's first NaN: the overview marks it
    assert m.finish()
    assert m.run_id is None
    kept = m.stats.snapshot()
    with httpx.Client(base_url=f"{server.url}/api/v1", timeout=30) as c:

        def run_named() -> dict[str, Any] | None:
            resp = c.get("/runs", params={"project": "stream", "limit": 1000})
            runs = resp.json() if resp.status_code == 200 else []
            return next((r for r in runs if r["name"] == "offline-run"), None)

        assert run_named() is None  # nothing went to the network
        spool = Spool(tmp_path / "spool" / "stream" / "offline-run", 1 << 40)
        seqs = sorted(e.read()[0]["seq"] for e in spool.entries() if e.tag != "sc")
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # consecutive, none dropped
        assert (spool.read_meta() or {}).get("status") == "finished"
        assert main(["sync", "--spool-dir", str(tmp_path / "spool")]) == 0
        run = run_named()
        assert run is not None
        assert run["status"] == "finished"
        assert sorted(f["seq"] for f in frames_of(server.url, run["id"])) == seqs
        # the process's report reaches the run (it was only in run.json's summary), with what
        # the sync delivered
        stats = c.get(f"/runs/{run['id']}").json()["client_stats"]
        assert stats["nonfinite_scalars"] == {"loss": {"step": 16, "value": "nan"}}
        # the NaN itself went through the spool (stored as null)
        (loss,) = c.get(f"/runs/{run['id']}/scalars", params={"name": "loss"}).json()
        assert (loss["steps"][-1], loss["values"][-1]) == (16, None)
        assert stats["spooled_frames"] == kept["spooled_frames"] == len(seqs)
        assert stats["replayed_frames"] == len(seqs)
        assert stats["spooled_pending"] == 0


def test_model_summaries_cover_every_part_of_a_weight_snapshot(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A snapshot larger than ``max_frame_bytes`` arrives in parts; the whole-model HT-SR means
    and the global GMCN were written once per part (a GPT-2-sized run had 14 ``__model__``
    points at one step, ``htsr.num_layers`` 0, 5, 4, ...): now one per step, over all parts."""
    m = spectrawatch.Monitor()
    m.init(**client_settings(tmp_path, server.url, "parts", max_frame_bytes=4096))
    Loop(m).run(20)
    assert m.finish(timeout=60)
    assert isinstance(m.run_id, int)
    frames = frames_of(server.url, m.run_id)
    weights = [f for f in frames if f["kind"] == "weights"]
    steps = sorted({f["step"] for f in weights})
    assert len(weights) >= 2 * len(steps)  # every snapshot came in parts
    wait_until(lambda: all_analysed(server.url, m.run_id), 120)
    with spectrawatch.Api(server.url) as api:
        run = api.run(m.run_id)
        layers = run.metric("htsr.num_layers", layer="__model__")["__model__"]
        assert layers.steps == steps  # one point per snapshot
        assert set(layers.values) == {2.0}  # both matrices of the model, from their two parts
        alpha = run.metric("htsr.alpha")
        mean = [
            sum(alpha[n].values[i] for n in ("0.weight", "2.weight")) / 2 for i in range(len(steps))
        ]
        assert alpha["__model__"].values == pytest.approx(mean, rel=1e-12)
        assert run.metric("conditioning.gmcn", layer="__model__")["__model__"].steps == steps
        # the client names the output layer (the last matrix, 2.weight) in the part holding it
        head = run.metric("grok.output_effective_rank", layer="__model__")["__model__"]
        assert head.steps == steps
        assert head.values == run.metric("grok.effective_rank")["2.weight"].values


@embedded_only("in the PostgreSQL topology the worker processes analyse (and log) frames")
def test_server_logs_each_analysed_frame_at_info(tmp_path: Path) -> None:
    """uvicorn configures only its own loggers: the server's INFO lines were never printed."""
    server = ServerProcess(tmp_path / "server", env={"SPECTRAWATCH_LOG_LEVEL": "info"}).start()
    try:
        m = spectrawatch.Monitor()
        m.init(**client_settings(tmp_path, server.url, "logged"))
        Loop(m).run(8)
        assert m.finish(timeout=60)
        wait_until(lambda: "(update_sketch, step 1) analysed in" in server.log_path.read_text(), 60)
    finally:
        server.stop()
    assert "alembic" not in server.log_path.read_text()


def test_grokking_alert_quotes_its_evidence_end_to_end(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A real loop whose weights shrink (pulled to 0) and then grow (pulled to a target), and a
    commutator-defect series that leaves its baseline: the server's detector fires and the
    ``grokking_imminent`` alert, read back through the API, names both pieces of evidence."""
    import torch
    from torch import nn

    m = spectrawatch.Monitor()
    m.init(**client_settings(tmp_path, server.url, "grok-evidence"))
    torch.manual_seed(0)
    model = nn.Linear(16, 16, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    assert m.attach(model, opt) is not None
    target = 3.0 * model.weight.detach().clone()

    def train(steps: range) -> None:
        for step in steps:
            pull = torch.zeros_like(target) if step < 60 else target  # the norm turns at ~60
            loss = 0.5 * (model.weight - pull).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (step + 1) % 10 == 0:  # baseline 10 evaluations of ~10, then 50 from step 110
                defect = 50.0 if step + 1 > 100 else 10.0 + 0.5 * ((step + 1) // 10 % 2)
                m.log({"grok.commutator_defect": defect}, step=step + 1)

    def analysed() -> bool:
        return all_analysed(server.url, m.run_id or 0)

    train(range(160))
    assert m.wait_idle(30)
    wait_until(analysed, timeout=120)
    train(range(160, 180))  # frames analysed once every scalar and weights frame is stored
    assert m.finish(timeout=60)
    assert isinstance(m.run_id, int)
    wait_until(analysed, timeout=120)
    with spectrawatch.Api(server.url) as api:
        alerts = [a for a in api.run(m.run_id).alerts() if a["rule"] == "grokking_imminent"]
    assert len(alerts) == 1
    evidence = alerts[0]["values"]["evidence"]
    assert evidence["defect"] == 120  # two evaluations in a row above mean + 4 sd
    assert 60 < evidence["norm_turn"] <= 80  # the first weights frame after the turn
    assert alerts[0]["step"] >= 120
    assert "commutator defect above its baseline at step 120" in alerts[0]["message"]
    assert "weight-norm turnaround at step" in alerts[0]["message"]


def test_a_raised_cadence_keeps_one_step_rows_and_complete_sed_windows(
    server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``overhead_budget`` raises the update cadence from 1 to 5 at step 40 (the decision is
    fixed here; the controller's own choice is tested in ``tests/unit/test_cadence.py``): the
    real server keeps computing complete SED windows through the change, from the last W rows,
    and the run's client stats show the cadence."""
    from spectrawatch._cadence import AdaptiveCadence

    def update(self: AdaptiveCadence) -> int | None:
        self._sketches_seen += 1000  # any call: counts as "the samples are in"
        if loop.step + 1 >= 40 and self.every == 1:
            self.every = 5
            return 5
        return None

    monkeypatch.setattr(AdaptiveCadence, "update", update)
    m = spectrawatch.Monitor()
    m.init(
        **client_settings(
            tmp_path,
            server.url,
            "budget",
            overhead_budget=0.01,
            weights_every=0,
            activations_every=0,
            theta_every=0,
        )
    )
    loop = Loop(m)
    loop.run(200)
    assert m.finish(timeout=60)
    assert isinstance(m.run_id, int)
    wait_until(lambda: all_analysed(server.url, m.run_id or 0), timeout=120)
    with spectrawatch.Api(server.url) as api:
        stored = api.run(m.run_id)
        gap = stored.metric("sed.gap_ratio.w16", layer="__model__")["__model__"]
        flags = stored.metric("sed.incomplete.w16", layer="__model__")["__model__"]
        assert stats_of(server.url, m.run_id)["update_every"] == 5
    # from the 4th row on, then one point per 5 steps; only the run's first windows (fewer
    # than 16 rows yet) are incomplete: through the change each holds the last 16 rows
    assert gap.steps == [*range(4, 40), *range(40, 201, 5)]
    assert [s for s, v in zip(flags.steps, flags.values, strict=True) if v] == list(range(4, 16))
    assert all(v > 0 for v in gap.values)


def stats_of(url: str, run_id: int) -> dict[str, Any]:
    with httpx.Client(base_url=f"{url}/api/v1", timeout=30) as c:
        stats: dict[str, Any] = c.get(f"/runs/{run_id}").json()["client_stats"]
    return stats


def test_update_norms_estimate_the_real_updates(server: ServerProcess, tmp_path: Path) -> None:
    """``norm.update`` per layer and for the model, from the sketch rows a real training loop
    streams (d = 640, layers of 8 to 1,024 parameters), against ``||delta theta||`` measured in
    the loop; ``norm.update_ratio`` against ``||delta theta|| / ||theta||`` at the same step."""
    m = spectrawatch.Monitor()
    m.init(**client_settings(tmp_path, server.url, "update-norms", weights_every=0))
    loop = Loop(m)
    names = [n for n, _ in loop.model.named_parameters()]
    exact: dict[int, dict[str, float]] = {}
    sizes: dict[int, dict[str, float]] = {}
    for step in range(1, 41):
        before = [p.detach().clone() for p in loop.model.parameters()]
        loop.run(1)
        after = [p.detach() for p in loop.model.parameters()]
        deltas = [a - b for a, b in zip(after, before, strict=True)]
        exact[step] = {n: float(d.norm()) for n, d in zip(names, deltas, strict=True)}
        exact[step]["__model__"] = float(torch.cat([d.flatten() for d in deltas]).norm())
        sizes[step] = {n: float(a.norm()) for n, a in zip(names, after, strict=True)}
    assert m.finish(timeout=60)
    assert isinstance(m.run_id, int)
    wait_until(lambda: all_analysed(server.url, m.run_id or 0), timeout=120)
    with spectrawatch.Api(server.url) as api:
        stored = api.run(m.run_id)
        updates = stored.metric("norm.update")
        ratios = stored.metric("norm.update_ratio")
        params = stored.metric("norm.param")
    assert set(updates) == {*names, "__model__"}
    theta = params["0.weight"]
    assert theta.steps == [1, 10, 20, 30, 40]  # the first step's too (off the grid)
    for step, value in zip(theta.steps, theta.values, strict=True):
        assert value == pytest.approx(sizes[step]["0.weight"], rel=0.1)
    errors = []
    for layer, series in updates.items():
        assert len(series.steps) >= 36, layer  # every step but the first
        for step, value in zip(series.steps, series.values, strict=True):
            errors.append(value / exact[step][layer] - 1.0)
    assert statistics.fmean(errors) == pytest.approx(0.0, abs=0.02)
    assert max(abs(e) for e in errors) < 0.1  # 3.6 % at most when written
    # the ratio divides by ||theta|| of the theta frame sent last before the update frame
    # (steps 1, 10, 20, 30, 40; frames of 4 steps): the rows of steps 1-8 by step 1's, the
    # others at most 3 steps older or newer than the row
    weight = ratios["0.weight"]
    assert weight.steps == updates["0.weight"].steps
    assert weight.steps[0] <= 2
    off = [
        value / (exact[step]["0.weight"] / sizes[step]["0.weight"]) - 1.0
        for step, value in zip(weight.steps, weight.values, strict=True)
    ]
    assert max(abs(e) for e in off) < 0.25  # 16.4 %: ||theta|| moves ~10 % in 10 steps here


def train_and_finish(
    m: spectrawatch.Monitor, model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor
) -> None:
    """20 optimizer steps on ``x`` with the loss logged, then ``finish()`` (delivered)."""
    for step in range(1, 21):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.log({"loss": loss}, step=step)
    assert m.finish(timeout=60)


def test_float16_weights_beyond_its_range_arrive_finite(
    server: ServerProcess, tmp_path: Path
) -> None:
    """``weights_dtype="float16"`` sent a weight of entries beyond +-65504 as Inf: a
    ``nonfinite`` alert on a finite weight and no norms. It goes in float32 now; a weight that
    is NaN itself still raises the alert."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    spare = torch.nn.Linear(8, 8)  # not in the forward: never trained
    model = torch.nn.ModuleDict({"net": net, "spare": spare})
    with torch.no_grad():
        net[0].weight.mul_(1e6)
        spare.weight[0, 0] = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    m = spectrawatch.Monitor()
    m.init(**client_settings(tmp_path, server.url, "fp16-range", weights_dtype="float16"))
    assert m.attach(model, opt) is not None
    train_and_finish(m, net, opt, torch.randn(32, 16))
    assert isinstance(m.run_id, int)
    wait_until(lambda: all_analysed(server.url, m.run_id or 0), timeout=120)
    with spectrawatch.Api(server.url) as api:
        stored = api.run(m.run_id)
        alerts = [a for a in stored.alerts() if a["rule"] == "nonfinite"]
        frobenius = stored.metric("norm.frobenius")
    (incident,) = alerts  # one episode for the run, naming the layers it hit
    assert "spare.weight" in incident["values"]["layers"]
    assert "net.0.weight" not in incident["values"]["layers"]
    want = float(net[0].weight.detach().double().norm())
    assert frobenius["net.0.weight"].steps == [10, 20]
    assert frobenius["net.0.weight"].values == pytest.approx([want, want], rel=1e-6)
    assert stats_of(server.url, m.run_id)["weights_widened"] == 2


def test_a_lazy_module_attached_before_its_first_forward_streams_its_layer(
    server: ServerProcess, tmp_path: Path
) -> None:
    """Attaching a model with an ``nn.LazyLinear`` before its first forward failed (``attach``
    returned None: only scalars reached the server); the lazy layer now has update norms from
    the first step and weight norms at every snapshot."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.LazyLinear(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    m = spectrawatch.Monitor()
    m.init(**client_settings(tmp_path, server.url, "lazy", activations_every=0))
    assert m.attach(model, opt) is not None
    train_and_finish(m, model, opt, torch.randn(64, 16))
    assert isinstance(m.run_id, int)
    wait_until(lambda: all_analysed(server.url, m.run_id or 0), timeout=120)
    with spectrawatch.Api(server.url) as api:
        stored = api.run(m.run_id)
        updates = stored.metric("norm.update")
        frobenius = stored.metric("norm.frobenius")
    assert updates["2.weight"].steps == list(range(1, 21))
    assert frobenius["2.weight"].steps == [10, 20]
    want = float(model[2].weight.detach().double().norm())
    assert frobenius["2.weight"].values[-1] == pytest.approx(want, rel=1e-5)
    assert stats_of(server.url, m.run_id)["errors"] == 0


def test_system_metrics_reach_the_server_live_and_through_the_spool(
    server: ServerProcess, tmp_path: Path
) -> None:
    """The client's ``system/...`` samples arrive as scalars at steps the run went through,
    the overview draws them in the system panels (not beside the training scalars), and an
    offline run's samples are spooled and uploaded by ``sync`` like any scalar."""
    from spectrawatch.cli import main

    m = spectrawatch.Monitor()
    m.init(**client_settings(tmp_path, server.url, "system", system_every_s=0.2))
    loop = Loop(m)
    loop.run_for(1.5, pause=0.02)
    assert m.finish(timeout=60)
    offline = spectrawatch.Monitor()
    offline.init(
        **client_settings(
            tmp_path, server.url, "system-offline", mode="offline", system_every_s=0.2
        )
    )
    Loop(offline).run_for(0.6, pause=0.02)
    assert offline.finish()
    assert main(["sync", "--spool-dir", str(tmp_path / "spool")]) == 0
    with httpx.Client(base_url=f"{server.url}/api/v1", timeout=30) as c:
        series = {s["name"]: s for s in c.get(f"/runs/{m.run_id}/scalars").json()}
        assert {"loss", "system/cpu_percent", "system/rss_mib"} <= set(series)
        rss = series["system/rss_mib"]
        assert len(rss["steps"]) >= 3
        assert all(0 <= s <= loop.step for s in rss["steps"])
        assert all(50 < v < 1 << 20 for v in rss["values"])  # MiB of a Python process with torch
        overview = c.get(f"/dashboards/runs/{m.run_id}/overview").json()
        traces = {
            p["id"]: {t.get("name") for t in (p["figure"] or {}).get("data", [])}
            for p in overview["panels"]
        }
        assert "system/cpu_percent" in traces["system_util"]
        assert "system/rss_mib" in traces["system_memory"]
        assert not any(n and n.startswith("system/") for n in traces["accuracy"] | traces["loss"])
        runs = c.get("/runs", params={"project": "stream", "limit": 1000}).json()
        synced = next(r for r in runs if r["name"] == "system-offline")
        names = {s["name"] for s in c.get(f"/runs/{synced['id']}/scalars").json()}
        assert {"loss", "system/cpu_percent", "system/rss_mib"} <= names
