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
# large (several tiles, a ragged last one), small (laid end to end) and empty tensors
SHAPES = [(300, 400), (768,), (70_000,), (5,), (0,), (2304,), (200, 1000), (3,)]


def _inputs(device: str) -> tuple[list[torch.Tensor], torch.Tensor, list[int]]:
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(s, generator=gen).to(device) for s in SHAPES]
    xs[1] = xs[1].to(torch.bfloat16)  # mixed dtypes among the small tensors
    xs[2] = xs[2].to(torch.bfloat16)  # and a large bfloat16 one
    numels = [x.numel() for x in xs]
    index = torch.cat([signed_buckets(n, i, 64) for i, n in enumerate(numels)]).to(device)
    return xs, index, numels


def _reference(xs: list[torch.Tensor], index: torch.Tensor, numels: list[int]) -> torch.Tensor:
    cpu = [x.cpu().to(torch.float32) for x in xs]
    return FusedCountSketch(numels, 64, "cpu")(cpu, index.cpu())


def test_fallback_to_torch_after_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    xs, index, numels = _inputs("cpu")
    sketcher = CountSketcher(numels, 64, "cpu")
    assert sketcher.backend == "torch"  # no CUDA here: the torch path, whatever triton is

    class Broken:
        def __call__(self, *_: object) -> torch.Tensor:
            raise RuntimeError("compile failed")

    sketcher.triton = Broken()  # type: ignore[assignment]
    got = sketcher([x.to(torch.float32) for x in xs], index)
    assert sketcher.backend == "torch"
    assert sketcher.fallback_reason == "RuntimeError: compile failed"
    torch.testing.assert_close(got, _reference(xs, index, numels), rtol=0, atol=0)


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECTRAWATCH_TRITON", "0")
    assert not available(torch.device("cuda"))


def test_tuning_knobs_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECTRAWATCH_TRITON_TILE", "8192")
    monkeypatch.setenv("SPECTRAWATCH_TRITON_UNFOLD", "0")
    sketch = TritonCountSketch([100_000], 64, "cpu")
    assert (sketch.tile, sketch.unfold, sketch.tiles) == (8192, False, 13)
    for bad in ("1000", "512", "x", ""):  # not a power of two >= 1024: the default
        monkeypatch.setenv("SPECTRAWATCH_TRITON_TILE", bad)
        assert TritonCountSketch([1], 64, "cpu").tile == 1 << 13


def test_a_tile_the_inner_loop_would_overrun_is_refused() -> None:
    with pytest.raises(ValueError, match="multiple of block"):
        TritonCountSketch([10], 64, "cpu", tile=3000)
    with pytest.raises(ValueError, match="multiple of block"):
        TritonCountSketch([10], 64, "cpu", tile=4096, block=768)
    assert TritonCountSketch([10], 64, "cpu", tile=1024).block == 1024


def test_kernel_in_the_triton_interpreter() -> None:
    """The kernel's arithmetic, run by Triton's CPU interpreter (needs the triton package)."""
    pytest.importorskip("triton")
    code = (
        "import torch, test_sketch_triton as t\n"
        "xs, index, numels = t._inputs('cpu')\n"
        "ref = t._reference(xs, index, numels)\n"
        "for unfold in (False, True):\n"
        "    sk = t.TritonCountSketch(numels, 64, 'cpu', tile=1 << 14, block=512, unfold=unfold)\n"
        "    got = sk(xs, index)\n"
        "    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)\n"
        "    assert got.abs().max() > 1\n"
        "strided = [torch.randn(3000, 8)[:, 3], torch.randn(5)]\n"
        "ix = torch.cat([t.signed_buckets(n, i, 64) for i, n in enumerate((3000, 5))])\n"
        "ref = t.FusedCountSketch([3000, 5], 64, 'cpu')(strided, ix)\n"
        "got = t.TritonCountSketch([3000, 5], 64, 'cpu', tile=1024, block=512)(strided, ix)\n"
        "torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), *sys.path])
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_strided_large_parameter_reaches_the_kernel_contiguous() -> None:
    """The kernel reads ``x_ptr + offs`` at unit stride: a strided 1-D parameter (a column of a
    larger tensor, which ``reshape(-1)`` leaves strided) must be copied first."""
    big = torch.randn(3000, 8)
    xs = [big[:, 3], torch.randn(7)]
    numels = [x.numel() for x in xs]
    sketch = TritonCountSketch(numels, 64, "cpu", tile=1024, block=512)
    seen: list[torch.Tensor] = []

    def launch(x: torch.Tensor, *_: object) -> None:
        seen.append(x)

    sketch._launch = launch  # type: ignore[method-assign]
    index = torch.cat([signed_buckets(n, i, 64) for i, n in enumerate(numels)])
    sketch(xs, index)
    assert len(seen) == 2
    assert all(x.is_contiguous() for x in seen)
    torch.testing.assert_close(seen[0], xs[0])


@pytest.mark.gpu
def test_cuda_kernel_matches_the_torch_path() -> None:
    if not available(torch.device("cuda")):
        pytest.skip("triton is not importable")
    xs, index, numels = _inputs("cuda")
    ref = _reference(xs, index, numels)
    for unfold in (False, True):
        got = TritonCountSketch(numels, 64, "cuda", tile=1 << 14, unfold=unfold)(xs, index)
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-12, atol=1e-12)
    sketcher = CountSketcher(numels, 64, "cuda")
    assert sketcher.backend == "triton"
    torch.testing.assert_close(sketcher(xs, index).cpu(), got.cpu(), rtol=1e-12, atol=1e-12)


def test_doctor_says_which_kernel_sketches_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from spectrawatch import _sketch_triton
    from spectrawatch._doctor import _sketch_backend

    cuda = torch.device("cuda")
    monkeypatch.setattr(_sketch_triton, "_kernel", lambda: object())
    assert _sketch_backend(cuda).status == "ok"
    monkeypatch.setattr(_sketch_triton, "_kernel", lambda: None)
    check = _sketch_backend(cuda)
    assert (check.status, "pip install triton" in check.detail) == ("warn", True)
    monkeypatch.setenv("SPECTRAWATCH_TRITON", "off")
    assert "SPECTRAWATCH_TRITON=0" in _sketch_backend(cuda).detail
