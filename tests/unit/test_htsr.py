"""HT-SR metrics against LAPACK, `powerlaw`, `weightwatcher`, sklearn and known spectra.

Tolerances: our ESD comes from a float64 Gram + ``eigvalsh`` while WeightWatcher uses a float64
SVD, so eigenvalues differ by ~1e-16 * lambda_max * M; every fitted quantity is compared at a
relative 1e-7 (alpha, D, norms, entropy, MP sigma) and xmin / spike counts exactly. On identical
eigenvalue arrays the fit agrees with `WWFit` and `powerlaw.Fit` to 1e-9 (summation order only).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch

from spectrawatch.spectral import htsr, marchenko_pastur, power_law
from spectrawatch.spectral.eigen import TORCH_EIG_MAX
from spectrawatch.spectral.farms import FARMS_CV
from spectrawatch.wire import FrameKind, encode_frame, parse_header
from spectrawatch_server.analyses import MODEL_LAYER, DecodedFrame, analyses_for
from spectrawatch_server.analyses.htsr import heavy_tail_metrics
from tests.history import StubHistory
from tests.references import weightwatcher

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning:powerlaw",
    "ignore::RuntimeWarning:powerlaw",
    "ignore::DeprecationWarning:weightwatcher",
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- eigenvalues ------------------------------------------------------------------------------
def test_eigenvalues_match_lapack_svd_batched_and_mixed_shapes() -> None:
    g = _gen(0)
    mats = [
        torch.randn(64, 32, generator=g),
        torch.randn(32, 64, generator=g),
        torch.randn(64, 32, generator=g) * 3.0,  # same shape as the first: one batched call
        torch.randn(17, 17, generator=g, dtype=torch.float64),
    ]
    for w, ev in zip(mats, htsr.eigenvalues(mats), strict=True):
        ref = np.sort(np.linalg.svd(w.double().numpy(), compute_uv=False) ** 2)
        assert ev.dtype == torch.float64
        assert ev.shape == (min(w.shape),)
        np.testing.assert_allclose(ev.numpy(), ref, rtol=0, atol=1e-12 * ref.max())


def test_eigenvalues_of_known_spectrum() -> None:
    """W = U diag(s) V^T with orthogonal U, V: the ESD is exactly s^2 (no 1/N)."""
    g = _gen(1)
    u, _ = torch.linalg.qr(torch.randn(300, 100, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(100, 100, generator=g, dtype=torch.float64))
    s = torch.linspace(0.5, 20.0, 100, dtype=torch.float64)
    (ev,) = htsr.eigenvalues([u @ torch.diag(s) @ v.T])
    torch.testing.assert_close(ev, torch.sort(s**2).values, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("n", [10, TORCH_EIG_MAX + 4])  # torch's and numpy's eigen paths
def test_non_finite_matrix_gets_nan_esd_without_spoiling_its_batch(value: float, n: int) -> None:
    bad = torch.ones(n, n)
    bad[n - 1, 3] = value
    good = torch.eye(n) * 2.0
    ev_bad, ev_good = htsr.eigenvalues([bad, good])
    assert bool(torch.isnan(ev_bad).all())
    torch.testing.assert_close(ev_good, torch.full((n,), 4.0, dtype=torch.float64))


def test_non_finite_matrix_is_skipped_with_a_reason() -> None:
    bad = torch.ones(10, 10)
    bad[0, 0] = math.nan
    (ev_bad,) = htsr.eigenvalues([bad])
    with pytest.raises(htsr.SpectralError):
        htsr.spectral_metrics(ev_bad, 10, 10)
    report = htsr.analyze_weights({"bad": bad, "good": torch.randn(20, 10)})
    assert [s.layer for s in report.skipped] == ["bad"]


# --- power-law fit ----------------------------------------------------------------------------
def _esd(shape: tuple[int, int], seed: int, student_df: float | None = None) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    if student_df is None:
        w = torch.from_numpy(rng.standard_normal(shape))
    else:
        w = torch.from_numpy(rng.standard_t(student_df, shape))
    return htsr.eigenvalues([w])[0]


@pytest.mark.parametrize(
    ("shape", "df"),
    [((512, 256), None), ((512, 256), 2.5), ((300, 300), 1.5), ((60, 30), 3.0)],
)
def test_fit_matches_wwfit_and_powerlaw(shape: tuple[int, int], df: float | None) -> None:
    import powerlaw

    ww_pl = weightwatcher().WW_powerlaw
    ev = _esd(shape, 3, df)
    fit = power_law.fit_power_law(ev)
    x = ev.numpy()
    x = x[x > power_law.EVALS_THRESH]
    ref = ww_pl.WWFit(x)
    assert fit.alpha == pytest.approx(ref.alpha, rel=1e-9)
    assert fit.xmin == ref.xmin
    assert fit.ks_distance == pytest.approx(ref.D, rel=1e-9)
    assert fit.sigma == pytest.approx(ref.sigma, rel=1e-9)
    assert fit.num_tail == int((x >= ref.xmin).sum())
    # powerlaw 2.0 only accepts fits with 0 < alpha < 3 by default; WeightWatcher (and powerlaw
    # 1.x, which WWFit reproduces) accept any alpha > 1
    pl = powerlaw.Fit(x, verbose=False, parameter_ranges={"alpha": [1, None]})
    assert fit.alpha == pytest.approx(pl.alpha, rel=1e-9)
    assert fit.xmin == pytest.approx(pl.xmin, rel=1e-12)
    assert fit.ks_distance == pytest.approx(pl.D, rel=1e-9)


def test_pruned_search_on_large_sample_matches_wwfit() -> None:
    """n = 3000 > 256 takes the bound-and-prune KS search; it must equal WWFit's full loop."""
    ww_pl = weightwatcher().WW_powerlaw
    rng = np.random.default_rng(7)
    x = np.sort(rng.pareto(1.7, 3000) + 1.0) * 0.3
    fit = power_law.fit_power_law(torch.from_numpy(x))
    ref = ww_pl.WWFit(x)
    assert fit.xmin == ref.xmin
    assert fit.alpha == pytest.approx(ref.alpha, rel=1e-9)
    assert fit.ks_distance == pytest.approx(ref.D, rel=1e-9)


