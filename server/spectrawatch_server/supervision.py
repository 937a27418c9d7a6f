"""Child processes that stop with their supervisor: ``spectrawatch worker --concurrency N``'s
workers and ``spectrawatch server --workers N``'s uvicorn processes.

A supervisor killed by SIGKILL (the OOM killer, a supervisor signalling only the main PID) runs
no clean-up, and its children, re-parented to PID 1, would go on serving: an old API version
answering on the port that the new one cannot bind, or old workers claiming jobs.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal a child gets when its parent dies


def die_with_parent() -> None:
    """SIGTERM this process when its supervisor dies, even by SIGKILL.

    Two independent mechanisms: the kernel's parent-death signal (Linux ``prctl``), and a
    daemon thread that waits on the supervisor's ``multiprocessing`` sentinel (portable, and
    effective where a sandboxed kernel ignores ``PR_SET_PDEATHSIG``). A no-op in a process that
    ``multiprocessing`` did not start.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):  # pragma: no cover - exotic libc
            log.debug("prctl(PR_SET_PDEATHSIG) unavailable")

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        log.warning("supervisor %s is gone: stopping", parent.pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()
