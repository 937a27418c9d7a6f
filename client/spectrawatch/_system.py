"""System metrics, as W&B records them: the process's CPU and memory, and per CUDA device the
process uses, torch's allocator memory and (with ``pynvml``, i.e. nvidia-ml-py, installed) the
device's utilisation, memory in use, temperature and power.

A daemon thread (``spectrawatch-system``) takes a sample every ``system_every_s`` seconds and
hands it, as ``system/...`` scalars at the run's current step, to the sender's scalar queue
(the queue ``monitor.log`` feeds: they spool and replay like any scalar). The training thread
does nothing for it. It never initialises CUDA (devices are read once torch has), never
raises (errors are counted), and stops with :meth:`SystemSampler.stop`.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from spectrawatch import wire
from spectrawatch._sender import ErrorLog

PREFIX = wire.SYSTEM_SCALAR_PREFIX
_MIB = float(1 << 20)


def process_cpu_seconds() -> float:
    """CPU time of this process so far, user + system, all threads (s)."""
    return time.process_time()


def process_rss_bytes() -> int | None:
    """Resident set size of this process now (bytes): ``/proc/self/statm`` on Linux, psutil
    elsewhere when it is installed, else None (``resource`` has only the peak)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(importlib.import_module("psutil").Process().memory_info().rss)
    except Exception:
        return None


class Nvml:
    """NVML through ``pynvml``: per device, utilisation (%), memory in use by every process
    (MiB), temperature (°C) and power (W); a reading the device lacks is left out."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self._handles: dict[int, Any] = {}

    @classmethod
    def open(cls) -> Nvml | None:
        """NVML initialised, or None (``pynvml`` not installed, no driver)."""
        try:
            lib = importlib.import_module("pynvml")
            lib.nvmlInit()
        except Exception:
            return None
        return cls(lib)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._lib.nvmlShutdown()

    def readings(self, cuda: Any, index: int) -> dict[str, float]:
        """Torch device ``index``'s readings, found by its UUID (NVML numbers every device of
        the machine, torch only the visible ones)."""
        lib, handle = self._lib, self._handle(cuda, index)
        if handle is None:
            return {}
        reads: dict[str, Callable[[], float]] = {
            "gpu_util_percent": lambda: lib.nvmlDeviceGetUtilizationRates(handle).gpu,
            "memory_used_mib": lambda: lib.nvmlDeviceGetMemoryInfo(handle).used / _MIB,
            "temperature_c": lambda: lib.nvmlDeviceGetTemperature(handle, lib.NVML_TEMPERATURE_GPU),
            "power_w": lambda: lib.nvmlDeviceGetPowerUsage(handle) / 1000.0,  # mW
        }
        out: dict[str, float] = {}
        for name, read in reads.items():
            with contextlib.suppress(Exception):
                out[name] = float(read())
        return out

    def _handle(self, cuda: Any, index: int) -> Any:
        if index not in self._handles:
            self._handles[index] = None  # not looked up again after a failure
            with contextlib.suppress(Exception):
                uuid = str(cuda.get_device_properties(index).uuid)
                if not uuid.startswith(("GPU-", "MIG-")):
                    uuid = "GPU-" + uuid
                self._handles[index] = self._lib.nvmlDeviceGetHandleByUUID(uuid)
        return self._handles[index]


def cuda_readings(cuda: Any, nvml: Nvml | None) -> dict[str, float]:
    """``cuda{i}/...`` readings (MiB; NVML's units) of each device this process holds memory
    on; nothing before torch has initialised CUDA, which reading them never does."""
    if not cuda.is_initialized():
        return {}
    out: dict[str, float] = {}
    for i in range(cuda.device_count()):
        reserved = cuda.memory_reserved(i)
        if not reserved:  # a device this process does not use
            continue
        values = {
            "memory_allocated_mib": cuda.memory_allocated(i) / _MIB,
            "memory_reserved_mib": reserved / _MIB,
            "max_memory_allocated_mib": cuda.max_memory_allocated(i) / _MIB,
            **(nvml.readings(cuda, i) if nvml is not None else {}),
        }
        out.update({f"cuda{i}/{k}": v for k, v in values.items()})
    return out


class SystemSampler:
    """Samples every ``every_s`` seconds on its own daemon thread and emits the readings as
    scalar rows ``{step, name: "system/...", value}`` at ``step()`` (the run's current step;
    ``None``: none to put it at, the sample is dropped). The first sample comes ``every_s``
    after :meth:`start` (CPU % is over the interval)."""

    def __init__(
        self,
        every_s: float,
        step: Callable[[], int | None],
        emit: Callable[[list[dict[str, Any]]], None],
        errors: ErrorLog,
        cuda: Any = None,
    ) -> None:
        self.every_s = every_s
        self._step = step
        self._emit = emit
        self._errors = errors
        self._cuda = torch.cuda if cuda is None else cuda  # a stand-in in tests
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Nvml | None = None
        self._nvml_tried = False
        self._last = (time.monotonic(), process_cpu_seconds())  # (wall, CPU) of the last sample

    def start(self) -> None:
        self._last = (time.monotonic(), process_cpu_seconds())
        self._thread = threading.Thread(target=self._run, name="spectrawatch-system", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """End the thread (waiting up to ``timeout`` for a sample under way)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def sample(self) -> dict[str, float]:
        """One reading ``{name: value}`` (names without :data:`PREFIX`): ``cpu_percent``
        since the last sample (100 = one core busy), ``rss_mib``, and ``cuda{i}/...``."""
        now, cpu = time.monotonic(), process_cpu_seconds()
        wall = now - self._last[0]
        out: dict[str, float] = {}
        if wall > 0:
            out["cpu_percent"] = 100.0 * (cpu - self._last[1]) / wall
        self._last = (now, cpu)
        rss = process_rss_bytes()
        if rss is not None:
            out["rss_mib"] = rss / _MIB
        out.update(self._cuda_readings())
        return out

    def sample_and_emit(self) -> None:
        """Take a sample and emit it; never raises (errors are counted)."""
        try:
            values = self.sample()  # also before a skipped one: CPU % is over its interval
            step = self._step()
            if step is None:
                return
            rows = [
                {"step": step, "name": PREFIX + k, "value": v}
                for k, v in values.items()
                if math.isfinite(v)
            ]
            self._emit(rows)
        except Exception as exc:
            self._errors.record("system metrics", exc)

    def _cuda_readings(self) -> dict[str, float]:
        if not self._cuda.is_initialized():
            return {}
        if not self._nvml_tried:  # NVML only once CUDA is in use: no cost on CPU-only runs
            self._nvml_tried = True
            self._nvml = Nvml.open()
        return cuda_readings(self._cuda, self._nvml)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.every_s):
                self.sample_and_emit()
        except BaseException as exc:  # the thread must never die noisily
            self._errors.record("system metrics thread", exc)
        finally:
            if self._nvml is not None:
                self._nvml.close()
