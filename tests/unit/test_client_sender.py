"""Sender, spool and drop policy against an in-process fake server (``httpx.MockTransport``)."""

from __future__ import annotations

import email.utils
import errno
import gc
import json
import logging
import math
import os
import stat
import threading
import time
import weakref
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from spectrawatch import wire
from spectrawatch._sender import FrameItem, Sender
from spectrawatch._spool import Spool, spooled_run_dirs
from spectrawatch._transport import Api, Rejected, Unavailable, parse_retry_after
from spectrawatch.config import ClientSettings, SettingsError
from tests.forks import arm_child_alarm, child_exit_code


class FakeServer:
    """The frames/scalars/runs endpoints with the contract's semantics, in memory.

    ``down`` makes every request fail to connect; ``fail_next`` answers that many requests 503;
    ``delay`` sleeps in every request (a slow server). Frames are decoded with ``wire`` exactly
    as the real ingest does; a repeated idempotency key answers 200 and stores nothing.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.down = False
        self.fail_next = 0
        self.retry_after: str | None = None  # the Retry-After header of those 503s
        self.delay = 0.0
        self.reject_frames = False
        self.max_body: int | None = None  # a frame body above it answers 413, as the server
        self.runs: dict[tuple[str, str], dict[str, Any]] = {}
        self.frames: dict[str, tuple[wire.FrameHeader, dict[str, torch.Tensor], str | None]] = {}
        self.arrivals: list[str] = []
        self.frame_posts = 0
        self.scalars: list[dict[str, Any]] = []
        self.stats: list[dict[str, Any]] = []
        self.patches: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.times: list[tuple[str, float]] = []  # (path, monotonic time) of every request

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.delay:
            time.sleep(self.delay)
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        with self.lock:
            self.times.append((request.url.path, time.monotonic()))
            if self.fail_next > 0:
                self.fail_next -= 1
                headers = {"Retry-After": self.retry_after.encode()} if self.retry_after else {}
                return httpx.Response(
                    503, json={"error": {"code": "busy", "message": "later"}}, headers=headers
                )
            self.auth.append(request.headers.get("Authorization"))
            return self._route(request)

    def _route(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/api/v1/projects":
            return httpx.Response(201, json={"id": 1, "name": json.loads(request.content)["name"]})
        if path == "/api/v1/runs":
            body = json.loads(request.content)
            key = (body["project"], body["name"])
            if key in self.runs and body.get("resume") is False:
                error = {"code": "run_exists", "message": f"run {key[1]!r} already exists"}
                return httpx.Response(409, json={"error": error})
            if key in self.runs:
                return httpx.Response(200, json=self.runs[key])
            run = {"id": len(self.runs) + 1, "project": key[0], "name": key[1], "status": "running"}
            self.runs[key] = run
            return httpx.Response(201, json=run)
        if request.method == "PATCH":
            self.patches.append(json.loads(request.content))
            return httpx.Response(200, json={})
        if path.endswith("/frames"):
            self.frame_posts += 1
            if self.reject_frames:
                return httpx.Response(
                    422, json={"error": {"code": "bad_shape", "message": "tensor 'x' bad"}}
                )
            if self.max_body is not None and len(request.content) > self.max_body:
                message = (
                    f"body of {len(request.content)} bytes exceeds the limit of {self.max_body}"
                )
                return httpx.Response(
                    413, json={"error": {"code": "too_large", "message": message}}
                )
            key = request.headers["Idempotency-Key"]
            assert request.headers["Content-Type"] == "application/octet-stream"
            data = request.content
            encoding = request.headers.get("Content-Encoding")
            if encoding == "zstd":
                data = wire.decompress(data, 1 << 30)
            header, tensors = wire.decode_frame(data)
            assert key == f"{path.split('/')[4]}:{header.seq}"
            if key in self.frames:
                return httpx.Response(200, json={"id": key})
            self.frames[key] = (header, tensors, encoding)
            self.arrivals.append(key)
            return httpx.Response(202, json={"id": key})
        if path.endswith("/scalars"):
            rows = json.loads(request.content)
            self.scalars.extend(rows)
            return httpx.Response(202, json={"accepted": len(rows)})
        if path.endswith("/client-stats"):
            self.stats.append(json.loads(request.content))
            return httpx.Response(200, json={})
        if path == "/api/v1/health":
            return httpx.Response(200, json={"status": "ok"})
        return httpx.Response(404, json={"error": {"code": "not_found", "message": path}})

    def headers_by_kind(self) -> dict[str, list[wire.FrameHeader]]:
        out: dict[str, list[wire.FrameHeader]] = {}
        for h, _, _ in self.frames.values():
            out.setdefault(h.kind.value, []).append(h)
        return out


def settings(tmp_path: Path, **kw: Any) -> ClientSettings:
    base: dict[str, Any] = {
        "project": "p",
        "run": "r",
        "spool_dir": str(tmp_path / "spool"),
        "backoff_s": 0.01,
        "backoff_max_s": 0.05,
        "retries": 1,
        "flush_timeout_s": 10.0,
        "stats_every_s": 0.2,
    }
    base.update(kw)
    return ClientSettings.from_env({}, **base)


def make_sender(
    server: FakeServer, s: ClientSettings, *, start: bool = True, auto_named: bool = False
) -> Sender:
    sender = Sender(
        s,
        Api(s.url, s.token, 2.0, transport=server.transport()),
        s.run or "auto",
        auto_named=auto_named,
    )
    if start:
        sender.start()
    return sender


def wait_for_run(sender: Sender, timeout: float = 5.0) -> None:
    """Until the sender has created its run on the fake server (or ``timeout`` passed)."""
    deadline = time.monotonic() + timeout
    while sender.run_id is None and time.monotonic() < deadline:
        time.sleep(0.01)


def sketch_item(step: int, rows: int = 2, d: int = 8) -> FrameItem:
    info = {"steps": list(range(step, step + rows)), "sketch": {"dim": d, "seed": 0}}
    return FrameItem(
        wire.FrameKind.UPDATE_SKETCH, step, {"a": torch.full((rows, d), float(step))}, info
    )


def weights_item(step: int, n: int = 4) -> FrameItem:
    return FrameItem(
        wire.FrameKind.WEIGHTS,
        step,
        {"w": torch.eye(n) * step},
        {"dtype": "float32"},
        compress=True,
    )


def test_frames_arrive_once_with_idempotency_keys_and_zstd(tmp_path: Path) -> None:
    server = FakeServer()
    sender = make_sender(server, settings(tmp_path, token="secret"))
    for step in range(5):
        sender.put_frame(sketch_item(step * 2))
    sender.put_frame(weights_item(10))
    sender.put_scalars([{"step": 1, "name": "loss", "value": 0.5}])
    assert sender.close(timeout=10)
    assert len(server.frames) == 6
    assert server.frame_posts == 6
    assert list(server.frames) == [f"1:{i}" for i in range(6)]  # new run: seq from 0
    header, tensors, encoding = server.frames["1:5"]
    assert header.kind is wire.FrameKind.WEIGHTS
    assert encoding == "zstd"
    torch.testing.assert_close(tensors["w"], torch.eye(4) * 10)
    assert server.frames["1:0"][2] is None  # sketches are not compressed
    assert server.scalars == [{"step": 1, "name": "loss", "value": 0.5}]
    assert server.patches[-1]["status"] == "finished"
    assert server.stats[-1]["sent_frames"] == 6
    assert set(server.auth) == {"Bearer secret"}


def test_transient_5xx_is_retried_without_duplicates(tmp_path: Path) -> None:
    server = FakeServer()
    sender = make_sender(server, settings(tmp_path, retries=3))
    wait_for_run(sender)
    server.fail_next = 2
    sender.put_frame(sketch_item(0))
    assert sender.close(timeout=10)
    assert len(server.frames) == 1
    assert sender.stats.get("spooled_frames") == 0


@pytest.mark.parametrize("status", [503, 429])
def test_unavailable_carries_the_servers_retry_after(status: int) -> None:
    when = datetime.now(timezone.utc) + timedelta(seconds=90)
    answers = iter(["7", email.utils.format_datetime(when, usegmt=True), "soon", None])

    def handler(request: httpx.Request) -> httpx.Response:
        value = next(answers)
        headers = {"Retry-After": value} if value is not None else {}
        body = {"error": {"code": "x", "message": "y"}}
        return httpx.Response(status, json=body, headers=headers)

    api = Api("http://sw.test", transport=httpx.MockTransport(handler))
    got = []
    for _ in range(4):
        with pytest.raises(Unavailable) as info:
            api.health()
        got.append(info.value.retry_after)
    assert got[0] == 7.0
    assert got[1] == pytest.approx(90, abs=2)  # an HTTP-date: seconds from now
    assert got[2:] == [None, None]  # unreadable or absent: the client's own backoff


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("\u00b2", None),  # "²".isdigit() is True; float("²") raised ValueError
        ("\u0661\u0662", None),  # Arabic-Indic digits: HTTP's delta-seconds is ASCII only
        (" 12 ", 12.0),
        ("9" * 64, float("9" * 64)),
        ("9" * 65, None),  # too long to be a Retry-After (float() would make it inf)
        ("Mon, 01 Jan 10000 00:00:00 GMT", None),
        ("01 Jan 99999999999999999999 00:00:00", None),  # OverflowError in the date parser
    ],
)
def test_an_odd_retry_after_is_read_as_none_never_raised(
    value: str, expected: float | None
) -> None:
    assert parse_retry_after(value) == expected


def test_a_frame_answered_with_an_unreadable_retry_after_is_retried_not_lost(
    tmp_path: Path,
) -> None:
    """``Retry-After: ²`` made the parser raise out of the delivery: the frame was dropped."""
    server = FakeServer()
    sender = make_sender(server, settings(tmp_path, retries=3))
    wait_for_run(sender)
    server.fail_next, server.retry_after = 1, "\u00b2"
    sender.put_frame(sketch_item(0))
    assert sender.close(timeout=10)
    assert len(server.frames) == 1
    assert sender.stats.get("errors") == 0


def test_a_short_retry_after_is_waited_before_the_next_attempt(tmp_path: Path) -> None:
    server = FakeServer()
    sender = make_sender(server, settings(tmp_path, retries=3))
    wait_for_run(sender)
    server.fail_next, server.retry_after = 1, "1"
    sender.put_frame(sketch_item(0))
    assert sender.close(timeout=10)
    posts = [t for path, t in server.times if path.endswith("/frames")]
    assert len(posts) == 2
    assert len(server.frames) == 1
    assert posts[1] - posts[0] >= 0.95  # own schedule: 0.01 s
    assert sender.stats.get("spooled_frames") == 0


def test_a_long_retry_after_spools_and_keeps_the_client_away(tmp_path: Path) -> None:
    server = FakeServer()
    s = settings(tmp_path, retries=3, backoff_max_s=1.5, flush_timeout_s=10.0)
    sender = make_sender(server, s)
    wait_for_run(sender)
    server.fail_next, server.retry_after = 1, "3600"
    sender.put_frame(sketch_item(0))
    assert sender.close(timeout=10)
    posts = [t for path, t in server.times if path.endswith("/frames")]
    assert len(posts) == 2  # no inline retry, one replay
    assert len(server.frames) == 1
    assert sender.stats.get("spooled_frames") == 1
    # away for Retry-After capped at backoff_max_s, not the 0.01 s backoff
    assert 1.4 <= posts[1] - posts[0] <= 4.0


def test_a_weights_frame_too_large_for_the_server_names_its_layers_and_the_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A weight above ``max_frame_bytes`` travels alone in its frame; a server whose
    MAX_BODY_BYTES is lower refused it (413) with one generic log line. The log names the
    layer, the frame's size, the server's limit and the setting to raise."""
    server = FakeServer()
    server.max_body = 20_000
    sender = make_sender(server, settings(tmp_path, retries=3))
    torch.manual_seed(0)
    big = {"emb.weight": torch.randn(100, 64)}  # 25.6 kB
    sender.put_frame(FrameItem(wire.FrameKind.WEIGHTS, 5, big, {"dtype": "float32"}))
    sender.put_frame(FrameItem(wire.FrameKind.WEIGHTS, 10, big, {}, compress=True))
    sender.put_frame(weights_item(10))  # small: accepted
    with caplog.at_level("WARNING", logger="spectrawatch"):
        assert sender.close(timeout=10)
    assert server.frame_posts == 3  # refused, not retried
    assert sender.stats.get("rejected_frames") == 2
    assert len(sender.spool) == 0
    (line,) = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert "emb.weight" in line
    assert "step 5 (25," in line  # the frame's size
    assert "limit of 20000" in line
    assert "SPECTRAWATCH_MAX_BODY_BYTES" in line
    assert "emb.weight" in (sender.stats.last_error or "")


