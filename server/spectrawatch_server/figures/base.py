"""What every figure module shares: :data:`Figure` (Plotly figure JSON as plain dicts), the
common layout (plotly.js >= 3 conventions: titles as ``{"text": ...}``), user text escaped for
plotly labels, the natural order of layer and metric names (layers in the model's order where the
run's frames give it), and values rounded to 6 significant digits (smaller JSON). Pure: no I/O,
no SQL.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from spectrawatch.wire import MODEL_LAYER

Figure = dict[str, Any]
LayerKey = Callable[[str], tuple[Any, ...]]  # a sort key of layer names


_ASCII_DIGITS = re.compile(r"([0-9]+)")


def natural_key(text: str) -> tuple[Any, ...]:
    """Sort key that orders embedded integers numerically (``w16`` before ``w128``).

    Only ASCII digit runs count as numbers: the split's odd pieces are exactly those runs, so
    other characters that ``str.isdigit`` takes (``²``, which ``int`` refuses) stay text.
    """
    pieces = _ASCII_DIGITS.split(text)
    return tuple(int(t) if i % 2 else t for i, t in enumerate(pieces))


def model_order_key(order: Sequence[str]) -> LayerKey:
    """Sort key of layer names in the model's ``order`` (``dashboard_reads.model_order``):
    ``__model__`` first, then the names of ``order`` as it lists them, then any other one in
    natural order (a layer no frame named yet). ``embed``, ``blocks.2``, ``blocks.10``, ``head``
    read as the forward pass runs, not ``blocks.2``, ``blocks.10``, ``embed``, ``head``."""
    rank: dict[str, int] = {}
    for name in order:
        rank.setdefault(name, len(rank))

    def key(name: str) -> tuple[Any, ...]:
        if name == MODEL_LAYER:
            return (0, 0, ())
        at = rank.get(name)
        return (1, at, ()) if at is not None else (2, 0, natural_key(name))

    return key


def rounded(values: Sequence[float | None], digits: int = 6) -> list[float | None]:
    """Values rounded to ``digits`` significant digits (smaller JSON; plots cannot show more).

    None and non-finite values come back as None. Vectorised: ``round(v * 10^k) / 10^k`` with
    ``k = digits - 1 - floor(log10 |v|)`` is the double nearest the rounded decimal, whose
    shortest repr is that decimal.
    """
    if not values:
        return []
    v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
    finite = np.isfinite(v) & (v != 0) & (np.abs(v) < 10.0**digits)  # big values stay as they are
    scale = np.ones_like(v)
    with np.errstate(divide="ignore", invalid="ignore"):
        exp = digits - 1 - np.floor(np.log10(np.abs(v[finite])))
    scale[finite] = 10.0**exp
    out = np.where(finite, np.round(v * scale) / scale, v)
    return [None if not math.isfinite(x) else x for x in out.tolist()]


def plot_text(text: str, limit: int = 120) -> str:
    """User text (layer, metric, run and scalar names) for plotly.js labels, which render a
    subset of HTML (``<a href>``, ``<b>``, ``<br>``): ``& < >`` become entities, so a name shows
    as written and cannot add a link; cut to ``limit`` characters with an ellipsis."""
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# Colours of data lines: Plotly's default colorway without its orange and red (and grey),
# which mark alerts, NaN onsets and the like; a page gives each run, module or metric the
# colour of its index in the page's list (:func:`series_style`), the same in every chart.
DATA_COLORS = (
    "#1f77b4",
    "#2ca02c",
    "#9467bd",
    "#17becf",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#393b79",
    "#637939",
    "#7b4173",
)
SERIES_DASHES = ("solid", "dot", "dash")  # past the palette: the colours again, dotted...


def series_style(index: int) -> tuple[str, str]:
    """``(colour, dash)`` of the ``index``-th series of a page: :data:`DATA_COLORS` in order,
    then again dotted, then dashed (one style per series for 30 series)."""
    n = len(DATA_COLORS)
    return DATA_COLORS[index % n], SERIES_DASHES[(index // n) % len(SERIES_DASHES)]


# A value axis's tick and hover format: powers of ten (``10⁻³``, not SI's ``1m``/``100µ``
# mixed with decimals), labels at decades only once it is log (the page's toggle too: plotly
# reads ``minorloglabels`` on log axes only), hover values to 3 significant digits
VALUE_AXIS_FORMAT: dict[str, Any] = {
    "exponentformat": "power",
    "minorloglabels": "none",
    "hoverformat": ".3~g",
}


def _layout(
    title: str, *, x_title: str = "step", y_title: str = "", log_y: bool = False
) -> dict[str, Any]:
    xaxis: dict[str, Any] = {"title": {"text": plot_text(x_title)}, "zeroline": False}
    if x_title == "step":  # the unified hover's header says what the number is
        xaxis["unifiedhovertitle"] = {"text": "step %{x}"}
    return {
        "title": {"text": plot_text(title, 160), "x": 0.01, "font": {"size": 14}},
        "margin": {"l": 60, "r": 20, "t": 40, "b": 45},
        "xaxis": xaxis,
        "yaxis": {
            "title": {"text": plot_text(y_title)},
            "type": "log" if log_y else "linear",
            "zeroline": False,
            **VALUE_AXIS_FORMAT,
        },
        "legend": {"orientation": "h", "y": -0.18, "font": {"size": 11}},
        "colorway": list(DATA_COLORS),
        "hoverlabel": {"namelength": -1},  # whole names: "#3 mlp-lr1e-2-nan", not "#3 mlp-lr1e-..."
        "hovermode": "x unified",
        "uirevision": title,  # keep zoom/legend state across live refreshes
        "shapes": [],
        "annotations": [],
    }
