"""Server-side downsampling of metric series for plotting: Largest-Triangle-Three-Buckets.

LTTB (Steinarsson 2013, "Downsampling Time Series for Visual Representation", §4.2) keeps the
first and last points and, per bucket, the point spanning the largest triangle with the
previously kept point and the next bucket's mean, which preserves peaks a plot must show.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def lttb_indices(
    x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], n_out: int
) -> npt.NDArray[np.int64]:
    """Indices of the ``n_out`` points LTTB keeps from ``(x, y)`` (x ascending, NaN y as 0)."""
    n = len(x)
    if n_out >= n or n_out <= 0:
        return np.arange(n, dtype=np.int64)
    if n_out < 3:
        return np.array([0, n - 1][:n_out], dtype=np.int64)
    y = np.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0)
    every = (n - 2) / (n_out - 2)
    keep = np.empty(n_out, dtype=np.int64)
    keep[0], keep[-1] = 0, n - 1
    prev = 0
    for b in range(n_out - 2):
        lo, hi = int(b * every) + 1, int((b + 1) * every) + 1
        nlo, nhi = hi, min(int((b + 2) * every) + 1, n)
        mx, my = x[nlo:nhi].mean(), y[nlo:nhi].mean()
        area = np.abs((x[prev] - mx) * (y[lo:hi] - y[prev]) - (x[prev] - x[lo:hi]) * (my - y[prev]))
        prev = lo + int(np.argmax(area))
        keep[b + 1] = prev
    return keep


def downsample(
    steps: list[int], values: list[float | None], max_points: int | None
) -> tuple[list[int], list[float | None]]:
    """Reduce a series to at most ``max_points`` with LTTB; ``None`` values (NaN/Inf) survive."""
    if max_points is None or len(steps) <= max_points:
        return steps, values
    x = np.asarray(steps, dtype=np.float64)
    y = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    idx = lttb_indices(x, y, max_points)
    return [steps[i] for i in idx], [values[i] for i in idx]
