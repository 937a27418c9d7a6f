"""`spectrawatch server` flags that are checked before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from spectrawatch.cli import main


def test_several_api_processes_need_the_postgresql_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPECTRAWATCH_QUEUE", "embedded")
    assert main(["server", "--workers", "2", "--data-dir", str(tmp_path)]) == 2
    assert "--workers > 1 needs the PostgreSQL queue" in capsys.readouterr().err
    assert not (tmp_path / "spectrawatch.db").exists()  # refused before touching the database
