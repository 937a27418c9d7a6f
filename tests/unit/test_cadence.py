"""``overhead_budget``: the update-sketch cadence that the measured sketch and loop times call
for, applied by a real capture on real training loops without breaking one-step updates."""

from __future__ import annotations

import time
import types
from typing import Any

import pytest
import torch
from torch import nn

from spectrawatch import _capture, wire
from spectrawatch._cadence import LADDER, MIN_SKETCHES, MIN_STEPS, WARMUP_SKETCHES, AdaptiveCadence
from spectrawatch.config import ClientSettings, SettingsError
from spectrawatch.sketch import SketchSpec
from tests.unit.test_client_capture import Sink, assert_sketch_of, make_capture, mlp


def _fed(sketch_s: float, loop_s: float, floor: int = 1, budget: float = 0.05) -> AdaptiveCadence:
    c = AdaptiveCadence(budget, floor)
    for _ in range(WARMUP_SKETCHES + MIN_SKETCHES):
        c.sketch_time(sketch_s)
    for _ in range(MIN_STEPS):
        c.loop_time(loop_s)
    return c


def test_the_cadence_is_the_smallest_ladder_step_within_the_budget() -> None:
    # every step: one sketch per row; every k > 1: two (theta before and after the step)
    c = _fed(0.004, 0.1)  # 4 % of the loop: within 5 %
    assert c.overhead(1) == pytest.approx(0.04)
    assert c.overhead(10) == pytest.approx(0.008)
    assert c.update() is None
    assert c.every == 1
    c = _fed(0.01, 0.1)  # 10 %: every 2 costs 2 * 10 / 2 = 10 %, every 5 costs 4 %
    assert c.update() == 5
    assert c.every == 5
    c = _fed(0.01, 0.1, floor=3)  # multiples of the configured cadence
    assert c.candidates == [3 * m for m in LADDER]
    assert c.update() == 6  # 2 * 10 % / 6 = 3.3 %
    c = _fed(10.0, 0.001)  # hopeless: the largest cadence, not "off"
    assert c.update() == LADDER[-1]
    assert _fed(0.008, 0.1).update() == 5  # every 2: 2 * 8 % / 2 = 8 %; every 5: 3.2 %
    c = _fed(0.008, 0.1)  # without an optimizer a row is one sketch (change since the last row)
    c.per_step_rows = False
    assert c.overhead(2) == pytest.approx(0.04)
    assert c.update() == 2


def test_no_decision_before_enough_samples_and_the_cadence_never_shrinks() -> None:
    c = AdaptiveCadence(0.01, 1)
    for _ in range(WARMUP_SKETCHES):
        c.sketch_time(100.0)  # compilation, page faults: ignored
    for _ in range(MIN_SKETCHES - 1):
        c.sketch_time(0.5)
    for _ in range(MIN_STEPS):
        c.loop_time(1.0)
    assert c.overhead(1) is None
    assert c.update() is None
    c.sketch_time(0.5)
    assert c.overhead(1) == pytest.approx(0.5)  # the warm-up samples are not in the median
    assert c.update() == 100
    for _ in range(40):
        c.sketch_time(1e-6)  # the sketch became cheap: the cadence stays
        c.loop_time(1.0)
    assert c.update() is None
    assert c.every == 100
    with pytest.raises(ValueError, match="budget"):
        AdaptiveCadence(0.0, 1)
    with pytest.raises(ValueError, match="floor"):
        AdaptiveCadence(0.01, 0)


@pytest.mark.parametrize("raw", ["1", "1.5", "-0.01", "nan"])
def test_budget_setting_is_checked(raw: str) -> None:
    assert ClientSettings.from_env({"SPECTRAWATCH_OVERHEAD_BUDGET": "0.01"}).overhead_budget == 0.01
    with pytest.raises(SettingsError, match="overhead_budget"):
        ClientSettings.from_env({"SPECTRAWATCH_OVERHEAD_BUDGET": raw})