@pytest.mark.parametrize("seed", range(12))
def test_pruned_ks_search_equals_exhaustive(seed: int) -> None:
    """Bound pruning never changes the (first) argmin nor the winning distance."""
    rng = np.random.default_rng(seed)
    kind = seed % 3
    n = 600 + 97 * seed
    if kind == 0:
        x = rng.pareto(1.0 + seed / 4, n) + 1.0
    elif kind == 1:
        x = rng.standard_normal((n, n // 3)).std(axis=1) ** 2  # a bulk, no tail
    else:
        x = np.concatenate([rng.uniform(1, 2, n - 20), rng.pareto(2.0, 20) * 10 + 2])
    xt = torch.sort(torch.from_numpy(x)).values
    logx = torch.log(xt)
    suffix = torch.flip(torch.cumsum(torch.flip(logx, (0,)), 0), (0,))
    idx = torch.arange(xt.numel() - 1)
    n_i = (xt.numel() - idx).double()
    alphas = 1.0 + n_i / (suffix[:-1] - n_i * logx[:-1])
    full = power_law._ks_distances(logx, alphas, idx)
    pruned = power_law._ks_distances_pruned(logx, alphas)
    assert int(torch.argmin(pruned)) == int(torch.argmin(full))
    assert float(pruned.min()) == float(full.min())


def test_small_n_fit_matches_wwfit() -> None:
    ww_pl = weightwatcher().WW_powerlaw
    x = np.sort(np.random.default_rng(2).pareto(2.0, 15) + 1.0)
    fit = power_law.fit_power_law(torch.from_numpy(x))
    ref = ww_pl.WWFit(x)
    assert fit.alpha == pytest.approx(ref.alpha, rel=1e-9)
    assert fit.xmin == ref.xmin
    assert fit.ks_distance == pytest.approx(ref.D, rel=1e-9)


def test_constant_spectrum_gives_infinite_alpha_like_weightwatcher() -> None:
    """An orthogonal matrix has all eigenvalues 1: WWFit returns alpha = inf, D = 1/2."""
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=_gen(4), dtype=torch.float64))
    fit = power_law.fit_power_law(torch.ones(64, dtype=torch.float64))
    assert math.isinf(fit.alpha)
    assert fit.ks_distance == pytest.approx(0.5)
    assert htsr.eigenvalues([q])[0].sub(1.0).abs().max() < 1e-12


