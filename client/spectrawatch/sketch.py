"""Seeded count-sketch (sparse Johnson-Lindenstrauss) projections; pure functions.

Coordinate ``i`` of a flattened tensor goes to bucket ``h(i)`` in ``[0, d)`` with sign
``s(i)`` in {-1, +1}; ``sketch(x)[b] = sum_{h(i)=b} s(i) x_i``. The map is linear, so
``sketch(theta_t) - sketch(theta_s) = sketch(theta_t - theta_s)`` and inner products are
preserved in expectation (Charikar, Chen & Farach-Colton 2002; Clarkson & Woodruff 2013).

``h`` and ``s`` come from integer hashes of ``(seed, i)`` (see :func:`hash_coordinates`), so
the projection is the same on every device and can be rebuilt from the seed alone.
"""

from __future__ import annotations

import bisect
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

_GOLD32 = 0x9E3779B1  # 2^32 / golden ratio, odd: i -> i * _GOLD32 is a bijection of uint32
_FMIX1 = 0x85EBCA6B  # MurmurHash3's 32-bit finaliser constants
_FMIX2 = 0xC2B2AE35
_M32 = 0xFFFFFFFF
_LOW31 = (1 << 31) - 1
HASH_NAME = "rotated-rows-fmix32-v2"  # sent in frame metadata (clients up to 0.1.0: "splitmix64")


@dataclass(frozen=True)
class SketchSpec:
    """Sketch dimension ``dim`` (d) and the run-level ``seed`` it is derived from."""

    dim: int
    seed: int

    def layer_seed(self, name: str) -> int:
        """A per-layer seed, stable across processes (not Python's salted ``hash``)."""
        return (self.seed * 1_000_003 + zlib.crc32(name.encode())) & _LOW31


def fmix32(h: int) -> int:
    """MurmurHash3's finaliser of a uint32 (pure Python; the tensor versions must match it)."""
    h ^= h >> 16
    h = (h * _FMIX1) & _M32
    h ^= h >> 13
    h = (h * _FMIX2) & _M32
    return h ^ (h >> 16)


def hash_keys(seed: int) -> tuple[int, int]:
    """``(sign key, rotation key)`` of a layer seed, each a uint32."""
    return fmix32((2 * seed + 1) & _M32), fmix32((2 * seed + 2) & _M32)


