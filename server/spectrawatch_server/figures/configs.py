"""Run configs as tables: a nested config flattened to dotted keys (``optimizer.lr``, as W&B
and MLflow show them), the compare page's key x run table (keys whose values differ first) and
the runs list's config columns.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spectrawatch_server.figures.base import natural_key


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``config`` with nested objects spread into dotted keys (``{"opt": {"lr": 1}}`` ->
    ``{"opt.lr": 1}``); lists and empty objects are values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, name + "."))
        else:
            out[name] = value
    return out


def config_text(value: Any) -> str:
    """A config value as a table cell shows it: strings as they are, the rest as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(", ", ": "), ensure_ascii=False, default=str)


@dataclass(frozen=True)
class ConfigRow:
    """One config key across compared runs: each run's value as text (None: not set)."""

    key: str
    values: tuple[str | None, ...]
    differs: bool

    def public(self) -> dict[str, Any]:
        return {"key": self.key, "values": list(self.values), "differs": self.differs}


def config_rows(configs: Sequence[Mapping[str, Any]]) -> list[ConfigRow]:
    """Every key of ``configs`` (one per run, flattened), those whose values differ between
    the runs first (a key one run lacks differs), then the identical ones; natural key order
    within each group."""
    flat = [flatten_config(c) for c in configs]
    keys = sorted({k for f in flat for k in f}, key=natural_key)
    rows = []
    for key in keys:
        values = tuple(config_text(f[key]) if key in f else None for f in flat)
        rows.append(ConfigRow(key, values, len(set(values)) > 1))
    return sorted(rows, key=lambda r: not r.differs)  # stable: key order kept in each group
