"""SED math against numpy/LAPACK and streams with planted spectra; the worker analysis."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from spectrawatch.sketch import SketchSpec, count_sketch, hash_coordinates, sketch_tensor
from spectrawatch.spectral import grokking, sed
from spectrawatch.spectral.norms import FROBENIUS_NORM
from spectrawatch.wire import FrameHeader, FrameKind
from spectrawatch_server.analyses.registry import MODEL_LAYER, DecodedFrame, analyses_for
from spectrawatch_server.analyses.sed import (
    default_layer_stride,
    spectral_edge_dynamics,
    weight_effective_rank,
)
from tests.history import StubHistory


def _planted(n: int, p: int, scales: tuple[float, ...], noise: float, seed: int) -> torch.Tensor:
    """n rows in R^p: zero-mean coefficients on len(scales) orthonormal directions + noise."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(p, len(scales), generator=g, dtype=torch.float64))
    coef = torch.randn(n, len(scales), generator=g, dtype=torch.float64) * torch.tensor(scales)
    rows: torch.Tensor = coef @ basis.T
    return rows + noise * torch.randn(n, p, generator=g, dtype=torch.float64)


def test_singular_values_equal_numpy_lapack() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16, 200)).astype(np.float32)
    got = sed.window_singular_values(torch.from_numpy(x))
    assert got.dtype == torch.float64
    want = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(
        sed.window_singular_values(torch.from_numpy(x[1])).numpy(), want[1], rtol=1e-12
    )


def test_edge_gap_margin_and_signal_rank_of_a_known_spectrum() -> None:
    sigma = torch.tensor([10.0, 5.0, 1.0, 0.9, 0.8, 0.7])
    e = sed.spectral_edges(sigma)
    assert int(e.edge[0]) == 2
    assert float(e.gap_ratio[0]) == pytest.approx(5.0)
    assert int(e.runner_up[0]) == 1
    assert float(e.margin[0]) == pytest.approx(2.5)
    # energies 100, 25, 1, .81, .64, .49: the first two hold 125/127.94 = 97.7 % >= 95 %
    assert int(e.signal_rank[0]) == 2


def test_last_ratio_is_excluded_from_the_edge_search() -> None:
    e = sed.spectral_edges(torch.tensor([3.0, 2.9, 2.0, 1.9, 1e-9]))
    assert int(e.edge[0]) == 2  # sigma_4/sigma_5 = 1.9e9 is outside k < W-1
    assert float(e.gap_ratio[0]) == pytest.approx(1.45)


def test_edges_need_enough_rows() -> None:
    with pytest.raises(ValueError, match="at least"):
        sed.spectral_edges(torch.tensor([2.0, 1.0, 0.5]))


@pytest.mark.parametrize("rank", [1, 2, 3, 5])
def test_planted_rank_is_recovered_exactly_and_through_the_sketch(rank: int) -> None:
    scales = tuple(40.0 * 0.8**i for i in range(rank))
    rows = _planted(32, 20_000, scales, noise=0.05, seed=rank)
    (win,) = sed.rolling_sed(rows, list(range(32)), 32, at=[31])
    assert win.edge == rank
    assert win.signal_rank == rank
    assert win.complete
    # count-sketch at d = 20 W (DESIGN default) finds the same edge. The flat isotropic noise
    # bulk is the worst case for the gap: the sketch spreads it like a W x d Gaussian matrix, so
    # its top singular value grows by up to (1 + sqrt(W/d)) (Marchenko-Pastur edge) and the gap
    # shrinks by as much; it never grows by more than the 5 % JL error of the signal direction.
    b, s = hash_coordinates(20_000, seed=11, dim=640)
    sk = count_sketch(rows, b, s, 640, torch.float64)
    (swin,) = sed.rolling_sed(sk, list(range(32)), 32, at=[31])
    assert swin.edge == rank
    bound = 1.0 + math.sqrt(32 / 640)
    assert win.gap_ratio / bound * 0.95 <= swin.gap_ratio <= win.gap_ratio * 1.05


def test_sketched_gap_error_on_a_decaying_spectrum_is_within_the_measured_band() -> None:
    """Relative error of the gap at the exact edge, d = 20 W, W = 32, over the complete windows
    of a stream whose spectrum decays smoothly (like real update streams), for eight sketch
    seeds (one seed's median ranges over 1.5-5 %). DESIGN §3 measured 2-3 % median, 7.5-9 % p95
    on real streams."""
    scales = tuple(10.0 * 0.75**i for i in range(24))
    rows = _planted(80, 8_000, scales, noise=0.001, seed=7)
    steps = list(range(80))
    exact = [w for w in sed.rolling_sed(rows, steps, 32) if w.complete]
    medians, p95s = [], []
    for seed in range(8):
        b, s = hash_coordinates(8_000, seed=seed, dim=640)
        sk = count_sketch(rows, b, s, 640, torch.float64)
        sketched = [w for w in sed.rolling_sed(sk, steps, 32) if w.complete]
        assert len(exact) == len(sketched) == 80 - 32 + 1
        errs = []
        for ex, sw in zip(exact, sketched, strict=True):
            k = ex.edge - 1
            ratio = sw.singular_values[k] / sw.singular_values[k + 1]
            errs.append(abs(ratio - ex.gap_ratio) / ex.gap_ratio)
        medians.append(np.median(errs))
        p95s.append(np.percentile(errs, 95))
    assert float(np.median(medians)) < 0.035
    assert float(np.mean(p95s)) < 0.09


def test_pure_noise_has_a_flat_spectrum_and_ambiguous_edge() -> None:
    rows = torch.randn(32, 50_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (win,) = sed.rolling_sed(rows, list(range(32)), 32, at=[31])
    assert win.gap_ratio < 1.1
    assert win.margin < 1.05


def test_rolling_windows_equal_direct_svd_and_flag_missing_steps() -> None:
    rows = _planted(40, 500, (5.0, 2.0), noise=0.1, seed=3)
    steps = list(range(100, 140))
    out = sed.rolling_sed(rows, steps, 8)
    assert [w.step for w in out] == steps[3:]  # windows need >= 4 rows
    for w in out:
        hi = steps.index(w.step) + 1
        want = np.linalg.svd(rows[max(0, hi - 8) : hi].numpy(), compute_uv=False)
        np.testing.assert_allclose(w.singular_values, want, rtol=1e-10)
        assert w.n_rows == min(8, hi)
    # drop steps 120 and 121: the window ending at 125 covers (117, 125] and holds 6 rows
    keep = [i for i, s in enumerate(steps) if s not in (120, 121)]
    gappy = sed.rolling_sed(rows[keep], [steps[i] for i in keep], 8, at=[125], step_interval=1)
    (w,) = gappy
    assert (w.n_rows, w.complete) == (6, False)
    idx = [i for i in keep if 117 < steps[i] <= 125]
    want = np.linalg.svd(rows[idx].numpy(), compute_uv=False)
    np.testing.assert_allclose(w.singular_values, want, rtol=1e-10)


def test_gram_and_svd_paths_agree_on_a_decaying_spectrum() -> None:
    scales = tuple(10.0 * 0.6**i for i in range(20))  # s1/s20 ~ 2e4
    rows = _planted(60, 1_000, scales, noise=1e-4, seed=9).float()
    gram = sed.rolling_sed(rows, list(range(60)), 32)
    svd = sed.rolling_sed(rows, list(range(60)), 32, method="svd")
    assert len(gram) == len(svd) == 57
    for a, b in zip(gram, svd, strict=True):
        # s_k from the Gram carries ~1e-16 s1^2 / s_k^2 relative error: < 1e-7 down to s1/s_k ~ 1e4
        np.testing.assert_allclose(a.singular_values[:20], b.singular_values[:20], rtol=1e-7)
        assert (a.edge, a.signal_rank) == (b.edge, b.signal_rank)
        assert a.gap_ratio == pytest.approx(b.gap_ratio, rel=1e-9)


def test_all_zero_window_is_skipped() -> None:
    assert sed.rolling_sed(torch.zeros(6, 10), list(range(6)), 6) == []


def test_out_of_order_chunks_assemble_in_step_order_and_replays_win() -> None:
    rows = torch.arange(12.0).reshape(6, 2)
    chunks = [([4, 5], rows[4:6]), ([0, 1, 2], rows[0:3]), ([3], rows[3:4]), ([2], rows[2:3] + 100)]
    steps, got = sed.assemble_rows(chunks)
    assert steps == [0, 1, 2, 3, 4, 5]
    want = rows.clone()
    want[2] += 100
    assert torch.equal(got, want)


def test_interval_sed_from_differenced_theta_sketches_equals_sed_of_sketched_deltas() -> None:
    g = torch.Generator().manual_seed(5)
    p, n = 30_000, 14
    drift = torch.randn(p, generator=g, dtype=torch.float64)
    theta = [torch.randn(p, generator=g, dtype=torch.float64) * 3.0]
    for i in range(n - 1):
        step = 0.01 * (1 + 0.3 * math.sin(i)) * drift
        theta.append(theta[-1] + step + 0.002 * torch.randn(p, generator=g, dtype=torch.float64))
    spec = SketchSpec(dim=200, seed=9)
    steps = [100 * i for i in range(n)]
    th_sk = torch.stack([sketch_tensor(t, spec, "w", torch.float64) for t in theta])
    got = sed.interval_sed(th_sk, steps, window=10)
    deltas = torch.stack(
        [sketch_tensor(b - a, spec, "w", torch.float64) for a, b in itertools.pairwise(theta)]
    )
    want = sed.rolling_sed(deltas, steps[1:], 10)
    assert [w.step for w in got] == [w.step for w in want] == steps[4:]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a.singular_values, b.singular_values, rtol=1e-8)
        assert (a.edge, a.n_rows) == (b.edge, b.n_rows)
    assert got[-1].edge == 1  # a common drift direction dominates the uncentred window


