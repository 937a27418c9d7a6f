"""``spectrawatch demo``: the embedded server plus a real grokking run streaming to it.

Starts ``spectrawatch server`` as a subprocess (unless one already answers at the URL), trains
the modular-addition transformer of :mod:`spectrawatch.grokking_demo` with the monitor
attached, waits for the worker to analyse every frame, and prints where to look.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import httpx

_PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal a child gets when its parent dies


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _die_with_parent() -> None:
    """In the server child, before exec (Linux): SIGTERM when the demo process dies, even by
    SIGKILL, so no orphaned server keeps the port and the data directory."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM raises ``SystemExit`` (the default kills the process before any ``finally``
    stops the server it started); the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def start_server(port: int, data_dir: Path, timeout: float = 120.0) -> subprocess.Popen[bytes]:
    """Start ``spectrawatch server`` on ``port`` and wait until it is healthy. On Linux the
    server is SIGTERMed when this process dies."""
    data_dir.mkdir(parents=True, exist_ok=True)
    linux = sys.platform.startswith("linux")
    with open(data_dir / "server.log", "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "spectrawatch",
                "server",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            # no thread runs yet (the monitor starts later), so a pre-exec hook is safe here
            preexec_fn=_die_with_parent if linux else None,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {data_dir / 'server.log'}")
        if _healthy(url):
            return proc
        time.sleep(0.3)
    proc.terminate()
    raise RuntimeError(
        f"server did not start within {timeout:.0f} s; see {data_dir / 'server.log'}"
    )


def wait_for_analysis(url: str, run_id: int, timeout: float) -> dict[str, int]:
    """Poll until no frame of the run is pending; returns frame counts by status."""
    deadline = time.monotonic() + timeout
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        counts = httpx.get(f"{url}/api/v1/runs/{run_id}", timeout=10).json()["frames"]
        if counts and not counts.get("pending") and not counts.get("running"):
            break
        time.sleep(0.5)
    return counts


def run_demo(args: argparse.Namespace) -> int:
    url = f"http://127.0.0.1:{args.port}"
    with _sigterm_exits():
        return _run(args, url)


def _run(args: argparse.Namespace, url: str) -> int:
    """:func:`run_demo`: the server it starts is stopped however the demo ends (an error,
    Ctrl-C, SIGTERM)."""
    from spectrawatch import grokking_demo

    server = None if _healthy(url) else start_server(args.port, Path(args.data_dir))
    try:
        print(f"server: {url}  (API docs {url}/docs)", flush=True)
        train_args = ["--steps", str(args.steps), "--url", url, "--project", args.project]
        if args.run:
            train_args += ["--run", args.run]
        summary = grokking_demo.main(train_args)
        run_id = int(summary["run_id"])
        counts = wait_for_analysis(url, run_id, timeout=600)
        catalog = httpx.get(f"{url}/api/v1/runs/{run_id}/metrics/catalog", timeout=30).json()
        names = sorted({c["name"] for c in catalog})
        shown = ", ".join(names[:12])
        print(f"run {run_id}: frames {counts}; {len(names)} metric kinds: {shown}, ...")
        print(f"final train_acc={summary.get('train_acc')} val_acc={summary.get('val_acc')}")
        print(f"dashboard: {url}/runs/{run_id}")
        print(f"metrics:   {url}/api/v1/runs/{run_id}/metrics/catalog")
        if counts.get("failed"):
            print(f"warning: {counts['failed']} frame(s) failed analysis", file=sys.stderr)
            return 1
        if server is not None and args.keep_serving:
            print("serving; press Ctrl-C to stop", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                server.wait()
        return 0
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            server.wait(30)


def add_demo_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="run the server and a real grokking run streaming to it")
    demo.add_argument("--port", type=int, default=8765, help="the server's port")
    demo.add_argument(
        "--data-dir", default=".spectrawatch/demo", help="the demo server's database and blobs"
    )
    demo.add_argument(
        "--steps", type=int, default=1000, help="training steps (val_acc jumps near step 4,100)"
    )
    demo.add_argument("--project", default="demo", help="project of the demo run")
    demo.add_argument("--run", default=None, help="run name (default: a new generated name)")
    demo.add_argument("--keep-serving", action="store_true", help="keep the server up afterwards")
    demo.set_defaults(func=run_demo)