def test_rejected_frames_are_counted_not_retried_nor_spooled(tmp_path: Path) -> None:
    server = FakeServer()
    server.reject_frames = True
    sender = make_sender(server, settings(tmp_path, retries=3))
    sender.put_frame(sketch_item(0))
    sender.put_frame(sketch_item(2))
    sender.put_frame(weights_item(3))
    assert sender.close(timeout=10)
    assert server.frame_posts == 3
    assert sender.stats.get("rejected_frames") == 3
    assert sender.stats.weights_lost() == 1  # its frozen weights go again at the next snapshot
    assert sender.stats.get("errors") >= 2
    assert len(sender.spool) == 0
    assert server.stats[-1]["rejected_frames"] == 3


def test_server_down_mid_run_spools_then_replays_in_order(tmp_path: Path) -> None:
    server = FakeServer()
    sender = make_sender(server, settings(tmp_path))
    for step in range(3):
        sender.put_frame(sketch_item(step))
    assert sender.wait_idle(5)
    server.down = True
    for step in range(3, 10):
        sender.put_frame(sketch_item(step))
    sender.put_frame(weights_item(10))
    sender.put_scalars([{"step": 9, "name": "loss", "value": 1.0}])
    assert sender.wait_idle(5)
    assert sender.stats.get("spooled_frames") == 8
    assert len(sender.spool) == 9  # 8 frames + 1 scalar batch
    server.down = False
    assert sender.close(timeout=10)
    assert len(server.frames) == 11
    assert server.arrivals == [f"1:{i}" for i in range(11)]  # replay kept the order
    assert [h.step for h, _, _ in server.frames.values()] == list(range(11))
    assert sender.stats.get("replayed_frames") == 8
    assert server.scalars == [{"step": 9, "name": "loss", "value": 1.0}]
    assert len(sender.spool) == 0
    assert not list((tmp_path / "spool" / "p" / "r").glob("*.sw"))


def test_new_scalars_are_posted_behind_the_spooled_ones(tmp_path: Path) -> None:
    """The server keeps the last value per (step, name). A run resumed from a checkpoint logs
    step 5 again; its new value was posted before the crashed session's spooled one, which
    then overwrote it on the server."""
    first = make_sender(FakeServer(), settings(tmp_path, mode="offline"))
    first.put_scalars([{"step": 5, "name": "loss", "value": 1.0}])
    assert first.close(timeout=10)
    server = FakeServer()
    resumed = make_sender(server, settings(tmp_path), start=False)
    resumed.put_scalars([{"step": 5, "name": "loss", "value": 2.0}])
    resumed.start()
    assert resumed.close(timeout=10)
    assert [r["value"] for r in server.scalars] == [1.0, 2.0]  # the new value written last
    assert len(resumed.spool) == 0


def test_spooled_scalars_counts_rows_as_the_other_scalar_counters(tmp_path: Path) -> None:
    """``spooled_scalars`` counted spooled batches (1 per ``log()`` call) while
    ``sent_scalars`` and ``dropped_scalars`` count rows."""
    sender = make_sender(FakeServer(), settings(tmp_path, mode="offline"))
    for step in range(4):
        sender.put_scalars([{"step": step, "name": n, "value": 1.0} for n in ("loss", "lr", "gn")])
    assert sender.close(timeout=10)
    assert sender.stats.get("spooled_scalars") == 12


def test_replay_after_lost_response_does_not_duplicate(tmp_path: Path) -> None:
    # A frame the server stored but whose answer was lost is replayed with the same key.
    server = FakeServer()
    s = settings(tmp_path)
    api = Api(s.url, None, 2.0, transport=server.transport())
    run = api.create_run("p", "r")
    body = wire.encode_frame("update_sketch", 0, 7, {"a": torch.ones(1, 4)}, {"steps": [0]})
    api.post_frame(run["id"], 7, body)
    spool = Spool(tmp_path / "spool" / "p" / "r", 1 << 20)
    spool.put(
        "us",
        {"type": "frame", "kind": "update_sketch", "step": 0, "seq": 7, "encoding": None},
        body,
    )
    sender = make_sender(server, s)
    assert sender.close(timeout=10)
    assert server.frame_posts == 2
    assert list(server.frames) == ["1:7"]


