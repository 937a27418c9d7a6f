"""Scale-out queue: procrastinate on PostgreSQL (``SPECTRAWATCH_QUEUE=procrastinate``).

The analysis job of a frame is a procrastinate job deferred **on the SQLAlchemy session's own
psycopg connection**, so the frame row and its job commit or roll back together (no dual
write, no broker). Jobs are consumed by ``spectrawatch worker`` processes
(:mod:`spectrawatch_server.worker_main`), never by the API process.

Delivery is at-least-once and the handler is idempotent (results are replaced per
(frame, analysis)), so every job is done exactly once *in effect*:

- queueing lock ``frame:<id>``: at most one waiting job per frame;
- lock ``run:<id>``: the jobs of one run execute one at a time, in ingest order, so analyses
  that read earlier results of their run (SED phase history) see them, whichever worker ran
  them; different runs proceed in parallel on different workers;
- retries with exponential backoff (``backoff ** attempt`` seconds); once the attempts are used
  up the job ends ``failed`` and its frame's status becomes ``failed`` (visible in the API);
- a job cut by a database outage (:func:`~spectrawatch_server.queue.base.database_unavailable`)
  is retried after ``db_retry_seconds`` for as long as the outage lasts, and its attempt is
  given back (:class:`AnalysisRetry`, :class:`RefundingJobManager`), as in the embedded queue;
- stalled jobs: workers heartbeat every ``heartbeat_seconds``; a periodic task (procrastinate's
  opt-in recipe, docs ``howto/production/retry_stalled_jobs``) re-queues the ``doing`` jobs of
  workers silent for ``stalled_seconds`` (a ``kill -9``-ed or wedged worker), counting it as an
  attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from collections.abc import Sequence
from datetime import datetime

import psycopg
from procrastinate import App, BaseConnector, PsycopgConnector, RetryStrategy
from procrastinate import exceptions as pexc
from procrastinate.job_context import JobContext
from procrastinate.jobs import Job, Status
from procrastinate.manager import JobManager
from procrastinate.retry import BaseRetryStrategy, RetryDecision
from procrastinate.schema import SchemaManager
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from spectrawatch_server.db import migrate
from spectrawatch_server.db.models import Frame
from spectrawatch_server.queue.base import JobHandler, database_unavailable
from spectrawatch_server.storage import job_store

log = logging.getLogger(__name__)

ANALYSIS_TASK = "spectrawatch.analyse_frame"
STALLED_TASK = "spectrawatch.retry_stalled_jobs"
CLEANUP_TASK = "spectrawatch.delete_old_jobs"
ANALYSIS_QUEUE = "spectrawatch-analysis"
MAINTENANCE_QUEUE = "spectrawatch-maintenance"
# A worker cut off from PostgreSQL tries one connection after 0.5, 1, 2, 4, 5, 5, ... s (each
# wait drawn in [half, all] of that: workers cut off together do not retry in step): back
# within 5 s of the database, at most one attempt per 2.5 s per worker while it is away.
_RECONNECT_FIRST_SECONDS = 0.5
_RECONNECT_MAX_SECONDS = 5.0
_RECONNECT_CONNECT_TIMEOUT = 5  # seconds (libpq connect_timeout) of one attempt
_POOL_TIMEOUT = _RECONNECT_MAX_SECONDS  # longest wait of a worker task for a pooled connection
_HEALTHY_RUN_SECONDS = 30.0  # a worker up this long before it stopped starts the backoff afresh
_SCHEMA_LOCK_KEY = 0x5357_5150  # pg_advisory_xact_lock key serialising schema installs

# procrastinate job status -> the embedded queue's names, so health/API read the same keys.
STATUS_NAMES = {
    "todo": "pending",
    "doing": "running",
    "succeeded": "done",
    "failed": "failed",
    "cancelled": "cancelled",
    "aborting": "running",
    "aborted": "failed",
}


_DEVICE_SEP = "@"  # application_name of a worker's connections: <name>@<device>


def worker_application_name(name: str, device: str) -> str:
    """``<name>@<device>`` (PostgreSQL keeps 63 bytes): who holds which lock, on which device."""
    suffix = f"{_DEVICE_SEP}{device}"
    return name.replace(_DEVICE_SEP, "-")[: 63 - len(suffix)] + suffix


def reconnect_delay(failures: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before reconnection attempt ``failures + 1``: capped exponential
    backoff (0.5 s doubling up to 5 s) with "equal jitter" (a uniform draw in its upper half)."""
    ceiling = min(_RECONNECT_MAX_SECONDS, _RECONNECT_FIRST_SECONDS * 2.0 ** min(failures, 16))
    return ceiling * (rng or random).uniform(0.5, 1.0)


