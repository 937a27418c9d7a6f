"""Seeded count-sketch (sparse Johnson-Lindenstrauss) projections; pure functions.

Coordinate ``i`` of a flattened tensor goes to bucket ``h(i)`` in ``[0, d)`` with sign
``s(i)`` in {-1, +1}; ``sketch(x)[b] = sum_{h(i)=b} s(i) x_i``. The map is linear, so
``sketch(theta_t) - sketch(theta_s) = sketch(theta_t - theta_s)`` and inner products are
preserved in expectation (Charikar, Chen & Farach-Colton 2002; Clarkson & Woodruff 2013).

``h`` and ``s`` come from an integer hash of ``(seed, i)`` evaluated with int64 tensor ops, so
the projection is the same on every device and the server can rebuild it from the seed alone.
"""

from __future__ import annotations

import bisect
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB
_LOW31 = (1 << 31) - 1


@dataclass(frozen=True)
class SketchSpec:
    """Sketch dimension ``dim`` (d) and the run-level ``seed`` it is derived from."""

    dim: int
    seed: int

    def layer_seed(self, name: str) -> int:
        """A per-layer seed, stable across processes (not Python's salted ``hash``)."""
        return (self.seed * 1_000_003 + zlib.crc32(name.encode())) & _LOW31


def _logical_shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _wrap_int64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def hash_coordinates(
    n: int, seed: int, dim: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets ``(n,) int64`` in ``[0, dim)`` and signs ``(n,) float32`` of coordinates 0..n-1.

    SplitMix64 finaliser on ``i + seed * golden``; int64 overflow wraps identically on CPU and CUDA.
    On CPU the same integer recipe runs in numpy ``uint64`` (about 7x faster than torch int64
    ops; identical output, pinned by a test); on other devices it runs in torch.
    """
    if torch.device(device).type == "cpu":
        b_np, s_np = _hash_numpy(n, seed, dim)
        return torch.from_numpy(b_np), torch.from_numpy(s_np)
    return _hash_torch(n, seed, dim, device)


def _hash_torch(
    n: int, seed: int, dim: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference recipe in torch int64 ops (used off-CPU; the numpy path must match it)."""
    x = torch.arange(n, dtype=torch.int64, device=device) + _wrap_int64(seed * _GOLDEN)
    x = (x ^ _logical_shift(x, 30)) * _MIX1
    x = (x ^ _logical_shift(x, 27)) * _MIX2
    x = x ^ _logical_shift(x, 31)
    buckets = torch.remainder(x & _LOW31, dim)
    signs = ((_logical_shift(x, 40) & 1) * 2 - 1).to(torch.float32)
    return buckets, signs


_U64 = (1 << 64) - 1


def _hash_numpy(n: int, seed: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`hash_coordinates` in numpy ``uint64`` (wrapping multiply, logical shift)."""
    buckets = np.empty(n, dtype=np.int64)
    signs = np.empty(n, dtype=np.float32)
    for start in range(0, n, _HASH_CHUNK):
        stop = min(n, start + _HASH_CHUNK)
        b, neg = _hash_range(start, stop, seed, dim)
        buckets[start:stop] = b
        signs[start:stop] = neg
    signs *= -2
    signs += 1
    return buckets, signs


def _hash_range(start: int, stop: int, seed: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Buckets and negative-sign flags (0/1), both ``(stop - start,) uint64``."""
    x = np.arange(start, stop, dtype=np.uint64)
    x += np.uint64((seed * _GOLDEN) & _U64)
    t = np.empty_like(x)
    np.right_shift(x, np.uint64(30), out=t)
    x ^= t
    x *= np.uint64(_MIX1 & _U64)
    np.right_shift(x, np.uint64(27), out=t)
    x ^= t
    x *= np.uint64(_MIX2 & _U64)
    np.right_shift(x, np.uint64(31), out=t)
    x ^= t
    np.bitwise_and(x, np.uint64(_LOW31), out=t)
    t %= np.uint64(dim)
    np.right_shift(x, np.uint64(40), out=x)
    x &= np.uint64(1)
    x ^= np.uint64(1)  # sign bit 1 -> +1, so the flag "negative" is its complement
    return t, x


_HASH_CHUNK = 1 << 20


def folded_dtype(dim: int) -> torch.dtype:
    """dtype of a :func:`signed_buckets` index for sketch dimension ``dim``."""
    return torch.int16 if 2 * dim <= torch.iinfo(torch.int16).max else torch.int32


def signed_buckets(
    n: int, seed: int, dim: int, device: torch.device | str = "cpu", start: int = 0
) -> torch.Tensor:
    """Bucket and sign folded into one ``(n,)`` index in ``[0, 2*dim)`` for coordinates
    ``start .. start+n-1`` (a shard of a larger flattened tensor uses its global offset).

    Coordinate ``i`` goes to ``h(i)`` when ``s(i) = +1`` and to ``h(i) + dim`` when ``s(i) = -1``;
    :func:`count_sketch_signed` then subtracts the two halves. Same projection as
    :func:`count_sketch` with :func:`hash_coordinates`. Stored as int16 when ``2*dim`` fits
    (d <= 16383, so 2 bytes per coordinate when cached, instead of 12 for buckets + signs),
    else int32; there is no sign multiply per call.
    """
    small = folded_dtype(dim)
    folded = np.empty(n, dtype=np.int16 if small == torch.int16 else np.int32)
    for lo in range(0, n, _HASH_CHUNK):  # chunked: transient memory O(chunk), not O(n)
        hi = min(n, lo + _HASH_CHUNK)
        buckets, negative = _hash_range(start + lo, start + hi, seed, dim)
        negative *= np.uint64(dim)
        buckets += negative
        folded[lo:hi] = buckets
    return torch.from_numpy(folded).to(device)


def count_sketch_signed(
    x: torch.Tensor,
    folded: torch.Tensor,
    dim: int,
    dtype: torch.dtype = torch.float64,
    chunk: int | None = None,
    private: int | None = None,
) -> torch.Tensor:
    """Sketch a flat ``(n,)`` tensor with a :func:`signed_buckets` index; ``(dim,)`` in ``dtype``.

    The input (and an int16 index) is converted chunk by chunk into reused buffers of ``chunk``
    elements (default 2^18 on CPU, where they stay in cache and avoid page faults -- about 3x
    faster than converting the whole tensor -- and 2^24 elsewhere), so the transient memory is
    ``chunk * (itemsize + 4)`` bytes (``+ 4`` more off the CPU: the block offsets below), not a
    full-size copy.

    Off the CPU every ``private`` (default 2^16) consecutive coordinates add into their own copy
    of the ``2 * dim`` buckets, summed at the end: a GPU's atomic adds then meet ~``private /
    (2 * dim)`` times per address instead of ~``n / (2 * dim)`` (on an H200 the shared buckets
    cost a GPT-2-small step +23 %). ``private=0`` turns this off; any value gives the same sums up
    to float rounding.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    on_cpu = flat.device.type == "cpu"
    if chunk is None:
        chunk = 1 << 18 if on_cpu else 1 << 24
    if private is None:
        private = 0 if on_cpu else 1 << 16
    size = min(chunk, n)
    if private:
        size = -(-size // private) * private  # whole private blocks per chunk
        chunk = size
    copies = max(1, -(-size // private)) if private else 1
    out = torch.zeros(copies * 2 * dim, dtype=dtype, device=x.device)
    buf = torch.empty(size, dtype=dtype, device=x.device)
    wide_index = folded.dtype in (torch.int32, torch.int64)
    ibuf = (
        None
        if wide_index and not private
        else torch.empty(size, dtype=torch.int32, device=x.device)
    )
    offsets = (
        torch.arange(size, dtype=torch.int32, device=x.device).div_(private, rounding_mode="floor")
        * (2 * dim)
        if private
        else None
    )
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        part = buf[:m]
        part.copy_(flat[start : start + m])
        idx = folded[start : start + m]
        if ibuf is not None:
            idx = ibuf[:m].copy_(idx)
        if offsets is not None:
            idx = idx.add_(offsets[:m])
        out.index_add_(0, idx, part)
    total = out.view(copies, 2 * dim).sum(0)
    return total[:dim] - total[dim:]


class _Chunk(NamedTuple):
    """One chunk of the concatenated coordinates ``[g0, g1)`` and how it maps to tensors."""

    g0: int
    g1: int
    pieces: list[tuple[int, int, int]]  # (tensor, local lo, local hi), in order
    # per piece: chunk coordinate -> virtual coordinate (block-aligned); where every piece is one
    # block, the piece's bucket offset instead (block * 2 * dim)
    shifts: torch.Tensor
    lengths: torch.Tensor  # per piece: its length
    owners: torch.Tensor  # per block: the tensor whose coordinates it holds
    blocks: int


@dataclass
class _Plan:
    """A :class:`_Chunk` while it is planned (host lists)."""

    g0: int
    g1: int
    pieces: list[tuple[int, int, int]] = field(default_factory=list)
    shifts: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)
    blocks: int = 0


class FusedCountSketch:
    """:func:`count_sketch_signed` of many flat tensors at once: ``(len(xs), dim)``.

    One pass per chunk of ``chunk`` coordinates of the tensors laid end to end (a large tensor
    spans several chunks, small ones share one), instead of one per tensor: the inputs are
    copied into one buffer by ``torch.cat``, their indices are a slice of one concatenated
    :func:`signed_buckets` index, and a single ``index_add_`` lands every coordinate in a bucket
    of its own tensor's *block* (as ``private`` in :func:`count_sketch_signed`: off the CPU every
    2^16 coordinates of a tensor get their own ``2 * dim`` buckets; on the CPU a block is the
    tensor's part of the chunk). So about ten kernel launches per chunk replace about ten per
    tensor (~1,500 per step for GPT-2 small's 149 tensors, where launch overhead, not memory
    traffic, is what a GPU step pays). One more ``index_add_`` sums the blocks into their
    tensors' rows. Same sums as :func:`count_sketch_signed` up to float rounding.

    The plan is built once for the tensors' sizes; every call passes tensors of those sizes, in
    the same order, on ``device``.
    """

    def __init__(
        self,
        numels: list[int],
        dim: int,
        device: torch.device | str,
        *,
        dtype: torch.dtype = torch.float64,
        chunk: int | None = None,
        private: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        on_cpu = self.device.type == "cpu"
        self.numels = list(numels)
        self.dim = dim
        self.dtype = dtype
        self.chunk = chunk or (1 << 18 if on_cpu else 1 << 24)
        if private is None:
            private = 0 if on_cpu else 1 << 16
        self.block = private or self.chunk  # on the CPU a piece (<= chunk) is one block
        offsets = [0, *np.cumsum(self.numels).tolist()]
        self.total = offsets[-1]
        plans = [self._plan_chunk(g0, offsets) for g0 in range(0, self.total, self.chunk)]
        dim2 = 2 * dim
        reach = 0  # the largest bucket index or virtual coordinate
        for p in plans:
            if p.blocks == len(p.pieces):  # one block per piece: shift by its bucket offset
                p.shifts[:] = [i * dim2 for i in range(p.blocks)]
                reach = max(reach, p.blocks * dim2)
            else:
                reach = max(reach, p.blocks * max(dim2, self.block))
        self.index_dtype = torch.int32 if reach < 2**31 else torch.int64
        # chunk coordinates are needed only where a piece spans several blocks (off the CPU)
        self._needs_coords = any(p.blocks != len(p.pieces) for p in plans)
        self.chunks = [
            _Chunk(
                p.g0,
                p.g1,
                p.pieces,
                torch.tensor(p.shifts, dtype=self.index_dtype, device=self.device),
                torch.tensor(p.lengths, dtype=torch.int64, device=self.device),
                torch.tensor(p.owners, dtype=torch.int64, device=self.device),
                p.blocks,
            )
            for p in plans
        ]

    def _plan_chunk(self, g0: int, offsets: list[int]) -> _Plan:
        plan = _Plan(g0, min(self.total, g0 + self.chunk))
        k = bisect.bisect_right(offsets, g0) - 1
        while k < len(self.numels) and offsets[k] < plan.g1:
            lo, hi = max(g0, offsets[k]) - offsets[k], min(plan.g1, offsets[k + 1]) - offsets[k]
            if hi > lo:
                plan.pieces.append((k, lo, hi))
                plan.shifts.append(plan.blocks * self.block - (offsets[k] + lo - g0))
                plan.lengths.append(hi - lo)
                count = -(-(hi - lo) // self.block)
                plan.owners.extend([k] * count)
                plan.blocks += count
            k += 1
        return plan

    def __call__(self, xs: list[torch.Tensor], folded: torch.Tensor) -> torch.Tensor:
        """Sketch ``xs`` (any shapes with the planned numels) with their concatenated index."""
        dim2 = 2 * self.dim
        out = torch.zeros(len(self.numels), dim2, dtype=self.dtype, device=self.device)
        size = min(self.chunk, self.total)
        buf = torch.empty(size, dtype=self.dtype, device=self.device)
        ibuf = torch.empty(size, dtype=self.index_dtype, device=self.device)
        coords = (
            torch.arange(size, dtype=self.index_dtype, device=self.device)
            if self._needs_coords
            else None
        )
        flats = [x.reshape(-1) for x in xs]
        staging: dict[torch.dtype, torch.Tensor] = {}
        for c in self.chunks:
            m = c.g1 - c.g0
            part = buf[:m]
            pieces = [flats[k][lo:hi] for k, lo, hi in c.pieces]
            dtypes = {p.dtype for p in pieces}
            if len(dtypes) == 1 and (dt := dtypes.pop()) != self.dtype:
                # cat in the parameters' dtype, then one cast: a cat whose output dtype differs
                # from its inputs' is done one copy per input on CUDA
                stage = staging.get(dt)
                if stage is None:
                    stage = staging[dt] = torch.empty(size, dtype=dt, device=self.device)
                part.copy_(torch.cat(pieces, out=stage[:m]))
            else:
                torch.cat(pieces, out=part)
            idx = ibuf[:m].copy_(folded[c.g0 : c.g1])
            if c.blocks == len(c.pieces):  # one block per piece (the CPU): offset by piece
                if c.blocks > 1:
                    idx.add_(torch.repeat_interleave(c.shifts, c.lengths, output_size=m))
            else:  # block of a coordinate = its block-aligned virtual coordinate // block
                assert coords is not None
                if len(c.pieces) == 1:
                    virtual = coords[:m] + c.shifts[0]
                else:
                    shift = torch.repeat_interleave(c.shifts, c.lengths, output_size=m)
                    virtual = shift.add_(coords[:m])
                idx.add_(virtual.div_(self.block, rounding_mode="floor").mul_(dim2))
            acc = torch.zeros(c.blocks * dim2, dtype=self.dtype, device=self.device)
            acc.index_add_(0, idx, part)
            out.index_add_(0, c.owners, acc.view(c.blocks, dim2))
        return out[:, : self.dim] - out[:, self.dim :]


def count_sketch(
    x: torch.Tensor,
    buckets: torch.Tensor,
    signs: torch.Tensor,
    dim: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sketch the last axis of ``x`` (``(..., n)``) to ``(..., dim)`` in ``dtype``; O(n) work."""
    flat = x.reshape(-1, x.shape[-1]).to(dtype) * signs.to(dtype)
    out = torch.zeros(flat.shape[0], dim, dtype=dtype, device=x.device)
    out.index_add_(1, buckets, flat)
    return out.reshape(*x.shape[:-1], dim)


def sketch_tensor(
    x: torch.Tensor, spec: SketchSpec, name: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Sketch one whole tensor (flattened) with the layer's seed; ``(spec.dim,)``."""
    buckets, signs = hash_coordinates(x.numel(), spec.layer_seed(name), spec.dim, x.device)
    return count_sketch(x.reshape(-1), buckets, signs, spec.dim, dtype)
