"""Dashboard figures: query rows in, Plotly figure JSON (plain dicts) out. Pure: no I/O, no SQL.

(Named ``figures`` because ``spectrawatch_server.dashboards`` is the package of page files,
templates and static assets shipped from the top-level ``dashboards/`` folder.)

Page definitions (``dashboards/pages/*.json``, shipped as ``spectrawatch_server.dashboards``)
are parsed by :func:`parse_page`; each panel names a plot ``kind`` and the metric keys it shows
(glob patterns, matched against the run's metric names). The route module
(``api/routes/dashboard_figures.py``) runs the queries and calls the builders here; the browser only
hands the returned ``{"data", "layout"}`` to ``Plotly.react``.

Figures use plotly.js >= 3 conventions (titles as ``{"text": ...}``), SVG traces for small
series and ``scattergl`` once a figure holds more than :data:`WEBGL_POINTS` points.

The builders live in modules by what they draw: :mod:`.pages` (page definitions, panels),
:mod:`.lines`, :mod:`.overview` (phase bands, early-warning and accuracy markers),
:mod:`.nonfinite` (NaN/Inf onsets), :mod:`.heatmaps`, :mod:`.spectra` (ESD, correlation traps,
Marchenko-Pastur), :mod:`.alerts`, :mod:`.configs` (run configs as tables),
:mod:`.metric_help` (docs/metrics.md's rows by key), over :mod:`.keys`
(the metric keys the pages read) and :mod:`.base` (layout, label text, rounding); every public
name is re-exported here.
"""

from __future__ import annotations