class AnalysisRetry(BaseRetryStrategy):
    """When to run a failed analysis job again.

    A job whose analysis raised is retried ``max_attempts - 1`` times with exponential backoff
    (procrastinate's :class:`~procrastinate.RetryStrategy`). A job cut by a database outage is
    retried after ``db_retry_seconds``, without limit, and its id is noted in ``refunds`` so
    that :class:`RefundingJobManager` gives its attempt back: an outage never uses up the
    attempts of a frame that nothing was wrong with.
    """

    def __init__(self, max_attempts: int, backoff_seconds: int, db_retry_seconds: int) -> None:
        # procrastinate counts *retries*: attempts 0..max_attempts-1 make max_attempts runs.
        self.analysis = RetryStrategy(
            max_attempts=max_attempts - 1, exponential_wait=backoff_seconds
        )
        self.db_retry_seconds = db_retry_seconds
        self.refunds: set[int] = set()

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision | None:
        if database_unavailable(exception):
            if job.id is not None:
                self.refunds.add(job.id)
            return RetryDecision(retry_in={"seconds": self.db_retry_seconds})
        return self.analysis.get_retry_decision(exception=exception, job=job)


_REFUND_SQL = (
    "UPDATE procrastinate_jobs SET attempts = attempts - 1 "
    "WHERE id = ANY(%(ids)s) AND status IN ('todo', 'doing')"
)


class RefundingJobManager(JobManager):
    """procrastinate's job manager, giving back the attempts of jobs noted in ``refunds``.

    The refund is written *before* procrastinate's retry adds the attempt (while the job is
    still ``doing``, so no worker can fetch it in between): net, the attempt is not counted.
    When the database is still away, the ids stay noted and are refunded by the next retry or
    when the worker reconnects (:meth:`refund_attempts`); the job, left ``doing``, is then
    re-queued by the stalled-job check, whose added attempt the refund cancels.
    """

    def __init__(self, connector: BaseConnector, refunds: set[int]) -> None:
        super().__init__(connector)
        self.refunds = refunds

    async def refund_attempts(self) -> None:
        ids = sorted(self.refunds.copy())  # copy(): atomic while a job's thread adds to it
        if ids:
            await self.connector.execute_query_async(_REFUND_SQL, ids=ids)
            self.refunds.difference_update(ids)
            log.info("gave back the attempt of job(s) cut by a database outage: %s", ids)

    async def retry_job(
        self,
        job: Job,
        retry_at: datetime | None = None,
        priority: int | None = None,
        queue: str | None = None,
        lock: str | None = None,
    ) -> None:
        await self.refund_attempts()
        await super().retry_job(job, retry_at=retry_at, priority=priority, queue=queue, lock=lock)


class QueueNotSupported(ValueError):
    """The procrastinate queue was configured on a database that is not PostgreSQL."""


def libpq_dsn(database_url: str) -> str:
    """The libpq connection string for a SQLAlchemy ``postgresql[+driver]://`` URL."""
    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        raise QueueNotSupported(
            f"the procrastinate queue needs PostgreSQL, not {url.get_backend_name()!r}: "
            "set SPECTRAWATCH_DATABASE_URL=postgresql+psycopg://... or SPECTRAWATCH_QUEUE=embedded"
        )
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def ensure_schema(engine: Engine) -> bool:
    """Install procrastinate's tables and functions if missing; True when it installed them.

    Serialised by an advisory lock, so an API and several workers starting together install it
    once. (Upgrading procrastinate across schema versions: ``procrastinate schema --migrate``.)
    """
    with engine.begin() as conn:
        migrate.lift_timeouts(conn)
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
        if conn.scalar(text("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")):
            return False
        driver = conn.connection.driver_connection
        assert driver is not None
        driver.execute(SchemaManager.get_schema())  # no parameters: sent verbatim
        log.info("installed the procrastinate schema")
        return True


