"""``spectrawatch doctor``: is this machine ready to stream runs to the server?

Checks, in order: the local install (spectrawatch, Python, torch, local CUDA and, with CUDA,
whether update sketches use the Triton kernel), connectivity to
``/api/v1/health`` (latency, server version against the client's, database, queue), auth (the
token is accepted, its role and project, a warning when its role cannot stream a run; the
server requires one or not), the worker (running, its device: GPU or
CPU), and the local spool (runs with frames still waiting to be replayed, size against the cap).
Prints one line per check; exits 1 when a check fails, 0 otherwise (warnings included).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import httpx

from spectrawatch._reply import ACCEPT_ENCODING, REPLY_MAX, read_reply
from spectrawatch._spool import spooled_run_dirs
from spectrawatch._version import __version__
from spectrawatch.config import API_PATH, ClientSettings, SettingsError

Status = Literal["ok", "warn", "fail", "info"]


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: Status
    detail: str


def _sketch_backend(device: Any) -> Check:
    """Which kernel sketches a model's updates on ``device`` (a CUDA device)."""
    from spectrawatch import _sketch_triton

    if _sketch_triton.available(device):
        try:
            graph = ClientSettings.from_env().sketch_graph
        except Exception:  # an unreadable setting is reported by the settings check
            graph = True
        how = "replayed from a CUDA graph" if graph else "launched each step (sketch_graph off)"
        return Check("sketch", "ok", f"update sketches on CUDA use the Triton kernel, {how}")
    reason = (
        "SPECTRAWATCH_TRITON=0"
        if not _sketch_triton.enabled()
        else "triton does not import (`pip install triton`)"
    )
    return Check(
        "sketch",
        "warn",
        "update sketches on CUDA use torch ops: ~24x slower than the Triton kernel (H200) and"
        f" an index of 2 bytes per parameter in GPU memory ({reason})",
    )


def _local() -> list[Check]:
    checks = [
        Check(
            "client",
            "info",
            f"spectrawatch {__version__}, Python "
            f"{platform.python_version()} on {platform.system()}",
        )
    ]
    try:
        import torch
    except ImportError:
        checks.append(Check("torch", "warn", "torch is not installed (needed to attach a model)"))
        return checks
    cuda = (
        f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): "
        f"{torch.cuda.get_device_name(0)}"
        if torch.cuda.is_available()
        else "no CUDA device"
    )
    checks.append(Check("torch", "info", f"torch {torch.__version__}; {cuda}"))
    if torch.cuda.is_available():
        checks.append(_sketch_backend(torch.device("cuda")))
    return checks


def spool_state(settings: ClientSettings) -> tuple[int, int, list[str]]:
    """Spooled entries, their bytes, and the ``project/run`` directories that hold them."""
    count, size, runs = 0, 0, []
    for run_dir, entries in spooled_run_dirs(settings.spool_dir):
        count += len(entries)
        size += sum(p.stat().st_size for p in entries)
        runs.append(f"{run_dir.parent.name}/{run_dir.name}")
    return count, size, runs


def _spool(settings: ClientSettings) -> Check:
    count, size, runs = spool_state(settings)
    shown = ", ".join(runs[:5]) + (f" and {len(runs) - 5} more" if len(runs) > 5 else "")
    if count == 0 and runs:  # run.json alone: a final status the server did not get
        return Check(
            "spool",
            "info",
            f"no entries; the final status of {shown} waits in {settings.spool_dir} "
            "(`spectrawatch sync` sets it)",
        )
    if count == 0:
        return Check("spool", "ok", f"empty ({settings.spool_dir})")
    share = size / settings.spool_max_bytes if settings.spool_max_bytes else 1.0
    status: Status = "warn" if share > 0.8 else "info"
    return Check(
        "spool",
        status,
        f"{count} entries, {size / 2**20:.1f} MiB ({share:.0%} of the cap) waiting to be replayed "
        f"in {settings.spool_dir}: {shown} (`spectrawatch sync` delivers them)",
    )


