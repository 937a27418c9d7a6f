"""``spectrawatch db copy`` of a real server: a SQLite server's run (analysed frames, metrics,
spectra, scalars with a NaN, a non-finite alert, a changed rule, a webhook with deliveries, a
token) copied into SQLite and, with ``SPECTRAWATCH_TEST_POSTGRES_URL``, into PostgreSQL; a
server started on the copy answers the same, takes the same token and goes on ingesting.

The servers are started here with SQLite and the embedded queue whatever the test mode (the
source is an embedded server by definition)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from spectrawatch.cli import main
from spectrawatch.wire import FrameKind, encode_frame
from spectrawatch_server.db.session import make_engine
from tests.factories import make_run, post_frame, weight_frame
from tests.servers import POSTGRES_URL, end_process, free_port, fresh_database, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCALARS = [{"step": s, "name": "loss", "value": 1.0 / (s + 1)} for s in range(0, 300, 10)]
SCALARS.append({"step": 400, "name": "loss", "value": float("nan")})


def _env(**values: str) -> dict[str, str]:
    """The environment without this session's SPECTRAWATCH_* (test mode, database), plus
    ``values`` as SPECTRAWATCH_<NAME>."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECTRAWATCH_")}
    env |= {"SPECTRAWATCH_LOG_LEVEL": "warning", "SPECTRAWATCH_DEVICE": "cpu"}
    return env | {f"SPECTRAWATCH_{k.upper()}": v for k, v in values.items()}


