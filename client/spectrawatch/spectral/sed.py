"""Spectral Edge Dynamics (SED): rolling-window SVD of parameter updates.

Xu, "Spectral Edge Dynamics of Training Trajectories: Signal--Noise Geometry Across Scales",
arXiv 2603.15678 (research note ``sed_eigentrack.md`` §1). The last W updates form the rows of
a window matrix X (W, d) — exact updates or their count-sketches (the sketch is linear and
preserves inner products in expectation). Its singular values s1 ≥ … ≥ sW (uncentred, as in the
paper's code: X Xᵀ without mean removal) split into a few signal directions and a flat noise
bulk; the *spectral edge* is k* = argmax_k sk/sk+1 and the *gap ratio* sk*/sk*+1.

Two update definitions share this code: per-step Δθ sketches (:func:`rolling_sed`) and the
paper's checkpoint-interval displacements θ_t - θ_{t-Δ}, obtained by differencing θ sketches
(:func:`interval_sed`, W = 10).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch

from spectrawatch.spectral.eigen import batched_eigvalsh, one_blas_thread, svdvals
from spectrawatch.spectral.eigen import grams as eigen_grams

GAP_RATIO = "sed.gap_ratio"  # sk*/sk*+1 (≥ 1)
EDGE = "sed.edge"  # k*, 1-indexed
MARGIN = "sed.margin"  # best ratio / runner-up ratio (≥ 1); near 1 means k* is ambiguous
SIGNAL_RANK = "sed.signal_rank"  # fewest leading directions holding 95 % of sum s² (paper's k95)
PHASE = "sed.phase"  # Phase code of the latest point of the gap series
INCOMPLETE = "sed.incomplete"  # 1.0 when the window had missing steps (computed on what was there)
INTERVAL_PREFIX = "sed.interval"  # checkpoint-interval variant: "sed.interval.gap_ratio.w10"

DEFAULT_WINDOWS = (16, 32, 64)
INTERVAL_WINDOW = 10
_MAX_SPAN = 2**62 + 1  # the widest window span in steps that matters (steps are <= 2**62)
MAX_WINDOW = 4096  # the widest window (rows) the server takes from a frame's info["sed"]
MIN_ROWS = 4  # fewer rows leave no runner-up ratio to compare k* against
_SVD_BYTES = 64 << 20  # cap on a batched (n, W, d) float64 stack for method="svd"
_ENDS_PER_PART = 256  # window ends per Gram matrix
_GRAM_BYTES = 64 << 20  # cap on a stacked (L, n, W, W) float64 block for one eigvalsh call


class Phase(IntEnum):
    """Phase of the gap series (paper §3: rise, plateau, collapse); stored as ``sed.phase``."""

    UNKNOWN = 0
    RISE = 1
    PLATEAU = 2
    COLLAPSE = 3


def windowed_key(key: str, window: int) -> str:
    """Metric key for one window size, e.g. ``sed.gap_ratio.w32``."""
    return f"{key}.w{window}"


def interval_key(key: str, window: int = INTERVAL_WINDOW) -> str:
    """Key of the checkpoint-interval variant, e.g. ``sed.interval.gap_ratio.w10``."""
    return windowed_key(INTERVAL_PREFIX + key.removeprefix("sed"), window)


def window_singular_values(rows: torch.Tensor) -> torch.Tensor:
    """Singular values, descending, of a window ``(W, d)`` or a batch ``(n, W, d)``, in float64.

    LAPACK ``gesdd`` (:func:`~spectrawatch.spectral.eigen.svdvals`) on the rows as given
    (uncentred).
    """
    if rows.ndim not in (2, 3):
        raise ValueError(f"expected (W, d) or (n, W, d) rows, got shape {tuple(rows.shape)}")
    return svdvals(rows.to(torch.float64))


@dataclass(frozen=True)
class EdgeBatch:
    """Edge statistics of n spectra (tensors of shape ``(n,)``); see :func:`spectral_edges`."""

    edge: torch.Tensor  # int64, k* in 1..W-2
    gap_ratio: torch.Tensor  # float64, sk*/sk*+1
    margin: torch.Tensor  # float64, best ratio / runner-up ratio
    runner_up: torch.Tensor  # int64, k of the runner-up ratio
    signal_rank: torch.Tensor  # int64, k95


def spectral_edges(sigma: torch.Tensor, energy: float = 0.95) -> EdgeBatch:
    """Edge k*, gap ratio, margin and signal rank of spectra ``(n, W)`` or ``(W,)`` (descending).

    k* = argmax over k < W-1 (1-indexed) of sk/sk+1 (paper §2; the last ratio is left out because
    sW of a sketched or short window can be near zero). Denominators are floored at 1e-12·s1.
    ``margin`` = best / second-best ratio over the same range (k* is ambiguous when ≈ 1).
    ``signal_rank`` = fewest leading s holding ``energy`` of sum s² (paper's k95).
    """
    s = sigma.to(torch.float64)
    if s.ndim == 1:
        s = s[None]
    w = s.shape[-1]
    if w < MIN_ROWS:
        raise ValueError(f"need at least {MIN_ROWS} singular values, got {w}")
    floor = (s[:, :1] * 1e-12).clamp_min(torch.finfo(torch.float64).tiny)
    ratios = s[:, : w - 2] / torch.maximum(s[:, 1 : w - 1], floor)
    top = torch.topk(ratios, 2, dim=1)
    best, second = top.values[:, 0], top.values[:, 1]
    energy_cum = torch.cumsum(s.square(), dim=1)
    total = energy_cum[:, -1:].clamp_min(torch.finfo(torch.float64).tiny)
    rank = (energy_cum / total < energy).sum(dim=1) + 1
    return EdgeBatch(
        edge=top.indices[:, 0] + 1,
        gap_ratio=best,
        margin=best / second.clamp_min(torch.finfo(torch.float64).tiny),
        runner_up=top.indices[:, 1] + 1,
        signal_rank=rank.clamp_max(w),
    )


@dataclass(frozen=True)
class WindowSED:
    """SED of one window ending at ``step``.

    ``n_rows`` updates were present out of ``window`` (``complete`` when equal);
    ``singular_values`` descending, ``min(n_rows, d)`` of them; ``normalized`` = s²/sum s²
    (energy share per direction).
    """

    step: int
    window: int
    n_rows: int
    singular_values: tuple[float, ...]
    edge: int
    gap_ratio: float
    margin: float
    signal_rank: int

    @property
    def complete(self) -> bool:
        return self.n_rows == self.window

    @property
    def normalized(self) -> tuple[float, ...]:
        total = sum(v * v for v in self.singular_values)
        return tuple(v * v / total for v in self.singular_values) if total else ()


def assemble_rows(
    chunks: Iterable[tuple[Sequence[int], torch.Tensor]],
) -> tuple[list[int], torch.Tensor]:
    """Merge ``(steps, rows (n, d))`` chunks arriving in any order into step order.

    A step seen twice keeps the row of the later chunk (a replayed frame). Returns the sorted
    unique steps and the matching rows ``(N, d)`` (dtype of the first chunk).
    """
    parts = list(chunks)
    for steps, rows in parts:
        if rows.ndim != 2 or rows.shape[0] != len(steps):
            raise ValueError(f"rows {tuple(rows.shape)} do not match {len(steps)} steps")
    if not any(len(steps) for steps, _ in parts):
        raise ValueError("no rows to assemble")
    dtype = parts[0][1].dtype
    flat = [int(s) for steps, _ in parts for s in steps]
    if all(a < b for a, b in itertools.pairwise(flat)):  # in order already: one copy
        return flat, torch.cat([rows.to(dtype) for _, rows in parts])
    by_step: dict[int, torch.Tensor] = {}
    for steps, rows in parts:
        for i, s in enumerate(steps):
            by_step[int(s)] = rows[i]
    order = sorted(by_step)
    return order, torch.stack([by_step[s].to(dtype) for s in order])


def min_step_gap(steps: Sequence[int]) -> int:
    """Smallest positive difference between consecutive steps (1 when there is none)."""
    gaps = [b - a for a, b in itertools.pairwise(steps) if b > a]
    return min(gaps) if gaps else 1


def _window_bounds(
    steps: Sequence[int],
    ends: Sequence[int],
    window: int,
    delta: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ranges ``[lo, hi)`` of the windows ending at ``ends``: rows with step in
    (t - window·delta, t], at most the last ``window`` of them (more can be there only where
    rows are denser than ``delta``: a client that raised its cadence)."""
    st = torch.tensor(list(steps), dtype=torch.int64)
    at = torch.tensor(list(ends), dtype=torch.int64)
    hi = torch.searchsorted(st, at, right=True)
    # steps are in [0, 2**62]: a longer span than 2**62 + 1 reaches no further back, and the
    # product of a wide window and a sparse stream's step gap may not fit an int64
    span = min(window * delta, _MAX_SPAN)
    lo = torch.searchsorted(st, at - span, right=True)
    return torch.maximum(lo, hi - window), hi


def _check_stream(rows: Sequence[torch.Tensor], steps: Sequence[int]) -> None:
    """Every row block ``(N, d)`` has one row per step, and the steps strictly increase."""
    for r in rows:
        if r.ndim != 2 or r.shape[0] != len(steps):
            raise ValueError(f"rows {tuple(r.shape)} do not match {len(steps)} steps")
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError("steps must be strictly increasing (use assemble_rows)")


def rolling_sed(
    rows: torch.Tensor,
    steps: Sequence[int],
    window: int,
    *,
    at: Sequence[int] | None = None,
    step_interval: int | None = None,
    min_rows: int = MIN_ROWS,
    energy: float = 0.95,
    method: str = "gram",
) -> list[WindowSED]:
    """SED of the windows ending at each step of ``at`` (default: every step of ``steps``).

    ``rows (N, d)`` are update rows at strictly increasing ``steps``. The window ending at t
    holds the rows with step in (t - window·Δ, t], Δ = ``step_interval`` (default: the smallest
    step difference present), so a window with missing steps is computed on the rows present
    and reported with ``n_rows < window``. Windows with fewer than ``min_rows`` rows, rows
    narrower than :data:`MIN_ROWS` (``d < 4``) or an all-zero matrix are skipped.
    ``method="gram"`` (default) is :func:`batched_sed` on this one tensor (eigenvalues of
    principal blocks of the float64 Gram matrix, the paper's own computation; s_k accurate to
    ~1e-16 s1^2/s_k relative); ``"svd"`` runs LAPACK ``svdvals`` on every window (the slow
    reference).
    """
    if method not in ("gram", "svd"):
        raise ValueError(f"method must be 'gram' or 'svd', got {method!r}")
    if method == "gram":
        found = batched_sed(
            [rows],
            steps,
            (window,),
            at=at,
            step_interval=step_interval,
            min_rows=min_rows,
            energy=energy,
        )
        return found[0][window]
    _check_stream([rows], steps)
    ends = list(steps if at is None else at)
    lo, hi = _window_bounds(steps, ends, window, step_interval or min_step_gap(steps))
    groups = _count_groups(lo, hi, max(min_rows, MIN_ROWS))
    out: dict[int, WindowSED] = {}
    for count, members in groups.items():
        per = max(1, _SVD_BYTES // (count * rows.shape[1] * 8))
        for c in range(0, len(members), per):
            part = members[c : c + per]
            idx = lo[part][:, None] + torch.arange(count)
            sig = window_singular_values(rows[idx.to(rows.device)]).cpu()
            if sig.shape[1] < MIN_ROWS:  # rows narrower than MIN_ROWS: no runner-up ratio
                continue
            spectra = _window_results(sig, [ends[j] for j in part], window, energy, count)
            for j, res in zip(part, spectra, strict=True):
                if res is not None:
                    out[j] = res
    return [out[j] for j in sorted(out)]


def _count_groups(lo: torch.Tensor, hi: torch.Tensor, min_rows: int) -> dict[int, list[int]]:
    """Window indices grouped by their row count (windows below ``min_rows`` left out)."""
    groups: dict[int, list[int]] = {}
    for j, (a, b) in enumerate(zip(lo.tolist(), hi.tolist(), strict=True)):
        if b - a >= min_rows:
            groups.setdefault(b - a, []).append(j)
    return groups


def _window_results(
    sig: torch.Tensor, end_steps: Sequence[int], window: int, energy: float, n_rows: int
) -> list[WindowSED | None]:
    """:class:`WindowSED` of spectra ``sig (n, c)`` of the windows of ``n_rows`` rows ending at
    ``end_steps`` (n), ``None`` for an all-zero window; one :func:`spectral_edges` call for all
    of them."""
    edges = spectral_edges(sig, energy)
    cols = zip(
        sig.tolist(),
        end_steps,
        edges.edge.tolist(),
        edges.gap_ratio.tolist(),
        edges.margin.tolist(),
        edges.signal_rank.tolist(),
        strict=True,
    )
    return [
        None if s[0] == 0.0 else WindowSED(int(t), window, n_rows, tuple(s), k, gap, margin, rank)
        for s, t, k, gap, margin, rank in cols
    ]


def batched_sed(
    rows: Sequence[torch.Tensor],
    steps: Sequence[int],
    windows: Sequence[int] = DEFAULT_WINDOWS,
    *,
    at: Sequence[int] | None = None,
    step_interval: int | None = None,
    min_rows: int = MIN_ROWS,
    energy: float = 0.95,
    grams: torch.Tensor | None = None,
) -> list[dict[int, list[WindowSED]]]:
    """:func:`rolling_sed` (Gram method) of L tensors sharing ``steps``, every window size at once.

    ``rows[l]`` is ``(N, d_l)`` (widths may differ). One float64 Gram matrix ``(N', N')`` per
    tensor over the N' rows any window touches (batched ``bmm`` per width); then, per window size
    and row count, the principal blocks of every tensor and window end are stacked and passed to
    one batched ``torch.linalg.eigvalsh`` (split only to bound memory). Returns, per tensor,
    ``{window: [WindowSED, ...]}`` in ``at`` order, equal to :func:`rolling_sed` per tensor.

    ``grams``, when given, are the float64 Grams ``(L, N, N)`` of all of ``rows`` (what
    :func:`layer_grams` returns, e.g. kept from the previous frame and grown by
    :func:`extend_grams`): their principal blocks are used instead of new products.
    """
    if not rows:
        return []
    _check_stream(rows, steps)
    if grams is not None and tuple(grams.shape) != (len(rows), len(steps), len(steps)):
        raise ValueError(
            f"grams {tuple(grams.shape)} do not match {len(rows)} tensors of {len(steps)} rows"
        )
    delta = step_interval or min_step_gap(steps)
    ends = list(steps if at is None else at)
    out: list[dict[int, list[WindowSED]]] = [{w: [] for w in windows} for _ in rows]
    for c in range(0, len(ends), _ENDS_PER_PART):  # bounds the Gram matrix to ~(part + W)^2
        part = _sed_part(
            rows, steps, ends[c : c + _ENDS_PER_PART], windows, delta, min_rows, energy, grams
        )
        for layer, found in enumerate(part):
            for w in windows:
                out[layer][w].extend(found[w])
    return out


def _sed_part(
    rows: Sequence[torch.Tensor],
    steps: Sequence[int],
    ends: Sequence[int],
    windows: Sequence[int],
    delta: int,
    min_rows: int,
    energy: float,
    given: torch.Tensor | None,
) -> list[dict[int, list[WindowSED]]]:
    """:func:`batched_sed` for one slice of window ends (``given``: the Grams of all rows)."""
    bounds = {w: _window_bounds(steps, ends, w, delta) for w in windows}
    groups = {w: _count_groups(lo, hi, max(min_rows, MIN_ROWS)) for w, (lo, hi) in bounds.items()}
    used = [(int(bounds[w][0][j]), c) for w, g in groups.items() for c, m in g.items() for j in m]
    out: list[dict[int, list[WindowSED]]] = [{w: [] for w in windows} for _ in rows]
    if not used:
        return out
    a0, a1 = min(a for a, _ in used), max(a + c for a, c in used)
    grams = layer_grams([r[a0:a1] for r in rows]) if given is None else given[:, a0:a1, a0:a1]
    n_layers = len(rows)
    for w, by_count in groups.items():
        found: list[dict[int, WindowSED]] = [{} for _ in rows]
        for count, members in by_count.items():
            per = max(1, _GRAM_BYTES // (n_layers * count * count * 8))
            ranks = _by_rank(rows, count)  # the same for every part of this count
            for c in range(0, len(members), per):
                part = members[c : c + per]
                idx = ((bounds[w][0][part] - a0)[:, None] + torch.arange(count)).to(grams.device)
                sub = grams[:, idx[:, :, None], idx[:, None, :]]  # (L, m, c, c)
                eig = batched_eigvalsh(sub.reshape(-1, count, count))
                sig = eig.flip(-1).clamp_min(0.0).sqrt().cpu().reshape(n_layers, len(part), count)
                for rank, layers in ranks.items():
                    res = _window_results(
                        sig[layers, :, :rank].reshape(-1, rank),
                        [ends[j] for j in part] * len(layers),
                        w,
                        energy,
                        count,
                    )
                    for r, item in enumerate(res):
                        if item is not None:
                            found[layers[r // len(part)]][part[r % len(part)]] = item
        for layer in range(n_layers):
            out[layer][w] = [found[layer][j] for j in sorted(found[layer])]
    return out


def _by_rank(rows: Sequence[torch.Tensor], count: int) -> dict[int, list[int]]:
    """Tensors grouped by the rank bound ``min(count, d_l)`` of their ``count``-row windows,
    those below :data:`MIN_ROWS` left out. A window narrower than it is tall has only ``d_l``
    singular values (what ``svdvals`` returns): its Gram's other eigenvalues are round-off, and
    kept they made ``s_d / s_d+1`` a gap ratio of ~1e7 (an exact-mode bias of 8 values, W = 16)."""
    groups: dict[int, list[int]] = {}
    for layer, r in enumerate(rows):
        rank = min(count, r.shape[1])
        if rank >= MIN_ROWS:
            groups.setdefault(rank, []).append(layer)
    return groups


def layer_grams(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """float64 Gram matrices ``X Xᵀ`` ``(L, N, N)`` of L row blocks ``(N, d_l)``; tensors of
    equal width are multiplied in one batched ``bmm``, except on the CPU where the blocks are
    wider than tall (sketch rows: N <= 80, d = 640), which take numpy's 2-D ``syrk`` per block
    (:func:`~spectrawatch.spectral.eigen.grams`, one BLAS thread): GPT-2-sized ``batched_sed``
    96-98 -> 54-60 ms on one thread (``benchmarks/results/sed.md``)."""
    n = rows[0].shape[0]
    grams = torch.empty(len(rows), n, n, dtype=torch.float64, device=rows[0].device)
    by_width: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_width.setdefault(r.shape[1], []).append(i)
    for width, members in by_width.items():
        if grams.device.type == "cpu" and n < width and all(rows[i].is_cpu for i in members):
            # numpy's 2-D products: one BLAS syrk per tensor (half the flops of the batched
            # bmm), each converted through one reused float64 buffer
            with one_blas_thread():  # blocks this small only spin a second BLAS thread
                grams[members] = eigen_grams([rows[i] for i in members], torch.float64)
            continue
        x = torch.stack([rows[i].to(grams.device) for i in members]).to(torch.float64)
        grams[members] = x @ x.mT
    return grams


def extend_grams(
    grams: torch.Tensor, old: Sequence[torch.Tensor], new: Sequence[torch.Tensor]
) -> torch.Tensor:
    """float64 Grams ``(L, M + n, M + n)`` of L row blocks ``old[l]`` ``(M, d_l)`` followed by
    ``new[l]`` ``(n, d_l)``, given the Grams ``(L, M, M)`` of ``old``: equal to
    :func:`layer_grams` of the stacked rows up to round-off (each entry is the same float64 dot
    product, summed in another order), at the cost of the ``n`` new rows' products only.

    A stream's next frame shares all but its oldest rows with the previous one: its SED Grams
    are the previous Grams' trailing block plus the new rows' products with every row (on the CPU
    numpy's ``gemm`` and ``syrk`` per tensor, one BLAS thread, as :func:`layer_grams`)."""
    if not (len(grams) == len(old) == len(new)):
        raise ValueError(f"{len(grams)} Grams for {len(old)} old and {len(new)} new row blocks")
    m = grams.shape[-1]
    n = new[0].shape[0]
    for a, b in zip(old, new, strict=True):
        if a.shape[0] != m or b.shape[0] != n or a.shape[1] != b.shape[1]:
            raise ValueError(f"row blocks {tuple(a.shape)} and {tuple(b.shape)} do not fit")
    out = torch.empty(len(old), m + n, m + n, dtype=torch.float64, device=grams.device)
    out[:, :m, :m] = grams
    if grams.device.type == "cpu":  # numpy: its slices cost a tenth of torch's per tensor
        dst = out.numpy()
        with one_blas_thread():
            for i, (a, b) in enumerate(zip(old, new, strict=True)):
                x = a.detach().cpu().numpy().astype(np.float64)
                y = b.detach().cpu().numpy().astype(np.float64)
                products = y @ x.T
                dst[i, m:, :m] = products
                dst[i, :m, m:] = products.T
                dst[i, m:, m:] = y @ y.T  # numpy's syrk: exactly symmetric
        return out
    by_width: dict[int, list[int]] = {}
    for i, a in enumerate(old):
        by_width.setdefault(a.shape[1], []).append(i)
    for members in by_width.values():
        xs = torch.stack([old[i].to(out.device) for i in members]).to(torch.float64)
        ys = torch.stack([new[i].to(out.device) for i in members]).to(torch.float64)
        cross = ys @ xs.mT
        own = ys @ ys.mT
        out[members, m:, :m] = cross
        out[members, :m, m:] = cross.mT
        out[members, m:, m:] = (own + own.mT) / 2  # bmm's blocks need not be symmetric
    return out


def multi_window_sed(
    rows: torch.Tensor,
    steps: Sequence[int],
    windows: Sequence[int] = DEFAULT_WINDOWS,
    **kwargs: object,
) -> dict[int, list[WindowSED]]:
    """SED of one tensor for several window sizes (the lag analysis compares them)."""
    return batched_sed([rows], steps, windows, **kwargs)[0]  # type: ignore[arg-type]


def interval_deltas(
    theta_rows: torch.Tensor, steps: Sequence[int], breaks: Iterable[int] = ()
) -> tuple[torch.Tensor, list[int]]:
    """Checkpoint-interval displacements from θ sketches ``(N, d)`` (float64) at ``steps``.

    Row i of the result is sketch(θ_{t_i+1}) - sketch(θ_{t_i}) = sketch(θ_{t_i+1} - θ_{t_i}) (the
    count-sketch is linear), labelled with its end step t_i+1. Differenced in float64.
    ``breaks``: steps where the θ chain restarts (the sketched parameter set changed before
    them: a layer frozen or unfrozen); a displacement whose interval (t_i, t_i+1] holds one is
    left out, its two sketches being of different parameters, so the windows over it count
    the missing slot as at a run's start.
    """
    if theta_rows.ndim != 2 or theta_rows.shape[0] != len(steps):
        raise ValueError(f"rows {tuple(theta_rows.shape)} do not match {len(steps)} steps")
    th = theta_rows.to(torch.float64)
    deltas, ends = th[1:] - th[:-1], [int(s) for s in steps[1:]]
    cuts = sorted(set(breaks))
    if not cuts:
        return deltas, ends
    keep = [
        i
        for i, (start, end) in enumerate(zip(steps[:-1], ends, strict=True))
        if not _holds_step(cuts, int(start), end)
    ]
    if len(keep) == len(ends):
        return deltas, ends
    return deltas[keep], [ends[i] for i in keep]


def _holds_step(cuts: Sequence[int], start: int, end: int) -> bool:
    """Whether a step of the sorted ``cuts`` lies in (start, end]."""
    i = bisect.bisect_right(cuts, start)
    return i < len(cuts) and cuts[i] <= end


def interval_sed(
    theta_rows: torch.Tensor,
    steps: Sequence[int],
    window: int = INTERVAL_WINDOW,
    *,
    at: Sequence[int] | None = None,
    energy: float = 0.95,
    breaks: Iterable[int] = (),
) -> list[WindowSED]:
    """The paper's SED: uncentred window of the last ``window`` checkpoint displacements.

    A missing checkpoint makes one displacement span two intervals; that window is computed on
    the displacements present and counts the missing slot (``n_rows < window``). So does one
    left out across a restart of the θ chain (``breaks``, see :func:`interval_deltas`).
    """
    if len(steps) < 2:
        return []
    deltas, ends = interval_deltas(theta_rows, steps, breaks)
    if not ends:
        return []
    return rolling_sed(
        deltas, ends, window, at=at, step_interval=min_step_gap(steps), energy=energy
    )


@dataclass(frozen=True)
class Phases:
    """Rise / plateau / collapse of a gap series; start steps are ``None`` where absent."""

    rise_start: int | None
    plateau_start: int | None
    collapse_start: int | None
    peak_step: int | None
    peak_value: float

    def phase_at(self, step: int) -> Phase:
        """The phase a step falls in."""
        for start, phase in (
            (self.collapse_start, Phase.COLLAPSE),
            (self.plateau_start, Phase.PLATEAU),
            (self.rise_start, Phase.RISE),
        ):
            if start is not None and step >= start:
                return phase
        return Phase.UNKNOWN


def detect_phases(
    steps: Sequence[int],
    values: Sequence[float],
    *,
    smooth: int = 5,
    plateau_frac: float = 0.7,
    collapse_frac: float = 0.5,
    min_excess: float = 0.05,
    rise_tol: float = 0.1,
) -> Phases:
    """Segment a gap-ratio series into rise, plateau and collapse (paper §3, "peak" variant).

    Causal: uses only the points given, smoothed by a trailing mean of ``smooth`` points, so a
    server can re-run it on the series so far. On the excess e = r - 1 (r ≥ 1): peak p = argmax;
    plateau starts at the first point with e ≥ ``plateau_frac``·e_p; rise starts at the minimum
    before it; collapse starts at the first point after p with e < ``collapse_frac``·e_p. While
    the latest point is the peak and e still grew by more than ``rise_tol``·e_p over the last
    ``smooth`` points, the series is still rising (no plateau yet). No phases if e_p <
    ``min_excess`` (flat series).
    """
    if len(steps) != len(values):
        raise ValueError(f"{len(steps)} steps but {len(values)} values")
    none = Phases(None, None, None, None, math.nan)
    if not values:
        return none
    e = np.asarray(values, dtype=np.float64) - 1.0
    k = max(1, min(smooth, len(e)))
    s = _trailing_mean(e, k)
    p = int(np.argmax(s))
    ep = float(s[p])
    if not ep >= min_excess:
        return none
    peak = Phases(None, None, None, int(steps[p]), ep + 1.0)
    above = np.nonzero(s[: p + 1] >= plateau_frac * ep)[0]
    plateau = int(above[0])
    rising = p == len(s) - 1 and s[p] - s[max(0, p - k)] > rise_tol * ep
    rise = int(np.argmin(s[: plateau + 1])) if plateau > 0 else None
    if rising:
        first = rise if rise is not None else 0
        return Phases(int(steps[first]), None, None, peak.peak_step, peak.peak_value)
    after = np.nonzero(s[p + 1 :] < collapse_frac * ep)[0]
    collapse = int(after[0]) + p + 1 if len(after) else None
    return Phases(
        int(steps[rise]) if rise is not None and rise < plateau else None,
        int(steps[plateau]),
        int(steps[collapse]) if collapse is not None else None,
        peak.peak_step,
        peak.peak_value,
    )


def phase_codes(
    values: Sequence[float],
    first: int,
    *,
    smooth: int = 5,
    collapse_frac: float = 0.5,
    min_excess: float = 0.05,
    rise_tol: float = 0.1,
) -> list[Phase]:
    """``detect_phases(steps[:i+1], values[:i+1]).phase_at(steps[i])`` for every i ≥ ``first``
    (the steps of a series do not change its phases, only their labels).

    The causal segmentation re-run after each new point of a gap series, sharing the trailing
    mean between prefixes (the trailing mean of a prefix is a prefix of the trailing mean), so
    each point costs a few array scans instead of a full re-run. The phase of the latest point
    does not depend on ``plateau_frac`` (the peak itself is always on the plateau).
    """
    e = np.asarray(values, dtype=np.float64) - 1.0
    full = _trailing_mean(e, smooth)
    out: list[Phase] = []
    for i in range(first, len(e)):
        k = max(1, min(smooth, i + 1))
        s = full[: i + 1] if k == smooth else _trailing_mean(e[: i + 1], k)
        out.append(_phase_of_prefix(s, collapse_frac, min_excess, rise_tol, k))
    return out


def phase_codes_batch(
    series: Sequence[np.ndarray],
    firsts: Sequence[int],
    *,
    smooth: int = 5,
    collapse_frac: float = 0.5,
    min_excess: float = 0.05,
    rise_tol: float = 0.1,
) -> list[list[Phase]]:
    """:func:`phase_codes` of many series (``series[j]`` from ``firsts[j]`` on), equal to it
    per series: series of equal length are stacked and every prefix's segmentation runs on all
    of them at once (the same float operations, in the same order, along rows), so one frame's
    hundreds of gap series (GPT-2: 150 tensors x 3 windows) cost a few array passes per new
    point instead of a few per series and point."""
    out: list[list[Phase]] = [[] for _ in series]
    by_length: dict[int, list[int]] = {}
    for j, values in enumerate(series):
        by_length.setdefault(len(values), []).append(j)
    for n, members in by_length.items():
        start = min(firsts[j] for j in members)
        if start >= n:
            continue
        e = np.stack([np.asarray(series[j], dtype=np.float64) for j in members]) - 1.0
        full = _trailing_mean(e, smooth)
        codes = np.zeros((len(members), n), dtype=np.int64)
        for i in range(start, n):
            k = max(1, min(smooth, i + 1))
            s = full[:, : i + 1] if k == smooth else _trailing_mean(e[:, : i + 1], k)
            codes[:, i] = _phases_of_prefixes(s, collapse_frac, min_excess, rise_tol, k)
        for row, j in enumerate(members):
            out[j] = [Phase(int(c)) for c in codes[row, firsts[j] :]]
    return out


def _phases_of_prefixes(
    s: np.ndarray, collapse_frac: float, min_excess: float, rise_tol: float, k: int
) -> np.ndarray:
    """:func:`_phase_of_prefix` of every row of ``s`` ``(m, n)``, as Phase codes ``(m,)``."""
    rows = np.arange(len(s))
    p = np.argmax(s, axis=1)
    ep = s[rows, p]
    rising = (p == s.shape[1] - 1) & (s[rows, p] - s[rows, np.maximum(p - k, 0)] > rise_tol * ep)
    after = np.arange(s.shape[1]) > p[:, None]
    collapse = (after & (s < (collapse_frac * ep)[:, None])).any(axis=1)
    codes = np.where(collapse, int(Phase.COLLAPSE), int(Phase.PLATEAU))
    codes = np.where(rising, int(Phase.RISE), codes)
    out: np.ndarray = np.where(~(ep >= min_excess), int(Phase.UNKNOWN), codes)
    return out


def _trailing_mean(e: np.ndarray, k: int) -> np.ndarray:
    """Mean of the last ``k`` points up to each index (fewer at the start), along the last axis
    of ``e`` ``(n,)`` or ``(m, n)``."""
    n = e.shape[-1]
    csum = np.zeros((*e.shape[:-1], n + 1))  # (np.insert costs more than the sums on ~1,000)
    np.cumsum(e, axis=-1, out=csum[..., 1:])
    idx = np.arange(n)
    start = np.maximum(idx + 1 - k, 0)
    out: np.ndarray = (csum[..., idx + 1] - csum[..., start]) / (idx + 1 - start)
    return out


def _phase_of_prefix(
    s: np.ndarray,
    collapse_frac: float,
    min_excess: float,
    rise_tol: float,
    k: int,
) -> Phase:
    """Phase of the last point of a smoothed prefix ``s`` (the cases of :func:`detect_phases`:
    a rising peak at the end is RISE, any point after the peak below the collapse level is
    COLLAPSE, otherwise the plateau has started)."""
    p = int(np.argmax(s))
    ep = float(s[p])
    if not ep >= min_excess:
        return Phase.UNKNOWN
    if p == len(s) - 1 and s[p] - s[max(0, p - k)] > rise_tol * ep:
        return Phase.RISE
    if bool((s[p + 1 :] < collapse_frac * ep).any()):
        return Phase.COLLAPSE
    return Phase.PLATEAU


def lagged_correlation(
    x_steps: Sequence[int],
    x: Sequence[float],
    y_steps: Sequence[int],
    y: Sequence[float],
    max_lag: int,
) -> list[tuple[int, float]]:
    """Pearson r(x_t, y_{t+l}) for l in -max_lag..max_lag on the steps both series share.

    Lags are in points of the shared step grid; a strong correlation at l > 0 means x leads y by
    l points (paper §4 lag analysis, gap series vs validation loss). Lags with fewer than 3
    overlapping points are left out; constant overlaps give nan.
    """
    ys = dict(zip(y_steps, y, strict=True))
    common = [(float(v), float(ys[s])) for s, v in zip(x_steps, x, strict=True) if s in ys]
    a = np.array([c[0] for c in common])
    b = np.array([c[1] for c in common])
    n = len(a)
    out: list[tuple[int, float]] = []
    for lag in range(-max_lag, max_lag + 1):
        if n - abs(lag) < 3:  # (a slice end of n - lag < 0 would wrap around)
            continue
        xa = a[: n - lag] if lag >= 0 else a[-lag:]
        yb = b[lag:] if lag >= 0 else b[: n + lag]
        if xa.std() == 0 or yb.std() == 0:
            out.append((lag, math.nan))
        else:
            out.append((lag, float(np.corrcoef(xa, yb)[0, 1])))
    return out


__all__ = [
    "DEFAULT_WINDOWS",
    "EDGE",
    "GAP_RATIO",
    "INCOMPLETE",
    "INTERVAL_PREFIX",
    "INTERVAL_WINDOW",
    "MARGIN",
    "PHASE",
    "SIGNAL_RANK",
    "EdgeBatch",
    "Phase",
    "Phases",
    "WindowSED",
    "assemble_rows",
    "batched_sed",
    "detect_phases",
    "extend_grams",
    "interval_deltas",
    "interval_key",
    "interval_sed",
    "lagged_correlation",
    "layer_grams",
    "min_step_gap",
    "multi_window_sed",
    "phase_codes",
    "phase_codes_batch",
    "rolling_sed",
    "spectral_edges",
    "window_singular_values",
    "windowed_key",
]
