"""Keeping the update sketch off the training step's critical path on CUDA.

Two parts, both no-ops on the CPU:

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
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from spectrawatch._sender import FrameItem
from spectrawatch.spectral.eigen import record_event


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
        self._versions = [p._version for p in self._params]

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
        written = any(p._version != v for p, v in zip(self._params, self._versions, strict=True))
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