def test_pareto_samples_recover_alpha() -> None:
    """Samples with density ~ x^-2.5 (x >= 1): KS fit and Hill estimate within 0.1 of 2.5
    (MLE standard error (alpha-1)/sqrt(n_tail) ~ 0.03 at n_tail ~ 2000)."""
    rng = np.random.default_rng(11)
    x = torch.from_numpy(rng.pareto(1.5, 4000) + 1.0)
    assert power_law.fit_power_law(x).alpha == pytest.approx(2.5, abs=0.1)
    assert power_law.hill_alpha(x) == pytest.approx(2.5, abs=0.1)


def test_matrix_with_power_law_spectrum_recovers_alpha() -> None:
    """W = U diag(sqrt(lambda)) with orthonormal U (1200 x 600) and Pareto eigenvalues of
    density ~ lambda^-3: the ESD is exactly lambda, so alpha is the MLE on 600 Pareto samples,
    standard error (alpha - 1)/sqrt(n_tail) <= 0.12; asserted within 0.3."""
    m = 600
    lam = torch.from_numpy(np.random.default_rng(5).pareto(2.0, m) + 1.0)
    u, _ = torch.linalg.qr(torch.randn(2 * m, m, generator=_gen(5), dtype=torch.float64))
    (ev,) = htsr.eigenvalues([u * lam.sqrt()])
    torch.testing.assert_close(ev, torch.sort(lam).values, rtol=1e-9, atol=0.0)
    metrics = htsr.spectral_metrics(ev, 2 * m, m, mp_fit=False)
    assert metrics.alpha == pytest.approx(3.0, abs=0.3)
    assert metrics.alpha_hill == pytest.approx(3.0, abs=0.3)
    assert metrics.warning == ""


def test_hill_alpha_rises_with_aspect_ratio_like_marchenko_pastur() -> None:
    """Median-xmin Hill alpha of Gaussian matrices: MP-limit values 2.122 (Q=1) and 3.455 (Q=4)
    (research note farms_htsr.md §4), within 0.08 at M = 256."""
    assert power_law.hill_alpha(_esd((256, 256), 0)) == pytest.approx(2.122, abs=0.08)
    assert power_law.hill_alpha(_esd((1024, 256), 0)) == pytest.approx(3.455, abs=0.08)


# --- MP fit and KDE ---------------------------------------------------------------------------
def test_linear_kde_matches_sklearn() -> None:
    from sklearn.neighbors import KernelDensity

    x = torch.rand(700, generator=_gen(6), dtype=torch.float64) * 4
    grid = torch.linspace(0, 4.5, 1000, dtype=torch.float64)
    kde = KernelDensity(kernel="linear", bandwidth=0.1).fit(x.numpy()[:, None])
    ref = np.exp(kde.score_samples(grid.numpy()[:, None]))
    np.testing.assert_allclose(marchenko_pastur.linear_kde(x, grid, 0.1).numpy(), ref, atol=1e-12)


