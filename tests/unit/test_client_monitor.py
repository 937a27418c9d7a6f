"""The public Monitor end to end against the fake server (mock transport)."""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import spectrawatch
from spectrawatch import _shards, wire
from tests.forks import arm_child_alarm, child_exit_code
from tests.unit.test_client_sender import FakeServer

_monitor_module = importlib.import_module("spectrawatch.monitor")


def fast(tmp_path: Path, **kw: Any) -> dict[str, Any]:
    return {
        "spool_dir": str(tmp_path / "spool"),
        "backoff_s": 0.01,
        "backoff_max_s": 0.05,
        "retries": 0,
        "flush_timeout_s": 10.0,
        **kw,
    }


def loop(m: spectrawatch.Monitor, steps: int, probe: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    handle = m.attach(model, opt, probe=torch.randn(4, 5) if probe else None)
    assert handle is not None
    gen = torch.Generator().manual_seed(1)
    for t in range(steps):
        x = torch.randn(8, 5, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.log({"loss": loss, "lr": 1e-2}, step=t + 1)
    return model


def test_init_attach_log_finish(tmp_path: Path) -> None:
    server = FakeServer()
    m = spectrawatch.Monitor(transport=server.transport())
    m.init(
        project="grok",
        run="p97",
        config={"wd": 1.0},
        tags=["test"],
        **fast(tmp_path, weights_every=10, activations_every=5, theta_every=10),
    )
    loop(m, 20)
    assert m.finish()
    assert m.run_id == 1
    kinds = server.headers_by_kind()
    assert [h.info["steps"][0] for h in kinds["update_sketch"]] == [1, 17]
    assert sum(len(h.info["steps"]) for h in kinds["update_sketch"]) == 20
    assert [h.step for h in kinds["weights"]] == [10, 20]  # the finish snapshot is deduplicated
    assert [h.step for h in kinds["activations"]] == [5, 10, 15, 20]
    assert [h.info["steps"] for h in kinds["param_sketch"]] == [[1], [10], [20]]
    user = [r for r in server.scalars if not r["name"].startswith("probe.")]
    assert len(user) == 40
    assert {r["name"] for r in user} == {"loss", "lr"}
    probe = [(r["step"], r["name"]) for r in server.scalars if r["name"].startswith("probe.")]
    assert sorted(probe) == sorted(  # the probe's predictions: churn from its second activation
        [(n, "probe.prediction_confidence") for n in (5, 10, 15, 20)]
        + [(n, "probe.prediction_churn") for n in (10, 15, 20)]
        + [(n, "probe.prediction_positions") for n in (10, 15, 20)]
        + [(20, "probe.prediction_agreement")]
    )
    assert server.patches[-1]["status"] == "finished"
    assert server.patches[-1]["summary"]["client"]["dropped_frames"] == 0
    assert server.runs[("grok", "p97")]["name"] == "p97"


def test_monitor_takes_the_config_and_tags_init_takes(tmp_path: Path) -> None:
    """``Monitor(config=..., tags=...)`` raised ``SettingsError: unknown setting(s): config`` at
    ``__enter__``; they are the run's, as in ``init``, whose own arguments win."""
    server = FakeServer()
    with spectrawatch.Monitor(
        transport=server.transport(),
        project="p",
        run="cfg",
        config={"lr": 0.1},
        tags=["sweep"],
        **fast(tmp_path),
    ) as m:
        assert m._sender is not None
        assert (m._sender.config, m._sender.tags) == ({"lr": 0.1}, ["sweep"])
    m.init(run="cfg2", config={"lr": 0.2})
    assert m._sender is not None
    assert (m._sender.config, m._sender.tags) == ({"lr": 0.2}, ["sweep"])
    assert m.finish()


def test_context_manager_marks_crash_and_lets_user_errors_through(tmp_path: Path) -> None:
    server = FakeServer()

    def crash() -> None:
        with spectrawatch.Monitor(
            transport=server.transport(), project="p", run="boom", **fast(tmp_path)
        ) as m:
            loop(m, 3)
            _ = 1 / 0

    with pytest.raises(ZeroDivisionError):
        crash()
    assert server.patches[-1]["status"] == "crashed"


def test_two_monitors_in_one_process(tmp_path: Path) -> None:
    server = FakeServer()
    with (
        spectrawatch.Monitor(
            transport=server.transport(), project="p", run="a", **fast(tmp_path)
        ) as a,
        spectrawatch.Monitor(
            transport=server.transport(), project="p", run="b", **fast(tmp_path)
        ) as b,
    ):
        loop(a, 4, probe=False)
        loop(b, 8, probe=False)
    assert set(server.runs) == {("p", "a"), ("p", "b")}
    by_run: dict[str, int] = {}
    for key, (h, _, _) in server.frames.items():
        if h.kind is wire.FrameKind.UPDATE_SKETCH:
            by_run[key.split(":")[0]] = by_run.get(key.split(":")[0], 0) + len(h.info["steps"])
    ids = {name: str(run["id"]) for (_, name), run in server.runs.items()}  # created in any order
    assert by_run == {ids["a"]: 4, ids["b"]: 8}


def test_server_never_started_training_completes(tmp_path: Path) -> None:
    server = FakeServer()
    server.down = True
    m = spectrawatch.Monitor(transport=server.transport())
    m.init(project="p", run="down", **fast(tmp_path, flush_timeout_s=1.0))
    model = loop(m, 12)
    assert isinstance(model, nn.Module)
    m.finish()
    assert m.stats.get("spooled_frames") >= 1
    assert server.frames == {}


def test_disabled_mode_sends_nothing(tmp_path: Path) -> None:
    server = FakeServer()
    m = spectrawatch.Monitor(transport=server.transport(), mode="disabled")
    m.init(project="p", run="off", **fast(tmp_path))
    assert m.attach(nn.Linear(2, 2)) is None
    m.log({"loss": 1.0})
    assert m.finish()
    assert server.runs == {}


def test_log_sends_nan_skips_bad_values_and_defaults_the_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A NaN/Inf value is sent (as JSON's ``NaN``/``Infinity``, which the server stores as
    null): a rule on the scalar sees it. It was skipped, so a loss rule never saw a NaN loss.
    Its first step per name is in the client stats, and it is logged once per name."""
    server = FakeServer()
    m = spectrawatch.Monitor(transport=server.transport())
    m.init(project="p", run="log", **fast(tmp_path))
    loop(m, 3, probe=False)
    m.log({"nan": float("nan"), "text": "abc", "ok": 2})  # step: the latest optimizer step
    for step in range(4, 8):  # diverged: NaN at every step, logged once
        m.log({"nan": float("nan"), "inf": torch.tensor(-math.inf)}, step=step)
    m.finish()
    assert {"step": 3, "name": "ok", "value": 2.0} in server.scalars
    assert not any(r["name"] == "text" for r in server.scalars)
    sent = {(r["step"], r["name"]): r["value"] for r in server.scalars if "n" in r["name"]}
    assert set(sent) == {(s, "inf") for s in range(4, 8)} | {(s, "nan") for s in range(3, 8)}
    assert all(math.isnan(v) for (_, n), v in sent.items() if n == "nan")
    assert all(v == -math.inf for (_, n), v in sent.items() if n == "inf")
    assert m.stats.get("errors") == 1  # the text; a NaN is data, kept in nonfinite_scalars
    assert m.stats.snapshot()["nonfinite_scalars"] == {
        "nan": {"step": 3, "value": "nan"},
        "inf": {"step": 4, "value": "-inf"},
    }
    logged = [r.getMessage() for r in caplog.records if "non" in r.getMessage()]
    assert len([x for x in logged if x.startswith("spectrawatch: nan is nan")]) == 1, logged
    assert len([x for x in logged if x.startswith("spectrawatch: inf is -inf")]) == 1, logged


def test_env_configures_the_default_monitor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = FakeServer()
    monkeypatch.setenv("SPECTRAWATCH_PROJECT", "envproj")
    monkeypatch.setenv("SPECTRAWATCH_RUN", "envrun")
    monkeypatch.setenv("SPECTRAWATCH_SPOOL_DIR", str(tmp_path))
    m = spectrawatch.Monitor(transport=server.transport())
    m.log({"x": 1.0}, step=0)  # implicit init from the environment
    m.finish()
    assert ("envproj", "envrun") in server.runs
    assert server.scalars == [{"step": 0, "name": "x", "value": 1.0}]


def test_bad_cadence_raises_before_training(tmp_path: Path) -> None:
    server = FakeServer()
    m = spectrawatch.Monitor(transport=server.transport())
    m.init(project="p", run="bad", **fast(tmp_path))
    with pytest.raises(spectrawatch.SettingsError, match="weight"):
        m.attach(nn.Linear(2, 2), every={"weight": 10})
    with pytest.raises(spectrawatch.SettingsError, match="weights_every"):
        m.attach(nn.Linear(2, 2), every={"weights": -1})
    # not whole numbers: TypeError ('float' object is not iterable) or ValueError, or silently
    # truncated (1.5 -> 1), before
    for every in (2.5, "5", {"weights": "x"}, {"weights": None}, {"activations": 1.5}):
        with pytest.raises(spectrawatch.SettingsError, match="whole number"):
            m.attach(nn.Linear(2, 2), every=every)
    m.finish()


def test_handle_remove_detaches(tmp_path: Path) -> None:
    server = FakeServer()
    m = spectrawatch.Monitor(transport=server.transport())
    m.init(project="p", run="h", **fast(tmp_path))
    model = nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = m.attach(model, opt)
    assert handle is not None
    for _ in range(2):
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
    handle.remove()
    for _ in range(3):
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
    m.finish()
    (h,) = server.headers_by_kind()["update_sketch"]
    assert h.info["steps"] == [1, 2]


def test_attaching_again_with_a_new_optimizer_continues_the_steps(tmp_path: Path) -> None:
    """``remove()`` then ``attach(model, new_optimizer)`` in the same run numbered its steps
    from 1 again: frames and the final weights carried steps the run already had."""
    server = FakeServer()
    m = spectrawatch.Monitor(transport=server.transport())
    m.init(project="p", run="again", **fast(tmp_path, weights_every=0))
    model = nn.Linear(3, 3)
    for _ in range(2):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        handle = m.attach(model, opt)
        assert handle is not None
        for _ in range(3):
            model(torch.ones(1, 3)).sum().backward()
            opt.step()
            opt.zero_grad()
        handle.remove()
    assert m.finish()
    kinds = server.headers_by_kind()
    assert [s for h in kinds["update_sketch"] for s in h.info["steps"]] == [1, 2, 3, 4, 5, 6]
    assert [h.step for h in kinds["weights"]] == [3, 6]


def test_a_new_optimizer_for_the_attached_model_takes_over_its_steps(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A notebook's optimizer cell run again (``attach(model, new_opt)`` without ``remove()``)
    was refused with advice to use another Monitor; the old capture then stood still, so every
    later ``log()`` without ``step`` landed on one step and overwrote the last."""
    server = FakeServer()
    m = spectrawatch.Monitor(transport=server.transport())
    m.init(project="p", run="cell", **fast(tmp_path, weights_every=0))
    model = nn.Linear(3, 3)
    handles = []
    for lr in (0.1, 0.01):
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        handles.append(m.attach(model, opt))
        for _ in range(3):
            model(torch.ones(1, 3)).sum().backward()
            opt.step()
            opt.zero_grad()
            m.log({"loss": lr})
    first, second = handles
    assert first is not None
    assert second is not None
    assert second.capture is first.capture
    other = nn.Linear(3, 3)
    with caplog.at_level(logging.WARNING, logger="spectrawatch"):
        assert m.attach(other, torch.optim.SGD(other.parameters(), lr=0.1)) is None
    assert "remove()" in caplog.text
    assert m.stats.get("errors") == 1
    assert m.finish()
    steps = [s for h in server.headers_by_kind()["update_sketch"] for s in h.info["steps"]]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [(r["step"], r["value"]) for r in server.scalars] == [(n, 0.1) for n in (1, 2, 3)] + [
        (n, 0.01) for n in (4, 5, 6)
    ]


def test_a_second_optimizer_over_other_parameters_is_refused(tmp_path: Path) -> None:
    """An optimizer over other parameters of the attached model (Muon beside AdamW) does not
    replace the first: refused, the first keeps its hooks."""
    m = spectrawatch.Monitor(transport=FakeServer().transport())
    m.init(project="p", run="two", **fast(tmp_path))
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    handle = m.attach(model, first)
    assert handle is not None
    assert m.attach(model, torch.optim.SGD(model[1].parameters(), lr=0.1)) is None
    assert m.attach(model) is None
    assert handle.capture.optimizer is first
    assert m.finish()


def test_fsdp1_is_refused_with_a_logged_reason(tmp_path: Path) -> None:
    class FullyShardedDataParallel(nn.Module):  # detected by class name, as torch's FSDP1
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

    server = FakeServer()
    m = spectrawatch.Monitor(transport=server.transport())
    m.init(project="p", run="fsdp1", **fast(tmp_path))
    model = FullyShardedDataParallel(nn.Linear(3, 3))
    assert m.attach(model, torch.optim.SGD(model.parameters(), lr=0.1)) is None
    assert m.stats.get("errors") == 1
    assert "FSDP1" in str(m.stats.snapshot().get("last_error"))
    assert m.finish()


def test_log_skips_only_the_values_float_cannot_take(tmp_path: Path) -> None:
    server = FakeServer()
    m = spectrawatch.Monitor(transport=server.transport())
    m.init(project="p", run="log2", **fast(tmp_path))
    m.log({"loss": 0.5, "count": 10**400}, step=1)  # OverflowError
    m.log({"loss": 0.4, "z": torch.tensor(1 + 2j)}, step=2)  # complex: RuntimeError/TypeError
    m.log({"loss": 0.3, "meta": torch.empty(1, device="meta")}, step=3)
    m.finish()
    assert [(r["step"], r["value"]) for r in server.scalars] == [(1, 0.5), (2, 0.4), (3, 0.3)]
    assert m.stats.get("errors") == 3


def test_complex_parameters_are_left_out_of_weight_snapshots(tmp_path: Path) -> None:
    server = FakeServer()
    m = spectrawatch.Monitor(transport=server.transport())
    m.init(project="p", run="cplx", **fast(tmp_path, weights_every=2))
    model = nn.Linear(4, 4)
    model.c = nn.Parameter(torch.randn(3, 3, dtype=torch.cfloat))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    m.attach(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "casting complex values to real" on the way
        for _ in range(2):
            (model(torch.ones(1, 4)).sum() + model.c.abs().sum()).backward()
            opt.step()
    m.finish()
    kinds = server.headers_by_kind()
    assert {name for h in kinds["weights"] for name in h.names} == {"weight"}
    assert {name for h in kinds["update_sketch"] for name in h.names} >= {"weight", "bias"}
    # named as skipped (the layer page says why), not an error of every snapshot
    assert kinds["weights"]
    for h in kinds["weights"]:
        assert h.info["skipped"] == {"c": {"shape": [3, 3], "reason": "complex parameter"}}
    assert m.stats.get("errors") == 1  # the update sketch's, once: "complex ... not sketched"


def test_a_forked_child_steps_without_the_monitor(tmp_path: Path) -> None:
    """In a forked child (a DataLoader worker that trains, say) the hooks do nothing: the
    sketch's CPU kernels can hang there, torch's thread pool does not survive a fork."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the parent's OpenMP pool is what a forked child cannot use
    try:
        _fork_and_step(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _fork_and_step(tmp_path: Path) -> None:
    server = FakeServer()
    m = spectrawatch.Monitor(transport=server.transport())
    m.init(project="p", run="fork", **fast(tmp_path))
    loop(m, 3, probe=False)
    model = nn.Linear(5, 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    m.attach(model, opt)
    model(torch.ones(1, 5)).sum().backward()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            arm_child_alarm(30)  # a hang in C code ends the child, not the test run
            for _ in range(3):
                model(torch.ones(1, 5)).sum().backward()
                opt.step()
            code = 0
        finally:
            os._exit(code)
    assert child_exit_code(pid, 60, "opt.step()") == 0
    assert m.finish()


def test_an_unfinished_monitor_of_a_returned_function_is_flushed_at_exit(tmp_path: Path) -> None:
    script = f"""
import torch
from torch import nn
import spectrawatch

def main():
    m = spectrawatch.Monitor()
    m.init(url="http://127.0.0.1:9", project="p", run="exit", spool_dir={str(tmp_path)!r},
           flush_timeout_s=5, backoff_s=0.01)
    model = nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    m.attach(model, opt)
    for t in range(5):
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        m.log({{"loss": float(t)}}, step=t + 1)

main()  # returns without finish(): nothing holds the Monitor but the module
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, env=env)
    spooled = [json.loads(p.read_bytes().split(b"\n", 1)[0]) for p in tmp_path.rglob("*.sw")]
    kinds = {e.get("kind") for e in spooled if e.get("type") == "frame"}
    assert "weights" in kinds  # the final snapshot finish() takes
    assert any(e.get("type") == "scalars" for e in spooled)


@pytest.mark.parametrize(
    ("ending", "code", "status"),
    [
        ("raise RuntimeError('diverged')", 1, "crashed"),
        ("pass", 0, "finished"),
        ("sys.exit(3)", 3, "crashed"),
        ("sys.exit('diverged')", 1, "crashed"),
        ("sys.exit(0)", 0, "finished"),
        ("sys.exit()", 0, "finished"),
        ("threading.Thread(target=sys.exit, args=(2,)).start()", 0, "finished"),
        # argparse's exit caught, then training goes on: the script did not end there
        (
            "try:\n    sys.exit(2)\nexcept SystemExit:\n    pass\nmonitor.log({'loss': 0.5})",
            0,
            "finished",
        ),
    ],
)
def test_a_script_dying_of_an_exception_closes_its_run_as_crashed(
    tmp_path: Path, ending: str, code: int, status: str
) -> None:
    """The module-level monitor, no ``finish()``: a script ended by an uncaught exception or a
    failing ``sys.exit`` was closed as ``finished`` (as ``with Monitor(...)`` does, it is
    ``crashed``); one that ends normally, or a thread's ``sys.exit``, stays ``finished``."""
    script = f"""
import sys
import threading
import torch
from torch import nn
from spectrawatch import monitor

seen = []
sys.excepthook = lambda *exc: seen.append(exc[0])  # the user's hook still runs
monitor.init(url="http://127.0.0.1:9", project="p", run="dies", spool_dir={str(tmp_path)!r},
             flush_timeout_s=2, backoff_s=0.01)
model = nn.Linear(3, 3)
monitor.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
monitor.log({{"loss": 1.0}}, step=1)
{ending}
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], timeout=120, env=env, check=False)
    assert done.returncode == code
    (meta,) = [json.loads(p.read_text()) for p in tmp_path.rglob("run.json")]
    assert meta["status"] == status


_FRAMEWORK_OVER_OURS = """
previous = signal.getsignal(signal.SIGTERM)
def framework(signum, frame):  # as Lightning's: installed later, calls the handler it found
    print("framework saw SIGTERM", flush=True)
    previous(signum, frame)
signal.signal(signal.SIGTERM, framework)
"""


@pytest.mark.parametrize(
    ("before", "settings", "after", "code", "status", "final_snapshot"),
    [
        ("", "", "", -signal.SIGTERM, "crashed", True),
        ("", "handle_sigterm=False,", "", -signal.SIGTERM, None, False),
        ("signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))", "", "", 7, "crashed", True),
        ("", "", _FRAMEWORK_OVER_OURS, 0, "finished", True),
        ("", "", "monitor.finish(); assert signal.getsignal(15) is signal.SIG_DFL", -15,
         "finished", True),
    ],
    ids=["default", "opted-out", "user-handler", "framework-over-ours", "after-finish"],
)  # fmt: skip
def test_a_sigterm_closes_the_live_runs_as_crashed_and_still_kills(
    tmp_path: Path,
    before: str,
    settings: str,
    after: str,
    code: int,
    status: str | None,
    final_snapshot: bool,
) -> None:
    """SIGTERM (a SLURM time limit, an eviction, ``timeout``) ended the process by its default
    action, which skips the exit hook: the run stayed ``running`` forever and what the client
    held (the final snapshot, queued rows) was lost. With SIGTERM at its default the monitor now
    closes the run ``crashed`` (spooling what the server does not take) and the process still
    dies of the signal; a handler of the user's or a framework's is left to decide."""
    script = f"""
import os
import signal
import sys
import time
import torch
from torch import nn
from spectrawatch import monitor

{before}
monitor.init(url="http://127.0.0.1:9", project="p", run="term", spool_dir={str(tmp_path)!r},
             flush_timeout_s=30, backoff_s=0.01, weights_every=0, {settings})
model = nn.Linear(3, 3)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
monitor.attach(model, opt)
for t in range(5):
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    monitor.log({{"loss": float(t)}})
{after}
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.5)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], timeout=120, env=env, check=False, capture_output=True
    )
    assert done.returncode == code, done.stderr.decode()[-2000:]
    assert time.monotonic() - started < 60
    metas = [json.loads(p.read_text()) for p in tmp_path.rglob("run.json")]
    assert [m.get("status") for m in metas] in ([status], [] if status is None else [status])
    spooled = [json.loads(p.read_bytes().split(b"\n", 1)[0]) for p in tmp_path.rglob("*.sw")]
    weights = [e for e in spooled if e.get("type") == "frame" and e.get("kind") == "weights"]
    assert bool(weights) is final_snapshot
    if final_snapshot:
        assert any(e.get("type") == "scalars" for e in spooled)
    assert (b"framework saw SIGTERM" in done.stdout) is (after == _FRAMEWORK_OVER_OURS)


