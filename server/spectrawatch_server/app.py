"""The FastAPI application: ``create_app(settings)`` wires database, blobs, queue and worker."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sqlalchemy import Engine

from spectrawatch._version import __version__
from spectrawatch.wire import FrameLimits
from spectrawatch_server.alerts.engine import engine_for
from spectrawatch_server.api.cross_site import CrossSiteGuard
from spectrawatch_server.api.deps import describe_roles
from spectrawatch_server.api.errors import install_error_handlers, method_index
from spectrawatch_server.api.head import HeadAsGet
from spectrawatch_server.api.known_query import KNOWN_QUERY_ONLY
from spectrawatch_server.api.limits import JsonBodyLimit, NulGuard
from spectrawatch_server.api.no_framing import NoFraming
from spectrawatch_server.api.openapi import (
    TAGS,
    document_errors,
    document_security,
    exact_integer_bounds,
    operation_id,
)
from spectrawatch_server.api.routes import (
    alerts,
    blobs,
    frames,
    health,
    metrics,
    projects,
    runs,
    scalars,
    webhooks,
)
from spectrawatch_server.api.state import AppState
from spectrawatch_server.config import ServerSettings, get_settings
from spectrawatch_server.db import migrate
from spectrawatch_server.db.session import make_engine, make_session_factory
from spectrawatch_server.queue.base import JobQueue
from spectrawatch_server.queue.embedded import EmbeddedQueue
from spectrawatch_server.startup import make_data_dir
from spectrawatch_server.storage import repository as repo
from spectrawatch_server.storage.blobs import FRAME_BLOB_KEY
from spectrawatch_server.storage.s3 import open_blob_store
from spectrawatch_server.supervision import die_with_parent
from spectrawatch_server.webhooks.deliver import build_sender
from spectrawatch_server.worker import FrameLoader, Worker, resolve_device

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
# under API_PREFIX (the dashboards' figure API is added by dashboards.install)
API_ROUTERS = (
    *(
        module.router
        for module in (health, projects, runs, frames, scalars, metrics, alerts, webhooks, blobs)
    ),
    projects.token_router,
)


def build_state(settings: ServerSettings) -> AppState:
    """Open the database (migrated to head), the blob store, the worker and the queue."""
    make_data_dir(settings.data_dir)
    engine = make_engine(
        settings.resolved_database_url,
        pool_timeout=settings.db_pool_timeout_seconds,
        statement_timeout=settings.db_statement_timeout_seconds,
        lock_timeout=settings.db_lock_timeout_seconds,
        transaction_pooling=settings.db_transaction_pooling,
    )
    migrate.upgrade(engine)
    sessions = make_session_factory(engine)
    worker_engine = _embedded_worker_engine(settings, engine)
    worker_sessions = make_session_factory(worker_engine) if worker_engine else sessions
    blobs = open_blob_store(settings)  # local directory, or S3 when SPECTRAWATCH_BLOB_URL=s3://
    limits = FrameLimits(
        max_tensors=settings.max_tensors,
        max_dims=settings.max_dims,
        max_tensor_elements=settings.max_tensor_elements,
        max_info_bytes=settings.max_info_bytes,
    )
    loader = FrameLoader(
        blobs,
        resolve_device(settings.device),
        limits,
        settings.max_body_bytes,
        settings.frame_cache_mb << 20,
    )
    worker = Worker(worker_sessions, loader, hooks=[engine_for(settings).evaluate])
    queue: JobQueue
    if settings.queue == "procrastinate":
        # Lazy: the [scale] extra. The API process only defers jobs; `spectrawatch worker`
        # processes consume them (ProcrastinateQueue.start/stop are no-ops).
        from spectrawatch_server.queue import procrastinate as pq

        pq.ensure_schema(engine)
        queue = pq.ProcrastinateQueue(
            sessions,
            settings.resolved_database_url,
            worker.process,
            max_attempts=settings.job_max_attempts,
            backoff_seconds=settings.job_backoff_seconds,
            heartbeat_seconds=settings.worker_heartbeat_seconds,
            stalled_seconds=settings.worker_stalled_seconds,
            stall_check_seconds=settings.stall_check_seconds,
            poll_seconds=settings.worker_poll_seconds,
        )
    else:
        queue = EmbeddedQueue(
            sessions,
            worker.process,
            worker_sessions=worker_sessions,
            lease_seconds=settings.job_lease_seconds,
            max_attempts=settings.job_max_attempts,
            poll_seconds=settings.worker_poll_seconds,
            backoff_seconds=settings.job_backoff_seconds,
        )
    return AppState(settings, engine, sessions, blobs, queue, worker, limits, worker_engine)


def _embedded_worker_engine(settings: ServerSettings, api_engine: Engine) -> Engine | None:
    """The in-process worker's own engine, with the worker's statement and lock timeouts
    (``WORKER_DB_*``; on SQLite the lock timeout is the busy timeout) instead of the API's: an
    analysis writes hundreds of rows for one frame and waits behind ingest for its run's lock,
    longer than a request should. None where no worker thread runs here (the procrastinate
    queue's API process, ``--no-worker``) or the timeouts are the same (``spectrawatch
    worker``'s settings)."""
    if settings.queue != "embedded" or not settings.run_worker:
        return None
    worker_timeouts = (
        settings.worker_db_statement_timeout_seconds,
        settings.worker_db_lock_timeout_seconds,
    )
    if worker_timeouts == (settings.db_statement_timeout_seconds, settings.db_lock_timeout_seconds):
        return None
    return make_engine(
        api_engine.url.render_as_string(hide_password=False),
        statement_timeout=settings.worker_db_statement_timeout_seconds,
        lock_timeout=settings.worker_db_lock_timeout_seconds,
        transaction_pooling=settings.db_transaction_pooling,
    )


def reconcile_blobs(state: AppState, min_age_seconds: float) -> int:
    """Delete temp uploads and blobs no frame row references (left by a crash mid-ingest).

    Only files older than ``min_age_seconds`` go: other API processes sharing the blob store
    may be between their blob write and their row insert. Only keys of the form the server
    writes (:data:`FRAME_BLOB_KEY`) are candidates; every removal is logged at WARNING.
    """
    removed = state.blobs.clear_temp(min_age_seconds)
    if removed:
        log.warning("removed %d temp upload(s) left by an earlier crash", removed)
    with state.sessions() as session:
        migrate.lift_timeouts(session.connection())  # every frame: no API statement timeout
        referenced = repo.referenced_blob_keys(session)
    for key in state.blobs.keys(min_age_seconds):
        if key not in referenced and FRAME_BLOB_KEY.fullmatch(key):
            log.warning("removing orphan blob %s (no frame row names it)", key)
            state.blobs.delete(key)
            removed += 1
    return removed


PRUNE_PERIOD_SECONDS = 3600.0


def _prune(state: AppState, days: float) -> None:
    frames = blobs.prune_expired(state, days)
    if frames:
        log.info("retention: released the blobs of %d frame(s) older than %g days", frames, days)


def create_served_app() -> FastAPI:
    """The factory ``spectrawatch server --workers N`` gives uvicorn for each of its processes:
    the app of the environment's settings, in a process that stops with the server's main
    process (killed by SIGKILL, it left them serving on its port)."""
    die_with_parent()
    return create_app()


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    """The ASGI app; nothing touches disk or database until the lifespan starts."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.check_startable()
        state = build_state(settings)
        # The embedded mode is one process, so nothing else can be mid-ingest at start-up.
        reconcile_blobs(state, 0.0 if settings.queue == "embedded" else 600.0)
        app.state.spectrawatch = state
        if settings.run_worker:
            state.queue.start()
        ticks = []
        if settings.prune_blobs_after_days > 0:
            days = settings.prune_blobs_after_days
            ticks.append((PRUNE_PERIOD_SECONDS, lambda: _prune(state, days)))
        sender = build_sender(settings, state.sessions, ticks) if settings.run_webhooks else None
        if sender is not None:
            sender.start()
        try:
            yield
        finally:
            if sender is not None:
                sender.stop()
            state.queue.stop()
            state.engine.dispose()
            if state.worker_engine is not None:
                state.worker_engine.dispose()

    app = FastAPI(
        title="spectrawatch",
        version=__version__,
        description="Spectral monitoring of neural-network training.",
        lifespan=lifespan,
        docs_url=None,  # served by api_docs from the package's files, not a CDN
        redoc_url=None,
        openapi_tags=TAGS,
        generate_unique_id_function=operation_id,
    )
    install_error_handlers(app)
    app.add_middleware(JsonBodyLimit, max_bytes=settings.max_json_bytes)
    app.add_middleware(NulGuard)
    app.add_middleware(NoFraming)
    if not settings.require_auth:
        app.add_middleware(CrossSiteGuard, public_url=settings.public_url)
    app.add_middleware(HeadAsGet)  # added last: runs first, so the others see a GET
    for api_router in API_ROUTERS:
        app.include_router(api_router, prefix=API_PREFIX, dependencies=[KNOWN_QUERY_ONLY])
    from spectrawatch_server.api import api_docs
    from spectrawatch_server.api.routes import dashboard_figures, dashboards  # pages, figures

    dashboards.install(app, API_PREFIX)
    api_docs.install(app, dashboard_figures.package_dir() / "static")
    schema_of = app.openapi
    routes = [r for router in (*API_ROUTERS, dashboard_figures.api_router) for r in router.routes]
    app.state.method_index = method_index(routes, API_PREFIX)  # a 405's Allow

    def openapi() -> dict[str, Any]:
        schema = schema_of()
        describe_roles(schema, routes, API_PREFIX)  # each description names the role it needs
        document_errors(schema, routes, API_PREFIX)  # the error answers, with their schema
        document_security(schema, routes, API_PREFIX)  # bearer tokens, where they are checked
        exact_integer_bounds(schema)  # 2**63 - 1, not 9.223372036854776e+18
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