def test_server_never_started_then_later_run_replays(tmp_path: Path) -> None:
    server = FakeServer()
    server.down = True
    s = settings(tmp_path, run="offline-run")
    sender = make_sender(server, s)
    t0 = time.perf_counter()
    for step in range(20):
        sender.put_frame(sketch_item(step))
    put_time = time.perf_counter() - t0
    assert put_time < 0.5  # the loop is never blocked by the dead server
    assert not sender.close(timeout=1.0) or len(sender.spool) > 0
    assert len(sender.spool) == 20
    assert server.frames == {}
    # a later process resumes the same run name with the server up: the spool replays
    server.down = False
    sender2 = make_sender(server, s)
    sender2.put_frame(sketch_item(100))
    assert sender2.close(timeout=10)
    assert len(server.frames) == 21
    seqs = [h.seq for h, _, _ in server.frames.values()]
    assert seqs[:20] == sorted(seqs[:20])
    assert seqs[20] > seqs[19]  # resumed run: new seq base, no key collision
    assert [h.step for h, _, _ in server.frames.values()] == [*range(20), 100]


def test_drop_policy_oldest_sketch_first_never_weights(tmp_path: Path) -> None:
    server = FakeServer()
    sender = make_sender(server, settings(tmp_path, queue_max_frames=3), start=False)
    sender.put_frame(sketch_item(0))
    sender.put_frame(weights_item(1))
    sender.put_frame(sketch_item(2))
    sender.put_frame(sketch_item(3))  # drops sketch 0 (oldest sketch)
    sender.put_frame(weights_item(4))  # drops sketch 2
    assert [q.step for q in sender._queue] == [1, 3, 4]
    sender.put_frame(weights_item(5))  # drops sketch 3
    sender.put_frame(weights_item(6))  # nothing droppable: the new weights frame is refused
    assert [q.step for q in sender._queue] == [1, 4, 5]
    snap = sender.stats.snapshot()
    assert snap["dropped_frames"] == 4
    assert snap["dropped_by_kind"] == {"update_sketch": 3, "weights": 1}
    sender.put_scalars([{"step": i, "name": "x", "value": 1.0} for i in range(10_000)])
    assert len(sender._scalars) == 10_000  # scalars are never dropped
    sender.start()
    assert sender.close(timeout=10)
    assert sorted(h.step for h, _, _ in server.frames.values()) == [1, 4, 5]
    assert len(server.scalars) == 10_000
    assert server.stats[-1]["dropped_frames"] == 4


def test_queue_byte_cap(tmp_path: Path) -> None:
    server = FakeServer()
    sender = make_sender(server, settings(tmp_path, queue_max_bytes=200), start=False)
    for step in range(5):
        sender.put_frame(sketch_item(step))  # 64 bytes each
    assert [q.step for q in sender._queue] == [2, 3, 4]
    assert sender.stats.get("dropped_frames") == 2


def test_a_frame_too_large_for_the_queue_drops_no_sketch(tmp_path: Path) -> None:
    """A frame over ``queue_max_bytes`` on its own dropped every queued sketch, then itself."""
    server = FakeServer()
    sender = make_sender(server, settings(tmp_path, queue_max_bytes=200), start=False)
    for step in range(3):
        sender.put_frame(sketch_item(step))  # 64 bytes each
    sender.put_frame(weights_item(3, n=8))  # 256 bytes: over the cap whatever is dropped
    assert [q.step for q in sender._queue] == [0, 1, 2]
    assert sender.stats.snapshot()["dropped_by_kind"] == {"weights": 1}
    sender.put_frame(weights_item(4, n=5))  # 100 bytes: fits once two sketches are dropped
    assert [q.step for q in sender._queue] == [2, 4]


def test_oldest_droppable_frees_items_and_bytes_or_drops_nothing() -> None:
    """The one eviction plan of the sender's queue (frames and bytes) and the spool (bytes):
    the oldest droppable items, skipping the others, until both excesses are gone."""
    from spectrawatch._eviction import oldest_droppable

    items = [("w", 50), ("us", 10), ("w", 5), ("us", 20), ("us", 30)]

    def plan(extra_bytes: int, extra_items: int = 0) -> list[tuple[str, int]] | None:
        return oldest_droppable(
            items, lambda i: i[0] == "us", lambda i: i[1], extra_bytes, extra_items
        )

    assert plan(0) == []  # fits as is
    assert plan(-100, 0) == []
    assert plan(11) == [("us", 10), ("us", 20)]  # the oldest sketches first, weights skipped
    assert plan(1, extra_items=3) == [("us", 10), ("us", 20), ("us", 30)]  # too many items
    assert plan(61) is None  # every sketch gone would free 60 bytes: none is dropped
    assert plan(0, extra_items=4) is None


def test_an_entry_too_large_for_the_spool_deletes_no_sketch(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_bytes=1200)
    meta = {"type": "frame", "kind": "update_sketch"}
    for _ in range(3):
        assert spool.put("us", meta, b"a" * 300) == (True, 0)
    assert spool.put("w", meta, b"b" * 1200) == (False, 0)  # over the cap on its own
    assert [e.tag for e in spool.entries()] == ["us", "us", "us"]
    assert spool.put("w", meta, b"c" * 600) == (True, 2)
    assert [e.tag for e in spool.entries()] == ["us", "w"]


def test_spool_cap_evicts_oldest_update_sketches_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_bytes=1200)  # entries are 300 bytes + ~50 of header
    meta = {"type": "frame", "kind": "update_sketch"}
    assert spool.put("us", meta, b"a" * 300) == (True, 0)
    assert spool.put("w", meta, b"b" * 300) == (True, 0)
    assert spool.put("us", meta, b"c" * 300) == (True, 0)
    stored, evicted = spool.put("w", meta, b"d" * 300)  # evicts the first sketch
    assert (stored, evicted) == (True, 1)
    stored, evicted = spool.put("w", meta, b"e" * 300)  # evicts the second sketch
    assert (stored, evicted) == (True, 1)
    stored, evicted = spool.put("w", meta, b"f" * 300)  # only weights left: refused
    assert (stored, evicted) == (False, 0)
    bodies = [e.read()[1][:1] for e in spool._entries]
    assert bodies == [b"b", b"d", b"e"]
    # a new Spool object on the same directory sees the same entries, in order
    again = Spool(tmp_path / "s", max_bytes=1200)
    assert len(again) == 3
    entry = again.peek()
    assert entry is not None
    assert entry.read() == (meta, b"b" * 300)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fds by /proc/self/fd")
