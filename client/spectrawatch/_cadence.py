"""The update-sketch cadence chosen to keep the sketch's share of the step time under a budget.

With ``overhead_budget = b > 0`` the client times every sketch of theta (host time on the CPU,
CUDA events around the kernel on a GPU) and the training loop's own time per step (between
two optimizer steps, the monitor's sketches excluded). A row of per-step updates costs one
sketch when rows are every step (the previous step's sketch is reused) and two otherwise (theta
before and after the step; one without an optimizer, whose rows are the change since the last
row), so sketching every ``k`` steps costs the fraction

    overhead(k) = median sketch time * sketches per row / (k * median loop time)

of the loop. Once enough samples are in, :meth:`AdaptiveCadence.update` moves the cadence to
the smallest ``floor * m`` (``m`` in :data:`LADDER`) whose overhead is within the budget. The
cadence only ever grows: a cadence that went back and forth would leave the server's SED
windows (rows spaced by the smallest step difference present) incomplete at every change.
"""

from __future__ import annotations

import statistics
from collections import deque

LADDER = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
WARMUP_SKETCHES = 2  # the first sketches pay page faults and kernel compilation: not counted
MIN_SKETCHES = 3  # sketch-time samples needed before a decision
MIN_STEPS = 8  # loop-time samples needed before a decision


class AdaptiveCadence:
    """Samples of sketch and loop time, and the cadence they call for (never decreasing)."""

    def __init__(
        self, budget: float, floor: int, samples: int = 16, *, per_step_rows: bool = True
    ) -> None:
        if not 0 < budget < 1:
            raise ValueError(f"budget must be in (0, 1), got {budget}")
        if floor < 1:
            raise ValueError(f"floor must be >= 1, got {floor}")
        self.budget = budget
        self.every = floor
        self.per_step_rows = per_step_rows  # rows of one step: 2 sketches each when k > 1
        self.candidates = [floor * m for m in LADDER]
        self._sketch: deque[float] = deque(maxlen=samples)
        self._loop: deque[float] = deque(maxlen=2 * samples)
        self._sketches_seen = 0

    def sketch_time(self, seconds: float) -> None:
        """One sketch of theta took ``seconds`` (the first :data:`WARMUP_SKETCHES` are ignored)."""
        self._sketches_seen += 1
        if self._sketches_seen > WARMUP_SKETCHES and seconds >= 0:
            self._sketch.append(seconds)

    def loop_time(self, seconds: float) -> None:
        """One step of the training loop took ``seconds``, the monitor's sketches excluded."""
        if seconds > 0:
            self._loop.append(seconds)

    def overhead(self, every: int) -> float | None:
        """The estimated fraction of loop time that sketching every ``every`` steps costs (None
        until there are enough samples)."""
        if len(self._sketch) < MIN_SKETCHES or len(self._loop) < MIN_STEPS:
            return None
        sketches = 2 if every > 1 and self.per_step_rows else 1
        per_row = statistics.median(self._sketch) * sketches
        return per_row / (every * statistics.median(self._loop))

    def update(self) -> int | None:
        """The new cadence when the samples call for a larger one, else None."""
        for k in self.candidates:
            if k < self.every:
                continue
            cost = self.overhead(k)
            if cost is None:
                return None
            if cost <= self.budget or k == self.candidates[-1]:
                if k > self.every:
                    self.every = k
                    return k
                return None
        return None
