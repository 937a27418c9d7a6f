"""``spectrawatch runs list|delete``: the runs of a server, and removing one with its data."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from spectrawatch._cli_alerts import CliError, _call, server_args
from spectrawatch._export import resolve_run


def cmd_runs_list(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit}
    if args.project:
        params["project"] = args.project
    try:
        runs = _call(args, "GET", "/runs", params=params)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(runs, indent=2))
        return 0
    for r in runs:
        frames = sum((r.get("frames") or {}).values())
        print(
            f"{r['id']:>6}  {r['project']}/{r['name']}  {r['status']}  "
            f"last step {r.get('last_step')}  {frames} frames"
        )
    if not runs:
        print("(none)")
    return 0


def cmd_runs_delete(args: argparse.Namespace) -> int:
    try:
        run = resolve_run(args, args.run, args.project)
        label = f"run {run['id']} ({run['project']}/{run['name']})"
        if not args.yes:
            frames = sum((run.get("frames") or {}).values())
            print(
                f"would delete {label}: {frames} frames with their blobs, every metric, "
                "spectrum, scalar and alert of it; pass --yes to delete",
                file=sys.stderr,
            )
            return 1
        out = _call(args, "DELETE", f"/runs/{run['id']}")
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"deleted {label}: {out['frames']} frames, {out['bytes'] / 2**20:.1f} MiB of blobs")
    if out.get("blobs_not_deleted"):
        print(
            f"{out['blobs_not_deleted']} blob(s) could not be deleted now; the server removes "
            "them at its next start"
        )
    return 0


def add_runs_commands(subparsers: Any) -> None:
    """Register ``runs list`` and ``runs delete`` on the top-level ``spectrawatch`` parser."""
    common = server_args()
    runs = subparsers.add_parser("runs", help="list runs, delete a run with its data")
    sub = runs.add_subparsers(dest="runs_command", required=True)
    ls = sub.add_parser("list", parents=[common], help="runs, newest first")
    ls.add_argument("--project", default=None)
    ls.add_argument("--limit", type=int, default=100)
    ls.add_argument("--json", action="store_true", help="print the runs as JSON")
    ls.set_defaults(func=cmd_runs_list)
    rm = sub.add_parser(
        "delete", parents=[common], help="delete a run and everything stored for it"
    )
    rm.add_argument("run", help="run id; or run name, always with --project when given")
    rm.add_argument("--project", default=None)
    rm.add_argument("--yes", action="store_true", help="really delete (without it: a dry run)")
    rm.set_defaults(func=cmd_runs_delete)