from spectrawatch_server.figures.alerts import SEVERITY_COLORS as SEVERITY_COLORS
from spectrawatch_server.figures.alerts import alerts_timeline_figure as alerts_timeline_figure
from spectrawatch_server.figures.base import DATA_COLORS as DATA_COLORS
from spectrawatch_server.figures.base import VALUE_AXIS_FORMAT as VALUE_AXIS_FORMAT
from spectrawatch_server.figures.base import Figure as Figure
from spectrawatch_server.figures.base import LayerKey as LayerKey
from spectrawatch_server.figures.base import model_order_key as model_order_key
from spectrawatch_server.figures.base import natural_key as natural_key
from spectrawatch_server.figures.base import plot_text as plot_text
from spectrawatch_server.figures.base import rounded as rounded
from spectrawatch_server.figures.base import series_style as series_style
from spectrawatch_server.figures.configs import ConfigRow as ConfigRow
from spectrawatch_server.figures.configs import config_keys as config_keys
from spectrawatch_server.figures.configs import config_rows as config_rows
from spectrawatch_server.figures.configs import config_text as config_text
from spectrawatch_server.figures.configs import default_summary as default_summary
from spectrawatch_server.figures.configs import flatten_config as flatten_config
from spectrawatch_server.figures.configs import sort_by_config as sort_by_config
from spectrawatch_server.figures.configs import summary_text as summary_text
from spectrawatch_server.figures.heatmaps import FEW_STEP_TICKS as FEW_STEP_TICKS
from spectrawatch_server.figures.heatmaps import LOG_COLOR_METRICS as LOG_COLOR_METRICS
from spectrawatch_server.figures.heatmaps import LOG_COLOR_SPAN as LOG_COLOR_SPAN
from spectrawatch_server.figures.heatmaps import TOP_AXIS_LAYERS as TOP_AXIS_LAYERS
from spectrawatch_server.figures.heatmaps import Grid as Grid
from spectrawatch_server.figures.heatmaps import band_colorscale as band_colorscale
from spectrawatch_server.figures.heatmaps import grid_from_rows as grid_from_rows
from spectrawatch_server.figures.heatmaps import heatmap_click_target as heatmap_click_target
from spectrawatch_server.figures.heatmaps import heatmap_figure as heatmap_figure
from spectrawatch_server.figures.heatmaps import uses_log_color as uses_log_color
from spectrawatch_server.figures.keys import HTSR_GOOD_RANGE as HTSR_GOOD_RANGE
from spectrawatch_server.figures.keys import MODEL_LABEL as MODEL_LABEL
from spectrawatch_server.figures.keys import MODEL_LAYER as MODEL_LAYER
from spectrawatch_server.figures.keys import PHASE_PREFIX as PHASE_PREFIX
from spectrawatch_server.figures.keys import VAL_ACC_PATTERN as VAL_ACC_PATTERN
from spectrawatch_server.figures.keys import VAL_ACC_THRESHOLD as VAL_ACC_THRESHOLD
from spectrawatch_server.figures.keys import WARNING_KEY as WARNING_KEY
from spectrawatch_server.figures.keys import layer_text as layer_text
from spectrawatch_server.figures.keys import val_acc_threshold as val_acc_threshold
from spectrawatch_server.figures.keys import window_of as window_of
from spectrawatch_server.figures.lines import ENVELOPE_COLOR as ENVELOPE_COLOR
from spectrawatch_server.figures.lines import WEBGL_POINTS as WEBGL_POINTS
from spectrawatch_server.figures.lines import Band as Band
from spectrawatch_server.figures.lines import Line as Line
from spectrawatch_server.figures.lines import Marker as Marker
from spectrawatch_server.figures.lines import envelope_lines as envelope_lines
from spectrawatch_server.figures.lines import group_by_magnitude as group_by_magnitude
from spectrawatch_server.figures.lines import line_figure as line_figure
from spectrawatch_server.figures.lines import series_csv as series_csv
from spectrawatch_server.figures.lines import thin_lines as thin_lines
from spectrawatch_server.figures.lines import value_range as value_range
from spectrawatch_server.figures.metric_help import HEALTHY_RANGES as HEALTHY_RANGES
from spectrawatch_server.figures.metric_help import MetricHelp as MetricHelp
from spectrawatch_server.figures.metric_help import find_help as find_help
from spectrawatch_server.figures.metric_help import healthy_band as healthy_band
from spectrawatch_server.figures.metric_help import help_public as help_public
from spectrawatch_server.figures.metric_help import load_metric_help as load_metric_help
from spectrawatch_server.figures.metric_help import parse_metric_docs as parse_metric_docs
from spectrawatch_server.figures.nonfinite import NONFINITE_COLOR as NONFINITE_COLOR
from spectrawatch_server.figures.nonfinite import NONFINITE_KINDS as NONFINITE_KINDS
from spectrawatch_server.figures.nonfinite import drawn_scalars as drawn_scalars
from spectrawatch_server.figures.nonfinite import nonfinite_marker as nonfinite_marker
from spectrawatch_server.figures.nonfinite import nonfinite_note as nonfinite_note
from spectrawatch_server.figures.nonfinite import scalar_onset_line as scalar_onset_line
from spectrawatch_server.figures.nonfinite import scalar_onset_marker as scalar_onset_marker
from spectrawatch_server.figures.nonfinite import scalar_onsets as scalar_onsets
from spectrawatch_server.figures.nonfinite import scalar_onsets_note as scalar_onsets_note
from spectrawatch_server.figures.overview import CROSSING_COLOR as CROSSING_COLOR
from spectrawatch_server.figures.overview import EARLY_WARNING_COLOR as EARLY_WARNING_COLOR
from spectrawatch_server.figures.overview import PHASES as PHASES
from spectrawatch_server.figures.overview import first_at_least as first_at_least
from spectrawatch_server.figures.overview import overview_markers as overview_markers
from spectrawatch_server.figures.overview import phase_bands as phase_bands
from spectrawatch_server.figures.overview import phase_spans as phase_spans
from spectrawatch_server.figures.pages import PANEL_KINDS as PANEL_KINDS
from spectrawatch_server.figures.pages import PageSpec as PageSpec
from spectrawatch_server.figures.pages import PageSpecError as PageSpecError
from spectrawatch_server.figures.pages import Panel as Panel
from spectrawatch_server.figures.pages import PanelSpec as PanelSpec
from spectrawatch_server.figures.pages import claim_scalars as claim_scalars
from spectrawatch_server.figures.pages import match_names as match_names
from spectrawatch_server.figures.pages import panel_from as panel_from
from spectrawatch_server.figures.pages import parse_page as parse_page
from spectrawatch_server.figures.pages import share_step_range as share_step_range
from spectrawatch_server.figures.spectra import esd_figure as esd_figure
from spectrawatch_server.figures.spectra import mp_figure as mp_figure
from spectrawatch_server.figures.spectra import traps_figure as traps_figure
