"""Checks the server, worker and token commands make before any start-up work (migrations,
blob clean-up): each failure is one line for the operator, not a traceback from a lifespan."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import TextIO

from spectrawatch_server.config import SettingError

LOCK_FILE = "server.lock"


class StartupError(RuntimeError):
    """The server cannot start (data directory in use, port taken, database unreachable)."""


def lock_data_dir(data_dir: Path) -> TextIO:
    """Take the data directory's exclusive lock for as long as the returned file stays open.

    An embedded server's start-up treats every temp upload and running job in the data
    directory as its own crash's leftovers, so a second server on it must stop before then.
    The lock file holds the owner's PID, for the error message of the next one.
    """
    make_data_dir(data_dir)
    handle = open(data_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held for the process lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise StartupError(
            f"data directory {data_dir} is in use by another spectrawatch server (pid {holder})"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def check_port_free(host: str, port: int) -> None:
    """Bind ``host:port`` once, as uvicorn will (``SO_REUSEADDR``), and let it go."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def make_data_dir(data_dir: Path) -> None:
    """Create the data directory if needed (0700: database, blobs, tokens' hashes); refuse a
    path that is not a usable directory. An existing directory keeps its mode."""
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise SettingError("data_dir", f"{data_dir} exists and is not a directory") from None
    except OSError as exc:
        raise SettingError("data_dir", f"cannot create {data_dir}: {exc.strerror}") from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise SettingError("data_dir", f"{data_dir} is not writable")


POOLER_HINT = (
    " (behind PgBouncer in transaction pooling mode? set SPECTRAWATCH_DB_TRANSACTION_POOLING=true:"
    " docs/deployment.md, PgBouncer)"
)


def check_database(
    url: str,
    *,
    statement_timeout: float = 0.0,
    lock_timeout: float = 0.0,
    transaction_pooling: bool = False,
) -> None:
    """Connect once to ``url`` (creating a SQLite file) as the server will, with its timeouts
    and pooling mode (:func:`~spectrawatch_server.db.session.make_engine`), so an unreachable
    database, or a pooler refusing the timeouts' startup options, is one line; refuse one whose
    schema a newer spectrawatch has migrated (:class:`SchemaTooNew`)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from spectrawatch_server.db.migrate import SchemaTooNew, check_revision
    from spectrawatch_server.db.session import make_engine

    shown = make_url(url).render_as_string(hide_password=True)
    try:
        engine = make_engine(
            url,
            statement_timeout=statement_timeout,
            lock_timeout=lock_timeout,
            transaction_pooling=transaction_pooling,
        )
        try:
            with engine.connect() as connection:
                check_revision(connection, url)
        finally:
            engine.dispose()
    except (SQLAlchemyError, ImportError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        hint = POOLER_HINT if "unsupported startup parameter" in reason else ""
        raise StartupError(f"cannot open the database {shown}: {reason}{hint}") from None
    except SchemaTooNew as exc:
        raise StartupError(f"the database {shown} cannot be used: {exc}") from None


def check_device(device: str) -> None:
    """Refuse ``cuda`` / ``cuda:N`` when that GPU is not there (before torch starts a worker)."""
    if not device.startswith("cuda"):
        return
    import torch

    index = int(device.partition(":")[2] or 0)
    if not torch.cuda.is_available():
        raise SettingError("device", f"{device!r} requested but CUDA is not available")
    if index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise SettingError("device", f"{device!r} requested but only {count} GPU(s) are visible")
