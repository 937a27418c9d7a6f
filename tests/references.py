"""Independent reference packages the tests compare against, imported quietly."""

from __future__ import annotations

import importlib
import logging
import warnings
from typing import Any

import pytest


def weightwatcher() -> Any:
    """``weightwatcher`` with its ``WW_powerlaw`` and ``RMT_Util`` modules loaded (it logs and
    prints about missing CUDA at import); the test is skipped where it is not installed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ww = pytest.importorskip("weightwatcher")
        for name in ("WW_powerlaw", "RMT_Util"):
            importlib.import_module(f"weightwatcher.{name}")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    return ww
