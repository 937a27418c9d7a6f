"""EigenTrack descriptors and MP fit vs numpy/scipy; the eigentrack/manifold analyses.

References: numpy ``eigvalsh`` of ``np.cov``, ``scipy.integrate.quad`` of the MP density,
``scipy.stats.kstest`` / ``wasserstein_distance``, Gaussian samples (pure MP) and planted spikes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from spectrawatch.spectral.activations import (
    CHANGE_SCORE,
    ENTROPY,
    MP_KS,
    OUTLIERS,
    activation_spectra,
    activation_spectrum,
    activation_spectrum_from_gram,
    change_score,
    fit_marchenko_pastur,
    ks_distance,
    mp_cdf,
    mp_density,
    mp_edges,
    mp_quantile,
    wasserstein_distance,
)
from spectrawatch.spectral.manifold import MANIFOLD_DELTA_R2, MANIFOLD_RANK
from spectrawatch.wire import FrameKind
from spectrawatch_server.analyses.activations import eigentrack, manifold
from spectrawatch_server.analyses.registry import DecodedFrame
from tests.history import StubHistory, decoded_frame


def _noise(n: int, p: int, seed: int, sigma: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return sigma * torch.randn(n, p, generator=g, dtype=torch.float64)


def _spiked(n: int, p: int, strengths: list[float], seed: int) -> torch.Tensor:
    """Unit noise plus rank-k signal with variances ``strengths`` along orthonormal directions."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.linalg.qr(torch.randn(p, len(strengths), generator=g, dtype=torch.float64))[0]
    z = torch.randn(n, len(strengths), generator=g, dtype=torch.float64)
    scale = torch.tensor(strengths, dtype=torch.float64).sqrt()
    return _noise(n, p, seed + 1) + (z * scale) @ dirs.T + 3.0  # offset: centring must remove it


@pytest.mark.parametrize("ratio", [0.25, 1.0, 2.5])
def test_mp_cdf_matches_quadrature(ratio: float) -> None:
    a, b = mp_edges(ratio)
    total, _ = integrate.quad(lambda x: float(mp_density(np.array([x]), ratio)[0]), a, b)
    assert total == pytest.approx(1.0, abs=1e-6)
    for q in (0.1, 0.5, 0.9):
        x = a + q * (b - a)
        ref, _ = integrate.quad(lambda t: float(mp_density(np.array([t]), ratio)[0]), a, x)
        assert float(mp_cdf(np.array([x]), ratio)[0]) == pytest.approx(ref, abs=1e-6)
        u = float(mp_cdf(np.array([x]), ratio)[0])
        assert float(mp_quantile(np.array([u]), ratio)[0]) == pytest.approx(x, rel=1e-6)


def test_ks_and_wasserstein_against_scipy() -> None:
    rng = np.random.default_rng(0)
    sample = rng.uniform(0.2, 3.0, 300)
    ks_ref = stats.kstest(sample, lambda x: mp_cdf(np.asarray(x), 0.5)).statistic
    assert ks_distance(sample, 0.5) == pytest.approx(ks_ref, abs=1e-12)
    fine = mp_quantile((np.arange(200_000) + 0.5) / 200_000, 0.5)
    w_ref = stats.wasserstein_distance(sample, fine)
    assert wasserstein_distance(sample, 0.5) == pytest.approx(w_ref, rel=1e-3)


@pytest.mark.parametrize(("n", "p"), [(400, 100), (120, 300)])
def test_eigenvalues_and_descriptors_against_numpy(n: int, p: int) -> None:
    x = _spiked(n, p, [20.0, 8.0], seed=1)
    spectrum = activation_spectrum(x)
    m = min(p, n - 1)
    ref = np.sort(np.linalg.eigvalsh(np.cov(x.numpy(), rowvar=False)))[::-1][:m]
    np.testing.assert_allclose(spectrum.eigenvalues.numpy(), ref, rtol=1e-9, atol=1e-9)
    prob = ref / ref.sum()
    h = -(prob * np.log(prob)).sum()
    assert spectrum.entropy == pytest.approx(h / math.log(m), rel=1e-9)
    assert spectrum.effective_rank == pytest.approx(math.exp(h), rel=1e-9)
    assert spectrum.eig_variance == pytest.approx(np.var(ref / ref.mean()), rel=1e-9)
    assert spectrum.top_k_share == pytest.approx(ref[:10].sum() / ref.sum(), rel=1e-9)
    assert spectrum.spectral_gap == pytest.approx(ref[0] / ref[1], rel=1e-9)
    assert spectrum.mp.ratio == pytest.approx(p / (n - 1))


@pytest.mark.parametrize(("n", "p"), [(1200, 300), (300, 600)])
def test_pure_noise_has_no_outliers_and_fits_mp(n: int, p: int) -> None:
    for seed in range(4):
        spectrum = activation_spectrum(_noise(n, p, seed, sigma=2.0))
        assert spectrum.mp.outliers == 0
        assert spectrum.mp.outlier_mass == 0.0
        assert spectrum.mp.sigma2 == pytest.approx(4.0, rel=0.01)
        assert spectrum.mp.ks < 0.05
        assert spectrum.mp.wasserstein < 0.03
        _, plus = mp_edges(p / (n - 1), 4.0)
        assert spectrum.mp.lambda_plus == pytest.approx(plus, rel=0.01)


