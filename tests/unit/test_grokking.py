"""Commutator defect against a direct float64 computation; detector rules on synthetic series."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from spectrawatch.spectral import grokking as gk


def _mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def _batch(seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=g).to(dtype), torch.randint(3, (32,), generator=g)


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


Batch = tuple[torch.Tensor, torch.Tensor]


def _direct_defect(model: nn.Module, a: Batch, b: Batch, eta: float) -> float:
    """The papers' formula literally on float64 flat vectors:
    |th_AB - th_BA| / (|eta gA| |eta gB| + 1e-12)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta0 = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    ref = _mlp(torch.float64)

    def grad(theta: torch.Tensor, batch: Batch) -> torch.Tensor:
        th = theta.clone().requires_grad_(True)
        parts = dict(zip(names, torch.split(th, [s.numel() for s in shapes]), strict=True))
        params = {n: v.reshape(s) for (n, v), s in zip(parts.items(), shapes, strict=True)}
        x, y = batch
        out = functional_call(ref, params, (x.double(),))
        (g,) = torch.autograd.grad(nn.functional.cross_entropy(out, y), th)
        return g

    ga, gb = grad(theta0, a), grad(theta0, b)
    th_ab = theta0 - eta * ga - eta * grad(theta0 - eta * ga, b)
    th_ba = theta0 - eta * gb - eta * grad(theta0 - eta * gb, a)
    return float((th_ab - th_ba).norm() / ((eta * ga).norm() * (eta * gb).norm() + 1e-12))


@pytest.mark.parametrize("eta", [1e-3, 1e-2])
def test_defect_equals_direct_float64_computation(eta: float) -> None:
    model = _mlp(torch.float64)
    a, b = _batch(1, torch.float64), _batch(2, torch.float64)
    got = gk.commutator_defect(model, _loss, a, b, eta=eta)
    want = _direct_defect(model, a, b, eta)
    # the direct form subtracts two O(1) vectors differing by O(eta^2): ~1e-16/eta^2 relative
    assert got.defect == pytest.approx(want, rel=1e-6)
    assert got.defect > 0.1


def test_gradient_cosine_equals_direct_float64_computation() -> None:
    model = _mlp(torch.float64)
    a, b = _batch(1, torch.float64), _batch(2, torch.float64)
    got = gk.commutator_defect(model, _loss, a, b)
    params = list(model.parameters())
    ga, gb = (
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(_loss(model, x), params)])
        for x in (a, b)
    )
    want = float(ga @ gb / (ga.norm() * gb.norm()))
    assert got.grad_cosine == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert got.grad_norm_a == pytest.approx(float(ga.norm()), rel=1e-12)
    same = gk.commutator_defect(model, _loss, a, a)
    assert same.grad_cosine == pytest.approx(1.0, abs=1e-12)
    assert same.defect == pytest.approx(0.0, abs=1e-6)


def test_probe_returns_medians_of_defect_and_cosine() -> None:
    model = _mlp(torch.float64)
    batches = iter([_batch(i, torch.float64) for i in range(6)])
    defect, cosine = gk.commutator_probe(model, _loss, lambda: next(batches), pairs=3)
    pairs = [(_batch(i, torch.float64), _batch(i + 1, torch.float64)) for i in (0, 2, 4)]
    samples = [gk.commutator_defect(model, _loss, x, y) for x, y in pairs]
    assert defect == pytest.approx(float(np.median([s.defect for s in samples])), rel=1e-12)
    assert cosine == pytest.approx(float(np.median([s.grad_cosine for s in samples])), rel=1e-12)


def test_float32_model_defect_is_close_to_the_float64_value() -> None:
    a, b = _batch(1, torch.float32), _batch(2, torch.float32)
    got = gk.commutator_defect(_mlp(torch.float32), _loss, a, b, eta=1e-2).defect
    want = _direct_defect(_mlp(torch.float64), a, b, 1e-2)
    assert got == pytest.approx(want, rel=2e-2)