def test_a_spool_entry_is_fsynced_before_its_rename_and_its_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries were renamed unsynced: after a power loss one could be empty or torn (replay
    dropped it as unreadable). Now the file is fsynced before the rename, the directory after
    it, and each directory the spool creates into its parent."""
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def synced(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def renamed(src: Any, dst: Any) -> None:
        events.append(("rename", str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", synced)
    monkeypatch.setattr(os, "replace", renamed)
    root = tmp_path.resolve()
    spool = Spool(root / "spool" / "p" / "r", 1 << 20)
    assert spool.put("us", {"type": "frame", "seq": 1}, b"x" * 100) == (True, 0)
    entry = str(spool.dir / "0000000000000000-us.sw")
    assert events == [
        *[("fsync", str(d)) for d in (root, root / "spool", root / "spool" / "p")],
        ("fsync", entry + ".tmp"),
        ("rename", entry),
        ("fsync", str(spool.dir)),
    ]
    events.clear()
    spool.write_meta({"project": "p", "run": "r"})
    meta = str(spool.dir / "run.json")
    assert events == [("fsync", meta + ".tmp"), ("rename", meta), ("fsync", str(spool.dir))]


def test_a_directory_refusing_fsync_keeps_the_spool_working(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some file systems (FUSE, CIFS) answer EINVAL to a directory's fsync: the entry, renamed
    into place already, is kept and counted (it was reported as dropped, the next entry
    overwriting it), and ``run.json`` is written."""
    fsync = os.fsync

    def refusing(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", refusing)
    spool = Spool(tmp_path / "spool" / "p" / "r", 1 << 20)
    for seq in (1, 2, 3):
        assert spool.put("us", {"type": "frame", "seq": seq}, b"x" * 100) == (True, 0)
    spool.write_meta({"project": "p", "run": "r"})
    assert [e.seq for e in spool.entries()] == [1, 2, 3]
    assert spool.read_meta() == {"project": "p", "run": "r"}


def test_slow_server_never_blocks_put(tmp_path: Path) -> None:
    server = FakeServer()
    server.delay = 0.2
    sender = make_sender(server, settings(tmp_path, queue_max_frames=4))
    worst = 0.0
    for step in range(30):
        t0 = time.perf_counter()
        sender.put_frame(sketch_item(step))
        sender.put_scalars([{"step": step, "name": "loss", "value": 1.0}])
        worst = max(worst, time.perf_counter() - t0)
    assert worst < 0.05
    assert sender.stats.get("dropped_frames") > 0
    server.delay = 0.0
    assert sender.close(timeout=20)
    assert len(server.scalars) == 30


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_forked_child_is_inert(tmp_path: Path) -> None:
    server = FakeServer()
    sender = make_sender(server, settings(tmp_path))
    pid = os.fork()
    if pid == 0:  # child: a DataLoader worker, say
        code = 0
        try:
            sender.put_frame(sketch_item(0))
            sender.put_scalars([{"step": 0, "name": "x", "value": 1.0}])
            code = 0 if (sender._disabled and not sender._queue and not sender._scalars) else 3
            code = code or (0 if sender.close(timeout=1) else 4)
        except BaseException:
            code = 5
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    sender.put_frame(sketch_item(1))
    assert sender.close(timeout=10)
    assert len(server.frames) == 1  # the parent still sends; the child sent nothing


def test_the_error_log_remembers_a_bounded_number_of_kinds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``where`` names a scalar for a NaN log: endless names grew the set of logged kinds
    without bound. Past the cap errors are counted, not logged nor remembered."""
    from spectrawatch._sender import ClientStats, ErrorLog

    stats = ClientStats()
    errors = ErrorLog(stats)
    with caplog.at_level("WARNING", logger="spectrawatch"):
        for i in range(ErrorLog.SEEN_MAX + 500):
            errors.record(f"log 'loss_{i}'", ValueError("non-finite value nan"))
        errors.record("log 'loss_0'", ValueError("again"))
    assert stats.get("errors") == ErrorLog.SEEN_MAX + 501
    assert len(errors._seen) == ErrorLog.SEEN_MAX
    assert len(caplog.records) == ErrorLog.SEEN_MAX + 1  # one each, and one at the cap
    assert sum("more are counted only" in r.getMessage() for r in caplog.records) == 1


def test_a_child_forked_while_a_counter_lock_is_held_counts_and_lets_the_spool_go(
    tmp_path: Path,
) -> None:
    """The parent's sender thread held the stats lock at the fork: the child's NaN log (a
    counted error) blocked for good; and the child's copy of the spool lock kept the spool
    locked once the parent had let it go."""
    import fcntl

    sender = make_sender(FakeServer(), settings(tmp_path))
    assert sender.spool.lock()
    lock_path = sender.spool.dir / ".lock"
    with sender.stats._lock:  # as the sender thread might at any moment
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                arm_child_alarm(20)  # a deadlock ends the child, not the test run
                sender.stats.incr("errors")
                sender.errors.record("log", ValueError("loss is nan"))
                code = 0 if sender.spool._lock_fd is None else 3
            finally:
                os._exit(code)
    assert child_exit_code(pid, 30, "a lock held at the fork") == 0
    sender.spool.unlock()  # the parent lets the spool go: another process may take it
    with open(lock_path, "a+") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    sender.close(timeout=1)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_senders_share_one_fork_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fork hook can never be unregistered: one per sender would pile up in a process that
    makes many runs (a sweep), each run at every fork. One module hook makes all live senders
    inert in a forked child, and keeps none alive."""
    hooks: list[dict[str, Any]] = []
    monkeypatch.setattr(os, "register_at_fork", lambda **kw: hooks.append(kw))
    server = FakeServer()
    senders = [make_sender(server, settings(tmp_path, run=f"r{i}"), start=False) for i in range(20)]
    assert hooks == []
    monkeypatch.undo()
    gone = weakref.ref(senders.pop())
    gc.collect()
    assert gone() is None  # the registry holds no sender
    senders[0].start()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            for s in senders:
                s.put_scalars([{"step": 0, "name": "x", "value": 1.0}])
            code = 0 if all(s._disabled and not s._scalars for s in senders) else 3
        except BaseException:
            code = 5
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not any(s._disabled for s in senders)  # the parent's are untouched
    senders[0].put_scalars([{"step": 1, "name": "x", "value": 1.0}])
    assert senders[0].close(timeout=10)
    assert len(server.scalars) == 1


class HostileServer(FakeServer):
    """A FakeServer behind something else for a while: every request gets ``hostile``'s
    response (an HTML proxy page, a run without an id, a redirect) until it is set to None."""

    def __init__(self, hostile: httpx.Response | None) -> None:
        super().__init__()
        self.hostile = hostile

    def __call__(self, request: httpx.Request) -> httpx.Response:
        hostile = self.hostile
        if hostile is not None:
            return httpx.Response(hostile.status_code, headers=hostile.headers, content=b"<p/>")
        return super().__call__(request)


@pytest.mark.parametrize(
    "hostile",
    [
        httpx.Response(200, headers={"content-type": "text/html"}),  # a captive proxy page
        httpx.Response(307, headers={"location": "https://elsewhere/api"}),  # not followed
    ],
)
def test_a_reply_that_is_not_the_server_spools_and_the_thread_survives(
    tmp_path: Path, hostile: httpx.Response
) -> None:
    server = HostileServer(hostile)
    sender = make_sender(server, settings(tmp_path))
    for step in range(3):
        sender.put_frame(sketch_item(step))
    sender.put_scalars([{"step": 2, "name": "loss", "value": 1.0}])
    assert sender.wait_idle(5)
    assert sender._thread is not None
    assert sender._thread.is_alive()
    assert len(sender.spool) == 4  # nothing counted as delivered, nothing lost
    assert sender.stats.get("errors") >= 1
    server.hostile = None  # the real server is reachable again
    sender.put_frame(sketch_item(3))
    assert sender.close(timeout=10)
    assert sorted(h.step for h, _, _ in server.frames.values()) == [0, 1, 2, 3]
    assert server.scalars == [{"step": 2, "name": "loss", "value": 1.0}]


_HTML_404 = """<!DOCTYPE HTML>
<html lang="en">
    <head>
        <meta charset="utf-8">
        <title>Error response</title>
    </head>
    <body>
        <h1>Error response</h1>
        <p>Error code: 404</p>
        <p>Message: File not found.</p>
        <p>Error code explanation: 404 - Nothing matches the given URI.</p>
    </body>
</html>
"""  # python -m http.server's error page: a URL that is not a spectrawatch server


def test_an_error_page_that_is_not_the_api_is_summarised_in_one_line(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, headers={"content-type": "text/html"}, text=_HTML_404)

    api = Api("http://sw.test:9000", transport=httpx.MockTransport(handler))
    with pytest.raises(Rejected) as info:
        api.create_run("p", "r")
    message = str(info.value)
    assert "\n" not in message
    assert "<" not in message
    assert message.startswith("POST /runs -> 404: Error response Error code: 404 Message:")
    assert "is http://sw.test:9000 a spectrawatch server?" in message
    assert len(message) < 250
    s = settings(tmp_path)
    sender = Sender(s, Api(s.url, transport=httpx.MockTransport(handler)), "r")
    sender.start()
    sender.put_frame(sketch_item(0))
    sender.close(timeout=10)
    last_error = sender.stats.snapshot()["last_error"]
    assert "a spectrawatch server?" in last_error
    assert "<" not in last_error


def test_a_redirect_on_upload_is_not_counted_as_sent(tmp_path: Path) -> None:
    api = Api("http://x", None, 2.0, transport=HostileServer(httpx.Response(308)).transport())
    with pytest.raises(Unavailable, match="308"):
        api.post_scalars(1, [{"step": 1, "name": "x", "value": 1.0}])


def test_an_unreadable_spool_entry_is_dropped_and_counted(tmp_path: Path) -> None:
    run_dir = tmp_path / "spool" / "p" / "r"
    spool = Spool(run_dir, 1 << 20)
    spool.put("sc", {"type": "scalars", "n": 1}, b'[{"step": 1, "name": "x", "value": 1.0}]')
    spool.put("sc", {"type": "scalars", "n": 1}, b'[{"step": 2, "name": "x"')  # truncated
    spool.put("us", {"type": "frame", "kind": "update_sketch"}, b"no seq in its header")
    server = FakeServer()
    sender = make_sender(server, settings(tmp_path))
    sender.put_frame(sketch_item(5))
    assert sender.close(timeout=10)
    assert server.scalars == [{"step": 1, "name": "x", "value": 1.0}]
    assert [h.step for h, _, _ in server.frames.values()] == [5]
    assert sender.stats.get("spool_unreadable") == 2
    assert len(sender.spool) == 0


class DripServer:
    """A real TCP server that answers run creation at once and frames one byte every 0.2 s.

    httpx's timeouts are per read, so without an overall deadline such a reply holds the
    client for as long as the server likes.
    """

    def __init__(self) -> None:
        import socket

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.frame_requests = 0
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Any) -> None:
        buf = b""
        try:
            while not self.stop.is_set():
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                path = head.split(b" ")[1]
                if path.endswith(b"/runs"):
                    body = json.dumps({"id": 1, "status": "running"}).encode()
                    code = b"201 Created"
                else:
                    body = json.dumps({"ok": True, "padding": "x" * 40}).encode()
                    code = b"202 Accepted"
                reply = b"HTTP/1.1 " + code + b"\r\nContent-Type: application/json\r\n"
                reply += b"Content-Length: %d\r\n\r\n" % len(body) + body
                if not path.endswith((b"/runs", b"/projects")):
                    self.frame_requests += path.endswith(b"/frames")
                    for i in range(len(reply)):  # one byte at a time
                        if self.stop.wait(0.2):
                            return
                        conn.sendall(reply[i : i + 1])
                else:
                    conn.sendall(reply)
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def test_a_reply_that_trickles_in_is_abandoned_at_the_request_deadline() -> None:
    server = DripServer()
    try:
        api = Api(server.url, None, timeout_s=1.0, deadline_s=1.0)
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match="no complete reply"):
            api.post_scalars(1, [{"step": 1, "name": "x", "value": 1.0}])
        assert time.monotonic() - t0 < 2.0  # the reply alone would take ~25 s
        api.not_after = time.monotonic() - 1.0
        with pytest.raises(Unavailable, match="flush deadline"):
            api.post_scalars(1, [])
    finally:
        server.close()