def test_planted_spikes_are_exactly_the_outliers() -> None:
    n, p = 800, 400
    ratio = p / (n - 1)
    # BBP: a population spike 1 + l separates when l > sqrt(ratio) = 0.71; its sample eigenvalue
    # sits near (1 + l)(1 + ratio / l).
    strengths = [2.0, 4.0, 10.0]
    spectrum = activation_spectrum(_spiked(n, p, strengths, seed=3))
    assert spectrum.mp.outliers == 3
    expected_top = [(1 + s) * (1 + ratio / s) for s in sorted(strengths, reverse=True)]
    np.testing.assert_allclose(spectrum.eigenvalues[:3].numpy(), expected_top, rtol=0.2)
    assert spectrum.mp.sigma2 == pytest.approx(1.0, rel=0.02)
    ref_mass = spectrum.eigenvalues[:3].sum() / spectrum.eigenvalues.sum()
    assert spectrum.mp.outlier_mass == pytest.approx(float(ref_mass), rel=1e-12)
    below_bbp = activation_spectrum(_spiked(n, p, [0.3], seed=4))  # 0.3 < 0.71: invisible
    assert below_bbp.mp.outliers == 0


def test_batched_spectra_equal_single() -> None:
    stack = torch.stack([_spiked(200, 50, [5.0 * (k + 1)], seed=10 + k) for k in range(3)])
    for batched, x in zip(activation_spectra(stack), stack, strict=True):
        single = activation_spectrum(x)
        np.testing.assert_allclose(batched.eigenvalues, single.eigenvalues, rtol=1e-9, atol=1e-12)
        assert batched.metrics() == pytest.approx(single.metrics(), rel=1e-9)


def test_fit_requires_a_spectrum() -> None:
    with pytest.raises(ValueError, match="nonzero"):
        fit_marchenko_pastur(np.zeros(5), 10, 5)
    with pytest.raises(ValueError, match="tokens"):
        activation_spectrum(torch.ones(2, 4))


def test_gram_paths_equal_the_row_path() -> None:
    x = _spiked(300, 80, [6.0], seed=5)
    direct = activation_spectrum(x)
    from_sum = activation_spectrum_from_gram(x.mT @ x, 300, column_sum=x.sum(dim=0))
    xc = x - x.mean(dim=0)
    centred = activation_spectrum_from_gram(xc.mT @ xc, 300, centered=True)
    for other in (from_sum, centred):
        np.testing.assert_allclose(other.eigenvalues, direct.eigenvalues, rtol=1e-8, atol=1e-9)
        assert other.mp.outliers == direct.mp.outliers == 1
        assert other.mp.sigma2 == pytest.approx(direct.mp.sigma2, rel=1e-9)
        assert other.entropy == pytest.approx(direct.entropy, rel=1e-9)
    uncentred = activation_spectrum_from_gram(x.mT @ x, 300)
    assert uncentred.mp.outliers == direct.mp.outliers + 1  # the mean direction (offset 3)


def test_change_score() -> None:
    history = [1.0, 1.2, 0.8, 1.1, 0.9]
    z = change_score(history, 2.0)
    assert z == pytest.approx((2.0 - np.mean(history)) / np.std(history, ddof=1))
    assert change_score([5.0] * 6, 5.0) == 0.0
    assert change_score([5.0] * 6, 5.5) == pytest.approx(0.5 / 5e-3)  # relative floor 1e-3
    assert change_score([*range(100), 1.0, 1.0, 1.0, 1.0, 1.0], 1.0, window=5) == 0.0
    assert change_score([0.0] * 5, 0.05, abs_floor=1e-3) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="history"):
        change_score([1.0, math.nan, 2.0], 1.0, min_history=3)


def _frame(tensors: dict[str, torch.Tensor], step: int, info: dict[str, Any]) -> DecodedFrame:
    return decoded_frame(FrameKind.ACTIVATIONS, step, tensors, info)


