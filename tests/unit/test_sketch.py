"""Count-sketch properties: pinned hash, linearity, reproducibility, norm preservation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from spectrawatch.sketch import (
    FusedCountSketch,
    SketchSpec,
    _hash_torch,
    count_sketch,
    count_sketch_signed,
    hash_coordinates,
    signed_buckets,
    sketch_tensor,
)


@pytest.mark.parametrize(
    ("n", "seed", "dim", "start"),
    [
        (1, 0, 640, 0),
        (10, 7, 3, 0),
        (2_500_003, 123, 640, 0),
        (1000, 2**31 - 1, 1280, 0),
        (5000, 9, 640, 2**32 - 2000),  # across the 2^32 wrap, a shard not starting at a row
    ],
)
def test_numpy_hash_path_is_identical_to_the_torch_recipe(
    n: int, seed: int, dim: int, start: int
) -> None:
    buckets, signs = hash_coordinates(n, seed, dim, start=start)
    ref_b, ref_s = _hash_torch(n, seed, dim, "cpu", start)
    assert buckets.dtype == torch.int64
    assert signs.dtype == torch.float32
    assert torch.equal(buckets, ref_b)
    assert torch.equal(signs, ref_s)


def test_hash_values_are_pinned() -> None:
    # Sketches stored by a run must stay comparable with the ones its client sends later: these
    # values must never change (a new recipe needs a new HASH_NAME). Independent check: the
    # recipe in pure Python integers, with MurmurHash3's finaliser written out.
    def fmix(h: int) -> int:
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    def mix(v: int, key: int) -> int:
        return fmix(((v & 0xFFFFFFFF) * 0x9E3779B1 & 0xFFFFFFFF) ^ key)

    seed, dim = 42, 640
    k_sign, k_rot = fmix(2 * seed + 1), fmix(2 * seed + 2)
    coords = [*range(50), 640 * 7 + 3, 2**32 - 1, 2**32 + 5, 10**11]
    for i in coords:
        buckets, signs = hash_coordinates(1, seed, dim, start=i)
        assert int(buckets[0]) == (i % dim + mix(i // dim, k_rot) % dim) % dim
        assert float(signs[0]) == (-1.0 if mix(i, k_sign) >> 31 else 1.0)
    buckets, signs = hash_coordinates(50, seed, dim)
    assert buckets[:4].tolist() == [174, 175, 176, 177]  # one row: consecutive, shifted
    assert signs[:8].tolist() == [float(1 - 2 * (mix(i, k_sign) >> 31)) for i in range(8)]


def test_coordinates_of_a_row_never_collide_and_rows_are_shifted_independently() -> None:
    dim = 640
    buckets, _ = hash_coordinates(dim * 400, 3, dim)
    rows = buckets.view(400, dim)
    assert all(sorted(r.tolist()) == list(range(dim)) for r in rows[:20])
    shifts = rows[:, 0]  # column 0's bucket is the row's shift
    assert len(set(shifts.tolist())) > 400 * 0.6  # ~ uniform over 640 (expected ~293 distinct)
    assert torch.equal(rows, (torch.arange(dim) + shifts[:, None]) % dim)


def test_seeded_reproducibility_and_seed_dependence() -> None:
    a = hash_coordinates(10_000, 5, 640)
    b = hash_coordinates(10_000, 5, 640)
    c = hash_coordinates(10_000, 6, 640)
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1])
    assert (a[0] == c[0]).float().mean() < 0.01  # ~1/640 agree by chance
    spec = SketchSpec(640, 3)
    assert spec.layer_seed("w") == SketchSpec(640, 3).layer_seed("w")
    assert spec.layer_seed("w") != spec.layer_seed("v")


def test_buckets_and_signs_are_balanced() -> None:
    buckets, signs = hash_coordinates(640_000, 1, 640)
    counts = torch.bincount(buckets, minlength=640).double()
    assert counts.min() > 1000 * 0.8  # expected 1000 each (std ~32)
    assert counts.max() < 1000 * 1.2
    assert abs(float(signs.mean())) < 0.01  # std of mean ~0.00125
    assert set(signs.unique().tolist()) == {-1.0, 1.0}


def test_signed_sketch_equals_reference_count_sketch() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100_003, generator=gen, dtype=torch.float64)
    buckets, signs = hash_coordinates(x.numel(), 9, 640)
    ref = count_sketch(x, buckets, signs, 640, torch.float64)
    folded = signed_buckets(x.numel(), 9, 640)
    assert folded.dtype == torch.int16  # 2 * 640 buckets fit: 2 bytes per cached coordinate
    out = count_sketch_signed(x, folded, 640, chunk=7_777)  # chunking must not matter
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    # and against a numpy scatter-add written independently
    np_ref = np.zeros(640)
    np.add.at(np_ref, buckets.numpy(), (signs.double() * x).numpy())
    np.testing.assert_allclose(out.numpy(), np_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("chunk", "private"), [(7_777, 1_000), (None, 4_096), (50_000, 1 << 16)])
def test_private_bucket_copies_give_the_same_sketch(chunk: int | None, private: int) -> None:
    """The GPU path (each block of coordinates adds into its own buckets) forced on the CPU."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(100_003, generator=gen, dtype=torch.float64)
    for dim in (640, 20_000):  # int16 and int32 index
        folded = signed_buckets(x.numel(), 9, dim)
        ref = count_sketch_signed(x, folded, dim, private=0)
        before = folded.clone()
        out = count_sketch_signed(x, folded, dim, chunk=chunk, private=private)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
        assert torch.equal(folded, before)  # the cached index is never modified