def test_what_a_trickling_server_holds_at_finish_is_spooled_not_lost(tmp_path: Path) -> None:
    server = DripServer()
    try:
        s = settings(tmp_path, url=server.url, timeout_s=1.0, request_deadline_s=1.0)
        sender = Sender(s, Api(s.url, None, 1.0, deadline_s=1.0), "r")
        sender.start()
        for step in range(0, 60, 2):
            sender.put_frame(sketch_item(step))
            sender.put_scalars([{"step": step, "name": "loss", "value": 1.0}])
        sender.put_frame(weights_item(60))
        t0 = time.monotonic()
        done = sender.close(timeout=3.0)
        took = time.monotonic() - t0
        assert took < 3.5
        assert not done or server.frame_requests == 0
        assert sender.pending() == 0  # nothing left in memory to be lost at exit
        left = Spool(tmp_path / "spool" / "p" / "r", 1 << 30)
        metas = [e.read()[0] for e in left.entries()]
        frames = [m for m in metas if m["type"] == "frame"]
        assert len(frames) == 31
        assert sender.stats.get("dropped_frames") == 0
        assert sum(m["n"] for m in metas if m["type"] == "scalars") == 30
        assert [m["seq"] for m in frames] == sorted(m["seq"] for m in frames)
    finally:
        server.close()


def test_finish_waits_for_a_large_backlog_to_reach_the_spool(tmp_path: Path) -> None:
    """A GPT-2-sized final weight snapshot (13 frames, ~460 MB) queued behind a slow server:
    ``close`` returned at its timeout while the daemon thread was still compressing and
    spooling, and the interpreter's exit killed it (10 of 13 frames lost, in a real run)."""
    server = DripServer()
    try:
        s = settings(tmp_path, url=server.url, timeout_s=1.0, request_deadline_s=1.0)
        sender = Sender(s, Api(s.url, None, 1.0, deadline_s=1.0), "r")
        sender.start()
        gen = torch.Generator().manual_seed(0)
        for step in range(12):  # 12 x 16 MB of incompressible floats
            w = torch.randn(2048, 2048, generator=gen)
            sender.put_frame(
                FrameItem(wire.FrameKind.WEIGHTS, step, {"w": w}, {"dtype": "float32"}, True)
            )
        sender.close(timeout=1.0)
        assert sender.pending() == 0
        assert not sender._thread or not sender._thread.is_alive()
        left = Spool(tmp_path / "spool" / "p" / "r", 1 << 34)
        frames = [e.read()[0] for e in left.entries()]
        assert len(frames) + server.frame_requests >= 12  # every frame spooled (or sent)
        assert len(frames) >= 11
        assert left.read_meta()["status"] == "finished"  # for `spectrawatch sync`
    finally:
        server.close()


def test_close_ends_a_wait_for_retry_after_at_its_deadline(tmp_path: Path) -> None:
    """A ``Retry-After: 5`` waited before an inline retry: ``close(timeout=1)`` could not end
    that sleep (its deadline was set after the sleep began) and returned after 4.5 s."""
    server = FakeServer()
    sender = make_sender(server, settings(tmp_path, retries=3))
    wait_for_run(sender)
    server.fail_next, server.retry_after = 1000, "5"
    sender.put_scalars([{"step": 0, "name": "loss", "value": 1.0}])
    deadline = time.monotonic() + 5
    while not any(path.endswith("/scalars") for path, _ in server.times):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    t0 = time.monotonic()
    assert sender.close(timeout=1.0)  # done in time: the row is spooled
    assert time.monotonic() - t0 < 1.0
    assert len(sender.spool) == 1


