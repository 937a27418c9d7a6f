"""The user-facing monitor: ``init`` / ``attach`` / ``log`` / ``step`` / ``finish``.

``from spectrawatch import monitor`` gives the documented module-level default instance (the
only global mutable state of the package); ``with spectrawatch.Monitor(project=..., run=...) as m``
runs several runs in one process. Every public method catches its own errors (logged once,
counted, reported to the server as client-stats): monitoring never raises into training.

Distributed: with ``rank0_only`` (default) only rank 0 has a sender. Under DDP the other ranks
do nothing (their parameters equal rank 0's). A model with sharded (FSDP2 DTensor) parameters
must be attached on *every* rank with the same arguments: non-zero ranks then join the
collective captures (sketch all_reduce, weight gathers, probe forward) and send nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import operator
import os
import re
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import FrameType, TracebackType
from typing import Any, NoReturn

import httpx
import torch
from torch import nn

from spectrawatch import _shards
from spectrawatch._capture import Capture, LossFn
from spectrawatch._model import unwrap_model
from spectrawatch._sender import ClientStats, ErrorLog, FrameItem, Sender
from spectrawatch._system import SystemSampler
from spectrawatch._transport import Api
from spectrawatch.config import ClientSettings, SettingsError
from spectrawatch.wire import MAX_STEP, NAME_MAX, TEXT_PATTERN

logger = logging.getLogger("spectrawatch")


def _generated_run_name() -> str:
    return f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(2)}"


def _in_dataloader_worker() -> bool:
    """True in a ``torch.utils.data.DataLoader`` worker process (fork or spawn)."""
    try:
        return torch.utils.data.get_worker_info() is not None
    except Exception:
        return False


def _is_nonzero_rank() -> bool:
    """Whether this process is a rank other than 0: the default process group's rank, or
    before ``init_process_group`` the ``RANK`` that torch's launchers (torchrun,
    ``torch.distributed.launch``) set, so that ``init()`` at the top of a script knows it."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return bool(dist.get_rank() != 0)
    except Exception:
        pass
    rank = os.environ.get("RANK", "").strip()
    return rank.isdigit() and int(rank) != 0


class Handle:
    """Returned by :meth:`Monitor.attach`; ``remove()`` detaches the hooks."""

    def __init__(self, monitor: Monitor, capture: Capture) -> None:
        self._monitor = monitor
        self.capture = capture

    def remove(self) -> None:
        try:
            self.capture.finish()
        except Exception as exc:
            self._monitor._errors.record("detach", exc)
        if self.capture in self._monitor._captures:
            self._monitor._captures.remove(self.capture)
            # a later attach in this run (another optimizer) numbers its steps after these
            self._monitor._detached_step = max(self._monitor._detached_step, self.capture.step)


