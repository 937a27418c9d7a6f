"""The hash index of the update sketch: the fused all-layer count-sketcher (layers on one
device) or a folded int16 bucket-and-sign index per layer, built inline for small models and
on a low-priority daemon thread otherwise; a due sketch step never waits for it (see
:mod:`spectrawatch._capture`)."""

from __future__ import annotations

import contextlib
import os
import threading

import torch
from torch import nn

from spectrawatch import _shards
from spectrawatch._sender import ErrorLog
from spectrawatch._sketch_triton import CountSketcher
from spectrawatch.config import ClientSettings
from spectrawatch.sketch import SketchSpec, signed_buckets


class SketchIndex:
    """The hash index of one capture's sketched parameters; :meth:`start` builds it anew
    for a layout, discarding a build that a newer one overtook."""

    def __init__(self, spec: SketchSpec, settings: ClientSettings, errors: ErrorLog) -> None:
        self.spec = spec
        self.s = settings
        self.errors = errors
        self.layers: list[tuple[str, nn.Parameter]] = []
        # per layer: (global flat offset of the local shard, its numel, whether it is summed)
        self._shard_of: dict[str, tuple[int, int, bool]] = {}
        self._index: dict[str, torch.Tensor] = {}  # per layer, where not fused
        self._fused: CountSketcher | None = None
        self._index_ready = threading.Event()
        self._index_error: BaseException | None = None
        self._index_cancel = False
        self._index_gen = 0  # a layout change starts a new build; older builds are discarded
        self._index_lock = threading.Lock()

    def start(
        self, layers: list[tuple[str, nn.Parameter]], shard_of: dict[str, tuple[int, int, bool]]
    ) -> None:
        """Build the index of ``layers`` anew (after a layout change: the old one is dropped)."""
        self.layers, self._shard_of = layers, shard_of
        self._index, self._fused = {}, None
        self._index_error = None
        self._start_index_build()

    def ready(self) -> bool:
        """Whether the index is built (without error)."""
        return self._index_ready.is_set() and self._index_error is None

    @property
    def error(self) -> BaseException | None:
        """Why the last build failed, or None."""
        return self._index_error

    @property
    def fused(self) -> CountSketcher | None:
        """The fused all-layer sketcher, once built (None: per-layer indexes)."""
        return self._fused

    @fused.setter
    def fused(self, fused: CountSketcher | None) -> None:
        self._fused = fused

    def cancel(self) -> None:
        """Stop a build in progress (the capture was removed)."""
        self._index_cancel = True

    def _start_index_build(self) -> None:
        """Build the folded hash index inline (small model) or on a background thread."""
        with self._index_lock:
            self._index_gen += 1
            gen = self._index_gen
            self._index_ready.clear()
        if self.s.exact or not self.s.sketch_cache:
            self._index_ready.set()
            return
        local_numel = sum(numel for _, numel, _ in self._shard_of.values())
        if local_numel <= self.s.index_inline_max:
            self._build_index(gen)
            return
        threading.Thread(
            target=self._build_index, args=(gen,), name="spectrawatch-index", daemon=True
        ).start()

    def _build_index(self, gen: int) -> None:
        """Build the fused all-layer sketcher (layers on one device) or else fill ``_index``
        (int16 ``(numel,)`` per layer, on its device), then set ready; a build overtaken by a
        layout change (``gen`` no longer current) is dropped."""
        fused: CountSketcher | None = None
        index: dict[str, torch.Tensor] = {}
        error: BaseException | None = None
        try:
            if threading.current_thread() is not threading.main_thread():
                with contextlib.suppress(AttributeError, OSError):  # Linux: this thread only
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
            layers, shard_of = list(self.layers), dict(self._shard_of)
            devices = {p.device for _, p in layers}
            if len(devices) == 1 and all(c for _, _, c in shard_of.values()):
                # one fused all-layer sketcher, which owns its index (none with Triton)
                device = devices.pop()
                fused = CountSketcher(
                    [shard_of[name][1] for name, _ in layers],
                    self.spec.dim,
                    device,
                    seeds=[self.spec.layer_seed(name) for name, _ in layers],
                    starts=[shard_of[name][0] for name, _ in layers],
                )
                if self._index_cancel or gen != self._index_gen:
                    return
                if fused.backend == "triton":  # compile the kernel here, off the training steps
                    with torch.no_grad():
                        fused([_shards.local_tensor(p.detach()) for _, p in layers])
            else:
                for name, p in layers:
                    if self._index_cancel or gen != self._index_gen:
                        return
                    index[name] = self._hash_index(name, p.device, shard_of)
        except Exception as exc:
            error = exc
        finally:
            with self._index_lock:
                if gen == self._index_gen:
                    self._index, self._fused = index, fused
                    self._index_error = error
                    if error is not None:
                        self.errors.record("sketch index", error)
                    self._index_ready.set()

    def _hash_index(
        self,
        name: str,
        device: torch.device,
        shard_of: dict[str, tuple[int, int, bool]] | None = None,
    ) -> torch.Tensor:
        start, numel, _ = (self._shard_of if shard_of is None else shard_of)[name]
        return signed_buckets(numel, self.spec.layer_seed(name), self.spec.dim, device, start)

    def wait_index(self, timeout: float | None = None) -> bool:
        """Block until the hash index is built (tests, benchmarks); True when it is ready."""
        return self._index_ready.wait(timeout) and self._index_error is None

    def folded(self, name: str, local: torch.Tensor) -> torch.Tensor:
        idx = self._index.get(name)
        if idx is None or idx.device != local.device:
            idx = self._hash_index(name, local.device)
            if self.s.sketch_cache:
                self._index[name] = idx
        return idx

    def fused_on(self, device: torch.device) -> CountSketcher | None:
        """The fused sketcher, rebuilt for ``device`` if the model moved there."""
        fused = self._fused
        if fused is not None and fused.device != device:
            self._fused = fused = CountSketcher(
                fused.numels, fused.dim, device, seeds=fused.seeds, starts=fused.starts
            )
        return fused
