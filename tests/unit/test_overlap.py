"""The side stream and asynchronous row copies of the update sketch (CPU: their logic)."""

from __future__ import annotations

import gc

import pytest
import torch

from spectrawatch import _overlap, wire
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


def test_a_pinned_buffer_is_reused_only_once_the_frame_made_from_it_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[torch.Tensor] = []

    def empty(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        made.append(torch.empty(shape, dtype=dtype))  # pinned memory needs CUDA
        return made[-1]

    monkeypatch.setattr(_overlap, "_pinned_empty", empty)
    pending = PendingFrames(pinned_max_bytes=3 * 2 * 3 * 4)
    rows = torch.zeros(2, 3)
    first = pending._buffer(rows)
    assert first is not None
    assert pending._buffer(rows) is not first  # busy until its frame is built
    pending._queue.append(_Pending(first.buf, None, lambda h: _frame(0), first))
    out: list[FrameItem] = []
    pending.release(out.append, wait=False)
    assert not first.free  # its frame lives
    assert pending._buffer(torch.zeros(3, 2)) is not first  # another shape: a new buffer
    assert pending._buffer(rows) is None  # three kept: the byte cap is reached
    out.clear()
    gc.collect()
    assert first.free
    assert pending._buffer(rows) is first
    assert len(made) == 3


@pytest.mark.gpu
def test_rows_reach_the_host_through_a_reused_pinned_buffer() -> None:
    pending = PendingFrames()
    out: list[FrameItem] = []
    hosts = []
    for step in range(3):
        rows = torch.full((4, 2, 8), float(step), device="cuda")
        pending.copy(
            rows, lambda h, s=step: FrameItem(wire.FrameKind.UPDATE_SKETCH, s, {"r": h}, {})
        )
        pending.release(out.append, wait=True)
        assert torch.equal(out[-1].tensors["r"], rows.cpu())
        assert out[-1].tensors["r"].is_pinned()
        hosts.append(out[-1].tensors["r"].data_ptr())
        out.clear()  # the frame is gone: its buffer is free again
    assert hosts[0] == hosts[1] == hosts[2]
    assert len(pending._pinned) == 1
