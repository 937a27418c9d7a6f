"""The all-parameter count-sketch as one Triton kernel per large tensor (CUDA only, optional).

:class:`~spectrawatch.sketch.FusedCountSketch` spends ~10 full passes over the coordinates per
step in torch ops (copy to a float64 buffer, widen the index, add block offsets, ``index_add_``).
Here each program reads its tile of a parameter (any float dtype) and of its int16 folded index
once and adds every coordinate, widened to float64 and signed, into the tile's own ``dim``
buckets with relaxed atomics: ~6 bytes read per coordinate, no temporary. Tensors smaller than a
tile are laid end to end in one buffer (one ``torch.cat``) and added straight into their own
rows. One ``index_add_`` then sums the tiles into their tensors' rows. Same sums as the torch
path up to float rounding (the order of float64 additions differs).

Used by :class:`CountSketcher` where ``triton`` imports and the parameters are on a CUDA device;
any compile or launch error switches it to the torch path for good (logged once). Set
``SPECTRAWATCH_TRITON=0`` to never use it.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from spectrawatch.sketch import FusedCountSketch

_log = logging.getLogger("spectrawatch")

# Measured on an H100 (benchmarks/sketch_gpu.py, GPT-2 small, 124 M coordinates): 2.5 ms per
# sketch at tiles of 2^12..2^14 coordinates, 3.1 ms at 2^15, 5.0 ms at 2^16 (fewer programs in
# flight) and 17 ms at 2^18; dim or 2 * dim buckets per tile made no difference beyond noise.
# The scratch is (coordinates / TILE) rows of dim float64 (0.6 byte per coordinate at 2^13).
# Tuning knobs: SPECTRAWATCH_TRITON_TILE (a power of two >= 2^10), SPECTRAWATCH_TRITON_UNFOLD.
TILE = 1 << 13  # coordinates per program, each with its own buckets
BLOCK = 2048  # coordinates per inner iteration of a program
UNFOLD = 1  # signed buckets: dim per tile (rather than the folded index's 2 * dim)


def _env_int(name: str, default: int, valid: Callable[[int], bool] = lambda _: True) -> int:
    """A tuning knob from the environment; the default if unset, not an integer or not
    ``valid``."""
    try:
        value = int(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if valid(value) else default


def _power_of_two_tile(value: int) -> bool:
    return value >= 1 << 10 and not value & (value - 1)


def enabled() -> bool:
    """False when ``SPECTRAWATCH_TRITON`` turns the Triton path off (0, false, no, off)."""
    return os.environ.get("SPECTRAWATCH_TRITON", "1").lower() not in ("0", "false", "no", "off")


def available(device: torch.device) -> bool:
    """Whether the Triton path applies on ``device``: CUDA (or Triton's CPU interpreter), not
    disabled by ``SPECTRAWATCH_TRITON=0``, and triton importable (imported here, on first use)."""
    if not enabled():
        return False
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return _kernel() is not None


@functools.cache
def _kernel() -> Any:
    """The jitted kernel, or None where triton does not import (CPU wheels, broken install)."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # not only ImportError: a broken install must not reach the caller
        return None

    @triton.jit  # type: ignore[untyped-decorator]
    def sketch_kernel(  # type: ignore[no-untyped-def]
        x_ptr,
        idx_ptr,
        acc_ptr,
        n,
        first_row,
        dim,
        TILE: tl.constexpr,
        BLOCK: tl.constexpr,
        ROW: tl.constexpr,
        UNFOLD: tl.constexpr,
    ):
        """Program p adds ``x[p*TILE : (p+1)*TILE]`` into ``acc[(first_row + p) * ROW + idx]``
        (``ROW = 0``: into ``acc[idx]``, the index already holding the row offset). ``UNFOLD``:
        a folded index ``b >= dim`` adds ``-x`` into bucket ``b - dim`` (rows of ``dim``)."""
        pid = tl.program_id(0).to(tl.int64)
        row = acc_ptr + (first_row + pid) * ROW
        start = pid * TILE
        for off in range(0, TILE, BLOCK):
            offs = start + off + tl.arange(0, BLOCK)
            mask = offs < n
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float64)
            b = tl.load(idx_ptr + offs, mask=mask, other=0).to(tl.int32)
            if UNFOLD:
                neg = b >= dim
                b = tl.where(neg, b - dim, b)
                x = tl.where(neg, -x, x)
            tl.atomic_add(row + b, x, mask=mask, sem="relaxed")

    return sketch_kernel