def test_marchenko_pastur_density_integrates_to_one() -> None:
    x = torch.linspace(1e-6, 10, 200001, dtype=torch.float64)
    for q in (1.5, 4.0):
        pdf = marchenko_pastur.marchenko_pastur_density(
            x, q, torch.tensor(1.0, dtype=torch.float64)
        )
        assert float(torch.trapezoid(pdf, x)) == pytest.approx(1.0, abs=2e-3)


# --- whole models against weightwatcher.analyze -----------------------------------------------
class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = _gen(8)
        self.conv = torch.nn.Conv2d(16, 32, 3)
        self.wide = torch.nn.Linear(120, 40)
        self.tall = torch.nn.Linear(40, 100)
        self.norm = torch.nn.LayerNorm(100)
        self.emb = torch.nn.Embedding(90, 24)
        self.tiny = torch.nn.Linear(48, 3)  # M = 3 < 8: skipped by both
        with torch.no_grad():
            self.wide.weight.copy_(torch.distributions.StudentT(2.0).sample((40, 120)) * 0.1)
            self.tall.weight.mul_(1.0).add_(torch.randn(100, 40, generator=g))
            self.tall.weight[:4] *= 5.0  # a few spikes above the MP bulk


COLUMNS = [
    ("alpha", lambda m: m.alpha),
    ("xmin", lambda m: m.fit.xmin),
    ("D", lambda m: m.fit.ks_distance),
    ("sigma", lambda m: m.fit.sigma),
    ("lambda_max", lambda m: m.lambda_max),
    ("log_norm", lambda m: m.log_norm),
    ("log_spectral_norm", lambda m: m.log_spectral_norm),
    ("alpha_weighted", lambda m: m.alpha_weighted),
    ("log_alpha_norm", lambda m: m.log_alpha_norm),
    ("stable_rank", lambda m: m.stable_rank),
    ("entropy", lambda m: m.entropy),
    ("mp_softrank", lambda m: m.mp.softrank),
    ("sigma_mp", lambda m: m.mp.sigma),
]
EXACT_COLUMNS = [
    ("num_pl_spikes", lambda m: m.fit.num_tail),
    ("num_spikes", lambda m: m.mp.num_spikes),
    ("matrix_rank", lambda m: m.matrix_rank),
    ("num_evals", lambda m: m.num_evals),
    ("warning", lambda m: m.warning),
]


@pytest.mark.slow
def test_analyze_model_matches_weightwatcher_analyze() -> None:
    ww = weightwatcher()
    torch.manual_seed(0)
    model = _Model()
    details = ww.WeightWatcher(model=model).analyze(mp_fit=True)
    report = htsr.analyze_model(model)
    assert [r.layer for r in report.layers] == [
        "conv.weight",
        "wide.weight",
        "tall.weight",
        "emb.weight",
    ]
    assert [s.layer for s in report.skipped] == ["tiny.weight"]
    assert len(details) == len(report.layers)
    for (_, row), layer in zip(details.iterrows(), report.layers, strict=True):
        assert (row["N"], row["M"], row["rf"]) == (layer.n_rows, layer.n_cols, layer.rf)
        for column, get in COLUMNS:
            assert get(layer.plain) == pytest.approx(row[column], rel=1e-7), (layer.layer, column)
        for column, get in EXACT_COLUMNS:
            assert get(layer.plain) == row[column], (layer.layer, column)
    summary = ww.WeightWatcher(model=model).get_summary(details)
    ours = report.summary()
    for key, column in [
        (htsr.ALPHA, "alpha"),
        (htsr.LOG_NORM, "log_norm"),
        (htsr.MP_SOFTRANK, "mp_softrank"),
    ]:
        assert ours[key] == pytest.approx(summary[column], rel=1e-7)


