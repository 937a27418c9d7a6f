"""The side stream and asynchronous row copies of the update sketch (CPU: their logic)."""

from __future__ import annotations

import torch

from spectrawatch import wire
from spectrawatch._overlap import PendingFrames, SketchStream, _Pending
from spectrawatch._sender import FrameItem


class FakeEvent:
    def __init__(self) -> None:
        self.done = False
        self.waited = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = True
        self.done = True


def _frame(step: int) -> FrameItem:
    return FrameItem(wire.FrameKind.UPDATE_SKETCH, step, {"x": torch.zeros(1)}, {})


def test_frames_are_released_in_order_once_their_copies_are_done() -> None:
    pending = PendingFrames()
    events = [FakeEvent() for _ in range(3)]
    for i, ev in enumerate(events):
        pending._queue.append(_Pending(torch.zeros(1), ev, lambda _h, i=i: _frame(i)))
    out: list[FrameItem] = []
    pending.release(out.append, wait=False)
    assert out == []
    events[1].done = True  # a later copy done first: still waits for the oldest
    pending.release(out.append, wait=False)
    assert out == []
    events[0].done = True
    pending.release(out.append, wait=False)
    assert [f.step for f in out] == [0, 1]
    assert len(pending) == 1
    pending.release(out.append, wait=True)
    assert events[2].waited
    assert [f.step for f in out] == [0, 1, 2]
    assert len(pending) == 0


def test_cpu_rows_are_released_at_once_and_the_stream_is_a_no_op() -> None:
    pending = PendingFrames()
    rows = torch.arange(6.0).reshape(2, 3)
    pending.copy(rows, lambda host: FrameItem(wire.FrameKind.UPDATE_SKETCH, 1, {"r": host}, {}))
    out: list[FrameItem] = []
    pending.release(out.append, wait=False)
    assert out[0].tensors["r"] is rows
    stream = SketchStream(True)
    with stream.use(torch.device("cpu")):
        pass
    stream.launched(torch.device("cpu"), [rows])
    assert stream.join() is False
    assert stream.enabled
