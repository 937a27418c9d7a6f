"""``spectrawatch export`` / ``import`` against real servers: a run with worker-computed metrics
and scalars (one NaN) goes out as CSV and Parquet and comes back identical on another server."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from spectrawatch.cli import main
from tests.factories import make_run, post_frame, weight_frame
from tests.servers import DIALECT, ServerProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCALARS = [
    {"step": s, "name": n, "value": v}
    for s in range(0, 50, 10)
    for n, v in (("loss", 1.0 / (s + 1)), ("val_acc", s / 100))
] + [{"step": 60, "name": "loss", "value": float("nan")}]  # stored as null by the server


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A server with a finished run: 2 weights frames analysed by the worker, and scalars."""
    server = ServerProcess(tmp_path_factory.mktemp("source")).start()
    try:
        with httpx.Client(base_url=f"{server.url}/api/v1", timeout=30) as api:
            run_id = make_run(api, project="exp", name="src", config={"lr": 0.1}, tags=["a"])
            for seq in range(2):
                body = weight_frame(step=100 * seq, seq=seq)
                assert post_frame(api, run_id, body, seq=seq).is_success
            api.post(  # json.dumps writes NaN, which strict JSON encoders refuse
                f"/runs/{run_id}/scalars",
                content=json.dumps(SCALARS),
                headers={"content-type": "application/json"},
            ).raise_for_status()
            api.patch(f"/runs/{run_id}", json={"status": "finished"}).raise_for_status()

            def analysed() -> bool:
                frames = api.get(f"/runs/{run_id}/frames").json()
                return len(frames) == 2 and all(f["status"] == "done" for f in frames)

            wait_until(analysed, timeout=120)
        yield {"id": run_id, "url": server.url}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("target")).start()
    try:
        yield proc
    finally:
        proc.stop()


def _everything(url: str, run_id: int) -> tuple[dict[Any, Any], dict[Any, Any]]:
    """``{(name, step): value}`` of scalars and ``{(name, layer, step): value}`` of metrics."""
    with httpx.Client(base_url=f"{url}/api/v1", timeout=30) as api:
        scalars = {
            (s["name"], st): v
            for s in api.get(f"/runs/{run_id}/scalars").json()
            for st, v in zip(s["steps"], s["values"], strict=True)
        }
        metrics = {}
        for name in {m["name"] for m in api.get(f"/runs/{run_id}/metrics/catalog").json()}:
            for s in api.get(f"/runs/{run_id}/metrics", params={"name": name}).json()["series"]:
                for st, v in zip(s["steps"], s["values"], strict=True):
                    metrics[(name, s["layer"], st)] = v
    return scalars, metrics


def _run_named(url: str, project: str, name: str) -> dict[str, Any]:
    runs = httpx.get(f"{url}/api/v1/runs", params={"project": project}).json()
    run: dict[str, Any] = next(r for r in runs if r["name"] == name)
    return run


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_then_import_into_another_server_round_trips(
    source: dict[str, Any],
    target: ServerProcess,
    tmp_path: Path,
    fmt: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / f"export-{fmt}"
    assert (
        main(
            [
                "export",
                "src",
                "--project",
                "exp",
                "--url",
                source["url"],
                "--format",
                fmt,
                "-o",
                str(out),
            ]
        )
        == 0
    )
    meta = json.loads((out / "run.json").read_text())
    assert meta["run"]["name"] == "src"
    assert meta["run"]["config"] == {"lr": 0.1}
    want_scalars, want_metrics = _everything(source["url"], source["id"])
    assert meta["counts"] == {"scalars": len(SCALARS), "metrics": len(want_metrics)}
    assert ("htsr.alpha", "layer0.weight", 100) in want_metrics  # the worker's HT-SR output
    if fmt == "csv":
        with (out / "scalars.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(SCALARS)
        assert next(r for r in rows if r["step"] == "60")["value"] == ""  # NaN stays NaN

    project = f"moved-{fmt}"
    assert (
        main(
            [
                "import",
                str(out),
                "--url",
                target.url,
                "--project",
                project,
            ]
        )
        == 0
    )
    assert "imported into run" in capsys.readouterr().out
    run = _run_named(target.url, project, "src")
    assert run["status"] == "finished"
    assert run["config"] == {"lr": 0.1}
    assert run["tags"] == ["a"]
    assert run["summary"]["imported_from"]["run_id"] == source["id"]
    got_scalars, got_metrics = _everything(target.url, run["id"])
    assert got_scalars == want_scalars
    assert got_scalars[("loss", 60)] is None
    assert set(got_metrics) == set(want_metrics)
    for key, value in want_metrics.items():
        assert got_metrics[key] == value or (value is None and got_metrics[key] is None), key

    # a second import under the same name is refused; --skip-metrics leaves the metrics out
    assert main(["import", str(out), "--url", target.url, "--project", project]) == 1
    assert "already exists" in capsys.readouterr().err
    again_name = f"again-{fmt}"
    assert (
        main(["import", str(out), "--url", target.url, "--run", again_name, "--skip-metrics"]) == 0
    )
    again = _run_named(target.url, meta["run"]["project"], again_name)
    assert _everything(target.url, again["id"]) == (want_scalars, {})


def test_export_errors_are_clear(
    source: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", "nope", "--url", source["url"], "-o", str(tmp_path / "x")]) == 1
    assert "no run named 'nope'" in capsys.readouterr().err
    assert main(["export", "999", "--url", source["url"], "-o", str(tmp_path / "x")]) == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert main(["import", str(tmp_path), "--url", source["url"]]) == 1
    assert "not a spectrawatch export" in capsys.readouterr().err


def test_doctor_reports_server_worker_auth_and_spool(
    source: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``spectrawatch doctor`` (it shares this module's server): every check against the real
    health endpoint, a spool with a waiting entry, and an unreachable server."""
    spool = tmp_path / "spool" / "proj" / "run-1"
    spool.mkdir(parents=True)
    (spool / "0000000000000001-us.sw").write_bytes(b'{"kind": "update_sketch"}\n' + b"x" * 100)
    monkeypatch.setenv("SPECTRAWATCH_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.delenv("SPECTRAWATCH_TOKEN", raising=False)
    assert main(["doctor", "--url", source["url"], "--json"]) == 0
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert checks["connectivity"]["status"] == "ok"
    assert checks["versions"]["status"] == "ok"
    assert DIALECT in checks["database"]["detail"]
    assert checks["auth"]["status"] == "ok"
    assert "anonymous" in checks["auth"]["detail"]
    # the server's worker runs on CUDA when this machine has it; on CPU doctor warns
    assert checks["worker"]["status"] == ("ok" if torch.cuda.is_available() else "warn")
    assert "running on" in checks["worker"]["detail"]
    assert "1 entries" in checks["spool"]["detail"]
    assert "proj/run-1" in checks["spool"]["detail"]

    assert main(["doctor", "--url", source["url"], "--token", "sw_wrong"]) == 1
    assert "[fail] auth          token rejected (HTTP 401)" in capsys.readouterr().out
    assert main(["doctor", "--url", "http://127.0.0.1:9"]) == 1
    assert "[fail] connectivity" in capsys.readouterr().out
