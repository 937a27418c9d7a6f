"""Batched symmetric eigenvalues, on the processor that is fast for their size.

On CUDA, ``torch.linalg.eigvalsh`` of a stack of matrices uses cuSOLVER's batched Jacobi solver
only up to 32 x 32; larger matrices are decomposed one call per matrix (torch's
``linalg_eigh_cusolver`` dispatch). On an H200 that made the 150 float64 64 x 64 Gram matrices of
one GPT-2-sized SED step cost ~50 ms, and FARMS' ~4,000 windows of 100 x 100 cost 3.2 s
(``benchmarks/results/gpu_h200.md``), while LAPACK on one host core needs ~0.1-0.5 ms for each.
Stacks of such mid-sized symmetric matrices are therefore decomposed on the host (large stacks
split over a pool of threads: :func:`host_eigvalsh`). Where the Grams' own matrices are at hand
(HT-SR, FARMS windows), their squared singular values come from cuSOLVER's strided
batched ``gesvda`` instead, one call per stack (:func:`squared_svdvals`): FARMS' windows in 32 ms
vs 0.45-0.56 s on 16 host cores (H200), and, since session 20, the whole weights of up to
:data:`SVD_MAX` columns as well. On an H100 the 49 float64 768 x 768 Grams of GPT-2 small took
0.37 s through cuSOLVER's ``syevd``, 1.5 s through MAGMA and 1.2-1.6 s on its host's 16 cores
(``benchmarks/results/gpu_h100.md``); each ``syevd`` is latency-bound (~7.5 ms, as slow in
float32), so they were spread over a few CUDA streams, one host thread each
(:func:`on_streams`, :func:`streams_eigvalsh`; 350 -> 260 ms on an H200). One ``gesvda`` call per
shape's stack of the matrices themselves, the stacks on 4 streams, does better: the whole
GPT-2-shaped HT-SR with the MP fit took 0.205 s best / 0.251 s median on an H200 against 0.418 /
0.440 s by ``syevd`` of the Grams (alphas equal to the CPU's to 5.5e-13; peak GPU memory 4.4 vs
0.7 GiB: ``gesvda``'s workspace; ``benchmarks/results/gpu_h200.md``, session 20). Wider matrices
(unmeasured) keep ``syevd``, and a ``gesvda`` that runs out of memory falls back to it.

On the CPU, the torch wheel's BLAS/LAPACK (MKL) was slower than numpy's (OpenBLAS) on the AMD
EPYC this project is measured on (``benchmarks/results/htsr.md``): 1.6-2x for the float64 Grams
and eigendecompositions of 768-wide weights, 2.2x for the Grams of stacks of 64-160-wide FARMS
windows (numpy's matmul uses ``syrk`` for ``A^T A``), 0-15 % for eigendecompositions from
:data:`NUMPY_MIN_EIG` columns up, while torch is faster below that. So CPU Grams always, and
eigendecompositions from :data:`NUMPY_MIN_EIG` columns up, go through numpy (zero-copy views,
same LAPACK driver family; results equal to round-off). Re-measured in session 10 with one
thread each (OpenBLAS and MKL pinned to 1): torch was the faster at 100 (0.27 vs 0.36 ms) and
160 (0.84 vs 0.91 ms), numpy at 768 (39.7 vs 41.2 ms), and the whole GPT-2-shaped HT-SR + FARMS
took 5.26-5.44 vs 5.61-5.69 s (best of 3-6, three A/B runs) with FARMS' 100 x 100 windows through
torch. So stacks up to :data:`TORCH_EIG_MAX` columns go through torch, unless the host splits
them over its pool of threads (:func:`host_eigvalsh`, from 2 threads of budget: numpy with one
BLAS thread per pool thread, 1.9x on 2 cores where torch's threaded MKL call gained nothing).
The wheel's ``gesdd`` is also 2-3.4x slower on a wide matrix than on its transpose
(768 x 3072 float64: 0.78 vs 0.26 s), so :func:`svdvals` decomposes CPU matrices in their tall
orientation.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

CUDA_BATCHED_MAX = 32  # largest n that torch sends to cuSOLVER's batched syevj
HOST_MAX = 160  # largest n of a CUDA stack decomposed by the host's LAPACK instead
NUMPY_MIN_EIG = 64  # smallest n of a CPU stack whose eigenvalues numpy computes ...
TORCH_EIG_MAX = 160  # ... except stacks up to this n that are not split over a thread pool
_NUMPY_DTYPES = (torch.float32, torch.float64)
POOL_MIN_WORK = 8 * 100**3  # smallest batch * n^3 that the host splits over a pool of threads
POOL_MAX_THREADS = 16
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
STREAMS_ENV = "SPECTRAWATCH_CUDA_EIG_STREAMS"
SVD_MAX = 1024  # widest CUDA matrices (smaller side) decomposed by gesvda; measured to 768
SVD_ENV = "SPECTRAWATCH_CUDA_SVD"  # "stacks": gesvda for mid-sized stacks only (before session 20)
DEFAULT_STREAMS = 4  # CUDA streams a stack of large matrices is split over
_stream_pool: ThreadPoolExecutor | None = None
_stream_local = threading.local()
_linalg_ready: set[torch.device] = set()


def host_threads() -> int:
    """Threads the host's eigensolves may use: the cores this process may run on (its CPU
    affinity), at most torch's intra-op thread count (``torch.set_num_threads``, the budget a
    user or ``spectrawatch worker`` sets) and :data:`POOL_MAX_THREADS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, torch.get_num_threads(), POOL_MAX_THREADS))


def host_eigvalsh(stack: np.ndarray) -> np.ndarray:
    """``np.linalg.eigvalsh`` of a stack ``(..., n, n)``; a stack worth :data:`POOL_MIN_WORK` or
    more is split over a pool of :func:`host_threads` threads (LAPACK releases the GIL), each
    with a single-threaded BLAS meanwhile (:func:`one_blas_thread`).

    One call decomposes a stack one matrix after another, and BLAS threads inside LAPACK's
    tridiagonal reduction scale poorly. On this project's 2-core box (``benchmarks/results/
    htsr.md``, session 11): float64 768 x 768 Grams 38 ms each on one thread, 27-32 ms in one
    call with OpenBLAS on both cores, 19-26 ms split over 2 threads with one BLAS thread each
    (35-43 ms with two each: oversubscribed); 100 x 100 FARMS windows 0.35 -> 0.17-0.20 ms. On
    the 16-core host of an H100, 3,969 windows took 1.69 s in one call and 0.53 s over 16
    threads (``benchmarks/htsr_breakdown.py``).
    """
    n = stack.shape[-1]
    flat = stack.reshape(-1, n, n)
    if not _pooled(len(flat), n):
        return np.linalg.eigvalsh(stack)
    threads = min(host_threads(), len(flat))
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(POOL_MAX_THREADS, thread_name_prefix="spectrawatch-eig")
    with one_blas_thread():
        parts = list(_pool.map(np.linalg.eigvalsh, np.array_split(flat, threads)))
    return np.concatenate(parts).reshape(stack.shape[:-1])


def _pooled(batch: int, n: int) -> bool:
    """Whether :func:`host_eigvalsh` splits a stack of ``batch`` ``n x n`` matrices over its
    pool: two or more threads to use and enough work to pay for the hand-off."""
    return batch >= 2 and batch * n**3 >= POOL_MIN_WORK and host_threads() >= 2


_blas_controller: Any = None
_blas_limit: Any = None  # the active one-thread limit, shared by concurrent pooled solves
_blas_users = 0
_blas_modules = 0  # len(sys.modules) when the controller was made


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's BLAS (OpenBLAS) limited to one thread for the block (``threadpoolctl``; the
    setting is process-wide: the first of concurrent callers sets it, the last restores it), so
    that the pool's threads do not oversubscribe the cores and small products (SED's sketch-row
    Grams) do not spin a second BLAS thread."""
    global _blas_controller, _blas_limit, _blas_users, _blas_modules
    with _pool_lock:
        if _blas_users == 0:
            # the controller knows the BLAS libraries loaded when it was made (~2 ms to make):
            # made anew once modules were imported since, which may have loaded another
            if _blas_controller is None or len(sys.modules) != _blas_modules:
                from threadpoolctl import ThreadpoolController

                _blas_controller = ThreadpoolController()
                _blas_modules = len(sys.modules)
            _blas_limit = _blas_controller.limit(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _pool_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limit.restore_original_limits()
                _blas_limit = None


def cuda_streams() -> int:
    """CUDA streams (and host threads) that large eigenproblems are spread over
    (:func:`on_streams`): ``$SPECTRAWATCH_CUDA_EIG_STREAMS`` (1: all on the current stream, one
    after another), else :data:`DEFAULT_STREAMS` (on an H200, 4 streams took 350 -> 268 ms, 8
    and 16 259 ms)."""
    try:
        return max(1, int(os.environ.get(STREAMS_ENV, DEFAULT_STREAMS)))
    except ValueError:
        return DEFAULT_STREAMS


def _own_stream(device: torch.device) -> torch.cuda.Stream:
    """A CUDA stream of the calling pool thread on ``device``, made once per thread."""
    streams: dict[torch.device, torch.cuda.Stream] = getattr(_stream_local, "streams", {})
    _stream_local.streams = streams
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    return streams[device]


def record_event(stream: torch.cuda.Stream) -> torch.cuda.Event:
    """An event recorded on ``stream`` now."""
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(stream)
    return event


def on_streams(
    tasks: Sequence[Callable[[], torch.Tensor]], device: torch.device, streams: int
) -> list[torch.Tensor]:
    """Run ``tasks`` (each returning a tensor) on up to ``streams`` host threads, each queueing
    its work on its own CUDA stream of ``device`` after everything queued so far on the caller's
    stream; results in task order, usable on the caller's stream. torch releases the GIL inside
    its calls and a solver synchronises only its own stream, so latency-bound solves overlap."""
    with _pool_lock:
        if device not in _linalg_ready:  # torch loads its CUDA linalg library lazily, and that
            # first load must not happen on several threads at once
            torch.linalg.eigvalsh(torch.eye(2, device=device))
            _linalg_ready.add(device)
    main = torch.cuda.current_stream(device)
    ready = record_event(main)

    def run(task: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.cuda.Event]:
        stream = _own_stream(device)
        stream.wait_event(ready)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            out = task()
        return out, record_event(stream)

    global _stream_pool
    workers = max(1, min(streams, len(tasks)))
    with _pool_lock:
        if _stream_pool is None or _stream_pool._max_workers < workers:
            _stream_pool = ThreadPoolExecutor(workers, thread_name_prefix="spectrawatch-cuda")
        pool = _stream_pool
    results = list(pool.map(run, tasks))
    for out, done in results:
        main.wait_event(done)
        out.record_stream(main)  # made on another stream, read on this one from now on
    # the tasks' inputs were made on the caller's stream: their memory is reused only by work
    # queued there later, which now waits for every task
    return [out for out, _ in results]


def streams_eigvalsh(sym: torch.Tensor, streams: int) -> torch.Tensor:
    """``torch.linalg.eigvalsh`` of a CUDA stack ``(..., n, n)`` split into ``streams`` parts
    solved at once (:func:`on_streams`); cuSOLVER would solve the matrices one after another,
    each leaving most of the GPU idle."""
    n = sym.shape[-1]
    parts = list(sym.reshape(-1, n, n).chunk(min(streams, sym.numel() // (n * n))))
    if len(parts) < 2:
        out: torch.Tensor = torch.linalg.eigvalsh(sym)
        return out
    tasks = [lambda part=part: torch.linalg.eigvalsh(part) for part in parts]
    return torch.cat(on_streams(tasks, sym.device, streams)).reshape(sym.shape[:-1])


def squared_svdvals(stack: torch.Tensor) -> torch.Tensor:
    """Ascending squared singular values of a CUDA stack ``(B, rows, cols)``, i.e. the eigenvalues
    of its Grams on the smaller side, by cuSOLVER's strided batched ``gesvda`` (its "approximate"
    SVD of tall matrices; one call for the whole stack). Measured against LAPACK's ``eigvalsh`` of
    the Grams: on the 3,969 FARMS windows (100 x 100, float64) of GPT-2 small the largest
    difference was 4.6e-15 of each window's largest eigenvalue, the same absolute round-off as
    the Gram route, in 32 ms on an H200 against 0.45-0.56 s on its host's 16 cores
    (``benchmarks/results/gpu_h200.md``); a CUDA test pins 1e-12."""
    rows, cols = stack.shape[-2:]
    tall = stack if rows >= cols else stack.mT
    try:
        sv: torch.Tensor = torch.linalg.svdvals(tall, driver="gesvda")
    except torch.OutOfMemoryError:  # the workspace (~5-15x the stack) did not fit
        return batched_eigvalsh(gram(stack))
    return (sv * sv).flip(-1)


def _numpy_can(t: torch.Tensor) -> bool:
    """Whether numpy can take ``t`` as a zero-copy view: a float32/float64 CPU tensor."""
    return t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES


def gram(stack: torch.Tensor) -> torch.Tensor:
    """Gram matrices of a stack ``(..., rows, cols)`` on its smaller side: ``W^T W`` if
    ``rows >= cols`` else ``W W^T``, in ``stack``'s dtype and on its device."""
    rows, cols = stack.shape[-2:]
    if _numpy_can(stack) and stack.ndim == 2:
        a = stack.detach().numpy()
        return torch.from_numpy(a.T @ a if rows >= cols else a @ a.T)
    if _numpy_can(stack) and stack.numel():
        m = min(rows, cols)
        out = grams(stack.detach().reshape(-1, rows, cols).unbind(0), stack.dtype)
        return out.reshape(*stack.shape[:-2], m, m)
    return stack.mT @ stack if rows >= cols else stack @ stack.mT


def grams(mats: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Gram matrices on the smaller side of equal-shape CPU matrices ``(B, m, m)`` in ``dtype``.

    One 2-D product per matrix: numpy's batched matmul does not take the ``syrk`` route (3,969
    FARMS windows of 100 x 100: 0.30 vs 0.46 s on one core). Each matrix is converted through
    one reused buffer (none where it already is a contiguous ``dtype`` array) and multiplied
    into the result: no stacked ``(B, rows, cols)`` copy (up to 128 MB per chunk of
    :func:`~spectrawatch.spectral.esd.eigenvalues`), whose fresh pages cost more than the
    conversion (GPT-2's HT-SR + FARMS on one core, three A/B pairs: best of 3 5.09-5.51 vs
    5.30-5.64 s). :func:`gram` of a CPU stack uses it too.
    """
    rows, cols = mats[0].shape
    m = min(rows, cols)
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    out = np.empty((len(mats), m, m), dtype=np_dtype)
    buf = torch.empty((rows, cols), dtype=dtype)
    with torch.no_grad():
        for i, w in enumerate(mats):
            if w.dtype == dtype and w.is_contiguous():
                x = w.detach().numpy()
            else:
                x = buf.copy_(w).numpy()
            left, right = (x.T, x) if rows >= cols else (x, x.T)
            np.matmul(left, right, out=out[i])
    return torch.from_numpy(out)


def on_host(n: int, batch: int, device: torch.device) -> bool:
    """Whether a CUDA stack of ``batch`` ``n x n`` matrices is decomposed on the host."""
    return device.type == "cuda" and batch > 1 and CUDA_BATCHED_MAX < n <= HOST_MAX


def svd_route(n: int, batch: int, device: torch.device) -> bool:
    """Whether the eigenvalues of the Grams of a stack of ``batch`` matrices with ``n`` columns
    on the smaller side, on ``device``, come from :func:`squared_svdvals` of the matrices: CUDA
    matrices wider than :data:`CUDA_BATCHED_MAX` up to :data:`SVD_MAX` (see the module
    docstring); with ``SPECTRAWATCH_CUDA_SVD=stacks`` (:data:`SVD_ENV`, to compare the routes)
    only the mid-sized stacks that :func:`batched_eigvalsh` would send to the host."""
    if os.environ.get(SVD_ENV) == "stacks":
        return on_host(n, batch, device)
    return device.type == "cuda" and CUDA_BATCHED_MAX < n <= SVD_MAX


def gram_eigvalsh(stack: torch.Tensor) -> torch.Tensor:
    """Ascending eigenvalues of the Grams on the smaller side of a stack ``(B, rows, cols)``: by
    :func:`squared_svdvals` of the matrices where :func:`svd_route` says so, else
    :func:`batched_eigvalsh` of :func:`gram`. Entries must be finite."""
    if svd_route(min(stack.shape[-2:]), stack.shape[0], stack.device):
        return squared_svdvals(stack)
    return batched_eigvalsh(gram(stack))


def batched_eigvalsh(sym: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.eigvalsh(sym)`` of a stack ``(..., n, n)``, returned on ``sym``'s device.

    The routing (see the module docstring) changes where the same LAPACK-style solver runs, not
    the result beyond round-off.
    """
    n = sym.shape[-1]
    batch = sym.numel() // (n * n) if n else 0
    if _numpy_can(sym) and n >= NUMPY_MIN_EIG and (n > TORCH_EIG_MAX or _pooled(batch, n)):
        return torch.from_numpy(host_eigvalsh(sym.detach().numpy()))
    if on_host(n, batch, sym.device):
        host = sym.detach().cpu()
        if host.dtype in _NUMPY_DTYPES:
            return torch.from_numpy(host_eigvalsh(host.numpy())).to(sym.device)
        vals: torch.Tensor = torch.linalg.eigvalsh(host)
        return vals.to(sym.device)
    if sym.device.type == "cuda" and n > HOST_MAX and batch > 1:
        return streams_eigvalsh(sym, cuda_streams())
    out: torch.Tensor = torch.linalg.eigvalsh(sym)
    return out


def eigh(sym: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh(sym)`` (ascending eigenvalues, eigenvectors in columns) of a symmetric
    matrix or stack; CPU matrices from :data:`NUMPY_MIN_EIG` columns go through numpy's LAPACK
    (768 x 768 float64: 97 vs 124 ms on the measured EPYC)."""
    if _numpy_can(sym) and sym.shape[-1] >= NUMPY_MIN_EIG:
        vals, vecs = np.linalg.eigh(sym.detach().numpy())
        return torch.from_numpy(vals), torch.from_numpy(vecs)
    out = torch.linalg.eigh(sym)
    return out.eigenvalues, out.eigenvectors


def eigh_above(sym: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of a symmetric ``(n, n)`` matrix whose eigenvalues exceed ``threshold``:
    ascending values ``(k,)`` and vectors ``(n, k)``.

    On the CPU with SciPy installed (the ``[server]`` extra requires it), LAPACK's ``syevr``
    computes only that range: one tridiagonal reduction plus k vectors, 43 vs 120 ms for a full
    ``eigh`` of a 768 x 768 Gram with five spikes. Elsewhere a full :func:`eigh`, filtered.
    """
    if _numpy_can(sym) and sym.ndim == 2:
        try:
            from scipy.linalg import eigh as scipy_eigh
        except ImportError:  # the client alone does not need SciPy
            pass
        else:
            vals, vecs = scipy_eigh(
                sym.detach().numpy(), subset_by_value=(threshold, np.inf), driver="evr"
            )
            return torch.from_numpy(vals), torch.from_numpy(vecs)
    vals, vecs = eigh(sym)
    keep = vals > threshold
    return vals[keep], vecs[:, keep]


def svdvals(matrix: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.svdvals(matrix)`` of a matrix or stack ``(..., rows, cols)``, descending;
    a wide CPU matrix is decomposed as its (equal-spectrum) transpose (see the module docstring)."""
    rows, cols = matrix.shape[-2:]
    tall = matrix.mT if matrix.device.type == "cpu" and cols > rows else matrix
    out: torch.Tensor = torch.linalg.svdvals(tall)
    return out
