"""Run configs as tables: a nested config flattened to dotted keys (``optimizer.lr``, as W&B
and MLflow show them), the compare page's key x run table (keys whose values differ first) and
the runs list's config columns and summary columns (the last value of chosen scalars, as W&B's
runs table shows them).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spectrawatch_server.figures.base import natural_key
from spectrawatch_server.figures.keys import VAL_ACC_PATTERN

# the summary columns a runs list shows unless asked for others: the first logged scalar
# matching each, in this order (training loss, validation loss, validation accuracy, accuracy)
SUMMARY_DEFAULTS = (
    re.compile(r"^(train[._/ -]?)?loss$", re.I),
    re.compile(r"^(val|valid|validation|test|eval)[._/ -]?loss$", re.I),
    VAL_ACC_PATTERN,
    re.compile(r"^(train[._/ -]?)?(acc|accuracy)$", re.I),
)


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


def config_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The flattened keys present in any of ``configs``, natural order (the runs list's picker
    of config columns)."""
    return sorted({k for c in configs for k in flatten_config(c)}, key=natural_key)


def sort_by_config(rows: Sequence[Any], key: str, *, desc: bool) -> list[Any]:
    """``rows`` (each with a flattened ``config`` mapping) ordered by their value of config
    ``key``: numbers before text (numbers by value, text case-insensitively), runs without the
    key last whichever the direction; ties keep their order."""

    def rank(row: Any) -> tuple[int, float, str]:
        value = row["config"].get(key)
        if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
            return (1, 0.0, "" if value is None else config_text(value).lower())
        if isinstance(value, (int, float)) and math.isfinite(value):
            return (0, float(value), "")
        return (1, 0.0, config_text(value).lower())

    present = [r for r in rows if key in r["config"]]
    missing = [r for r in rows if key not in r["config"]]
    return sorted(present, key=rank, reverse=desc) + missing


def default_summary(names: Sequence[str]) -> list[str]:
    """The summary columns of a runs list whose runs logged scalars ``names`` when none were
    picked: for each of :data:`SUMMARY_DEFAULTS`, the first name (natural order) it matches."""
    ordered = sorted(names, key=natural_key)
    picked = (next((n for n in ordered if p.match(n)), None) for p in SUMMARY_DEFAULTS)
    return [n for n in dict.fromkeys(picked) if n is not None]


def summary_text(value: float | None) -> str:
    """A scalar's last value as a summary cell shows it: 4 significant digits, ``NaN/Inf`` for
    a non-finite one (stored as NULL)."""
    return "NaN/Inf" if value is None else f"{value:.4g}"