class ProcrastinateQueue:
    """:class:`~spectrawatch_server.queue.base.JobQueue` over procrastinate.

    ``handler`` is the job body (``Worker.process``); the API process passes it too but never
    consumes jobs: only :meth:`run_worker` (the ``spectrawatch worker`` process) does.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        database_url: str,
        handler: JobHandler,
        *,
        max_attempts: int = 5,
        backoff_seconds: int = 2,
        heartbeat_seconds: float = 10.0,
        stalled_seconds: float = 30.0,
        stall_check_seconds: int = 10,
        poll_seconds: float = 5.0,
        db_retry_seconds: int = 5,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not 1 <= stall_check_seconds <= 59:
            raise ValueError("stall_check_seconds must be within 1..59 (a cron seconds step)")
        self.sessions = sessions
        self.handler = handler
        self.max_attempts = max_attempts
        self.heartbeat_seconds = heartbeat_seconds
        self.stalled_seconds = stalled_seconds
        self.poll_seconds = poll_seconds
        self.retry = AnalysisRetry(max_attempts, backoff_seconds, db_retry_seconds)
        self.dsn = libpq_dsn(database_url)
        # timeout: a worker task waits this long for a pooled connection (psycopg_pool's
        # default is 30 s, during which its reconnections back off up to 16 s apart): with the
        # database away the worker stops within it and reconnects on the short backoff instead
        self.app = App(connector=PsycopgConnector(conninfo=self.dsn, timeout=_POOL_TIMEOUT))
        # before the tasks are registered: they keep the job manager they were made with
        self.jobs = RefundingJobManager(self.app.connector, self.retry.refunds)
        self.app.job_manager = self.jobs
        self._register_tasks(stall_check_seconds)

    # --- JobQueue --------------------------------------------------------------------

    def enqueue(self, session: Session, frame_id: int) -> None:
        """Defer the frame's analysis on the session's connection (same transaction)."""
        frame = session.get_one(Frame, frame_id)  # in the identity map: flushed by the caller
        try:
            # A SAVEPOINT, so a queueing-lock conflict leaves the caller's transaction usable;
            # session.connection() inside it is what makes SQLAlchemy emit the SAVEPOINT.
            with session.begin_nested():
                self.app.configure_task(
                    ANALYSIS_TASK,
                    lock=f"run:{frame.run_id}",
                    queueing_lock=f"frame:{frame_id}",
                    connection=session.connection().connection.driver_connection,
                ).defer(frame_id=frame_id)
        except pexc.AlreadyEnqueued:
            log.info("analysis of frame %d is already queued", frame_id)

    def forget_run(self, session: Session, run_id: int) -> int:
        """Delete the run's jobs still waiting (``todo``; their lock names the run). One a
        worker already took runs and finds its frame gone (a no-op)."""
        result = session.execute(
            text(
                "DELETE FROM procrastinate_jobs WHERE queue_name = :queue AND lock = :lock "
                "AND status = 'todo'"
            ),
            {"queue": ANALYSIS_QUEUE, "lock": f"run:{run_id}"},
        )
        return int(result.rowcount)  # type: ignore[attr-defined]

    def requeue(self, session: Session, frame_ids: Sequence[int]) -> None:
        """Defer the frames' analyses again, one after another (the ``run:`` lock runs a run's
        jobs in id order); their finished jobs stay, as every finished job does."""
        for frame_id in frame_ids:
            self.enqueue(session, frame_id)

    def backlog(self, session: Session, run_id: int) -> int:
        """The run's analysis jobs ``todo`` or ``doing`` (their lock names the run)."""
        found = session.scalar(
            text(
                "SELECT count(*) FROM procrastinate_jobs WHERE queue_name = :queue "
                "AND lock = :lock AND status IN ('todo', 'doing')"
            ),
            {"queue": ANALYSIS_QUEUE, "lock": f"run:{run_id}"},
        )
        return int(found or 0)

    def notify(self) -> None:
        """Nothing to do: procrastinate's insert trigger NOTIFYs listening workers."""

    def start(self) -> None:
        """Nothing to do: jobs are consumed by ``spectrawatch worker`` processes."""

    def stop(self, timeout: float = 10.0) -> None:
        """Nothing to do (see :meth:`start`)."""

    def counts(self) -> dict[str, int]:
        """Analysis jobs ``pending`` (todo) and ``running`` (doing), and ``failed_recent``:
        failed among the latest :data:`~spectrawatch_server.storage.job_store.RECENT_JOBS`,
        named as in the embedded queue. Finished jobs stay in ``procrastinate_jobs`` for ever,
        so nothing counts them all: the first count reads procrastinate's partial index of
        waiting and running jobs (``procrastinate_jobs_id_lock_idx_v1``), the second the newest
        ids of the primary key."""
        with self.sessions() as session:
            return analysis_job_counts(session)

    @property
    def alive(self) -> bool:
        """Whether at least one worker heartbeat is fresher than the stall timeout."""
        return self.live_workers()[0] > 0

    def live_workers(self) -> tuple[int, list[str]]:
        """Workers with a heartbeat fresher than the stall timeout, and the devices of the
        workers connected to the database (from their ``application_name``, see
        :func:`worker_application_name`), e.g. ``(2, ["cuda:0", "cuda:1"])``."""
        with self.sessions() as session:
            live = session.scalar(
                text(
                    "SELECT count(*) FROM procrastinate_workers WHERE last_heartbeat > "
                    "now() - make_interval(secs => :secs)"
                ),
                {"secs": self.stalled_seconds},
            )
            names = session.scalars(
                text(
                    "SELECT DISTINCT application_name FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name LIKE :pattern"
                ),
                {"pattern": f"%{_DEVICE_SEP}%"},
            ).all()
        devices = {name.rsplit(_DEVICE_SEP, 1)[1] for name in names}
        return int(live or 0), sorted(devices)

    # --- worker side -------------------------------------------------------------------

    def run_worker(self, name: str) -> None:
        """Consume jobs in this process, one at a time, until SIGINT/SIGTERM (blocks).

        The job body runs in a thread of this process (procrastinate runs sync tasks via
        ``asyncio.to_thread``), so the event loop keeps heartbeating during a long GPU job.
        """
        asyncio.run(self.run_worker_async(name))

    async def run_worker_async(self, name: str) -> None:
        """Run procrastinate's worker until SIGINT/SIGTERM, reconnecting after database loss.

        procrastinate stops a worker whose LISTEN connection or heartbeat fails (the database
        restarted, a network blip); this process then reconnects with a capped, jittered
        backoff (:func:`reconnect_delay`: 0.5 s up to 5 s) and goes on. The job in hand of a
        lost worker is re-queued by the stalled-job check.
        On a signal the current job finishes first (procrastinate's graceful stop).
        """
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        failures = 0
        try:
            while not stop.is_set():
                started = loop.time()
                worker = asyncio.create_task(self._run_worker_once(name))
                stopped = asyncio.create_task(stop.wait())
                await asyncio.wait({worker, stopped}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                if not worker.done():  # a signal: cancelling makes procrastinate stop gracefully
                    worker.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await worker
                    return
                error = worker.exception()
                if stop.is_set():
                    return
                failures = 0 if loop.time() - started > _HEALTHY_RUN_SECONDS else failures
                delay = reconnect_delay(failures)
                failures += 1
                log.warning(
                    "worker %s stopped (%s); reconnecting to the database in %.1f s",
                    name,
                    _first_line(error) if error else "lost its database connection",
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    async def _run_worker_once(self, name: str) -> None:
        # One connection first: procrastinate's pool, opened while the database is away, waits
        # up to 30 s with its own growing backoff (the worker came back up to 18 s after the
        # database); a failed probe goes straight back to run_worker_async's short backoff.
        probe = await psycopg.AsyncConnection.connect(
            self.dsn, connect_timeout=_RECONNECT_CONNECT_TIMEOUT
        )
        await probe.close()
        connector = self.app.connector
        try:
            await connector.open_async()
            await self.jobs.refund_attempts()  # of jobs cut by the outage we reconnect after
        except BaseException:
            # A failed or cancelled start leaves the pool half open: on a stop while it
            # connects, psycopg_pool's connection tasks swallow the cancellation and retry
            # for ever, so the process would never end (and a reconnection would reuse it).
            await connector.close_async()
            raise
        try:
            await self.app.run_worker_async(
                queues=[ANALYSIS_QUEUE, MAINTENANCE_QUEUE],
                name=name,
                concurrency=1,  # one job per device at a time
                fetch_job_polling_interval=self.poll_seconds,
                update_heartbeat_interval=self.heartbeat_seconds,
                stalled_worker_timeout=self.stalled_seconds,
                install_signal_handlers=False,  # run_worker_async handles them
            )
        finally:
            await connector.close_async()

    async def retry_stalled_jobs(self) -> list[int]:
        """Re-queue (or, out of attempts, fail) the running jobs of silent workers; their ids."""
        await self.jobs.refund_attempts()  # first, so that a job cut by an outage is not failed
        stalled = await self.app.job_manager.get_stalled_jobs(
            seconds_since_heartbeat=self.stalled_seconds
        )
        handled = []
        for job in stalled:
            assert job.id is not None
            handled.append(job.id)
            if job.task_name == ANALYSIS_TASK and job.attempts + 1 >= self.max_attempts:
                log.warning("job %d stalled on its last attempt: marking it failed", job.id)
                await asyncio.to_thread(
                    self._fail_frame, _frame_id(job), "worker lost during the last attempt"
                )
                await self.app.job_manager.finish_job(job, Status.FAILED, delete_job=False)
            else:
                log.warning("job %d of a stalled worker re-queued", job.id)
                await self.app.job_manager.retry_job(job)
        return handled

    # --- internals ---------------------------------------------------------------------

    def _register_tasks(self, stall_check_seconds: int) -> None:
        retry = self.retry

        def analyse_frame(context: JobContext, frame_id: int) -> None:
            try:
                self.handler(frame_id)
            except Exception as exc:
                if retry.get_retry_decision(exception=exc, job=context.job) is None:
                    log.error("analysis of frame %d failed for good: %r", frame_id, exc)
                    self._fail_frame(frame_id, repr(exc))
                raise

        async def retry_stalled_jobs(timestamp: int) -> None:
            await self.retry_stalled_jobs()

        self.app.task(name=ANALYSIS_TASK, queue=ANALYSIS_QUEUE, pass_context=True, retry=retry)(
            analyse_frame
        )
        stalled = self.app.task(name=STALLED_TASK, queue=MAINTENANCE_QUEUE, priority=10)(
            retry_stalled_jobs
        )
        # a 6th cron field is seconds: every `stall_check_seconds` s
        self.app.periodic(cron=f"* * * * * */{stall_check_seconds}", periodic_id="stalled")(stalled)

        async def delete_old_jobs(timestamp: int) -> None:
            # The stalled-job check leaves a finished job every few seconds; analysis jobs stay.
            await self.app.job_manager.delete_old_jobs(
                nb_hours=1, queue=MAINTENANCE_QUEUE, include_failed=True
            )

        cleanup = self.app.task(name=CLEANUP_TASK, queue=MAINTENANCE_QUEUE)(delete_old_jobs)
        self.app.periodic(cron="*/15 * * * *", periodic_id="cleanup")(cleanup)

    def _fail_frame(self, frame_id: int | None, error: str) -> None:
        if frame_id is None:
            return
        with self.sessions.begin() as session:
            job_store.finish_frame(session, frame_id, "failed", error)


_ACTIVE_SQL = (
    "SELECT status::text, count(*) FROM procrastinate_jobs WHERE queue_name = :queue "
    "AND status = ANY (ARRAY['todo'::procrastinate_job_status, 'doing'::procrastinate_job_status])"
    " GROUP BY status"
)
_RECENT_FAILED_SQL = (
    "SELECT count(*) FROM (SELECT status FROM procrastinate_jobs WHERE queue_name = :queue "
    "ORDER BY id DESC LIMIT :recent) AS latest WHERE status = 'failed'"
)


def analysis_job_counts(session: Session) -> dict[str, int]:
    """:meth:`ProcrastinateQueue.counts` on an open session."""
    params = {"queue": ANALYSIS_QUEUE}
    active = {"pending": 0, "running": 0}
    for status, n in session.execute(text(_ACTIVE_SQL), params):
        name = STATUS_NAMES.get(status, status)
        active[name] = active.get(name, 0) + int(n)
    failed = session.scalar(text(_RECENT_FAILED_SQL), {**params, "recent": job_store.RECENT_JOBS})
    return active | {"failed_recent": int(failed or 0)}


def _first_line(error: BaseException) -> str:
    """``Type: first line of the message`` (psycopg's connection errors run to three lines)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _frame_id(job: Job) -> int | None:
    value = job.task_kwargs.get("frame_id")
    return value if isinstance(value, int) else None
