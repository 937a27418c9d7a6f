"""The ``--html`` output of ``spectrawatch analyze``: one self-contained Plotly page of a
checkpoint's (or two compared checkpoints') metrics and spectra.
"""

from __future__ import annotations

import html
import io
import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spectrawatch._analysis_formats import _fmt
from spectrawatch._checkpoint import AnalyzeError
from spectrawatch._checkpoint_metrics import CheckpointAnalysis
from spectrawatch.spectral.htsr import ALPHA, esd_payload, farms_key, log_histogram

# the report's plots: no Plotly logo, no "Share chart" to Plotly Cloud (plotly.js 4 offers it
# by default): a checkpoint's spectra stay with the report
REPORT_CONFIG = {"displaylogo": False, "showSendToCloud": False}


def _plotly() -> Any:
    try:
        import plotly.graph_objects as go
        import plotly.io as pio
        from plotly.offline import get_plotlyjs
    except ImportError as exc:
        raise AnalyzeError(
            "--html needs plotly: pip install plotly (or 'spectrawatch[server]')"
        ) from exc
    return go, pio, get_plotlyjs


def _density_points(hist: Mapping[str, Any]) -> tuple[list[float], list[float]]:
    """Geometric bin centres and densities of a log-binned ESD histogram's non-empty bins."""
    mids = [math.sqrt(lo * hi) for lo, hi in itertools.pairwise(hist["edges"])]
    keep = [i for i, d in enumerate(hist["density"]) if d > 0]
    return [mids[i] for i in keep], [hist["density"][i] for i in keep]


def html_report(analyses: Sequence[CheckpointAnalysis], title: str) -> str:
    """A self-contained HTML page (plotly.js inlined, no CDN): alpha per layer (plain and FARMS,
    every checkpoint), a warnings table, and per-layer ESD log-log plots with the power-law fit
    and the Marchenko-Pastur bulk of the first checkpoint (with ``--traps``, the shuffled
    weight's ESD too)."""
    go, pio, get_plotlyjs = _plotly()
    figures: list[tuple[str, Any]] = []
    bar = go.Figure()
    for a in analyses:
        tag = Path(a.source).name if len(analyses) > 1 else ""
        layers = [r.layer for r in a.layers]
        for key, label in ((ALPHA, "alpha"), (farms_key(ALPHA), "FARMS alpha")):
            bar.add_trace(
                go.Bar(
                    name=f"{label} {tag}".strip(),
                    x=layers,
                    y=[r.values.get(key) for r in a.layers],
                )
            )
    bar.add_hrect(y0=2, y1=6, fillcolor="green", opacity=0.08, line_width=0)
    bar.update_layout(
        title="Power-law exponent per layer (2-6: well trained)",
        barmode="group",
        yaxis_title="alpha",
        height=450,
    )
    figures.append(("alpha", bar))
    for r in analyses[0].layers:
        if r.report is None:
            continue
        fig = go.Figure()
        for which, evals, metrics in (
            ("ESD", r.report.evals, r.report.plain),
            ("FARMS ESD", r.report.farms_evals, r.report.farms),
        ):
            if evals is None or metrics is None:
                continue
            p = esd_payload(evals, metrics)
            xs, ys = _density_points(p["hist"])
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name=which))
            fig.add_trace(
                go.Scatter(
                    x=p["fit"]["x"],
                    y=p["fit"]["pdf"],
                    mode="lines",
                    name=f"{which} power law, alpha={p['fit']['alpha']:.2f}",
                )
            )
            if which == "ESD" and "mp" in p:
                fig.add_trace(
                    go.Scatter(
                        x=p["mp"]["x"],
                        y=p["mp"]["pdf"],
                        mode="lines",
                        line={"dash": "dot"},
                        name="Marchenko-Pastur bulk",
                    )
                )
        if r.report.traps is not None and r.report.rand_evals is not None:  # --traps
            xs, ys = _density_points(log_histogram(r.report.rand_evals))
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="markers",
                    marker={"symbol": "x"},
                    name=f"shuffled weight's ESD: {r.report.traps.num_traps} correlation trap(s)",
                )
            )
        fig.update_layout(
            title=f"{r.layer} {'x'.join(map(str, r.shape))}"
            + (f" - {r.warning}" if r.warning else ""),
            height=380,
        )
        fig.update_xaxes(type="log", title="eigenvalue of W^T W")
        fig.update_yaxes(type="log", title="density")
        figures.append((r.layer, fig))
    warn_rows = (
        "".join(
            f"<tr><td>{html.escape(Path(a.source).name)}</td><td>{html.escape(r.layer)}</td>"
            f"<td>{_fmt(r.values.get(ALPHA))}</td><td>{html.escape(r.warning or r.note)}</td></tr>"
            for a in analyses
            for r in a.layers
            if r.warning or r.note
        )
        or "<tr><td colspan=4>no warnings</td></tr>"
    )
    body = io.StringIO()
    body.write(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px}</style>"
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
        f"<h1>{html.escape(title)}</h1><p>"
        + "<br>".join(
            html.escape(f"{a.source} ({len(a.layers)} layers, device {a.device})") for a in analyses
        )
        + "</p>"
        + "".join(
            f"<p><b>not read</b>: {html.escape(reason)}</p>"
            for a in analyses
            for reason in a.unreadable
        )
        + "<h2>Warnings</h2><table><tr><th>checkpoint</th><th>layer</th><th>alpha</th>"
        f"<th>warning</th></tr>{warn_rows}</table>"
    )
    for i, (_, fig) in enumerate(figures):
        if i == 1:
            body.write("<h2>Eigenvalue spectra</h2>")
        body.write(
            pio.to_html(
                fig,
                include_plotlyjs=False,
                full_html=False,
                div_id=f"fig{i}",
                config=REPORT_CONFIG,
            )
        )
    body.write("</body></html>")
    return body.getvalue()