def test_eigentrack_analysis_with_history() -> None:
    x = _spiked(256, 96, [8.0, 5.0], seed=6)
    gram_x = _noise(256, 64, seed=7)
    frame = _frame(
        {
            "h.0": x,
            "h.1": gram_x.mT @ gram_x,
            "h.2": torch.eye(8),
            "h.3": torch.zeros_like(x),  # degenerate, same shape as h.0: left out alone
            "h.4": torch.full_like(x, math.nan),
        },
        step=1000,
        info={"gram": ["h.1", "h.2"], "tokens": {"h.1": 256}},
    )
    entropy = activation_spectrum(x).entropy
    history = [(100 * k, entropy + 0.01 * (-1) ** k) for k in range(1, 10)]
    history.append((1000, 123.0))  # the frame's own stored value: must be ignored on a re-run
    context = StubHistory(series={(ENTROPY, "h.0"): history})
    result = eigentrack(frame, context)
    by_key = {(m.layer, m.name): m.value for m in result.metrics}
    assert {layer for layer, _ in by_key} == {"h.0", "h.1"}  # h.2 has no token count
    assert by_key[("h.0", OUTLIERS)] == 2.0
    assert by_key[("h.1", OUTLIERS)] == 0.0
    assert by_key[("h.0", MP_KS)] == pytest.approx(activation_spectrum(x).mp.ks)
    past = [v for s, v in history if s < 1000][-20:]
    expected = abs(entropy - np.mean(past)) / np.std(past, ddof=1)
    assert by_key[("h.0", CHANGE_SCORE)] == pytest.approx(expected)
    assert ("h.1", CHANGE_SCORE) not in by_key  # no history yet
    payload = {s.layer: s.payload for s in result.spectra}["h.0"]
    assert sum(payload["counts"]) == 96 - 2  # all but the two outliers fall in the bulk bins
    assert len(payload["outliers"]) == 2
    assert eigentrack(frame, context).metrics == result.metrics  # idempotent


def test_manifold_analysis_picks_a_supported_rank() -> None:
    g = torch.Generator().manual_seed(8)
    z = torch.randn(400, 4, generator=g, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64))[0]
    i, j = torch.triu_indices(4, 4)
    x = 3 * z @ basis[:, :4].T + (z[:, i] * z[:, j]) @ basis[:, 4:14].T
    frame = _frame({"curved": x, "gram": x.mT @ x}, step=5, info={"gram": ["gram"]})
    result = manifold(frame, StubHistory())
    by_key = {(m.layer, m.name): m.value for m in result.metrics}
    # 320 training rows: 10 x 15 features (rank 4) <= 320 < 10 x 45 (rank 8)
    assert by_key[("curved", MANIFOLD_RANK)] == 4.0
    assert by_key[("curved", MANIFOLD_DELTA_R2)] > 0.2
    assert all(layer == "curved" for layer, _ in by_key)


def test_dead_units_are_left_out_of_the_mp_fit() -> None:
    """ReLU-style dead units give exact zero eigenvalues: the fit uses the live subspace only."""
    gen = torch.Generator().manual_seed(3)
    live = torch.randn(2000, 40, generator=gen, dtype=torch.float64)
    x = torch.cat([live, torch.zeros(2000, 88, dtype=torch.float64)], dim=1)
    dead = activation_spectrum(x)
    alone = activation_spectrum(live)
    assert dead.mp.sigma2 == pytest.approx(alone.mp.sigma2, rel=1e-9)
    assert dead.mp.outliers == alone.mp.outliers == 0


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_activations_raise_value_error(value: float) -> None:
    """NaN/Inf activations (or a Gram past float64) are a ValueError like the other degenerate
    inputs, not LAPACK's convergence failure (``_LinAlgError``, "ill-conditioned")."""
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    x[3, 4] = value
    with pytest.raises(ValueError, match="not finite"):
        activation_spectrum(x)
    with pytest.raises(ValueError, match="not finite"):
        activation_spectra(torch.stack([x.abs().nan_to_num(1.0), x]))
    with pytest.raises(ValueError, match="not finite"):
        activation_spectrum_from_gram(x.double().T @ x.double(), 50)
    with pytest.raises(ValueError, match="not finite"):
        activation_spectrum(x.nan_to_num(1.0).double() * 1e200)  # squares overflow


@pytest.mark.parametrize(
    "lam",
    [
        np.exp(-np.arange(128) / 5.0),  # fast decay: no noise bulk at all
        np.arange(1, 129) ** -2.0,
        np.r_[np.full(10, 100.0), np.full(118, 1e-6)],  # rank 10 over a tiny noise floor
    ],
    ids=["exp", "power", "low_rank"],
)
def test_structured_spectra_keep_a_bulk_and_a_bounded_distance(lam: np.ndarray) -> None:
    """Session 27: on the demo's probe the fit shed every eigenvalue but one as an outlier,
    sigma2 fell to 5e-11 of the top (an ``exp(-i/5)`` spectrum does the same) and the W1
    distance read 1e10. The bulk now keeps at least half of the spectrum, and W1 compares the
    shape (rescaled to the law's mean): bounded by 2 max(1, y), unchanged by the units."""
    fit = fit_marchenko_pastur(lam, 339, 128)
    low = np.sort(lam)[::-1][64:]
    assert fit.sigma2 >= low.sum() / 64 * (1 - 1e-12)  # the bulk is at least the lower half
    assert 0.3 < fit.wasserstein <= 2.0
    assert fit_marchenko_pastur(lam * 1e6, 339, 128).wasserstein == pytest.approx(
        fit.wasserstein, rel=1e-9
    )
    wide = fit_marchenko_pastur(lam[:60], 60, 100)  # y = 5/3: the nonzero part's mean is y
    assert 0.0 < wide.wasserstein <= 2 * 100 / 60
