"""Update sizes from sketch rows: the count-sketch norm estimate against exact norms, and the
``update_norms`` analysis on update and theta frames."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from spectrawatch.sketch import SketchSpec, sketch_tensor
from spectrawatch.spectral.norms import PARAM_NORM, UPDATE_NORM, UPDATE_RATIO, row_norms
from spectrawatch.wire import FrameKind
from spectrawatch_server.analyses import MODEL_LAYER, analyses_for
from spectrawatch_server.analyses.updates import update_norms
from tests.history import StubHistory, decoded_frame


@pytest.mark.parametrize("kind", ["gaussian", "sparse", "structured"])
def test_sketch_row_norms_estimate_exact_norms(kind: str) -> None:
    """Relative error of ``||S x||`` against ``||x||`` at d = 640 over 300 vectors of 20,000
    coordinates: unbiased in the square, spread ~sqrt(2/d)/2 = 2.8 %, never past 20 % (a
    sparse vector's rare collision of two large coordinates moves it most: 16 % here)."""
    spec = SketchSpec(dim=640, seed=3)
    g = torch.Generator().manual_seed(1)
    ratios, squares = [], []
    for i in range(300):
        x = torch.randn(20_000, generator=g, dtype=torch.float64)
        if kind == "sparse":  # a few coordinates carry the update (an embedding's rows)
            x = x * (torch.rand(20_000, generator=g, dtype=torch.float64) < 0.002)
        elif kind == "structured":  # a common offset plus noise (a norm layer's gains)
            x = 1.0 + 0.1 * x
        (norm,) = row_norms(sketch_tensor(x, spec, f"layer{i}", torch.float64)[None])
        exact = float(x.norm())
        ratios.append(norm / exact)
        squares.append((norm / exact) ** 2)
    assert abs(statistics.fmean(squares) - 1.0) < 0.015
    assert statistics.pstdev(ratios) < 0.04
    assert max(abs(r - 1.0) for r in ratios) < 0.2


def test_row_norms_keep_non_finite_rows_and_refuse_other_shapes() -> None:
    rows = torch.tensor([[3.0, 4.0], [float("nan"), 1.0]])
    first, second = row_norms(rows)
    assert first == 5.0
    assert math.isnan(second)
    with pytest.raises(ValueError, match="steps, d"):
        row_norms(torch.ones(3))


def _info(steps: list[int], **sed: int) -> dict[str, object]:
    return {"steps": steps, "update_every": 1, "sed": sed} if sed else {"steps": steps}


def test_update_frames_give_norms_and_ratios_to_the_latest_theta_frame() -> None:
    g = torch.Generator().manual_seed(2)
    theta = {
        "fc.weight": torch.randn(1, 64, generator=g, dtype=torch.float64) * 10.0,
        MODEL_LAYER: torch.randn(1, 64, generator=g, dtype=torch.float64) * 20.0,
    }
    older = decoded_frame(
        FrameKind.PARAM_SKETCH, 0, {k: v * 2 for k, v in theta.items()}, _info([0])
    )
    latest = decoded_frame(FrameKind.PARAM_SKETCH, 100, theta, _info([100]), frame_id=2)
    rows = {
        "fc.weight": torch.randn(4, 64, generator=g),
        "fc.bias": torch.randn(4, 64, generator=g),  # no theta row: no ratio
        MODEL_LAYER: torch.randn(4, 64, generator=g),
    }
    rows["fc.weight"][2, 5] = float("inf")  # a non-finite row is left out
    frame = decoded_frame(
        FrameKind.UPDATE_SKETCH, 103, rows, _info([100, 101, 102, 103]), frame_id=3
    )
    result = update_norms(frame, StubHistory([older, latest]))
    got = {(m.layer, m.name, m.step): m.value for m in result.metrics}
    for layer, steps in (("fc.weight", [100, 101, 103]), ("fc.bias", [100, 101, 102, 103])):
        for i, step in enumerate([100, 101, 102, 103]):
            key = (layer, UPDATE_NORM, step)
            if step not in steps:
                assert key not in got
                continue
            assert got[key] == pytest.approx(float(rows[layer][i].double().norm()), rel=1e-12)
    base = float(theta["fc.weight"].norm())
    assert got[("fc.weight", UPDATE_RATIO, 101)] == pytest.approx(
        float(rows["fc.weight"][1].double().norm()) / base, rel=1e-12
    )
    assert not [k for k in got if k[0] == "fc.bias" and k[1] == UPDATE_RATIO]
    model_ratio = got[(MODEL_LAYER, UPDATE_RATIO, 103)]
    assert model_ratio == pytest.approx(
        float(rows[MODEL_LAYER][3].double().norm() / theta[MODEL_LAYER].norm()), rel=1e-12
    )
    # without a theta frame before it: norms, no ratio
    alone = update_norms(frame, StubHistory())
    assert {m.name for m in alone.metrics} == {UPDATE_NORM}


def test_per_layer_values_follow_the_sed_layer_stride() -> None:
    g = torch.Generator().manual_seed(4)
    rows = {name: torch.randn(8, 16, generator=g) for name in ("a", "b", MODEL_LAYER)}
    frame = decoded_frame(
        FrameKind.UPDATE_SKETCH, 7, rows, _info(list(range(8)), layer_stride=4), frame_id=1
    )
    result = update_norms(frame, StubHistory())
    steps = {layer: sorted(m.step for m in result.metrics if m.layer == layer) for layer in rows}
    assert steps == {"a": [0, 4], "b": [0, 4], MODEL_LAYER: list(range(8))}


def test_theta_frames_give_parameter_norms() -> None:
    rows = {"w": torch.tensor([[3.0, 4.0], [6.0, 8.0]], dtype=torch.float64)}
    frame = decoded_frame(FrameKind.PARAM_SKETCH, 20, rows, _info([10, 20]))
    result = update_norms(frame, StubHistory())
    assert [(m.layer, m.name, m.step, m.value) for m in result.metrics] == [
        ("w", PARAM_NORM, 10, 5.0),
        ("w", PARAM_NORM, 20, 10.0),
    ]


def test_registered_on_both_sketch_kinds_only() -> None:
    for kind in (FrameKind.UPDATE_SKETCH, FrameKind.PARAM_SKETCH):
        assert "update_norms" in [a.name for a in analyses_for(kind)]
    for kind in (FrameKind.WEIGHTS, FrameKind.ACTIVATIONS):
        assert "update_norms" not in [a.name for a in analyses_for(kind)]


def test_first_theta_frame_gives_the_earlier_updates_their_ratio() -> None:
    """Updates sent before the run's first theta frame are divided by that frame's first
    ``||theta||`` when it arrives (once: a later theta frame adds none)."""
    g = torch.Generator().manual_seed(5)
    names = ("fc.weight", MODEL_LAYER)
    updates = [
        decoded_frame(
            FrameKind.UPDATE_SKETCH,
            4 * (i + 1),
            {k: torch.randn(4, 32, generator=g) for k in names},
            _info(list(range(4 * i + 1, 4 * i + 5))),
            frame_id=i + 1,
        )
        for i in range(3)
    ]
    theta = {k: torch.randn(2, 32, generator=g, dtype=torch.float64) * 10.0 for k in names}
    theta["fc.weight"][1] *= 3.0  # the later row is not the one divided by
    first = decoded_frame(FrameKind.PARAM_SKETCH, 12, theta, _info([10, 12]), frame_id=4)
    result = update_norms(first, StubHistory(updates))
    got = {(m.layer, m.name, m.step): m.value for m in result.metrics}
    for frame in updates:
        for i, step in enumerate(frame.row_steps):
            for layer in names:
                want = float(frame.tensors[layer][i].double().norm() / theta[layer][0].norm())
                assert got[(layer, UPDATE_RATIO, step)] == pytest.approx(want, rel=1e-12)
    assert not [k for k in got if k[1] == UPDATE_NORM]  # the update frames stored their norms
    assert len([k for k in got if k[1] == UPDATE_RATIO]) == 2 * 12
    later_theta = {k: v[:1] for k, v in theta.items()}
    later = decoded_frame(FrameKind.PARAM_SKETCH, 20, later_theta, _info([20]), frame_id=5)
    again = update_norms(later, StubHistory([*updates, first]))
    assert {m.name for m in again.metrics} == {PARAM_NORM}
    # a resumed run whose steps restarted: two update frames share steps 1-4; one value each
    # (the later frame's), or the results' unique index failed the theta frame's job for good
    resumed = decoded_frame(
        FrameKind.UPDATE_SKETCH,
        4,
        {k: torch.randn(4, 32, generator=g) for k in names},
        _info([1, 2, 3, 4]),
        frame_id=6,
    )
    twice = update_norms(first, StubHistory([*updates, resumed]))
    keys = [(m.layer, m.name, m.step) for m in twice.metrics]
    assert len(keys) == len(set(keys)) == len(got)
    step_one = next(
        m for m in twice.metrics if (m.layer, m.name, m.step) == (names[0], UPDATE_RATIO, 1)
    )
    assert step_one.value == pytest.approx(
        float(resumed.tensors[names[0]][0].double().norm() / theta[names[0]][0].norm())
    )
