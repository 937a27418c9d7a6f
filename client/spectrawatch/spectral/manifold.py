"""Quadratic-manifold fit of activations: PCA encoder + quadratic decoder, held-out Delta R^2.

The construction of the polynomial autoencoder (Pleshkov, `IvanPleshkov/poly-autoencoder`
``poly_pca.py``; the quadratic-manifold form of Geelen, Wright & Willcox, arXiv 2205.02304, and
Barnett & Farhat, arXiv 2204.02462), as ``research/matrix_methods.md`` §3.1 records it:

1. PCA on the training rows: mean ``mu``, top-``r`` eigenvectors ``Q`` ``(D, r)``, eigenvalues
   ``lambda``.
2. Whitened, ball-scaled latent ``p = (v - mu) Q / sqrt(lambda) * kappa``, ``kappa`` such that
   ``max ||p|| = 0.9`` on the training rows.
3. Lift ``l(p) = [1, p_1..p_r, p_i p_j (i <= j)]``: ``M = 1 + r + r(r+1)/2`` features.
4. Ridge decoder ``W = (L^T L + alpha I)^-1 L^T V`` on the raw rows,
   ``alpha = ridge * tr(L^T L) / M``.
5. Held-out ``R^2 = 1 - ||V - V_hat||_F^2 / ||V - mean(V)||_F^2`` (test mean) for the quadratic
   decoder and for PCA at the same ``r`` (``V_hat = (v - mu) Q Q^T + mu``).

``delta_r2 = R^2_quadratic - R^2_PCA`` is the curvature ("cone effect") index: near 0 for data on a
linear subspace, large when variance sits on a curved manifold over the top-``r`` subspace.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MANIFOLD_R2_PCA = "manifold.r2_pca"
MANIFOLD_R2_QUADRATIC = "manifold.r2_quadratic"
MANIFOLD_DELTA_R2 = "manifold.delta_r2"
MANIFOLD_OVERFIT = "manifold.overfit"
MANIFOLD_RANK = "manifold.rank"


@dataclass(frozen=True)
class QuadraticManifoldFit:
    """Held-out reconstruction quality at rank ``rank`` with ``features`` lifted features.

    ``overfit`` is the quadratic decoder's train R^2 minus its test R^2.
    """

    rank: int
    features: int
    train_rows: int
    test_rows: int
    r2_pca: float
    r2_quadratic: float
    delta_r2: float
    overfit: float

    def metrics(self) -> dict[str, float]:
        """The scalar results keyed by their metric names."""
        return {
            MANIFOLD_R2_PCA: self.r2_pca,
            MANIFOLD_R2_QUADRATIC: self.r2_quadratic,
            MANIFOLD_DELTA_R2: self.delta_r2,
            MANIFOLD_OVERFIT: self.overfit,
            MANIFOLD_RANK: float(self.rank),
        }


def lifted_features(rank: int) -> int:
    """Number of lifted features ``1 + r + r(r+1)/2``."""
    return 1 + rank + rank * (rank + 1) // 2


def quadratic_lift(p: torch.Tensor) -> torch.Tensor:
    """``[1, p, p_i p_j for i <= j]`` of latent rows ``p`` ``(N, r)``: ``(N, 1 + r + r(r+1)/2)``."""
    i, j = torch.triu_indices(p.shape[1], p.shape[1], device=p.device)
    ones = torch.ones(p.shape[0], 1, dtype=p.dtype, device=p.device)
    return torch.cat([ones, p, p[:, i] * p[:, j]], dim=1)


def _r2(target: torch.Tensor, estimate: torch.Tensor) -> float:
    total = ((target - target.mean(dim=0, keepdim=True)) ** 2).sum()
    return float(1 - ((target - estimate) ** 2).sum() / total)


def quadratic_manifold_fit(
    x: torch.Tensor,
    rank: int,
    holdout: float = 0.2,
    seed: int = 0,
    ridge: float = 1e-3,
) -> QuadraticManifoldFit:
    """Fit PCA-``rank`` + quadratic decoder on a random ``1 - holdout`` of the rows of ``x``
    ``(N, D)`` and score both on the rest. Deterministic given ``seed``; computed in float64.

    Raises ``ValueError`` when the training rows are fewer than the lifted features or the data
    has rank below ``rank``.
    """
    if x.ndim != 2:
        raise ValueError(f"expected (rows, features), got shape {tuple(x.shape)}")
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    n, d = x.shape
    if not 1 <= rank <= d:
        raise ValueError(f"rank must be in [1, {d}], got {rank}")
    n_test = max(2, round(holdout * n))
    n_train = n - n_test
    features = lifted_features(rank)
    if n_train < features:
        raise ValueError(f"{n_train} training rows cannot fit {features} lifted features")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x.device)
    v = x.to(torch.float64)
    train, test = v[perm[:n_train]], v[perm[n_train:]]

    mu = train.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(train - mu, full_matrices=False)
    lam = s[:rank] ** 2 / n_train
    if float(lam[-1]) <= 1e-12 * float(lam[0]):
        raise ValueError(f"training rows have rank below {rank}")
    q = vh[:rank].mT  # (D, r)

    white_train = (train - mu) @ q / lam.sqrt()
    kappa = 0.9 / white_train.norm(dim=1).max()

    def encode(rows: torch.Tensor) -> torch.Tensor:
        return quadratic_lift((rows - mu) @ q / lam.sqrt() * kappa)

    lift_train = encode(train)
    gram = lift_train.mT @ lift_train
    alpha = ridge * torch.trace(gram) / features
    eye = torch.eye(features, dtype=gram.dtype, device=gram.device)
    decoder = torch.linalg.solve(gram + alpha * eye, lift_train.mT @ train)

    r2_quad = _r2(test, encode(test) @ decoder)
    r2_pca = _r2(test, (test - mu) @ q @ q.mT + mu)
    r2_train = _r2(train, lift_train @ decoder)
    return QuadraticManifoldFit(
        rank=rank,
        features=features,
        train_rows=n_train,
        test_rows=n_test,
        r2_pca=r2_pca,
        r2_quadratic=r2_quad,
        delta_r2=r2_quad - r2_pca,
        overfit=r2_train - r2_quad,
    )


def choose_rank(
    rows: int,
    candidates: tuple[int, ...] = (32, 16, 8, 4),
    holdout: float = 0.2,
    samples_per_feature: int = 10,
) -> int | None:
    """Largest candidate rank whose lifted features the training rows cover
    ``samples_per_feature`` times (notes §3.3 guard rail ``N >= 10 M``); ``None`` if none does."""
    n_train = rows - max(2, round(holdout * rows))
    for rank in sorted(candidates, reverse=True):
        if n_train >= samples_per_feature * lifted_features(rank):
            return rank
    return None
