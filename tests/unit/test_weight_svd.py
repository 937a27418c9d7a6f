"""The weight frame's singular values are computed once and shared by ``norms`` and
``grok_rank``, with the same stored values as the standalone functions."""

from __future__ import annotations

import pytest
import torch

from spectrawatch.spectral import grokking
from spectrawatch.spectral.norms import FROBENIUS_NORM, SPECTRAL_NORM, matrix_norms
from spectrawatch.wire import FrameKind
from spectrawatch_server.analyses.norms import weight_norms
from spectrawatch_server.analyses.sed import weight_effective_rank
from tests.history import StubHistory, decoded_frame


def test_norms_and_effective_rank_share_one_svd_per_matrix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(64, 32, generator=g),
        "b": torch.randn(16, 48, generator=g) * 3.0,
        "row": torch.randn(1, 8, generator=g),  # no effective rank, but norms
    }
    frame = decoded_frame(FrameKind.WEIGHTS, 10, tensors)
    calls: list[tuple[int, ...]] = []
    svdvals = torch.linalg.svdvals

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return svdvals(x)

    monkeypatch.setattr(torch.linalg, "svdvals", counting)
    ranks = weight_effective_rank(frame, StubHistory())
    norms = weight_norms(frame, StubHistory())
    # one SVD per matrix for both; wide CPU matrices are decomposed as their transpose
    assert sorted(calls) == [(8, 1), (48, 16), (64, 32)]
    monkeypatch.setattr(torch.linalg, "svdvals", svdvals)
    got_rank = {m.layer: m.value for m in ranks.metrics}
    assert got_rank == {k: grokking.effective_rank(tensors[k]) for k in ("a", "b")}  # exact
    got = {(m.layer, m.name): m.value for m in norms.metrics}
    for layer, w in tensors.items():
        want = matrix_norms(w)
        assert got[(layer, SPECTRAL_NORM)] == want.spectral  # exact, as stored before
        assert got[(layer, FROBENIUS_NORM)] == want.frobenius


def test_htsr_takes_the_shared_svd_as_its_esd_with_the_same_metrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After ``conditioning`` has the frame's SVDs, ``htsr`` squares them instead of running
    its own Gram eigendecompositions, and every stored value stays the same to round-off."""
    from spectrawatch.spectral import htsr as htsr_math
    from spectrawatch_server.analyses.conditioning import weight_conditioning
    from spectrawatch_server.analyses.htsr import heavy_tail_metrics

    g = torch.Generator().manual_seed(1)
    tensors = {
        "wide": torch.distributions.StudentT(3.0).sample((40, 120)) * 0.02,
        "tall": torch.randn(150, 60, generator=g),
    }
    alone = heavy_tail_metrics(decoded_frame(FrameKind.WEIGHTS, 5, tensors), StubHistory())
    frame = decoded_frame(FrameKind.WEIGHTS, 5, tensors)
    weight_conditioning(frame, StubHistory())
    decomposed: list[int] = []
    originals: list[torch.Tensor] = []
    eigenvalues = htsr_math.eigenvalues

    def counting(matrices: list[torch.Tensor], **kw: object) -> list[torch.Tensor]:
        decomposed.extend(max(m.shape) for m in matrices)
        originals.extend(
            m
            for m in matrices
            if any(m.shape == t.shape and torch.equal(m, t) for t in tensors.values())
        )
        return eigenvalues(matrices, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(htsr_math, "eigenvalues", counting)
    shared = heavy_tail_metrics(frame, StubHistory())
    assert decomposed  # the FARMS windows still are, and the correlation traps' shuffles
    assert sum(n > 100 for n in decomposed) == 10  # 5 shuffles of each layer (M < 100)
    assert not originals  # but no whole matrix: 120 and 150 rows came from the SVDs
    want = {(m.layer, m.name): m.value for m in alone.metrics}
    got = {(m.layer, m.name): m.value for m in shared.metrics}
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
