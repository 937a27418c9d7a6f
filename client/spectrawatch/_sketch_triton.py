"""The all-parameter count-sketch as Triton kernels (CUDA only, optional).

:class:`~spectrawatch.sketch.FusedCountSketch` spends ~10 full passes over the coordinates per
step in torch ops (copy to a float64 buffer, widen the index, add block offsets, ``index_add_``).
Here the sketch's *rotated rows* (:func:`~spectrawatch.sketch.hash_coordinates`: row ``g`` of
``dim`` coordinates is shifted by ``r(g)``, signs hashed per coordinate) let a program read a
band of whole rows of a large tensor and sum them column-wise into ``dim`` float64 totals,
hashing rows and signs on the fly: no index is read, no atomic add per coordinate (one per
bucket per program), ~4 bytes read per float32 coordinate. Tensors smaller than a band are laid
end to end in one buffer (one ``torch.cat``) and added by a second kernel into their own rows
with their folded index. Same sums as the torch path up to float rounding (the order of float64
additions differs).

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

from spectrawatch.sketch import FusedCountSketch, folded_dtype, hash_keys, signed_buckets

_log = logging.getLogger("spectrawatch")

# Tuning knobs (SPECTRAWATCH_TRITON_ROWS, _ROW_BLOCK, _BUCKETS: powers of two), measured with
# benchmarks/sketch_gpu.py: rows of dim coordinates per program, rows per inner iteration,
# buckets (columns) per inner iteration.
ROWS = 16
ROW_BLOCK = 8
BUCKETS = 128
SMALL_BLOCK = 1024  # coordinates per program of the small-tensor kernel


def _env_int(name: str, default: int, valid: Callable[[int], bool] = lambda _: True) -> int:
    """A tuning knob from the environment; the default if unset, not an integer or not
    ``valid``."""
    try:
        value = int(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if valid(value) else default


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
    return _kernels() is not None


def _power_of_two(value: int) -> bool:
    return value >= 1 and not value & (value - 1)


@functools.cache
def _kernels() -> Any:
    """``(rows_kernel, index_kernel, {torch dtype: triton dtype})``, the kernels jitted, or None
    where triton does not import (CPU wheels, a broken install)."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # not only ImportError: a broken install must not reach the caller
        return None

    @triton.jit  # type: ignore[untyped-decorator]
    def rows_kernel(  # type: ignore[no-untyped-def]
        meta_ptr,
        owner_ptr,
        out_ptr,
        dim,
        DTYPE: tl.constexpr,
        ROWS: tl.constexpr,
        ROW_BLOCK: tl.constexpr,
        BUCKETS: tl.constexpr,
    ):
        """Program ``pid`` works for tensor ``t = owner[pid]``, whose ``meta[t]`` row holds
        (address, n, start, first_row, k_sign, k_rot, out_row, first_program): it adds the
        tensor's global rows ``first_row + [p*ROWS, (p+1)*ROWS)`` (``p = pid - first_program``;
        the tensor's first element is global coordinate ``start``, a shard) into
        ``out[out_row, 0:dim]``: bucket ``b`` of row ``g`` holds column ``(b - r(g)) mod dim``."""
        pid = tl.program_id(0)
        meta = meta_ptr + tl.load(owner_ptr + pid).to(tl.int64) * 8
        x_ptr = tl.load(meta).to(tl.pointer_type(DTYPE))
        n = tl.load(meta + 1)
        start = tl.load(meta + 2)
        first_row = tl.load(meta + 3)
        k_sign = tl.load(meta + 4)
        k_rot = tl.load(meta + 5)
        out = out_ptr + tl.load(meta + 6) * dim
        first_row += (pid - tl.load(meta + 7)) * ROWS
        lanes = tl.arange(0, BUCKETS)
        for b0 in range(0, dim, BUCKETS):
            b = b0 + lanes
            in_dim = b < dim
            acc = tl.zeros((BUCKETS,), dtype=tl.float64)
            for r0 in range(0, ROWS, ROW_BLOCK):
                g = first_row + r0 + tl.arange(0, ROW_BLOCK).to(tl.int64)
                # sketch.fmix32, inline (a jitted helper would have to be a module global):
                # int64 values in [0, 2^32), products wrap mod 2^64 and are masked to 32 bits
                r = (((g & 0xFFFFFFFF) * 0x9E3779B1) & 0xFFFFFFFF) ^ k_rot
                r = r ^ (r >> 16)
                r = (r * 0x85EBCA6B) & 0xFFFFFFFF
                r = r ^ (r >> 13)
                r = (r * 0xC2B2AE35) & 0xFFFFFFFF
                rot = (r ^ (r >> 16)) % dim
                col = b[None, :] - rot[:, None]
                col = tl.where(col < 0, col + dim, col)
                i = g[:, None] * dim + col  # global coordinate
                j = i - start  # its place in this shard
                mask = in_dim[None, :] & (j >= 0) & (j < n)
                x = tl.load(x_ptr + j, mask=mask, other=0.0).to(tl.float64)
                h = (((i & 0xFFFFFFFF) * 0x9E3779B1) & 0xFFFFFFFF) ^ k_sign
                h = h ^ (h >> 16)
                h = (h * 0x85EBCA6B) & 0xFFFFFFFF
                h = h ^ (h >> 13)
                h = (h * 0xC2B2AE35) & 0xFFFFFFFF
                h = h ^ (h >> 16)
                x = tl.where(h >= 0x80000000, -x, x)  # the top bit: a negative sign
                acc += tl.sum(x, axis=0)
            tl.atomic_add(out + b, acc, mask=in_dim, sem="relaxed")

    @triton.jit  # type: ignore[untyped-decorator]
    def index_kernel(x_ptr, idx_ptr, out_ptr, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        """``out[idx[k]] += x[k]`` for ``k < n`` (small tensors: the index holds each tensor's
        row offset and its folded sign)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        b = tl.load(idx_ptr + offs, mask=mask, other=0)
        tl.atomic_add(out_ptr + b, x, mask=mask, sem="relaxed")

    dtypes = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    dtypes[torch.float64] = tl.float64
    return rows_kernel, index_kernel, dtypes


class TritonCountSketch:
    """The sums of :class:`~spectrawatch.sketch.FusedCountSketch` (see there) for tensors hashed
    with layer seeds ``seeds`` from global offsets ``starts`` (shards), with no index for the
    large tensors (the small ones' is built here, on first use)."""

    def __init__(
        self,
        numels: list[int],
        dim: int,
        device: torch.device | str,
        *,
        seeds: list[int],
        starts: list[int] | None = None,
        rows: int | None = None,
        row_block: int | None = None,
        buckets: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.numels = list(numels)
        self.dim = dim
        self.seeds = list(seeds)
        self.starts = list(starts) if starts is not None else [0] * len(self.numels)
        if not len(self.seeds) == len(self.starts) == len(self.numels):
            raise ValueError("numels, seeds and starts must have one entry per tensor")
        self.rows = rows or _env_int("SPECTRAWATCH_TRITON_ROWS", ROWS, _power_of_two)
        self.row_block = min(
            self.rows,
            row_block or _env_int("SPECTRAWATCH_TRITON_ROW_BLOCK", ROW_BLOCK, _power_of_two),
        )
        self.buckets = buckets or _env_int("SPECTRAWATCH_TRITON_BUCKETS", BUCKETS, _power_of_two)
        if not all(_power_of_two(v) for v in (self.rows, self.row_block, self.buckets)):
            raise ValueError("rows, row_block and buckets must be powers of two")
        band = self.rows * dim  # a tensor smaller than one band goes to the small kernel
        self.large = [k for k, n in enumerate(self.numels) if n >= band]
        self.small = [k for k, n in enumerate(self.numels) if 0 < n < band]
        self._keys = [hash_keys(seed) for seed in self.seeds]
        self._launch_key: tuple[tuple[int, torch.dtype, bool], ...] | None = None
        self._launches: list[tuple[Any, torch.Tensor, torch.Tensor]] = []
        self._small_index: torch.Tensor | None = None  # row * 2 * dim + folded, int32

    def _plan_launches(
        self, flats: list[torch.Tensor], tl_dtypes: dict[torch.dtype, Any]
    ) -> list[tuple[Any, torch.Tensor, torch.Tensor]]:
        """One ``rows_kernel`` launch per parameter dtype (a few microseconds of Python each,
        where one per tensor cost ~100 launches per step): its tensors' meta rows (see the
        kernel) and the program -> tensor table, on the device."""
        groups: dict[torch.dtype, list[tuple[int, torch.Tensor]]] = {}
        for k, x in zip(self.large, flats, strict=True):
            groups.setdefault(x.dtype, []).append((k, x))
        launches = []
        for dtype, members in groups.items():
            meta: list[list[int]] = []
            owner: list[int] = []
            for t, (k, x) in enumerate(members):
                n, start = x.numel(), self.starts[k]
                first_row = start // self.dim
                programs = -(-((start + n - 1) // self.dim + 1 - first_row) // self.rows)
                meta.append([x.data_ptr(), n, start, first_row, *self._keys[k], k, len(owner)])
                owner.extend([t] * programs)
            launches.append(
                (
                    tl_dtypes[dtype],
                    torch.tensor(meta, dtype=torch.int64).to(self.device, non_blocking=True),
                    torch.tensor(owner, dtype=torch.int32).to(self.device, non_blocking=True),
                )
            )
        return launches

    def _small_index_for(self) -> torch.Tensor:
        """The small tensors' folded index with their row offsets added (built once)."""
        if self._small_index is None:
            parts = [
                signed_buckets(self.numels[k], self.seeds[k], self.dim, "cpu", self.starts[k])
                .to(torch.int32)
                .add_(k * 2 * self.dim)
                for k in self.small
            ]
            self._small_index = torch.cat(parts).to(self.device)
        return self._small_index

    def __call__(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """Sketch ``xs`` (the planned numels, on ``device``): ``(len(xs), dim)`` float64."""
        if self.device.type != "cuda":  # the interpreter (tests)
            return self._sketch(xs)
        with torch.cuda.device(self.device):  # Triton launches on the current device
            return self._sketch(xs)

    def _sketch(self, xs: list[torch.Tensor]) -> torch.Tensor:
        dim = self.dim
        res = torch.zeros(len(self.numels), dim, dtype=torch.float64, device=self.device)
        rows_kernel, index_kernel, tl_dtypes = _kernels()
        # the kernel reads x[0..n) at unit stride: a strided parameter (e.g. a column of a
        # larger tensor) stays strided under reshape(-1), so copy it (kept alive to the launch).
        # Parameters stay where they are from step to step: while every one is contiguous and
        # at the same address, the launch tables of the last step are reused as they are.
        large = [xs[k] for k in self.large]
        key = tuple((x.data_ptr(), x.dtype, x.is_contiguous()) for x in large)
        if key != self._launch_key or not all(c for _, _, c in key):
            flats = [x.reshape(-1).contiguous() for x in large]
            self._launches = self._plan_launches(flats, tl_dtypes)
            self._launch_key = key
        for tl_dtype, meta, owner in self._launches:
            rows_kernel[(owner.numel(),)](
                meta,
                owner,
                res,
                dim,
                DTYPE=tl_dtype,
                ROWS=self.rows,
                ROW_BLOCK=self.row_block,
                BUCKETS=self.buckets,
            )
        if self.small:
            smalls = [xs[k].reshape(-1) for k in self.small]
            common = functools.reduce(torch.promote_types, (f.dtype for f in smalls))
            smalls = [f.to(common) for f in smalls]  # no copy where the dtype already is common
            out = res.new_zeros(len(self.numels), 2 * dim)
            index = self._small_index_for()
            n = index.numel()
            index_kernel[(-(-n // SMALL_BLOCK),)](
                torch.cat(smalls), index, out, n, BLOCK=SMALL_BLOCK
            )
            res += out[:, :dim] - out[:, dim:]
        return res


class CountSketcher:
    """The all-parameter sketcher the client uses: :class:`TritonCountSketch` where
    :func:`available`, else (and for good after its first error) ``FusedCountSketch`` with the
    concatenated :func:`~spectrawatch.sketch.signed_buckets` index of every tensor.

    The torch path's index (2 bytes per coordinate on the device, int16) is built here when
    that path is chosen, so on the thread that constructs the sketcher; the Triton path needs
    none, and builds it only if it falls back (on the training thread, once).
    """

    def __init__(
        self,
        numels: list[int],
        dim: int,
        device: torch.device | str,
        *,
        seeds: list[int],
        starts: list[int] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.numels = list(numels)
        self.dim = dim
        self.seeds = list(seeds)
        self.starts = list(starts) if starts is not None else [0] * len(self.numels)
        self.triton: TritonCountSketch | None = None
        if available(self.device):
            self.triton = TritonCountSketch(
                self.numels, dim, self.device, seeds=self.seeds, starts=self.starts
            )
        self._torch: FusedCountSketch | None = None
        self.index: torch.Tensor | None = None
        self.fallback_reason: str | None = None
        if self.triton is None:
            self._torch_path()

    @property
    def backend(self) -> str:
        return "triton" if self.triton is not None else "torch"

    def _torch_path(self) -> FusedCountSketch:
        """The torch-ops sketcher, with the concatenated index built on first use."""
        if self._torch is None:
            index = torch.empty(sum(self.numels), dtype=folded_dtype(self.dim), device=self.device)
            at = 0
            for n, seed, start in zip(self.numels, self.seeds, self.starts, strict=True):
                index[at : at + n] = signed_buckets(n, seed, self.dim, self.device, start)
                at += n
            self.index = index
            self._torch = FusedCountSketch(self.numels, self.dim, self.device)
        return self._torch

    def __call__(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """``(len(xs), dim)`` float64 sketches of ``xs`` (the planned numels, on ``device``)."""
        if self.triton is not None:
            try:
                return self.triton(xs)
            except Exception as exc:  # a compile or launch error: the torch path
                self.triton = None
                self.fallback_reason = f"{type(exc).__name__}: {exc}"[:300]
                _log.warning(
                    "spectrawatch: Triton sketch failed (%s); using torch ops", self.fallback_reason
                )
        torch_path = self._torch_path()
        assert self.index is not None
        return torch_path(xs, self.index)