def _phase_series() -> tuple[list[int], list[float]]:
    rng = np.random.default_rng(0)
    r = np.concatenate(
        [
            np.full(20, 1.05),
            np.linspace(1.05, 3.0, 30),
            np.full(50, 3.0),
            np.linspace(3.0, 1.1, 10),
            np.full(30, 1.1),
        ]
    ) + rng.normal(0, 0.02, 140)
    return [10 * i for i in range(140)], r.tolist()


def test_phases_of_a_synthetic_rise_plateau_collapse() -> None:
    steps, r = _phase_series()
    ph = sed.detect_phases(steps, r)
    assert ph.rise_start is not None
    assert 10 * 10 <= ph.rise_start <= 10 * 21
    # excess reaches 0.7 of its peak (1.4) at point 41, plus <= 2 points of trailing smoothing
    assert ph.plateau_start is not None
    assert 10 * 40 <= ph.plateau_start <= 10 * 45
    # excess falls below half its peak at point ~105, plus smoothing delay
    assert ph.collapse_start is not None
    assert 10 * 104 <= ph.collapse_start <= 10 * 110
    assert ph.peak_value == pytest.approx(3.0, abs=0.05)
    assert ph.phase_at(50) == sed.Phase.UNKNOWN
    assert ph.phase_at(300) == sed.Phase.RISE
    assert ph.phase_at(800) == sed.Phase.PLATEAU
    assert ph.phase_at(1300) == sed.Phase.COLLAPSE


def test_phases_are_causal_still_rising_and_flat() -> None:
    steps, r = _phase_series()
    rising = sed.detect_phases(steps[:40], r[:40])
    assert rising.plateau_start is None
    assert rising.rise_start is not None
    assert rising.phase_at(steps[39]) == sed.Phase.RISE
    mid = sed.detect_phases(steps[:90], r[:90])
    assert mid.collapse_start is None
    assert mid.phase_at(steps[89]) == sed.Phase.PLATEAU
    flat = sed.detect_phases(list(range(50)), [1.01] * 50)
    assert flat == sed.Phases(None, None, None, None, flat.peak_value)
    assert math.isnan(flat.peak_value)


def test_lagged_correlation_finds_the_lead() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal(60)
    y = np.concatenate([rng.standard_normal(3), x[:-3]])  # y_t = x_{t-3}: x leads by 3
    steps = list(range(0, 600, 10))
    out = dict(sed.lagged_correlation(steps, x.tolist(), steps, y.tolist(), max_lag=5))
    assert max(out, key=lambda k: out[k]) == 3
    assert out[3] == pytest.approx(1.0)
    assert out[0] == pytest.approx(float(np.corrcoef(x, y)[0, 1]))
    assert out[-2] == pytest.approx(float(np.corrcoef(x[2:], y[:-2])[0, 1]))


@pytest.mark.parametrize("n", [0, 1, 3, 4, 7, 9, 10, 12])
def test_lagged_correlation_of_a_short_series_keeps_lags_with_three_points(n: int) -> None:
    """Seven shared points at the default ``max_lag`` of 10 crashed the lag API (HTTP 500): a
    lag of 7 or more sliced ``a[:n - lag]`` with a negative end, which wraps around."""
    rng = np.random.default_rng(n)
    x, y = rng.standard_normal(n), rng.standard_normal(n)
    steps = list(range(n))
    out = dict(sed.lagged_correlation(steps, x.tolist(), steps, y.tolist(), max_lag=10))
    assert sorted(out) == [lag for lag in range(-10, 11) if n - abs(lag) >= 3]
    for lag, r in out.items():
        xa, yb = (x[: n - lag], y[lag:]) if lag >= 0 else (x[-lag:], y[: n + lag])
        assert r == pytest.approx(float(np.corrcoef(xa, yb)[0, 1]))


def test_metric_keys() -> None:
    assert sed.windowed_key(sed.GAP_RATIO, 32) == "sed.gap_ratio.w32"
    assert sed.interval_key(sed.EDGE) == "sed.interval.edge.w10"


# ------------------------------------------------------------------------------------------
# the worker analysis, with a fake context


class FakeContext(StubHistory):
    """:class:`StubHistory` that records which scalars were read."""

    def __init__(self, frames: list[DecodedFrame] | None = None) -> None:
        super().__init__(frames)
        self.scalars_read: list[str] = []

    def scalar_series(self, name: str, limit: int) -> list[tuple[int, float]]:
        self.scalars_read.append(name)
        return super().scalar_series(name, limit)


def _frame(
    kind: FrameKind, steps: list[int], tensors: dict[str, torch.Tensor], seq: int, **info: object
) -> DecodedFrame:
    header = FrameHeader(kind, steps[0], seq, {"steps": steps, **info}, (), data_offset=0)
    return DecodedFrame(1, seq, header, tensors, torch.device("cpu"))


def _values(result: object, name: str, layer: str) -> dict[int, float]:
    return {
        m.step: m.value
        for m in result.metrics  # type: ignore[attr-defined]
        if m.name == name and m.layer == layer
    }


def test_analysis_is_registered_for_both_sketch_kinds() -> None:
    for kind in (FrameKind.UPDATE_SKETCH, FrameKind.PARAM_SKETCH):
        assert "sed" in [a.name for a in analyses_for(kind)]
    assert "grok_rank" in [a.name for a in analyses_for(FrameKind.WEIGHTS)]


def test_update_frames_out_of_order_give_the_direct_sed_per_layer_and_model() -> None:
    rows_a = _planted(40, 300, (5.0, 2.0), 0.05, seed=1).float()
    rows_b = _planted(40, 300, (3.0,), 0.05, seed=2).float()
    model = rows_a + rows_b  # what a client's "sum of layers" sketch would be
    frames = [
        _frame(
            FrameKind.UPDATE_SKETCH,
            list(range(i, i + 10)),
            {"a": rows_a[i : i + 10], "b": rows_b[i : i + 10], MODEL_LAYER: model[i : i + 10]},
            seq=i // 10,
            sed={"windows": [8, 16], "stride": 2},
        )
        for i in range(0, 40, 10)
    ]
    ctx = FakeContext([frames[2], frames[0], frames[1]])  # arrived out of order
    result = spectral_edge_dynamics(frames[3], ctx)
    for layer, rows in (("a", rows_a), ("b", rows_b), (MODEL_LAYER, model)):
        for w in (8, 16):
            want = {
                x.step: x
                for x in sed.rolling_sed(rows, list(range(40)), w)
                if x.step >= 30 and x.step % 2 == 0
            }
            got = _values(result, sed.windowed_key(sed.GAP_RATIO, w), layer)
            assert sorted(got) == [30, 32, 34, 36, 38]
            for step, value in got.items():
                assert value == pytest.approx(want[step].gap_ratio, rel=1e-9)
            edges = _values(result, sed.windowed_key(sed.EDGE, w), layer)
            assert edges == {s: float(x.edge) for s, x in want.items()}
            flags = _values(result, sed.windowed_key(sed.INCOMPLETE, w), layer)
            assert set(flags.values()) == {0.0}
    assert _values(result, sed.windowed_key(sed.EDGE, 16), "a")[38] == 2.0
    assert {r.layer for r in result.spectra} == {"a", "b", MODEL_LAYER}