def test_close_past_its_timeout_says_so_and_what_it_spools(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() returned True after overrunning its timeout (spooling what was left), and its
    warning called a scalar batch "1 frame(s)"."""
    put = Spool.put

    def slow_put(self: Spool, tag: str, meta: dict[str, Any], body: bytes) -> tuple[bool, int]:
        time.sleep(1.0)  # a slow disk
        return put(self, tag, meta, body)

    monkeypatch.setattr(Spool, "put", slow_put)
    server = FakeServer()
    server.down = True
    sender = make_sender(server, settings(tmp_path))
    assert sender.first_contact.wait(5)
    with caplog.at_level(logging.WARNING, logger="spectrawatch"):
        sender.put_scalars([{"step": i, "name": "loss", "value": 1.0} for i in range(3)])
        assert not sender.close(timeout=0.5)
    assert sender.pending() == 0
    assert len(sender.spool) == 1
    said = [r.getMessage() for r in caplog.records if "did not take everything" in r.getMessage()]
    assert len(said) == 1
    assert "writing 3 scalar row(s) to the spool" in said[0]


@pytest.mark.parametrize("timeout", [math.inf, 1e12])
def test_close_without_a_time_limit_delivers_everything(tmp_path: Path, timeout: float) -> None:
    """``finish(timeout=inf)`` (or ``flush_timeout_s=inf``) raised OverflowError from
    ``Thread.join``: close returned at once, nothing was flushed and the run stayed open."""
    server = FakeServer()
    sender = make_sender(server, settings(tmp_path, flush_timeout_s=timeout))
    sender.put_frame(
        FrameItem(wire.FrameKind.WEIGHTS, 1, {"w": torch.ones(2, 3)}, {"dtype": "float32"})
    )
    sender.put_scalars([{"step": 1, "name": "loss", "value": 1.0}])
    assert sender.close()
    assert len(server.frames) == 1
    assert [r["name"] for r in server.scalars] == ["loss"]
    assert [p["status"] for p in server.patches] == ["finished"]


def test_sync_skips_a_spool_a_live_run_holds_and_one_it_cannot_name(tmp_path: Path) -> None:
    from spectrawatch._sync import sync_run

    s = settings(tmp_path, url="http://127.0.0.1:9")  # nothing listens: must not be contacted
    held = Spool(tmp_path / "spool" / "p" / "r", 1 << 20)
    held.put("sc", {"type": "scalars", "n": 1}, b'[{"step":1,"name":"x","value":1.0}]')
    held.write_meta({"project": "p", "run": "r"})
    assert held.lock()  # a live run's sender holds it
    r = sync_run(s, held.dir, held.read_meta(), deadline_s=5)
    assert (r.delivered, r.left, r.note) == (0, 1, "in use by a running process: skipped")
    held.unlock()
    mangled = Spool(tmp_path / "spool" / "p" / "odd_name-1234abcd", 1 << 20)  # no run.json
    mangled.put("sc", {"type": "scalars", "n": 1}, b"[]")
    r = sync_run(s, mangled.dir, None, deadline_s=5)
    assert r.left == 1
    assert "no run.json" in r.note
    assert len(Spool(mangled.dir, 1 << 20)) == 1  # left as it was


def test_sync_skips_a_spool_whose_run_json_names_the_api_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run spooled by a client that took ``.../api/v1`` (never delivered: every request
    404'd) is named with the fix, not a traceback; ``--url`` then delivers it."""
    from spectrawatch.cli import main

    spool = Spool(tmp_path / "p" / "r", 1 << 20)
    spool.put("sc", {"type": "scalars", "n": 1}, b"[]")
    spool.write_meta({"project": "p", "run": "r", "url": "http://127.0.0.1:9/api/v1"})
    assert main(["sync", "--spool-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "use http://127.0.0.1:9" in out
    assert "skipped" in out
    assert len(Spool(spool.dir, 1 << 20)) == 1


class HeaderLog:
    """A real HTTP server that logs each request's header lines and answers ``404 {}``."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.heads: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed at the end of the test
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    head += chunk
                self.heads.append(head.decode("latin-1").lower())
                conn.sendall(b"HTTP/1.1 404 x\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")

    def close(self) -> None:
        self.sock.close()


def test_sync_sends_the_token_only_to_the_configured_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ``run.json`` naming another server (a spool anyone can write to) does not get the
    token sent there: the run is skipped, saying where it was recorded for; ``--url`` sends it
    there, and without a token the recorded server is used as before."""
    from spectrawatch.cli import main

    log = HeaderLog()
    try:
        spool = Spool(tmp_path / "p" / "r", 1 << 20)
        spool.put("sc", {"type": "scalars", "n": 1}, b'[{"step":1,"name":"x","value":1.0}]')
        spool.write_meta({"project": "p", "run": "r", "url": log.url, "status": "finished"})
        monkeypatch.setenv("SPECTRAWATCH_URL", "http://127.0.0.1:9")  # the configured server
        monkeypatch.setenv("SPECTRAWATCH_TOKEN", "sw_real")
        sync = ["sync", "--spool-dir", str(tmp_path), "--timeout", "5"]
        assert main(sync) == 1
        out = capsys.readouterr().out
        assert f"recorded for {log.url!r}" in out
        assert "skipped" in out
        assert "--url" in out
        assert log.heads == []
        assert len(Spool(spool.dir, 1 << 20)) == 1
        assert main([*sync, "--url", log.url]) == 1  # the user's choice (404: not delivered)
        assert log.heads
        assert all("authorization: bearer sw_real" in h for h in log.heads)
        log.heads.clear()
        monkeypatch.delenv("SPECTRAWATCH_TOKEN")
        assert main(sync) == 1
        assert log.heads
        assert not any("authorization" in h for h in log.heads)
    finally:
        log.close()


def test_a_scan_never_deletes_a_live_writers_temp_files(tmp_path: Path) -> None:
    """Listing a spool (``sync --dry-run``, a second process's ``len``) deleted every ``*.tmp``
    in it: a live writer's rename then failed and its entry was lost. Only the next holder of
    the lock removes them (a crashed writer's leftovers)."""
    from spectrawatch._sync import sync_run

    s = settings(tmp_path, url="http://127.0.0.1:9")  # nothing listens: must not be contacted
    writer = Spool(tmp_path / "spool" / "p" / "r", 1 << 20)
    assert writer.lock()
    writer.write_meta({"project": "p", "run": "r"})
    half_written = [writer.dir / "0000000000000000-w.sw.tmp", writer.dir / "run.json.tmp"]
    for p in half_written:  # what the writer is writing at the moment of the scans
        p.write_bytes(b"{")
    assert len(Spool(writer.dir, 1 << 20)) == 0
    assert sync_run(s, writer.dir, writer.read_meta(), deadline_s=5, dry_run=True).entries == 0
    assert sync_run(s, writer.dir, writer.read_meta(), deadline_s=5).note.startswith("in use")
    assert all(p.exists() for p in half_written)
    writer.unlock()  # the writer died mid-write: the next holder tidies up
    assert Spool(writer.dir, 1 << 20).lock()
    assert not any(p.exists() for p in half_written)


@pytest.mark.parametrize("name", ["a/b", "", "tab\there", "x" * 201])
def test_names_the_server_would_refuse_fail_at_init(name: str) -> None:
    from spectrawatch.config import SettingsError

    with pytest.raises(SettingsError, match="not accepted by the server"):
        ClientSettings.from_env({}, run=name)


@pytest.mark.parametrize("name", [".", ".."])
def test_dot_names_are_left_to_the_server(name: str) -> None:
    """The server resumes a project or run stored as "." or ".." (refusing only new ones, with a
    422): the client refused them at init, so such a run could never be resumed."""
    settings = ClientSettings.from_env({}, project=name, run=name)
    assert (settings.project, settings.run) == (name, name)


def test_a_later_session_that_sets_its_status_drops_an_old_sessions_run_json(
    tmp_path: Path,
) -> None:
    """Session 1 delivered everything but its final status ("failed"): run.json alone keeps it.
    Session 2 of the same run finishes and the server takes "finished": the old run.json must
    go, else a later ``spectrawatch sync`` would set the run back to "failed"."""
    from spectrawatch._spool import RUN_META, spooled_run_dirs

    server = FakeServer()
    s = settings(tmp_path)
    first = make_sender(server, s)
    first.put_frame(sketch_item(1))
    assert first.wait_idle(10)
    route = server._route

    def no_patch(request: httpx.Request) -> httpx.Response:
        if request.method == "PATCH":
            return httpx.Response(503, json={"error": {"code": "busy", "message": "later"}})
        return route(request)

    server._route = no_patch  # type: ignore[method-assign]
    first.close("failed", timeout=2)
    run_dir = tmp_path / "spool" / "p" / "r"
    assert Spool(run_dir, 0).read_meta()["status"] == "failed"  # type: ignore[index]
    server._route = route  # type: ignore[method-assign]
    second = make_sender(server, s)
    second.put_frame(sketch_item(2))
    assert second.wait_idle(10)
    assert second.close("finished", timeout=5)
    assert server.patches[-1]["status"] == "finished"
    assert not (run_dir / RUN_META).exists()
    assert spooled_run_dirs(tmp_path / "spool") == []


def test_resume_never_away_from_the_server_spools_apart_and_syncs_into_a_new_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``resume="never"`` with the server away all session: its entries wait in a directory of
    their own (the name's may hold an earlier session's), whose run.json says ``resume:
    never``; ``spectrawatch sync`` then creates ``r-2`` beside the stored ``r`` instead of
    joining it, and renames the run in run.json for a later sync."""
    from spectrawatch import _sync
    from spectrawatch._spool import spooled_run_dirs

    server = FakeServer()
    server.runs[("p", "r")] = {"id": 7, "project": "p", "name": "r", "status": "finished"}
    server.down = True
    s = settings(tmp_path, resume="never")
    sender = make_sender(server, s)
    sender.put_scalars([{"step": 1, "name": "loss", "value": 1.0}])
    with caplog.at_level(logging.WARNING, logger="spectrawatch"):
        sender.close(timeout=2)
    # resuming "r" would join the stored run, not deliver these: only sync is named
    (left,) = [r.getMessage() for r in caplog.records if "stay spooled" in r.getMessage()]
    assert "spectrawatch sync" in left
    assert "resuming" not in left
    ((run_dir, files),) = spooled_run_dirs(tmp_path / "spool")
    assert run_dir.name.startswith("r~new-")
    assert len(files) == 1
    meta = Spool(run_dir, 0).read_meta()
    assert meta is not None
    assert (meta["run"], meta["resume"]) == ("r", "never")
    server.down = False
    route = server._route

    def no_patch(request: httpx.Request) -> httpx.Response:
        if request.method == "PATCH":  # the final status waits: run.json stays
            return httpx.Response(503, json={"error": {"code": "busy", "message": "later"}})
        return route(request)

    server._route = no_patch  # type: ignore[method-assign]
    monkeypatch.setattr(_sync, "Api", lambda *a, **kw: Api(*a, **kw, transport=server.transport()))
    result = _sync.sync_run(s.replace(resume="allow"), run_dir, meta, deadline_s=5)
    assert (result.run, result.delivered, result.left) == ("r-2", 1, 0)
    assert set(server.runs) == {("p", "r"), ("p", "r-2")}
    assert server.scalars == [{"step": 1, "name": "loss", "value": 1.0}]
    meta = Spool(run_dir, 0).read_meta()
    assert meta is not None
    assert meta["run"] == "r-2"
    assert "resume" not in meta


def test_resume_never_names_are_numbered_within_the_servers_length() -> None:
    from spectrawatch._sender import numbered_names

    names = numbered_names("x" * 200)
    assert names[0] == "x" * 200
    assert names[1] == "x" * 198 + "-2"
    assert names[99] == "x" * 196 + "-100"
    assert len(names) == 101
    assert all(len(n) == 200 for n in names)
    assert len(set(names)) == 101


def test_the_config_changes_a_joined_run_warns_of_are_few_and_short() -> None:
    from spectrawatch._notices import config_changes

    stored = {f"k{i}": i for i in range(8)} | {"big": "x" * 100, "inf": "Infinity"}
    sent = {f"k{i}": -i for i in range(1, 8)} | {"big": "x" * 100, "inf": math.inf, "new": [1]}
    assert config_changes(sent, stored) == (
        "k0 (stored 0, now absent), k1 (stored 1, now -1), k2 (stored 2, now -2), "
        "k3 (stored 3, now -3), k4 (stored 4, now -4) and 4 more"
    )
    assert config_changes({"a": "y" * 50}, {"a": 1}) == f'a (stored 1, now "{"y" * 36}...)'
    assert config_changes({}, stored) == ""  # a session that sent none changed nothing


def test_the_view_run_url_follows_the_servers_link() -> None:
    from spectrawatch._notices import run_url
    from spectrawatch_server.api.links import page_link

    assert page_link(None, "/runs/3") == "/runs/3"
    assert page_link("https://sw.example/base/", "/runs/3") == "https://sw.example/base/runs/3"
    url = "http://10.0.0.5:8765/"
    assert run_url(url, {"id": 3, "dashboard_url": "/runs/3"}) == "http://10.0.0.5:8765/runs/3"
    public = {"id": 3, "dashboard_url": "https://sw.example/runs/3"}
    assert run_url(url, public) == "https://sw.example/runs/3"
    assert run_url(url, {"id": 3}) == "http://10.0.0.5:8765/runs/3"  # an older server


def test_a_resume_setting_other_than_allow_never_must_is_refused() -> None:
    with pytest.raises(SettingsError, match=r"^SPECTRAWATCH_RESUME: resume must be"):
        ClientSettings.from_env({"SPECTRAWATCH_RESUME": "sometimes"})  # names the variable
    with pytest.raises(SettingsError, match=r"^resume must be"):
        ClientSettings.from_env({}, resume="sometimes")
    assert ClientSettings.from_env({}).resume == "allow"


def test_a_write_refused_its_role_mid_run_turns_monitoring_off_and_spools_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The run was created, then a frame answers 403 ``insufficient_role`` (the token was
    replaced by a ``read`` one): one warning, the queue dropped, nothing spooled or retried,
    the final status not attempted, ``off_reason`` set."""
    server = FakeServer()
    s = settings(tmp_path)
    sender = make_sender(server, s)
    sender.put_frame(sketch_item(0))
    assert sender.wait_idle(10)
    assert len(server.frames) == 1
    role = "this needs a token with role 'write' or above; this token's role is 'read'"
    refused = httpx.Response(403, json={"error": {"code": "insufficient_role", "message": role}})
    server._route = lambda request: refused  # type: ignore[method-assign]
    before = len(server.times)
    with caplog.at_level(logging.WARNING, logger="spectrawatch"):
        for step in range(1, 40):
            sender.put_frame(sketch_item(step))
            sender.put_scalars([{"step": step, "name": "loss", "value": 1.0}])
        assert sender.close(timeout=5)
    posts = len(server.times)
    off = [r.getMessage() for r in caplog.records if "monitoring is off" in r.getMessage()]
    assert len(off) == 1, off
    assert "this token's role is 'read'" in off[0]
    assert "spectrawatch token create --project p --role write" in off[0]
    assert sender.stats.off_reason is not None
    assert sender.stats.snapshot()["monitoring_off"] == sender.stats.off_reason
    assert sender.stats.get("spooled_frames") == sender.stats.get("spooled_scalars") == 0
    assert sender.stats.get("errors") == 1
    assert spooled_run_dirs(tmp_path / "spool") == []
    assert server.patches == []  # no final status tried with a token that may not write
    assert posts - before <= 2  # the refused write (and a client-stats post maybe before it)
    sender.put_frame(sketch_item(99))  # after close and off: ignored
    assert len(server.times) == posts


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (401, "missing Authorization: Bearer <token> header"),
        (403, "token is not valid for project 'p'"),
    ],
)
def test_a_token_refused_at_run_creation_names_the_token_to_pass_and_the_sync_to_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, status: int, message: str
) -> None:
    code = "unauthorized" if status == 401 else "forbidden"
    refused = httpx.Response(status, json={"error": {"code": code, "message": message}})
    s = settings(tmp_path)
    sender = Sender(s, Api(s.url, transport=httpx.MockTransport(lambda _: refused)), "r")
    with caplog.at_level(logging.WARNING, logger="spectrawatch"):
        sender.start()
        sender.put_frame(sketch_item(0))
        sender.close(timeout=5)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    fix = (
        "a write token for project 'p' is needed (`spectrawatch token create --project p`): "
        "pass token= to monitor.init (sync: --token) or set SPECTRAWATCH_TOKEN"
    )
    assert message in logged
    assert fix in logged
    assert fix in sender.stats.snapshot()["last_error"]
    assert "`spectrawatch sync --token <write token>` delivers them" in logged
    assert len(sender.spool) == 1


