"""The Triton all-parameter sketch: same sums as the torch path, and a safe fallback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spectrawatch._sketch_triton import CountSketcher, TritonCountSketch, available
from spectrawatch.sketch import FusedCountSketch, signed_buckets

ROOT = Path(__file__).resolve().parents[2]
# large (several 16-row bands of 64, a ragged last one), small (laid end to end) and empty
SHAPES = [(300, 400), (768,), (70_000,), (5,), (0,), (2304,), (200, 1000), (3,)]


def _inputs(device: str) -> tuple[list[torch.Tensor], torch.Tensor, list[int]]:
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(s, generator=gen).to(device) for s in SHAPES]
    xs[1] = xs[1].to(torch.bfloat16)  # mixed dtypes among the small tensors
    xs[2] = xs[2].to(torch.bfloat16)  # and a large bfloat16 one
    numels = [x.numel() for x in xs]
    index = torch.cat([signed_buckets(n, 100 + i, 64) for i, n in enumerate(numels)]).to(device)
    return xs, index, numels


def _seeds(numels: list[int]) -> list[int]:
    return [100 + i for i in range(len(numels))]


def _reference(xs: list[torch.Tensor], index: torch.Tensor, numels: list[int]) -> torch.Tensor:
    cpu = [x.cpu().to(torch.float32) for x in xs]
    return FusedCountSketch(numels, 64, "cpu")(cpu, index.cpu())


def test_fallback_to_torch_after_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton path holds no index; after an error the torch path builds it, for good."""
    from spectrawatch import _sketch_triton

    xs, index, numels = _inputs("cpu")
    assert CountSketcher(numels, 64, "cpu", seeds=_seeds(numels)).backend == "torch"  # no CUDA
    monkeypatch.setattr(_sketch_triton, "available", lambda _device: True)
    sketcher = CountSketcher(numels, 64, "cpu", seeds=_seeds(numels))
    assert (sketcher.backend, sketcher.index) == ("triton", None)

    class Broken:
        def __call__(self, *_: object) -> torch.Tensor:
            raise RuntimeError("compile failed")

    sketcher.triton = Broken()  # type: ignore[assignment]
    got = sketcher([x.to(torch.float32) for x in xs])
    assert sketcher.backend == "torch"
    assert sketcher.fallback_reason == "RuntimeError: compile failed"
    assert sketcher.index is not None
    assert torch.equal(sketcher.index, index)
    torch.testing.assert_close(got, _reference(xs, index, numels), rtol=0, atol=0)


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECTRAWATCH_TRITON", "0")
    assert not available(torch.device("cuda"))


def test_tuning_knobs_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECTRAWATCH_TRITON_ROWS", "64")
    monkeypatch.setenv("SPECTRAWATCH_TRITON_ROW_BLOCK", "8")
    monkeypatch.setenv("SPECTRAWATCH_TRITON_BUCKETS", "256")
    sketch = TritonCountSketch([100_000, 4000, 0], 64, "cpu", seeds=[1, 2, 3])
    assert (sketch.rows, sketch.row_block, sketch.buckets) == (64, 8, 256)
    assert (sketch.large, sketch.small) == ([0], [1])  # a band is 64 rows of 64
    for bad in ("12", "0", "-4", "x", ""):  # not a power of two: the defaults
        monkeypatch.setenv("SPECTRAWATCH_TRITON_ROWS", bad)
        monkeypatch.setenv("SPECTRAWATCH_TRITON_BUCKETS", bad)
        sketch = TritonCountSketch([1], 64, "cpu", seeds=[0])
        assert (sketch.rows, sketch.buckets) == (16, 128)
    assert TritonCountSketch([1], 64, "cpu", seeds=[0], rows=4, row_block=16).row_block == 4


def test_knobs_that_are_not_powers_of_two_are_refused() -> None:
    with pytest.raises(ValueError, match="powers of two"):
        TritonCountSketch([10], 64, "cpu", seeds=[0], rows=24)
    with pytest.raises(ValueError, match="one entry per tensor"):
        TritonCountSketch([10, 20], 64, "cpu", seeds=[0])