def _remote(settings: ClientSettings, get: Callable[..., httpx.Response]) -> list[Check]:
    base = settings.url.rstrip("/") + API_PATH
    # the token, if any: a server that requires auth shows its queue and workers to one only
    headers = {"authorization": f"Bearer {settings.token}"} if settings.token else {}
    t0 = time.perf_counter()
    try:
        r = get(f"{base}/health", headers=headers)
    except httpx.HTTPError as exc:
        return [Check("connectivity", "fail", f"cannot reach {settings.url}: {exc}")]
    ms = (time.perf_counter() - t0) * 1000
    if r.status_code != 200:
        return [
            Check(
                "connectivity",
                "fail",
                f"{settings.url}/api/v1/health answered HTTP {r.status_code}",
            )
        ]
    try:
        health: dict[str, Any] = r.json()
    except ValueError:
        return [Check("connectivity", "fail", f"{settings.url} is not a spectrawatch server")]
    checks = [Check("connectivity", "ok", f"{settings.url} answered in {ms:.0f} ms")]
    version = str(health.get("version", "?"))
    checks.append(
        Check(
            "versions",
            "ok" if version == __version__ else "warn",
            f"server {version}, client {__version__}"
            + ("" if version == __version__ else " (mismatch: upgrade the older side)"),
        )
    )
    queue = health.get("queue")
    shown = "queue and workers shown to a valid token only"
    if isinstance(queue, dict):
        jobs = json.dumps(queue.get("jobs") or {}, sort_keys=True)
        shown = f"queue {queue.get('engine', '?')}, jobs {jobs}"
    checks.append(Check("database", "info", f"{health.get('database', '?')}; {shown}"))
    checks.append(_auth(settings, base, bool(health.get("auth_required")), get))
    if "worker" not in health:  # a server requiring auth, and no valid token
        checks.append(Check("worker", "info", "not shown without a valid token (--token)"))
        return checks
    worker = health.get("worker") or {}
    device = str(worker.get("device", "?"))
    if not worker.get("running"):
        checks.append(
            Check(
                "worker",
                "warn",
                f"no worker running in the API process (device "
                f"{device}); in scale-out mode run `spectrawatch worker`",
            )
        )
    elif device.startswith("cuda"):
        checks.append(Check("worker", "ok", f"running on GPU ({device})"))
    else:
        checks.append(
            Check(
                "worker",
                "warn",
                f"running on {device}: analyses of large models will be slow; "
                + (
                    "run `spectrawatch worker --device cuda:N` on GPU hosts"
                    if worker.get("external")
                    else "start the server with --device cuda on a GPU host"
                ),
            )
        )
    return checks


def _auth(
    settings: ClientSettings, base: str, required: bool, get: Callable[..., httpx.Response]
) -> Check:
    headers = {"authorization": f"Bearer {settings.token}"} if settings.token else {}
    path = "/token"
    try:
        r = get(f"{base}{path}", headers=headers)
        if r.status_code == 404:  # a server older than GET /token: is the token accepted?
            path = "/runs"
            r = get(f"{base}{path}", params={"limit": 1}, headers=headers)
        whoami = r.json() if r.status_code == 200 and path == "/token" else None
    except (httpx.HTTPError, ValueError) as exc:
        return Check("auth", "fail", f"request failed: {exc}")
    if r.status_code == 200:
        if not settings.token:
            return Check(
                "auth",
                "ok" if not required else "fail",
                "anonymous access allowed (no token configured)",
            )
        if not isinstance(whoami, dict):
            return Check("auth", "ok", "token accepted")
        return _role_check(whoami)
    if r.status_code in (401, 403):
        what = "token rejected" if settings.token else "the server requires a token"
        return Check(
            "auth",
            "fail",
            f"{what} (HTTP {r.status_code}): set SPECTRAWATCH_TOKEN or "
            "--token (create one with `spectrawatch token create --project NAME`)",
        )
    return Check("auth", "fail", f"{path} answered HTTP {r.status_code}")


def _role_check(whoami: dict[str, Any]) -> Check:
    """The token's role and scope from ``GET /token``; a warning when it cannot stream a run."""
    role, project = str(whoami.get("role")), whoami.get("project")
    token = whoami.get("token") or {}
    scope = f"project {project!r}" if project else "every project (server-wide)"
    name = f" {token['name']!r}" if token.get("name") else ""
    detail = f"token{name} ({token.get('prefix', '?')}...) accepted: role {role}, {scope}"
    if role in ("write", "admin"):
        return Check("auth", "ok", detail)
    target = project if project else "P"
    return Check(
        "auth",
        "warn",
        f"{detail}; a {role} token cannot stream a run: create one with "
        f"`spectrawatch token create --project {target} --role write`",
    )


def run_checks(
    settings: ClientSettings, get: Callable[..., httpx.Response] | None = None
) -> list[Check]:
    """All checks against ``settings`` (``get``: an httpx-like GET, swappable in tests)."""
    if get is None:
        timeout = min(settings.timeout_s, 10.0)

        def get(url: str, **kwargs: Any) -> httpx.Response:
            with httpx.Client(timeout=timeout, headers={"Accept-Encoding": ACCEPT_ENCODING}) as c:
                return read_reply(c, c.build_request("GET", url, **kwargs), REPLY_MAX)

    return [*_local(), *_remote(settings, get), _spool(settings)]


def cmd_doctor(args: argparse.Namespace) -> int:
    try:
        settings = ClientSettings.from_env(url=args.url, token=args.token)
    except SettingsError as exc:
        print(f"[fail] settings      {exc}")
        return 1
    checks = run_checks(settings)
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=1))
    else:
        for c in checks:
            print(f"[{c.status:<4}] {c.name:<13} {c.detail}")
    return 1 if any(c.status == "fail" for c in checks) else 0


def add_doctor_command(subparsers: Any) -> None:
    """Register ``doctor`` on the top-level ``spectrawatch`` parser."""
    p = subparsers.add_parser("doctor", help="check connectivity, auth, versions, spool, worker")
    p.add_argument("--url", default=None, help="server URL (SPECTRAWATCH_URL)")
    p.add_argument("--token", default=None, help="API token (SPECTRAWATCH_TOKEN)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=cmd_doctor)
