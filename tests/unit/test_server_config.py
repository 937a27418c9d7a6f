"""Server settings and start-up safety: what the server refuses, and what it never deletes."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.pool import QueuePool

from spectrawatch_server.app import create_app
from spectrawatch_server.config import ServerSettings, SettingError
from spectrawatch_server.storage.blobs import FRAME_BLOB_KEY, frame_blob_key


def quiet(**values: object) -> ServerSettings:
    """Settings for an in-process start-up with no worker or webhook threads."""
    return ServerSettings(run_worker=False, run_webhooks=False, **values)  # type: ignore[arg-type]


def test_empty_env_var_means_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECTRAWATCH_BLOB_DIR", "")
    monkeypatch.setenv("SPECTRAWATCH_BLOB_URL", "")
    settings = ServerSettings(data_dir=tmp_path)
    assert settings.blob_dir is None
    assert settings.blob_url is None
    assert settings.resolved_blob_dir == tmp_path / "blobs"


def test_start_up_deletes_only_orphan_frame_blobs(tmp_path: Path) -> None:
    blob_dir = tmp_path / "blobs"
    orphan = blob_dir / frame_blob_key(7, "weights", 3, "zstd")
    foreign = [blob_dir / "notes.txt", blob_dir / "spectrawatch.db", blob_dir / "runs" / "x.bin"]
    for path in [orphan, *foreign]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    with TestClient(create_app(quiet(data_dir=tmp_path / "data", blob_dir=blob_dir))):
        pass
    assert not orphan.exists()
    assert all(path.exists() for path in foreign)


@pytest.mark.parametrize("where", ["data_dir", "database", "parent_of_data_dir", "cwd"])
def test_blob_dir_holding_other_files_is_refused(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    values: dict[str, object] = {"data_dir": data_dir, "blob_dir": data_dir}
    if where == "database":
        values["database_url"] = f"sqlite:///{tmp_path / 'blobs' / 'sw.db'}"
        values["blob_dir"] = tmp_path / "blobs"
    elif where == "parent_of_data_dir":
        values["blob_dir"] = tmp_path
    elif where == "cwd":
        monkeypatch.chdir(tmp_path)
        values["blob_dir"] = Path(".")
        values["data_dir"] = Path("/nonexistent-sw-data")
    settings = quiet(**values)
    with pytest.raises(SettingError, match=r"SPECTRAWATCH_BLOB_DIR: .* contains the"):
        settings.check_startable()
    with pytest.raises(SettingError), TestClient(create_app(settings)):
        pass
    assert not (data_dir / "spectrawatch.db").exists()


def test_blob_key_pattern_matches_the_keys_written() -> None:
    for encoding in ("identity", "zstd"):
        assert FRAME_BLOB_KEY.fullmatch(frame_blob_key(12, "update_sketch", 0, encoding))
    for key in ("notes.txt", "runs/1/weights/x.safetensors", "runs/1/weights/../../a"):
        assert not FRAME_BLOB_KEY.fullmatch(key)


def test_new_data_dir_and_database_are_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "data"
    with TestClient(create_app(quiet(data_dir=data_dir))):
        assert data_dir.stat().st_mode & 0o777 == 0o700
        for name in ("spectrawatch.db", "spectrawatch.db-wal"):
            assert (data_dir / name).stat().st_mode & 0o777 == 0o600


def test_every_setting_is_in_the_settings_table() -> None:
    page = (Path(__file__).parents[2] / "docs" / "deployment.md").read_text()
    table = page.split("## Settings\n", 1)[1].split("\n\n### ", 1)[0]
    missing = [name for name in ServerSettings.model_fields if f"`{name.upper()}`" not in table]
    assert missing == []


@pytest.mark.parametrize(
    "value", ["", "127.0.0.1, 10.0.0.0/8,hooks.internal", "[::1],fd00::/8", "my_host.local."]
)
def test_webhook_allowed_hosts_accepts_hosts_ips_and_networks(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPECTRAWATCH_WEBHOOK_ALLOWED_HOSTS", value)
    assert ServerSettings().webhook_allowed_hosts == value


def test_an_exhausted_connection_pool_answers_503_with_retry_after(tmp_path: Path) -> None:
    """Every pooled connection busy past the pool's timeout (a locked or slow database, a burst
    of clients): 503 ``database_busy`` with ``Retry-After``, as for a database outage; it was an
    unhandled ``TimeoutError``, a 500 without ``Retry-After`` (PostgreSQL fault audit)."""
    with TestClient(
        create_app(quiet(data_dir=tmp_path / "data")), base_url="http://127.0.0.1"
    ) as client:
        engine = client.app.state.spectrawatch.engine  # type: ignore[attr-defined]
        engine.pool = QueuePool(engine.pool._creator, pool_size=2, max_overflow=0, timeout=0.1)
        assert client.get("/api/v1/health").status_code == 200
        with engine.connect(), engine.connect():  # hold both of the pool's connections
            resp = client.get("/api/v1/health")
        assert resp.status_code == 503, resp.text
        assert resp.headers["Retry-After"].isdigit()
        assert resp.json()["error"]["code"] == "database_busy"
        assert client.get("/api/v1/health").status_code == 200  # and back once one is free


def test_health_needs_one_database_connection_at_a_time(tmp_path: Path) -> None:
    """/health held its own session's connection while the queue counts took a second one: with
    as many concurrent checks as pooled connections, each waited on the others until the pool
    timed out. On a pool of one connection it now answers (PostgreSQL fault audit)."""
    with TestClient(
        create_app(quiet(data_dir=tmp_path / "data")), base_url="http://127.0.0.1"
    ) as client:
        engine = client.app.state.spectrawatch.engine  # type: ignore[attr-defined]
        engine.pool = QueuePool(engine.pool._creator, pool_size=1, max_overflow=0, timeout=0.1)
        resp = client.get("/api/v1/health")
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == "ok"