def test_probe_leaves_model_optimizer_grads_and_rng_bit_identical() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    x, y = torch.randn(16, 4), torch.randint(2, (16,))
    _loss(model, (x, y)).backward()  # type: ignore[no-untyped-call]
    opt.step()
    _loss(model, (x, y)).backward()  # type: ignore[no-untyped-call]  # leave non-trivial .grad fields
    params = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    opt_state = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state.items()}

    def sample_batch() -> tuple[torch.Tensor, torch.Tensor]:
        np.random.rand()  # noqa: NPY002 - the user's global stream is what must survive
        random.random()
        return torch.randn(16, 4), torch.randint(2, (16,))

    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())  # noqa: NPY002
    value = gk.median_commutator_defect(model, _loss, sample_batch, pairs=3)
    assert value > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k  # weights and BatchNorm running stats
    assert all(
        torch.equal(p.grad, g)
        for p, g in zip(  # type: ignore[arg-type]
            (p for p in model.parameters() if p.grad is not None), grads, strict=True
        )
    )
    for param, state in opt.state.items():
        assert all(torch.equal(t, opt_state[param][n]) for n, t in state.items())
    after = (torch.rand(3), np.random.rand(), random.random())  # noqa: NPY002
    torch.set_rng_state(rng[0])
    np.random.set_state(rng[1])  # noqa: NPY002
    random.setstate(rng[2])
    assert torch.equal(after[0], torch.rand(3))
    assert after[1] == np.random.rand()  # noqa: NPY002
    assert after[2] == random.random()


def test_probe_restores_parameters_when_the_loss_raises() -> None:
    model = _mlp(torch.float32)
    before = [p.clone() for p in model.parameters()]
    calls = []

    def flaky(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 3:  # after the first shift of the parameters
            raise RuntimeError("boom")
        return _loss(m, batch)

    with pytest.raises(RuntimeError, match="boom"):
        gk.commutator_defect(model, flaky, _batch(1, torch.float32), _batch(2, torch.float32))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_effective_rank_matches_numpy() -> None:
    w = torch.randn(20, 7, generator=torch.Generator().manual_seed(4))
    s = np.linalg.svd(w.double().numpy(), compute_uv=False)
    p = s / s.sum()
    assert gk.effective_rank(w) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-12)
    assert gk.effective_rank(torch.eye(5)) == pytest.approx(5.0)
    assert gk.effective_rank(torch.zeros(3, 3)) == 0.0


def _steps(n: int) -> list[int]:
    return [100 * i for i in range(n)]


def test_defect_alarm_papers_rule() -> None:
    base = [10.0, 11.0, 9.0, 10.5, 9.5, 10.0, 11.0, 9.0, 10.5, 9.5]  # mean 10.1, sd 0.74
    spike = [*base, 10.0, 13.0, 10.0, 13.0, 13.0, 14.0]  # threshold 12.31; two in a row at 1400
    assert gk.defect_alarm(list(zip(_steps(16), spike, strict=True))) == 1400
    assert gk.defect_alarm(list(zip(_steps(16), spike, strict=True)), sustain=3) == 1500
    assert gk.defect_alarm(list(zip(_steps(12), [*base, 10.0, 11.0], strict=True))) is None


def test_defect_spike_ten_times_rule() -> None:
    vals = [2.0, 3.0, 2.5, 20.0, 25.0, 31.0]  # baseline median 2.5: needs > 25 and > 20
    assert gk.defect_spike(list(zip(_steps(6), vals, strict=True))) == 500
    assert gk.defect_spike(list(zip(_steps(6), vals, strict=True)), floor=30.0) == 500
    assert gk.defect_spike(list(zip(_steps(6), vals, strict=True)), floor=31.0) is None


