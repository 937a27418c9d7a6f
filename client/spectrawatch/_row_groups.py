"""Sketch rows per module prefix, for models with more trained tensors than a frame carries.

A frame holds at most ``FrameLimits.max_tensors`` tensors (4,096 by default), and update and
theta frames carry one row per trained tensor plus ``__model__``. A model past that (a
fine-grained mixture of experts: 48 layers x 128 experts x 3 matrices is 18,432 tensors) sends
one row per *group* of tensors instead: the sum of its members' rows. Each layer is hashed with
its own seed, so that sum is itself a count-sketch of the group's concatenated update (as
``__model__`` is of the whole model's), and SED of a group is SED of that block of parameters.
Groups are the tensors' name prefixes at the deepest dotted level that gives few enough of them
(``layers.3.mlp.experts.17.w1.weight`` -> ``layers.3.mlp.experts``); where even the top level
gives too many (a flat ``ParameterList``), runs of consecutive tensors, named ``first+N``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RowGroups:
    """``names[g]`` is group g; ``member_of[i]`` the group of tensor i (in the given order)."""

    names: list[str]
    member_of: list[int]

    def sizes(self) -> list[int]:
        """How many tensors each group holds."""
        counts = [0] * len(self.names)
        for g in self.member_of:
            counts[g] += 1
        return counts


def prefix_groups(names: Sequence[str], limit: int) -> RowGroups | None:
    """Groups of ``names`` (dotted tensor names) that number at most ``limit``; None when the
    names themselves are few enough. Groups keep the order in which their first member comes."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if len(names) <= limit:
        return None
    parts = [name.split(".") for name in names]
    for depth in range(max(map(len, parts)) - 1, 0, -1):
        keys = [".".join(p[:depth]) for p in parts]
        order = list(dict.fromkeys(keys))
        if len(order) <= limit:
            index = {key: g for g, key in enumerate(order)}
            return RowGroups(order, [index[key] for key in keys])
    size = math.ceil(len(names) / limit)  # consecutive runs of `size` tensors
    starts = range(0, len(names), size)
    labels = [f"{names[s]}+{min(size, len(names) - s) - 1}" for s in starts]
    return RowGroups(labels, [i // size for i in range(len(names))])
