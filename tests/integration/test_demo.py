"""``spectrawatch demo``, the README's main job: a real server and a real grokking run streaming
to it, every frame analysed; and the server it starts never outlives it (a SIGTERMed or killed
demo once left its server holding the port and the data directory)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from spectrawatch._demo import _healthy
from tests.servers import embedded_only, free_port, wait_until

pytestmark = [pytest.mark.integration, embedded_only("the demo runs the embedded default")]


class Demo:
    """``spectrawatch demo --keep-serving`` in a subprocess, its output collected line by line."""

    def __init__(self, tmp_path: Path, steps: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPECTRAWATCH_")}
        cmd = [sys.executable, "-m", "spectrawatch", "demo", "--port", str(self.port)]
        cmd += ["--data-dir", str(tmp_path / "demo"), "--steps", str(steps), "--keep-serving"]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float) -> None:
        wait_until(lambda: any(text in line for line in self.lines), timeout=timeout)

    def serving(self) -> bool:
        return _healthy(self.url)  # the demo's own check of its server

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self.reader.join(10)  # EOF once the process is gone
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def demo(tmp_path: Path) -> object:
    created: list[Demo] = []

    def start(steps: int) -> Demo:
        created.append(Demo(tmp_path, steps))
        return created[-1]

    yield start
    for d in created:
        d.stop()


def test_demo_analyses_its_run_and_stops_its_server_on_sigterm(demo: object) -> None:
    d = demo(120)  # type: ignore[operator]  # past the first theta sketch (step 100)
    d.wait_for("serving; press Ctrl-C", timeout=300)
    summary = next(line for line in d.lines if line.startswith("run 1: frames"))
    assert "'done'" in summary
    assert "failed" not in summary
    assert "pending" not in summary
    assert httpx.get(f"{d.url}/runs/1", timeout=30).status_code == 200  # the dashboard
    metrics = httpx.get(f"{d.url}/api/v1/runs/1/metrics/catalog", timeout=30).json()
    names = {m["name"] for m in metrics}
    assert {"htsr.alpha", "htsr.num_traps", "norm.update_ratio", "sed.gap_ratio.w16"} <= names
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(60) == 128 + signal.SIGTERM
    wait_until(lambda: not d.serving(), timeout=30)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_a_killed_demo_takes_its_server_with_it(demo: object) -> None:
    d = demo(100_000)  # type: ignore[operator]
    d.wait_for("server: http://", timeout=120)
    assert d.serving()
    d.proc.kill()  # SIGKILL: no handler runs in the demo process
    d.proc.wait(30)
    wait_until(lambda: not d.serving(), timeout=30)
