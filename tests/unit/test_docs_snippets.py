"""The Python snippets of ``docs/quickstart.md`` run, as written, against a real server.

A fenced block right after an ``<!-- illustrative -->`` comment is not executed (it needs the
reader's own model, data or shell); every other ``python`` block runs in a fresh interpreter with
``SPECTRAWATCH_URL`` pointing at the test server, and what it sends is checked over the API.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.servers import ServerProcess

DOCS = Path(__file__).resolve().parents[2] / "docs"
FENCE = re.compile(r"(<!-- illustrative -->\s*\n)?```(\w*)\n(.*?)```", re.S)


def snippets(page: str) -> list[tuple[str, str, bool]]:
    """``(language, code, illustrative)`` of every fenced block of ``docs/<page>``."""
    text = (DOCS / page).read_text(encoding="utf-8")
    return [(m.group(2), m.group(3), m.group(1) is not None) for m in FENCE.finditer(text)]


def test_every_snippet_is_runnable_or_marked_illustrative() -> None:
    blocks = snippets("quickstart.md")
    runnable = [code for lang, code, illustrative in blocks if not illustrative]
    assert runnable, "the quickstart has no executed example"
    for lang, code, illustrative in blocks:
        assert illustrative or lang == "python", f"unmarked {lang or 'plain'} block:\n{code}"


@pytest.mark.integration
@pytest.mark.slow
def test_quickstart_runs_against_a_real_server(
    server: ServerProcess, api: httpx.Client, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "SPECTRAWATCH_URL": server.url,
        "SPECTRAWATCH_SPOOL_DIR": str(tmp_path / "spool"),
    }
    for lang, code, illustrative in snippets("quickstart.md"):
        if illustrative or lang != "python":
            continue
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240
        )
        assert done.returncode == 0, done.stderr[-3000:]

    runs = api.get("/runs", params={"project": "quickstart"}).json()
    run = next(r for r in runs if r["name"] == "first-run")
    assert run["status"] == "finished"
    assert run["config"] == {"lr": 1e-3}
    loss = api.get(f"/runs/{run['id']}/scalars", params={"name": "loss"}).json()
    assert loss[0]["steps"] == list(range(1, 101))
    kinds = {f["kind"] for f in api.get(f"/runs/{run['id']}/frames").json()}
    assert {"update_sketch", "weights"} <= kinds  # weights: the snapshot at finish


def test_metric_help_shipped_with_the_pages_is_the_docs_tables() -> None:
    """The pages' metric help (``dashboards/metric_help.json``) is ``docs/metrics.md``'s key /
    definition / how-to-read-it rows; ``make docs`` writes it again after a docs edit."""
    from spectrawatch_server.figures.metric_help import docs_json

    shipped = DOCS.parent / "dashboards" / "metric_help.json"
    text = (DOCS / "metrics.md").read_text(encoding="utf-8")
    assert shipped.read_text(encoding="utf-8") == docs_json(text), "run `make docs`"


def test_each_metric_key_of_the_docs_has_its_own_definition() -> None:
    """A docs row naming two keys gave both one definition: ``/metrics-reference`` and the
    pages' help said the same of ``conditioning.sigma_max`` and ``sigma_min``, and of
    ``eigentrack.mp_sigma2`` and ``mp_ratio``. Each key has its own row now."""
    from spectrawatch_server.figures.metric_help import parse_metric_docs

    docs = parse_metric_docs((DOCS / "metrics.md").read_text(encoding="utf-8"))
    by_definition: dict[str, list[str]] = {}
    for key, entry in docs.items():
        by_definition.setdefault(entry.definition, []).append(key)
    shared = {d: keys for d, keys in by_definition.items() if len(keys) > 1}
    assert shared == {}
    assert docs["conditioning.sigma_max"].definition != docs["conditioning.sigma_min"].definition
