"""Polar Express: coefficient schedule, polar factor, eigenvalue counts, Muon audit.

References: numpy/LAPACK SVD and eigvalsh, matrices with prescribed spectra, and the
per-step lower ends l_t of research/matrix_methods.md §1.4 (computed there independently).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spectrawatch.spectral.polar import (
    POLAR_EXPRESS_RAW,
    count_above,
    count_singular_values_above,
    exact_count_above,
    muon_audit,
    orthogonality_error,
    polar_express,
    polar_express_coefficients,
    schatten8_norm,
)


def _orthonormal(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q


def _with_singular_values(sv: np.ndarray, rows: int, cols: int, seed: int) -> torch.Tensor:
    k = sv.size
    u, v = _orthonormal(rows, k, seed), _orthonormal(cols, k, seed + 1)
    return torch.from_numpy((u * sv) @ v.T)


def _symmetric(eigenvalues: np.ndarray, seed: int) -> torch.Tensor:
    q = _orthonormal(eigenvalues.size, eigenvalues.size, seed)
    return torch.from_numpy((q * eigenvalues) @ q.T)


def _compose(x: np.ndarray, coeffs: list[tuple[float, float, float]]) -> np.ndarray:
    for a, b, c in coeffs:
        x = a * x + b * x**3 + c * x**5
    return x


def test_raw_schedule_reproduces_the_published_lower_ends() -> None:
    # l_{t+1} = p_t(l_t) from l_1 = 1e-3, raw coefficients (notes §1.4, exact arithmetic).
    expected = [0.008287, 0.03403, 0.1343, 0.4396, 0.8764, 0.9988]
    x = np.linspace(1e-3, 1.0, 200_001)
    for t, lower in enumerate(expected, start=1):
        x = _compose(x, list(POLAR_EXPRESS_RAW[t - 1 : t]))
        assert x.min() == pytest.approx(lower, rel=2e-3)
        assert x.max() <= 2 - lower + 1e-3  # greedy design: image inside [l, 2 - l]


def test_applied_schedule_error_after_t_steps() -> None:
    # Worst |1 - p(x)| on [1e-3, 1] / 1.01 (notes §1.5: T=6 6.5e-3, T=7 1.1e-5, T=8 3e-15).
    x = np.logspace(-3, 0, 20_001) / 1.01
    bounds = {5: 0.17, 6: 7e-3, 7: 1.2e-5, 8: 1e-13, 12: 1e-13}
    for steps, bound in bounds.items():
        err = np.abs(1 - _compose(x, polar_express_coefficients(steps))).max()
        assert err < bound, (steps, err)
    assert polar_express_coefficients(3)[0] == pytest.approx(
        (8.28721201814563 / 1.01, -23.595886519098837 / 1.01**3, 17.300387312530933 / 1.01**5)
    )
    assert polar_express_coefficients(10)[7:] == [(1.875, -1.25, 0.375)] * 3


@pytest.mark.parametrize(("rows", "cols"), [(96, 160), (160, 96)])
def test_polar_factor_matches_svd_on_well_conditioned(rows: int, cols: int) -> None:
    sv = np.linspace(0.5, 2.0, min(rows, cols))
    m = _with_singular_values(sv, rows, cols, seed=0)
    result = polar_express(m, steps=8, dtype=torch.float32)
    u, _, vt = np.linalg.svd(m.numpy(), full_matrices=False)
    exact = u @ vt
    assert result.factor.shape == (rows, cols)
    assert np.linalg.norm(result.factor.double().numpy() - exact, 2) < 2e-5
    assert result.orthogonality_error < 2e-6


def test_polar_factor_on_ill_conditioned_needs_more_steps() -> None:
    sv = np.logspace(-3, 0, 96)  # sigma_min / (1.01 ||M||_F) ~ 3e-4 < l = 1e-3
    m = _with_singular_values(sv, 96, 160, seed=2)
    eight = polar_express(m, steps=8, dtype=torch.float64)
    twelve = polar_express(m, steps=12, dtype=torch.float64)
    err8 = np.abs(1 - np.linalg.svd(eight.factor.numpy(), compute_uv=False)).max()
    err12 = np.abs(1 - np.linalg.svd(twelve.factor.numpy(), compute_uv=False)).max()
    assert err8 > 1e-3  # below the design range after 8 steps...
    assert err12 < 1e-12  # ...converged after 12 (fp64)
    fp32 = polar_express(m, steps=12, dtype=torch.float32)
    err32 = np.abs(1 - np.linalg.svd(fp32.factor.double().numpy(), compute_uv=False)).max()
    assert err32 < 1e-5
    assert fp32.orthogonality_error < 1e-5


def test_bf16_path_error_bounds() -> None:
    sv = np.logspace(-2, 0, 64)
    m = _with_singular_values(sv, 64, 96, seed=3)
    raw = polar_express(m, steps=10, dtype=torch.bfloat16, refine_steps=0)
    err_raw = np.abs(1 - np.linalg.svd(raw.factor.double().numpy(), compute_uv=False))
    assert err_raw.max() < 3e-2  # the bf16 floor (~2^-8 median, notes §1.5 measured 6e-3 max)
    refined = polar_express(m, steps=10, dtype=torch.bfloat16)  # + 2 fp32 NS-5 steps
    err_ref = np.abs(1 - np.linalg.svd(refined.factor.double().numpy(), compute_uv=False))
    assert err_ref.max() < 1e-5
    assert refined.steps == 12


def test_orthogonality_error_definition() -> None:
    q = torch.from_numpy(_orthonormal(50, 20, 4))
    assert orthogonality_error(q) < 1e-14
    assert orthogonality_error(2 * q) == pytest.approx(3.0)  # every sigma^2 - 1 = 3


def test_schatten8_norm_against_eigenvalues() -> None:
    eig = np.linspace(-3.0, 5.0, 40)
    s = _symmetric(eig, seed=5)
    assert float(schatten8_norm(s)) == pytest.approx((eig**8).sum() ** (1 / 8), rel=1e-12)
    assert float(schatten8_norm(s)) >= 5.0


def _gapped_spectrum(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bulk = rng.uniform(0.0, 2.0, n - 12)
    spikes = rng.uniform(3.0, 9.0, 12)
    return np.concatenate([bulk, spikes])


@pytest.mark.parametrize("threshold", [2.5, 1.0, 0.3])
def test_count_equals_exact_with_a_gap(threshold: float) -> None:
    eig = _gapped_spectrum(200, seed=6)
    eig = eig[np.abs(eig - threshold) > 2e-3]  # a gap of >= 2e-3 around t
    a = _symmetric(eig, seed=7)
    exact = int((eig > threshold).sum())
    assert exact_count_above(a, threshold) == exact
    fp32 = count_above(a, threshold, dtype=torch.float32)
    assert fp32.count == exact
    assert fp32.ambiguity < 1e-3


def test_bf16_count_is_within_a_tenth() -> None:
    eig = _gapped_spectrum(96, seed=14)
    eig = eig[np.abs(eig - 2.5) > 1e-2]
    bf16 = count_above(_symmetric(eig, seed=15), 2.5, dtype=torch.bfloat16)
    assert abs(bf16.estimate - int((eig > 2.5).sum())) < 0.1


def test_count_flags_an_eigenvalue_at_the_threshold() -> None:
    eig = np.concatenate([np.linspace(0.0, 1.0, 50), [2.0], np.linspace(3.0, 4.0, 10)])
    result = count_above(_symmetric(eig, seed=8), 2.0)
    assert result.estimate == pytest.approx(10.5, abs=1e-3)  # sign(0) = 0 counts one half
    assert result.ambiguity == pytest.approx(0.5, abs=1e-3)


def test_count_singular_values_above() -> None:
    sv = np.concatenate([np.linspace(0.1, 1.0, 90), np.linspace(1.5, 4.0, 6)])
    for rows, cols in [(96, 140), (140, 96)]:
        w = _with_singular_values(sv, rows, cols, seed=9)
        result = count_singular_values_above(w, 1.2)
        assert result.count == 6
        assert result.threshold == pytest.approx(1.44)


def test_muon_audit_matches_the_singular_value_identity() -> None:
    sv = np.linspace(0.3, 1.7, 64)
    u = _with_singular_values(sv, 64, 96, seed=10)
    audit = muon_audit(u)
    expected = math.sqrt(np.var(sv) / np.mean(sv**2))
    assert audit.polar_distance == pytest.approx(expected, rel=1e-5)
    assert audit.scale == pytest.approx(sv.mean(), rel=1e-5)
    orth = 0.02 * torch.from_numpy(_orthonormal(96, 64, 11)).mT
    exact_muon = muon_audit(orth)
    assert exact_muon.polar_distance < 1e-5
    assert exact_muon.scale == pytest.approx(0.02, rel=1e-5)


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="steps"):
        polar_express_coefficients(0)
    with pytest.raises(ValueError, match="dtype"):
        polar_express(torch.eye(3), dtype=torch.float16)
    with pytest.raises(ValueError, match="square"):
        count_above(torch.ones(3, 4), 0.5)
    with pytest.raises(ValueError, match="non-zero"):
        muon_audit(torch.zeros(4, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_count_matches_exact() -> None:
    eig = _gapped_spectrum(1024, seed=12)
    eig = eig[np.abs(eig - 2.5) > 1e-2]
    a = _symmetric(eig, seed=13).cuda()
    result = count_above(a, 2.5, dtype=torch.bfloat16)
    assert result.count == int((eig > 2.5).sum())
    polar = polar_express(a.float(), dtype=torch.bfloat16)
    assert polar.factor.is_cuda


def test_float32_count_of_a_large_scale_gram_does_not_overflow() -> None:
    """S^4 of a float32 Gram with eigenvalues ~1e5 overflowed the Schatten-8 norm to inf, which
    zeroed the iterate and returned n/2 (found on an H200: 256 for 4 spikes)."""
    rng = np.random.default_rng(5)
    m, n = 1024, 512
    u = _orthonormal(m, 4, 1)
    v = _orthonormal(n, 4, 2)
    w = rng.standard_normal((m, n)) + (u * np.array([150.0, 200.0, 250.0, 300.0])) @ v.T
    w32 = torch.from_numpy(w).float()
    assert math.isfinite(float(schatten8_norm(w32.mT @ w32)))
    result = count_singular_values_above(w32, 66.4)  # bulk edge ~54, spikes 156..302
    assert (result.count, result.ambiguity < 1e-3) == (4, True)


def test_huge_tiny_and_non_finite_inputs() -> None:
    """A float32 input past ~1e19 overflowed its Frobenius norm (the factor came back all zero,
    error 1.0; the count failed on a NaN trace; muon_audit called a finite update not finite);
    a tiny one drowned in the normalisation's epsilon. Scaling by a power of two fixes both and
    leaves ordinary inputs bit-identical."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(40, 24, generator=g)
    base = polar_express(a)
    assert base.orthogonality_error < 1e-2
    assert torch.equal(polar_express(a * 4.0).factor, base.factor)  # a power of two: exact
    exact = int((torch.linalg.svdvals(a.double()) > 5.0).sum())
    assert 0 < exact < 24
    for c in (1e20, 1e-20):
        got = polar_express(a * c)
        assert got.orthogonality_error < 1e-2
        torch.testing.assert_close(got.factor, base.factor, rtol=1e-4, atol=1e-4)
        count = count_singular_values_above(a * c, 5.0 * c)
        assert count.count == exact
        assert count.threshold == pytest.approx((5.0 * c) ** 2)
        audit, ref = muon_audit(a * c), muon_audit(a)
        assert audit.polar_distance == pytest.approx(ref.polar_distance, rel=1e-4)
        assert audit.scale == pytest.approx(ref.scale * c, rel=1e-4)
    bad = a.clone()
    bad[0, 0] = float("nan")
    for call in (polar_express, lambda m: count_singular_values_above(m, 1.0)):
        with pytest.raises(ValueError, match="not finite"):
            call(bad)
    with pytest.raises(ValueError, match="finite and non-zero"):
        muon_audit(bad)
