"""The one background thread that does all network and disk work for a run.

The training thread only calls :meth:`Sender.put_frame` / :meth:`Sender.put_scalars`, which take
a lock for a few microseconds and never block on I/O. The sender thread creates the run (lazily,
so a server that is down at start costs nothing), encodes frames (assigning ``seq``), posts them
with retries and backoff, spools what cannot be delivered, replays the spool in order when the
server is back, and reports its counters to ``/client-stats``.

Drop policy (bounded queue: ``queue_max_frames`` items and ``queue_max_bytes`` of tensors):
  1. the oldest queued ``update_sketch`` frame is dropped first, repeatedly, until the new frame
     fits (per-step sketches are the most redundant data: a window of W survives a gap);
  2. other frames (``param_sketch``, ``weights``, ``activations``) are never evicted for
     another frame; if dropping every queued sketch would not make room, the *new* frame is
     refused with a logged warning (and no sketch is dropped for it);
  3. scalars are never dropped (their own list, capped at ``_SCALAR_CAP`` rows as a last-resort
     memory guard).
Every drop is counted (``dropped_frames``, ``dropped_by_kind``) and sent to the server.

Sequence numbers: ``seq = base + n``; ``base`` is 0 for a run the server just created (201) or
that was auto-named, and otherwise microseconds since the epoch at the first frame, so that a
resumed run's new frames never collide with the idempotency keys of its earlier ones; and it is
always above the largest ``seq`` left in the spool by an earlier session, so frames keep their
order on the server (which orders a run's frames by ``seq``).
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spectrawatch import wire
from spectrawatch._eviction import oldest_droppable
from spectrawatch._notices import joined_message, notice, run_url
from spectrawatch._spool import RUN_META, Spool, safe_component
from spectrawatch._transport import Api, Rejected, Unavailable
from spectrawatch.config import ClientSettings

logger = logging.getLogger("spectrawatch")

_SCALAR_CAP = 1_000_000
_SCALARS_PER_POST = 5_000
_REPLAY_PER_TURN = 64
_INLINE_RETRY_S = 5.0  # a longer Retry-After is waited out with the frame in the spool
# past the flush deadline only local work is left (encode, compress, write): wait this long at
# most for it (a stuck disk), not for the server
_SPOOL_AFTER_DEADLINE_S = 600.0
_NUMBERED_MAX = 100  # resume="never": NAME-2 ... NAME-100 are tried, then NAME-<random hex>
_TAGS = {
    wire.FrameKind.UPDATE_SKETCH: "us",
    wire.FrameKind.PARAM_SKETCH: "ps",
    wire.FrameKind.WEIGHTS: "w",
    wire.FrameKind.ACTIVATIONS: "a",
}


NONFINITE_SCALAR_NAMES = 100  # scalar names whose first NaN/Inf step the client reports


class ClientStats:
    """Thread-safe counters of what the client sent, spooled, dropped and failed at."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: Counter[str] = Counter()
        self._dropped_by_kind: Counter[str] = Counter()
        self._weights_refused = 0
        self._nonfinite_scalars: dict[str, dict[str, Any]] = {}
        self.last_error: str | None = None
        # why monitoring turned itself off for this run (the server refused the token's role)
        self.off_reason: str | None = None

    def incr(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._c[name] += n

    def set(self, name: str, value: int) -> None:
        with self._lock:
            self._c[name] = value

    def nonfinite_scalar(self, name: str, step: int, value: float) -> None:
        """Remember the first step at which scalar ``name`` was NaN/Inf and which (the value is
        sent too, stored as null: the kind is lost there), for the dashboards to mark where its
        line ends; the first :data:`NONFINITE_SCALAR_NAMES` names only."""
        with self._lock:
            seen = self._nonfinite_scalars.get(name)
            if seen is None and len(self._nonfinite_scalars) >= NONFINITE_SCALAR_NAMES:
                return
            if seen is None or step < seen["step"]:
                self._nonfinite_scalars[name] = {"step": step, "value": str(value)}

    def drop(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self._c["dropped_frames"] += n
            self._dropped_by_kind[kind] += n

    def lose_weights(self) -> None:
        """A weights frame the server refused (dropped ones count by :meth:`drop`)."""
        with self._lock:
            self._weights_refused += 1

    def weights_lost(self) -> int:
        """Weights frames dropped or refused so far: a frozen weight they held goes again."""
        with self._lock:
            return self._dropped_by_kind[wire.FrameKind.WEIGHTS.value] + self._weights_refused

    def get(self, name: str) -> int:
        with self._lock:
            return self._c[name]

    def snapshot(self) -> dict[str, Any]:
        """Plain dict for ``/client-stats``: :data:`~spectrawatch.wire.CLIENT_COUNTERS` always
        present."""
        with self._lock:
            out: dict[str, Any] = {k: self._c[k] for k in wire.CLIENT_COUNTERS}
            out.update({k: v for k, v in self._c.items() if k not in out})
            out["dropped_by_kind"] = dict(self._dropped_by_kind)
            if self._nonfinite_scalars:
                out["nonfinite_scalars"] = {k: dict(v) for k, v in self._nonfinite_scalars.items()}
            if self.last_error:
                out["last_error"] = self.last_error[:500]
            if self.off_reason:
                out["monitoring_off"] = self.off_reason[:500]
            return out


class ErrorLog:
    """Count every error; log each (where, exception type) once, so a loop is never flooded.
    At most :data:`SEEN_MAX` kinds are remembered (a ``where`` may name a scalar, and names
    can be endless): past them, errors are counted, not logged."""

    SEEN_MAX = 1000

    def __init__(self, stats: ClientStats) -> None:
        self.stats = stats
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def _first(self, key: tuple[str, str]) -> bool:
        """Whether ``key`` is new and should be logged (remembered, up to the cap)."""
        with self._lock:
            if key in self._seen or len(self._seen) >= self.SEEN_MAX:
                return False
            self._seen.add(key)
            full = len(self._seen) == self.SEEN_MAX
        if full:
            logger.warning(
                "spectrawatch: %d kinds of error logged; more are counted only", self.SEEN_MAX
            )
        return True

    def record(self, where: str, exc: BaseException) -> None:
        try:
            self.stats.incr("errors")
            self.stats.last_error = f"{where}: {type(exc).__name__}: {exc}"
            if self._first((where, type(exc).__name__)):
                logger.warning(
                    "spectrawatch: %s failed: %s: %s (counted; not logged again)",
                    where,
                    type(exc).__name__,
                    exc,
                )
        except Exception:  # logging must not raise into the caller
            return

    def note(self, where: str, message: str) -> None:
        """Log a condition once per ``where`` (its occurrences are counted elsewhere)."""
        if self._first((where, "")):
            logger.warning("spectrawatch: %s (counted in client-stats; not logged again)", message)


@dataclass
class FrameItem:
    """A frame waiting to be encoded: CPU tensors plus metadata."""

    kind: wire.FrameKind
    step: int
    tensors: dict[str, torch.Tensor]
    info: dict[str, Any]
    compress: bool = False
    nbytes: int = field(default=0)

    def __post_init__(self) -> None:
        if not self.nbytes:
            self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors.values())


class Sender:
    """Background delivery of one run's frames and scalars (see the module docstring)."""

    def __init__(
        self,
        settings: ClientSettings,
        api: Api,
        run_name: str,
        *,
        auto_named: bool = False,
        config: Mapping[str, Any] | None = None,
        tags: Sequence[str] | None = None,
        stats: ClientStats | None = None,
        errors: ErrorLog | None = None,
    ) -> None:
        self.settings = settings
        self.api = api
        self.run_name = run_name
        self.auto_named = auto_named
        self.config = dict(config or {})
        self.tags = list(tags or [])
        self.stats = stats or ClientStats()
        self.errors = errors or ErrorLog(self.stats)
        self.requested_name = run_name
        # resume="never": the name is settled when the run is created (NAME, or NAME-2, ...);
        # until then this session spools to a directory of its own, never an earlier session's
        self._name_settled = settings.resume != "never" or auto_named
        suffix = "" if self._name_settled else f"~new-{secrets.token_hex(4)}"
        self.spool = self._spool_for(run_name, suffix)
        self.run_id: int | str | None = None
        self.run_uid: str | None = None  # the run's uid, sent with each write (None: old server)
        self.run_info: dict[str, Any] = {}
        self._run_deleted = False  # the server said so: nothing more is sent
        self._seq_base: int | None = None
        self._seq_next = 0
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[FrameItem] = deque()
        self._queue_bytes = 0
        self._scalars: list[dict[str, Any]] = []
        self._closing = False
        self._final_status = "finished"
        # set once the first "create or resume run" attempt ended (answer, failure or offline)
        self.first_contact = threading.Event()
        self._status_sent = False  # the server took the final status (else run.json keeps it)
        self._summary: dict[str, Any] = {}
        self._deadline = float("inf")
        self._offline_until = 0.0
        # why the server last refused to create or resume the run (a bad token, name...)
        self._run_refused: str | None = None
        self._auth_refused = False  # ... and whether for the token (401/403)
        self._backoff = settings.backoff_s
        self._jitter = random.Random()  # its own stream: the user's global one is left alone
        self._last_stats_at = 0.0
        self._last_stats: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None
        self._disabled = False
        # what the sender thread has taken off the queue and not yet delivered or spooled:
        # (frames, their bytes, scalar rows)
        self._in_hand = (0, 0, 0)
        self._spool_owned = False
        self._spool_named = False
        self._spool_private = False  # spooling to <run>~<pid>: another process holds <run>
        self.reopen = True  # set a finished run of this name back to running when resuming
        self.announce = True  # tell the user what the first contact found (not for `sync`)
        self._announced = False
        if settings.mode == "offline":
            self._offline_until = float("inf")  # never contacts the server
        _LIVE.add(self)  # made inert in a forked child (see _after_fork)

    # -- training-thread side -------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run_safely, name="spectrawatch-sender", daemon=True
        )
        self._thread.start()

    def put_frame(self, item: FrameItem) -> None:
        """Queue a frame, applying the drop policy; never blocks on I/O, never raises."""
        if self._disabled or self._closing or self.stats.off_reason:
            return
        with self._cond:
            victims = self._victims(item)
            if victims is None:
                self.stats.drop(item.kind.value)
                self.errors.note(
                    "queue full",
                    f"queue full, dropping a {item.kind.value} frame of step {item.step} "
                    "(server slow or away)",
                )
            else:
                for victim in victims:  # the oldest sketches: only other kinds precede them
                    self._queue.remove(victim)
                    self._queue_bytes -= victim.nbytes
                    self.stats.drop(victim.kind.value)
                self._queue.append(item)
                self._queue_bytes += item.nbytes
            self.stats.set("queued_frames", len(self._queue))
            self._cond.notify()

    def _victims(self, item: FrameItem) -> list[FrameItem] | None:
        """The oldest queued update sketches to drop so that ``item`` fits (none when it fits
        as is), or None when it would not fit even with every one gone: then none is dropped
        for a frame refused anyway. Called with ``_cond`` held."""
        s = self.settings
        return oldest_droppable(
            self._queue,
            lambda queued: queued.kind is wire.FrameKind.UPDATE_SKETCH,
            lambda queued: queued.nbytes,
            extra_bytes=self._queue_bytes + item.nbytes - s.queue_max_bytes,
            extra_items=len(self._queue) + 1 - s.queue_max_frames,
        )

    def put_scalars(self, rows: Sequence[dict[str, Any]]) -> None:
        if self._disabled or self._closing or not rows or self.stats.off_reason:
            return
        with self._cond:
            room = _SCALAR_CAP - len(self._scalars)
            if room < len(rows):
                self.stats.incr("dropped_scalars", len(rows) - max(room, 0))
                rows = rows[: max(room, 0)]
            self._scalars.extend(rows)
            self._cond.notify()

    def close(
        self,
        status: str = "finished",
        summary: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> bool:
        """Flush (deliver or spool everything), mark the run ``status``; True if done in time
        (False when spooling what was left took it past ``timeout``).

        ``timeout`` bounds the wait for the server. What is still queued then is written to the
        spool before this returns (local work only: no request outlives the deadline), however
        long that takes, since a daemon thread still writing at interpreter exit would lose it
        (a GPT-2-sized final weight snapshot takes seconds to compress and write).
        """
        if self._disabled or self._thread is None:
            return True
        timeout = self.settings.flush_timeout_s if timeout is None else timeout
        with self._cond:
            if not self._closing:
                self._closing = True
                self._final_status = status
                self._summary = dict(summary or {})
            # a second close (a SIGTERM's, during the exit hook's) may bring the deadline
            # closer, never move it away
            deadline = time.monotonic() + max(timeout - 0.5, 0.0)
            if deadline < self._deadline:
                self._deadline = deadline
                self.api.not_after = deadline  # a request in flight is cut off there
            self._cond.notify_all()  # also ends a wait before a retry (see _wait)
        # inf (wait as long as it takes) or a huge timeout: join() itself refuses those
        self._thread.join(min(timeout, threading.TIMEOUT_MAX))
        if not self._thread.is_alive():
            return self.pending() == 0
        left = self._left()
        if left:
            logger.warning(
                "spectrawatch: the server did not take everything within %.0f s; writing %s "
                "to the spool %s for `spectrawatch sync`",
                timeout,
                left,
                self.spool.dir,
            )
        self._thread.join(_SPOOL_AFTER_DEADLINE_S)
        return False  # not in time, even if everything reached the spool since

    def _left(self) -> str:
        """What the sender still holds, in words (``2 frame(s) (31 MB), 40 scalar row(s)``)."""
        with self._cond:
            frames = len(self._queue) + self._in_hand[0]
            size = self._queue_bytes + self._in_hand[1]
            rows = len(self._scalars) + self._in_hand[2]
        parts = [f"{frames} frame(s) ({size / 2**20:.0f} MB)"] if frames else []
        if rows:
            parts.append(f"{rows} scalar row(s)")
        return ", ".join(parts)

    def pending(self) -> int:
        with self._cond:
            busy = 1 if any(self._in_hand) else 0
            return len(self._queue) + (1 if self._scalars else 0) + busy

    def wait_idle(self, timeout: float) -> bool:
        """Wait until the queue is empty (test/benchmark helper); True if it emptied in time."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.pending() == 0:
                return True
            time.sleep(0.005)
        return False

    # -- sender-thread side ---------------------------------------------------------------

    def _run_safely(self) -> None:
        try:
            while True:
                try:
                    self._loop()
                    return
                except Exception as exc:  # a hostile reply or a bug: count it, keep the thread
                    self.errors.record("sender", exc)
                    if self._closing and self._past_deadline():
                        return
                    self._wait(min(self._backoff, 1.0))
        except BaseException as exc:  # the thread must never die noisily
            self.errors.record("sender thread", exc)
        finally:
            try:
                self.api.close()
            except Exception as exc:
                self.errors.record("sender close", exc)

    def _loop(self) -> None:
        try:
            self._online()  # create the run now if the server is there; later otherwise
        finally:
            self.first_contact.set()
        if (self.spool.dir / RUN_META).is_file():
            # an earlier session's run.json: hold the spool, so a `spectrawatch sync` meanwhile
            # cannot set that session's final status on this live run
            self._own_spool()
        while True:
            with self._cond:
                while not (self._queue or self._scalars or self._closing):
                    self._cond.wait(timeout=self._idle_wait())
                    if self._periodic_due():
                        break
                item = self._queue.popleft() if self._queue else None
                if item is not None:
                    self._queue_bytes -= item.nbytes
                    self.stats.set("queued_frames", len(self._queue))
                rows, self._scalars = self._scalars, []
                closing = self._closing
                if item is not None:
                    self._in_hand = (1, item.nbytes, len(rows))
                else:
                    self._in_hand = (0, 0, len(rows))
            try:
                if rows:
                    self._handle_scalars(rows)
                if item is not None:
                    self._handle_frame(item)
                self._periodic()
            except Exception as exc:
                self.errors.record("sender", exc)
            finally:
                self._in_hand = (0, 0, 0)
            if closing and item is None and not rows:
                with self._cond:
                    if self._queue or self._scalars:
                        continue
                self._finish()
                return

    def _idle_wait(self) -> float:
        if len(self.spool):
            return max(0.05, min(1.0, self._offline_until - time.monotonic()))
        return 1.0

    def _periodic_due(self) -> bool:
        now = time.monotonic()
        return (len(self.spool) > 0 and now >= self._offline_until) or (
            now - self._last_stats_at >= self.settings.stats_every_s
        )

    def _periodic(self) -> None:
        if len(self.spool) and self._online():
            self._replay(_REPLAY_PER_TURN)
        now = time.monotonic()
        if now - self._last_stats_at >= self.settings.stats_every_s:
            self._last_stats_at = now
            self._send_stats()

    def _online(self) -> bool:
        if self.settings.mode == "offline" or self.stats.off_reason:
            return False
        if time.monotonic() < self._offline_until or (self._closing and self._past_deadline()):
            return False  # past the flush deadline what is left goes to the spool
        return self._ensure_run()

    def _went_offline(self, exc: Unavailable) -> None:
        """Stay away for the backoff (+-20 % jitter, so clients an outage stopped together do
        not return together), or for the server's ``Retry-After`` when longer (capped at
        ``backoff_max_s``); the backoff doubles up to ``backoff_max_s``."""
        self.errors.record("contacting the server", exc)
        self._pause(exc.retry_after)

    def _pause(self, retry_after: float | None = None) -> None:
        """Send nothing for the backoff (or ``retry_after``, see :meth:`_went_offline`)."""
        pause = self._backoff * self._jitter.uniform(0.8, 1.2)
        if retry_after is not None:
            pause = max(pause, min(retry_after, self.settings.backoff_max_s))
        self._offline_until = time.monotonic() + pause
        self._backoff = min(self._backoff * 2, self.settings.backoff_max_s)

    def _retry_soon(self, exc: Unavailable, attempt: int, retries: int) -> bool:
        """Sleep before another immediate attempt and say True, or False to go offline: no
        attempts left, past the flush deadline, or a ``Retry-After`` longer than
        ``_INLINE_RETRY_S`` (the frame waits in the spool instead of in this thread)."""
        asked = exc.retry_after or 0.0
        if attempt >= retries or self._past_deadline() or asked > _INLINE_RETRY_S:
            return False
        self._wait(max(min(self.settings.backoff_s * 2**attempt, 5.0), asked))
        return not self._past_deadline()

    def _wait(self, seconds: float) -> None:
        """Sleep ``seconds``, or less: until the flush deadline, which :meth:`close` may set
        meanwhile (it wakes this wait), so ``close(timeout)`` is not held past its timeout."""
        end = time.monotonic() + seconds
        with self._cond:
            while (left := min(end, self._deadline) - time.monotonic()) > 0:
                self._cond.wait(left)

    def _back_online(self) -> None:
        self._backoff = self.settings.backoff_s

    def _ensure_run(self) -> bool:
        if self.run_id is not None:
            return True
        try:
            try:
                # POST /runs creates the project too; POST /projects refuses "." and ".." even
                # stored (a new-name rule), where POST /runs resumes a stored one
                if self.settings.project not in wire.DOT_NAMES:
                    self.api.create_project(self.settings.project)
            except Rejected as exc:
                if exc.status != 409:  # 409: exists, fine
                    raise
            info = self._create_run()
            run_id = info.get("id") if isinstance(info, dict) else None
            if not isinstance(run_id, int | str) or isinstance(run_id, bool) or run_id == "":
                # a proxy page, a redirect target or another service: not our server, for now
                raise Unavailable(f"POST /runs answered without a run id: {str(info)[:200]}")
            uid = info.get("uid")
            uid = uid if isinstance(uid, str) and uid else None
            resumed = info.get("_status") == 200 and info.get("status") not in (None, "running")
            if resumed and self.reopen:
                self.api.update_run(run_id, "running", uid=uid)
        except Unavailable as exc:
            self._went_offline(exc)
            return False
        except Rejected as exc:  # bad token, bad name: retrying soon will not help
            if self._refused_role(exc):
                return False
            if exc.status in (401, 403):  # no token, or one that is not this project's
                self._auth_refused = True
                exc = Rejected(f"{exc}; {self._token_fix()}", exc.status, exc.code)
            self.errors.record("create run", exc)
            self._run_refused = str(exc)
            self._offline_until = time.monotonic() + self.settings.backoff_max_s
            return False
        self._run_refused = None
        self._auth_refused = False
        self.run_id = info["id"]
        self.run_uid = uid
        self.run_info = info
        self._back_online()
        if not self._announced:
            self._announced = True
            try:
                if self.announce:
                    self._announce(info)
            except Exception as exc:  # a notice must not cost the run
                self.errors.record("announce", exc)
        if self._seq_base is None:
            nxt = info.get("next_seq")
            if isinstance(nxt, int) and nxt >= 0:
                self._seq_base = nxt
            elif info.get("_status") == 201:
                self._seq_base = 0
        return True

    def _spool_for(self, name: str, suffix: str = "") -> Spool:
        """The spool directory of run ``name`` in this run's project (``suffix`` added)."""
        s = self.settings
        run_dir = Path(s.spool_dir) / safe_component(s.project) / (safe_component(name) + suffix)
        return Spool(run_dir, s.spool_max_bytes)

    def _create_run(self) -> dict[str, Any]:
        """``POST /runs`` for this run. Under ``resume="never"``, until the name is settled, an
        existing run is not joined: its 409 ``run_exists`` moves on to ``NAME-2``, ``NAME-3``,
        ... (see :func:`numbered_names`), and the first one created is this run's name."""
        s = self.settings
        if self._name_settled:
            return self.api.create_run(s.project, self.run_name, self.config, self.tags)
        for name in numbered_names(self.requested_name):
            try:
                info = self.api.create_run(s.project, name, self.config, self.tags, resume=False)
            except Rejected as exc:
                if exc.status == 409 and exc.code == "run_exists":
                    continue
                raise
            self._settle_name(name)
            return info
        raise AssertionError("unreachable: numbered_names ends with a random name")

    def _settle_name(self, name: str) -> None:
        """Take ``name``, the run ``resume="never"`` created: spool under it from now on (or,
        with entries spooled already, name it in their ``run.json``), and say so if it is not
        the name asked for."""
        self._name_settled = True
        self.run_name = name
        if name != self.requested_name:
            logger.warning(
                "spectrawatch: run %r already exists in project %r; this session is a new run, "
                "%r (resume='never')",
                self.requested_name,
                self.settings.project,
                name,
            )
        if not self._spool_owned and not len(self.spool):
            self.spool = self._spool_for(name)
            self._spool_named = False
        elif self._spool_named:
            self.spool.write_meta(self.run_meta())

    def _announce(self, info: Mapping[str, Any]) -> None:
        """Tell the user, once a session, what the first contact with the server found."""
        s = self.settings
        if info.get("_status") == 200:
            logger.warning(joined_message(s.project, self.run_name, s.resume, info, self.config))
        elif s.resume == "must":
            logger.error(
                "spectrawatch: resume='must', but project %r had no run %r: it was created as "
                "a new run (training goes on; check the run name)",
                s.project,
                self.run_name,
            )
        if not s.quiet:
            notice(f"spectrawatch: view run {self.run_name!r} at {run_url(s.url, info)}")

    def _next_seq(self) -> int:
        if self._seq_base is None:
            self._seq_base = 0 if self.auto_named else time.time_ns() // 1000
        if self._seq_next == 0:  # first frame: number above anything a crashed session spooled
            spooled = self.spool.max_seq
            if spooled is not None and spooled >= self._seq_base:
                self._seq_base = spooled + 1
        seq = self._seq_base + self._seq_next
        self._seq_next += 1
        return seq

    def _handle_frame(self, item: FrameItem) -> None:
        online = self._online()  # creates the run first, which may fix the seq base
        seq = self._next_seq()
        body = wire.encode_frame(item.kind, item.step, seq, item.tensors, item.info)
        encoding = None
        if item.compress and self.settings.compress:
            body = wire.compress(body)
            encoding = "zstd"
        meta = {
            "type": "frame",
            "kind": item.kind.value,
            "step": item.step,
            "seq": seq,
            "encoding": encoding,
        }
        if online and len(self.spool):
            self._replay(_REPLAY_PER_TURN)
        retries = self.settings.retries
        if online and not len(self.spool) and self._deliver_frame(meta, body, retries):
            return
        if self.stats.off_reason:  # the token may not write: nothing is kept to retry
            return
        self._spool_put(_TAGS[item.kind], meta, body)

    def _deliver_frame(self, meta: Mapping[str, Any], body: bytes, retries: int) -> bool:
        """Post one frame; True when done with it (accepted or rejected), False to spool it."""
        assert self.run_id is not None
        for attempt in range(retries + 1):
            try:
                if self._run_deleted:
                    raise Rejected("the run was deleted on the server", 404, "run_deleted")
                self.api.post_frame(
                    self.run_id, int(meta["seq"]), body, meta.get("encoding"), uid=self.run_uid
                )
            except Rejected as exc:
                if self._run_lost(exc):
                    return False
                if self._refused_role(exc):
                    return False  # not spooled now; a spooled one stays for a write token
                self.stats.incr("rejected_frames")
                if meta.get("kind") == wire.FrameKind.WEIGHTS.value:
                    self.stats.lose_weights()
                if exc.status == 413 and meta.get("kind") == wire.FrameKind.WEIGHTS.value:
                    self._weights_too_large(meta, body, exc)
                else:
                    self.errors.record(f"frame rejected ({meta.get('kind')})", exc)
                return True
            except Unavailable as exc:
                if self._retry_soon(exc, attempt, retries):
                    continue
                self._went_offline(exc)
                return False
            self.stats.incr("sent_frames")
            return True
        return False

    def _weights_too_large(self, meta: Mapping[str, Any], body: bytes, exc: Rejected) -> None:
        """Record a weights frame the server refused as too large, naming its layers, its size
        and the server setting to raise (a weight above ``max_frame_bytes`` travels alone in its
        frame, which a server with a lower ``MAX_BODY_BYTES`` refuses at every snapshot)."""
        try:
            header = wire.read_header(body, meta.get("encoding") == "zstd")
            names, size = header.names, f"{header.size:,} bytes"
        except wire.FrameError:  # not expected of a frame this client encoded
            names, size = [], f"{len(body):,} bytes sent"
        listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        message = (
            f"a weights frame of step {meta.get('step')} ({size}; {listed or 'layers unknown'}) "
            f"was refused: {exc.message}. These weights get no HT-SR or norm metrics at this "
            "step; raise the server's SPECTRAWATCH_MAX_BODY_BYTES above the frame's size, or "
            "send the weights smaller (weights_dtype='bfloat16')"
        )
        self.errors.record(f"weights too large ({listed})", Rejected(message, exc.status, exc.code))

    def _handle_scalars(self, rows: list[dict[str, Any]]) -> None:
        """Post ``rows`` behind whatever the spool holds, spooling them while it holds any: the
        server keeps the last value written per (step, name), so a row sent before an older
        spooled one (a resumed run logging a step again) would be overwritten by it."""
        for start in range(0, len(rows), _SCALARS_PER_POST):
            chunk = rows[start : start + _SCALARS_PER_POST]
            online = self._online()
            if online and len(self.spool):
                self._replay(_REPLAY_PER_TURN)
            if (
                online
                and not len(self.spool)
                and self._deliver_scalars(chunk, self.settings.retries)
            ):
                continue
            if self.stats.off_reason:  # the token may not write: nothing kept to retry
                return
            body = wire_json(chunk)
            self._spool_put("sc", {"type": "scalars", "n": len(chunk)}, body)

    def _deliver_scalars(self, rows: list[dict[str, Any]], retries: int) -> bool:
        assert self.run_id is not None
        for attempt in range(retries + 1):
            try:
                if self._run_deleted:
                    raise Rejected("the run was deleted on the server", 404, "run_deleted")
                self.api.post_scalars(self.run_id, rows, uid=self.run_uid)
            except Rejected as exc:
                if self._run_lost(exc):
                    return False
                if self._refused_role(exc):
                    return False  # as for a frame
                self.errors.record("scalars rejected", exc)
                self.stats.incr("rejected_scalars", len(rows))
                return True
            except Unavailable as exc:
                if self._retry_soon(exc, attempt, retries):
                    continue
                self._went_offline(exc)
                return False
            self.stats.incr("sent_scalars", len(rows))
            return True
        return False

    def _own_spool(self) -> bool:
        """Hold the spool's lock. When another live process holds it (``spectrawatch sync``
        replaying it, or a second process training under the same run name), this one leaves
        that directory to it and spools to one of its own, ``<run>~<pid>`` (which ``sync``
        delivers like any other): two writers of one directory gave their entries the same
        names and overwrote each other's."""
        if not self._spool_owned:
            try:
                self._spool_owned = self.spool.lock()
                if not self._spool_owned and not self._spool_private:
                    private = self.spool.dir.with_name(f"{self.spool.dir.name}~{os.getpid()}")
                    self.spool = Spool(private, self.spool.max_bytes)
                    self._spool_private = True
                    self._spool_named = False
                    self._spool_owned = self.spool.lock()
            except OSError as exc:
                self.errors.record("spool lock", exc)
        return self._spool_owned

    def run_meta(self, **final: Any) -> dict[str, Any]:
        """What ``run.json`` says about this run (no token: sync takes it from its caller)."""
        meta = {
            "project": self.settings.project,
            "run": self.run_name,
            "url": self.settings.url,
            "config": self.config,
            "tags": self.tags,
        }
        if not self._name_settled:  # `sync` creates a new run too, not joining one of the name
            meta["resume"] = "never"
        return {**meta, **final}

    def _spool_put(self, tag: str, meta: dict[str, Any], body: bytes) -> None:
        try:
            self._own_spool()
            if not self._spool_named:
                self.spool.write_meta(self.run_meta())
                self._spool_named = True
            stored, evicted = self.spool.put(tag, meta, body)
        except OSError as exc:
            stored, evicted = False, 0
            self.errors.record("spool write", exc)
        if evicted:
            self.stats.drop(wire.FrameKind.UPDATE_SKETCH.value, evicted)
        if stored:
            if meta["type"] == "frame":
                self.stats.incr("spooled_frames")
            else:  # rows, as sent_scalars and dropped_scalars count them
                self.stats.incr("spooled_scalars", int(meta.get("n", 0)))
        elif meta["type"] == "frame":
            self.stats.drop(str(meta["kind"]))
            self.stats.incr("spool_overflow")
            self.errors.note("spool full", f"spool full, dropped a {meta['kind']} frame")
        else:
            self.stats.incr("dropped_scalars", int(meta.get("n", 0)))
        self.stats.set("spool_bytes", self.spool.nbytes)

    def _replay(self, limit: int) -> None:
        """Send up to ``limit`` spooled entries, oldest first; stop at the first failure."""
        if not self._own_spool():
            return
        for _ in range(limit):
            entry = self.spool.peek()
            if entry is None:
                break
            try:
                meta, body = entry.read()
                rows = _spooled_rows(body) if meta.get("type") == "scalars" else None
                if rows is None:
                    int(meta["seq"])  # a frame entry names its seq (its idempotency key)
            except (OSError, LookupError, ValueError, AttributeError, TypeError) as exc:
                self.errors.record("spool read", exc)  # unreadable: dropped, counted
                self.stats.incr("spool_unreadable")
                self.spool.pop(entry)
                continue
            if rows is not None:
                ok = self._deliver_scalars(rows, 0)
            else:
                ok = self._deliver_frame(meta, body, 0)
                if ok:
                    self.stats.incr("replayed_frames")
            if not ok:
                break
            self.spool.pop(entry)
        self.stats.set("spool_bytes", self.spool.nbytes)

    def drain_spool(self, until: float) -> str:
        """Replay the spool in this thread until empty or ``until`` (``spectrawatch sync``).

        Returns why it stopped early, or ``""`` when everything was delivered.
        """
        if not self._online():
            if self.stats.off_reason:  # the token may not write (a read token)
                return self.stats.off_reason
            if self._run_refused:  # reached, and refused: no network problem to look for
                return f"the server refused the run: {self._run_refused}"
            return f"server unreachable: {self.stats.last_error or 'no reply'}"
        while len(self.spool):
            if time.monotonic() >= until:
                return "out of time"
            before = len(self.spool)
            self._replay(_REPLAY_PER_TURN)
            if len(self.spool) == before:
                return f"stopped: {self.stats.last_error or 'no progress'}"
        return ""

    def _past_deadline(self) -> bool:
        return time.monotonic() >= self._deadline

    def _send_stats(self) -> None:
        if (
            self.run_id is None
            or self._run_deleted
            or self.stats.off_reason
            or time.monotonic() < self._offline_until
        ):
            return
        snap = self.stats.snapshot()
        snap["spooled_pending"] = len(self.spool)
        if snap == self._last_stats:
            return
        try:
            self.api.post_client_stats(self.run_id, snap, uid=self.run_uid)
            self._last_stats = snap
        except Rejected as exc:
            if not (self._run_lost(exc) or self._refused_role(exc)):
                self.errors.record("client stats", exc)
        except Unavailable as exc:
            self.errors.record("client stats", exc)

    def _run_lost(self, exc: Rejected) -> bool:
        """True when the server no longer has this session's run: ``404 run_not_found`` for a
        write naming the run's ``uid`` (a server that knows uids answers ``run_deleted`` for a
        deleted run, so this one was never deleted: the server's database was replaced or
        restored from an older backup, and the id may even be another run's). Handled like an
        outage: the item is spooled, and after the backoff the run is created again by name and
        the spool replayed into it. ``run_deleted`` marks the run: nothing more is sent."""
        if exc.status != 404:
            return False
        if exc.code == "run_deleted":
            if not self._run_deleted:
                self._run_deleted = True
                self.errors.note(
                    "run deleted",
                    f"run {self.run_id} was deleted on the server; nothing more is sent for it",
                )
            return False
        if exc.code != "run_not_found" or self.run_uid is None:
            return False  # a server without uids says run_not_found for deleted runs too
        self.stats.incr("run_lost")
        self.errors.note(
            "run lost", f"the server no longer has run {self.run_id}; creating it again"
        )
        self.run_id = self.run_uid = None
        self._pause()
        return True

    def _token_fix(self) -> str:
        """What to do about a 401/403 at run creation: the token to make, and how to pass it
        (here or in ``spectrawatch sync``, which replays with this class)."""
        project = self.settings.project
        return (
            f"a write token for project {project!r} is needed (`spectrawatch token create "
            f"--project {project}`): pass token= to monitor.init (sync: --token) or set "
            "SPECTRAWATCH_TOKEN"
        )

    def _sync_command(self) -> str:
        """How to deliver what stays spooled: under a token refusal only with another token."""
        if self._auth_refused or self.stats.off_reason:
            return "`spectrawatch sync --token <write token>`"
        return "`spectrawatch sync`"

    def _refused_role(self, exc: Rejected) -> bool:
        """True when the server refused this client's token its role (403
        ``insufficient_role``: a ``read`` token, for dashboards). Retrying cannot help and a
        spool of the run could only be delivered with another token: monitoring turns itself
        off for this run (the queue dropped, nothing new spooled, the captures stop; entries
        spooled before stay for ``spectrawatch sync``), logged once, and ``stats.off_reason``
        (client stat ``monitoring_off``) says why."""
        if exc.status != 403 or exc.code != "insufficient_role":
            return False
        if self.stats.off_reason:
            return True
        project = self.settings.project
        reason = (
            f"the server refused this client's token: {exc}. A read token is for dashboards; "
            "a training client needs role 'write': create one with `spectrawatch token create "
            f"--project {project} --role write` and set SPECTRAWATCH_TOKEN"
        )
        self.stats.off_reason = reason
        self.stats.last_error = reason
        self.stats.incr("errors")
        with self._cond:
            dropped = len(self._queue)
            self._queue.clear()
            self._queue_bytes = 0
            self._scalars = []
            self.stats.set("queued_frames", 0)
        logger.warning(
            "spectrawatch: monitoring is off for run %r (training goes on; nothing more is "
            "sent or spooled, %d queued frame(s) dropped): %s",
            self.run_name,
            dropped,
            reason,
        )
        return True

    def _finish(self) -> None:
        """Final drain: replay what the deadline allows, report stats, close the run.

        If the server was never reached in this session, nothing is waited for: the spool stays
        on disk for ``spectrawatch sync`` or the next session of this run name.
        """
        if self.settings.mode == "offline":
            self._leave_spool({**self._summary, "client": self.stats.snapshot()})
            return
        if self.run_id is None:  # one last try (the server may have come up meanwhile)
            self._offline_until = 0.0
            self._online()
        while (
            len(self.spool)
            and not self.stats.off_reason
            and not self._past_deadline()
            and (self.run_id is not None or self.run_info)  # reached in this session
            and self._own_spool()
        ):
            if not self._online():
                wait = min(self._offline_until, self._deadline) - time.monotonic()
                if wait > 0:
                    time.sleep(min(wait, 0.5))
                continue
            before = len(self.spool)
            self._replay(_REPLAY_PER_TURN)
            if len(self.spool) == before:
                continue
        summary = {**self._summary, "client": self.stats.snapshot()}
        if self.stats.off_reason:  # nothing more is sent; nothing new was spooled
            if len(self.spool):  # spooled before the refusal: `sync` with a write token
                self._leave_spool(summary)
            elif self._spool_owned:  # an earlier session's run.json stays as it was
                self.spool.unlock()
            return
        try:
            if (
                self.run_id is not None
                and not self._run_deleted
                and time.monotonic() >= self._offline_until
            ):
                self.api.not_after = self._deadline + 0.4  # a short grace for the final status
                self._last_stats_at = time.monotonic()
                self._send_stats()
                try:
                    self.api.update_run(self.run_id, self._final_status, summary, uid=self.run_uid)
                    self._status_sent = True
                except Rejected as exc:
                    if not self._refused_role(exc):
                        self.errors.record("close run", exc)
                except Unavailable as exc:
                    self.errors.record("close run", exc)
        finally:
            self._leave_spool(summary)

    def _leave_spool(self, summary: dict[str, Any]) -> None:
        """Say what stays spooled (and how the run ended, for ``sync``), or tidy up."""
        try:
            if len(self.spool):
                self.spool.write_meta(self.run_meta(status=self._final_status, summary=summary))
                if self.settings.mode == "offline":
                    logger.info(
                        "spectrawatch: offline run %r: %d entries in %s; upload them with "
                        "`spectrawatch sync`",
                        self.run_name,
                        len(self.spool),
                        self.spool.dir,
                    )
                else:
                    # resume="never" spools a new run's entries in a folder of their own: only
                    # `sync` delivers them (resuming the name joins the run stored under it)
                    also = (
                        ""
                        if self.settings.resume == "never"
                        else f" (so does resuming run {self.run_name!r})"
                    )
                    logger.warning(
                        "spectrawatch: %d entries could not be delivered before finish and "
                        "stay spooled in %s: %s delivers them%s",
                        len(self.spool),
                        self.spool.dir,
                        self._sync_command(),
                        also,
                    )
                self.spool.unlock()
            elif (
                self.settings.mode != "offline"
                and not self._status_sent
                and not self._run_deleted  # `sync` would create it again
                and self._own_spool()
            ):
                # every entry was delivered but not how the run ended: run.json alone keeps it
                # for `spectrawatch sync` (else the run would stay "running" on the server)
                self.spool.write_meta(self.run_meta(status=self._final_status, summary=summary))
                logger.warning(
                    "spectrawatch: the final status of run %r (%s) could not be delivered; "
                    "%s sets it (%s)",
                    self.run_name,
                    self._final_status,
                    self._sync_command(),
                    self.spool.dir,
                )
                self.spool.unlock()
            elif self._spool_owned:  # also when an earlier session's run.json made _loop
                # take the spool: this session's status replaces it, so it must not outlive
                # this session (a later `spectrawatch sync` would set the old status again)
                self.spool.remove_if_empty()
        except OSError as exc:
            self.errors.record("spool close", exc)