_SECOND_SIGTERM = """
closer = threading.Thread(target=lambda: (time.sleep(0.3), os.kill(os.getpid(), signal.SIGTERM)))
closer.start()  # while the first SIGTERM's close waits for the silent server
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(30)
"""
_SIGTERM_IN_EXIT_HOOK = """
def kill() -> None:
    time.sleep(1.0)  # the script has ended: the exit hook is flushing to the silent server
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=kill, daemon=True).start()
"""


@pytest.mark.parametrize(
    ("ending", "status"),
    [(_SECOND_SIGTERM, "crashed"), (_SIGTERM_IN_EXIT_HOOK, "finished")],
    ids=["second-sigterm", "sigterm-in-exit-hook"],
)
def test_a_sigterm_during_a_close_waits_for_it(tmp_path: Path, ending: str, status: str) -> None:
    """A SIGTERM arriving while a run is being closed (a second one, as torchrun's agent and
    schedulers send; or one during the exit hook's flush) killed the process at once: the
    nested handler found no live run, and ``finish`` had given SIGTERM back its default action
    before flushing. Nothing was spooled and the run stayed ``running``. It now waits for the
    close under way (the SIGTERM's own deadline), then dies of the signal; the close keeps its
    status and what the server did not take is spooled."""
    silent = socket.create_server(("127.0.0.1", 0))  # connects, never answers
    port = silent.getsockname()[1]
    script = f"""
import os
import signal
import threading
import time
import torch
from torch import nn
from spectrawatch import monitor

monitor.init(url="http://127.0.0.1:{port}", project="p", run="term2", spool_dir={str(tmp_path)!r},
             flush_timeout_s=30, timeout_s=30, backoff_s=0.01)
model = nn.Linear(3, 3)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
monitor.attach(model, opt)
for t in range(5):
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    monitor.log({{"loss": float(t)}})
{ending}
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with silent:
        done = subprocess.run(
            [sys.executable, "-c", script], timeout=120, env=env, check=False, capture_output=True
        )
    assert done.returncode == -signal.SIGTERM, done.stderr.decode()[-2000:]
    metas = [json.loads(p.read_text()) for p in tmp_path.rglob("run.json")]
    assert [m.get("status") for m in metas] == [status]
    spooled = [json.loads(p.read_bytes().split(b"\n", 1)[0]) for p in tmp_path.rglob("*.sw")]
    assert any(e.get("type") == "frame" and e.get("kind") == "weights" for e in spooled)
    assert any(e.get("type") == "scalars" for e in spooled)


def _close_on_a_thread(close: Callable[[], object], name: str) -> None:
    thread = threading.Thread(target=close, name=name)
    thread.start()
    thread.join(60)


_ENDS: dict[str, Callable[[spectrawatch.Monitor], object]] = {
    "finish": lambda m: m.finish(),
    "finish-elsewhere": lambda m: _close_on_a_thread(m.finish, "elsewhere"),
    "exit-hook": lambda m: _monitor_module._finish_at_exit(),
    "sigterm": lambda m: _close_on_a_thread(_monitor_module._finish_on_sigterm, "sigterm"),
}


@pytest.mark.parametrize("end", list(_ENDS))
def test_a_sharded_models_final_captures_run_only_in_finish_on_the_training_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, end: str
) -> None:
    """A sharded (FSDP2) model's final weight snapshot and probe forward are collectives every
    rank joins from its training thread. The SIGTERM handler ran them on its own thread, beside
    the training thread's FSDP collectives (gloo: SIGABRT, "collective mismatch"), and the exit
    hook ran them on rank 0 alone (the other ranks keep no exit hook: "Connection closed by
    peer"). Only ``finish()`` on the training thread takes them now; the other ends flush what
    is buffered."""
    gathers: list[str] = []
    full_tensor = _shards.full_tensor

    def gather(p: torch.Tensor) -> torch.Tensor:
        gathers.append(threading.current_thread().name)
        return full_tensor(p)

    # a one-rank stand-in for a sharded model: its collectives are identities here
    monkeypatch.setattr(_shards, "has_sharded_params", lambda model: True)
    monkeypatch.setattr(_shards, "all_reduce_sum", lambda x: x)
    monkeypatch.setattr(_shards, "full_tensor", gather)
    monkeypatch.setattr(_monitor_module, "_LIVE", set())  # the exit hook closes this run only
    server = FakeServer()
    m = spectrawatch.Monitor(transport=server.transport())
    m.init(project="p", run="sharded", **fast(tmp_path, weights_every=0, activations_every=100))
    model = loop(m, 3)
    probed: list[str] = []
    model.register_forward_hook(lambda *a: probed.append(threading.current_thread().name))
    _ENDS[end](m)
    assert not m._active
    taken = end == "finish"
    assert bool(gathers) is taken, gathers
    assert bool(probed) is taken, probed
    assert set(gathers) <= {threading.current_thread().name}
    steps = [s for h in server.headers_by_kind()["update_sketch"] for s in h.info["steps"]]
    assert steps == [1, 2, 3]  # the buffered rows are flushed by every end


@pytest.mark.parametrize(("rank", "sends"), [("1", False), ("0", True), ("", True)])
def test_init_before_the_process_group_takes_the_rank_from_RANK(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rank: str, sends: bool
) -> None:
    """``init()`` at the top of a torchrun script, before ``init_process_group``: only an
    initialised group was asked for the rank, so every rank sent (duplicate frames, two
    senders' sequence numbers, each rank's scalars in one run). torchrun's ``RANK`` now
    decides until the group exists."""
    monkeypatch.setenv("RANK", rank)
    server = FakeServer()
    m = spectrawatch.Monitor(transport=server.transport())
    m.init(project="p", run="ranked", **fast(tmp_path))
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert (m.attach(model, opt) is not None) is sends
    for t in range(3):
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        m.log({"loss": float(t)})
    assert m.finish()
    assert bool(server.runs) is sends
    assert bool(server.frames) is sends
    assert bool(server.scalars) is sends


@pytest.mark.parametrize(
    ("run", "resume", "status"),
    [("shared", "allow", "running"), (None, "allow", "finished"), ("shared", "never", "finished")],
)
def test_a_rank_known_only_at_attach_stops_sending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: str | None, resume: str, status: str
) -> None:
    """No ``RANK`` at ``init`` (``mp.spawn``), the process group started before ``attach``:
    ``attach`` asks again, and a non-zero rank stops sending there. The run its sender already
    started is left ``running`` when every rank names it (rank 0's), closed when it is this
    rank's own (a generated name, or under ``resume="never"`` a new run of its own: it stayed
    ``running`` for good)."""
    monkeypatch.delenv("RANK", raising=False)
    server = FakeServer()
    m = spectrawatch.Monitor(transport=server.transport())
    m.init(project="p", run=run, resume=resume, **fast(tmp_path))
    monkeypatch.setenv("RANK", "1")  # stands for the process group initialised since
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert m.attach(model, opt) is None
    for t in range(3):
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        m.log({"loss": float(t)})
    assert m.finish()
    assert m.run_name is None
    assert not server.frames
    assert not server.scalars
    assert [p.get("status") for p in server.patches] == [status]


def test_api_use_from_the_session_6_audit(tmp_path: Path) -> None:
    """One model per monitor (re-attach: the same handle), bad scalar keys dropped alone, one
    step per log() call without a model, log() after finish() ignored, modules= checked."""
    server = FakeServer()
    m = spectrawatch.Monitor(transport=server.transport())
    m.init(project="p", run="use", **fast(tmp_path))
    m.log({"train/loss": 1.0, "": 2.0, "x" * 201: 3.0, "ok": 4.0})  # no step, no model: 0
    m.log({"train/loss": 0.5})  # the next call: step 1
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(spectrawatch.SettingsError, match="no module named"):
        m.attach(model, opt, modules=["nope"])
    with pytest.raises(spectrawatch.SettingsError, match="not in the model"):
        m.attach(model, opt, modules=[model[0], nn.Linear(4, 4)])  # failed at every probe before
    one = m.attach(model, opt, modules="0")  # one name, not the characters of a name
    assert one is not None
    assert one.capture._probe_modules() == [("0", model[0])]
    one.remove()
    first = m.attach(model, opt)
    assert first is not None
    again = m.attach(model, opt)
    assert again is not None
    assert again.capture is first.capture  # not a second set of hooks
    other = nn.Linear(3, 3)
    assert m.attach(other, torch.optim.SGD(other.parameters(), lr=0.1)) is None
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert m.finish()
    m.log({"late": 1.0})  # after finish: ignored, no new run
    m.finish()
    assert set(server.runs) == {("p", "use")}
    rows = {(r["name"], r["step"]): r["value"] for r in server.scalars}
    assert rows == {("train/loss", 0): 1.0, ("ok", 0): 4.0, ("train/loss", 1): 0.5}
    steps = [s for h, _, _ in server.frames.values() if h.kind is wire.FrameKind.UPDATE_SKETCH
             for s in h.info["steps"]]  # fmt: skip
    assert steps == [1, 2, 3]  # each step once


def test_hugging_face_conv1d_layers_are_probed() -> None:
    transformers = pytest.importorskip("transformers")
    from spectrawatch._capture import Capture
    from spectrawatch._sender import ClientStats, ErrorLog
    from spectrawatch.config import ClientSettings
    from tests.training import tiny_gpt2

    model = tiny_gpt2(transformers)
    stats = ClientStats()
    capture = Capture(
        model, None, ClientSettings.from_env({}), lambda _: None, lambda _: None,
        ErrorLog(stats), stats,
    )  # fmt: skip
    names = [name for name, _ in capture._probe_modules()]
    assert "transformer.h.0.mlp.c_fc" in names
    assert "transformer.h.0.attn.c_attn" in names
    capture.remove()


def test_a_pickled_monitor_is_a_fresh_one_with_the_same_settings(tmp_path: Path) -> None:
    """Lightning's ``ddp_spawn`` pickles the Trainer and its callbacks into each process it
    starts (from an audit of session 22: "cannot pickle '_thread.lock' object" ended fit()).
    The copy keeps the constructor's settings and starts unstarted, live or not."""
    import pickle

    settings = {"project": "p", "run": "pickled", "mode": "offline", **fast(tmp_path)}
    fresh = pickle.loads(pickle.dumps(spectrawatch.Monitor(**settings)))
    live = spectrawatch.Monitor(**settings)
    loop(live, 3, probe=False)
    copy = pickle.loads(pickle.dumps(live))
    assert live.finish()
    for m in (fresh, copy):
        assert m.settings is None
        assert m.stats.get("captures") == 0
        loop(m, 2, probe=False)
        assert m.settings is not None
        assert m.settings.run == "pickled"
        assert m.settings.mode == "offline"
        assert m.finish()


class LoggingDataset(torch.utils.data.Dataset[Any]):
    """A dataset that logs from its worker through the default monitor and reports which
    ``spectrawatch`` threads that worker then runs."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> list[str]:
        import threading

        spectrawatch.monitor.log({"from_worker": 1.0})
        return [t.name for t in threading.enumerate() if t.name.startswith("spectrawatch")]


def test_a_spawned_dataloader_worker_starts_no_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``spawn`` DataLoader worker is a fresh interpreter: its default monitor is not the
    parent's, and ``log()`` there started a sender and an auto-named run of the worker's own
    (a spool directory per worker; with ``SPECTRAWATCH_URL`` set, a run per worker on the
    server). From an audit of session 22."""
    monkeypatch.setenv("SPECTRAWATCH_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setenv("SPECTRAWATCH_URL", "http://127.0.0.1:9")  # nothing listens
    loader = torch.utils.data.DataLoader(
        LoggingDataset(),
        batch_size=None,
        num_workers=1,
        multiprocessing_context="spawn",
        timeout=120,
    )
    threads = list(loader)
    assert threads == [[], []]
    assert not (tmp_path / "spool").exists()
