"""System metrics (``spectrawatch._system``): readings against /proc, the sampler thread's
lifecycle inside a Monitor, the setting, and the CUDA/NVML branch with stand-ins."""

from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import spectrawatch
from spectrawatch import _system
from spectrawatch._sender import ClientStats, ErrorLog
from spectrawatch.config import ClientSettings, SettingsError
from tests.unit.test_client_monitor import fast
from tests.unit.test_client_sender import FakeServer

needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def _proc_cpu_seconds() -> float:
    """utime + stime of /proc/self/stat (clock ticks), in seconds."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _sampler(rows: list[dict[str, Any]], every_s: float = 60.0, **kw: Any) -> _system.SystemSampler:
    return _system.SystemSampler(every_s, lambda: 7, rows.extend, ErrorLog(ClientStats()), **kw)


def _system_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "spectrawatch-system"]


@needs_proc
def test_readings_agree_with_proc() -> None:
    """CPU % over the interval and RSS, as /proc counts them: busy for ~0.4 s of CPU, then a
    64 MiB tensor touched."""
    sampler = _sampler([])
    sampler.sample()  # the interval starts here
    wall0, cpu0 = time.monotonic(), _proc_cpu_seconds()
    end = time.process_time() + 0.4
    while time.process_time() < end:
        pass
    cpu1, wall1 = _proc_cpu_seconds(), time.monotonic()
    got = sampler.sample()
    expected = 100 * (cpu1 - cpu0) / (wall1 - wall0)
    # /proc counts in 10 ms ticks; the two intervals differ by a few microseconds
    assert got["cpu_percent"] == pytest.approx(expected, abs=100 * 0.03 / (wall1 - wall0))
    assert got["rss_mib"] == pytest.approx(_proc_rss_mib(), abs=2.0)
    before = got["rss_mib"]
    # 64 MiB of fresh pages, each written (a tensor could reuse memory freed by earlier tests)
    with mmap.mmap(-1, 64 << 20) as block:
        for offset in range(0, 64 << 20, mmap.PAGESIZE):
            block[offset] = 1
        grown = sampler.sample()["rss_mib"] - before
    assert 60 <= grown <= 70


def test_sampler_emits_system_scalars_at_the_current_step_and_never_raises() -> None:
    rows: list[dict[str, Any]] = []
    sampler = _sampler(rows)
    sampler.sample_and_emit()
    assert {r["name"] for r in rows} >= {"system/cpu_percent", "system/rss_mib"}
    assert {r["step"] for r in rows} == {7}
    errors = ErrorLog(ClientStats())

    def broken(rows: list[dict[str, Any]]) -> None:
        raise RuntimeError("queue gone")

    failing = _system.SystemSampler(0.01, lambda: 0, broken, errors)
    failing.start()
    time.sleep(0.1)
    assert failing._thread is not None
    assert failing._thread.is_alive()  # errors are counted, the thread goes on
    failing.stop()
    assert not failing._thread.is_alive()
    assert errors.stats.get("errors") >= 2


def test_the_setting_its_variable_and_bad_values() -> None:
    assert ClientSettings().system_every_s == 10.0
    assert ClientSettings.from_env({"SPECTRAWATCH_SYSTEM_EVERY_S": "2.5"}).system_every_s == 2.5
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(SettingsError, match="SPECTRAWATCH_SYSTEM_EVERY_S"):
            ClientSettings.from_env({"SPECTRAWATCH_SYSTEM_EVERY_S": bad})


def _loop(m: spectrawatch.Monitor, steps: int, pause: float) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert m.attach(model, opt) is not None
    for _ in range(steps):
        model(torch.randn(3, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        time.sleep(pause)


def test_a_monitor_samples_on_one_thread_per_run_and_none_after_finish(tmp_path: Path) -> None:
    """Three init/finish cycles: one sampler thread while a run is live, none after; samples
    go at the attached model's latest step (0 before its first), in the run's scalar queue."""
    server = FakeServer()
    m = spectrawatch.Monitor(transport=server.transport())
    for cycle in range(3):
        m.init(project="p", run=f"sys{cycle}", **fast(tmp_path, system_every_s=0.05))
        assert len(_system_threads()) == 1
        time.sleep(0.15)  # before the first step
        _loop(m, 10, pause=0.03)
        assert m.finish()
        assert _system_threads() == []
    steps = sorted({r["step"] for r in server.scalars if r["name"] == "system/rss_mib"})
    assert steps[0] == 0
    assert steps[-1] >= 5
    assert all(0 <= s <= 10 for s in steps)
    assert m.stats.get("errors") == 0


def test_samples_do_not_move_logged_steps_or_the_runs_progress(tmp_path: Path) -> None:
    """Without a model ``log()`` numbers its calls 0, 1, 2...: samples are not calls, and the
    exit hook's progress (a caught ``SystemExit``) counts only the user's."""
    server = FakeServer()
    m = spectrawatch.Monitor(transport=server.transport())
    m.init(project="p", run="steps", **fast(tmp_path, system_every_s=0.02))
    for i in range(3):
        m.log({"loss": 1.0 / (i + 1)})
        time.sleep(0.1)
    assert m._log_calls == 3
    assert m.finish()
    assert [r["step"] for r in server.scalars if r["name"] == "loss"] == [0, 1, 2]
    assert {r["step"] for r in server.scalars if r["name"].startswith("system/")} <= {0, 1, 2}


def test_a_resumed_session_samples_nothing_before_its_first_step(tmp_path: Path) -> None:
    """A resumed session's samples before its first step (loading a checkpoint, then after
    ``attach`` continued the run's steps) are skipped: step 0 and the run's last step hold the
    first session's samples. Before, they went to step 0 until ``attach`` and then to the last
    step (``start_step``), overwriting both. A new run still samples at step 0 before its first."""
    server = FakeServer()
    m = spectrawatch.Monitor(transport=server.transport())
    m.init(project="p", run="resumed", **fast(tmp_path, system_every_s=0.02))
    time.sleep(0.1)  # a new run: its samples before the first step go at 0
    _loop(m, 10, pause=0.03)
    assert m.finish()
    first = [r["step"] for r in server.scalars if r["name"] == "system/rss_mib"]
    assert first[0] == 0
    server.runs["p", "resumed"]["last_step"] = 10  # what the server reports to a join
    seen = len(server.scalars)
    m.init(project="p", run="resumed", **fast(tmp_path, system_every_s=0.02))
    time.sleep(0.1)  # loading a checkpoint: no step yet
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert m.attach(model, opt) is not None  # continues from step 10
    time.sleep(0.1)  # attached, no step yet
    for _ in range(5):
        model(torch.randn(3, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        time.sleep(0.03)
    assert m.finish()
    steps = [r["step"] for r in server.scalars[seen:] if r["name"] == "system/rss_mib"]
    assert steps
    assert min(steps) >= 11
    assert max(steps) <= 15


def test_off_disabled_and_nonzero_ranks_start_no_sampler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = FakeServer()
    for settings in ({"system_every_s": 0}, {"system_every_s": 0.01, "mode": "disabled"}):
        m = spectrawatch.Monitor(transport=server.transport())
        m.init(project="p", run="off", **fast(tmp_path, **settings))
        time.sleep(0.05)
        assert _system_threads() == []
        m.log({"loss": 1.0})
        assert m.finish()
    assert [r["name"] for r in server.scalars] == ["loss"]
    monkeypatch.setenv("RANK", "1")
    m = spectrawatch.Monitor(transport=server.transport())
    m.init(project="p", run="rank1", **fast(tmp_path, system_every_s=0.01))
    assert _system_threads() == []
    assert m.finish()


def test_offline_samples_are_spooled_as_scalars(tmp_path: Path) -> None:
    m = spectrawatch.Monitor()
    m.init(project="p", run="off", mode="offline", **fast(tmp_path, system_every_s=0.02))
    time.sleep(0.15)
    assert m.finish()
    spooled = list((tmp_path / "spool" / "p" / "off").glob("*-sc.sw"))
    names = b"".join(p.read_bytes() for p in spooled)
    assert b"system/rss_mib" in names


class FakeCuda:
    """``torch.cuda`` as the sampler uses it: every attribute but ``is_initialized`` raises
    while CUDA is not initialised (reading one could initialise it)."""

    def __init__(self, initialized: bool, reserved: list[int]) -> None:
        self.initialized = initialized
        self.reserved = reserved

    def is_initialized(self) -> bool:
        return self.initialized

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"torch.cuda.{name} read while CUDA is not initialised")

    def _ready(self) -> None:
        assert self.initialized, "read while CUDA is not initialised"

    def device_count(self) -> int:
        self._ready()
        return len(self.reserved)

    def memory_reserved(self, i: int) -> int:
        self._ready()
        return self.reserved[i]

    def memory_allocated(self, i: int) -> int:
        return self.reserved[i] // 2

    def max_memory_allocated(self, i: int) -> int:
        return self.reserved[i] - (1 << 20)

    def get_device_properties(self, i: int) -> Any:
        return type("Props", (), {"uuid": f"uuid-{i}"})()


class FakeNvml:
    NVML_TEMPERATURE_GPU = 0

    def __init__(self) -> None:
        self.asked: list[str] = []

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        self.asked.append(uuid)
        return uuid

    def nvmlDeviceGetUtilizationRates(self, h: str) -> Any:
        return type("Util", (), {"gpu": 87})()

    def nvmlDeviceGetMemoryInfo(self, h: str) -> Any:
        return type("Mem", (), {"used": 3 << 30})()

    def nvmlDeviceGetTemperature(self, h: str, sensor: int) -> int:
        return 64

    def nvmlDeviceGetPowerUsage(self, h: str) -> int:
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")


def test_cuda_is_read_only_once_initialised_and_only_devices_in_use() -> None:
    rows: list[dict[str, Any]] = []
    idle = FakeCuda(initialized=False, reserved=[])
    got = _sampler(rows, cuda=idle).sample()
    assert not any(k.startswith("cuda") for k in got)
    cuda = FakeCuda(initialized=True, reserved=[0, 512 << 20])  # cuda:0 unused by this process
    nvml = FakeNvml()
    got = _system.cuda_readings(cuda, _system.Nvml(nvml))
    assert got == {
        "cuda1/memory_allocated_mib": 256.0,
        "cuda1/memory_reserved_mib": 512.0,
        "cuda1/max_memory_allocated_mib": 511.0,
        "cuda1/gpu_util_percent": 87.0,
        "cuda1/memory_used_mib": 3072.0,
        "cuda1/temperature_c": 64.0,
    }  # power unsupported on this device: left out
    assert nvml.asked == ["GPU-uuid-1"]
    assert _system.cuda_readings(cuda, None).keys() == {
        "cuda1/memory_allocated_mib",
        "cuda1/memory_reserved_mib",
        "cuda1/max_memory_allocated_mib",
    }


def test_without_pynvml_there_is_no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)  # import fails
    assert _system.Nvml.open() is None