def test_extreme_steps_and_settings_give_values_not_overflow() -> None:
    """Steps up to the wire's 2**62 with gaps of ~2**60 (a window's span in steps no longer
    fits an int64), and ``info["sed"]`` values beyond their bounds (ignored for the defaults):
    the analysis still answers, as a client could send all of these."""
    rows = _planted(8, 64, (4.0,), 0.05, seed=3).float()
    steps = [i * 2**59 for i in range(8)]
    frame = _frame(
        FrameKind.UPDATE_SKETCH,
        steps,
        {"a": rows, MODEL_LAYER: rows},
        seq=0,
        sed={"windows": [10**30], "stride": 10**30, "layer_stride": 10**30},
        update_every=2**62,
    )
    result = spectral_edge_dynamics(frame, FakeContext())
    got = _values(result, sed.windowed_key(sed.GAP_RATIO, 16), MODEL_LAYER)
    assert got  # the default windows, over the rows there are
    assert all(math.isfinite(v) for v in got.values())


def test_frames_of_another_sketch_projection_are_left_out() -> None:
    """A run resumed by a client with another hash recipe (or seed): its earlier sketches are
    not comparable, so windows use only the frames made like the newest one."""
    rows = _planted(30, 200, (4.0,), 0.05, seed=3).float()
    old = {"hash": "splitmix64", "seed": 0, "dim": 200}
    new = {**old, "hash": "rotated-rows-fmix32-v2"}

    def frames() -> list[DecodedFrame]:
        return [
            _frame(
                FrameKind.UPDATE_SKETCH,
                list(range(i, i + 10)),
                {"a": rows[i : i + 10]},
                seq=i // 10,
                sed={"windows": [16], "stride": 1},
                sketch=old if i == 0 else new,
            )
            for i in range(0, 30, 10)
        ]

    mixed = frames()
    result = spectral_edge_dynamics(mixed[2], FakeContext(mixed[:2]))
    gap, flag = sed.windowed_key(sed.GAP_RATIO, 16), sed.windowed_key(sed.INCOMPLETE, 16)
    got = _values(result, gap, "a")
    want = {x.step: x for x in sed.rolling_sed(rows[10:], list(range(10, 30)), 16)}
    assert sorted(got) == list(range(20, 30))
    for step, value in got.items():
        assert value == pytest.approx(want[step].gap_ratio, rel=1e-9)
    flags = _values(result, flag, "a")
    assert (flags[20], flags[24], flags[25]) == (1.0, 1.0, 0.0)  # steps 5..9 were old rows
    same = frames()
    same[0].header.info["sketch"] = new  # one projection throughout: every row counts
    full = spectral_edge_dynamics(same[2], FakeContext(same[:2]))
    want = {x.step: x for x in sed.rolling_sed(rows, list(range(30)), 16)}
    assert _values(full, gap, "a")[20] == pytest.approx(want[20].gap_ratio, rel=1e-9)
    assert _values(full, flag, "a")[20] == 0.0


@pytest.mark.parametrize(("layers", "stride"), [(1, 1), (16, 1), (17, 2), (40, 4), (149, 16)])
def test_default_layer_stride_bounds_per_layer_points_per_step(layers: int, stride: int) -> None:
    assert default_layer_stride(layers) == stride


def test_many_layers_are_evaluated_at_the_layer_stride_and_the_model_at_every_step() -> None:
    g = torch.Generator().manual_seed(11)
    rows = {f"l{i:02d}": torch.randn(32, 24, generator=g) for i in range(40)}  # stride 4
    rows[MODEL_LAYER] = sum(rows.values())  # type: ignore[assignment]

    def frames(**sed_info: object) -> list[DecodedFrame]:
        return [
            _frame(
                FrameKind.UPDATE_SKETCH,
                list(range(i, i + 16)),
                {k: v[i : i + 16] for k, v in rows.items()},
                seq=i // 16,
                sed={"windows": [16], **sed_info},
            )
            for i in (0, 16)
        ]

    default = frames()
    result = spectral_edge_dynamics(default[1], FakeContext(default[:1]))
    key = sed.windowed_key(sed.GAP_RATIO, 16)
    assert sorted(_values(result, key, MODEL_LAYER)) == list(range(16, 32))
    assert sorted(_values(result, key, "l07")) == [16, 20, 24, 28]
    want = {w.step: w.gap_ratio for w in sed.rolling_sed(rows["l07"], list(range(32)), 16)}
    for step, value in _values(result, key, "l07").items():
        assert value == pytest.approx(want[step], rel=1e-9)  # thinned, not changed
    every = frames(layer_stride=1)
    result = spectral_edge_dynamics(every[1], FakeContext(every[:1]))
    assert sorted(_values(result, key, "l07")) == list(range(16, 32))


