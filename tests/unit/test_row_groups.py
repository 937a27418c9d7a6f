"""Sketch rows per module prefix (``spectrawatch._row_groups``)."""

from __future__ import annotations

import pytest

from spectrawatch._row_groups import prefix_groups


def test_names_few_enough_are_not_grouped() -> None:
    assert prefix_groups(["a.weight", "a.bias"], 2) is None
    with pytest.raises(ValueError, match="limit"):
        prefix_groups(["a"], 0)


def test_groups_are_the_deepest_prefixes_that_are_few_enough() -> None:
    names = [
        f"layers.{i}.experts.{e}.{w}.weight" for i in range(2) for e in range(3) for w in "uvw"
    ]
    names.insert(0, "embed.weight")
    groups = prefix_groups(names, 7)  # 19 tensors; experts: 6 groups, + embed.weight
    assert groups is not None
    assert groups.names == ["embed.weight"] + [
        f"layers.{i}.experts.{e}" for i in range(2) for e in range(3)
    ]
    assert groups.member_of == [0] + [1 + k // 3 for k in range(18)]
    assert groups.sizes() == [1] + [3] * 6
    coarser = prefix_groups(names, 6)  # one level up: layers.0.experts, layers.1.experts
    assert coarser is not None
    assert coarser.names == ["embed.weight", "layers.0.experts", "layers.1.experts"]


def test_flat_names_too_many_at_the_top_level_are_cut_into_runs() -> None:
    names = [str(i) for i in range(10)]  # an nn.ParameterList
    groups = prefix_groups(names, 4)
    assert groups is not None
    assert groups.names == ["0+2", "3+2", "6+2", "9+0"]
    assert groups.sizes() == [3, 3, 3, 1]
