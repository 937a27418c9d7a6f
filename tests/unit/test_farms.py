"""FARMS window sampling against a direct port of the authors' loop, and the bias it removes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectrawatch.spectral import farms, htsr
from spectrawatch.spectral.farms import FARMS_CV, FARMS_LLM, FarmsConfig


def _reference_windows(w: torch.Tensor, cfg: FarmsConfig) -> list[torch.Tensor]:
    """``fixed_sampling`` of HUST-AI-HYZ/FARMS (LLM_Pruning/lib/sampling.py), as loops."""
    rows, cols = w.shape
    r = min(cfg.window_rows, min(rows, cols))
    c = int(r * cfg.aspect_ratio)
    ops = cfg.windows_per_dim
    row_step = max(1, (rows - r) // (ops - 1))
    col_step = max(1, (cols - c) // (ops - 1))
    n_r = min(ops, max(1, (rows - r) // row_step + 1))
    n_c = min(ops, max(1, (cols - c) // col_step + 1))
    out = []
    for i in range(n_r):
        for j in range(n_c):
            rs = min(i * row_step, rows - r)
            cs = min(j * col_step, cols - c)
            out.append(w[rs : rs + r, cs : cs + c])
    return out


@pytest.mark.parametrize(
    ("shape", "cfg", "rows", "cols"),
    [
        ((768, 3072), FARMS_CV, list(range(0, 665, 83)), list(range(0, 2969, 371))),
        ((768, 3072), FARMS_LLM, [0], list(range(0, 2305, 256))),
        ((50, 30), FARMS_CV, list(range(0, 17, 2)), [0]),
        ((105, 400), FARMS_CV, list(range(6)), list(range(0, 297, 37))),
    ],
)
def test_window_starts(
    shape: tuple[int, int], cfg: FarmsConfig, rows: list[int], cols: list[int]
) -> None:
    rs, cs = farms.window_starts(*shape, cfg)
    assert rs.tolist() == rows
    assert cs.tolist() == cols


@pytest.mark.parametrize(
    ("shape", "cfg"),
    [
        ((300, 170), FARMS_CV),
        ((170, 300), FarmsConfig(window_rows=40, aspect_ratio=2.0, windows_per_dim=4)),
        ((64, 64), FARMS_LLM),
        ((20, 500), FarmsConfig(window_rows=100, aspect_ratio=1.0, windows_per_dim=3)),
    ],
)
def test_windows_and_pooled_esd_match_reference_loop(
    shape: tuple[int, int], cfg: FarmsConfig
) -> None:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = _reference_windows(w, cfg)
    win = farms.sample_windows(w, cfg)
    assert win.shape == (len(ref), *ref[0].shape)
    for a, b in zip(win, ref, strict=True):
        assert torch.equal(a, b)
    pooled = np.sort(np.concatenate([np.linalg.svd(b.numpy(), compute_uv=False) ** 2 for b in ref]))
    esd = farms.farms_esd(w, cfg)
    np.testing.assert_allclose(esd.numpy(), pooled, rtol=0, atol=1e-12 * pooled.max())


def test_wide_window_is_clipped_to_the_matrix() -> None:
    cfg = FarmsConfig(window_rows=50, aspect_ratio=4.0, windows_per_dim=3)
    assert farms.window_shape(100, 120, cfg) == (50, 120)
    assert farms.sample_windows(torch.zeros(100, 120), cfg).shape == (3, 50, 120)


def test_invalid_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="invalid FARMS"):
        FarmsConfig(window_rows=0)


SHAPES = [(768, 768), (3072, 768), (768, 3072), (2304, 768), (4096, 1024)]


@pytest.mark.slow
def test_farms_removes_aspect_ratio_bias_of_gaussian_matrices() -> None:
    """i.i.d. Gaussian weights of GPT-2-like shapes (Q = 1, 4, 4, 3, 4): the median-xmin Hill
    alpha of the full ESD follows the Marchenko-Pastur shape (2.12 at Q=1, 3.45 at Q=4), so it
    spreads by > 1.0 across shapes; on FARMS's 100 x 100 windows every shape gives the Q=1 value
    and the spread is < 5 % of the plain one (measured: ~1.3 vs ~0.02)."""
    _assert_bias_removed(SHAPES)


def test_farms_removes_aspect_ratio_bias_quarter_size() -> None:
    """The same at a quarter of each dimension (fast; min dim 192 still exceeds the window)."""
    _assert_bias_removed([(r // 4, c // 4) for r, c in SHAPES])


def _assert_bias_removed(shapes: list[tuple[int, int]]) -> None:
    gen = torch.Generator().manual_seed(1)
    weights = {f"w{i}": torch.randn(*s, generator=gen) for i, s in enumerate(shapes)}
    report = htsr.analyze_weights(weights, farms=FARMS_CV, mp_fit=False)
    plain = [layer.plain.alpha_hill for layer in report.layers]
    farmed = [layer.farms.alpha_hill for layer in report.layers if layer.farms is not None]
    assert len(farmed) == len(shapes)
    plain_spread = max(plain) - min(plain)
    farms_spread = max(farmed) - min(farmed)
    assert plain_spread > 1.0
    assert farms_spread < 0.05 * plain_spread
    assert plain[0] == pytest.approx(2.12, abs=0.05)
    assert plain[1] == pytest.approx(3.45, abs=0.08)
    for a in farmed:
        assert a == pytest.approx(2.12, abs=0.08)


def test_farms_still_sees_heavy_tails() -> None:
    """Student-t(2) entries (tail index mu = 2, HT-SR ESD exponent ~1 + mu/2 = 2 in the large-size
    limit) give a FARMS KS alpha below 3 (measured 2.46), while Gaussian entries give a spurious,
    large one (> 6, "under-trained"; measured 52)."""
    rng = np.random.default_rng(2)
    heavy = torch.from_numpy(rng.standard_t(2.0, (400, 1200)))
    gauss = torch.from_numpy(rng.standard_normal((400, 1200)))
    assert htsr.fit_power_law(farms.farms_esd(heavy)).alpha < 3.0
    assert htsr.fit_power_law(farms.farms_esd(gauss)).alpha > 6.0


def test_layers_narrower_than_the_minimum_window_get_no_farms() -> None:
    """A 10-class head's 10 x 10 windows have no tail to fit (FARMS alpha ~16 where the plain
    one is ~3): FARMS needs windows of at least MIN_WINDOW rows."""
    gen = torch.Generator().manual_seed(3)
    weights = {
        "head": torch.randn(10, 128, generator=gen),
        "ok": torch.randn(32, 128, generator=gen),
    }
    assert not farms.applies(10, 128, FARMS_CV)
    assert farms.applies(farms.MIN_WINDOW, 128, FARMS_CV)
    report = htsr.analyze_weights(weights, farms=FARMS_CV, mp_fit=False)
    by_name = {layer.layer: layer for layer in report.layers}
    assert by_name["head"].farms is None
    assert by_name["ok"].farms is not None
    summary = report.summary()
    assert summary[htsr.farms_key(htsr.ALPHA)] == by_name["ok"].farms.alpha  # FARMS layers only
    assert summary[htsr.ALPHA] == pytest.approx(
        (by_name["head"].plain.alpha + by_name["ok"].plain.alpha) / 2
    )