@contextmanager
def serving(data_dir: Path, **values: str) -> Iterator[str]:
    """``spectrawatch server --require-auth`` on ``data_dir`` until the block ends; its URL."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "spectrawatch", "server", "--port", str(port)]
    with open(data_dir / "server.log", "ab") as log:
        proc = subprocess.Popen(
            [*cmd, "--data-dir", str(data_dir), "--require-auth"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(**values),
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            assert proc.poll() is None, (data_dir / "server.log").read_text()[-3000:]
            try:
                return httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout=90)
        yield url
    finally:
        end_process(proc, signal.SIGINT)


def nan_frame(step: int, seq: int) -> bytes:
    w = torch.randn(24, 12, generator=torch.Generator().manual_seed(seq))
    w[3, 4] = float("nan")
    return encode_frame(FrameKind.WEIGHTS, step, seq, {"layer0.weight": w})


def readings(url: str, token: str, run_id: int) -> dict[str, Any]:
    """What the API says of the run: fields, scalars, every metric series, spectra, alerts."""
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=f"{url}/api/v1", timeout=30, headers=headers) as api:
        run = api.get(f"/runs/{run_id}").raise_for_status().json()
        metrics = {}
        for name in sorted({m["name"] for m in api.get(f"/runs/{run_id}/metrics/catalog").json()}):
            series = api.get(f"/runs/{run_id}/metrics", params={"name": name}).json()["series"]
            metrics[name] = sorted(json.dumps(s, sort_keys=True) for s in series)
        alerts = api.get(f"/runs/{run_id}/alerts").json()
        return {
            "run": {k: run[k] for k in ("id", "name", "config", "tags", "status", "created_at")},
            "scalars": api.get(f"/runs/{run_id}/scalars").json(),
            "metrics": metrics,
            "spectra": api.get(f"/runs/{run_id}/spectra").json(),
            "alerts": [(a["rule"], a["status"], a["step"], a["created_at"]) for a in alerts],
            "rules": api.get("/projects/exp/alert-rules").json(),
            "webhooks": api.get("/webhooks").json(),
        }


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A stopped SQLite server's data directory holding one analysed run, and its readings."""
    data_dir = tmp_path_factory.mktemp("source")
    command = ["token", "create", "--project", "exp", "--role", "admin"]
    created = subprocess.run(
        [sys.executable, "-m", "spectrawatch", *command, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=True,
        env=_env(),
    )
    token = created.stdout.strip()
    headers = {"Authorization": f"Bearer {token}"}
    with (
        serving(data_dir, webhook_allowed_hosts="127.0.0.1") as url,
        httpx.Client(base_url=f"{url}/api/v1", timeout=30, headers=headers) as api,
    ):
        run_id = make_run(api, project="exp", name="src", config={"lr": 0.1}, tags=["a"])
        hook = {"project": "exp", "url": "http://127.0.0.1:9/hook"}  # nothing listens
        api.post("/webhooks", json=hook).raise_for_status()
        rule = api.patch("/projects/exp/alert-rules/alpha_out_of_range", json={"enabled": False})
        rule.raise_for_status()
        assert post_frame(api, run_id, nan_frame(0, 0), seq=0).status_code == 202
        for seq in (1, 2):
            assert post_frame(api, run_id, weight_frame(100 * seq, seq), seq=seq).status_code == 202
        api.post(
            f"/runs/{run_id}/scalars",
            content=json.dumps(SCALARS),
            headers={"content-type": "application/json"},
        ).raise_for_status()

        def analysed() -> bool:
            frames = api.get(f"/runs/{run_id}/frames").json()
            alerts = api.get(f"/runs/{run_id}/alerts").json()
            return len(frames) == 3 and all(f["status"] == "done" for f in frames) and alerts

        wait_until(analysed, timeout=120)
        time.sleep(1)  # the alert's delivery attempt
        expected = readings(url, token, run_id)
    assert expected["metrics"]
    assert expected["spectra"]
    assert expected["alerts"]
    return {"dir": data_dir, "token": token, "run": run_id, "expected": expected}


def check_copy(source: dict[str, Any], url: str) -> None:
    """The copy's server answers as the source's did, takes its token, and goes on: a new run
    gets the next id, a new frame is stored and analysed (no id collides)."""
    assert readings(url, source["token"], source["run"]) == source["expected"]
    headers = {"Authorization": f"Bearer {source['token']}"}
    with httpx.Client(base_url=f"{url}/api/v1", timeout=30, headers=headers) as api:
        new = make_run(api, project="exp", name="after")
        assert new == source["run"] + 1
        assert post_frame(api, new, weight_frame(0, 0), seq=0).status_code == 202
        wait_until(
            lambda: [f["status"] for f in api.get(f"/runs/{new}/frames").json()] == ["done"],
            timeout=120,
        )
        assert api.get(f"/runs/{new}/metrics/catalog").json()


def test_sqlite_copy_serves_the_same_run(
    source: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "target"
    blobs = ["--blobs-from", str(source["dir"] / "blobs"), "--blobs-to", str(target / "blobs")]
    assert main(["db", "copy", "--from", str(source["dir"]), "--to", str(target), *blobs]) == 0
    out = capsys.readouterr().out
    assert "row counts verified" in out
    assert "blobs: 3 copied" in out
    with serving(target) as url:
        check_copy(source, url)


@pytest.mark.skipif(POSTGRES_URL is None, reason="SPECTRAWATCH_TEST_POSTGRES_URL unset")
def test_postgresql_copy_serves_the_same_run(
    source: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert POSTGRES_URL is not None
    with fresh_database(POSTGRES_URL, "sw_copy") as database:
        assert main(["db", "copy", "--from", str(source["dir"]), "--to", database]) == 0
        out = capsys.readouterr().out
        assert "row counts verified" in out
        assert f"default: {source['dir'] / 'blobs'}" in out  # where to point the new server
        blob_dir = str(source["dir"] / "blobs")  # the same directory, as the output says
        with serving(tmp_path / "target", database_url=database, blob_dir=blob_dir) as url:
            check_copy(source, url)
        assert main(["db", "copy", "--from", str(source["dir"]), "--to", database]) == 2
        assert "is not empty" in capsys.readouterr().err
        # --replace under a live session (a server or worker still on it) deleted what it wrote
        live = make_engine(database)
        with live.connect():
            replace = ["db", "copy", "--from", str(source["dir"]), "--to", database, "--replace"]
            assert main(replace) == 2
            assert "other session(s) connected" in capsys.readouterr().err
        live.dispose()
        assert main(replace) == 0
