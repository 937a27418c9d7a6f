"""What the client captures, and when: optimizer-step hooks, cadences, never raising.

All captures run on the training thread inside the optimizer's step post-hook (or
:meth:`Capture.on_step` when no optimizer is given) and hand CPU tensors to the sender. Each is
wrapped so that an exception is counted and logged once, and a capture that fails 3 times in a
row is switched off; nothing reaches the training loop.

Update sketches (DESIGN §3). Per-step updates are *not* formed from a copy of the parameters:
the client sketches theta itself in float64 (count-sketch, linear) and differences consecutive
sketches, ``sketch(theta_n) - sketch(theta_{n-1}) = sketch(delta_n)``. Memory: ``(L + 1) * d``
float64 values for the previous sketch plus, with ``sketch_cache`` (default), a cached folded
hash index of 2 bytes per parameter (int16; 4 if d > 16383) on the parameter's device -- half of
one fp32 copy of the model; turn it off to trade that memory for ~20x slower sketches. The
Triton sketch on CUDA (:mod:`spectrawatch._sketch_triton`) hashes on the fly and keeps no index;
it runs on a side stream that overlaps the next step, and rows leave the GPU by asynchronous
copies (:mod:`spectrawatch._overlap`, setting ``sketch_stream``).
The float64 accumulation keeps the difference exact to ~1e-16 relative to |theta|, so tiny
updates survive. The index is built off the training steps (~25-50 ms per million parameters on
a CPU core): inside ``attach`` for models up to ``index_inline_max`` parameters, else on a
daemon thread at lowered priority started by ``attach``. Until it is ready, a due sketch step is
*skipped*, never waited for: no row is sent for it, stat ``sketch_steps_skipped`` counts it, and
the first row after the index is ready is a true one-step update (theta is sketched again before
that step). With ``update_every = k > 1`` the pre-step hook sketches theta_{n-1} before step n,
so a row is still the update of one step; with ``overhead_budget`` the client chooses k itself
from the measured sketch and step times (:mod:`spectrawatch._cadence`, never lowering it), and
each update frame names the k in force (``info["update_every"]``). The same theta sketches feed
interval mode: every ``theta_every`` steps a ``param_sketch`` frame carries them (float64), and
the server differences them into the SED paper's checkpoint-interval displacements without the
client keeping any checkpoint.
Whole model: tensor ``__model__`` is the *sum of the per-layer sketches* (each layer hashed with
its own seed), which is itself a count-sketch of the concatenated update (a coordinate of layer
l goes to that layer's bucket and sign); ``info["model_sketch"] = "sum_of_layers"`` says so.
Exact mode (``exact=True``) keeps one fp32 copy of every parameter and sends full updates.

Sharded models (FSDP2 ``fully_shard``; see :mod:`spectrawatch._shards`): every rank runs the
same captures on its local shards (the sketch is summed over ranks with one ``all_reduce``;
weights are gathered only at snapshot steps; the probe forward runs on every rank) and only the
emitting rank (rank 0) sends. The commutator-defect probe is off for sharded models.

Collaborators: the sketched parameters and their rows in :mod:`spectrawatch._sketch_layout`,
the hash index in :mod:`spectrawatch._sketch_index`, weight snapshots in
:mod:`spectrawatch._weights`, activations and prediction scalars of the probe batch in
:mod:`spectrawatch._probe`, the model helpers (unwrapping, the registration count) in
:mod:`spectrawatch._model`. Commutator defect (opt-in):
:func:`spectrawatch.spectral.grokking.median_commutator_defect` (``research/sed_eigentrack.md``
§2.2; parameters, buffers and RNG state restored, optimizer never touched), sent as the scalar
``grok.commutator_defect``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from spectrawatch import _shards, wire
from spectrawatch._cadence import AdaptiveCadence
from spectrawatch._model import output_layer as output_layer
from spectrawatch._model import unwrap_model
from spectrawatch._overlap import GraphedSketch, PendingFrames, SketchStream
from spectrawatch._probe import ROOT_MODULE as ROOT_MODULE
from spectrawatch._probe import ProbeCapture
from spectrawatch._sender import ClientStats, ErrorLog, FrameItem
from spectrawatch._sketch_index import SketchIndex
from spectrawatch._sketch_layout import SketchLayout
from spectrawatch._sketch_triton import CountSketcher
from spectrawatch._weights import WeightSnapshots
from spectrawatch.config import ClientSettings
from spectrawatch.sketch import (
    HASH_NAME,
    SketchSpec,
    count_sketch_signed,
)
from spectrawatch.spectral.grokking import (
    COMMUTATOR_DEFECT,
    GRADIENT_COHERENCE,
    commutator_probe,
)
from spectrawatch.wire import MODEL_LAYER as MODEL_KEY

logger = logging.getLogger("spectrawatch")

# theta sketches of all layers: an (L + 1, d) matrix, or (exact mode) flat parameters by name
Rows = torch.Tensor | dict[str, torch.Tensor]
_MAX_FAILURES = 3

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class Capture:
    """Hooks one model (and optionally its optimizer) and emits frames at their cadences."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        settings: ClientSettings,
        emit_frame: Callable[[FrameItem], None],
        emit_scalars: Callable[[list[dict[str, Any]]], None],
        errors: ErrorLog,
        stats: ClientStats,
        *,
        probe: Any = None,
        modules: Iterable[str | nn.Module] | None = None,
        loss_fn: LossFn | None = None,
        sample_batch: Callable[[], Any] | None = None,
        start_step: int = 0,
        emits: bool = True,
    ) -> None:
        self.model = unwrap_model(model)
        self.emits = emits  # False: a non-zero rank that joins collective captures, sends nothing
        self.sharded = _shards.has_sharded_params(self.model)
        if self.sharded and loss_fn is not None:
            errors.record("commutator defect", NotImplementedError("off for sharded models"))
            loss_fn = None
        self.optimizer = optimizer
        self.s = settings
        self.emit_frame = emit_frame
        self.emit_scalars = emit_scalars
        self.errors = errors
        self.stats = stats
        self._probes = ProbeCapture(
            self.model, probe, modules, settings, emit_frame, emit_scalars, emits=emits
        )
        self._weights = WeightSnapshots(
            self.model, settings, emit_frame, errors, stats, emits=emits
        )
        self.loss_fn = loss_fn
        self.sample_batch = sample_batch
        self.step = start_step
        self._stepped = False  # whether on_step ran (an explicit first step may be any number)
        # the thread that steps the model: the only one where a sharded model's collective
        # captures may run (the other ranks join them from their training threads)
        self._training_thread = threading.get_ident()
        self.spec = SketchSpec(settings.dim, settings.sketch_seed)
        self.layout = SketchLayout(self.model, settings, errors, stats)
        self._sketch_index = SketchIndex(self.spec, settings, errors)
        self._prev: Rows | None = None
        self._prev_step: int | None = None
        # overhead_budget: the update cadence follows measured sketch and loop times; not for
        # sharded models, whose ranks must sketch (all_reduce) at the same steps
        self._cadence = (
            AdaptiveCadence(
                settings.overhead_budget, settings.update_every, per_step_rows=optimizer is not None
            )
            if settings.overhead_budget > 0 and settings.update_every > 0 and not self.sharded
            else None
        )
        if settings.overhead_budget > 0 and self.sharded:
            errors.note(
                "cadence",
                "overhead_budget is ignored for sharded models (every rank must sketch at the "
                "same steps): update sketches follow update_every",
            )
        if settings.update_every > 0:
            stats.set("update_every", settings.update_every)  # shown with the run's client stats
        self._loop_end: float | None = None  # when the last post-step hook returned
        self._pre_sketch_s = 0.0  # host time of this step's pre-step sketch
        self._gpu_sketches: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()
        self._sketch_on_gpu = False  # the last _sketch_all recorded CUDA events
        self._forked = False  # in a forked child (DataLoader worker...) the hooks do nothing
        _LIVE.add(self)  # inert in a forked child (see _inert_after_fork)
        self._update_rows: list[Rows] = []
        self._update_steps: list[int] = []
        self._theta_rows: list[Rows] = []
        self._theta_steps: list[int] = []
        # the first sketched step also sends theta: ``norm.update_ratio`` from the first step,
        # not only from ``theta_every`` on (a run that dies before step 100 has its ratio too)
        self._theta_sent = False
        # theta row names whose chain restarts at the next on-grid theta frame (_check_layout)
        self._chain_breaks: set[str] = set()
        # CUDA: sketch on a side stream, rows leave the GPU asynchronously (see _overlap); not
        # for sharded models, whose sketch ends in a collective on the training stream
        self._stream = SketchStream(
            settings.sketch_stream and optimizer is not None and not self.sharded
        )
        self._frames = PendingFrames()
        self._graphed = GraphedSketch(settings.sketch_graph and not self.sharded)
        self._graph_error_logged = False
        # the parameters' data pointers when last checked to be on one device (a move or a
        # replacement gives new storage, so the check is needed only when they change)
        self._checked_ptrs: tuple[int, ...] = ()
        self._one_device = False
        self._failures: dict[str, int] = {}
        self._disabled: set[str] = set()
        self._handles: list[Any] = []
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._pre_hook))
            self._handles.append(optimizer.register_step_post_hook(self._post_hook))
        self._sketch_index.start(self.layout.layers, self.layout.shard_of)

    @property
    def layers(self) -> list[tuple[str, nn.Parameter]]:
        """The sketched parameters, in row order (see :class:`SketchLayout`)."""
        return self.layout.layers

    @property
    def stepped(self) -> bool:
        """Whether this session has taken a step (before, :attr:`step` is ``start_step``, the
        step it continues from)."""
        return self._stepped

    @property
    def probe(self) -> Any:
        """The probe batch (None: no activation captures)."""
        return self._probes.probe

    # -- the sketched parameters --------------------------------------------------------------

    def _check_layout(self) -> None:
        """Follow the model when its trained parameters change after ``attach``: one unfrozen,
        frozen, replaced (a new ``nn.Parameter``), resized (``resize_token_embeddings``) or
        materialised (a lazy module's first forward).
        The rows buffered so far go out with the old layout, the sketch index is rebuilt, and
        update rows restart with the next step (the step of the change has none: its before
        and after sketches are of different parameter sets). The theta rows whose parameter set
        changed (``__model__``, new or replaced tensors) restart their chain too: the next
        theta frame names them in ``info["chain_break"]`` and the server does not difference
        its first row with the rows before (interval SED took the switched layer's +-theta for
        an update). Not for sharded models, whose captures are collective."""
        if self.sharded or not self.layout.may_have_changed():
            return
        layers = self.layout.changed()
        if layers is None:
            return
        self.flush_updates()
        self.flush_theta()
        self._chain_breaks |= self.layout.relayout(layers)
        self._prev, self._prev_step = None, None
        self.stats.incr("layout_changes")
        self.errors.note(
            "layout",
            "the model's trained parameters changed after attach (unfrozen, replaced, resized or"
            " materialised): sketching the new set from the next step",
        )
        self._sketch_index.start(self.layout.layers, self.layout.shard_of)

    # -- hash index ---------------------------------------------------------------------------

    def wait_index(self, timeout: float | None = None) -> bool:
        """Block until the hash index is built (tests, benchmarks); True when it is ready."""
        return self._sketch_index.wait_index(timeout)

    @property
    def _fused(self) -> CountSketcher | None:
        """The fused all-layer sketcher of the hash index (tests and benchmarks swap it)."""
        return self._sketch_index.fused

    @_fused.setter
    def _fused(self, fused: CountSketcher | None) -> None:
        self._sketch_index.fused = fused

    # -- hooks ----------------------------------------------------------------------------

    def remove(self) -> None:
        """Remove the optimizer hooks (the capture stops; buffered rows are kept for flush)."""
        self._sketch_index.cancel()
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def follow(self, optimizer: torch.optim.Optimizer) -> None:
        """Move the step hooks to ``optimizer``, which replaces the one attached (a notebook's
        optimizer cell run again): the step count, buffered rows and hash index are kept."""
        self._join_stream()  # the last sketch read the parameters the new optimizer writes
        for h in self._handles:
            h.remove()
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]
        self.optimizer = optimizer

    def _off(self) -> bool:
        """Nothing to capture: in a forked child, or when monitoring turned itself off for the
        run (the server refused the token's role: ``stats.off_reason``). A sharded model keeps
        capturing then, as its sketches are collectives the other ranks join."""
        return self._forked or (self.stats.off_reason is not None and not self.sharded)

    def _pre_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._off():
            self._guard("update sketch", self._before_step)
            self._join_stream()

    def _join_stream(self) -> None:
        """The training stream waits for the side stream's last sketch (before the optimizer or
        the defect probe writes the parameters); a parameter written since then turns it off."""
        try:
            if self._stream.join():
                self.stats.incr("sketch_stream_off")
                self.errors.note(
                    "sketch stream",
                    "parameters were written in place outside optimizer.step(): the update "
                    "sketch runs on the training stream from now on (sketch_stream=False)",
                )
        except Exception as exc:
            self.errors.record("update sketch", exc)

    def _post_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.on_step()

    def on_step(self, step: int | None = None) -> None:
        """Run the captures due after an optimizer step (called by the post-hook); nothing in
        a forked child, where some CPU kernels the sketch uses can hang (torch's thread pool
        does not survive a fork) and whose sender is inert anyway; nor once monitoring is off
        (see :meth:`_off`)."""
        if self._off():
            return
        try:
            if step is not None and self._stepped and int(step) <= self.step:
                # as a late log(step=...): ignored, so that frames' steps keep increasing
                self.stats.incr("steps_not_increasing")
                self.errors.note(
                    "step order",
                    f"step({int(step)}) after step {self.step} ignored: steps must increase",
                )
                return
            self.step = self.step + 1 if step is None else int(step)
            self._stepped = True
            self._training_thread = threading.get_ident()
            n = self.step
            s = self.s
            every = self.update_every  # the cadence this step's pre-step hook sketched for
            if self._cadence is not None:
                self._time_loop()  # a new cadence applies from the next step
            due_update = every > 0 and n % every == 0
            due_theta = s.theta_every > 0 and n % s.theta_every == 0
            if due_update or due_theta or self._first_theta_due:
                self._guard("update sketch", lambda: self._after_step(n, due_update, due_theta))
            if s.weights_every > 0 and n % s.weights_every == 0:
                self._guard("weights", lambda: self.capture_weights(n))
            if self.probe is not None and s.activations_every > 0 and n % s.activations_every == 0:
                self._guard("activations", lambda: self.capture_activations(n))
            if (
                self.loss_fn is not None
                and self.sample_batch is not None
                and s.defect_every > 0
                and n % s.defect_every == 0
            ):
                self._join_stream()  # the probe writes the parameters (and restores them)
                self._guard("commutator defect", lambda: self.capture_defect(n))
        except Exception as exc:  # belt and braces: nothing escapes a hook
            self.errors.record("capture", exc)
        finally:
            self._loop_end = time.perf_counter()

    @property
    def update_every(self) -> int:
        """The update-sketch cadence in force: the setting, or the one the budget chose."""
        return self._cadence.every if self._cadence is not None else self.s.update_every

    def _time_loop(self) -> None:
        """Feed the cadence controller (see :mod:`spectrawatch._cadence`): the loop's time since
        the last post-step hook returned, less this step's pre-step sketch; finished CUDA
        sketches' event times; then apply the cadence the samples call for."""
        assert self._cadence is not None
        now = time.perf_counter()
        if self._loop_end is not None:
            self._cadence.loop_time(now - self._loop_end - self._pre_sketch_s)
        self._pre_sketch_s = 0.0
        while self._gpu_sketches and self._gpu_sketches[0][1].query():  # type: ignore[no-untyped-call]
            start, end = self._gpu_sketches.popleft()
            self._cadence.sketch_time(start.elapsed_time(end) / 1e3)
        before = self._cadence.every
        every = self._cadence.update()
        if every is not None:
            self.stats.set("update_every", every)
            cost = self._cadence.overhead(before)
            self.errors.note(
                f"cadence {every}",
                f"update sketches every {every} steps from now on: every {before} cost "
                f"~{100 * (cost or 0):.1f} % of the loop's time, over overhead_budget "
                f"{100 * self._cadence.budget:g} %",
            )

    def _guard(self, what: str, fn: Callable[[], None]) -> None:
        if what in self._disabled:
            return
        try:
            fn()
            self._failures[what] = 0
            self.stats.incr("captures")
        except Exception as exc:
            self.errors.record(what, exc)
            self._failures[what] = self._failures.get(what, 0) + 1
            # a sharded model's captures are collectives: one rank turning one off on its own
            # count would leave the others waiting in it for good
            if self._failures[what] >= _MAX_FAILURES and not self.sharded:
                self._disabled.add(what)
                self.errors.record(
                    what, RuntimeError(f"{what} disabled after {_MAX_FAILURES} failures")
                )

    # -- update and theta sketches ---------------------------------------------------------

    def _before_step(self) -> None:
        self._check_layout()
        n = self.step + 1
        every = self.update_every
        if every > 0 and n % every == 0 and self._prev_step != n - 1:
            self._prev = self._timed_sketch(before_step=True)
            self._prev_step = n - 1 if self._prev is not None else None

    def _timed_sketch(self, before_step: bool = False) -> Rows | None:
        """:meth:`_sketch_all`, its time given to the cadence controller when there is one (host
        time; a CUDA sketch on the fused path is timed by events, read once finished). The
        pre-step sketch's host time is also kept, to take it out of the loop's time."""
        if self._cadence is None:
            return self._sketch_all()
        self._sketch_on_gpu = False
        t0 = time.perf_counter()
        out = self._sketch_all()
        host = time.perf_counter() - t0
        if before_step:
            self._pre_sketch_s = host
        if out is not None and not self._sketch_on_gpu:
            self._cadence.sketch_time(host)
        return out

    @torch.no_grad()
    def _sketch_all(self) -> Rows | None:
        """Theta sketches: float64 ``(L + 1, d)``, one row per layer then ``__model__`` (their
        sum), in :attr:`row_names` order; exact mode: the flat float32 parameters by name.

        None while the hash index is still being built (on any rank, for sharded models).
        """
        if self.s.exact:
            return {
                name: _shards.full_tensor(p.detach()).reshape(-1).to(torch.float32, copy=True)
                for name, p in self.layers
            }
        ready = self._sketch_index.ready()
        if self._sketch_index.error is not None and not self.sharded:
            error = self._sketch_index.error
            raise RuntimeError("the sketch hash index could not be built") from error
        if not ready and not self.sharded:
            return None
        if not self.layers:
            return None
        d = self.spec.dim
        # no detach(): this runs under no_grad, and 150 detach() calls cost ~0.5 ms a step
        params = self.layout.params
        locals_ = [_shards.local_tensor(p) for p in params] if self.sharded else params
        device = locals_[0].device
        fused = self._sketch_index.fused_on(device) if ready else None
        ptrs = tuple(map(torch.Tensor.data_ptr, locals_))
        if ptrs != self._checked_ptrs:  # new storage: look again whether it is all on one device
            self._one_device = all(t.device == device for t in locals_)
            self._checked_ptrs = ptrs
        if fused is not None and self._one_device:
            if not self.sharded:
                with self._stream.use(device):
                    events = self._cuda_events(device)
                    # the graph replays the Triton launches (it returns None off CUDA)
                    out = None
                    if fused.triton is not None:
                        out = self._graphed(fused, locals_, ptrs)
                    if out is None:
                        mat = fused(locals_)
                        out = torch.cat([mat, mat.sum(0, keepdim=True)])
                    out = self.layout.grouped(out)
                    self._graph_failed()
                    if events is not None:
                        events[1].record()
                        self._gpu_sketches.append(events)
                        self._sketch_on_gpu = True
                self._stream.launched(device, params)
                return out
            mat = fused(locals_)
        else:  # layers on several devices (or replicated shards): one sketch per layer
            rows = []
            for (name, _), local in zip(self.layers, locals_, strict=True):
                if ready and self.layout.shard_of[name][2]:
                    row = count_sketch_signed(local, self._sketch_index.folded(name, local), d)
                else:  # a not-yet-ready rank still joins the all_reduce, with zeros
                    row = torch.zeros(d, dtype=torch.float64, device=local.device)
                rows.append(row.to(device))
            mat = torch.stack(rows)
        if self.sharded:
            # one all_reduce of every layer's partial sketch plus a ready flag per rank
            flag = torch.full((1,), float(ready), dtype=torch.float64, device=device)
            flat = _shards.all_reduce_sum(torch.cat([mat.reshape(-1), flag]))
            if flat[-1].item() < _shards.world_size():
                return None
            mat = flat[:-1].view(-1, d)
        return self.layout.grouped(torch.cat([mat, mat.sum(0, keepdim=True)]))

    def _graph_failed(self) -> None:
        """Log (once) a sketch graph capture that failed: the sketch runs eagerly from then on."""
        if self._graphed.error is not None and not self._graph_error_logged:
            self._graph_error_logged = True
            self.stats.incr("sketch_graph_off")
            self.errors.record(
                "update sketch", RuntimeError(f"CUDA graph capture failed: {self._graphed.error}")
            )

    def _cuda_events(
        self, device: torch.device
    ) -> tuple[torch.cuda.Event, torch.cuda.Event] | None:
        """A recorded start event and an end event for timing a CUDA sketch on the current
        stream, when the cadence controller wants them (a bounded number in flight)."""
        if self._cadence is None or device.type != "cuda" or len(self._gpu_sketches) >= 64:
            return None
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        return start, torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]

    @property
    def row_names(self) -> list[str]:
        """Names of the rows of a sketch matrix from :meth:`_sketch_all` (see
        :attr:`SketchLayout.row_names`)."""
        return self.layout.row_names

    def _after_step(self, n: int, due_update: bool, due_theta: bool) -> None:
        self._frames.release(self.emit_frame, wait=False)
        if self.optimizer is None:  # with an optimizer the pre-step hook has checked
            self._check_layout()
        cur = self._timed_sketch()
        if cur is None:  # hash index not built yet: skip, never wait
            self.stats.incr("sketch_steps_skipped")
            self._prev, self._prev_step = None, None
            return
        prev = self._prev
        first_theta = self._first_theta_due
        if first_theta:
            due_theta = True
        if due_update and prev is not None:
            row: Rows
            if isinstance(cur, torch.Tensor) and isinstance(prev, torch.Tensor):
                with self._stream.use(cur.device):  # where cur and prev were made
                    row = (cur - prev).to(torch.float32)
            elif isinstance(cur, dict) and isinstance(prev, dict):  # exact mode
                row = {k: cur[k] - prev[k] for k in cur}
                row[MODEL_KEY] = torch.cat([row[name] for name, _ in self.layers])
            self._update_rows.append(row)
            self._update_steps.append(n)
            if len(self._update_rows) >= self.s.frame_steps:
                self.flush_updates()
        if due_theta and not self.s.exact:
            self._theta_rows.append(cur)
            self._theta_steps.append(n)
            self._theta_sent = True
            if first_theta:  # alone, and marked when off the cadence (see flush_theta)
                self.flush_theta(off_cadence=n % self.s.theta_every != 0)
            elif len(self._theta_rows) >= self.s.theta_frame_steps:
                self.flush_theta()
        if self.optimizer is not None or due_update:
            # without an optimizer a row is the change since the previous row: a theta-only
            # step's sketch must not become its start
            self._prev = cur
            self._prev_step = n

    @property
    def _first_theta_due(self) -> bool:
        """Whether the session's first theta is still to be sent: at its first sketched step,
        whatever the cadences (theta-only capture, ``update_every=0``, sent none before
        ``theta_every``); not in exact mode, which sends no theta."""
        return not self._theta_sent and self.s.theta_every > 0 and not self.s.exact

    def _sketch_info(self, steps: list[int]) -> dict[str, Any]:
        info: dict[str, Any] = {
            "steps": steps,
            "sketch": {
                "dim": self.spec.dim,
                "seed": self.spec.seed,
                "hash": HASH_NAME,
                "layer_seed": "(seed*1000003 + crc32(name)) & 0x7fffffff",
            },
            "window": self.s.window,
            "layers": self.layout.layer_info,
            "shapes": {name: info["shape"] for name, info in self.layout.layer_info.items()},
            "exact": self.s.exact,
            "model_sketch": "concat" if self.s.exact else "sum_of_layers",
            "update": "per_step" if self.optimizer is not None else "since_previous_row",
        }
        if self.update_every > 0:  # 0: update sketches off (theta only); the wire wants >= 1
            info["update_every"] = self.update_every
        return info

    def _emit_rows(
        self,
        kind: wire.FrameKind,
        rows: list[Rows],
        steps: list[int],
        off_cadence: bool = False,
        chain_break: list[str] | None = None,
    ) -> None:
        """One frame of ``rows`` (one per step): a ``(steps, d)`` CPU tensor per row name, after
        one device-to-host copy that the training thread does not wait for (see _overlap)."""
        info = self._sketch_info(steps)
        if off_cadence:
            info["off_cadence"] = True
        if chain_break:
            info["chain_break"] = chain_break
        first = rows[0]
        if isinstance(first, dict):  # exact mode
            dicts = [r for r in rows if isinstance(r, dict)]
            host = {k: torch.stack([r[k] for r in dicts]).cpu() for k in first}
            self.emit_frame(FrameItem(kind, steps[0], host, info))
            return
        names = self.row_names

        def build(stacked: torch.Tensor) -> FrameItem:
            # each row name's (steps, d) tensor is a contiguous view, in order: the encoder
            # writes them as one block (a clone per row name cost ~150 host copies a frame)
            return FrameItem(kind, steps[0], dict(zip(names, stacked.unbind(0), strict=True)), info)

        with self._stream.use(first.device):  # where the rows were made
            # (row names, steps, d): stacked along dim 1, where the rows are (on the GPU)
            stacked = torch.stack([r for r in rows if isinstance(r, torch.Tensor)], dim=1)
            self._frames.copy(stacked, build)
        self._frames.release(self.emit_frame, wait=False)

    def release_frames(self) -> None:
        """Hand over every frame whose rows are still being copied off the GPU (never raises)."""
        try:
            self._frames.release(self.emit_frame, wait=True)
        except Exception as exc:
            self.errors.record("update sketch", exc)

    def flush_updates(self) -> None:
        if not self._update_rows:
            return
        rows, steps = self._update_rows, self._update_steps
        self._update_rows, self._update_steps = [], []
        self._emit_rows(wire.FrameKind.UPDATE_SKETCH, rows, steps)

    def flush_theta(self, off_cadence: bool = False) -> None:
        """Send the buffered theta rows. ``off_cadence``: the first sketched step's theta of a
        session, off the ``theta_every`` grid (step 1, or a resumed run's first step): it gives
        ``norm.update_ratio`` from the first step, and its ``info["off_cadence"]`` keeps it out
        of interval SED, whose window is the grid's (an extra checkpoint split its intervals
        and left ~11 windows incomplete).

        The first on-grid frame after a layout change names the rows whose chain restarts
        (``info["chain_break"]``, see :meth:`_check_layout`); an off-cadence frame, which interval
        SED skips, leaves them to the next one."""
        if not self._theta_rows:
            return
        rows, steps = self._theta_rows, self._theta_steps
        self._theta_rows, self._theta_steps = [], []
        breaks = None
        if self._chain_breaks and not off_cadence:
            breaks, self._chain_breaks = sorted(self._chain_breaks), set()
        self._emit_rows(wire.FrameKind.PARAM_SKETCH, rows, steps, off_cadence, breaks)

    # -- weights and probe --------------------------------------------------------------------

    def capture_weights(self, n: int) -> None:
        """A weight snapshot at step ``n`` (see :class:`spectrawatch._weights.WeightSnapshots`)."""
        self._weights.capture_weights(n)

    def capture_activations(self, n: int) -> None:
        """The probe capture at step ``n`` (see :class:`spectrawatch._probe.ProbeCapture`)."""
        self._probes.capture_activations(n)

    def _probe_modules(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of the probed modules; the model itself is named ``ROOT_MODULE``."""
        return self._probes._probe_modules()

    # -- commutator defect ---------------------------------------------------------------------

    def capture_defect(self, n: int) -> None:
        """Median commutator defect and gradient cosine over K pairs, sent as scalars
        ``grok.commutator_defect`` and ``grok.gradient_coherence``."""
        assert self.loss_fn is not None
        assert self.sample_batch is not None
        defect, cosine = commutator_probe(
            self.model,
            self.loss_fn,
            self.sample_batch,
            pairs=self.s.defect_samples,
            eta=self.s.defect_eta,
        )
        rows = [{"step": n, "name": COMMUTATOR_DEFECT, "value": defect}]
        if math.isfinite(cosine):  # a zero gradient has no direction
            rows.append({"step": n, "name": GRADIENT_COHERENCE, "value": cosine})
        self.emit_scalars(rows)

    # -- end -----------------------------------------------------------------------------------

    def finish(self, collectives: bool = True) -> None:
        """Flush partial frames and take the final weight snapshot and probe capture (never
        raises); the rows already buffered go out even if the update sketch was disabled after
        failures.

        For a sharded model the final captures are collectives (weight all-gathers, the probe
        forward) that every rank must join from its training thread: they are skipped unless
        ``collectives`` (an explicit ``finish()``, which every rank calls) and this is the
        thread that steps the model. A SIGTERM's close on its own thread ran them beside the
        training thread's FSDP collectives (gloo aborted: "collective mismatch"), and the exit
        hook's ran them with no partner (other ranks have exited or are elsewhere)."""
        self._join_stream()
        for flush in (self.flush_updates, self.flush_theta):
            try:
                flush()
            except Exception as exc:
                self.errors.record("update sketch", exc)
        self.release_frames()
        final = self.s.weights_at_finish and self.step > 0 and not self._off()
        if final and self.sharded and not self._may_gather(collectives):
            logger.info(
                "spectrawatch: no final weight snapshot or probe capture of the sharded model "
                "at step %d: they are collectives, taken only by finish() on every rank's "
                "training thread (not at exit or on a SIGTERM)",
                self.step,
            )
            final = False
        if final:
            self._guard("weights", lambda: self.capture_weights(self.step))
            if self.probe is not None and self.s.activations_every > 0:
                self._guard("activations", lambda: self.capture_activations(self.step))
        self.remove()

    def _may_gather(self, collectives: bool) -> bool:
        """Whether a sharded model's collective captures may run now (see :meth:`finish`)."""
        return collectives and threading.get_ident() == self._training_thread


# the captures alive in this process, for the one fork hook below (a hook per capture could
# never be unregistered: they would pile up, one per attach, each run at every fork)
_LIVE: weakref.WeakSet[Capture] = weakref.WeakSet()


def _inert_after_fork() -> None:
    for capture in list(_LIVE):
        capture._forked = True


os.register_at_fork(after_in_child=_inert_after_fork)