def numbered_names(name: str) -> list[str]:
    """``name``, then ``name-2`` ... ``name-100``, then ``name-<6 random hex digits>`` (each
    shortened to the server's 200 characters by cutting ``name``): the names ``resume="never"``
    tries in turn."""
    suffixes = ["", *(f"-{n}" for n in range(2, _NUMBERED_MAX + 1)), f"-{secrets.token_hex(3)}"]
    return [name[: wire.NAME_MAX - len(x)] + x for x in suffixes]


def _spooled_rows(body: bytes) -> list[dict[str, Any]]:
    """The scalar rows of a spooled batch; ``ValueError`` when they are not a list of objects."""
    import json

    rows = json.loads(body)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError("spooled scalar batch is not a list of rows")
    return rows


def wire_json(rows: Sequence[Mapping[str, Any]]) -> bytes:
    import json

    return json.dumps(list(rows), separators=(",", ":")).encode()


# the senders alive in this process, for the one fork hook below (a hook per sender could never
# be unregistered: a process making 10,000 runs would run 10,000 hooks at every fork)
_LIVE: weakref.WeakSet[Sender] = weakref.WeakSet()


def _after_fork() -> None:
    """In a forked child (e.g. a DataLoader worker) every sender is inert: no thread, no sends.
    Its locks are new (one the parent's sender thread held at the fork would never be released
    in the child: a ``monitor.log`` of a NaN there blocked for good), and its copy of the
    spool's lock descriptor is closed (it kept the spool locked after the parent ended)."""
    for sender in list(_LIVE):
        sender._disabled = True
        sender._cond = threading.Condition(threading.Lock())
        sender.stats._lock = threading.Lock()
        sender.errors._lock = threading.Lock()
        sender._queue.clear()
        sender._scalars = []
        sender.spool.unlock()  # its copy only: the parent's descriptor keeps the lock


os.register_at_fork(after_in_child=_after_fork)