class TritonCountSketch:
    """Same interface and sums as :class:`~spectrawatch.sketch.FusedCountSketch` (see there)."""

    def __init__(
        self,
        numels: list[int],
        dim: int,
        device: torch.device | str,
        *,
        tile: int | None = None,
        block: int = BLOCK,
        unfold: bool | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.numels = list(numels)
        self.dim = dim
        self.tile = tile or _env_int("SPECTRAWATCH_TRITON_TILE", TILE, _power_of_two_tile)
        self.block = min(block, self.tile)
        if self.block & (self.block - 1) or self.tile % self.block:
            # a program's inner loop must end exactly at its tile's end (else it would add
            # the next tile's first coordinates twice)
            raise ValueError(
                f"tile {self.tile} must be a multiple of block {self.block}, a power of 2"
            )
        self.unfold = (
            bool(_env_int("SPECTRAWATCH_TRITON_UNFOLD", UNFOLD)) if unfold is None else unfold
        )
        tile = self.tile
        dim2 = 2 * dim
        offsets = [0]
        for n in self.numels:
            offsets.append(offsets[-1] + n)
        self._offsets = offsets
        self.large: list[tuple[int, int]] = []  # (tensor, first tile row)
        owners: list[int] = []
        small: list[int] = []
        for k, n in enumerate(self.numels):
            if n >= tile:
                self.large.append((k, len(owners)))
                owners.extend([k] * -(-n // tile))
            elif n:
                small.append(k)
        self.small = small
        self.tiles = len(owners)
        self._owners = torch.tensor(owners, dtype=torch.int64, device=self.device)
        self._small_index: torch.Tensor | None = None  # row * 2 * dim + folded, int32
        self._small_source: torch.Tensor | None = None
        self._dim2 = dim2

    def _small_index_for(self, folded: torch.Tensor) -> torch.Tensor:
        """The small tensors' folded index with their row offsets added (built once)."""
        if self._small_index is None or self._small_source is not folded:
            parts = [
                folded[self._offsets[k] : self._offsets[k + 1]].to(torch.int32) + k * self._dim2
                for k in self.small
            ]
            self._small_index = torch.cat(parts)
            self._small_source = folded
        return self._small_index

    def __call__(self, xs: list[torch.Tensor], folded: torch.Tensor) -> torch.Tensor:
        """Sketch ``xs`` (the planned numels, on ``device``) with their concatenated index."""
        if self.device.type != "cuda":  # the interpreter (tests)
            return self._sketch(xs, folded)
        with torch.cuda.device(self.device):  # Triton launches on the current device
            return self._sketch(xs, folded)

    def _sketch(self, xs: list[torch.Tensor], folded: torch.Tensor) -> torch.Tensor:
        dim, dim2 = self.dim, self._dim2
        res = torch.zeros(len(self.numels), dim, dtype=torch.float64, device=self.device)
        if self.tiles:
            width = dim if self.unfold else dim2
            acc = torch.zeros(self.tiles, width, dtype=torch.float64, device=self.device)
            for k, row in self.large:
                # the kernel reads x[0..n) at unit stride: a strided parameter (e.g. a column
                # of a larger tensor) stays strided under reshape(-1), so copy it
                x = xs[k].reshape(-1).contiguous()
                idx = folded[self._offsets[k] : self._offsets[k + 1]]
                self._launch(x, idx, acc, row, width, self.unfold)
            if self.unfold:
                res.index_add_(0, self._owners, acc)
            else:
                folded_rows = res.new_zeros(len(self.numels), dim2).index_add_(0, self._owners, acc)
                res += folded_rows[:, :dim] - folded_rows[:, dim:]
        if self.small:
            flats = [xs[k].reshape(-1) for k in self.small]
            common = functools.reduce(torch.promote_types, (f.dtype for f in flats))
            flats = [f.to(common) for f in flats]  # no copy where the dtype already is common
            out = res.new_zeros(len(self.numels), dim2)
            self._launch(torch.cat(flats), self._small_index_for(folded), out, 0, 0, False)
            res += out[:, :dim] - out[:, dim:]
        return res

    def _launch(
        self,
        x: torch.Tensor,
        idx: torch.Tensor,
        acc: torch.Tensor,
        row: int,
        stride: int,
        unfold: bool,
    ) -> None:
        n = x.numel()
        grid = (-(-n // self.tile),)
        _kernel()[grid](
            x,
            idx,
            acc,
            n,
            row,
            self.dim,
            TILE=self.tile,
            BLOCK=self.block,
            ROW=stride,
            UNFOLD=unfold,
        )


class CountSketcher:
    """The all-parameter sketcher the client uses: :class:`TritonCountSketch` where
    :func:`available`, else (and for good after its first error) ``FusedCountSketch``."""

    def __init__(self, numels: list[int], dim: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.numels = list(numels)
        self.dim = dim
        self.triton: TritonCountSketch | None = None
        if available(self.device):
            self.triton = TritonCountSketch(self.numels, dim, self.device)
        self._torch: FusedCountSketch | None = None
        self.fallback_reason: str | None = None

    @property
    def backend(self) -> str:
        return "triton" if self.triton is not None else "torch"

    def __call__(self, xs: list[torch.Tensor], folded: torch.Tensor) -> torch.Tensor:
        if self.triton is not None:
            try:
                return self.triton(xs, folded)
            except Exception as exc:  # a compile or launch error: the torch path
                self.triton = None
                self.fallback_reason = f"{type(exc).__name__}: {exc}"[:300]
                _log.warning(
                    "spectrawatch: Triton sketch failed (%s); using torch ops", self.fallback_reason
                )
        if self._torch is None:
            self._torch = FusedCountSketch(self.numels, self.dim, self.device)
        return self._torch(xs, folded)
