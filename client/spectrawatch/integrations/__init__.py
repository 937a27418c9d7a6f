"""Thin adapters for training frameworks; each imports its framework lazily."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

CALLBACK_NAME = "SpectrawatchCallback"


def lazy_callback(module: str, impl: type, base: Callable[[], type]) -> Callable[[str], Any]:
    """A PEP 562 module ``__getattr__`` serving ``SpectrawatchCallback`` on first access.

    The class is ``impl`` mixed with the framework's callback class returned by ``base()`` (which
    does the framework import), built once and named as if defined in ``module``.
    """

    @functools.cache
    def build() -> type:
        return type(
            CALLBACK_NAME,
            (impl, base()),
            {"__doc__": impl.__doc__, "__module__": module, "__qualname__": CALLBACK_NAME},
        )

    def module_getattr(name: str) -> Any:
        if name == CALLBACK_NAME:
            return build()
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return module_getattr