def test_frames_spooled_before_a_role_refusal_stay_for_a_sync_with_a_write_token(
    tmp_path: Path,
) -> None:
    server = FakeServer()
    s = settings(tmp_path)
    sender = make_sender(server, s)
    sender.put_frame(sketch_item(0))
    assert sender.wait_idle(10)
    server.down = True  # an outage: these three wait in the spool
    for step in (1, 2, 3):
        sender.put_frame(sketch_item(step))
    assert sender.wait_idle(10)
    assert len(sender.spool) == 3
    role = "this needs a token with role 'write' or above; this token's role is 'read'"
    refused = httpx.Response(403, json={"error": {"code": "insufficient_role", "message": role}})
    server._route = lambda request: refused  # type: ignore[method-assign]
    server.down = False
    t0 = time.monotonic()
    assert sender.close(timeout=5)  # its replay is refused: no waiting out the deadline
    assert time.monotonic() - t0 < 2
    assert sender.stats.off_reason is not None
    run_dir = tmp_path / "spool" / "p" / "r"
    assert len(Spool(run_dir, 1 << 20)) == 3  # not dropped as refused: a write token syncs them
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


def test_doctor_names_a_final_status_waiting_in_the_spool(tmp_path: Path) -> None:
    from spectrawatch._doctor import _spool
    from spectrawatch.config import ClientSettings

    settings = ClientSettings(spool_dir=str(tmp_path))
    assert _spool(settings).status == "ok"
    run_dir = tmp_path / "proj" / "r1"
    Spool(run_dir, 1 << 20).write_meta({"project": "proj", "run": "r1", "status": "finished"})
    check = _spool(settings)
    assert check.status == "info"
    assert "final status of proj/r1" in check.detail


def test_doctor_asks_an_older_server_without_get_token_whether_the_token_is_accepted() -> None:
    """A server older than ``GET /token`` answers it 404: doctor falls back to ``/runs``."""
    from spectrawatch._doctor import _auth
    from spectrawatch.config import ClientSettings

    asked: list[str] = []

    def old_server(url: str, **_: Any) -> httpx.Response:
        asked.append(url.rsplit("/", 1)[1])
        return httpx.Response(404 if url.endswith("/token") else 200, json=[])

    settings = ClientSettings(url="http://s", token="sw_x")
    check = _auth(settings, "http://s/api/v1", True, old_server)
    assert (check.status, check.detail, asked) == ("ok", "token accepted", ["token", "runs"])


