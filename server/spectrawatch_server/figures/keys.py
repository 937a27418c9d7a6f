"""Metric keys, layer names and value ranges the dashboard pages look for: the validation
accuracy and its "generalised" threshold, the SED early warning and phase series, the
model-level pseudo-layer, HT-SR's range of well-trained alphas, and the window suffix of a
windowed SED key.
"""

from __future__ import annotations

import re

from spectrawatch.wire import MODEL_LAYER as MODEL_LAYER  # the model-level pseudo-layer

VAL_ACC_THRESHOLD = 0.9  # "generalised" line of the grokking overview, accuracy as a fraction
VAL_ACC_PERCENT_THRESHOLD = 90.0  # the same, for an accuracy logged in percent
PERCENT_SCALE_ABOVE = 1.5  # an accuracy series reaching above this is logged in percent (0-100)
VAL_ACC_PATTERN = re.compile(r"^(val|valid|validation|test|eval)[._/ -]?(acc|accuracy)$", re.I)
WARNING_KEY = "grok.imminent"  # 1.0 from the step the SED early-warning detector fires
PHASE_PREFIX = "sed.phase"
HTSR_GOOD_RANGE = (2.0, 6.0)  # Martin & Mahoney JMLR 2021 §5: well-trained layers
MODEL_LABEL = "whole model"  # what the pages call MODEL_LAYER (URLs and the API keep the key)


def layer_text(layer: str | None) -> str:
    """A layer as the pages name it: :data:`MODEL_LABEL` for the model-level pseudo-layer
    (``__model__``, an internal key), any other one as it is (``None``: ``""``)."""
    return MODEL_LABEL if layer == MODEL_LAYER else (layer or "")


def val_acc_threshold(largest: float | None) -> float:
    """The "generalised" level of a validation accuracy whose largest value is ``largest``:
    :data:`VAL_ACC_THRESHOLD` (0.9), or :data:`VAL_ACC_PERCENT_THRESHOLD` (90) for one logged
    in percent (above :data:`PERCENT_SCALE_ABOVE`, which a fraction cannot reach)."""
    percent = largest is not None and largest > PERCENT_SCALE_ABOVE
    return VAL_ACC_PERCENT_THRESHOLD if percent else VAL_ACC_THRESHOLD


def window_of(name: str) -> str:
    """The window suffix of a windowed SED key (``sed.gap_ratio.w32`` -> ``w32``), or ``""``."""
    m = re.search(r"\.(w\d+)$", name)
    return m.group(1) if m else ""
