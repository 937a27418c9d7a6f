"""Top-subspace drift between weight snapshots: exact (eigh) and Polar Express paths.

References: matrices with planted spikes whose directions are rotated by a known angle (drift =
sin^2(theta) / k), numpy's SVD for the spike bases and scipy's principal angles.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from spectrawatch.spectral.conditioning import mp_spike_threshold
from spectrawatch.spectral.subspace import (
    SUBSPACE_DRIFT,
    SUBSPACE_RANK,
    basis_drift,
    top_subspace,
    weight_subspace_drift,
)
from spectrawatch.wire import FrameKind
from spectrawatch_server.analyses.registry import MODEL_LAYER, DecodedFrame
from spectrawatch_server.analyses.subspace import weight_subspace
from tests.history import StubHistory, decoded_frame

M, N, K = 300, 120, 4


def _spiked(v: np.ndarray, seed: int, strength: float = 6.0, noise: int = 0) -> np.ndarray:
    """``(M, N)`` noise of unit-variance entries plus ``v.shape[1]`` strong rank-one spikes along
    the right directions ``v`` ``(N, k)`` (left directions random)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((M, v.shape[1])))
    scale = strength * math.sqrt(M * N) / math.sqrt(v.shape[1])
    return rng.standard_normal((M, N)) * (1 if noise == 0 else noise) + (u * scale) @ v.T


def _numpy_drift(a: np.ndarray, b: np.ndarray) -> float:
    """Independent reference: numpy SVD, spike count from the MP threshold, overlap of bases."""

    def basis(w: np.ndarray) -> np.ndarray:
        _, s, vt = np.linalg.svd(w, full_matrices=False)
        eig = s**2 / w.shape[0]
        k = int((eig > mp_spike_threshold(w.shape, float((w**2).sum()))).sum())
        return vt[:k].T

    ba, bb = basis(a), basis(b)
    k = max(ba.shape[1], bb.shape[1])
    return 1 - float(np.linalg.norm(ba.T @ bb) ** 2) / k


def _directions(seed: int, k: int = K + 1) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((N, k)))
    return q


@pytest.mark.parametrize("theta", [0.0, 0.3, 0.8, math.pi / 2])
def test_rotating_one_spike_direction_gives_sin_squared_over_k(theta: float) -> None:
    q = _directions(1)
    v_before = q[:, :K]
    v_after = v_before.copy()
    v_after[:, 0] = math.cos(theta) * q[:, 0] + math.sin(theta) * q[:, K]
    a, b = _spiked(v_before, 2), _spiked(v_after, 3)
    got = weight_subspace_drift(torch.from_numpy(a), torch.from_numpy(b))
    assert (got.rank_before, got.rank_after) == (K, K)
    assert got.drift == pytest.approx(_numpy_drift(a, b), abs=1e-9)
    # the noise tilts the estimated directions slightly: 0.01 absolute covers it at this SNR
    assert got.drift == pytest.approx(math.sin(theta) ** 2 / K, abs=0.01)


def test_equal_ranks_drift_is_mean_squared_sine_of_principal_angles() -> None:
    a = _spiked(_directions(4)[:, :K], 5)
    b = _spiked(_directions(6)[:, :K], 7)
    ta, tb = top_subspace(torch.from_numpy(a)), top_subspace(torch.from_numpy(b))
    angles = scipy.linalg.subspace_angles(ta.numpy(), tb.numpy())
    assert basis_drift(ta, tb).drift == pytest.approx(float(np.mean(np.sin(angles) ** 2)), abs=1e-9)


def test_a_new_spike_counts_as_one_over_k_and_orientation_does_not_matter() -> None:
    q = _directions(8)
    a, b = _spiked(q[:, :K], 9), _spiked(q[:, : K + 1], 10)
    got = weight_subspace_drift(torch.from_numpy(a), torch.from_numpy(b))
    assert (got.rank_before, got.rank_after) == (K, K + 1)
    assert got.drift == pytest.approx(1 / (K + 1), abs=0.01)
    wide = weight_subspace_drift(torch.from_numpy(a.T.copy()), torch.from_numpy(b.T.copy()))
    assert wide.drift == pytest.approx(got.drift, abs=1e-9)


def test_pure_noise_has_no_spike_subspace() -> None:
    rng = np.random.default_rng(11)
    a, b = (torch.from_numpy(rng.standard_normal((M, N))) for _ in range(2))
    with pytest.raises(ValueError, match="no spikes"):
        weight_subspace_drift(a, b)
    with pytest.raises(ValueError, match="shapes differ"):
        weight_subspace_drift(a, b[:, :-1])


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-3), (torch.bfloat16, 0.03)])
def test_polar_express_projectors_agree_with_exact_eigenvectors(
    dtype: torch.dtype, tol: float
) -> None:
    q = _directions(12)
    v_after = q[:, :K].copy()
    v_after[:, 1] = math.cos(0.6) * q[:, 1] + math.sin(0.6) * q[:, K]
    a = torch.from_numpy(_spiked(q[:, :K], 13)).float()
    b = torch.from_numpy(_spiked(v_after, 14)).float()
    exact = weight_subspace_drift(a, b)
    fast = weight_subspace_drift(a, b, polar=True, dtype=dtype)
    assert (fast.rank_before, fast.rank_after) == (K, K)
    assert fast.drift == pytest.approx(exact.drift, abs=tol)


def _weights_frame(step: int, tensors: dict[str, np.ndarray]) -> DecodedFrame:
    as_torch = {name: torch.from_numpy(t).float() for name, t in tensors.items()}
    return decoded_frame(FrameKind.WEIGHTS, step, as_torch, frame_id=step)


def test_analysis_compares_with_the_previous_weight_frame() -> None:
    q = _directions(15)
    rotated = q[:, :K].copy()
    rotated[:, 0] = q[:, K]
    noise = np.random.default_rng(16).standard_normal((M, N))
    first = _weights_frame(
        100, {"a": _spiked(q[:, :K], 17), "b": _spiked(q[:, :K], 18), "n": noise}
    )
    second = _weights_frame(
        200,
        {
            "a": _spiked(q[:, :K], 19),  # same directions: drift ~ 0
            "b": _spiked(rotated, 20),  # one of K directions replaced: drift ~ 1/K
            "n": noise,  # no spikes: skipped
            "new": noise,  # not in the previous frame: skipped
        },
    )
    assert weight_subspace(first, StubHistory()).metrics == []
    metrics = {
        (m.layer, m.name): m.value for m in weight_subspace(second, StubHistory([first])).metrics
    }
    assert set(metrics) == {
        ("a", SUBSPACE_DRIFT),
        ("a", SUBSPACE_RANK),
        ("b", SUBSPACE_DRIFT),
        ("b", SUBSPACE_RANK),
        (MODEL_LAYER, SUBSPACE_DRIFT),
    }
    assert metrics[("a", SUBSPACE_DRIFT)] < 0.01
    assert metrics[("b", SUBSPACE_DRIFT)] == pytest.approx(1 / K, abs=0.01)
    assert metrics[("b", SUBSPACE_RANK)] == K
    mean = (metrics[("a", SUBSPACE_DRIFT)] + metrics[("b", SUBSPACE_DRIFT)]) / 2
    assert metrics[(MODEL_LAYER, SUBSPACE_DRIFT)] == pytest.approx(mean)
