"""Forked children in tests: a hang in the child ends the child, never the test run."""

from __future__ import annotations

import os
import signal
import time

import pytest


def arm_child_alarm(seconds: int) -> None:
    """In a forked child: end it after ``seconds`` (SIGALRM at its default action, not the
    handler pytest-timeout may have installed in the parent)."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(seconds)


def child_exit_code(pid: int, seconds: float, hang: str) -> int:
    """The exit code of child ``pid``; after ``seconds`` it is killed and the test fails,
    saying ``hang`` (what the child was stuck in)."""
    deadline = time.monotonic() + seconds
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail(f"the forked child hung in {hang}")
    return os.waitstatus_to_exitcode(done[1])
