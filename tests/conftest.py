"""Shared fixtures: a real server subprocess on a free port with a temp data dir.

``SPECTRAWATCH_TEST_MODE=postgres`` runs every server as the scale-out topology (PostgreSQL,
procrastinate, one API and two worker processes): see :mod:`tests.servers`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests.servers import (
    POSTGRES_MODE,
    ServerProcess,
    drop_databases,
    stop_all_workers,
    stop_orphan_workers,
)

# CI has 2 cores shared with the server subprocesses: oversubscribed BLAS threads make the
# math tests 3-10x slower there, and results do not depend on the thread count.
torch.set_num_threads(1)

# The client samples system metrics every 10 s by default: rows at whatever step a slow test
# reached then. Tests that count scalars must not depend on timing, so the sampler is off
# unless a test turns it on (the system metrics' tests pass system_every_s themselves).
os.environ.setdefault("SPECTRAWATCH_SYSTEM_EVERY_S", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _postgres_mode_cleanup() -> Iterator[None]:
    """Postgres mode: stop stray worker processes and drop this session's databases."""
    yield
    if POSTGRES_MODE:
        stop_all_workers()
        drop_databases()


@pytest.fixture(autouse=True)
def _stop_orphan_workers() -> Iterator[None]:
    """Postgres mode: a test that killed its API leaves its workers running: stop them."""
    yield
    if POSTGRES_MODE:
        stop_orphan_workers()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A running ``spectrawatch server`` for one test (SQLite and the embedded worker, or the
    PostgreSQL topology in postgres mode)."""
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