def test_a_raised_client_cadence_keeps_windows_complete() -> None:
    """A client (``overhead_budget``) moves from a row every step to one every 10 steps: the
    windows right after the change hold the last W rows, not the few that a 1-step spacing
    would leave, and stay complete; per-layer thinning counts rows, not steps."""
    g = torch.Generator().manual_seed(11)
    steps = [*range(1, 65), *range(70, 230, 10)]  # 64 dense rows, then 16 sparse ones
    rows = {name: torch.randn(len(steps), 96, generator=g) for name in ("a", "b")}
    rows[MODEL_LAYER] = rows["a"] + rows["b"]

    def frame(lo: int, hi: int, seq: int, **info: object) -> DecodedFrame:
        return _frame(
            FrameKind.UPDATE_SKETCH,
            steps[lo:hi],
            {k: v[lo:hi] for k, v in rows.items()},
            seq=seq,
            sed={"windows": [16], "layer_stride": 4},
            **info,
        )

    frames = [frame(i, i + 16, i // 16) for i in range(0, 64, 16)]
    frames.append(frame(64, 80, 4, update_every=10))
    result = spectral_edge_dynamics(frames[4], FakeContext(frames[:4]))
    key = sed.windowed_key(sed.GAP_RATIO, 16)
    got = _values(result, key, MODEL_LAYER)
    assert sorted(got) == steps[64:]
    assert set(_values(result, sed.windowed_key(sed.INCOMPLETE, 16), MODEL_LAYER).values()) == {0.0}
    for i, step in enumerate(steps[64:], start=64):
        last = rows[MODEL_LAYER][i - 15 : i + 1].double()  # exactly the last 16 rows
        (want,) = sed.rolling_sed(last, steps[i - 15 : i + 1], 16, at=[step], step_interval=10**6)
        assert want.n_rows == 16
        assert got[step] == pytest.approx(want.gap_ratio, rel=1e-9)
    assert sorted(_values(result, key, "a")) == [80, 120, 160, 200]  # every 4th row: steps//10
    assert default_layer_stride(149) == 16
    assert default_layer_stride(149, every=10) == 1


def test_missing_frame_flags_incomplete_windows_and_model_falls_back_to_concat() -> None:
    rows_a = _planted(30, 200, (4.0,), 0.05, seed=3).float()
    rows_b = _planted(30, 100, (2.0, 1.0), 0.05, seed=4).float()
    frames = [
        _frame(
            FrameKind.UPDATE_SKETCH,
            list(range(i, i + 10)),
            {"a": rows_a[i : i + 10], "b": rows_b[i : i + 10]},
            seq=i // 10,
            sed={"windows": [16]},
        )
        for i in range(0, 30, 10)
    ]
    result = spectral_edge_dynamics(frames[2], FakeContext([frames[0]]))  # frame 1 was lost
    flags = _values(result, sed.windowed_key(sed.INCOMPLETE, 16), MODEL_LAYER)
    assert flags[29] == 1.0
    keep = [*range(10), *range(20, 30)]
    cat = torch.cat([rows_a, rows_b], dim=1).double()[keep]
    (want,) = sed.rolling_sed(cat, keep, 16, at=[29], step_interval=1)
    assert want.n_rows == 10
    got = _values(result, sed.windowed_key(sed.GAP_RATIO, 16), MODEL_LAYER)[29]
    assert got == pytest.approx(want.gap_ratio, rel=1e-9)


def test_param_sketch_frames_give_the_interval_variant() -> None:
    g = torch.Generator().manual_seed(8)
    theta = torch.cumsum(
        torch.randn(25, 400, generator=g, dtype=torch.float64) * 0.1
        + torch.linspace(0, 1, 400, dtype=torch.float64),
        dim=0,
    )
    steps = [100 * i for i in range(25)]
    frames = [
        _frame(
            FrameKind.PARAM_SKETCH, steps[i : i + 5], {MODEL_LAYER: theta[i : i + 5]}, seq=i // 5
        )
        for i in range(0, 25, 5)
    ]
    result = spectral_edge_dynamics(frames[4], FakeContext(frames[:4]))
    want = {w.step: w for w in sed.interval_sed(theta, steps, 10) if w.step >= 2000}
    got = _values(result, sed.interval_key(sed.GAP_RATIO), MODEL_LAYER)
    assert sorted(got) == sorted(want) == [2000, 2100, 2200, 2300, 2400]
    for step, value in got.items():
        assert value == pytest.approx(want[step].gap_ratio, rel=1e-9)


def test_an_off_cadence_theta_frame_is_not_an_interval_checkpoint() -> None:
    """The client's first theta of a session (step 1, or a resumed run's first step, off the
    ``theta_every`` grid) split the grid's intervals: a resumed run's windows came out
    incomplete for ~11 frames (gap ratio 30.6 instead of 43.3). Marked ``off_cadence``, it is
    left out: the same values as without it, and none of its own."""
    g = torch.Generator().manual_seed(8)
    theta = torch.cumsum(torch.randn(16, 400, generator=g, dtype=torch.float64), dim=0)
    steps = [100 * i for i in range(16)]
    frames = [
        _frame(FrameKind.PARAM_SKETCH, [s], {MODEL_LAYER: theta[i : i + 1]}, seq=i)
        for i, s in enumerate(steps)
    ]
    extra = _frame(FrameKind.PARAM_SKETCH, [1050], {MODEL_LAYER: theta[10:11] + 1.0}, seq=99)
    extra.header.info["off_cadence"] = True
    key = sed.interval_key(sed.GAP_RATIO)
    plain = _values(spectral_edge_dynamics(frames[15], FakeContext(frames[:15])), key, MODEL_LAYER)
    mixed = [*frames[:11], extra, *frames[11:15]]
    marked = _values(spectral_edge_dynamics(frames[15], FakeContext(mixed)), key, MODEL_LAYER)
    assert plain
    assert plain == marked
    assert spectral_edge_dynamics(extra, FakeContext(frames[:11])).metrics == []


def test_interval_deltas_leave_out_the_displacements_across_a_break() -> None:
    theta = torch.arange(10.0, dtype=torch.float64).reshape(5, 2).square()
    steps = [0, 10, 20, 30, 40]
    deltas, ends = sed.interval_deltas(theta, steps, [20])
    assert ends == [10, 30, 40]
    assert torch.equal(deltas, (theta[1:] - theta[:-1])[[0, 2, 3]])
    assert sed.interval_deltas(theta, steps, [25, 40])[1] == [10, 20]  # (20, 30] holds 25
    assert sed.interval_deltas(theta, steps, [0, 50])[1] == [10, 20, 30, 40]


def test_a_chain_break_leaves_the_displacement_across_it_out() -> None:
    """A theta frame naming ``__model__`` in ``info["chain_break"]`` (a layer frozen before it:
    the model row sums over another set from then on) is not differenced with the row before:
    the windows over that slot are computed without it and flagged incomplete, as at a run's
    start, and a layer it does not name keeps its chain. Differenced, the frozen layer's theta
    was taken for an update (gap ratio ~150 instead of ~1.2 in the audit's freeze control)."""
    g = torch.Generator().manual_seed(8)
    walk = torch.cumsum(torch.randn(20, 400, generator=g, dtype=torch.float64), dim=0)
    left = 50.0 * torch.randn(400, generator=g, dtype=torch.float64)  # the frozen layer's theta
    model = walk + torch.where(torch.arange(20)[:, None] < 8, left, 0.0)
    steps = [100 * i for i in range(20)]
    frames = [
        _frame(
            FrameKind.PARAM_SKETCH,
            [s],
            {"a": walk[i : i + 1], MODEL_LAYER: model[i : i + 1]},
            seq=i,
            **({"chain_break": [MODEL_LAYER]} if s == 800 else {}),
        )
        for i, s in enumerate(steps)
    ]
    gap, flag = sed.interval_key(sed.GAP_RATIO), sed.interval_key(sed.INCOMPLETE)
    got: dict[tuple[str, str], dict[int, float]] = {}
    for i in range(9, 20):
        result = spectral_edge_dynamics(frames[i], FakeContext(frames[:i]))
        for key in itertools.product((gap, flag), ("a", MODEL_LAYER)):
            got.setdefault(key, {}).update(_values(result, *key))
    deltas = walk[1:] - walk[:-1]
    kept = [i for i in range(19) if steps[i + 1] != 800]
    want = sed.rolling_sed(deltas[kept], [steps[i + 1] for i in kept], 10, step_interval=100)
    want_model = {w.step: w for w in want if w.step >= 900}
    assert got[gap, MODEL_LAYER] == pytest.approx({s: w.gap_ratio for s, w in want_model.items()})
    assert got[flag, MODEL_LAYER] == {s: float(s < 1800) for s in range(900, 2000, 100)}
    whole = {w.step: w.gap_ratio for w in sed.interval_sed(walk, steps, 10) if w.step >= 900}
    assert got[gap, "a"] == pytest.approx(whole)
    assert got[flag, "a"] == dict.fromkeys(range(1000, 2000, 100), 0.0) | {900: 1.0}


def _theta_frames(freeze: str) -> list[DecodedFrame]:
    """The audit's freeze control: the middle layer of a 3-layer MLP stops moving after step
    12, by ``requires_grad_(False)`` or by its group's lr set to 0 (the same parameters in
    both); its theta frames (every 5 steps) through the wire, as the worker decodes them."""
    from spectrawatch import wire
    from spectrawatch._capture import Capture
    from spectrawatch._sender import ClientStats, ErrorLog, FrameItem
    from spectrawatch.config import ClientSettings

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )  # fmt: skip
    big = [net[2].weight, net[2].bias]
    rest = [p for n, p in net.named_parameters() if not n.startswith("2.")]
    opt = torch.optim.SGD([{"params": big}, {"params": rest}], lr=0.05)
    sent: list[FrameItem] = []
    settings = ClientSettings.from_env(
        {}, weights_every=0, activations_every=0, theta_every=5, frame_steps=100
    )
    stats = ClientStats()
    cap = Capture(net, opt, settings, sent.append, lambda _: None, ErrorLog(stats), stats)
    assert cap.wait_index(30)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 81):
        if step == 13 and freeze == "requires_grad":
            for p in big:
                p.requires_grad_(False)
        elif step == 13:
            opt.param_groups[0]["lr"] = 0.0
        x, y = torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    cap.finish()
    out = []
    for i, item in enumerate(f for f in sent if f.kind is wire.FrameKind.PARAM_SKETCH):
        body = wire.encode_frame(item.kind, item.step, i, item.tensors, item.info)
        header, tensors = wire.decode_frame(body)
        out.append(DecodedFrame(1, i + 1, header, tensors, torch.device("cpu")))
    return out


