"""Thin adapters for training frameworks; each imports its framework lazily."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spectrawatch.monitor import Monitor

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


class CallbackOptions:
    """What every framework callback takes: the run (``project``, ``run``, ``url``, ``token``,
    ``tags``, ``**settings`` as :meth:`~spectrawatch.Monitor.init`), the capture options
    (``probe``, ``every`` as :meth:`~spectrawatch.Monitor.attach`) and ``monitor``, an existing
    :class:`~spectrawatch.Monitor` to reuse (default: a new one per callback)."""

    def __init__(
        self,
        project: str | None = None,
        run: str | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        tags: Sequence[str] | None = None,
        probe: Any = None,
        every: int | Mapping[str, int] | None = None,
        monitor: Monitor | None = None,
        **settings: Any,
    ) -> None:
        from spectrawatch.monitor import Monitor

        self.monitor = monitor if monitor is not None else Monitor()
        self._init = {"project": project, "run": run, "url": url, "token": token, **settings}
        self._tags = tags
        self._probe = probe
        self._every = every
        self._active = False
