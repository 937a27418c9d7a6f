"""`spectrawatch server` start-up refusals against a running server (real processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from alembic.script import ScriptDirectory

from spectrawatch_server.db.migrate import alembic_config
from tests.servers import (
    ServerProcess,
    cli_env,
    create_token,
    db_rows,
    embedded_only,
    free_port,
)

pytestmark = pytest.mark.integration


def start_second(data_dir: Path, port: int) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "spectrawatch", "server", "--data-dir", str(data_dir)]
    return subprocess.run(
        [*cmd, "--port", str(port)],
        env=cli_env(data_dir),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@embedded_only("the data-directory lock guards the embedded (one-process) server")
def test_second_server_on_a_data_dir_is_refused_before_start_up(tmp_path: Path) -> None:
    first = ServerProcess(tmp_path / "srv").start()
    try:
        upload = first.data_dir / "blobs" / ".tmp" / "in-flight.part"
        upload.write_bytes(b"half a frame")
        second = start_second(first.data_dir, free_port())
        assert second.returncode == 2
        assert second.stdout == ""  # nothing printed as "serving on ..."
        assert second.stderr.strip().splitlines() == [
            f"error: data directory {first.data_dir} is in use by another spectrawatch server "
            f"(pid {first.proc.pid if first.proc else '?'})"
        ]
        assert upload.exists()  # the first server's upload was not "cleaned up"
        assert httpx.get(f"{first.url}/api/v1/health", timeout=5).status_code == 200
    finally:
        first.stop()


def test_port_in_use_is_refused_before_start_up(tmp_path: Path) -> None:
    first = ServerProcess(tmp_path / "srv").start()
    try:
        second = start_second(tmp_path / "other", first.port)
        assert second.returncode == 2
        assert second.stdout == ""
        assert second.stderr.startswith(f"error: cannot listen on 127.0.0.1:{first.port}: ")
        assert not (tmp_path / "other" / "spectrawatch.db").exists()
    finally:
        first.stop()


def test_database_of_a_newer_version_is_refused_with_one_line(tmp_path: Path) -> None:
    """A schema revision this version's migrations lack (a newer spectrawatch migrated the
    database): the server and the admin commands say so and exit 2, before printing that they
    serve; before, uvicorn's lifespan died on Alembic's "Can't locate revision" traceback."""
    data_dir = tmp_path / "srv"
    create_token(data_dir, "p")  # a database at this version's head
    db_rows(data_dir, "UPDATE alembic_version SET version_num = '0099_from_the_future'")
    expected = "its schema is at revision 0099_from_the_future, newer than this spectrawatch "
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    server = start_second(data_dir, free_port())
    cmd = ["token", "create", "--project", "p", "--data-dir", str(data_dir)]
    token = subprocess.run(
        [sys.executable, "-m", "spectrawatch", *cmd],
        env=cli_env(data_dir),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    for result in (server, token):
        assert result.returncode == 2, result.stderr
        assert result.stdout == ""
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("error: the database "), line
        assert expected in line
        assert head in line  # this version's newest, so the user can compare
    assert db_rows(data_dir, "SELECT version_num FROM alembic_version") == [
        ("0099_from_the_future",)
    ]  # left as it was