def test_a_live_session_holds_a_spool_with_an_earlier_run_json(tmp_path: Path) -> None:
    """A ``sync`` during a later session of the run must not set the earlier final status."""
    server = FakeServer()
    s = settings(tmp_path)
    run_dir = tmp_path / "spool" / "p" / "r"
    Spool(run_dir, 1 << 20).write_meta({"project": "p", "run": "r", "status": "failed"})
    sender = make_sender(server, s)
    sender.put_frame(sketch_item(0))
    assert sender.first_contact.wait(10)
    deadline = time.monotonic() + 10
    # wait on the sender's own flag, not by probing the lock: a probe holding it at the moment
    # the sender tries would make the sender see a `sync` in progress and not hold it (as meant)
    while not sender._spool_owned:  # it takes the spool just after first contact
        assert time.monotonic() < deadline, "the live sender never held its spool"
        time.sleep(0.01)
    assert not Spool(run_dir, 1 << 20).lock()  # a `sync` now would find it held
    assert sender.close(timeout=10)
    assert not run_dir.exists()  # its own status delivered: the old run.json is gone


def test_a_second_process_of_a_run_spools_to_its_own_directory(tmp_path: Path) -> None:
    """Two processes training under one run name with the server away (from an audit of
    session 22): both wrote ``<run>/0000000000000000-us.sw``, ... and overwrote each other's
    entries (406 spooled, 286 on disk). The one that finds the spool held spools to
    ``<run>~<pid>``, which ``sync`` delivers to the same run."""
    from spectrawatch._spool import spooled_run_dirs

    s = settings(tmp_path, mode="offline")
    other = Spool(tmp_path / "spool" / "p" / "r", 1 << 20)  # the first process's spool
    assert other.lock()
    other.write_meta({"project": "p", "run": "r"})
    frame = {"type": "frame", "kind": "update_sketch", "step": 1, "seq": 1, "encoding": None}
    other.put("us", frame, b"")
    sender = make_sender(FakeServer(), s)
    for step in range(5):
        sender.put_frame(sketch_item(step))
    assert sender.wait_idle(10)
    for _ in range(4):  # named 1-us to 4-us by the first process, as the sender's first four
        other.put("us", frame, b"")
    assert sender.close(timeout=10)
    assert sender.stats.get("spooled_frames") == 5
    dirs = {d.name: len(files) for d, files in spooled_run_dirs(tmp_path / "spool")}
    assert dirs == {"r": 5, f"r~{os.getpid()}": 5}
    assert Spool(tmp_path / "spool" / "p" / f"r~{os.getpid()}", 0).read_meta() is not None
    other.unlock()


class ReplaceableServer(FakeServer):
    """Runs with ids and uids as the real server keeps them. ``replace_database()`` empties it
    and lets another project's run take the next id; ``delete(id)`` leaves a tombstone. A write
    whose uid header is not its run's, or to an unknown id, answers 404 ``run_not_found``; to a
    tombstone 404 ``run_deleted``. ``uids=False``: a server older than uids (no ``uid`` and
    ``run_not_found`` for deleted runs too)."""

    def __init__(self, uids: bool = True) -> None:
        super().__init__()
        self.uids = uids
        self.next_id = 1
        self.deleted: set[int] = set()
        self.uid_headers: list[tuple[str, str | None]] = []

    def replace_database(self) -> None:
        with self.lock:
            self.runs, self.next_id = {}, 1
            self._create(("someone-else", "theirs"))

    def delete(self, run_id: int) -> None:
        with self.lock:
            self.runs = {k: r for k, r in self.runs.items() if r["id"] != run_id}
            self.deleted.add(run_id)

    def _create(self, key: tuple[str, str]) -> dict[str, Any]:
        run = {"id": self.next_id, "project": key[0], "name": key[1], "status": "running"}
        if self.uids:
            run["uid"] = f"uid-{key[0]}-{key[1]}-{self.next_id}"
        self.next_id += 1
        self.runs[key] = run
        return run

    def _route(self, request: httpx.Request) -> httpx.Response:
        parts = request.url.path.split("/")
        if request.url.path == "/api/v1/runs":
            body = json.loads(request.content)
            key = (body["project"], body["name"])
            if key in self.runs and body.get("resume") is False:
                error = {"code": "run_exists", "message": f"run {key[1]!r} already exists"}
                return httpx.Response(409, json={"error": error})
            if key in self.runs:
                return httpx.Response(200, json=self.runs[key])
            return httpx.Response(201, json=self._create(key))
        if len(parts) > 4 and parts[3] == "runs":
            run_id, uid = int(parts[4]), request.headers.get(wire.RUN_UID_HEADER)
            self.uid_headers.append((request.url.path, uid))
            run = next((r for r in self.runs.values() if r["id"] == run_id), None)
            if run is None or (uid is not None and uid != run.get("uid")):
                code = "run_deleted" if self.uids and run_id in self.deleted else "run_not_found"
                return httpx.Response(404, json={"error": {"code": code, "message": "no"}})
        return super()._route(request)


def test_a_replaced_database_gets_the_run_created_again_not_another_runs_frames(
    tmp_path: Path,
) -> None:
    # A server restarted on a fresh database (or restored from an older backup) gave the
    # client's run id to another project's run: the client's frames went into that run, counted
    # as sent. Its uid now tells them apart: the client spools, creates its run again and
    # replays into it; nothing is rejected and the other run gets nothing.
    server = ReplaceableServer()
    sender = make_sender(server, settings(tmp_path))
    for step in range(3):
        sender.put_frame(sketch_item(step))
    assert sender.wait_idle(5)
    assert (sender.run_id, sender.run_uid) == (1, "uid-p-r-1")
    server.replace_database()  # run 1 is now someone-else/theirs
    arrived = len(server.arrivals)
    for step in range(3, 6):
        sender.put_frame(sketch_item(step))
    sender.put_scalars([{"step": 5, "name": "loss", "value": 1.0}])
    assert sender.close(timeout=10)
    assert (sender.run_id, sender.run_uid) == (2, "uid-p-r-2")
    assert server.arrivals[arrived:] == ["2:3", "2:4", "2:5"]
    assert server.scalars == [{"step": 5, "name": "loss", "value": 1.0}]
    assert sender.stats.get("rejected_frames") == 0
    assert sender.stats.get("run_lost") >= 1
    assert server.patches[-1]["status"] == "finished"
    assert len(sender.spool) == 0
    assert all(uid is not None for _, uid in server.uid_headers)  # every write named its run


def test_a_deleted_run_stops_the_sending_and_is_not_created_again(tmp_path: Path) -> None:
    server = ReplaceableServer()
    sender = make_sender(server, settings(tmp_path))
    sender.put_frame(sketch_item(0))
    assert sender.wait_idle(5)
    server.delete(1)
    for step in range(1, 5):
        sender.put_frame(sketch_item(step))
    sender.put_scalars([{"step": 4, "name": "loss", "value": 1.0}])
    assert sender.close(timeout=10)
    assert server.runs == {}  # not resurrected under its name
    frame_posts = [path for path, _ in server.uid_headers if path.endswith("/frames")]
    assert len(frame_posts) <= 2  # the first refusal says so; the rest are not even sent
    assert sender.stats.get("rejected_frames") == 4
    assert sender.stats.get("rejected_scalars") == 1
    assert sender.stats.get("run_lost") == 0
    assert not server.patches  # no final status for a deleted run
    assert not sender.spool.dir.exists()  # no run.json: `sync` would create the run again


def test_a_server_without_run_uids_keeps_its_404_final(tmp_path: Path) -> None:
    # An older server says run_not_found for a deleted run too: recreating would resurrect it.
    server = ReplaceableServer(uids=False)
    sender = make_sender(server, settings(tmp_path))
    sender.put_frame(sketch_item(0))
    assert sender.wait_idle(5)
    assert sender.run_uid is None
    server.delete(1)
    for step in range(1, 4):
        sender.put_frame(sketch_item(step))
    assert sender.close(timeout=10)
    assert server.runs == {}
    assert sender.stats.get("rejected_frames") == 3
    assert sender.stats.get("run_lost") == 0
    assert all(uid is None for _, uid in server.uid_headers)
