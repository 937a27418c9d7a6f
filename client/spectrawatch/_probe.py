"""The probe capture: activations of the probed modules over a fixed probe batch, and the
confidence, churn and agreement of its predictions.

Forward hooks on the probe modules over the probe batch, in eval mode under
``torch.no_grad()`` with the RNG forked; every module's train flag is restored and hooks
removed. For compiled models the probe runs the original (eager) module, so the compiled
graph never sees a hook.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from spectrawatch import wire
from spectrawatch._model import _rng_devices, call_model
from spectrawatch._sender import FrameItem
from spectrawatch.config import ClientSettings
from spectrawatch.spectral.grokking import (
    AGREEMENT_WINDOW,
    PREDICTION_AGREEMENT,
    PREDICTION_CHURN,
    PREDICTION_CONFIDENCE,
    PREDICTION_POSITIONS,
    confidence_of,
    prediction_agreement,
    predictions_of,
)

logger = logging.getLogger("spectrawatch")

# the name of the model itself among the probed modules (a model that is one Linear or Conv):
# its ``named_modules()`` name is "", which a frame cannot carry as a tensor name
ROOT_MODULE = "(model)"


class ProbeCapture:
    """Runs the probe batch through one model and emits its activations and prediction
    scalars (at most once per step)."""

    def __init__(
        self,
        model: nn.Module,
        probe: Any,
        modules: Iterable[str | nn.Module] | None,
        settings: ClientSettings,
        emit_frame: Callable[[FrameItem], None],
        emit_scalars: Callable[[list[dict[str, Any]]], None],
        *,
        emits: bool,
    ) -> None:
        self.model = model
        self.probe = probe
        self.s = settings
        self.emit_frame = emit_frame
        self.emit_scalars = emit_scalars
        self.emits = emits  # False: a non-zero rank, which runs the forward and sends nothing
        self._modules_arg = list(modules) if modules is not None else None
        self._predictions: deque[torch.Tensor] = deque(maxlen=AGREEMENT_WINDOW)  # probe argmax
        self._last_activations_step: int | None = None
        self._silent_checked = False  # named modules that gave nothing: said once

    def _probe_modules(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of the probed modules; the model itself is named ``ROOT_MODULE``."""
        return [(name or ROOT_MODULE, m) for name, m in self._named_probe_modules()]

    def _named_probe_modules(self) -> list[tuple[str, nn.Module]]:
        named = dict(self.model.named_modules())
        if self._modules_arg is not None:
            by_id = {id(m): name for name, m in named.items()}
            out = []
            for m in self._modules_arg:
                if isinstance(m, str):
                    out.append((m, named[m]))
                else:
                    out.append((by_id[id(m)], m))
            return out
        out = []
        for name, m in named.items():
            width = None
            if isinstance(m, nn.Linear):
                width = m.out_features
            elif isinstance(m, _ConvNd):  # Conv1d/2d/3d and their transposes
                width = m.out_channels
            elif type(m).__name__ == "Conv1D" and isinstance(getattr(m, "nf", None), int):
                width = m.nf  # Hugging Face's GPT-2-style linear layer (weight: in x out)
            if width is not None and width <= self.s.max_activation_hidden:
                out.append((name, m))
        return out

    @torch.no_grad()
    def capture_activations(self, n: int) -> None:
        """X ``(tokens, hidden)`` per probe module, or its Gram ``XᵀX`` when that is smaller."""
        if self._last_activations_step == n:
            return
        self._last_activations_step = n
        captured: dict[str, torch.Tensor] = {}
        tokens: dict[str, int] = {}
        gram: list[str] = []

        def make_hook(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, inputs: Any, output: Any) -> None:
                t = output[0] if isinstance(output, (tuple, list)) else output
                if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2):
                    return
                if t.numel() == 0:  # a zero-width layer (or no tokens): no spectrum to send
                    return
                if channels_first(module):  # (N, C, *spatial): features last, one row a site
                    t = t.movedim(1, -1)
                x = t.detach().reshape(-1, t.shape[-1]).to(torch.float32)
                tokens[name] = int(x.shape[0])
                if x.shape[0] > x.shape[1]:
                    captured[name] = (x.T @ x).to("cpu")
                    gram.append(name)
                else:
                    captured[name] = x.to("cpu", copy=True)

            return hook

        modes = [(m, m.training) for m in self.model.modules()]
        handles = []
        try:
            self.model.eval()
            probed = self._probe_modules() if self.emits else []  # other ranks: forward only
            handles = [m.register_forward_hook(make_hook(name)) for name, m in probed]
            with torch.random.fork_rng(devices=_rng_devices(self.model)):
                output = call_model(self.model, self.probe)
        finally:
            for h in handles:
                h.remove()
            for m, was in modes:
                m.training = was
        if self.emits:
            self._prediction_scalars(n, predictions_of(output), confidence_of(output))
            self._warn_silent(probed, captured)
        if captured:
            info = {"gram": gram, "tokens": tokens}
            self.emit_frame(FrameItem(wire.FrameKind.ACTIVATIONS, n, captured, info, compress=True))

    def _warn_silent(
        self, probed: list[tuple[str, nn.Module]], captured: dict[str, torch.Tensor]
    ) -> None:
        """After the first probe pass, name the modules asked for by ``modules=`` that gave no
        activations: their forward never ran (``nn.MultiheadAttention`` uses its ``out_proj``'s
        weights without calling it) or returned no floating tensor of 2 or more dims."""
        if self._silent_checked or self._modules_arg is None:
            return
        self._silent_checked = True
        silent = [name for name, _ in probed if name not in captured]
        if silent:
            logger.warning(
                "spectrawatch: probe modules %s gave no activations in the probe pass (forward "
                "not called, or no floating output of >= 2 dims): no activation metrics for them",
                ", ".join(repr(n) for n in silent[:10]) + (" ..." if len(silent) > 10 else ""),
            )

    def _prediction_scalars(
        self, n: int, pred: torch.Tensor | None, confidence: float | None
    ) -> None:
        """Confidence (mean largest softmax probability), churn and agreement of the probe
        batch's predictions, sent as one batch of scalars."""
        rows = (
            []
            if confidence is None
            else [{"step": n, "name": PREDICTION_CONFIDENCE, "value": confidence}]
        )
        if pred is not None:
            rows += self._agreement_rows(n, pred)
        if rows:
            self.emit_scalars(rows)

    def _agreement_rows(self, n: int, pred: torch.Tensor) -> list[dict[str, Any]]:
        """Churn (changed since the last probe) and agreement (unchanged through the last
        ``AGREEMENT_WINDOW`` probes), from the second probe of one shape on."""
        history = self._predictions
        if history and history[-1].shape != pred.shape:
            history.clear()  # another probe shape: start over
        history.append(pred.to("cpu", torch.int64, copy=True))
        if len(history) < 2:
            return []
        last_two = [history[-2], history[-1]]
        rows: list[dict[str, Any]] = [
            {"step": n, "name": PREDICTION_CHURN, "value": 1.0 - prediction_agreement(last_two)},
            {"step": n, "name": PREDICTION_POSITIONS, "value": float(pred.numel())},
        ]
        if len(history) == AGREEMENT_WINDOW:
            value = prediction_agreement(list(history))
            rows.append({"step": n, "name": PREDICTION_AGREEMENT, "value": value})
        return rows


CHANNELS_FIRST = (_ConvNd, _BatchNorm, _InstanceNorm, nn.GroupNorm)
"""Modules whose output holds the features on dim 1, ``(N, C, *spatial)``."""


def channels_first(module: nn.Module) -> bool:
    """Whether ``module``'s output is ``(N, C, *spatial)``: a convolution (any dimension,
    transposed too) or a batch/instance/group norm, or a container whose last leaf with
    parameters is one (a ResNet stage, a conv-bn-relu block). Only Conv1d/Conv2d were, and a
    Conv3d's or a conv block's spectrum was taken over its last spatial axis."""
    if isinstance(module, CHANNELS_FIRST):
        return True
    last = None
    for m in module.modules():
        if next(m.children(), None) is None and next(m.parameters(recurse=False), None) is not None:
            last = m
    return last is not module and isinstance(last, CHANNELS_FIRST)
