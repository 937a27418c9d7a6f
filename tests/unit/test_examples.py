"""The example scripts' run names: each execution is a run of its own unless named."""

from __future__ import annotations

import pytest

import spectrawatch
from spectrawatch import grokking_demo

SHORT = ["--steps", "1", "--p", "7", "--eval-every", "1"]


def _run_name(monkeypatch: pytest.MonkeyPatch, *argv: str) -> str | None:
    """The run name ``examples/grokking.py`` (``grokking_demo.main``) starts with ``argv``."""
    m = spectrawatch.Monitor(mode="disabled")
    monkeypatch.setattr(grokking_demo, "monitor", m)
    grokking_demo.main([*SHORT, *argv])
    assert m.settings is not None
    return m.settings.run


def test_the_grokking_example_makes_a_new_run_per_execution_unless_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its fixed default name (``p97-wd1-s0``) made a second execution join the first run."""
    first = _run_name(monkeypatch)
    second = _run_name(monkeypatch)
    assert first != second
    assert first is not None
    assert first.startswith("p7-wd1-s0-")
    assert _run_name(monkeypatch, "--run", "mine") == "mine"
