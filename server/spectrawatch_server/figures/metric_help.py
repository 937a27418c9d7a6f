"""What each metric key means and how to read it, for the pages: parsed from the ``| key |
definition | how to read it |`` tables of ``docs/metrics.md`` (the one source), shipped as
``dashboards/metric_help.json`` (``make docs`` writes it; a unit test checks it against the
docs), looked up by a stored key (windowed keys ``sed.gap_ratio.w32`` by their docs pattern
``sed.gap_ratio.w<W>``, a ``farms.*`` key by its ``htsr.*`` twin), and the healthy ranges the
line charts shade.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from spectrawatch_server.figures.keys import HTSR_GOOD_RANGE

TABLE_HEADER = re.compile(r"^\|\s*key\s*\|\s*definition\s*\|\s*how to read it\s*\|\s*$")
CODE = re.compile(r"`([^`]+)`")
KEY_SHAPE = re.compile(r"^[a-z_]+\.[A-Za-z0-9_.<>]+$")
# healthy ranges the docs give, shaded on line charts: (low, high, what the band is)
HEALTHY_RANGES: dict[str, tuple[float, float, str]] = {
    "htsr.alpha": (*HTSR_GOOD_RANGE, "2-6: well-trained layers (WeightWatcher)"),
    "farms.alpha": (*HTSR_GOOD_RANGE, "2-6: well-trained layers (as htsr.alpha)"),
    "norm.update_ratio": (3e-4, 3e-3, "about 1e-3: the update ratio often quoted as healthy"),
}


@dataclass(frozen=True)
class MetricHelp:
    """One row of a metrics table: the docs' ``key`` (a pattern for windowed keys), its
    definition, how to read it, and the section (heading and its GitHub anchor) holding it."""

    key: str
    definition: str
    reading: str
    section: str
    anchor: str


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation but ``-``/``_`` dropped,
    spaces as ``-``."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _plain(cell: str) -> str:
    return CODE.sub(r"\1", cell).replace("**", "").strip()


def parse_metric_docs(text: str) -> dict[str, MetricHelp]:
    """Every key of the ``key | definition | how to read it`` tables of ``text`` (the
    Markdown of ``docs/metrics.md``); a row naming several keys gives each the row."""
    out: dict[str, MetricHelp] = {}
    section, in_table = "", False
    for line in text.splitlines():
        if line.startswith("#"):
            section, in_table = line.lstrip("#").strip(), False
        elif TABLE_HEADER.match(line):
            in_table = True
        elif in_table and line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if len(cells) != 3:
                continue
            keys = [k for k in CODE.findall(cells[0]) if KEY_SHAPE.match(k)]
            for key in keys:
                out[key] = MetricHelp(
                    key,
                    _plain(cells[1]),
                    _plain(cells[2]),
                    _plain(section),
                    heading_anchor(section),
                )
        elif in_table and not line.startswith("|"):
            in_table = False
    return out


def _pattern(key: str) -> re.Pattern[str]:
    """A docs key as a regex of stored keys: ``<W>`` (any placeholder) is one dotless word."""
    parts = re.split(r"(<[^>]+>)", key)
    return re.compile(
        "".join("[^.]+" if p.startswith("<") else re.escape(p) for p in parts if p) + "$"
    )


def find_help(docs: Mapping[str, MetricHelp], name: str) -> MetricHelp | None:
    """The docs' row of stored key ``name``: its own, its pattern's (``sed.edge.w32``), or,
    for a ``farms.*`` key without one, its ``htsr.*`` twin's (FARMS computes each of them on
    the averaged ESD); None when the docs have none."""
    if name in docs:
        return docs[name]
    for key, entry in docs.items():
        if "<" in key and _pattern(key).match(name):
            return entry
    if name.startswith("farms."):
        twin = docs.get("htsr." + name.removeprefix("farms."))
        if twin is not None:
            return MetricHelp(
                name,
                f"the FARMS twin of htsr.{name.removeprefix('farms.')}: {twin.definition}",
                twin.reading,
                twin.section,
                twin.anchor,
            )
    return None


def help_public(docs: Mapping[str, MetricHelp], name: str) -> dict[str, Any] | None:
    """What a page shows of metric ``name``: its docs row and healthy range, None if none."""
    entry = find_help(docs, name)
    if entry is None:
        return None
    band = HEALTHY_RANGES.get(name)
    return {
        "name": name,
        **asdict(entry),
        "healthy": None if band is None else {"low": band[0], "high": band[1], "text": band[2]},
    }


def healthy_band(names: list[str]) -> tuple[float, float, str] | None:
    """The healthy range to shade behind the lines of ``names``: the one range they share (the
    names without one aside), None when none has one or two differ."""
    bands = {HEALTHY_RANGES[n] for n in names if n in HEALTHY_RANGES}
    return bands.pop() if len(bands) == 1 else None


def docs_json(text: str) -> str:
    """``dashboards/metric_help.json`` for the Markdown ``text`` of ``docs/metrics.md``."""
    rows = {k: asdict(v) for k, v in parse_metric_docs(text).items()}
    return json.dumps(rows, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def load_metric_help(text: str) -> dict[str, MetricHelp]:
    """The shipped ``metric_help.json`` (as :func:`docs_json` wrote it) read back."""
    return {k: MetricHelp(**v) for k, v in json.loads(text).items()}


if __name__ == "__main__":  # make docs: python -m ... docs/metrics.md > dashboards/...json
    with open(sys.argv[1], encoding="utf-8") as docs_file:
        sys.stdout.write(docs_json(docs_file.read()))