def test_norm_and_rank_turnarounds() -> None:
    norm = [100.0, 90, 80, 70, 60, 55, 54, 54.5, 55.5, 57, 60]
    series = list(zip(_steps(11), norm, strict=True))
    # fell >= 30 % to a minimum of 54 at 600, then >= 2 % above it (55.08) at 800
    assert gk.norm_turnaround(series) == 800
    assert gk.norm_turnaround(series, rise=0.1) == 1000
    assert gk.norm_turnaround(list(zip(_steps(5), [100.0, 95, 97, 99, 101], strict=True))) is None
    flat = list(zip(_steps(11), [10.0] * 11, strict=True))
    ranks = {
        "a": list(zip(_steps(11), [10.0, 9, 7, 6, 6, 6.5, 7, 7, 7, 7, 7], strict=True)),  # 600
        "b": list(zip(_steps(11), [10.0, 9, 8, 7, 6, 5, 5, 5.2, 5.4, 5.6, 6], strict=True)),  # 900
        "c": flat,
    }
    # 2 of 3 matrices turned; the detector takes the step at which half (rounded up) have
    assert gk.rank_turnaround(ranks) == 900
    assert gk.rank_turnaround({"a": ranks["a"], "c": flat, "d": flat}) is None


def test_detector_needs_two_pieces_of_evidence_and_scores_them() -> None:
    steps = _steps(30)
    defect = [(s, 10.0 + (i % 3) + (50.0 if s >= 2000 else 0.0)) for i, s in enumerate(steps)]
    norm = [(s, 100.0 - s / 40 if s <= 2400 else 40.0 + (s - 2400) / 20) for s in steps]
    w = gk.detect_grokking(defect=defect, weight_norm=norm)
    assert w.evidence.defect == 2100
    assert w.evidence.norm_turn == 2500
    assert w.step == 2500
    assert w.fired
    score = dict(w.score)
    assert (score[2000], score[2100], score[2500]) == (0.0, 0.5, 1.0)
    # a control: the defect never leaves its baseline and the norm keeps decaying
    quiet = gk.detect_grokking(
        defect=[(s, 10.0 + (i % 3)) for i, s in enumerate(steps)],
        weight_norm=[(s, 100.0 - s / 40) for s in steps],
    )
    assert quiet.step is None
    assert max(v for _, v in quiet.score) == 0.0
    # one piece of evidence is not enough when two inputs are available
    assert gk.detect_grokking(defect=defect, weight_norm=[(s, 100.0) for s in steps]).step is None
    # one piece alone never fires by default; a second one (here the SED collapse) does
    assert gk.detect_grokking(weight_norm=norm).step is None
    assert gk.detect_grokking(weight_norm=norm, sed_collapse_step=2700).step == 2700
    assert gk.detect_grokking(weight_norm=norm, config=gk.DetectorConfig(require=1)).step == 2500
    assert gk.detect_grokking().step is None


def test_detector_default_defect_threshold_ignores_a_slow_creep() -> None:
    # baseline 10/12 alternating: mean 11, sd 1.054 -> 3 sd at 14.16, 4 sd (default) at 15.22
    steps = _steps(30)
    creep = [(s, (10.0, 12.0)[i % 2] if i < 10 else 14.7) for i, s in enumerate(steps)]
    norm = [(s, 100.0 - s / 40 if s <= 2400 else 40.0 + (s - 2400) / 20) for s in steps]
    assert gk.defect_alarm(creep) == 1100  # the papers' 3-sd rule fires on the creep
    assert gk.detect_grokking(defect=creep, weight_norm=norm).step is None
    papers = gk.DetectorConfig(defect_sigma=3.0)
    assert gk.detect_grokking(defect=creep, weight_norm=norm, config=papers).step == 2500


