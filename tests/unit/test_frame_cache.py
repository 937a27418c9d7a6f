"""The worker's frame loading: its cache of decoded sketch frames (``FrameLoader``: hits, keys
and its bound) and earlier frames whose blob is missing (``RunHistory``)."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from spectrawatch.wire import FrameKind, FrameLimits, encode_frame
from spectrawatch_server.db.models import Frame, Metric
from spectrawatch_server.storage import repository as repo
from spectrawatch_server.storage.blobs import LocalBlobStore
from spectrawatch_server.worker import FrameLoader, Worker

ROWS = torch.arange(16 * 64, dtype=torch.float32).reshape(16, 64)  # 4 KiB of tensor


def _frame(store: LocalBlobStore, frame_id: int, kind: FrameKind, scale: float = 1.0) -> Frame:
    """A frame row (not in a database) whose blob holds ``ROWS * scale``."""
    key = f"run/{frame_id}.st"
    body = encode_frame(kind, 0, frame_id, {"layer": ROWS * scale}, {"steps": list(range(16))})
    upload = store.new_upload()
    upload.write(body)
    store.commit_upload(upload, key)
    created = dt.datetime(2026, 11, 28, tzinfo=dt.UTC)
    return Frame(
        id=frame_id, kind=kind.value, blob_key=key, bytes=len(body), created_at=created, run_id=1
    )


def _loader(tmp_path: Path, cache_bytes: int) -> tuple[LocalBlobStore, FrameLoader]:
    store = LocalBlobStore(tmp_path)
    return store, FrameLoader(store, torch.device("cpu"), FrameLimits(), 1 << 20, cache_bytes)


def test_a_sketch_frame_is_decoded_once_and_served_from_the_cache(tmp_path: Path) -> None:
    store, loader = _loader(tmp_path, 1 << 20)
    frame = _frame(store, 1, FrameKind.UPDATE_SKETCH)
    first = loader.load(frame)
    store.delete(frame.blob_key)  # a second read of the blob would now fail
    assert loader.load(frame) is first
    assert loader.hits == 1
    torch.testing.assert_close(first.tensors["layer"], ROWS, rtol=0, atol=0)


def test_a_reused_id_with_a_new_blob_or_creation_time_is_read_anew(tmp_path: Path) -> None:
    """A database may hand a deleted run's frame id to a new frame: never its old tensors."""
    store, loader = _loader(tmp_path, 1 << 20)
    old = loader.load(_frame(store, 7, FrameKind.UPDATE_SKETCH))
    again = _frame(store, 7, FrameKind.UPDATE_SKETCH, scale=2.0)  # same id and blob key
    again.created_at = again.created_at + dt.timedelta(seconds=1)
    new = loader.load(again)
    assert new is not old
    torch.testing.assert_close(new.tensors["layer"], ROWS * 2, rtol=0, atol=0)


def test_the_cache_holds_at_most_its_bytes_dropping_the_least_recently_used(
    tmp_path: Path,
) -> None:
    store, loader = _loader(tmp_path, 2 * ROWS.numel() * 4)  # room for two frames
    frames = [_frame(store, i, FrameKind.PARAM_SKETCH) for i in range(3)]
    a = loader.load(frames[0])
    loader.load(frames[1])
    assert loader.load(frames[0]) is a  # frame 0 used last: frame 1 is the oldest
    loader.load(frames[2])
    assert loader.load(frames[0]) is a
    assert loader.hits == 2
    before = loader.hits
    loader.load(frames[1])  # evicted: decoded again
    assert loader.hits == before


def test_other_kinds_and_a_zero_budget_are_never_cached(tmp_path: Path) -> None:
    store, loader = _loader(tmp_path, 1 << 20)
    weights = _frame(store, 1, FrameKind.WEIGHTS)
    assert loader.load(weights) is not loader.load(weights)
    _, off = _loader(tmp_path, 0)
    sketch = _frame(store, 2, FrameKind.UPDATE_SKETCH)
    assert off.load(sketch) is not off.load(sketch)
    assert loader.hits == off.hits == 0


def test_payloads_become_json_values_with_non_finite_floats_as_null() -> None:
    from spectrawatch_server.worker import _jsonable

    nan, inf = float("nan"), float("inf")
    payload = {
        "sv": [3.0, nan, inf, 1.0],  # the fast path: a list of floats
        "mixed": (1, 2.5, -inf, None),
        "tensor": torch.tensor([1.0, float("nan")]),
        2: {"x": torch.tensor(0.5, dtype=torch.float64).numpy(), "y": np.float64(0.25)},
    }
    assert _jsonable(payload) == {
        "sv": [3.0, None, None, 1.0],
        "mixed": [1, 2.5, None, None],
        "tensor": [1.0, None],
        "2": {"x": 0.5, "y": 0.25},
    }
    assert type(_jsonable(payload)["2"]["y"]) is float


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fds by /proc")
def test_a_committed_blob_is_fsynced_then_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blob first: the row committed next must never name a blob a power loss took. The file
    was fsynced but not the directory holding the rename, which a power loss can undo."""
    import os

    store = LocalBlobStore(tmp_path)
    synced: list[str] = []
    fsync = os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    upload = store.new_upload()
    upload.write(b"body")
    store.commit_upload(upload, "runs/1/7")
    assert store.read("runs/1/7") == b"body"
    assert synced[0].endswith(".part")
    assert synced[1:] == [str(store.path("runs/1/7").parent)]


def test_a_filesystem_that_cannot_fsync_a_directory_still_stores_blobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some FUSE and network mounts answer EINVAL to a directory fsync: every ingest would
    have answered 500. The blob is stored; other errors still fail the upload."""
    import errno
    import os
    import stat

    store = LocalBlobStore(tmp_path)
    fsync = os.fsync

    def commit_where_dir_fsync_fails(key: str, code: int) -> None:
        def failing(fd: int) -> None:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(code, os.strerror(code))
            fsync(fd)

        monkeypatch.setattr(os, "fsync", failing)
        upload = store.new_upload()
        upload.write(b"body")
        store.commit_upload(upload, key)

    commit_where_dir_fsync_fails("runs/1/8", errno.EINVAL)
    assert store.read("runs/1/8") == b"body"
    with pytest.raises(OSError, match=os.strerror(errno.EIO)):
        commit_where_dir_fsync_fails("runs/1/9", errno.EIO)


