"""Shared fixtures: a real server subprocess on a free port with a temp data dir."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests.servers import ServerProcess

# CI has 2 cores shared with the server subprocesses: oversubscribed BLAS threads make the
# math tests 3-10x slower there, and results do not depend on the thread count.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A running ``spectrawatch server`` (SQLite, embedded worker) for one test."""
    proc = ServerProcess(tmp_path / "server").start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def api(server: ServerProcess) -> Iterator[httpx.Client]:
    """An httpx client on the server's ``/api/v1``."""
    with httpx.Client(base_url=f"{server.url}/api/v1", timeout=30) as client:
        yield client
