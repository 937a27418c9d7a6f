"""``spectrawatch alerts list|rules|set|reset``: alerts and alert rules over the HTTP API."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import httpx

from spectrawatch._transport import error_of
from spectrawatch.config import DEFAULT_URL


# CLI flag -> rule parameter (value type)
def _finite_float(text: str) -> float:
    """A finite number (argparse type): rule thresholds cannot be NaN or infinite."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


_PARAMS: dict[str, Callable[[str], Any]] = {
    "kind": str,
    "metric": str,
    "below": _finite_float,
    "above": _finite_float,
    "factor": _finite_float,
    "window": int,
    "hysteresis": _finite_float,
    "fire_after": int,
    "clear_after": int,
    "minutes": _finite_float,
    "layers": str,
    "severity": str,
}

_FLAGS = {  # boolean rule parameters: --NAME / --no-NAME
    "include_model": "also watch the whole-model series (__model__)",
    "above_after_in_range": "threshold rules: fire above `above` only for a series that was "
    "once in range",
}


class CliError(Exception):
    """A failed API call, with the server's message (and HTTP ``status`` when it answered)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def server_url(args: argparse.Namespace) -> str:
    """The server root URL: ``--url``, else ``SPECTRAWATCH_URL``, else the default."""
    return str(args.url or os.environ.get("SPECTRAWATCH_URL") or DEFAULT_URL).rstrip("/")


def _client(args: argparse.Namespace) -> httpx.Client:
    url = server_url(args)
    token = args.token or os.environ.get("SPECTRAWATCH_TOKEN")
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=f"{url}/api/v1", headers=headers, timeout=30)


def server_args() -> argparse.ArgumentParser:
    """The ``--url``/``--token`` options every server-talking command shares (a parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help=f"server URL (SPECTRAWATCH_URL, {DEFAULT_URL})")
    common.add_argument("--token", default=None, help="API token (SPECTRAWATCH_TOKEN)")
    return common


def _call(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> Any:
    with _client(args) as client:
        try:
            response = client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach the server: {exc}") from exc
    if response.status_code >= 400:
        _, message = error_of(response)
        if response.status_code == 404 and server_url(args).endswith("/api/v1"):
            message += " (--url is the server root, e.g. http://host:8765, without /api/v1)"
        raise CliError(f"HTTP {response.status_code}: {message}", response.status_code)
    return None if response.status_code == 204 else response.json()


def _print(args: argparse.Namespace, data: Any, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(lines) if lines else "(none)")


def cmd_list(args: argparse.Namespace) -> int:
    params = {"status": args.status} if args.status else {}
    if args.run is not None:
        data = _call(args, "GET", f"/runs/{args.run}/alerts", params=params)
    else:
        if args.project:
            params["project"] = args.project
        data = _call(args, "GET", "/alerts", params=params)
    lines = [
        f"{a['id']:>6}  {a['status']:<8} {a['severity']:<8} run {a['run_id']:<5} "
        f"step {a['step']:<8} {a['message']}"
        for a in data
    ]
    _print(args, data, lines)
    return 0


def _shown(key: str, value: Any) -> bool:
    return value is not None and value is not False and value != "*" and key != "kind"


def cmd_rules(args: argparse.Namespace) -> int:
    data = _call(args, "GET", f"/projects/{args.project}/alert-rules")
    lines = []
    for r in data:
        shown = {k: v for k, v in r["params"].items() if _shown(k, v)}
        state = "on " if r["enabled"] else "off"
        lines.append(f"{state} {r['name']:<26} {r['kind']:<12} {json.dumps(shown)}")
    _print(args, data, lines)
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    params = {k: getattr(args, k) for k in _PARAMS if getattr(args, k) is not None}
    for flag in _FLAGS:
        if getattr(args, flag) is not None:
            params[flag] = getattr(args, flag)
    body: dict[str, Any] = {"params": params}
    if args.enabled is not None:
        body["enabled"] = args.enabled
    data = _call(args, "PATCH", f"/projects/{args.project}/alert-rules/{args.rule}", json=body)
    state = "on" if data["enabled"] else "off"
    _print(args, data, [f"{data['name']} ({state}): {json.dumps(data['params'])}"])
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    _call(args, "DELETE", f"/projects/{args.project}/alert-rules/{args.rule}")
    print(f"rule {args.rule!r} of project {args.project!r} reset")
    return 0


def _run(func: Any) -> Any:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            code: int = func(args)
        except CliError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return code

    return wrapped


def add_alerts_commands(subparsers: Any) -> None:
    """Register ``alerts`` and its sub-commands on the top-level ``spectrawatch`` parser."""
    alerts = subparsers.add_parser("alerts", help="list alerts and edit alert rules")
    common = server_args()
    common.add_argument("--json", action="store_true", help="print the API's JSON")
    sub = alerts.add_subparsers(dest="alerts_command", required=True)

    lst = sub.add_parser("list", parents=[common], help="alerts of a run or project")
    lst.add_argument("--project", default=None)
    lst.add_argument("--run", type=int, default=None, help="run id")
    lst.add_argument("--status", choices=["open", "resolved"], default=None)
    lst.set_defaults(func=_run(cmd_list))

    rules = sub.add_parser("rules", parents=[common], help="the rules in force for a project")
    rules.add_argument("--project", required=True)
    rules.set_defaults(func=_run(cmd_rules))

    set_ = sub.add_parser(
        "set", parents=[common], help="edit a rule or create a custom one (needs --kind, --metric)"
    )
    set_.add_argument("rule", help="rule name, e.g. alpha_out_of_range")
    set_.add_argument("--project", required=True)
    toggle = set_.add_mutually_exclusive_group()
    toggle.add_argument("--enable", dest="enabled", action="store_true", default=None)
    toggle.add_argument("--disable", dest="enabled", action="store_false")
    for name, kind in _PARAMS.items():
        set_.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None)
    for flag, text in _FLAGS.items():
        set_.add_argument(
            f"--{flag.replace('_', '-')}",
            dest=flag,
            action=argparse.BooleanOptionalAction,
            default=None,
            help=text,
        )
    set_.set_defaults(func=_run(cmd_set))

    reset = sub.add_parser("reset", parents=[common], help="reset a rule to its defaults")
    reset.add_argument("rule")
    reset.add_argument("--project", required=True)
    reset.set_defaults(func=_run(cmd_reset))