def _tensors(shapes: list[tuple[int, ...]], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dtypes = (torch.float32, torch.float64, torch.bfloat16)
    return [torch.randn(s, generator=gen).to(dtypes[i % 3]) for i, s in enumerate(shapes)]


@pytest.mark.parametrize(
    ("chunk", "private"),
    [(None, None), (1_000, 0), (777, 64), (50_000, 1_000), (1 << 20, 0), (4_096, 1 << 16)],
)
@pytest.mark.parametrize("dim", [64, 20_000])  # int16 and int32 index
def test_fused_sketch_equals_one_sketch_per_tensor(
    chunk: int | None, private: int | None, dim: int
) -> None:
    """Tensors larger than a chunk, many small ones sharing one, an empty one, mixed dtypes."""
    xs = _tensors([(300,), (1_000, 70), (5,), (0,), (123_457,), (10,), (3, 40)], 4)
    index = [signed_buckets(x.numel(), 7 + i, dim) for i, x in enumerate(xs)]
    folded = torch.cat(index)
    before = folded.clone()
    fused = FusedCountSketch([x.numel() for x in xs], dim, "cpu", chunk=chunk, private=private)
    out = fused(xs, folded)
    ref = torch.stack([count_sketch_signed(x, i, dim) for x, i in zip(xs, index, strict=True)])
    assert out.shape == (len(xs), dim)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
    assert not out[3].any()  # the empty tensor
    assert torch.equal(folded, before)
    torch.testing.assert_close(fused(xs, folded), out, rtol=0, atol=0)  # the plan is reusable


@pytest.mark.parametrize("workers", [2, 3, 64])
def test_cpu_sketch_split_over_threads_equals_one_thread(workers: int) -> None:
    """The CPU chunks summed by several pool threads (more than there are chunk pairs: capped)
    give the one-thread sums to rounding, the same bits on every call, with grad mode kept."""
    xs = _tensors([(300,), (1_000, 70), (5,), (0,), (123_457,), (10,), (3, 40)], 4)
    for x in xs:
        x.requires_grad_(True)
    index = [signed_buckets(x.numel(), 7 + i, 64) for i, x in enumerate(xs)]
    folded = torch.cat(index)
    numels = [x.numel() for x in xs]
    one = FusedCountSketch(numels, 64, "cpu", chunk=4_096, workers=1)
    many = FusedCountSketch(numels, 64, "cpu", chunk=4_096, workers=workers)
    assert len(many.chunks) == 48
    with torch.no_grad():  # the capture's mode; the pool threads must run in it too
        ref = one(xs, folded)
        out = many(xs, folded)
        again = many(xs, folded)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
    assert torch.equal(out, again)
    assert not out.requires_grad


def test_fused_sketch_past_int32_coordinates_switches_to_int64() -> None:
    """9,000 small tensors and one of two 2^20-coordinate blocks in one chunk put the virtual
    coordinates (blocks x 2^20) past 2^31: the index is int64, the sums the same."""
    numels = [3] * 9_000 + [(1 << 20) + 1]
    xs = _tensors([(n,) for n in numels], 5)
    index = [signed_buckets(n, i, 64) for i, n in enumerate(numels)]
    fused = FusedCountSketch(numels, 64, "cpu", chunk=1 << 21, private=1 << 20)
    assert len(fused.chunks) == 1
    assert fused.index_dtype == torch.int64
    out = fused(xs, torch.cat(index))
    ref = torch.stack([count_sketch_signed(x, i, 64) for x, i in zip(xs, index, strict=True)])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def test_wide_dims_use_an_int32_index() -> None:
    x = torch.randn(5000, dtype=torch.float64)
    folded = signed_buckets(5000, 2, 20_000)
    assert folded.dtype == torch.int32
    buckets, signs = hash_coordinates(5000, 2, 20_000)
    torch.testing.assert_close(
        count_sketch_signed(x, folded, 20_000),
        count_sketch(x, buckets, signs, 20_000, torch.float64),
        rtol=0,
        atol=1e-12,
    )


def test_linearity() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50_000, generator=gen, dtype=torch.float64)
    y = torch.randn(50_000, generator=gen, dtype=torch.float64)
    folded = signed_buckets(50_000, 4, 640)
    lhs = count_sketch_signed(2.5 * x - 0.75 * y, folded, 640)
    rhs = 2.5 * count_sketch_signed(x, folded, 640) - 0.75 * count_sketch_signed(y, folded, 640)
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-10)


