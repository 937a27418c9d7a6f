"""Group commit of ingested frames: concurrent requests share one transaction.

Each ingest request hands its validated frame row (its blob already durable) to the
:class:`FrameCommitter` of its app and waits. One drain task per event loop takes everything
queued so far (up to ``max_batch`` rows) and inserts those frames, their analysis jobs and the
run activity in one transaction on a threadpool thread, then answers every waiting request. A
frame is acknowledged only after the transaction holding it has committed.

A batch that fails on the idempotency-key constraint (a replay, or two requests racing with the
same key), or that holds a frame of a run deleted meanwhile (:class:`RunGone`), is redone one
frame per transaction, so one such frame costs only itself. Any other error (database down) is
raised in every request of the batch, unless the batch was committed all the same (a connection
lost while the database acknowledged COMMIT): its rows are read back and answered; when they
cannot be read, :class:`CommitUnknown` tells the requests to keep their blobs.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from spectrawatch_server.db.models import Frame
from spectrawatch_server.queue.base import JobQueue
from spectrawatch_server.storage import repository as repo


class RunGone(Exception):
    """The frame's run was deleted before the frame could be committed."""

    def __init__(self, run_id: int) -> None:
        super().__init__(f"run {run_id} was deleted")
        self.run_id = run_id


class CommitUnknown(Exception):
    """The batch's transaction failed at a point where it may have committed, and the database
    could not be asked: a request must keep its blob (a row may name it; an orphan is removed
    at the next start-up) and answer ``error``, the failure itself."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True)
class Committed:
    """The stored frame, and whether it is new (False: the key was already stored)."""

    frame: Frame
    created: bool


@dataclass
class _Pending:
    frame: Frame
    future: asyncio.Future[Committed]


class FrameCommitter:
    """Batches frame inserts of concurrent requests (see the module docstring)."""

    def __init__(
        self, sessions: sessionmaker[Session], queue: JobQueue, max_batch: int = 64
    ) -> None:
        self.sessions = sessions
        self.queue = queue
        self.max_batch = max_batch
        self._pending: list[_Pending] = []
        self._drain: asyncio.Task[None] | None = None
        self.batches = 0  # transactions committed, for benchmarks and tests
        self.frames = 0

    async def commit(self, frame: Frame) -> Committed:
        """Insert ``frame`` and its job; returns once durable (or the stored frame of its key)."""
        item = _Pending(frame, asyncio.get_running_loop().create_future())
        self._pending.append(item)
        if self._drain is None or self._drain.done():
            self._drain = asyncio.create_task(self._run())
        # shield: a client that disconnects must not cancel the batch its frame is part of
        return await asyncio.shield(item.future)

    async def _run(self) -> None:
        while self._pending:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            try:
                results = await run_in_threadpool(self.write, [p.frame for p in batch])
            except Exception as exc:  # database down...: each waiting request raises it
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            except BaseException:  # cancelled (shutdown): nobody will be answered
                for p in batch:
                    p.future.cancel()
                raise
            for p, result in zip(batch, results, strict=True):
                if p.future.done():
                    continue
                if isinstance(result, Exception):
                    p.future.set_exception(result)
                else:
                    p.future.set_result(result)
            self.queue.notify()

    def write(self, frames: list[Frame]) -> list[Committed | Exception]:
        """Insert ``frames`` (+ jobs) in one transaction; per frame again if a key is taken.

        Raises only when nothing was stored; after a split, each frame gets its own outcome
        (a frame whose own transaction failed gets its exception, the others their rows).
        """
        at_commit = [False]
        try:
            self._insert(frames, at_commit)
        except RunGone:
            if len(frames) == 1:
                raise
            return [self._write_one(f) for f in frames]
        except IntegrityError as exc:
            if len(frames) == 1:
                return [self._stored(frames[0], exc)]
            return [self._write_one(f) for f in frames]
        except DBAPIError as exc:
            if not at_commit[0]:  # failed before COMMIT was sent: rolled back for sure
                raise
            # the connection lost at COMMIT: the database may have committed all the same
            committed = self._committed_anyway(frames, exc)
            if committed is None:
                raise
            return committed
        self.batches += 1
        self.frames += len(frames)
        return [Committed(f, True) for f in frames]

    def _write_one(self, frame: Frame) -> Committed | Exception:
        try:
            return self.write([frame])[0]
        except Exception as exc:  # this frame's outcome, not the batch's
            return exc

    def _committed_anyway(
        self, frames: list[Frame], error: DBAPIError
    ) -> list[Committed | Exception] | None:
        """The rows of ``frames`` if their failed transaction committed all the same (each key
        stored with this upload's blob), None if it did not; :class:`CommitUnknown` when the
        database cannot say."""
        try:
            with self.sessions() as session:
                rows = [repo.frame_by_key(session, f.idempotency_key) for f in frames]
        except DBAPIError:
            raise CommitUnknown(error) from error
        stored = [r for r, f in zip(rows, frames, strict=True) if r and r.blob_key == f.blob_key]
        if not stored:
            return None
        if len(stored) < len(frames):  # one transaction holds all or none: not what it seems
            raise CommitUnknown(error) from error
        self.batches += 1
        self.frames += len(frames)
        return [Committed(r, True) for r in stored]

    def _stored(self, frame: Frame, error: IntegrityError) -> Committed:
        """The stored frame holding ``frame``'s key; ``error`` again if no frame has it."""
        with self.sessions() as session:
            existing = repo.frame_by_key(session, frame.idempotency_key)
        if existing is None:  # the failed constraint was not the key: a real error
            raise error
        return Committed(existing, False)

    def _insert(self, frames: list[Frame], at_commit: list[bool]) -> None:
        """Insert ``frames`` and their jobs in one transaction; ``at_commit[0]`` turns True
        once every statement but the COMMIT has run (a failure after it has an unknown
        outcome, one before it none)."""
        with self.sessions.begin() as session:
            live = repo.live_runs(session, {f.run_id for f in frames})
            gone = next((f.run_id for f in frames if f.run_id not in live), None)
            if gone is not None:
                raise RunGone(gone)
            repo.insert_frames(session, frames)
            for frame in frames:
                self.queue.enqueue(session, frame.id)
            session.flush()
            at_commit[0] = True