def test_alpha_floor_reads_the_median_over_matrices() -> None:
    steps = _steps(8)
    alpha = {
        "a": list(zip(steps, [4.0, 3.0, 2.5, 1.9, 1.8, 2.1, 1.7, 1.6], strict=True)),
        "b": list(zip(steps, [5.0, 4.0, 3.0, 1.9, 2.2, 1.9, 1.9, 1.8], strict=True)),
        "c": list(zip(steps, [6.0, 5.0, 4.0, 3.0, 1.5, 1.5, 1.5, 1.5], strict=True)),
    }
    # medians: 5, 4, 3, 1.9, 1.8, 1.9, 1.7, 1.6 -> at or below 2 from step 300
    assert [v for _, v in gk.median_series(alpha)] == [5.0, 4.0, 3.0, 1.9, 1.8, 1.9, 1.7, 1.6]
    assert gk.alpha_floor(alpha) == 400  # two evaluations in a row: 300 and 400
    assert gk.alpha_floor(alpha, sustain=1) == 300
    assert gk.alpha_floor(alpha, sustain=3) == 500
    assert gk.alpha_floor(alpha, floor=1.5) is None
    # a matrix without a value at a step (a failed fit) leaves the median to the others
    gappy = {"a": alpha["a"][:3], "b": alpha["b"], "c": [(s, float("nan")) for s in steps]}
    assert gk.median_series(gappy)[3] == (300, 1.9)


def test_alpha_evidence_counts_only_when_configured() -> None:
    steps = _steps(30)
    norm = [(s, 100.0 - s / 40 if s <= 2400 else 40.0 + (s - 2400) / 20) for s in steps]
    alpha = {"w": [(s, 4.0 if s < 1500 else 1.8) for s in steps]}
    w = gk.detect_grokking(weight_norm=norm, alpha=alpha)
    assert w.evidence.alpha_floor == 1600
    assert "alpha" in w.available
    assert w.step is None  # reported, not counted: the norm turnaround alone does not fire
    counted = gk.detect_grokking(
        weight_norm=norm, alpha=alpha, config=gk.DetectorConfig(alpha_counts=True)
    )
    assert counted.step == 2500  # the second piece: the norm turnaround at 2,500


def test_prediction_agreement_counts_positions_unchanged_in_every_evaluation() -> None:
    a = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    b = a.clone()
    b[0, 0] = 9
    c = a.clone()
    c[1, 3] = 0
    assert gk.prediction_agreement([a, a]) == 1.0
    assert gk.prediction_agreement([b, a, a]) == pytest.approx(7 / 8)
    assert gk.prediction_agreement([b, c, a]) == pytest.approx(6 / 8)
    with pytest.raises(ValueError, match="two"):
        gk.prediction_agreement([a])
    with pytest.raises(ValueError, match="shapes"):
        gk.prediction_agreement([a, a[:1]])


def test_agreement_turnaround_needs_a_fall_then_a_rise_beyond_probe_noise() -> None:
    down_up = [0.05, 0.2, 0.25, 0.2, 0.15, 0.12, 0.11, 0.13, 0.16, 0.2, 0.3]
    series = [(100 * (i + 1), v) for i, v in enumerate(down_up)]
    # large probe: the fall (0.25 -> 0.11) and the rise above 1.25 x 0.11 = 0.1375 are real;
    # fires at the second evaluation in a row above it
    assert gk.agreement_turnaround(series, probe_size=100_000) == 1000
    # a 50-position probe: a rise of 0.09 is within 3 standard errors until 0.3
    assert gk.agreement_turnaround(series, probe_size=50) is None
    only_down = [(100 * (i + 1), v) for i, v in enumerate([0.25, 0.2, 0.15, 0.12, 0.1, 0.09])]
    assert gk.agreement_turnaround(only_down, probe_size=100_000) is None
    # a start at 0 is no peak to fall from, and noise around it is no turn
    flicker = [(100 * (i + 1), v) for i, v in enumerate([0.0, 0.004, 0.0, 0.006, 0.002])]
    assert gk.agreement_turnaround(flicker, probe_size=512) is None
    with pytest.raises(ValueError, match="probe_size"):
        gk.agreement_turnaround(series, probe_size=0)


def test_norm_turnaround_sustain_waits_for_consecutive_evaluations() -> None:
    series = [(1, 10.0), (2, 6.0), (3, 6.5), (4, 6.0), (5, 6.5), (6, 6.6)]
    assert gk.norm_turnaround(series, drop=0.3, rise=0.05) == 3
    assert gk.norm_turnaround(series, drop=0.3, rise=0.05, sustain=2) == 6


