"""zstd frame bodies: header before data, and a server-wide bound on what is being inflated."""

from __future__ import annotations

import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zstandard
from fastapi.testclient import TestClient

from spectrawatch.wire import FrameError, compress, decompress_frame, encode_frame
from spectrawatch_server.api.errors import ApiError
from spectrawatch_server.api.inflate_budget import InflateBudget
from spectrawatch_server.app import create_app
from spectrawatch_server.config import ServerSettings
from tests.factories import post_frame, weight_frame

BOMB_BYTES = 64 * 1024 * 1024


def zeros_bomb(size: int) -> bytes:
    """A few KB of zstd that decode to ``size`` zero bytes (no valid safetensors header)."""
    c = zstandard.ZstdCompressor(level=19).compressobj()
    block = bytes(1 << 20)
    return b"".join([c.compress(block) for _ in range(size >> 20)] + [c.flush()])


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = ServerSettings(
        data_dir=tmp_path, run_worker=False, max_body_bytes=256 << 20, max_inflating_bytes=1 << 20
    )
    with TestClient(create_app(settings), base_url="http://127.0.0.1/api/v1") as c:
        yield c


def make_run(client: TestClient) -> int:
    response = client.post("/runs", json={"project": "p", "name": "r"})
    assert response.status_code == 201, response.text
    run_id: int = response.json()["id"]
    return run_id


def test_a_zstd_bomb_is_refused_before_it_is_inflated(client: TestClient) -> None:
    """16 KB of zstd declaring 64 MiB of zeros: refused on its 8-byte prefix (an empty header),
    without the server allocating the 64 MiB it would decode to (it did, up to MAX_BODY_BYTES,
    before looking at the header: ~520 MiB of RSS per request)."""
    run_id = make_run(client)
    bomb = zeros_bomb(BOMB_BYTES)
    assert len(bomb) < 20_000
    tracemalloc.start()
    try:
        response = client.post(
            f"/runs/{run_id}/frames", content=bomb, headers={"Content-Encoding": "zstd"}
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "bad_header"
    assert peak < 8 << 20, f"{peak} bytes allocated for a {len(bomb)}-byte body"


def test_a_header_declaring_more_than_the_limit_is_refused_uninflated() -> None:
    frame = encode_frame("weights", 1, 0, {"w": torch.zeros(1024, 1024)})  # 4 MiB of data
    admitted: list[int] = []
    with pytest.raises(FrameError) as err:
        decompress_frame(compress(frame), 1 << 20, admit=admitted.append)
    assert (err.value.code, err.value.status) == ("too_large", 413)
    assert admitted == []  # refused on its header alone
    header, data = decompress_frame(compress(frame), len(frame), admit=admitted.append)
    assert data == frame
    assert admitted == [len(frame)] == [header.size]


def test_bytes_past_what_the_header_covers_are_refused() -> None:
    frame = encode_frame("weights", 1, 0, {"w": torch.ones(4, 4)})
    for body in (compress(frame) + compress(b"x" * 100), compress(frame + bytes(BOMB_BYTES))):
        with pytest.raises(FrameError) as err:
            decompress_frame(body, 1 << 30)
        assert err.value.status == 400


def test_budget_waits_then_answers_503_with_retry_after() -> None:
    budget = InflateBudget(100, wait_s=0.2)
    assert budget.acquire(60) == 60
    start = time.monotonic()
    with pytest.raises(ApiError) as err:
        budget.acquire(50)
    assert time.monotonic() - start >= 0.2
    assert (err.value.status, err.value.code) == (503, "ingest_busy")
    assert err.value.headers == {"Retry-After": "2"}
    # a waiter gets in once bytes are given back; more than the budget means all of it
    threading.Timer(0.05, budget.release, (60,)).start()
    assert budget.acquire(10**9) == 100
    budget.release(100)
    assert budget.used == 0


def test_ingest_over_the_budget_is_503_and_an_identity_body_is_not_held(
    client: TestClient,
) -> None:
    run_id = make_run(client)
    body = weight_frame(1, 0)
    assert post_frame(client, run_id, compress(body), 0, **{"Content-Encoding": "zstd"}).is_success
    budget = client.app.state.ingest.budget  # made by the first frame
    budget.wait_s = 0.1
    budget.acquire(budget.total)  # another request is inflating a frame as large as the budget
    try:
        busy = post_frame(client, run_id, compress(body), 1, **{"Content-Encoding": "zstd"})
        assert busy.status_code == 503, busy.text
        assert busy.headers["Retry-After"] == "2"
        assert busy.json()["error"]["code"] == "ingest_busy"
        assert post_frame(client, run_id, body, 2).status_code == 202  # nothing inflated
    finally:
        budget.release(budget.total)
    assert post_frame(client, run_id, compress(body), 1, **{"Content-Encoding": "zstd"}).is_success
    assert budget.used == 0