def test_kernels_in_the_triton_interpreter() -> None:
    """The kernels' arithmetic (hashes, rotated rows, shards, small tensors), run by Triton's
    CPU interpreter. Needs the triton package: importable, or in ``SPECTRAWATCH_TEST_TRITON_PATH``
    (``.ci/run`` installs it there, outside the venv; with ``SPECTRAWATCH_CI=1`` a missing triton
    fails this test instead of skipping it)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    extra = [p for p in (os.environ.get("SPECTRAWATCH_TEST_TRITON_PATH", ""),) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), *extra, *sys.path])
    probe = subprocess.run([sys.executable, "-c", "import triton"], env=env, capture_output=True)
    if probe.returncode != 0:
        if os.environ.get("SPECTRAWATCH_CI") == "1":
            pytest.fail("triton is not importable (SPECTRAWATCH_CI=1: .ci/run installs it)")
        pytest.skip("triton is not importable")
    code = (
        "import torch, test_sketch_triton as t\n"
        "xs, index, numels = t._inputs('cpu')\n"
        "ref = t._reference(xs, index, numels)\n"
        "for rows, rb, bb in ((16, 16, 128), (4, 2, 32), (8, 8, 64)):\n"
        "    sk = t.TritonCountSketch(numels, 64, 'cpu', seeds=t._seeds(numels), rows=rows,\n"
        "                             row_block=rb, buckets=bb)\n"
        "    assert sk.large and sk.small\n"
        "    got = sk(xs)\n"
        "    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)\n"
        "    assert got.abs().max() > 1\n"
        "# a shard: coordinates 1000.. of a tensor, rows not aligned to its start; dim 50\n"
        "x = torch.randn(9000)\n"
        "ix = t.signed_buckets(9000, 5, 50, start=1000)\n"
        "ref = t.FusedCountSketch([9000], 50, 'cpu')([x], ix)\n"
        "sk = t.TritonCountSketch([9000], 50, 'cpu', seeds=[5], starts=[1000], buckets=32)\n"
        "torch.testing.assert_close(sk([x]), ref, rtol=1e-12, atol=1e-12)\n"
        "strided = [torch.randn(3000, 8)[:, 3], torch.randn(5)]\n"
        "ix = torch.cat([t.signed_buckets(n, i, 64) for i, n in enumerate((3000, 5))])\n"
        "ref = t.FusedCountSketch([3000, 5], 64, 'cpu')(strided, ix)\n"
        "got = t.TritonCountSketch([3000, 5], 64, 'cpu', seeds=[0, 1], rows=4)(strided)\n"
        "torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_strided_large_parameter_reaches_the_kernel_contiguous(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernel reads ``x_ptr + j`` at unit stride: a strided 1-D parameter (a column of a
    larger tensor, which ``reshape(-1)`` leaves strided) must be copied first; the launch plan
    (addresses) is rebuilt only when an address or dtype changes."""
    from spectrawatch import _sketch_triton

    launched: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Launcher:
        def __getitem__(self, _grid: object) -> Launcher:
            return self

        def __call__(
            self, meta: torch.Tensor, owner: torch.Tensor, *_: object, **__: object
        ) -> None:
            launched.append((meta, owner))

    dtypes = {torch.float32: "f32", torch.float64: "f64"}
    monkeypatch.setattr(_sketch_triton, "_kernels", lambda: (Launcher(), Launcher(), dtypes))
    big = torch.randn(3000, 8)
    xs = [big[:, 3], torch.randn(7), torch.randn(50, 60)]
    numels = [x.numel() for x in xs]
    sketch = TritonCountSketch(numels, 64, "cpu", seeds=[0, 1, 2], rows=4)
    planned: list[list[torch.Tensor]] = []
    plan = sketch._plan_launches

    def spy(flats: list[torch.Tensor], tl_dtypes: dict[torch.dtype, object]) -> object:
        planned.append(flats)
        return plan(flats, tl_dtypes)

    sketch._plan_launches = spy  # type: ignore[method-assign]
    sketch([xs[0], xs[1], xs[2]])
    (flats,) = planned
    assert [x.is_contiguous() for x in flats] == [True, True]
    torch.testing.assert_close(flats[0], xs[0])
    meta, owner = launched[0]  # one launch for both large float32 tensors, then the small one
    assert meta[:, 0].tolist() == [flats[0].data_ptr(), xs[2].data_ptr()]
    assert meta[:, 6].tolist() == [0, 2]  # their rows of the result
    assert owner.tolist() == [0] * 12 + [1] * 12  # 47 and 47 rows of 64, 4 per program
    sketch([xs[0].contiguous(), xs[1], xs[2]])  # same addresses? the copy's is new
    sketch([xs[0].double(), xs[1], xs[2]])  # another dtype: two launches
    assert len(planned) == 3
    rows_launches = launched[-3:-1]  # the last launch is the small tensor's
    assert [m[:, 6].tolist() for m, _ in rows_launches] == [[0], [2]]
    kept = [xs[0].contiguous(), xs[1], xs[2]]
    sketch(kept)
    sketch(kept)  # contiguous, same addresses: the last plan is reused
    assert len(planned) == 4
    sketch([xs[0], xs[1], xs[2]])  # strided again: copied and planned every call
    sketch([xs[0], xs[1], xs[2]])
    assert len(planned) == 6


@pytest.mark.gpu
def test_cuda_kernel_matches_the_torch_path() -> None:
    if not available(torch.device("cuda")):
        pytest.skip("triton is not importable")
    xs, index, numels = _inputs("cuda")
    ref = _reference(xs, index, numels)
    for rows, row_block, buckets in ((16, 16, 128), (4, 2, 32)):
        sketch = TritonCountSketch(
            numels,
            64,
            "cuda",
            seeds=_seeds(numels),
            rows=rows,
            row_block=row_block,
            buckets=buckets,
        )
        got = sketch(xs)
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-12, atol=1e-12)
    sketcher = CountSketcher(numels, 64, "cuda", seeds=_seeds(numels))
    assert sketcher.backend == "triton"
    assert sketcher.index is None  # the Triton path holds no index
    torch.testing.assert_close(sketcher(xs).cpu(), got.cpu(), rtol=1e-12, atol=1e-12)


def test_doctor_says_which_kernel_sketches_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from spectrawatch import _sketch_triton
    from spectrawatch._doctor import _sketch_backend

    cuda = torch.device("cuda")
    monkeypatch.setattr(_sketch_triton, "_kernels", lambda: object())
    check = _sketch_backend(cuda)
    assert (check.status, "CUDA graph" in check.detail) == ("ok", True)
    monkeypatch.setenv("SPECTRAWATCH_SKETCH_GRAPH", "0")
    assert "sketch_graph off" in _sketch_backend(cuda).detail
    monkeypatch.delenv("SPECTRAWATCH_SKETCH_GRAPH")
    monkeypatch.setattr(_sketch_triton, "_kernels", lambda: None)
    check = _sketch_backend(cuda)
    assert (check.status, "pip install triton" in check.detail) == ("warn", True)
    monkeypatch.setenv("SPECTRAWATCH_TRITON", "off")
    assert "SPECTRAWATCH_TRITON=0" in _sketch_backend(cuda).detail