def test_conv_slices_are_pooled_and_halved() -> None:
    w = torch.randn(8, 6, 3, 3, generator=_gen(9), dtype=torch.float64)
    mats = htsr.weight_matrices(w)
    assert (mats.n_rows, mats.n_cols, mats.rf) == (8, 6, 9)
    pooled = htsr.pooled_eigenvalues(mats)
    ref = np.sort(
        np.concatenate(
            [
                np.linalg.svd(w[:, :, i, j].numpy(), compute_uv=False) ** 2
                for i in range(3)
                for j in range(3)
            ]
        )
    )
    np.testing.assert_allclose(pooled.numpy(), 0.5 * ref, rtol=1e-10)


def test_summary_means_and_counts() -> None:
    g = _gen(10)
    weights = {
        "a": torch.randn(200, 100, generator=g),
        "b": torch.randn(150, 150, generator=g),
        "bias": torch.randn(100, generator=g),
    }
    report = htsr.analyze_weights(weights, farms=FARMS_CV)
    assert [s.layer for s in report.skipped] == ["bias"]
    summary = report.summary()
    alphas = [layer.plain.alpha for layer in report.layers]
    assert summary[htsr.ALPHA] == pytest.approx(sum(alphas) / 2)
    farms_alphas = [r.farms.alpha for r in report.layers if r.farms is not None]
    assert len(farms_alphas) == 2
    assert summary[htsr.farms_key(htsr.ALPHA)] == pytest.approx(sum(farms_alphas) / 2)
    assert summary[htsr.NUM_LAYERS] == 2
    assert summary[htsr.NUM_UNDER_TRAINED] == sum(a > 6 for a in alphas)
    row = report.layers[0].row()
    assert set(row) == {
        "layer", "shape", "alpha", "alpha_weighted", "xmin", "ks_distance", "log_spectral_norm",
        "log_norm", "stable_rank", "mp_softrank", "num_spikes", "entropy", "farms_alpha",
        "farms_alpha_weighted", "num_traps", "rand_distance", "warning",
    }  # fmt: skip
    assert row["num_traps"] is None  # without traps=True


def test_esd_payload_histogram_and_line() -> None:
    ev = _esd((400, 200), 12, 2.0)
    metrics = htsr.spectral_metrics(ev, 400, 200)
    payload = htsr.esd_payload(ev, metrics, bins=50)
    json.dumps(payload, allow_nan=False)
    hist = payload["hist"]
    assert len(hist["edges"]) == 51
    assert sum(hist["counts"]) == int((ev > htsr.EVALS_THRESH).sum()) == 200
    widths = np.diff(hist["edges"])
    assert float(np.sum(np.array(hist["density"]) * widths)) == pytest.approx(1.0, rel=1e-9)
    fit = payload["fit"]
    assert fit["x"][0] == pytest.approx(metrics.fit.xmin)
    # the line is the tail-fraction-weighted power-law density at xmin
    expected = metrics.fit.num_tail / 200 * (metrics.alpha - 1) / metrics.fit.xmin
    assert fit["pdf"][0] == pytest.approx(expected)
    assert payload["mp"]["bulk_max"] == pytest.approx(metrics.mp.bulk_max / metrics.mp.w_scale**2)  # type: ignore[union-attr]


