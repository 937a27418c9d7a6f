"""``spectrawatch alerts list|ack|rules|set|reset``: alerts and alert rules over the HTTP API."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

from spectrawatch._cli_http import (
    CliError,
    call,
    call_pages,
    print_result,
    reporting_errors,
    segment,
    server_args,
)


# CLI flag -> rule parameter (value type)
def _finite_float(text: str) -> float:
    """A finite number (argparse type): rule thresholds cannot be NaN or infinite. A bad value
    raises ArgumentTypeError, whose text argparse shows after the option's name."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


# rule parameters: --NAME VALUE (type, help); docs/alerts.md "Rule kinds and parameters"
_PARAMS: dict[str, tuple[Callable[[str], Any], str]] = {
    "kind": (str, "threshold, growth, nonfinite, client_drops or silence (a custom rule)"),
    "metric": (str, "metric key the rule watches (threshold, growth)"),
    "scalar": (
        str,
        "a scalar the run logs (monitor.log, e.g. val_loss) the rule watches instead of a "
        "metric (threshold, growth; a custom rule)",
    ),
    "below": (_finite_float, "threshold: fire below this"),
    "above": (_finite_float, "threshold: fire above this; client_drops: drops above this"),
    "factor": (_finite_float, "growth: fire when value / min(previous --window values) >= this"),
    "window": (int, "growth: how many previous positive values the minimum is taken over"),
    "hysteresis": (_finite_float, "clear only once the value is back inside by this margin"),
    "fire_after": (int, "consecutive points past the limit before the alert opens"),
    "clear_after": (int, "consecutive points back inside before it resolves"),
    "after_step": (
        int,
        "threshold, growth: ignore the points at steps below this (a warm-up; default 0)",
    ),
    "minutes": (_finite_float, "silence: minutes without data"),
    "layers": (str, "glob on layer names (default *)"),
    "severity": (str, "info, warning or critical"),
}

_FLAGS = {  # boolean rule parameters: --NAME / --no-NAME
    "include_model": "also watch the whole-model series (__model__)",
    "above_after_in_range": "threshold rules: fire above `above` only for a series that was "
    "once in range",
}


def cmd_list(args: argparse.Namespace) -> int:
    """``alerts list``: the newest ``--limit`` alerts (or ``--all``), read a page at a time (the
    server's first page alone stopped at 100)."""
    if args.limit < 1:
        raise CliError("--limit must be at least 1")
    params: dict[str, Any] = {"status": args.status} if args.status else {}
    if args.acknowledged is not None:
        params["acknowledged"] = str(args.acknowledged).lower()
    most = None if args.all else args.limit
    if args.run is not None:
        data = call_pages(args, f"/runs/{args.run}/alerts", params, most)
    else:
        if args.project:
            params["project"] = args.project
        data = call_pages(args, "/alerts", params, most)
    lines = [
        f"{a['id']:>6}  {_state(a):<8} {a['severity']:<8} run {a['run_id']:<5} "
        f"step {a['step']:<8} {a['message']}"
        for a in data
    ]
    print_result(args, data, lines)
    return 0


def _state(alert: dict[str, Any]) -> str:
    """``open``, ``resolved``, or ``acked`` for an open episode someone acknowledged."""
    acked = alert.get("acknowledged_at") is not None and alert["status"] == "open"
    return "acked" if acked else str(alert["status"])


def _ack_targets(args: argparse.Namespace) -> list[int]:
    """The alert ids given, or every open episode of ``--run`` / ``--project`` still to change
    (all read before the first change: paging by offset would skip some)."""
    if args.ids:
        if args.run is not None or args.project:
            raise CliError("give alert ids, or --run / --project, not both")
        return list(args.ids)
    params = {"status": "open", "acknowledged": str(args.undo).lower()}
    if args.run is not None:
        return [a["id"] for a in call_pages(args, f"/runs/{args.run}/alerts", params)]
    if args.project:
        rows = call_pages(args, "/alerts", {**params, "project": args.project})
        return [a["id"] for a in rows]
    raise CliError("name the alerts: ids, or --run RUN_ID, or --project NAME")