class _Clock:
    """A perf_counter the test advances: the loop and the sketches take the times it says."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_capture_switches_to_the_cadence_the_times_call_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Loop 10 ms per step, sketch 5 ms: every step costs 50 %, so with a 6 % budget the capture
    moves to every 20 steps (2 * 5 / (20 * 10) = 5 %; every 10: 10 %) as soon as it has its
    samples; every row before and after is the sketch of one step's exact update."""
    clock = _Clock()
    monkeypatch.setattr(_capture, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Sink()
    cap, stats = make_capture(model, opt, sink, overhead_budget=0.06, frame_steps=100)
    assert cap.wait_index(30)
    real_sketch = cap._sketch_all

    def slow_sketch() -> Any:
        clock.now += 0.005
        return real_sketch()

    monkeypatch.setattr(cap, "_sketch_all", slow_sketch)
    thetas: list[dict[str, torch.Tensor]] = []
    gen = torch.Generator().manual_seed(1)
    for _ in range(65):
        clock.now += 0.010
        thetas.append({n: p.detach().clone() for n, p in model.named_parameters()})
        model(torch.randn(16, 6, generator=gen)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    thetas.append({n: p.detach().clone() for n, p in model.named_parameters()})
    cap.finish()
    assert cap.update_every == 20
    assert stats.get("update_every") == 20
    (frame,) = sink.of(wire.FrameKind.UPDATE_SKETCH)
    # 2 warm-up + 3 counted sketches by step 5, 8 loop samples by step 9 (step 1 has none):
    # decided after step 9, every 20 from step 10 on
    assert frame.info["steps"] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 20, 40, 60]
    assert frame.info["update_every"] == 20
    spec = SketchSpec(640, 0)
    for row, step in enumerate(frame.info["steps"]):
        delta = thetas[step]["0.weight"].double() - thetas[step - 1]["0.weight"].double()
        assert_sketch_of(frame.tensors["0.weight"][row], delta, spec, "0.weight")
    assert stats.get("errors") == 0


def test_a_cadence_raised_at_a_step_due_under_it_applies_from_the_next_step() -> None:
    """The controller moving 20 -> 50 after step 50: the pre-step hook of step 50 had not
    sketched theta_49 (not due every 20), and the row at 50 was theta_50 - theta_40 labelled
    one step; now the new cadence starts at step 51 (rows 20, 40, then 100)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Sink()
    cap, _ = make_capture(
        model, opt, sink, exact=True, overhead_budget=0.05, update_every=1, frame_steps=1
    )
    cadence = cap._cadence
    assert cadence is not None
    cadence.every = 20  # as if reached from measured times

    def update() -> int | None:
        if cap.step == 50:
            cadence.every = 50
            return 50
        return None

    cadence.update = update  # type: ignore[method-assign]
    thetas = {0: model.weight.detach().clone()}
    for n in range(1, 101):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        thetas[n] = model.weight.detach().clone()
    cap.finish()
    rows = {
        f.info["steps"][0]: f.tensors["weight"][0] for f in sink.of(wire.FrameKind.UPDATE_SKETCH)
    }
    assert sorted(rows) == [20, 40, 100]
    for step, row in rows.items():
        torch.testing.assert_close(row, (thetas[step] - thetas[step - 1]).reshape(-1))


def test_real_loops_cheap_sketch_keeps_every_step_costly_one_is_stretched() -> None:
    """Real clocks: a small model in a slow loop stays at every step; a 4 M-parameter layer in a
    loop of one tiny forward (the sketch dominates the step) is stretched, and its rows stay
    one-step updates."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Sink()
    cap, stats = make_capture(model, opt, sink, overhead_budget=0.2, frame_steps=100)
    assert cap.wait_index(30)
    assert stats.get("update_every") == 1  # reported from the start, not only on a change
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        time.sleep(0.02)  # a sketch of 231 parameters is ~0.1 ms: far below 20 % of 20 ms
        model(torch.randn(16, 6, generator=gen)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    cap.finish()
    assert cap.update_every == 1
    assert [s for f in sink.of(wire.FrameKind.UPDATE_SKETCH) for s in f.info["steps"]] == list(
        range(1, 31)
    )

    torch.manual_seed(0)
    big = nn.Linear(2000, 2000, bias=False)
    opt = torch.optim.SGD(big.parameters(), lr=0.1)
    sink = Sink()
    cap, stats = make_capture(big, opt, sink, overhead_budget=0.01, frame_steps=100)
    assert cap.wait_index(60)
    thetas: list[dict[str, torch.Tensor]] = []
    x = torch.randn(1, 2000, generator=gen)
    for _ in range(40):
        thetas.append({"weight": big.weight.detach().clone()})
        big(x).sum().backward()
        opt.step()
        opt.zero_grad()
    thetas.append({"weight": big.weight.detach().clone()})
    cap.finish()
    assert cap.update_every > 1
    assert stats.get("update_every") == cap.update_every
    steps = [s for f in sink.of(wire.FrameKind.UPDATE_SKETCH) for s in f.info["steps"]]
    assert len(steps) < 40
    spec = SketchSpec(640, 0)
    rows = torch.cat([f.tensors["weight"] for f in sink.of(wire.FrameKind.UPDATE_SKETCH)])
    for row, step in zip(rows, steps, strict=True):
        delta = thetas[step]["weight"] - thetas[step - 1]["weight"]
        assert_sketch_of(row, delta, spec, "weight", rtol=1e-4)


@pytest.mark.gpu
def test_cuda_sketches_are_timed_by_events() -> None:
    model = mlp().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = Sink()
    cap, stats = make_capture(model, opt, sink, overhead_budget=0.05)
    assert cap.wait_index(30)
    gen = torch.Generator().manual_seed(5)
    for _ in range(12):
        model(torch.randn(16, 6, generator=gen).cuda()).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()  # the next step's hook reads this step's finished events
    cap.finish()
    assert cap._cadence is not None
    assert len(cap._cadence._sketch) >= MIN_SKETCHES
    assert all(0 < t < 1 for t in cap._cadence._sketch)
    assert stats.get("errors") == 0