# --- the worker analysis ----------------------------------------------------------------------
def _frame(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> DecodedFrame:
    data = encode_frame(FrameKind.WEIGHTS, 500, 3, tensors, info)
    header = parse_header(data, len(data))
    return DecodedFrame(1, 7, header, tensors, torch.device("cpu"))


def test_analysis_is_registered_on_weight_frames() -> None:
    assert "htsr" in [a.name for a in analyses_for(FrameKind.WEIGHTS)]
    assert "htsr" not in [a.name for a in analyses_for(FrameKind.ACTIVATIONS)]


def test_analysis_metrics_spectra_and_model_summary() -> None:
    g = _gen(13)
    conv = torch.randn(16, 8, 3, 3, generator=g)
    tensors = {
        "fc.weight": torch.randn(96, 48, generator=g).to(torch.bfloat16),
        "conv.weight": conv.reshape(16, 72),
        "head.weight": torch.randn(4, 48, generator=g),  # too small: skipped
    }
    frame = _frame(tensors, {"shapes": {"conv.weight": [16, 8, 3, 3]}})
    result = heavy_tail_metrics(frame, StubHistory())
    by_key = {(m.layer, m.name): m.value for m in result.metrics}
    assert all(m.step is None for m in result.metrics)
    direct = htsr.analyze_weights(
        {"fc.weight": tensors["fc.weight"], "conv.weight": conv}, farms=FARMS_CV
    )
    for layer in direct.layers:
        for key, value in layer.values().items():
            assert by_key[(layer.layer, key)] == pytest.approx(value, rel=1e-12), key
    assert direct.layers[1].rf == 9  # conv restored from info.shapes and sliced
    assert MODEL_LAYER not in {layer for layer, _ in by_key}  # the worker's summarize step
    per_layer: dict[str, dict[str, float]] = {}
    for (layer, name), value in by_key.items():
        per_layer.setdefault(layer, {})[name] = value
    (registered,) = [a for a in analyses_for(FrameKind.WEIGHTS) if a.name == "htsr"]
    assert registered.summarize is not None
    summary = registered.summarize(per_layer)
    for key, value in direct.summary().items():
        assert summary[key] == pytest.approx(value, rel=1e-12), key
    assert summary[htsr.NUM_LAYERS] == 2
    assert not any(layer == "head.weight" for layer, _ in by_key)
    spectra = {s.layer: s.payload for s in result.spectra}
    assert spectra["head.weight"]["skipped"]
    assert set(spectra["fc.weight"]) >= {"plain", "farms", "farms_config", "shape"}
    json.dumps(spectra, allow_nan=False)
    again = heavy_tail_metrics(frame, StubHistory())
    assert again.metrics == result.metrics  # deterministic / idempotent


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    """Every route a CUDA model takes: the matrices up to ``SVD_MAX`` columns and the FARMS
    windows by batched ``gesvda`` on CUDA streams, a wider one by ``syevd`` of its Gram; fits on
    host copies."""
    g = _gen(14)
    weights = {
        "a": torch.randn(300, 120, generator=g),
        "b": torch.randn(120, 120, generator=g),
        "c": torch.randn(400, 200, generator=g),
        "d": torch.randn(200, 400, generator=g) ** 3,
        "e": torch.randn(1100, 1040, generator=g),  # wider than SVD_MAX
    }
    cpu = htsr.analyze_weights(weights, farms=FARMS_CV)
    gpu = htsr.analyze_weights(weights, farms=FARMS_CV, device="cuda")
    assert len(gpu.layers) == 5
    for c, d in zip(cpu.layers, gpu.layers, strict=True):
        assert d.evals.device.type == "cpu"
        torch.testing.assert_close(d.evals, c.evals, rtol=1e-9, atol=1e-9)
        for key, value in c.values().items():
            assert d.values()[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_weights_the_client_left_out_get_a_skip_record_not_metrics() -> None:
    """A 3-D expert stack or Conv1d kernel the client names in ``info["skipped"]`` (instead of
    sending it flattened, which gave an alpha from E eigenvalues) gets a spectrum record saying
    why, as a layer skipped here does; malformed entries and names of sent tensors are ignored."""
    w = torch.randn(64, 32, generator=_gen(16))
    skipped = {
        "moe.w_in": {"shape": [8, 64, 128], "reason": "3-D tensor"},
        "conv3d.weight": {"shape": [4, 2, 3, 3, 3], "reason": "5-D tensor"},
        "fc.weight": {"shape": [64, 32], "reason": "3-D tensor"},  # sent: its metrics stand
        "bad.reason": {"shape": [2, 2, 2], "reason": 3},
        "bad\x00name": {"shape": [2, 2, 2], "reason": "3-D tensor"},
        "odd.shape": {"shape": "x", "reason": "3-D tensor"},
    }
    result = heavy_tail_metrics(_frame({"fc.weight": w}, {"skipped": skipped}), StubHistory())
    spectra = {s.layer: s.payload for s in result.spectra}
    expected = {"analysis": "htsr", "shape": [8, 64, 128], "skipped": "3-D tensor"}
    assert spectra["moe.w_in"] == expected
    assert spectra["conv3d.weight"]["skipped"] == "5-D tensor"
    assert spectra["odd.shape"] == {"analysis": "htsr", "shape": [], "skipped": "3-D tensor"}
    assert "plain" in spectra["fc.weight"]
    assert set(spectra) == {"moe.w_in", "conv3d.weight", "odd.shape", "fc.weight"}
    assert {m.layer for m in result.metrics} == {"fc.weight"}
    for info in ({"skipped": None}, {"skipped": [1]}, {}):
        frame = _frame({"fc.weight": w}, info)
        assert [s.layer for s in heavy_tail_metrics(frame, StubHistory()).spectra] == ["fc.weight"]


def test_restore_shapes_ignores_malformed_entries() -> None:
    from spectrawatch_server.analyses.htsr import restore_shapes

    flat = torch.zeros(16, 72)
    shapes = {"conv": [16, 8, 3, 3], "bad": [16, 8, 3, 4], "fc": "x", "missing": [1, 1, 1, 1]}
    out = restore_shapes({"conv": flat, "bad": flat, "fc": flat}, shapes)
    assert out["conv"].shape == (16, 8, 3, 3)
    assert out["bad"].shape == (16, 72)
    assert out["fc"].shape == (16, 72)
    assert restore_shapes({"conv": flat}, None)["conv"].shape == (16, 72)


def test_analyze_model_accepts_a_state_dict() -> None:
    g = _gen(15)
    state = {
        "h.0.weight": torch.randn(64, 32, generator=g),
        "h.0.bias": torch.randn(64, generator=g),
        "ln.norm.weight": torch.randn(32, 32, generator=g),  # name says norm: left out
    }
    report = htsr.analyze_model(state, mp_fit=False)
    assert [r.layer for r in report.layers] == ["h.0.weight"]
    assert report.layers[0].plain.mp is None
    assert htsr.MP_SOFTRANK not in report.layers[0].values()


def test_entropy_rank_ignores_gram_round_off() -> None:
    """Eigenvalues below eps * lambda_max are round-off of the Gram (their sign and size vary by
    device and library): they must not change the numerical rank or the entropy."""
    ev = torch.linspace(0.5, 4.0, 40, dtype=torch.float64)
    noisy = torch.cat([ev, torch.tensor([0.0, 3e-17, 1e-16], dtype=torch.float64)])
    clean = torch.cat([ev, torch.zeros(3, dtype=torch.float64)])
    a = htsr.spectral_metrics(noisy, 60, 43, mp_fit=False)
    b = htsr.spectral_metrics(clean, 60, 43, mp_fit=False)
    assert a.matrix_rank == b.matrix_rank == 40
    assert a.entropy == pytest.approx(b.entropy, rel=1e-12)


def test_layer_keys_are_one_layers_values_and_the_only_farms_keys() -> None:
    """``LAYER_KEYS`` lists what one layer's metrics hold (MP fit included), and only those have
    FARMS twins among the stored keys: model-level counts and traps have none, so a rule or a
    read of ``farms.num_traps`` is refused as never stored."""
    from spectrawatch.spectral.keys import is_stored_key

    ev = _esd((400, 200), 12, 2.0)
    assert set(htsr.spectral_metrics(ev, 400, 200).values()) == set(htsr.LAYER_KEYS)
    assert all(is_stored_key(htsr.farms_key(k)) for k in htsr.LAYER_KEYS)
    for key in ("farms.num_traps", "farms.num_layers", "farms.rand_softrank"):
        assert not is_stored_key(key), key
