"""The metric keys the worker stores, read from the dotted constants of the spectral modules.

A stored key is an upper-case string constant of a module of this package (``htsr.alpha``),
the FARMS twin of an HT-SR key (``farms.alpha``), an SED key with its window
(``sed.gap_ratio.w32``, the checkpoint-interval ``sed.interval.gap_ratio.w10``) or a grokking
evidence key (``grok.evidence.defect``). Metrics of other sources (``spectrawatch import``) may
have any name: they are not listed here.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from functools import lru_cache

_DOTTED = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")
_WINDOWED = re.compile(r"^(sed\..+)\.w\d+$")


@lru_cache(maxsize=1)
def _constants() -> frozenset[str]:
    """Every dotted upper-case string constant of the package's modules (imported once)."""
    keys: set[str] = set()
    package = importlib.import_module("spectrawatch.spectral")
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        keys.update(
            value
            for attr, value in vars(module).items()
            if attr.isupper() and isinstance(value, str) and _DOTTED.match(value)
        )
    return frozenset(keys)


@lru_cache(maxsize=1)
def _kinds() -> tuple[frozenset[str], frozenset[str]]:
    """``(plain keys, SED keys without their window)``."""
    from spectrawatch.spectral import grokking, htsr, sed

    constants = _constants() - {sed.INTERVAL_PREFIX}
    windowed = {k for k in constants if k.startswith("sed.")}
    windowed |= {sed.interval_key(k).rpartition(".w")[0] for k in windowed}
    plain = constants - windowed
    plain |= {htsr.farms_key(k) for k in htsr.LAYER_KEYS}  # FARMS: per-layer values only
    plain |= {grokking.EVIDENCE_PREFIX + field for field in grokking.EVIDENCE_LABELS}
    return frozenset(plain), frozenset(windowed)


def is_stored_key(name: str) -> bool:
    """``name`` is a key the worker stores (an SED key only with its window: ``.w<W>``)."""
    plain, windowed = _kinds()
    match = _WINDOWED.match(name)
    return name in plain or (match is not None and match.group(1) in windowed)


def stored_keys() -> list[str]:
    """Every stored key, sorted; SED keys at their default windows (``sed.gap_ratio.w16``,
    ``.w32``, ``.w64``; the interval variants at ``.w10``)."""
    from spectrawatch.spectral import sed

    plain, windowed = _kinds()
    keys = set(plain)
    for base in windowed:
        interval = base.startswith(sed.INTERVAL_PREFIX + ".")
        windows = (sed.INTERVAL_WINDOW,) if interval else sed.DEFAULT_WINDOWS
        keys.update(sed.windowed_key(base, w) for w in windows)
    return sorted(keys)


def rule_keys() -> frozenset[str]:
    """The keys an alert rule may name: every stored key, SED ones without their window (a
    rule on ``sed.phase`` watches each window's series)."""
    plain, windowed = _kinds()
    return plain | windowed


__all__ = ["is_stored_key", "rule_keys", "stored_keys"]