def _interval_model_series(frames: list[DecodedFrame]) -> dict[str, dict[int, float]]:
    """``__model__``'s ``sed.interval.*`` series, each frame analysed after the earlier ones with
    their stored results (as the worker does: phases continue the stored gap series)."""
    stored: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for i, frame in enumerate(frames):
        for m in spectral_edge_dynamics(frame, StubHistory(frames[:i], stored)).metrics:
            if m.step is not None and m.name.startswith(sed.INTERVAL_PREFIX):
                stored.setdefault((m.name, m.layer), []).append((m.step, m.value))
    return {name: dict(points) for (name, layer), points in stored.items() if layer == MODEL_LAYER}


def test_interval_sed_across_a_frozen_layer_equals_the_lr0_control() -> None:
    """The audit's freeze control end to end (client capture, wire, analysis): a layer frozen by
    ``requires_grad_(False)`` after step 12 gives the interval SED of the same training with
    that layer's lr at 0 instead, at every step where both windows are complete; the windows
    over the change are incomplete, never a spike. Before the fix the first theta after the
    change was differenced with the one before: gap ratio 150-160 against 1.15-1.25, signal
    rank 1 against 4-9, and a collapse phase at steps 75-80."""
    frozen = _interval_model_series(_theta_frames("requires_grad"))
    control = _interval_model_series(_theta_frames("lr0"))
    gap, rank, phase, flag = (
        sed.interval_key(name)
        for name in (sed.GAP_RATIO, sed.SIGNAL_RANK, sed.PHASE, sed.INCOMPLETE)
    )
    assert max(frozen[gap].values()) < 2 * max(control[gap].values())
    assert 3.0 not in frozen[phase].values()
    complete = [s for s in frozen[flag] if frozen[flag][s] == 0 and control[flag].get(s) == 0]
    assert complete == [65, 70, 75, 80]  # windows (t - 50, t] clear of the change at step 15
    for key in (gap, rank, phase):
        assert {s: frozen[key][s] for s in complete} == pytest.approx(
            {s: control[key][s] for s in complete}, rel=1e-9
        )
    assert all(frozen[flag][s] == 1.0 for s in frozen[flag] if s < 65)


def _resumed_theta_frames(sessions: list[tuple[int, int]], unfreeze_at: int) -> list[DecodedFrame]:
    """The review's resume scenario: a 3-layer MLP whose middle layer is frozen until
    ``unfreeze_at``, trained over ``sessions`` (``(first, last)`` steps each, a new model, SGD
    and capture per session that load the previous one's state, as a resumed process does);
    theta frames every 5 steps through the wire, as the worker decodes them."""
    from spectrawatch import wire
    from spectrawatch._capture import Capture
    from spectrawatch._sender import ClientStats, ErrorLog, FrameItem
    from spectrawatch.config import ClientSettings

    settings = ClientSettings.from_env(
        {}, weights_every=0, activations_every=0, update_every=0, theta_every=5
    )
    state: dict[str, torch.Tensor] = {}
    sent: list[FrameItem] = []
    for first, last in sessions:
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
            torch.nn.Linear(64, 4),
        )  # fmt: skip
        net.load_state_dict(state or net.state_dict())
        net[2].requires_grad_(first >= unfreeze_at)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        stats = ClientStats()
        cap = Capture(
            net, opt, settings, sent.append, lambda _: None, ErrorLog(stats), stats,
            start_step=first - 1,
        )  # fmt: skip
        assert cap.wait_index(30)
        for step in range(first, last + 1):
            if step == unfreeze_at:
                net[2].requires_grad_(True)
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad()
        cap.finish()
        state = {k: v.clone() for k, v in net.state_dict().items()}
    out = []
    for i, item in enumerate(f for f in sent if f.kind is wire.FrameKind.PARAM_SKETCH):
        body = wire.encode_frame(item.kind, item.step, i, item.tensors, item.info)
        header, tensors = wire.decode_frame(body)
        out.append(DecodedFrame(1, i + 1, header, tensors, torch.device("cpu")))
    return out


def test_a_resume_with_another_trained_set_breaks_the_theta_chain() -> None:
    """A layer unfrozen when the run is resumed (steps 1-30 with it frozen, then a new process
    trains 31-60) gives the interval SED of the same change within one process, where the
    client marks it (``info["chain_break"]``): the server sees the theta rows differ from the
    previous frame's and does not difference ``__model__`` (a sum over another set) or the new
    rows across it. Before, the resumed ``__model__`` displacement at step 35 was ~100x the
    others (the review: 3.406 against ~0.02). A resume with the same trained set keeps the
    one-process run's series (no break)."""
    one = _interval_model_series(_resumed_theta_frames([(1, 60)], 31))
    resumed = _interval_model_series(_resumed_theta_frames([(1, 30), (31, 60)], 31))
    assert one.keys() == resumed.keys()
    for key, series in one.items():
        assert resumed[key] == pytest.approx(series, rel=1e-9), key
    flag = sed.interval_key(sed.INCOMPLETE)
    assert resumed[flag][35] == 1.0  # the window over the change lacks its displacement
    same = _interval_model_series(_resumed_theta_frames([(1, 60)], 1))
    same_resumed = _interval_model_series(_resumed_theta_frames([(1, 30), (31, 60)], 1))
    for key, series in same.items():
        assert same_resumed[key] == pytest.approx(series, rel=1e-9), key
    assert same[flag][60] == 0.0


def test_grokking_score_uses_training_series_only() -> None:
    rows = _planted(10, 50, (1.0,), 0.1, seed=5).float()
    frame = _frame(FrameKind.UPDATE_SKETCH, list(range(2000, 2010)), {"w": rows}, seq=0)
    ctx = FakeContext()
    ctx.scalars["val_acc"] = [(s, 1.0) for s in range(0, 2000, 100)]
    quiet = spectral_edge_dynamics(frame, ctx)
    assert _values(quiet, grokking.IMMINENT, MODEL_LAYER) == {2009: 0.0}
    # a defect spike at 1500 and a norm turnaround at 1400: two pieces of evidence
    ctx.scalars[grokking.COMMUTATOR_DEFECT] = [
        (s, 10.0 + (s % 200) / 100 + (40.0 if s >= 1400 else 0.0)) for s in range(0, 2000, 100)
    ]
    ctx.series[(FROBENIUS_NORM, "w")] = [
        (s, 100.0 - s / 20 if s <= 1300 else 35.0 + (s - 1300) / 50) for s in range(0, 2000, 100)
    ]
    # HT-SR alpha of the weights frames: at or below 2 from 1200 (reported, not counted)
    ctx.series[(grokking.HTSR_ALPHA, "w")] = [
        (s, 3.0 if s < 1200 else 1.9) for s in range(0, 2000, 100)
    ]
    # probe-prediction agreement over 2,000 positions: 0.3 -> 0.1 by 900, 0.2 from 1000
    # (a turn, reported, not counted: it fires at the second evaluation above 0.125, 1100)
    ctx.scalars[grokking.PREDICTION_AGREEMENT] = [
        (s, 0.3 - s / 4500 if s < 1000 else 0.2) for s in range(0, 2000, 100)
    ]
    ctx.scalars[grokking.PREDICTION_POSITIONS] = [(s, 2000.0) for s in range(0, 2000, 100)]
    # probe confidence: memorised by 400 (0.45), flat, +0.03 per evaluation after 1000; with
    # the norm fallen by 30 % since 600, its smoothed value stands 0.05 up at 1300 and 1400
    ctx.scalars[grokking.PREDICTION_CONFIDENCE] = [
        (s, 0.1 + s / 1000 if s < 400 else 0.45 + max(0, s - 1000) * 3e-4)
        for s in range(0, 2000, 100)
    ]
    # the output layer's effective rank: 100 -> 60 by 400, flat, then down 1 % of 60 per 100
    # steps from 1,000; over 500 steps that is 0.62 % per 100 steps at 1,300 (the norm is 35,
    # below 0.6 of its maximum 100): reported, not counted
    ctx.series[(grokking.OUTPUT_RANK, MODEL_LAYER)] = [
        (s, 100.0 - s / 10 if s <= 400 else 60.0 * (1 - 0.01 * max(0, s - 1000) / 100))
        for s in range(0, 2000, 100)
    ]
    fired = spectral_edge_dynamics(frame, ctx)
    assert _values(fired, grokking.IMMINENT, MODEL_LAYER) == {2009: 1.0}
    assert _values(fired, grokking.WARNING_SCORE, MODEL_LAYER)[2009] == pytest.approx(1.0)
    evidence = {
        m.name.removeprefix(grokking.EVIDENCE_PREFIX): (m.step, m.value)
        for m in fired.metrics
        if m.name.startswith(grokking.EVIDENCE_PREFIX)
    }
    assert evidence == {
        "defect": (2009, 1500.0),
        "norm_turn": (2009, 1400.0),
        "alpha_floor": (2009, 1300.0),
        "agreement_turn": (2009, 1100.0),
        "confidence_rise": (2009, 1400.0),
        "output_rank_fall": (2009, 1300.0),
    }
    assert not [m for m in quiet.metrics if m.name.startswith(grokking.EVIDENCE_PREFIX)]
    assert "val_acc" not in ctx.scalars_read
    # a probe size no client would send is ignored (so is the agreement), never an error
    for bad in (0.0, -5.0, 1e300):
        ctx.scalars[grokking.PREDICTION_POSITIONS] = [(1900, bad)]
        names = {m.name for m in spectral_edge_dynamics(frame, ctx).metrics}
        assert grokking.EVIDENCE_PREFIX + "agreement_turn" not in names
        assert grokking.EVIDENCE_PREFIX + "defect" in names


