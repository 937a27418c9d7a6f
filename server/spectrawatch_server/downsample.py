"""Server-side downsampling of metric series for plotting: Largest-Triangle-Three-Buckets.

LTTB (Steinarsson 2013, "Downsampling Time Series for Visual Representation", §4.2) keeps the
first and last points and, per bucket, the point spanning the largest triangle with the
previously kept point and the next bucket's mean, which preserves peaks a plot must show.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt


def lttb_indices(
    x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], n_out: int
) -> npt.NDArray[np.int64]:
    """Indices (ascending) of the points LTTB keeps from ``(x, y)`` (x ascending): at most
    ``n_out``, and every gap. The first point of each run of non-finite ``y`` is kept, LTTB
    choosing the others among the finite points (NaN read as 0 hid a gap in a series near 0);
    a series with more than ``n_out - 2`` gaps keeps them all and its first and last finite
    points."""
    n = len(x)
    if n_out >= n or n_out <= 0:
        return np.arange(n, dtype=np.int64)
    bad = ~np.isfinite(y)
    if not bad.any():
        return _lttb(x, y, n_out)
    gaps = np.flatnonzero(bad & np.r_[True, ~bad[:-1]])
    good = np.flatnonzero(~bad)
    kept = good[_lttb(x[good], y[good], max(2, n_out - len(gaps)))]
    return np.union1d(gaps, kept)


def _lttb(
    x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], n_out: int
) -> npt.NDArray[np.int64]:
    """:func:`lttb_indices` of a series of finite values."""
    n = len(x)
    if n_out >= n:
        return np.arange(n, dtype=np.int64)
    if n_out < 3:
        return np.array([0, n - 1][:n_out], dtype=np.int64)
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
    """Reduce a series to at most ``max_points`` with LTTB; ``None`` values (NaN/Inf) survive:
    one of each run of them (:func:`lttb_indices`)."""
    if max_points is None or len(steps) <= max_points:
        return steps, values
    x = np.asarray(steps, dtype=np.float64)
    y = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    idx = lttb_indices(x, y, max_points)
    return [steps[i] for i in idx], [values[i] for i in idx]


Points = tuple[list[int], list[float | None]]  # (steps, values); None = NaN/Inf


def lttb_indices_rows(
    x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], n_out: int
) -> npt.NDArray[np.int64]:
    """:func:`lttb_indices` of every row of ``(L, n)`` arrays of finite values at once:
    ``(L, n_out)`` indices, each row the same as :func:`lttb_indices` of that row alone (same
    arithmetic, element by element). Series of one length share their bucket edges, so the
    bucket loop runs once for all of them instead of once per series (150 layers x 1,000
    points: 9 s -> 0.05 s)."""
    rows, n = x.shape
    if n_out >= n or n_out <= 0:
        return np.tile(np.arange(n, dtype=np.int64), (rows, 1))
    if n_out < 3:
        return np.tile(np.array([0, n - 1][:n_out], dtype=np.int64), (rows, 1))
    every = (n - 2) / (n_out - 2)
    keep = np.empty((rows, n_out), dtype=np.int64)
    keep[:, 0], keep[:, -1] = 0, n - 1
    at = np.arange(rows)
    prev = np.zeros(rows, dtype=np.int64)
    for b in range(n_out - 2):
        lo, hi = int(b * every) + 1, int((b + 1) * every) + 1
        nlo, nhi = hi, min(int((b + 2) * every) + 1, n)
        mx, my = x[:, nlo:nhi].mean(axis=1), y[:, nlo:nhi].mean(axis=1)
        px, py = x[at, prev][:, None], y[at, prev][:, None]
        area = np.abs(
            (px - mx[:, None]) * (y[:, lo:hi] - py) - (px - x[:, lo:hi]) * (my[:, None] - py)
        )
        prev = lo + np.argmax(area, axis=1)
        keep[:, b + 1] = prev
    return keep


def downsample_many(series: Sequence[Points], max_points: int | None) -> list[Points]:
    """:func:`downsample` of each series (same result): the series of one length, one count
    of None values and one count of gaps together, LTTB of their finite points at once (a
    diverged run's layers all go NaN at one step)."""
    out: list[Points] = list(series)
    if max_points is None:
        return out
    by_length: dict[int, list[int]] = {}
    for i, (steps, _) in enumerate(series):
        if len(steps) > max_points:
            by_length.setdefault(len(steps), []).append(i)
    for members in by_length.values():
        x = np.array([series[i][0] for i in members], dtype=np.float64)
        y = np.array([series[i][1] for i in members], dtype=np.float64)  # None -> NaN
        bad = ~np.isfinite(y)
        gaps = bad & np.c_[np.ones(len(members), dtype=bool), ~bad[:, :-1]]
        counts = zip(bad.sum(axis=1).tolist(), gaps.sum(axis=1).tolist(), strict=True)
        groups: dict[tuple[int, int], list[int]] = {}
        for row, key in enumerate(counts):
            groups.setdefault(key, []).append(row)
        for (missing, gap_count), rows in groups.items():
            if missing:
                good = np.nonzero(~bad[rows])[1].reshape(len(rows), x.shape[1] - missing)
                gx, gy = np.take_along_axis(x[rows], good, 1), np.take_along_axis(y[rows], good, 1)
                budget = max(2, max_points - gap_count)
                kept = np.take_along_axis(good, lttb_indices_rows(gx, gy, budget), 1)
            else:
                kept = lttb_indices_rows(x[rows], y[rows], max_points)
            for row, idx in zip(rows, kept, strict=True):
                steps, values = series[members[row]]
                at = np.union1d(np.flatnonzero(gaps[row]), idx) if missing else idx
                out[members[row]] = (
                    [steps[j] for j in at.tolist()],
                    [values[j] for j in at.tolist()],
                )
    return out
