"""Hostile input against a real server: only 4xx, never 5xx, nothing stored, service alive."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from spectrawatch.wire import encode_frame
from tests.factories import make_run, post_frame, weight_frame
from tests.races import DATABASES, app_client
from tests.servers import ServerProcess, run_cli

pytestmark = pytest.mark.integration


def cli(*args: str) -> str:
    return run_cli(Path(args[args.index("--data-dir") + 1]), *args)


@pytest.fixture(scope="module")
def secured(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    data_dir = tmp_path_factory.mktemp("authz")
    tokens = {
        "own": cli(
            "token", "create", "--project", "mine", "--role", "admin", "--data-dir", str(data_dir)
        ),
        "other": cli("token", "create", "--project", "theirs", "--data-dir", str(data_dir)),
        "revoked": cli("token", "create", "--project", "mine", "--data-dir", str(data_dir)),
    }
    listing = cli("token", "list", "--data-dir", str(data_dir)).splitlines()
    revoked_id = listing[-1].split("\t")[0]
    cli("token", "revoke", revoked_id, "--data-dir", str(data_dir))
    proc = ServerProcess(data_dir, args=["--require-auth"]).start()
    yield proc, tokens
    proc.stop()


def test_authz_matrix(secured: tuple[ServerProcess, dict[str, str]]) -> None:
    """Each endpoint x {none, bad, other project, revoked}: 401/403/404, never the data."""
    proc, tokens = secured
    base = f"{proc.url}/api/v1"
    own = httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {tokens['own']}"}, timeout=30
    )
    run_id = make_run(own, project="mine", name="private")
    assert post_frame(own, run_id, weight_frame(1, 0), seq=0).status_code == 202
    assert (
        own.post(
            f"/runs/{run_id}/scalars", json=[{"step": 1, "name": "loss", "value": 2.0}]
        ).status_code
        == 202
    )
    hook = own.post("/webhooks", json={"project": "mine", "url": "https://93.184.216.34/hook"})
    assert hook.status_code == 201, hook.text
    webhook_id = hook.json()["id"]
    endpoints: list[tuple[str, str, bytes | None]] = [
        ("get", f"/runs/{run_id}", None),
        ("patch", f"/runs/{run_id}", b'{"status": "crashed"}'),
        ("get", f"/runs/{run_id}/frames", None),
        ("post", f"/runs/{run_id}/frames", weight_frame(2, 1)),
        ("post", f"/runs/{run_id}/scalars", b'[{"step": 2, "name": "loss", "value": 1}]'),
        ("get", f"/runs/{run_id}/scalars", None),
        ("get", f"/runs/{run_id}/metrics?name=norm.spectral", None),
        ("get", f"/runs/{run_id}/metrics/catalog", None),
        ("get", f"/runs/{run_id}/spectra", None),
        ("post", f"/runs/{run_id}/client-stats", b'{"errors": 1}'),
        ("post", "/runs", b'{"project": "mine", "name": "sneaky"}'),
        ("get", f"/runs/{run_id}/alerts", None),
        ("get", "/projects/mine/alert-rules", None),
        ("patch", "/projects/mine/alert-rules/nonfinite", b'{"enabled": false}'),
        ("get", f"/webhooks/{webhook_id}", None),
        ("patch", f"/webhooks/{webhook_id}", b'{"enabled": false}'),
        ("get", f"/webhooks/{webhook_id}/deliveries", None),
        ("post", f"/webhooks/{webhook_id}/test", b"{}"),
        ("get", f"/dashboards/runs/{run_id}/overview", None),
        ("get", f"/dashboards/runs/{run_id}/layers", None),
        ("get", f"/dashboards/runs/{run_id}/alerts", None),
        ("get", f"/dashboards/compare?runs={run_id}", None),
        ("get", "/dashboards/projects/mine/alert-rules", None),
    ]
    callers = {
        "none": {},
        "bad": {"Authorization": "Bearer sw_forged"},
        "revoked": {"Authorization": f"Bearer {tokens['revoked']}"},
        "other": {"Authorization": f"Bearer {tokens['other']}"},
    }
    for who, headers in callers.items():
        for method, path, body in endpoints:
            h = dict(headers)
            if body is not None and not path.endswith("/frames"):
                h["content-type"] = "application/json"
            response = httpx.request(method, base + path, content=body, headers=h, timeout=30)
            expected = {401} if who != "other" else {403, 404}
            assert response.status_code in expected, (who, method, path, response.text)
            assert "private" not in response.text
    assert own.get(f"/webhooks/{webhook_id}").json()["enabled"] is True
    rules = own.get("/projects/mine/alert-rules").json()
    assert "private" not in str(rules)
    run = own.get(f"/runs/{run_id}").json()
    assert run["status"] == "running"
    assert sum(run["frames"].values()) == 1
    scalars = own.get(f"/runs/{run_id}/scalars").json()
    assert scalars[0]["values"] == [2.0]
    own.close()


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tmp_path_factory.mktemp("hostile"), env={"SPECTRAWATCH_MAX_JSON_BYTES": "1000000"}
    ).start()
    yield proc
    proc.stop()


def test_large_and_nested_json_rejected(open_server: ServerProcess) -> None:
    with httpx.Client(base_url=f"{open_server.url}/api/v1", timeout=60) as api:
        run_id = make_run(api, name="json")
        huge = (
            b"["
            + b",".join(b'{"step": 1, "name": "x", "value": 1.0}' for _ in range(40_000))
            + b"]"
        )
        response = api.post(
            f"/runs/{run_id}/scalars", content=huge, headers={"content-type": "application/json"}
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
            yield b"["
            for _ in range(40_000):
                yield b'{"step": 1, "name": "x", "value": 1.0},'
            yield b'{"step": 1, "name": "x", "value": 1.0}]'

        streamed = api.post(
            f"/runs/{run_id}/scalars",
            content=chunks(),
            headers={"content-type": "application/json"},
        )
        assert streamed.status_code == 413
        nested = (
            b'{"project": "p", "name": "n", "config": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001
        )
        response = api.post("/runs", content=nested, headers={"content-type": "application/json"})
        assert response.status_code == 400
        assert "nested more than about 1,000 levels" in response.json()["error"]["message"]
        # parsed, but too deep to serve: 300 levels were stored, then every listing of the
        # project answered 500 (pydantic serialises 255 levels)
        for field, body in (("config", {"project": "deep", "name": "n"}), ("summary", {})):
            value: dict[str, object] = {}
            for _ in range(300):
                value = {"a": [value]}
            if field == "config":
                response = api.post("/runs", json={**body, "config": value})
            else:
                response = api.patch(f"/runs/{run_id}", json={"summary": value})
            assert response.status_code == 422
            assert response.json()["error"]["problems"][0]["field"].endswith(field)
            assert "nested more than 64 levels" in response.json()["error"]["message"]
        shallow = {"a": {"b": [{"c": 1}]}}
        assert (
            api.post("/runs", json={"project": "deep", "name": "ok", "config": shallow}).json()[
                "config"
            ]
            == shallow
        )
        assert [r["name"] for r in api.get("/runs", params={"project": "deep"}).json()] == ["ok"]
        assert api.get(f"/runs/{run_id}/scalars").json() == []
        assert api.get("/health").status_code == 200


def test_out_of_range_ids_are_4xx(open_server: ServerProcess) -> None:
    with httpx.Client(base_url=f"{open_server.url}/api/v1", timeout=30) as api:
        assert api.get(f"/runs/{2**80}").status_code == 422
        assert api.get("/runs", params={"offset": 2**80}).status_code == 422
        run_id = make_run(api, name="ranges")
        assert (
            api.get(f"/runs/{run_id}/metrics", params={"name": "x", "from": 2**80}).status_code
            == 422
        )


def test_nul_characters_are_refused_by_name(open_server: ServerProcess) -> None:
    """NUL (``%00``, ``\\u0000``) in a query parameter, the path or a webhook's fields: 422
    naming where it is (PostgreSQL cannot store or compare such text; its error came back as "a
    numeric parameter is out of range"), never a 5xx."""
    with httpx.Client(base_url=f"{open_server.url}/api/v1", timeout=30) as api:
        run_id = make_run(api, name="nul")
        for path, param in (
            ("/runs", "project"),
            (f"/runs/{run_id}/metrics", "name"),
            (f"/runs/{run_id}/scalars", "name"),
            (f"/runs/{run_id}/spectra", "layer"),
            ("/alerts", "rule"),
            (f"/dashboards/runs/{run_id}/layer", "layer"),
        ):
            response = api.get(f"{path}?{param}=a%00b")
            assert response.status_code == 422, (path, response.text)
            error = response.json()["error"]
            assert error["code"] == "nul_character"
            assert f"query parameter '{param}'" in error["message"]
        response = api.get("/projects/a%00b/alert-rules")
        assert response.status_code == 422
        assert response.json()["error"]["message"] == "the URL path holds a NUL character (%00)"
        hook = {"project": "nul", "url": "http://93.184.216.34/hook?t=a\u0000b"}
        response = api.post("/webhooks", json=hook)
        assert response.status_code == 422
        assert "url" in response.text
        assert api.get("/health").status_code == 200


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors(open_server: ServerProcess) -> None:
    """Property-based requests from the OpenAPI schema: no operation may answer 5xx."""
    st = shutil.which("st", path=os.path.dirname(sys.executable))
    assert st is not None, "schemathesis is a dev dependency"
    with httpx.Client(base_url=f"{open_server.url}/api/v1", timeout=30) as api:
        run_id = make_run(api, name="fuzzed")
        assert post_frame(api, run_id, weight_frame(1, 0), seq=0).status_code == 202
    result = subprocess.run(
        [
            st,
            "run",
            f"{open_server.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "10",
            "--request-timeout",
            "30",
            "--no-color",
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:]
    assert httpx.get(f"{open_server.url}/api/v1/health").status_code == 200


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def test_full_blob_disk_answers_507_and_stores_nothing(tmp_path: Path) -> None:
    """A 2 MiB tmpfs as the blob directory: frames that do not fit get 507, no partial state."""
    blob_dir = tmp_path / "blobs"
    if not _mount_tmpfs(blob_dir, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the storage-layer test covers ENOSPC")
    proc = ServerProcess(tmp_path / "srv", env={"SPECTRAWATCH_BLOB_DIR": str(blob_dir)})
    try:
        proc.start()
        with httpx.Client(base_url=f"{proc.url}/api/v1", timeout=60) as api:
            run_id = make_run(api, name="disk-full")
            small = post_frame(api, run_id, weight_frame(1, 0), seq=0)
            assert small.status_code == 202
            big = encode_frame("weights", 2, 1, {"w": torch.randn(1024, 1024)})  # 4 MiB
            response = post_frame(api, run_id, big, seq=1)
            assert response.status_code == 507, response.text
            assert response.json()["error"]["code"] == "storage_full"
            assert len(api.get(f"/runs/{run_id}/frames").json()) == 1
            assert list((blob_dir / ".tmp").iterdir()) == []
            assert post_frame(api, run_id, weight_frame(3, 2), seq=2).status_code == 202
            assert api.get("/health").status_code == 200
    finally:
        proc.stop()
        subprocess.run(["umount", str(blob_dir)], capture_output=True)


@pytest.mark.parametrize("database", DATABASES)
def test_nonfinite_numbers_in_a_run_config_or_summary_are_kept_as_strings(
    tmp_path: Path, database: str
) -> None:
    """A config ``max_steps = inf`` or a diverged run's NaN summary, in a body written by
    ``json.dumps`` (NaN/Infinity tokens): SQLite stored the invalid JSON (read back as null),
    PostgreSQL answered 422 naming no field. Now both keep them as the strings Python writes."""
    config = {"max_steps": math.inf, "floor": -math.inf, "lr": 1e-3, "sched": [1.0, math.nan]}
    want = {"max_steps": "Infinity", "floor": "-Infinity", "lr": 1e-3, "sched": [1.0, "NaN"]}
    json_body = {"content-type": "application/json"}
    with app_client(tmp_path, database, prefix="sw_nan") as client:
        body = json.dumps({"project": "p", "name": "r", "config": config})
        created = client.post("/api/v1/runs", content=body, headers=json_body)
        assert created.status_code == 201, created.text
        assert created.json()["config"] == want
        run_id = created.json()["id"]
        body = json.dumps({"summary": {"loss": math.nan, "best": {"loss": 0.5}}})
        updated = client.patch(f"/api/v1/runs/{run_id}", content=body, headers=json_body)
        assert updated.status_code == 200, updated.text
        read = client.get(f"/api/v1/runs/{run_id}").json()
    assert read["config"] == want
    assert read["summary"] == {"loss": "NaN", "best": {"loss": 0.5}}
