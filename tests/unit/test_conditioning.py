"""GMCN, condition number, PC-layer preconditioning and the conditioning / Muon analyses.

References: numpy's SVD, matrices with prescribed singular values, and the PC-layer coefficients
of `Empath-aln/PC-layer` (``p_k(1) = 1``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from spectrawatch.spectral.conditioning import (
    CONDITION_NUMBER,
    GMCN,
    MP_SPIKES,
    PC2_GMCN,
    PC4_GMCN_RATIO,
    PC_COEFFICIENTS,
    SIGMA_MAX,
    conditioning,
    conditioning_metrics,
    gmcn,
    pc_polynomial,
    pc_precondition,
    pc_preview,
    singular_values,
)
from spectrawatch.spectral.errors import SpectralError
from spectrawatch.spectral.norms import matrix_norms
from spectrawatch.spectral.polar import MUON_POLAR_DISTANCE, POLAR_MP_SPIKES
from spectrawatch.wire import FrameHeader, FrameKind
from spectrawatch_server.analyses.conditioning import muon_update_audit, weight_conditioning
from spectrawatch_server.analyses.registry import MODEL_LAYER, DecodedFrame, analyses_for
from tests.history import StubHistory, decoded_frame


def _with_singular_values(sv: np.ndarray, rows: int, cols: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((rows, sv.size)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, sv.size)))
    return torch.from_numpy((u * sv) @ v.T)


def _numpy_gmcn(w: np.ndarray) -> float:
    s = np.linalg.svd(w, compute_uv=False)
    k = math.ceil(0.1 * s.size)
    return float(s.max() / np.sort(s)[:k].mean())


@pytest.mark.parametrize(("rows", "cols"), [(64, 40), (40, 64), (33, 33)])
def test_gmcn_and_condition_number_match_numpy_svd(rows: int, cols: int) -> None:
    rng = np.random.default_rng(rows * cols)
    w = rng.standard_normal((rows, cols))
    cond = conditioning(torch.from_numpy(w).float())
    s = np.linalg.svd(w, compute_uv=False)
    assert cond.gmcn == pytest.approx(_numpy_gmcn(w), rel=1e-5)
    assert cond.sigma_max == pytest.approx(s.max(), rel=1e-6)
    assert cond.sigma_min == pytest.approx(s.min(), rel=1e-5)
    assert cond.condition_number == pytest.approx(s.max() / s.min(), rel=1e-5)
    assert gmcn(singular_values(torch.from_numpy(w))) == pytest.approx(_numpy_gmcn(w), rel=1e-12)


def test_gmcn_bottom_tenth_rounds_up_and_handles_rank_deficiency() -> None:
    # 11 values: ceil(1.1) = 2 smallest are averaged.
    sv = np.array([10.0, 9, 8, 7, 6, 5, 4, 3, 2, 1.0, 3.0])
    assert gmcn(sv) == pytest.approx(10.0 / 1.5)
    assert gmcn(np.array([1.0, 0.5, 0.0])) == math.inf


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_weights_have_no_conditioning(bad: float) -> None:
    """One NaN entry made LAPACK raise its own error, one Inf answered sigma_max NaN, GMCN inf
    and 0 MP spikes: a typed error instead."""
    w = torch.randn(20, 10, dtype=torch.float64)
    w[3, 4] = bad
    with pytest.raises(SpectralError, match="NaN/Inf"):
        conditioning(w)
    with pytest.raises(SpectralError, match="NaN/Inf"):
        matrix_norms(w)
    with pytest.raises(SpectralError, match="non-finite"):
        conditioning_metrics(torch.tensor([3.0, bad, 1.0]), (20, 3))


def test_mp_spikes_count_planted_singular_values() -> None:
    rng = np.random.default_rng(1)
    m, n = 400, 200
    noise = rng.standard_normal((m, n))
    u, _ = np.linalg.qr(rng.standard_normal((m, 3)))
    v, _ = np.linalg.qr(rng.standard_normal((n, 3)))
    w = noise + (u * np.array([80.0, 120.0, 200.0])) @ v.T
    assert conditioning(torch.from_numpy(w)).mp_spikes == 3
    assert conditioning(torch.from_numpy(noise)).mp_spikes == 0
    assert conditioning(torch.from_numpy(w.T.copy())).mp_spikes == 3


def test_pc_polynomials_fix_one() -> None:
    for level in PC_COEFFICIENTS:
        assert float(pc_polynomial(np.array([1.0]), level)[0]) == pytest.approx(1.0, abs=1e-12)
        assert float(pc_polynomial(np.array([1e-6]), level)[0]) == pytest.approx(
            1e-6 * PC_COEFFICIENTS[level][0], rel=1e-9
        )
    with pytest.raises(ValueError, match="level"):
        pc_polynomial(np.array([0.5]), 7)


@pytest.mark.parametrize(("rows", "cols"), [(80, 50), (50, 80)])
@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_pc_precondition_maps_singular_values(rows: int, cols: int, level: int) -> None:
    sv = np.logspace(-3, 0.5, min(rows, cols))
    w = _with_singular_values(sv, rows, cols, seed=level)
    sigma_hat = float(sv.max())
    w_pc = pc_precondition(w, level)
    got = np.sort(np.linalg.svd(w_pc.numpy(), compute_uv=False))
    expected = np.sort(sigma_hat * np.abs(pc_polynomial(sv / sigma_hat, level)))
    np.testing.assert_allclose(got, expected, rtol=1e-8)
    preview = pc_preview(sv, level)
    assert preview.gmcn_after == pytest.approx(_numpy_gmcn(w_pc.numpy()), rel=1e-8)


def test_pc_lowers_gmcn_on_ill_conditioned_matrices() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((120, 90)) @ np.diag(np.logspace(-3, 0, 90))
    sv = singular_values(torch.from_numpy(w))
    ratios = [pc_preview(sv, level).gmcn_ratio for level in (1, 2, 3, 4)]
    assert all(r < 1 for r in ratios)
    assert ratios == sorted(ratios, reverse=True)  # higher level, flatter spectrum
    # Small singular values gain ~p_k'(0) = c0, so GMCN drops by about that factor.
    assert ratios[3] == pytest.approx(1 / PC_COEFFICIENTS[4][0], rel=0.05)


def _frame(kind: FrameKind, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> DecodedFrame:
    return decoded_frame(kind, 10, tensors, info)


def test_conditioning_analysis() -> None:
    rng = np.random.default_rng(3)
    w = torch.from_numpy(rng.standard_normal((64, 48))).float()
    w2 = torch.from_numpy(rng.standard_normal((30, 90))).float()
    bad = torch.full((4, 4), math.nan)
    tensors = {"fc": w, "fc2": w2, "nan": bad, "vec": torch.ones(1, 5)}
    result = weight_conditioning(_frame(FrameKind.WEIGHTS, tensors, {}), StubHistory())
    by_key = {(m.layer, m.name): m.value for m in result.metrics}
    assert {layer for layer, _ in by_key} == {"fc", "fc2"}  # the model value: summarize
    per_layer: dict[str, dict[str, float]] = {}
    for (layer, name), value in by_key.items():
        per_layer.setdefault(layer, {})[name] = value
    (registered,) = [a for a in analyses_for(FrameKind.WEIGHTS) if a.name == "conditioning"]
    assert registered.summarize is not None
    by_key.update({(MODEL_LAYER, k): v for k, v in registered.summarize(per_layer).items()})
    geo = math.sqrt(_numpy_gmcn(w.double().numpy()) * _numpy_gmcn(w2.double().numpy()))
    assert by_key[(MODEL_LAYER, GMCN)] == pytest.approx(geo, rel=1e-5)
    cond = conditioning(w)
    assert by_key[("fc", GMCN)] == pytest.approx(cond.gmcn)
    assert by_key[("fc", SIGMA_MAX)] == pytest.approx(cond.sigma_max)
    assert by_key[("fc", CONDITION_NUMBER)] == pytest.approx(cond.condition_number)
    assert by_key[("fc", MP_SPIKES)] == 0.0
    assert by_key[("fc", PC2_GMCN)] == pytest.approx(pc_preview(singular_values(w), 2).gmcn_after)
    assert by_key[("fc", PC4_GMCN_RATIO)] < 1
    assert ("fc", POLAR_MP_SPIKES) not in by_key  # GEMM-only count runs on CUDA workers only


def test_muon_audit_analysis_only_on_exact_frames() -> None:
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.standard_normal((48, 32)))
    orth = torch.from_numpy(q).float().reshape(1, -1)
    noisy = torch.from_numpy(rng.standard_normal((2, 48 * 32))).float()
    tensors = {"w.orth": orth.repeat(2, 1), "w.adam": noisy, "bias": torch.ones(2, 48)}
    info = {"exact": True, "steps": [7, 8], "shapes": {"w.orth": [48, 32], "w.adam": [48, 32]}}
    result = muon_update_audit(_frame(FrameKind.UPDATE_SKETCH, tensors, info), StubHistory())
    by_key = {(m.layer, m.name): m for m in result.metrics}
    assert by_key[("w.orth", MUON_POLAR_DISTANCE)].value < 1e-5
    assert by_key[("w.orth", MUON_POLAR_DISTANCE)].step == 8
    sv = np.linalg.svd(noisy[-1].reshape(48, 32).double().numpy(), compute_uv=False)
    expected = math.sqrt(np.var(sv) / np.mean(sv**2))
    assert by_key[("w.adam", MUON_POLAR_DISTANCE)].value == pytest.approx(expected, rel=1e-3)
    assert {layer for layer, _ in by_key} == {"w.orth", "w.adam"}
    sketched = _frame(FrameKind.UPDATE_SKETCH, tensors, {**info, "exact": False})
    assert muon_update_audit(sketched, StubHistory()).metrics == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_conditioning_adds_the_polar_count() -> None:
    rng = np.random.default_rng(5)
    m, n = 1024, 512
    u, _ = np.linalg.qr(rng.standard_normal((m, 4)))
    v, _ = np.linalg.qr(rng.standard_normal((n, 4)))
    w = rng.standard_normal((m, n)) + (u * np.array([150.0, 200.0, 250.0, 300.0])) @ v.T
    tensors = {"fc": torch.from_numpy(w).float().cuda()}
    header = FrameHeader(FrameKind.WEIGHTS, 1, 1, {}, (), 0)
    frame = DecodedFrame(1, 1, header, tensors, torch.device("cuda"))
    by_key = {(x.layer, x.name): x.value for x in weight_conditioning(frame, StubHistory()).metrics}
    assert by_key[("fc", POLAR_MP_SPIKES)] == by_key[("fc", MP_SPIKES)] == 4.0
