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
