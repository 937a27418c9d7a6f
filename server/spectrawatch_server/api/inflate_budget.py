"""A server-wide bound on the bytes frame bodies are decompressed to at once.

A zstd body of a few KB may declare hundreds of MB; its header is checked first
(:func:`spectrawatch.wire.decompress_frame`), and only then is the size it declares taken from
this budget. A request that finds the budget spent waits ``wait_s`` at most, then answers 503
with ``Retry-After`` (the client keeps the frame and sends it again later).
"""

from __future__ import annotations

import threading
from types import TracebackType

from spectrawatch_server.api.errors import ApiError

RETRY_AFTER_S = 2  # what a request refused for want of budget tells its client


class InflateBudget:
    """``total`` bytes shared by the ingest threads of one app (a counting semaphore in bytes).

    One request may ask for more than ``total`` (a frame up to ``MAX_BODY_BYTES`` is accepted
    whatever the budget): it then waits until it holds the whole budget.
    """

    def __init__(self, total: int, wait_s: float) -> None:
        self.total = total
        self.wait_s = wait_s
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, size: int) -> int:
        """Take ``min(size, total)`` bytes, waiting ``wait_s`` at most; the bytes taken, or 503."""
        size = min(size, self.total)
        with self._cond:
            if not self._cond.wait_for(lambda: self.used + size <= self.total, self.wait_s):
                raise ApiError(
                    503,
                    "ingest_busy",
                    f"the server is decompressing {self.used} bytes of other frames (limit "
                    f"{self.total}, SPECTRAWATCH_MAX_INFLATING_BYTES); retry later",
                    {"Retry-After": str(RETRY_AFTER_S)},
                )
            self.used += size
        return size

    def release(self, size: int) -> None:
        with self._cond:
            self.used -= size
            self._cond.notify_all()

    def reservation(self) -> Reservation:
        return Reservation(self)


class Reservation:
    """What one request holds of an :class:`InflateBudget`; given back when its ``with`` ends.

    ``take`` is the ``admit`` callback of :func:`spectrawatch.wire.decompress_frame`.
    """

    def __init__(self, budget: InflateBudget) -> None:
        self.budget = budget
        self.held = 0

    def take(self, size: int) -> None:
        self.held += self.budget.acquire(size)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.held:
            self.budget.release(self.held)
            self.held = 0
