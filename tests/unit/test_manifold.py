"""Quadratic-manifold fit: held-out R^2 of PCA and of the quadratic decoder.

References: numpy SVD / lstsq on the same split, data on a known quadratic manifold and on a
linear subspace (both plus noise).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectrawatch.spectral.manifold import (
    choose_rank,
    lifted_features,
    quadratic_lift,
    quadratic_manifold_fit,
)


def _data(n: int, d: int, r: int, curved: bool, seed: int, noise: float = 0.05) -> torch.Tensor:
    """Latent z ~ N(0, I_r): 3 z on r orthonormal directions, plus (if ``curved``) every product
    z_i z_j (i <= j) on further orthonormal directions, plus isotropic noise, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    z = torch.randn(n, r, generator=g, dtype=torch.float64)
    x = 3 * z @ basis[:, :r].T + 1.5
    if curved:
        i, j = torch.triu_indices(r, r)
        x = x + (z[:, i] * z[:, j]) @ basis[:, r : r + i.numel()].T
    return x + noise * torch.randn(n, d, generator=g, dtype=torch.float64)


def test_quadratic_manifold_has_large_positive_delta_r2() -> None:
    fit = quadratic_manifold_fit(_data(1500, 64, 4, curved=True, seed=0), rank=4)
    assert fit.delta_r2 > 0.2
    assert fit.r2_quadratic > 0.99
    assert fit.overfit < 0.01
    assert fit.features == 15
    assert (fit.train_rows, fit.test_rows) == (1200, 300)


def test_linear_subspace_has_no_gain() -> None:
    fit = quadratic_manifold_fit(_data(1500, 64, 4, curved=False, seed=1), rank=4)
    assert abs(fit.delta_r2) < 0.005
    assert fit.r2_pca > 0.99


def test_r2_values_against_numpy_on_the_same_split() -> None:
    x = _data(400, 24, 3, curved=True, seed=2, noise=0.3)
    fit = quadratic_manifold_fit(x, rank=3, seed=7, ridge=1e-12)
    perm = torch.randperm(400, generator=torch.Generator().manual_seed(7)).numpy()
    v = x.numpy()
    train, test = v[perm[:320]], v[perm[320:]]
    mu = train.mean(axis=0)
    _, _, vt = np.linalg.svd(train - mu, full_matrices=False)
    q = vt[:3].T

    def r2(target: np.ndarray, est: np.ndarray) -> float:
        return float(1 - ((target - est) ** 2).sum() / ((target - target.mean(axis=0)) ** 2).sum())

    assert fit.r2_pca == pytest.approx(r2(test, (test - mu) @ q @ q.T + mu), rel=1e-10)

    # The decoder's least-squares fit is invariant to the latent's whitening and ball scale.
    def lift(rows: np.ndarray) -> np.ndarray:
        p = (rows - mu) @ q
        i, j = np.triu_indices(3)
        return np.hstack([np.ones((rows.shape[0], 1)), p, p[:, i] * p[:, j]])

    w, *_ = np.linalg.lstsq(lift(train), train, rcond=None)
    assert fit.r2_quadratic == pytest.approx(r2(test, lift(test) @ w), rel=1e-6)


def test_lift_layout() -> None:
    p = torch.tensor([[2.0, 3.0, 5.0]])
    expected = [1.0, 2.0, 3.0, 5.0, 4.0, 6.0, 10.0, 9.0, 15.0, 25.0]
    assert quadratic_lift(p).tolist() == [expected]
    assert lifted_features(3) == 10
    assert lifted_features(32) == 561


def test_choose_rank_and_guards() -> None:
    assert choose_rank(512) == 4  # 410 training rows: rank 8 needs 450
    assert choose_rank(8000) == 32  # 6400 rows >= 10 x 561
    assert choose_rank(6000) == 16  # 4800 rows < 5610
    assert choose_rank(100) is None
    with pytest.raises(ValueError, match="lifted features"):
        quadratic_manifold_fit(torch.randn(50, 20), rank=8)
    with pytest.raises(ValueError, match="rank below"):
        quadratic_manifold_fit(torch.ones(200, 10), rank=2)
