"""Routing of batched symmetric eigensolves between the GPU and the host."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from spectrawatch.spectral.eigen import (
    CUDA_BATCHED_MAX,
    DEFAULT_STREAMS,
    HOST_MAX,
    NUMPY_MIN_EIG,
    STREAMS_ENV,
    SVD_ENV,
    SVD_MAX,
    TORCH_EIG_MAX,
    batched_eigvalsh,
    cuda_streams,
    eigh,
    eigh_above,
    gram,
    grams,
    on_host,
    squared_svdvals,
    streams_eigvalsh,
    svd_route,
    svdvals,
)

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("n", "batch", "device", "expected"),
    [
        (64, 150, CUDA, True),  # SED W = 64 windows: looped cuSOLVER calls otherwise
        (100, 4000, CUDA, True),  # FARMS windows
        (CUDA_BATCHED_MAX, 150, CUDA, False),  # cuSOLVER's batched Jacobi
        (HOST_MAX + 1, 10, CUDA, False),  # large: the GPU's solver wins
        (64, 1, CUDA, False),  # one matrix: nothing to batch
        (64, 150, CPU, False),
    ],
)
def test_routing(n: int, batch: int, device: torch.device, expected: bool) -> None:
    assert on_host(n, batch, device) is expected


def test_svd_route_takes_every_wide_cuda_matrix_or_with_the_setting_the_host_stacks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(SVD_ENV, raising=False)
    assert svd_route(100, 4000, CUDA)
    assert svd_route(768, 12, CUDA)
    assert svd_route(SVD_MAX, 1, CUDA)
    assert not svd_route(SVD_MAX + 1, 12, CUDA)  # wider: syevd of the Grams
    assert not svd_route(CUDA_BATCHED_MAX, 150, CUDA)  # batched Jacobi stays
    assert not svd_route(768, 12, CPU)
    monkeypatch.setenv(SVD_ENV, "stacks")
    assert svd_route(100, 4000, CUDA)
    assert not svd_route(768, 12, CUDA)


def test_equals_eigvalsh_and_keeps_the_device() -> None:
    x = torch.randn(7, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sym = x @ x.mT
    out = batched_eigvalsh(sym)
    assert out.shape == (7, 3, 48)
    assert out.device == sym.device
    torch.testing.assert_close(out, torch.linalg.eigvalsh(sym), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape",
    [
        (4, 10, 7),
        (2, NUMPY_MIN_EIG + 40, NUMPY_MIN_EIG),
        (3, NUMPY_MIN_EIG, NUMPY_MIN_EIG + 9),
        (2, TORCH_EIG_MAX + 20, TORCH_EIG_MAX + 1),
    ],
)
def test_cpu_numpy_route_equals_torch(shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    """CPU Grams, and eigenvalues of stacks of more than TORCH_EIG_MAX columns (or split over a
    pool), go through numpy: same results."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    rows, cols = shape[1:]
    m = min(rows, cols)
    g = gram(x)
    assert g.dtype == dtype
    assert g.shape == (shape[0], m, m)
    ref = x.mT @ x if rows >= cols else x @ x.mT
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(g, ref, rtol=tol, atol=tol * m)
    ev = batched_eigvalsh(ref)
    assert ev.dtype == dtype
    torch.testing.assert_close(ev, torch.linalg.eigvalsh(ref), rtol=tol, atol=tol * m)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stack_routed_to_the_host_matches_the_gpu_solver() -> None:
    x = torch.randn(150, 64, 640, dtype=torch.float64, device="cuda")
    sym = x @ x.mT
    out = batched_eigvalsh(sym)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out, torch.linalg.eigvalsh(sym), rtol=1e-10, atol=1e-8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("streams", [1, 3, 8])
def test_cuda_stack_split_over_streams_matches_one_call(streams: int) -> None:
    x = torch.randn(5, 300, 200, dtype=torch.float64, device="cuda")
    sym = x.mT @ x
    out = streams_eigvalsh(sym, streams)
    assert out.shape == (5, 200)
    torch.testing.assert_close(out, torch.linalg.eigvalsh(sym), rtol=1e-10, atol=1e-8)
    sym.zero_()  # the result does not alias the input
    assert bool((out > 0).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(40, 100, 100), (7, 150, 60), (7, 60, 150)])
def test_cuda_squared_singular_values_equal_lapack_on_the_gram(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, dtype=torch.float64) ** 3  # heavy-tailed entries
    ref = torch.from_numpy(np.linalg.eigvalsh(gram(x).numpy()))
    out = squared_svdvals(x.cuda()).cpu()
    assert out.shape == ref.shape
    scale = ref[:, -1:]
    assert float(((out - ref).abs() / scale).max()) < 1e-12


def test_squared_singular_values_fall_back_to_the_grams_when_gesvda_runs_out_of_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def out_of_memory(*args: object, **kwargs: object) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(torch.linalg, "svdvals", out_of_memory)
    x = torch.randn(3, 50, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = torch.from_numpy(np.linalg.eigvalsh(gram(x).numpy()))
    out = squared_svdvals(x)  # on the CPU here; the fall-back is the same on CUDA
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    wide = squared_svdvals(x.mT.contiguous())
    torch.testing.assert_close(wide, ref, rtol=1e-10, atol=1e-10)


def test_cuda_streams_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STREAMS_ENV, raising=False)
    assert cuda_streams() == DEFAULT_STREAMS
    monkeypatch.setenv(STREAMS_ENV, "1")
    assert cuda_streams() == 1
    monkeypatch.setenv(STREAMS_ENV, "0")
    assert cuda_streams() == 1
    monkeypatch.setenv(STREAMS_ENV, "many")
    assert cuda_streams() == DEFAULT_STREAMS


