"""``spectrawatch alerts list|rules|set|reset``: alerts and alert rules over the HTTP API."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

from spectrawatch._cli_http import call, print_result, reporting_errors, segment, server_args


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


def cmd_list(args: argparse.Namespace) -> int:
    params = {"status": args.status} if args.status else {}
    if args.run is not None:
        data = call(args, "GET", f"/runs/{args.run}/alerts", params=params)
    else:
        if args.project:
            params["project"] = args.project
        data = call(args, "GET", "/alerts", params=params)
    lines = [
        f"{a['id']:>6}  {a['status']:<8} {a['severity']:<8} run {a['run_id']:<5} "
        f"step {a['step']:<8} {a['message']}"
        for a in data
    ]
    print_result(args, data, lines)
    return 0


def _shown(key: str, value: Any) -> bool:
    return value is not None and value is not False and value != "*" and key != "kind"


def cmd_rules(args: argparse.Namespace) -> int:
    data = call(args, "GET", f"/projects/{segment(args.project)}/alert-rules")
    lines = []
    for r in data:
        shown = {k: v for k, v in r["params"].items() if _shown(k, v)}
        state = "on " if r["enabled"] else "off"
        line = f"{state} {r['name']:<26} {r['kind']:<12} {json.dumps(shown)}"
        if r.get("problem"):  # stored params an upgrade made invalid: off until edited/reset
            line += f"  INVALID ({r['problem']}; reset or edit it)"
        lines.append(line)
    print_result(args, data, lines)
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    params = {k: getattr(args, k) for k in _PARAMS if getattr(args, k) is not None}
    for flag in _FLAGS:
        if getattr(args, flag) is not None:
            params[flag] = getattr(args, flag)
    body: dict[str, Any] = {"params": params}
    if args.enabled is not None:
        body["enabled"] = args.enabled
    data = call(
        args,
        "PATCH",
        f"/projects/{segment(args.project)}/alert-rules/{segment(args.rule)}",
        json=body,
    )
    state = "on" if data["enabled"] else "off"
    print_result(args, data, [f"{data['name']} ({state}): {json.dumps(data['params'])}"])
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    call(args, "DELETE", f"/projects/{segment(args.project)}/alert-rules/{segment(args.rule)}")
    print(f"rule {args.rule!r} of project {args.project!r} reset")
    return 0


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
    lst.set_defaults(func=reporting_errors(cmd_list))

    rules = sub.add_parser("rules", parents=[common], help="the rules in force for a project")
    rules.add_argument("--project", required=True)
    rules.set_defaults(func=reporting_errors(cmd_rules))

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
    set_.set_defaults(func=reporting_errors(cmd_set))

    reset = sub.add_parser("reset", parents=[common], help="reset a rule to its defaults")
    reset.add_argument("rule")
    reset.add_argument("--project", required=True)
    reset.set_defaults(func=reporting_errors(cmd_reset))
