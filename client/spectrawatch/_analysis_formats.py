"""The text outputs of ``spectrawatch analyze``: the printed tables, CSV and JSON of one
checkpoint's analysis or of a comparison.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from typing import Any, TextIO

from spectrawatch._checkpoint_metrics import (
    FIELDS,
    TABLE_COLUMNS,
    CheckpointAnalysis,
    LayerDiff,
    _field,
    _json_float,
    _printable,
)
from spectrawatch.spectral.htsr import NUM_TRAPS


def _fmt(v: float | None, *, integer: bool = False) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return str(v)
    if integer:
        return str(int(v))
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4g}" if abs(v) >= 100 else f"{v:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def format_table(analysis: CheckpointAnalysis) -> str:
    """The printed per-layer table (selected metrics; CSV/JSON hold all of them)."""
    columns = list(TABLE_COLUMNS)
    if any(NUM_TRAPS in r.values for r in analysis.layers):  # --traps
        columns.append((NUM_TRAPS, "traps"))
    header = ["layer", "shape", *(h for _, h in columns), "warning"]
    rows = []
    for r in analysis.layers:
        cells = [_printable(r.layer), "x".join(map(str, r.shape))]
        cells += [_fmt(r.values.get(k), integer=k == NUM_TRAPS) for k, _ in columns]
        cells.append(r.warning or (r.note and f"({r.note})"))
        rows.append(cells)
    return _table(header, rows)


def format_compare(diffs: Sequence[LayerDiff]) -> str:
    """One row per layer: A -> B and the change, for the table's metrics."""
    header = ["layer"]
    for _, h in TABLE_COLUMNS[:5]:
        header += [f"{h} A", f"{h} B", f"d{h}"]
    rows = []
    for d in diffs:
        cells = [_printable(d.layer) + _presence(d)]
        for k, _ in TABLE_COLUMNS[:5]:
            cells += [_fmt(d.a.get(k)), _fmt(d.b.get(k)), _fmt(d.delta(k))]
        rows.append(cells)
    return _table(header, rows)


def write_csv(analysis: CheckpointAnalysis, out: TextIO) -> None:
    """One row per layer: ``layer, shape``, the :data:`FIELDS`, ``warning, note``, then one
    column per metric key (all of them; empty when absent)."""
    keys = analysis.keys()
    writer = csv.writer(out)
    writer.writerow(["layer", "shape", *(n for n, _ in FIELDS), "warning", "note", *keys])
    for r in analysis.layers:
        fields = [_csv_value(_field(r, n, k)) for n, k in FIELDS]  # as the JSON's values
        vals = [_csv_value(r.values.get(k)) for k in keys]
        shape = "x".join(map(str, r.shape))
        writer.writerow([r.layer, shape, *fields, r.warning, r.note, *vals])


def _csv_value(v: float | int | None) -> str:
    return "" if v is None else repr(v)


def _presence(d: LayerDiff) -> str:
    """What the layer's row notes: only in one checkpoint, or a changed shape."""
    if not d.shape_b:
        return " (only A)"
    if not d.shape_a:
        return " (only B)"
    if d.shape_a != d.shape_b:
        return f" (shape {'x'.join(map(str, d.shape_a))} -> {'x'.join(map(str, d.shape_b))})"
    return ""


def write_compare_csv(diffs: Sequence[LayerDiff], out: TextIO) -> None:
    """Long format: ``layer, metric, a, b, delta`` for every metric in either checkpoint."""
    writer = csv.writer(out)
    writer.writerow(["layer", "metric", "a", "b", "delta"])
    for d in diffs:
        for k in dict.fromkeys([*d.a, *d.b]):
            delta = d.delta(k)
            writer.writerow(
                [
                    d.layer,
                    k,
                    repr(d.a[k]) if k in d.a else "",
                    repr(d.b[k]) if k in d.b else "",
                    "" if delta is None else repr(delta),
                ]
            )


def compare_json(
    a: CheckpointAnalysis, b: CheckpointAnalysis, diffs: Sequence[LayerDiff]
) -> dict[str, Any]:
    return {
        "a": a.source,
        "b": b.source,
        "layers": [
            {
                "layer": d.layer,
                "shape_a": list(d.shape_a) if d.shape_a else None,
                "shape_b": list(d.shape_b) if d.shape_b else None,
                "metrics": {
                    k: {
                        "a": _json_float(d.a[k]) if k in d.a else None,
                        "b": _json_float(d.b[k]) if k in d.b else None,
                        "delta": (None if (x := d.delta(k)) is None else _json_float(x)),
                    }
                    for k in dict.fromkeys([*d.a, *d.b])
                },
            }
            for d in diffs
        ],
    }
