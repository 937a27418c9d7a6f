"""Checks ``spectrawatch server`` makes before any start-up work (migrations, blob clean-up):
each failure is one line for the operator, not a traceback from inside uvicorn's lifespan."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import TextIO

LOCK_FILE = "server.lock"


class StartupError(RuntimeError):
    """The server cannot start (data directory in use, port taken, database unreachable)."""


def lock_data_dir(data_dir: Path) -> TextIO:
    """Take the data directory's exclusive lock for as long as the returned file stays open.

    An embedded server's start-up treats every temp upload and running job in the data
    directory as its own crash's leftovers, so a second server on it must stop before then.
    The lock file holds the owner's PID, for the error message of the next one.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
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