def cmd_ack(args: argparse.Namespace) -> int:
    body = {"acknowledged": not args.undo}
    verb = "unacknowledged" if args.undo else "acknowledged"
    data: list[Any] = []
    for alert_id in _ack_targets(args):
        try:
            data.append(call(args, "PATCH", f"/alerts/{alert_id}", json=body))
        except CliError as exc:  # say what was already done before the failure
            done = ", ".join(str(a["id"]) for a in data) or "none"
            raise CliError(f"alert {alert_id}: {exc} ({verb} before it: {done})") from None
    print_result(args, data, [f"{a['id']:>6}  {verb:<14} {a['message']}" for a in data])
    return 0


def _shown(key: str, value: Any) -> bool:
    """A parameter worth printing: set, not a default that says nothing (``layers: *``,
    ``after_step: 0``), not the kind (a column of its own)."""
    if key == "kind" or (key == "after_step" and not value):
        return False
    return value is not None and value is not False and value != "*"


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
    alerts = subparsers.add_parser("alerts", help="list and acknowledge alerts, edit alert rules")
    common = server_args()
    common.add_argument("--json", action="store_true", help="print the API's JSON")
    sub = alerts.add_subparsers(dest="alerts_command", required=True)

    lst = sub.add_parser("list", parents=[common], help="alerts of a run or project")
    lst.add_argument("--project", default=None, help="only alerts of this project")
    lst.add_argument("--run", type=int, default=None, help="only alerts of this run (id)")
    lst.add_argument(
        "--status", choices=["open", "resolved"], default=None, help="only open or resolved ones"
    )
    seen = lst.add_mutually_exclusive_group()
    seen.add_argument(
        "--acknowledged",
        dest="acknowledged",
        action="store_true",
        default=None,
        help="only acknowledged ones",
    )
    seen.add_argument(
        "--unacknowledged", dest="acknowledged", action="store_false", help="only the others"
    )
    most = lst.add_mutually_exclusive_group()
    most.add_argument(
        "--limit", type=int, default=100, help="at most this many alerts, newest first"
    )
    most.add_argument("--all", action="store_true", help="every alert")
    lst.set_defaults(func=reporting_errors(cmd_list))

    ack = sub.add_parser(
        "ack",
        parents=[common],
        help="acknowledge alert episodes (they stop counting in the runs list; no webhook)",
    )
    ack.add_argument("ids", nargs="*", type=int, help="alert ids (spectrawatch alerts list)")
    ack.add_argument("--run", type=int, default=None, help="every open alert of this run (id)")
    ack.add_argument("--project", default=None, help="every open alert of this project")
    ack.add_argument("--undo", action="store_true", help="unacknowledge them instead")
    ack.set_defaults(func=reporting_errors(cmd_ack))

    rules = sub.add_parser("rules", parents=[common], help="the rules in force for a project")
    rules.add_argument("--project", required=True, help="the project")
    rules.set_defaults(func=reporting_errors(cmd_rules))

    set_ = sub.add_parser(
        "set",
        parents=[common],
        help="edit a rule or create a custom one (needs --kind, and --metric or --scalar)",
    )
    set_.add_argument("rule", help="rule name, e.g. alpha_out_of_range")
    set_.add_argument("--project", required=True, help="the project whose rule it is")
    toggle = set_.add_mutually_exclusive_group()
    toggle.add_argument(
        "--enable", dest="enabled", action="store_true", default=None, help="turn the rule on"
    )
    toggle.add_argument("--disable", dest="enabled", action="store_false", help="turn it off")
    for name, (kind, text) in _PARAMS.items():
        set_.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, help=text
        )
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
    reset.add_argument("rule", help="rule name")
    reset.add_argument("--project", required=True, help="the project whose rule it is")
    reset.set_defaults(func=reporting_errors(cmd_reset))
