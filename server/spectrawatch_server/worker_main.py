"""``spectrawatch worker``: long-lived analysis worker processes for the procrastinate queue.

One process per device, one job at a time per process: a GPU worker keeps its CUDA context
and caches warm between jobs and never shares the device with another job. CUDA is
initialised only inside the process that runs jobs (lazily, by the first tensor moved to the
device); with ``--concurrency N`` (CPU only) the supervisor starts N children with the
``spawn`` start method and never touches CUDA itself, so no child inherits a forked CUDA state.
Jobs carry a frame id; the worker reads the frame's blob from the shared blob store.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
from types import FrameType
from typing import Any

from sqlalchemy.engine import make_url

from spectrawatch_server.config import ServerSettings
from spectrawatch_server.supervision import die_with_parent

log = logging.getLogger(__name__)

EXIT_SCHEMA_TOO_NEW = 3  # the worker's exit status when a newer spectrawatch migrated the schema


class WorkerConfigError(ValueError):
    """A worker configuration that cannot run (wrong queue, several jobs on one GPU)."""


def is_cuda(device: str) -> bool:
    """Whether a device name (``cuda``, ``cuda:1``, ``auto``...) may put jobs on a GPU."""
    return device.startswith("cuda") or device == "auto"


def check_config(settings: ServerSettings, concurrency: int) -> None:
    """Refuse what would break the worker rules before any process or CUDA context starts."""
    if settings.queue != "procrastinate":
        raise WorkerConfigError(
            "`spectrawatch worker` consumes the procrastinate queue: set "
            "SPECTRAWATCH_QUEUE=procrastinate and SPECTRAWATCH_DATABASE_URL=postgresql+psycopg://..."
        )
    if not settings.resolved_database_url.startswith("postgresql"):
        raise WorkerConfigError(
            "the procrastinate queue needs PostgreSQL: set "
            "SPECTRAWATCH_DATABASE_URL=postgresql+psycopg://user:password@host/db"
        )
    if concurrency < 1:
        raise WorkerConfigError("--concurrency must be >= 1")
    if concurrency > 1 and is_cuda(settings.device):
        raise WorkerConfigError(
            "one job per GPU at a time: run one `spectrawatch worker --device cuda:K` per GPU "
            "(--concurrency > 1 is for --device cpu)"
        )


def default_name(device: str) -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{device}"


def worker_settings(settings: ServerSettings, application_name: str) -> ServerSettings:
    """The settings a worker process opens its database with: its connections named
    ``application_name`` (``pg_stat_activity``), and the worker's statement and lock timeouts
    instead of the API's (analysis reads and writes may take longer than a request should)."""
    url = make_url(settings.resolved_database_url)
    url = url.update_query_dict({"application_name": application_name})
    return settings.model_copy(
        update={
            "database_url": url.render_as_string(hide_password=False),
            "db_statement_timeout_seconds": settings.worker_db_statement_timeout_seconds,
            "db_lock_timeout_seconds": settings.worker_db_lock_timeout_seconds,
        }
    )


def serve(settings: ServerSettings, name: str | None = None) -> int:
    """Run one worker in this process until SIGINT/SIGTERM (finishing the job in hand)."""
    from spectrawatch_server.app import build_state  # torch is imported here, CUDA still idle
    from spectrawatch_server.queue.procrastinate import ProcrastinateQueue, worker_application_name
    from spectrawatch_server.worker import resolve_device  # is_available(): no CUDA context

    logging.getLogger("alembic").setLevel(logging.WARNING)  # per-plugin INFO lines at start
    worker_name = name or default_name(settings.device)
    # pg_stat_activity.application_name <name>@<device>: which worker holds which lock/job,
    # and the devices /health reports.
    app_name = worker_application_name(worker_name, str(resolve_device(settings.device)))
    state = build_state(worker_settings(settings, app_name))
    queue = state.queue
    if not isinstance(queue, ProcrastinateQueue):  # pragma: no cover - check_config prevents it
        raise WorkerConfigError("the worker needs the procrastinate queue")
    log.info("worker %s consuming analysis jobs on %s", worker_name, state.worker.device)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_maintenance)
    watch = SchemaWatch(state.engine, settings.resolved_database_url, worker_name)
    watch.start(settings.worker_schema_check_seconds)
    try:
        queue.run_worker(worker_name)
    finally:
        watch.stop()
        state.engine.dispose()
    return EXIT_SCHEMA_TOO_NEW if watch.too_new else 0


