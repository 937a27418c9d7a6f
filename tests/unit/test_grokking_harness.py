"""``benchmarks/grokking.py`` end to end on a short run: it trains, records every series the
report reads (HT-SR per matrix included) and scores every rule, as the grid does."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from spectrawatch.spectral import grokking as gk
from spectrawatch.spectral import htsr

HARNESS = Path(__file__).resolve().parents[2] / "benchmarks" / "grokking.py"


@pytest.fixture(scope="module")
def harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("grokking_harness", HARNESS)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_a_short_run_records_and_scores_every_series(harness: ModuleType, tmp_path: Path) -> None:
    spec = harness.RunSpec(op="add", steps=200, seed=0)
    out = tmp_path / f"{spec.name}.npz"
    harness.train_run(spec, out)
    z = np.load(out)
    assert harness.is_done(out)
    assert list(z["eval_step"]) == [0, 100, 200]
    mats = [str(m) for m in z["mats"]]
    keys = [str(k) for k in z["htsr_keys"]]
    assert z["htsr"].shape == (3, len(mats), len(harness.HTSR_KEYS))
    head = z["htsr"][-1, mats.index("head.weight")]
    assert 1.0 < head[keys.index(htsr.ALPHA)] < 20.0
    assert np.isnan(z["htsr"][:, mats.index("pos.weight")]).all()  # 3 x 128: size filter
    row = harness.score_run(z, gk.DetectorConfig(), per_step=True)
    assert set(row["warn"]) == set(harness.RULES)
    assert row["status"] == "no grok by horizon"  # a+b with weight decay, 200 steps
    assert row["first"] == 0
    train = z["train_acc"]
    expect = next((int(s) for s, a in zip(z["eval_step"], train, strict=True) if a >= 0.99), None)
    assert row["memorised"] == expect
    if expect is not None:
        assert row["val_at_memorised"] == z["val_acc"][list(z["eval_step"]).index(expect)]
    alpha = harness.run_series(z)["alpha"]
    assert "pos.weight" not in alpha
    assert len(alpha["head.weight"]) == 3
    # label-free held-out predictions and the probe's gradient cosine are recorded per evaluation
    assert z["pred_va"].shape == (3, len(harness.make_data(97, 0.3, 0, harness.OPS["add"])[3]))
    assert np.all((z["grad_cos"] >= -1.0) & (z["grad_cos"] <= 1.0))
    assert harness.agreement_series(z) == []  # 4 evaluations needed, 3 recorded
    # held-out confidence: per input (float16) and its mean; a 512-input probe is a subset mean
    top = z["top_va"].astype(np.float64)
    assert top.shape == z["pred_va"].shape
    np.testing.assert_allclose(top.mean(1), z["conf_va"], atol=1e-3)
    probe = harness.confidence_series(z, 512)
    assert [s for s, _ in probe] == [0, 100, 200]
    pick = harness._probe_pick(top.shape[1], 512).numpy()
    np.testing.assert_allclose([v for _, v in probe], top[:, pick].mean(1))


def test_the_mlp_regime_trains_and_its_output_layer_is_read(
    harness: ModuleType, tmp_path: Path
) -> None:
    assert harness.RunSpec().name == "mb2_add_p97_f0.3_wd1_s0"  # names of recorded runs kept
    specs = list(harness.grid_specs([4], {"mlp": 8000}, (3,)))
    assert len(specs) == 12
    assert {(s.frac, s.lr) for s in specs} == {(0.3, 3e-3), (0.5, 1e-3)}
    assert len({s.name for s in specs}) == 12
    spec = harness.RunSpec(regime="mlp", op="sub", frac=0.5, lr=3e-3, steps=100, seed=1)
    assert spec.name == "mlp_sub_p97_f0.5_wd1_lr0.003_s1"
    out = tmp_path / f"{spec.name}.npz"
    harness.train_run(spec, out)
    z = np.load(out)
    assert [str(m) for m in z["mats"]] == ["tok.weight", "fc.weight", "head.weight"]
    rank = harness.output_rank_series(z)
    assert [s for s, _ in rank] == [0, 100]
    np.testing.assert_array_equal([v for _, v in rank], z["erank"][:, 2])
    assert 1.0 < rank[0][1] <= 97.0
    assert harness.score_run(z, gk.DetectorConfig(), per_step=True)["status"] == (
        "no grok by horizon"
    )


def test_aggregate_counts_the_runs_that_allow_the_target_lead(harness: ModuleType) -> None:
    def row(status: str, grok: int | None, mem: tuple[int, float], warn: int | None) -> dict:
        return {
            "status": status,
            "grok": grok,
            "memorised": mem[0],
            "val_at_memorised": mem[1],
            "first": 0,
            "warn": {"r": warn},
        }

    rows = [
        row("grok", 3300, (400, 0.01), 2700),  # lead 600 after a plateau: a hit everywhere
        row("grok", 400, (400, 0.9), None),  # generalises as it memorises: no rule can lead 600
        row("grok", 1000, (600, 0.05), 500),  # lead 500; delayed by only 400 steps
        row("grok", 1800, (300, 0.4), 1200),  # lead 600, but already generalising: not delayed
        row("control", None, (300, 0.01), 100),
        row("control", None, (300, 0.01), None),
        row("grok", 4100, (300, 0.46), 2300),  # val_acc 0.46 at memorisation, all of it mirrored
    ]
    rows[-1]["off_mirror_at_memorised"] = 0.0
    assert [harness.attainable(r) for r in rows[:4]] == [True, False, True, True]
    assert [harness.delayed(r) for r in rows[:4]] == [True, False, False, False]
    assert harness.delayed(rows[-1])
    assert not harness.delayed(rows[-1], mirror=False)
    cells = [c.strip() for c in harness._aggregate(rows, "r").split("|")]
    assert cells == ["600", "500", "4/5", "1", "3/5", "3/4", "2/2", "1/1", "1/2"]


def test_mirrored_held_out_inputs_are_told_apart(harness: ModuleType) -> None:
    spec = {"p": 13, "frac": 0.5, "seed": 3, "op": "add"}
    x_tr, _, x_va, y_va = harness.make_data(13, 0.5, 3, harness.OPS["add"])
    mask = harness.mirror_mask(spec)
    assert mask.shape == (len(x_va),)
    train = {(int(a), int(b)) for a, b, _ in x_tr}
    for (a, b, _), mirrored in zip(x_va.tolist(), mask, strict=True):
        assert mirrored == ((b, a) in train)
    assert 0.3 < mask.mean() < 0.7
    # right on every mirrored input by symmetry, wrong on the rest: 0 off the mirror
    symmetric = np.where(mask, y_va.numpy(), (y_va.numpy() + 1) % 13)
    assert harness.off_mirror_accuracy(spec, symmetric) == 0.0
    assert harness.off_mirror_accuracy(spec, y_va.numpy()) == 1.0
