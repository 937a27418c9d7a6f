"""Hugging Face ``transformers.Trainer`` integration.

```python
from spectrawatch.integrations.hf import SpectrawatchCallback
trainer = Trainer(model, args, train_dataset=ds, callbacks=[SpectrawatchCallback(project="lm")])
```

At ``on_train_begin`` the callback starts a run (named after ``TrainingArguments.run_name``
unless ``run=`` is given; the training arguments become the run's config) and attaches the model
and the Trainer's optimizer, so update sketches follow real optimizer steps (with gradient
accumulation, one per accumulated step); ``on_log`` sends the Trainer's logs (loss,
learning_rate, grad_norm, eval_* ...) as scalars at ``state.global_step``; ``on_train_end``
finishes the run. Only the world-process-zero rank reports (with an FSDP2-sharded model every
rank attaches, for the collective captures). ``transformers`` is imported lazily:
importing this module does not need it, constructing the callback does.

A ``train()`` ended by an exception (an Optuna-style pruning raised from a callback, an OOM a
sweep loop catches) never calls ``on_train_end``, and ``TrainerCallback`` has no exception
hook: its run is finished ``crashed`` by the next ``on_train_begin`` of any
``SpectrawatchCallback`` in the process on the same thread (or once the thread that trained it
has ended), by the exit hook (``crashed`` too), or by a SIGTERM. Several callbacks of one
Trainer, and a Trainer started inside another's ``train()``, leave each other's runs alone.

``transformers`` selects its built-in loggers with ``report_to``; spectrawatch is not one of them,
so pass the callback in ``callbacks=[...]`` (``report_to="none"`` leaves spectrawatch alone on the
run). Settings come from keyword arguments over ``SPECTRAWATCH_*`` env, as for ``monitor.init``.
"""

from __future__ import annotations

import logging
import numbers
import sys
import threading
from collections.abc import Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any

from spectrawatch._shards import has_sharded_params
from spectrawatch.integrations import CallbackOptions, lazy_callback

if TYPE_CHECKING:
    from torch import nn
    from torch.optim import Optimizer

    from spectrawatch.monitor import Monitor

logger = logging.getLogger("spectrawatch")

_CONFIG_MAX_ITEMS = 200

_TRAINING: dict[Monitor, tuple[threading.Thread, Any]] = {}
"""The runs of callbacks whose ``train()`` has not reached ``on_train_end``, with the thread
that trains them and that ``train()``'s ``TrainerState`` (the monitor holds them until
finished anyway)."""


def end_interrupted_runs(state: Any = None) -> None:
    """Finish as ``crashed`` the runs of earlier ``train()`` calls that never reached
    ``on_train_end`` (an exception ended them): those trained on this thread, which is starting
    another, or on a thread that has ended. Left alone: a run training on another live thread,
    and one of the ``train()`` beginning now (``state``: another callback of the same Trainer)
    or of a ``train()`` still running further up this thread's stack (a Trainer started from
    inside another's training)."""
    here = threading.current_thread()
    for monitor, (thread, began) in list(_TRAINING.items()):
        if thread.is_alive() and thread is not here:
            continue
        if thread is here and began is not None and (began is state or _training(began)):
            continue
        del _TRAINING[monitor]
        if not monitor._active:  # finished by the user's code already
            continue
        logger.info(
            "spectrawatch: run %r never reached on_train_end (an exception ended its "
            "train()): finished as crashed",
            monitor.run_name,
        )
        monitor.finish("crashed")


def _training(state: Any) -> bool:
    """Whether a frame up the current stack belongs to the Trainer whose ``state`` this is
    (its ``train()`` is still running: the calls under it start another)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        # only the Trainer's own training frames: reading a frame's f_locals snapshots them
        # into it (before Python 3.13), which would keep a sweep loop's last model alive
        if frame.f_code.co_name in _TRAINING_FRAMES and str(
            frame.f_globals.get("__name__", "")
        ).startswith("transformers."):
            owner = frame.f_locals.get("self")
            if owner is not None and getattr(owner, "state", None) is state:
                return True
        frame = frame.f_back
    return False


_TRAINING_FRAMES = frozenset({"_inner_training_loop", "train"})


def _trainer_callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "SpectrawatchCallback needs transformers: pip install transformers"
        ) from exc
    base: type = TrainerCallback
    return base


def numeric_logs(logs: Mapping[str, Any] | None) -> dict[str, float]:
    """The numbers (and 0-d tensors) of a Trainer ``logs`` dict; strings and lists out. NaN/Inf
    stay: :meth:`Monitor.log` sends them (stored as null), so a rule on the loss sees it diverge."""
    out: dict[str, float] = {}
    for name, value in (logs or {}).items():
        if isinstance(value, bool):
            continue
        if isinstance(value, numbers.Real):
            v = float(value)
        elif hasattr(value, "item") and getattr(value, "ndim", None) == 0:
            v = float(value.item())
        else:
            continue
        out[str(name)] = v
    return out


def inner_optimizer(optimizer: Any) -> Optimizer | None:
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` (its ``.optimizer``); the
    inner one steps exactly when parameters change (not on skipped AMP / accumulation steps)."""
    import torch

    for _ in range(3):
        if isinstance(optimizer, torch.optim.Optimizer) and not hasattr(optimizer, "optimizer"):
            return optimizer
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            break
        optimizer = inner
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def _config_of(args: Any) -> dict[str, Any]:
    """``TrainingArguments.to_sanitized_dict()`` (JSON scalars), bounded in size."""
    to_dict = getattr(args, "to_sanitized_dict", None)
    try:
        raw = to_dict() if callable(to_dict) else {}
    except Exception:  # a config is a nicety, never a reason to fail
        return {}
    items = list(raw.items())[:_CONFIG_MAX_ITEMS]
    return {str(k): v for k, v in items if isinstance(v, (str, int, float, bool)) or v is None}


class _Callback(CallbackOptions):
    """``transformers.TrainerCallback`` that streams a Trainer run to spectrawatch.

    ``SpectrawatchCallback(project=..., run=..., url=..., token=..., tags=..., probe=batch,
    every=..., monitor=..., **settings)``: see :class:`~spectrawatch.integrations.CallbackOptions`.
    """

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        end_interrupted_runs(state)
        zero = getattr(state, "is_world_process_zero", True)
        if not zero and (model is None or not has_sharded_params(model)):
            return  # FSDP2: every rank attaches, the captures are collective (rank 0 sends)
        init = dict(self._init)
        if init.get("run") is None and getattr(args, "run_name", None):
            init["run"] = str(args.run_name)
        self.monitor.init(config=_config_of(args), tags=self._tags, **init)
        self.monitor._exit_status = "crashed"  # open at exit: training never reached its end
        _TRAINING[self.monitor] = (threading.current_thread(), state)
        self._active = True
        if model is not None:
            self.monitor.attach(
                model,
                inner_optimizer(optimizer),
                probe=self._probe,
                every=self._every,
                start_step=int(getattr(state, "global_step", 0) or 0),
            )

    def on_log(
        self,
        args: Any,
        state: Any,
        control: Any,
        logs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._active:
            values = numeric_logs(logs)
            if values:
                self.monitor.log(values, step=int(state.global_step))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _TRAINING.pop(self.monitor, None)
        if self._active:
            self._active = False
            self.monitor.finish()


if TYPE_CHECKING:
    SpectrawatchCallback = _Callback
else:  # PEP 562: the framework is imported on first access to SpectrawatchCallback only
    __getattr__ = lazy_callback(__name__, _Callback, _trainer_callback_base)
