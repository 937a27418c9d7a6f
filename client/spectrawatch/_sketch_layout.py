"""The sketched parameters of a capture and the rows they make.

The parameters sketched are the model's trainable, materialised, real ones; each is one row of
a sketch matrix, or, past what a frame carries, its module prefix's group is
(:mod:`spectrawatch._row_groups`), and ``__model__`` is the last row. A cheap per-step look
(torch's global registration hooks, shapes and ``requires_grad`` flags) says when the layout may
have changed after ``attach``.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from spectrawatch import _shards
from spectrawatch._model import _STRUCTURE, _watch_structure
from spectrawatch._row_groups import RowGroups, prefix_groups
from spectrawatch._sender import ClientStats, ErrorLog
from spectrawatch._weights import _MAX_TENSORS
from spectrawatch.config import ClientSettings
from spectrawatch.wire import MODEL_LAYER as MODEL_KEY

# the model's parameters, their shapes and requires_grad flags, as last looked at, and its
# lazy parameters (nn.LazyLinear's before its first forward: no shape yet)
_Watch = tuple[list[nn.Parameter], tuple[torch.Size, ...], tuple[bool, ...], list[nn.Parameter]]
_SHAPE = attrgetter("shape")
_REQUIRES_GRAD = attrgetter("requires_grad")


class SketchLayout:
    """The parameters one capture sketches (``layers``, in order), their local shards and the
    row names and ``info["layers"]`` of its sketch frames."""

    def __init__(
        self, model: nn.Module, settings: ClientSettings, errors: ErrorLog, stats: ClientStats
    ) -> None:
        self.model = model
        self.s = settings
        self.errors = errors
        self.stats = stats
        self.layers: list[tuple[str, nn.Parameter]] = []
        # per layer: (global flat offset of the local shard, its numel, whether it is summed)
        self.shard_of: dict[str, tuple[int, int, bool]] = {}
        self.layer_info: dict[str, dict[str, Any]] = {}
        self._layout: tuple[tuple[str, int, tuple[int, ...]], ...] = ()
        _watch_structure()
        self._structure = _STRUCTURE[0]
        self._watch = self.watched()
        self.set_layers(self.trained())

    def trained(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters sketched: trainable, materialised (a lazy module's parameters have no
        shape before its first forward; they join once they have one) and real (a real sketch
        of a complex parameter would drop its imaginary part; they are left out, said once)."""
        trained = [
            (name, p)
            for name, p in self.model.named_parameters()
            if p.requires_grad and not is_lazy(p)
        ]
        real = [(name, p) for name, p in trained if not p.is_complex()]
        if len(real) < len(trained) and not self._layout:  # said once, at attach
            skipped = ", ".join(name for name, p in trained if p.is_complex())
            self.errors.record(
                "update sketch", TypeError(f"complex parameters not sketched: {skipped}")
            )
        return real

    def watched(self) -> _Watch:
        params = list(self.model.parameters())
        lazy = [p for p in params if is_lazy(p)]
        if lazy:
            params = [p for p in params if not is_lazy(p)]
        return params, tuple(map(_SHAPE, params)), tuple(map(_REQUIRES_GRAD, params)), lazy

    def may_have_changed(self) -> bool:
        """Cheap, every step (~35 us for 150 parameters on a 2-core box; the loops are C's
        ``map``, a generator was ~60 us): a parameter or module registered anywhere since the last
        look (torch's global registration hooks), or one of the model's parameters with another
        shape or ``requires_grad``, or a lazy one materialised (``materialize()`` gives a
        parameter its shape in place, without a registration hook)."""
        if _STRUCTURE[0] != self._structure:
            return True
        params, shapes, trained, lazy = self._watch
        if lazy and not all(map(is_lazy, lazy)):
            return True
        return tuple(map(_REQUIRES_GRAD, params)) != trained or tuple(map(_SHAPE, params)) != shapes

    @staticmethod
    def layout_of(
        layers: list[tuple[str, nn.Parameter]],
    ) -> tuple[tuple[str, int, tuple[int, ...]], ...]:
        return tuple((name, id(p), tuple(p.shape)) for name, p in layers)

    def set_layers(self, layers: list[tuple[str, nn.Parameter]]) -> None:
        self.layers = layers
        self.params: list[torch.Tensor] = [p for _, p in layers]
        self._layout = self.layout_of(layers)
        self.shard_of = {}
        for name, p in layers:
            local, start, contributes = _shards.local_shard(p.detach())
            self.shard_of[name] = (start, local.numel(), contributes)
        self.layer_info = {name: {"numel": p.numel(), "shape": list(p.shape)} for name, p in layers}
        self._set_row_groups(layers)

    def relayout(self, layers: list[tuple[str, nn.Parameter]]) -> set[str]:
        """Apply ``layers`` (:meth:`set_layers`); return the row names whose theta sketches are
        not comparable with the rows of the same name before: ``__model__`` (a sum over another
        set), a parameter new to the rows or another one under its name (replaced, resized),
        and every row where either layout groups its rows (a group's members may differ)."""
        before = {name: (ident, shape) for name, ident, shape in self._layout}
        grouped = self._groups is not None
        self.set_layers(layers)
        if grouped or self._groups is not None:
            return set(self.row_names)
        changed = {
            name for name, ident, shape in self._layout if before.get(name) != (ident, shape)
        }
        return {*changed, MODEL_KEY}

    def _set_row_groups(self, layers: list[tuple[str, nn.Parameter]]) -> None:
        """Rows per module prefix when the trained tensors (plus ``__model__``) are more than a
        frame carries (:mod:`spectrawatch._row_groups`); exact mode sends every tensor."""
        groups = None if self.s.exact else prefix_groups([n for n, _ in layers], _MAX_TENSORS - 1)
        self._groups: RowGroups | None = groups
        self._group_index: dict[torch.device, torch.Tensor] = {}
        if groups is None:
            return
        numel = [0] * len(groups.names)
        for (_, p), g in zip(layers, groups.member_of, strict=True):
            numel[g] += p.numel()
        self.layer_info = {
            name: {"numel": n, "shape": [n], "tensors": k}
            for name, n, k in zip(groups.names, numel, groups.sizes(), strict=True)
        }
        self.stats.set("row_groups", len(groups.names))
        self.errors.note(
            "row groups",
            f"{len(layers)} trained tensors are more than a frame carries ({_MAX_TENSORS - 1} "
            f"rows and __model__): update and theta sketches are sent as {len(groups.names)} "
            f"rows, one per group of tensors (e.g. {groups.names[0]!r})",
        )

    def grouped(self, rows: torch.Tensor) -> torch.Tensor:
        """A sketch matrix ``(L + 1, d)`` summed into its groups' rows ``(G + 1, d)`` (on the
        current stream); ``rows`` itself where there are no groups."""
        groups = self._groups
        if groups is None:
            return rows
        index = self._group_index.get(rows.device)
        if index is None:
            member_of = [*groups.member_of, len(groups.names)]  # __model__ stays itself
            index = torch.tensor(member_of, dtype=torch.int64, device=rows.device)
            self._group_index[rows.device] = index
        out = rows.new_zeros((len(groups.names) + 1, rows.shape[1]))
        return out.index_add_(0, index, rows)

    def changed(self) -> list[tuple[str, nn.Parameter]] | None:
        """After :meth:`may_have_changed`: look again; the trained parameters when they are
        another set than ``layers`` (not applied: see :meth:`set_layers`), else None."""
        self._structure = _STRUCTURE[0]
        self._watch = self.watched()
        layers = self.trained()
        if self.layout_of(layers) == self._layout:
            return None
        return layers

    @property
    def row_names(self) -> list[str]:
        """Names of the rows of a sketch matrix (``Capture._sketch_all``): layers or their groups,
        then ``__model__``."""
        names = self._groups.names if self._groups is not None else [n for n, _ in self.layers]
        return [*names, MODEL_KEY]
