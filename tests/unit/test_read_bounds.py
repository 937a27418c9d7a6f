"""Reads of a big run stay bounded: spectra come in pages, a metric without a layer filter is
read and downsampled per layer, the activations figures keep a bounded number of points."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import spectrawatch.api as client_api
from spectrawatch_server.app import create_app
from spectrawatch_server.config import ServerSettings
from spectrawatch_server.storage import repository as repo
from spectrawatch_server.storage.repository import SpectrumRow
from tests.dashboard_seed import done_frame, migrated, new_run

LAYERS = ("l2", "l10", "l1")
SPECTRA_STEPS = 90  # x 3 layers = 270 spectra, pages of 100


@pytest.fixture
def spectra_app(tmp_path: Path) -> Iterator[tuple[TestClient, int]]:
    engine, sessions = migrated(tmp_path)
    with sessions.begin() as s:
        run_id = new_run(s, "p", "r")
        for step in range(SPECTRA_STEPS):
            frame = done_frame(s, run_id, step, step)
            spectra = [SpectrumRow(layer, {"step": step, "layer": layer}) for layer in LAYERS]
            repo.replace_results(s, run_id, frame.id, step, "htsr", [], spectra)
    engine.dispose()
    with TestClient(create_app(ServerSettings(data_dir=tmp_path, run_worker=False))) as client:
        yield client, run_id


def _keys(rows: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return [(r["step"], r["layer"]) for r in rows]


def test_spectra_come_in_bounded_pages_with_a_next_link(
    spectra_app: tuple[TestClient, int],
) -> None:
    """Unfiltered, the endpoint returned every spectrum of the run (hundreds of MB on a big
    run); now 100 by default, at most 1000, the next page linked while more match."""
    client, run_id = spectra_app
    url = f"/api/v1/runs/{run_id}/spectra"
    every = sorted((t, la) for t in range(SPECTRA_STEPS) for la in LAYERS)
    first = client.get(url)
    assert first.status_code == 200
    assert _keys(first.json()) == every[:100]
    assert first.headers["x-next-offset"] == "100"
    got = first.json()
    nxt = first.links["next"]["url"]
    while nxt:
        page = client.get(nxt)
        got += page.json()
        nxt = page.links.get("next", {}).get("url")
        assert ("x-next-offset" in page.headers) == bool(nxt)
    assert _keys(got) == every
    assert client.get(url, params={"limit": 1000}).headers.get("link") is None
    assert client.get(url, params={"limit": 1001}).status_code == 422
    assert client.get(url, params={"limit": 0}).status_code == 422
    # the filters still apply, with the page bound
    two = client.get(url, params={"layer": "l10", "from": 5, "to": 6}).json()
    assert _keys(two) == [(5, "l10"), (6, "l10")]
    assert len(client.get(url, params={"layer": "l1"}).json()) == SPECTRA_STEPS
    frame = two[0]["frame_id"]
    assert len(client.get(url, params={"frame": frame}).json()) == len(LAYERS)
    assert client.get(url, params={"analysis": "other"}).json() == []
    assert len(client.get(f"{url}/{frame}").json()) == len(LAYERS)


def test_client_reads_every_spectrum_page_by_page(
    spectra_app: tuple[TestClient, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Run.spectra()`` promised every stored spectrum: it follows the pages."""
    client, run_id = spectra_app
    monkeypatch.setattr(client_api, "_PAGE", 64)
    api = client_api.Api("http://testserver")
    api.close()
    api._http = client
    client.base_url = "http://testserver/api/v1"  # type: ignore[assignment]
    run = api.run(run_id)
    assert len(run.spectra()) == SPECTRA_STEPS * len(LAYERS)
    assert _keys(run.spectra(layer="l2")) == [(t, "l2") for t in range(SPECTRA_STEPS)]