def hash_coordinates(
    n: int, seed: int, dim: int, device: torch.device | str = "cpu", start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets ``(n,) int64`` in ``[0, dim)`` and signs ``(n,) float32`` of coordinates
    ``start .. start+n-1``.

    *Rotated rows*: coordinate ``i`` lies in row ``g = i // dim`` at column ``c = i % dim``; each
    row is cyclically shifted by its own pseudo-random ``r(g)``, so ``h(i) = (c + r(g)) mod dim``,
    and ``s(i)`` is the top bit of a hash of ``i``. Two coordinates of one row never share a
    bucket; two of different rows share one with probability ``1/dim`` (over the seed), as in a
    fully random count-sketch, and every sign is independent of the buckets. What this buys is a
    GPU kernel with no index and no atomics per coordinate: a program reads whole rows
    (contiguous, shifted) and sums them column-wise (:mod:`spectrawatch._sketch_triton`).

    ``r(g) = fmix32(g * golden ^ k_rot) mod dim`` and ``s(i) = 1 - 2 * (fmix32(i * golden ^
    k_sign) >> 31)``, with ``(k_sign, k_rot) = hash_keys(seed)`` and ``i``, ``g`` taken modulo
    2^32 (a tensor shard of more than 4.3 G coordinates would repeat its signs). On CPU the
    recipe runs in numpy ``uint32``; elsewhere in torch ``int64`` ops masked to 32 bits
    (identical output, pinned by a test).
    """
    if torch.device(device).type == "cpu":
        b_np, s_np = _hash_numpy(n, seed, dim, start)
        return torch.from_numpy(b_np), torch.from_numpy(s_np)
    return _hash_torch(n, seed, dim, device, start)


def _fmix32_torch(h: torch.Tensor) -> torch.Tensor:
    """:func:`fmix32` of int64 values in ``[0, 2^32)`` (products wrap mod 2^64, then masked)."""
    h = h ^ (h >> 16)
    h = (h * _FMIX1) & _M32
    h = h ^ (h >> 13)
    h = (h * _FMIX2) & _M32
    return h ^ (h >> 16)


def _hash_torch(
    n: int, seed: int, dim: int, device: torch.device | str, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe in torch int64 ops (used off-CPU; the numpy path must match it)."""
    k_sign, k_rot = hash_keys(seed)
    i = torch.arange(start, start + n, dtype=torch.int64, device=device)
    rot = torch.remainder(_fmix32_torch((((i // dim) & _M32) * _GOLD32 & _M32) ^ k_rot), dim)
    buckets = torch.remainder(i % dim + rot, dim)
    negative = _fmix32_torch(((i & _M32) * _GOLD32 & _M32) ^ k_sign) >> 31
    return buckets, (1 - 2 * negative).to(torch.float32)


def _fmix32_numpy(h: np.ndarray) -> np.ndarray:
    """:func:`fmix32` of a ``uint32`` array, in place (uint32 products wrap)."""
    h ^= h >> np.uint32(16)
    h *= np.uint32(_FMIX1)
    h ^= h >> np.uint32(13)
    h *= np.uint32(_FMIX2)
    h ^= h >> np.uint32(16)
    return h


def _hash_numpy(n: int, seed: int, dim: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """:func:`hash_coordinates` in numpy, chunked (transient memory O(chunk))."""
    buckets = np.empty(n, dtype=np.int64)
    signs = np.empty(n, dtype=np.float32)
    for lo in range(0, n, _HASH_CHUNK):
        hi = min(n, lo + _HASH_CHUNK)
        b, neg = _hash_range(start + lo, start + hi, seed, dim)
        buckets[lo:hi] = b
        signs[lo:hi] = neg
    signs *= -2
    signs += 1
    return buckets, signs


def _hash_range(start: int, stop: int, seed: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Buckets ``int64`` and negative-sign flags ``uint32`` (0/1) of coordinates
    ``start .. stop-1``; the row shifts are hashed once per row, not per coordinate."""
    k_sign, k_rot = hash_keys(seed)
    g0, g1 = start // dim, (stop - 1) // dim + 1
    rows = np.arange(g0, g1, dtype=np.uint64).astype(np.uint32)  # modulo 2^32
    rows *= np.uint32(_GOLD32)
    rows ^= np.uint32(k_rot)
    rot = (_fmix32_numpy(rows) % np.uint32(dim)).astype(np.int64)
    i = np.arange(start, stop, dtype=np.int64)
    buckets = i % dim
    buckets += np.repeat(rot, dim)[start - g0 * dim : stop - g0 * dim]
    buckets[buckets >= dim] -= dim
    h = i.astype(np.uint32)  # modulo 2^32
    h *= np.uint32(_GOLD32)
    h ^= np.uint32(k_sign)
    return buckets, _fmix32_numpy(h) >> np.uint32(31)


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
        buckets += negative.astype(np.int64) * dim
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
    ``chunk * (itemsize + 4)`` bytes (``+ 8`` on the CPU, whose ``scatter_add_`` takes an int64
    index; ``+ 4`` more elsewhere: the block offsets below), not a full-size copy.

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
    # the CPU's 1-D scatter_add_ (~2x index_add_'s speed there) takes int64 indices only
    scatter = on_cpu and not private
    usable = (torch.int64,) if scatter else (torch.int32, torch.int64)
    ibuf = (
        None
        if folded.dtype in usable and not private
        else torch.empty(size, dtype=torch.int64 if scatter else torch.int32, device=x.device)
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
        if scatter:
            out.scatter_add_(0, idx, part)
        else:
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

    On the CPU (``private`` 0) the chunks are split into ``workers`` contiguous runs, each
    summed by a thread of a shared pool into its own rows, and the partial rows added in run
    order (torch's kernels release the GIL): default ``torch.get_num_threads()``, the thread
    budget the training itself uses; a training step is paused while its sketch runs. Same sums
    up to float rounding, and the same bits on every call with the same ``workers``. There each
    piece of a chunk adds into its own block's buckets by a 1-D ``scatter_add_`` of its slice,
    without per-coordinate block offsets: GPT-2 small (124 M coordinates, one thread) 0.29 ->
    0.20 s per sketch against one ``index_add_`` per chunk, the same bits
    (``benchmarks/results/client.md``).
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
        workers: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        on_cpu = self.device.type == "cpu"
        self.workers = workers
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
        # scatter_add_ (the CPU's, in _sum_chunks) takes int64 indices only
        self.index_dtype = torch.int32 if reach < 2**31 and not on_cpu else torch.int64
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
        flats = [x.reshape(-1) for x in xs]
        workers = self.workers if self.workers is not None else torch.get_num_threads()
        workers = min(workers, len(self.chunks) // 2)
        if self.device.type != "cpu" or self.block != self.chunk or workers < 2:
            out = self._sum_chunks(self.chunks, flats, folded)
        else:
            runs = np.array_split(np.arange(len(self.chunks)), workers)
            grad = torch.is_grad_enabled()

            def run(ids: np.ndarray) -> torch.Tensor:
                with torch.set_grad_enabled(grad):  # grad mode is per thread
                    return self._sum_chunks([self.chunks[i] for i in ids], flats, folded)

            parts = list(_cpu_pool(workers).map(run, runs))
            out = parts[0]
            for part in parts[1:]:
                out += part
        return out[:, : self.dim] - out[:, self.dim :]

    def _sum_chunks(
        self, chunks: list[_Chunk], flats: list[torch.Tensor], folded: torch.Tensor
    ) -> torch.Tensor:
        """``(L, 2 * dim)`` bucket sums of ``chunks`` (positive and negative halves)."""
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
        staging: dict[torch.dtype, torch.Tensor] = {}
        for c in chunks:
            m = c.g1 - c.g0
            part = buf[:m]
            pieces = [flats[k][lo:hi] for k, lo, hi in c.pieces]
            dtypes = {p.dtype for p in pieces}
            if len(pieces) == 1:  # one piece: one copy (and cast), no cat
                part.copy_(pieces[0])
            elif len(dtypes) == 1 and (dt := dtypes.pop()) != self.dtype:
                # cat in the parameters' dtype, then one cast: a cat whose output dtype differs
                # from its inputs' is done one copy per input on CUDA
                stage = staging.get(dt)
                if stage is None:
                    stage = staging[dt] = torch.empty(size, dtype=dt, device=self.device)
                part.copy_(torch.cat(pieces, out=stage[:m]))
            else:
                torch.cat(pieces, out=part)
            idx = ibuf[:m].copy_(folded[c.g0 : c.g1])
            acc = torch.zeros(c.blocks * dim2, dtype=self.dtype, device=self.device)
            if self.device.type == "cpu" and c.blocks == len(c.pieces):
                # one block per piece: each piece scatters into its own block's buckets, no
                # per-coordinate offsets (1-D scatter_add_ is ~2x index_add_'s speed on a CPU)
                at = 0
                for b, (_, lo, hi) in enumerate(c.pieces):
                    end = at + hi - lo
                    acc[b * dim2 : (b + 1) * dim2].scatter_add_(0, idx[at:end], part[at:end])
                    at = end
                out.index_add_(0, c.owners, acc.view(c.blocks, dim2))
                continue
            if c.blocks == len(c.pieces):  # one block per piece: offset by piece
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
            acc.index_add_(0, idx, part)
            out.index_add_(0, c.owners, acc.view(c.blocks, dim2))
        return out


_POOL: dict[int, ThreadPoolExecutor] = {}  # size -> the one shared pool
_POOL_LOCK = threading.Lock()
os.register_at_fork(after_in_child=_POOL.clear)  # a child has none of the parent's threads


def _cpu_pool(workers: int) -> ThreadPoolExecutor:
    """The shared pool of CPU sketch threads, grown to ``workers`` when needed."""
    with _POOL_LOCK:
        size, pool = next(iter(_POOL.items()), (0, None))
        if pool is None or size < workers:
            if pool is not None:
                pool.shutdown(wait=False)  # work already given to it still runs
            _POOL.clear()
            pool = _POOL[workers] = ThreadPoolExecutor(
                workers, thread_name_prefix="spectrawatch-sketch"
            )
        return pool


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