def _update_frames(
    sessions: sessionmaker[Session], store: LocalBlobStore, run: str, rows: torch.Tensor
) -> list[int]:
    """A run of update-sketch frames of 4 rows each (steps 1, 2, ...) of layer ``w``; ids."""
    with sessions.begin() as session:
        project, _ = repo.get_or_create_project(session, "p")
        run_id = repo.get_or_create_run(session, project, run, {}, [])[0].id
    ids = []
    for seq in range(len(rows) // 4):
        info = {"steps": list(range(4 * seq + 1, 4 * seq + 5))}
        body = encode_frame(
            FrameKind.UPDATE_SKETCH, 4 * seq + 1, seq, {"w": rows[4 * seq :][:4]}, info
        )
        key = f"runs/{run_id}/{seq}.st"
        upload = store.new_upload()
        upload.write(body)
        store.commit_upload(upload, key)
        with sessions.begin() as session:
            frame = Frame(
                run_id=run_id,
                kind=FrameKind.UPDATE_SKETCH.value,
                step=4 * seq + 1,
                seq=seq,
                idempotency_key=f"{run}:{seq}",
                blob_key=key,
                bytes=len(body),
                info=info,
                layers=["w"],
                nonfinite={},
            )
            session.add(frame)
            session.flush()
            ids.append(frame.id)
    return ids


def _metrics_after(
    sessions: sessionmaker[Session], ids: list[int], step: int
) -> dict[tuple[str, str, int], float]:
    with sessions() as session:
        rows = session.execute(
            select(Metric.layer, Metric.name, Metric.step, Metric.value).where(
                Metric.frame_id.in_(ids), Metric.step > step
            )
        ).all()
    return {(layer, name, at): value for layer, name, at, value in rows}


def test_a_missing_history_blob_is_a_gap_in_later_frames_as_a_pruned_frame(
    sessions: sessionmaker[Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An earlier frame's blob gone from the store (deleted by hand, lost, expired by a bucket
    rule): each later frame whose SED windows cover it (17 frames back for W = 64) failed
    (``sed: FileNotFoundError``), losing the run's SED from there on. Now it is read as a pruned
    frame: the same values, its windows incomplete; one warning names it; the frame itself
    still fails, naming its blob."""
    store = LocalBlobStore(tmp_path / "blobs")
    rows = torch.randn(40, 24, generator=torch.Generator().manual_seed(3))
    lost, pruned = (_update_frames(sessions, store, run, rows) for run in ("lost", "pruned"))
    worker = Worker(sessions, FrameLoader(store, torch.device("cpu"), FrameLimits(), 1 << 26, 0))
    for frame_id in lost[:4] + pruned[:4]:
        worker.process(frame_id)
    with sessions.begin() as session:  # steps 13-16: lost in one run, pruned in the other
        lost_key = session.get_one(Frame, lost[3]).blob_key
        store.delete(lost_key)
        store.delete(session.get_one(Frame, pruned[3]).blob_key)
        session.execute(update(Frame).where(Frame.id == pruned[3]).values(blob_key=""))
    with caplog.at_level(logging.WARNING, logger="spectrawatch_server.worker"):
        for frame_id in lost[4:] + pruned[4:]:
            worker.process(frame_id)
    with sessions() as session:
        later = [session.get_one(Frame, i) for i in lost[4:]]
        assert [(f.status, f.error) for f in later] == [("done", None)] * len(later)
    got = _metrics_after(sessions, lost, 16)
    assert got == _metrics_after(sessions, pruned, 16)
    gaps = {step for (layer, name, step) in got if (layer, name) == ("w", "sed.gap_ratio.w16")}
    assert gaps == set(range(17, 41))
    flagged = {s for (layer, name, s), v in got.items() if name == "sed.incomplete.w16" and v}
    assert flagged == set(range(17, 32))  # windows (t - 16, t] holding steps 13-16
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1  # once, not for each of the 6 later frames
    assert f"frame {lost[3]} " in warned[0]
    assert lost_key in warned[0]
    with pytest.raises(FileNotFoundError, match=f"frame {lost[3]} .*{lost_key}.* missing"):
        worker.process(lost[3])  # the queue retries it, then marks it failed with this
