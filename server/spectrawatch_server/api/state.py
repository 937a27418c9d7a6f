"""What the app holds for its lifetime: settings, database, blob store, queue, worker."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from spectrawatch.wire import FrameLimits
from spectrawatch_server.config import ServerSettings
from spectrawatch_server.queue.base import JobQueue
from spectrawatch_server.storage.blobs import BlobStore
from spectrawatch_server.worker import Worker


@dataclass
class AppState:
    settings: ServerSettings
    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore
    queue: JobQueue
    worker: Worker
    limits: FrameLimits
    # the in-process worker's engine (its own timeouts); None: it uses ``engine``
    worker_engine: Engine | None = None