@pytest.mark.parametrize("shape", [(7, 40), (40, 7), (3, 5, 33), (12, 12)])
def test_svdvals_of_wide_cpu_matrices_equal_lapack_on_the_matrix_itself(
    shape: tuple[int, ...],
) -> None:
    """Wide CPU matrices are decomposed as their transpose: same singular values as numpy's SVD."""
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = svdvals(x)
    assert out.shape == (*shape[:-2], min(shape[-2:]))
    ref = torch.from_numpy(np.linalg.svd(x.numpy(), compute_uv=False))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [5, NUMPY_MIN_EIG + 3])
def test_eigh_equals_torch_on_both_routes(n: int) -> None:
    x = torch.randn(2 * n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    sym = x.mT @ x
    vals, vecs = eigh(sym)
    ref = torch.linalg.eigh(sym)
    torch.testing.assert_close(vals, ref.eigenvalues, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(vecs @ torch.diag(vals) @ vecs.mT, sym, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(
        vecs.mT @ vecs, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("spikes", [0, 3])
def test_eigh_above_returns_the_eigenpairs_past_the_threshold(spikes: int) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 80, dtype=torch.float64, generator=g)
    x[:, :spikes] *= 10.0
    sym = x.mT @ x
    ref = torch.linalg.eigh(sym)
    threshold = float(ref.eigenvalues[-spikes - 1]) * 1.001 if spikes else 1e9
    vals, vecs = eigh_above(sym, threshold)
    assert vals.shape == (spikes,)
    assert vecs.shape == (80, spikes)
    torch.testing.assert_close(vals, ref.eigenvalues[80 - spikes :], rtol=1e-12, atol=0)
    top = ref.eigenvectors[:, 80 - spikes :]  # same projector, whatever the signs
    torch.testing.assert_close(vecs @ vecs.mT, top @ top.mT, rtol=0, atol=1e-10)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_host_pool_equals_one_call(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    """A large stack split over the thread pool gives one call's eigenvalues, in order."""
    from spectrawatch.spectral import eigen

    monkeypatch.setattr(eigen, "host_threads", lambda: threads)
    monkeypatch.setattr(eigen, "POOL_MIN_WORK", 8 * 20**3)
    x = np.random.default_rng(3).standard_normal((2, 13, 20, 20))
    sym = x @ np.swapaxes(x, -1, -2)
    out = eigen.host_eigvalsh(sym)
    assert out.shape == (2, 13, 20)
    np.testing.assert_array_equal(out, np.linalg.eigvalsh(sym))
    # and through batched_eigvalsh's CPU route (n >= NUMPY_MIN_EIG)
    big = torch.randn(9, NUMPY_MIN_EIG, NUMPY_MIN_EIG, dtype=torch.float64)
    big = big @ big.mT
    torch.testing.assert_close(batched_eigvalsh(big), torch.linalg.eigvalsh(big))


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (30, 30)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grams_of_a_list_equal_numpy_on_each_matrix(
    shape: tuple[int, int], dtype: torch.dtype
) -> None:
    """Converted, already-``dtype`` and non-contiguous inputs: each Gram is numpy's ``A^T A``
    (or ``A A^T``) of that matrix in ``dtype``."""
    g = torch.Generator().manual_seed(3)
    mats = [
        torch.randn(shape, generator=g, dtype=torch.float32),
        torch.randn(shape, generator=g, dtype=dtype),
        torch.randn(shape[::-1], generator=g, dtype=torch.float64).T,
    ]
    out = grams(mats, dtype)
    assert out.dtype == dtype
    assert out.shape == (3, min(shape), min(shape))
    for w, got in zip(mats, out, strict=True):
        a = w.numpy().astype(np.float64)
        ref = a.T @ a if shape[0] >= shape[1] else a @ a.T
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        np.testing.assert_allclose(got.numpy(), ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_pool_respects_the_torch_thread_budget_and_one_blas_thread() -> None:
    """``torch.set_num_threads(1)`` means no pool; the pool's solves run with one BLAS thread,
    and the BLAS setting is restored afterwards."""
    from threadpoolctl import threadpool_info

    from spectrawatch.spectral import eigen

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert eigen.host_threads() == 1
        assert not eigen._pooled(64, 768)
        torch.set_num_threads(2)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        assert eigen.host_threads() == min(2, cores)
    finally:
        torch.set_num_threads(before)

    def blas_threads() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    outside = blas_threads()
    first, second = eigen.one_blas_thread(), eigen.one_blas_thread()
    first.__enter__()
    assert set(blas_threads()) == {1}
    second.__enter__()  # a concurrent pooled solve (another thread) shares the limit ...
    first.__exit__(None, None, None)
    assert set(blas_threads()) == {1}  # ... which stays while that one runs
    second.__exit__(None, None, None)
    assert blas_threads() == outside