def test_agreement_evidence_is_reported_and_counts_only_when_configured() -> None:
    norm = [
        (s, 100.0 - s / 20 if s <= 1300 else 35.0 + (s - 1300) / 50) for s in range(0, 3000, 100)
    ]
    agreement = [(s, 0.3 - s / 4500 if s < 1000 else 0.2) for s in range(0, 3000, 100)]
    w = gk.detect_grokking(weight_norm=norm, agreement=agreement, probe_size=2000)
    assert w.evidence.agreement_turn == 1100
    assert w.evidence.norm_turn is not None
    assert not w.fired  # one counted piece (the norm) is not enough
    assert "agreement" in w.available
    counted = gk.detect_grokking(
        weight_norm=norm,
        agreement=agreement,
        probe_size=2000,
        config=gk.DetectorConfig(agreement_counts=True),
    )
    assert counted.step == max(1100, counted.evidence.norm_turn or 0)
    # without the probe size the series is not read (its noise level is unknown)
    assert gk.detect_grokking(weight_norm=norm, agreement=agreement).evidence.agreement_turn is None


def _confidence(spike_at: int | None = None, rise: bool = True) -> list[tuple[int, float]]:
    """Memorisation ramp 0.1 -> 0.45 by step 400, flat to 1,500, then (``rise``) +0.02 per
    evaluation; optionally one wild value at ``spike_at``."""
    out = []
    for s in range(0, 3000, 100):
        v = 0.1 + s / 1000 if s < 400 else 0.45
        if rise and s > 1500:
            v += 0.02 * (s - 1500) / 100
        out.append((s, 0.9 if s == spike_at else v))
    return out


FALLING_NORM = [
    (s, 100.0 - s / 20 if s <= 1200 else 40.0 + (s - 1200) / 100) for s in range(0, 3000, 100)
]


def test_confidence_rise_after_the_plateau_once_the_norm_has_fallen() -> None:
    # smoothed (causal median of 3): the plateau starts at 800 (0.45 - 0.45 < 0.02 over 3
    # evaluations), its minimum is 0.45; 0.51 at 1,900 and 0.53 at 2,000 stand >= 0.05 above
    assert gk.confidence_rise(_confidence(), FALLING_NORM) == 2000
    # weight decay 0: confidence grows with the norm, which never falls
    growing = [(s, 100.0 + s / 100) for s in range(0, 3000, 100)]
    assert gk.confidence_rise(_confidence(), growing) is None
    # weight frames at a coarser cadence: the norm is known to have fallen from 2,500 on
    late = [(s, 100.0 if s < 2500 else 60.0) for s in range(0, 3000, 500)]
    assert gk.confidence_rise(_confidence(), late) == 2600
    # one wild evaluation is smoothed away; no rise, no warning
    assert gk.confidence_rise(_confidence(spike_at=1000), FALLING_NORM) == 2000
    assert gk.confidence_rise(_confidence(spike_at=1000, rise=False), FALLING_NORM) is None
    nan = [(s, math.nan if s == 1200 else v) for s, v in _confidence()]
    assert gk.confidence_rise(nan, FALLING_NORM) == 2000
    assert gk.confidence_rise(_confidence(), FALLING_NORM, sustain=4) == 2200


def _head_rank(cadence: int = 100, flat: bool = True) -> list[tuple[int, float]]:
    """Memorisation fall 100 -> 60 by step 400, flat (or falling 2 % per 100 steps) to 2,000,
    then a fall of 1 % of 60 per 100 steps."""

    def rank(step: int) -> float:
        if step <= 400:
            return 100.0 - step / 10
        if step <= 2000:
            return 60.0 if flat else 60.0 * (1 - 0.02 * (step - 400) / 100)
        return rank(2000) * (1 - 0.01 * (step - 2000) / 100)

    return [(s, rank(s)) for s in range(0, 3001, cadence)]


