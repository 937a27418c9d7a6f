"""The user's model, as the captures see it: unwrapped from DDP and ``torch.compile``,
called on a batch, its output layer, and a process-wide count of parameter and submodule
registrations (torch's global hooks) that tells a capture its layout may have changed."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.nn.parameter import is_lazy


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    for _ in range(4):
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and type(model).__name__ in (
            "DistributedDataParallel",
            "DataParallel",
        ):
            model = inner
            continue
        break
    return model


def output_layer(model: nn.Module) -> str | None:
    """Name of the weight that maps features to the model's outputs: that of the module a
    Hugging Face model's ``get_output_embeddings()`` returns, else the last parameter of >= 2
    dimensions in registration order (where PyTorch models define their head).

    A tied weight (``head.weight = emb.weight``) is registered twice but named once, by its
    first registration (``emb.weight``): the last registration is looked for among all of them
    and named as :meth:`~torch.nn.Module.named_parameters` names it (the de-duplicated list put
    the tied head first and picked the last other matrix, a hidden layer)."""
    params = list(model.named_parameters())
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        with contextlib.suppress(Exception):  # a model's own method: whatever it raises
            weight = getattr(get(), "weight", None)
            named = next((name for name, p in params if p is weight), None)
            if named is not None:
                return named
    registered = model.named_parameters(remove_duplicate=False)
    last = next((p for _, p in reversed(list(registered)) if not is_lazy(p) and p.dim() >= 2), None)
    return next((name for name, p in params if p is last), None)


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(batch)``, ``model(*batch)`` for tuples/lists, ``model(**batch)`` for mappings."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _rng_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


_STRUCTURE = [0]  # bumped whenever any module registers a parameter or a submodule
_STRUCTURE_HOOKS: list[Any] = []


def _bump_structure(*_: Any) -> None:
    _STRUCTURE[0] += 1


def _watch_structure() -> None:
    """Install torch's global registration hooks once (they cost one call per registration)."""
    if not _STRUCTURE_HOOKS:
        from torch.nn.modules import module as torch_module

        _STRUCTURE_HOOKS.append(
            torch_module.register_module_parameter_registration_hook(_bump_structure)
        )
        _STRUCTURE_HOOKS.append(
            torch_module.register_module_module_registration_hook(_bump_structure)
        )
