"""Correlation traps (WeightWatcher's ``randomize=True``) against weightwatcher 0.7.7 and planted
outliers.

WeightWatcher shuffles each matrix with ``np.random.shuffle``; seeding numpy and drawing the same
permutations here gives our functions the very shuffled matrices it analysed, so every column is
compared at a relative 1e-7 (float64 Gram ``eigvalsh`` vs its float64 SVD) and the trap count
exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectrawatch.spectral import htsr
from spectrawatch.spectral.farms import FARMS_CV
from spectrawatch.spectral.traps import (
    correlation_traps,
    jensen_shannon_distance,
    shuffled_matrices,
    trap_replicas,
)
from spectrawatch.wire import FrameKind
from spectrawatch_server.analyses.htsr import heavy_tail_metrics
from spectrawatch_server.figures import traps_figure
from tests.history import StubHistory, decoded_frame
from tests.references import weightwatcher

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning:weightwatcher",
    "ignore::RuntimeWarning:weightwatcher",
)


def _weight(n_out: int, n_in: int, planted: int, seed: int) -> torch.Tensor:
    """A random weight with a rank-one signal and ``planted`` outsized entries (distinct rows and
    columns), float64."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64) / n_in**0.5
    w += (
        0.3
        * torch.randn(n_out, 1, generator=g, dtype=torch.float64)
        @ torch.randn(1, n_in, generator=g, dtype=torch.float64)
        / n_in**0.5
    )
    for k in range(planted):
        w[(7 * k) % n_out, (13 * k) % n_in] = 3.0 + k
    return w


def _esd(w: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.sort(np.linalg.svd(w, compute_uv=False) ** 2))