def test_output_rank_fall_after_a_flat_stretch_with_the_norm_down() -> None:
    norm = [(s, max(50.0, 120.0 - s / 20)) for s in range(0, 3001, 100)]
    # over 500 steps: at 2,200 (60 - 58.8) / 58.8 / 5 = 0.408 % per 100 steps, under 0.4188;
    # at 2,300 (60 - 58.2) / 58.2 / 5 = 0.619 %: the first fall above the threshold
    assert gk.output_rank_fall(_head_rank(), norm) == 2300
    # frames every 250 steps: at 2,250 the rank is 58.5 against 60 at 1,750: 0.513 %
    assert gk.output_rank_fall(_head_rank(250), norm[::5]) == 2250
    # the weight norm never fell to 0.6 of its maximum (weight decay 0): silent
    assert gk.output_rank_fall(_head_rank(), [(s, 100.0) for s, _ in norm]) is None
    # a rank that never flattens (falls 2 % per 100 steps throughout): silent
    assert gk.output_rank_fall(_head_rank(flat=False), norm) is None
    # the memorisation fall itself (before any flat stretch) never counts
    assert gk.output_rank_fall(_head_rank()[:20], norm) is None
    # a value that is not a new minimum does not fire; NaN and zero ranks are skipped
    bump = [(s, v + 5.0 if s == 2300 else v) for s, v in _head_rank()]
    assert gk.output_rank_fall(bump, norm) == 2400
    holes = [(s, math.nan if s == 2300 else v) for s, v in _head_rank()]
    assert gk.output_rank_fall(holes, norm) == 2400
    assert gk.output_rank_fall([], norm) is None
    with pytest.raises(ValueError, match="span"):
        gk.output_rank_fall(_head_rank(), norm, span=0)


def test_confidence_evidence_is_reported_and_counts_only_when_configured() -> None:
    w = gk.detect_grokking(weight_norm=FALLING_NORM, confidence=_confidence())
    assert w.evidence.confidence_rise == 2000
    assert w.evidence.norm_turn == 1300
    assert not w.fired
    assert "confidence" in w.available
    counted = gk.detect_grokking(
        weight_norm=FALLING_NORM,
        confidence=_confidence(),
        config=gk.DetectorConfig(confidence_counts=True),
    )
    assert counted.step == 2000
    # without weight frames the rise is not read (it cannot tell weight decay 0 apart)
    alone = gk.detect_grokking(confidence=_confidence())
    assert alone.evidence.confidence_rise is None
    assert "confidence" not in alone.available


def test_output_rank_evidence_is_reported_and_counts_only_when_configured() -> None:
    norm = [(s, max(50.0, 120.0 - s / 20)) for s in range(0, 3001, 100)]
    w = gk.detect_grokking(weight_norm=norm, output_rank=_head_rank())
    assert w.evidence.output_rank_fall == 2300
    assert "output_rank" in w.available
    assert not w.fired  # one piece of evidence
    counted = gk.detect_grokking(
        weight_norm=norm, output_rank=_head_rank(), config=gk.DetectorConfig(output_counts=True)
    )
    assert counted.step is None  # still one piece: the norm never turned up again
    rising = norm + [(s, 50.0 + (s - 3000) / 10) for s in range(3100, 3600, 100)]
    assert gk.norm_turnaround(rising) == 3100
    both = gk.detect_grokking(
        weight_norm=rising, output_rank=_head_rank(), config=gk.DetectorConfig(output_counts=True)
    )
    assert both.step == 3100  # two pieces: the rank fall (2,300), then the norm turnaround
    tuned = gk.detect_grokking(
        weight_norm=norm, output_rank=_head_rank(), config=gk.DetectorConfig(output_fall=0.3)
    )
    assert tuned.evidence.output_rank_fall == 2200  # 0.408 % per 100 steps at 2,200
    alone = gk.detect_grokking(output_rank=_head_rank())  # no weight norm: not read
    assert alone.evidence.output_rank_fall is None
    assert "output_rank" not in alone.available


def test_every_piece_of_evidence_has_an_alert_label() -> None:
    fields = {f.name for f in dataclasses.fields(gk.Evidence)}
    assert set(gk.EVIDENCE_LABELS) == fields