def test_without_the_probe_the_sed_collapse_is_the_second_piece_of_evidence() -> None:
    rows = _planted(10, 50, (1.0,), 0.1, seed=5).float()
    frame = _frame(FrameKind.UPDATE_SKETCH, list(range(3000, 3010)), {"w": rows}, seq=0)
    ctx = FakeContext()
    ctx.series[(FROBENIUS_NORM, "w")] = [
        (s, 100.0 - s / 20 if s <= 1300 else 35.0 + (s - 1300) / 50) for s in range(0, 3000, 100)
    ]
    assert _values(spectral_edge_dynamics(frame, ctx), grokking.IMMINENT, MODEL_LAYER) == {
        3009: 0.0
    }
    # interval gap: rises to 5 by 1000, holds, falls to 1.5 from 2000 on
    gap = [(s, 1.0 + 4.0 * min(s, 1000) / 1000 if s < 2000 else 1.5) for s in range(100, 3000, 100)]
    ctx.series[(sed.interval_key(sed.GAP_RATIO), MODEL_LAYER)] = gap
    fired = spectral_edge_dynamics(frame, ctx)
    assert _values(fired, grokking.IMMINENT, MODEL_LAYER) == {3009: 1.0}
    # with a (quiet) defect series the SED collapse is not used as evidence
    ctx.scalars[grokking.COMMUTATOR_DEFECT] = [
        (s, 10.0 + (s % 300) / 100) for s in range(0, 3000, 100)
    ]
    quiet = spectral_edge_dynamics(frame, ctx)
    assert _values(quiet, grokking.IMMINENT, MODEL_LAYER) == {3009: 0.0}


def test_weight_effective_rank_analysis() -> None:
    w = torch.diag(torch.tensor([3.0, 3.0, 0.0, 0.0]))
    frame = _frame(FrameKind.WEIGHTS, [0], {"w": w, "bias_row": torch.ones(1, 4)}, seq=0)
    result = weight_effective_rank(frame, FakeContext())
    assert [(m.layer, m.name) for m in result.metrics] == [("w", grokking.EFFECTIVE_RANK)]
    assert result.metrics[0].value == pytest.approx(2.0)
    # the layer the client names as the output layer also gives the run-level series
    head = torch.diag(torch.tensor([2.0, 1.0, 1.0]))
    tensors = {"w": w, "head": head}
    named = weight_effective_rank(
        _frame(FrameKind.WEIGHTS, [0], tensors, 0, output_layer="head"), FakeContext()
    )
    got = {(m.layer, m.name): m.value for m in named.metrics}
    assert set(got) == {
        ("w", grokking.EFFECTIVE_RANK),
        ("head", grokking.EFFECTIVE_RANK),
        (MODEL_LAYER, grokking.OUTPUT_RANK),
    }
    assert got[MODEL_LAYER, grokking.OUTPUT_RANK] == got["head", grokking.EFFECTIVE_RANK]
    # a name that is not a matrix of this frame (another part holds it, or nonsense) adds none
    for bad in ("missing", "bias_row", 7, None, ["head"]):
        frame = _frame(FrameKind.WEIGHTS, [0], {"w": w, "bias_row": torch.ones(1, 4)}, 0)
        frame.header.info["output_layer"] = bad
        out = weight_effective_rank(frame, FakeContext())
        assert [m.name for m in out.metrics] == [grokking.EFFECTIVE_RANK]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rolling_sed_on_cuda_equals_cpu() -> None:
    rows = _planted(40, 2_000, (5.0, 2.0), noise=0.05, seed=6).float()
    cpu = sed.rolling_sed(rows, list(range(40)), 16)
    gpu = sed.rolling_sed(rows.cuda(), list(range(40)), 16)
    assert [w.step for w in gpu] == [w.step for w in cpu]
    for a, b in zip(gpu, cpu, strict=True):
        np.testing.assert_allclose(a.singular_values, b.singular_values, rtol=1e-9)
        assert a.edge == b.edge


def _numpy_windows(
    rows: torch.Tensor, steps: list[int], window: int, ends: list[int]
) -> list[tuple[int, np.ndarray]]:
    """(end step, numpy singular values) of every window with ≥ 4 rows (the reference)."""
    out = []
    for t in ends:
        idx = [i for i, s in enumerate(steps) if t - window < s <= t]
        if len(idx) >= sed.MIN_ROWS:
            out.append((t, np.linalg.svd(rows[idx].double().numpy(), compute_uv=False)))
    return out


def test_batched_sed_equals_numpy_per_tensor_and_window() -> None:
    steps = [s for s in range(90) if s not in (40, 41, 77)]  # windows with missing steps too
    tensors = [
        _planted(len(steps), d, (6.0, 3.0, 1.5)[: i + 1], noise=0.1, seed=20 + i).float()
        for i, d in enumerate((300, 300, 900))  # two widths: one bmm per width
    ]
    ends = steps[-12:]
    found = sed.batched_sed(tensors, steps, (8, 16, 32), at=ends, step_interval=1)
    assert len(found) == 3
    for rows, per_window in zip(tensors, found, strict=True):
        assert sorted(per_window) == [8, 16, 32]
        for w, got in per_window.items():
            want = _numpy_windows(rows, steps, w, ends)
            assert [x.step for x in got] == [t for t, _ in want]
            for x, (_, s) in zip(got, want, strict=True):
                assert x.n_rows == len(s)
                np.testing.assert_allclose(x.singular_values, s, rtol=1e-8, atol=1e-10 * s[0])


def test_windows_wider_than_their_tensor_keep_only_its_rank() -> None:
    # an exact-mode bias of 8 values in a 16-row window: rank <= 8, so 8 singular values (as
    # LAPACK gives); the Gram's 8 round-off eigenvalues made the gap ratio ~1e7 at k* = 8
    steps = list(range(40))
    tensors = [torch.randn(40, d, generator=torch.Generator().manual_seed(d)) for d in (8, 3, 64)]
    found = sed.batched_sed(tensors, steps, (16,), at=[39])
    narrow, tiny, wide = (f[16] for f in found)
    assert tiny == []  # 3 singular values leave no runner-up ratio: skipped, as too few rows
    for rows, (got,) in ((tensors[0], narrow), (tensors[2], wide)):
        want = np.linalg.svd(rows[24:40].double().numpy(), compute_uv=False)
        np.testing.assert_allclose(got.singular_values, want, rtol=1e-9)
        assert (got.n_rows, got.complete) == (16, True)
    (svd,) = sed.rolling_sed(tensors[0], steps, 16, at=[39], method="svd")
    (win,) = narrow
    assert (svd.edge, svd.n_rows, svd.complete) == (win.edge, 16, True)
    assert win.gap_ratio == pytest.approx(svd.gap_ratio, rel=1e-9)
    assert win.gap_ratio < 10.0
    assert sed.rolling_sed(tensors[1], steps, 16, method="svd") == []


def test_batched_sed_planted_rank_per_tensor() -> None:
    tensors = [_planted(64, 1_280, (8.0,) * r, noise=0.05, seed=r) for r in (1, 2, 3)]
    found = sed.batched_sed(tensors, list(range(64)), (32,), at=[63])
    assert [f[32][0].edge for f in found] == [1, 2, 3]