@pytest.mark.parametrize(
    ("n_out", "n_in", "planted"),
    [(300, 150, 0), (300, 150, 3), (150, 300, 2), (200, 60, 0), (200, 60, 2)],
)
def test_traps_match_weightwatcher_randomize(n_out: int, n_in: int, planted: int) -> None:
    ww = weightwatcher()
    w = _weight(n_out, n_in, planted, seed=n_out + n_in + planted)
    model = torch.nn.Sequential(torch.nn.Linear(n_in, n_out, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w)
    np.random.seed(11)  # noqa: NPY002 (WeightWatcher shuffles with numpy's global generator)
    row = ww.WeightWatcher(model=model).analyze(randomize=True, mp_fit=True).iloc[0]
    # the same draws: one permutation per replica for the pooled ESD, then one for the distance
    np.random.seed(11)  # noqa: NPY002
    wn = model[0].weight.detach().double().numpy()
    replicas = [
        _esd(wn.flatten()[np.random.permutation(wn.size)].reshape(wn.shape))  # noqa: NPY002
        for _ in range(trap_replicas(min(n_out, n_in)))
    ]
    second = _esd(wn.flatten()[np.random.permutation(wn.size)].reshape(wn.shape))  # noqa: NPY002
    evals = _esd(wn)
    traps = correlation_traps(evals, replicas, n_out, n_in)
    assert traps.num_traps == row["num_traps"] == row["rand_num_spikes"]
    assert traps.rand_lambda_max == pytest.approx(row["max_rand_eval"], rel=1e-7)
    assert traps.mp.bulk_max / traps.mp.w_scale**2 == pytest.approx(row["rand_bulk_max"], rel=1e-7)
    assert traps.mp.softrank == pytest.approx(row["rand_mp_softrank"], rel=1e-7)
    assert traps.mp.sigma == pytest.approx(row["rand_sigma_mp"], rel=1e-7)
    distance = jensen_shannon_distance(evals, second)
    assert distance == pytest.approx(row["rand_distance"], rel=1e-7)
    assert float(second.max() / evals.max()) == pytest.approx(row["ww_softrank"], rel=1e-7)
    # the planted entries are the traps: one per entry and shuffle
    assert traps.num_traps == planted * len(replicas)


def test_jensen_shannon_distance_matches_weightwatcher() -> None:
    rmt = weightwatcher().RMT_Util
    g = torch.Generator().manual_seed(3)
    p = torch.rand(50, generator=g, dtype=torch.float64)
    q = torch.rand(50, generator=g, dtype=torch.float64) * 2.0  # unequal sums
    q[:5] = 0.0
    assert jensen_shannon_distance(p, q) == pytest.approx(
        rmt.jensen_shannon_distance(p.numpy(), q.numpy()), rel=1e-12
    )
    assert jensen_shannon_distance(p, p) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(htsr.SpectralError):
        jensen_shannon_distance(p, q[:10])


def test_gaussian_weights_have_no_traps_and_planted_entries_do() -> None:
    clean, planted = [], []
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(256, 128, generator=g)
        report = htsr.analyze_weights({"w": w, "v": w.T.contiguous()}, traps=True)
        clean += [layer.traps.num_traps for layer in report.layers if layer.traps]
        w2 = w.clone()
        w2[3, 5], w2[100, 70] = 25.0, -30.0
        (layer,) = htsr.analyze_weights({"w": w2}, traps=True).layers
        assert layer.traps is not None
        planted.append(layer.traps.num_traps)
        # the outliers sit in the layer's own ESD too, but shuffling cannot move them into the bulk
        assert layer.traps.softrank > 0.9
    assert clean == [0] * 12
    assert planted == [2] * 6


def test_analyze_weights_traps_are_seeded_and_summarized() -> None:
    g = torch.Generator().manual_seed(5)
    weights = {
        "a": torch.randn(120, 60, generator=g),  # M < 100: five shuffles pooled
        "b": torch.randn(200, 150, generator=g),
        "c": torch.randn(8, 4, 3, 3, generator=g),  # conv: each slice shuffled on its own
    }
    weights["b"][0, 0] = 40.0
    one = htsr.analyze_weights(weights, traps=True)
    two = htsr.analyze_weights(weights, traps=True)
    other = htsr.analyze_weights(weights, traps=True, trap_seed=1)
    plain = htsr.analyze_weights(weights)
    assert [r.values() for r in one.layers] == [r.values() for r in two.layers]
    assert [r.values() for r in one.layers] != [r.values() for r in other.layers]
    by_layer = {r.layer: r for r in one.layers}
    shapes = {name: r.rand_evals.shape for name, r in by_layer.items() if r.rand_evals is not None}
    assert shapes == {"a": (5, 60), "b": (1, 150), "c": (5, 4 * 9)}
    assert [r.traps.num_traps if r.traps else None for r in one.layers] == [0, 1, 0]
    for r, p in zip(one.layers, plain.layers, strict=True):
        values = r.values()
        assert set(htsr.TRAP_KEYS) <= set(values)
        assert not set(htsr.TRAP_KEYS) & set(p.values())
        assert p.traps is None
        for key, value in p.values().items():  # the plain metrics do not change
            assert values[key] == value
    summary = one.summary()
    assert summary[htsr.NUM_TRAPPED_LAYERS] == 1
    assert summary[htsr.NUM_TRAPS] == pytest.approx(
        sum(r.traps.num_traps for r in one.layers if r.traps) / 3
    )
    assert htsr.NUM_TRAPPED_LAYERS not in plain.summary()


def test_a_layers_trap_values_do_not_depend_on_the_other_layers() -> None:
    """A weights frame's tensor order varies from frame to frame: a layer's trap values must be
    those of its weights alone (one generator for the whole call drew them after the layers
    before it, so unchanged weights flickered between frames: 10 traps, then 7)."""
    g = torch.Generator().manual_seed(3)
    heavy = torch.distributions.StudentT(2.5).sample((400, 300))
    weights = {
        "fc1": torch.randn(300, 200, generator=g),
        "fc2": torch.randn(200, 120, generator=g),
        "heavy": heavy,
    }
    alone = htsr.analyze_weights({"heavy": heavy}, traps=True).layers[0].values()
    for order in (["fc1", "fc2", "heavy"], ["heavy", "fc2", "fc1"], ["fc2", "heavy"]):
        report = htsr.analyze_weights({k: weights[k] for k in order}, traps=True)
        by_layer = {r.layer: r.values() for r in report.layers}
        assert {k: by_layer["heavy"][k] for k in htsr.TRAP_KEYS} == {
            k: alone[k] for k in htsr.TRAP_KEYS
        }


def test_shuffle_keeps_the_entries() -> None:
    w = torch.randn(30, 20, generator=torch.Generator().manual_seed(2))
    mats = htsr.weight_matrices(w)
    (shuffled,) = shuffled_matrices(
        htsr.WeightMatrices(mats.matrices, 30, 200, 1), torch.Generator().manual_seed(0)
    )
    assert shuffled.shape == w.shape
    assert not torch.equal(shuffled, w)
    assert torch.equal(shuffled.flatten().sort().values, w.flatten().sort().values)


def test_server_analysis_stores_traps_and_the_shuffled_esd() -> None:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(160, 96, generator=g)
    w[10, 20] = 30.0
    frame = decoded_frame(FrameKind.WEIGHTS, 500, {"fc.weight": w})
    result = heavy_tail_metrics(frame, StubHistory())
    values = {m.name: m.value for m in result.metrics if m.layer == "fc.weight"}
    direct = htsr.analyze_weights({"fc.weight": w}, farms=FARMS_CV, traps=True).layers[0]
    assert values[htsr.NUM_TRAPS] == direct.values()[htsr.NUM_TRAPS] == 5  # 5 shuffles, M < 100
    payload = next(s.payload for s in result.spectra if s.layer == "fc.weight")
    traps = payload["plain"]["traps"]
    assert traps["num_traps"] == 5
    assert sum(traps["hist"]["counts"]) == 5 * 96
    assert traps["bulk_max"] < traps["lambda_max"]
    figure = traps_figure(payload["plain"], "traps")
    assert [t["name"] for t in figure["data"]] == ["ESD", "ESD of the shuffled weight"]
    assert all(len(t["x"]) > 5 for t in figure["data"])
    labels = [a["text"] for a in figure["layout"]["annotations"]]
    assert any("5 trap(s)" in text for text in labels)
    assert traps_figure({"hist": payload["plain"]["hist"]}, "no traps") == {}


@pytest.mark.gpu
def test_cuda_traps_find_the_planted_entries() -> None:
    """On CUDA the shuffles come from a CUDA generator (other permutations than the CPU's), so
    the counts, not the values, are compared: the planted entries are the traps on both."""
    g = torch.Generator().manual_seed(6)
    weights = {"a": torch.randn(300, 120, generator=g), "b": torch.randn(90, 200, generator=g)}
    weights["a"][1, 2], weights["b"][3, 4] = 35.0, -35.0
    cpu = htsr.analyze_weights(weights, farms=FARMS_CV, traps=True)
    gpu = htsr.analyze_weights(weights, farms=FARMS_CV, traps=True, device="cuda")
    counts = [[r.traps.num_traps if r.traps else None for r in rep.layers] for rep in (cpu, gpu)]
    assert counts == [[1, 5], [1, 5]]
    for c, d in zip(cpu.layers, gpu.layers, strict=True):
        assert d.rand_evals is not None
        assert d.rand_evals.device.type == "cpu"
        assert d.values()[htsr.RAND_LAMBDA_MAX] == pytest.approx(
            c.values()[htsr.RAND_LAMBDA_MAX], rel=0.2
        )


def test_a_run_that_turned_traps_off_gets_none() -> None:
    """Client setting ``weights_traps=False``: its weight frames say ``"traps": false``."""
    w = torch.randn(160, 96, generator=torch.Generator().manual_seed(4))
    off = heavy_tail_metrics(
        decoded_frame(FrameKind.WEIGHTS, 500, {"fc.weight": w}, {"traps": False}), StubHistory()
    )
    assert off.metrics
    assert not {m.name for m in off.metrics} & set(htsr.TRAP_KEYS)
    assert "traps" not in off.spectra[0].payload["plain"]
    on = heavy_tail_metrics(
        decoded_frame(FrameKind.WEIGHTS, 500, {"fc.weight": w}, {"traps": True}), StubHistory()
    )
    assert set(htsr.TRAP_KEYS) <= {m.name for m in on.metrics}