def test_float64_theta_differencing_recovers_tiny_updates() -> None:
    # sketch(theta_t) - sketch(theta_s) = sketch(theta_t - theta_s) for updates 1e-6 of |theta|
    # (the client's per-step update path); float64 accumulation keeps ~1e-9 relative accuracy.
    gen = torch.Generator().manual_seed(2)
    theta = torch.randn(200_000, generator=gen)  # float32 parameters
    delta = 1e-6 * torch.randn(200_000, generator=gen)
    theta2 = theta + delta
    exact_delta = theta2.double() - theta.double()  # what float32 actually stored
    folded = signed_buckets(200_000, 8, 640)
    diff = count_sketch_signed(theta2, folded, 640) - count_sketch_signed(theta, folded, 640)
    ref = count_sketch_signed(exact_delta, folded, 640)
    rel = float((diff - ref).norm() / ref.norm())
    assert rel < 1e-8


def test_norm_preservation_within_stated_tolerance() -> None:
    # E||Sx||^2 = ||x||^2; for a dense random x the relative spread is ~sqrt(2/d) = 5.6 % at
    # d = 640. Stated tolerance: each of 20 seeds within 25 % (> 4 sigma), their mean within 3 %.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(100_000, generator=gen, dtype=torch.float64)
    ratios = []
    for seed in range(20):
        folded = signed_buckets(x.numel(), seed, 640)
        ratios.append(float(count_sketch_signed(x, folded, 640).norm() ** 2 / x.norm() ** 2))
    assert all(0.75 < r < 1.25 for r in ratios)
    assert abs(np.mean(ratios) - 1.0) < 0.03


def test_inner_products_are_preserved_in_expectation() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(20_000, generator=gen, dtype=torch.float64)
    y = 0.6 * x + 0.8 * torch.randn(20_000, generator=gen, dtype=torch.float64)
    true = float(x @ y)
    est = []
    for seed in range(30):
        folded = signed_buckets(x.numel(), seed, 640)
        est.append(float(count_sketch_signed(x, folded, 640) @ count_sketch_signed(y, folded, 640)))
    # std of one estimate ~ sqrt((|x|^2|y|^2 + <x,y>^2)/d) ~ 0.046 |x||y|; mean of 30 ~ 0.0085
    assert abs(np.mean(est) - true) < 0.04 * float(x.norm() * y.norm())


def test_sketch_tensor_uses_the_layer_seed() -> None:
    spec = SketchSpec(64, 11)
    w = torch.randn(30, 40)
    out = sketch_tensor(w, spec, "layer.weight")
    buckets, signs = hash_coordinates(w.numel(), spec.layer_seed("layer.weight"), 64)
    torch.testing.assert_close(out, count_sketch(w.reshape(-1), buckets, signs, 64))


def test_shard_offsets_sum_to_the_full_sketch() -> None:
    """The index of a shard at global offset ``start`` is the full index's slice, so the sum of
    the shards' sketches is the full tensor's sketch (what FSDP capture all-reduces)."""
    n, seed, dim = 3 * (1 << 20) + 17, 5, 640  # shards cross the 2^20 hashing chunk
    full = signed_buckets(n, seed, dim)
    cuts = [0, 1000, (1 << 20) + 3, 2 * (1 << 20) + 11, n]
    for lo, hi in itertools.pairwise(cuts):
        assert torch.equal(signed_buckets(hi - lo, seed, dim, start=lo), full[lo:hi])
    x = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    parts = sum(
        count_sketch_signed(x[lo:hi], signed_buckets(hi - lo, seed, dim, start=lo), dim)
        for lo, hi in itertools.pairwise(cuts)
    )
    torch.testing.assert_close(parts, count_sketch_signed(x, full, dim), rtol=0, atol=1e-9)
