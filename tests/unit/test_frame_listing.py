"""``GET /runs/{id}/frames``: pages bounded by the layer names they carry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from spectrawatch.wire import encode_frame
from spectrawatch_server.api.routes import frames as frames_route
from spectrawatch_server.app import create_app
from spectrawatch_server.config import ServerSettings
from tests.factories import post_frame


def test_a_page_ends_after_its_share_of_layer_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """60 frames of 4,096 names of 500 characters (1.1 MB of zstd) made one default page
    118 MiB (server RSS +1.1 GiB); a page now ends past ``PAGE_LAYER_CHARS`` of names and
    links the next one."""
    monkeypatch.setattr(frames_route, "PAGE_LAYER_CHARS", 1000)
    settings = ServerSettings(data_dir=tmp_path, run_worker=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1/api/v1") as client:
        run_id = client.post("/runs", json={"project": "p", "name": "r"}).json()["id"]
        for seq in range(3):
            names = {f"{i}{'n' * 299}": torch.ones(1, 1) for i in range(2)}  # 600 characters
            body = encode_frame("weights", seq, seq, names)
            assert post_frame(client, run_id, body, seq).status_code == 202
        seen: list[int] = []
        url: str | None = f"/api/v1/runs/{run_id}/frames"
        while url:
            page = client.get(f"http://127.0.0.1{url}")  # the link is a path
            assert page.status_code == 200
            seen += [f["seq"] for f in page.json()]
            assert len(page.json()) == 1  # a second frame would pass 1,000 characters
            url = page.links.get("next", {}).get("url")
            if url:
                assert page.headers["X-Next-Offset"] == str(len(seen))
        assert seen == [0, 1, 2]
        whole = client.get(f"/runs/{run_id}/frames", params={"limit": 1, "offset": 2})
        assert [f["seq"] for f in whole.json()] == [2]
        assert "Link" not in whole.headers
