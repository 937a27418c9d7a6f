"""Lightning integration (``lightning.pytorch``, else ``pytorch_lightning``).

```python
from spectrawatch.integrations.lightning import SpectrawatchCallback
trainer = lightning.Trainer(max_steps=1000, callbacks=[SpectrawatchCallback(project="lm")])
```

``on_train_start`` starts a run (the module's ``hparams`` become its config) and attaches the
LightningModule with its optimizer: update sketches follow the optimizer's real steps. With
several optimizers the module is attached without one and the callback signals a step at every
``on_train_batch_end`` that advanced ``trainer.global_step``. Metrics logged with ``self.log``
are sent as scalars at ``trainer.global_step``: training ones every ``log_every`` steps (default:
the Trainer's ``log_every_n_steps``) from ``on_train_batch_end``, validation ones at
``on_validation_end`` (not during the sanity check). ``on_train_end`` finishes the run,
``on_exception`` marks it crashed. Only global rank zero reports; other ranks do nothing,
except with an FSDP2-sharded module, where every rank attaches for the collective captures.
Lightning is imported on first access to ``SpectrawatchCallback``, never by ``import
spectrawatch``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from spectrawatch._shards import has_sharded_params
from spectrawatch.integrations import CallbackOptions, lazy_callback
from spectrawatch.integrations.hf import numeric_logs

_CONFIG_MAX_ITEMS = 200


def _callback_base() -> type:
    """``lightning.pytorch.Callback``, else ``pytorch_lightning.Callback``."""
    for module in ("lightning.pytorch", "pytorch_lightning"):
        try:
            base: type = importlib.import_module(module).Callback
        except ImportError:
            continue
        return base
    raise ImportError("the Lightning SpectrawatchCallback needs lightning: pip install lightning")


def _hparams(module: Any) -> dict[str, Any]:
    """JSON-scalar hyper-parameters of a LightningModule (``self.save_hyperparameters()``)."""
    try:
        raw = dict(getattr(module, "hparams", {}) or {})
    except Exception:  # a config is a nicety, never a reason to fail
        return {}
    items = list(raw.items())[:_CONFIG_MAX_ITEMS]
    return {str(k): v for k, v in items if isinstance(v, (str, int, float, bool)) or v is None}


class _Callback(CallbackOptions):
    """Lightning ``Callback`` that streams a training run to spectrawatch (global rank zero).

    ``SpectrawatchCallback(project=..., run=..., url=..., token=..., tags=..., probe=batch,
    every=..., log_every=None, monitor=None, **settings)``: see
    :class:`~spectrawatch.integrations.CallbackOptions`; ``log_every`` (default: Lightning's
    ``log_every_n_steps``) is how often the logged metrics are sent.
    """

    def __init__(self, *args: Any, log_every: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._log_every = log_every
        self._manual_steps = False
        self._last_step = -1
        self._last_logged = -1
        self._before_validation: dict[str, Any] = {}
        self._validation_keys: set[str] = set()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not getattr(trainer, "is_global_zero", True) and not has_sharded_params(pl_module):
            return  # FSDP2: every rank attaches, the captures are collective (rank 0 sends)
        self.monitor.init(config=_hparams(pl_module), tags=self._tags, **self._init)
        self._active = True
        optimizers = list(getattr(trainer, "optimizers", []) or [])
        optimizer = optimizers[0] if len(optimizers) == 1 else None
        self._manual_steps = optimizer is None
        self._last_step = int(trainer.global_step)
        self.monitor.attach(
            pl_module,
            optimizer,
            probe=self._probe,
            every=self._every,
            start_step=self._last_step,
        )

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active:
            return
        step = int(trainer.global_step)
        if step == self._last_step:
            return  # gradient accumulation: no optimizer step yet
        self._last_step = step
        if self._manual_steps:
            self.monitor.step(step)
        every = self._log_every or int(getattr(trainer, "log_every_n_steps", 50) or 50)
        if step % every == 0:
            self._log_training(trainer, step)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self._active:
            self._before_validation = dict(getattr(trainer, "callback_metrics", {}) or {})

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._active or getattr(trainer, "sanity_checking", False):
            return
        # validation metrics: the entries this validation loop created or replaced
        now = dict(getattr(trainer, "callback_metrics", {}) or {})
        changed = {k: v for k, v in now.items() if self._before_validation.get(k) is not v}
        self._validation_keys.update(changed)
        values = numeric_logs(changed)
        if values:
            self.monitor.log(values, step=int(trainer.global_step))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._active:
            step = int(trainer.global_step)
            if step != self._last_logged:
                self._log_training(trainer, step)
            self._active = False
            self.monitor.finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self._active:
            self._active = False
            self.monitor.finish("crashed")

    def _log_training(self, trainer: Any, step: int) -> None:
        """The training metrics of ``callback_metrics`` (validation ones left out: they are
        logged at the step their validation ran, not repeated at every later step)."""
        self._last_logged = step
        metrics = getattr(trainer, "callback_metrics", None) or {}
        values = numeric_logs({k: v for k, v in metrics.items() if k not in self._validation_keys})
        if values:
            self.monitor.log(values, step=step)


if TYPE_CHECKING:
    SpectrawatchCallback = _Callback
else:  # PEP 562: the framework is imported on first access to SpectrawatchCallback only
    __getattr__ = lazy_callback(__name__, _Callback, _callback_base)
