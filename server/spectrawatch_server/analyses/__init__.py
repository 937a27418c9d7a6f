"""Analyses run by the worker. Every module in this package registers its analyses on import.

New analyses go in their own module here (``htsr.py``, ``sed.py``...); :func:`load_all`
imports them all, so no central list needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from spectrawatch_server.analyses.registry import (
    MODEL_LAYER,
    Analysis,
    AnalysisContext,
    AnalysisResult,
    DecodedFrame,
    MetricValue,
    SpectrumRecord,
    analyses_for,
    register,
)

__all__ = [
    "MODEL_LAYER",
    "Analysis",
    "AnalysisContext",
    "AnalysisResult",
    "DecodedFrame",
    "MetricValue",
    "SpectrumRecord",
    "analyses_for",
    "load_all",
    "register",
]


@cache
def load_all() -> None:
    """Import every analysis module of this package once."""
    for info in pkgutil.iter_modules(__path__):
        if info.name != "registry":
            importlib.import_module(f"{__name__}.{info.name}")
