"""Keeping the update sketch off the training step's critical path on CUDA.

Three parts, all no-ops on the CPU:

- :class:`SketchStream`: the sketch of theta taken after optimizer step n runs on a side stream
  that first waits for the training stream (so it reads theta_n), and then overlaps the next
  step's forward and backward, which only read the parameters. The optimizer's pre-step hook makes
  the training stream wait for it before step n + 1 writes them. A write to a parameter between
  the two hooks (weight clipping after ``step()``, a manual re-initialisation) would race with the
  sketch: the hook compares every parameter's version counter with its value at the sketch and,
  if one moved, turns the side stream off for the rest of the run (the sketch then runs on the
  training stream, as with ``sketch_stream=False``). Such a write then lands in the row of step n
  or n + 1, never lost: rows are differences of theta sketches, so their sum over any window
  stays exact. Writes through ``.data`` do not move the version counter and are not detected;
  code that makes them should set ``sketch_stream=False``.
- :class:`PendingFrames`: a frame's rows leave the GPU by an asynchronous copy into pinned host
  memory; the frame is handed to the sender once the copy's event has completed, checked without
  waiting at the next step (and waited for at ``finish``). A ``.cpu()`` would make the training
  thread wait for the GPU to finish the step, draining the queue of launched work once a frame.
- :class:`GraphedSketch`: the sketch's launches (the Triton kernels, the small tensors' gather,
  the model row) captured once in a CUDA graph and replayed every step: a host-bound step (bf16
  autocast on a fast GPU) pays every microsecond of launch overhead in the hooks, and a replay
  is one launch instead of ~10 plus their Python.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import torch

from spectrawatch._sender import FrameItem
from spectrawatch.spectral.eigen import record_event

_VERSION = attrgetter("_version")


class SketchStream:
    """The side stream of the sketch (see the module docstring); ``enabled=False``: none."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._done: torch.cuda.Event | None = None
        self._device: torch.device | None = None
        self._params: list[torch.Tensor] = []
        self._versions: list[int] = []

    def use(self, device: torch.device) -> contextlib.AbstractContextManager[object]:
        """Context in which work for ``device`` goes to the side stream, after everything queued
        so far on the training stream; a null context where there is none."""
        if not self.enabled or device.type != "cuda":
            return contextlib.nullcontext()
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(device))
        return torch.cuda.stream(stream)

    def launched(self, device: torch.device, params: Sequence[torch.Tensor]) -> None:
        """Note a sketch of ``params`` just queued on the side stream of ``device``."""
        if not self.enabled or device.type != "cuda":
            return
        self._done = record_event(self._streams[device])
        self._device = device
        self._params = list(params)
        self._versions = list(map(_VERSION, self._params))

    def join(self) -> bool:
        """Make the training stream wait for the last sketch before it writes the parameters.

        Returns True (and turns the side stream off) when a parameter was written in place since
        that sketch was queued, i.e. the two may have overlapped.
        """
        done, device = self._done, self._device
        if done is None or device is None:
            return False
        torch.cuda.current_stream(device).wait_event(done)
        self._done = None
        written = list(map(_VERSION, self._params)) != self._versions
        self._params, self._versions = [], []
        if written:  # from now on the rows made on the side stream are used on this one
            torch.cuda.current_stream(device).wait_stream(self._streams[device])
            self.enabled = False
        return written


@dataclass
class _Pending:
    host: torch.Tensor
    ready: torch.cuda.Event | None
    build: Callable[[torch.Tensor], FrameItem]


class PendingFrames:
    """Frames whose rows are still being copied to the host, released in order."""

    def __init__(self) -> None:
        self._queue: deque[_Pending] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def copy(self, rows: torch.Tensor, build: Callable[[torch.Tensor], FrameItem]) -> None:
        """Start copying ``rows`` to the host (on the current stream); ``build(host_rows)`` makes
        the frame once they are there."""
        if rows.device.type == "cuda":
            host = rows.to("cpu", non_blocking=True)
            ready = record_event(torch.cuda.current_stream(rows.device))
        else:
            host, ready = rows, None
        self._queue.append(_Pending(host, ready, build))

    def release(self, emit: Callable[[FrameItem], None], *, wait: bool) -> None:
        """Emit the frames whose copies are done, oldest first (all of them if ``wait``)."""
        while self._queue:
            head = self._queue[0]
            if head.ready is not None:
                if wait:
                    head.ready.synchronize()
                elif not head.ready.query():  # type: ignore[no-untyped-call]
                    return
            self._queue.popleft()
            emit(head.build(head.host))


class GraphedSketch:
    """The all-parameter theta sketch ``(L + 1, d)`` (layers, then their sum) replayed from a CUDA
    graph; ``enabled=False``: never (the caller sketches eagerly).

    A graph reads the parameters at the addresses it was captured with, so it is keyed by the
    sketcher and every parameter's ``data_ptr()``: the first step with a new key runs eagerly
    (compiling the kernels and planning their launches), the second captures and replays, later
    ones replay. Optimizers update parameters in place, so the key stays; a parameter replaced
    or moved (``.data = ...``, ``model.to()``) changes it and the graph is captured anew. The
    capture itself synchronises the device and empties torch's cache of free GPU memory, once
    (``torch.cuda.graph``). A model with a non-contiguous parameter is never captured. A
    capture that fails turns graphs off for the run (:attr:`error` says why) and the call
    returns None: the eager path is the same sketch.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.error: str | None = None
        self.captures = 0
        self._seen: tuple[object, ...] | None = None
        self._key: tuple[object, ...] | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._out: torch.Tensor | None = None

    def __call__(
        self,
        sketch: Callable[[list[torch.Tensor]], torch.Tensor],
        params: list[torch.Tensor],
        ptrs: tuple[int, ...] | None = None,
    ) -> torch.Tensor | None:
        """A fresh ``(L + 1, d)`` sketch of ``params`` from the graph, on the current stream;
        None where this step must sketch eagerly. ``ptrs``: their ``data_ptr()``s, where the
        caller has them already."""
        if not self.enabled or not params or params[0].device.type != "cuda":
            return None
        if ptrs is None:
            ptrs = tuple(map(torch.Tensor.data_ptr, params))
        # the sketcher itself, not its id(): a new one (new layout) could reuse a freed one's id
        key = (sketch, ptrs)
        if self._graph is None or key != self._key:
            if key != self._seen:  # a new layout: eager once, capture on the next step
                self._seen, self._graph, self._out = key, None, None
                return None
            if not all(map(torch.Tensor.is_contiguous, params)):
                # the Triton sketch copies such a parameter and re-plans its launches (a copy
                # from host memory) on every call: nothing a graph could replay
                self.enabled = False
                return None
            try:
                self._capture(sketch, params)
            except Exception as exc:  # never again this run: the eager path is the same sketch
                self.enabled, self._graph, self._out = False, None, None
                self.error = f"{type(exc).__name__}: {exc}"[:300]
                return None
            self._key = key
        graph, out = self._graph, self._out
        if graph is None or out is None:  # unreachable: captured just above
            return None
        graph.replay()
        return out.clone()

    def _capture(
        self, sketch: Callable[[list[torch.Tensor]], torch.Tensor], params: list[torch.Tensor]
    ) -> None:
        graph = torch.cuda.CUDAGraph()
        # captured on the graph's own stream (nothing runs then); replayed on the caller's
        ctx: Any = torch.cuda.graph(graph, capture_error_mode="thread_local")
        with ctx:
            mat = sketch(params)
            out = torch.cat([mat, mat.sum(0, keepdim=True)])
        self._graph, self._out = graph, out
        self.captures += 1