def test_batched_sed_bounds_the_gram_matrix_over_long_histories() -> None:
    rows = _planted(700, 64, (4.0, 1.0), noise=0.05, seed=3)  # > _ENDS_PER_PART ends
    got = sed.batched_sed([rows], list(range(700)), (16,))[0][16]
    assert [w.step for w in got] == list(range(3, 700))
    want = _numpy_windows(rows, list(range(700)), 16, [15, 400, 699])
    by_step = {w.step: w for w in got}
    for t, s in want:
        np.testing.assert_allclose(by_step[t].singular_values, s, rtol=1e-9)


def test_phase_codes_equal_detect_phases_on_every_prefix() -> None:
    rng = np.random.default_rng(4)
    t = np.arange(120)
    shapes = [
        1.0 + 3.0 * np.exp(-(((t - 50) / 15.0) ** 2)),  # rise, plateau, collapse
        1.0 + 0.5 * t / 120,  # still rising
        np.full(120, 1.01),  # flat
    ]
    seen = []
    for shape, noise in zip(shapes, (0.05, 0.05, 0.0), strict=True):
        values = list(shape + noise * rng.standard_normal(120))
        steps = [int(s) * 10 for s in t]
        got = sed.phase_codes(values, 0)
        want = [
            sed.detect_phases(steps[: i + 1], values[: i + 1]).phase_at(steps[i])
            for i in range(120)
        ]
        assert got == want
        assert sed.phase_codes(values, 100) == want[100:]
        seen.append(set(got))
    assert seen[0] >= {sed.Phase.RISE, sed.Phase.PLATEAU, sed.Phase.COLLAPSE}
    assert sed.Phase.RISE in seen[1]
    assert seen[2] == {sed.Phase.UNKNOWN}


def test_phase_codes_batch_equal_phase_codes_per_series() -> None:
    """Stacked series of equal length, others alone; any first point; a NaN, a huge value."""
    rng = np.random.default_rng(8)
    series, firsts = [], []
    for n in (1, 3, 5, 6, 40, 40, 40, 40, 1040, 1040, 1040):
        t = np.arange(n)
        centre, width = rng.uniform(0, n), rng.uniform(2, 30)
        shape = 1.0 + rng.uniform(0, 4) * np.exp(-(((t - centre) / width) ** 2))
        series.append(shape + rng.uniform(0, 0.3) * rng.standard_normal(n))
        firsts.append(int(rng.integers(0, n + 1)))
    series.append(np.full(40, 1.01))  # flat: UNKNOWN
    series.append(1.0 + np.arange(40) / 10)  # still rising
    series[5][17] = math.nan
    series[6][30] = 1e12  # (stored values are finite: inf - inf would warn in both)
    firsts += [0, 0]
    got = sed.phase_codes_batch(series, firsts)
    want = [sed.phase_codes(list(v), first) for v, first in zip(series, firsts, strict=True)]
    assert got == want
    assert {c for codes in got for c in codes} == set(sed.Phase)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_sed_on_cuda_equals_cpu() -> None:
    tensors = [_planted(80, 640, (5.0, 2.0), noise=0.05, seed=s).float() for s in range(6)]
    cpu = sed.batched_sed(tensors, list(range(80)), (16, 32, 64), at=list(range(64, 80)))
    gpu = sed.batched_sed(
        [t.cuda() for t in tensors], list(range(80)), (16, 32, 64), at=list(range(64, 80))
    )
    for a_layer, b_layer in zip(gpu, cpu, strict=True):
        for w in (16, 32, 64):
            assert [x.step for x in a_layer[w]] == [x.step for x in b_layer[w]] != []
            for a, b in zip(a_layer[w], b_layer[w], strict=True):
                np.testing.assert_allclose(a.singular_values, b.singular_values, rtol=1e-9)
                assert a.edge == b.edge