class SchemaWatch:
    """Stop this worker when a newer spectrawatch (an API process upgraded beside it) migrates
    the database past what this code knows: from then on its reads and writes would meet
    tables of another shape. Checked every ``period`` seconds on its own connection; on a
    newer revision it logs one error line and stops the worker as SIGTERM does (the job in hand
    finishes or is re-queued), and :func:`serve` returns :data:`EXIT_SCHEMA_TOO_NEW`. A failed
    check (database away) is skipped: the queue's reconnection handles that."""

    def __init__(self, engine: Any, url: str, name: str) -> None:
        self.engine = engine
        self.url = url
        self.name = name
        self.too_new = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, period: float) -> None:
        self._thread = threading.Thread(
            target=self._loop, args=(period,), name="schema-watch", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> bool:
        """One check: True when the schema is newer than this code (and the worker stops)."""
        from sqlalchemy.exc import SQLAlchemyError

        from spectrawatch_server.db.migrate import SchemaTooNew, check_revision

        try:
            with self.engine.connect() as connection:
                check_revision(connection, self.url)
        except SQLAlchemyError as exc:
            log.debug("schema check skipped: %s", exc)
            return False
        except SchemaTooNew as exc:
            self.too_new = True
            log.error(
                "worker %s stops: a newer spectrawatch migrated the database; %s", self.name, exc
            )
            os.kill(os.getpid(), signal.SIGTERM)  # the queue's graceful stop
            return True
        return False

    def _loop(self, period: float) -> None:
        while not self._stop.wait(period):
            if self.check():
                return


def _quiet_maintenance(record: logging.LogRecord) -> bool:
    """Drop procrastinate's per-run log lines of the every-few-seconds stalled-job check."""
    if record.levelno >= logging.WARNING or not record.name.startswith("procrastinate"):
        return True
    message = record.getMessage()
    return "retry_stalled_jobs" not in message and "delete_old_jobs" not in message


BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def threads_per_child(concurrency: int) -> int:
    """CPU threads for each of ``concurrency`` worker children: the cores split evenly."""
    return max(1, (os.cpu_count() or 1) // concurrency)


def run(settings: ServerSettings, concurrency: int = 1, name: str | None = None) -> int:
    """Entry point of ``spectrawatch worker``: one in-process worker or N spawned children."""
    check_config(settings, concurrency)
    if concurrency == 1:
        return serve(settings, name)
    _refuse_if_cuda_initialised()
    base = name or default_name(settings.device)
    # The children import numpy/torch afresh: their BLAS pools (numpy's OpenBLAS runs the CPU
    # HT-SR eigensolves) share the cores instead of each taking all of them.
    for var in BLAS_THREAD_VARS:
        os.environ.setdefault(var, str(threads_per_child(concurrency)))
    ctx = multiprocessing.get_context("spawn")
    children = [
        ctx.Process(target=_child, args=(settings, f"{base}-{i}", concurrency), name=f"{base}-{i}")
        for i in range(concurrency)
    ]
    for child in children:
        child.start()

    def forward(signum: int, _frame: FrameType | None) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    for child in children:
        child.join()
    codes = [child.exitcode or 0 for child in children]
    return max(codes, key=abs)


def _child(settings: ServerSettings, name: str, concurrency: int) -> None:
    """A spawned worker: dies with its supervisor, shares the CPU cores with its siblings."""
    die_with_parent()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    import torch

    torch.set_num_threads(threads_per_child(concurrency))
    sys.exit(serve(settings, name))


def _refuse_if_cuda_initialised() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise WorkerConfigError(
            "CUDA is initialised in the supervisor: children must not inherit it"
        )