class Monitor:
    """One run's client: settings, captures, the sender thread and the system metrics' sampler.

    ``Monitor(**settings)`` only stores settings (and the run's ``config`` and ``tags``, as
    :meth:`init` takes them); :meth:`init` (called implicitly by ``attach``, ``log`` or
    ``__enter__``) starts the run. After :meth:`finish` the same object can ``init`` another run.
    """

    def __init__(self, transport: httpx.BaseTransport | None = None, **settings: Any) -> None:
        self._init_kwargs = settings
        self._transport = transport
        self.settings: ClientSettings | None = None
        self.stats = ClientStats()
        self._errors = ErrorLog(self.stats)
        self._sender: Sender | None = None
        self._system: SystemSampler | None = None  # system metrics' thread (this run's)
        self._captures: list[Capture] = []
        self._active = False
        self._noop = False
        self._participant = False  # a non-zero rank: captures of sharded models, no sender
        self._last_step = 0
        self._detached_step = 0  # the last step of a capture removed from this run
        self._logged = False
        self._log_calls = 0  # log() calls of this run: progress a caught SystemExit is read by
        self._finished = False
        # the status the exit hook closes this run with if it is still open (None: by how the
        # script ends); a framework callback sets "crashed" while its training runs
        self._exit_status: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        """What a pickled monitor keeps: its constructor arguments. Lightning's spawn launchers
        (``strategy="ddp_spawn"``) pickle the Trainer with its callbacks, and with them this
        monitor, into each process they start; the copy is a fresh, unstarted ``Monitor(...)``
        (a run, its sender thread and hooks never travel, as across a fork)."""
        return {"transport": self._transport, "settings": dict(self._init_kwargs)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        Monitor.__init__(self, state["transport"], **state["settings"])

    # -- lifecycle -------------------------------------------------------------------------

    def init(
        self,
        url: str | None = None,
        project: str | None = None,
        run: str | None = None,
        token: str | None = None,
        config: Mapping[str, Any] | None = None,
        tags: Sequence[str] | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        **settings: Any,
    ) -> Monitor:
        """Start a run (lazily created on the server by the sender thread); returns ``self``.

        Arguments override ``Monitor(...)`` arguments (``config`` and ``tags`` included),
        which override ``SPECTRAWATCH_*`` env.
        Invalid settings raise :class:`~spectrawatch.config.SettingsError` here -- the one
        place the client raises, before training starts. In a DataLoader worker it does
        nothing (the monitor stays a no-op there): a worker never trains, and one started by
        ``spawn`` (a fresh interpreter) would otherwise start a sender and a run of its own.
        """
        if _in_dataloader_worker():
            if not self._active:  # a forked worker keeps the parent's state (inert after fork)
                self._active, self._noop = True, True
            return self
        if self._active:
            self.finish()
        merged = {
            **self._init_kwargs,
            **settings,
            "url": url,
            "project": project,
            "run": run,
            "token": token,
        }
        merged = {k: v for k, v in merged.items() if v is not None}
        for key in ("url", "project", "run", "token"):
            merged.setdefault(key, self._init_kwargs.get(key))
        # the run's config and tags, from Monitor(...) unless given here: not settings
        config = config if config is not None else merged.get("config")
        tags = tags if tags is not None else merged.get("tags")
        merged.pop("config", None)
        merged.pop("tags", None)
        s = ClientSettings.from_env(**merged)
        self.settings = s
        self.stats = ClientStats()
        self._errors = ErrorLog(self.stats)
        self._captures = []
        self._last_step = 0
        self._detached_step = 0
        self._logged = False
        self._log_calls = 0  # log() calls of this run: progress a caught SystemExit is read by
        self._finished = False
        self._exit_status = None
        self._active = True
        self._participant = s.mode != "disabled" and s.rank0_only and _is_nonzero_rank()
        self._noop = s.mode == "disabled" or self._participant
        if self._noop:
            return self
        try:
            auto = s.run is None
            name = s.run or _generated_run_name()
            api = Api(
                s.url,
                s.token,
                s.timeout_s,
                transport=transport or self._transport,
                deadline_s=s.request_deadline_s,
            )
            self._sender = Sender(
                s,
                api,
                name,
                auto_named=auto,
                config=config,
                tags=tags,
                stats=self.stats,
                errors=self._errors,
            )
            self._sender.start()
            if s.system_every_s > 0:
                self._system = SystemSampler(
                    s.system_every_s, self._current_step, self._sender.put_scalars, self._errors
                )
                self._system.start()
        except Exception as exc:
            self._errors.record("init", exc)
            self._noop = True
        if self._active:
            _keep_until_finish(self)
            if s.handle_sigterm:
                _handle_sigterm()
        return self

    def _ensure_init(self) -> bool:
        if not self._active:
            if self._finished:  # not a new auto-named run: the user ended this one
                self._errors.note(
                    "after finish",
                    "log()/attach() after finish() ignored; call init() to start another run",
                )
                return False
            try:
                self.init()
            except Exception as exc:
                self._errors.record("init", exc)
                return False
        return not self._noop

    def attach(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        probe: Any = None,
        modules: Iterable[str | nn.Module] | nn.Module | None = None,
        every: int | Mapping[str, int] | None = None,
        *,
        loss_fn: LossFn | None = None,
        sample_batch: Callable[[], Any] | None = None,
        start_step: int | None = None,
    ) -> Handle | None:
        """Hook ``model`` (and ``optimizer``'s step); returns a removable :class:`Handle`.

        ``every``: an int sets the update-sketch cadence; a mapping may set any of ``update``,
        ``theta``, ``weights``, ``activations``, ``defect`` (optimizer steps; 0 = off).
        ``probe``: a fixed batch for activation spectra, taken at the modules ``modules`` names
        or holds (one name or module, or several; default: every ``Linear``/``Conv`` up to
        ``max_activation_hidden`` wide). ``loss_fn(model, batch)`` with
        ``sample_batch()`` turns on the commutator-defect probe. Without an optimizer, call
        :meth:`step` after each optimizer step. ``start_step``: the optimizer step the model
        is at (a checkpoint's); by default 0, or, when ``init`` resumed an existing run, the
        run's last step on the server (waiting up to ``resume_wait_s`` for its answer;
        multi-rank runs always start at 0 unless given). Returns None (and captures nothing) if the
        monitor is disabled, on a non-zero rank for an unsharded model, or if the attach failed
        (the error is logged); an invalid ``every``, or a name in ``modules`` the model lacks or
        a module not in it, raises :class:`~spectrawatch.config.SettingsError`. One model per
        monitor: attaching the same model and optimizer again returns a handle to the same hooks
        (none are added; the other arguments are ignored); the same model with a new optimizer
        over its parameters (an optimizer cell run again) moves the step hooks to it, steps
        continuing; another model is refused (logged): ``handle.remove()`` first (the run may
        then attach it, its steps continuing after the removed one's), or another
        :class:`Monitor`. FSDP1 ``FullyShardedDataParallel`` is refused (logged); use FSDP2
        ``fully_shard``.
        """
        ready = self._ensure_init() and not self._rank_now_nonzero()
        if not ready and not self._participant:
            return None
        assert self.settings is not None
        s = self.settings
        if every is not None:  # a bad cadence raises SettingsError here, before training
            if not isinstance(every, Mapping):
                every = {"update": every}
            unknown = set(every) - {"update", "theta", "weights", "activations", "defect"}
            if unknown:
                raise SettingsError(f"unknown cadence(s) in every=: {sorted(unknown)}")
            s = s.replace(**{f"{k}_every": _cadence(k, v) for k, v in every.items()})
        if modules is not None:  # a misspelt name or a foreign module raises here, before training
            # one name or one module (a Sequential/ModuleList still stands for its children)
            if isinstance(modules, str) or not isinstance(modules, Iterable):
                modules = [modules]
            modules = list(modules)
            named = dict(unwrap_model(model).named_modules())
            missing = [m for m in modules if isinstance(m, str) and m not in named]
            if missing:
                raise SettingsError(f"modules=: no module named {missing[:5]} in the model")
            ours = {id(m) for m in named.values()}
            foreign = [m for m in modules if not isinstance(m, str) and id(m) not in ours]
            if foreign:
                raise SettingsError(
                    f"modules=: {len(foreign)} module(s) not in the model, e.g. "
                    f"{type(foreign[0]).__name__}"
                )
        if self._captures:
            return self._attach_again(self._captures[0], unwrap_model(model), optimizer)
        if start_step is None:
            start_step = max(self._resumed_step(s), self._detached_step)
        try:
            if _shards.uses_fsdp1(model):
                raise NotImplementedError("FSDP1 is not supported: shard with fully_shard (FSDP2)")
            if self._participant:
                if not _shards.has_sharded_params(model):
                    return None  # DDP / replicated: rank 0 alone captures
                emit_frame: Callable[[FrameItem], None] = _discard
                emit_scalars: Callable[[list[dict[str, Any]]], None] = _discard
            else:
                assert self._sender is not None
                emit_frame, emit_scalars = self._sender.put_frame, self._sender.put_scalars
            capture = Capture(
                model,
                optimizer,
                s,
                emit_frame,
                emit_scalars,
                self._errors,
                self.stats,
                probe=probe,
                modules=modules,
                loss_fn=loss_fn,
                sample_batch=sample_batch,
                start_step=start_step,
                emits=not self._participant,
            )
            self._captures.append(capture)
            return Handle(self, capture)
        except Exception as exc:
            self._errors.record("attach", exc)
            return None

    def _rank_now_nonzero(self) -> bool:
        """Whether ``init`` took this process for rank 0 (no process group, no ``RANK``) and
        the process group since started says otherwise: then it becomes a participant (it
        sends nothing more) and closes the sender it started (logged). That sender has already
        created or resumed its run: a run of its own (a generated name, or a new one under
        ``resume="never"``) is closed ``finished``, one named for every rank is left
        ``running`` for rank 0."""
        s = self.settings
        if s is None or self._participant or not s.rank0_only or not _is_nonzero_rank():
            return False
        logger.warning(
            "spectrawatch: init() ran before init_process_group without RANK set; this rank is "
            "not rank 0 and sends nothing from now on (call init() after init_process_group)"
        )
        sender, self._sender = self._sender, None
        self._participant, self._noop = True, True
        _LIVE.discard(self)
        self._stop_system()
        if sender is not None:
            try:
                own = sender.auto_named or sender.settings.resume == "never"
                sender.close("finished" if own else "running", None, 2.0)
            except Exception as exc:
                self._errors.record("init", exc)
        return True

    def _attach_again(
        self, first: Capture, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> Handle | None:
        """``attach`` when ``first`` already watches a model: the same model and optimizer give
        its handle; the same model with an optimizer that replaces the attached one (a
        notebook's optimizer cell run again) moves its step hooks there, steps continuing;
        anything else is refused (logged), naming the remedy."""
        if first.model is model:
            if first.optimizer is optimizer:
                return Handle(self, first)  # attached already: the same hooks, not twice
            if _replaces(first.optimizer, optimizer):
                assert optimizer is not None
                first.follow(optimizer)
                logger.info(
                    "spectrawatch: attach: a new optimizer for the attached model; its steps "
                    "continue after step %d",
                    first.step,
                )
                return Handle(self, first)
            problem = (
                "this monitor already watches this model with another optimizer (or none), "
                "which this one does not replace: call remove() on the first attach's handle, "
                "then attach again (its steps continue), or attach without an optimizer and "
                "call monitor.step() after each step for several optimizers"
            )
        else:
            problem = (
                "this monitor already watches another model: one model per run; call remove() "
                "on the first attach's handle to watch this one instead (its steps continue), "
                "or use another Monitor (another run) to watch both"
            )
        self._errors.record("attach", ValueError(problem))
        return None

    def _resumed_step(self, s: ClientSettings) -> int:
        """A resumed run's last step on the server (0 for a new run, or without an answer)."""
        sender = self._sender
        if sender is None or self._participant or _shards.world_size() > 1:
            return 0  # ranks must agree on step numbers (cadences decide collectives)
        if not sender.first_contact.wait(s.resume_wait_s):
            return 0
        info = sender.run_info
        last = info.get("last_step")
        if info.get("_status") != 200 or not isinstance(last, int) or isinstance(last, bool):
            return 0
        if last > 0:
            logger.info(
                "spectrawatch: run %r resumed: its steps continue after step %d (pass "
                "attach(..., start_step=N) to number them otherwise)",
                sender.run_name,
                last,
            )
        return max(0, last)

    def step(self, step: int | None = None) -> None:
        """Signal an optimizer step for models attached without an optimizer (call it after
        each one; ``step`` defaults to the previous one + 1). A ``step`` not above the previous
        one is ignored (counted as ``steps_not_increasing``, logged once), like a late
        :meth:`log`. The first update row is the change between the first two calls."""
        if not self._active or (self._noop and not self._participant):
            return
        for c in self._captures:
            if c.optimizer is None:
                c.on_step(step)

    def log(self, values: Mapping[str, Any], step: int | None = None) -> None:
        """Queue scalars ``{name: number}`` at ``step`` (default: the latest optimizer step of
        the attached model; with none attached, one step per call from 0).

        Non-numeric values and names the server refuses (empty, over 200 characters, control
        characters) are skipped one by one (counted as errors). NaN/Inf values are sent (the
        server stores them as null, a gap in the chart, and a rule on the scalar fires on
        them); the first step per name goes in the client stats (``nonfinite_scalars``, where
        the dashboards mark it), logged once per name. Tensors are read with ``float()``.
        ``train/loss``-style names are fine.
        """
        if not self._ensure_init():
            return
        try:
            assert self._sender is not None
            if step is None:  # the latest optimizer step; without a model: one step per call
                if self._captures:
                    step = max(c.step for c in self._captures)
                else:
                    step = self._last_step + 1 if self._logged else 0
            step = int(step)
            if not 0 <= step <= MAX_STEP:
                self._errors.record("log", ValueError(f"step {step} outside [0, {MAX_STEP}]"))
                return
            self._last_step = max(self._last_step, step)
            self._logged = True
            self._log_calls += 1
            rows = []
            for name, value in values.items():
                key = str(name)
                if not _valid_scalar_name(key):  # the server would refuse the whole batch
                    self._errors.record(
                        "log", ValueError(f"scalar name {key[:80]!r}: 1-200 characters, no control")
                    )
                    continue
                try:
                    v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
                except Exception as exc:  # str, complex, meta tensor, 10**400: skip this one
                    self._errors.record(f"log {name!r}", exc)
                    continue
                if not math.isfinite(v):  # sent; its first step also goes in the client stats
                    # (data, not a client error: a NaN loss made every later step an "error")
                    self.stats.nonfinite_scalar(key, step, v)
                    self._errors.note(
                        f"log {key!r} non-finite",
                        f"{key} is {v} at step {step} (stored as null; client stats: "
                        "nonfinite_scalars)",
                    )
                rows.append({"step": step, "name": key, "value": v})
            self._sender.put_scalars(rows)
        except Exception as exc:
            self._errors.record("log", exc)

    def finish(self, status: str = "finished", timeout: float | None = None) -> bool:
        """Flush captures and the queue (bounded by ``timeout``), close the run.

        Returns True when everything was delivered or spooled in time. A sharded (FSDP2)
        model's final weight snapshot and probe capture are collectives: call ``finish()`` on
        every rank, from the training thread (the exit hook and a SIGTERM skip them).
        """
        return self._close(status, timeout, collectives=True)

    def _close(self, status: str, timeout: float | None, *, collectives: bool) -> bool:
        """:meth:`finish`; ``collectives=False`` (the exit hook, a SIGTERM) skips a sharded
        model's collective final captures, whose other ranks cannot be assumed to join."""
        if not self._active:
            return True
        self._active = False
        self._finished = True
        _LIVE.discard(self)
        _CLOSING[self] = status  # a SIGTERM meanwhile waits for this close (see _on_sigterm)
        ok = True
        try:
            self._stop_system()
            for c in list(self._captures):
                c.finish(collectives)  # participants too: the final weight gather is collective
            self._captures = []
            if self._sender is not None:
                ok = self._sender.close(status, None, timeout)  # it adds its final stats
        except Exception as exc:
            self._errors.record("finish", exc)
            ok = False
        finally:
            _CLOSING.pop(self, None)
            _release_sigterm()
        return ok

    def _stop_system(self) -> None:
        sampler, self._system = self._system, None
        if sampler is not None:
            sampler.stop()

    def _current_step(self) -> int | None:
        """Where the system metrics' samples go: the latest step of this session (an attached
        model's optimizer step, a logged step, a removed model's last step). Before its first:
        step 0 of a new run; ``None`` (the sample is skipped) where the run already has later
        steps (resumed: the last step its join reported, or ``attach``'s ``start_step``), whose
        step 0 and last step hold the earlier session's samples."""
        captures = list(self._captures)
        steps = [c.step for c in captures if c.stepped]
        if self._logged:
            steps.append(self._last_step)
        if self._detached_step > 0:
            steps.append(self._detached_step)
        if steps:
            return max(steps)
        earlier = max([self._joined_last_step(), *(c.step for c in captures)])
        return None if earlier > 0 else 0

    def _joined_last_step(self) -> int:
        """The run's last step as joining it reported (0: a new run, or no answer yet)."""
        last = self._sender.run_info.get("last_step") if self._sender is not None else None
        return last if isinstance(last, int) and not isinstance(last, bool) else 0

    # -- introspection ---------------------------------------------------------------------

    @property
    def run_id(self) -> int | str | None:
        return self._sender.run_id if self._sender is not None else None

    @property
    def run_name(self) -> str | None:
        return self._sender.run_name if self._sender is not None else None

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until queued items are handed to the server or spool (tests, benchmarks);
        frames whose rows are still being copied off the GPU are waited for first. Call it
        from the training thread."""
        for c in list(self._captures):
            c.release_frames()
        return self._sender.wait_idle(timeout) if self._sender is not None else True

    def _queue_frame(self, item: FrameItem) -> None:
        if self._sender is not None:
            self._sender.put_frame(item)

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> Monitor:
        if not self._active:
            self.init()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish("crashed" if exc_type is not None else "finished")


def _replaces(old: torch.optim.Optimizer | None, new: torch.optim.Optimizer | None) -> bool:
    """Whether ``new`` takes over from ``old``: both are optimizers over a parameter in common
    (one over other parameters is a second optimizer, stepped besides the first)."""
    if old is None or new is None:
        return False
    ids = {id(p) for group in old.param_groups for p in group["params"]}
    return any(id(p) in ids for group in new.param_groups for p in group["params"])


def _discard(item: Any) -> None:
    """The emitter of a participant rank: frames and scalars go nowhere."""


_LIVE: set[Monitor] = set()
"""Active monitors: a ``Monitor`` created in a function and never finished is still flushed."""
_CLOSING: dict[Monitor, str] = {}
"""Monitors whose ``finish`` is under way, with the status it closes them with."""


_exit_hook = False
_uncaught: list[type[BaseException]] = []
"""The exception that is ending the script, if one is (noted by :func:`_note_uncaught`)."""
_failing_exit: list[int] = []
"""The live runs' progress (:func:`_progress`) when ``sys.exit`` was last called with a failing
code (noted by :func:`_note_exit`); empty after a succeeding one."""


def _keep_until_finish(m: Monitor) -> None:
    """Hold ``m`` until ``finish()``; the exit hook is registered at the first ``init`` (so it
    runs before the handlers of libraries imported earlier, as a per-monitor hook did), with an
    ``excepthook`` in front of the one in place that notes a script dying of an exception and a
    ``sys.exit`` in front of the one in place that notes a failing exit code."""
    global _exit_hook
    if not _exit_hook:
        atexit.register(_finish_at_exit)
        sys.excepthook = _note_uncaught(sys.excepthook)
        sys.exit = _note_exit(sys.exit)
        _exit_hook = True
    _LIVE.add(m)


def _note_uncaught(previous: Any) -> Any:
    """``sys.excepthook`` noting an uncaught exception, then handing it on. Outside an
    interactive session such an exception ends the script, so its unfinished runs close as
    ``crashed``; in a REPL it ends one statement, and the session goes on."""

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if not (hasattr(sys, "ps1") or sys.flags.interactive):
            _uncaught.append(kind)
        previous(kind, value, tb)

    return hook


def _note_exit(previous: Any) -> Any:
    """``sys.exit`` noting a failing code (anything but ``None`` or ``0``, as the interpreter
    reads it) with the runs' progress then, and handing it on. Only the main thread's call ends
    the script. A ``SystemExit`` the script catches (argparse's, in a ``try``) is forgotten once
    a run steps or logs again, or by a later succeeding ``sys.exit``; one caught at the very end
    still counts (as with W&B's exit hook; a bare ``raise SystemExit(1)`` is not seen)."""

    def noting_exit(code: object = None) -> NoReturn:
        if threading.current_thread() is threading.main_thread():
            ok = code is None or (isinstance(code, int) and code == 0)
            _failing_exit[:] = [] if ok else [_progress()]
        previous(code)
        raise SystemExit(code)  # a replaced sys.exit that returned

    return noting_exit


def _progress() -> int:
    """A number that grows whenever a live run steps or logs."""
    return sum(m._log_calls + sum(c.step for c in m._captures) for m in list(_LIVE))


def _finish_at_exit() -> None:
    failed = bool(_failing_exit) and _failing_exit[0] == _progress()  # not caught and gone on
    status = "crashed" if _uncaught or failed else "finished"
    for m in list(_LIVE):
        s = m.settings
        with contextlib.suppress(Exception):  # interpreter shutdown: nothing left to tell
            m._close(
                m._exit_status or status,
                min(s.flush_timeout_s, 10.0) if s else 10.0,
                collectives=False,  # a sharded model's other ranks may be gone or elsewhere
            )


_SIGTERM_FLUSH_S = 5.0
"""How long a SIGTERM waits for the server, all live runs together, before what is left goes
to the spool (a scheduler sends SIGKILL after its grace period: 30 s by default for SLURM's
``KillWait`` and Kubernetes' ``terminationGracePeriodSeconds``)."""
_SIGTERM_SPOOL_S = 3.0
"""The extra time a SIGTERM gives the spooling of what the server did not take."""
_sigterm_pid: int | None = None
"""The process that installed :func:`_on_sigterm` (a forked child inherits the handler)."""
_sigterm_closer: tuple[threading.Thread, float] | None = None
"""The thread closing the runs on the first SIGTERM, and when the process dies at the latest
(a SIGTERM arriving meanwhile waits for the same thread, up to the same time)."""


def _handle_sigterm() -> None:
    """Install :func:`_on_sigterm` for SIGTERM: in the main thread only, and only while SIGTERM
    has its default action. A handler of anyone else (Lightning, a launcher, the user) is left
    alone, and one installed later over ours owns SIGTERM from then on."""
    global _sigterm_pid
    if threading.current_thread() is not threading.main_thread():
        return  # signal.signal works in the main thread only
    try:
        current = signal.getsignal(signal.SIGTERM)
        if current is signal.SIG_DFL or current is _on_sigterm:
            signal.signal(signal.SIGTERM, _on_sigterm)
            _sigterm_pid = os.getpid()
    except (ValueError, OSError, AttributeError):  # no SIGTERM here, or not the main interpreter
        return


def _release_sigterm() -> None:
    """Give SIGTERM back its default action once no run is live or closing (from the main
    thread)."""
    if _LIVE or _CLOSING or threading.current_thread() is not threading.main_thread():
        return
    with contextlib.suppress(ValueError, OSError, AttributeError):
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (a scheduler's time limit, an eviction, ``timeout``), whose default action skips
    the exit hook: close the live runs as ``crashed`` (see :func:`_finish_on_sigterm`), then
    die of the signal as the default action would, so the exit status is unchanged.

    The runs are closed on another thread, waited for a bounded time: the main thread may be
    interrupted holding a lock that closing them takes. A second SIGTERM (torchrun's agent and
    schedulers repeat it) waits for the first one's closing thread until the same deadline; it
    used to find no live run and kill at once, losing what was being flushed. Called by a
    handler installed over it (Lightning's calls the one it found), it does nothing: that
    handler decides how the process ends (its exceptions and the exit hook close the runs)."""
    global _sigterm_closer
    if signal.getsignal(signal.SIGTERM) is not _on_sigterm:
        return
    try:
        if os.getpid() == _sigterm_pid:
            if _sigterm_closer is None:
                closer = threading.Thread(
                    target=_finish_on_sigterm, name="spectrawatch-sigterm", daemon=True
                )
                end = time.monotonic() + _SIGTERM_FLUSH_S + _SIGTERM_SPOOL_S
                _sigterm_closer = (closer, end)
                closer.start()
            closer, end = _sigterm_closer
            closer.join(max(end - time.monotonic(), 0.0))
    except Exception:  # never raise from a signal handler: the process ends either way
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _finish_on_sigterm() -> None:
    """Finish every live run as ``crashed``, each within its ``flush_timeout_s`` and all
    within :data:`_SIGTERM_FLUSH_S` for the server; what is left goes to the spool. A close
    already under way (the exit hook's, a ``finish()`` the signal interrupted) is hurried to
    the same deadline and waited for, keeping its status."""
    deadline = time.monotonic() + _SIGTERM_FLUSH_S
    for m in list(_LIVE):
        s = m.settings
        left = max(deadline - time.monotonic(), 0.1)
        with contextlib.suppress(Exception):
            m._close("crashed", min(s.flush_timeout_s, left) if s else left, collectives=False)
    for m, status in list(_CLOSING.items()):
        left = max(deadline - time.monotonic(), 0.1)
        with contextlib.suppress(Exception):
            if m._sender is not None:  # its capture flush may be cut short: the rest goes
                m._sender.close(status, None, left)


monitor = Monitor()
"""The documented default instance: ``from spectrawatch import monitor``."""


def _cadence(name: str, value: Any) -> int:
    """A cadence of ``attach(every=...)`` as an int: a whole number of optimizer steps."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        return operator.index(value)
    except TypeError:
        raise SettingsError(
            f"every=: the {name} cadence must be a whole number of optimizer steps, got {value!r}"
        ) from None


def _valid_scalar_name(name: str) -> bool:
    """The server's rule for scalar names (``schemas.ScalarName``)."""
    return len(name) <= NAME_MAX and re.fullmatch(TEXT_PATTERN, name) is not None