def test_lag_endpoint_finds_the_lead_of_a_gap_series(tmp_path: Path) -> None:
    """``GET /runs/{id}/sed/lag``: the gap series is val loss 300 steps early (3 points of a
    100-step grid), so the strongest correlation is at lag +3; r equals numpy's on the
    shifted arrays. Other metrics are not gap series; an unknown scalar is a 404."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    steps = list(range(0, 3000, 100))
    curve = [math.sin(s / 400.0) + 0.001 * s for s in range(-300, 3000, 100)]
    val_loss = curve[:30]  # val_loss(t) = f(t - 300)
    gap = curve[3:]  # gap(t) = f(t): val loss repeats it 300 steps later
    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)), base_url="http://127.0.0.1"
    ) as client:
        run = client.post("/api/v1/runs", json={"project": "p", "name": "lag"}).json()
        base = f"/api/v1/runs/{run['id']}"
        rows = [
            {"step": s, "layer": "__model__", "name": name, "value": v}
            for name, values in (("sed.gap_ratio.w32", gap), ("sed.edge.w32", gap))
            for s, v in zip(steps, values, strict=True)
        ]
        rows += [
            {"step": s, "layer": "__model__", "name": "sed.gap_ratio.w16", "value": 1.0}
            for s in range(0, 3000, 7)
        ]  # on its own grid: shares every 700th step
        rows += [
            {"step": s, "layer": "__model__", "name": "sed.gap_ratio.w64", "value": v}
            for s, v in zip(steps[:9], gap, strict=False)
        ]  # 9 shared points: every lag's r is over fewer than 10 pairs
        rows += [
            {"step": s, "layer": "fc1", "name": "sed.gap_ratio.w8", "value": 1.0} for s in steps
        ]  # a window only another layer has: no series of __model__
        assert client.post(f"{base}/metrics", json={"rows": rows}).status_code == 202
        scalars = [
            {"step": s, "name": "val_loss", "value": v}
            for s, v in zip(steps, val_loss, strict=True)
        ]
        assert client.post(f"{base}/scalars", json=scalars).status_code == 202
        body = client.get(f"{base}/sed/lag", params={"max_lag": 5}).json()
        assert body["scalar"] == "val_loss"
        by_metric = {s["metric"]: s for s in body["series"]}
        assert sorted(by_metric) == ["sed.gap_ratio.w16", "sed.gap_ratio.w32", "sed.gap_ratio.w64"]
        w32 = by_metric["sed.gap_ratio.w32"]
        assert (w32["points"], w32["step_unit"]) == (30, 100)
        assert (w32["best"]["lag"], w32["best"]["steps"]) == (3, 300)
        want = np.corrcoef(np.array(gap[:-3]), np.array(val_loss[3:]))[0, 1]
        assert w32["best"]["r"] == pytest.approx(want, rel=1e-12)
        assert want == pytest.approx(1.0)
        assert {p["lag"] for p in w32["lags"]} == set(range(-5, 6))
        assert all(p["pairs"] == 30 - abs(p["lag"]) for p in w32["lags"])
        short = by_metric["sed.gap_ratio.w64"]
        assert short["lags"]  # computed, with their pairs, but none strong enough to be best
        assert max(p["pairs"] for p in short["lags"]) == 9
        assert short["best"] is None
        constant = by_metric["sed.gap_ratio.w16"]
        assert constant["best"] is None  # a constant gap correlates with nothing
        assert client.get(f"{base}/sed/lag", params={"scalar": "nope"}).status_code == 404
        assert client.get(f"{base}/sed/lag", params={"max_lag": 0}).status_code == 422


@pytest.mark.parametrize("n", [5, 12, 30])  # fewer rows than some widths, equal, more
def test_layer_grams_equal_float64_products_for_every_width(n: int) -> None:
    """The CPU route (numpy's 2-D products where the rows are fewer than the width) and the
    batched ``bmm`` (square and tall blocks) give ``X Xᵀ`` in float64, whatever the dtype."""
    gen = torch.Generator().manual_seed(n)
    widths = [12, 40, 40, 7, 12]
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float32, torch.float64]
    rows = [torch.randn(n, w, generator=gen).to(dt) for w, dt in zip(widths, dtypes, strict=True)]
    grams = sed.layer_grams(rows)
    assert grams.shape == (len(rows), n, n)
    assert grams.dtype == torch.float64
    for g, r in zip(grams, rows, strict=True):
        x = r.to(torch.float64).numpy()
        np.testing.assert_allclose(g.numpy(), x @ x.T, rtol=1e-12, atol=1e-12)


class TailsRecorder(StubHistory):
    """:class:`StubHistory` that records the series tails read."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.tails_read: list[str] = []

    def metric_tails(
        self, wanted: Mapping[tuple[str, str], int]
    ) -> dict[tuple[str, str], list[tuple[int, float]]]:
        self.tails_read.extend(name for name, _ in wanted)
        return super().metric_tails(wanted)


def test_stored_incomplete_windows_are_left_out_of_phases_read_as_flags_only() -> None:
    """The stored gap points of incomplete windows are left out of the phase history; the
    flags come as flagged steps, not as every point of each flag series."""
    rows = _planted(40, 200, (5.0, 1.0), noise=0.01, seed=2)
    frame = _frame(FrameKind.UPDATE_SKETCH, list(range(24, 40)), {"a": rows[24:]}, seq=2)
    history = [_frame(FrameKind.UPDATE_SKETCH, list(range(24)), {"a": rows[:24]}, seq=1)]
    gap, flag = sed.windowed_key(sed.GAP_RATIO, 16), sed.windowed_key(sed.INCOMPLETE, 16)
    # stored: a rise to a plateau of complete windows, with huge gaps of incomplete ones
    points = [(s, 30.0 if s % 4 == 0 else 1.0 + min(s, 12) / 4) for s in range(-200, 24)]
    flags = [(s, float(s % 4 == 0)) for s, _ in points]
    series = {
        (n, layer): p for layer in ("a", MODEL_LAYER) for n, p in ((gap, points), (flag, flags))
    }
    context = TailsRecorder(history, series)
    result = spectral_edge_dynamics(frame, context)
    assert flag not in context.tails_read
    assert gap in context.tails_read
    complete = [(s, v) for s, v in points if s % 4]
    clean = TailsRecorder(history, {(gap, layer): complete for layer in ("a", MODEL_LAYER)})
    want = spectral_edge_dynamics(frame, clean)
    phase = sed.windowed_key(sed.PHASE, 16)
    got = _values(result, phase, "a")
    assert got == _values(want, phase, "a")
    assert set(got.values()) != {float(sed.Phase.COLLAPSE)}  # what the incomplete peaks made


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_extend_grams_equal_the_grams_of_the_stacked_rows(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(31)
    widths = (640, 8, 48, 640)  # mixed, some narrower than the rows are many
    old = [torch.randn(20, d, generator=g) * 10.0 ** (i - 2) for i, d in enumerate(widths)]
    new = [torch.randn(4, d, generator=g) for d in widths]
    grams = sed.extend_grams(
        sed.layer_grams(old).to(device), [r.to(device) for r in old], [r.to(device) for r in new]
    ).cpu()
    for i, (a, b) in enumerate(zip(old, new, strict=True)):
        x = torch.cat([a, b]).double().numpy()
        want = x @ x.T
        np.testing.assert_allclose(grams[i].numpy(), want, rtol=1e-12, atol=1e-14 * want.max())
    # eigvalsh reads one triangle: the new rows' blocks must be the same in both
    assert torch.equal(grams[:, 20:], grams[:, :, 20:].mT)
    with pytest.raises(ValueError, match="do not fit"):
        sed.extend_grams(sed.layer_grams(old), old, [torch.randn(4, 7)] * 4)


def _sed_stream(frames: list[DecodedFrame], *, fresh: bool) -> list[object]:
    """The ``sed`` analysis of each frame with the frames before it as history; ``fresh``:
    every frame and its history as newly decoded (nothing kept from earlier frames)."""
    results = []
    for i in range(len(frames)):
        if fresh:
            frames = [
                DecodedFrame(g.run_id, g.frame_id, g.header, g.tensors, g.device) for g in frames
            ]
        results.append(spectral_edge_dynamics(frames[i], StubHistory(frames[:i])))
    return results


def _numpy_window(rows: np.ndarray, steps: np.ndarray, end: int, window: int) -> np.ndarray:
    """Singular values by numpy's SVD of the finite rows with step in (end - window, end]."""
    keep = (steps > end - window) & (steps <= end) & np.isfinite(rows).all(axis=1)
    return np.linalg.svd(rows[keep][-window:].astype(np.float64), compute_uv=False)


def test_worker_sed_reusing_grams_equals_numpy_svd_per_window() -> None:
    """Each frame's SED grows the previous frame's Grams by its own rows' products; the stored
    values equal numpy's SVD of every window, and the analysis without anything kept from earlier
    frames (the straightforward per-frame Grams) to round-off."""
    g = torch.Generator().manual_seed(5)
    n_frames, per = 30, 4
    total = n_frames * per
    layers = {
        "a": _planted(total, 640, (30.0, 10.0, 3.0), noise=0.05, seed=3).float(),  # 3 signals
        "b": torch.randn(total, 8, generator=g),  # narrower than the windows: rank 8
        # exactly rank 2 (rank-deficient windows): s3.. are round-off
        "c": (torch.randn(total, 2, generator=g) @ torch.randn(2, 48, generator=g)),
    }
    layers["a"][41] = math.nan  # a missing (non-finite) row: windows over it are incomplete
    layers["b"][77, 3] = math.inf
    frames = [
        _frame(
            FrameKind.UPDATE_SKETCH,
            list(range(i * per + 1, (i + 1) * per + 1)),
            {name: rows[i * per : (i + 1) * per] for name, rows in layers.items()},
            seq=i + 1,
        )
        for i in range(n_frames)
    ]
    extended = []
    real_extend = sed.extend_grams

    def counting(*args: object) -> torch.Tensor:
        extended.append(1)
        return real_extend(*args)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sed, "extend_grams", counting)
        kept = _sed_stream(frames, fresh=False)
        # every later frame: layers and __model__ (more groups while a layer lacks a row)
        assert len(extended) >= 2 * (n_frames - 1)
        extended.clear()
        plain = _sed_stream(frames, fresh=True)
        assert not extended
    steps = np.arange(1, total + 1)
    joined = torch.cat([layers[n].double() for n in sorted(layers)], dim=1).numpy()
    checked = 0
    for a, b in zip(kept, plain, strict=True):
        got = [(m.layer, m.name, m.step, m.value) for m in a.metrics]  # type: ignore[attr-defined]
        want = [(m.layer, m.name, m.step, m.value) for m in b.metrics]  # type: ignore[attr-defined]
        assert [x[:3] for x in got] == [x[:3] for x in want]
        for (layer, name, step, x), (_, _, _, y) in zip(got, want, strict=True):
            if not (layer == "c" and name.startswith((sed.GAP_RATIO, sed.MARGIN))):
                assert x == pytest.approx(y, rel=1e-9, abs=1e-300), (layer, name, step)
            if name.startswith(sed.GAP_RATIO) and layer != "c":
                w = int(name.rsplit(".w", 1)[1])
                rows = joined if layer == MODEL_LAYER else layers[layer].double().numpy()
                s = _numpy_window(rows, steps, step, w)
                if len(s) < sed.MIN_ROWS:
                    continue
                ratios = s[: len(s) - 2] / np.maximum(s[1 : len(s) - 1], 1e-12 * s[0])
                assert x == pytest.approx(ratios.max(), rel=1e-9), (layer, step, w)
                checked += 1
            if name.startswith(sed.EDGE) and layer == "c" and x:
                assert x == 2.0  # the rank-2 edge, whatever the round-off values after it
        for spectrum in a.spectra:  # type: ignore[attr-defined]
            rows = joined if spectrum.layer == MODEL_LAYER else layers[spectrum.layer].numpy()
            for w, entry in spectrum.payload["windows"].items():
                s = _numpy_window(rows, steps, entry["step"], int(w))
                got_s = np.asarray(entry["singular_values"])
                assert len(got_s) == min(len(s), rows.shape[1])
                # s_k from the Gram: ~1e-16 s1^2 / s_k relative, i.e. ~1e-8 s1 absolute
                np.testing.assert_allclose(got_s, s[: len(got_s)], rtol=1e-9, atol=1e-7 * s[0])
    assert checked > 500
